"""DeepMind's activations with their gains: the gamma table and the ``Activation`` module.

Each activation of the reference comes with ``gamma = 1 / std(act(z))`` for ``z ~ N(0, 1)``, so
that a gamma-scaled activation keeps unit variance (the paper's signal propagation argument).
In an NFNet the gamma of an activation is folded into the conv that reads it (``WSConv2d``'s
``input_scale``), so most ``Activation`` modules here compute the plain function.

Why not timm's activations: JAX's ``gelu`` (the reference's) is the tanh approximation, timm's
``GELU`` the exact-erf form; the two differ by up to 1e-3 and move the released weights' logits.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['GAMMAS', 'gamma_of', 'apply_activation', 'Activation']

# Gamma of each activation, the numbers of the reference `nfnets/base.py`.
GAMMAS: Dict[str, float] = {
    'identity': 1.0,
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'log_softmax': 1.0002083778381348,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'soft_sign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}


def gamma_of(name: str) -> float:
    """The gain of activation ``name``.

    Args:
        name: a key of ``GAMMAS`` (``'gelu'``, ``'relu'``, ``'silu'``, ...).

    Returns:
        ``1 / std(act(z))`` for ``z ~ N(0, 1)``.

    Raises:
        ValueError: ``name`` is not an activation of the table.
    """
    if name not in GAMMAS:
        raise ValueError(f'unknown activation {name!r}; choose one of {sorted(GAMMAS)}')
    return GAMMAS[name]


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Activation ``name`` of the gamma table (without gamma), as JAX's defaults compute it.

    One if-chain rather than a table of functions: TorchScript compiles it (it cannot call
    ``functools.partial`` objects), so scripted, traced and eager models run the same code.

    Args:
        x: any tensor (NCHW for ``log_softmax``, which normalises over channels as JAX's NHWC
            models do over their last axis).
        name: a key of ``GAMMAS``.

    Returns:
        A new tensor, ``act(x)``.

    Raises:
        ValueError: ``name`` is not an activation of the table.
    """
    if name == 'gelu':
        return F.gelu(x, approximate='tanh')  # JAX's gelu: the tanh approximation
    if name == 'relu':
        return F.relu(x)
    if name == 'silu':
        return F.silu(x)
    if name == 'identity':
        return x
    if name == 'celu':
        return F.celu(x)
    if name == 'elu':
        return F.elu(x)
    if name == 'leaky_relu':
        return F.leaky_relu(x)
    if name == 'log_sigmoid':
        return F.logsigmoid(x)
    if name == 'log_softmax':
        return F.log_softmax(x, dim=1)
    if name == 'relu6':
        return F.relu6(x)
    if name == 'selu':
        return F.selu(x)
    if name == 'sigmoid':
        return torch.sigmoid(x)
    if name == 'soft_sign':
        return F.softsign(x)
    if name == 'softplus':
        return F.softplus(x)
    if name == 'tanh':
        return torch.tanh(x)
    raise ValueError('unknown activation ' + name)


# torch.fx leaf (timm's feature extraction): the accelerated subclass (accel/) branches on
# autograd state that symbolic tracing cannot follow, and both must trace alike
@register_notrace_module
class Activation(nn.Module):
    """An activation of the gamma table, times ``scale`` (1.0 where gamma is folded into a conv).

    Args:
        name: a key of ``GAMMAS``.
        scale: multiplies the output (the network's last activation keeps its gamma here).
        inplace: the input is read by nothing else afterwards. The reference computes out of
            place either way; the accelerated layers (``timm_nfnet_ext.accel``) overwrite the
            input where this is set.

    Raises:
        ValueError: ``name`` is not an activation of the table.
    """

    def __init__(self, name: str, scale: float = 1.0, inplace: bool = False):
        super().__init__()
        gamma_of(name)  # validates the name
        self.name = name
        self.scale = float(scale)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the activation.

        Args:
            x: any tensor.

        Returns:
            ``scale * activation(x)``, a new tensor shaped like ``x``.
        """
        y = apply_activation(x, self.name)
        return y if self.scale == 1.0 else y * self.scale

    def extra_repr(self) -> str:
        """The module's summary in ``repr``.

        Returns:
            The name, then ``scale`` and ``inplace`` where they are not the defaults.
        """
        return self.name + (f', scale={self.scale}' if self.scale != 1.0 else '') + (', inplace' if self.inplace else '')
