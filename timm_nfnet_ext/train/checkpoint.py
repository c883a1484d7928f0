"""Crash-safe training checkpoints of ``timm-nfnet-train``.

A checkpoint is a dict of tensors and plain Python values only (RNG states included), so it
loads with ``torch.load(weights_only=True)``: nothing is unpickled. Files are written to a
temporary name in the same folder and renamed into place, so a killed run leaves either the
previous file or the new one, never half of one.

Every file written here is also recorded (size and SHA-256) in the folder's ``checksums.json``
*before* it is renamed into place (the entry of the content it replaces is kept too), so a
truncated, corrupt or half-copied checkpoint is recognised on resume and passed over for the
previous good one (:func:`verify`, :func:`find_latest`).
"""
from __future__ import annotations

import hashlib
import json
import logging
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
           'load_checkpoint', 'check_compatible', 'find_latest', 'list_checkpoints', 'remove_stale_temps',
           'verify', 'file_digest', 'CHECKSUMS']

_logger = logging.getLogger(__name__)

FORMAT = 'timm-nfnet-train'
VERSION = 1
REQUIRED = ('model', 'optimizer', 'epoch', 'step', 'global_step', 'identity', 'rng', 'history')
_TMP = re.compile(r'^\..+\.\d+\.tmp$')
CHECKPOINT_GLOB = ('last.pth.tar', 'previous.pth.tar', 'checkpoint-*.pth.tar')
CHECKSUMS = 'checksums.json'  # name -> [{size, sha256}, ...] of the files of this folder, newest first
_KEEP_DIGESTS = 2  # the new content's entry and the one it replaces (valid until the rename)


# --- RNG states as tensors and plain values --------------------------------------------------
def capture_rng() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors / ints / floats.

    Returns:
        ``{'python', 'numpy', 'torch'}`` (and ``'cuda'`` once CUDA is initialised), loadable with
        ``torch.load(weights_only=True)``.
    """
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
    """Undo :func:`capture_rng`.

    Args:
        state: a :func:`capture_rng` result; its CUDA states are restored only where CUDA is available.
    """
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss']))
    npy = state['numpy']
    np.random.set_state(('MT19937', npy['keys'].numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# --- checksums -------------------------------------------------------------------------------
def file_digest(path: os.PathLike) -> Dict[str, Any]:
    """``{'size', 'sha256'}`` of a file's content.

    Args:
        path: the file.

    Returns:
        ``{'size': bytes, 'sha256': hex digest}``.

    Raises:
        OSError: the file cannot be read.
    """
    hashing = _HashingWriter(None)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            hashing.write(block)
    return hashing.digest()


class _HashingWriter:
    """A binary file's ``write`` (and ``flush``) that also keeps the size and SHA-256 of what went
    through it, so that a checkpoint is hashed as it is written rather than read back (a file of
    several GB for the large variants); with ``file=None`` it only hashes."""

    def __init__(self, file: Optional[Any]):
        self.file, self.hash, self.size = file, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        n = memoryview(data).nbytes
        self.size += n
        if self.file is not None:
            self.file.write(data)
        return n

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def digest(self) -> Dict[str, Any]:
        return {'size': self.size, 'sha256': self.hash.hexdigest()}


def _read_checksums(folder: Path) -> Dict[str, List[Dict[str, Any]]]:
    try:
        table = json.loads((folder / CHECKSUMS).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _record(folder: Path, name: str, digests: List[Dict[str, Any]]) -> None:
    """Put ``digests`` first among the accepted contents of ``name`` (before ``name`` is replaced:
    the old content stays accepted until then). Entries of files now gone are dropped."""
    table = _read_checksums(folder)
    kept = [d for d in table.get(name, []) if d not in digests]
    table[name] = (list(digests) + kept)[:max(_KEEP_DIGESTS, len(digests))]
    table = {k: v for k, v in table.items() if k == name or (folder / k).exists()}
    write_text_atomic(json.dumps(table, indent=1, sort_keys=True) + '\n', folder / CHECKSUMS)


def verify(path: os.PathLike) -> Optional[str]:
    """Why ``path`` is not the complete file this command wrote (``None``: it is, or nothing was
    recorded for it, e.g. a checkpoint of an older version: then only loading it can tell).

    Args:
        path: the file, checked against its folder's ``checksums.json``.

    Returns:
        The reason it is damaged (truncated, half-written or corrupt), or ``None``.

    Raises:
        OSError: a file with recorded checksums that cannot be read (or no longer exists).
    """
    path = Path(path)
    entries = _read_checksums(path.parent).get(path.name)
    if not entries:
        return None
    size = path.stat().st_size
    sizes = sorted({d.get('size') for d in entries if isinstance(d, dict)}, key=str)
    if size not in sizes:
        return f'its size is {size} bytes, {CHECKSUMS} records {" or ".join(map(str, sizes))} (truncated or half-written)'
    if file_digest(path) not in entries:
        return f'its SHA-256 differs from the one recorded in {CHECKSUMS} (the file is corrupt)'
    return None


# --- atomic files (timm_nfnet_ext.files) ------------------------------------------------------
def save_atomic(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` to a temporary name next to ``path``, fsync, record its checksum, rename
    over ``path``.

    Args:
        obj: what to save (tensors and plain values, to load with ``weights_only=True``).
        path: the file to write.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        _record(path.parent, path.name, [writer.digest()])
    return path


def copy_atomic(src: os.PathLike, dst: os.PathLike) -> Path:
    """Give ``dst`` the content of ``src``: a hard link (or a copy) under a temporary name, renamed
    (its recorded checksum goes with it, within one folder).

    Args:
        src: the file to copy.
        dst: the file to write.

    Returns:
        ``dst``.
    """
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        recorded = _read_checksums(src.parent).get(src.name)
        if recorded and src.parent == dst.parent:
            _record(dst.parent, dst.name, recorded)
    return dst


def remove_stale_temps(folder: os.PathLike) -> List[Path]:
    """Delete temporary files a killed run of this command left in ``folder``.

    Args:
        folder: the run folder.

    Returns:
        The files deleted.
    """
    removed = []
    for p in Path(folder).iterdir():
        if p.is_file() and _TMP.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- reading ---------------------------------------------------------------------------------
def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint of this command safely (its size and SHA-256 checked against the folder's
    ``checksums.json`` first); ``TrainError`` naming the problem otherwise.

    Args:
        path: the checkpoint file.

    Returns:
        The checkpoint dict, its tensors on the CPU.

    Raises:
        TrainError: the file does not exist, does not match its recorded checksum, cannot be read
            with ``weights_only=True``, is not this command's, or is incomplete or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f'checkpoint {str(path)!r} does not exist')
    bad = verify(path)
    if bad:
        raise TrainError(f'checkpoint {str(path)!r} is damaged: {bad}')
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
    """Raise ``TrainError`` listing every way the checkpoint's run differs from this one.

    Args:
        ckpt: the checkpoint (its ``identity`` and ``step``).
        identity: this run's identity (``RunRecord.identity``).
        path: the checkpoint's file, for the message.

    Raises:
        TrainError: the model, its arguments, classes, optimizer, AGC, EMA or input pipeline differ, or the global batch
            differs for a checkpoint written in the middle of an epoch.
    """
    theirs = ckpt['identity']
    keys = ('model', 'model_args', 'num_classes', 'opt', 'agc', 'model_ema', 'data_pipeline')
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
    """This command's resumable checkpoints in ``folder``, newest first.

    Args:
        folder: the run folder.

    Returns:
        ``last``, ``previous`` and ``checkpoint-N`` files by modification time, newest first (empty
        when the folder does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in CHECKPOINT_GLOB for p in folder.glob(pattern)}
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_latest(folder: os.PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest good checkpoint of ``folder`` and its content (``None`` when there is none).
    A newer file that is damaged (truncated, corrupt, half-written, unreadable) is reported on
    the primary process's log and passed over: the previous good one is used.

    Args:
        folder: the run folder.

    Returns:
        ``(path, checkpoint)``, or ``None`` when the folder holds no checkpoint.

    Raises:
        TrainError: the folder holds checkpoints but none of them can be read.
    """
    errors: List[str] = []
    for path in list_checkpoints(folder):
        try:
            found = path, load_checkpoint(path)
        except TrainError as e:
            errors.append(str(e))
            continue
        if errors and int(os.environ.get('RANK', '0')) == 0:
            for error in errors:
                _logger.warning(f'--resume auto: skipped {error}')
            _logger.warning(f'--resume auto: using the previous good checkpoint {str(path)!r}')
        return found
    if errors:
        raise TrainError('--resume auto: no readable checkpoint in ' + str(folder) + ':\n  ' + '\n  '.join(errors))
    return None


def prune(folder: os.PathLike, keep: int, protect: Iterable[Path] = ()) -> None:
    """Keep the ``keep`` newest ``checkpoint-N.pth.tar`` files.

    Args:
        folder: the run folder.
        keep: how many to keep, by epoch number (at least 1).
        protect: files never deleted.
    """
    numbered = sorted(Path(folder).glob('checkpoint-*.pth.tar'),
                      key=lambda p: int(re.sub(r'\D', '', p.name) or 0), reverse=True)
    protect = {Path(p).resolve() for p in protect}
    for p in numbered[max(keep, 1):]:
        if p.resolve() not in protect:
            p.unlink(missing_ok=True)


def keep_previous(folder: os.PathLike, name: str = 'last.pth.tar', previous: str = 'previous.pth.tar') -> None:
    """Give ``previous`` the current content of ``name`` (a hard link), before ``name`` is replaced:
    the fallback when the newest file turns out damaged.

    Args:
        folder: the run folder.
        name: the file about to be replaced (nothing is done when it does not exist).
        previous: the fallback's name.
    """
    folder = Path(folder)
    if (folder / name).is_file():
        copy_atomic(folder / name, folder / previous)
