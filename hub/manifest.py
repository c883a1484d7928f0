"""The release manifest: which DeepMind checkpoints exist and where their converted copies go.

``manifest.json`` (next to this file) lists NFNet-F0..F6. A release names its source checkpoint
(URL, byte size and sha256 where known), the architecture that holds it (a timm model name plus
optional ``create_model`` keywords), its train/test resolutions, the published accuracy, the
licence and the name of the Hub repo it is published to. ``--manifest FILE`` swaps in another
manifest of the same format (tests use one with small architectures).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .names import TAG_PATTERN

__all__ = ['Release', 'ManifestError', 'DEFAULT_MANIFEST', 'load_manifest', 'get_release']

DEFAULT_MANIFEST = Path(__file__).with_name('manifest.json')


class ManifestError(ValueError):
    """A manifest that cannot be read, or a release that is not in it."""


@dataclass(frozen=True)
class Release:
    """One entry of the manifest (see ``manifest.json`` for the fields).

    Attributes:
        key: the release key, e.g. ``F0``.
        model: the registered model name it loads into.
        repo_name: the Hub repo name, ``<model>.<tag>``.
        title: the model card's title.
        source_url: where the source checkpoint is downloaded from, if anywhere.
        source_size: the source's byte size, if known.
        source_sha256: the source's sha256, if known.
        train_size: the train resolution in pixels.
        test_size: the evaluation resolution in pixels.
        params_m: the parameter count in millions.
        top1: the published ImageNet top-1, if any.
        top5: the published ImageNet top-5, if any.
        license: the weights' license.
        dataset: the training dataset.
        model_kwargs: ``timm.create_model`` keywords of the architecture.
        timm_repo_id: the Hub repo of timm's copy, for the timm reference check.
        timm_model: timm's model name for that copy.
        origin: ``'deepmind'`` (DeepMind's released weights) or ``'custom'``.
    """
    key: str
    model: str
    repo_name: str
    title: str
    source_url: Optional[str]
    source_size: Optional[int]
    source_sha256: Optional[str]
    train_size: int
    test_size: int
    params_m: float
    top1: Optional[float] = None
    top5: Optional[float] = None
    license: str = 'apache-2.0'
    dataset: str = 'imagenet-1k'
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    timm_repo_id: Optional[str] = None
    timm_model: Optional[str] = None
    origin: str = 'custom'

    @property
    def from_deepmind(self) -> bool:
        """DeepMind's own released weights (``"origin": "deepmind"``): the card then tells their training
        recipe and cites the accuracy they published.

        Returns:
            True for DeepMind's release.
        """
        return self.origin == 'deepmind'

    @property
    def tag(self) -> Optional[str]:
        """The pretrained tag the repo name carries after its dot (``nfnet_f0.dm_in1k`` -> ``dm_in1k``).

        Returns:
            The tag, or None for a repo name without a dot.
        """
        return self.repo_name.split('.', 1)[1] if '.' in self.repo_name else None

    def repo_id(self, namespace: str) -> str:
        """``namespace/repo_name``, the Hub repo this release is published to.

        Args:
            namespace: a Hub user or organisation name.

        Returns:
            The repo id.

        Raises:
            ManifestError: an empty namespace, one with ``/``, or a repo id the Hub rejects.
        """
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        if not namespace or '/' in namespace:
            raise ManifestError(f'invalid Hub namespace {namespace!r}: expected a user or organisation name')
        repo_id = f'{namespace}/{self.repo_name}'
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ManifestError(f'invalid Hub repo id {repo_id!r}: {e}') from None
        return repo_id


_REQUIRED = ('model', 'repo_name', 'source', 'train_size', 'test_size', 'params_m')


def _release_from_dict(key: str, d: Mapping[str, Any], where: str) -> Release:
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ManifestError(f'{where}: release {key!r} lacks {", ".join(missing)}')
    src = d['source'] or {}
    timm_src = d.get('timm_source') or {}
    size = src.get('size')
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ManifestError(f'{where}: release {key!r} has an invalid source size {size!r}')
    release = Release(
        key=key,
        model=d['model'],
        repo_name=d['repo_name'],
        title=d.get('title', key),
        source_url=src.get('url'),
        source_size=size,
        source_sha256=(src.get('sha256') or None),
        train_size=int(d['train_size']),
        test_size=int(d['test_size']),
        params_m=float(d['params_m']),
        top1=d.get('top1'),
        top5=d.get('top5'),
        license=d.get('license', 'apache-2.0'),
        dataset=d.get('dataset', 'imagenet-1k'),
        model_kwargs=dict(d.get('model_kwargs') or {}),
        timm_repo_id=timm_src.get('repo_id'),
        timm_model=timm_src.get('model'),
        origin=_origin(d.get('origin', 'custom'), key, where),
    )
    if release.tag is not None and not TAG_PATTERN.match(release.tag):
        raise ManifestError(f'{where}: release {key!r} has repo name {release.repo_name!r}: after its dot comes '
                            'the pretrained tag, lowercase letters, digits and _ (like nfnet_f0.dm_in1k)')
    return release


def _origin(value: Any, key: str, where: str) -> str:
    if value not in ('deepmind', 'custom'):
        raise ManifestError(f'{where}: release {key!r} has origin {value!r}; expected "deepmind" or "custom"')
    return value


def load_manifest(path: Optional[Union[str, 'os.PathLike[str]']] = None) -> Dict[str, Release]:
    """Read a manifest (the packaged one by default) into ``{key: Release}``.

    Args:
        path: the manifest file; None for the packaged ``manifest.json``.

    Returns:
        The releases by key, in the file's order.

    Raises:
        ManifestError: a missing file, invalid JSON, an unknown format, or an invalid release entry.
    """
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f'manifest not found: {path}') from None
    except json.JSONDecodeError as e:
        raise ManifestError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(data, dict) or data.get('format') != 1 or not isinstance(data.get('releases'), dict):
        raise ManifestError(f'{path}: expected {{"format": 1, "releases": {{...}}}}')
    return {k: _release_from_dict(k, v, str(path)) for k, v in data['releases'].items()}


def get_release(name: str, manifest: Optional[Union[str, 'os.PathLike[str]']] = None) -> Release:
    """Look a release up by key (``F0``) or repo name (``nfnet_f0.dm_in1k``).

    Args:
        name: the release key or repo name.
        manifest: the manifest file; None for the packaged one.

    Returns:
        The release.

    Raises:
        ManifestError: the manifest cannot be read, or has no such release.
    """
    releases = load_manifest(manifest)
    if name in releases:
        return releases[name]
    for rel in releases.values():
        if name == rel.repo_name:
            return rel
    raise ManifestError(f'unknown release {name!r}; the manifest has {", ".join(releases)}')
