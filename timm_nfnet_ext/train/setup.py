"""Everything ``timm-nfnet-train`` builds before its first step, and every check of its input.

``prepare`` validates names, numbers, folders, data and the checkpoint to resume, and builds
the model, EMA, optimizer (AGC with the paper's groups), scheduler, scaler and loaders from
timm's factories. It raises ``TrainError`` before anything is trained or a checkpoint written.
"""
from __future__ import annotations

import datetime
import importlib
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import random_seed

from ..variants import REFERENCE_PADDING
from ..weights.convert import missing_folders, remove_empty_folders
from . import checkpoint as ckpt_io
from .data import EpochSampler, build_datasets, build_loader
from .config import TrainConfig
from .recipe import TrainError
from .run import DistInfo, Run, RunData, RunRecord, TrainParts

__all__ = ['prepare', 'PaperEma', 'resolve_optimizer', 'build_optimizer', 'resolve_run_dir']


class PaperEma:
    """Mixin for timm's ``ModelEmaV3``: the reference warmup ``min(decay, (1 + t) / (10 + t))``."""

    def get_decay(self, step: Optional[int] = None) -> float:
        """The EMA decay at an update.

        Args:
            step: the update count (1 for the first); ``None``: no warmup.

        Returns:
            ``min(decay, (1 + t) / (10 + t))`` with ``t = step - 1``, or ``decay`` when ``step`` is None.
        """
        if step is None:
            return self.decay
        t = max(step - 1, 0)  # t counts updates from 0
        return min(self.decay, (1.0 + t) / (10.0 + t))


def _make_ema(model: nn.Module, cfg: TrainConfig) -> Optional[nn.Module]:
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3
    if cfg.model_ema_warmup == 'paper':
        cls = type('PaperModelEma', (PaperEma, ModelEmaV3), {})
        return cls(model, decay=cfg.model_ema_decay)
    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup == 'timm')


# --- optimizer -------------------------------------------------------------------------------
def resolve_optimizer(cfg: TrainConfig) -> Tuple[str, Optional[float], Dict[str, Any]]:
    """(timm optimizer name, AGC clipping or None, extra keywords) for ``--opt``/``--agc``.

    With ``--agc`` a plain optimizer becomes its AGC form (``sgd`` -> ``sgdagc``; one timm lacks is
    registered), with ``clipping`` and ``agc_eps`` among the keywords.

    Args:
        cfg: the settings (``opt``, ``opt_kwargs``, ``agc``, ``agc_eps``).

    Returns:
        ``(name, clipping, kwargs)``: the optimizer name for timm, the AGC clipping ratio (``None``
        without AGC) and the extra optimizer keywords.

    Raises:
        TrainError: an unknown optimizer; ``--agc`` not > 0, disagreeing with ``--opt-kwargs clipping=``,
            or given with a prefixed name (``lookahead_sgd``); an optimizer AGC cannot wrap here.
    """
    from timm.optim import get_optimizer_info, list_optimizers
    from .. import agc
    name = cfg.opt.lower()
    base = name.split('_')[-1]
    known = set(list_optimizers())
    if base not in known:
        raise TrainError(f'unknown optimizer {cfg.opt!r}; try sgd, momentum, adamw, lamb, sgdagc, adamwagc, '
                         'lambagc (timm.optim.list_optimizers() lists them all)')
    cls = get_optimizer_info(base).opt_class
    is_agc = isinstance(cls, type) and issubclass(cls, agc.AGCMixin)
    kwargs = dict(cfg.opt_kwargs)
    if cfg.agc is None:
        if is_agc:
            kwargs.setdefault('agc_eps', cfg.agc_eps)
        return name, kwargs.get('clipping', 0.01) if is_agc else None, kwargs
    if not cfg.agc > 0:
        raise TrainError(f'--agc must be a clipping ratio > 0 (the paper uses 0.01), got {cfg.agc}')
    if 'clipping' in kwargs and kwargs['clipping'] != cfg.agc:
        raise TrainError(f"--agc {cfg.agc} and --opt-kwargs clipping={kwargs['clipping']} disagree")
    if not is_agc:
        if name != base:
            raise TrainError(f'--agc wraps a plain optimizer name, not {cfg.opt!r}')
        name = 'sgdagc' if base in ('sgd', 'nesterov') else f'{base}agc'
        if name not in known:
            try:
                agc.register_agc_optimizer(name, base)
            except (TypeError, ValueError, RuntimeError, AssertionError, ImportError) as e:
                # timm asserts for optimizers this device or install lacks (APEX's fused* need CUDA)
                raise TrainError(f'cannot add AGC to optimizer {base!r}: {e}') from e
    kwargs.update(clipping=cfg.agc, agc_eps=cfg.agc_eps)
    return name, cfg.agc, kwargs


def build_optimizer(model: nn.Module, cfg: TrainConfig, name: str, clipping: Optional[float],
                    kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; AGC optimizers get the paper's parameter groups.

    Args:
        model: the model whose parameters are optimized.
        cfg: the settings (``lr`` resolved, ``weight_decay``, ``momentum``, ``opt_eps``, ``opt_betas``).
        name: the optimizer name, from :func:`resolve_optimizer`.
        clipping: the AGC clipping ratio, or ``None`` (no AGC parameter groups).
        kwargs: extra optimizer keywords, from :func:`resolve_optimizer`.

    Returns:
        The optimizer.

    Raises:
        TrainError: timm cannot create it (bad keywords, or it needs CUDA or a package missing here).
    """
    from timm.optim import create_optimizer_v2
    from ..agc import agc_param_groups
    extra = dict(kwargs)
    if cfg.opt_eps is not None:
        extra['eps'] = cfg.opt_eps
    if cfg.opt_betas is not None:
        extra['betas'] = tuple(cfg.opt_betas)
    try:
        return create_optimizer_v2(
            model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            param_group_fn=agc_param_groups if clipping is not None else None, **extra)
    except (TypeError, ValueError, AssertionError, ImportError, RuntimeError) as e:
        # timm asserts on optimizers this device or install lacks (fused*/bnb*: CUDA, bitsandbytes)
        raise TrainError(f'cannot create optimizer {name!r} with {extra}: {type(e).__name__}: {e}') from e


# --- output folder ---------------------------------------------------------------------------
def resolve_run_dir(cfg: TrainConfig, info: DistInfo) -> Tuple[Path, List[Path]]:
    """The folder of checkpoints and logs (created; must be writable; rank 0 names it), and the
    folders this call created, deepest first.

    The folder is ``--output`` (or the folder of the ``--resume`` file, or a new
    ``output/train/<date>-<model>``), then ``--experiment`` under it.

    Args:
        cfg: the settings (``output``, ``resume``, ``experiment``, ``model``).
        info: this process's place (rank 0's time stamp names a new folder on every rank).

    Returns:
        ``(run_dir, created)``: the folder, and the folders this call created (to remove on failure).

    Raises:
        TrainError: ``--resume auto`` without ``--output``; the folder cannot be created or written.
    """
    if cfg.output:
        run_dir = Path(cfg.output)
    elif cfg.resume and cfg.resume != 'auto':
        run_dir = Path(cfg.resume).parent
    elif cfg.resume == 'auto':
        raise TrainError('--resume auto needs --output: the run folder to continue')
    else:
        stamp = [datetime.datetime.now().strftime('%Y%m%d-%H%M%S')]
        if info.distributed:
            dist.broadcast_object_list(stamp, src=0)
        run_dir = Path('output') / 'train' / f'{stamp[0]}-{cfg.model}'
    if cfg.experiment:
        run_dir = run_dir / cfg.experiment
    created = missing_folders(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix='.probe-'):
            pass
    except OSError as e:
        remove_empty_folders(created)
        raise TrainError(f'output folder {str(run_dir)!r} cannot be created or written: {e}') from None
    return run_dir, created


def _check_numbers(cfg: TrainConfig, dist_info: DistInfo) -> None:
    checks = [
        (cfg.batch_size >= 1, f'--batch-size must be >= 1, got {cfg.batch_size}'),
        (cfg.epochs >= 1, f'--epochs must be >= 1, got {cfg.epochs}'),
        (cfg.grad_accum_steps >= 1, f'--grad-accum-steps must be >= 1, got {cfg.grad_accum_steps}'),
        (not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax) or cfg.batch_size % 2 == 0,
         f'--mixup/--cutmix/--cutmix-minmax need an even --batch-size, got {cfg.batch_size}'),
        (cfg.recovery_interval >= 0, '--recovery-interval must be >= 0'),
        (cfg.nonfinite_limit >= 1, f'--nonfinite-limit must be >= 1, got {cfg.nonfinite_limit}'),
        (0 <= cfg.seed < 2 ** 31, f'--seed must be in [0, 2**31), got {cfg.seed}'),  # numpy's seed range, with room for ranks
        (cfg.amp_dtype != 'float16' or not cfg.amp or dist_info.device.type == 'cuda',
         '--amp with float16 needs CUDA; on CPU use --amp-dtype bfloat16'),
        (not cfg.warmup_prefix or cfg.warmup_epochs < cfg.epochs,
         f'--warmup-prefix with {cfg.warmup_epochs} warmup epochs leaves nothing of {cfg.epochs} epochs'),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)


def _create_model(cfg: TrainConfig, num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
    import timm
    arch = dict(cfg.model_kwargs, num_classes=num_classes)
    kw = dict(arch)
    if cfg.drop is not None:
        kw['drop_rate'] = cfg.drop
    if cfg.drop_path is not None:
        kw['drop_path_rate'] = cfg.drop_path
    if cfg.pretrained_path:
        kw['pretrained_cfg_overlay'] = dict(file=cfg.pretrained_path)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained or bool(cfg.pretrained_path), **kw)
    except (TypeError, ValueError, RuntimeError, OSError) as e:
        raise TrainError(f'cannot create model {cfg.model!r} with {kw}: {e}') from e
    return model, arch


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
               has_val: bool) -> Tuple[Any, int]:
    from timm.scheduler import create_scheduler_v2
    epochs = cfg.epochs - (cfg.warmup_epochs if cfg.warmup_prefix else 0)
    try:
        sched, total = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=epochs, decay_epochs=cfg.decay_epochs,
            decay_milestones=cfg.decay_milestones, cooldown_epochs=cfg.cooldown_epochs,
            decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
            step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=steps_per_epoch,
            # the plateau metric is --eval-metric, or the training loss without a validation split
            plateau_mode='min' if cfg.eval_metric == 'loss' or not has_val else 'max')
    except (ValueError, AssertionError, TypeError) as e:
        raise TrainError(f'cannot create scheduler {cfg.sched!r}: {e}') from e
    return sched, total


_SCHEDULE_KEYS = ('sched', 'sched_on_updates', 'lr', 'min_lr', 'warmup_lr', 'epochs', 'warmup_epochs',
                  'warmup_prefix', 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate')


def _loss(cfg: TrainConfig, mixup_on: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_on:
        return SoftTargetCrossEntropy()
    if cfg.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def _mixup(cfg: TrainConfig, num_classes: int) -> Any:
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def _resume_source(cfg: TrainConfig, run_dir: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """Read (and check) the checkpoint to continue, or refuse to overwrite another run's files."""
    existing = ckpt_io.list_checkpoints(run_dir)
    if cfg.resume == 'auto':
        found = ckpt_io.find_latest(run_dir)
        return (found[0], found[1]) if found else (None, None)
    if cfg.resume:
        path = Path(cfg.resume)
        data = ckpt_io.load_checkpoint(path)
        foreign = [p for p in existing if p.resolve().parent != path.resolve().parent]
        if foreign:
            raise TrainError(f'output folder {str(run_dir)!r} holds checkpoints of another run '
                             f'({foreign[0].name}); resume into an empty --output or that run\'s own folder')
        return path, data
    if existing:
        raise TrainError(f'output folder {str(run_dir)!r} already holds checkpoints ({existing[0].name}); '
                         'pass --resume auto to continue that run, or choose another --output')
    return None, None


def _load_states(run: Run, data: Mapping[str, Any], path: Path) -> None:
    """Put the checkpoint's model, EMA, optimizer, scheduler and scaler states in place."""
    try:
        run.parts.module.load_state_dict(data['model'], strict=True)
        if run.parts.ema is not None:
            run.parts.ema.module.load_state_dict(data['ema'], strict=True)
        fresh_lrs = [g['lr'] for g in run.parts.optimizer.param_groups]
        run.parts.optimizer.load_state_dict(data['optimizer'])
        changed = _schedule_changes(data.get('schedule') or {}, run.record.schedule)
        if run.parts.scheduler is not None and not changed:
            run.parts.scheduler.load_state_dict(dict(data['scheduler']))
        elif run.parts.scheduler is not None:
            # the rebuilt schedule's own lr for the current position (train() steps it there when
            # past epoch 0), not the one the optimizer state brought from the old schedule
            for group, lr in zip(run.parts.optimizer.param_groups, fresh_lrs):
                group['lr'] = lr
            run.record.notes.append('the schedule changed since the checkpoint (' + ', '.join(changed) + '): a new '
                             'schedule is built and continued from the checkpoint\'s position (a plateau '
                             'schedule restarts its patience)')
        if data.get('scaler'):
            run.parts.scaler.load_state_dict(data['scaler'])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TrainError(f'checkpoint {str(path)!r} does not fit this model/optimizer: {first}') from None


def _schedule_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """``key old -> new`` for each schedule setting that differs."""
    return [f'{k} {before.get(k)!r} -> {v!r}' for k, v in now.items() if _as_list(before.get(k)) != _as_list(v)]


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def prepare(cfg: TrainConfig, dist_info: DistInfo) -> Run:
    """Check everything and build the run; ``TrainError`` names the first problem found.

    A resumed checkpoint's model, EMA, optimizer, scheduler and scaler states are loaded; its loop
    position and RNG states are left to ``train``. A start that fails removes the empty run folders
    it created.

    Args:
        cfg: the resolved settings (``cfg.lr`` is set here when ``None``).
        dist_info: this process's place, from :func:`init_distributed`.

    Returns:
        The prepared run.

    Raises:
        TrainError: a module of ``--device-modules`` that does not import; an unknown model or optimizer;
            a number out of range; an output folder that cannot be written or holds another run's
            checkpoints; data that cannot be read or is too small for one step; an unknown number of
            classes; a model, scheduler or optimizer timm cannot create; a checkpoint that is damaged
            or does not match this run.
    """
    import timm
    from .. import agc  # noqa: F401  (registers sgdagc / adamwagc / lambagc)
    from .. import models  # noqa: F401  (registers the models)
    for module in cfg.device_modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TrainError(f'--device-modules: cannot import {module!r}: {e}') from e
    if not timm.is_model(cfg.model):
        raise TrainError(f'unknown model {cfg.model!r}; NFNets: nfnet_f0..f7, nfnet_f0_plus..f7_plus, '
                         'nf_seresnextd_f0..f3, nf_seresnext50d, nf_seresnext101d (or any timm.list_models() name)')
    opt_name, clipping, opt_kwargs = resolve_optimizer(cfg)
    _check_numbers(cfg, dist_info)
    run_dir, created = resolve_run_dir(cfg, dist_info)
    try:
        return _build_run(cfg, dist_info, run_dir, opt_name, clipping, opt_kwargs)
    except BaseException:
        remove_empty_folders(created)  # a start that fails leaves no empty run folder behind
        raise


def _build_run(cfg: TrainConfig, dist_info: DistInfo, run_dir: Path, opt_name: str, clipping: Optional[float],
               opt_kwargs: Dict[str, Any]) -> Run:
    """Datasets, model, optimizer, schedule, loaders and the resumed states, in ``run_dir``."""
    resume_path, resume = _resume_source(cfg, run_dir)
    notes = [f'--resume auto: no checkpoint in {run_dir}, starting a new run'] if cfg.resume == 'auto' and not resume else []

    random_seed(cfg.seed)
    data = build_datasets(cfg, _default_cfg(cfg.model))
    num_classes = cfg.num_classes or data.num_classes
    if not num_classes:
        raise TrainError('cannot tell the number of classes of this dataset; pass --num-classes')
    data_classes = data.num_classes
    if data_classes and num_classes < data_classes:
        raise TrainError(f'--num-classes {num_classes} is fewer than the {data_classes} classes of the dataset')
    model, arch = _create_model(cfg, num_classes)
    device = dist_info.device
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = _make_ema(model, cfg)

    world, accum = dist_info.world_size, cfg.grad_accum_steps
    # the reference pipeline decodes 2B images for a batch of B (its collate mixes them pairwise)
    sampler = EpochSampler(len(data.train), cfg.batch_size * (2 if data.collate is not None else 1),
                           rank=dist_info.rank, world_size=world, seed=cfg.seed, accum_steps=accum, reads=data.reads)
    steps = sampler.micro_batches // accum
    if steps < 1:
        raise TrainError(f'{len(data.train)} training images cannot fill one step of global batch '
                         f'{cfg.batch_size * world * accum}; lower --batch-size or --grad-accum-steps')
    global_batch = cfg.batch_size * world * accum
    if cfg.lr is None:
        cfg.lr = _lr_from_base(cfg, global_batch)
    optimizer = build_optimizer(model, cfg, opt_name, clipping, opt_kwargs)
    scheduler, num_epochs = _scheduler(optimizer, cfg, steps, has_val=data.val is not None)
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == 'bfloat16' else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype == torch.float16)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if cfg.amp else nullcontext()

    mixup = _mixup(cfg, num_classes) if data.collate is None else None  # (the reference pipeline mixes in its collate)
    val_loader = None
    if data.val is not None:
        val_sampler = EpochSampler(len(data.val), cfg.validation_batch_size or cfg.batch_size,
                                   rank=dist_info.rank, world_size=world, shuffle=False)
        val_loader = build_loader(data.val, val_sampler, cfg, device)
    identity = dict(model=cfg.model, model_args=arch, num_classes=num_classes, opt=opt_name, agc=clipping,
                    model_ema=bool(cfg.model_ema), data_pipeline=cfg.data_pipeline, global_batch=global_batch,
                    world_size=world)
    derived = dict(run_dir=str(run_dir), device=str(device), world_size=world, global_batch=global_batch,
                   lr=cfg.lr, optimizer=f'{type(optimizer).__name__} ({opt_name})', agc_clipping=clipping,
                   param_groups=_describe_groups(optimizer), num_classes=num_classes,
                   input_size=list(data.data_config['input_size']), dataset=data.name,
                   train_images=len(data.train), val_images=len(data.val) if data.val is not None else 0,
                   validation=_describe_validation(data.data_config) if data.val is not None else 'none',
                   steps_per_epoch=steps, total_epochs=num_epochs)
    parts = TrainParts(model=model, module=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       autocast=autocast, mixup=mixup, loss=_loss(cfg, mixup is not None or data.collate is not None))
    loaders = RunData(train=build_loader(data.train, sampler, cfg, device, data.collate), sampler=sampler,
                      val=val_loader, steps_per_epoch=steps, num_epochs=num_epochs)
    record = RunRecord(identity=identity, derived=derived, data_config=data.data_config, arch_kwargs=arch,
                       schedule={k: getattr(cfg, k) for k in _SCHEDULE_KEYS} | {'steps_per_epoch': steps},
                       num_classes=num_classes, notes=notes)
    run = Run(cfg=cfg, dist=dist_info, run_dir=run_dir, parts=parts, data=loaders, record=record, resume=resume,
              resume_path=resume_path)
    if resume is not None:
        ckpt_io.check_compatible(resume, identity, str(resume_path))
        _load_states(run, resume, resume_path)
    random_seed(cfg.seed, dist_info.rank)
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel
        run.parts.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    return run


def _describe_validation(cfg: Dict[str, Any]) -> str:
    """Which eval pipeline validates, in words (printed and saved with the settings)."""
    size = cfg['val_input_size'][-1]
    if cfg['val_preprocess'] == 'reference':
        return (f"reference (DeepMind's eval pipeline: TF bicubic to {size + REFERENCE_PADDING} px, centre crop "
                f'{size}, unclamped)')
    return f"timm (create_transform: {cfg['interpolation']}, crop_pct {cfg['val_crop_pct']:.4f}, {size} px)"


def _default_cfg(model_name: str) -> Dict[str, Any]:
    """The model's default pretrained cfg (input size, mean/std...) without building the model."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    return cfg.to_dict() if cfg is not None else {}


def _lr_from_base(cfg: TrainConfig, global_batch: int) -> float:
    """timm's rule: ``lr_base * (global_batch / lr_base_size)`` (square root for ada*/lamb)."""
    ratio = global_batch / cfg.lr_base_size
    scale = cfg.lr_base_scale or ('sqrt' if any(o in cfg.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return cfg.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _describe_groups(optimizer: torch.optim.Optimizer) -> List[str]:
    return [f"{len(g['params'])} tensors: wd {g.get('weight_decay')}, clipping {g.get('clipping', 'n/a')}"
            for g in optimizer.param_groups]
