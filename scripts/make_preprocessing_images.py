#!/usr/bin/env python3
"""Makes the extra test images of ``tests/fixtures/dm_preprocessing/images/`` (run once; the
files are committed, and their goldens come from DeepMind's pipeline in TensorFlow, see
``tests/fixtures/dm_preprocessing/README.md``).

Each image exercises one decoder path of ``tf.image.decode_jpeg`` that the eval transform must
reproduce: chroma subsampling, CMYK / YCCK with and without an Adobe marker, grayscale
progressive, tiny and extreme aspect ratios, a JPEG with a recoverable corruption, and the
non-JPEG formats the reference's decoder also reads (PNG of every colour type, GIF).
"""
import io
import pathlib
import sys

import numpy as np
from PIL import Image

OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else 'tests/fixtures/dm_preprocessing/images')


def photo_crop() -> Image.Image:
    """A 300x200 crop of scikit-learn's china.jpg (CC BY 2.0, danielbuechele on Flickr)."""
    import sklearn.datasets
    path = pathlib.Path(sklearn.datasets.__file__).parent / 'images' / 'china.jpg'
    return Image.open(path).convert('RGB').crop((150, 100, 450, 300))


def synthetic(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, hard-edged discs and noise: every frequency a resize kernel can see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(w - 1, 1) * 255, yy / max(h - 1, 1) * 255,
                    127.5 + 127.5 * np.sin(xx / 3.0 + yy / 5.0)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 3 + 1)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def strip_app14(data: bytes) -> bytes:
    """Removes the Adobe APP14 segment (libjpeg then reads 4 components as plain CMYK)."""
    i = data.index(b'\xff\xee')
    return data[:i] + data[i + 2 + int.from_bytes(data[i + 2:i + 4], 'big'):]


def with_adobe_transform(data: bytes, transform: int) -> bytes:
    """Sets the Adobe marker's colour transform byte (2 = YCCK)."""
    i = data.index(b'\xff\xee')
    assert data[i + 4:i + 9] == b'Adobe'
    out = bytearray(data)
    out[i + 4 + 11] = transform  # 'Adobe', version (2), flags0 (2), flags1 (2), transform
    return bytes(out)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)

    def save(name: str, img: Image.Image, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, **kw)
        (OUT / name).write_bytes(buf.getvalue())
        return buf.getvalue()

    photo = photo_crop()
    good = save('photo_300x200_422.jpg', photo, format='JPEG', quality=85, subsampling=1)
    # 100 zeroed bytes inside the entropy-coded data: libjpeg warns and recovers, as TF does.
    (OUT / 'corrupt_scan_300x200.jpg').write_bytes(good[:5000] + bytes(100) + good[5100:])
    save('photo_300x200_420_q60.jpg', photo, format='JPEG', quality=60, subsampling=2)
    cmyk = save('cmyk_adobe_150x120.jpg', Image.fromarray(synthetic(120, 150, 1)).convert('CMYK'),
                format='JPEG', quality=90)
    (OUT / 'cmyk_plain_150x120.jpg').write_bytes(strip_app14(cmyk))
    (OUT / 'ycck_adobe_150x120.jpg').write_bytes(with_adobe_transform(cmyk, 2))
    save('gray_progressive_90x130.jpg', Image.fromarray(synthetic(90, 130, 2)).convert('L'),
         format='JPEG', quality=80, progressive=True)
    save('tiny_5x7.jpg', Image.fromarray(synthetic(5, 7, 3)), format='JPEG', quality=95)
    save('wide_40x600.jpg', Image.fromarray(synthetic(40, 600, 4)), format='JPEG', quality=90)
    # 'Corrupt JPEG data: extraneous bytes before marker': a warning TensorFlow decodes through.
    good = (OUT / 'tiny_5x7.jpg').read_bytes()
    sos = good.index(b'\xff\xda')
    (OUT / 'extraneous_bytes_5x7.jpg').write_bytes(good[:sos] + b'\x00\x01\x02' + good[sos:])
    base = synthetic(70, 90, 5)
    save('rgb_70x90.png', Image.fromarray(base), format='PNG')
    rgba = np.concatenate([base, synthetic(70, 90, 6)[..., :1]], -1)
    save('rgba_70x90.png', Image.fromarray(rgba, 'RGBA'), format='PNG')
    save('palette_70x90.png', Image.fromarray(base).quantize(50), format='PNG')
    save('gray_alpha_70x90.png', Image.fromarray(rgba).convert('LA'), format='PNG')
    save('gray1bit_70x90.png', Image.fromarray(base).convert('1'), format='PNG')
    g16 = (base[..., 0].astype(np.uint16) * 257 + np.arange(90, dtype=np.uint16) * 3)
    save('gray16_70x90.png', Image.fromarray(g16), format='PNG')
    save('still_70x90.gif', Image.fromarray(base).quantize(64), format='GIF')
    # a GIF whose transparent index TF decodes as black (PIL would give the palette colour)
    index = np.zeros((20, 30), np.uint8)
    index[5:10, 5:20], index[12:] = 1, 2
    gif = Image.fromarray(index, 'P')
    gif.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    save('transparent_30x20.gif', gif, format='GIF', transparency=0)
    print('\n'.join(sorted(p.name for p in OUT.iterdir())))


if __name__ == '__main__':
    main()
