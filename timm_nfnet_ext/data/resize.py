"""The reference's resize: TensorFlow's bicubic (``tf.image.resize(..., BICUBIC)``, no antialias).

Written by hand because no library a timm user has computes it: PIL's and torchvision's
bicubic on PIL images are antialiased (a kernel that widens when downscaling), and
``torch.nn.functional.interpolate(mode='bicubic')`` uses a = -0.75, clamps taps at the border
instead of dropping them, and does not quantise the kernel offset. TensorFlow's kernel, per axis:

- source coordinate ``x = (o + 0.5) * (in / out) - 0.5`` in float32 (half-pixel centres);
- taps ``floor(x) - 1 .. floor(x) + 2`` with Keys' cubic (a = -0.5), its fractional offset
  rounded to a 1/1024 table (computed in double, stored as float32);
- taps outside the image get weight 0 and the rest are divided by their sum;
- rows are interpolated first, then columns, in float32, with no clamping of the result.

The weights depend only on the sizes, so they are computed once per (in, out) and cached; only
the rows and columns a centre crop keeps are ever computed.
"""
from __future__ import annotations

import functools
import warnings
from typing import Tuple

import numpy as np
import torch

__all__ = ['bicubic_taps', 'resize_crop']

_TABLE_SIZE = 1024
_KEYS_A = -0.5


@functools.lru_cache(maxsize=1)
def _coefficients() -> np.ndarray:
    """Keys' cubic at the 1025 table offsets: column 0 for |d| in [0, 1], column 1 for d + 1."""
    a = _KEYS_A
    table = np.empty((_TABLE_SIZE + 1, 2), np.float32)
    for i in range(_TABLE_SIZE + 1):
        x = float(np.float32(i * 1.0 / _TABLE_SIZE))  # TF keeps x as float32, maths in double
        table[i, 0] = ((a + 2) * x - (a + 3)) * x * x + 1
        x1 = float(np.float32(np.float32(x) + np.float32(1.0)))
        table[i, 1] = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return table


def bicubic_taps(in_size: int, out_size: int, start: int = 0,
                 stop: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights of TensorFlow's bicubic along one axis.

    Args:
        in_size: the input length (pixels).
        out_size: the length the axis is resized to.
        start: the first output position wanted (a crop's offset).
        stop: one past the last output position wanted; -1 for ``out_size``.

    Returns:
        ``(index, weight)``, each ``(4, stop - start)``: output ``o`` is the sum over ``k`` of
        ``weight[k, o] * input[index[k, o]]`` (indices clamped into the image; the weight of a
        tap outside it is 0).
    """
    stop = out_size if stop < 0 else stop
    table = _coefficients()
    scale = np.float32(in_size) / np.float32(out_size)
    o = np.arange(start, stop, dtype=np.float32)
    x = (o + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(x)
    offset = np.rint((x - base) * np.float32(_TABLE_SIZE)).astype(np.int64)  # lrintf
    base = base.astype(np.int64)
    index = np.stack([base - 1, base, base + 1, base + 2])
    weight = np.stack([table[offset, 1], table[offset, 0],
                       table[_TABLE_SIZE - offset, 0], table[_TABLE_SIZE - offset, 1]])
    weight = np.where((index >= 0) & (index < in_size), weight, np.float32(0))
    total = ((weight[0] + weight[1]) + weight[2]) + weight[3]
    weight = weight * (np.float32(1) / total)
    return (torch.from_numpy(np.clip(index, 0, in_size - 1)),
            torch.from_numpy(weight.astype(np.float32)))


@functools.lru_cache(maxsize=2048)
def _tap_matrix(in_size: int, out_size: int, start: int, stop: int) -> torch.Tensor:
    """The axis's taps as a sparse ``(stop - start, in_size)`` CSR matrix (up to 4 entries a row).

    A sparse product is the fastest way torch offers to apply 4 taps per row: a gather per tap
    moves the whole image four times, and a dense matrix does ~100x the multiplications. Taps of
    weight 0 (those outside the image) are left out, which changes no sum. The matrix is built in
    NumPy (a random training crop's size changes with every image, so the build is on the hot
    path, and the cache is large).
    """
    index, weight = bicubic_taps(in_size, out_size, start, stop)
    index, weight = index.numpy().T, weight.numpy().T
    keep = weight != 0
    crow = np.zeros(stop - start + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": used as documented
        warnings.simplefilter('ignore', UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(index[keep]),
                                       torch.from_numpy(weight[keep]), (stop - start, in_size))


def resize_crop(image: torch.Tensor, size: Tuple[int, int], crop: Tuple[int, int, int, int]) -> torch.Tensor:
    """A window of TensorFlow's bicubic resize of an HWC image, without the rest of it.

    Args:
        image: ``(H, W, C)`` uint8 or float tensor (any strides: a crop's view, a permuted CHW one).
        size: ``(out_h, out_w)`` of the full resize.
        crop: ``(top, left, height, width)`` of the window of the resized image to return.

    Returns:
        The window as a ``(C, height, width)`` float32 tensor (not contiguous), unclamped:
        values may leave [0, 255] as the reference's do.
    """
    in_h, in_w, channels = image.shape
    top, left, height, width = crop
    rows = _tap_matrix(in_h, size[0], top, top + height)
    cols = _tap_matrix(in_w, size[1], left, left + width)
    # one copy, whatever the strides: (strided) uint8 to contiguous float32
    x = image.to(torch.float32, memory_format=torch.contiguous_format).view(in_h, in_w * channels)
    x = torch.sparse.mm(rows, x)  # rows first, as TF: (height, W*C)
    x = x.view(height, in_w, channels).transpose(0, 1).reshape(in_w, height * channels)
    x = torch.sparse.mm(cols, x)  # (width, height*C)
    return x.view(width, height, channels).permute(2, 1, 0)
