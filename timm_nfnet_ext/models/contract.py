"""The parts of timm's model contract that are not the network: input checks with clear errors,
the feature indices of ``forward_intermediates``, and timm's ``act_layer`` keyword."""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.layers import register_notrace_function

__all__ = ['check_input', 'feature_indices', 'activation_alias']


def _shape_str(shape: List[int]) -> str:
    """A shape as Python prints a tuple, ``(2, 3, 64, 64)``, also inside TorchScript."""
    return '(' + ', '.join([str(d) for d in shape]) + (',)' if len(shape) == 1 else ')')


@register_notrace_function  # a leaf for torch.fx: it checks concrete shapes
def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ``ValueError`` naming what is wrong with an NCHW input batch.

    Written for TorchScript too: a model traced by torch.fx and then scripted calls it directly.

    Args:
        x: the input batch.
        in_chans: the channels the model expects.
        min_size: the smallest height and width the model takes (its total stride).

    Raises:
        ValueError: ``x`` is not 4-dimensional, has other than ``in_chans`` channels, or is
            smaller than ``min_size`` in height or width.
    """
    shape: List[int] = list(x.shape)
    if len(shape) != 4:
        raise ValueError('expected an NCHW batch (4 dims), got shape ' + _shape_str(shape))
    if shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {shape[1]} (shape ' + _shape_str(shape) + ')')
    if min(shape[2], shape[3]) < min_size:
        raise ValueError(
            f'input {shape[2]}x{shape[3]} is too small: this NFNet needs at least '
            f'{min_size}x{min_size} (its total stride)')


def feature_indices(num_features: int, indices: Optional[Union[int, List[int]]] = None) -> Tuple[List[int], int]:
    """The taps a ``forward_intermediates(indices=...)`` call asks for, in timm's convention.

    Args:
        num_features: how many taps the model has.
        indices: None for all of them, an int ``n`` for the last ``n``, or a list of indices
            (negative ones count from the end).

    Returns:
        The absolute indices, in the order given, and the largest of them.

    Raises:
        ValueError: an index out of range, or none selected.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f'last-n indices={indices} is out of range (1 to {num_features})')
        taken = list(range(num_features - indices, num_features))
    else:
        taken = []
        for i in indices:
            index = num_features + i if i < 0 else i
            if not 0 <= index < num_features:
                raise ValueError(f'feature index {i} is out of range ({-num_features} to {num_features - 1})')
            taken.append(index)
        if not taken:
            raise ValueError('indices selects no feature')
    return taken, max(taken)


def activation_alias(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """timm's ``act_layer`` keyword, by name, as this architecture's ``activation``: DeepMind's
    gamma table needs a name it knows (``gelu``, ``relu``, ``silu``, ...), not a layer class."""
    if 'act_layer' not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    act = kwargs.pop('act_layer')
    if not isinstance(act, str):
        raise TypeError(f'act_layer must be an activation name of the gamma table (e.g. "relu"), got {act!r}')
    if kwargs.get('activation', act) != act:
        raise TypeError(f"act_layer={act!r} and activation={kwargs['activation']!r} disagree")
    kwargs['activation'] = act
    return kwargs
