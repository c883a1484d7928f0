"""``sgdagc``, ``adamwagc`` and ``lambagc`` in timm's optimizer registry, and ``register_agc_optimizer``."""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Type, Union

from torch.optim import Optimizer

from .optim import SGDAGC, with_agc

try:  # timm's optimizer registry (recent timm 1.0.x)
    from timm.optim._optim_factory import OptimInfo, default_registry
except ImportError:  # pragma: no cover - depends on the installed timm
    OptimInfo = default_registry = None
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
        registry: defaults to timm's ``default_registry``.
        **info: ``OptimInfo`` fields to set (``has_momentum``, ``defaults``, ...).

    Returns:
        The registered ``OptimInfo``.
    """
    if OptimInfo is None:
        raise RuntimeError('this timm has no optimizer registry '
                           '(timm.optim._optim_factory.OptimInfo); upgrade timm')
    registry = default_registry if registry is None else registry
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
    if OptimInfo is None:  # pragma: no cover - old timm
        warnings.warn('this timm has no optimizer registry: AGC optimizers were not '
                      'registered; use the classes directly, or upgrade timm')
        return
    default_registry.register(OptimInfo(
        name='sgdagc', opt_class=SGDAGC, has_eps=False, has_momentum=True,
        defaults={'nesterov': True},
        description='SGD_AGC of the NFNet paper: AGC, weight decay, Nesterov momentum SGD'))
    register_agc_optimizer('adamwagc', 'adamw', 'torch AdamW with adaptive gradient clipping')
    register_agc_optimizer('lambagc', 'lamb', 'timm Lamb with adaptive gradient clipping')
