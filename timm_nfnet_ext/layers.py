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
  stride-2 convs on odd sizes); only the asymmetric stride-2 case pads explicitly;
- the reference's tanh-GELU has a hand-written CPU path (``gelu.py``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_module

from .gelu import fast_cpu_gelu, gelu_tanh

__all__ = [
    'GAMMAS', 'get_act_fn', 'apply_activation', 'same_pads', 'same_conv_input', 'SameConv2d', 'standardize_weight',
    'WSConv2d', 'SqueezeExcite', 'StochasticDepthMask', 'gelu_tanh', 'fast_cpu_gelu', 'functorch_active',
    'forward_ad_active',
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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# The same functions as JAX's defaults. JAX's `gelu` is the tanh approximation; its
# log_softmax normalises over the channel axis (last in NHWC, dim 1 here). Module-level
# functions and partials, not lambdas: a model holding them must pickle (torch.save(model),
# multiprocessing).
_ACT_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'identity': _identity,
    'celu': F.celu,
    'elu': F.elu,
    'gelu': gelu_tanh,
    'leaky_relu': F.leaky_relu,
    'log_sigmoid': F.logsigmoid,
    'log_softmax': functools.partial(F.log_softmax, dim=1),
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
    'identity': _identity,
    'celu': functools.partial(F.celu, inplace=True),
    'elu': functools.partial(F.elu, inplace=True),
    'gelu': functools.partial(gelu_tanh, inplace=True),
    'leaky_relu': functools.partial(F.leaky_relu, inplace=True),
    'relu': torch.relu_,
    'relu6': functools.partial(F.relu6, inplace=True),
    'selu': torch.selu_,
    'sigmoid': torch.sigmoid_,
    'silu': functools.partial(F.silu, inplace=True),
    'tanh': torch.tanh_,
}


def get_act_fn(name: str) -> Tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Return ``(fn, gamma)`` for an activation of DeepMind's table (without gamma applied)."""
    if name not in _ACT_FNS:
        raise ValueError(f'unknown activation {name!r}; choose one of {sorted(_ACT_FNS)}')
    return _ACT_FNS[name], GAMMAS[name]


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``'s activation of the gamma table with ATen's own ops (out of place, no gamma).

    The same functions as ``_ACT_FNS``, written as one TorchScript-compilable function:
    ``torch.jit.script`` cannot call the table's partials or the hand-written CPU GELU, so a
    scripted ``Activation`` runs this (and so the reference's numbers, within float rounding of
    the CPU GELU's sigmoid form).
    """
    if name == 'gelu':
        return F.gelu(x, approximate='tanh')
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
        return F.log_softmax(x, dim=1)  # JAX's channel axis
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


# torch.fx leaf (timm's feature extraction): its in-place and hand-written CPU paths branch on
# autograd state that symbolic tracing cannot follow
@register_notrace_module
class Activation(nn.Module):
    """An activation of the gamma table; ``scale`` multiplies the output (1.0 when folded away).

    With ``inplace=True`` the input is overwritten at inference, and in training too where the
    activation's backward does not need its input (tanh-GELU on CPU, see ``gelu.py``); only
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
        if torch.jit.is_scripting():  # TorchScript: ATen's out-of-place ops (the in-place forms below are eager only)
            y = apply_activation(x, self.name)
            return y if self.scale == 1.0 else y * self.scale
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
    """XLA 'SAME' padding of one spatial dim: ``(low, high)``, the odd pixel going high.

    ``total = max((ceil(size / stride) - 1) * stride + kernel - size, 0)``, written with the
    remainder alone: timm's ``get_same_padding`` goes through ``math.ceil(size / stride)``, whose
    symbolic form under ``torch.compile``'s dynamic shapes grows with every strided conv, and a
    recompile for a second input size then ran for over 20 minutes on F0.
    """
    r = size % stride
    total = max(kernel - (stride if r == 0 else r), 0)
    return total // 2, total - total // 2


def same_conv_input(x: torch.Tensor, kernel: List[int], stride: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """XLA 'SAME' padding for a conv: ``(input, conv_padding)``.

    Symmetric padding goes to the conv (no copy); only the asymmetric case (a stride-2 conv on
    an even size pads 0 low, 1 high) materialises a padded input.
    """
    ph = same_pads(x.shape[-2], kernel[0], stride)
    pw = same_pads(x.shape[-1], kernel[1], stride)
    if ph[0] == ph[1] and pw[0] == pw[1]:
        return x, (ph[0], pw[0])
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1])), (0, 0)


def conv2d_same(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, groups: int,
        dilation: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with XLA 'SAME' padding (see ``same_conv_input``; a dilated kernel pads as
    its dilated extent ``dilation * (k - 1) + 1``)."""
    extent = [dilation * (k - 1) + 1 for k in weight.shape[-2:]]
    x, padding = same_conv_input(x, extent, stride)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# torch.fx leaf: its 'SAME' padding depends on the input size
@register_notrace_module
class SameConv2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` with XLA 'SAME' padding decided from the input size.

    What ``WSConv2d.fuse()`` returns for strided convs, whose padding depends on the parity of
    the input; stride-1 convs fuse to an ordinary ``nn.Conv2d`` with static padding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias, self.stride[0], self.groups, self.dilation[0])


# --- torch's private probes, for the speed paths --------------------------------------------
# The hand-written autograd functions (weight standardisation below and in grouped_ws.py, the
# CPU GELU in gelu.py) have no vmap and no forward-AD rule, so they step aside under torch.func
# transforms and forward-mode AD. torch has no public query for either. Its private ones are
# looked up once, here, without calling anything that warns; when one is missing, or fails, the
# speed paths step aside for good and the reference expressions (plain autograd) run instead.


def _find_functorch_probe() -> Optional[Callable[[], bool]]:
    """``torch._C._are_functorch_transforms_active`` if it exists and answers with a bool."""
    probe = getattr(torch._C, '_are_functorch_transforms_active', None)
    try:
        return probe if callable(probe) and isinstance(probe(), bool) else None
    except Exception:  # a changed private signature: treat as missing
        return None


def _forward_ad_level_readable() -> bool:
    """Whether ``torch.autograd.forward_ad`` keeps its open dual level as an int (``-1``: none)."""
    return isinstance(getattr(torch.autograd.forward_ad, '_current_level', None), int)


FUNCTORCH_PROBE: Optional[Callable[[], bool]] = _find_functorch_probe()
FORWARD_AD_LEVEL_READABLE: bool = _forward_ad_level_readable()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) may be running.

    torch's own answer where it has one; True where it has none or the query fails, so that
    the speed paths step aside (they are only an optimisation).
    """
    probe = FUNCTORCH_PROBE
    if probe is None:
        return True
    try:
        return bool(probe())
    except Exception:
        return True


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``).

    True where this torch keeps no readable level, so that the speed paths step aside.
    """
    if not FORWARD_AD_LEVEL_READABLE:
        return True
    level = getattr(torch.autograd.forward_ad, '_current_level', None)
    return not isinstance(level, int) or level >= 0


def _autocast_exists(device_type: str) -> bool:
    """Whether autocast knows ``device_type`` (not e.g. 'meta', where ``torch.autocast`` raises)."""
    available = getattr(torch.amp, 'is_autocast_available', None)  # torch >= 2.4
    return available(device_type) if available is not None else device_type != 'meta'


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (nothing to turn off where autocast does not exist)."""
    if _autocast_exists(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives convs on ``device_type``, or None when autocast is off there."""
    if not _autocast_exists(device_type):
        return None
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


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


def _standardize_weight_autograd(weight: torch.Tensor, gain: torch.Tensor,
                                 input_scale: float | torch.Tensor, eps: float) -> torch.Tensor:
    """The reference expression, left to autograd (``input_scale``: a constant, or one per row)."""
    return _standardize_weight_expr(weight, gain * input_scale, eps)


def _standardize_weight_expr(weight: torch.Tensor, row_gain: torch.Tensor, eps: float) -> torch.Tensor:
    """``w_hat = w * scale - mean * scale``, ``scale = rsqrt(max(var * fan_in, eps)) * row_gain``
    (``row_gain``: gain times input_scale, one per output channel). TorchScript compiles this."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * weight[0].numel(), min=eps)) * row_gain.view(-1, 1, 1, 1)
    return weight * scale - mean * scale


def standardize_weight(weight: torch.Tensor, gain: torch.Tensor, input_scale: float = 1.0,
                       eps: float = 1e-4) -> torch.Tensor:
    """DeepMind's scaled weight standardisation (see ``WSConv2d``), float32 math.

    CPU: the hand-written autograd function (fewer passes over the weights; ATen's CPU
    ``var_mean`` is slow). Elsewhere, under ``torch.func`` transforms and forward-mode AD, while
    ``torch.jit.trace`` or ONNX export records the model and in ``torch.jit.script``: the plain
    expression, as the function's fast backward branch syncs with the host to test the eps floor. (On a
    GPU an ``NFNet`` standardises its weights in groups by default, ``grouped_ws.py``; this
    per-conv path runs where grouping is off.)
    """
    if torch.jit.is_scripting():  # TorchScript compiles the plain expression (the function is Python)
        return _standardize_weight_expr(weight, gain * input_scale, eps)
    with autocast_off(weight.device.type):
        # (the function has no vmap rule; torch.jit.trace / ONNX export record the plain expression)
        if (weight.device.type == 'cpu' and not torch.jit.is_tracing() and not functorch_active()
                and not forward_ad_active()):
            return _StandardizeWeight.apply(weight, gain, input_scale, eps)
        return _standardize_weight_autograd(weight, gain, input_scale, eps)


class _GroupedWeights(threading.local):
    """Per thread: where a ``WSConv2d`` takes a weight standardised with its group (``grouped_ws.py``
    sets ``take`` for the length of one model forward), or None."""
    take: Optional[Callable[['WSConv2d'], Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None


GROUPED = _GroupedWeights()


# torch.fx leaf: 'SAME' padding from the input size, and per-thread grouped weights
@register_notrace_module
class WSConv2d(nn.Conv2d):
    """DeepMind's scaled weight-standardised conv (``WSConv2D``) with 'SAME' padding.

    ``w_hat = (w - mean) * rsqrt(max(var * fan_in, eps)) * gain``, mean and (population)
    variance over each output channel's fan-in; bias always present. ``input_scale`` is a
    constant multiplying the conv's input (an activation's gamma, a block's beta), folded into
    ``w_hat`` instead of spent as an elementwise op on the feature map. ``device`` and ``dtype``
    are where the parameters are created (as for ``nn.Conv2d``).
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
            dilation: int = 1,
            device: Optional[torch.device | str] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, dilation=dilation, groups=groups,
                         bias=True, device=device, dtype=dtype)
        self.gain = nn.Parameter(torch.ones(out_chs, device=device, dtype=dtype))
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
        if torch.jit.is_scripting():  # TorchScript: this conv's own weight (grouping is eager Python)
            return conv2d_same(x, self.standardized_weight(), self.bias, self.stride[0], self.groups, self.dilation[0])
        take = None if torch.compiler.is_compiling() else GROUPED.take
        packed = take(self) if take is not None else None  # this conv's weight, standardised with its group
        if packed is not None:
            return conv2d_same(x, packed[0], packed[1], self.stride[0], self.groups, self.dilation[0])
        return conv2d_same(x, self.standardized_weight(), self.bias, self.stride[0], self.groups, self.dilation[0])

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain conv with the standardised weight baked in, for inference.

        Stride-1 convs get static symmetric padding (exactly XLA 'SAME' for odd kernels);
        strided convs keep size-dependent 'SAME' padding (``SameConv2d``). The weight is stored
        channels_last (see below).
        """
        k, d = self.kernel_size[0], self.dilation[0]
        if self.stride[0] == 1 and k % 2 == 1:
            conv = nn.Conv2d(self.in_channels, self.out_channels, k, padding=d * (k // 2), dilation=d,
                             groups=self.groups)
        else:
            conv = SameConv2d(self.in_channels, self.out_channels, k, stride=self.stride, dilation=d,
                              groups=self.groups)
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

    def __init__(self, chs: int, se_ratio: float = 0.5, device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        hidden = max(1, int(chs * se_ratio))
        self.fc1 = nn.Linear(chs, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, chs, device=device, dtype=dtype)
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
        # torch.rand's own draw (empty + uniform_), written so torch.fx can trace the batch size
        # (and the size as a list, as TorchScript's new_empty takes it)
        return torch.floor(keep + x.new_empty([x.shape[0], 1]).uniform_())

    def extra_repr(self) -> str:
        return f'rate={self.rate:.4g}'
