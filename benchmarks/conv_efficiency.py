"""How close a training step's convolutions run to the machine's matmul peak: timm vs ours.

    python benchmarks/conv_efficiency.py                       # NFNet-F0, b8/192, CPU fp32
    python benchmarks/conv_efficiency.py --model nfnet_f1 --batch 4 --px 224

For each side in turn, the training step of ``bench.py`` (forward, backward, AGC, SGD) is timed
for a few steps, then profiled for as many. Forward hooks on the convs count their FLOPs forward
and backward (data and weight gradients: twice the forward); the profiler gives the time of the
``convolution`` and ``convolution_backward`` ops, kernels included. The rest of the (unprofiled)
step's wall time is everything that is not convolution; the ops that take it are listed
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

# Inclusive time of these two ops: whichever kernel runs underneath (oneDNN, or a fallback).
FORWARD_OP = 'aten::convolution'
BACKWARD_OP = 'aten::convolution_backward'
CONV_KERNELS = ('aten::conv2d', 'aten::_convolution', 'aten::mkldnn_convolution', 'aten::thnn_conv2d',
                'aten::_slow_conv2d_forward', 'aten::_slow_conv2d_backward')


def conv_flops(model: torch.nn.Module, step) -> Dict[str, int]:
    """FLOPs (2 per multiply-accumulate) of one step's convolutions: ``forward``, and ``backward``
    (the weight gradient, plus the data gradient where the input needs one: not for the stem's
    first conv). Counted from each conv's output, not with ATen's flop counter, which puts F0's
    ``convolution_backward`` at 3.3x its forward FLOPs instead of 2x (its weight-gradient
    formula over-counts grouped convs)."""
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
    would land outside the convolutions) and the time of the convolutions (profiled)."""
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = {e.key: e for e in prof.key_averages()}
    if FORWARD_OP not in events or BACKWARD_OP not in events:
        raise RuntimeError(f'the profile has no {FORWARD_OP} / {BACKWARD_OP}: not a conv model?')
    total = {k: e.cpu_time_total / 1e6 / steps for k, e in events.items()}
    self_time = {k: e.self_cpu_time_total / 1e6 / steps for k, e in events.items()}
    conv = total[FORWARD_OP] + total[BACKWARD_OP]
    # self times partition the profile, so what is not under a conv op is the rest of the sum;
    # the ops listed may include a little work done inside the convs (their copies, allocations)
    listed = {k: v for k, v in self_time.items() if k not in (FORWARD_OP, BACKWARD_OP) and k not in CONV_KERNELS}
    return {'step': statistics.median(walls),
            'forward': total[FORWARD_OP],
            'backward': total[BACKWARD_OP],
            'other_profiled': sum(self_time.values()) - conv,
            'top_other': sorted(listed.items(), key=lambda kv: -kv[1])}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='nfnet_f0', choices=[f'nfnet_f{i}' for i in range(7)],
                   help='ours; timm side: dm_<model> (timm has F0-F6)')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--px', type=int, default=192)
    p.add_argument('--steps', type=_positive_int, default=5,
                   help='timed steps, then as many profiled, per side (after 2 warm-up steps)')
    p.add_argument('--top', type=int, default=8, help='how many of the largest non-conv ops to list')
    p.add_argument('--target', type=float, default=1.1, help='the timm/ours step ratio to bound')
    args = p.parse_args(argv)

    peaks = [matmul_peak_gflops('cpu', torch.float32)]
    rows = []
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
        rows.append((impl, t, flops, rest))
        del step
    peak = statistics.median(peaks)
    for impl, t, flops, rest in rows:
        fwd, bwd = flops['forward'] / t['forward'] / 1e9, flops['backward'] / t['backward'] / 1e9
        print(f"{impl:5s} step {t['step'] * 1e3:7.0f} ms | conv forward {t['forward'] * 1e3:5.0f} ms, "
              f"{fwd:4.0f} GFLOP/s ({fwd / peak:.0%}) | conv backward {t['backward'] * 1e3:5.0f} ms, "
              f"{bwd:4.0f} GFLOP/s ({bwd / peak:.0%}) | not conv {rest * 1e3:5.0f} ms (step - conv)")
        print(f"      not conv, profiled self time {t['other_profiled'] * 1e3:.0f} ms; largest: "
              + ', '.join(f'{k} {v * 1e3:.0f}' for k, v in t['top_other'][:args.top]))
    print(f"matmul peak measured before, between and after: {' / '.join(f'{x:.0f}' for x in peaks)} GFLOP/s "
          f"(percentages above: of the median, {peak:.0f})")
    ours, theirs = results['ours'], results['timm']
    budget = theirs['step'] / args.target - ours['forward'] - ours['backward']
    print(f"ratio timm/ours {theirs['step'] / ours['step']:.2f}x; for {args.target:.2f}x with these convolutions, "
          f"ours may spend at most {budget * 1e3:.0f} ms outside them (now {ours['rest'] * 1e3:.0f} ms)")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
