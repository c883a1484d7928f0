"""Eval preprocessing speed: the reference transform against timm's default eval transform.

Both start from the same JPEG files on disk and end at a normalised float32 (3, S, S) tensor:
timm's side is what ``timm.data.ImageDataset`` + ``create_transform(**resolve_model_data_config(
model, use_test_size=True))`` does (PIL open + convert('RGB'), PIL antialiased bicubic, centre
crop, ToTensor, Normalize); ours is ``create_eval_transform(model)(path)``. One thread, the two
sides alternating image by image, median per image over the repeats. The images are
ImageNet-sized (about 500x375, quality 90, 4:2:0) crops and rescales of the two photos that
scikit-learn ships, written to a temporary folder.

    python benchmarks/bench_preprocess.py                 # nfnet_f0 (256 px)
    python benchmarks/bench_preprocess.py --model nfnet_f1 --repeats 9 --json out.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

import timm
import timm_nfnet_ext  # noqa: F401  (registers the models)
from timm_nfnet_ext.data import create_eval_transform


def make_images(folder: pathlib.Path, count: int) -> List[pathlib.Path]:
    """ImageNet-like JPEGs (most 500x375 or 375x500) cut from scikit-learn's sample photos."""
    import sklearn.datasets
    from PIL import Image
    src = pathlib.Path(sklearn.datasets.__file__).parent / 'images'
    photos = [Image.open(src / n).convert('RGB') for n in ('china.jpg', 'flower.jpg')]
    sizes = [(500, 375), (375, 500), (500, 333), (640, 427), (500, 400)]
    paths = []
    for i in range(count):
        photo = photos[i % 2]
        w, h = sizes[i % len(sizes)]
        box = ((i * 37) % 60, (i * 23) % 40, photo.width - (i * 11) % 50, photo.height - (i * 7) % 30)
        img = photo.crop(box).resize((w, h), Image.LANCZOS)
        path = folder / f'img{i:03d}.jpg'
        img.save(path, quality=90)
        paths.append(path)
    return paths


def time_per_image(fn: Callable[[pathlib.Path], torch.Tensor], paths: List[pathlib.Path]) -> List[float]:
    out = []
    for p in paths:
        t0 = time.perf_counter()
        fn(p)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='nfnet_f0')
    ap.add_argument('--images', type=int, default=40)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--json', default=None, help='also write the results here')
    args = ap.parse_args()
    if args.images < 1 or args.repeats < 1:
        ap.error('--images and --repeats must be >= 1')
    torch.set_num_threads(1)

    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config
    cfg = timm.models.get_pretrained_cfg(args.model).to_dict()
    data_cfg = resolve_model_data_config(None, args={}, pretrained_cfg=cfg, use_test_size=True)
    timm_tf = create_transform(**data_cfg)
    ours = create_eval_transform(args.model)

    def timm_side(p: pathlib.Path) -> torch.Tensor:
        with open(p, 'rb') as f:
            return timm_tf(Image.open(f).convert('RGB'))

    sides: Dict[str, Callable[[pathlib.Path], torch.Tensor]] = {'timm': timm_side, 'reference': ours}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(pathlib.Path(tmp), args.images)
        for fn in sides.values():  # warm-up (weight caches, allocator)
            time_per_image(fn, paths[:3])
        per_image: Dict[str, List[List[float]]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                per_image[name].append(time_per_image(fn, paths))
    ms = {name: 1e3 * statistics.mean(statistics.median(r[i] for r in runs) for i in range(len(paths)))
          for name, runs in per_image.items()}
    size = data_cfg['input_size'][-1]
    print(f'{args.model} eval preprocessing at {size} px, {len(paths)} JPEGs (~500x375), 1 thread, '
          f'median of {args.repeats} per image')
    print(f"  timm create_transform : {ms['timm']:.2f} ms/image  ({1e3 / ms['timm']:.0f} images/s)")
    print(f"  reference transform   : {ms['reference']:.2f} ms/image  ({1e3 / ms['reference']:.0f} images/s)")
    print(f"  speed-up timm/reference: {ms['timm'] / ms['reference']:.2f}x  (goal >= 1.2x)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            'model': args.model, 'size': size, 'images': len(paths), 'repeats': args.repeats,
            'ms_per_image': ms, 'ratio': ms['timm'] / ms['reference'],
            'torch': torch.__version__, 'timm': timm.__version__, 'python': sys.version.split()[0],
            'machine': platform.machine()}, indent=2))


if __name__ == '__main__':
    main()
