"""``SGDAGC``'s update on CPU, chunk by chunk while the chunk is in cache.

Why: clipping reads every gradient once; torch's SGD step then reads them all again, and its
single-tensor update allocates up to three parameter-sized temporaries per parameter per step
(on CPU fresh memory costs page faults). Here each cache-sized chunk of parameters is updated
right after it is clipped, op for op as torch's single-tensor update (so bit-identical to
clipping and then ``torch.optim.SGD.step``; tests/test_agc.py), with the temporaries written
into one reused scratch buffer; ``foreach=True`` and tensor ``lr`` / ``weight_decay`` go to
torch's own functional ``torch.optim.sgd.sgd``. What it saves: docs/agc.md.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from ..agc import clip as _clip
from ..agc.clip import _group_by
from ..agc.optim import SGDAGC
from . import switches

__all__ = ['applies', 'chunked_step']


@torch.no_grad()
def chunked_step(opt: SGDAGC, closure: Optional[Callable[[], Any]] = None) -> Any:
    """``SGDAGC.step``, each chunk updated right after it is clipped (see ``applies``).

    Args:
        opt: the optimizer.
        closure: re-evaluates the model and returns the loss.

    Returns:
        The closure's loss, or None.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    done: set = set()

    def update(params: List[Tensor]) -> None:
        for group, ps in _group_by(params, lambda p: id(group_of[id(p)])).items():
            _sgd_update(opt, group_of[id(ps[0])], ps)
        done.update(id(p) for p in params)

    if opt._clip_or_skip(on_chunk=update):
        update([p for g in opt.param_groups for p in g['params']
                if p.grad is not None and id(p) not in done])  # unclipped groups
    return loss

def applies(opt: SGDAGC) -> bool:
    """Whether ``chunked_step`` runs ``opt.step``: switched on, on CPU only, and not with torch's
    fused or differentiable SGD.

    Args:
        opt: the optimizer.

    Returns:
        True if every parameter qualifies.
    """
    return switches.sgd and all(_clip._immediate(p.device) and not g.get('fused') and not g.get('differentiable')
                                for g in opt.param_groups for p in g['params'])

def _sgd_update(opt: SGDAGC, group: Dict[str, Any], params: List[Tensor]) -> None:
    """``torch.optim.SGD.step`` for ``params`` of ``group``: torch's functional when it asks
    for ``foreach`` or tensor hyper-parameters, else ``_sgd_update_single``."""
    uses_momentum = group['momentum'] != 0
    bufs = [opt.state[p].get('momentum_buffer') if uses_momentum else None for p in params]
    if group['foreach'] or any(isinstance(group[k], Tensor) for k in ('lr', 'weight_decay')):
        torch_sgd(
            params, [p.grad for p in params], bufs, foreach=group['foreach'],
            weight_decay=group['weight_decay'], momentum=group['momentum'], lr=group['lr'],
            dampening=group['dampening'], nesterov=group['nesterov'], maximize=group['maximize'])
    else:
        for i, p in enumerate(params):
            bufs[i] = _sgd_update_single(opt, group, p, bufs[i])
    if uses_momentum:
        for p, buf in zip(params, bufs):
            opt.state[p]['momentum_buffer'] = buf

def _sgd_update_single(opt: SGDAGC, group: Dict[str, Any], p: Tensor, buf: Optional[Tensor]) -> Optional[Tensor]:
    """torch's single-tensor SGD update, op for op (so bit-identical), with its temporaries
    (negated gradient, gradient plus weight decay, plus momentum) written into one reused
    scratch buffer strided like ``p``: torch allocates up to three parameter-sized tensors
    per parameter per step, and on CPU fresh memory costs page faults (docs/agc.md, Speed)."""
    momentum, dampening = group['momentum'], group['dampening']
    scratch = _scratch_like(opt, p)  # None: torch's own out-of-place ops
    grad = torch.neg(p.grad, out=scratch) if group['maximize'] else p.grad
    if group['weight_decay'] != 0:
        grad = torch.add(grad, p, alpha=group['weight_decay'], out=scratch)
    if momentum != 0:
        if buf is None:
            buf = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = torch.add(grad, buf, alpha=momentum, out=scratch) if group['nesterov'] else buf
    p.add_(grad, alpha=-group['lr'])
    return buf

def _scratch_like(opt: SGDAGC, p: Tensor) -> Optional[Tensor]:
    """A scratch tensor with ``p``'s shape and strides: a view of one buffer per (device,
    dtype), grown to the largest parameter seen (not part of the optimizer's state). None
    where ``p`` or its gradient is not densely laid out alike: the memory order of an
    elementwise op's output decides its inner loop, and with it the rounding of half types."""
    if not _dense(p) or p.grad.stride() != p.stride():
        return None
    pool = opt.__dict__.setdefault('_scratch', {})
    key = (p.device, p.dtype)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < p.numel():
        buffer = pool[key] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
    return buffer.as_strided(p.shape, p.stride())


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory exactly, in some order of its dims (no gaps, no overlap)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
