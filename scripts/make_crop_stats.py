"""Record TensorFlow's crop-window statistics for ``tests/test_crop_sampler.py`` (run once).

Draws ``tf.image.sample_distorted_bounding_box`` with the NFNet reference's arguments (the
whole image as the box, ``min_object_covered=0.1``, aspect 3/4..4/3, area 0.08..1, 10 attempts)
many times per image size and stores empirical CDFs of the window's area fraction, aspect
(w / h), top / H and left / W on fixed grids, plus how often the whole image came back. The
test compares :func:`timm_nfnet_ext.data.crop.distorted_crop_window` with them by a
Kolmogorov-Smirnov bound; no TensorFlow is needed there.

Usage::

    /tmp/tfenv/bin/python scripts/make_crop_stats.py [--draws 20000] [--out PATH]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

SIZES = ((500, 375), (375, 500), (100, 100), (64, 300), (12, 9))  # (height, width)
GRIDS = {
    'area': np.linspace(0.0, 1.0, 51),
    'aspect': np.linspace(0.75, 4 / 3, 36),
    'top': np.linspace(0.0, 1.0, 51),
    'left': np.linspace(0.0, 1.0, 51),
}
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'dm_preprocessing',
                           'crop_stats.npz')


def windows(height: int, width: int, draws: int, seed: int) -> np.ndarray:
    """``(draws, 4)`` int array of (top, left, h, w) from TensorFlow."""
    import tensorflow as tf
    tf.random.set_seed(seed)
    shape = tf.constant([height, width, 3], tf.int32)
    box = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)

    @tf.function
    def draw_many(n):
        out = tf.TensorArray(tf.int32, size=n)
        for i in tf.range(n):
            begin, size, _ = tf.image.sample_distorted_bounding_box(
                shape, bounding_boxes=box, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
            out = out.write(i, tf.concat([begin[:2], size[:2]], 0))
        return out.stack()

    return draw_many(tf.constant(draws)).numpy()


def summarize(win: np.ndarray, height: int, width: int) -> dict:
    """Empirical CDFs on :data:`GRIDS` and the whole-image count of ``(n, 4)`` windows."""
    top, left, h, w = (win[:, i].astype(np.float64) for i in range(4))
    whole = (h == height) & (w == width)
    values = {'area': h * w / (height * width), 'aspect': w / h, 'top': top / height,
              'left': left / width}
    stats = {f'{k}_cdf': np.array([(v[~whole] <= g).mean() for g in GRIDS[k]]) for k, v in values.items()}
    stats['n'] = np.array(len(win))
    stats['n_whole'] = np.array(int(whole.sum()))
    stats['n_bottom_touch'] = np.array(int(((top + h == height) & (h < height)).sum()))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--draws', type=int, default=20000)
    parser.add_argument('--seed', type=int, default=20)
    parser.add_argument('--out', default=DEFAULT_OUT)
    args = parser.parse_args()
    import tensorflow as tf
    arrays = {f'grid_{k}': v for k, v in GRIDS.items()}
    arrays['sizes'] = np.array(SIZES)
    arrays['tf_version'] = np.array(tf.__version__)
    for height, width in SIZES:
        stats = summarize(windows(height, width, args.draws, args.seed), height, width)
        arrays.update({f'{height}x{width}/{k}': v for k, v in stats.items()})
        print(f'{height}x{width}: whole image {int(stats["n_whole"])}/{args.draws}, '
              f'median area {np.interp(0.5, stats["area_cdf"], GRIDS["area"]):.3f}')
    np.savez_compressed(args.out, **arrays)
    print('wrote', os.path.normpath(args.out))


if __name__ == '__main__':
    main()
