"""The reference's RandAugment ops against independent numpy versions of their description.

Each op is rewritten here from the description in NFNETS.md / the module docstring (plain
per-pixel formulas and loops on an HWC array), not from the implementation, and compared
exactly on uint8.
"""
import math

import numpy as np
import pytest
import torch

from timm_nfnet_ext.data import randaugment as ra
from timm_nfnet_ext.data.randaugment import OPS, RandAugment, apply_op

F = np.float32


def _image(h=23, w=31, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 7 % 256, (yy * 11 + xx) % 256, (90 + 60 * np.sin(xx / 3.0)).astype(int)], -1)
    return np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _run(op, hwc, magnitude, sign=None, seed=0):
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    out = apply_op(chw, op, magnitude, np.random.default_rng(seed), sign=sign)
    assert out.dtype == torch.uint8 and out.shape == chw.shape
    return out.permute(1, 2, 0).numpy()


def _trunc_clip(v):
    return int(min(max(float(v), 0.0), 255.0))


def _blend(a, b, factor):
    """uint8 HWC blend, per pixel, in float32: a + f * (b - a), clipped, truncated."""
    if factor == 0.0:
        return a.copy()
    if factor == 1.0:
        return b.copy()
    out = np.empty_like(a)
    f = F(factor)
    for idx in np.ndindex(a.shape):
        out[idx] = _trunc_clip(F(a[idx]) + f * (F(b[idx]) - F(a[idx])))
    return out


def _gray(hwc):
    """TF rgb_to_grayscale: [0, 1] floats, weights 0.2989 / 0.587 / 0.114, back by * 255.5."""
    x = hwc.astype(F) * F(1 / 255)
    g = (x[..., 0] * F(0.2989) + x[..., 1] * F(0.5870)) + x[..., 2] * F(0.1140)
    return (g * F(255.5)).astype(np.uint8)


def _warp(hwc, fn):
    """Nearest sampling: output (x, y) reads fn(x, y) rounded half away from zero, else 128."""
    h, w, _ = hwc.shape
    out = np.full_like(hwc, 128)
    for y in range(h):
        for x in range(w):
            sx, sy = fn(F(x), F(y))
            rx = int(math.copysign(math.floor(abs(float(sx)) + 0.5), float(sx)))
            ry = int(math.copysign(math.floor(abs(float(sy)) + 0.5), float(sy)))
            if 0 <= rx < w and 0 <= ry < h:
                out[y, x] = hwc[ry, rx]
    return out


def expected(op, hwc, m, sign):
    """The op at magnitude m from its description (level = m / 10)."""
    level = m / 10.0
    h, w, _ = hwc.shape
    if op == 'AutoContrast':
        out = hwc.copy()
        for c in range(3):
            lo, hi = F(hwc[..., c].min()), F(hwc[..., c].max())
            if hi > lo:
                s = F(255.0) / (hi - lo)
                out[..., c] = [[_trunc_clip(F(v) * s + (-lo) * s) for v in row] for row in hwc[..., c]]
        return out
    if op == 'Equalize':
        out = hwc.copy()
        for c in range(3):
            hist = [0] * 256
            for v in hwc[..., c].ravel():
                hist[v] += 1
            used = [n for n in hist if n]
            step = (sum(used) - used[-1]) // 255
            if step:
                lut, total = [], 0
                for n in hist:
                    lut.append(min(255, (total + step // 2) // step))
                    total += n
                out[..., c] = np.array(lut)[hwc[..., c]]
        return out
    if op == 'Invert':
        return 255 - hwc
    if op == 'Posterize':
        shift = min((8 - int(level * 4)) % 256, 7)  # TF clamps the uint8 shift to 0..7
        return ((hwc >> shift) << shift).astype(np.uint8)
    if op == 'Solarize':
        t = int(level * 256) % 256  # a uint8 threshold in TF
        return np.where(hwc < t, hwc, 255 - hwc).astype(np.uint8)
    if op == 'SolarizeAdd':
        add = int(level * 110)
        return np.where(hwc < 128, np.minimum(hwc.astype(int) + add, 255), hwc).astype(np.uint8)
    factor = level * 1.8 + 0.1
    if op == 'Color':
        return _blend(np.repeat(_gray(hwc)[..., None], 3, -1), hwc, factor)
    if op == 'Contrast':
        return _blend(np.full_like(hwc, min(int(h * w / 256), 255)), hwc, factor)
    if op == 'Brightness':
        return _blend(np.zeros_like(hwc), hwc, factor)
    if op == 'Sharpness':
        kernel = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
        smooth = hwc.copy()
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                for c in range(3):
                    acc = F(0)
                    for dy in range(3):
                        for dx in range(3):
                            acc = acc + F(hwc[y + dy - 1, x + dx - 1, c]) * F(kernel[dy][dx] / 13)
                    smooth[y, x, c] = _trunc_clip(acc)
        return _blend(smooth, hwc, factor)
    if op == 'Rotate':
        rad = F(sign * level * 30.0) * F(math.pi / 180)
        cos, sin = np.cos(rad, dtype=F), np.sin(rad, dtype=F)
        xo = (F(w - 1) - (cos * F(w - 1) - sin * F(h - 1))) / F(2)
        yo = (F(h - 1) - (sin * F(w - 1) + cos * F(h - 1))) / F(2)
        return _warp(hwc, lambda x, y: ((cos * x + -sin * y) + xo, (sin * x + cos * y) + yo))
    if op in ('ShearX', 'ShearY'):
        k = F(sign * level * 0.3)
        return _warp(hwc, (lambda x, y: (x + k * y, y)) if op == 'ShearX' else (lambda x, y: (x, k * x + y)))
    if op in ('TranslateX', 'TranslateY'):
        p = F(sign * level * 100.0)
        return _warp(hwc, (lambda x, y: (x + p, y)) if op == 'TranslateX' else (lambda x, y: (x, y + p)))
    raise AssertionError(op)


DETERMINISTIC = [op for op in OPS if op != 'Cutout']
SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


@pytest.mark.parametrize('op', DETERMINISTIC)
@pytest.mark.parametrize('magnitude', [1, 5, 10, 15])
def test_op_matches_description(op, magnitude):
    size = (23, 31)
    if op in ('TranslateX', 'TranslateY'):
        size = (60, 150)  # a 50-150 px shift must keep part of the image
    hwc = _image(*size, seed=magnitude)
    for sign in ((1, -1) if op in SIGNED else (None,)):
        want = expected(op, hwc, magnitude, sign or 1)
        got = _run(op, hwc, magnitude, sign)
        np.testing.assert_array_equal(got, want, err_msg=f'{op} M={magnitude} sign={sign}')


def test_cutout_square_and_fill():
    hwc = _image(40, 50)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    for center, pad in (((10, 12), 6), ((0, 49), 20), ((39, 0), 60), ((20, 25), 0)):
        got = ra.cutout(chw, pad, np.random.default_rng(0), center=center).permute(1, 2, 0).numpy()
        want = hwc.copy()
        cy, cx = center
        for y in range(40):
            for x in range(50):
                if cy - pad <= y < cy + pad and cx - pad <= x < cx + pad:
                    want[y, x] = 128
        np.testing.assert_array_equal(got, want)
    # via apply_op: half-size int(M / 10 * 40) around a uniform centre, 128 in every channel
    got = _run('Cutout', np.zeros((100, 100, 3), np.uint8), 5)
    filled = np.argwhere(got[..., 0] == 128)
    assert (got[..., 0] == 128).sum() == (got == 128).all(-1).sum()
    assert np.ptp(filled[:, 0]) + 1 <= 40 and np.ptp(filled[:, 1]) + 1 <= 40
    centres = [tuple(np.argwhere(_run('Cutout', np.zeros((9, 7, 3), np.uint8), 0.5, seed=s)[..., 0] == 128)[0])
               for s in range(400)]  # pad 2: the centre is the square's first pixel + 2 (clipped)
    assert len(set(centres)) == 7 * 5  # every clipped first corner (cy - 2, cx - 2) occurs


def test_identity_factor_and_quirks():
    hwc = _image()
    for op in ('Color', 'Contrast', 'Brightness', 'Sharpness'):  # factor 0.5 * 1.8 + 0.1 == 1.0
        np.testing.assert_array_equal(_run(op, hwc, 5), hwc)
    np.testing.assert_array_equal(_run('Solarize', hwc, 10), 255 - hwc)  # threshold 256 -> 0
    assert (_run('Posterize', hwc, 0) == (hwc & 0x80)).all()  # shift 8 clamped to 7


def test_randaugment_layers_always_apply_and_pick_uniformly(monkeypatch):
    calls = []

    def record(image, name, magnitude, generator, sign=None, fill=128):
        calls.append((name, magnitude, fill))
        return image

    monkeypatch.setattr(ra, 'apply_op', record)
    aug = RandAugment(num_layers=4, magnitude=15)
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    g = np.random.default_rng(0)
    for _ in range(800):
        aug(img, g)
    assert len(calls) == 3200 and {c[1:] for c in calls} == {(15.0, 128)}
    counts = np.array([sum(c[0] == op for c in calls) for op in OPS])
    # 3200 draws over 16 ops: 200 each, sd ~13.7; 6 sd either side
    assert counts.min() > 118 and counts.max() < 282, counts


def test_random_sign_is_fair():
    hwc = _image(20, 20)
    outs = [_run('TranslateX', hwc, 0.5, seed=s) for s in range(200)]
    right = sum(np.array_equal(o, expected('TranslateX', hwc, 0.5, 1)) for o in outs)
    left = sum(np.array_equal(o, expected('TranslateX', hwc, 0.5, -1)) for o in outs)
    assert right + left == 200 and 60 < right < 140


def test_randaugment_seeded_and_pickles():
    import pickle  # the DataLoader's own transport; checks the object travels to workers
    aug = pickle.loads(pickle.dumps(RandAugment(4, 10)))
    img = torch.from_numpy(_image(32, 32)).permute(2, 0, 1).contiguous()
    a = aug(img, np.random.default_rng(3))
    b = aug(img, np.random.default_rng(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8


@pytest.mark.parametrize('kwargs', [dict(magnitude=-1), dict(magnitude=31), dict(magnitude=415),
                                    dict(num_layers=-1), dict(num_layers=2.5), dict(magnitude='10'),
                                    dict(fill=300)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match='num_layers|magnitude|fill'):
        RandAugment(**kwargs)


def test_bad_images():
    aug = RandAugment(2, 10)
    g = np.random.default_rng(0)
    for bad in (torch.zeros(3, 8, 8), torch.zeros(8, 8, 3, dtype=torch.uint8), np.zeros((3, 8, 8), np.uint8)):
        with pytest.raises(TypeError, match='uint8 \\(3, H, W\\)'):
            aug(bad, g)
    with pytest.raises(TypeError, match='Generator'):
        aug(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(KeyError, match='unknown RandAugment op'):
        apply_op(torch.zeros(3, 8, 8, dtype=torch.uint8), 'Blur', 5, g)
