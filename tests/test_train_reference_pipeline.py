"""timm-nfnet-train with DeepMind's training input pipeline (--data-pipeline reference, the paper
recipe's): a short run on a small JPEG ImageFolder, its resolved settings, and its batches."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from timm_nfnet_ext.train.data import EpochSampler, build_datasets, build_loader
from timm_nfnet_ext.train.recipe import resolve_settings
from train_helpers import run_ok, train_cmd

SMALL = ['--model', 'nfnet_f0', '--model-kwargs', 'widths=(32,64,96,96)', 'depths=(1,1,1,1)', 'group_width=16',
         '--img-size', '32', '-b', '8', '--workers', '0', '--no-amp', '--no-export']


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory) -> Path:
    """4 classes of digits as JPEGs of assorted sizes (12 train, 3 validation images each)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp('jpegs')
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(0)
    for c in range(4):
        idx = np.flatnonzero(digits.target == c)
        for split, chosen in (('train', idx[:12]), ('validation', idx[12:15])):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True)
            for i in chosen:
                w, h = (int(v) for v in rng.integers(40, 80, 2))
                Image.fromarray(images[i]).resize((w, h), Image.BICUBIC).convert('RGB').save(folder / f'{i}.jpg')
    return root


def test_paper_recipe_trains_with_the_reference_pipeline(jpeg_folder, tmp_path):
    out = run_ok(train_cmd(['--data-dir', str(jpeg_folder), '--recipe', 'paper', *SMALL, '--epochs', '2',
                            '--warmup-epochs', '0', '--output', str(tmp_path / 'run')]))
    settings = yaml.safe_load((tmp_path / 'run' / 'args.yaml').read_text())
    assert settings['settings']['data_pipeline'] == 'reference' and settings['sources']['data_pipeline'] == 'recipe paper'
    assert settings['settings']['randaug_magnitude'] == 5  # F0's level
    assert 'data_pipeline' in out and 'recipe paper' in out
    # 48 images, batches of 8 made from 16 decoded images: an epoch of 48 / 8 = 6 steps reads the data twice
    assert 'steps_per_epoch    6' in out
    assert 'epoch 1: train_loss' in out and 'nan' not in out.split('epoch 0:')[1]


def test_timm_pipeline_stays_selectable_with_the_paper_recipe(jpeg_folder, tmp_path):
    cfg, sources, _ = resolve_settings(['--data-dir', str(jpeg_folder), '--recipe', 'paper', '--data-pipeline', 'timm'])
    assert cfg.data_pipeline == 'timm' and sources['data_pipeline'] == 'cli'
    cfg, sources, _ = resolve_settings(['--data-dir', str(jpeg_folder), '--recipe', 'paper', '--model', 'nfnet_f3'])
    assert cfg.data_pipeline == 'reference' and sources['data_pipeline'] == 'recipe paper'
    assert cfg.randaug_magnitude == 15  # F3 trained at '415'
    cfg, _, _ = resolve_settings(['--data-dir', str(jpeg_folder)])
    assert cfg.data_pipeline == 'timm'


def _batches(jpeg_folder, workers, epoch=0):
    cfg, _, _ = resolve_settings(['--data-dir', str(jpeg_folder), '--recipe', 'paper', *SMALL[:-4],
                                  '--workers', str(workers)])
    data = build_datasets(cfg, {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.25,) * 3,
                                'crop_pct': 1.0, 'interpolation': 'bicubic'})
    sampler = EpochSampler(len(data.train), 16, seed=cfg.seed, reads=data.reads)
    sampler.set_epoch(epoch)
    loader = build_loader(data.train, sampler, cfg, torch.device('cpu'), data.collate)
    return list(loader)


def test_reference_batches_are_the_same_with_workers_and_differ_between_reads(jpeg_folder):
    serial, parallel = _batches(jpeg_folder, 0), _batches(jpeg_folder, 2)
    assert len(serial) == 6 and serial[0][0].shape == (8, 3, 32, 32) and serial[0][1].shape == (8, 4)
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for _, targets in serial:
        torch.testing.assert_close(targets.sum(1), torch.ones(8))  # soft targets (mixed, smoothed)
    assert not torch.equal(serial[0][0], _batches(jpeg_folder, 0, epoch=1)[0][0])


def test_reference_pipeline_refuses_mixup_off(jpeg_folder):
    from timm_nfnet_ext.train.config import TrainError
    cfg, _, _ = resolve_settings(['--data-dir', str(jpeg_folder), '--recipe', 'paper', '--mixup', '0', *SMALL])
    with pytest.raises(TrainError, match='always mixes'):
        build_datasets(cfg, {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.25,) * 3,
                             'crop_pct': 1.0, 'interpolation': 'bicubic'})


def test_reference_pipeline_under_ddp_is_reproducible(jpeg_folder, tmp_path):
    """Two processes, each its own share of every batch and its own seeded draws: the ranks end
    equal (DDP), and a second run repeats the first bit for bit."""
    import re
    from train_helpers import torchrun_cmd
    args = ['--data-dir', str(jpeg_folder), '--recipe', 'paper', *SMALL, '--epochs', '1', '--warmup-epochs', '0',
            '--workers', '1']
    prints = []
    for i in range(2):
        out = run_ok(torchrun_cmd(2, args + ['--output', str(tmp_path / f'run{i}')]), timeout=300)
        assert 'DDP check: weights identical on all 2 ranks' in out
        prints.append(sorted(re.findall(r'rank (\d) weights sha256 (\w+)', out)))
    assert len(prints[0]) == 2 and prints[0] == prints[1]
