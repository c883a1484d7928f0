"""Publishing into a local git repository laid out like a Hub mirror: ``MIRROR/models/ORG/NAME``.

A Hub model repo is a git repository whose large files live in git LFS. This writes the same
shape without needing git-lfs: a ``*.safetensors`` file (or any file over 10 MiB) is committed as
an LFS pointer and its content stored under ``.git/lfs/objects/``, exactly where ``git lfs``
keeps it, so ``git lfs checkout`` and mirror servers (olah's ``mirrors-path``) read it.

The commit is built with git's plumbing on a temporary index (HEAD's tree plus the new files,
like ``upload_folder``), and the branch moves only once the commit exists: a failure leaves the
repository as it was. A tree equal to HEAD's makes no commit.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from timm_nfnet_ext.files import PathLike

__all__ = ['GitMirrorError', 'mirror_repo_path', 'commit_folder', 'LFS_PATTERNS']

LFS_PATTERNS = ('*.safetensors', '*.bin', '*.pth', '*.npz', '*.pkl')
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub refuses plain git files above 10 MiB
GITATTRIBUTES = ''.join(f'{p} filter=lfs diff=lfs merge=lfs -text\n' for p in LFS_PATTERNS)
_ZERO_OID = '0' * 40
_IDENTITY = {'GIT_AUTHOR_NAME': 'timm-nfnet-hub', 'GIT_AUTHOR_EMAIL': 'timm-nfnet-hub@localhost',
             'GIT_COMMITTER_NAME': 'timm-nfnet-hub', 'GIT_COMMITTER_EMAIL': 'timm-nfnet-hub@localhost'}


class GitMirrorError(RuntimeError):
    """A mirror repository that cannot be written."""


def mirror_repo_path(mirror_root: PathLike, repo_id: str) -> Path:
    """``MIRROR/models/ORG/NAME``, where olah's ``mirrors-path`` looks for ``ORG/NAME``.

    Args:
        mirror_root: the mirror's root folder.
        repo_id: ``ORG/NAME``.

    Returns:
        The repository's path.

    Raises:
        GitMirrorError: ``repo_id`` is not ``ORG/NAME`` (or contains ``..``).
    """
    org, _, name = repo_id.partition('/')
    if not org or not name or '/' in name or '..' in repo_id:
        raise GitMirrorError(f'invalid repo id {repo_id!r}: expected ORG/NAME')
    return Path(mirror_root) / 'models' / org / name


def _git(repo: Path, *args: str, input: Optional[bytes] = None, env: Optional[Dict[str, str]] = None) -> str:
    full_env = {**os.environ, **{k: v for k, v in _IDENTITY.items() if not os.environ.get(k)}, **(env or {})}
    try:
        res = subprocess.run(['git', '-C', str(repo), *args], input=input, capture_output=True,
                             env=full_env, timeout=600, check=False)
    except FileNotFoundError:
        raise GitMirrorError('git is not installed (needed for --git-mirror)') from None
    except subprocess.TimeoutExpired:
        raise GitMirrorError(f'git {" ".join(args[:2])} timed out in {repo}') from None
    if res.returncode != 0:
        detail = res.stderr.decode(errors='replace').strip()
        raise GitMirrorError(f'git {" ".join(args[:2])} failed in {repo}: {detail}')
    return res.stdout.decode().strip()


def _open_repo(path: Path) -> None:
    if not path.exists():
        path.mkdir(parents=True)
        _git(path, 'init', '-q', '-b', 'main')
        return
    if not (path / '.git').is_dir():
        raise GitMirrorError(f'{path} exists but is not a (non-bare) git repository')
    if _git(path, 'status', '--porcelain', '--untracked-files=no'):
        raise GitMirrorError(f'{path} has uncommitted changes; commit or discard them first')


def _is_lfs(name: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


def _store_lfs(repo: Path, file: Path) -> bytes:
    """Copy ``file`` into ``.git/lfs/objects`` (content-addressed, with progress) and return its pointer text."""
    objects = repo / '.git' / 'lfs' / 'objects'
    incoming = repo / '.git' / 'lfs' / 'tmp'  # where git-lfs stages objects too
    incoming.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), file.stat().st_size
    fd, tmp = tempfile.mkstemp(dir=incoming, prefix='.object-')
    try:
        with open(file, 'rb') as src, os.fdopen(fd, 'wb') as dst, \
                tqdm(total=size, unit='B', unit_scale=True, unit_divisor=1024, desc=f'lfs {file.name}') as bar:
            for chunk in iter(lambda: src.read(1 << 20), b''):
                h.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
        oid = h.hexdigest()
        target = objects / oid[:2] / oid[2:4] / oid
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)  # same content, same name: replacing an existing object is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return f'version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n'.encode()


def _blobs(repo: Path, folder: Path, files: Sequence[str]) -> List[Tuple[str, str]]:
    """(path in repo, blob id) of each file, LFS pointers for the large ones, plus .gitattributes."""
    out = [('.gitattributes', _git(repo, 'hash-object', '-w', '--stdin', input=GITATTRIBUTES.encode()))]
    for name in files:
        path = folder / name
        if _is_lfs(name, path.stat().st_size):
            oid = _git(repo, 'hash-object', '-w', '--stdin', input=_store_lfs(repo, path))
        else:
            oid = _git(repo, 'hash-object', '-w', '--', str(path.resolve()))
        out.append((name, oid))
    return out


def commit_folder(
        folder: PathLike,
        repo_path: PathLike,
        message: str,
        files: Optional[Sequence[str]] = None,
) -> Tuple[str, bool]:
    """Commit ``files`` (default: every file) of ``folder`` into the git repo at ``repo_path``.

    Returns ``(head commit, True)`` when a commit was made, ``(head commit, False)`` when the
    content was already there.

    Args:
        folder: the folder whose files to commit.
        repo_path: the (non-bare) git repository, created if missing.
        message: the commit message.
        files: the file names to commit; None for every file of ``folder``.

    Returns:
        The head commit's id, and whether a commit was made.

    Raises:
        GitMirrorError: git is missing or fails, or ``repo_path`` is not a clean git repository.
    """
    folder, repo = Path(folder), Path(repo_path)
    files = sorted(files if files is not None else (p.name for p in folder.iterdir() if p.is_file()))
    _open_repo(repo)
    branch = _git(repo, 'symbolic-ref', '-q', 'HEAD')
    try:
        old = _git(repo, 'rev-parse', '-q', '--verify', f'{branch}^{{commit}}')
    except GitMirrorError:
        old = ''  # an empty repository: the first commit
    blobs = _blobs(repo, folder, files)
    with tempfile.TemporaryDirectory(prefix='timm-nfnet-hub-index-') as tmp:
        env = {'GIT_INDEX_FILE': str(Path(tmp) / 'index')}
        if old:
            _git(repo, 'read-tree', old, env=env)
        for name, oid in blobs:
            _git(repo, 'update-index', '--add', '--cacheinfo', f'100644,{oid},{name}', env=env)
        tree = _git(repo, 'write-tree', env=env)
    if old and tree == _git(repo, 'rev-parse', f'{old}^{{tree}}'):
        return old, False
    parents = ['-p', old] if old else []
    new = _git(repo, 'commit-tree', tree, *parents, '-m', message)
    _git(repo, 'update-ref', '-m', 'timm-nfnet-hub publish', branch, new, old or _ZERO_OID)
    _git(repo, 'reset', '-q', '--hard', new)  # the work tree was clean: show the new files
    return new, True
