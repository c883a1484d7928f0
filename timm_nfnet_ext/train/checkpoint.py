"""Crash-safe training checkpoints of ``timm-nfnet-train``.

A checkpoint is a dict of tensors and plain Python values only (RNG states included), so it
loads with ``torch.load(weights_only=True)``: nothing is unpickled. Files are written to a
temporary name in the same folder and renamed into place, so a killed run leaves either the
previous file or the new one, never half of one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..files import atomic_path, write_text_atomic
from .recipe import TrainError

__all__ = ['FORMAT', 'capture_rng', 'restore_rng', 'save_atomic', 'copy_atomic', 'write_text_atomic',
           'load_checkpoint', 'check_compatible', 'find_latest', 'list_checkpoints', 'remove_stale_temps']

FORMAT = 'timm-nfnet-train'
VERSION = 1
REQUIRED = ('model', 'optimizer', 'epoch', 'step', 'global_step', 'identity', 'rng', 'history')
_TMP = re.compile(r'^\..+\.\d+\.tmp$')
CHECKPOINT_GLOB = ('last.pth.tar', 'checkpoint-*.pth.tar')


# --- RNG states as tensors and plain values --------------------------------------------------
def capture_rng() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors / ints / floats."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        'python': {'version': version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss': gauss},
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss']))
    npy = state['numpy']
    np.random.set_state(('MT19937', npy['keys'].numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# --- atomic files (timm_nfnet_ext.files) ------------------------------------------------------
def save_atomic(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` to a temporary name next to ``path``, fsync, rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def copy_atomic(src: os.PathLike, dst: os.PathLike) -> Path:
    """Give ``dst`` the content of ``src``: a hard link (or a copy) under a temporary name, renamed."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def remove_stale_temps(folder: os.PathLike) -> List[Path]:
    """Delete temporary files a killed run of this command left in ``folder``."""
    removed = []
    for p in Path(folder).iterdir():
        if p.is_file() and _TMP.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- reading ---------------------------------------------------------------------------------
def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint of this command safely; ``TrainError`` naming the problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f'checkpoint {str(path)!r} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainError(f'cannot read checkpoint {str(path)!r}: it is corrupt, truncated, or holds '
                         f'more than tensors and plain values ({reason})') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f'{str(path)!r} is not a {FORMAT} checkpoint (found {keys}); --resume needs '
                         'a last.pth.tar / checkpoint-N.pth.tar written by this command')
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing or ckpt.get('version') != VERSION:
        raise TrainError(f'checkpoint {str(path)!r} is incomplete or of another version '
                         f'(missing {missing}, version {ckpt.get("version")!r}, expected {VERSION})')
    return ckpt


def check_compatible(ckpt: Mapping[str, Any], identity: Mapping[str, Any], path: str) -> None:
    """Raise ``TrainError`` listing every way the checkpoint's run differs from this one."""
    theirs = ckpt['identity']
    keys = ('model', 'model_args', 'num_classes', 'opt', 'agc', 'model_ema')
    diffs = [f'{k}: checkpoint {theirs.get(k)!r}, now {identity.get(k)!r}'
             for k in keys if _norm(theirs.get(k)) != _norm(identity.get(k))]
    if ckpt['step'] and theirs.get('global_batch') != identity.get('global_batch'):
        diffs.append(f"global batch: checkpoint {theirs.get('global_batch')}, now {identity.get('global_batch')} "
                     '(a run stopped mid-epoch continues only with the same global batch)')
    if diffs:
        raise TrainError(f'checkpoint {path!r} belongs to a different run:\n  ' + '\n  '.join(diffs))


def _norm(v: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint stores lists)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    return v


def list_checkpoints(folder: os.PathLike) -> List[Path]:
    """This command's resumable checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in CHECKPOINT_GLOB for p in folder.glob(pattern)}
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_latest(folder: os.PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest readable checkpoint of ``folder`` and its content (``None`` when there is none)."""
    errors: List[str] = []
    for path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except TrainError as e:
            errors.append(str(e))
    if errors:
        raise TrainError('--resume auto: no readable checkpoint in ' + str(folder) + ':\n  ' + '\n  '.join(errors))
    return None


def prune(folder: os.PathLike, keep: int, protect: Iterable[Path] = ()) -> None:
    """Keep the ``keep`` newest ``checkpoint-N.pth.tar`` files."""
    numbered = sorted(Path(folder).glob('checkpoint-*.pth.tar'),
                      key=lambda p: int(re.sub(r'\D', '', p.name) or 0), reverse=True)
    protect = {Path(p).resolve() for p in protect}
    for p in numbered[max(keep, 1):]:
        if p.resolve() not in protect:
            p.unlink(missing_ok=True)
