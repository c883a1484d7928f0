"""The crop sampler against TensorFlow's ``sample_distorted_bounding_box`` statistics.

``fixtures/dm_preprocessing/crop_stats.npz`` holds empirical CDFs of 20000 TensorFlow draws per
image size (``scripts/make_crop_stats.py``, run once with TensorFlow). The same statistics of
20000 draws here must lie within the two-sample Kolmogorov-Smirnov bound at alpha = 0.001:
``1.95 * sqrt(2 / 20000) = 0.0195``. Sampling the aspect in log space (CDF off by ~0.07 at
aspect 1), dropping the 10 % coverage rule (areas from 8 %), or offsets reaching the last
position would exceed it; the whole-image rate is compared as two binomial counts.
"""
import os
import sys

import numpy as np
import pytest

from timm_nfnet_ext.data.crop import center_crop_window, distorted_crop_window, sample_distorted_crop

HERE = os.path.dirname(__file__)
STATS = np.load(os.path.join(HERE, 'fixtures', 'dm_preprocessing', 'crop_stats.npz'))
sys.path.insert(0, os.path.join(HERE, '..', 'scripts'))
from make_crop_stats import summarize  # noqa: E402  (numpy only; the TF import is lazy)

N = 20000
KS_BOUND = 1.95 * np.sqrt(2 / N)


@pytest.fixture(scope='module')
def draws():
    g = np.random.default_rng(2024)
    return {(int(h), int(w)): np.array([distorted_crop_window(int(h), int(w), g) for _ in range(N)])
            for h, w in STATS['sizes']}


@pytest.mark.parametrize('size', [tuple(int(v) for v in s) for s in STATS['sizes']])
def test_distribution_matches_tensorflow(draws, size):
    h, w = size
    mine = summarize(draws[size], h, w)
    key = f'{h}x{w}/'
    for stat in ('area', 'aspect', 'top', 'left'):
        gap = np.abs(mine[f'{stat}_cdf'] - STATS[key + stat + '_cdf']).max()
        assert gap < KS_BOUND, f'{size} {stat}: CDFs {gap:.4f} apart (bound {KS_BOUND:.4f})'
    # whole-image windows: two binomial counts of N, 5 sd of their difference (+ 3 for zeros)
    a, b = int(mine['n_whole']), int(STATS[key + 'n_whole'])
    assert abs(a - b) <= 5 * np.sqrt(a + b) + 3, (a, b)
    assert int(mine['n_bottom_touch']) == int(STATS[key + 'n_bottom_touch']) == 0


def test_window_rules(draws):
    for (h, w), win in draws.items():
        top, left, ch, cw = win.T
        whole = (ch == h) & (cw == w)
        t, l, ch, cw = top[~whole], left[~whole], ch[~whole], cw[~whole]
        assert (ch * cw >= 0.1 * h * w - 1e-6).all()  # min_object_covered wins over area 0.08
        # the offset never reaches the last position (Uniform(H - h) draws 0 .. H - h - 1)
        assert ((t + ch < h) | (ch == h)).all() and ((l + cw < w) | (cw == w)).all()
        assert (top[whole] == 0).all() and (left[whole] == 0).all()


def test_fallback_is_reference_center_crop():
    # side int(min(H, W) * S / (S + 32)), offsets (H - side + 1) // 2
    assert center_crop_window(375, 500, (224, 224)) == (24, 86, 328, 328)  # int(375 * 224 / 256)
    assert center_crop_window(100, 100, (192, 192)) == (8, 8, 85, 85)  # (100 - 85 + 1) // 2
    assert center_crop_window(12, 9, (192, 192)) == (3, 1, 7, 7)
    g = np.random.default_rng(0)
    # 1x1: every attempt's width or area fails -> the whole image -> the centre crop (side 0)
    assert distorted_crop_window(1, 1, g) == (0, 0, 1, 1)
    got = {sample_distorted_crop(12, 9, g, img_size=(192, 192)) for _ in range(3000)}
    assert (3, 1, 7, 7) in got and all(w != (0, 0, 12, 9) for w in got)
    # aspect range far from the image's: no attempt fits -> whole image
    assert distorted_crop_window(10, 200, g, aspect_ratio_range=(1.0, 1.0), area_range=(0.5, 1.0)) == (0, 0, 10, 200)


def test_seeded():
    a = [sample_distorted_crop(375, 500, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


@pytest.mark.parametrize('args,kwargs,err', [
    ((0, 10), {}, ValueError), ((10, -1), {}, ValueError), ((10.5, 10), {}, ValueError),
    ((10, 10), dict(area_range=(0, 1)), ValueError), ((10, 10), dict(area_range=(0.5, 1.5)), ValueError),
    ((10, 10), dict(aspect_ratio_range=(0, 1)), ValueError), ((10, 10), dict(max_attempts=0), ValueError),
    ((10, 10), dict(min_object_covered=-0.1), ValueError),
])
def test_bad_arguments(args, kwargs, err):
    with pytest.raises(err):
        sample_distorted_crop(*args, np.random.default_rng(0), **kwargs)
    with pytest.raises(TypeError, match='Generator'):
        sample_distorted_crop(10, 10, 0)
