"""How close a training step's convolutions run to the machine's matmul peak: timm vs ours.

    python benchmarks/conv_efficiency.py                       # NFNet-F0, b8/192, CPU fp32
    python benchmarks/conv_efficiency.py --model nfnet_f1 --batch 4 --px 224

For each side in turn, the training step of ``bench.py`` (forward, backward, AGC, SGD) is timed
for a few steps, then profiled for as many. Forward hooks on the convs count their FLOPs forward
and backward (data and weight gradients: twice the forward); the profiler gives the time of the
kernels that run them (``mkldnn_convolution`` and ``convolution_backward`` on CPU). The rest of
the (unprofiled) step is everything that is not convolution; the ops that take it are listed
with their profiled self time. The last line prints the largest non-convolution time ours could
have for a given ratio to timm (``--target``), with the convolutions as fast as they are: the
room any CPU speed-up at exact numerics has to fit in. The two sides run one after the other,
so drift of a shared machine lands on one of them: for the ratio itself, ``bench.py`` times
them in alternating pairs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

from bench import matmul_peak_gflops, train_step_fn  # this script's folder is on sys.path

FORWARD_KERNELS = ('aten::mkldnn_convolution', 'aten::_convolution_mode', 'aten::thnn_conv2d',
                   'aten::_slow_conv2d_forward', 'aten::_nnpack_spatial_convolution')
BACKWARD_KERNELS = ('aten::convolution_backward',)


def conv_flops(model: torch.nn.Module, step) -> Dict[str, int]:
    """FLOPs (2 per multiply-accumulate) of one step's convolutions: ``forward``, and ``backward``
    (the weight gradient, plus the data gradient where the input needs one: not for the stem's
    first conv). Counted from each conv's output, not with ATen's flop counter, whose
    ``convolution_backward`` formula counts a strided conv's data gradient at full resolution."""
    counts = {'forward': 0, 'backward': 0}

    def hook(conv, inputs, out):
        n = 2 * out.numel() * conv.weight[0].numel()
        counts['forward'] += n
        counts['backward'] += n * (2 if inputs[0].requires_grad else 1)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        step()
    finally:
        for h in handles:
            h.remove()
    return counts


def profile_step(step, steps: int) -> Dict[str, float]:
    """Seconds per step: the whole step (median wall time, not profiled: the profiler's own cost
    would land outside the convolutions) and the self time of the conv kernels (profiled)."""
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_time = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    other = {k: v for k, v in self_time.items() if k not in FORWARD_KERNELS + BACKWARD_KERNELS}
    return {'step': statistics.median(walls),
            'forward': sum(self_time.get(k, 0.0) for k in FORWARD_KERNELS),
            'backward': sum(self_time.get(k, 0.0) for k in BACKWARD_KERNELS),
            'other_profiled': sum(other.values()),
            'top_other': sorted(other.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='nfnet_f0', help='ours; timm side: dm_<model>')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--px', type=int, default=192)
    p.add_argument('--steps', type=int, default=5, help='timed steps, then as many profiled, per side (after 2 warm-up steps)')
    p.add_argument('--top', type=int, default=8, help='how many of the largest non-conv ops to list')
    p.add_argument('--target', type=float, default=1.1, help='the timm/ours step ratio to bound')
    args = p.parse_args(argv)

    peaks = [matmul_peak_gflops('cpu', torch.float32)]
    print(f'{args.model} training step, b{args.batch}/{args.px}px, CPU fp32, {torch.get_num_threads()} threads')
    results = {}
    for impl in ('timm', 'ours'):
        step = train_step_fn(impl, args.model, 'cpu', None, args.batch, args.px)
        for _ in range(2):
            step()
        flops = conv_flops(step.model, step)
        t = profile_step(step, args.steps)
        peaks.append(matmul_peak_gflops('cpu', torch.float32))
        rest = t['step'] - t['forward'] - t['backward']
        results[impl] = dict(t, rest=rest)
        print(f"{impl:5s} step {t['step'] * 1e3:7.0f} ms | conv forward {t['forward'] * 1e3:5.0f} ms, "
              f"{flops['forward'] / t['forward'] / 1e9:4.0f} GFLOP/s | conv backward {t['backward'] * 1e3:5.0f} ms, "
              f"{flops['backward'] / t['backward'] / 1e9:4.0f} GFLOP/s | not conv {rest * 1e3:5.0f} ms")
        print(f"      not conv, profiled self time {t['other_profiled'] * 1e3:.0f} ms; largest: "
              + ', '.join(f'{k} {v * 1e3:.0f}' for k, v in t['top_other'][:args.top]))
        del step
    print(f"matmul peak measured before, between and after: {' / '.join(f'{x:.0f}' for x in peaks)} GFLOP/s")
    ours, theirs = results['ours'], results['timm']
    budget = theirs['step'] / args.target - ours['forward'] - ours['backward']
    print(f"ratio timm/ours {theirs['step'] / ours['step']:.2f}x; for {args.target:.2f}x with these convolutions, "
          f"ours may spend at most {budget * 1e3:.0f} ms outside them (now {ours['rest'] * 1e3:.0f} ms)")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
