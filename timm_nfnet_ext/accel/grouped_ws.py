"""Weight standardisation of many convs at once: the GPU path of an accelerated NFNet's forward.

Why: standardising one conv's weight is about 25 small kernels per training step (about 10
forward, 15 backward). On a GPU these are launch-bound host time, not arithmetic: NFNet-F0
has 57 weight-standardised convs, and with them a training step issues many more kernels than
timm's ``dm_nfnet_f0``, whose standardisation is one (inexact) ``batch_norm`` (measured:
docs/performance.md).

Here the convs of one network segment (the stem, a stage, the final conv) that share a fan-in
are standardised together: their weights are stacked into one ``(rows, fan_in)`` matrix and
standardised in one pass by a hand-written autograd function, with the same statistics and
the same eps floor as ``layers.standardize_weight``. Under autocast the stacked weights and
biases are cast once, not once per conv. NFNet-F0 has 17 such groups for 57 convs, F3 18 for
201. A group is standardised when the first of its convs runs, and each conv takes its
weight once, so an unused stage costs nothing and, without autograd, a segment's weights are
freed as its convs finish. Grouping by segment, not over the whole network, keeps gradients
ready stage by stage, so DDP can still overlap its all-reduce with the backward pass.

The weights a conv should take are found through a thread-local hook (``GROUPED``), so
concurrent forwards in other threads, and other models called inside this one's forward,
standardise their own weights as usual.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..layers.conv import WSConv2d, standardize_weight
from .probes import autocast_dtype, autocast_off

__all__ = ['GROUPED', 'WSGroup', 'plan_groups', 'standardize_group', 'standardized_once']


class _GroupedWeights(threading.local):
    """Per thread: where a conv takes a weight standardised with its group (``standardized_once``
    sets ``take`` for the length of one model forward), or None."""
    take: Optional[Callable[[WSConv2d], Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None


GROUPED = _GroupedWeights()


def _is_channels_last(w: torch.Tensor) -> bool:
    """A weight laid out (O, kh, kw, I) in memory (a 1x1 kernel is both layouts: False)."""
    return w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def _as_rows(w: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """One row per output channel, in the weight's memory order (a view when it is dense)."""
    return (w.permute(0, 2, 3, 1) if channels_last else w).reshape(w.shape[0], -1)


def _from_rows(rows: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``_as_rows`` undone: the shape of ``like``, strided like it."""
    if channels_last:
        o, i, kh, kw = like.shape
        return rows.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.view(like.shape)


def _stack(weights: Sequence[torch.Tensor], channels_last: bool) -> torch.Tensor:
    rows = [_as_rows(w, channels_last) for w in weights]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


class _StandardizeRows(torch.autograd.Function):
    """``out = (w - mean) * rsqrt(max(||w - mean||^2, eps)) * gain * row_scale``, per row of the
    stacked weights ``w`` of ``n`` convs (``params``: their weights, then their gains).

    Like ``weight_std._StandardizeWeight``, but with one ``row_scale`` per row, and with no
    data-dependent branch in the backward (that branch syncs with the host, which costs more
    than it saves on a GPU). The parameters themselves are saved, not the stacked copy, and
    restacked in the backward. With ``r = rsqrt(.) * gain * row_scale`` and
    ``k = <g, w - mean> * rsqrt(.)^2`` (0 on the floor), ``dw = r * (g - mean(g)) - r * k * (w - mean)``.
    Under ``create_graph=True`` the backward differentiates the plain formula instead, so
    second derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, row_scale: torch.Tensor, eps: float, n: int, channels_last: bool,
                *params: torch.Tensor) -> torch.Tensor:
        w = _stack(params[:n], channels_last)
        gain = torch.cat(params[n:]) if n > 1 else params[n]
        var, mean = torch.var_mean(w, dim=1, correction=0, keepdim=True)
        sq = var.mul_(w.shape[1])  # ||w - mean||^2
        inv = torch.rsqrt(torch.clamp(sq, min=eps))
        r = inv * (gain * row_scale).unsqueeze(1)
        ctx.save_for_backward(row_scale, mean, inv, r, sq >= eps, *params)
        ctx.eps, ctx.n, ctx.channels_last = eps, n, channels_last
        return (w - mean).mul_(r)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        row_scale, mean, inv, r, unclamped, *params = ctx.saved_tensors
        n, cl = ctx.n, ctx.channels_last
        weights, gains = params[:n], params[n:]
        none = (None, None, None, None)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            gain = torch.cat(gains) if n > 1 else gains[0]
            w = _stack(weights, cl)  # rows as (rows, fan_in, 1, 1): the per-conv formula applies as is
            out = standardize_weight(w[:, :, None, None], gain * row_scale, 1.0, ctx.eps)[:, :, 0, 0]
            needed = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
            grads = iter(torch.autograd.grad(out, needed, g, create_graph=True))
            return none + tuple(next(grads) if need else None for need in ctx.needs_input_grad[4:])
        centered = _stack(weights, cl).sub(mean)  # restacked: a temporary of the backward only
        dot = (g * centered).sum(dim=1, keepdim=True)  # <g, w - mean> per row
        grad_w = grad_gain = None
        if any(ctx.needs_input_grad[4 + n:]):
            grad_gain = (dot * inv).view(-1) * row_scale
        if any(ctx.needs_input_grad[4:4 + n]):
            rk = r * dot * inv.square() * unclamped
            grad_w = torch.addcmul(g.sum(dim=1, keepdim=True).mul_(-1.0 / g.shape[1]) * r, g, r)
            grad_w.addcmul_(centered, rk, value=-1.0)
        sizes = [w.shape[0] for w in weights]
        grad_ws = [None] * n if grad_w is None else [
            _from_rows(rows, w, cl) for rows, w in zip(grad_w.split(sizes), weights)]
        grad_gains = [None] * n if grad_gain is None else list(grad_gain.split(sizes))
        return none + tuple(grad_ws) + tuple(grad_gains)


class WSGroup(NamedTuple):
    """Convs standardised together: one segment, one fan-in, eps, device, dtype and layout.

    Attributes:
        convs: the convs, in the order their weights are stacked.
        eps: their common floor of ``var * fan_in``.
        channels_last: whether their weights are laid out channels_last.
    """
    convs: Tuple[WSConv2d, ...]
    eps: float
    channels_last: bool


def _group_key(conv: WSConv2d) -> Tuple:
    w = conv.weight
    return conv.fan_in, conv.eps, w.device, w.dtype, _is_channels_last(w)


def plan_groups(segments: Sequence[Sequence[WSConv2d]]) -> List[WSGroup]:
    """Split each segment's convs into groups that can be standardised as one matrix.

    Convs with forward pre-hooks are left out (they standardise their own weight): such a hook
    may set the weight just before the conv runs (``torch.nn.utils.prune``, parameter gathering
    in ZeRO-3), after the group would have read it.

    Args:
        segments: the convs of each network segment (the stem, a stage, the final conv).

    Returns:
        The groups, segment by segment; a conv is in at most one.
    """
    groups = []
    for segment in segments:
        by_key: Dict[Tuple, List[WSConv2d]] = {}
        for conv in segment:
            if not conv._forward_pre_hooks:
                by_key.setdefault(_group_key(conv), []).append(conv)
        groups += [WSGroup(tuple(convs), key[1], key[4]) for key, convs in by_key.items()]
    return groups


@functools.lru_cache(maxsize=256)
def _row_scale(scales_and_rows: Tuple[Tuple[float, int], ...], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Each conv's input_scale once per output channel, made once per group layout and device
    (a cache of values, holding no module)."""
    rows = [torch.full((n,), s, dtype=dtype) for s, n in scales_and_rows]
    return torch.cat(rows).to(device)


def standardize_group(group: WSGroup) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` for each conv of ``group``, as the conv would apply them.

    The weights are computed in the parameters' dtype with autocast off; when autocast is on,
    weights and biases are then cast together to its dtype, as autocast would cast each conv's
    (float64 is never cast, as with autocast).

    Args:
        group: convs from :func:`plan_groups`.

    Returns:
        One ``(weight, bias)`` pair per conv of ``group``, in its order, each weight shaped (and
        laid out) like the conv's.
    """
    convs = group.convs
    weights = [c.weight for c in convs]
    device_type = weights[0].device.type
    cast = autocast_dtype(device_type)
    row_scale = _row_scale(tuple((c.input_scale, c.out_channels) for c in convs), weights[0].device,
                           weights[0].dtype)
    with autocast_off(device_type):
        w_hat = _StandardizeRows.apply(row_scale, group.eps, len(convs), group.channels_last,
                                       *weights, *(c.gain for c in convs))
        bias = torch.cat([c.bias for c in convs]) if len(convs) > 1 else convs[0].bias
        if cast is not None and w_hat.dtype not in (cast, torch.float64):
            w_hat, bias = w_hat.to(cast), bias.to(cast)
    sizes = [c.out_channels for c in convs]
    rows, biases = (w_hat.split(sizes), bias.split(sizes)) if len(convs) > 1 else ((w_hat,), (bias,))
    return [(_from_rows(r, w, group.channels_last), b) for r, w, b in zip(rows, weights, biases)]


class _Session:
    """One forward's groups: a group is standardised when the first of its convs asks, and each
    conv's weight is handed out once (then the session lets go of it)."""

    def __init__(self, groups: Sequence[WSGroup]):
        self.group_of = {conv: group for group in groups for conv in group.convs}
        self.ready: Dict[WSConv2d, Tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self, conv: WSConv2d) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        packed = self.ready.pop(conv, None)
        if packed is not None:
            return packed
        group = self.group_of.get(conv)
        if group is None:
            return None  # not grouped, or asked a second time: the conv standardises its own
        for c in group.convs:
            del self.group_of[c]
        self.ready.update(zip(group.convs, standardize_group(group)))
        return self.ready.pop(conv)


@contextlib.contextmanager
def standardized_once(groups: Sequence[WSGroup]) -> Iterator[None]:
    """Inside the block (in this thread), the convs of ``groups`` apply weights standardised with
    their group; other convs, and calls outside the block, standardise their own.

    Args:
        groups: the groups of one model forward, from :func:`plan_groups`.

    Yields:
        None; the thread's previous hook is restored on exit.
    """
    previous = GROUPED.take
    GROUPED.take = _Session(groups).take
    try:
        yield
    finally:
        GROUPED.take = previous

