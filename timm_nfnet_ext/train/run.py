"""A prepared training run: its processes (``DistInfo``, ``init_distributed``) and what the loop
needs (``Run``: the settings, the run folder, and the trained parts, loaders and record)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import EpochSampler
from .recipe import TrainError

__all__ = ['DistInfo', 'init_distributed', 'TrainParts', 'RunData', 'RunRecord', 'Run']


@dataclass
class DistInfo:
    """This process's place in a (possibly 1-process) run.

    Attributes:
        rank: this process's rank (0 without distribution).
        world_size: the number of processes.
        device: the device this process trains on.
    """
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        """Whether the run has more than one process."""
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        """Whether this is rank 0 (the process that logs and writes files)."""
        return self.rank == 0


def init_distributed(device: Optional[str]) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); else 1 process.

    Args:
        device: ``--device`` (``'cuda'``, ``'cpu'``...); ``None`` picks CUDA when available.

    Returns:
        This process's rank, world size and device (``cuda:LOCAL_RANK`` under torchrun on CUDA).

    Raises:
        TrainError: a CUDA device asked for where CUDA is not available.
        RuntimeError: under torchrun, rank 0 did not publish its store within the collective timeout.
    """
    kind = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if kind.startswith('cuda') and not torch.cuda.is_available():
        raise TrainError(f'--device {kind}: CUDA is not available here (use --device cpu)')
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return DistInfo(0, 1, torch.device(kind))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if kind.startswith('cuda'):
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
    else:
        dev = torch.device(kind)
    if not dist.is_initialized():
        # a store of this attempt's own under torchrun (an elastic restart must not read the killed
        # attempt's keys), and a finite timeout: a lost peer is an error, not a 30-minute wait
        from .elastic import process_group_store, process_group_timeout
        rank, timeout = int(os.environ.get('RANK', '0')), process_group_timeout()
        store = process_group_store(rank, world, timeout)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', timeout=timeout,
                                **(dict(store=store, rank=rank, world_size=world) if store is not None else {}))
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev)


@dataclass
class TrainParts:
    """What is trained and how: the model (DDP-wrapped when distributed), the model itself, its
    EMA, the optimizer, schedule, gradient scaler, autocast context, timm's Mixup (None with the
    reference pipeline, which mixes in its collate, or without mixing) and the training loss.

    Attributes:
        model: the model trained (DDP-wrapped when distributed).
        module: the model itself (its state dict is the checkpoint's).
        ema: timm's ``ModelEmaV3`` of the weights, or ``None``.
        optimizer: the optimizer.
        scheduler: timm's scheduler, or ``None``.
        scaler: the gradient scaler (enabled with float16 autocast only).
        autocast: returns the forward's autocast context (a null context without ``--amp``).
        mixup: timm's ``Mixup``, or ``None``.
        loss: the training loss.
    """
    model: nn.Module
    module: nn.Module
    ema: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    mixup: Optional[Callable[..., Any]]
    loss: nn.Module


@dataclass
class RunData:
    """The loaders: training (driven by ``sampler``) and validation, and the epoch's length.

    Attributes:
        train: the training loader.
        sampler: its sampler (``set_epoch`` positions it).
        val: the validation loader, or ``None``.
        steps_per_epoch: optimizer steps per epoch.
        num_epochs: epochs the loop runs: timm's schedule length (``--epochs`` plus ``--cooldown-epochs``).
    """
    train: DataLoader
    sampler: EpochSampler
    val: Optional[DataLoader]
    steps_per_epoch: int
    num_epochs: int


@dataclass
class RunRecord:
    """What the run records about itself: the identity a resumed checkpoint must match, the
    derived settings, the data config, the architecture keywords, the schedule, notes.

    Attributes:
        identity: what a checkpoint to resume must match (``checkpoint.check_compatible``).
        derived: settings derived at set-up (run folder, global batch, lr...), shown and saved.
        data_config: timm's resolved data config, plus this command's validation keys.
        arch_kwargs: the ``create_model`` keywords that define the architecture.
        schedule: the schedule's settings (a change since the checkpoint rebuilds it on resume).
        num_classes: the classifier's classes.
        notes: notes for the start-up log.
    """
    identity: Dict[str, Any]
    derived: Dict[str, Any]
    data_config: Dict[str, Any]
    arch_kwargs: Dict[str, Any]
    schedule: Dict[str, Any]
    num_classes: int
    notes: List[str] = field(default_factory=list)


@dataclass
class Run:
    """A prepared run: its settings, processes and folder, and the three parts above; ``resume``
    is the checkpoint it continues (read, not yet applied), ``resume_path`` its file.

    Attributes:
        cfg: the settings (``lr`` resolved).
        dist: this process's place.
        run_dir: the folder of checkpoints and logs.
        parts: the model, optimizer, schedule and loss.
        data: the loaders.
        record: what the run records about itself.
        resume: the checkpoint continued, or ``None`` (``train`` drops it once its states are loaded).
        resume_path: its file, or ``None``.
    """
    cfg: TrainConfig
    dist: DistInfo
    run_dir: Path
    parts: TrainParts
    data: RunData
    record: RunRecord
    resume: Optional[Dict[str, Any]] = None
    resume_path: Optional[Path] = None
