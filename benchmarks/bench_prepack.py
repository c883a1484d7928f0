"""``prepack_for_cpu`` against the fused model it starts from, back to back in one process.

    python benchmarks/bench_prepack.py                     # F0, batch 1, 192 and 256 px
    python benchmarks/bench_prepack.py --batch 8 --sizes 256

Prints, per size, the median time of each and the median of the paired ratios (fused / prepacked:
> 1 means prepacking is faster), then the same with the input shape changing on every call
(batch ``--batch`` then ``--batch + 1``, timed together), where a prepacked model that has not
reordered for either shape before never does, and should time as the fused one.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import timm
from timm_nfnet_ext import prepack_for_cpu

from bench import paired_ratio, time_pair  # this script's folder is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='nfnet_f0')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--sizes', type=int, nargs='+', default=[192, 256])
    p.add_argument('--repeats', type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    fused = timm.utils.reparameterize_model(model)
    print(f'{args.model}, CPU float32, {torch.get_num_threads()} threads, torch {torch.__version__}')
    with torch.inference_mode():
        for size in args.sizes:
            xs = [torch.randn(b, 3, size, size) for b in (args.batch, args.batch + 1)]
            for label, inputs in (('fixed shape', xs[:1]), ('shape changing every call', xs)):
                # one timed unit runs every input once, so each conv sees the shapes in turn; a fresh
                # prepacked copy each time, holding no reordered weight from an earlier case
                packed = prepack_for_cpu(model)
                t_fused, t_packed = time_pair(lambda: [fused(x) for x in inputs], lambda: [packed(x) for x in inputs],
                                              'cpu', 2, args.repeats)
                print(f'b{args.batch} {size}px {label:<26} fused {1e3 * statistics.median(t_fused):7.1f} ms  '
                      f'prepacked {1e3 * statistics.median(t_packed):7.1f} ms  '
                      f'x{paired_ratio(t_fused, t_packed):.2f}', flush=True)


if __name__ == '__main__':
    main()
