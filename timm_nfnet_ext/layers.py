"""Building blocks of DeepMind's NFNets, written for exact parity with the JAX reference.

Why not timm's own layers: timm's ``ScaledStdConv2dSame`` standardises with ``var + eps``
(DeepMind: ``max(var * fan_in, 1e-4)``), timm's GELU is the exact-erf form (DeepMind: the tanh
approximation) and its drop-path rescales by ``1/keep`` (DeepMind: no rescale). Each of these
moves the logits of the released weights, so the few layers below are written by hand.

Speed choices (each keeps the reference's numbers):
- the constant that multiplies a conv's input (the activation's gamma, the block's beta) is
  folded into the conv's standardised weight (``input_scale``), so activations are plain
  ``gelu`` and no elementwise multiply over a feature map is spent on constants;
- XLA 'SAME' padding is given to the conv itself whenever it is symmetric (all stride-1 convs,
  stride-2 convs on odd sizes); only the asymmetric stride-2 case pads explicitly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import get_same_padding

__all__ = [
    'GAMMAS', 'get_act_fn', 'same_pads', 'SameConv2d', 'standardize_weight', 'WSConv2d', 'SqueezeExcite',
    'StochasticDepthMask', 'gelu_tanh', 'fast_cpu_gelu',
]

# Gamma of each activation in DeepMind's table: 1 / std(act(z)) for z ~ N(0, 1), so that a
# gamma-scaled activation keeps unit variance. Numbers from the reference `nfnets/base.py`.
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

# The same functions as JAX's defaults. JAX's `gelu` is the tanh approximation; its
# log_softmax normalises over the channel axis (last in NHWC, dim 1 here).
_ACT_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'identity': lambda x: x,
    'celu': F.celu,
    'elu': F.elu,
    'gelu': lambda x: gelu_tanh(x),
    'leaky_relu': F.leaky_relu,
    'log_sigmoid': F.logsigmoid,
    'log_softmax': lambda x: F.log_softmax(x, dim=1),
    'relu': F.relu,
    'relu6': F.relu6,
    'selu': F.selu,
    'sigmoid': torch.sigmoid,
    'silu': F.silu,
    'soft_sign': F.softsign,
    'softplus': F.softplus,
    'tanh': torch.tanh,
}
# In-place forms, used at inference (no autograd on the input), and for GELU in training too
# (see Activation): a fresh multi-MB output per activation costs page faults comparable to the
# activation itself on CPU.
_INPLACE_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'identity': lambda x: x,
    'celu': lambda x: F.celu(x, inplace=True),
    'elu': lambda x: F.elu(x, inplace=True),
    'gelu': lambda x: gelu_tanh(x, inplace=True),
    'leaky_relu': lambda x: F.leaky_relu(x, inplace=True),
    'relu': torch.relu_,
    'relu6': lambda x: F.relu6(x, inplace=True),
    'selu': torch.selu_,
    'sigmoid': torch.sigmoid_,
    'silu': lambda x: F.silu(x, inplace=True),
    'tanh': torch.tanh_,
}


# sigmoid(2z) == (1 + tanh(z)) / 2, so tanh-GELU x/2 (1 + tanh(a (x + b x^3))) == x sigmoid(x (2a + 2ab x^2))
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

        with timm_nfnet_ext.layers.fast_cpu_gelu(False):
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


_TWO_A = torch.tensor(_GELU_2A, dtype=torch.float32, device='cpu')  # addcmul's base, made once (read only)


def _gelu_forward_pass(x: torch.Tensor, out: torch.Tensor, s: torch.Tensor, keep_sig: bool) -> None:
    torch.addcmul(_TWO_A, x, x, value=_GELU_2AB, out=s)  # 2a + 2ab x^2
    s.mul_(x).sigmoid_()
    torch.mul(x, s, out=out)
    if keep_sig:
        s.clamp_min_(_SIGMOID_FLOOR)


def _gelu_forward(x: torch.Tensor, out: torch.Tensor, sig: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x * s``, ``s = sigmoid(x (2a + 2ab x^2))``: four ATen passes over each cache-sized
    chunk. ``sig`` (dense, strided like ``x``) receives ``s`` floored at ``_SIGMOID_FLOOR`` if given."""
    keep = sig is not None
    n = x.numel()
    if n <= _GELU_CHUNK:  # one chunk: no views to build
        _gelu_forward_pass(x, out, sig if keep else torch.empty_like(x), keep)
        return out
    fx, fo = _flat(x), _flat(out)
    fs = _flat(sig) if keep else torch.empty(_GELU_CHUNK, dtype=x.dtype)
    for i in range(0, n, _GELU_CHUNK):
        xs = fx[i:i + _GELU_CHUNK]
        _gelu_forward_pass(xs, fo[i:i + _GELU_CHUNK], fs[i:i + _GELU_CHUNK] if keep else fs[:xs.numel()], keep)
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
    n = y.numel()
    if n <= _GELU_CHUNK:
        _gelu_backward_pass(y, sig, grad, out, torch.empty_like(y), torch.empty_like(y))
        return out
    fy, fs, fg, fo = _flat(y), _flat(sig), _flat(grad), _flat(out)
    x_buf, t_buf = torch.empty(_GELU_CHUNK, dtype=y.dtype), torch.empty(_GELU_CHUNK, dtype=y.dtype)
    for i in range(0, n, _GELU_CHUNK):
        s = fs[i:i + _GELU_CHUNK]
        k = s.numel()
        _gelu_backward_pass(fy[i:i + _GELU_CHUNK], s, fg[i:i + _GELU_CHUNK], fo[i:i + _GELU_CHUNK], x_buf[:k], t_buf[:k])
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
                'call timm_nfnet_ext.layers.fast_cpu_gelu(False) before the forward pass')
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


def get_act_fn(name: str) -> Tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Return ``(fn, gamma)`` for an activation of DeepMind's table (without gamma applied)."""
    if name not in _ACT_FNS:
        raise ValueError(f'unknown activation {name!r}; choose one of {sorted(_ACT_FNS)}')
    return _ACT_FNS[name], GAMMAS[name]


class Activation(nn.Module):
    """An activation of the gamma table; ``scale`` multiplies the output (1.0 when folded away).

    With ``inplace=True`` the input is overwritten at inference, and in training too where the
    activation's backward does not need its input (tanh-GELU on CPU, see ``_GeluTanhCPU``); only
    set it where nothing else reads the input afterwards (forward hooks on the conv before it
    see the overwritten tensor).
    """

    def __init__(self, name: str, scale: float = 1.0, inplace: bool = False):
        super().__init__()
        self.name = name
        self.fn, _ = get_act_fn(name)
        self.fn_ = _INPLACE_FNS.get(name) if inplace else None
        # gelu_tanh(inplace=True) decides for itself whether autograd lets it overwrite its input
        self.fn_train = self.fn_ if name == 'gelu' and self.fn_ is not None else self.fn
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        no_grad = not (x.requires_grad and torch.is_grad_enabled())
        if no_grad:
            y = self.fn_(x) if self.fn_ is not None else self.fn(x)
        else:
            y = self.fn_train(x)
        if self.scale == 1.0:
            return y
        # scale in place when y is ours to overwrite (a fresh output, or an in-place result)
        return y.mul_(self.scale) if no_grad and (y is not x or self.fn_ is not None) else y * self.scale

    def extra_repr(self) -> str:
        return self.name + (f', scale={self.scale}' if self.scale != 1.0 else '') + (', inplace' if self.fn_ else '')


def same_pads(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """XLA 'SAME' padding of one spatial dim: ``(low, high)``, the odd pixel going high."""
    total = get_same_padding(size, kernel, stride, 1)
    return total // 2, total - total // 2


def conv2d_same(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int,
) -> torch.Tensor:
    """``F.conv2d`` with XLA 'SAME' padding.

    Symmetric padding goes to the conv (no copy); only the asymmetric case (a stride-2 conv on
    an even size pads 0 low, 1 high) materialises a padded input.
    """
    kh, kw = weight.shape[-2:]
    ph = same_pads(x.shape[-2], kh, stride)
    pw = same_pads(x.shape[-1], kw, stride)
    if ph[0] == ph[1] and pw[0] == pw[1]:
        return F.conv2d(x, weight, bias, stride, (ph[0], pw[0]), 1, groups)
    x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    return F.conv2d(x, weight, bias, stride, 0, 1, groups)


class SameConv2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` with XLA 'SAME' padding decided from the input size.

    What ``WSConv2d.fuse()`` returns for strided convs, whose padding depends on the parity of
    the input; stride-1 convs fuse to an ordinary ``nn.Conv2d`` with static padding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias, self.stride[0], self.groups)


class _StandardizeWeight(torch.autograd.Function):
    """``w_hat = (w - mean) * rsqrt(max(||w - mean||^2, eps)) * gain * c``, per output row.

    (``||w - mean||^2 = var * fan_in``: the reference's formula.) Written by hand because
    autograd's graph of the same expression costs ~4x more passes over the weights than this,
    and ATen's CPU ``var_mean`` is two orders of magnitude slower than a sum.

    Backward: where no row sits on the eps floor, this is batch norm's backward over the rows
    (``invstd = rsqrt(var)``, weight ``gain * c / sqrt(fan_in)``), so ATen's fused batch-norm
    backward kernel is given our saved statistics (F0, all weights: 82 ms vs 140 ms forward +
    backward). Rows on the floor have a constant scale, which batch norm's formula does not
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
        if not _is_compiling() and bool(unclamped.all()):  # (a data-dependent branch: eager only)
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


def _standardize_weight_autograd(weight: torch.Tensor, gain: torch.Tensor, input_scale: float,
                                 eps: float) -> torch.Tensor:
    """The reference expression, left to autograd."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * weight[0].numel(), min=eps)) * (gain * input_scale).view(-1, 1, 1, 1)
    return weight * scale - mean * scale


def standardize_weight(weight: torch.Tensor, gain: torch.Tensor, input_scale: float = 1.0,
                       eps: float = 1e-4) -> torch.Tensor:
    """DeepMind's scaled weight standardisation (see ``WSConv2d``), float32 math.

    CPU: the hand-written autograd function (fewer passes over the weights; ATen's CPU
    ``var_mean`` is slow). GPU: the plain expression, whose fewer kernel launches matter more
    there (measured on an H100, F0 batch 64 bf16: forward+backward 67.8 ms vs 73.1 ms).
    """
    with torch.autocast(device_type=weight.device.type, enabled=False):
        if weight.device.type == 'cpu':
            return _StandardizeWeight.apply(weight, gain, input_scale, eps)
        return _standardize_weight_autograd(weight, gain, input_scale, eps)


class WSConv2d(nn.Conv2d):
    """DeepMind's scaled weight-standardised conv (``WSConv2D``) with 'SAME' padding.

    ``w_hat = (w - mean) * rsqrt(max(var * fan_in, eps)) * gain``, mean and (population)
    variance over each output channel's fan-in; bias always present. ``input_scale`` is a
    constant multiplying the conv's input (an activation's gamma, a block's beta), folded into
    ``w_hat`` instead of spent as an elementwise op on the feature map.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            groups: int = 1,
            input_scale: float = 1.0,
            eps: float = 1e-4,
    ):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, groups=groups, bias=True)
        self.gain = nn.Parameter(torch.ones(out_chs))
        self.input_scale = float(input_scale)
        self.eps = eps
        self.fan_in = (in_chs // groups) * kernel_size * kernel_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: ``w ~ N(0, 1/fan_in)``, gain 1, bias 0."""
        if not hasattr(self, 'gain'):
            return  # nn.Conv2d.__init__ calls this before gain exists
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.fan_in))
        nn.init.ones_(self.gain)
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the conv applies: standardised, times gain and ``input_scale``."""
        return standardize_weight(self.weight, self.gain, self.input_scale, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.standardized_weight(), self.bias, self.stride[0], self.groups)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain conv with the standardised weight baked in, for inference.

        Stride-1 convs get static symmetric padding (exactly XLA 'SAME' for odd kernels);
        strided convs keep size-dependent 'SAME' padding (``SameConv2d``). The weight is stored
        channels_last (see below).
        """
        k = self.kernel_size[0]
        if self.stride[0] == 1 and k % 2 == 1:
            conv = nn.Conv2d(self.in_channels, self.out_channels, k, padding=k // 2, groups=self.groups)
        else:
            conv = SameConv2d(self.in_channels, self.out_channels, k, stride=self.stride, groups=self.groups)
        # channels_last weights: oneDNN (CPU) and cuDNN (GPU) then run the conv in NHWC, their
        # fastest layout, whatever the input's layout (outputs are then channels_last too).
        conv = conv.to(device=self.weight.device, dtype=self.weight.dtype, memory_format=torch.channels_last)
        conv.weight.copy_(self.standardized_weight())
        conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = super().extra_repr().replace(', padding=(0, 0)', ", padding='SAME'")
        return s + (f', input_scale={self.input_scale:.6g}' if self.input_scale != 1.0 else '')


class SqueezeExcite(nn.Module):
    """The reference SE: mean over H,W -> Linear -> ReLU (no gamma) -> Linear -> sigmoid.

    Returns the (N, C) gate; the block applies it (times 2) to the feature map.
    """

    def __init__(self, chs: int, se_ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(chs * se_ratio))
        self.fc1 = nn.Linear(chs, hidden)
        self.fc2 = nn.Linear(hidden, chs)
        for fc in (self.fc1, self.fc2):
            # Haiku's Linear default: truncated normal, std 1/sqrt(fan_in), cut at 2 std.
            std = 1.0 / math.sqrt(fc.in_features)
            nn.init.trunc_normal_(fc.weight, 0.0, std, -2 * std, 2 * std)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))


class StochasticDepthMask(nn.Module):
    """Per-sample keep mask of DeepMind's ``StochDepth``: ``floor(keep + U[0,1))``, NO rescale.

    Returns an (N, 1) mask in training, ``None`` at eval or rate 0, so the block folds it into
    its per-channel output scale instead of spending a pass over the feature map.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f'stochastic depth rate must be in [0, 1), got {rate}')
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        return torch.floor(keep + torch.rand(x.shape[0], 1, dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f'rate={self.rate:.4g}'
