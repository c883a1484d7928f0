"""Speed paths: the same numbers as the reference layers (``models/``, ``layers/``), faster.

They attach at one point, ``accelerate(model)``, which ``timm.create_model`` calls for every
model of this package: it swaps the model's reference modules for the subclasses in
``modules.py`` (``FastActivation``, ``FastWSConv2d``, ``AcceleratedNFNet``), in place.
``reference(model)`` swaps them back. Each path can be switched off process-wide with
``configure`` (``switches.py`` lists them):

- ``gelu.py``: the tanh-GELU on ``sigmoid`` with a hand-written backward (CPU, float32);
- ``weight_std.py``: weight standardisation with a hand-written backward (CPU);
- ``grouped_ws.py``: the convs of a segment standardised as one matrix (CUDA by default);
- ``sgd.py``: ``SGDAGC``'s update chunk by chunk, with its temporaries in one scratch buffer (CPU);
- ``prepack.py``: ``prepack_for_cpu``, oneDNN-reordered conv weights for CPU inference (opt-in);
- ``probes.py``: what torch can say about the current call (functorch, forward AD, autocast).

What each saves, with the commands that measured it: ``docs/performance.md``.
"""
from typing import Any

from . import switches
from .modules import AcceleratedNFNet, FastActivation, FastWSConv2d, accelerate, reference
from .prepack import PrepackedConv2d, onednn_available, prepack_for_cpu

__all__ = ['accelerate', 'reference', 'configure', 'AcceleratedNFNet', 'FastActivation', 'FastWSConv2d',
           'prepack_for_cpu', 'PrepackedConv2d', 'onednn_available']

_NAMES = ('models', 'gelu', 'weight_std', 'grouped_ws', 'sgd')


class configure:  # noqa: N801 (used like a function: ``configure(gelu=False)``)
    """Switch speed paths on or off, process-wide; as a context manager, restore them on exit.

    The switches are global, read by every thread: set them before threads run models, not
    from several threads at once (a block's exit restores what was set when it was entered).

    Example (double backward on CPU needs ATen's GELU)::

        with timm_nfnet_ext.accel.configure(gelu=False):
            grads = torch.autograd.grad(model(x).sum(), params, create_graph=True)

    Args:
        **flags: any of ``models``, ``gelu``, ``weight_std``, ``grouped_ws``, ``sgd`` (bools;
            see ``switches.py``).

    Raises:
        TypeError: an unknown switch name.
    """

    def __init__(self, **flags: bool):
        unknown = sorted(set(flags) - set(_NAMES))
        if unknown:
            raise TypeError(f'unknown speed path switch(es) {unknown}; the switches are {list(_NAMES)}')
        self.previous = {name: getattr(switches, name) for name in _NAMES}
        for name, value in flags.items():
            setattr(switches, name, bool(value))

    def __enter__(self) -> 'configure':
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, value in self.previous.items():
            setattr(switches, name, value)
