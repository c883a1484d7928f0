"""The clipping itself: unit-wise norms and the vectorised, in-place ``adaptive_clip_grad_``."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
GRAD_NORM_FLOOR = 1e-6
"""Lower bound on a unit's gradient norm in the clip factor (reference value)."""

NONFINITE_MODES = ('raise', 'skip')

ParamsArg = Union[Tensor, Iterable[Tensor]]


# --------------------------------------------------------------------------- validation

def _check_positive(name: str, value: Any) -> float:
    """Return ``value`` as float, or raise if it is not a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be a number > 0, got {type(value).__name__} {value!r}')
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a finite number > 0, got {value!r}')
    return float(value)


def _check_clipping(value: Any, where: str = 'clipping') -> Optional[float]:
    """``None`` (no clipping) or a finite number > 0."""
    if value is None:
        return None
    try:
        return _check_positive(where, value)
    except ValueError as e:
        raise ValueError(f'{e}; use clipping=None to leave parameters unclipped') from None


def _check_nonfinite(mode: str) -> str:
    if mode not in NONFINITE_MODES:
        raise ValueError(f'nonfinite must be one of {NONFINITE_MODES}, got {mode!r}')
    return mode


def _as_tensor_list(parameters: ParamsArg) -> List[Tensor]:
    """Materialise ``parameters`` (a tensor or an iterable of tensors), checking types."""
    if isinstance(parameters, Tensor):
        return [parameters]
    if isinstance(parameters, dict) or not isinstance(parameters, Iterable):
        raise TypeError(
            f'parameters must be a Tensor or an iterable of Tensors, got {type(parameters).__name__}')
    params = list(parameters)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f'parameters[{i}] is a {type(p).__name__}, not a Tensor')
    return params


# --------------------------------------------------------------------------- norms

def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate norms in float32 (float64 for float64 tensors)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm of each AGC unit of ``x``.

    Scalars and vectors form one unit (returns a 0-d tensor); tensors with two or more
    dimensions have one unit per index of dim 0, the output dimension of PyTorch linear
    and conv weights (returns shape ``(x.shape[0], 1, ..., 1)``, broadcastable to ``x``).
    The result is float32 (float64 for float64 input).

    Args:
        x: a parameter or gradient.

    Returns:
        The norms: a 0-d tensor, or one per unit, shaped to broadcast against ``x``.
    """
    dtype = _norm_dtype(x.dtype)
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=dtype)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)


def _foreach_norm(tensors: List[Tensor], dtype: torch.dtype) -> List[Tensor]:
    """Whole-tensor L2 norms of ``tensors`` (multi-tensor kernel where torch has it)."""
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    except (TypeError, RuntimeError, AttributeError):  # older torch: no dtype argument
        return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


STACK_BYTES = 64 << 20
"""Off CPU, weights of one shape are stacked (up to this many bytes a stack) so that their
per-unit norms take one kernel: kernel launches, not bandwidth, bound AGC on GPUs."""


def _row_norms(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Norms over all dims but the first (a dims tuple: no copy for channels_last)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)),
                                    dtype=None if t.dtype == dtype else dtype)


def _runs(tensors: List[Tensor], stack: bool) -> Iterator[List[Tensor]]:
    """Consecutive same-shape tensors, at most STACK_BYTES a run (singletons if not stack)."""
    for _, same in itertools.groupby(tensors, key=lambda t: t.shape):
        same = list(same)
        per = max(1, STACK_BYTES // max(1, same[0].numel() * same[0].element_size())) if stack else 1
        for i in range(0, len(same), per):
            yield same[i:i + per]


def _flat_unit_norms(tensors: List[Tensor], dtype: torch.dtype, stack: bool) -> Tensor:
    """All units' norms of ``tensors`` (sorted by ndim and shape) in one 1-D tensor, in order."""
    n_vec = sum(t.ndim <= 1 for t in tensors)
    parts = [torch.stack(_foreach_norm(tensors[:n_vec], dtype))] if n_vec else []
    for run in _runs(tensors[n_vec:], stack):
        parts.append(_row_norms(run[0], dtype) if len(run) == 1 else
                     _row_norms(torch.stack(run).flatten(0, 1), dtype))
    return torch.cat(parts)


# --------------------------------------------------------------------------- clipping core

CPU_CHUNK_BYTES = 8 << 20
"""On CPU, tensors are clipped in chunks of about this many gradient bytes, so that each
gradient is still in cache when it is rescaled (and, in :class:`SGDAGC`, updated)."""


@functools.lru_cache(maxsize=32)
def _per_unit(device: torch.device, dtype: torch.dtype, rows: Tuple[int, ...],
              values: Tuple[float, ...]) -> Tensor:
    """One value per unit, expanded from one value per tensor (cached: no copy per step)."""
    per_tensor = torch.tensor(values, dtype=dtype)
    return per_tensor.repeat_interleave(torch.tensor(rows)).to(device)


def _hyper(values: Sequence[float], rows: Tuple[int, ...], like: Tensor) -> Union[float, Tensor]:
    """A Python float when all tensors share the value, else a per-unit tensor."""
    if len(set(values)) == 1:
        return values[0]
    return _per_unit(like.device, like.dtype, rows, tuple(values))


@functools.lru_cache(maxsize=32)
def _index_tensor(device: torch.device, values: Tuple[int, ...]) -> Tensor:
    return torch.tensor(values, device=device)


def _factor_batches(scale: Tensor, grads: List[Tensor]) -> List[Tuple[List[Tensor], List[Tensor]]]:
    """(grads, factors) pairs for ``torch._foreach_mul_``, one per ndim (``grads`` sorted by
    ndim): scalars and vectors get factors of their own shape (fused kernels on CUDA),
    weights ``(O, 1, ..., 1)`` factors. A few view ops in all, not one per tensor."""
    batches, start = [], 0
    for ndim, same in itertools.groupby(grads, key=lambda g: g.ndim):
        same = list(same)
        rows = [1 if ndim <= 1 else g.shape[0] for g in same]
        part = scale[start:start + sum(rows)]
        start += sum(rows)
        if ndim == 0:
            factors = list(part.unbind())
        elif ndim == 1:
            sizes = tuple(g.shape[0] for g in same)
            factors = list(part.repeat_interleave(
                _index_tensor(part.device, sizes), output_size=sum(sizes)).split(sizes))
        else:
            factors = list(part.view(-1, *([1] * (ndim - 1))).split(rows))
        batches.append((same, factors))
    return batches


def _clip_factors(params: List[Tensor], grads: List[Tensor], clips: List[float],
                  epss: List[float], dtype: torch.dtype, want_summary: bool,
                  g_norm: Optional[Tensor] = None,
                  ) -> Tuple[List[Tuple[List[Tensor], List[Tensor]]], Optional[Tensor]]:
    """Factors for every gradient (1 where a unit is not clipped), as batches for
    :func:`_factor_batches`, and (if asked) a device tensor ``[all unit norms finite (0/1),
    number of units clipped]``. The lists must be sorted by ndim and shape. Reads, never
    writes. ``g_norm``: the gradients' unit norms, if already known."""
    rows = tuple(1 if g.ndim <= 1 else g.shape[0] for g in grads)
    stack = not _immediate(grads[0].device)
    p_norm = _flat_unit_norms(params, dtype, stack)
    if g_norm is None:
        g_norm = _flat_unit_norms(grads, dtype, stack)
    eps, clip = _hyper(epss, rows, p_norm), _hyper(clips, rows, p_norm)
    floor = torch.clamp_min(p_norm, eps) if isinstance(eps, float) else torch.maximum(p_norm, eps)
    max_norm = floor * clip
    trigger = g_norm > max_norm
    scale = torch.where(trigger, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
    summary = torch.stack([torch.isfinite(g_norm).all().long(), trigger.sum()]) if want_summary else None
    return _factor_batches(scale, grads), summary


def _mul_(batches: List[Tuple[List[Tensor], List[Tensor]]]) -> None:
    for grads, factors in batches:
        torch._foreach_mul_(grads, factors)


def _group_by(items: Sequence[Any], key: Callable[[Any], Any]) -> Dict[Any, List[Any]]:
    groups: Dict[Any, List[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _chunks(items: List[tuple], limit: Optional[int]) -> Iterator[List[tuple]]:
    """Consecutive runs of ``items`` holding at least ``limit`` gradient bytes (or all)."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += item[1].numel() * item[1].element_size()
        if limit is not None and size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _columns(items: List[tuple]) -> Tuple[list, list, list, list]:
    """(params, grads, clips, epss) of ``(p, grad, clipping, eps)`` items."""
    return tuple(list(x) for x in zip(*items))  # type: ignore[return-value]


def _unit_count(g: Tensor) -> int:
    return 1 if g.ndim <= 1 else g.shape[0]


def _first_nonfinite(grads: Sequence[Tensor]) -> Tensor:
    """The first gradient with an inf/NaN unit norm (holds inf/NaN, or overflows)."""
    return next((g for g in grads if not torch.isfinite(unitwise_norm(g)).all()), grads[0])


def _finite_guards(grads: Sequence[Tensor]) -> List[Tuple[List[Tensor], Tensor]]:
    """Per device and dtype: the gradients and a device flag, true when all are finite."""
    groups = _group_by(grads, lambda g: (g.device, _norm_dtype(g.dtype)))
    return [(gs, torch.stack(_foreach_norm(gs, dtype)).isfinite().all())
            for (_, dtype), gs in groups.items()]


def _immediate(device: torch.device) -> bool:
    """Whether to work chunk by chunk, reading results back as we go (free on CPU), rather
    than in one batch with at most one read-back (GPUs)."""
    return device.type == 'cpu'


OnChunk = Optional[Callable[[List[Tensor]], None]]


class ClipCounts:
    """Units clipped and units looked at, summed over calls of :func:`_agc_` (host integers,
    from the flags each call reads back anyway)."""

    def __init__(self) -> None:
        self.clipped = 0
        self.units = 0

    def pop(self) -> Tuple[int, int]:
        """``(clipped, units)`` since the last pop, then reset.

        Returns:
            The units clipped and the units looked at.
        """
        out = (self.clipped, self.units)
        self.clipped = self.units = 0
        return out


def _agc_(params: Sequence[Tensor], clips: Sequence[float], epss: Sequence[float],
          check_finite: bool, check_only: Sequence[Tensor] = (), on_chunk: OnChunk = None,
          counts: Optional[ClipCounts] = None) -> Optional[Tensor]:
    """Clip the gradients of ``params`` in place, with per-tensor clipping and eps.

    Tensors are bucketed by (device, norm dtype) and sorted by shape. CPU buckets are
    clipped in cache-sized chunks, and ``on_chunk(chunk_params)`` runs on each chunk just
    after it is clipped, while its tensors are still in cache. Other devices are clipped
    in one batch per bucket, with no host sync unless ``check_finite``.

    With ``check_finite``, every gradient of ``params`` and ``check_only`` is checked
    before any is modified (or ``on_chunk`` runs); the first non-finite one is returned.
    ``counts`` (if given) gets the clipped and total units of every bucket whose flags were read
    back (CPU buckets always; others only with ``check_finite``, as in the optimizers).
    """
    items = [(p, p.grad, c, e) for p, c, e in zip(params, clips, epss) if p.grad.numel()]
    host, device_plans = [], []
    for (device, dtype), bucket in _group_by(
            items, lambda it: (it[1].device, _norm_dtype(it[1].dtype))).items():
        bucket.sort(key=lambda it: (it[1].ndim, tuple(it[1].shape)))  # runs of one shape
        if _immediate(device):
            host.append((bucket, dtype, None))
        else:
            batches, summary = _clip_factors(*_columns(bucket), dtype, check_finite)
            device_plans.append([bucket, batches, summary, None])  # [3]: units clipped, once read
    if check_finite:
        bad = _check_finite(host, device_plans, check_only)
        if bad is not None:
            return bad
    for bucket, dtype, g_norm in host:
        _clip_host_bucket(bucket, dtype, g_norm, on_chunk, counts)
    for bucket, batches, _, n_clipped in device_plans:
        if n_clipped is None or n_clipped:  # None: not read back (no check_finite), apply as is
            _mul_(batches)
        if counts is not None and n_clipped is not None:
            counts.clipped += n_clipped
            counts.units += sum(_unit_count(it[1]) for it in bucket)
    return None


def _check_finite(host: List[tuple], device_plans: List[list], check_only: Sequence[Tensor]
                  ) -> Optional[Tensor]:
    """Phase one of :func:`_agc_`: the first non-finite gradient, or None. Stores each host
    bucket's gradient norms (reused when clipping) and each device plan's clipped flag."""
    guards = _finite_guards(check_only)
    for i, (bucket, dtype, _) in enumerate(host):
        g_norm = _flat_unit_norms([it[1] for it in bucket], dtype, False)
        if not torch.isfinite(g_norm).all():
            return _first_nonfinite([it[1] for it in bucket])
        host[i] = (bucket, dtype, g_norm)
    for plan in device_plans:  # the first read syncs once with the device
        finite, plan[3] = plan[2].tolist()  # plan[3]: the number of units clipped
        if not finite:
            return _first_nonfinite([it[1] for it in plan[0]])
    for grads, ok in guards:
        if not ok:
            return _first_nonfinite(grads)
    return None


def _clip_host_bucket(bucket: List[tuple], dtype: torch.dtype, g_norm: Optional[Tensor],
                      on_chunk: OnChunk, counts: Optional[ClipCounts] = None) -> None:
    """Clip a CPU bucket chunk by chunk (``g_norm``: its gradients' norms, if known)."""
    start = 0
    for chunk in _chunks(bucket, CPU_CHUNK_BYTES):
        ps, gs, cs, es = _columns(chunk)
        units = sum(_unit_count(g) for g in gs)
        known = None if g_norm is None else g_norm[start:start + units]
        start += units
        batches, summary = _clip_factors(ps, gs, cs, es, dtype, True, known)
        n_clipped = int(summary[1])
        if n_clipped:
            _mul_(batches)
        if counts is not None:
            counts.clipped += n_clipped
            counts.units += units
        if on_chunk is not None:
            on_chunk(ps)


@torch.no_grad()
def adaptive_clip_grad_(
        parameters: ParamsArg,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        error_if_nonfinite: bool = False,
) -> None:
    """Adaptive gradient clipping, in place on ``p.grad`` (reference ``SGD_AGC`` semantics).

    For every unit (see :func:`unitwise_norm`) of every parameter with a gradient:
    ``max_norm = max(||p_i||, eps) * clipping``; where ``||g_i|| > max_norm``,
    ``g_i *= max_norm / max(||g_i||, 1e-6)``. Other units are left bit-identical.
    All parameters given are clipped; parameters without ``.grad`` are skipped.

    Args:
        parameters: a tensor or an iterable of tensors (e.g. ``model.parameters()``).
        clipping: the clip ratio lambda (> 0); the paper uses 0.01 at batch 1024-4096.
        eps: floor on a unit's parameter norm (> 0), so zero-initialised parameters
            (skip gains) can still move.
        error_if_nonfinite: raise ``FloatingPointError``, before modifying any
            gradient, if one holds inf or NaN (or its norm overflows). Costs one host
            sync on CUDA, and on CPU one more read of the gradients. Without it,
            non-finite gradients are not repaired (a NaN unit stays NaN, a unit holding
            inf becomes NaN).

    Raises:
        TypeError: ``parameters`` holds something that is not a tensor.
        ValueError: ``clipping`` or ``eps`` is not a finite number > 0.
        RuntimeError: a gradient is sparse.
    """
    params = _as_tensor_list(parameters)
    clipping = _check_positive('clipping', clipping)
    eps = _check_positive('eps', eps)
    with_grad = _with_dense_grads(params)
    n = len(with_grad)
    bad = _agc_(with_grad, [clipping] * n, [eps] * n, check_finite=error_if_nonfinite)
    if bad is not None:
        idx = next(i for i, p in enumerate(params) if p.grad is bad)
        raise FloatingPointError(
            f'adaptive_clip_grad_: the gradient of parameter {idx} (shape '
            f'{tuple(params[idx].shape)}) holds inf or NaN')


def _with_dense_grads(params: Iterable[Tensor]) -> List[Tensor]:
    """Parameters that have a gradient; sparse gradients and complex parameters are errors."""
    out = [p for p in params if p.grad is not None]
    for p in out:
        if p.grad.is_sparse:
            raise RuntimeError(f'AGC does not support sparse gradients (parameter of shape '
                               f'{tuple(p.shape)})')
        if p.is_complex() or p.grad.is_complex():
            raise TypeError(f'AGC does not support complex parameters (parameter of shape '
                            f'{tuple(p.shape)}, {p.dtype}); its unit-wise norms are defined for real tensors')
    return out
