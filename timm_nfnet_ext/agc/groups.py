"""The paper's parameter groups: classifier weight unclipped, no weight decay on gains,
biases and skip gains."""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Any, Dict, Iterable, List, Optional

from torch import Tensor, nn

from .clip import _check_clipping
_NO_DECAY_LEAF_NAMES = frozenset({'gain', 'skip_gain', 'skipinit_gain'})


# --------------------------------------------------------------------------- param groups

def _unwrap(model: nn.Module) -> nn.Module:
    """Reach the model inside torch.compile / DDP / DataParallel wrappers, so parameter names
    carry no ``_orig_mod.`` / ``module.`` prefix (``no_weight_decay()`` patterns must match)."""
    while True:
        inner = getattr(model, '_orig_mod', None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module) and not hasattr(model, 'get_classifier'):
            inner = getattr(model, 'module', None)  # DDP, DataParallel and other .module wrappers
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _classifier_weights(model: nn.Module) -> List[Tensor]:
    """The final linear weights: ``get_classifier()``'s weight; for models with two heads
    (distilled DeiT/LeViT return a tuple) or a head module holding its linears, each one's."""
    if not hasattr(model, 'get_classifier'):
        raise ValueError(
            f'agc_param_groups needs a model with get_classifier() to leave the classifier '
            f'weight unclipped; {type(model).__name__} has none. Pass a list of parameters to '
            f'clip everything, or build the groups yourself.')
    head = model.get_classifier()
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    weights: List[Tensor] = []
    for h in heads:
        weight = getattr(h, 'weight', None)
        if isinstance(weight, Tensor):
            weights.append(weight)
        elif isinstance(h, nn.Module):
            weights += [m.weight for m in h.modules() if isinstance(m, nn.Linear)]
    if not weights:
        hint = ' (a model built with num_classes=0?)' if all(isinstance(h, nn.Identity) for h in heads) else ''
        raise ValueError(
            f'agc_param_groups: get_classifier() of {type(model).__name__} returned '
            f'{type(head).__name__}, which holds no linear weight{hint}. '
            f'The paper grouping needs a classifier; pass a list of parameters to clip all.')
    return weights


def _no_decay(name: str, p: Tensor, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit('.', 1)[-1]
    return (p.ndim <= 1 or leaf == 'bias' or leaf in _NO_DECAY_LEAF_NAMES
            or any(fnmatch(name, pat) for pat in patterns))


def agc_param_groups(
        model: nn.Module,
        weight_decay: Optional[float] = None,
        clipping: Optional[float] = None,
        no_weight_decay_list: Iterable[str] = (),
) -> List[Dict[str, Any]]:
    """The paper's parameter groups for an AGC optimizer.

    * the classifier weight (``model.get_classifier().weight``; each head's for models with
      two): weight decay, **not clipped** (``clipping=None``);
    * gains, biases, skip gains -- tensors with ``ndim <= 1``, names ending ``.bias``,
      ``.gain``, ``.skip_gain``, ``.skipinit_gain``, and ``model.no_weight_decay()`` /
      ``no_weight_decay_list`` (fnmatch patterns): clipped, weight decay 0;
    * everything else (conv and linear weights): clipped, weight decay.

    Frozen parameters (``requires_grad=False``) are left out. With ``weight_decay`` or
    ``clipping`` left ``None`` the groups inherit the optimizer's value, so this works as
    ``create_optimizer_v2(model, 'sgdagc', weight_decay=2e-5, clipping=0.01,
    param_group_fn=agc_param_groups)``. DDP / DataParallel / compiled wrappers are
    looked through.

    Args:
        model: the model (or a DDP / DataParallel / compiled wrapper of it).
        weight_decay: weight decay of the decayed groups; None inherits the optimizer's.
        clipping: AGC clipping of the clipped groups; None inherits the optimizer's.
        no_weight_decay_list: more fnmatch patterns of parameter names not to decay.

    Returns:
        Up to three parameter groups (decayed and clipped; not decayed and clipped; the
        classifier weight, decayed and unclipped), empty ones left out.

    Raises:
        ValueError: the model has no ``get_classifier()`` or no classifier weight, or
            ``weight_decay`` < 0, or ``clipping`` <= 0.
        TypeError: ``clipping`` is not a number.
    """
    model = _unwrap(model)
    head_weights = {id(w) for w in _classifier_weights(model)}
    if weight_decay is not None and not weight_decay >= 0:
        raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}')
    clipping = _check_clipping(clipping)
    patterns = set(no_weight_decay_list) | set(getattr(model, 'no_weight_decay', set)())
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_weights:
            head.append(p)
        else:
            (no_decay if _no_decay(name, p, patterns) else decay).append(p)

    def group(params: List[Tensor], wd: Optional[float], clip: Any) -> Dict[str, Any]:
        g: Dict[str, Any] = {'params': params}
        if wd is not None:
            g['weight_decay'] = wd
        if clip is not _INHERIT:
            g['clipping'] = clip
        return g

    clip = _INHERIT if clipping is None else clipping
    groups = [group(decay, weight_decay, clip), group(no_decay, 0.0, clip),
              group(head, weight_decay, None)]
    return [g for g in groups if g['params']]


_INHERIT = object()
