"""Weight standardisation of many convs at once: the GPU path of ``NFNet.forward``.

Why: standardising one conv's weight is about 25 small kernels per training step (about 10
forward, 15 backward). On a GPU these are launch-bound host time, not arithmetic: NFNet-F0
has 57 weight-standardised convs, and with them a training step issues about 2.3x as many
kernels as timm's ``dm_nfnet_f0``, whose standardisation is one (inexact) ``batch_norm``.

Here the convs of one network segment (the stem, a stage, the final conv) that share a fan-in
are standardised together. Their weights are stacked into one ``(rows, fan_in)`` matrix and
standardised in one pass by a hand-written autograd function, with the same statistics and
the same eps floor as ``layers.standardize_weight``. Under autocast the stacked weights and
biases are cast once, not once per conv. NFNet-F0 has 17 such groups and F3 has 18, against
57 and 201 convs. Grouping by segment, and not over the whole network, keeps gradients
ready stage by stage, so DDP can still overlap its all-reduce with the backward pass.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import WSConv2d

__all__ = ['WSGroup', 'plan_groups', 'standardize_group', 'standardized_once']


class _StandardizeRows(torch.autograd.Function):
    """``out = (w - mean) * rsqrt(max(||w - mean||^2, eps)) * gain * row_scale``, per row of ``w``.

    Like ``layers._StandardizeWeight``, but with one ``row_scale`` per row, and with no
    data-dependent branch in the backward (that branch syncs with the host, which costs more
    than it saves on a GPU). With ``r = rsqrt(.) * gain * row_scale`` and
    ``k = <g, w - mean> * rsqrt(.)^2`` (0 on the floor), ``dw = r * (g - mean(g)) - r * k * (w - mean)``.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, gain: torch.Tensor, row_scale: torch.Tensor, eps: float) -> torch.Tensor:
        var, mean = torch.var_mean(w, dim=1, correction=0, keepdim=True)
        sq = var.mul_(w.shape[1])  # ||w - mean||^2
        inv = torch.rsqrt(torch.clamp(sq, min=eps))
        r = inv * (gain * row_scale).unsqueeze(1)
        centered = w - mean  # saved instead of w: the same size, and no cancellation in backward
        ctx.save_for_backward(centered, inv, r, row_scale, sq >= eps)
        return centered * r

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        centered, inv, r, row_scale, unclamped = ctx.saved_tensors
        g = grad_out
        dot = (g * centered).sum(dim=1, keepdim=True)  # <g, w - mean> per row
        grad_gain = (dot * inv).view(-1) * row_scale if ctx.needs_input_grad[1] else None
        grad_w = None
        if ctx.needs_input_grad[0]:
            rk = r * dot * inv.square() * unclamped
            grad_w = torch.addcmul(g.sum(dim=1, keepdim=True).mul_(-1.0 / g.shape[1]) * r, g, r)
            grad_w.addcmul_(centered, rk, value=-1.0)
        return grad_w, grad_gain, None, None


class WSGroup(NamedTuple):
    """Convs standardised together: one segment, one fan-in, eps, device and dtype."""
    convs: Tuple[WSConv2d, ...]
    row_scale: torch.Tensor  # (rows,): each conv's input_scale, once per output channel
    eps: float


def _group_key(conv: WSConv2d) -> Tuple:
    w = conv.weight
    return conv.fan_in, conv.eps, w.device, w.dtype


def plan_groups(segments: Sequence[Sequence[WSConv2d]]) -> List[WSGroup]:
    """Split each segment's convs into groups that can be standardised as one matrix."""
    groups = []
    for segment in segments:
        by_key: Dict[Tuple, List[WSConv2d]] = {}
        for conv in segment:
            by_key.setdefault(_group_key(conv), []).append(conv)
        for (_, eps, device, dtype), convs in by_key.items():
            row_scale = torch.cat([torch.full((c.out_channels,), c.input_scale, dtype=dtype) for c in convs])
            groups.append(WSGroup(tuple(convs), row_scale.to(device), eps))
    return groups


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives convs on ``device_type``, or None when autocast is off."""
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def standardize_group(group: WSGroup) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` for each conv of ``group``, as the conv would apply them.

    The weights are computed in the parameters' dtype with autocast off, then weights and
    biases are cast together to autocast's dtype when autocast is on (what the conv would do).
    """
    convs = group.convs
    device_type = convs[0].weight.device.type
    cast = _autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        if len(convs) == 1:
            w = convs[0].weight.reshape(convs[0].out_channels, -1)
            gain, bias = convs[0].gain, convs[0].bias
        else:
            w = torch.cat([c.weight.reshape(c.out_channels, -1) for c in convs])
            gain = torch.cat([c.gain for c in convs])
            bias = torch.cat([c.bias for c in convs])
        w_hat = _StandardizeRows.apply(w, gain, group.row_scale, group.eps)
        if cast is not None and cast != w_hat.dtype and w_hat.is_floating_point():
            w_hat, bias = w_hat.to(cast), bias.to(cast)
    sizes = [c.out_channels for c in convs]
    weights = w_hat.split(sizes) if len(convs) > 1 else (w_hat,)
    biases = bias.split(sizes) if len(convs) > 1 else (bias,)
    return [(wc.view_as(c.weight), b) for c, wc, b in zip(convs, weights, biases)]


@contextlib.contextmanager
def standardized_once(groups: Sequence[WSGroup]) -> Iterator[None]:
    """Inside the block, every conv of ``groups`` applies a weight standardised with its group.

    The standardised weights are computed on entry (one pass per group) and dropped on exit;
    convs outside the groups, and calls outside the block, standardise their own weight.
    """
    touched: List[WSConv2d] = []
    try:
        for group in groups:
            for conv, packed in zip(group.convs, standardize_group(group)):
                conv.packed = packed
                touched.append(conv)
        yield
    finally:
        for conv in touched:
            conv.packed = None


def ws_convs(module: nn.Module) -> List[WSConv2d]:
    """The weight-standardised convs of ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, WSConv2d)]
