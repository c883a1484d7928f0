"""Image decoding as the reference's ``tf.image.decode_jpeg(bytes, channels=3)`` does it.

DeepMind's input pipeline decodes with TensorFlow, whose JPEG decoder is libjpeg-turbo with the
fast integer DCT (IFAST) and fancy chroma upsampling. PIL uses the accurate DCT, which lands up
to 18 grey levels away on most pixels, so JPEGs are decoded here with ``simplejpeg`` (the same
libjpeg-turbo, with ``fastdct=True``). What libjpeg-turbo does not do, or TensorFlow does in its
own code, is written here by hand:

- CMYK / YCCK JPEGs: TensorFlow asks libjpeg for CMYK and converts to RGB itself, with integer
  arithmetic that depends on whether the file carries an Adobe APP14 marker.
- Recoverable corruptions: TensorFlow decodes through libjpeg's warnings (bytes before a marker,
  a damaged scan), but fails on a file that ends before its last scan does. ``simplejpeg``'s
  strict mode stops at any warning, and its header reader refuses stray bytes between
  segments, so the header is rewritten without them and the strictness is chosen per file.
- PNG and GIF: ``decode_jpeg`` reads them too (lossless, so PIL gives the same pixels); 16-bit
  PNG samples keep their high byte as libpng's ``png_set_strip_16`` does. BMP and WebP are
  refused, as ``decode_jpeg`` refuses them (WebP decodes to a 4-D animation tensor there).
"""
from __future__ import annotations

import io
import os
from typing import Any, Optional, Tuple

import numpy as np

__all__ = ['ImageDecodeError', 'decode_image', 'image_format', 'jpeg_components']

_JPEG, _PNG, _GIF = 'JPEG', 'PNG', 'GIF'
_REFUSED = {
    'BMP': 'tf.image.decode_jpeg refuses BMP files ("use decode_bmp")',
    'WebP': 'tf.image.decode_jpeg reads WebP as a 4-D animation tensor the reference pipeline '
            'cannot use',
}


class ImageDecodeError(ValueError):
    """An image that cannot be decoded the way the reference decodes it.

    The message names the file (or says the input was in-memory bytes) and the reason: empty,
    truncated, corrupt, or a format the reference's decoder does not read.
    """


def image_format(data: bytes) -> Optional[str]:
    """The image format of encoded bytes, from their leading magic number.

    Args:
        data: the start of an encoded image (12 bytes are enough).

    Returns:
        ``'JPEG'``, ``'PNG'``, ``'GIF'``, ``'BMP'`` or ``'WebP'``; None when none of these.
    """
    if data[:3] == b'\xff\xd8\xff':
        return _JPEG
    if data[:8] == b'\x89PNG\r\n\x1a\n':
        return _PNG
    if data[:6] in (b'GIF87a', b'GIF89a'):
        return _GIF
    if data[:2] == b'BM':
        return 'BMP'
    if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
        return 'WebP'
    return None


def decode_image(data: bytes, source: Optional[str] = None) -> np.ndarray:
    """Decodes an image to RGB as ``tf.image.decode_jpeg(data, channels=3)`` does.

    Args:
        data: the encoded file (JPEG of any kind libjpeg-turbo reads, PNG or GIF).
        source: a name for error messages, usually the file's path.

    Returns:
        A ``(H, W, 3)`` uint8 array.

    Raises:
        ImageDecodeError: the bytes are empty, truncated or corrupt beyond what TensorFlow
            recovers from, or in a format the reference's decoder does not read.
    """
    where = source or 'in-memory image'
    if len(data) == 0:
        raise ImageDecodeError(f'{where}: empty file')
    fmt = image_format(data)
    if fmt == _JPEG:
        return _decode_jpeg(bytes(data), where)
    if fmt in (_PNG, _GIF):
        return _decode_with_pil(data, fmt, where)
    if fmt in _REFUSED:
        raise ImageDecodeError(f'{where}: {fmt} image: {_REFUSED[fmt]}; convert it to PNG or JPEG '
                               'or evaluate with timm\'s pipeline')
    raise ImageDecodeError(f'{where}: not a JPEG, PNG or GIF image (starts with {bytes(data[:8])!r})')


def jpeg_components(data: bytes) -> Optional[int]:
    """The number of colour components in a JPEG's frame header (what TensorFlow's
    ``extract_jpeg_shape`` reports as channels): 1 grayscale, 3 YCbCr / RGB, 4 CMYK / YCCK.

    Args:
        data: the encoded file.

    Returns:
        The count, or None for data that is not a JPEG or whose header cannot be read.
    """
    if image_format(data) != _JPEG:
        return None
    try:
        return _jpeg_header(data, '')[1] or None
    except ImageDecodeError:
        return None


def _jpeg_header(data: bytes, where: str) -> Tuple[bytes, int, bool]:
    """Walks a JPEG's segments up to the first scan, as libjpeg's marker reader does.

    Returns the bytes with any stray bytes between segments removed (libjpeg skips them with a
    warning), the number of colour components in the frame header, and whether an Adobe APP14
    segment was seen (libjpeg's ``saw_Adobe_marker``: 'Adobe' and at least 12 bytes of data).
    """
    kept = []  # (start, end) of each segment; rebuilt only when stray bytes sit between them
    pos, components, adobe, stray, n = 2, 0, False, False, len(data)
    while True:
        start = pos
        while pos < n and data[pos] != 0xFF:  # libjpeg's next_marker: stray bytes are skipped
            pos += 1
        stray = stray or pos > start
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ImageDecodeError(f'{where}: truncated JPEG (ends inside its header)')
        marker = data[pos]
        pos += 1
        if marker == 0xDA:  # start of scan: the rest is image data
            if not stray:
                return data, components, adobe
            segments = b''.join(data[a:b] for a, b in kept)
            return data[:2] + segments + data[pos - 2:], components, adobe
        if marker in (0xD8, 0xD9):
            raise ImageDecodeError(f'{where}: corrupt JPEG (marker 0x{marker:02x} before any '
                                   'image data)')
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length; libjpeg ignores them here
            continue
        if pos + 2 > n:
            raise ImageDecodeError(f'{where}: truncated JPEG (ends inside its header)')
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            raise ImageDecodeError(f'{where}: truncated or corrupt JPEG header segment '
                                   f'0x{marker:02x}')
        if marker == 0xEE and length - 2 >= 12 and data[pos + 2:pos + 7] == b'Adobe':
            adobe = True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and length >= 8:
            components = data[pos + 7]
        kept.append((pos - 2, pos + length))  # from the marker's 0xFF to the segment's end
        pos += length


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    import simplejpeg

    data, components, adobe = _jpeg_header(data, where)
    cmyk = components == 4
    space = 'CMYK' if cmyk else 'RGB'
    try:
        img = simplejpeg.decode_jpeg(data, colorspace=space, fastdct=True, fastupsample=False,
                                     strict=True)
    except ValueError as strict_error:
        message = str(strict_error)
        # TensorFlow's memory source fails when the data ends before the image does; libjpeg's
        # other warnings (a damaged scan, stray bytes) it decodes through.
        sos = data.find(b'\xff\xda')
        if message.startswith('Premature end') or data.find(b'\xff\xd9', sos) < 0:
            raise ImageDecodeError(f'{where}: truncated JPEG ({message})') from None
        try:
            img = simplejpeg.decode_jpeg(data, colorspace=space, fastdct=True,
                                         fastupsample=False, strict=False)
        except ValueError as e:
            raise ImageDecodeError(f'{where}: corrupt JPEG ({e})') from None
    if cmyk:
        img = _cmyk_to_rgb(img, adobe)
    return img


def _cmyk_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
    """TensorFlow's own CMYK -> RGB (integer division; Adobe files store inverted CMYK)."""
    c = cmyk.astype(np.int32)
    k = c[..., 3:4]
    rgb = (k * c[..., :3]) // 255 if adobe else ((255 - k) * (255 - c[..., :3])) // 255
    return rgb.astype(np.uint8)


def _decode_with_pil(data: bytes, fmt: str, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = pil_to_rgb(im)
            transparent = im.info.get('transparency')
            if fmt == _GIF and im.mode == 'P' and isinstance(transparent, int):
                # TF's GIF decoder writes 0 where the first frame is transparent (no previous
                # frame to show through); PIL would give the palette colour
                rgb[np.asarray(im) == transparent] = 0
            return rgb
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f'{where}: corrupt or truncated {fmt} ({e})') from None


def pil_to_rgb(im: Any) -> np.ndarray:
    """A PIL image as a writable uint8 ``(H, W, 3)`` array, 16-bit grey as libpng's
    ``png_set_strip_16`` (the high byte) where PIL's ``convert('RGB')`` would clip."""
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        grey = (np.asarray(im, dtype=np.int64) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(im.convert('RGB'))


def read_image_bytes(source: Any) -> Tuple[bytes, str]:
    """The bytes and a display name of a path or a binary file object.

    Raises:
        ImageDecodeError: the path cannot be read (missing, a folder, no permission).
    """
    if hasattr(source, 'read'):
        name = str(getattr(source, 'name', 'file object'))
        try:
            data = source.read()
        except OSError as e:
            raise ImageDecodeError(f'{name}: cannot read ({e})') from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageDecodeError(f'{name}: open image files in binary mode (\'rb\'), not text mode')
        return bytes(data), name
    path = os.fspath(source)
    try:
        with open(path, 'rb') as f:
            return f.read(), path
    except OSError as e:
        raise ImageDecodeError(f'{path}: cannot read image file ({e.strerror or e})') from None
