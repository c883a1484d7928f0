"""The training loop of ``timm-nfnet-train`` (the command itself: ``cli.py``).

Everything is built from timm's factories (``setup.py``); this module runs it: train steps
with gradient accumulation, AGC statistics, EMA, the per-step agreement of all ranks on stop
requests and non-finite steps, validation, checkpoints (``checkpoint.py``) and summary.csv and
plot (``report.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from .elastic import StopRequest
from .report import to_plain, write_plot, write_summary
from .run import DistInfo, Run

__all__ = ['train', 'evaluate', 'weights_fingerprint', 'gather_objects', 'Preempted', 'STOP_REQUEST']

_logger = logging.getLogger(__name__)
STOP_REQUEST = StopRequest()  # its signal handlers are installed by the command (cli.main) only


class Preempted(Exception):
    """Every rank stopped after the same step on SIGTERM/SIGUSR1; the checkpoint is written."""


# --- measurements ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, run: Run) -> Dict[str, float]:
    """Validation loss, top-1 and top-5 (%) over the whole split, summed across processes.

    The model is put in eval mode for the pass and back in its previous mode after it.
    Under distribution every rank must call it (one all-reduce).

    Args:
        model: the model to measure.
        loader: yields ``(images, targets)`` with integer targets.
        run: the run (device, autocast, channels_last, number of classes, processes).

    Returns:
        ``{'loss', 'top1', 'top5'}``: mean cross-entropy, and top-1 / top-5 accuracy in percent
        (top-5 is top-k with k the number of classes when there are fewer than 5).
    """
    from timm.utils import accuracy
    device = run.dist.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    k5 = min(5, run.record.num_classes)
    for images, targets in loader:
        images, targets = _to_device(images, targets, run)
        with run.parts.autocast():
            logits = model(images).float()
        n = targets.shape[0]
        top1, top5 = accuracy(logits, targets, topk=(1, k5))
        sums[:3] += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                                 top1.double() * n / 100, top5.double() * n / 100])
        sums[3] += n  # no host-to-device copy per batch
    if run.dist.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {'loss': loss / n, 'top1': 100 * c1 / n, 'top5': 100 * c5 / n}


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()`` (in order): equal iff bit-identical.

    Args:
        module: the module (its names and tensor bytes are hashed).

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- helpers ---------------------------------------------------------------------------------
def _to_device(images: torch.Tensor, targets: torch.Tensor, run: Run) -> Tuple[torch.Tensor, torch.Tensor]:
    device = run.dist.device
    images = images.to(device, non_blocking=True)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


class _Log:
    """Logs on the primary process only; through the progress bar when one is shown."""

    def __init__(self, primary: bool):
        self.primary, self.bar = primary, None

    def __call__(self, msg: str) -> None:
        if not self.primary:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            _logger.info(msg)


def _progress_bar(run: Run, epoch: int, start: int) -> Any:
    from tqdm.auto import tqdm
    show = run.cfg.progress if run.cfg.progress is not None else sys.stderr.isatty()
    return tqdm(total=run.data.steps_per_epoch, initial=start, desc=f'epoch {epoch}/{run.data.num_epochs - 1}',
                unit='step', disable=not (show and run.dist.primary), dynamic_ncols=True, leave=True)


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """``obj`` of every rank, in rank order (a 1-element list without distribution).

    A collective: under distribution every rank must call it.

    Args:
        obj: this rank's picklable object.
        info: this process's place.

    Returns:
        The objects, one per rank.
    """
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --- checkpoints -----------------------------------------------------------------------------
def _checkpoint(run: Run, state: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint dict of tensors and plain values (every rank's RNG and meters included)."""
    ranks = gather_objects({'rng': ckpt_io.capture_rng(), 'meters': dict(state['meters'])}, run.dist)
    return {
        'format': ckpt_io.FORMAT, 'version': ckpt_io.VERSION,
        'model': run.parts.module.state_dict(), 'ema': run.parts.ema.module.state_dict() if run.parts.ema is not None else None,
        'optimizer': run.parts.optimizer.state_dict(),
        'scheduler': run.parts.scheduler.state_dict() if run.parts.scheduler is not None else None,
        'schedule': run.record.schedule, 'scaler': run.parts.scaler.state_dict() if run.parts.scaler.is_enabled() else None,
        'epoch': state['epoch'], 'step': state['step'], 'global_step': state['global_step'],
        'rng': [r['rng'] for r in ranks], 'meters': [r['meters'] for r in ranks],
        'history': list(state['history']), 'best': dict(state['best']),
        'identity': run.record.identity, 'config': {k: to_plain(v) for k, v in run.cfg.to_dict().items()},
    }


def _save(run: Run, state: Dict[str, Any], epoch_end: bool) -> Optional[Path]:
    """Write last.pth.tar (and at epoch ends checkpoint-N / model_best); primary only writes."""
    data = _checkpoint(run, state)  # collective: every rank takes part
    if not run.dist.primary:
        return None
    d = run.run_dir
    if state.get('last_good', True):  # the fallback if the new last.pth.tar is found damaged
        ckpt_io.keep_previous(d)
    state['last_good'] = True
    if not epoch_end:
        return ckpt_io.save_atomic(data, d / 'last.pth.tar')
    path = ckpt_io.save_atomic(data, d / f'checkpoint-{state["epoch"] - 1}.pth.tar')
    ckpt_io.copy_atomic(path, d / 'last.pth.tar')
    if state['best'].get('epoch') == state['epoch'] - 1:
        ckpt_io.copy_atomic(path, d / 'model_best.pth.tar')
    ckpt_io.prune(d, run.cfg.checkpoint_hist)
    return path


def _restore(run: Run) -> Dict[str, Any]:
    """The loop position: fresh, or from the checkpoint being resumed (RNG states included)."""
    state = {'epoch': 0, 'step': 0, 'global_step': 0, 'history': [], 'best': {}, 'meters': _fresh_meters()}
    data = run.resume
    if data is None:
        return state
    # the update count follows this run's steps per epoch: a global batch (or --grad-accum-steps)
    # changed at an epoch boundary changes it, and the schedule must still end at --epochs
    global_step = data['epoch'] * run.data.steps_per_epoch + data['step']
    if global_step != data['global_step'] and run.dist.primary:
        _logger.info(f'note: {run.data.steps_per_epoch} steps per epoch now: the schedule continues from update '
                     f'{global_step} (the checkpoint counted {data["global_step"]})')
    state.update(epoch=data['epoch'], step=data['step'], global_step=global_step,
                 history=list(data['history']), best=dict(data.get('best') or {}))
    same_world = len(data['rng']) == run.dist.world_size
    if same_world:
        ckpt_io.restore_rng(data['rng'][run.dist.rank])
        if data['step']:
            state['meters'] = dict(data['meters'][run.dist.rank])
    elif run.dist.primary:
        _logger.info(f'note: checkpoint from {len(data["rng"])} processes resumed on {run.dist.world_size}: '
              'random states are re-seeded, the run will not repeat the original bit for bit')
    return state


def _fresh_meters() -> Dict[str, float]:
    return {'loss_sum': 0.0, 'steps': 0, 'clipped': 0.0, 'units': 0.0, 'images': 0, 'skipped': 0, 'bad_in_row': 0}


# --- the loop --------------------------------------------------------------------------------
def _micro_step(run: Run, images: torch.Tensor, targets: torch.Tensor, last: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch (no DDP all-reduce unless it ends the step)."""
    images, targets = _to_device(images, targets, run)
    if run.parts.mixup is not None:  # also after --mixup-off-epoch: it still makes the soft targets
        images, targets = run.parts.mixup(images, targets)
    sync = run.parts.model.no_sync() if run.dist.distributed and not last else contextlib.nullcontext()
    with sync:
        with run.parts.autocast():
            loss = run.parts.loss(run.parts.model(images), targets) / run.cfg.grad_accum_steps
        run.parts.scaler.scale(loss).backward()
    return loss.detach()


def _nonfinite(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """True (a device flag, no sync) when the step's loss or a gradient holds inf/NaN. Under DDP the
    gradients are already averaged, so every rank sees the same ones. With fp16's GradScaler
    only the loss counts: the scaler skips overflowing scaled gradients itself."""
    bad = ~torch.isfinite(loss)
    if not run.parts.scaler.is_enabled():
        sums = [p.grad.sum(dtype=torch.float32) for p in run.parts.module.parameters()
                if p.grad is not None and not p.grad.is_sparse]
        if sums:
            bad = bad | ~torch.isfinite(torch.stack(sums)).all()
    return bad


def _skip_step(run: Run, state: Dict[str, Any]) -> None:
    """A step whose loss or gradients are non-finite: no optimizer, scaler or EMA update (nothing
    non-finite reaches their states, or a checkpoint); the position and schedule move on."""
    run.parts.optimizer.zero_grad(set_to_none=True)
    state['global_step'] += 1
    if run.parts.scheduler is not None:
        run.parts.scheduler.step_update(state['global_step'])


def _optimizer_step(run: Run, state: Dict[str, Any]) -> None:
    """The optimizer step (AGC optimizers count their clipped units), scheduler and EMA updates."""
    run.parts.scaler.step(run.parts.optimizer)
    run.parts.scaler.update()
    run.parts.optimizer.zero_grad(set_to_none=True)
    state['global_step'] += 1
    if run.parts.scheduler is not None:
        run.parts.scheduler.step_update(state['global_step'])
    if run.parts.ema is not None:
        run.parts.ema.update(run.parts.module, step=state['global_step'])


def train_one_epoch(run: Run, state: Dict[str, Any], log: _Log) -> Dict[str, float]:
    """Train from ``state['step']`` to the end of ``state['epoch']``.

    Also writes a mid-epoch ``last.pth.tar`` every ``--recovery-interval`` steps, and on a stop request.

    Args:
        run: the prepared run.
        state: the loop state (``epoch``, ``step``, ``global_step``, ``meters``...), updated in place.
        log: the logger of the primary process.

    Returns:
        ``{'train_loss', 'clip_fraction'}``: the epoch's mean training loss over applied steps (all
        ranks), and the fraction of units AGC clipped (``None`` without an AGC optimizer).

    Raises:
        FloatingPointError: ``--nonfinite-limit`` steps in a row had a non-finite loss or gradient.
        Preempted: a rank got SIGTERM/SIGUSR1; every rank stopped after the same step, checkpoint written.
    """
    cfg, epoch, accum = run.cfg, state['epoch'], run.cfg.grad_accum_steps
    run.data.sampler.set_epoch(epoch, state['step'] * accum)
    if run.parts.mixup is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
        run.parts.mixup.mixup_enabled = False
    run.parts.model.train()
    meters, bar = state['meters'], _progress_bar(run, epoch, state['step'])
    log.bar = bar
    batches, t0, seen = iter(run.data.train), time.time(), 0
    # Losses are summed on the device and read back only at log and save points. The one read
    # back every step is the agreed stop / non-finite flag (two numbers): the price of skipping a
    # bad step on every rank before the optimizer sees it, and of stopping all ranks together.
    pending = torch.zeros((), dtype=torch.float64, device=run.dist.device)
    for step in range(state['step'], run.data.steps_per_epoch):
        loss = torch.zeros((), device=run.dist.device)
        for micro in range(accum):
            images, targets = next(batches)
            loss += _micro_step(run, images, targets, micro == accum - 1)
            seen += images.shape[0]
        # one small all-reduce a step: did any rank get SIGTERM/SIGUSR1, is the step non-finite
        stop, bad = STOP_REQUEST.agreed(_nonfinite(run, loss), run.dist.distributed)
        if bad:
            _skip_step(run, state)
            meters['skipped'] = meters.get('skipped', 0) + 1
            meters['bad_in_row'] = meters.get('bad_in_row', 0) + 1
            log(f'train: epoch {epoch} step {step + 1}: non-finite loss or gradient, step skipped '
                f'({meters["bad_in_row"]} in a row, {meters["skipped"]} this epoch)')
            if meters['bad_in_row'] >= cfg.nonfinite_limit:
                raise FloatingPointError(f'{meters["bad_in_row"]} steps in a row with a non-finite loss or '
                                         f'gradient (--nonfinite-limit {cfg.nonfinite_limit}), the last at '
                                         f'epoch {epoch} step {step + 1}; none reached the weights or a checkpoint')
        else:
            _optimizer_step(run, state)
            pending += loss
            meters['steps'] += 1
            meters['bad_in_row'] = 0
        state['step'] = step + 1
        bar.update(1)
        if cfg.log_interval and (step + 1) % cfg.log_interval == 0:
            _fold(meters, pending, run.parts.optimizer)
            rate = seen * run.dist.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{_lr(run):.3g}', refresh=False)
            log(f'train: epoch {epoch} [{step + 1:>4}/{run.data.steps_per_epoch}] loss {float(loss):.4f} '
                f'lr {_lr(run):.4g} {_clip_text(meters)}{rate:.0f} img/s')
        if stop:  # every rank is here after the same step: one consistent checkpoint, then exit
            _fold(meters, pending, run.parts.optimizer)
            bar.close()
            log.bar = None
            path = _save(run, state, epoch_end=False)
            log(f'stopping on {STOP_REQUEST.name()}: epoch {epoch} step {step + 1} (global step '
                f'{state["global_step"]}) saved to {path}; continue with --resume auto')
            raise Preempted(STOP_REQUEST.name())
        if cfg.recovery_interval and (step + 1) % cfg.recovery_interval == 0 and step + 1 < run.data.steps_per_epoch:
            _fold(meters, pending, run.parts.optimizer)
            _save(run, state, epoch_end=False)
    _fold(meters, pending, run.parts.optimizer)
    bar.close()
    log.bar = None
    return _epoch_train_metrics(run, meters)


def _fold(meters: Dict[str, float], pending: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Move the device-side loss sum and the AGC optimizer's clip counts into the
    (checkpointed) meters: one read of each, at log, save and epoch-end points only."""
    meters['loss_sum'] += float(pending)
    pending.zero_()
    optimizer = getattr(optimizer, '_base_optimizer', optimizer)  # timm's Lookahead wraps it
    if hasattr(optimizer, 'pop_clip_stats'):
        clipped, units = optimizer.pop_clip_stats()
        meters['clipped'] += clipped
        meters['units'] += units


def _lr(run: Run) -> float:
    lrs = [g['lr'] for g in run.parts.optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _clip_text(meters: Dict[str, float]) -> str:
    return f'clipped {100 * meters["clipped"] / meters["units"]:.1f}% ' if meters['units'] else ''


def _epoch_train_metrics(run: Run, meters: Dict[str, float]) -> Dict[str, float]:
    values = torch.tensor([meters['loss_sum'], meters['steps'], meters['clipped'], meters['units']],
                          dtype=torch.float64, device=run.dist.device)
    if run.dist.distributed:
        dist.all_reduce(values)
    loss_sum, steps, clipped, units = values.tolist()
    return {'train_loss': loss_sum / max(steps, 1), 'clip_fraction': clipped / units if units else None}


def _validate(run: Run) -> Dict[str, Any]:
    """Metrics of the epoch's summary row (the EMA's when there is one, like timm)."""
    if run.data.val is None:
        return {}
    metrics = evaluate(run.parts.module, run.data.val, run)
    row = {'eval_loss': metrics['loss'], 'eval_top1': metrics['top1'], 'eval_top5': metrics['top5']}
    if run.parts.ema is not None:
        ema = evaluate(run.parts.ema.module, run.data.val, run)
        row = {'eval_loss': ema['loss'], 'eval_top1': ema['top1'], 'eval_top5': ema['top5'],
               'model_eval_loss': metrics['loss'], 'model_eval_top1': metrics['top1'],
               'model_eval_top5': metrics['top5']}
    return row


def _update_best(run: Run, state: Dict[str, Any], row: Dict[str, Any]) -> float:
    """Track the best epoch by ``--eval-metric``; return this epoch's value (the plateau scheduler's metric)."""
    metric = run.cfg.eval_metric
    key = {'top1': 'eval_top1', 'top5': 'eval_top5', 'loss': 'eval_loss'}[metric]
    if key not in row:
        key, metric = 'train_loss', 'loss'
    value, best = row[key], state['best'].get('value')
    better = best is None or (value < best if metric == 'loss' else value > best)
    if better:
        state['best'] = {'value': value, 'epoch': row['epoch'], 'metric': key}
    return value


def _write_reports(run: Run, history: List[Dict[str, Any]]) -> None:
    if not run.dist.primary:
        return
    write_summary(history, run.run_dir / 'summary.csv')
    write_plot(history, run.run_dir / 'summary.png')


def train(run: Run) -> Dict[str, Any]:
    """The training loop; returns the final state (history, best, position).

    Continues ``run.resume`` when set (position, history, best and RNG states). Each epoch ends with
    validation, the checkpoints (``checkpoint-N``, ``last``, ``model_best``) and summary.csv and plot.

    Args:
        run: the prepared run, from ``setup.prepare``.

    Returns:
        The loop state: ``epoch``, ``step``, ``global_step``, ``history`` (one row per epoch),
        ``best`` (``value``, ``epoch``, ``metric``) and ``meters``.

    Raises:
        FloatingPointError: ``--nonfinite-limit`` steps in a row had a non-finite loss or gradient.
        Preempted: a rank got SIGTERM/SIGUSR1; every rank stopped after the same step, checkpoint written.
    """
    log = _Log(run.dist.primary)
    state = _restore(run)
    resumed, run.resume = run.resume is not None, None  # its tensors are loaded: free the copy
    # last.pth.tar becomes previous.pth.tar at the next save only when known good (resumed from, or
    # none yet): a damaged one that resume passed over must not replace the good fallback
    last = run.run_dir / 'last.pth.tar'
    state['last_good'] = not last.exists() or (resumed and run.resume_path is not None
                                               and Path(run.resume_path).resolve() == last.resolve())
    if resumed:
        log(f'resuming {run.resume_path} at epoch {state["epoch"]} step {state["step"]} '
            f'(global step {state["global_step"]})')
    if run.parts.scheduler is not None and resumed:
        # a fresh scheduler already holds its first lr; stepping it at epoch 0 would put a plateau
        # schedule without warmup at --warmup-lr for good (timm's train.py steps only on resume too)
        if state['epoch'] > 0:
            run.parts.scheduler.step(state['epoch'])
        if run.cfg.sched_on_updates and state['global_step'] > 0:
            run.parts.scheduler.step_update(state['global_step'])
    while state['epoch'] < run.data.num_epochs:
        t0 = time.time()
        row = {'epoch': state['epoch']}
        row.update(train_one_epoch(run, state, log))
        row.update(_validate(run))
        row['lr'] = _lr(run)
        state['history'].append(row)
        value = _update_best(run, state, row)
        state.update(epoch=state['epoch'] + 1, step=0, meters=_fresh_meters())
        if run.parts.scheduler is not None:
            run.parts.scheduler.step(state['epoch'], value)  # the metric only matters to --sched plateau
        _save(run, state, epoch_end=True)
        _write_reports(run, state['history'])
        log(_epoch_line(row, time.time() - t0))
    return state


def _epoch_line(row: Dict[str, Any], seconds: float) -> str:
    parts = [f'epoch {row["epoch"]}: train_loss {row["train_loss"]:.4f}']
    if 'eval_top1' in row:
        parts.append(f'eval_loss {row["eval_loss"]:.4f} top-1 {row["eval_top1"]:.2f}% top-5 {row["eval_top5"]:.2f}%')
    if row.get('clip_fraction') is not None:
        parts.append(f'clipped {100 * row["clip_fraction"]:.2f}% of units')
    parts.append(f'lr {row["lr"]:.4g} ({seconds:.1f} s)')
    return ', '.join(parts)
