#!/usr/bin/env python3
"""TensorFlow's ``tf.image.resize(..., BICUBIC)`` (antialias off, as the reference evaluates)
on small random uint8 images, over a grid of input and output sizes: up- and downscaling by
ratios whose half-pixel coordinates land on every rounding case of the 1/1024 coefficient
table. Writes ``tests/fixtures/dm_preprocessing/resize_grid.npz``: for each case ``i``,
``in_i`` (uint8 HWC) and ``out_i`` (float32 HWC). Needs tensorflow (CPU); run once.
"""
import sys

import numpy as np
import tensorflow as tf

CASES = [  # (in_h, in_w, out_h, out_w)
    (1, 1, 3, 2), (2, 3, 7, 5), (4, 4, 4, 4), (5, 7, 33, 33), (9, 13, 4, 6), (17, 23, 40, 31),
    (31, 29, 31, 30), (37, 41, 129, 97), (48, 64, 150, 141), (64, 48, 170, 90),
    (100, 80, 129, 129), (123, 77, 56, 91), (160, 240, 96, 96), (199, 257, 120, 100),
    (75, 100, 145, 145), (133, 217, 129, 129), (133, 117, 250, 190), (61, 500, 129, 64),
]


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else 'tests/fixtures/dm_preprocessing/resize_grid.npz'
    rng = np.random.default_rng(1234)
    arrays = {}
    for i, (ih, iw, oh, ow) in enumerate(CASES):
        img = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        arrays[f'in_{i}'] = img
        arrays[f'out_{i}'] = tf.image.resize(img, (oh, ow), tf.image.ResizeMethod.BICUBIC).numpy()
    np.savez_compressed(out, **arrays)
    print(f'{len(CASES)} cases -> {out}')


if __name__ == '__main__':
    main()
