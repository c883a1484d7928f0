"""The settings of ``timm-nfnet-train``, typed: ``TrainConfig``, one field per command-line flag.

The fields are the single source of the flags: ``recipe.build_parser`` makes the parser from
them (flag names, defaults, help), with timm ``train.py``'s names for what this command
supports. A resolved run carries a ``TrainConfig``; every function of the command takes it.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: F401 (the annotations)

__all__ = ['TrainConfig', 'TrainError', 'parse_kwargs', 'KwargsAction', 'config_flags']


class TrainError(ValueError):
    """A problem with the command's input, reported before any training step.

    The command prints it and exits with code 2 (``elastic.EXIT_BAD_INPUT``).
    """


def parse_kwargs(values: Sequence[str], flag: str = '--opt-kwargs') -> Dict[str, Any]:
    """``key=value`` words into a dict; values are Python literals, else strings (timm's rule).

    Args:
        values: the words after the flag.
        flag: the flag's name, for the error message.

    Returns:
        The keywords (empty words are skipped).

    Raises:
        TrainError: a word without ``=``.
    """
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
    """``--flag key=value ...`` parsed into a dict by :func:`parse_kwargs` (timm's ParseKwargs).

    Args:
        *args: ``argparse.Action``'s positional arguments.
        **kwargs: ``argparse.Action``'s keywords; ``nargs`` defaults to ``'*'``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault('nargs', '*')
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[str],
                 option_string: Optional[str] = None) -> None:
        """Set ``namespace.<dest>`` to the dict of ``values``.

        Args:
            parser: the parser, for its error report.
            namespace: the namespace being filled.
            values: the ``key=value`` words.
            option_string: the flag as written, for the error message.

        Raises:
            SystemExit: a word without ``=`` (through ``parser.error``, exit code 2).
        """
        try:
            setattr(namespace, self.dest, parse_kwargs(values, option_string))
        except TrainError as e:
            parser.error(str(e))


def flag(default: Any, *flags: str, **argparse_kwargs: Any) -> Any:
    """A ``TrainConfig`` field: its default, its command-line flags and their argparse keywords.

    Args:
        default: the field's default; a list or dict is deep-copied for each instance.
        *flags: the command-line flags, e.g. ``'-b', '--batch-size'``.
        **argparse_kwargs: keywords for ``add_argument`` (``help``, ``choices``, ``nargs``...).

    Returns:
        A ``dataclasses.field`` with ``flags`` and ``argparse`` in its metadata.
    """
    meta = {'flags': flags, 'argparse': argparse_kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run (see ``timm-nfnet-train --help`` for each).

    One field per flag (``--batch-size`` is ``batch_size``); each field's help text is next to it below.

    Attributes:
        recipe: the preset applied under the command line (``'paper'``, ``'quickstart'`` or ``None``).
        data_dir, dataset, train_split, val_split, dataset_download, class_map: where the data comes from.
        model, pretrained, pretrained_path, num_classes, model_kwargs, drop, drop_path: the model to train.
        img_size, input_size, crop_pct, mean, std, interpolation, val_preprocess, val_img_size: input size and
            validation preprocessing.
        batch_size, validation_batch_size, grad_accum_steps, channels_last, grad_checkpointing: batches and memory.
        device, amp, amp_dtype, device_modules: device and precision.
        opt, opt_eps, opt_betas, momentum, weight_decay, opt_kwargs, agc, agc_eps: the optimizer and AGC.
        sched, sched_on_updates, lr, lr_base, lr_base_size, lr_base_scale, warmup_lr, min_lr, epochs,
            warmup_epochs, warmup_prefix, cooldown_epochs, decay_epochs, decay_milestones, decay_rate: the
            learning rate schedule (``lr`` is ``None`` until ``setup.prepare`` derives it from the batch).
        data_pipeline, randaug_magnitude, no_aug, scale, ratio, hflip, vflip, color_jitter, aa, reprob, remode,
            recount, mixup, cutmix, cutmix_minmax, mixup_prob, mixup_switch_prob, mixup_mode, mixup_off_epoch,
            smoothing, train_interpolation: augmentation and regularisation.
        model_ema, model_ema_decay, model_ema_warmup: the EMA of the weights.
        seed, workers, pin_mem, output, experiment, resume, recovery_interval, checkpoint_hist, eval_metric,
            log_interval, progress, export, nonfinite_limit: the run, its checkpoints, logs and export.
    """

    # --- recipe
    recipe: Optional[str] = flag(None, '--recipe', choices=('paper', 'quickstart'),
        help=("preset: 'paper' (DeepMind's NFNet recipe for the chosen variant) or 'quickstart' (tiny NFNet on "
              'the built-in digits)'))

    # --- data
    data_dir: Optional[str] = flag(None, '--data-dir', metavar='DIR',
        help='ImageFolder root with train/ and validation/ (or val/) subfolders, or the root for --dataset')
    dataset: str = flag('', '--dataset', metavar='NAME',
        help=("'digits' (built in, no download; the default when no data is given), '' for an ImageFolder, or a"
              ' timm scheme: torch/NAME, hfds/NAME, tfds/NAME, wds/NAME'))
    train_split: str = flag('train', '--train-split', metavar='NAME', help='training split')
    val_split: str = flag('validation', '--val-split', metavar='NAME', help="validation split ('' for none)")
    dataset_download: bool = flag(False, '--dataset-download', help='let timm download torch/ datasets')
    class_map: str = flag('', '--class-map', metavar='FILE', help='class map file for ImageFolder datasets')

    # --- model
    model: str = flag('nfnet_f0', '--model', metavar='NAME', help='timm model name')
    pretrained: bool = flag(False, '--pretrained', help='start from pretrained weights')
    pretrained_path: Optional[str] = flag(None, '--pretrained-path', metavar='FILE',
                help='local weights file for --pretrained (e.g. the model.safetensors of timm-nfnet-convert)')
    num_classes: Optional[int] = flag(None, '--num-classes', metavar='N', help='classes (default: from the dataset)')
    model_kwargs: Dict[str, Any] = flag({}, '--model-kwargs',
                help='create_model keywords, e.g. widths="(32,64,96,96)" depths="(1,1,1,1)" group_width=16')
    img_size: Optional[int] = flag(None, '--img-size', metavar='N', help="square input size (default: the model's)")
    input_size: Optional[List[int]] = flag(None, '--input-size', nargs=3, metavar='N', help='C H W input size')
    crop_pct: Optional[float] = flag(None, '--crop-pct', help='validation centre crop fraction')
    mean: Optional[List[float]] = flag(None, '--mean', nargs='+', help='normalisation mean')
    std: Optional[List[float]] = flag(None, '--std', nargs='+', help='normalisation std')
    interpolation: str = flag('', '--interpolation', help="resize interpolation (default: the model's)")
    val_preprocess: str = flag('timm', '--val-preprocess', choices=('reference', 'timm'),
        help=("validation preprocessing: 'reference' (DeepMind's eval pipeline: resize to S+32 with TF's "
              "bicubic, crop S; the paper recipe's) or 'timm' (create_transform)"))
    val_img_size: Optional[int] = flag(None, '--val-img-size', metavar='N',
        help=("reference validation crop size S (default: the model's test size when training at its train "
              'size, else the training size)'))
    batch_size: int = flag(128, '-b', '--batch-size', metavar='N', help='batch size per process')
    validation_batch_size: Optional[int] = flag(None, '-vb', '--validation-batch-size', metavar='N',
                help='validation batch size per process')
    channels_last: bool = flag(False, '--channels-last', help='channels_last memory layout')
    grad_accum_steps: int = flag(1, '--grad-accum-steps', metavar='N', help='micro-batches per optimizer step')
    grad_checkpointing: bool = flag(False, '--grad-checkpointing', help='activation checkpointing')

    # --- device and precision
    device: Optional[str] = flag(None, '--device', help="'cuda' or 'cpu' (default: cuda when available)")
    amp: bool = flag(False, '--amp', help='mixed precision autocast')
    amp_dtype: str = flag('float16', '--amp-dtype', choices=('float16', 'bfloat16'), help='autocast dtype')
    device_modules: List[str] = flag([], '--device-modules', nargs='+', metavar='MODULE',
                help='extra modules to import')

    # --- optimizer
    opt: str = flag('sgd', '--opt', metavar='OPTIMIZER', help='timm optimizer name (sgd is Nesterov SGD)')
    opt_eps: Optional[float] = flag(None, '--opt-eps', help='optimizer epsilon')
    opt_betas: Optional[List[float]] = flag(None, '--opt-betas', nargs='+', help='optimizer betas')
    momentum: float = flag(0.9, '--momentum', help='SGD momentum')
    weight_decay: float = flag(2e-05, '--weight-decay', help='weight decay (never on gains, biases, skip gains)')
    opt_kwargs: Dict[str, Any] = flag({}, '--opt-kwargs', help='extra optimizer keywords key=value')
    agc: Optional[float] = flag(None, '--agc', metavar='CLIPPING',
        help=("adaptive gradient clipping ratio: wraps --opt with AGC and the paper's parameter groups "
              '(classifier weight unclipped)'))
    agc_eps: float = flag(0.001, '--agc-eps', help="AGC floor on a unit's parameter norm")

    # --- learning rate schedule
    sched: str = flag('cosine', '--sched', help='timm scheduler name')
    sched_on_updates: bool = flag(False, '--sched-on-updates', help='step the schedule every update')
    lr: Optional[float] = flag(None, '--lr', help='learning rate (default: --lr-base scaled by the global batch)')
    lr_base: float = flag(0.1, '--lr-base', help='lr at --lr-base-size global batch')
    lr_base_size: int = flag(256, '--lr-base-size', help='batch size of --lr-base')
    lr_base_scale: str = flag('', '--lr-base-scale',
                help="'linear' or 'sqrt' (default: sqrt for ada*/lamb, else linear)")
    warmup_lr: float = flag(1e-05, '--warmup-lr', help='lr at the start of warmup')
    min_lr: float = flag(0.0, '--min-lr', help='lr floor of the schedule')
    epochs: int = flag(300, '--epochs', help='total epochs, warmup included')
    warmup_epochs: int = flag(5, '--warmup-epochs', help='linear warmup epochs')
    warmup_prefix: bool = flag(False, '--warmup-prefix',
                help='the decay starts after warmup (it still ends at --epochs)')
    cooldown_epochs: int = flag(0, '--cooldown-epochs', help='epochs at --min-lr after the schedule')
    decay_epochs: float = flag(90, '--decay-epochs', help='step schedule interval')
    decay_milestones: List[int] = flag([90, 180, 270], '--decay-milestones', nargs='+', help='multistep epochs')
    decay_rate: float = flag(0.1, '--decay-rate', help='step/multistep decay factor')

    # --- augmentation and regularisation
    data_pipeline: str = flag('timm', '--data-pipeline', choices=('reference', 'timm'),
        help=("training input pipeline: 'reference' (DeepMind's: distorted-box crop, flip, TF bicubic, "
              "2B->B MixUp/CutMix with --mixup's alpha and --smoothing, then RandAugment of "
              "--randaug-magnitude; the paper recipe's) or 'timm' (create_transform and Mixup with the "
              'flags below)'))
    randaug_magnitude: Optional[int] = flag(None, '--randaug-magnitude', metavar='M',
        help="RandAugment magnitude of the reference pipeline (default: the variant's, 5/10/15)")
    no_aug: bool = flag(False, '--no-aug', action='store_true', help='no training augmentation')
    scale: List[float] = flag([0.08, 1.0], '--scale', nargs=2, help='random-resized-crop area range')
    ratio: List[float] = flag([3.0 / 4.0, 4.0 / 3.0], '--ratio', nargs=2, help='random-resized-crop aspect range')
    hflip: float = flag(0.5, '--hflip', help='horizontal flip probability')
    vflip: float = flag(0.0, '--vflip', help='vertical flip probability')
    color_jitter: float = flag(0.4, '--color-jitter', help='colour jitter (off when --aa is set)')
    aa: Optional[str] = flag(None, '--aa', metavar='NAME',
                help='timm AutoAugment/RandAugment policy, e.g. rand-n4-m5')
    reprob: float = flag(0.0, '--reprob', help='random erasing probability')
    remode: str = flag('pixel', '--remode', help='random erasing mode')
    recount: int = flag(1, '--recount', help='random erasing count')
    mixup: float = flag(0.0, '--mixup', help='MixUp alpha (0: off)')
    cutmix: float = flag(0.0, '--cutmix', help='CutMix alpha (0: off)')
    cutmix_minmax: Optional[List[float]] = flag(None, '--cutmix-minmax', nargs=2, help='CutMix box ratio range')
    mixup_prob: float = flag(1.0, '--mixup-prob', help='probability of mixing a batch')
    mixup_switch_prob: float = flag(0.5, '--mixup-switch-prob', help='probability of CutMix when both are on')
    mixup_mode: str = flag('batch', '--mixup-mode', choices=('batch', 'pair', 'elem'), help='how mixing is drawn')
    mixup_off_epoch: int = flag(0, '--mixup-off-epoch', help='turn mixing off from this epoch (0: never)')
    smoothing: float = flag(0.1, '--smoothing', help='label smoothing')
    train_interpolation: str = flag('random', '--train-interpolation', help='training resize interpolation')
    drop: Optional[float] = flag(None, '--drop', help="dropout before the classifier (default: the model's)")
    drop_path: Optional[float] = flag(None, '--drop-path', help="stochastic depth rate (default: the model's)")

    # --- EMA of the weights
    model_ema: bool = flag(False, '--model-ema', help='keep an EMA of the weights (evaluated)')
    model_ema_decay: float = flag(0.9998, '--model-ema-decay', help='EMA decay')
    model_ema_warmup: Optional[str] = flag(None, '--model-ema-warmup', nargs='?', const='paper',
                                           choices=('paper', 'timm'),
        help=("EMA decay warmup: 'paper' = min(decay, (1+t)/(10+t)) (the default with the bare flag), 'timm' = "
              "ModelEmaV3's"))

    # --- run, checkpoints, logging
    seed: int = flag(42, '--seed', help='random seed')
    workers: int = flag(4, '-j', '--workers', help='data loading processes per training process')
    pin_mem: bool = flag(False, '--pin-mem', help='pinned host memory for CUDA copies')
    output: Optional[str] = flag(None, '--output', metavar='DIR',
                help='run folder (default: a new output/train/<date>-<model>)')
    experiment: str = flag('', '--experiment', metavar='NAME', help='sub-folder of --output')
    resume: str = flag('', '--resume', metavar='PATH',
        help="checkpoint to continue, or 'auto': the latest in the run folder (a fresh start when there is none)")
    recovery_interval: int = flag(0, '--recovery-interval', '--checkpoint-interval', metavar='STEPS',
                help='also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)')
    checkpoint_hist: int = flag(3, '--checkpoint-hist', help='epoch checkpoints kept')
    eval_metric: str = flag('top1', '--eval-metric', choices=('top1', 'top5', 'loss'), help='metric of model_best')
    log_interval: int = flag(50, '--log-interval', help='optimizer steps between log lines')
    progress: Optional[bool] = flag(None, '--progress', help='progress bar (default: on a terminal)')
    export: Optional[str] = flag(None, '--export', nargs='?', const='', metavar='DIR',
        help=('after training, write model.safetensors + config.json (to DIR, default <run>/export), reload '
              'them through timm and report their accuracy'))
    nonfinite_limit: int = flag(10, '--nonfinite-limit', metavar='K',
        help=('a step whose loss or gradient is inf/NaN is skipped (not applied, not checkpointed) and counted; '
              'the K-th such step in a row stops the run with exit code 3 (1: stop at the first)'))

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]) -> 'TrainConfig':
        """A config from resolved settings (defaults, recipe and command line merged).

        Args:
            settings: one value per field.

        Returns:
            The config (the values are used as given, not copied or checked).

        Raises:
            TrainError: a setting that is not a field, or a field without a setting.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(settings) - names), sorted(names - set(settings))
        if unknown or missing:
            raise TrainError(f'settings do not match TrainConfig: unknown {unknown}, missing {missing}')
        return cls(**settings)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a dict.

        Returns:
            ``{field name: value}`` in field order (the values themselves, not copies).
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def config_flags() -> Iterator[Tuple[dataclasses.Field, Dict[str, Any]]]:
    """Each field with the argparse keywords of its flag (type and boolean action from its annotation).

    Yields:
        ``(field, add_argument keywords)`` in field order: a dict field gets
        :class:`KwargsAction`, a bool ``BooleanOptionalAction`` (unless it sets its own action),
        an int or float its ``type``.
    """
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(f.metadata['argparse'])
        base = hints[f.name]
        while typing.get_origin(base) in (typing.Union, list):
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if typing.get_origin(base) is dict:
            kwargs['action'] = KwargsAction
        elif base is bool and 'action' not in kwargs:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif base in (int, float):
            kwargs['type'] = base
        yield f, kwargs
