"""How close a training step's convolutions run to the machine's matmul peak: timm vs ours.

    python benchmarks/conv_efficiency.py                       # NFNet-F0, b8/192, CPU fp32
    python benchmarks/conv_efficiency.py --model nfnet_f1 --batch 4 --px 224
    python benchmarks/conv_efficiency.py --by-shape            # and each conv shape's GFLOP/s

For each side in turn, the training step of ``bench.py`` (forward, backward, AGC, SGD) is timed
for a few steps, then profiled for as many. Forward hooks on the convs count their FLOPs forward
and backward (data and weight gradients: twice the forward); the profiler gives the time of the
``convolution`` and ``convolution_backward`` ops, kernels included. The rest of the (unprofiled)
step's wall time is everything that is not convolution; the ops that take it are listed
with their profiled self time. The last line prints the largest non-convolution time ours could
have for a given ratio to timm (``--target``), with the convolutions as fast as they are: the
room any CPU speed-up at exact numerics has to fit in. ``--by-shape`` lists every conv shape
of the profiled step (the op's own input, after any explicit padding) with its forward and
backward GFLOP/s (whole-op times: the kernel, its layout reorders and the page faults of fresh
output memory; ``record_shapes`` also adds to the other lines' profiled times). The two sides
run one after the other, so drift of a shared machine lands on one of them: for the ratio
itself, ``bench.py`` times them in alternating pairs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, Optional, Tuple

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


ConvKey = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # the conv op's input, weight, stride


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _conv_event(event) -> Optional[Tuple[str, ConvKey, int]]:
    """(``'forward'`` or ``'backward'``, shape key, FLOPs) of one conv op profiled with its shapes,
    FLOPs counted as in ``conv_flops`` (from the op's own input, after any explicit padding).
    None for other ops and for transposed convs (NFNets have none)."""
    shapes, args = event.input_shapes, list(getattr(event, 'concrete_inputs', None) or [])
    if event.name == FORWARD_OP and len(shapes) > 1 and len(args) > 6 and args[3] and args[6] is False:
        x, w, (stride, pad, dil) = shapes[0], shapes[1], (args[3], args[4], args[5])
        out = [_out_size(x[i + 2], w[i + 2], stride[i], pad[i], dil[i]) for i in range(2)]
        per_output = w[1] * w[2] * w[3]
        return 'forward', (tuple(x), tuple(w), stride[0]), 2 * x[0] * w[0] * out[0] * out[1] * per_output
    if event.name == BACKWARD_OP and len(shapes) > 2 and len(args) > 10 and args[4] and args[7] is False:
        grad_out, x, w, mask = shapes[0], shapes[1], shapes[2], args[10]
        n = 2 * grad_out[0] * grad_out[1] * grad_out[2] * grad_out[3] * w[1] * w[2] * w[3]
        return 'backward', (tuple(x), tuple(w), args[4][0]), n * (int(bool(mask[0])) + int(bool(mask[1])))
    return None


def _per_shape(events, steps: int) -> Dict[ConvKey, Dict[str, float]]:
    """Per conv shape and step: calls, forward and backward seconds and FLOPs."""
    shapes: Dict[ConvKey, Dict[str, float]] = {}
    for event in events:
        found = _conv_event(event)
        if found:
            kind, key, flops = found
            row = shapes.setdefault(key, dict.fromkeys(('calls', 'forward', 'backward', 'forward_flops',
                                                        'backward_flops'), 0.0))
            row[kind] += event.cpu_time_total / 1e6 / steps
            row[kind + '_flops'] += flops / steps
            row['calls'] += (kind == 'forward') / steps
    return shapes


def profile_step(step, steps: int, by_shape: bool = False) -> Dict[str, Any]:
    """Seconds per step: the whole step (median wall time, not profiled: the profiler's own cost
    would land outside the convolutions) and the time of the convolutions (profiled). With
    ``by_shape``, also each conv shape's forward and backward seconds (``shapes``); recording
    the shapes adds to the profiler's own cost outside the convolutions."""
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
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
    shapes = _per_shape(prof.events(), steps) if by_shape else {}
    if by_shape and not shapes:
        raise RuntimeError("the profiler recorded no conv op's arguments (concrete_inputs), which --by-shape "
                           'needs: not a conv model, or a torch whose profiler does not record them')
    return {'step': statistics.median(walls),
            'forward': total[FORWARD_OP],
            'backward': total[BACKWARD_OP],
            'other_profiled': sum(self_time.values()) - conv,
            'top_other': sorted(listed.items(), key=lambda kv: -kv[1]),
            'shapes': shapes}


def print_shapes(shapes: Dict[ConvKey, Dict[str, float]], peak: float) -> None:
    """One line per conv shape, the largest total time first: calls per step, then forward and
    backward time, GFLOP/s and share of the matmul peak."""
    def rate(flops: float, seconds: float) -> str:
        gflops = flops / seconds / 1e9 if seconds else 0.0
        return f'{gflops:4.0f} GFLOP/s ({gflops / peak:4.0%})'

    for key, r in sorted(shapes.items(), key=lambda kv: -(kv[1]['forward'] + kv[1]['backward'])):
        x, w, stride = key
        print(f"        in {str(list(x)):18s} w {str(list(w)):20s} s{stride} x{round(r['calls']):<3d}"
              f" fwd {r['forward'] * 1e3:6.1f} ms {rate(r['forward_flops'], r['forward'])}"
              f" | bwd {r['backward'] * 1e3:6.1f} ms {rate(r['backward_flops'], r['backward'])}")


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
    p.add_argument('--by-shape', action='store_true',
                   help="also list each conv shape's time and GFLOP/s, forward and backward")
    args = p.parse_args(argv)

    peaks = [matmul_peak_gflops('cpu', torch.float32)]
    print(f'{args.model} training step, b{args.batch}/{args.px}px, CPU fp32, {torch.get_num_threads()} threads')
    results = {}
    for impl in ('timm', 'ours'):
        step = train_step_fn(impl, args.model, 'cpu', None, args.batch, args.px)
        for _ in range(2):
            step()
        flops = conv_flops(step.model, step)
        t = profile_step(step, args.steps, by_shape=args.by_shape)
        peaks.append(matmul_peak_gflops('cpu', torch.float32))
        results[impl] = dict(t, rest=t['step'] - t['forward'] - t['backward'], flops=flops)
        del step
    peak = statistics.median(peaks)
    for impl, r in results.items():
        flops = r['flops']
        fwd, bwd = flops['forward'] / r['forward'] / 1e9, flops['backward'] / r['backward'] / 1e9
        print(f"{impl:5s} step {r['step'] * 1e3:7.0f} ms | conv forward {r['forward'] * 1e3:5.0f} ms, "
              f"{fwd:4.0f} GFLOP/s ({fwd / peak:.0%}) | conv backward {r['backward'] * 1e3:5.0f} ms, "
              f"{bwd:4.0f} GFLOP/s ({bwd / peak:.0%}) | not conv {r['rest'] * 1e3:5.0f} ms (step - conv)")
        print(f"      not conv, profiled self time {r['other_profiled'] * 1e3:.0f} ms; largest: "
              + ', '.join(f'{k} {v * 1e3:.0f}' for k, v in r['top_other'][:args.top]))
        if args.by_shape:
            print_shapes(r['shapes'], peak)
    print(f"matmul peak measured before, between and after: {' / '.join(f'{x:.0f}' for x in peaks)} GFLOP/s "
          f"(percentages above: of the median, {peak:.0f})")
    ours, theirs = results['ours'], results['timm']
    budget = theirs['step'] / args.target - ours['forward'] - ours['backward']
    print(f"ratio timm/ours {theirs['step'] / ours['step']:.2f}x; for {args.target:.2f}x with these convolutions, "
          f"ours may spend at most {budget * 1e3:.0f} ms outside them (now {ours['rest'] * 1e3:.0f} ms)")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
