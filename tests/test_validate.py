"""timm-nfnet-validate on a small JPEG ImageFolder built here, against accuracy computed by hand."""
import csv
import json
import pathlib
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import timm
from timm_nfnet_ext import validate
from timm_nfnet_ext.data import create_eval_transform

IMAGES = pathlib.Path(__file__).parent / 'fixtures' / 'dm_preprocessing' / 'images'
TINY = dict(widths=(32, 64, 96, 96), depths=(1, 1, 1, 1), group_width=16, num_classes=3)
TINY_ARGS = ['--model', 'nfnet_f0', '--model-kwargs', 'widths=(32,64,96,96)', 'depths=(1,1,1,1)',
             'group_width=16', '--num-classes', '3', '--img-size', '64', '-b', '4', '--no-progress']
FILES = {  # class -> files; the classes are numbered in sorted order (a=0, b=1, c=2)
    'a': ['photo_300x200_422.jpg', 'cmyk_adobe_150x120.jpg', 'gray_progressive_90x130.jpg'],
    'b': ['small_100x80.jpg', 'tiny_5x7.jpg', 'rgb_70x90.png', 'noise_300x200_444.jpg'],
    'c': ['photo_300x200_420_q60.jpg', 'wide_40x600.jpg', 'grating_333x517_q90.jpg'],
}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'data'
    for cls, names in FILES.items():
        (root / 'validation' / cls).mkdir(parents=True)
        for name in names:
            shutil.copy(IMAGES / name, root / 'validation' / cls / name)
    model = timm.create_model('nfnet_f0', **TINY).eval()
    with torch.no_grad():  # a head that tells the images apart, so top-1 is not all-or-nothing
        model.head.fc.weight.normal_(0, 3.0)
    ckpt = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return root, ckpt, model


def _by_hand(model, root, preprocess):
    """Top-1 / top-5 (of 3) and mean cross-entropy, one image at a time."""
    if preprocess == 'reference':
        t = create_eval_transform(img_size=64)
        load = t
    else:
        from timm.data import create_transform, resolve_data_config
        t = create_transform(**resolve_data_config({'img_size': 64}, model=model, use_test_size=True))
        load = lambda p: t(Image.open(p).convert('RGB'))  # noqa: E731
    correct, loss, n = 0, 0.0, 0
    for label, cls in enumerate(sorted(FILES)):
        for name in sorted(FILES[cls]):
            with torch.no_grad():
                logits = model(load(root / 'validation' / cls / name)[None])
            correct += int(logits.argmax(1).item() == label)
            loss += torch.nn.functional.cross_entropy(logits, torch.tensor([label])).item()
            n += 1
    return 100.0 * correct / n, loss / n


@pytest.mark.parametrize('preprocess', ['reference', 'timm'])
def test_top1_equals_the_one_computed_by_hand(folder, preprocess, tmp_path, capsys):
    root, ckpt, model = folder
    out = tmp_path / 'results.csv'
    rc = validate.main([str(root), *TINY_ARGS, '--checkpoint', str(ckpt), '-j', '2',
                        '--preprocess', preprocess, '--results-file', str(out)])
    assert rc == 0
    top1, loss = _by_hand(model, root, preprocess)
    assert 0 < top1 < 100  # the test discriminates
    row = next(csv.DictReader(out.open()))
    assert float(row['top1']) == pytest.approx(top1, abs=1e-3)
    assert float(row['loss']) == pytest.approx(loss, rel=1e-4)
    assert float(row['top5']) == 100.0  # 3 classes: top-min(5, 3) always hits
    assert row['preprocess'] == preprocess and int(row['images']) == 10 and row['skipped'] == '0'
    assert row['interpolation'] == ('tf-bicubic' if preprocess == 'reference' else 'bicubic')
    printed = capsys.readouterr().out
    assert f'{preprocess} preprocessing' in printed and '--result' in printed


def test_reference_is_the_default_for_this_package_and_json_results(folder, tmp_path):
    root, ckpt, _ = folder
    out = tmp_path / 'r.json'
    assert validate.main(['--data-dir', str(root), *TINY_ARGS, '--checkpoint', str(ckpt),
                          '-j', '0', '--results-file', str(out), '--results-format', 'json']) == 0
    res = json.loads(out.read_text())
    assert res['preprocess'] == 'reference' and res['img_size'] == 64
    assert res['crop_pct'] == round(64 / 96, 4)


def test_a_bad_image_stops_the_run_naming_it_unless_skipped(folder, tmp_path, capsys):
    root, ckpt, model = folder
    bad = root / 'validation' / 'b' / 'zz_truncated.jpg'
    data = (IMAGES / 'photo_300x200_422.jpg').read_bytes()
    bad.write_bytes(data[:len(data) // 3])
    (root / 'validation' / 'c' / 'zz_empty.jpg').write_bytes(b'')
    args = [str(root), *TINY_ARGS, '--checkpoint', str(ckpt), '-j', '2']
    assert validate.main(args) == 1
    err = capsys.readouterr().err
    assert 'zz_truncated.jpg' in err and 'truncated JPEG' in err and '--skip-bad-images' in err
    out = tmp_path / 'r.json'
    assert validate.main(args + ['--skip-bad-images', '--results-file', str(out),
                                 '--results-format', 'json']) == 0
    res = json.loads(out.read_text())
    assert res['skipped'] == 2 and res['images'] == 10
    assert res['top1'] == pytest.approx(_by_hand(model, root, 'reference')[0], abs=1e-3)


def test_timm_preprocessing_names_a_file_pil_cannot_read(folder, capsys):
    root, ckpt, _ = folder
    (root / 'validation' / 'a' / 'zz_not_an_image.jpg').write_bytes(b'plain text')
    assert validate.main([str(root), *TINY_ARGS, '--checkpoint', str(ckpt), '-j', '0',
                          '--preprocess', 'timm']) == 1
    assert 'zz_not_an_image.jpg' in capsys.readouterr().err


@pytest.mark.parametrize('extra,message', [
    (['--model', 'no_such_model'], 'unknown model'),
    (['--checkpoint', 'missing.safetensors'], 'cannot load --checkpoint'),
    (['--num-classes', '2'], 'labels run to 2'),  # 3 class folders, a 2-class head
])
def test_bad_inputs_are_clear_errors(folder, capsys, extra, message):
    root = folder[0]
    assert validate.main([str(root), *TINY_ARGS, '-j', '0', *extra]) == 1
    assert message in capsys.readouterr().err


def test_missing_folder_and_bad_flags(tmp_path, capsys):
    assert validate.main([str(tmp_path / 'nowhere'), *TINY_ARGS]) == 1
    assert 'does not exist' in capsys.readouterr().err
    assert validate.main(TINY_ARGS) == 1
    assert 'give the dataset folder' in capsys.readouterr().err
    for bad in (['--preprocess', 'pil'], ['-b', '0'], ['--results-format', 'xml']):
        with pytest.raises(SystemExit) as e:
            validate.main([str(tmp_path), *TINY_ARGS, *bad])
        assert e.value.code == 2


def test_an_unreadable_path_stops_the_run_or_is_skipped(folder, tmp_path, capsys):
    root, ckpt, _ = folder
    (root / 'validation' / 'a' / 'zz_dangling.jpg').symlink_to(tmp_path / 'gone.jpg')
    args = [str(root), *TINY_ARGS, '--checkpoint', str(ckpt), '-j', '2']
    assert validate.main(args) == 1
    assert 'zz_dangling.jpg: cannot read' in capsys.readouterr().err
    out = tmp_path / 'r.json'
    assert validate.main(args + ['--skip-bad-images', '--results-file', str(out), '--results-format', 'json']) == 0
    assert json.loads(out.read_text())['skipped'] == 1


def test_bad_results_folder_and_device_fail_before_any_work(folder, tmp_path, capsys):
    root, ckpt, _ = folder
    base = [str(root), *TINY_ARGS, '--checkpoint', str(ckpt), '-j', '0']
    assert validate.main(base + ['--results-file', str(tmp_path / 'no' / 'such' / 'r.csv')]) == 1
    assert 'not a writable folder' in capsys.readouterr().err
    assert validate.main(base + ['--device', 'gpu']) == 1
    assert "--device 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert validate.main(base + ['--device', 'cuda']) == 1
        assert 'CUDA is not available' in capsys.readouterr().err
    assert validate.main(base + ['--model-kwargs', 'no_such_argument=1']) == 1
    assert 'cannot create' in capsys.readouterr().err
