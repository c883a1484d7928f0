"""The reference's tanh-GELU, fast on CPU: ``gelu_tanh`` and the ``fast_cpu_gelu`` switch.

DeepMind's NFNets use JAX's ``gelu``, the tanh approximation. ATen's CPU kernels for it (forward
and backward) spend most of their time in a vectorised ``tanh`` that is ~3.5x slower than its
``sigmoid`` on AVX2 CPUs, a third of the speed of the exact-erf GELU timm uses (which is a
different function, so not an option here). The same function is written on ``sigmoid``::

    x/2 (1 + tanh(a (x + b x^3))) == x * sigmoid(x (2a + 2ab x^2))      (sigmoid(2z) = (1 + tanh z)/2)

and evaluated in a few ATen passes over cache-sized chunks: at inference in place, in training
through ``_GeluTanhCPU`` with a backward of its own, under ``torch.compile`` as that expression
(inductor fuses it). Other devices and dtypes use ATen's kernels.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ['gelu_tanh', 'fast_cpu_gelu']

_GELU_2A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_2AB = _GELU_2A * 0.044715
_GELU_CHUNK = 1 << 19  # floats per pass (2 MiB a buffer): measured fastest on 2-core EPYC (512 KiB L2 each)
_SIGMOID_FLOOR = 1e-30  # saved sigmoid's floor, so that x = y / s is finite (s underflows for x < ~ -9.5)


def _gelu_tanh_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * (_GELU_2A + _GELU_2AB * x * x))


_is_compiling = torch.compiler.is_compiling
_is_functorch_wrapped = getattr(getattr(torch._C, '_functorch', None), 'is_functorch_wrapped_tensor',
                                lambda x: False)
_fast_cpu_gelu_enabled = True


class fast_cpu_gelu:  # noqa: N801 (used like a function: ``fast_cpu_gelu(False)``)
    """Switch the hand-written CPU float32 tanh-GELU (forward and backward) on or off.

    Its backward recomputes the input from the saved output and sigmoid instead of keeping the
    input, so it cannot be differentiated twice: turn it off for double backward on CPU
    (``create_graph=True``, e.g. gradient penalties or AdaHessian); ATen's kernels are used then.
    A process-wide setting; as a context manager it restores the previous one on exit::

        with timm_nfnet_ext.gelu.fast_cpu_gelu(False):
            loss = model(x).sum()
            grads = torch.autograd.grad(loss, params, create_graph=True)
    """

    def __init__(self, enabled: bool):
        global _fast_cpu_gelu_enabled
        self.previous = _fast_cpu_gelu_enabled
        _fast_cpu_gelu_enabled = bool(enabled)

    def __enter__(self) -> 'fast_cpu_gelu':
        return self

    def __exit__(self, *exc: Any) -> None:
        global _fast_cpu_gelu_enabled
        _fast_cpu_gelu_enabled = self.previous


def _fast_cpu_dense(x: torch.Tensor) -> bool:
    """A real, dense CPU float32 tensor that the hand-written ``out=`` / ``as_strided`` passes may
    touch: no functorch wrapper (vmap, grad), no forward-AD tangent."""
    if not _fast_cpu_gelu_enabled or x.device.type != 'cpu' or x.dtype != torch.float32:
        return False
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return False
    if _is_functorch_wrapped(x):
        return False
    return torch.autograd.forward_ad.unpack_dual(x).tangent is None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's memory as a flat vector (its memory order, whatever its strides)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _in_chunks(pass_fn: Callable[..., None], tensors: Sequence[torch.Tensor], n_scratch: int) -> None:
    """``pass_fn(*tensor_chunks, *scratch)`` over cache-sized chunks of ``tensors`` (dense, all
    strided alike, so that their flat memory lines up), with ``n_scratch`` scratch buffers."""
    n = tensors[0].numel()
    if n <= _GELU_CHUNK:  # one chunk: no views to build
        pass_fn(*tensors, *(torch.empty_like(tensors[0]) for _ in range(n_scratch)))
        return
    flats = [_flat(t) for t in tensors]
    scratch = [torch.empty(_GELU_CHUNK, dtype=tensors[0].dtype) for _ in range(n_scratch)]
    for i in range(0, n, _GELU_CHUNK):
        chunks = [f[i:i + _GELU_CHUNK] for f in flats]
        k = chunks[0].numel()
        pass_fn(*chunks, *(b[:k] for b in scratch))


_TWO_A = torch.tensor(_GELU_2A, dtype=torch.float32, device='cpu')  # addcmul's base, made once (read only)


def _gelu_forward_pass(x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> None:
    torch.addcmul(_TWO_A, x, x, value=_GELU_2AB, out=s)  # 2a + 2ab x^2
    s.mul_(x).sigmoid_()
    torch.mul(x, s, out=out)


def _gelu_forward_keep_sig(x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> None:
    _gelu_forward_pass(x, out, s)
    s.clamp_min_(_SIGMOID_FLOOR)


def _gelu_forward(x: torch.Tensor, out: torch.Tensor, sig: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x * s``, ``s = sigmoid(x (2a + 2ab x^2))``: four ATen passes over each cache-sized
    chunk. ``sig`` (dense, strided like ``x``) receives ``s`` floored at ``_SIGMOID_FLOOR`` if given."""
    if sig is None:
        _in_chunks(_gelu_forward_pass, (x, out), n_scratch=1)
    else:
        _in_chunks(_gelu_forward_keep_sig, (x, out, sig), n_scratch=0)
    return out


def _gelu_backward_pass(y: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
                        x: torch.Tensor, t: torch.Tensor) -> None:
    torch.div(y, s, out=x).clamp_(max=30.0)  # s == 1 above ~9: keeps x u' s (1 - s) at 0, not inf * 0
    torch.addcmul(_TWO_A, x, x, value=3.0 * _GELU_2AB, out=t).mul_(x)  # x u'
    torch.ops.aten.sigmoid_backward.grad_input(t, s, grad_input=out)  # x u' s (1 - s)
    out.add_(s).mul_(grad)


def _gelu_backward(y: torch.Tensor, sig: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d gelu / dx * grad from the output ``y`` and saved sigmoid ``s`` (``x = y / s``):
    ``s + x s (1 - s) u'`` with ``u' = 2a + 6ab x^2``; seven passes over each cache-sized chunk."""
    out = torch.empty_like(y)
    if grad.stride() != y.stride():
        grad = torch.empty_like(y).copy_(grad)  # the passes need one memory order
    _in_chunks(_gelu_backward_pass, (y, sig, grad, out), n_scratch=2)
    return out


class _GeluTanhCPU(torch.autograd.Function):
    """tanh-GELU with a hand-written CPU backward.

    ATen's forward and backward both run the slow vectorised ``tanh`` (see ``gelu_tanh``); this
    pair runs on ``sigmoid``: forward+backward ~1.6x faster per call. It saves the output and
    the sigmoid instead of the input: where a conv follows (every GELU of the NFNet body), the
    conv keeps that output for its own backward anyway, so memory is as with ATen (the head's
    activation, with nothing after it but pooling, keeps one tensor more). The price is no
    double backward (``fast_cpu_gelu``). In place (a conv output nothing else reads), the
    output overwrites the input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        sig = torch.empty_like(x)
        y = _gelu_forward(x, x if inplace else torch.empty_like(x), sig)
        if inplace:  # one new buffer per call (the sigmoid), as many as ATen's out-of-place GELU
            ctx.mark_dirty(y)
        ctx.save_for_backward(y, sig)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(
                'double backward (create_graph=True) through the fast CPU tanh-GELU is not supported: '
                'call timm_nfnet_ext.gelu.fast_cpu_gelu(False) before the forward pass')
        y, sig = ctx.saved_tensors
        return _gelu_backward(y, sig, grad), None


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """tanh-GELU (JAX's ``gelu``); ``x`` is overwritten if ``inplace`` (autograd permitting).

    Written by hand for CPU float32, because ATen's tanh-GELU kernels spend most of their time in
    a vectorised ``tanh`` that is ~3.5x slower than its ``sigmoid`` on AVX2 CPUs (a third of the
    speed of timm's erf-GELU). The same function is ``x * sigmoid(x (2a + 2ab x^2))``:
    - without autograd, it is evaluated in four ATen passes over cache-sized chunks: ~1.5x faster
      per call (F0 fused inference at 256 px: 3-8% end to end), equal to ATen's result within
      float32 rounding (tests/test_layers.py);
    - with autograd, ``_GeluTanhCPU`` does the same forward and a sigmoid-based backward;
    - while ``torch.compile`` traces for a CPU, that form is given to inductor, whose fused loop
      then runs on ``exp`` (F0 compiled inference, batch 8, 256 px: ~12% faster end to end).
    Everything else (other devices and dtypes, non-dense layouts, functorch and forward-AD
    tensors, ``fast_cpu_gelu(False)``) uses ATen's kernels.
    """
    if _is_compiling():
        return _gelu_tanh_sigmoid(x) if x.device.type == 'cpu' else F.gelu(x, approximate='tanh')
    tracked = x.requires_grad and torch.is_grad_enabled()
    if not _fast_cpu_dense(x):
        return torch.ops.aten.gelu_(x, approximate='tanh') if inplace and not tracked else F.gelu(x, approximate='tanh')
    if tracked:  # autograd forbids in-place on leaves and on some views: out of place there
        return _GeluTanhCPU.apply(x, inplace and not x.is_leaf and not x._is_view())
    return _gelu_forward(x, x if inplace else torch.empty_like(x))  # empty_like keeps dense strides
