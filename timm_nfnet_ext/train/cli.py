"""``timm-nfnet-train``: train NFNets the timm way, with AGC, DDP and crash-safe resume.

    timm-nfnet-train --quickstart                      # tiny NFNet + AGC on the built-in digits
    timm-nfnet-train --data-dir DIR --model nfnet_f0 --recipe paper -b 128 --output runs/f0
    torchrun --nproc_per_node 8 -m timm_nfnet_ext.train --data-dir DIR --recipe paper --output runs/f0
    timm-nfnet-train ... --output runs/f0 --resume auto

The command: settings (``recipe.py``), set-up (``setup.py``), the loop (``loop.py``), the
report of the run and the export at the end.

Exit codes: 0 done; 3 diverged (``--nonfinite-limit`` non-finite steps in a row); 2 refused
before training (bad input); 75 preempted (SIGTERM or SIGUSR1: every rank finished the same
step and a checkpoint was written; start again with ``--resume auto``).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.distributed as dist

from ..logs import command_output
from . import checkpoint as ckpt_io
from .data import EpochSampler, build_loader
from .elastic import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, release_store
from .loop import STOP_REQUEST, Preempted, evaluate, gather_objects, train, weights_fingerprint
from .recipe import TrainError, resolve_settings
from .report import format_settings, settings_yaml
from .run import DistInfo, Run, init_distributed
from .setup import prepare

__all__ = ['main', 'export_and_reload']

_logger = logging.getLogger(__name__)


# --- export ----------------------------------------------------------------------------------
def export_and_reload(run: Run) -> Dict[str, Any]:
    """Write the best weights as model.safetensors + config.json, reload them through timm's
    pretrained path, and measure the reloaded model on the validation split.

    The weights are ``model_best.pth.tar``'s (else ``last.pth.tar``'s), the EMA's when the run kept
    one. The folder is ``--export`` or ``<run>/export``. The evaluation runs in this process alone.

    Args:
        run: the finished run (its settings, folder, data config and validation loader).

    Returns:
        ``{'export_dir': str}``, plus ``loss``, ``top1`` and ``top5`` (%) of the reloaded model when
        the run has a validation split.

    Raises:
        TrainError: the checkpoint to export is missing, damaged or not this command's.
    """
    import timm
    from ..weights.convert import pretrained_cfg_for_data, save_model_folder
    best = run.run_dir / 'model_best.pth.tar'
    data = ckpt_io.load_checkpoint(best if best.is_file() else run.run_dir / 'last.pth.tar')
    weights = data['ema'] if data.get('ema') is not None else data['model']
    model = timm.create_model(run.cfg.model, **run.record.arch_kwargs)
    model.load_state_dict(weights, strict=True)
    data, size = run.record.data_config, run.record.data_config['input_size']
    # the test size and crop are the ones validation used (the reference's S / (S + 32) with it)
    test_size, test_crop = data.get('val_input_size', size), data.get('val_crop_pct', data['crop_pct'])
    model.pretrained_cfg = pretrained_cfg_for_data(
        model, size, test_size, data['crop_pct'], test_crop, mean=data['mean'], std=data['std'],
        interpolation=data['interpolation'], hf_hub_id=None, tag=None, origin_url=None)
    out = Path(run.cfg.export) if run.cfg.export else run.run_dir / 'export'
    save_model_folder(model, out, metadata={'trained_with': 'timm-nfnet-train'})
    # timm's own pretrained path: the architecture and its arguments come from config.json
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    result: Dict[str, Any] = {'export_dir': str(out)}
    if run.data.val is not None:
        single = _single_process(run)
        loader = build_loader(run.data.val.dataset.dataset, EpochSampler(
            len(run.data.val.dataset), run.data.val.batch_size, shuffle=False), run.cfg, run.dist.device)
        result.update(evaluate(reloaded.to(run.dist.device), loader, single))
    return result


def _single_process(run: Run) -> Run:
    """``run`` seen as a single process (for evaluating on one rank)."""
    return dataclasses.replace(run, dist=DistInfo(0, 1, run.dist.device))


# --- command ---------------------------------------------------------------------------------
def _announce(run: Run, sources: Dict[str, str], notes: Sequence[str]) -> None:
    settings = run.cfg.to_dict()
    text = format_settings(settings, sources, run.record.derived)
    ckpt_io.write_text_atomic(settings_yaml(settings, sources, run.record.derived), run.run_dir / 'args.yaml')
    _logger.info(f'timm-nfnet-train: {run.cfg.model} on {run.record.derived["dataset"]}, run folder {run.run_dir}')
    _logger.info(text)
    for note in notes:
        _logger.info(f'note: {note}')
    _logger.info(f'resolved settings saved to {run.run_dir / "args.yaml"}')


def _finish(run: Run, state: Dict[str, Any]) -> None:
    if run.dist.distributed:
        prints = gather_objects(weights_fingerprint(run.parts.module), run.dist)
        if run.dist.primary:
            same = len(set(prints)) == 1
            for rank, fp in enumerate(prints):
                _logger.info(f'rank {rank} weights sha256 {fp}')
            _logger.info(f'DDP check: weights {"identical" if same else "DIFFERENT"} on all {len(prints)} ranks')
    if not run.dist.primary:
        return
    best = state['best']
    where = run.run_dir / ('model_best.pth.tar' if (run.run_dir / 'model_best.pth.tar').is_file() else 'last.pth.tar')
    if best.get('metric') == 'eval_top1':
        _logger.info(f'best top-1 {best["value"]:.2f}% at epoch {best["epoch"]}; checkpoint {where}')
    else:
        _logger.info(f'best {best.get("metric")} {best.get("value", float("nan")):.4f} at epoch {best.get("epoch")}; '
                     f'checkpoint {where}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``timm-nfnet-train`` / ``python -m timm_nfnet_ext.train``.

    Resolves the settings, prepares and trains the run, then reports it and exports it when asked.
    SIGTERM / SIGUSR1 handlers are installed for the call (and the previous ones put back after).

    Args:
        argv: the command-line words; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 done, 3 diverged (``EXIT_DIVERGED``), 2 bad input (``EXIT_BAD_INPUT``: a
        :class:`TrainError`, printed to stderr), 75 preempted (``EXIT_PREEMPTED``: checkpoint written).

    Raises:
        SystemExit: from argparse, on ``--help`` or a flag it cannot parse.
    """
    STOP_REQUEST.signal = None
    STOP_REQUEST.install()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75
    try:
        with command_output():
            return _main(argv)
    finally:
        STOP_REQUEST.uninstall()


def _main(argv: Optional[Sequence[str]]) -> int:
    run = None
    try:
        cfg, sources, notes = resolve_settings(argv)
        info = init_distributed(cfg.device)
        run = prepare(cfg, info)
        if info.primary:
            _announce(run, sources, notes + run.record.notes)
            ckpt_io.remove_stale_temps(run.run_dir)
    except TrainError as e:
        print(f'timm-nfnet-train: error: {e}', file=sys.stderr)
        _shutdown(barrier=False)
        return EXIT_BAD_INPUT
    try:
        state = train(run)
    except FloatingPointError as e:
        print(f'timm-nfnet-train: error: training diverged: {e}', file=sys.stderr)
        _shutdown(barrier=False)
        return EXIT_DIVERGED
    except Preempted as e:
        print(f'timm-nfnet-train: stopped on {e}: checkpoint written, exit code {EXIT_PREEMPTED}; '
              'start again with --resume auto', file=sys.stderr)
        _shutdown()
        return EXIT_PREEMPTED
    _finish(run, state)
    _shutdown()  # before the export: other ranks must not wait on it past the collective timeout
    if run.cfg.export is not None and run.dist.primary:
        result = export_and_reload(run)
        if 'top1' in result:
            _logger.info(f'exported {result["export_dir"]}/model.safetensors + config.json; reloaded through timm: '
                  f'validation top-1 {result["top1"]:.2f}%, top-5 {result["top5"]:.2f}%')
        else:
            _logger.info(f'exported {result["export_dir"]}/model.safetensors + config.json')
    return 0


def _shutdown(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
            release_store(dist.get_rank(), dist.get_world_size())
        dist.destroy_process_group()

