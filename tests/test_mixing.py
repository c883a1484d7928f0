"""The reference's 2B -> B MixUp + CutMix against its formula."""
import numpy as np
import pytest
import torch

from timm_nfnet_ext.data.mixing import MixParams, apply_mix, cutmix_box, mix_batch, sample_mix_params

K = 10


def _batch(total=16, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(total, 3, h, w, generator=g) * 320 - 40  # unclipped, as after the resize
    labels = torch.randint(0, K, (total,), generator=g)
    return images, labels


def _onehot(label):
    v = np.zeros(K, np.float32)
    v[label] = 1
    return v


def test_pairs_ratios_and_targets():
    images, labels = _batch()
    params = sample_mix_params(8, 12, 10, np.random.default_rng(1))
    out, targets = apply_mix(images, labels, params, K, label_smoothing=0.1)
    assert out.shape == (8, 3, 12, 10) and targets.shape == (8, K)
    x, n = images.numpy(), 4
    for i in range(n):  # MixUp: example i with n + i
        r = np.float32(params.mixup_ratio[i])
        np.testing.assert_array_equal(out[i].numpy(), r * x[i] + (np.float32(1) - r) * x[n + i])
        t = r * _onehot(labels[i]) + (1 - r) * _onehot(labels[n + i])
        np.testing.assert_allclose(targets[i].numpy(), t * 0.9 + 0.1 / K, rtol=0, atol=1e-6)
    for i in range(n):  # CutMix: example 2n + i inside the box, 3n + i outside
        top, left, bottom, right = params.boxes[i].tolist()
        mask = np.zeros((12, 10), bool)
        mask[top:bottom, left:right] = True
        want = np.where(mask, x[2 * n + i], x[3 * n + i])
        np.testing.assert_array_equal(out[n + i].numpy(), want)
        share = mask.mean()
        assert params.cutmix_ratio[i].item() == pytest.approx(share, abs=1e-7)
        t = share * _onehot(labels[2 * n + i]) + (1 - share) * _onehot(labels[3 * n + i])
        np.testing.assert_allclose(targets[n + i].numpy(), t * 0.9 + 0.1 / K, rtol=0, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, atol=1e-6)
    assert (targets >= 0.1 / K - 1e-7).all()


def test_no_smoothing_and_same_label():
    images, _ = _batch(8)
    labels = torch.full((8,), 3)
    _, targets = mix_batch(images, labels, K, np.random.default_rng(0), label_smoothing=0.0)
    np.testing.assert_allclose(targets.numpy(), np.tile(_onehot(3), (4, 1)), atol=1e-6)


def test_seeded_draws_reproduce():
    images, labels = _batch()
    a = mix_batch(images, labels, K, np.random.default_rng(5))
    b = mix_batch(list(images), labels, K, np.random.default_rng(5))  # list input: same result
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mixup_ratio_is_beta_02():
    params = sample_mix_params(20000, 8, 8, np.random.default_rng(0))
    r = params.mixup_ratio.numpy().astype(np.float64)
    # Beta(0.2, 0.2): mean 1/2, variance ab / ((a+b)^2 (a+b+1)) = 0.04 / (0.16 * 1.4) = 0.1786;
    # U-shaped: P(r < 0.1) = 0.3526 (numerically). 10000 draws: sd of the mean 0.0042
    assert abs(r.mean() - 0.5) < 0.02 and abs(r.var() - 0.1786) < 0.01
    assert abs((r < 0.1).mean() - 0.3526) < 0.02


def test_cutmix_box_distribution():
    h, w, n = 40, 60, 20000
    g = np.random.default_rng(0)
    boxes = np.array([cutmix_box(h, w, g) for _ in range(n)])
    top, left, bottom, right = boxes.T
    assert (top >= 0).all() and (bottom <= h).all() and (left >= 0).all() and (right <= w).all()
    inner = (top > 0) & (bottom < h) & (left > 0) & (right < w)
    assert ((right - left)[inner] % 2 == 0).all() and ((bottom - top)[inner] % 2 == 0).all()
    # the description, drawn independently: centre uniform, side sqrt(1 - U) of the image's,
    # half-sides int(side * size) // 2 either way, clipped
    r = np.random.default_rng(1)
    cx, cy = r.integers(0, w, n), r.integers(0, h, n)
    side = np.sqrt(1 - r.random(n))
    hw, hh = (side * w).astype(int) // 2, (side * h).astype(int) // 2
    want = (np.clip(cy + hh, 0, h) - np.clip(cy - hh, 0, h)) * (np.clip(cx + hw, 0, w) - np.clip(cx - hw, 0, w))
    got = (bottom - top) * (right - left)
    grid = np.linspace(0, h * w, 41)
    ks = max(abs((got <= v).mean() - (want <= v).mean()) for v in grid)
    assert ks < 1.95 * np.sqrt(2 / n), ks  # two-sample KS bound, alpha = 0.001
    # a box of sqrt(U) (not sqrt(1 - U)) of the side would be the same law; a box of U would not
    assert abs(got.mean() / (h * w) - want.mean() / (h * w)) < 0.01


def test_bad_input():
    images, labels = _batch(16)
    g = np.random.default_rng(0)
    with pytest.raises(ValueError, match='multiple of 4'):
        mix_batch(images[:6], labels[:6], K, g)  # 2B = 6: B odd
    with pytest.raises(ValueError, match='multiple of 4'):
        mix_batch(images[:0], labels[:0], K, g)
    with pytest.raises(ValueError, match='labels must be in'):
        mix_batch(images, labels + K, K, g)
    with pytest.raises(ValueError, match='labels must be an int tensor'):
        mix_batch(images, labels[:8], K, g)
    with pytest.raises(ValueError, match='float'):
        mix_batch(images.to(torch.uint8), labels, K, g)
    with pytest.raises(ValueError, match='label_smoothing'):
        mix_batch(images, labels, K, g, label_smoothing=1.0)
    with pytest.raises(ValueError, match='mixup_alpha'):
        mix_batch(images, labels, K, g, mixup_alpha=0)
    with pytest.raises(TypeError, match='Generator'):
        mix_batch(images, labels, K, 0)
    with pytest.raises(ValueError, match='even'):
        sample_mix_params(3, 8, 8, g)
    with pytest.raises(ValueError, match='outputs'):
        apply_mix(images, labels, sample_mix_params(4, 12, 10, g), K)
    assert isinstance(sample_mix_params(2, 4, 4, g), MixParams)
