"""The reference's tanh-GELU, fast on CPU: ``gelu_tanh``.

DeepMind's NFNets use JAX's ``gelu``, the tanh approximation. ATen's CPU kernels for it (forward
and backward) spend most of their time in a vectorised ``tanh`` that is much slower than its
``sigmoid`` on AVX2 CPUs, and slower than the exact-erf GELU timm uses (which is a different
function, so not an option here; measured: docs/performance.md). The same function is written on ``sigmoid``::

    x/2 (1 + tanh(a (x + b x^3))) == x * sigmoid(x (2a + 2ab x^2))      (sigmoid(2z) = (1 + tanh z)/2)

and evaluated in a few ATen passes over cache-sized chunks: at inference in place; in training
through ``_GeluTanhCPU``, whose forward also writes the derivative for its backward; under
``torch.compile`` as that expression (inductor fuses it). Other devices and dtypes use ATen's
kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import switches
from .probes import functorch_wrapped, is_view

__all__ = ['gelu_tanh']

_GELU_2A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_2AB = _GELU_2A * 0.044715
_GELU_CHUNK = 1 << 19  # floats per pass (2 MiB a buffer): measured fastest on 2-core EPYC (512 KiB L2 each)


def _gelu_tanh_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * (_GELU_2A + _GELU_2AB * x * x))


_is_compiling = torch.compiler.is_compiling


def _fast_cpu_dense(x: torch.Tensor) -> bool:
    """A real, dense CPU float32 tensor that the hand-written ``out=`` / ``as_strided`` passes may
    touch: no functorch wrapper (vmap, grad), no forward-AD tangent."""
    if not switches.gelu or x.device.type != 'cpu' or x.dtype != torch.float32:
        return False
    if torch.jit.is_tracing():  # torch.jit.trace / ONNX export record ATen's GELU, not our passes
        return False
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return False
    if functorch_wrapped(x):
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
_Z_BOUND = 200.0  # |z| beyond which s (1 - s) == 0 in float32: clamping z there changes no result


def _gelu_forward_pass(x: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> None:
    torch.addcmul(_TWO_A, x, x, value=_GELU_2AB, out=z)  # 2a + 2ab x^2
    z.mul_(x).sigmoid_()
    torch.mul(x, z, out=out)


def _gelu_forward_with_derivative(x: torch.Tensor, out: torch.Tensor, deriv: torch.Tensor,
                                  z: torch.Tensor, v: torch.Tensor) -> None:
    # gelu' = s + s (1 - s) x z'  with  x z' = 2a x + 6ab x^3 = 3 (z - 4a/3 x) = 3 v
    torch.addcmul(_TWO_A, x, x, value=_GELU_2AB, out=z)
    # z = x (2a + 2ab x^2), inf for |x| > ~1e13: clamped, the derivative stays finite up to
    # |x| ~ 3e38 (ATen's: NaN from ~1e20); at +-inf it is NaN, as ATen's
    z.mul_(x).clamp_(-_Z_BOUND, _Z_BOUND)
    torch.add(z, x, alpha=-2.0 * _GELU_2A / 3.0, out=v)
    z.sigmoid_()
    torch.ops.aten.sigmoid_backward.grad_input(v, z, grad_input=v)  # v s (1 - s)
    torch.add(z, v, alpha=3.0, out=deriv)
    torch.mul(x, z, out=out)  # last: ``out`` may be ``x``


def _gelu_forward(x: torch.Tensor, out: torch.Tensor, deriv: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x * s``, ``s = sigmoid(z)``, ``z = x (2a + 2ab x^2)``: four ATen passes over each
    cache-sized chunk. Given ``deriv`` (dense, strided like ``x``), it also receives d gelu / dx
    (eight passes in all, against ATen's one slow pass forward and one backward)."""
    if deriv is None:
        _in_chunks(_gelu_forward_pass, (x, out), n_scratch=1)
    else:
        _in_chunks(_gelu_forward_with_derivative, (x, out, deriv), n_scratch=2)
    return out


class _GeluTanhCPU(torch.autograd.Function):
    """tanh-GELU with a hand-written CPU backward.

    ATen's forward and backward both run the slow vectorised ``tanh`` (see ``gelu_tanh``); this
    pair runs on ``sigmoid``: the forward also writes the derivative, which is all the backward
    needs (one multiply), faster than ATen's pair (docs/performance.md). It saves
    that one tensor where ATen saves the input, so memory is as with ATen. The price is no
    double backward (``timm_nfnet_ext.accel.configure(gelu=False)``). In place (a conv output nothing else reads), the
    output overwrites the input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        deriv = torch.empty_like(x)
        y = _gelu_forward(x, x if inplace else torch.empty_like(x), deriv)
        if inplace:  # one new buffer per call (the derivative), as many as ATen's out-of-place GELU
            ctx.mark_dirty(y)
        ctx.save_for_backward(deriv)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(
                'double backward (create_graph=True) through the fast CPU tanh-GELU is not supported: '
                'call timm_nfnet_ext.accel.configure(gelu=False) before the forward pass')
        (deriv,) = ctx.saved_tensors
        return torch.mul(grad, deriv, out=torch.empty_like(deriv)), None  # in the input's memory order


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """tanh-GELU (JAX's ``gelu``); ``x`` is overwritten if ``inplace`` (autograd permitting).

    Written by hand for CPU float32, because ATen's tanh-GELU kernels spend most of their time in
    a vectorised ``tanh`` that is several times slower than its ``sigmoid`` on AVX2 CPUs (and
    slower than timm's erf-GELU). The same function is ``x * sigmoid(x (2a + 2ab x^2))``:
    - without autograd, it is evaluated in four ATen passes over cache-sized chunks, faster per
      call than ATen's kernel and equal to its result within float32 rounding
      (tests/test_gelu.py);
    - with autograd, ``_GeluTanhCPU`` does the same forward, writing the derivative alongside, and
      its backward is one multiply;
    - while ``torch.compile`` traces for a CPU, that form is given to inductor, whose fused loop
      then runs on ``exp`` (faster end to end; measured: docs/performance.md).
    Everything else (other devices and dtypes, non-dense layouts, functorch and forward-AD
    tensors, ``torch.jit.trace`` and ONNX export, ``accel.configure(gelu=False)``) uses ATen's kernels.

    Args:
        x: any tensor.
        inplace: overwrite ``x`` with the result where autograd allows it (while autograd
            records ``x``: not on a leaf, nor on a view).

    Returns:
        The tanh-GELU of ``x`` (``x`` itself when computed in place).

    Raises:
        RuntimeError: in the backward pass, a double backward (``create_graph=True``) through the
            fast CPU path; switch it off first with ``accel.configure(gelu=False)``.
    """
    if _is_compiling():
        return _gelu_tanh_sigmoid(x) if x.device.type == 'cpu' else F.gelu(x, approximate='tanh')
    tracked = x.requires_grad and torch.is_grad_enabled()
    if not _fast_cpu_dense(x):
        return torch.ops.aten.gelu_(x, approximate='tanh') if inplace and not tracked else F.gelu(x, approximate='tanh')
    if tracked:  # autograd forbids in-place on leaves and on some views: out of place there
        return _GeluTanhCPU.apply(x, inplace and not x.is_leaf and not is_view(x))
    return _gelu_forward(x, x if inplace else torch.empty_like(x))  # empty_like keeps dense strides
