"""Finding a release's source checkpoint: a local file, a URL (downloaded with progress), or a Hub file.

``--src`` takes:

- a local path (DeepMind ``F*_haiku.npz`` pickle, timm ``dm_nfnet_*`` safetensors, ...);
- an ``http(s)://`` URL, downloaded into the cache folder (default: the manifest's URL);
- ``hf-hub:ORG/NAME``: that repo's ``model.safetensors`` through huggingface_hub (e.g.
  ``hf-hub:timm/dm_nfnet_f0.dm_in1k``, timm's copy of DeepMind's F0 in timm's layout).

A DeepMind-format file (pickle or npz) must have the byte size and sha256 the manifest gives,
where it gives them; downloads are checked against them before they are kept.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Optional, Tuple
from urllib.parse import urlparse

from tqdm.auto import tqdm

from timm_nfnet_ext.weights.checkpoint import sniff_checkpoint_format
from timm_nfnet_ext.files import PathLike, atomic_path

from .manifest import Release

__all__ = ['SourceError', 'resolve_source', 'check_source_file', 'sha256_file', 'default_cache_dir']

_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class SourceError(ValueError):
    """A source checkpoint that cannot be fetched or is not the file the manifest describes."""


def default_cache_dir() -> Path:
    """Where downloaded sources are kept: ``$TIMM_NFNET_HUB_CACHE`` or ``~/.cache/timm_nfnet_hub``.

    Returns:
        The cache folder (it may not exist yet).
    """
    env = os.environ.get('TIMM_NFNET_HUB_CACHE')
    return Path(env) if env else Path.home() / '.cache' / 'timm_nfnet_hub'


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Args:
        path: the file.

    Returns:
        The lowercase hex digest.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            h.update(chunk)
    return h.hexdigest()


def is_deepmind_format(path: PathLike) -> bool:
    """A pickle (DeepMind's ``F*_haiku.npz``) or a numpy ``.npz``: the formats the manifest sizes describe
    (not safetensors or ``torch.save`` copies, whatever their first byte)."""
    return sniff_checkpoint_format(path) in ('pickle', 'npz')


def check_source_file(path: PathLike, size: Optional[int], sha256: Optional[str]) -> Optional[str]:
    """Check ``path`` against the expected byte size and sha256 (each where known).

    Returns the file's sha256 when one was expected (and so computed), else None: a multi-GB
    source is only read for a hash that is checked or recorded.

    Args:
        path: the file.
        size: the expected byte size, or None.
        sha256: the expected hex sha256, or None.

    Returns:
        The file's sha256 if ``sha256`` was given, else None.

    Raises:
        SourceError: the size or the sha256 differs.
        OSError: the file cannot be read.
    """
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise SourceError(
            f'{path}: {actual:,} bytes where {size:,} are expected: truncated, corrupt or the wrong file')
    if not sha256:
        return None
    digest = sha256_file(path)
    if digest != sha256.lower():
        raise SourceError(f'{path}: sha256 {digest} differs from the manifest\'s {sha256}')
    return digest


def _copy_with_progress(response: BinaryIO, out: BinaryIO, total: Optional[int], name: str) -> int:
    done = 0
    with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'download {name}') as bar:
        for chunk in iter(lambda: response.read(_CHUNK), b''):
            out.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    return done


def download(url: str, cache_dir: PathLike, size: Optional[int] = None,
             sha256: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    """Download ``url`` into ``cache_dir`` (kept if already there and valid); checked, then renamed into place.

    Returns the cached path and its sha256 when one was checked (else None)."""
    cache_dir = Path(cache_dir)
    name = os.path.basename(urlparse(url).path) or 'checkpoint'
    # keyed by the whole URL: two URLs ending in the same file name are different files
    final = cache_dir / f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}'
    if final.is_file():
        try:
            return final, check_source_file(final, size, sha256)
        except SourceError:
            pass  # a stale or damaged copy: fetch it again
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(final) as tmp:
            with open(tmp, 'wb') as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                length = response.headers.get('Content-Length')
                length = int(length) if length is not None else None
                if size is not None and length is not None and length != size:
                    raise SourceError(f'{url}: the server announces {length:,} bytes, the manifest says {size:,}')
                got = _copy_with_progress(response, out, length or size, name)
            if length is not None and got != length:
                raise SourceError(f'{url}: download cut short ({got:,} of {length:,} bytes)')
            digest = check_source_file(tmp, size, sha256)
        return final, digest
    except (urllib.error.URLError, OSError) as e:
        raise SourceError(f'cannot download {url}: {e}') from None


def _hub_file(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo_id, 'model.safetensors'))
    except Exception as e:  # connection, missing repo/file, offline mode without a cached copy
        raise SourceError(f'cannot fetch model.safetensors of hf-hub:{repo_id}: {type(e).__name__}: {e}') from None


def resolve_source(
        src: Optional[str],
        release: Release,
        cache_dir: Optional[PathLike] = None,
        expected_size: Optional[int] = None,
) -> Tuple[Path, Optional[str]]:
    """Turn ``--src`` (or the manifest URL when it is None) into a checked local file.

    The manifest's size and sha256 (or ``expected_size``) are enforced on DeepMind-format files;
    a safetensors copy (timm's or ours) is not the file they describe. Returns the path and its
    sha256 where checking computed it (None otherwise), so a multi-GB source is read once.

    Args:
        src: a local file, an ``http(s)://`` URL or ``hf-hub:ORG/NAME``; None for the manifest's URL.
        release: the manifest entry (its URL, size and sha256).
        cache_dir: where downloads are kept (default: :func:`default_cache_dir`).
        expected_size: a byte size to enforce instead of the manifest's (then no sha256 is checked).

    Returns:
        The local path and its sha256, or None where none was computed.

    Raises:
        SourceError: no source given and none in the manifest, a missing file, a failed download
            or Hub fetch, or a size or sha256 that differs.
    """
    size = expected_size if expected_size is not None else release.source_size
    sha = release.source_sha256 if expected_size is None else None
    if src is None:
        if not release.source_url:
            raise SourceError(f'release {release.key} has no source URL: pass --src')
        src = release.source_url
    if src.startswith('hf-hub:'):
        return _hub_file(src[len('hf-hub:'):]), None
    if src.startswith(('http://', 'https://')):
        # the manifest's size/sha describe the manifest's own URL, not any other file
        described = src == release.source_url or expected_size is not None
        return download(src, cache_dir or default_cache_dir(), size if described else None,
                        sha if described else None)
    path = Path(src)
    if not path.is_file():
        raise SourceError(f'source checkpoint not found: {path}')
    if is_deepmind_format(path) or expected_size is not None:
        return path, check_source_file(path, size, sha)
    return path, None
