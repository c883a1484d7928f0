"""Writing files so that a crash or a kill never leaves half of one.

One idea, used by every writer in the package (training checkpoints, exported and converted
weights, Hub release folders, downloads, results files): write under a temporary name in the
target's own folder, then ``os.replace`` it into place, which is atomic on one filesystem.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Union

__all__ = ['PathLike', 'atomic_path', 'write_text_atomic', 'staged_folder']

PathLike = Union[str, 'os.PathLike[str]']


def temp_name(path: Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under (hidden, per process)."""
    return path.with_name(f'.{path.name}.{os.getpid()}.tmp')


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary name next to ``path`` to write; renamed over ``path`` when the block succeeds.

    Args:
        path: the file to create or replace.

    Yields:
        The temporary path to write (it does not exist yet).

    On an exception ``path`` keeps its old content (or stays absent) and the temporary file is
    removed; a killed process leaves only a hidden ``.NAME.PID.tmp`` beside it.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: PathLike) -> Path:
    """Writes a text file (UTF-8) through :func:`atomic_path`; returns its path.

    Args:
        text: the file's content.
        path: the file to write (replaced atomically if it exists).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')
    return Path(path)


@contextlib.contextmanager
def staged_folder(out_dir: PathLike, names: Iterable[str]) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` to write a set of files; moved into place on success.

    Args:
        out_dir: the destination folder (created if missing).
        names: the files the block writes into the staging folder; each replaces its namesake in
            ``out_dir`` (with the usual permissions, not the staging folder's 0600).

    Yields:
        The staging folder.

    Raises:
        PermissionError: ``out_dir`` is not writable.

    On an exception nothing in ``out_dir`` changes, and an ``out_dir`` this call created is
    removed again.
    """
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not os.access(out, os.W_OK):
            raise PermissionError(f'output folder is not writable: {out}')
        with tempfile.TemporaryDirectory(dir=out, prefix='.tmp-') as tmp:
            stage = Path(tmp)
            yield stage
            umask = os.umask(0)
            os.umask(umask)
            for name in names:
                os.chmod(stage / name, 0o666 & ~umask)
                os.replace(stage / name, out / name)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
