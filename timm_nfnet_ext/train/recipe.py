"""Command line and recipes of ``timm-nfnet-train``.

The flags keep the names of timm's ``train.py`` for what this command supports. A recipe
(``--recipe paper`` or ``--recipe quickstart``) fills in a set of values; any flag given on
the command line wins over the recipe, and the recipe wins over the defaults. Every resolved
value is returned with where it came from (``cli``, ``recipe <name>`` or ``default``).
"""
from __future__ import annotations

import argparse
import ast
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['build_parser', 'resolve_settings', 'paper_recipe', 'quickstart_recipe', 'RECIPES',
           'TrainError', 'parse_kwargs', 'KwargsAction']


class TrainError(ValueError):
    """A problem with the command's input, reported before any training step."""


DEFAULTS: Dict[str, Any] = {}


def parse_kwargs(values: Sequence[str], flag: str = '--opt-kwargs') -> Dict[str, Any]:
    """``key=value`` words into a dict; values are Python literals, else strings (timm's rule)."""
    out: Dict[str, Any] = {}
    for word in values:
        if not word:
            continue
        if '=' not in word:
            raise TrainError(f'{flag} expects key=value words, got {word!r}')
        key, value = word.split('=', 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


class KwargsAction(argparse.Action):
    """``--flag key=value ...`` parsed into a dict by :func:`parse_kwargs` (timm's ParseKwargs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_kwargs(values, option_string))
        except TrainError as e:
            parser.error(str(e))


def _add(group: Any, *flags: str, default: Any = None, **kwargs: Any) -> None:
    """Add a flag whose value is absent unless given (so recipes can tell), default noted."""
    action = group.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
    DEFAULTS[action.dest] = default
    if default not in (None, False, '') and action.help and action.help != argparse.SUPPRESS:
        action.help += f' (default: {default})'


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-nfnet-train`` argument parser (timm ``train.py`` flag names)."""
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
    g = p.add_argument_group('recipe')
    _add(g, '--recipe', choices=sorted(RECIPES), help="preset: 'paper' (DeepMind's NFNet recipe for "
         "the chosen variant) or 'quickstart' (tiny NFNet on the built-in digits)")
    _add(g, '--quickstart', action='store_true', default=False, help='same as --recipe quickstart')

    g = p.add_argument_group('data')
    g.add_argument('data', nargs='?', metavar='DIR', default=argparse.SUPPRESS,
                   help='dataset folder (same as --data-dir)')
    _add(g, '--data-dir', metavar='DIR', help='ImageFolder root with train/ and validation/ (or val/) '
         'subfolders, or the root for --dataset')
    _add(g, '--dataset', metavar='NAME', default='', help="'digits' (built in, no download; the default "
         "when no data is given), '' for an ImageFolder, or a timm scheme: torch/NAME, hfds/NAME, tfds/NAME, wds/NAME")
    _add(g, '--train-split', metavar='NAME', default='train', help='training split')
    _add(g, '--val-split', metavar='NAME', default='validation', help="validation split ('' for none)")
    _add(g, '--dataset-download', action=argparse.BooleanOptionalAction, default=False,
         help='let timm download torch/ datasets')
    _add(g, '--class-map', metavar='FILE', default='', help='class map file for ImageFolder datasets')

    g = p.add_argument_group('model')
    _add(g, '--model', metavar='NAME', default='nfnet_f0', help='timm model name')
    _add(g, '--pretrained', action=argparse.BooleanOptionalAction, default=False, help='start from pretrained weights')
    _add(g, '--pretrained-path', metavar='FILE', help='local weights file for --pretrained '
         '(e.g. the model.safetensors of timm-nfnet-convert)')
    _add(g, '--num-classes', type=int, metavar='N', help='classes (default: from the dataset)')
    _add(g, '--model-kwargs', nargs='*', action=KwargsAction, default={},
         help='create_model keywords, e.g. widths="(32,64,96,96)" depths="(1,1,1,1)" group_width=16')
    _add(g, '--img-size', type=int, metavar='N', help='square input size (default: the model\'s)')
    _add(g, '--input-size', type=int, nargs=3, metavar='N', help='C H W input size')
    _add(g, '--crop-pct', type=float, help='validation centre crop fraction')
    _add(g, '--mean', type=float, nargs='+', help='normalisation mean')
    _add(g, '--std', type=float, nargs='+', help='normalisation std')
    _add(g, '--interpolation', default='', help='resize interpolation (default: the model\'s)')
    _add(g, '--val-preprocess', choices=('reference', 'timm'), default='timm',
         help="validation preprocessing: 'reference' (DeepMind's eval pipeline: resize to S+32 with "
              "TF's bicubic, crop S; the paper recipe's) or 'timm' (create_transform)")
    _add(g, '--val-img-size', type=int, metavar='N', help='reference validation crop size S (default: '
         "the model's test size when training at its train size, else the training size)")
    _add(g, '-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    _add(g, '-vb', '--validation-batch-size', type=int, metavar='N', help='validation batch size per process')
    _add(g, '--channels-last', action=argparse.BooleanOptionalAction, default=False, help='channels_last memory layout')
    _add(g, '--grad-accum-steps', type=int, default=1, metavar='N', help='micro-batches per optimizer step')
    _add(g, '--grad-checkpointing', action=argparse.BooleanOptionalAction, default=False,
         help='activation checkpointing')

    g = p.add_argument_group('device and precision')
    _add(g, '--device', help="'cuda' or 'cpu' (default: cuda when available)")
    _add(g, '--amp', action=argparse.BooleanOptionalAction, default=False, help='mixed precision autocast')
    _add(g, '--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='autocast dtype')
    _add(g, '--device-modules', nargs='+', metavar='MODULE', default=[], help='extra modules to import')

    g = p.add_argument_group('optimizer')
    _add(g, '--opt', metavar='OPTIMIZER', default='sgd', help='timm optimizer name (sgd is Nesterov SGD)')
    _add(g, '--opt-eps', type=float, help='optimizer epsilon')
    _add(g, '--opt-betas', type=float, nargs='+', help='optimizer betas')
    _add(g, '--momentum', type=float, default=0.9, help='SGD momentum')
    _add(g, '--weight-decay', type=float, default=2e-5, help='weight decay (never on gains, biases, skip gains)')
    _add(g, '--opt-kwargs', nargs='*', action=KwargsAction, default={}, help='extra optimizer keywords key=value')
    _add(g, '--agc', type=float, metavar='CLIPPING', help='adaptive gradient clipping ratio: wraps --opt '
         'with AGC and the paper\'s parameter groups (classifier weight unclipped)')
    _add(g, '--agc-eps', type=float, default=1e-3, help='AGC floor on a unit\'s parameter norm')

    g = p.add_argument_group('learning rate schedule')
    _add(g, '--sched', default='cosine', help='timm scheduler name')
    _add(g, '--sched-on-updates', action=argparse.BooleanOptionalAction, default=False,
         help='step the schedule every update')
    _add(g, '--lr', type=float, help='learning rate (default: --lr-base scaled by the global batch)')
    _add(g, '--lr-base', type=float, default=0.1, help='lr at --lr-base-size global batch')
    _add(g, '--lr-base-size', type=int, default=256, help='batch size of --lr-base')
    _add(g, '--lr-base-scale', default='', help="'linear' or 'sqrt' (default: sqrt for ada*/lamb, else linear)")
    _add(g, '--warmup-lr', type=float, default=1e-5, help='lr at the start of warmup')
    _add(g, '--min-lr', type=float, default=0.0, help='lr floor of the schedule')
    _add(g, '--epochs', type=int, default=300, help='total epochs, warmup included')
    _add(g, '--warmup-epochs', type=int, default=5, help='linear warmup epochs')
    _add(g, '--warmup-prefix', action=argparse.BooleanOptionalAction, default=False,
         help='the decay starts after warmup (it still ends at --epochs)')
    _add(g, '--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after the schedule')
    _add(g, '--decay-epochs', type=float, default=90, help='step schedule interval')
    _add(g, '--decay-milestones', type=int, nargs='+', default=[90, 180, 270], help='multistep epochs')
    _add(g, '--decay-rate', type=float, default=0.1, help='step/multistep decay factor')

    g = p.add_argument_group('augmentation and regularisation')
    _add(g, '--no-aug', action='store_true', default=False, help='no training augmentation')
    _add(g, '--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop area range')
    _add(g, '--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random-resized-crop aspect range')
    _add(g, '--hflip', type=float, default=0.5, help='horizontal flip probability')
    _add(g, '--vflip', type=float, default=0.0, help='vertical flip probability')
    _add(g, '--color-jitter', type=float, default=0.4, help='colour jitter (off when --aa is set)')
    _add(g, '--aa', metavar='NAME', help='timm AutoAugment/RandAugment policy, e.g. rand-n4-m5')
    _add(g, '--reprob', type=float, default=0.0, help='random erasing probability')
    _add(g, '--remode', default='pixel', help='random erasing mode')
    _add(g, '--recount', type=int, default=1, help='random erasing count')
    _add(g, '--mixup', type=float, default=0.0, help='MixUp alpha (0: off)')
    _add(g, '--cutmix', type=float, default=0.0, help='CutMix alpha (0: off)')
    _add(g, '--cutmix-minmax', type=float, nargs=2, help='CutMix box ratio range')
    _add(g, '--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    _add(g, '--mixup-switch-prob', type=float, default=0.5, help='probability of CutMix when both are on')
    _add(g, '--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='how mixing is drawn')
    _add(g, '--mixup-off-epoch', type=int, default=0, help='turn mixing off from this epoch (0: never)')
    _add(g, '--smoothing', type=float, default=0.1, help='label smoothing')
    _add(g, '--train-interpolation', default='random', help='training resize interpolation')
    _add(g, '--drop', type=float, help="dropout before the classifier (default: the model's)")
    _add(g, '--drop-path', type=float, help="stochastic depth rate (default: the model's)")

    g = p.add_argument_group('EMA of the weights')
    _add(g, '--model-ema', action=argparse.BooleanOptionalAction, default=False,
         help='keep an EMA of the weights (evaluated)')
    _add(g, '--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    _add(g, '--model-ema-warmup', nargs='?', const='paper', choices=('paper', 'timm'), default=None,
         help="EMA decay warmup: 'paper' = min(decay, (1+t)/(10+t)) (the default with the bare flag), "
              "'timm' = ModelEmaV3's")

    g = p.add_argument_group('run, checkpoints, logging')
    _add(g, '--seed', type=int, default=42, help='random seed')
    _add(g, '-j', '--workers', type=int, default=4, help='data loading processes per training process')
    _add(g, '--pin-mem', action=argparse.BooleanOptionalAction, default=False,
         help='pinned host memory for CUDA copies')
    _add(g, '--output', metavar='DIR', help='run folder (default: a new output/train/<date>-<model>)')
    _add(g, '--experiment', metavar='NAME', default='', help='sub-folder of --output')
    _add(g, '--resume', metavar='PATH', default='', help="checkpoint to continue, or 'auto': the latest in the "
         'run folder (a fresh start when there is none)')
    _add(g, '--recovery-interval', '--checkpoint-interval', type=int, default=0, metavar='STEPS',
         help='also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)')
    _add(g, '--checkpoint-hist', type=int, default=3, help='epoch checkpoints kept')
    _add(g, '--eval-metric', default='top1', choices=('top1', 'top5', 'loss'), help='metric of model_best')
    _add(g, '--log-interval', type=int, default=50, help='optimizer steps between log lines')
    _add(g, '--progress', action=argparse.BooleanOptionalAction, help='progress bar (default: on a terminal)')
    _add(g, '--export', nargs='?', const='', metavar='DIR', help='after training, write model.safetensors + '
         'config.json (to DIR, default <run>/export), reload them through timm and report their accuracy')
    g.add_argument('--no-export', dest='export', action='store_const', const=None, default=argparse.SUPPRESS,
                   help='no export (turns off the quick start\'s)')
    return p


# --- recipes ---------------------------------------------------------------------------------

def paper_recipe(model: str) -> Tuple[Dict[str, Any], List[str]]:
    """DeepMind's NFNet training settings for ``model`` (NFNETS.md), and notes about them.

    The learning rate is left to the batch rule: ``0.1 * global_batch / 256`` (--lr-base 0.1,
    --lr-base-size 256, linear). Resolution, RandAugment level and dropout follow the variant.
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
    )
    if model in MODEL_CFGS:
        recipe['drop'] = MODEL_CFGS[model].drop_rate
    if variant is not None:
        recipe['img_size'] = variant.train_size
    return recipe, notes


def quickstart_recipe(model: str) -> Tuple[Dict[str, Any], List[str]]:
    """A tiny NFNet with AGC on the built-in digits: >= 90% top-1 in minutes on 2 CPU cores."""
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


def resolve_settings(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Dict[str, str], List[str]]:
    """Parse ``argv``; returns (settings, source of each setting, notes).

    No arguments at all means the quick start. Precedence: command line > recipe > default.
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
    return argparse.Namespace(**settings), sources, notes


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
