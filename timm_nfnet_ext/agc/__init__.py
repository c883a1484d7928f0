"""Adaptive gradient clipping (AGC) and AGC optimizers for timm.

AGC (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization") rescales the gradient of every *unit* whose gradient norm exceeds
``clipping`` times the unit's parameter norm:

    max_norm = max(||W_i||, eps) * clipping
    G_i     *= max_norm / max(||G_i||, 1e-6)      only where ||G_i|| > max_norm

A unit is a whole tensor for scalars and vectors (gains, biases, skip gains), an output
row for linear weights and an output channel for conv weights (PyTorch layout: output
dimension first). Norms are taken on the raw parameter, not on a standardised weight.

This package gives (``clip``, ``optim``, ``groups``, ``registry``):

* :func:`unitwise_norm` and the in-place :func:`adaptive_clip_grad_` (vectorised: one
  ``torch._foreach_norm`` for all vectors, one reduction per weight tensor, every unit's
  factor computed at once, one ``torch._foreach_mul_`` per ndim; on CPU in cache-sized
  chunks, so each gradient is rescaled while still in cache);
* AGC optimizers that clip inside ``step()`` -- :class:`SGDAGC` (the reference
  ``SGD_AGC``), :class:`AdamWAGC`, :class:`LambAGC` -- and :func:`with_agc` to put AGC
  on any optimizer class;
* :func:`agc_param_groups`, the paper's parameter groups (classifier weight unclipped;
  no weight decay on gains, biases and skip gains), usable as ``param_group_fn`` of
  ``timm.optim.create_optimizer_v2``;
* registration of ``sgdagc``, ``adamwagc`` and ``lambagc`` in timm's optimizer registry
  at import, and :func:`register_agc_optimizer` for more.
"""
from __future__ import annotations

from .clip import GRAD_NORM_FLOOR, NONFINITE_MODES, adaptive_clip_grad_, unitwise_norm
from .groups import agc_param_groups
from .optim import AGCMixin, AdamWAGC, LambAGC, SGDAGC, with_agc
from .registry import AGC_OPTIMIZER_NAMES, register_agc_optimizer, register_builtin_optimizers

__all__ = [
    'unitwise_norm', 'adaptive_clip_grad_', 'agc_param_groups', 'AGCMixin', 'with_agc',
    'SGDAGC', 'AdamWAGC', 'LambAGC', 'register_agc_optimizer', 'AGC_OPTIMIZER_NAMES',
    'GRAD_NORM_FLOOR', 'NONFINITE_MODES',
]

register_builtin_optimizers()
