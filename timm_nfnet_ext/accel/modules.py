"""The accelerated twins of the reference modules, and the swap between them.

Each class here subclasses a reference class, adds no state, and computes the same function
faster; ``accelerate`` swaps a model's modules to them in place (their ``__class__``: no
parameter is copied, hooks and state dicts stay as they are) and ``reference`` swaps them back.
Under ``torch.jit.script`` each compiles its reference class's computation (the speed paths
are eager Python); scripting leaves the eager model as it was.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ..layers.activations import Activation, apply_activation
from ..layers.conv import WSConv2d, conv2d_same, standardize_weight
from ..models.contract import feature_indices
from ..models.network import NFNet
from . import switches
from .gelu import gelu_tanh
from .grouped_ws import GROUPED, plan_groups, standardized_once
from .probes import forward_ad_active, functorch_active
from .weight_std import fast_standardize_weight

__all__ = ['FastActivation', 'FastWSConv2d', 'AcceleratedNFNet', 'accelerate', 'reference']

# In-place forms, used where autograd does not need the input (a fresh multi-MB output per
# activation costs page faults comparable to the activation itself on CPU). GELU decides for
# itself (gelu.py), in training too.
_INPLACE = {
    'identity': lambda x: x,
    'celu': functools.partial(F.celu, inplace=True),
    'elu': functools.partial(F.elu, inplace=True),
    'leaky_relu': functools.partial(F.leaky_relu, inplace=True),
    'relu': torch.relu_,
    'relu6': functools.partial(F.relu6, inplace=True),
    'selu': torch.selu_,
    'sigmoid': torch.sigmoid_,
    'silu': functools.partial(F.silu, inplace=True),
    'tanh': torch.tanh_,
}


@register_notrace_module  # a torch.fx leaf, as its reference class
class FastActivation(Activation):
    """``Activation`` with the CPU tanh-GELU and, where ``inplace`` is set, in-place forms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the activation, in place where ``inplace`` is set and autograd allows it.

        Args:
            x: any tensor.

        Returns:
            ``scale * activation(x)`` (possibly ``x`` itself, overwritten).
        """
        if torch.jit.is_scripting():  # TorchScript compiles the reference (the fast paths are eager Python)
            y = apply_activation(x, self.name)
            return y if self.scale == 1.0 else y * self.scale
        tracked = x.requires_grad and torch.is_grad_enabled()
        if self.name == 'gelu':
            y = gelu_tanh(x, inplace=self.inplace)  # decides for itself what autograd allows
        elif self.inplace and not tracked and self.name in _INPLACE:
            y = _INPLACE[self.name](x)
        else:
            y = apply_activation(x, self.name)
        if self.scale == 1.0:
            return y
        # scale in place when y is ours to overwrite (a fresh output, or an in-place result)
        return y.mul_(self.scale) if not tracked and (y is not x or self.inplace) else y * self.scale


@register_notrace_module  # a torch.fx leaf: 'SAME' padding from the input size, per-thread grouped weights
class FastWSConv2d(WSConv2d):
    """``WSConv2d`` standardising through ``fast_standardize_weight``, or taking its weight from
    its group (``grouped_ws.py``) inside an ``AcceleratedNFNet``'s forward."""

    def standardized_weight(self) -> torch.Tensor:
        """``WSConv2d.standardized_weight`` (its result: see there), through the fast CPU path."""
        return fast_standardize_weight(self.weight, self.gain, self.input_scale, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``WSConv2d.forward`` (its input and output: see there), with the weight standardised
        with its group where one was computed."""
        if torch.jit.is_scripting():  # TorchScript compiles the reference (the fast paths are eager Python)
            weight = standardize_weight(self.weight, self.gain, self.input_scale, self.eps)
            return conv2d_same(x, weight, self.bias, self.stride[0], self.groups, self.dilation[0])
        take = None if torch.compiler.is_compiling() else GROUPED.take
        packed = take(self) if take is not None else None  # this conv's weight, standardised with its group
        if packed is not None:
            return conv2d_same(x, packed[0], packed[1], self.stride[0], self.groups, self.dilation[0])
        return conv2d_same(x, self.standardized_weight(), self.bias, self.stride[0], self.groups, self.dilation[0])


@functools.lru_cache(maxsize=None)  # imported on first use: FSDP's modules are slow to import
def _wrappers_that_rerun_forward() -> Tuple[type, ...]:
    """Module wrappers under which grouped weight standardisation must stay off: activation
    checkpointing re-runs a block's forward in the backward (the grouped weights are gone by
    then), and FSDP gathers a block's weights only when that block runs."""
    found = []
    try:  # torch keeps checkpoint_wrapper in a private module only; where it is gone, nothing can wrap with it
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
        found.append(ActivationWrapper)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        found.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard), torch >= 2.6
        found.append(FSDPModule)
    except ImportError:
        pass
    return tuple(found)


class AcceleratedNFNet(NFNet):
    """``NFNet`` whose forward standardises its conv weights in groups (``grouped_ws.py``) where
    that is faster (on CUDA by default) and safe."""

    def set_grouped_ws(self, enable: Optional[bool] = True) -> None:
        """Standardise conv weights in groups, once per forward (``grouped_ws.py``).

        ``None`` (the default) picks it when the weights are on a GPU, where it saves many kernel
        launches per training step; on a CPU the per-conv path is faster (measured:
        docs/performance.md).
        The numbers are the reference's either way. It is off, whatever is set here, where a
        block's forward may be run again or the weights are not all in place when the first
        conv of a group runs: under gradient checkpointing (``set_grad_checkpointing``, or
        blocks wrapped by torch's ``checkpoint_wrapper``), FSDP, ``torch.func`` transforms,
        forward-mode AD and ``torch.compile``. Convs with forward pre-hooks standardise their
        own weight. Blocks checkpointed by hand (``torch.utils.checkpoint`` inside a forward
        this model cannot see) need ``set_grouped_ws(False)``.

        Args:
            enable: True, False, or None for "on CUDA".
        """
        self.grouped_ws = enable

    def _use_grouped_ws(self, x: torch.Tensor) -> bool:
        """Whether this forward (of input ``x``) standardises its conv weights in groups."""
        if not switches.grouped_ws or (self.grad_checkpointing and self.training) or torch.compiler.is_compiling():
            return False
        if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
            return False  # a trace records each conv's own expression (the grouped function is Python)
        if functorch_active() or forward_ad_active():
            return False  # the hand-written autograd function has no vmap or forward-AD rule
        enable = getattr(self, 'grouped_ws', None)
        if enable is not None:
            return enable
        param = next(self.parameters(), None)
        return param is not None and param.is_cuda

    def _standardized_once(self, x: torch.Tensor, stages: Sequence[nn.Module],
                           final: bool = True) -> contextlib.AbstractContextManager:
        """A context in which the convs of the stem, ``stages`` and final conv use grouped weights."""
        if not self._use_grouped_ws(x):
            return contextlib.nullcontext()
        wrappers, segments = _wrappers_that_rerun_forward(), []
        for segment in [self.stem, *stages] + ([self.final_conv] if final else []):
            convs = []
            for m in segment.modules():
                if isinstance(m, wrappers):
                    return contextlib.nullcontext()
                if isinstance(m, WSConv2d):
                    convs.append(m)
            segments.append(convs)
        return standardized_once(plan_groups(segments))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``NFNet.forward_features``, the convs it runs grouped where that applies.

        Args:
            x: the input batch, NCHW.

        Returns:
            The final feature map, before pooling.

        Raises:
            ValueError: an invalid input (see ``NFNet.check_input``).
        """
        if torch.jit.is_scripting():  # TorchScript: NFNet.forward_features (grouping is eager Python)
            self.check_input(x)
            return self.final_act(self.final_conv(self.stages(self.stem(x))))
        with self._standardized_once(x, self.stages):
            return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, **kwargs: Any
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """``NFNet.forward_intermediates`` (same arguments), the convs it runs grouped.

        Args:
            x: the input batch, NCHW.
            indices: which taps: None for all, an int ``n`` for the last ``n``, or a list.
            norm: unused (NFNets have no final norm).
            stop_early: stop after the deepest stage that is taken.
            **kwargs: ``output_fmt`` and ``intermediates_only``, as ``NFNet.forward_intermediates``.

        Returns:
            As ``NFNet.forward_intermediates``: the intermediates, or the final map and them.

        Raises:
            ValueError: an index out of range, an ``output_fmt`` other than NCHW, or an invalid input.
        """
        _, max_index = feature_indices(len(self.stages) + 1, indices)
        stages = self.stages if not stop_early else self.stages[:max_index]
        with self._standardized_once(x, stages, final=len(stages) == len(self.stages)):
            return super().forward_intermediates(x, indices, norm, stop_early, **kwargs)


_FAST: Dict[type, type] = {Activation: FastActivation, WSConv2d: FastWSConv2d, NFNet: AcceleratedNFNet}
_REFERENCE: Dict[type, type] = {fast: ref for ref, fast in _FAST.items()}


def accelerate(model: nn.Module) -> nn.Module:
    """Attach the speed paths to ``model``: its reference modules (``NFNet``, ``WSConv2d``,
    ``Activation``) become their accelerated subclasses, in place.

    The numbers stay the reference's (within float32 rounding; tests/test_accel.py). No
    parameter is copied: an optimizer, hooks or a state dict made before still apply.
    ``timm.create_model`` calls this for every model of this package unless
    ``accel.configure(models=False)`` (or ``TIMM_NFNET_ACCEL=0``).

    Args:
        model: any module; modules of other classes are left alone.

    Returns:
        ``model`` itself.
    """
    for m in _swap_classes(model, _FAST):
        if type(m) is AcceleratedNFNet and 'grouped_ws' not in m.__dict__:
            m.grouped_ws = None
    return model


def reference(model: nn.Module) -> nn.Module:
    """Detach the speed paths: the accelerated modules of ``model`` become their reference
    classes again, in place (the inverse of ``accelerate``).

    Args:
        model: any module.

    Returns:
        ``model`` itself.
    """
    for m in _swap_classes(model, _REFERENCE):
        m.__dict__.pop('grouped_ws', None)
    return model


def _swap_classes(model: nn.Module, table: Dict[type, type]) -> List[nn.Module]:
    """Give each module of ``model`` whose class is a key of ``table`` the class it maps to; the
    modules changed."""
    changed = [m for m in model.modules() if type(m) in table]
    for m in changed:
        m.__class__ = table[type(m)]
    return changed
