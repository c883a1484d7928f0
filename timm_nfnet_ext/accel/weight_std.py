"""Weight standardisation with a hand-written backward: the per-conv CPU speed path.

Autograd's graph of ``layers.standardize_weight`` makes several more passes over the weights
than needed, and ATen's CPU ``var_mean`` is far slower than a sum, so on CPU the same function
is computed by ``_StandardizeWeight`` (equal to the reference within float32 rounding,
tests/test_accel.py). The result is the reference's everywhere; where this path cannot run
(``torch.func`` transforms, forward-mode AD, ``torch.jit.trace`` / ONNX export, other devices)
the reference expression runs instead.
"""
from __future__ import annotations

import math

import torch

from ..layers.conv import standardize_weight
from . import switches
from .probes import autocast_off, forward_ad_active, functorch_active

__all__ = ['fast_standardize_weight']


class _StandardizeWeight(torch.autograd.Function):
    """``w_hat = (w - mean) * rsqrt(max(||w - mean||^2, eps)) * gain * c``, per output row.

    (``||w - mean||^2 = var * fan_in``: the reference's formula.) Written by hand because
    autograd's graph of the same expression makes several more passes over the weights than
    this, and ATen's CPU ``var_mean`` is far slower than a sum.

    Backward: where no row sits on the eps floor, this is batch norm's backward over the rows
    (``invstd = rsqrt(var)``, weight ``gain * c / sqrt(fan_in)``), so ATen's fused batch-norm
    backward kernel is given our saved statistics (faster than autograd's graph; see
    docs/performance.md). Rows on the floor have a constant scale, which batch norm's formula does not
    know, so then the gradient is written out: with ``r = rsqrt(.) * gain * c`` and
    ``k = <g, w - mean> * rsqrt(.)^2`` (0 on the floor), ``dw = r * (g - mean(g)) - r * k * (w - mean)``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, input_scale: float, eps: float) -> torch.Tensor:
        w = weight.reshape(weight.shape[0], -1)
        mean = w.mean(dim=1, keepdim=True)
        out = w - mean
        sq = torch.linalg.vector_norm(out, dim=1, keepdim=True).square_()
        inv = torch.rsqrt(torch.clamp(sq, min=eps))
        out.mul_(inv * (gain.view(-1, 1) * input_scale))
        ctx.save_for_backward(weight, gain, mean, inv, sq >= eps)
        ctx.input_scale = input_scale
        return out.view_as(weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, gain, mean, inv, unclamped = ctx.saved_tensors
        c = ctx.input_scale
        rows, n = weight.shape[0], weight[0].numel()
        if not torch.compiler.is_compiling() and bool(unclamped.all()):  # (a data-dependent branch: eager only)
            root_n = math.sqrt(n)
            grad_w, grad_bn_weight, _ = torch.ops.aten.native_batch_norm_backward(
                grad_out.reshape(1, rows, n), weight.reshape(1, rows, n), gain * (c / root_n), None, None,
                mean.view(-1), (inv * root_n).view(-1), True, 0.0, [True, True, False])
            return grad_w.view_as(weight), grad_bn_weight * (c / root_n), None, None
        w = weight.reshape(rows, n)
        g = grad_out.reshape(w.shape)
        g_sum = g.sum(dim=1, keepdim=True)
        # <g, w - mean> per row, as a batched GEMV (no temporary the size of the weights)
        dot = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1) - mean * g_sum
        grad_gain = (dot * inv).view(-1) * c
        r = inv * (gain.view(-1, 1) * c)
        rk = r * dot * inv.square() * unclamped
        grad_w = torch.addcmul(rk * mean - r * (g_sum / n), g, r)
        grad_w.addcmul_(w, rk, value=-1.0)
        return grad_w.view_as(weight), grad_gain, None, None


def fast_standardize_weight(weight: torch.Tensor, gain: torch.Tensor, input_scale: float = 1.0,
                            eps: float = 1e-4) -> torch.Tensor:
    """``layers.standardize_weight`` (its arguments, its result: see there), in float32 maths with
    autocast off, through the hand-written function on CPU where it applies."""
    with autocast_off(weight.device.type):
        if (switches.weight_std and weight.device.type == 'cpu' and not torch.jit.is_tracing()
                and not functorch_active() and not forward_ad_active()):
            return _StandardizeWeight.apply(weight, gain, input_scale, eps)
        return standardize_weight(weight, gain, input_scale, eps)
