"""The reference training pipeline end to end: composition, determinism with workers, errors."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from timm_nfnet_ext.data import (RandAugment, ReferenceTrainBatch, ReferenceTrainDataset, ReferenceTrainTransform,
                                 create_train_pipeline, decode_image, mix_batch, resize_crop, sample_distorted_crop,
                                 sample_seed)
from timm_nfnet_ext.data import train_transforms as tt
from timm_nfnet_ext.variants import F_VARIANTS

S = 32


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp('train_jpegs')
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (90, 70), (48, 48), (75, 120), (64, 50), (100, 66), (40, 90), (70, 70)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 3 + i * 20, yy * 2 + 40, (xx + yy) * 2], -1) + rng.integers(0, 30, (h, w, 3))
        path = folder / f'img{i}.jpg'
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(str(path))
    return paths


def test_resize_of_a_strided_view_is_the_resize_of_its_copy():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        image = torch.from_numpy(rng.integers(0, 256, (h + 9, w + 7, 3), dtype=np.uint8))
        window = image[3:3 + h, 5:5 + w]  # a strided view, as the transform passes it
        want = resize_crop(window.contiguous(), (S, S + 8), (0, 0, S, S + 8))
        assert torch.equal(resize_crop(window, (S, S + 8), (0, 0, S, S + 8)), want)
        chw = window.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # HWC view of CHW memory
        assert torch.equal(resize_crop(chw, (S, S + 8), (0, 0, S, S + 8)), want)


def test_tap_matrices_are_valid_csr():
    from timm_nfnet_ext.data.resize import _tap_matrix
    for in_size, out_size in ((7, 32), (300, 192), (33, 33), (500, 17)):
        m = _tap_matrix(in_size, out_size, 0, out_size)
        torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape, check_invariants=True)


def test_transform_is_crop_flip_resize(jpegs):
    transform = ReferenceTrainTransform(S)
    data = open(jpegs[3], 'rb').read()
    hwc = decode_image(data)
    for seed in range(6):
        got = transform(jpegs[3], np.random.default_rng(seed))
        assert torch.equal(got, transform(data, np.random.default_rng(seed)))  # path or bytes
        g = np.random.default_rng(seed)
        top, left, h, w = sample_distorted_crop(*hwc.shape[:2], g, img_size=(S, S))
        crop = hwc[top:top + h, left:left + w]
        if g.random() < 0.5:
            crop = crop[:, ::-1]
        want = resize_crop(torch.from_numpy(np.ascontiguousarray(crop)), (S, S), (0, 0, S, S))
        assert got.shape == (3, S, S) and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)


def test_batch_is_mix_clip_randaugment_normalise():
    rng = np.random.default_rng(0)
    samples = [(torch.from_numpy(rng.uniform(-40, 300, (3, S, S)).astype(np.float32)), i % 5, 1000 + i)
               for i in range(8)]
    collate = ReferenceTrainBatch(num_classes=5, magnitude=10)
    images, targets = collate(samples)
    g = np.random.default_rng([1000 + i for i in range(8)])  # the batch seed: all sample seeds
    mixed, want_targets = mix_batch(torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]),
                                    5, g)
    pixels = mixed.clamp(0, 255).to(torch.uint8)
    aug = RandAugment(4, 10)
    mean = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).view(3, 1, 1)
    std = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).view(3, 1, 1)
    want = torch.stack([(aug(p, g).float() - mean) / std for p in pixels])
    assert images.shape == (4, 3, S, S) and targets.shape == (4, 5)
    assert torch.equal(images, want) and torch.equal(targets, want_targets)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_deterministic_across_workers(jpegs):
    transform, collate = create_train_pipeline(img_size=S, magnitude=10, num_classes=8)
    samples = [(p, i) for i, p in enumerate(jpegs)] * 2
    dataset = ReferenceTrainDataset(samples, transform, seed=3)
    runs = [_batches(DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=w, drop_last=True))
            for w in (0, 2)]
    assert len(runs[0]) == 2
    for (x0, y0), (x2, y2) in zip(*runs):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    dataset.set_epoch(1)
    again = _batches(DataLoader(dataset, batch_size=8, collate_fn=collate, drop_last=True))
    assert not torch.equal(again[0][0], runs[0][0][0])
    image, label, seed = dataset[5]
    assert label == 5 and seed == sample_seed(3, 1, 5) and image.shape == (3, S, S)


def test_create_train_pipeline_uses_variant():
    for name, variant in (('nfnet_f0', F_VARIANTS[0]), ('nfnet_f3_plus', F_VARIANTS[3]), (F_VARIANTS[5], F_VARIANTS[5]),
                          (1, F_VARIANTS[1])):
        transform, collate = create_train_pipeline(name)
        assert transform.img_size == (variant.train_size,) * 2
        assert collate.randaugment.magnitude == variant.randaug_magnitude and collate.randaugment.num_layers == 4
        assert collate.num_classes == 1000
    transform, collate = create_train_pipeline('nfnet_f2', img_size=(128, 96), magnitude=7, num_classes=10)
    assert transform.img_size == (128, 96) and collate.randaugment.magnitude == 7 and collate.num_classes == 10
    with pytest.raises(ValueError, match='img_size= and magnitude='):
        create_train_pipeline('resnet50')
    with pytest.raises(ValueError, match='variants are 0..7'):
        create_train_pipeline(8)


def test_transform_without_generator_uses_torch_seed(jpegs):
    transform = ReferenceTrainTransform(S)
    torch.manual_seed(0)
    a = transform(jpegs[0])
    torch.manual_seed(0)
    assert torch.equal(a, transform(jpegs[0]))


def test_bad_input(jpegs):
    transform = ReferenceTrainTransform(S)
    collate = ReferenceTrainBatch(num_classes=4, magnitude=5)
    img = torch.zeros(3, S, S)
    with pytest.raises(ValueError, match='multiple of 4'):
        collate([(img, 0, 1)] * 6)  # 2B = 6: an odd B
    with pytest.raises(TypeError, match='image tensor, label'):
        collate([(np.zeros((3, S, S)), 0)] * 4)
    with pytest.raises(TypeError, match='non-empty list'):
        collate([])
    with pytest.raises(ValueError, match='one size'):
        collate([(img, 0)] * 3 + [(torch.zeros(3, S, S + 1), 0)])
    with pytest.raises(ValueError, match='labels must be in'):
        collate([(img, 7)] * 4)
    with pytest.raises(TypeError, match='Generator'):
        transform(jpegs[0], 123)
    with pytest.raises(TypeError, match='cannot preprocess'):
        transform(3.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match='img_size'):
        ReferenceTrainTransform(0)
    with pytest.raises(TypeError, match='ReferenceTrainTransform'):
        ReferenceTrainDataset([], lambda x: x)
    with pytest.raises(ValueError, match='seed, epoch and index'):
        sample_seed(-1, 0, 0)
    with pytest.raises(ValueError, match='magnitude'):
        ReferenceTrainBatch(magnitude=40)
    with pytest.raises(ValueError, match='num_classes'):
        ReferenceTrainBatch(num_classes=0)


@pytest.mark.parametrize('mode, fallback', [('L', False), ('RGB', True), ('CMYK', False)])
def test_only_three_component_jpegs_fall_back_to_the_centre_crop(tmp_path, mode, fallback):
    """The reference compares the JPEG header's [H, W, components] with the decoded [H, W, 3]:
    grayscale and CMYK files keep the whole image when no crop is found (an 8x200 image: no
    window of 10% of it has an aspect in [3/4, 4/3])."""
    import io
    from PIL import Image
    from timm_nfnet_ext.data import ReferenceTrainTransform, decode_image
    from timm_nfnet_ext.data.crop import center_crop_window
    from timm_nfnet_ext.data.decode import jpeg_components
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, 'JPEG', quality=95)
    data = buf.getvalue()
    assert jpeg_components(data) == {'L': 1, 'RGB': 3, 'CMYK': 4}[mode]
    full = torch.from_numpy(decode_image(data))
    transform = ReferenceTrainTransform(S, flip=False)
    out = transform(data, np.random.default_rng(1))
    top, left, h, w = center_crop_window(8, 200, (S, S)) if fallback else (0, 0, 8, 200)
    want = resize_crop(full[top:top + h, left:left + w].contiguous(), (S, S), (0, 0, S, S))
    assert torch.equal(out, want.contiguous())
    path = tmp_path / 'image.jpg'  # a file read through the training dataset: the same rule
    path.write_bytes(data)
    from timm_nfnet_ext.data import ReferenceTrainDataset
    dataset = ReferenceTrainDataset([(str(path), 0)], transform)
    assert torch.equal(dataset[(0, 1)][0], want.contiguous())
