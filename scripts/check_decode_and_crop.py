"""How far TensorFlow's cropped JPEG decode is from decoding the whole file and cutting the window.

DeepMind's training pipeline decodes only its crop window (``tf.image.decode_and_crop_jpeg``);
this package decodes the whole file and cuts the window from it. Run with TensorFlow installed
(``python scripts/check_decode_and_crop.py``; not needed by the tests): it prints, per kind of
JPEG (chroma subsampling 4:4:4 / 4:2:2 / 4:2:0, grayscale, the test photos), how many random
windows differ, in which columns and rows of the window, and by how much.
"""
import collections
import glob
import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'dm_preprocessing' / 'images'


def jpegs(rng: np.random.Generator):
    for name, sub in (('4:4:4', 0), ('4:2:2', 1), ('4:2:0', 2)):
        for _ in range(6):
            h, w = (int(v) for v in rng.integers(37, 300, 2))
            b = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, 'JPEG', quality=85, subsampling=sub)
            yield name, b.getvalue()
    for _ in range(3):
        h, w = (int(v) for v in rng.integers(37, 300, 2))
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), 'L').save(b, 'JPEG')
        yield 'grayscale', b.getvalue()
    for path in sorted(glob.glob(str(FIXTURES / '*.jp*g'))):
        yield 'test photos', Path(path).read_bytes()


def main() -> None:
    rng = np.random.default_rng(0)
    windows, differ, worst = collections.Counter(), collections.Counter(), collections.Counter()
    where = collections.defaultdict(set)
    for kind, data in jpegs(rng):
        full = tf.image.decode_jpeg(data, channels=3).numpy()
        height, width = full.shape[:2]
        for _ in range(15):
            h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
            t, l = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crop = tf.image.decode_and_crop_jpeg(data, [t, l, h, w], channels=3).numpy()
            d = np.abs(crop.astype(int) - full[t:t + h, l:l + w]).max(2)
            windows[kind] += 1
            if d.any():
                differ[kind] += 1
                worst[kind] = max(worst[kind], int(d.max()))
                rows, cols = np.nonzero(d)
                where[kind].update('first column' if c == 0 else 'last column' if c == w - 1 else 'inside'
                                   for c in cols.tolist())
                if set(rows.tolist()) != set(range(h)):
                    where[kind].add('some rows only')
    print(f'tensorflow {tf.__version__}')
    for kind in windows:
        print(f'{kind:12s} {differ[kind]:3d} / {windows[kind]:3d} windows differ; max |diff| {worst[kind]:3d}; '
              f'where: {", ".join(sorted(where[kind])) or "-"}')


if __name__ == '__main__':
    main()
