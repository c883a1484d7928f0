"""``timm-nfnet-train``: timm's training flags, AGC, the paper's recipe, DDP and exact resume.

- ``recipe.py``: the command line (timm's flag names), the recipes and the resolved settings;
- ``run.py``: the processes (``init_distributed``) and the prepared run (``Run``);
- ``setup.py``: the checks and the build: model, optimizer, schedule, EMA, loaders, resume;
- ``data.py``: datasets, transforms and the resumable distributed sampler;
- ``loop.py``: the training loop, evaluation and checkpoints;
- ``cli.py``: the command (``main``), its report and the export;
- ``elastic.py``: what a cluster needs: per-attempt stores under torchrun, stop requests, exit codes;
- ``checkpoint.py``: training checkpoints (atomic, pruned, RNG states);
- ``report.py``: the settings and summary files and the curves plot.
"""
from .cli import main
from .loop import train, weights_fingerprint
from .recipe import TrainError, build_parser, resolve_settings

__all__ = ['main', 'train', 'weights_fingerprint', 'TrainError', 'build_parser', 'resolve_settings']
