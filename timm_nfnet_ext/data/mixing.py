"""The reference's 2B -> B MixUp + CutMix (``my_mixup_cutmix``) and its soft targets.

DeepMind's NFNet pipeline batches ``2B`` preprocessed images (float, unclipped) and mixes them
into ``B``: with ``n = B / 2``,

- outputs ``0 .. n-1`` are MixUp of example ``i`` with ``n + i``:
  ``r * x[i] + (1 - r) * x[n + i]``, ``r ~ Beta(0.2, 0.2)`` per output;
- outputs ``n .. 2n-1`` are CutMix of example ``2n + i`` (inside the box) with ``3n + i``
  (outside it). The box's centre is a uniform pixel, its sides ``2 * (int(sqrt(1 - U) * side) // 2)``
  with ``U ~ U[0, 1)``, clipped to the image; the ratio is the box's share of the image;
- the target is ``r * onehot(label) + (1 - r) * onehot(mix_label)`` (``label`` being the first
  / in-box example's), then ``t * (1 - s) + s / num_classes`` (label smoothing, s = 0.1).

The reference computes ``bs = 2B // 4`` and takes CutMix partners from the *last* ``bs``
examples, so an odd ``B`` would silently give ``B - 1`` outputs; :func:`mix_batch` refuses a
batch whose size is not a multiple of 4 instead.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ['MixParams', 'apply_mix', 'cutmix_box', 'mix_batch', 'sample_mix_params', 'smooth_targets']

_F32 = np.float32


@dataclass(frozen=True)
class MixParams:
    """The random draws of one mixed batch of ``B = 2n`` outputs.

    Attributes:
        mixup_ratio: ``(n,)`` float32, the weight of example ``i`` in output ``i``.
        boxes: ``(n, 4)`` int64 ``(top, left, bottom, right)`` CutMix boxes (bottom / right
            exclusive) where output ``n + i`` shows example ``2n + i``.
        cutmix_ratio: ``(n,)`` float32, each box's share of the image.
    """
    mixup_ratio: torch.Tensor
    boxes: torch.Tensor
    cutmix_ratio: torch.Tensor


def cutmix_box(height: int, width: int, generator: np.random.Generator) -> Tuple[int, int, int, int]:
    """One CutMix box as the reference's ``cutmix_padding`` draws it.

    Args:
        height: image height.
        width: image width.
        generator: the random source.

    Returns:
        ``(top, left, bottom, right)``, bottom / right exclusive, possibly empty.
    """
    cx = int(generator.integers(0, width))
    cy = int(generator.integers(0, height))
    side = np.sqrt(_F32(1.0) - generator.random(dtype=np.float32))  # Beta(1, 1) = U[0, 1)
    half_w = int(side * _F32(width)) // 2
    half_h = int(side * _F32(height)) // 2
    return (min(max(cy - half_h, 0), height), min(max(cx - half_w, 0), width),
            min(max(cy + half_h, 0), height), min(max(cx + half_w, 0), width))


def sample_mix_params(batch_size: int, height: int, width: int, generator: np.random.Generator,
                      mixup_alpha: float = 0.2) -> MixParams:
    """Draw the ratios and boxes for a batch of ``batch_size`` (``B``) outputs.

    Args:
        batch_size: ``B``, the number of outputs (even; the input batch is ``2B``).
        height: image height.
        width: image width.
        generator: the random source.
        mixup_alpha: the Beta distribution's two parameters.

    Returns:
        :class:`MixParams` for ``B / 2`` MixUp and ``B / 2`` CutMix outputs.

    Raises:
        ValueError: an odd or non-positive ``batch_size``, or ``mixup_alpha <= 0``.
    """
    if not isinstance(batch_size, numbers.Integral) or batch_size <= 0 or batch_size % 2:
        raise ValueError(f'the mixed batch size must be a positive even number, not {batch_size!r}: '
                         'half of it is MixUp and half CutMix')
    if not mixup_alpha > 0:
        raise ValueError(f'mixup_alpha must be > 0, not {mixup_alpha!r}')
    n = batch_size // 2
    mixup = generator.beta(mixup_alpha, mixup_alpha, size=n).astype(np.float32)
    boxes = np.array([cutmix_box(height, width, generator) for _ in range(n)], dtype=np.int64).reshape(n, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cutmix = area.astype(np.float32) / _F32(height * width)  # tf.reduce_mean of the 0/1 mask
    return MixParams(torch.from_numpy(mixup), torch.from_numpy(boxes), torch.from_numpy(cutmix))


def smooth_targets(labels: torch.Tensor, mix_labels: torch.Tensor, ratio: torch.Tensor,
                   num_classes: int, label_smoothing: float = 0.1) -> torch.Tensor:
    """``ratio * onehot(labels) + (1 - ratio) * onehot(mix_labels)``, then label smoothing.

    Args:
        labels: ``(N,)`` int labels weighted by ``ratio``.
        mix_labels: ``(N,)`` int labels weighted by ``1 - ratio``.
        ratio: ``(N,)`` float weights.
        num_classes: number of classes.
        label_smoothing: ``s``: targets become ``t * (1 - s) + s / num_classes``.

    Returns:
        ``(N, num_classes)`` float32 targets (each row sums to 1).
    """
    # ratio * 1 + (1 - ratio) * 0 is ratio exactly, so two accumulating writes into zeros give the
    # one-hot formula bit for bit (an identity matrix per batch would cost num_classes^2 floats)
    r = ratio.to(torch.float32)
    rows = torch.arange(r.shape[0])
    y = torch.zeros(r.shape[0], num_classes, dtype=torch.float32)
    y.index_put_((rows, labels.long()), r, accumulate=True)
    y.index_put_((rows, mix_labels.long()), 1.0 - r, accumulate=True)
    if label_smoothing > 0:
        y = y * float(_F32(1.0 - label_smoothing)) + float(_F32(label_smoothing / num_classes))
    return y


def apply_mix(images: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor, params: MixParams, num_classes: int,
              label_smoothing: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mix ``2B`` images into ``B`` with given draws (see the module docstring for the pairing).

    Args:
        images: ``(2B, C, H, W)`` float images, or a sequence of ``2B`` ``(C, H, W)`` ones
            (spares stacking them).
        labels: ``(2B,)`` int labels in ``[0, num_classes)``.
        params: the draws, from :func:`sample_mix_params` for ``B`` outputs.
        num_classes: number of classes.
        label_smoothing: see :func:`smooth_targets`.

    Returns:
        ``(images, targets)``: ``(B, C, H, W)`` float32 and ``(B, num_classes)`` float32.

    Raises:
        ValueError: mismatched shapes or labels out of range.
    """
    n = params.mixup_ratio.shape[0]
    _check(images, labels, num_classes, label_smoothing, expected=4 * n)
    x = [image.to(torch.float32) for image in images]  # views when already float32
    out = torch.empty((2 * n,) + tuple(x[0].shape), dtype=torch.float32)
    for i, r in enumerate(params.mixup_ratio.tolist()):
        # r * a + (1 - r) * b in float32 (the sum's order does not change it)
        torch.mul(x[n + i], float(_F32(1.0) - _F32(r)), out=out[i]).add_(x[i] * r)
    for i, (top, left, bottom, right) in enumerate(params.boxes.tolist()):
        out[n + i] = x[3 * n + i]
        out[n + i, :, top:bottom, left:right] = x[2 * n + i][:, top:bottom, left:right]
    ratio = torch.cat([params.mixup_ratio, params.cutmix_ratio])
    first = torch.cat([labels[:n], labels[2 * n:3 * n]]).long()
    second = torch.cat([labels[n:2 * n], labels[3 * n:]]).long()
    return out, smooth_targets(first, second, ratio, num_classes, label_smoothing)


def mix_batch(images: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor, num_classes: int, generator: np.random.Generator,
              *, mixup_alpha: float = 0.2, label_smoothing: float = 0.1
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's MixUp + CutMix of ``2B`` examples into ``B``, with soft targets.

    Args:
        images: ``(2B, C, H, W)`` float images (before clipping), or a list of ``(C, H, W)``;
            ``2B`` a multiple of 4.
        labels: ``(2B,)`` int labels.
        num_classes: number of classes.
        generator: the random source of the ratios and boxes.
        mixup_alpha: MixUp's Beta parameter.
        label_smoothing: see :func:`smooth_targets`.

    Returns:
        ``(images, targets)``: ``(B, C, H, W)`` float32, ``(B, num_classes)`` float32.

    Raises:
        ValueError: a batch whose size is not a multiple of 4, mismatched labels, labels out
            of range, or bad ``num_classes`` / ``label_smoothing`` / ``mixup_alpha``.
        TypeError: ``generator`` is not a ``numpy.random.Generator``.
    """
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f'generator must be a numpy.random.Generator, not {type(generator).__name__}')
    _check(images, labels, num_classes, label_smoothing)
    height, width = images[0].shape[-2:]
    params = sample_mix_params(len(images) // 2, height, width, generator, mixup_alpha)
    return apply_mix(images, labels, params, num_classes, label_smoothing)


def _check(images: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor, num_classes: int,
           label_smoothing: float, expected: int = -1) -> None:
    if isinstance(images, torch.Tensor):
        ok = images.ndim == 4 and images.is_floating_point()
    else:
        ok = isinstance(images, (list, tuple)) and all(
            isinstance(i, torch.Tensor) and i.ndim == 3 and i.is_floating_point() for i in images) \
            and len({tuple(i.shape) for i in images}) <= 1
    if not ok:
        raise ValueError('images must be a float (2B, C, H, W) tensor or a list of float (C, H, W) tensors '
                         f'of one size, not {getattr(images, "dtype", type(images).__name__)} '
                         f'of shape {tuple(getattr(images, "shape", ()))}')
    total = len(images)
    if total == 0 or total % 4:
        raise ValueError(f'MixUp + CutMix takes 2B examples with B even (a multiple of 4), got {total}: '
                         '(the reference would drop examples); use drop_last=True and an even batch size')
    if expected >= 0 and total != expected:
        raise ValueError(f'{total} images for mix parameters of {expected // 2} outputs')
    if not isinstance(labels, torch.Tensor) or labels.shape != (total,) or labels.is_floating_point():
        raise ValueError(f'labels must be an int tensor of shape ({total},), not '
                         f'{getattr(labels, "dtype", type(labels).__name__)} {tuple(getattr(labels, "shape", ()))}')
    if not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f'num_classes must be a positive int, not {num_classes!r}')
    if total and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f'labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}')
    if not 0 <= label_smoothing < 1:
        raise ValueError(f'label_smoothing must be in [0, 1), not {label_smoothing!r}')
