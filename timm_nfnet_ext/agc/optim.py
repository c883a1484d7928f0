"""Optimizers that clip inside ``step()``: ``AGCMixin``, ``SGDAGC`` (the reference ``SGD_AGC``),
``AdamWAGC``, ``LambAGC`` and ``with_agc`` for any optimizer class."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor
from torch.optim import Optimizer

from timm.optim import Lamb

from .clip import (
    ClipCounts, OnChunk, _agc_, _check_clipping, _check_nonfinite, _check_positive, _with_dense_grads,
)

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

    Args:
        params: the parameters or parameter groups, as for the base optimizer.
        *args: the base optimizer's positional arguments.
        clipping: keyword added to the base class's (default 0.01; > 0, or None to clip no
            group unless it sets its own).
        agc_eps: keyword added (default 1e-3, > 0; named so as not to clash with Adam's ``eps``).
        nonfinite: keyword added, 'raise' or 'skip'.
        **kwargs: the base optimizer's keyword arguments.

    Raises:
        TypeError: ``clipping`` or ``agc_eps`` (of the defaults or of a group) is not a number.
        ValueError: ``clipping`` or ``agc_eps`` is not finite and > 0, or ``nonfinite`` is not
            'raise' or 'skip'.
    """

    def __init__(self, params: Any, *args: Any, clipping: Optional[float] = 0.01,
                 agc_eps: float = 1e-3, nonfinite: str = 'raise', **kwargs: Any) -> None:
        self._agc_defaults = {
            'clipping': _check_clipping(clipping),
            'agc_eps': _check_positive('agc_eps', agc_eps),
        }
        self.nonfinite = _check_nonfinite(nonfinite)
        self.skipped_steps = 0
        self._clip_counts = ClipCounts()
        super().__init__(params, *args, **kwargs)
        self.defaults.update(self._agc_defaults)
        # Fused torch optimizers let GradScaler skip unscaling; AGC must see unscaled grads.
        self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; it may set ``clipping`` (> 0 or None) and ``agc_eps`` (> 0).

        Args:
            param_group: the group, as for ``torch.optim.Optimizer.add_param_group``; missing
                AGC keys take the optimizer's defaults.

        Raises:
            TypeError: the group's ``clipping`` or ``agc_eps`` is not a number.
            ValueError: the group's ``clipping`` or ``agc_eps`` is not finite and > 0.
        """
        for key, value in self._agc_defaults.items():
            param_group.setdefault(key, value)
        _validate_group(param_group)
        super().add_param_group(param_group)

    def __getstate__(self) -> Dict[str, Any]:
        # torch pickles only defaults, state and param_groups (also for copy.deepcopy)
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, skipped_steps=self.skipped_steps,
                     _agc_defaults=self._agc_defaults)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # load_state_dict and unpickling both land here: the groups are checked before any is taken
        # (a negative clipping would flip and amplify gradients)
        agc_defaults = state.get('_agc_defaults') or self.__dict__['_agc_defaults']
        # groups saved without AGC keys (a plain optimizer's state dict) keep this optimizer's own
        # values (the classifier group stays unclipped), else take its defaults
        current = self.__dict__.get('param_groups') or []
        for i, group in enumerate(state.get('param_groups', [])):
            for key in ('clipping', 'agc_eps'):
                if key not in group:
                    group[key] = current[i][key] if i < len(current) and key in current[i] else agc_defaults[key]
            _validate_group(group)
        super().__setstate__(state)
        self._agc_defaults = agc_defaults
        self._clip_counts = ClipCounts()
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Evaluate ``closure`` (if given), clip gradients, then take the base step.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer).

        Returns:
            The closure's loss, or None.

        Raises:
            FloatingPointError: a gradient holds inf or NaN and ``nonfinite='raise'`` (no
                parameter or state was modified).
        """
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
                    on_chunk=on_chunk, counts=self._clip_counts)
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

    def pop_clip_stats(self) -> Tuple[int, int]:
        """``(clipped, units)``: AGC units whose gradient was clipped, and units looked at,
        summed over the steps taken since the last call (skipped steps count neither).
        Host integers, taken from the flags each step reads back anyway: no sync here.

        Returns:
            The units clipped and the units looked at.
        """
        return self._clip_counts.pop()

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

    On CPU, ``accel/sgd.py`` runs the update chunk by chunk right after each chunk is clipped
    (bit-identical to clipping and then ``torch.optim.SGD.step``; switch:
    ``accel.configure(sgd=False)``).

    Args:
        params: the parameters or parameter groups (e.g. :func:`agc_param_groups`).
        lr: learning rate.
        momentum: momentum factor.
        dampening: momentum dampening (the reference: 0).
        weight_decay: L2 weight decay, added to the clipped gradient.
        nesterov: Nesterov momentum.
        clipping: AGC clipping threshold (> 0), or None to clip no group unless it sets its own.
        agc_eps: AGC's floor of the parameter norm (> 0).
        nonfinite: 'raise' or 'skip' on an inf/NaN gradient.
        **kwargs: other ``torch.optim.SGD`` keywords (``foreach``, ``fused``, ``maximize``, ...).

    Raises:
        TypeError: ``clipping`` or ``agc_eps`` is not a number.
        ValueError: an invalid AGC setting, or one ``torch.optim.SGD`` rejects.
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
        """:meth:`AGCMixin.step` (its arguments, result and errors) with torch's SGD update; on CPU
        through ``accel/sgd.py``'s chunked update."""
        from ..accel import sgd as fast_sgd  # (imported here: accel imports the models, which import nothing of agc)
        if fast_sgd.applies(self):
            return fast_sgd.chunked_step(self, closure)
        return super().step(closure)


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

    Args:
        optimizer_cls: the optimizer class.

    Returns:
        The AGC class (``optimizer_cls`` itself if it already has AGC).

    Raises:
        TypeError: ``optimizer_cls`` is not a ``torch.optim.Optimizer`` subclass.
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
