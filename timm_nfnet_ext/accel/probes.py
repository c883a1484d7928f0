"""What torch can tell the speed paths about the current call, looked up once.

The hand-written autograd functions of this package (weight standardisation, the CPU GELU) have
no vmap and no forward-AD rule, and the CPU GELU writes through ``out=`` views, so each steps
aside under ``torch.func`` transforms, forward-mode AD and functorch-wrapped tensors. torch has
no public query for these. Its private ones are looked up once, here, without calling anything
that warns; when one is missing, or fails, the answer is the safe one (the speed path steps
aside and the reference expression runs), so a torch release that drops them costs speed only.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

__all__ = ['functorch_active', 'forward_ad_active', 'functorch_wrapped', 'is_view', 'autocast_off',
           'autocast_dtype']


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

    Returns:
        True if a transform may be active.
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

    Returns:
        True if a dual level may be open.
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
    """A context with autocast off on ``device_type`` (nothing to turn off where autocast does not exist).

    Args:
        device_type: a device type, e.g. ``'cuda'`` or ``'cpu'``.

    Returns:
        ``torch.autocast(device_type, enabled=False)``, or a null context.
    """
    if _autocast_exists(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives convs on ``device_type``, or None when autocast is off there.

    Args:
        device_type: a device type, e.g. ``'cuda'`` or ``'cpu'``.

    Returns:
        The autocast dtype, or None.
    """
    if not _autocast_exists(device_type):
        return None
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


# The hand-written passes write through ``out=`` and ``as_strided`` views, which a functorch
# wrapper (vmap, grad) cannot take, and overwrite an input in place only where autograd allows
# it (not on views). torch answers both only through private APIs: they are looked up once, here,
# and where one is missing or fails, the answer is the safe one (wrapped / a view: ATen's kernels,
# out of place).
def _find_private_query(owner: Any, name: str) -> Callable[[torch.Tensor], bool] | None:
    """``owner.name`` if it exists and answers False for a plain tensor, else None."""
    query = getattr(owner, name, None)
    try:
        return query if callable(query) and query(torch.zeros(())) is False else None
    except Exception:  # a changed private signature: treat as missing
        return None


FUNCTORCH_WRAPPED_QUERY = _find_private_query(getattr(torch._C, '_functorch', None), 'is_functorch_wrapped_tensor')
IS_VIEW_QUERY = _find_private_query(torch.Tensor, '_is_view')


def _ask(query: Callable[[torch.Tensor], bool] | None, x: torch.Tensor) -> bool:
    """``query(x)``; True (the safe answer) where the query is missing or fails."""
    if query is None:
        return True
    try:
        return bool(query(x))
    except Exception:
        return True


def functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a functorch wrapper (inside vmap / grad); True where torch cannot say.

    Args:
        x: any tensor.

    Returns:
        True if ``x`` is (or may be) wrapped.
    """
    return _ask(FUNCTORCH_WRAPPED_QUERY, x)


def is_view(x: torch.Tensor) -> bool:
    """Whether ``x`` is a view (autograd forbids some in-place ops on it); True where torch cannot say.

    Args:
        x: any tensor.

    Returns:
        True if ``x`` is (or may be) a view.
    """
    return _ask(IS_VIEW_QUERY, x)
