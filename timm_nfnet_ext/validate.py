"""``timm-nfnet-validate``: timm's ``validate.py`` for this package, with the reference's eval pipeline.

    timm-nfnet-validate /data/imagenet --model nfnet_f0 --pretrained          # the paper's protocol
    timm-nfnet-validate /data/imagenet --model nfnet_f0 --pretrained --preprocess timm
    python -m timm_nfnet_ext.validate --data-dir DIR --checkpoint run/model_best.pth.tar -b 64

Flags keep timm's names. ``--preprocess reference`` (the default) decodes, resizes and crops as
DeepMind's evaluation did (:func:`timm_nfnet_ext.data.create_eval_transform`);
``--preprocess timm`` uses timm's ``create_transform`` for the model's test-size data config,
as timm's ``validate.py`` does. Prints top-1 / top-5, loss and images/s, and writes them with
``--results-file``. An unreadable image stops the run with its path, unless
``--skip-bad-images`` is given; skipped images are counted in the results.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import timm
from timm.utils import AverageMeter, accuracy

from .data import FileImageDataset, ImageDecodeError, create_eval_transform
from .files import atomic_path
from .logs import command_output
from .train.recipe import KwargsAction
from .variants import reference_crop_pct
from .weights.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint_file

__all__ = ['ValidateError', 'build_parser', 'validate', 'main']

_logger = logging.getLogger(__name__)


class ValidateError(RuntimeError):
    """A validation run that cannot go on (bad data, weights or flags); the message says why."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, with timm ``validate.py``'s flag names.

    Returns:
        The parser of ``timm-nfnet-validate``.
    """
    p = argparse.ArgumentParser(
        prog='timm-nfnet-validate', description='ImageNet-style validation with DeepMind\'s eval '
        'preprocessing (or timm\'s), for this package\'s models and any timm model.')
    p.add_argument('data', nargs='?', metavar='DIR', help='dataset root (same as --data-dir)')
    p.add_argument('--data-dir', metavar='DIR', help='dataset root (an ImageFolder, or the root for --dataset)')
    p.add_argument('--dataset', metavar='NAME', default='',
                   help="'' for an image folder (default), or a timm scheme such as torch/NAME")
    p.add_argument('--split', metavar='NAME', default='validation',
                   help='split to evaluate; an ImageFolder uses DIR/<split> (or val/) when it exists, else DIR')
    p.add_argument('--class-map', metavar='FILE', default='', help='class map file for image folders')
    p.add_argument('--model', '-m', metavar='NAME', default='nfnet_f0', help='timm model name')
    p.add_argument('--pretrained', action='store_true', help='use the model\'s pretrained weights')
    p.add_argument('--checkpoint', metavar='PATH', default='',
                   help='weights file: safetensors, a torch checkpoint (timm-nfnet-train\'s included), '
                        'or DeepMind\'s pickle; read without unsafe unpickling')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of a training checkpoint')
    p.add_argument('--num-classes', type=int, metavar='N', help='classes of the model\'s head')
    p.add_argument('--model-kwargs', nargs='*', action=KwargsAction, default={},
                   help='create_model keywords key=value, e.g. widths="(32,64,96,96)"')
    p.add_argument('--img-size', type=int, metavar='N', help='crop size (default: the model\'s test size)')
    p.add_argument('--preprocess', choices=('reference', 'timm'), default=None,
                   help="'reference' (DeepMind's eval pipeline; default for this package's models) "
                        "or 'timm' (timm's create_transform; default for other models)")
    p.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size')
    p.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes')
    p.add_argument('--device', default=None, help="'cuda', 'cpu', ... (default: cuda when available)")
    p.add_argument('--amp', action='store_true', help='mixed precision autocast')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='autocast dtype')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='skip images that cannot be decoded (counted and reported) instead of stopping')
    p.add_argument('--log-freq', type=int, default=10, metavar='N', help='batches between log lines without a progress bar')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bar (default: on a terminal)')
    p.add_argument('--results-file', metavar='FILE', default='', help='write the results here')
    p.add_argument('--results-format', choices=('csv', 'json'), default='csv', help='results file format')
    return p


def _device(name: Optional[str]) -> torch.device:
    """``--device``, checked before any work (default: cuda when available)."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        raise ValidateError(f'--device {name!r}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValidateError(f'--device {name}: CUDA is not available here (use --device cpu)')
    return device


def _create_model(args: argparse.Namespace) -> torch.nn.Module:
    if ':' not in args.model and not timm.is_model(args.model.split('.')[0]):  # not local-dir:/hf-hub:
        raise ValidateError(f'unknown model {args.model!r}')
    kwargs: Dict[str, Any] = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        raise ValidateError(f'cannot create {args.model!r}: {e}') from e
    if args.checkpoint:
        try:
            state = load_checkpoint_file(args.checkpoint, use_ema=args.use_ema)
            model.load_state_dict(checkpoint_filter_fn(state, model))
        except (CheckpointError, OSError, RuntimeError) as e:
            raise ValidateError(f'cannot load --checkpoint {args.checkpoint}: {e}') from e
    return model.eval()


def _transform(args: argparse.Namespace, model: torch.nn.Module) -> Tuple[Any, Dict[str, Any]]:
    """The eval transform and the data config it describes (timm's keys)."""
    from timm.data import create_transform, resolve_data_config
    if args.preprocess == 'reference':
        t = create_eval_transform(model, img_size=args.img_size)
        h, w = t.img_size
        cfg = dict(input_size=(3, h, w), interpolation='tf-bicubic', crop_pct=reference_crop_pct(h),
                   crop_mode='squash', mean=t.mean, std=t.std)
        return t, cfg
    overrides = {'img_size': args.img_size} if args.img_size else {}
    cfg = resolve_data_config(overrides, model=model, use_test_size=True)
    return create_transform(**cfg), cfg


def _dataset(args: argparse.Namespace) -> Any:
    from timm.data import create_dataset
    root = args.data_dir or args.data
    if not root:
        raise ValidateError('give the dataset folder: timm-nfnet-validate DIR (or --data-dir DIR)')
    if not args.dataset and not os.path.isdir(root):
        raise ValidateError(f'data folder {root!r} does not exist (or is not a folder)')
    try:
        ds = create_dataset(args.dataset, root=root, split=args.split, is_training=False,
                            class_map=args.class_map, batch_size=args.batch_size)
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError) as e:
        raise ValidateError(f'cannot open {args.dataset or "the image folder"} at {root!r}: {e}') from e
    if isinstance(ds, torch.utils.data.IterableDataset) or len(ds) == 0:
        raise ValidateError(f'{root!r} holds no images for split {args.split!r}'
                            if not isinstance(ds, torch.utils.data.IterableDataset)
                            else f'--dataset {args.dataset!r} is iterable; give a map-style dataset')
    return ds


class _Marked(torch.utils.data.Dataset):
    """Items as ``(image or None, target, error or None)``: decode errors reach the main process
    as data, so the run can stop with the file's name (or skip it) instead of a worker traceback."""

    def __init__(self, files: FileImageDataset):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, Optional[str]]:
        try:
            image, target = self.files[index]
            return image, target, None
        except ImageDecodeError as e:
            return None, -1, str(e)


def _collate(batch: List[Tuple[Optional[torch.Tensor], int, Optional[str]]]
             ) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[str]]:
    good = [(x, t) for x, t, err in batch if err is None]
    errors = [err for _, _, err in batch if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([t for _, t in good], dtype=torch.long), errors


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluates ``args.model`` on a dataset; returns timm's results dict (plus this package's keys).

    Args:
        args: the parsed command line of :func:`build_parser` (``args.preprocess`` None is
            resolved in place to ``'reference'`` for this package's models, else ``'timm'``).

    Returns:
        An ordered dict: ``model``, ``top1``, ``top1_err``, ``top5``, ``top5_err``, ``loss``,
        ``param_count``, ``img_size``, ``crop_pct``, ``interpolation`` as timm's ``validate.py``
        reports them, plus ``preprocess``, ``images``, ``skipped``, ``images_per_sec``, ``device``
        and ``amp``.

    Raises:
        ValidateError: an unknown model, unloadable weights, a missing or empty dataset, labels
            outside the model's classes, or an unreadable image without ``--skip-bad-images``.
    """
    device = _device(args.device)
    if args.results_file:
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValidateError(f'cannot write --results-file {args.results_file}: {folder} is not a '
                                'writable folder')
    model = _create_model(args)
    if args.preprocess is None:
        from .models import NFNet
        args.preprocess = 'reference' if isinstance(model, NFNet) else 'timm'
    transform, data_cfg = _transform(args, model)
    dataset = _dataset(args)
    num_classes = model.num_classes
    files = FileImageDataset(dataset, transform)
    workers = max(0, args.workers)
    loader = torch.utils.data.DataLoader(
        _Marked(files), batch_size=args.batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == 'cuda')
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    params = sum(p.numel() for p in model.parameters())
    _logger.info(f'Validating {args.model} ({params / 1e6:.2f}M params) on {len(dataset)} images, '
                 f'{args.preprocess} preprocessing: {transform!r}\n'
                 f'data config: {data_cfg}\nmodel cfg: {dict(getattr(model, "pretrained_cfg", {}) or {})}')

    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    skipped: List[str] = []
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(dataset), unit='img', desc=args.model, file=sys.stderr)
    k5 = min(5, num_classes)
    start = time.perf_counter()
    seen = 0
    with torch.inference_mode():
        for i, (images, targets, errors) in enumerate(loader):
            if errors:
                if not args.skip_bad_images:
                    raise ValidateError(f'{errors[0]} (--skip-bad-images skips unreadable images '
                                        'and counts them)')
                skipped.extend(errors)
                for err in errors:
                    _logger.warning('skipped %s', err)
            if bar is not None:
                bar.update(len(targets) + len(errors))
            if images is None:
                continue
            if targets.min() < 0:
                raise ValidateError('the dataset has unlabelled images (label -1): validation needs labels')
            if targets.max() >= num_classes:
                raise ValidateError(f'labels run to {int(targets.max())} but {args.model} has '
                                    f'{num_classes} classes (--num-classes, or a class map)')
            images, targets = images.to(device), targets.to(device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                logits = model(images)
            logits = logits.float()
            n = targets.numel()
            losses.update(F.cross_entropy(logits, targets).item(), n)
            acc1, acc5 = accuracy(logits, targets, topk=(1, k5))
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
            seen += n
            if bar is None and args.log_freq > 0 and (i % args.log_freq == 0):
                _logger.info(f'Test: [{seen:>6d}/{len(dataset)}]  Loss: {losses.avg:.4f}  '
                             f'Acc@1: {top1.avg:.3f}  Acc@{k5}: {top5.avg:.3f}')
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValidateError('no image could be evaluated (all were skipped)')
    h = data_cfg['input_size'][-1]
    return OrderedDict(
        model=args.model, top1=round(top1.avg, 4), top1_err=round(100 - top1.avg, 4),
        top5=round(top5.avg, 4), top5_err=round(100 - top5.avg, 4), loss=round(losses.avg, 6),
        param_count=round(params / 1e6, 2),
        img_size=h, crop_pct=round(data_cfg['crop_pct'], 4), interpolation=data_cfg['interpolation'],
        preprocess=args.preprocess, images=seen, skipped=len(skipped),
        images_per_sec=round(seen / elapsed, 2), device=str(device),
        amp=args.amp_dtype if args.amp else 'off')


def write_results(results: Dict[str, Any], path: str, fmt: str) -> None:
    """Writes one results row (csv) or object (json) to ``path``, replacing it atomically."""
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        if fmt == 'json':
            json.dump(results, f, indent=4)
        else:
            w = csv.DictWriter(f, fieldnames=list(results))
            w.writeheader()
            w.writerow(results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``timm-nfnet-validate``; returns the exit code (0, or 1 on an error).

    Args:
        argv: the command-line arguments; None reads ``sys.argv``.

    Returns:
        0 on success, 1 when validation fails (the error is printed to stderr).

    Raises:
        SystemExit: bad flags (from argparse, exit status 2), or ``--help``.
    """
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        build_parser().error('--batch-size must be >= 1')
    try:
        with command_output():
            results = validate(args)
    except (ValidateError, ImageDecodeError) as e:
        print(f'timm-nfnet-validate: error: {e}', file=sys.stderr)
        return 1
    print(f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f})  '
          f'Acc@5 {results["top5"]:.3f} ({results["top5_err"]:.3f})')
    if results['skipped']:
        print(f' * skipped {results["skipped"]} unreadable image(s)')
    print(f'--result\n{json.dumps(results, indent=4)}')
    if args.results_file:
        write_results(results, args.results_file, args.results_format)
    return 0


if __name__ == '__main__':
    sys.exit(main())
