"""Build a release's model from its source checkpoint and prove the conversion right before anything is written.

Checks, each raising ``ValidationError`` with what failed:

1. the weights load strictly (every tensor used, none missing, shapes equal) and are all finite;
2. the parameter count matches the manifest's (the paper's, in millions to 0.1) and the source's
   own element count (nothing dropped or duplicated);
3. the outputs of the source are reproduced on a fixed input:
   - ``reference``: DeepMind's own outputs (a folder with ``input.npy`` and ``logits.npy``, as
     written by DeepMind's JAX code; see tests/fixtures/dm_reference), to 1e-4 relative;
   - a timm-layout source (timm's ``dm_nfnet_*``): timm's own model holding the same file,
     patched to DeepMind's numerics (see ``timm_reference``), both in float64, to 1e-6 relative;
   - ``cross_check``: a second copy of the same weights in another layout (e.g. DeepMind's pickle
     against timm's hosted safetensors) must give the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from timm_nfnet_ext.weights.checkpoint import detect_layout, load_checkpoint_file
from timm_nfnet_ext.weights.convert import build_model_from_state
from timm_nfnet_ext.files import PathLike
from timm_nfnet_ext.variants import variant_of

from .manifest import Release
from .timm_reference import timm_reference_model

__all__ = ['ValidationError', 'BuiltModel', 'build_and_validate', 'check_release_facts', 'fixed_input', 'check_outputs', 'OUTPUT_RTOL']

OUTPUT_RTOL = 1e-4       # max |ours - reference| / max(1, max |reference|), float32 reference outputs
TIMM_RTOL = 1e-6         # the same, against timm's model, both run in float64
TENSOR_ATOL = 1e-6       # two copies of the same weights, tensor by tensor
FIXED_INPUT_SIZE = 64    # px: the last stage still sees 2x2, so every tap of every 3x3 kernel counts


class ValidationError(ValueError):
    """A converted model that does not prove equal to its source."""


@dataclass
class BuiltModel:
    """A validated model and what is known about where it came from.

    ``checks`` are the console lines (with measured errors); ``proofs`` the same checks in words
    that do not depend on the machine, for the model card.

    Attributes:
        release: the manifest entry.
        model: the loaded model, in eval mode.
        source: the source checkpoint file.
        source_layout: its layout (``deepmind``, ``timm`` or ``native``).
        checks: the passed checks, as console lines.
        proofs: the passed checks, for the model card.
        outputs_checked: whether a check compared outputs or tensors with an independent source.
    """
    release: Release
    model: nn.Module
    source: Path
    source_layout: str
    checks: List[str] = field(default_factory=list)
    proofs: List[str] = field(default_factory=list)
    outputs_checked: bool = False

    def record(self, detail: str, proof: str, outputs: bool = False) -> None:
        """Note a passed check; ``outputs`` when it compared outputs or tensors with an independent source.

        Args:
            detail: the console line.
            proof: the model card's line.
            outputs: the check compared outputs or tensors with an independent source.
        """
        self.checks.append(detail)
        self.proofs.append(proof)
        self.outputs_checked |= outputs


def fixed_input(model: nn.Module, size: int = FIXED_INPUT_SIZE, batch: int = 1) -> torch.Tensor:
    """A seeded N(0, 1) batch: the same numbers on every run and machine.

    Args:
        model: the model (its ``in_chans`` sets the channels).
        size: height and width in pixels.
        batch: the batch size.

    Returns:
        A float32 ``(batch, in_chans, size, size)`` tensor.
    """
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.in_chans, size, size, generator=gen)


def check_outputs(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = OUTPUT_RTOL) -> float:
    """Raise unless ``got`` reproduces ``expected`` to ``rtol`` of max(1, max |expected|); return the error.

    Args:
        got: the converted model's outputs.
        expected: the reference outputs.
        what: what is compared, for the error message.
        rtol: the largest error allowed, relative to max(1, max |expected|).

    Returns:
        The relative error.

    Raises:
        ValidationError: the shapes differ, ``got`` is not finite, or the error exceeds ``rtol``.
    """
    if got.shape != expected.shape:
        raise ValidationError(f'{what}: output shape {tuple(got.shape)} differs from {tuple(expected.shape)}')
    if not torch.isfinite(got).all():
        raise ValidationError(f'{what}: the converted model produces non-finite outputs')
    err = (got.double() - expected.double()).abs().max().item() / max(1.0, expected.abs().max().item())
    if not err <= rtol:  # also catches NaN
        raise ValidationError(f'{what}: outputs do not reproduce the source (max relative error {err:.3g} > {rtol:g})')
    return err


def _numel(state: Mapping[str, Any]) -> int:
    return int(sum(np.asarray(v).size if not torch.is_tensor(v) else v.numel() for v in state.values()))


def _check_params(model: nn.Module, state: Mapping[str, Any], release: Release) -> Tuple[str, str]:
    n = sum(p.numel() for p in model.parameters())
    if round(n / 1e6, 1) != round(release.params_m, 1):
        raise ValidationError(
            f'wrong parameter count: the model has {n:,} ({n / 1e6:.1f}M), '
            f'release {release.key} expects {release.params_m}M')
    n_src = _numel(state)
    n_state = sum(t.numel() for t in model.state_dict().values())
    if n_src != n_state:
        raise ValidationError(f'the source holds {n_src:,} values, the model {n_state:,}')
    return (f'parameters: {n:,} ({n / 1e6:.1f}M, as the manifest says); every source value used',
            f'{n:,} parameters, every value of the source used once')


def _check_reference(model: nn.Module, reference: PathLike) -> Tuple[str, str]:
    ref = Path(reference)
    try:
        x = torch.from_numpy(np.load(ref / 'input.npy', allow_pickle=False))
        expected = torch.from_numpy(np.load(ref / 'logits.npy', allow_pickle=False))
    except (OSError, ValueError) as e:
        raise ValidationError(f'reference outputs in {ref} cannot be read (need input.npy, logits.npy): {e}') from None
    with torch.no_grad():
        err = check_outputs(model(x.float()), expected, f'reference {ref}')
    return (f'reproduces the reference outputs in {ref.name} (max relative error {err:.1e})',
            f'reproduces outputs computed by DeepMind\'s code ({ref.name}) to {OUTPUT_RTOL:.0e} (relative)')


def _check_against_timm(model: nn.Module, state: Mapping[str, Any], release: Release) -> Tuple[str, str]:
    """Our model and timm's, holding the same timm-layout tensors, on one input, in float64.

    float64 because float32 rounding alone moves a full-size F0's logits by up to ~1e-4 relative
    (either port against an exact computation), while a mapping mistake moves them by 1e-2 to 1:
    in float64 the two ports agree to ~1e-7, which leaves a wide margin on both sides. One model
    is in float64 at a time; ours goes back to float32 bit-exactly.
    """
    x = fixed_input(model).double()
    with torch.no_grad():
        try:
            ours = model.double()(x)
        finally:
            model.float()
        ref = timm_reference_model(model, state, release.timm_model if not release.model_kwargs else None)
        expected = ref.double()(x)
        del ref
    err = check_outputs(ours, expected, 'timm cross-check', rtol=TIMM_RTOL)
    return (f'reproduces timm\'s own model on the same file (patched to DeepMind numerics, float64; '
            f'max relative error {err:.1e})',
            f'reproduces timm\'s own NFNet holding the source file (patched to DeepMind\'s numerics, float64) '
            f'to {TIMM_RTOL:.0e} (relative)')


def _check_same_weights(model: nn.Module, other: nn.Module, what: str) -> Tuple[str, str]:
    worst, worst_name = 0.0, ''
    theirs = other.state_dict()
    for name, t in model.state_dict().items():
        diff = (t.double() - theirs[name].double()).abs().max().item()
        if not diff <= worst:
            worst, worst_name = diff, name
    if not worst <= TENSOR_ATOL:
        raise ValidationError(f'{what} holds other weights: {worst_name} differs by {worst:.3g}')
    return f'same tensors as {what} (max difference {worst:.1e})', f'same tensors as {what}'


def load_model(src: PathLike, release: Release) -> Tuple[nn.Module, Mapping[str, Any], str]:
    """(model, state, layout) for a source file, loaded strictly into the release's architecture."""
    state = load_checkpoint_file(src)
    return build_model_from_state(state, release.model, release.model_kwargs), state, detect_layout(state)


def check_release_facts(release: Release) -> None:
    """A DeepMind release's sizes, parameter count, accuracy and source must be the variant
    table's (``timm_nfnet_ext.variants``): the manifest and the model card cannot drift from it.

    Args:
        release: the manifest entry (releases not from DeepMind pass unchecked).

    Raises:
        ValidationError: naming each field that differs.
    """
    variant = variant_of(release.model)
    if not release.from_deepmind or variant is None or release.model != variant.name:
        return
    expected = dict(train_size=variant.train_size, test_size=variant.test_size, params_m=variant.params_m,
                    top1=variant.top1, top5=variant.top5, source_url=variant.weights_url)
    wrong = [f'{k} {getattr(release, k)!r} (the variant table says {v!r})'
             for k, v in expected.items() if getattr(release, k) != v]
    if wrong:
        raise ValidationError(f'{release.model}: the manifest disagrees with DeepMind\'s release: ' + '; '.join(wrong))


def build_and_validate(
        release: Release,
        src: PathLike,
        reference: Optional[PathLike] = None,
        cross_check: Optional[PathLike] = None,
        cross_check_label: Optional[str] = None,
) -> BuiltModel:
    """Load ``src`` into the release's model and run every check that applies (see the module doc).

    ``cross_check_label`` names the second copy in messages and the card (default: its file name).

    Args:
        release: the manifest entry.
        src: the source checkpoint file.
        reference: a folder with DeepMind's ``input.npy`` and ``logits.npy`` to reproduce, if any.
        cross_check: a second copy of the weights whose tensors must match, if any.
        cross_check_label: how that copy is named.

    Returns:
        The model and the checks it passed.

    Raises:
        ValidationError: a check fails (release facts, parameter count, outputs, tensors).
        CheckpointError: a source that cannot be read safely, or does not fit the architecture.
        TimmReferenceError: the timm cross-check cannot build timm's model for these weights.
        FileNotFoundError: ``src`` or ``cross_check`` does not exist.
    """
    check_release_facts(release)
    model, state, layout = load_model(src, release)
    built = BuiltModel(release, model, Path(src), layout)
    built.record(f'source layout: {layout}; loads strictly',
                 f'{layout} layout, loaded strictly (no tensor missing or extra)')
    built.record('all values finite', 'all values finite')  # build_model_from_state refuses NaN/inf
    built.record(*_check_params(model, state, release))
    if layout == 'timm':
        built.record(*_check_against_timm(model, state, release), outputs=True)
    if reference is not None:
        built.record(*_check_reference(model, reference), outputs=True)
    if cross_check is not None:
        other, _, other_layout = load_model(cross_check, release)
        label = f'{cross_check_label or Path(cross_check).name} ({other_layout} layout)'
        built.record(*_check_same_weights(model, other, label), outputs=True)
    return built


def describe_unchecked(built: BuiltModel) -> Optional[str]:
    """A warning when nothing independent checked the outputs (a DeepMind or native source, no reference)."""
    if built.outputs_checked:
        return None
    return ('no reference outputs checked: pass --reference DIR (DeepMind outputs) or --cross-check SRC '
            '(e.g. hf-hub:' + (built.release.timm_repo_id or 'timm/dm_nfnet_fN.dm_in1k') + ')')
