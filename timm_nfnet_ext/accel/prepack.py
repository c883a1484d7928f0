"""CPU inference on conv weights reordered once into oneDNN's layout: ``prepack_for_cpu``.

A fused conv (``WSConv2d.fuse()``) still hands oneDNN a plain weight on every call, and oneDNN
reorders it into its blocked layout each time: for F0 that is all 286 MB of weights read and
written into fresh memory per forward pass, a visible share of a batch-1 pass (at batch 8 it
is lost in the convolutions; docs/performance.md has the measurements). ``torch.compile``'s CPU freezing pass does the reorder once
(``torch._C._nn.mkldnn_reorder_conv2d_weight``) and then calls oneDNN's conv with the reordered
weight (``torch.ops.mkldnn._convolution_pointwise``); eager PyTorch has no public way to do the
same, so ``PrepackedConv2d`` does it with those two ops. The reorder is chosen for an input
shape, so each conv keeps one reordered weight, for the input shape of its recent calls: one
more copy of the weights in memory, however many shapes come. A shape is reordered for once it
comes twice in a row; until then the call is a plain conv, so inputs whose shape changes on
every call run as in the fused model (reordering for each of them is slower than that).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import reparameterize_model

from ..layers.conv import SameConv2d, conv2d_same, same_conv_input
from .probes import autocast_dtype

__all__ = ['PrepackedConv2d', 'prepack_for_cpu', 'onednn_available']


def _find_op(owner: Any, name: str) -> Any:
    """``owner.name`` (a private oneDNN op), or None where this PyTorch has none."""
    try:
        op = getattr(owner, name, None)
    except Exception:  # torch.ops namespaces raise on a missing op; a build without oneDNN may have none
        return None
    return op if callable(op) else None


# The two private ops this file runs on (torch.compile's CPU freezing pass uses the same): looked up
# once, here. Where either is missing, or fails for a conv, that conv runs the plain ``F.conv2d``.
REORDER_WEIGHT = _find_op(getattr(torch._C, '_nn', None), 'mkldnn_reorder_conv2d_weight')
CONV_POINTWISE = _find_op(getattr(torch.ops, 'mkldnn', None), '_convolution_pointwise')


def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN ops ``PrepackedConv2d`` runs on.

    Returns:
        True where oneDNN is available and both private ops were found.
    """
    return torch.backends.mkldnn.is_available() and REORDER_WEIGHT is not None and CONV_POINTWISE is not None


class _Pack:
    """A conv's reordered weight: the key it was made for (input shape, weight version), the weight
    it was made from (held, so that a replaced weight cannot come back at the same address) and the
    key of the last call; ``failed`` once a oneDNN op raised for this conv (it then runs the plain
    conv for good). oneDNN's opaque tensors cannot be copied or pickled, so a copy or a pickle
    starts empty (the reordered weight is remade on later calls)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.source: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None
        self.last_key: Optional[tuple] = None
        self.failed = False

    def __deepcopy__(self, memo: dict) -> '_Pack':
        return _Pack()

    def __reduce__(self):
        return _Pack, ()


def _can_prepack(conv: nn.Module) -> bool:
    if type(conv) not in (nn.Conv2d, SameConv2d) or conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        return False
    # SameConv2d computes its padding for dilation 1 and a square stride (all that fuse() makes)
    return type(conv) is nn.Conv2d or (conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1])


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (or ``SameConv2d``) whose CPU float32 inference uses a reordered weight.

    It shares the conv's weight and bias (state dict, ``.to()``, copies: all as ``nn.Conv2d``).
    The reordered weight is used when the input is a 4-D CPU float32 tensor, the weight is
    float32, CPU autocast is off and autograd is not recording (``torch.no_grad()`` /
    ``torch.inference_mode()``); otherwise the call is a plain ``F.conv2d``. It is remade when the
    input shape changes (once the new one repeats), when the weight is replaced (``.to()``,
    ``.data = ...``) or changed in place (``load_state_dict``, ``copy_``); not when it is changed
    behind autograd's back (``weight.data.copy_(...)``, or in place on a weight made under
    ``inference_mode``, which keeps no version count): call ``prepack_for_cpu`` again after that.
    Where this PyTorch lacks the private oneDNN ops, or they raise for this conv, and under
    TorchScript, every call is the plain conv.

    Args:
        conv: the conv to wrap (its weight and bias are shared).

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv2d`` with zero padding given in pixels, nor a
            ``SameConv2d`` of dilation 1 and square stride.
    """

    def __init__(self, conv: nn.Conv2d):
        if not _can_prepack(conv):
            raise TypeError('can prepack an nn.Conv2d with zero padding given in pixels (a SameConv2d: dilation 1, '
                            f'square stride), got {conv!r}')
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None, device='meta')
        self.weight, self.bias = conv.weight, conv.bias  # shared, not copied
        self.same_padding = isinstance(conv, SameConv2d)
        self.pack = _Pack()
        self.train(conv.training)

    def _packed(self, shape: torch.Size, padding: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The reordered weight for this input shape; ``None`` the first time a new shape comes,
        and where it cannot be made."""
        w, pack = self.weight, self.pack
        # autograd's (private) version counter tells an in-place change; without one, never cache
        version = None if w.is_inference() else getattr(w, '_version', None)
        if REORDER_WEIGHT is None or pack.failed or (version is None and not w.is_inference()):
            return None
        key = (tuple(shape), version)
        # a replaced weight (.to(), .data =) has other memory: ``source`` keeps the old one from being reused
        fresh = key == pack.key and pack.source is not None and pack.source.data_ptr() == w.data_ptr()
        if not fresh and key == pack.last_key:  # the same call twice in a row: worth a reorder
            pack.weight = None  # one reordered copy of the weight at a time
            try:
                pack.weight = REORDER_WEIGHT(
                    w.detach().contiguous().to_mkldnn(), list(padding), list(self.stride), list(self.dilation),
                    self.groups, list(shape))
            except Exception:  # the private op refused: the plain conv from now on
                pack.failed = True
                return None
            pack.key, pack.source, fresh = key, w.detach(), True
        pack.last_key = key
        return pack.weight if fresh else None

    def _use_packed(self, x: torch.Tensor) -> bool:
        if x.device.type != 'cpu' or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.dim() != 4:
            return False
        if torch.compiler.is_compiling() or autocast_dtype('cpu') is not None:  # inductor prepacks itself; autocast: F.conv2d's dtype
            return False
        return not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv, on the reordered weight where that applies (see the class).

        Args:
            x: NCHW input.

        Returns:
            The conv's output, equal to the plain conv's.
        """
        if torch.jit.is_scripting():  # TorchScript: the plain conv (the reordered weight is Python state)
            if self.same_padding:
                return conv2d_same(x, self.weight, self.bias, self.stride[0], self.groups, self.dilation[0])
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        padding = self.padding
        if self.same_padding:
            x, padding = same_conv_input(x, self.kernel_size, self.stride[0])
        packed = self._packed(x.shape, padding) if self._use_packed(x) and CONV_POINTWISE is not None else None
        out = self._packed_conv(x, packed, padding) if packed is not None else None
        if out is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return out

    def _packed_conv(self, x: torch.Tensor, packed: torch.Tensor, padding: Tuple[int, int]) -> Optional[torch.Tensor]:
        """oneDNN's conv on the reordered weight; None (and the plain conv from now on) if it raises."""
        try:
            return CONV_POINTWISE(x, packed, self.bias, list(padding), list(self.stride), list(self.dilation),
                                  self.groups, 'none', [], '')
        except Exception:  # the private op refused
            self.pack.failed, self.pack.weight = True, None
            return None

    def extra_repr(self) -> str:
        """The module's summary in ``repr``: ``nn.Conv2d``'s, with 'SAME' padding where it applies.

        Returns:
            The summary string.
        """
        return super().extra_repr() + (", padding='SAME'" if self.same_padding else '')


def prepack_for_cpu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse a model for inference and prepack its convs for CPU float32 (``PrepackedConv2d``).

    Runs ``timm.utils.reparameterize_model`` (each ``WSConv2d`` becomes a plain conv with its
    standardised weight baked in), then wraps every plain ``nn.Conv2d`` / ``SameConv2d`` so that
    CPU inference under ``torch.no_grad()`` or ``torch.inference_mode()`` runs oneDNN's conv on
    a weight reordered once (per input shape) instead of on every call. Outputs equal the fused
    model's. Returns a copy (unless ``inplace``) in eval mode: it is meant for inference.

    Args:
        model: the model, e.g. an NFNet of this package.
        inplace: fuse and wrap ``model`` itself instead of a deep copy.

    Returns:
        The fused, prepacked model, in eval mode.

    Raises:
        RuntimeError: this PyTorch has no oneDNN (``torch.backends.mkldnn``) ops.
        ValueError: the model has no convolution to prepack.
    """
    if not onednn_available():
        raise RuntimeError('prepack_for_cpu needs a PyTorch built with oneDNN (torch.backends.mkldnn.is_available() '
                           'is False or its conv ops are missing)')
    model = reparameterize_model(model, inplace=inplace)  # a fused deep copy unless inplace
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _can_prepack(child):
                setattr(parent, name, PrepackedConv2d(child))
                replaced += 1
    if not replaced:
        raise ValueError(f'{type(model).__name__} has no nn.Conv2d to prepack')
    return model.eval()
