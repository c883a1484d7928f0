"""``sgdagc``, ``adamwagc`` and ``lambagc`` in timm's optimizer registry, and ``register_agc_optimizer``."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Type, Union

from torch.optim import Optimizer

from .optim import SGDAGC, with_agc

_logger = logging.getLogger(__name__)

try:  # timm's optimizer registry entries (timm >= 1.0.12)
    from timm.optim import OptimInfo
except ImportError:  # pragma: no cover - depends on the installed timm
    OptimInfo = None


def _find_default_registry() -> Any:
    """timm's default optimizer registry (the one ``create_optimizer_v2`` reads), or None.

    timm exports readers of it (``timm.optim.get_optimizer_info``, ``list_optimizers``) but no
    public handle to register into, so the private module is looked up once, here; without it
    (or with a registry of another shape) the AGC optimizers are not registered, and remain
    usable as classes and through ``register_agc_optimizer(..., registry=...)``.
    """
    try:
        from timm.optim import _optim_factory
    except ImportError:  # pragma: no cover - depends on the installed timm
        return None
    registry = getattr(_optim_factory, 'default_registry', None)
    needed = ('register', 'get_optimizer_info', 'get_optimizer_class')
    return registry if all(callable(getattr(registry, name, None)) for name in needed) else None


DEFAULT_REGISTRY = _find_default_registry()
AGC_OPTIMIZER_NAMES = ('sgdagc', 'adamwagc', 'lambagc')


# --------------------------------------------------------------------------- timm registry

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or '_' in name or name != name.lower():
        raise ValueError(f"optimizer name must be lowercase without '_' (timm keeps only the "
                         f"text after the last '_'), got {name!r}")
    return name


def register_agc_optimizer(
        name: str,
        base: Union[str, Type[Optimizer]],
        description: str = '',
        registry: Any = None,
        **info: Any,
) -> Any:
    """Register an AGC form of an optimizer in timm's optimizer registry.

    Args:
        name: the new name, lowercase without ``_`` (e.g. ``'lionagc'``).
        base: a registered timm optimizer name (its ``OptimInfo`` flags and defaults
            are copied) or an optimizer class.
        description: shown by ``timm.optim.list_optimizers(with_description=True)``.
        registry: defaults to timm's default registry (``DEFAULT_REGISTRY``).
        **info: ``OptimInfo`` fields to set (``has_momentum``, ``defaults``, ...).

    Returns:
        The registered ``OptimInfo``.

    Raises:
        RuntimeError: this timm has no optimizer registry and none was passed.
        ValueError: ``name`` is not lowercase without ``_``, or ``base`` is a name the registry
            does not know.
        TypeError: ``base`` is neither a name nor a ``torch.optim.Optimizer`` subclass.
    """
    if OptimInfo is None:
        raise RuntimeError('this timm has no optimizer registry (timm.optim.OptimInfo); upgrade timm')
    registry = DEFAULT_REGISTRY if registry is None else registry
    if registry is None:
        raise RuntimeError("timm's default optimizer registry was not found in this timm: pass registry=")
    name = _check_name(name)
    if isinstance(base, str):
        base_info = registry.get_optimizer_info(base)
        cls = with_agc(registry.get_optimizer_class(base_info, bind_defaults=False))
        desc = description or f'{base_info.description} + adaptive gradient clipping'
        opt_info = replace(base_info, name=name, opt_class=cls, description=desc, **info)
    else:
        opt_info = OptimInfo(name=name, opt_class=with_agc(base),
                             description=description or f'{base.__name__} + AGC', **info)
    registry.register(opt_info)
    return opt_info


def register_builtin_optimizers() -> None:
    """Register ``sgdagc``, ``adamwagc`` and ``lambagc`` (done once, when the package is imported)."""
    if OptimInfo is None or DEFAULT_REGISTRY is None:
        # an import must not warn: said once in the log, and the classes work as they are
        _logger.info('timm has no optimizer registry this package can register into: sgdagc, adamwagc and '
                     'lambagc were not registered; use SGDAGC / with_agc directly, or upgrade timm')
        return
    DEFAULT_REGISTRY.register(OptimInfo(
        name='sgdagc', opt_class=SGDAGC, has_eps=False, has_momentum=True,
        defaults={'nesterov': True},
        description='SGD_AGC of the NFNet paper: AGC, weight decay, Nesterov momentum SGD'))
    register_agc_optimizer('adamwagc', 'adamw', 'torch AdamW with adaptive gradient clipping')
    register_agc_optimizer('lambagc', 'lamb', 'timm Lamb with adaptive gradient clipping')
