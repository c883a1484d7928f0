"""The reference's random crop: TensorFlow's ``sample_distorted_bounding_box`` on the whole image.

DeepMind's training pipeline draws one crop window per image with
``tf.image.sample_distorted_bounding_box(min_object_covered=0.1, aspect_ratio_range=(3/4, 4/3),
area_range=(0.08, 1), max_attempts=10)`` and the whole image as the only bounding box; when the
window it returns is the whole image it takes a centred square window instead (the eval
preprocessing's ``_decode_and_center_crop``). This module reimplements that kernel's algorithm
(not its random stream) on a ``numpy.random.Generator``; the rules it keeps, all visible in the
window statistics:

- the aspect ratio (width / height) is uniform in ``aspect_ratio_range`` (linear, not log);
- the *height* is uniform over the integers between the heights that give the minimum and the
  maximum area at that aspect (lowered so the width fits), the width ``round(h * aspect)``;
- an attempt whose area leaves ``area_range`` after one correction step fails, and so does one
  covering less than ``min_object_covered`` of the image: with the defaults the real minimum
  area is 10 % of the image, not 8 %;
- the top offset is uniform in ``[0, H - h)`` and the left in ``[0, W - w)`` (one short of the
  last valid position), 0 when the window spans the axis;
- after ``max_attempts`` failures the window is the whole image.

Maths is float32 where the kernel's is (``lrintf`` rounds half to even, as ``np.rint``).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np

from ..variants import REFERENCE_PADDING

__all__ = ['center_crop_window', 'distorted_crop_window', 'sample_distorted_crop']

_F = np.float32
Window = Tuple[int, int, int, int]


def _lrint(x: np.floating) -> int:
    return int(np.rint(x))


def _attempt(width: int, height: int, min_area: np.float32, max_area: np.float32,
             aspect: np.float32, generator: np.random.Generator) -> Optional[Window]:
    """One try of the kernel: ``(top, left, h, w)`` or None when the constraints fail."""
    h = _lrint(np.sqrt(min_area / aspect))
    max_h = _lrint(np.sqrt(max_area / aspect))
    if _lrint(_F(max_h) * aspect) > width:
        # the largest height whose rounded width still fits (the kernel does this in double)
        max_h = int((width + 0.5 - float(_F(1e-7))) / float(aspect))
        if _lrint(_F(max_h) * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += int(generator.integers(0, max_h - h + 1))
    w = _lrint(_F(h) * aspect)
    area = _F(w * h)
    if area < min_area:  # one step up, then one step down, to absorb rounding
        h += 1
        w = _lrint(_F(h) * aspect)
        area = _F(w * h)
    if area > max_area:
        h -= 1
        w = _lrint(_F(h) * aspect)
        area = _F(w * h)
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    top = int(generator.integers(0, height - h)) if h < height else 0
    left = int(generator.integers(0, width - w)) if w < width else 0
    return top, left, h, w


def distorted_crop_window(height: int, width: int, generator: np.random.Generator, *,
                          min_object_covered: float = 0.1,
                          aspect_ratio_range: Tuple[float, float] = (3 / 4, 4 / 3),
                          area_range: Tuple[float, float] = (0.08, 1.0),
                          max_attempts: int = 10) -> Window:
    """``sample_distorted_bounding_box`` with the whole image as the box, without the fallback.

    Args:
        height: image height (pixels).
        width: image width (pixels).
        generator: the random source.
        min_object_covered: least fraction of the image a window must cover.
        aspect_ratio_range: ``(min, max)`` of width / height, sampled uniformly.
        area_range: ``(min, max)`` window area as a fraction of the image's, in ``(0, 1]``.
        max_attempts: tries before giving up and returning the whole image.

    Returns:
        ``(top, left, h, w)``; ``(0, 0, height, width)`` when every attempt failed.

    Raises:
        ValueError: a non-positive size, or ranges TensorFlow refuses.
        TypeError: ``generator`` is not a ``numpy.random.Generator``.
    """
    _check(height, width, generator, min_object_covered, aspect_ratio_range, area_range, max_attempts)
    lo_area, hi_area = _F(area_range[0]), _F(area_range[1])
    lo_aspect, hi_aspect = _F(aspect_ratio_range[0]), _F(aspect_ratio_range[1])
    if lo_area > hi_area:  # the kernel fails every attempt
        return 0, 0, height, width
    min_area = lo_area * _F(width) * _F(height)
    max_area = hi_area * _F(width) * _F(height)
    image_area = _F(width * height)
    covered = _F(min_object_covered)
    for _ in range(max_attempts):
        # RandFloat: a float32 in [0, 1) with 23 random mantissa bits
        u = _F(generator.integers(0, 1 << 23) * 2.0 ** -23)
        aspect = u * (hi_aspect - lo_aspect) + lo_aspect
        window = _attempt(width, height, min_area, max_area, aspect, generator)
        if window is None:
            continue
        crop_area = _F(window[2] * window[3])
        if crop_area >= 1 and crop_area / image_area >= covered:
            return window
    return 0, 0, height, width


def center_crop_window(height: int, width: int, img_size: Tuple[int, int]) -> Window:
    """The reference's ``_decode_and_center_crop`` window for a ``(S_h, S_w)`` output.

    The window keeps the output's aspect and leaves a margin as if the image were resized to
    ``S + 32``: side ``int(min(H / (S_h + 32), W / (S_w + 32)) * S)`` in float32, offset
    ``(H - side + 1) // 2`` (rounded up, as the reference).

    Args:
        height: image height.
        width: image width.
        img_size: ``(S_h, S_w)``, the training size.

    Returns:
        ``(top, left, h, w)``.
    """
    scale = min(_F(height) / _F(img_size[0] + REFERENCE_PADDING),
                _F(width) / _F(img_size[1] + REFERENCE_PADDING))
    h = int(scale * _F(img_size[0]))
    w = int(scale * _F(img_size[1]))
    return (height - h + 1) // 2, (width - w + 1) // 2, h, w


def sample_distorted_crop(height: int, width: int, generator: np.random.Generator, *,
                          img_size: Tuple[int, int] = (224, 224),
                          min_object_covered: float = 0.1,
                          aspect_ratio_range: Tuple[float, float] = (3 / 4, 4 / 3),
                          area_range: Tuple[float, float] = (0.08, 1.0),
                          max_attempts: int = 10, fallback: bool = True) -> Window:
    """The reference's training crop window (``_decode_and_random_crop``).

    :func:`distorted_crop_window`, and where that returns the whole image (every attempt failed,
    or the one drawn happened to be the image) :func:`center_crop_window` for ``img_size``.
    The reference tests "the whole image" by comparing the JPEG header's ``[H, W, components]``
    with the decoded ``[H, W, 3]``: for a grayscale (1) or CMYK (4) JPEG the two never match and
    the whole image is kept (``fallback=False``).

    Args:
        height: decoded image height.
        width: decoded image width.
        generator: the random source.
        img_size: ``(S_h, S_w)``, the training size (only the fallback uses it).
        min_object_covered: see :func:`distorted_crop_window`.
        aspect_ratio_range: see :func:`distorted_crop_window`.
        area_range: see :func:`distorted_crop_window`.
        max_attempts: see :func:`distorted_crop_window`.
        fallback: take the centre crop when the window is the whole image (the reference does
            for 3-component JPEGs only).

    Returns:
        ``(top, left, h, w)`` of the window to crop from the decoded image.

    Raises:
        ValueError: as :func:`distorted_crop_window`.
        TypeError: as :func:`distorted_crop_window`.
    """
    window = distorted_crop_window(height, width, generator, min_object_covered=min_object_covered,
                                   aspect_ratio_range=aspect_ratio_range, area_range=area_range,
                                   max_attempts=max_attempts)
    if fallback and window[2] == height and window[3] == width:
        return center_crop_window(height, width, img_size)
    return window


def _check(height: int, width: int, generator: np.random.Generator, min_object_covered: float,
           aspect_ratio_range: Tuple[float, float], area_range: Tuple[float, float],
           max_attempts: int) -> None:
    for name, value in (('height', height), ('width', width), ('max_attempts', max_attempts)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f'{name} must be a positive int, not {value!r}')
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f'generator must be a numpy.random.Generator, not {type(generator).__name__}')
    if len(aspect_ratio_range) != 2 or not all(a > 0 for a in aspect_ratio_range):
        raise ValueError(f'aspect_ratio_range must be two positive numbers, not {aspect_ratio_range!r}')
    if len(area_range) != 2 or not all(0 < a <= 1 for a in area_range):
        raise ValueError(f'area_range must be two numbers in (0, 1], not {area_range!r}')
    if not min_object_covered >= 0:
        raise ValueError(f'min_object_covered must be >= 0, not {min_object_covered!r}')
