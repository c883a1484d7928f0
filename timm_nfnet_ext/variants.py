"""The one table of NFNet variant facts.

Everything that differs between NFNet-F0 ... F7 lives here, from DeepMind's ``nfnet_params``
(``nfnets/base.py``), its experiment config and the paper: depths, train and test resolutions,
dropout, RandAugment magnitude, and the released weights with their reported accuracy. The
model configs and pretrained cfgs (``models/nfnet.py``), the paper recipe (``train/recipe.py``), the
eval preprocessing, the Hub release checks and the docs read it; nothing else states these
numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ['Variant', 'F_VARIANTS', 'NFNET_WIDTHS', 'PLUS_WIDTHS', 'SERESNEXT_WIDTHS',
           'REFERENCE_PADDING', 'reference_crop_pct', 'variant_of']

NFNET_WIDTHS = (256, 512, 1536, 1536)      # F0-F7
PLUS_WIDTHS = (384, 768, 2048, 2048)       # F0+ ... F7+ (no weights released)
SERESNEXT_WIDTHS = (256, 512, 1024, 2048)  # NF-SE-ResNeXt-D, the paper's Table 2 baseline

# The reference evaluates at S after resizing to S + 32 ('resize_crop_32').
REFERENCE_PADDING = 32


@dataclass(frozen=True)
class Variant:
    """One NFNet-F variant.

    Attributes:
        index: N of NFNet-FN.
        depths: blocks per stage, ``(N + 1) * (1, 2, 6, 3)``.
        train_size: training resolution (px).
        test_size: evaluation resolution (px).
        drop_rate: dropout before the classifier.
        randaug_magnitude: RandAugment magnitude of the training recipe ('405' -> 5, ...).
        params_m: parameters of the F variant, in millions (ImageNet head).
        top1: ImageNet top-1 the paper reports for the released weights; None when none were.
        top5: ImageNet top-5 the reference README reports for them; None when none were.
    """
    index: int
    depths: Tuple[int, int, int, int]
    train_size: int
    test_size: int
    drop_rate: float
    randaug_magnitude: int
    params_m: float
    top1: Optional[float]
    top5: Optional[float]

    @property
    def name(self) -> str:
        """The registered model name, ``nfnet_fN``.

        Returns:
            The name, e.g. ``nfnet_f0``.
        """
        return f'nfnet_f{self.index}'

    @property
    def weights_url(self) -> Optional[str]:
        """DeepMind's release of the weights (a dill pickle despite the ``.npz``), if any.

        Returns:
            The download URL, or None for a variant without released weights (F7).
        """
        if self.top1 is None:
            return None
        return f'https://storage.googleapis.com/dm-nfnets/F{self.index}_haiku.npz'


def _depths(i: int) -> Tuple[int, int, int, int]:
    return (i + 1, 2 * (i + 1), 6 * (i + 1), 3 * (i + 1))


#                index train test drop  RA   params  top-1  top-5
F_VARIANTS: Tuple[Variant, ...] = tuple(Variant(i, _depths(i), *row) for i, row in enumerate((
    (192, 256, 0.2, 5, 71.5, 83.6, 96.8),
    (224, 320, 0.3, 10, 132.6, 84.7, 97.1),
    (256, 352, 0.4, 10, 193.8, 85.1, 97.3),
    (320, 416, 0.4, 15, 254.9, 85.7, 97.5),
    (384, 512, 0.5, 15, 316.1, 85.9, 97.6),
    (416, 544, 0.5, 15, 377.2, 86.0, 97.6),
    (448, 576, 0.5, 15, 438.4, 86.5, 97.9),  # F6 was trained with SAM
    (480, 608, 0.5, 15, 499.5, None, None),  # F7: no weights released
)))

_NAME = re.compile(r'^(?:nfnet|nf_seresnextd)_f(\d)(?:_plus)?$')


def variant_of(model_name: str) -> Optional[Variant]:
    """The F variant a registered name is built on (``nfnet_f3``, ``nfnet_f3_plus`` and
    ``nf_seresnextd_f3`` are all F3's depths and sizes); None for other names.

    Args:
        model_name: a model name, with or without a pretrained tag (``nfnet_f0.dm_in1k``).

    Returns:
        The :class:`Variant`, or None.
    """
    m = _NAME.match(model_name.split('.')[0])
    return F_VARIANTS[int(m.group(1))] if m else None


def reference_crop_pct(size: int) -> float:
    """timm's ``crop_pct`` for the reference's resize-to-S+32-then-crop-S at crop size ``size``.

    Args:
        size: the crop size S in pixels.

    Returns:
        ``S / (S + 32)``, the fraction of the resized image the centre crop keeps.
    """
    return size / (size + REFERENCE_PADDING)
