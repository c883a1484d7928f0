"""CPU inference on conv weights reordered once into oneDNN's layout: ``prepack_for_cpu``.

A fused conv (``WSConv2d.fuse()``) still hands oneDNN a plain weight on every call, and oneDNN
reorders it into its blocked layout each time: for F0 that is all 286 MB of weights read and
written into fresh memory per forward pass, which at batch 1 is 15-25% of the pass (at batch 8
it is lost in the convolutions). ``torch.compile``'s CPU freezing pass does the reorder once
(``torch._C._nn.mkldnn_reorder_conv2d_weight``) and then calls oneDNN's conv with the reordered
weight (``torch.ops.mkldnn._convolution_pointwise``); eager PyTorch has no public way to do the
same, so ``PrepackedConv2d`` does it with those two ops. The reorder is chosen for an input
shape, so each conv keeps one reordered weight, for the input shape of its recent calls: one
more copy of the weights in memory, however many shapes come. A shape is reordered for once it
comes twice in a row; until then the call is a plain conv, so inputs whose shape changes on
every call run as in the fused model (reordering for each of them measured 7% slower than that).
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import reparameterize_model

from .layers import SameConv2d, pad_same

__all__ = ['PrepackedConv2d', 'prepack_for_cpu', 'onednn_available']


def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN ops ``PrepackedConv2d`` runs on."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, 'mkldnn_reorder_conv2d_weight')
            and hasattr(torch.ops.mkldnn, '_convolution_pointwise'))


class _Packs(dict):
    """The reordered weight, keyed by input shape and weight version, and the last call's key.
    oneDNN's opaque tensors cannot be copied or pickled, so a copy or a pickle of a model starts
    with none (they are remade on later calls)."""

    last_key: tuple = ()

    def __deepcopy__(self, memo: dict) -> '_Packs':
        return _Packs()

    def __reduce__(self):
        return _Packs, ()


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (or ``SameConv2d``) whose CPU float32 inference uses a reordered weight.

    It shares the conv's weight and bias (state dict, ``.to()``, copies: all as ``nn.Conv2d``).
    The reordered weight is used when the input is a 4-D CPU float32 tensor, the weight is
    float32 and autograd is not recording (``torch.no_grad()`` / ``torch.inference_mode()``);
    otherwise the call is a plain ``F.conv2d``. It is remade when the input shape (once the new
    one repeats) or the weight changes in place (``load_state_dict``, ``copy_``); a change behind
    autograd's back (``weight.data.copy_(...)``) is not seen: call ``prepack_for_cpu`` again.
    """

    def __init__(self, conv: nn.Conv2d):
        if type(conv) not in (nn.Conv2d, SameConv2d) or conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
            raise TypeError(f'can prepack an nn.Conv2d with zero padding given in pixels, got {conv!r}')
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None, device='meta')
        self.weight, self.bias = conv.weight, conv.bias  # shared, not copied
        self.same_padding = isinstance(conv, SameConv2d)
        self.packs = _Packs()
        self.train(conv.training)

    def _packed(self, shape: torch.Size, padding: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The reordered weight for this input shape; ``None`` the first time a new shape comes."""
        key = (tuple(shape), tuple(padding), self.weight._version, self.weight.data_ptr())
        packed = self.packs.get(key)
        if packed is None and key == self.packs.last_key:  # seen twice in a row: worth a reorder
            self.packs.clear()  # one reordered copy of the weight at a time
            dense = self.weight.detach().contiguous().to_mkldnn()
            packed = self.packs[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                dense, list(padding), list(self.stride), list(self.dilation), self.groups, list(shape))
        self.packs.last_key = key
        return packed

    def _use_packed(self, x: torch.Tensor) -> bool:
        if x.device.type != 'cpu' or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.dim() != 4:
            return False
        if torch.compiler.is_compiling():  # inductor does its own prepacking
            return False
        return not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.same_padding:
            x, padding = pad_same(x, self.kernel_size, self.stride[0])
        packed = self._packed(x.shape, padding) if self._use_packed(x) else None
        if packed is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(padding), list(self.stride), list(self.dilation), self.groups, 'none', [], '')

    def extra_repr(self) -> str:
        return super().extra_repr() + (", padding='SAME'" if self.same_padding else '')


def prepack_for_cpu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse a model for inference and prepack its convs for CPU float32 (``PrepackedConv2d``).

    Runs ``timm.utils.reparameterize_model`` (each ``WSConv2d`` becomes a plain conv with its
    standardised weight baked in), then wraps every plain ``nn.Conv2d`` / ``SameConv2d`` so that
    CPU inference under ``torch.no_grad()`` or ``torch.inference_mode()`` runs oneDNN's conv on
    a weight reordered once (per input shape) instead of on every call. Outputs equal the fused
    model's. Returns a copy (unless ``inplace``) in eval mode: it is meant for inference.

    Raises:
        RuntimeError: this PyTorch has no oneDNN (``torch.backends.mkldnn``) ops.
        ValueError: the model has no convolution to prepack.
    """
    if not onednn_available():
        raise RuntimeError('prepack_for_cpu needs a PyTorch built with oneDNN (torch.backends.mkldnn.is_available() '
                           'is False or its conv ops are missing)')
    model = reparameterize_model(model if inplace else copy.deepcopy(model), inplace=True)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Conv2d, SameConv2d) and child.padding_mode == 'zeros' \
                    and not isinstance(child.padding, str):
                setattr(parent, name, PrepackedConv2d(child))
                replaced += 1
    if not replaced:
        raise ValueError(f'{type(model).__name__} has no nn.Conv2d to prepack')
    return model.eval()
