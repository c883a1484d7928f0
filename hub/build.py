"""One release, source to folder: fetch, convert, validate, write ``model.safetensors``, ``config.json``, ``README.md``.

The three files are written and checked in a temporary folder inside the output folder and
moved into place only after every check passed, including a reload of the written folder
through timm (``local-dir:``, the same code path as ``hf-hub:``) that must give bit-identical
outputs. A failure leaves no file behind (and removes the output folder if this created it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from timm_nfnet_ext import __version__ as EXT_VERSION
from timm_nfnet_ext.weights.convert import conversion_cfg, save_model_folder
from timm_nfnet_ext.files import PathLike, staged_folder

from .card import render_card
from .manifest import Release
from .sources import resolve_source, sha256_file
from .validate import BuiltModel, ValidationError, build_and_validate, fixed_input

__all__ = ['FILES', 'BuildResult', 'build_release', 'converter_name']

FILES = ('model.safetensors', 'config.json', 'README.md')


def converter_name() -> str:
    """The converter named in metadata and model cards.

    Returns:
        ``timm-nfnet-ext <version>``.
    """
    return f'timm-nfnet-ext {EXT_VERSION}'


@dataclass
class BuildResult:
    """A validated release folder, ready to publish.

    Attributes:
        folder: the release folder.
        repo_id: the Hub repo it is built for.
        built: the validated model and the checks it passed.
        source_sha256: the source checkpoint's sha256.
    """
    folder: Path
    repo_id: str
    built: BuiltModel
    source_sha256: str

    @property
    def files(self) -> List[Path]:
        """The release's files.

        Returns:
            The paths of ``FILES`` in ``folder``.
        """
        return [self.folder / name for name in FILES]


def source_label(src: Optional[str], release: Release) -> str:
    """How the source is named in metadata and the card: the URL or ``hf-hub:`` id, or a local file's name."""
    if src is None:
        return release.source_url or ''
    if src.startswith(('hf-hub:', 'http://', 'https://')):
        return src
    return Path(src).name  # not the local path: it would be published


def _metadata(built: BuiltModel, label: str, source_sha256: str) -> dict:
    rel = built.release
    return {
        'release': rel.key,
        'source': label,
        'original_url': rel.source_url or '',
        'source_sha256': source_sha256,
        'source_layout': built.source_layout,
        'conversion': f'{converter_name()} timm-nfnet-hub: {built.source_layout} layout -> native, validated',
    }


def _check_round_trip(folder: Path, built: BuiltModel) -> None:
    """The written folder, loaded the way users load it, must compute exactly what the checked model computes."""
    import timm
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = fixed_input(built.model)
    with torch.no_grad():
        if not torch.equal(reloaded(x), built.model(x)):
            raise ValidationError(f'the written files in {folder} do not reload to the same model')


def release_pretrained_cfg(model: torch.nn.Module, release: Release) -> dict:
    """What ``config.json`` must carry: the conversion's cfg (``conversion_cfg``: DeepMind's
    tag and ``origin_url`` only for DeepMind's releases) at the release's sizes and crops, with
    its licence and the tag its repo name carries (none without one)."""
    cfg = conversion_cfg(model, release.from_deepmind, release.tag, release.train_size, release.test_size)
    if release.tag is None:
        cfg.pop('tag', None)
    cfg['license'] = release.license
    return cfg


def _write_staged(built: BuiltModel, stage: Path, repo_id: str, label: str, source_sha256: str) -> None:
    built.model.pretrained_cfg = release_pretrained_cfg(built.model, built.release)
    save_model_folder(built.model, stage, _metadata(built, label, source_sha256))
    proofs = built.proofs + ['the written files reload through timm (`local-dir:`, as `hf-hub:` does) '
                             'to identical outputs']
    card = render_card(built.release, repo_id, f'`{label}` ({built.source_layout} layout)', source_sha256,
                       converter_name(), proofs)
    (stage / 'README.md').write_text(card, encoding='utf-8')
    _check_round_trip(stage, built)


def write_release_folder(built: BuiltModel, out_dir: PathLike, repo_id: str, label: str, source_sha256: str) -> Path:
    """Write the three files into ``out_dir``, all or nothing."""
    with staged_folder(out_dir, FILES) as stage:
        _write_staged(built, stage, repo_id, label, source_sha256)
    return Path(out_dir)


def build_release(
        release: Release,
        out_dir: PathLike,
        repo_id: str,
        src: Optional[str] = None,
        reference: Optional[PathLike] = None,
        cross_check: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        expected_size: Optional[int] = None,
) -> BuildResult:
    """Fetch and check the source, build and validate the model, and write the release folder.

    Args:
        release: the manifest entry.
        out_dir: the release folder to write (its three files are replaced all or nothing).
        repo_id: the Hub repo it is built for (named in ``config.json`` and the card).
        src: a local file, URL or ``hf-hub:ORG/NAME``; None for the manifest's URL.
        reference: a local copy of timm's weights for the timm reference check, if any.
        cross_check: a second source (same forms as ``src``) whose model must agree.
        cache_dir: where downloads are kept (default: ``sources.default_cache_dir()``).
        expected_size: the source's byte size, where the manifest does not describe the file.

    Returns:
        The written folder, with the validated model and the source's sha256.

    Raises:
        SourceError: the source cannot be fetched or is not the file the manifest describes.
        ValidationError: the built model fails a check.
        CheckpointError: the source cannot be read safely, or does not fit the architecture.
        TimmReferenceError: the timm cross-check cannot build timm's model for these weights.
        PermissionError: ``out_dir`` is not writable.
    """
    src_path, digest = resolve_source(src, release, cache_dir, expected_size)
    other = resolve_source(cross_check, release, cache_dir)[0] if cross_check else None
    built = build_and_validate(release, src_path, reference=reference,
                               cross_check=other, cross_check_label=cross_check)
    digest = digest or sha256_file(src_path)
    folder = write_release_folder(built, out_dir, repo_id, source_label(src, release), digest)
    return BuildResult(folder, repo_id, built, digest)
