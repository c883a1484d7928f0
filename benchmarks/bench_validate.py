"""Validation throughput: ``timm-nfnet-validate`` (reference and timm preprocessing) against timm's
own ``validate.py`` on the same JPEG folder, the same model, batch size and workers.

The folder holds ImageNet-sized JPEGs (about 500x375, quality 90) in two classes, cut from
scikit-learn's sample photos. The model is a tiny NFNet (``--tiny``, the default) so that the
input pipeline, not the network, sets the pace on a CPU; ``--no-tiny`` validates a full
``nfnet_f0``. timm's ``validate.py`` is a script of timm's repository (not in its wheel): pass its
path with ``--timm-validate`` to include it (it runs with this package imported, on CPU, without
timm's CUDA prefetcher). Each side runs in its own process, twice, alternating; images/s is
the images over the wall time of the evaluation loop as each command reports it.

    python benchmarks/bench_validate.py --timm-validate /path/to/pytorch-image-models/validate.py
    python benchmarks/bench_validate.py --timm-validate ... --img-size 96   # the pipeline, not the model
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_preprocess import make_images  # noqa: E402

TINY = ['--model-kwargs', 'widths=(32,64,96,96)', 'depths=(1,1,1,1)', 'group_width=16']


def save_weights(path: pathlib.Path, tiny: bool) -> str:
    """Random weights for both sides (timm's validate.py otherwise downloads pretrained ones)."""
    import timm
    import timm_nfnet_ext  # noqa: F401
    from safetensors.torch import save_file
    kwargs = dict(widths=(32, 64, 96, 96), depths=(1, 1, 1, 1), group_width=16) if tiny else {}
    model = timm.create_model('nfnet_f0', num_classes=2, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def ours(folder: str, preprocess: str, args: argparse.Namespace, out: str) -> float:
    cmd = [sys.executable, '-m', 'timm_nfnet_ext.validate', folder, '--model', 'nfnet_f0',
           '--checkpoint', args.weights,
           *(TINY if args.tiny else []), '--num-classes', '2', '-b', str(args.batch_size),
           '-j', str(args.workers), '--device', 'cpu', '--preprocess', preprocess, '--no-progress',
           '--img-size', str(args.img_size),
           '--results-file', out, '--results-format', 'json']
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(pathlib.Path(out).read_text())['images_per_sec'])


def timm_script(folder: str, args: argparse.Namespace) -> float:
    code = ('import runpy, sys, timm_nfnet_ext; sys.argv = sys.argv[1:]; '
            'runpy.run_path(sys.argv[0], run_name="__main__")')
    cmd = [sys.executable, '-c', code, args.timm_validate, folder, '--model', 'nfnet_f0',
           '--checkpoint', args.weights, *(TINY if args.tiny else []), '--num-classes', '2', '-b', str(args.batch_size),
           '-j', str(args.workers), '--device', 'cpu', '--no-prefetcher', '--log-freq', '1',
           '--img-size', str(args.img_size), '--crop-pct', str(args.img_size / (args.img_size + 32)),
           '--split', 'validation']
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rates = re.findall(r'\(\s*[\d.]+s,\s*([\d.]+)/s\)', proc.stdout + proc.stderr)
    if not rates:
        raise RuntimeError(f'no rate in timm validate.py output:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}')
    return float(rates[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--images', type=int, default=200)
    ap.add_argument('-b', '--batch-size', type=int, default=50)
    ap.add_argument('-j', '--workers', type=int, default=2)
    ap.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument('--timm-validate', metavar='PATH', help="timm's validate.py")
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--img-size', type=int, default=256, help='crop size (256: F0\'s test size; smaller '
                    'sizes make the tiny model cheaper, so the input pipeline shows)')
    args = ap.parse_args()
    results: Dict[str, List[float]] = {'reference': [], 'timm-preprocess': []}
    if args.timm_validate:
        results['timm validate.py'] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / 'data'
        for c in ('a', 'b'):
            (root / 'validation' / c).mkdir(parents=True)
            paths = make_images(root / 'validation' / c, args.images // 2)
            assert paths
        out = os.path.join(tmp, 'r.json')
        args.weights = save_weights(pathlib.Path(tmp) / 'w.safetensors', args.tiny)
        for _ in range(args.repeats):
            results['reference'].append(ours(str(root), 'reference', args, out))
            results['timm-preprocess'].append(ours(str(root), 'timm', args, out))
            if args.timm_validate:
                results['timm validate.py'].append(timm_script(str(root), args))
    model = 'tiny NFNet' if args.tiny else 'nfnet_f0'
    print(f'{args.images} JPEGs (~500x375), {model} at {args.img_size} px, CPU, -b {args.batch_size} '
          f'-j {args.workers}; images/s per run')
    for name, rates in results.items():
        print(f'  {name:28s} ' + '  '.join(f'{r:7.1f}' for r in rates))
    if args.timm_validate:
        ratio = max(results['reference']) / max(results['timm validate.py'])
        print(f'  timm-nfnet-validate (reference) / timm validate.py: {ratio:.2f}x (best runs)')


if __name__ == '__main__':
    main()
