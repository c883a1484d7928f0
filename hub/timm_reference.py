"""timm's own NFNet (``NormFreeNet``, the ``dm_nfnet_*`` models) as an independent check of a conversion.

timm's port differs from DeepMind's numerics by design: exact-erf GELU where JAX uses the tanh
form, and weight standardisation as ``(w - mean) / sqrt(var + eps)`` where DeepMind uses
``rsqrt(max(var * fan_in, 1e-4))``. On a full-size F0 those differences move logits by up to
~0.25, as much as some mapping mistakes would. So the reference is built *patched to DeepMind's
numerics*: tanh GELU in every activation and ``eps`` negligible (1e-10; timm refuses 0). With
trained or random weights (``var * fan_in`` above DeepMind's 1e-4 floor in every channel) the
patched model then agrees with this package's to ~1e-7 relative in float64 (float32 rounding
alone reaches ~1e-4 on a full-size F0), and a wrong mapping (swapped convs, a transposed
kernel, a misplaced gain) shows up as 1e-2 to 1.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:  # for annotations only
    from timm.models.nfnet import NfCfg

    from timm_nfnet_ext.models import NfNetCfg

__all__ = ['TimmReferenceError', 'timm_nfcfg', 'timm_reference_model']

# Activations (same names in both) that timm's NormFreeNet has gamma constants for.
_TIMM_ACTS = frozenset({'gelu', 'relu', 'silu', 'elu', 'celu', 'tanh'})
PATCHED_EPS = 1e-10


class TimmReferenceError(ValueError):
    """An architecture timm's NormFreeNet cannot express, or weights it cannot load."""


def _single(values, name: str):
    values = list(values)
    if len(set(values)) != 1:
        raise TimmReferenceError(f'timm NormFreeNet needs one {name} for all stages, got {values}')
    return values[0]


def timm_nfcfg(cfg: NfNetCfg, std_conv_eps: float = 1e-5) -> NfCfg:
    """The timm ``NfCfg`` of the same architecture as this package's ``NfNetCfg`` (DeepMind NFNet layout).

    Args:
        cfg: this package's architecture.
        std_conv_eps: the eps of timm's ``ScaledStdConv2d``.

    Returns:
        timm's config of the same network.

    Raises:
        TimmReferenceError: an architecture timm's NormFreeNet cannot express (stem widths not
            derived from ``widths[0]``, other strides, the input-width bottleneck, per-stage group
            widths or expansions that differ, or an activation timm has no gamma for).
    """
    from timm.models.nfnet import NfCfg
    stem = cfg.widths[0] // 2
    if tuple(cfg.stem_widths) != (stem // 8, stem // 4, stem // 2):
        raise TimmReferenceError(
            f'timm derives the stem widths from widths[0]: it needs {(stem // 8, stem // 4, stem // 2)}, '
            f'this model has {tuple(cfg.stem_widths)}')
    if tuple(cfg.strides) != (1, 2, 2, 2) or not cfg.big_width:
        raise TimmReferenceError('timm NormFreeNet only has strides (1, 2, 2, 2) and the output-width bottleneck')
    if cfg.activation not in _TIMM_ACTS:
        raise TimmReferenceError(f'no timm NormFreeNet counterpart for activation {cfg.activation!r}')
    return NfCfg(
        depths=tuple(cfg.depths), channels=tuple(cfg.widths), alpha=cfg.alpha,
        stem_type='deep_quad', stem_chs=stem,
        group_size=_single(cfg.per_stage('group_width'), 'group width'),
        bottle_ratio=_single(cfg.per_stage('expansion'), 'expansion'),
        attn_layer='se', attn_kwargs=dict(rd_ratio=cfg.se_ratio), attn_gain=2.0,
        num_features=int(cfg.widths[-1] * cfg.final_conv_mult), extra_conv=cfg.use_two_convs,
        gamma_in_act=True, same_padding=True, skipinit=True, std_conv_eps=std_conv_eps,
        act_layer=cfg.activation,
    )


def _patch_to_deepmind_numerics(model: nn.Module, activation: str) -> None:
    from timm.layers import get_act_fn
    from timm.models.nfnet import GammaAct
    for module in model.modules():
        if isinstance(module, GammaAct) and activation == 'gelu':
            module.act_fn = get_act_fn('gelu_tanh')


def timm_reference_model(
        ours: nn.Module,
        timm_state: Mapping[str, torch.Tensor],
        timm_model_name: Optional[str] = None,
) -> nn.Module:
    """timm's NormFreeNet holding ``timm_state`` (timm layout), patched to DeepMind numerics, in eval mode.

    ``timm_model_name`` (e.g. ``dm_nfnet_f0``) builds timm's registered model; without it the
    architecture is translated from ``ours.cfg``.

    Args:
        ours: this package's model of the same architecture (an ``NFNet``).
        timm_state: the weights in timm's layout.
        timm_model_name: a registered timm model to build, or None to translate ``ours.cfg``.

    Returns:
        timm's model holding ``timm_state``, in eval mode.

    Raises:
        TimmReferenceError: an architecture timm cannot express, or weights that do not fit it.
    """
    import timm
    from timm.models.nfnet import NormFreeNet
    kwargs = dict(num_classes=ours.num_classes, in_chans=ours.in_chans)
    with torch.device('meta'):  # no random init: every tensor comes from timm_state
        if timm_model_name:
            ref = timm.create_model(timm_model_name, std_conv_eps=PATCHED_EPS, **kwargs)
        else:
            ref = NormFreeNet(dataclasses.replace(timm_nfcfg(ours.cfg), std_conv_eps=PATCHED_EPS), **kwargs)
    _patch_to_deepmind_numerics(ref, ours.cfg.activation)
    try:
        ref.load_state_dict({k: torch.as_tensor(v) for k, v in timm_state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise TimmReferenceError(f'the timm-layout weights do not fit timm\'s own model: {e}') from None
    return ref.eval()
