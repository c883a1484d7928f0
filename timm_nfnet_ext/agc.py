"""Adaptive gradient clipping (AGC) and AGC optimizers for timm.

AGC (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization") rescales the gradient of every *unit* whose gradient norm exceeds
``clipping`` times the unit's parameter norm:

    max_norm = max(||W_i||, eps) * clipping
    G_i     *= max_norm / max(||G_i||, 1e-6)      only where ||G_i|| > max_norm

A unit is a whole tensor for scalars and vectors (gains, biases, skip gains), an output
row for linear weights and an output channel for conv weights (PyTorch layout: output
dimension first). Norms are taken on the raw parameter, not on a standardised weight.

This module gives:

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

import functools
import itertools
import math
import warnings
from dataclasses import replace
from fnmatch import fnmatch
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.sgd import sgd as torch_sgd

from timm.optim import Lamb

try:  # timm's optimizer registry (recent timm 1.0.x)
    from timm.optim._optim_factory import OptimInfo, default_registry
except ImportError:  # pragma: no cover - depends on the installed timm
    OptimInfo = default_registry = None

__all__ = [
    'unitwise_norm', 'adaptive_clip_grad_', 'agc_param_groups', 'AGCMixin', 'with_agc',
    'SGDAGC', 'AdamWAGC', 'LambAGC', 'register_agc_optimizer', 'AGC_OPTIMIZER_NAMES',
]

GRAD_NORM_FLOOR = 1e-6
"""Lower bound on a unit's gradient norm in the clip factor (reference value)."""

NONFINITE_MODES = ('raise', 'skip')
AGC_OPTIMIZER_NAMES = ('sgdagc', 'adamwagc', 'lambagc')
_NO_DECAY_LEAF_NAMES = frozenset({'gain', 'skip_gain', 'skipinit_gain'})

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
    :func:`_factor_batches`, and (if asked) a device tensor ``[all unit norms finite, any
    unit clipped]``. The lists must be sorted by ndim and shape. Reads, never writes.
    ``g_norm``: the gradients' unit norms, if already known."""
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
    summary = torch.stack([torch.isfinite(g_norm).all(), trigger.any()]) if want_summary else None
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


def _agc_(params: Sequence[Tensor], clips: Sequence[float], epss: Sequence[float],
          check_finite: bool, check_only: Sequence[Tensor] = (), on_chunk: OnChunk = None
          ) -> Optional[Tensor]:
    """Clip the gradients of ``params`` in place, with per-tensor clipping and eps.

    Tensors are bucketed by (device, norm dtype) and sorted by shape. CPU buckets are
    clipped in cache-sized chunks, and ``on_chunk(chunk_params)`` runs on each chunk just
    after it is clipped, while its tensors are still in cache. Other devices are clipped
    in one batch per bucket, with no host sync unless ``check_finite``.

    With ``check_finite``, every gradient of ``params`` and ``check_only`` is checked
    before any is modified (or ``on_chunk`` runs); the first non-finite one is returned.
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
            device_plans.append([bucket, batches, summary, True])
    if check_finite:
        bad = _check_finite(host, device_plans, check_only)
        if bad is not None:
            return bad
    for bucket, dtype, g_norm in host:
        _clip_host_bucket(bucket, dtype, g_norm, on_chunk)
    for bucket, batches, _, clipped in device_plans:
        if clipped:
            _mul_(batches)
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
        finite, plan[3] = plan[2].tolist()
        if not finite:
            return _first_nonfinite([it[1] for it in plan[0]])
    for grads, ok in guards:
        if not ok:
            return _first_nonfinite(grads)
    return None


def _clip_host_bucket(bucket: List[tuple], dtype: torch.dtype, g_norm: Optional[Tensor],
                      on_chunk: OnChunk) -> None:
    """Clip a CPU bucket chunk by chunk (``g_norm``: its gradients' norms, if known)."""
    start = 0
    for chunk in _chunks(bucket, CPU_CHUNK_BYTES):
        ps, gs, cs, es = _columns(chunk)
        units = sum(_unit_count(g) for g in gs)
        known = None if g_norm is None else g_norm[start:start + units]
        start += units
        batches, summary = _clip_factors(ps, gs, cs, es, dtype, True, known)
        if summary[1]:
            _mul_(batches)
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
    """Parameters that have a gradient; sparse gradients are an error."""
    out = [p for p in params if p.grad is not None]
    for p in out:
        if p.grad.is_sparse:
            raise RuntimeError(f'AGC does not support sparse gradients (parameter of shape '
                               f'{tuple(p.shape)})')
    return out


# --------------------------------------------------------------------------- optimizers

def _parent_step(optimizer: Optimizer, cls: type) -> Callable[[], Any]:
    """The next class's ``step`` after ``cls`` in the MRO, bound, without torch's hook wrapper.

    torch wraps a class's ``step`` (hooks, profiling) when it is first instantiated; going
    through that wrapper again from our own (wrapped) ``step`` would run hooks twice.
    """
    func = getattr(super(cls, optimizer).step, '__func__')
    if getattr(func, 'hooked', False):
        func = func.__wrapped__
    return functools.partial(func, optimizer)


class AGCMixin:
    """Adds AGC to an optimizer class: ``class MyOptAGC(AGCMixin, MyOpt): pass``.

    ``step()`` clips the gradients of every parameter group whose ``clipping`` is not
    ``None`` (each group may set its own ``clipping`` and ``agc_eps``), then runs the
    base optimizer's step, so AGC comes before weight decay and momentum. Because
    clipping happens inside ``step()``, ``GradScaler.step(opt)`` unscales first and
    clipping sees true gradients; accumulated gradients are clipped once per step.

    Non-finite gradients (inf/NaN in any parameter with a gradient, clipped or not)
    are caught before any parameter or state is modified (one host sync per step on
    CUDA):
    ``nonfinite='raise'`` raises ``FloatingPointError``; ``'skip'`` skips the step,
    leaving parameters and optimizer state untouched, warns, and counts it in
    ``skipped_steps``. Under ``GradScaler`` such steps never reach ``step()``.

    Keyword args added to the base class's: ``clipping`` (default 0.01; > 0, or None
    to clip no group unless it sets its own), ``agc_eps`` (default 1e-3, > 0; named
    so as not to clash with Adam's ``eps``), ``nonfinite`` ('raise' or 'skip').
    """

    def __init__(self, params: Any, *args: Any, clipping: Optional[float] = 0.01,
                 agc_eps: float = 1e-3, nonfinite: str = 'raise', **kwargs: Any) -> None:
        self._agc_defaults = {
            'clipping': _check_clipping(clipping),
            'agc_eps': _check_positive('agc_eps', agc_eps),
        }
        self.nonfinite = _check_nonfinite(nonfinite)
        self.skipped_steps = 0
        super().__init__(params, *args, **kwargs)
        self.defaults.update(self._agc_defaults)
        # Fused torch optimizers let GradScaler skip unscaling; AGC must see unscaled grads.
        self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; it may set ``clipping`` (> 0 or None) and ``agc_eps`` (> 0)."""
        for key, value in self._agc_defaults.items():
            param_group.setdefault(key, value)
        _validate_group(param_group)
        super().add_param_group(param_group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        defaults = getattr(self, '_agc_defaults', None) or self.defaults
        for group in self.param_groups:  # state dicts saved without AGC
            group.setdefault('clipping', defaults.get('clipping', 0.01))
            group.setdefault('agc_eps', defaults.get('agc_eps', 1e-3))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Evaluate ``closure`` (if given), clip gradients, then take the base step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._clip_or_skip():
            _parent_step(self, AGCMixin)()
        return loss

    def _clip_or_skip(self, on_chunk: OnChunk = None) -> bool:
        """Clip in place; False when the step must be skipped (non-finite gradient).
        ``on_chunk``: see :func:`_agc_` (runs only once every gradient is known finite)."""
        params, clips, epss, unclipped = [], [], [], []
        for group in self.param_groups:
            with_grad = _with_dense_grads(group['params'])
            if group['clipping'] is None:
                unclipped.extend(p.grad for p in with_grad)
                continue
            params += with_grad
            clips += [group['clipping']] * len(with_grad)
            epss += [group['agc_eps']] * len(with_grad)
        bad = _agc_(params, clips, epss, check_finite=True, check_only=unclipped,
                    on_chunk=on_chunk)
        if bad is None:
            return True
        where = self._locate(bad)
        if self.nonfinite == 'raise':
            raise FloatingPointError(
                f'{type(self).__name__}: the gradient of {where} holds inf or NaN; the step was '
                "not taken. Use torch.amp.GradScaler for fp16, or nonfinite='skip' to skip "
                'such steps.')
        self.skipped_steps += 1
        warnings.warn(f'{type(self).__name__}: skipped a step, the gradient of {where} holds '
                      'inf or NaN', RuntimeWarning, stacklevel=3)
        return False

    def _locate(self, grad: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group['params']):
                if p.grad is grad:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return 'a parameter'


def _validate_group(group: Dict[str, Any]) -> None:
    """Check a group's AGC settings and store them as floats (an int ``agc_eps`` would break the step)."""
    group['clipping'] = _check_clipping(group['clipping'], where="a param group's clipping")
    group['agc_eps'] = _check_positive("a param group's agc_eps", group['agc_eps'])


class SGDAGC(AGCMixin, torch.optim.SGD):
    """The reference ``SGD_AGC``: clip, add weight decay, then Nesterov momentum SGD.

    Per parameter: ``g = agc(g) + weight_decay * p``; ``buf = momentum * buf + g``;
    ``p -= lr * (g + momentum * buf)`` -- exactly ``torch.optim.SGD`` with
    ``nesterov=True, dampening=0`` after AGC (whose defaults this class takes), so
    ``foreach``/``fused`` work as in torch. See :class:`AGCMixin` for the AGC arguments.

    On CPU the update runs chunk by chunk right after each chunk is clipped (torch's own
    functional ``torch.optim.sgd.sgd``, so the result is bit-identical to clipping and
    then calling ``torch.optim.SGD.step``), while the chunk is still in cache.
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = True,
                 *, clipping: Optional[float] = 0.01, agc_eps: float = 1e-3,
                 nonfinite: str = 'raise', **kwargs: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, clipping=clipping,
                         agc_eps=agc_eps, nonfinite=nonfinite, **kwargs)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Evaluate ``closure`` (if given), clip gradients, then the SGD update."""
        if not self._chunked_update_ok():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = {id(p): g for g in self.param_groups for p in g['params']}
        done: set = set()

        def update(params: List[Tensor]) -> None:
            for group, ps in _group_by(params, lambda p: id(group_of[id(p)])).items():
                self._sgd_update(group_of[id(ps[0])], ps)
            done.update(id(p) for p in params)

        if self._clip_or_skip(on_chunk=update):
            update([p for g in self.param_groups for p in g['params']
                    if p.grad is not None and id(p) not in done])  # unclipped groups
        return loss

    def _chunked_update_ok(self) -> bool:
        """Chunked updates on CPU only, and not with torch's fused or differentiable SGD."""
        return all(_immediate(p.device) and not g.get('fused') and not g.get('differentiable')
                   for g in self.param_groups for p in g['params'])

    def _sgd_update(self, group: Dict[str, Any], params: List[Tensor]) -> None:
        """``torch.optim.SGD.step`` for ``params`` of ``group``, via torch's functional."""
        uses_momentum = group['momentum'] != 0
        bufs = [self.state[p].get('momentum_buffer') if uses_momentum else None for p in params]
        torch_sgd(
            params, [p.grad for p in params], bufs, foreach=group['foreach'],
            weight_decay=group['weight_decay'], momentum=group['momentum'], lr=group['lr'],
            dampening=group['dampening'], nesterov=group['nesterov'], maximize=group['maximize'])
        if uses_momentum:
            for p, buf in zip(params, bufs):
                self.state[p]['momentum_buffer'] = buf


class AdamWAGC(AGCMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` with AGC before the update (see :class:`AGCMixin`)."""


class LambAGC(AGCMixin, Lamb):
    """timm's ``Lamb`` with AGC before the update (see :class:`AGCMixin`).

    Lamb's own global-norm clipping (``max_grad_norm``, default 1.0) still runs after
    AGC; pass ``max_grad_norm=None`` to use AGC alone.
    """


_AGC_CLASSES: Dict[type, type] = {torch.optim.AdamW: AdamWAGC, Lamb: LambAGC}


def with_agc(optimizer_cls: Type[Optimizer]) -> Type[Optimizer]:
    """An AGC subclass of ``optimizer_cls`` (same arguments plus those of :class:`AGCMixin`).

    Works for any ``torch.optim.Optimizer`` subclass whose ``step`` reads ``p.grad``;
    repeated calls return the same class. Example::

        LionAGC = with_agc(timm.optim.Lion)
        opt = LionAGC(agc_param_groups(model), lr=1e-4, clipping=0.01)
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f'with_agc needs a torch.optim.Optimizer subclass, got {optimizer_cls!r}')
    if issubclass(optimizer_cls, AGCMixin):
        return optimizer_cls
    if optimizer_cls not in _AGC_CLASSES:
        name = f'{optimizer_cls.__name__}AGC'
        if name in globals():  # e.g. SGD: SGDAGC has the reference's defaults, not SGD's
            name = f'{optimizer_cls.__name__}WithAGC'
        _AGC_CLASSES[optimizer_cls] = type(name, (AGCMixin, optimizer_cls), {
            '__doc__': f'{optimizer_cls.__name__} with adaptive gradient clipping (AGCMixin).',
            '__module__': __name__,
        })
    return _AGC_CLASSES[optimizer_cls]


# --------------------------------------------------------------------------- param groups

def _unwrap(model: nn.Module) -> nn.Module:
    """Reach the model inside DDP / DataParallel / torch.compile wrappers."""
    while not hasattr(model, 'get_classifier'):
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _classifier_weight(model: nn.Module) -> Tensor:
    if not hasattr(model, 'get_classifier'):
        raise ValueError(
            f'agc_param_groups needs a model with get_classifier() to leave the classifier '
            f'weight unclipped; {type(model).__name__} has none. Pass a list of parameters to '
            f'clip everything, or build the groups yourself.')
    head = model.get_classifier()
    weight = getattr(head, 'weight', None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f'agc_param_groups: get_classifier() of {type(model).__name__} returned '
            f'{type(head).__name__}, which has no weight (a model built with num_classes=0?). '
            f'The paper grouping needs a classifier; pass a list of parameters to clip all.')
    return weight


def _no_decay(name: str, p: Tensor, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit('.', 1)[-1]
    return (p.ndim <= 1 or leaf == 'bias' or leaf in _NO_DECAY_LEAF_NAMES
            or any(fnmatch(name, pat) for pat in patterns))


def agc_param_groups(
        model: nn.Module,
        weight_decay: Optional[float] = None,
        clipping: Optional[float] = None,
        no_weight_decay_list: Iterable[str] = (),
) -> List[Dict[str, Any]]:
    """The paper's parameter groups for an AGC optimizer.

    * the classifier weight (``model.get_classifier().weight``): weight decay, **not
      clipped** (``clipping=None``);
    * gains, biases, skip gains -- tensors with ``ndim <= 1``, names ending ``.bias``,
      ``.gain``, ``.skip_gain``, ``.skipinit_gain``, and ``model.no_weight_decay()`` /
      ``no_weight_decay_list`` (fnmatch patterns): clipped, weight decay 0;
    * everything else (conv and linear weights): clipped, weight decay.

    Frozen parameters (``requires_grad=False``) are left out. With ``weight_decay`` or
    ``clipping`` left ``None`` the groups inherit the optimizer's value, so this works as
    ``create_optimizer_v2(model, 'sgdagc', weight_decay=2e-5, clipping=0.01,
    param_group_fn=agc_param_groups)``. DDP / DataParallel / compiled wrappers are
    looked through.

    Raises:
        ValueError: the model has no ``get_classifier()`` or no classifier weight, or
            ``weight_decay`` < 0, or ``clipping`` <= 0.
    """
    model = _unwrap(model)
    head_weight = _classifier_weight(model)
    if weight_decay is not None and not weight_decay >= 0:
        raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}')
    clipping = _check_clipping(clipping)
    patterns = set(no_weight_decay_list) | set(getattr(model, 'no_weight_decay', set)())
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p is head_weight:
            head.append(p)
        else:
            (no_decay if _no_decay(name, p, patterns) else decay).append(p)

    def group(params: List[Tensor], wd: Optional[float], clip: Any) -> Dict[str, Any]:
        g: Dict[str, Any] = {'params': params}
        if wd is not None:
            g['weight_decay'] = wd
        if clip is not _INHERIT:
            g['clipping'] = clip
        return g

    clip = _INHERIT if clipping is None else clipping
    groups = [group(decay, weight_decay, clip), group(no_decay, 0.0, clip),
              group(head, weight_decay, None)]
    return [g for g in groups if g['params']]


_INHERIT = object()


# --------------------------------------------------------------------------- timm registry

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or '_' in name or name != name.lower():
        raise ValueError(f"optimizer name must be lowercase without '_' (timm keeps only the "
                         f"text after the last '_'), got {name!r}")
    return name


def register_agc_optimizer(
        name: str,
        base: Union[str, Type[Optimizer]],
        description: str = '',
        registry: Any = None,
        **info: Any,
) -> Any:
    """Register an AGC form of an optimizer in timm's optimizer registry.

    Args:
        name: the new name, lowercase without ``_`` (e.g. ``'lionagc'``).
        base: a registered timm optimizer name (its ``OptimInfo`` flags and defaults
            are copied) or an optimizer class.
        description: shown by ``timm.optim.list_optimizers(with_description=True)``.
        registry: defaults to timm's ``default_registry``.
        **info: ``OptimInfo`` fields to set (``has_momentum``, ``defaults``, ...).

    Returns:
        The registered ``OptimInfo``.
    """
    if OptimInfo is None:
        raise RuntimeError('this timm has no optimizer registry '
                           '(timm.optim._optim_factory.OptimInfo); upgrade timm')
    registry = default_registry if registry is None else registry
    name = _check_name(name)
    if isinstance(base, str):
        base_info = registry.get_optimizer_info(base)
        cls = with_agc(registry.get_optimizer_class(base_info, bind_defaults=False))
        desc = description or f'{base_info.description} + adaptive gradient clipping'
        opt_info = replace(base_info, name=name, opt_class=cls, description=desc, **info)
    else:
        opt_info = OptimInfo(name=name, opt_class=with_agc(base),
                             description=description or f'{base.__name__} + AGC', **info)
    registry.register(opt_info)
    return opt_info


def _register_builtin() -> None:
    if OptimInfo is None:  # pragma: no cover - old timm
        warnings.warn('this timm has no optimizer registry: AGC optimizers were not '
                      'registered; use the classes directly, or upgrade timm')
        return
    default_registry.register(OptimInfo(
        name='sgdagc', opt_class=SGDAGC, has_eps=False, has_momentum=True,
        defaults={'nesterov': True},
        description='SGD_AGC of the NFNet paper: AGC, weight decay, Nesterov momentum SGD'))
    register_agc_optimizer('adamwagc', 'adamw', 'torch AdamW with adaptive gradient clipping')
    register_agc_optimizer('lambagc', 'lamb', 'timm Lamb with adaptive gradient clipping')


_register_builtin()
