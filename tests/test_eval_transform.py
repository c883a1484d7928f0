"""The reference's eval preprocessing against DeepMind's own pipeline run in TensorFlow.

Goldens (tests/fixtures/dm_preprocessing/README.md): ``golden_shared.npz`` is the project's
shared fixture (DeepMind's ``dataset.py`` on five synthetic JPEGs at 97/192/256 px);
``golden_extra.npz`` the same function on the images ``scripts/make_preprocessing_images.py``
made (CMYK, YCCK, subsampling, PNG / GIF colour types, corrupt and tiny files) and on
scikit-learn's two sample photos; ``resize_grid.npz`` is ``tf.image.resize(BICUBIC)`` alone on
random images over a grid of sizes.
"""
import hashlib
import io
import math
import pathlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from timm_nfnet_ext.data import (ImageDecodeError, ReferenceEvalTransform, bicubic_taps,
                                 create_eval_transform, decode_image, resize_crop)

HERE = pathlib.Path(__file__).parent / 'fixtures' / 'dm_preprocessing'
IMAGES = HERE / 'images'
TOL = 1e-5  # normalised units; the port lands at 0 on this machine
# scikit-learn's sample photos (CC BY 2.0, see the fixture README), checked by hash so that a
# changed file fails loudly instead of comparing against a golden of other bytes.
PHOTO_SHA256 = {
    'china': '8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29',
    'flower': 'a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638',
}


def _sklearn_photo(stem):
    import sklearn.datasets
    path = pathlib.Path(sklearn.datasets.__file__).parent / 'images' / f'{stem}.jpg'
    return path


def _golden_cases(name):
    golden = np.load(HERE / name)
    cases = []
    for key in sorted(golden.files):
        stem, size = key.split('@')
        found = sorted(IMAGES.glob(stem + '.*'))
        path = found[0] if found else _sklearn_photo(stem)
        cases.append(pytest.param(path, int(size), golden[key], id=key))
    return cases


ALL_GOLDENS = _golden_cases('golden_shared.npz') + _golden_cases('golden_extra.npz')


def test_sample_photos_are_the_ones_the_goldens_were_made_from():
    for stem, digest in PHOTO_SHA256.items():
        assert hashlib.sha256(_sklearn_photo(stem).read_bytes()).hexdigest() == digest, stem


@pytest.mark.parametrize('path,size,golden', ALL_GOLDENS)
def test_matches_deepmind_pipeline_from_path_and_bytes(path, size, golden):
    transform = create_eval_transform(img_size=size)
    from_path = transform(path)
    from_bytes = transform(path.read_bytes())
    assert from_path.shape == (3, size, size) and from_path.dtype == torch.float32
    assert from_path.is_contiguous()
    assert np.abs(from_path.numpy() - golden).max() < TOL
    assert torch.equal(from_path, from_bytes)
    with open(path, 'rb') as f:  # a binary file object, as timm's folder reader hands out
        assert torch.equal(transform(f), from_path)


def test_resize_matches_tensorflow_bicubic_over_a_grid_of_sizes():
    grid = np.load(HERE / 'resize_grid.npz')
    cases = len(grid.files) // 2
    assert cases >= 15
    for i in range(cases):
        src, ref = grid[f'in_{i}'], grid[f'out_{i}']
        h, w = ref.shape[:2]
        full = resize_crop(torch.from_numpy(src), (h, w), (0, 0, h, w)).permute(1, 2, 0).numpy()
        assert np.abs(full - ref).max() < 1e-3, (src.shape, ref.shape)  # pixel units
        # a window equals the same window of the full resize
        top, left = h // 3, w // 4
        win = resize_crop(torch.from_numpy(src), (h, w), (top, left, h - top, w - left))
        assert np.abs(win.permute(1, 2, 0).numpy() - full[top:, left:]).max() < 1e-4


def _keys(d):
    """Keys' cubic convolution kernel, a = -0.5, in float64 (written from the paper)."""
    d = abs(d)
    if d <= 1:
        return 1.5 * d ** 3 - 2.5 * d ** 2 + 1
    if d < 2:
        return -0.5 * d ** 3 + 2.5 * d ** 2 - 4 * d + 2
    return 0.0


@pytest.mark.parametrize('n_in,n_out', [(375, 288), (80, 129), (5, 33), (640, 224)])
def test_taps_are_keys_cubic_at_half_pixel_centres(n_in, n_out):
    """Independent of TF's table: each weight is Keys' kernel at the tap's distance (to the
    table's 1/1024 quantisation), border taps dropped and the rest renormalised."""
    index, weight = bicubic_taps(n_in, n_out)
    for o in range(0, n_out, 7):
        x = (o + 0.5) * n_in / n_out - 0.5
        taps = [math.floor(x) - 1 + k for k in range(4)]
        raw = [_keys(x - t) if 0 <= t < n_in else 0.0 for t in taps]
        expect = [r / sum(raw) for r in raw]
        for k in range(4):
            assert index[k, o] == min(max(taps[k], 0), n_in - 1)
            assert abs(weight[k, o].item() - expect[k]) < 2e-3
        assert abs(weight[:, o].sum().item() - 1) < 1e-6


def test_overshoots_are_kept_not_clamped():
    """A sharp edge rings below 0 and above 255 in the reference; it must not be clamped."""
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    out = resize_crop(torch.from_numpy(img), (72, 72), (0, 0, 72, 72))
    assert out.min() < -1 and out.max() > 256


def test_decoded_inputs_give_the_same_tensor_as_the_file():
    """PNG decoding is lossless, so a PIL image, arrays and tensors of it equal the file path."""
    path = IMAGES / 'rgb_70x90.png'
    t = create_eval_transform(img_size=64)
    ref = t(path)
    pil = Image.open(path)
    hwc = np.asarray(pil.convert('RGB'))
    assert torch.equal(t(pil), ref)
    assert torch.equal(t(hwc), ref)
    assert torch.equal(t(torch.from_numpy(hwc.copy()).permute(2, 0, 1)), ref)  # a CHW view of HWC memory
    assert torch.equal(t(torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous()), ref)  # torchvision's CHW
    assert torch.equal(t(np.ascontiguousarray(hwc.transpose(2, 0, 1)).transpose(1, 2, 0)), ref)  # strided numpy
    grey = np.asarray(pil.convert('L'))
    assert torch.equal(t(grey), t(np.repeat(grey[..., None], 3, -1)))


def test_jpeg_decoding_is_libjpeg_fast_dct_not_pil():
    """What makes the file path exact: PIL's accurate DCT differs, our decode does not."""
    path = IMAGES / 'photo_300x200_422.jpg'
    ours = decode_image(path.read_bytes())
    pil = np.asarray(Image.open(path).convert('RGB'))
    assert ours.shape == pil.shape == (200, 300, 3)
    assert np.abs(ours.astype(int) - pil).max() > 0  # different DCTs do differ
    t = create_eval_transform(img_size=97)
    golden = np.load(HERE / 'golden_extra.npz')['photo_300x200_422@97']
    assert np.abs(t(path).numpy() - golden).max() < TOL
    assert np.abs(t(Image.open(path)).numpy() - golden).max() > TOL


def test_size_mean_and_std_from_the_model():
    import timm
    import timm_nfnet_ext
    assert timm_nfnet_ext.create_eval_transform is create_eval_transform  # the package's top-level name
    t = create_eval_transform('nfnet_f0')
    assert t.img_size == (256, 256)  # the test size, not the 192 px train size
    assert create_eval_transform('nfnet_f1').img_size == (320, 320)
    model = timm.create_model('nfnet_f0', pretrained_cfg_overlay=dict(
        test_input_size=(3, 97, 97), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    t = create_eval_transform(model)
    assert t.img_size == (97, 97) and t.mean == (0.5, 0.5, 0.5) and t.std == (0.25, 0.25, 0.25)
    out = t(np.full((50, 50, 3), 255, np.uint8))
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (255 - 127.5) / 63.75
    assert create_eval_transform('nfnet_f0', img_size=128).img_size == (128, 128)
    rect = create_eval_transform(img_size=(64, 96))(IMAGES / 'rgb_70x90.png')
    assert rect.shape == (3, 64, 96)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(RuntimeError, match='unknown model'):
        create_eval_transform('no_such_model')
    with pytest.raises(ValueError, match='img_size'):
        create_eval_transform()
    with pytest.raises(ValueError, match='img_size'):
        ReferenceEvalTransform(0)
    with pytest.raises(ValueError, match='mean and std'):
        ReferenceEvalTransform(64, mean=(0.5, 0.5))
    t = ReferenceEvalTransform(32)
    with pytest.raises(TypeError, match='uint8'):
        t(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(TypeError, match=r'\(H, W, 3\)'):
        t(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(TypeError, match='cannot preprocess'):
        t(12)


@pytest.mark.parametrize('make,reason', [
    (lambda jpg, png: b'', 'empty file'),
    (lambda jpg, png: jpg[:len(jpg) // 2], 'truncated JPEG'),
    (lambda jpg, png: jpg[:-2], 'truncated JPEG'),  # no end-of-image marker: TF fails too
    (lambda jpg, png: jpg[:200], 'truncated'),
    (lambda jpg, png: png[:len(png) // 2], 'truncated PNG'),
    (lambda jpg, png: b'hello world, not an image', 'not a JPEG, PNG or GIF'),
    (lambda jpg, png: _encode('BMP'), 'BMP'),
    (lambda jpg, png: _encode('WEBP'), 'WebP'),
])
def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, make, reason):
    jpg = (IMAGES / 'photo_300x200_422.jpg').read_bytes()
    png = (IMAGES / 'rgb_70x90.png').read_bytes()
    path = tmp_path / 'broken.jpg'
    path.write_bytes(make(jpg, png))
    t = ReferenceEvalTransform(64)
    with pytest.raises(ImageDecodeError, match=reason) as err:
        t(path)
    assert str(path) in str(err.value)
    with pytest.raises(ImageDecodeError, match='in-memory image'):
        t(path.read_bytes())


def _encode(fmt):
    buf = io.BytesIO()
    Image.new('RGB', (8, 8), (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


def test_recoverable_corruption_decodes_as_tensorflow_does():
    """A damaged scan and stray header bytes: libjpeg warns, TF decodes; so does the port."""
    golden = np.load(HERE / 'golden_extra.npz')
    t = ReferenceEvalTransform(64)
    for stem in ('corrupt_scan_300x200', 'extraneous_bytes_5x7'):
        path = next(IMAGES.glob(stem + '.jpg'))
        assert np.abs(t(path).numpy() - golden[f'{stem}@64']).max() < TOL


def test_missing_path_and_folder_are_clear_errors(tmp_path):
    t = ReferenceEvalTransform(64)
    with pytest.raises(ImageDecodeError, match='cannot read') as err:
        t(tmp_path / 'missing.jpg')
    assert 'missing.jpg' in str(err.value)
    with pytest.raises(ImageDecodeError, match='cannot read'):
        t(tmp_path)


def test_pickles_and_runs_in_dataloader_workers_with_timm_dataset(tmp_path):
    """Plugs into timm's ImageDataset(load_bytes=True) and a DataLoader with workers."""
    from timm.data import ImageDataset
    for i, stem in enumerate(['photo_300x200_422.jpg', 'gray_257x191.jpg', 'cmyk_adobe_150x120.jpg']):
        cls = tmp_path / f'class{i % 2}'
        cls.mkdir(exist_ok=True)
        (cls / stem).write_bytes((IMAGES / stem).read_bytes())
    t = create_eval_transform(img_size=64)
    assert pickle.loads(pickle.dumps(t)).img_size == (64, 64)
    ds = ImageDataset(str(tmp_path), load_bytes=True, transform=t)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (3, 3, 64, 64)
    for i in range(len(ds)):
        path = pathlib.Path(ds.filename(i, absolute=True))
        assert torch.equal(x[i], t(path))
    assert repr(t).startswith('ReferenceEvalTransform(') and '96x96' in repr(t)


def test_jpeg_bytes_to_logits_match_deepmind_end_to_end():
    """JPEG bytes -> this transform -> this model equals JPEG bytes -> DeepMind's dataset.py (TF)
    -> DeepMind's NFNet (JAX/Haiku), on the tiny fixture's weights
    (``scripts/make_end_to_end_golden.py``): four files, CMYK and progressive included."""
    import timm
    from conftest import FIXTURES, fixture_model_kwargs
    from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn, read_deepmind_pickle
    model = timm.create_model('nfnet_f0', **fixture_model_kwargs('tiny_nfnet')).eval()
    model.load_state_dict(checkpoint_filter_fn(read_deepmind_pickle(FIXTURES / 'tiny_nfnet' / 'params.pkl'), model))
    golden = np.load(FIXTURES / 'tiny_nfnet' / 'end_to_end.npz')
    stems = sorted(k.split('@')[1] for k in golden.files if k.startswith('logits@'))
    assert stems == ['china', 'cmyk_adobe_150x120', 'photo_300x200_420_q60', 'progressive_480x640']
    transform = create_eval_transform(img_size=64)  # the fixture's test size
    for stem in stems:
        found = sorted(IMAGES.glob(stem + '.jpg'))
        data = (found[0] if found else _sklearn_photo(stem)).read_bytes()
        x = transform(data)
        assert np.abs(x.numpy() - golden[f'input@{stem}']).max() < TOL
        with torch.no_grad():
            logits = model(x[None])[0].numpy()
        assert np.abs(logits - golden[f'logits@{stem}']).max() < 1e-5, stem


def test_awkward_inputs_from_a_review():
    """Flipped views (cv2's BGR->RGB idiom), 16-bit PIL images, numpy sizes and means, an
    ambiguous tensor layout, a text-mode file and the taps' cache."""
    t = create_eval_transform(img_size=64)
    rgb = np.asarray(Image.open(IMAGES / 'rgb_70x90.png').convert('RGB'))
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert torch.equal(t(bgr[..., ::-1]), t(rgb)) and torch.equal(t(rgb[:, ::-1]), t(np.fliplr(rgb).copy()))
    g16 = IMAGES / 'gray16_70x90.png'
    assert torch.equal(t(Image.open(g16)), t(g16))  # the high byte, as libpng strips 16-bit samples
    assert create_eval_transform(img_size=np.int64(64), mean=np.array([0.5, 0.5, 0.5])).img_size == (64, 64)
    with pytest.raises(ValueError, match='img_size'):
        create_eval_transform(img_size=True)
    with pytest.raises(TypeError, match='ambiguous'):
        t(torch.zeros(3, 40, 3, dtype=torch.uint8))
    with open(IMAGES / 'rgb_70x90.png', encoding='latin-1') as f, \
            pytest.raises(ImageDecodeError, match='binary mode'):
        t(f)
    index, weight = bicubic_taps(50, 96, 16, 80)
    weight.mul_(0)  # a caller's edit must not reach the transform's cached taps
    before = create_eval_transform(img_size=64)(np.full((50, 50, 3), 200, np.uint8))
    assert torch.allclose(before, (200 - 255 * torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                          / (255 * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)), atol=1e-5)


def test_torchvision_image_folder_files_go_through_the_reference_decoder(tmp_path):
    from torchvision.datasets import ImageFolder
    from timm_nfnet_ext.data import FileImageDataset
    (tmp_path / 'a').mkdir()
    for name in ('photo_300x200_422.jpg', 'cmyk_adobe_150x120.jpg'):
        (tmp_path / 'a' / name).write_bytes((IMAGES / name).read_bytes())
    (tmp_path / 'a' / 'zz_broken.jpg').symlink_to(tmp_path / 'nowhere.jpg')
    t = create_eval_transform(img_size=64)
    ds = FileImageDataset(ImageFolder(str(tmp_path), allow_empty=True, is_valid_file=lambda p: True), t)
    for i in range(2):
        x, label = ds[i]
        assert label == 0 and torch.equal(x, t(ds.name(i)))  # not PIL's decode
    with pytest.raises(ImageDecodeError, match='zz_broken.jpg: cannot read'):
        ds[2]
