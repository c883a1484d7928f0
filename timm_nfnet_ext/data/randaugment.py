"""DeepMind's RandAugment (``autoaugment.distort_image_with_randaugment``) on uint8 CHW tensors.

One file for the 16 ops and their level rules (over 500 lines with them), so that the whole
policy reads in one place, as the reference's ``autoaugment.py`` does. Every op takes a uint8
``(3, H, W)`` tensor (and its arguments) and returns a new uint8 tensor of the same shape.

The NFNet reference applies ``num_layers`` (4) layers to each mixed, clipped, uint8 image; each
layer picks one of the 16 ops of :data:`OPS` uniformly and always applies it at the shared
magnitude ``M`` (no probability gate: the reference draws a probability per op but never uses
it). Arguments from ``M`` (``level = M / 10``):

===========================  ======================================================
Rotate                       ``level * 30`` degrees, random sign
ShearX / ShearY              ``level * 0.3``, random sign
TranslateX / TranslateY      ``level * 100`` pixels, random sign
Color / Contrast /           factor ``level * 1.8 + 0.1`` (exactly 1, the identity, at M = 5)
Brightness / Sharpness
Posterize                    keep ``int(level * 4)`` bits
Solarize                     threshold ``int(level * 256)``, stored in a uint8 (mod 256)
SolarizeAdd                  add ``int(level * 110)`` to pixels below 128
Cutout                       a ``2 * int(level * 40)`` square, centre uniform
===========================  ======================================================

Pixels a geometric op uncovers, and Cutout's square, are 128 in every channel. The ops are
written here rather than taken from torchvision because the reference's TensorFlow versions
round differently (see each function); the quirks the reference trained with are kept:

- Solarize's threshold is converted to uint8 by TensorFlow, so 256 (M = 10) becomes 0 (every
  pixel inverted) and 384 (M = 15) becomes 128;
- Posterize's shift is clamped to 0..7 by TensorFlow's kernel, so 0 bits keep the top bit;
- Contrast blends towards ``min(H * W / 256, 255)``, not towards the mean grey: the reference
  sums the histogram's counts instead of its values;
- Sharpness keeps the one-pixel border of the image unsmoothed.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ['OPS', 'RandAugment', 'apply_op', 'auto_contrast', 'blend', 'brightness', 'color',
           'contrast', 'cutout', 'equalize', 'invert', 'posterize', 'rotate', 'sharpness',
           'shear_x', 'shear_y', 'solarize', 'solarize_add', 'translate_x', 'translate_y']

OPS: Tuple[str, ...] = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
    'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
FILL = 128
MAX_MAGNITUDE = 30
_F32 = np.float32


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 \
            or image.shape[0] != 3:
        what = f'{image.dtype} tensor of shape {tuple(image.shape)}' if isinstance(image, torch.Tensor) \
            else type(image).__name__
        raise TypeError(f'RandAugment ops take a uint8 (3, H, W) tensor, not a {what}')


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 255] and truncate, as ``tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)``."""
    return x.clamp_(0.0, 255.0).to(torch.uint8)


_VALUES = np.arange(256)


def _apply_lut(image: torch.Tensor, lut: np.ndarray) -> torch.Tensor:
    """``lut[x]`` per pixel, one ``(256,)`` table or one per channel ``(3, 256)``.

    A pixel-wise op on uint8 is a function of the value alone, so it is computed once per value
    (with the op's own float32 rule) and looked up: torch's uint8 ``where`` and indexing are
    several times slower than numpy's ``take`` on CPU.
    """
    pixels = image.numpy()
    lut = lut.astype(np.uint8)
    if lut.ndim == 1:
        return torch.from_numpy(np.take(lut, pixels))
    return torch.from_numpy(np.stack([np.take(lut[c], pixels[c]) for c in range(3)]))


def _blend_float(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    """TF's blend of float32 ``a`` and ``b``: ``a + factor * (b - a)`` in float32, clipped,
    truncated (PIL's ImageEnhance rounds instead)."""
    if factor == 0.0:
        return _to_uint8(a.clone())
    if factor == 1.0:
        return _to_uint8(b.clone())
    return _to_uint8(a + (b - a) * float(_F32(factor)))


def blend(image1: torch.Tensor, image2: torch.Tensor, factor: float) -> torch.Tensor:
    """``image1 + factor * (image2 - image1)`` in float32, clipped and truncated to uint8.

    Args:
        image1: uint8 tensor (``factor == 0`` gives it).
        image2: uint8 tensor of the same shape (``factor == 1`` gives it).
        factor: the blend factor (above 1 extrapolates).

    Returns:
        The uint8 blend.
    """
    return _blend_float(image1.float(), image2.float(), factor)


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """``tf.image.rgb_to_grayscale`` of uint8: weights on [0, 1] floats, back by ``* 255.5``."""
    x = image.float() * float(_F32(1 / 255))
    gray = (x[0] * float(_F32(0.2989)) + x[1] * float(_F32(0.5870))) + x[2] * float(_F32(0.1140))
    return (gray * 255.5).to(torch.uint8)


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 255]: ``x * s - lo * s`` with ``s = 255 / (hi - lo)`` in float32.

    torchvision scales ``(x - lo) * s``, which rounds differently; constant channels are kept.
    """
    flat = image.reshape(3, -1)
    los, his = flat.min(1).values.tolist(), flat.max(1).values.tolist()
    luts = np.tile(_VALUES, (3, 1))
    for c, (lo, hi) in enumerate(zip(los, his)):
        if hi > lo:
            scale = _F32(255.0) / (_F32(hi) - _F32(lo))
            values = _VALUES.astype(_F32) * scale + -_F32(lo) * scale
            luts[c] = np.clip(values, 0, 255).astype(np.uint8)
    return _apply_lut(image, luts)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """PIL's equalize per channel: a LUT from the cumulative histogram, step ignoring the last bin.
    """
    pixels = image.numpy()
    luts = np.tile(_VALUES, (3, 1))  # identity where the step is 0
    for c in range(3):
        hist = np.bincount(pixels[c].reshape(-1), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero.sum() - nonzero[-1]) // 255
        if step:
            luts[c, 0] = 0
            luts[c, 1:] = np.clip((np.cumsum(hist) + step // 2) // step, 0, 255)[:-1]
    return _apply_lut(image, luts)


def invert(image: torch.Tensor) -> torch.Tensor:
    """``255 - x``.
    """
    return _apply_lut(image, 255 - _VALUES)


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` bits; the shift ``8 - bits`` is a uint8 clamped to 0..7 as in TF.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        bits: the bits to keep.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    shift = min((8 - int(bits)) % 256, 7)
    return _apply_lut(image, (_VALUES >> shift) << shift)


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert pixels ``>= threshold``; the threshold wraps mod 256 as TF's uint8 constant does.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        threshold: pixels at or above it are inverted.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return _apply_lut(image, np.where(_VALUES < int(threshold) % 256, _VALUES, 255 - _VALUES))


def solarize_add(image: torch.Tensor, addition: int, threshold: int = 128) -> torch.Tensor:
    """Add ``addition`` (clipped to [0, 255]) to pixels below ``threshold``.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        addition: the value added (the sum is clipped to [0, 255]).
        threshold: only pixels below it change.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return _apply_lut(image, np.where(_VALUES < threshold, np.clip(_VALUES + int(addition), 0, 255), _VALUES))


def color(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the image's grey version (TF's grayscale rounding).

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        factor: the blend factor (0: grey, 1: the image, above 1 extrapolates).

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return blend(_grayscale(image).expand(3, -1, -1), image, factor)


def _constant_blend(image: torch.Tensor, level: int, factor: float) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.float32)
    return _apply_lut(image, _blend_float(torch.full((256,), float(level)), values, factor).numpy())


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a constant ``min(H * W / 256, 255)`` image: the reference's mean is the sum of
    the grey histogram's counts over 256, not the mean grey level; kept as trained.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        factor: the blend factor (0: the constant image, 1: the image).

    Returns:
        The uint8 result, shaped like ``image``.
    """
    level = min(_F32(image.shape[1] * image.shape[2]) / _F32(256.0), _F32(255.0))
    return _constant_blend(image, int(level), factor)


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with black.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        factor: the blend factor (0: black, 1: the image).

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return _constant_blend(image, 0, factor)


_SMOOTH = [[_F32(1 / 13), _F32(1 / 13), _F32(1 / 13)], [_F32(1 / 13), _F32(5 / 13), _F32(1 / 13)],
           [_F32(1 / 13), _F32(1 / 13), _F32(1 / 13)]]


def sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter, whose one-pixel border is the original image.

    The 3x3 kernel is summed tap by tap, rows first, in float32 (a fixed order, unlike a conv
    backend's), then clipped and truncated.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        factor: the blend factor (0: smoothed, 1: the image).

    Returns:
        The uint8 result, shaped like ``image``.
    """
    _, h, w = image.shape
    degenerate = image.clone()
    if h > 2 and w > 2:
        x = image.float()
        acc = torch.zeros(3, h - 2, w - 2)
        for dy in range(3):
            for dx in range(3):
                acc += x[:, dy:dy + h - 2, dx:dx + w - 2] * float(_SMOOTH[dy][dx])
        degenerate[:, 1:-1, 1:-1] = _to_uint8(acc)
    return blend(degenerate, image, factor)


@functools.lru_cache(maxsize=64)
def _source_index(h: int, w: int, matrix: Tuple[float, ...]) -> torch.Tensor:
    """For each output pixel, its input pixel's flat index, or ``h * w`` (the fill) outside.

    The input coordinate ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` is computed in float32 as the
    kernel does and rounded half away from zero (``std::round``; torch.round rounds half to
    even): in float64, where ``v + 0.5`` is exact, that is ``floor(v + 0.5)`` for ``v > -0.5``,
    and the pixel is inside when ``-0.5 < v < size - 0.5``. Cached: RandAugment uses two maps
    (one per sign) per op and image size.
    """
    a0, a1, a2, b0, b1, b2 = (_F32(v) for v in matrix)
    ys = np.arange(h, dtype=_F32)[:, None]
    xs = np.arange(w, dtype=_F32)[None, :]
    src_x = ((xs * a0 + ys * a1) + a2).astype(np.float64)
    src_y = ((xs * b0 + ys * b1) + b2).astype(np.float64)
    inside = (src_x > -0.5) & (src_x < w - 0.5) & (src_y > -0.5) & (src_y < h - 0.5)
    flat = np.floor(src_y + 0.5) * w + np.floor(src_x + 0.5)
    flat = np.where(inside, flat, h * w)
    # three channels of the (3, h * w + 1) padded image, flattened for torch.take
    return torch.from_numpy((flat.reshape(1, -1) + np.arange(3).reshape(3, 1) * (h * w + 1)).astype(np.int64))


def _transform(image: torch.Tensor, matrix: Sequence[float], fill: int) -> torch.Tensor:
    """The reference's ``tfa.image.transform`` with nearest sampling and a constant fill.

    Output pixel ``(x, y)`` reads input ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` rounded to the
    nearest pixel; outside the image it is ``fill`` (torchvision's affine uses another
    coordinate convention and rounding, so this is written out).
    """
    _, h, w = image.shape
    index = _source_index(h, w, tuple(float(_F32(v)) for v in matrix))
    padded = torch.cat([image.reshape(3, h * w), image.new_full((3, 1), fill)], 1)
    return torch.take(padded, index).view(3, h, w)  # take: faster than advanced indexing


def rotate(image: torch.Tensor, degrees: float, fill: int = FILL) -> torch.Tensor:
    """Rotate about the centre by ``degrees`` (tfa's ``angles_to_projective_transforms``).

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        degrees: the angle, as tfa's ``rotate`` takes it (in degrees here, not radians).
        fill: the value of pixels read from outside the image.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    _, h, w = image.shape
    radians = _F32(degrees) * _F32(math.pi / 180.0)
    cos, sin = np.cos(radians, dtype=_F32), np.sin(radians, dtype=_F32)
    wm, hm = _F32(w - 1), _F32(h - 1)
    x_offset = (wm - (cos * wm - sin * hm)) / _F32(2.0)
    y_offset = (hm - (sin * wm + cos * hm)) / _F32(2.0)
    return _transform(image, (cos, -sin, x_offset, sin, cos, y_offset), fill)


def shear_x(image: torch.Tensor, level: float, fill: int = FILL) -> torch.Tensor:
    """Input x = ``x + level * y``.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        level: the shear factor.
        fill: the value of pixels read from outside the image.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return _transform(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: torch.Tensor, level: float, fill: int = FILL) -> torch.Tensor:
    """Input y = ``level * x + y`` (arguments and result as :func:`shear_x`)."""
    return _transform(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def translate_x(image: torch.Tensor, pixels: float, fill: int = FILL) -> torch.Tensor:
    """Input x = ``x + pixels`` (the content moves left for positive ``pixels``).

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        pixels: the shift.
        fill: the value of pixels read from outside the image.

    Returns:
        The uint8 result, shaped like ``image``.
    """
    return _transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image: torch.Tensor, pixels: float, fill: int = FILL) -> torch.Tensor:
    """Input y = ``y + pixels``, the content moving up for positive ``pixels`` (arguments and result as
    :func:`translate_x`)."""
    return _transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def cutout(image: torch.Tensor, pad_size: int, generator: np.random.Generator,
           fill: int = FILL, center: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Fill rows ``[cy - p, cy + p)`` x columns ``[cx - p, cx + p)`` (clipped) with ``fill``.

    The centre ``(cy, cx)`` is uniform over the pixels unless ``center`` is given.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        pad_size: half the side of the square, ``p``.
        generator: draws the centre.
        fill: the value written into the square.
        center: ``(cy, cx)``, instead of a random centre.

    Returns:
        A new uint8 tensor (``image`` is not modified).
    """
    _, h, w = image.shape
    cy, cx = center if center is not None else (int(generator.integers(0, h)), int(generator.integers(0, w)))
    out = image.clone()
    out[:, max(0, cy - pad_size):min(h, cy + pad_size), max(0, cx - pad_size):min(w, cx + pad_size)] = fill
    return out


def _signed(value: float, sign: Optional[int], generator: np.random.Generator) -> float:
    if sign is None:
        sign = -1 if generator.random() < 0.5 else 1
    return value * sign


def apply_op(image: torch.Tensor, name: str, magnitude: float, generator: np.random.Generator,
             sign: Optional[int] = None, fill: int = FILL) -> torch.Tensor:
    """Apply one RandAugment op at magnitude ``M`` with the reference's level rules.

    Args:
        image: uint8 ``(3, H, W)`` tensor.
        name: one of :data:`OPS`.
        magnitude: ``M`` (the reference's level; 10 is the "max level").
        generator: draws the sign of Rotate / Shear / Translate and Cutout's centre.
        sign: +1 or -1 to fix the sign instead of drawing it.
        fill: value of uncovered pixels (the reference's 128).

    Returns:
        A new uint8 ``(3, H, W)`` tensor.

    Raises:
        KeyError: an unknown op name.
        TypeError: ``image`` is not a uint8 ``(3, H, W)`` tensor.
    """
    _check_image(image)
    if name not in _ARGS:
        raise KeyError(f'unknown RandAugment op {name!r}; the ops are {", ".join(OPS)}')
    level = float(magnitude) / 10.0
    fn, arg, signed = _ARGS[name]
    if arg is None:
        return fn(image)
    value = arg(level)
    if signed:
        return fn(image, _signed(value, sign, generator), fill)
    if name == 'Cutout':
        return cutout(image, value, generator, fill)
    return fn(image, value)


def _enhance(level: float) -> float:
    return level * 1.8 + 0.1


_ARGS: Dict[str, Tuple[Callable[..., torch.Tensor], Optional[Callable[[float], float]], bool]] = {
    'AutoContrast': (auto_contrast, None, False),
    'Equalize': (equalize, None, False),
    'Invert': (invert, None, False),
    'Rotate': (rotate, lambda level: level * 30.0, True),
    'Posterize': (posterize, lambda level: int(level * 4), False),
    'Solarize': (solarize, lambda level: int(level * 256), False),
    'Color': (color, _enhance, False),
    'Contrast': (contrast, _enhance, False),
    'Brightness': (brightness, _enhance, False),
    'Sharpness': (sharpness, _enhance, False),
    'ShearX': (shear_x, lambda level: level * 0.3, True),
    'ShearY': (shear_y, lambda level: level * 0.3, True),
    'TranslateX': (translate_x, lambda level: level * 100.0, True),
    'TranslateY': (translate_y, lambda level: level * 100.0, True),
    'Cutout': (cutout, lambda level: int(level * 40), False),
    'SolarizeAdd': (solarize_add, lambda level: int(level * 110), False),
}


class RandAugment:
    """The reference's RandAugment: ``num_layers`` ops, each uniform over :data:`OPS`, always applied.

    Picklable (it holds two numbers), so it runs in ``DataLoader`` workers.

    Args:
        num_layers: ops applied in sequence (the NFNet recipe's 4).
        magnitude: shared magnitude ``M`` in [0, 30] (5, 10 or 15 for NFNets; see
            :attr:`timm_nfnet_ext.variants.Variant.randaug_magnitude`).
        fill: value of pixels uncovered by geometric ops and Cutout.

    Raises:
        ValueError: a negative or non-integer ``num_layers``, a magnitude outside [0, 30], or a
            fill outside 0..255.
    """

    def __init__(self, num_layers: int = 4, magnitude: float = 10, fill: int = FILL):
        if not isinstance(num_layers, numbers.Integral) or isinstance(num_layers, bool) or num_layers < 0:
            raise ValueError(f'num_layers must be an int >= 0, not {num_layers!r}')
        if not isinstance(magnitude, numbers.Real) or isinstance(magnitude, bool) \
                or not 0 <= magnitude <= MAX_MAGNITUDE:
            hint = (f' (the reference\'s "{magnitude}" means num_layers={int(magnitude) // 100}, '
                    f'magnitude={int(magnitude) % 100})' if isinstance(magnitude, numbers.Real)
                    and magnitude > 100 else '')
            raise ValueError(f'magnitude must be a number in [0, {MAX_MAGNITUDE}], not {magnitude!r}{hint}')
        if not isinstance(fill, numbers.Integral) or not 0 <= fill <= 255:
            raise ValueError(f'fill must be an int in 0..255, not {fill!r}')
        self.num_layers = int(num_layers)
        self.magnitude = float(magnitude)
        self.fill = int(fill)

    def __call__(self, image: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
        """Augment one image.

        Args:
            image: uint8 ``(3, H, W)`` tensor (not modified).
            generator: the random source of the op choices, signs and Cutout centres.

        Returns:
            The augmented uint8 ``(3, H, W)`` tensor.

        Raises:
            TypeError: ``image`` is not a uint8 ``(3, H, W)`` tensor, or ``generator`` is not a
                ``numpy.random.Generator``.
        """
        _check_image(image)
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f'generator must be a numpy.random.Generator, not {type(generator).__name__}')
        for _ in range(self.num_layers):
            name = OPS[int(generator.integers(0, len(OPS)))]
            image = apply_op(image, name, self.magnitude, generator, fill=self.fill)
        return image

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_layers={self.num_layers}, magnitude={self.magnitude:g}, fill={self.fill})'
