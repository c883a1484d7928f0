"""DeepMind's scaled weight-standardised conv (``WSConv2D``) with XLA 'SAME' padding.

Why not timm's ``ScaledStdConv2dSame``: it standardises with ``var + eps``, the reference with
``max(var * fan_in, 1e-4)``, and the difference moves the released weights' logits.

Two choices keep the reference's numbers while saving work:
- the constant that multiplies a conv's input (the previous activation's gamma, a block's
  beta) is folded into the conv's standardised weight (``input_scale``), so no elementwise
  multiply over a feature map is spent on constants;
- 'SAME' padding is given to the conv itself whenever it is symmetric (all stride-1 convs,
  stride-2 convs on odd sizes); only the asymmetric stride-2 case pads explicitly.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['same_pads', 'same_conv_input', 'conv2d_same', 'SameConv2d', 'standardize_weight', 'WSConv2d']


def same_pads(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """XLA 'SAME' padding of one spatial dim.

    ``total = max((ceil(size / stride) - 1) * stride + kernel - size, 0)``, written with the
    remainder alone: timm's ``get_same_padding`` goes through ``math.ceil(size / stride)``, whose
    symbolic form under ``torch.compile``'s dynamic shapes grows with every strided conv (a
    recompile for a second input size then ran for over 20 minutes on F0).

    Args:
        size: the input's extent.
        kernel: the (dilated) kernel's extent.
        stride: the conv's stride.

    Returns:
        ``(low, high)`` padding, the odd pixel going high.
    """
    r = size % stride
    total = max(kernel - (stride if r == 0 else r), 0)
    return total // 2, total - total // 2


def same_conv_input(x: torch.Tensor, kernel: List[int], stride: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """XLA 'SAME' padding for a conv of NCHW ``x``: symmetric padding goes to the conv (no copy);
    only the asymmetric case (a stride-2 conv on an even size pads 0 low, 1 high) pads ``x``.

    Args:
        x: the conv's input.
        kernel: the (dilated) kernel's extent, ``[kh, kw]``.
        stride: the conv's stride.

    Returns:
        ``(input, conv_padding)``: the input to give the conv and its symmetric padding.
    """
    ph = same_pads(x.shape[-2], kernel[0], stride)
    pw = same_pads(x.shape[-1], kernel[1], stride)
    if ph[0] == ph[1] and pw[0] == pw[1]:
        return x, (ph[0], pw[0])
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1])), (0, 0)


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, groups: int,
                dilation: int = 1) -> torch.Tensor:
    """``F.conv2d`` with XLA 'SAME' padding (a dilated kernel pads as ``dilation * (k - 1) + 1``).

    Args:
        x: NCHW input.
        weight: the conv weight.
        bias: the bias, or None.
        stride: the stride (both dims).
        groups: the conv's groups.
        dilation: the dilation (both dims).

    Returns:
        The conv's output.
    """
    extent = [dilation * (k - 1) + 1 for k in weight.shape[-2:]]
    x, padding = same_conv_input(x, extent, stride)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# torch.fx leaf: its 'SAME' padding depends on the input size
@register_notrace_module
class SameConv2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` with XLA 'SAME' padding decided from the input size: what
    ``WSConv2d.fuse()`` returns for strided convs, whose padding depends on the input's parity.

    Takes ``nn.Conv2d``'s arguments (its ``padding`` is ignored).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the conv with 'SAME' padding.

        Args:
            x: NCHW input.

        Returns:
            The conv's output, ``ceil(size / stride)`` in height and width.
        """
        return conv2d_same(x, self.weight, self.bias, self.stride[0], self.groups, self.dilation[0])


def standardize_weight(weight: torch.Tensor, gain: torch.Tensor, input_scale: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """DeepMind's scaled weight standardisation, per output channel.

    ``w_hat = (w - mean) * rsqrt(max(var * fan_in, eps)) * gain * input_scale``, with the mean
    and population variance over each output channel's fan-in (``var * fan_in`` is the
    reference's ``||w - mean||^2``).

    Args:
        weight: an (O, I, kh, kw) conv weight.
        gain: (O,) gains.
        input_scale: a constant folded into the weight.
        eps: the floor of ``var * fan_in``.

    Returns:
        The standardised weight, shaped like ``weight``.
    """
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * weight[0].numel(), min=eps)) * (gain * input_scale).view(-1, 1, 1, 1)
    return weight * scale - mean * scale


# torch.fx leaf: its 'SAME' padding depends on the input size
@register_notrace_module
class WSConv2d(nn.Conv2d):
    """DeepMind's ``WSConv2D``: a conv of the standardised weight (``standardize_weight``), bias
    always present, XLA 'SAME' padding.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: square kernel size.
        stride: the stride.
        groups: the conv's groups.
        input_scale: a constant multiplying the conv's input (an activation's gamma, a block's
            beta), folded into the standardised weight.
        eps: the floor of ``var * fan_in``.
        dilation: the dilation.
        device: where the parameters are created (as for ``nn.Conv2d``).
        dtype: the parameters' dtype.

    Raises:
        ValueError: ``in_chs`` or ``out_chs`` is not divisible by ``groups`` (from ``nn.Conv2d``).
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
            device: Optional[Union[torch.device, str]] = None,
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
        """The weight the conv applies: standardised, times gain and ``input_scale``.

        Returns:
            The standardised weight, shaped like ``self.weight`` (differentiable).
        """
        return standardize_weight(self.weight, self.gain, self.input_scale, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolves with the standardised weight, 'SAME' padding.

        Args:
            x: NCHW input.

        Returns:
            The conv's output.
        """
        return conv2d_same(x, self.standardized_weight(), self.bias, self.stride[0], self.groups, self.dilation[0])

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain conv with the standardised weight baked in, for inference
        (``timm.utils.reparameterize_model`` calls this).

        Returns:
            An ``nn.Conv2d`` with static symmetric padding for stride-1 convs (exactly 'SAME'
            for odd kernels), a ``SameConv2d`` for strided ones; its weight is stored
            channels_last, the layout oneDNN (CPU) and cuDNN (GPU) run fastest whatever the
            input's layout.
        """
        k, d = self.kernel_size[0], self.dilation[0]
        if self.stride[0] == 1 and k % 2 == 1:
            conv = nn.Conv2d(self.in_channels, self.out_channels, k, padding=d * (k // 2), dilation=d,
                             groups=self.groups)
        else:
            conv = SameConv2d(self.in_channels, self.out_channels, k, stride=self.stride, dilation=d,
                              groups=self.groups)
        conv = conv.to(device=self.weight.device, dtype=self.weight.dtype, memory_format=torch.channels_last)
        conv.weight.copy_(self.standardized_weight())
        conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        """The module's summary in ``repr``: ``nn.Conv2d``'s, with 'SAME' padding and ``input_scale``.

        Returns:
            The summary string.
        """
        s = super().extra_repr().replace(', padding=(0, 0)', ", padding='SAME'")
        return s + (f', input_scale={self.input_scale:.6g}' if self.input_scale != 1.0 else '')
