"""Command line and recipes of ``timm-nfnet-train``.

The flags keep the names of timm's ``train.py`` for what this command supports. A recipe
(``--recipe paper`` or ``--recipe quickstart``) fills in a set of values; any flag given on
the command line wins over the recipe, and the recipe wins over the defaults. Every resolved
value is returned with where it came from (``cli``, ``recipe <name>`` or ``default``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import KwargsAction, TrainConfig, TrainError, config_flags, parse_kwargs

__all__ = ['build_parser', 'resolve_settings', 'paper_recipe', 'quickstart_recipe', 'RECIPES',
           'TrainError', 'parse_kwargs', 'KwargsAction']


DEFAULTS: Dict[str, Any] = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                            for f in dataclasses.fields(TrainConfig)}

# the first field of each --help section
_SECTIONS = {'recipe': 'recipe', 'data_dir': 'data', 'model': 'model', 'device': 'device and precision',
             'opt': 'optimizer', 'sched': 'learning rate schedule', 'data_pipeline': 'augmentation and regularisation',
             'model_ema': 'EMA of the weights', 'seed': 'run, checkpoints, logging'}


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-nfnet-train`` argument parser (timm ``train.py`` flag names).

    Made from the :class:`TrainConfig` fields, one group per ``--help`` section, plus ``--quickstart``,
    the positional ``DIR`` and ``--no-export``. Every default is ``argparse.SUPPRESS``, so the parsed
    namespace holds only what the command line gave (:func:`resolve_settings` fills in the rest).

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(
        prog='timm-nfnet-train',
        description='Train NFNets (or any timm model) the timm way, with adaptive gradient clipping, '
                    'torch.distributed and crash-safe resume. With no arguments: the quick start.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n'
               '  timm-nfnet-train --quickstart\n'
               '  timm-nfnet-train --data-dir /data/imagenet --model nfnet_f0 --recipe paper -b 128\n'
               '  torchrun --nproc_per_node 8 -m timm_nfnet_ext.train --data-dir DIR --recipe paper\n'
               '  timm-nfnet-train --data-dir DIR --model nfnet_f1 --opt adamw --lr 1e-3 --agc 0.02\n'
               '  timm-nfnet-train ... --output runs/f0 --resume auto   # continue where it stopped')
    g = p
    for f, kwargs in config_flags():
        if f.name in _SECTIONS:
            g = p.add_argument_group(_SECTIONS[f.name])
        if f.name == 'recipe':
            g.add_argument('--quickstart', action='store_true', default=argparse.SUPPRESS,
                           help='same as --recipe quickstart')
        if f.name == 'data_dir':
            g.add_argument('data', nargs='?', metavar='DIR', default=argparse.SUPPRESS,
                           help='dataset folder (same as --data-dir)')
        help_ = kwargs.pop('help', None)
        if help_ is not None and DEFAULTS[f.name] not in (None, False, '', [], {}):
            help_ += f' (default: {DEFAULTS[f.name]})'
        # absent unless given, so that a recipe can tell what the command line set
        g.add_argument(*f.metadata['flags'], dest=f.name, default=argparse.SUPPRESS, help=help_, **kwargs)
    g.add_argument('--no-export', dest='export', action='store_const', const=None, default=argparse.SUPPRESS,
                   help='no export (turns off the quick start\'s)')
    return p


# --- recipes ---------------------------------------------------------------------------------

def paper_recipe(model: str) -> Tuple[Dict[str, Any], List[str]]:
    """DeepMind's NFNet training settings for ``model`` (NFNETS.md), and notes about them.

    The learning rate is left to the batch rule: ``0.1 * global_batch / 256`` (--lr-base 0.1,
    --lr-base-size 256, linear). Resolution, RandAugment level and dropout follow the variant.
    Training data goes through the reference pipeline (``--data-pipeline reference``); ``aa`` and
    ``cutmix`` are the closest timm settings, used with ``--data-pipeline timm``.

    Args:
        model: the timm model name; a model that is not an F0..F7 variant gets F0's augmentation level.

    Returns:
        ``(settings, notes)``: :class:`TrainConfig` field values, and notes for the start-up log.
    """
    from ..models import MODEL_CFGS
    from ..variants import F_VARIANTS, variant_of
    notes: List[str] = []
    variant = variant_of(model)
    if variant is None:
        notes.append(f'{model} is not an F0..F7 variant: using F0\'s augmentation level and '
                     f'{"its own dropout" if model in MODEL_CFGS else "the model default dropout"}')
    level = (variant or F_VARIANTS[0]).randaug_magnitude
    recipe: Dict[str, Any] = dict(
        opt='sgd', momentum=0.9, weight_decay=2e-5, agc=0.01, agc_eps=1e-3,
        lr=None, lr_base=0.1, lr_base_size=256, lr_base_scale='linear',
        sched='cosine', sched_on_updates=True, warmup_epochs=5, warmup_lr=0.0, warmup_prefix=True,
        min_lr=0.0, epochs=360, smoothing=0.1,
        model_ema=True, model_ema_decay=0.99999, model_ema_warmup='paper',
        mixup=0.2, cutmix=1.0, aa=f'rand-n4-m{level}-mmax{max(10, level)}',
        drop_path=0.25, amp=True, amp_dtype='bfloat16', val_preprocess='reference',
        data_pipeline='reference', randaug_magnitude=level,
    )
    if model in MODEL_CFGS:
        recipe['drop'] = MODEL_CFGS[model].drop_rate
    if variant is not None:
        recipe['img_size'] = variant.train_size
    return recipe, notes


def quickstart_recipe(model: str) -> Tuple[Dict[str, Any], List[str]]:
    """A tiny NFNet with AGC on the built-in digits, a run of minutes on a CPU (its accuracy: docs/training.md).

    Args:
        model: ignored (the recipe sets its own ``nfnet_f0``); the signature of every recipe.

    Returns:
        ``(settings, notes)``: :class:`TrainConfig` field values and an empty list of notes.
    """
    recipe: Dict[str, Any] = dict(
        dataset='digits', model='nfnet_f0',
        model_kwargs=dict(widths=(32, 64, 128, 128), depths=(1, 1, 1, 1), group_width=16),
        img_size=32, batch_size=64, epochs=6, opt='sgd', agc=0.04, momentum=0.9, weight_decay=5e-5,
        lr=0.1, sched='cosine', sched_on_updates=True, warmup_epochs=1, warmup_lr=0.0, warmup_prefix=True,
        smoothing=0.1, scale=[0.7, 1.0], ratio=[0.85, 1.18], hflip=0.0, color_jitter=0.0,
        interpolation='bilinear', train_interpolation='bilinear', crop_pct=1.0, drop=0.0,
        workers=0, export='', log_interval=10,
    )
    return recipe, []


RECIPES = {'paper': paper_recipe, 'quickstart': quickstart_recipe}


def resolve_settings(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, Dict[str, str], List[str]]:
    """Parse ``argv``; returns (settings, source of each setting, notes).

    No arguments at all means the quick start. Precedence: command line > recipe > default.

    Args:
        argv: the command-line words; ``None`` reads ``sys.argv[1:]``.

    Returns:
        ``(config, sources, notes)``: the resolved :class:`TrainConfig`; for each setting where it came
        from (``'cli'``, ``'recipe <name>'`` or ``'default'``); the recipe's notes.

    Raises:
        TrainError: ``--quickstart`` with another ``--recipe``; a positional ``DIR`` and a different
            ``--data-dir``; ``clipping=`` / ``agc_eps=`` in ``--opt-kwargs`` not a number > 0, or not
            equal to ``--agc`` / ``--agc-eps``.
        SystemExit: from argparse, on ``--help`` or a flag it cannot parse (exit code 2).
    """
    parser = build_parser()
    argv = list(argv) if argv is not None else None
    given = vars(parser.parse_args(argv))
    if argv is not None and not argv or argv is None and not _sys_argv():
        given['recipe'] = 'quickstart'
    if given.pop('quickstart', False):
        if given.get('recipe', 'quickstart') != 'quickstart':
            raise TrainError(f"--quickstart and --recipe {given['recipe']} contradict each other")
        given['recipe'] = 'quickstart'
    if 'data' in given:
        if 'data_dir' in given and given['data_dir'] != given['data']:
            raise TrainError(f"two data folders given: {given['data']!r} and --data-dir {given['data_dir']!r}")
        given['data_dir'] = given.pop('data')
    recipe_name = given.get('recipe')
    recipe, notes = RECIPES[recipe_name](given.get('model', 'nfnet_f0')) if recipe_name else ({}, [])
    if 'data_dir' in given and 'dataset' not in given:
        recipe.pop('dataset', None)  # your folder, not the recipe's built-in data
    _agc_from_opt_kwargs(given)
    settings: Dict[str, Any] = {**DEFAULTS, **recipe, **given}
    sources = {k: 'cli' if k in given else f'recipe {recipe_name}' if k in recipe else 'default'
               for k in settings}
    settings.pop('quickstart', None)
    sources.pop('quickstart', None)
    cfg = TrainConfig.from_settings(settings)
    return cfg, sources, notes + _unused_by_the_pipeline(cfg, sources)


# flags of timm's input pipeline (create_transform, Mixup) that DeepMind's does not read
_TIMM_PIPELINE_FLAGS = ('no_aug', 'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'aa', 'reprob', 'remode', 'recount',
                        'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch',
                        'train_interpolation')


def _unused_by_the_pipeline(cfg: TrainConfig, sources: Dict[str, str]) -> List[str]:
    """A note naming the command line's flags that the reference input pipeline does not use."""
    if cfg.data_pipeline != 'reference':
        return []
    given = ['--' + k.replace('_', '-') for k in _TIMM_PIPELINE_FLAGS if sources.get(k) == 'cli']
    if not given:
        return []
    return [f'{", ".join(given)}: flags of timm\'s input pipeline, not used by --data-pipeline reference '
            '(DeepMind\'s pipeline: docs/data.md; --data-pipeline timm uses them)']


def _agc_from_opt_kwargs(given: Dict[str, Any]) -> None:
    """``clipping=`` / ``agc_eps=`` in ``--opt-kwargs`` are ``--agc`` / ``--agc-eps`` given another
    way: they replace a recipe's values (and wrap a plain optimizer with AGC, as ``--agc`` does)."""
    opt_kwargs = given.get('opt_kwargs', {})
    for key, dest, flag in (('clipping', 'agc', '--agc'), ('agc_eps', 'agc_eps', '--agc-eps')):
        if key not in opt_kwargs:
            continue
        value = opt_kwargs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise TrainError(f'--opt-kwargs {key}={value!r}: must be a number > 0')
        if dest in given and given[dest] != value:
            raise TrainError(f'{flag} {given[dest]} and --opt-kwargs {key}={value} disagree')
        given[dest] = value


def _sys_argv() -> List[str]:
    import sys
    return sys.argv[1:]
