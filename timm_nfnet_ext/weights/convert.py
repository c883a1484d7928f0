"""``timm-nfnet-convert``: DeepMind / timm / native NFNet weights -> ``model.safetensors`` + ``config.json``.

    timm-nfnet-convert F0_haiku.npz -o out/nfnet_f0 --model nfnet_f0
    timm-nfnet-convert params.pkl -o out/tiny --model nfnet_f0 --input-size 48 --test-input-size 64 \\
        --model-kwargs '{"widths": [64, 128, 192, 192], "depths": [1, 2, 2, 1], "group_width": 32, "num_classes": 10}'

The output folder loads with timm's own pretrained path::

    timm.create_model('nfnet_f0', pretrained=True,
                      pretrained_cfg_overlay=dict(file='out/nfnet_f0/model.safetensors'))
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import save_for_hf

from timm_nfnet_hub.names import TAG_PATTERN

from .. import __version__
from ..files import PathLike, staged_folder
from ..variants import reference_crop_pct
from .checkpoint import CheckpointError, checkpoint_filter_fn, detect_layout, load_checkpoint_file

__all__ = ['build_model_from_state', 'list_nfnets', 'save_model_folder', 'is_release_conversion', 'conversion_cfg',
           'convert', 'main']



def build_model_from_state(
        state: Mapping[str, Any], model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Create ``model_name`` (with ``model_kwargs``), load ``state`` (any layout) strictly; eval mode.

    Args:
        state: the weights, in any of the three layouts (see ``checkpoint.detect_layout``).
        model_name: a model name of this package, with or without a pretrained tag.
        model_kwargs: ``timm.create_model`` keywords.

    Returns:
        The model with the weights loaded, in eval mode.

    Raises:
        ValueError: ``model_name`` is not an NFNet of this package.
        CheckpointError: the weights do not fit the model, or hold non-finite values.
    """
    # timm's own dm_nfnet_* are a different layout: not a target; a tag (nfnet_f0.dm_in1k) is fine
    if timm.models.get_arch_name(model_name) not in list_nfnets():
        raise ValueError(f'unknown model {model_name!r}; NFNets of this package: {", ".join(list_nfnets())}')
    model = timm.create_model(model_name, pretrained=False, **dict(model_kwargs or {}))
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    bad = [n for n, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f'non-finite values in {", ".join(bad[:10])}')
    return model.eval()


def list_nfnets() -> list:
    """The model names this package registers.

    Returns:
        The names, sorted.
    """
    from ..models import MODEL_CFGS
    return sorted(MODEL_CFGS)


def canonicalize_safetensors(path: PathLike) -> None:
    """Rewrite a safetensors header in a fixed order (metadata keys sorted, then tensors by name).

    safetensors keeps ``__metadata__`` in a hash map whose order changes from one process to the
    next, so the same weights would give different bytes (and a new Hub commit) on every run.
    Offsets are untouched; the header keeps its length, padded with spaces as safetensors does.
    """
    with open(path, 'r+b') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop('__metadata__', None)
        ordered = {'__metadata__': dict(sorted(meta.items()))} if meta is not None else {}
        ordered.update(sorted(header.items()))
        text = json.dumps(ordered, separators=(',', ':'), ensure_ascii=False).encode()
        if len(text) > n:
            raise CheckpointError(f'{path}: cannot rewrite the safetensors header in place')
        f.seek(8)
        f.write(text + b' ' * (n - len(text)))


def save_model_folder(
        model: nn.Module,
        out_dir: PathLike,
        metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write ``model.safetensors`` (native layout) and timm's ``config.json`` into ``out_dir``.

    Both are written to temporary names in ``out_dir`` and renamed into place, so a failure
    never leaves a half-written file under the final names. The same weights give the same bytes.

    Args:
        model: the model (it must have a ``pretrained_cfg``: a ``timm.create_model`` model).
        out_dir: the folder to write (created if missing).
        metadata: extra safetensors metadata entries.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        PermissionError: ``out_dir`` is not writable.
    """
    meta = {'format': 'pt', 'converter': f'timm-nfnet-ext {__version__}',
            'architecture': model.pretrained_cfg.get('architecture', '')}
    meta.update(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with staged_folder(out_dir, OUTPUT_FILES) as tmp:
        save_file(tensors, str(tmp / 'model.safetensors'), metadata=meta)
        canonicalize_safetensors(tmp / 'model.safetensors')  # same weights -> same bytes
        # timm's config.json, through its public writer (timm exports no config-only one); the
        # weights it writes beside it stay in the staging folder: ours are the ones above
        save_for_hf(model, str(tmp / 'timm'), safe_serialization=True)
        os.replace(tmp / 'timm' / 'config.json', tmp / 'config.json')
    return Path(out_dir)


OUTPUT_FILES = ('model.safetensors', 'config.json')


def missing_folders(path: PathLike) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what a
    ``mkdir(parents=True)`` would create, and so what a failed write should remove again."""
    path = Path(path)
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process, or files of its own), or already gone
            break


def pretrained_cfg_for_data(model: nn.Module, input_size: Sequence[int], test_input_size: Sequence[int],
                            crop_pct: float, test_crop_pct: float, **fields: Any) -> Dict[str, Any]:
    """``model.pretrained_cfg`` with these input sizes and crops (the pool size follows from the
    model's total stride) and its class count, plus ``fields``: what a written ``config.json``
    should carry when the weights were trained or are evaluated otherwise than the defaults."""
    info = getattr(model, 'feature_info', None)
    stride = info[-1]['reduction'] if isinstance(info, list) and info else 32
    cfg = dict(model.pretrained_cfg)
    cfg.update(input_size=tuple(input_size), test_input_size=tuple(test_input_size),
               pool_size=tuple(math.ceil(s / stride) for s in input_size[1:]), crop_pct=crop_pct,
               test_crop_pct=test_crop_pct, num_classes=model.num_classes, **fields)
    return cfg


# keywords that leave the architecture (and so which weights it holds) as registered
_SAME_ARCHITECTURE = frozenset({'drop_rate', 'drop_path_rate', 'num_classes', 'in_chans', 'global_pool',
                                'output_stride'})


def is_release_conversion(layout: str, model_kwargs: Optional[Mapping[str, Any]]) -> bool:
    """Whether a conversion may be DeepMind's released weights: read from DeepMind's or timm's
    ``dm_nfnet`` layout into the registered architecture (only a head, input channels,
    regularisation or ``output_stride`` changed). This package's own layout holds weights trained with it.

    Args:
        layout: the source's layout, as ``checkpoint.detect_layout`` names it.
        model_kwargs: the ``timm.create_model`` keywords of the conversion.

    Returns:
        True if the weights may be DeepMind's release.
    """
    return layout in ('deepmind', 'timm') and not set(model_kwargs or {}) - _SAME_ARCHITECTURE


def conversion_cfg(model: nn.Module, release_weights: bool, tag: Optional[str] = None,
                   input_size: Optional[int] = None, test_input_size: Optional[int] = None) -> Dict[str, Any]:
    """The pretrained cfg a conversion's ``config.json`` carries.

    The registered model's own cfg (its release tag, e.g. ``dm_in1k``, DeepMind's ``origin_url``,
    its sizes and crops) describes DeepMind's released weights, so only ``release_weights``
    (``is_release_conversion``) keep its tag and origin; ``tag`` names another one.
    ``input_size`` / ``test_input_size`` (pixels; the test size defaults to the train size) set
    the sizes and crops (``S / (S + 32)``, as the reference evaluates) the weights were trained
    and are evaluated at.

    Args:
        model: the converted model (a ``timm.create_model`` model).
        release_weights: whether the weights may be DeepMind's release (``is_release_conversion``).
        tag: a pretrained tag to set, e.g. ``ft_in1k``.
        input_size: the train resolution in pixels.
        test_input_size: the evaluation resolution in pixels (default: ``input_size``).

    Returns:
        The pretrained cfg dict.

    Raises:
        ValueError: a ``tag`` other than lowercase letters, digits and ``_``, or a size below 1.
    """
    if tag is not None and not TAG_PATTERN.match(tag):
        raise ValueError(f'tag must be lowercase letters, digits and _ (like dm_in1k), got {tag!r}')
    for name, px in (('input_size', input_size), ('test_input_size', test_input_size)):
        if px is not None and px < 1:
            raise ValueError(f'{name} must be a positive number of pixels, got {px}')
    cfg = dict(model.pretrained_cfg)
    if input_size is not None or test_input_size is not None:
        chans = getattr(model, 'in_chans', 3)
        train = input_size if input_size is not None else cfg['input_size'][-1]
        test = test_input_size if test_input_size is not None else train
        cfg = pretrained_cfg_for_data(model, (chans, train, train), (chans, test, test),
                                      reference_crop_pct(train), reference_crop_pct(test))
    if not release_weights:
        cfg.pop('tag', None)
        cfg.pop('origin_url', None)
    if tag is not None:
        cfg['tag'] = tag
    return cfg


def convert(
        src: PathLike, out_dir: PathLike, model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None,
        overwrite: bool = False, tag: Optional[str] = None, input_size: Optional[int] = None,
        test_input_size: Optional[int] = None,
) -> Path:
    """Read ``src`` (any supported layout), load it into ``model_name``, and write the folder.

    ``config.json`` carries the cfg of ``conversion_cfg`` (``tag`` and the sizes given there).
    An output folder that already holds ``model.safetensors`` or ``config.json`` is refused unless
    ``overwrite``; a folder this call created is removed again if the conversion fails.

    Args:
        src: the weights file (DeepMind pickle/.npz, safetensors, or a weights-only torch file).
        out_dir: the output folder.
        model_name: a model name of this package, e.g. ``nfnet_f0``.
        model_kwargs: ``timm.create_model`` keywords (widths, depths, ...).
        overwrite: replace ``model.safetensors`` / ``config.json`` already in ``out_dir``.
        tag: ``config.json``'s pretrained tag (see :func:`conversion_cfg`).
        input_size: the train resolution of the weights in pixels.
        test_input_size: their evaluation resolution in pixels.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``out_dir`` is a file, or already holds the outputs and not ``overwrite``.
        FileNotFoundError: ``src`` does not exist.
        CheckpointError: ``src`` cannot be read safely, or does not fit the model.
        ValueError: an unknown ``model_name``, a bad ``tag`` or size.
        PermissionError: ``out_dir`` is not writable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'output {out_dir} exists and is not a folder')
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f'{out_dir} already holds {", ".join(existing)}: pass --overwrite to replace it')
    created = missing_folders(out_dir)
    try:
        state = load_checkpoint_file(src)
        model = build_model_from_state(state, model_name, model_kwargs)
        layout = detect_layout(state)
        model.pretrained_cfg = conversion_cfg(model, is_release_conversion(layout, model_kwargs), tag, input_size,
                                              test_input_size)
        meta = {'source': os.path.basename(os.fspath(src)), 'source_layout': layout}
        return save_model_folder(model, out_dir, meta)
    except BaseException:
        remove_empty_folders(created)  # nothing is left behind by a failed conversion
        raise


def _parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='timm-nfnet-convert',
        description='Convert DeepMind (F*_haiku.npz dill pickles, read safely), timm dm_nfnet or native '
                    'NFNet weights into model.safetensors + config.json for timm.')
    p.add_argument('src', help='checkpoint file: DeepMind pickle/.npz, safetensors, or weights-only .pth')
    p.add_argument('-o', '--output', required=True, help='output folder')
    p.add_argument('--model', required=True, help='timm model name, e.g. nfnet_f0')
    p.add_argument('--model-kwargs', default='{}', help='JSON object of create_model keywords (widths, depths, ...)')
    p.add_argument('--overwrite', action='store_true', help='replace model.safetensors/config.json already in -o')
    p.add_argument('--tag', help="config.json's pretrained tag (default: the model's release tag, e.g. dm_in1k, "
                                 "for DeepMind's or timm's layout in the registered architecture; else none)")
    p.add_argument('--input-size', type=int, metavar='PX', help='train resolution of the weights (default: the '
                                                                "model's); sets crop_pct to PX / (PX + 32)")
    p.add_argument('--test-input-size', type=int, metavar='PX', help='evaluation resolution (default: '
                                                                     '--input-size if given, else the model\'s)')
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``timm-nfnet-convert``.

    Args:
        argv: the command-line arguments; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 1 when the conversion fails, 2 for a bad ``--model-kwargs``
        (errors are printed to stderr).

    Raises:
        SystemExit: bad flags (from argparse), or ``--help``.
    """
    args = _parse_args(argv)
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        print(f'timm-nfnet-convert: --model-kwargs is not valid JSON: {e}', file=sys.stderr)
        return 2
    if not isinstance(kwargs, dict):
        print(f'timm-nfnet-convert: --model-kwargs must be a JSON object, got {args.model_kwargs}', file=sys.stderr)
        return 2
    try:
        out = convert(args.src, args.output, args.model, kwargs, overwrite=args.overwrite, tag=args.tag,
                      input_size=args.input_size, test_input_size=args.test_input_size)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        print(f'timm-nfnet-convert: error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {out / "model.safetensors"} and {out / "config.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
