"""Training images/s of ONE DataLoader worker: the reference pipeline vs timm's.

Reference: :class:`ReferenceTrainDataset` (TF-exact decode, distorted crop, flip, TF bicubic)
with :class:`ReferenceTrainBatch` (2B -> B MixUp + CutMix, RandAugment 4 x M, normalise) as the
collate function. timm: ``create_transform(is_training=True, auto_augment='rand-n4-mM-mmax10',
interpolation='bicubic')`` per image and ``timm.data.Mixup(mixup_alpha=0.2, cutmix_alpha=1.0,
label_smoothing=0.1)`` on each batch in the worker. Same JPEG files, size and batch, one run.
The reference decodes 2B images per batch of B (its mixing pairs 2B examples), timm decodes B.

Usage::

    python benchmarks/bench_train_loader.py [--variant nfnet_f0] [--batch 32] [--batches 8]
        [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from typing import Any, Callable, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timm_nfnet_ext.data import ReferenceTrainDataset, create_train_pipeline
from timm_nfnet_ext.variants import variant_of


def make_jpegs(folder: str, count: int, seed: int = 0) -> List[str]:
    """``count`` natural-looking JPEGs (smooth shapes, texture, noise) of about 500 x 375."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = (375, 500) if i % 3 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 128 + 90 * np.sin(xx * fx + ph) * np.cos(yy * fy) + rng.normal(0, 12, (h, w))
        img = np.clip(img, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f'img_{i:03d}.jpg')
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


class _PilDataset(Dataset):
    """(path, label) samples decoded by PIL and transformed, as timm's ImageDataset does."""

    def __init__(self, samples: List[Tuple[str, int]], transform: Callable[[Any], torch.Tensor]):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image
        path, label = self.samples[index]
        with Image.open(path) as im:
            return self.transform(im.convert('RGB')), label


class _TimmCollate:
    """Default collate, then timm's Mixup / CutMix on the batch (in the worker)."""

    def __init__(self, num_classes: int):
        from timm.data import Mixup
        self.mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)

    def __call__(self, samples: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([s[0] for s in samples])
        labels = torch.as_tensor([s[1] for s in samples])
        return self.mixup(images, labels)


def images_per_second(loader: DataLoader, batch: int, batches: int) -> float:
    """Output images/s over ``batches`` batches after a first (warm-up) batch."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='nfnet_f0')
    parser.add_argument('--batch', type=int, default=32, help='output batch B (reference reads 2B)')
    parser.add_argument('--batches', type=int, default=8, help='timed batches after one warm-up')
    parser.add_argument('--data-dir', default=None, help='JPEGs to read (default: 64 generated ones)')
    parser.add_argument('--repeats', type=int, default=1, help='alternate the two pipelines this many times')
    args = parser.parse_args()
    import timm.data

    variant = variant_of(args.variant)
    size, magnitude = variant.train_size, variant.randaug_magnitude
    tmp = None
    if args.data_dir:
        paths = sorted(glob.glob(os.path.join(args.data_dir, '**', '*.[jJ][pP]*[gG]'), recursive=True))
    else:
        tmp = tempfile.TemporaryDirectory()
        paths = make_jpegs(tmp.name, 64)
    need = 2 * args.batch * (args.batches + 1)
    samples = [(paths[i % len(paths)], i % 1000) for i in range(need)]

    transform, collate = create_train_pipeline(variant, num_classes=1000)
    ref = DataLoader(ReferenceTrainDataset(samples, transform, seed=0), batch_size=2 * args.batch,
                     collate_fn=collate, num_workers=1, drop_last=True)
    timm_tf = timm.data.create_transform(input_size=size, is_training=True, interpolation='bicubic',
                                         auto_augment=f'rand-n4-m{magnitude}-mmax10')
    timm_loader = DataLoader(_PilDataset(samples, timm_tf), batch_size=args.batch,
                             collate_fn=_TimmCollate(1000), num_workers=1, drop_last=True)

    print(f'# {" ".join([os.path.basename(sys.executable)] + sys.argv)}')
    print(f'# {args.variant}: S={size}, RandAugment n4 m{magnitude}, B={args.batch}, {len(paths)} JPEGs '
          f'({"--data-dir" if args.data_dir else "generated ~500x375"}), 1 worker, torch {torch.__version__}, '
          f'timm {timm.__version__}, {os.cpu_count()} CPUs')
    for r in range(args.repeats):
        ref_ips = images_per_second(ref, args.batch, args.batches)
        timm_ips = images_per_second(timm_loader, args.batch, args.batches)
        print(f'run {r}: reference {ref_ips:7.1f} img/s ({2 * ref_ips:.1f} decoded/s)   timm {timm_ips:7.1f} img/s   '
              f'reference / timm = {ref_ips / timm_ips:.2f}')
    if tmp is not None:
        tmp.cleanup()


if __name__ == '__main__':
    main()
