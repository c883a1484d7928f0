"""Side-by-side speed of this package's NFNets against timm's ``dm_nfnet_*``, same weights, one run.

    python benchmarks/bench.py --model nfnet_f0                    # CPU, fp32
    python benchmarks/bench.py --model nfnet_f0 --device cuda --amp bf16 --train-batch 64

Prints how far the two models' outputs are apart, then a table of timings and ratios (timm time /
ours time, the median over back-to-back pairs: > 1 means this package is faster), and writes the
same as JSON:
- inference, eager, per batch size and resolution: timm vs ours, ours after
  ``timm.utils.reparameterize_model`` (fused), both in channels_last, ours fused and prepacked
  (``timm_nfnet_ext.prepack_for_cpu``, CPU only), and both compiled;
- one training step (forward, backward, AGC, SGD step): timm's model + timm's
  ``adaptive_clip_grad`` + ``torch.optim.SGD`` vs ours + ``sgdagc`` (and with
  ``--train-channels-last``, the same with both sides in channels_last);
- the same training step with each side alone in its own processes (two per side, ABBA order),
  and its peak memory there (CUDA: max allocated; CPU: peak RSS of the child process);
- achieved GFLOP/s of each inference row against a fp32 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

import timm
import timm_nfnet_ext  # noqa: F401  (registers the models and AGC optimizers)
from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn
from timm_nfnet_ext.accel.prepack import onednn_available, prepack_for_cpu


# --- models -------------------------------------------------------------------------------------
def build_pair(model_name: str, device: str) -> tuple:
    """timm's dm_ port with random weights, and ours holding exactly the same weights."""
    theirs = _random_model('dm_' + model_name).eval()
    ours = timm.create_model(model_name).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours))
    return theirs.to(device), ours.to(device)


def _random_model(name: str) -> nn.Module:
    """Seeded random weights, with non-zero skip gains so every residual branch counts."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(0.3)
    return model


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-accumulate) of the convs and matmuls for one forward of ``x``."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops() * x.shape[0]


# --- timing -------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int, repeats: int, min_time: float = 0.0) -> float:
    """Median seconds per call."""
    return statistics.median(time_pair(fn, None, device, warmup, repeats, min_time)[0])


def time_pair(fa: Callable[[], object], fb: Optional[Callable[[], object]], device: str, warmup: int,
              repeats: int, min_time: float = 0.0) -> tuple:
    """Seconds of each call of ``fa`` and ``fb``, timed in alternation (A B A B ...) so that
    drift of a shared machine's speed hits both sides alike."""
    fns = [fa] if fb is None else [fa, fb]
    for _ in range(warmup):
        for f in fns:
            f()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < min_time:
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        if len(times[0]) >= 10 * repeats:
            break
    return tuple(times)


def paired_ratio(t_timm: List[float], t_ours: List[float]) -> float:
    """Median over alternating pairs of timm's time / ours: each pair ran back to back, so a
    slow phase of a shared machine cancels in its ratio instead of landing on one side."""
    return statistics.median(a / b for a, b in zip(t_timm, t_ours))


def matmul_peak_gflops(device: str, dtype: torch.dtype) -> float:
    """The machine's matrix-multiply peak: the best rate of ``torch.mm`` over a few square sizes
    and of the same GEMM run as a 1x1 convolution (oneDNN on CPUs; MKL's sgemm can be the slower
    of the two, e.g. on AMD processors)."""
    best = 0.0
    for n in ((1024, 2048, 4096) if device == 'cpu' else (4096, 8192)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        x = a.reshape(1, n, n // 64, 64).contiguous(memory_format=torch.channels_last)  # (n/64*64) x n pixels
        w = b.reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        for fn in (lambda: torch.mm(a, b), lambda: torch.nn.functional.conv2d(x, w)):
            t = min(time_fn(fn, device, warmup=2, repeats=3) for _ in range(2))
            best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def autocast(device: str, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[amp])


def compile_model(model: nn.Module) -> nn.Module:
    """Both sides get the same settings: inductor, static shapes, frozen weights."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    return torch.compile(model, dynamic=False)


# --- inference --------------------------------------------------------------------------------------
def bench_inference(args, theirs, ours, peak: float) -> List[Dict]:
    rows = []
    fused = timm.utils.reparameterize_model(ours)
    variants = {
        'eager': (theirs, ours),
        'eager, ours fused': (theirs, fused),
        'channels_last, ours fused': (copy.deepcopy(theirs).to(memory_format=torch.channels_last),
                                      copy.deepcopy(fused).to(memory_format=torch.channels_last)),
    }
    if args.device == 'cpu' and onednn_available():  # conv weights reordered once, not per call
        variants['eager, ours fused + prepacked'] = (theirs, prepack_for_cpu(ours))
    for size in args.sizes:
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, size, size, device=args.device)
            flops = count_flops(fused, x)
            with torch.no_grad(), autocast(args.device, args.amp):
                ref = ours(x).float()
                for label, (a, b) in variants.items():
                    xi = x.to(memory_format=torch.channels_last) if 'channels_last' in label else x
                    if label != 'eager':  # every fast path must match our own eager outputs
                        b(xi)  # (a prepacked conv runs on its reordered weight from a shape's second call)
                        err = (b(xi).float() - ref).abs().max().item()
                        assert err <= args.tol, f'{label}: differs from eager by {err:.2e}'
                    rows.append(_row(f'infer {label}', batch, size, a, b, xi, args, flops, peak))
                if args.compile:
                    ca, cb = compile_model(theirs), compile_model(fused)
                    err = (cb(x).float() - ref).abs().max().item()
                    assert err <= args.tol, f'compiled: differs from eager by {err:.2e}'
                    rows.append(_row('infer compiled, ours fused', batch, size, ca, cb, x, args, flops, peak))
                    torch._dynamo.reset()
    return rows


def _row(label, batch, size, theirs, ours, x, args, flops, peak) -> Dict:
    ts_timm, ts_ours = time_pair(lambda: theirs(x), lambda: ours(x), args.device, args.warmup, args.repeats,
                                 args.min_time)
    t_timm, t_ours = statistics.median(ts_timm), statistics.median(ts_ours)
    gflops = flops / t_ours / 1e9
    row = dict(case=label, batch=batch, px=size, timm_ms=1e3 * t_timm, ours_ms=1e3 * t_ours,
               ratio=paired_ratio(ts_timm, ts_ours), ours_img_s=batch / t_ours, ours_gflops=gflops,
               ours_of_peak=gflops / peak)
    _print_row(row)
    return row


# --- training ----------------------------------------------------------------------------------------
def train_step_fn(impl: str, model_name: str, device: str, amp: Optional[str], batch: int, size: int,
                  channels_last: bool = False):
    """One training step of either implementation, ready to call repeatedly."""
    from timm.utils.agc import adaptive_clip_grad
    # only this side's model lives in the process, so its peak memory is its own
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _random_model(('dm_' if impl == 'timm' else '') + model_name).to(device, memory_format=fmt).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    # both through timm's factory (no weight decay on biases and gains; Nesterov SGD)
    if impl == 'timm':
        opt = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, momentum=0.9, weight_decay=2e-5, foreach=True)
    else:
        opt = timm.optim.create_optimizer_v2(model, 'sgdagc', lr=0.1, momentum=0.9, weight_decay=2e-5,
                                             clipping=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        if impl == 'timm':
            adaptive_clip_grad(model.parameters(), clip_factor=0.01)
        opt.step()
    step.model = model  # for conv_efficiency.py's FLOP count
    return step


def _child_alone(args) -> None:
    """Runs in a subprocess holding one model, as one trains: that side's own peak memory (over
    its first 3 steps) and its step time with no other model in the process (median)."""
    step = train_step_fn(args.child, args.model, args.device, args.amp, args.train_batch, args.train_px)
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    _sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == 'cuda' else _peak_rss_bytes()
    seconds = time_fn(step, args.device, warmup=0, repeats=args.train_repeats)
    print(json.dumps(dict(peak_bytes=peak, step_seconds=seconds)))


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. ``VmHWM`` restarts at exec, unlike ``ru_maxrss``,
    which a child started by fork+exec inherits from its parent's size at the fork."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_train_channels_last(args) -> Dict:
    """The same step with both models and the input in channels_last (speed only)."""
    steps = [train_step_fn(impl, args.model, args.device, args.amp, args.train_batch, args.train_px, True)
             for impl in ('timm', 'ours')]
    ts_timm, ts_ours = time_pair(*steps, args.device, args.warmup, args.train_repeats)
    row = dict(case='train step, channels_last (both)', batch=args.train_batch, px=args.train_px,
               timm_ms=1e3 * statistics.median(ts_timm), ours_ms=1e3 * statistics.median(ts_ours),
               ratio=paired_ratio(ts_timm, ts_ours))
    _print_row(row)
    return row


def bench_train(args) -> Dict:
    """Speed: both steps in this process, timed in alternation (the ratio), and each side alone
    in child processes, two each in ABBA order (the mean of their medians; as one trains).
    Memory: the child processes."""
    timm_step = train_step_fn('timm', args.model, args.device, args.amp, args.train_batch, args.train_px)
    ours_step = train_step_fn('ours', args.model, args.device, args.amp, args.train_batch, args.train_px)
    ts_timm, ts_ours = time_pair(timm_step, ours_step, args.device, args.warmup, args.train_repeats)
    t_timm, t_ours = statistics.median(ts_timm), statistics.median(ts_ours)
    del timm_step, ours_step
    peak, alone = {'timm': 0.0, 'ours': 0.0}, {'timm': [], 'ours': []}
    for impl in ('timm', 'ours', 'ours', 'timm'):  # ABBA: a steady drift lands on both sides alike
        cmd = [sys.executable, __file__, '--child', impl] + [a for a in sys.argv[1:] if a != '--child']
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f'training step ({impl}) failed:\n{res.stderr[-3000:]}')
        child = json.loads(res.stdout.strip().splitlines()[-1])
        peak[impl] = max(peak[impl], child['peak_bytes'] / 2 ** 20)
        alone[impl].append(1e3 * child['step_seconds'])
    alone = {impl: statistics.mean(ms) for impl, ms in alone.items()}
    row = dict(case='train step + AGC + SGD', batch=args.train_batch, px=args.train_px,
               timm_ms=1e3 * t_timm, ours_ms=1e3 * t_ours, ratio=paired_ratio(ts_timm, ts_ours),
               timm_peak_mb=peak['timm'], ours_peak_mb=peak['ours'],
               timm_ms_alone=alone['timm'], ours_ms_alone=alone['ours'], ratio_alone=alone['timm'] / alone['ours'])
    _print_row(row)
    print(f'    each side alone in its own process (2 each): timm {alone["timm"]:.1f} ms, ours {alone["ours"]:.1f} ms, '
          f'x{row["ratio_alone"]:.2f}')
    print(f'    peak memory over 3 steps: timm {peak["timm"]:.0f} MB, ours {peak["ours"]:.0f} MB '
          f'({"CUDA max allocated" if args.device == "cuda" else "peak RSS of a process holding one model"})')
    return row


def _print_row(row: Dict) -> None:
    extra = ''
    if 'ours_gflops' in row:
        extra = f'  {row["ours_img_s"]:8.2f} img/s  {row["ours_gflops"]:8.1f} GFLOP/s ({100 * row["ours_of_peak"]:.0f}% of peak)'
    print(f'{row["case"]:<36} b{row["batch"]:<3} {row["px"]:>4}px  timm {row["timm_ms"]:9.1f} ms  '
          f'ours {row["ours_ms"]:9.1f} ms  x{row["ratio"]:.2f}{extra}', flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='nfnet_f0', help='nfnet_f0 ... nfnet_f6 (compared with timm dm_nfnet_*)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16'], help='autocast dtype (GPU runs)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    p.add_argument('--sizes', type=int, nargs='+', default=[192, 256])
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--train-px', type=int, default=192)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--train-repeats', type=int, default=5)
    p.add_argument('--train-channels-last', action='store_true',
                   help='also time the training step with both models and the input in channels_last')
    p.add_argument('--min-time', type=float, default=0.0, help='time each case for at least this many seconds')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--tol', type=float, default=1e-4, help='max |diff| of a fast path vs our eager output')
    p.add_argument('--no-compile', dest='compile', action='store_false')
    p.add_argument('--no-train', dest='train', action='store_false')
    p.add_argument('--no-infer', dest='infer', action='store_false')
    p.add_argument('--json', default='bench_results.json', help='where to write the results')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.amp and args.tol == 1e-4:
        args.tol = 0.5  # reduced-precision paths are compared loosely
    if args.child:
        _child_alone(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.amp == 'bf16' else torch.float16 if args.amp == 'fp16' else torch.float32
    machine = (torch.cuda.get_device_name() if args.device == 'cuda'
               else f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    print(f'{args.model} vs timm dm_{args.model} | {machine} | torch {torch.__version__}, timm {timm.__version__}')
    peak = matmul_peak_gflops(args.device, dtype)
    print(f'matmul peak ({dtype}): {peak:.0f} GFLOP/s')
    theirs, ours = build_pair(args.model, args.device)
    x = torch.randn(2, 3, args.sizes[-1], args.sizes[-1], device=args.device)
    with torch.no_grad():
        diff = (theirs(x) - ours(x)).abs().max().item()
        top = ours(x).abs().max().item()
    print(f'same weights, max |logit diff| timm vs ours: {diff:.3g} (largest logit {top:.3g}); '
          'timm differs from the reference by design')
    results = dict(model=args.model, device=args.device, machine=machine, amp=args.amp, torch=torch.__version__,
                   timm=timm.__version__, matmul_peak_gflops=peak, logit_diff_vs_timm=diff, rows=[])
    if args.infer:
        results['rows'] += bench_inference(args, theirs, ours, peak)
        # a shared VM drifts: a second measurement shows how far "% of peak" above can be off
        results['matmul_peak_gflops_after_inference'] = peak_after = matmul_peak_gflops(args.device, dtype)
        print(f'matmul peak re-measured after inference: {peak_after:.0f} GFLOP/s'
              + (' (the machine drifted: read "% of peak" above with care)'
                 if abs(peak_after - peak) > 0.15 * peak else ''))
    del theirs, ours
    if args.train:
        results['rows'].append(bench_train(args))
        if args.train_channels_last:
            results['rows'].append(bench_train_channels_last(args))
    tmp = args.json + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.json)
    print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
