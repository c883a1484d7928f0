"""timm-nfnet-train: recipe wiring, data order, checkpoints, bad input, kill/resume, DDP, quick start."""
from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import timm_nfnet_ext.train.checkpoint as ckpt_io
from timm_nfnet_ext.train import weights_fingerprint
from timm_nfnet_ext.train.data import EpochSampler
from timm_nfnet_ext.train.recipe import resolve_settings
from timm_nfnet_ext.train.run import DistInfo
from timm_nfnet_ext.train.setup import TrainError, prepare, resolve_optimizer

from train_helpers import (REPO, TINY, assert_states_equal, child_env, load_ckpt, make_digits_folder, run_main,
                           run_ok, torchrun_cmd, train_cmd)


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> Path:
    """200 training and 50 validation digits as an ImageFolder."""
    return make_digits_folder(tmp_path_factory.mktemp('digits'), 20, 5)


@pytest.fixture(scope='session')
def finished_run(digits_dir, tmp_path_factory) -> tuple:
    """A 2-epoch tiny run with AGC (in process): (run folder, stdout)."""
    out_dir = tmp_path_factory.mktemp('run') / 'tiny'
    code, out, err = run_main(['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '2', '--agc', '0.02',
                               '--lr', '0.05', '--warmup-epochs', '0',
                               '--output', out_dir, '--seed', '0'])
    assert code == 0, err
    return out_dir, out


def snapshot(folder: Path) -> dict:
    """name -> bytes of every file in a folder (to prove nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- settings ----------------------------------------------------------------------------------
def test_no_arguments_run_the_quickstart_and_flags_beat_the_recipe():
    args, sources, _ = resolve_settings([])
    assert args.recipe == 'quickstart' and args.dataset == 'digits' and args.agc > 0 and args.export == ''
    args, sources, _ = resolve_settings(['--quickstart', '--epochs', '3', '--agc', '0.5'])
    assert (args.epochs, args.agc) == (3, 0.5)
    assert sources['epochs'] == 'cli' and sources['lr'] == 'recipe quickstart' and sources['seed'] == 'default'
    args, _, _ = resolve_settings(['--quickstart', '/some/folder'])
    assert (args.data_dir, args.dataset) == ('/some/folder', '')  # a folder given replaces the digits
    # on/off settings of a recipe can be switched off from the command line
    args, sources, _ = resolve_settings(['--quickstart', '--no-export', '--no-sched-on-updates'])
    assert args.export is None and args.sched_on_updates is False and sources['export'] == 'cli'
    args, _, _ = resolve_settings(['--recipe', 'paper', '--no-model-ema', '--no-amp', '--no-warmup-prefix'])
    assert (args.model_ema, args.amp, args.warmup_prefix) == (False, False, False)
    # clipping= / agc_eps= given as optimizer keywords are --agc / --agc-eps: they replace a
    # recipe's values, and wrap a plain optimizer as --agc does, with or without a recipe
    for start, opt in ((['--recipe', 'quickstart'], 'sgdagc'), (['--recipe', 'paper'], 'sgdagc'),
                       (['--recipe', 'paper'], 'sgd'), (['--data-dir', 'D'], 'sgd'), (['--data-dir', 'D'], 'sgdagc')):
        args, sources, _ = resolve_settings([*start, '--opt', opt, '--opt-kwargs', 'clipping=0.02', 'agc_eps=0.1'])
        assert (args.agc, sources['agc'], args.agc_eps) == (0.02, 'cli', 0.1)
        assert resolve_optimizer(args) == ('sgdagc', 0.02, dict(clipping=0.02, agc_eps=0.1))
    for kwargs, message in ((['clipping=abc'], "clipping='abc': must be a number > 0"),
                            (['clipping=0'], 'clipping=0: must be a number > 0'),
                            (['agc_eps=None'], 'agc_eps=None: must be a number > 0')):
        with pytest.raises(TrainError, match=re.escape(message)):
            resolve_settings(['--recipe', 'paper', '--opt-kwargs', *kwargs])
    with pytest.raises(TrainError, match='--agc 0.01 and --opt-kwargs clipping=0.02 disagree'):
        resolve_settings(['--agc', '0.01', '--opt-kwargs', 'clipping=0.02'])


@pytest.mark.parametrize('model,px,drop,level', [('nfnet_f0', 192, 0.2, 5), ('nfnet_f3', 320, 0.4, 15),
                                                 ('nf_seresnextd_f1', 224, 0.3, 10)])
def test_paper_recipe_follows_the_variant(model, px, drop, level):
    args, sources, _ = resolve_settings(['--recipe', 'paper', '--model', model])
    assert (args.img_size, args.drop) == (px, drop)
    assert args.aa.startswith(f'rand-n4-m{level}')
    assert (args.opt, args.momentum, args.weight_decay, args.agc, args.smoothing) == ('sgd', 0.9, 2e-5, 0.01, 0.1)
    assert (args.model_ema_decay, args.model_ema_warmup, args.mixup, args.drop_path) == (0.99999, 'paper', 0.2, 0.25)
    assert args.amp and args.amp_dtype == 'bfloat16' and args.lr is None and args.lr_base == 0.1
    args, sources, _ = resolve_settings(['--recipe', 'paper', '--model', model, '--drop', '0.05', '--img-size', '64'])
    assert (args.drop, args.img_size, sources['drop'], sources['aa']) == (0.05, 64, 'cli', 'recipe paper')


def test_paper_recipe_builds_the_paper_optimizer_schedule_and_ema(digits_dir, tmp_path):
    from timm_nfnet_ext.agc import SGDAGC
    args, _, _ = resolve_settings(['--recipe', 'paper', '--data-dir', str(digits_dir), *TINY, '-b', '10',
                                   '--epochs', '10', '--output', str(tmp_path / 'p'), '--img-size', '32'])
    run = prepare(args, DistInfo(0, 1, torch.device('cpu')))
    opt = run.parts.optimizer
    assert isinstance(opt, SGDAGC) and opt.defaults['nesterov'] and opt.defaults['momentum'] == 0.9
    assert math.isclose(args.lr, 0.1 * 10 / 256)
    head = run.parts.module.get_classifier().weight
    groups = {id(p): g for g in opt.param_groups for p in g['params']}
    assert groups[id(head)]['clipping'] is None and groups[id(head)]['weight_decay'] == 2e-5
    for name, p in run.parts.module.named_parameters():
        if p is head:
            continue
        g = groups[id(p)]
        assert g['clipping'] == 0.01, name
        decays = name.endswith('.weight') and p.ndim > 1
        assert g['weight_decay'] == (2e-5 if decays else 0.0), name
    # 5 warmup epochs from 0, then cosine to 0 at the last update
    steps, lr = run.data.steps_per_epoch, args.lr
    sched = run.parts.scheduler
    assert sched._get_lr(0)[0] == 0.0
    assert math.isclose(sched._get_lr(5 * steps)[0], lr)
    assert math.isclose(sched._get_lr(7 * steps + steps // 2)[0], lr * 0.5, rel_tol=0.05)
    assert sched._get_lr(10 * steps)[0] < 1e-9
    assert [run.parts.ema.get_decay(t) for t in (1, 2, 10 ** 7)] == [0.1, 2 / 11, 0.99999]
    # DeepMind's input pipeline: 2B decoded images per batch of B, mixed and RandAugmented in the collate
    from timm_nfnet_ext.data.train_transforms import ReferenceTrainBatch, ReferenceTrainDataset
    collate = run.data.train.collate_fn
    assert run.parts.mixup is None and isinstance(collate, ReferenceTrainBatch)
    assert isinstance(run.data.train.dataset, ReferenceTrainDataset) and run.data.train.batch_size == 20
    assert collate.mixup_alpha == 0.2 and collate.label_smoothing == 0.1 and collate.randaugment.magnitude == 5
    with run.parts.autocast():
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16 and torch.is_autocast_enabled('cpu')
    last_block = run.parts.module.stages[-1][-1]
    assert last_block.drop_path.rate == pytest.approx(0.25 * 3 / 4)
    assert run.parts.module.head.drop.p == 0.2
    assert type(run.parts.loss).__name__ == 'SoftTargetCrossEntropy'
    # validation follows the paper's protocol: the reference eval pipeline, from the files
    from timm_nfnet_ext.data import FileImageDataset, ReferenceEvalTransform, create_eval_transform
    val = run.data.val.dataset.dataset
    assert isinstance(val, FileImageDataset) and isinstance(val.transform, ReferenceEvalTransform)
    assert val.transform.img_size == (32, 32)  # trained at 32 px, not F0's 192: validated at 32
    assert run.record.derived['validation'].startswith('reference') and '64 px' in run.record.derived['validation']
    x, _ = val[3]
    assert torch.equal(x, create_eval_transform(img_size=32)(val.name(3)))


def test_reference_validation_size_follows_the_model_test_size(digits_dir, tmp_path):
    from timm_nfnet_ext.data import ReferenceEvalTransform
    base = ['--data-dir', str(digits_dir), '--model', 'nfnet_f0', '--model-kwargs', 'widths=(32,64,96,96)',
            'depths=(1,1,1,1)', 'group_width=16', '--workers', '0', '--output', str(tmp_path / 'r')]
    for extra, size in ((['--img-size', '192', '--val-preprocess', 'reference'], 256),  # F0: 192 -> 256
                        (['--img-size', '192', '--val-preprocess', 'reference', '--val-img-size', '40'], 40)):
        args, _, _ = resolve_settings(base + extra)
        transform = prepare(args, DistInfo(0, 1, torch.device('cpu'))).data.val.dataset.dataset.transform
        assert isinstance(transform, ReferenceEvalTransform) and transform.img_size == (size, size)
        shutil.rmtree(tmp_path / 'r')
    args, _, _ = resolve_settings(base + ['--img-size', '32'])
    run = prepare(args, DistInfo(0, 1, torch.device('cpu')))
    assert run.record.derived['validation'].startswith('timm (')
    shutil.rmtree(tmp_path / 'r')
    args, _, _ = resolve_settings(base + ['--img-size', '32', '--val-img-size', '40'])
    with pytest.raises(TrainError, match='--val-img-size .* needs --val-preprocess reference'):
        prepare(args, DistInfo(0, 1, torch.device('cpu')))


def test_reference_validation_matches_timm_nfnet_validate_on_the_export(digits_dir, tmp_path):
    """The accuracy a run reports with --val-preprocess reference is the one timm-nfnet-validate
    gives its exported weights (same pipeline, same files), and config.json carries its crop."""
    import json
    from timm_nfnet_ext import validate
    out_dir = tmp_path / 'run'
    code, out, err = run_main(['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '1', '--lr', '0.05',
                               '--warmup-epochs', '0', '--val-preprocess', 'reference', '--export',
                               '--output', out_dir, '--seed', '0'])
    assert code == 0, err
    assert 'reference (DeepMind' in out
    reported = float(re.search(r'reloaded through timm: validation top-1 ([\d.]+)%', out).group(1))
    cfg = json.loads((out_dir / 'export' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['test_input_size'] == [3, 32, 32] and cfg['test_crop_pct'] == pytest.approx(0.5)
    results = tmp_path / 'v.json'
    assert validate.main([str(digits_dir), '--model', f'local-dir:{out_dir / "export"}', '--pretrained',
                          '-j', '0', '-b', '25', '--no-progress', '--results-file', str(results),
                          '--results-format', 'json']) == 0
    res = json.loads(results.read_text())
    assert res['preprocess'] == 'reference' and res['img_size'] == 32
    assert res['top1'] == pytest.approx(reported, abs=0.01)


# --- data order --------------------------------------------------------------------------------
def test_epoch_order_depends_on_seed_and_epoch_and_resumes_mid_epoch():
    s = EpochSampler(100, 8, seed=1)
    s.set_epoch(3)
    full = list(s)
    assert len(full) == 96 and len({i for i, _ in full}) == 96
    s.set_epoch(3, start=5)
    assert list(s) == full[5 * 8:]
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in full]
    again = EpochSampler(100, 8, seed=1)
    again.set_epoch(3)
    assert list(again) == full


def test_two_ranks_split_each_global_batch_of_one_process():
    one = EpochSampler(50, 8, seed=2)
    ranks = [EpochSampler(50, 4, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(1, start=1)
    one_list, r0, r1 = list(one), list(ranks[0]), list(ranks[1])
    for b in range(len(one_list) // 8):
        assert sorted(one_list[8 * b:8 * b + 8]) == sorted(r0[4 * b:4 * b + 4] + r1[4 * b:4 * b + 4])


def test_evaluation_order_is_every_index_once_over_ranks_unseeded():
    ranks = [EpochSampler(10, 4, rank=r, world_size=3, shuffle=False) for r in range(3)]
    lists = [list(s) for s in ranks]
    assert all(type(i) is int for part in lists for i in part)  # no augmentation seed to draw
    assert sorted(sum(lists, [])) == list(range(10))
    assert [len(s) for s in ranks] == [len(part) for part in lists] == [4, 3, 3]


def test_augmentation_does_not_depend_on_loader_workers(digits_dir):
    from timm_nfnet_ext.train.data import build_datasets, build_loader
    batches = {}
    for workers in (0, 2):
        args, _, _ = resolve_settings(['--data-dir', str(digits_dir), *TINY, '-b', '8', '--workers', str(workers),
                                       '--aa', 'rand-n2-m9', '--reprob', '0.5'])
        data = build_datasets(args, {})
        sampler = EpochSampler(len(data.train), 8, seed=4)
        sampler.set_epoch(2, start=3)
        loader = build_loader(data.train, sampler, args, torch.device('cpu'))
        batches[workers] = [b for _, b in zip(range(3), loader)]
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(y0, y2) and torch.equal(x0, x2)
    assert not torch.equal(batches[0][0][0], batches[0][1][0])


# --- checkpoints -------------------------------------------------------------------------------
def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random
    state = ckpt_io.capture_rng()
    ckpt_io.save_atomic({'rng': state}, tmp_path / 'r.pt')
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt_io.restore_rng(load_ckpt(tmp_path / 'r.pt')['rng'])
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = ckpt_io.save_atomic({'v': torch.ones(3)}, tmp_path / 'last.pth.tar')
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        ckpt_io.save_atomic({'v': torch.zeros(3)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['checksums.json',
                                                                                          'last.pth.tar']
    assert ckpt_io.verify(path) is None  # the recorded checksum still matches the kept file


def test_atomic_text_and_copy_keep_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = ckpt_io.write_text_atomic('old', tmp_path / 'summary.csv')
    copied = ckpt_io.copy_atomic(path, tmp_path / 'best.csv')
    assert copied.read_text() == 'old'
    real_write = type(path).write_text

    def broken_write(self, text, *a, **k):
        real_write(self, text[:1])
        raise OSError('disk full')
    monkeypatch.setattr(type(path), 'write_text', broken_write)
    with pytest.raises(OSError, match='disk full'):
        ckpt_io.write_text_atomic('new', path)
    assert path.read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best.csv', 'summary.csv']


def test_clip_counts_are_read_through_lookahead():
    import timm
    from timm_nfnet_ext.train.loop import _fold
    lin = torch.nn.Linear(4, 3)
    opt = timm.optim.create_optimizer_v2(lin, 'lookahead_sgdagc', lr=0.1, clipping=1e-6)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    meters = {'loss_sum': 0.0, 'clipped': 0, 'units': 0}
    _fold(meters, torch.zeros(()), opt)
    assert meters['units'] == 4 and meters['clipped'] == 4  # every unit is over a 1e-6 limit


# --- a finished run ----------------------------------------------------------------------------
def test_a_run_writes_summary_plot_settings_and_checkpoints(finished_run):
    run_dir, out = finished_run
    rows = list(csv.DictReader((run_dir / 'summary.csv').open()))
    assert [r['epoch'] for r in rows] == ['0', '1']
    for col in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'clip_fraction'):
        assert all(r[col] != '' for r in rows), col
    assert all(0.0 < float(r['clip_fraction']) <= 1.0 for r in rows)
    assert all(0.0 <= float(r['eval_top1']) <= float(r['eval_top5']) <= 100.0 for r in rows)
    assert (run_dir / 'summary.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    settings = (run_dir / 'args.yaml').read_text()
    assert 'agc: 0.02' in settings and 'global_batch: 20' in settings and "agc: cli" in settings
    assert 'agc                  0.02  [cli]' in out and 'steps_per_epoch' in out
    best = max(float(r['eval_top1']) for r in rows)
    final = out.strip().splitlines()[-1]
    assert final.startswith(f'best top-1 {best:.2f}%') and str(run_dir / 'model_best.pth.tar') in final
    ckpt = load_ckpt(run_dir / 'last.pth.tar')  # weights_only: tensors and plain values only
    assert (ckpt['epoch'], ckpt['step'], ckpt['global_step']) == (2, 0, 20)
    assert {'model', 'optimizer', 'scheduler', 'rng', 'history'} <= set(ckpt)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith('.')) == []


def _error(argv) -> str:
    code, out, err = run_main(argv)
    assert code == 2, out + err
    assert 'Traceback' not in err
    return err


def test_bad_data_model_optimizer_and_output_are_refused_before_training(digits_dir, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    only_train = tmp_path / 'only_train'
    only_train.mkdir()
    os.symlink(digits_dir / 'train', only_train / 'train')
    cases = [
        (['--data-dir', only_train], "has no 'validation' split folder"),
        (['--data-dir', tmp_path / 'missing'], 'does not exist'),
        (['--data-dir', empty], 'is empty'),
        (['--data-dir', digits_dir, '--model', 'nfnet_f9'], "unknown model 'nfnet_f9'"),
        (['--data-dir', digits_dir, '--opt', 'sgdd'], "unknown optimizer 'sgdd'"),
        (['--data-dir', digits_dir, '--output', blocker / 'run'], 'cannot be created or written'),
        (['--data-dir', digits_dir, '--agc', '-1'], '--agc must be'),
        (['--data-dir', digits_dir, '-b', '7', '--cutmix-minmax', '0.2', '0.8'], 'need an even --batch-size, got 7'),
        (['--data-dir', digits_dir, '--seed', '-1'], '--seed must be in [0, 2**31), got -1'),
        (['--data-dir', digits_dir, '--num-classes', '3'], '--num-classes 3 is fewer than the 10 classes'),
        (['--data-dir', digits_dir, '--opt', 'fusedsgd'], "cannot create optimizer 'fusedsgd'"),
        (['--data-dir', digits_dir, '--opt', 'fusedsgd', '--agc', '0.01'], "cannot add AGC to optimizer 'fusedsgd'"),
    ]
    for extra, message in cases:
        out_dir = tmp_path / 'out'
        argv = [*TINY, '-b', '20', '--epochs', '1', *extra]
        if '--output' not in extra:
            argv += ['--output', out_dir]
        err = _error(argv)
        assert message in err, (extra, err)
        assert not list(tmp_path.rglob('*.pth.tar')), 'a checkpoint was written'
        assert not out_dir.exists(), f'{extra}: a failed start left its run folder behind'


def test_corrupt_foreign_and_mismatched_checkpoints_are_refused_untouched(finished_run, digits_dir, tmp_path):
    run_dir, _ = finished_run
    good = run_dir / 'last.pth.tar'
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'\x00not a checkpoint' * 100)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    plain = tmp_path / 'plain.pth.tar'
    torch.save({'weight': torch.ones(2)}, plain)
    before = {'run': snapshot(run_dir), 'tmp': snapshot(tmp_path)}
    base = ['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '3', '--agc', '0.02']
    cases = [
        ([*base, '--resume', garbage], 'cannot read checkpoint'),
        ([*base, '--resume', truncated], 'cannot read checkpoint'),
        ([*base, '--resume', plain], 'is not a timm-nfnet-train checkpoint'),
        ([*base, '--resume', tmp_path / 'nope.pth.tar'], 'does not exist'),
        ([*base[:-2], '--resume', good], 'agc: checkpoint 0.02, now None'),
        ([*base, '--model-kwargs', 'widths=(32,64,96,128)', 'depths=(1,1,1,1)', 'group_width=16',
          '--resume', good], 'model_args'),
        ([*base, '--output', run_dir], 'already holds checkpoints'),
    ]
    for argv, message in cases:
        err = _error(argv)
        assert message in err, (argv, err)
    assert snapshot(run_dir) == before['run'] and snapshot(tmp_path) == before['tmp']


# --- kill and resume ---------------------------------------------------------------------------
KILL_ARGS = [*TINY, '-b', '16', '--epochs', '2', '--recovery-interval', '3', '--mixup', '0.2', '--cutmix', '1.0',
             '--drop', '0.2', '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.99', '--agc', '0.02',
             '--lr', '0.05', '--warmup-epochs', '1', '--sched-on-updates', '--seed', '3']


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(digits_dir, tmp_path):
    args = ['--data-dir', str(digits_dir), *KILL_ARGS]
    whole = subprocess.Popen(train_cmd([*args, '--output', str(tmp_path / 'whole')]), env=child_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = tmp_path / 'killed'
    cmd = train_cmd([*args, '--output', str(killed)])
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # epoch 1 has 12 steps; recovery checkpoints after steps 3, 6, 9
        seen.append(line)
        if re.match(r'train: epoch 1 \[\s*5/12\]', line):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, ''.join(seen[-20:])
    mid = load_ckpt(killed / 'last.pth.tar')
    assert mid['epoch'] == 1 and 0 < mid['step'] < 12, 'the kill was not mid-epoch'
    out = run_ok(cmd + ['--resume', 'auto'])
    assert re.search(rf'resuming .*last.pth.tar at epoch 1 step {mid["step"]} ', out), out[-2000:]
    assert whole.wait(timeout=240) == 0, whole.stderr.read()[-3000:]
    a, b = load_ckpt(tmp_path / 'whole' / 'last.pth.tar'), load_ckpt(killed / 'last.pth.tar')
    assert_states_equal(a['model'], b['model'], 'model')
    assert_states_equal(a['ema'], b['ema'], 'EMA')
    assert a['history'] == b['history']
    assert (tmp_path / 'whole' / 'summary.csv').read_text() == (killed / 'summary.csv').read_text()


# --- distributed -------------------------------------------------------------------------------
DDP_ARGS = [*TINY, '--epochs', '1', '--drop', '0', '--agc', '0.02', '--lr', '0.05', '--warmup-epochs', '0',
            '--model-ema', '--model-ema-decay', '0.9', '--seed', '5', '--log-interval', '6']


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(digits_dir, tmp_path):
    args = ['--data-dir', str(digits_dir), *DDP_ARGS]
    single = subprocess.Popen(train_cmd([*args, '-b', '16', '--output', str(tmp_path / 'one')]), env=child_env(),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = run_ok(torchrun_cmd(2, [*args, '-b', '8', '--output', str(tmp_path / 'two')]))
    assert single.wait(timeout=240) == 0, single.stderr.read()[-3000:]
    prints = dict(re.findall(r'rank (\d) weights sha256 ([0-9a-f]{64})', out))
    assert set(prints) == {'0', '1'} and prints['0'] == prints['1'], out[-2000:]
    two, one = load_ckpt(tmp_path / 'two' / 'last.pth.tar'), load_ckpt(tmp_path / 'one' / 'last.pth.tar')
    assert two['identity']['world_size'] == 2 and two['identity']['global_batch'] == 16
    import timm
    model = timm.create_model('nfnet_f0', widths=(32, 64, 96, 96), depths=(1, 1, 1, 1), group_width=16, num_classes=10)
    model.load_state_dict(two['model'])
    assert weights_fingerprint(model) == prints['0']  # rank 0 saved what both ranks hold
    for key in ('model', 'ema'):
        for name, ref in one[key].items():
            torch.testing.assert_close(two[key][name], ref, rtol=1e-4, atol=1e-6, msg=f'{key} {name}')
    assert two['history'][0]['train_loss'] == pytest.approx(one['history'][0]['train_loss'], rel=1e-5)
    assert two['history'][0]['eval_loss'] == pytest.approx(one['history'][0]['eval_loss'], rel=1e-4)


# --- the quick start and timm's train.py -------------------------------------------------------
def test_quickstart_reaches_90_percent_exports_and_reloads(tmp_path):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        code, out, err = run_main(['--quickstart', '--output', tmp_path / 'qs'])
    assert code == 0, err
    # a quiet run: no Python warning, and nothing on stderr (torch logs some warnings there)
    assert not caught, [f'{w.filename}:{w.lineno}: {w.message}' for w in caught]
    assert err == '', err
    rows = list(csv.DictReader((tmp_path / 'qs' / 'summary.csv').open()))
    best = max(float(r['eval_top1']) for r in rows)
    assert best >= 90.0, out[-3000:]
    m = re.search(r'reloaded through timm: validation top-1 ([\d.]+)%', out)
    assert m and float(m.group(1)) == pytest.approx(best, abs=0.01), out[-1500:]
    export = tmp_path / 'qs' / 'export'
    assert (export / 'model.safetensors').is_file() and (export / 'config.json').is_file()
    import timm
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    best_ckpt = load_ckpt(tmp_path / 'qs' / 'model_best.pth.tar')['model']
    assert_states_equal(model.state_dict(), best_ckpt, 'exported weights')
    # evaluated as it was validated, at either size: resize to 32, no crop (crop_pct 1.0)
    for use_test_size in (False, True):
        cfg = timm.data.resolve_model_data_config(model, use_test_size=use_test_size)
        assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0, cfg


def test_console_script_and_timm_train_py_plugin_pieces():
    assert shutil.which('timm-nfnet-train') or (Path(sys.executable).parent / 'timm-nfnet-train').exists()
    # what `train.py --device-modules timm_nfnet_ext --model nfnet_f0 --opt sgdagc --opt-kwargs clipping=0.01`
    # does: import the package, create the model and the optimizer through timm's factories
    code = ('import importlib, timm, timm.optim; importlib.import_module("timm_nfnet_ext"); '
            'm = timm.create_model("nfnet_f0", widths=(32,64,96,96), depths=(1,1,1,1), group_width=16); '
            'o = timm.optim.create_optimizer_v2(m, opt="sgdagc", lr=0.1, weight_decay=2e-5, momentum=0.9, '
            '**{"clipping": 0.01}); '
            'print(type(o).__name__, sorted({g["clipping"] for g in o.param_groups}))')
    proc = subprocess.run([sys.executable, '-c', code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['SGDAGC', '[0.01]']


@pytest.mark.parametrize('has_val,mode', [(True, 'max'), (False, 'min')])
def test_plateau_follows_the_metric_actually_tracked(has_val, mode):
    """Without a validation split the plateau scheduler watches the training loss: lower is better."""
    from timm_nfnet_ext.train.setup import _scheduler
    args, _, _ = resolve_settings(['--quickstart', '--sched', 'plateau', '--eval-metric', 'top1'])
    args.sched_on_updates = False  # plateau steps per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, _ = _scheduler(opt, args, 10, has_val=has_val)
    assert sched.lr_scheduler.mode == mode


def _summary(run_dir: Path) -> list:
    with open(run_dir / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_plateau_without_warmup_starts_at_the_learning_rate(digits_dir, tmp_path):
    """A fresh run must not step the scheduler at epoch 0: timm's plateau scheduler would set
    --warmup-lr for good when there is no warmup."""
    out_dir = tmp_path / 'plateau'
    code, out, err = run_main(['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '1', '--sched', 'plateau',
                               '--warmup-epochs', '0', '--lr', '0.05', '--output', out_dir])
    assert code == 0, err
    assert float(_summary(out_dir)[0]['lr']) == pytest.approx(0.05)


def test_resume_at_an_epoch_boundary_with_another_batch_keeps_the_schedule(digits_dir, tmp_path):
    """The update count restarts from epoch x steps per epoch (of this run): a per-update cosine
    still ends at 0 when the global batch changed between epochs."""
    base = ['--data-dir', digits_dir, *TINY, '--epochs', '2', '--sched-on-updates', '--warmup-epochs', '0',
            '--lr', '0.05', '--agc', '0.02']
    code, out, err = run_main([*base, '-b', '20', '--output', tmp_path / 'first'])
    assert code == 0, err
    code, out, err = run_main([*base, '-b', '10', '--output', tmp_path / 'second',
                               '--resume', tmp_path / 'first' / 'checkpoint-0.pth.tar'])
    assert code == 0, err
    assert 'the schedule continues from update 20 (the checkpoint counted 10)' in out
    assert 'steps_per_epoch 10 -> 20' in out  # the schedule changed: rebuilt, and said so
    rows = _summary(tmp_path / 'second')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert float(rows[-1]['lr']) == pytest.approx(0.0, abs=1e-12)  # the cosine ended
    assert float(rows[0]['lr']) == pytest.approx(0.025, rel=1e-6)  # the first run's mid-point


def test_validation_split_is_labelled_with_the_training_classes(digits_dir, tmp_path):
    """An ImageFolder numbers each split's classes on its own: a validation folder without one
    class is relabelled with the training split's indices; a class training lacks is refused."""
    from timm_nfnet_ext.train.data import build_datasets
    from timm_nfnet_ext.train.recipe import TrainError
    root = tmp_path / 'data'
    shutil.copytree(digits_dir, root)
    shutil.rmtree(root / 'validation' / 'class_3')
    args, _, _ = resolve_settings(['--data-dir', str(root), *TINY])
    data = build_datasets(args, {})
    train_map = data.train.reader.class_to_idx
    assert data.val.reader.class_to_idx == train_map
    labels = {data.val.reader.samples[i][1] for i in range(len(data.val))}
    assert train_map['class_3'] not in labels and train_map['class_9'] in labels and train_map['class_9'] == 9
    shutil.copytree(root / 'validation' / 'class_4', root / 'validation' / 'class_x')
    with pytest.raises(TrainError, match="'validation' split has classes the 'train' split lacks: class_x"):
        build_datasets(args, {})


def test_schedule_changes_are_listed_and_sequences_compare_by_value():
    from timm_nfnet_ext.train.setup import _schedule_changes
    now = {'sched': 'cosine', 'epochs': 10, 'decay_milestones': [90, 180, 270], 'steps_per_epoch': 5}
    assert _schedule_changes(dict(now, decay_milestones=(90, 180, 270)), now) == []  # tuple vs list
    assert _schedule_changes(dict(now, epochs=12), now) == ['epochs 12 -> 10']


def test_a_schedule_rebuilt_mid_epoch_zero_uses_its_own_learning_rate(digits_dir, tmp_path):
    """Resumed inside epoch 0 with another --lr: the rebuilt schedule's lr applies at once, not the
    one the optimizer state carried from the old schedule."""
    base = ['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '1', '--warmup-epochs', '0', '--agc', '0.02']
    code, out, err = run_main([*base, '--lr', '0.05', '--output', tmp_path / 'first'])
    assert code == 0, err
    data = load_ckpt(tmp_path / 'first' / 'checkpoint-0.pth.tar')
    assert data['optimizer']['param_groups'][0]['lr'] == 0.0  # where the 1-epoch cosine ended
    # the same state, as if written 3 steps into epoch 0 (the global batch is unchanged)
    data.update(epoch=0, step=3, global_step=3, history=[])
    mid = tmp_path / 'mid' / 'last.pth.tar'
    mid.parent.mkdir()
    torch.save(data, mid)
    code, out, err = run_main([*base, '--lr', '0.1', '--output', tmp_path / 'mid', '--resume', mid])
    assert code == 0, err
    assert "lr 0.05 -> 0.1" in out  # the schedule changed: rebuilt, and said so
    assert float(_summary(tmp_path / 'mid')[0]['lr']) == pytest.approx(0.1)
