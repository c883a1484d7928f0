"""Benchmark AGC on nfnet_f0-sized gradients: timm's clip vs ours, SGD vs sgdagc.

Shapes are those of timm's ``dm_nfnet_f0`` (233 tensors, 71.5M parameters) with the gains
squeezed to 1-D, as in this package's layout. Gradients are drawn so that a chosen share
of units exceed the AGC threshold (``--scenarios``): ``none`` (no unit clipped), ``half``
(unit ratios log-uniform around the threshold, ~50% clipped) and ``all``.

Every timed call starts from the same gradients (restored, untimed, before each call).
Prints per scenario the median milliseconds and the ratios measured in this run:

    python benchmarks/bench_agc.py                       # CPU, fp32
    python benchmarks/bench_agc.py --device cuda --repeats 50 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import timm
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad

from timm_nfnet_ext.agc import clip as agc_clip
from timm_nfnet_ext.agc import SGDAGC, adaptive_clip_grad_

CLIPPING = 0.01
EPS = 1e-3
RATIO_RANGES = {'none': (0.1, 0.9), 'half': (0.1, 10.0), 'all': (1.1, 10.0)}


def f0_shapes() -> List[torch.Size]:
    """Parameter shapes of dm_nfnet_f0 with (O,1,1,1) gains squeezed to (O,)."""
    with torch.device('meta'):
        model = timm.create_model('dm_nfnet_f0')
    shapes = []
    for name, p in model.named_parameters():
        is_gain = name.endswith('.gain')
        shapes.append(torch.Size([p.shape[0]]) if is_gain else p.shape)
    return shapes


def make_params(shapes: List[torch.Size], device: str, dtype: torch.dtype,
                gen: torch.Generator) -> List[torch.nn.Parameter]:
    """Weights ~ N(0, 1/fan_in); vectors ones; scalars zero (skip gains: the eps floor)."""
    params = []
    for shape in shapes:
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        params.append(torch.nn.Parameter(t.to(device=device, dtype=dtype)))
    return params


def make_grads(params: List[torch.Tensor], scenario: str, gen: torch.Generator) -> List[torch.Tensor]:
    """Gradients whose unit norms are ratio * threshold, ratio log-uniform in the range."""
    lo, hi = RATIO_RANGES[scenario]
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        pf = p.detach().float().cpu()
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        g_n = torch.linalg.vector_norm(g, dim=dims, keepdim=p.ndim > 1)
        p_n = torch.linalg.vector_norm(pf, dim=dims, keepdim=p.ndim > 1)
        units = g_n.shape
        ratio = torch.exp(torch.empty(units).uniform_(math.log(lo), math.log(hi), generator=gen))
        g = g * (ratio * CLIPPING * p_n.clamp_min(EPS) / g_n)
        grads.append(g.to(device=p.device, dtype=p.dtype))
    return grads


def clipped_share(params: List[torch.Tensor], grads: List[torch.Tensor]) -> float:
    """Share of units whose gradient exceeds the threshold."""
    hit = total = 0
    for p, g in zip(params, grads):
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        pn = torch.linalg.vector_norm(p.detach().float(), dim=dims)
        gn = torch.linalg.vector_norm(g.float(), dim=dims)
        hit += int((gn > pn.clamp_min(EPS) * CLIPPING).sum())
        total += pn.numel()
    return hit / total


def time_round_robin(contenders: Dict[str, Callable[[], None]], setup: Callable[[], None],
                     repeats: int, warmup: int, device: str) -> Dict[str, List[float]]:
    """Milliseconds of each contender, run in turn (so drift hits all alike), ``setup``
    untimed before every call; the first ``warmup`` rounds are dropped."""
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for i in range(warmup + repeats):
        for name, fn in contenders.items():
            setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run_scenario(params, scenario: str, args, gen: torch.Generator) -> Dict[str, float]:
    grads = make_grads(params, scenario, gen)

    def restore() -> None:
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5, foreach=True)
    sgd = torch.optim.SGD(params, **kw)
    sgdagc = SGDAGC(params, clipping=CLIPPING, agc_eps=EPS, **kw)
    contenders = {
        'timm_clip': lambda: timm_adaptive_clip_grad(params, CLIPPING, EPS),
        'ours_clip': lambda: adaptive_clip_grad_(params, CLIPPING, EPS),
        'sgd_step': sgd.step,
        'sgdagc_step': sgdagc.step,
    }
    times = time_round_robin(contenders, restore, args.repeats, args.warmup, args.device)
    res: Dict[str, float] = {'clipped_share': clipped_share(params, grads)}
    for stat, fn in (('median', statistics.median), ('min', min)):
        for name, ts in times.items():
            res[f'{name}_ms_{stat}'] = fn(ts)
        res[f'clip_speedup_{stat}'] = res[f'timm_clip_ms_{stat}'] / res[f'ours_clip_ms_{stat}']
        res[f'sgdagc_over_sgd_{stat}'] = res[f'sgdagc_step_ms_{stat}'] / res[f'sgd_step_ms_{stat}']
    for p in params:
        p.grad = None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default cpu)")
    ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    ap.add_argument('--scenarios', default='none,half,all', help='comma list of none,half,all')
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave)')
    ap.add_argument('--cpu-chunk-mb', type=float, default=0,
                    help='override timm_nfnet_ext.agc.clip.CPU_CHUNK_BYTES (MiB; 0: keep)')
    ap.add_argument('--json', default='', help='also write the results to this path')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_chunk_mb:
        agc_clip.CPU_CHUNK_BYTES = int(args.cpu_chunk_mb * 2 ** 20)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        ap.error('--device cuda but CUDA is not available')
    scenarios = [s.strip() for s in args.scenarios.split(',') if s.strip()]
    for s in scenarios:
        if s not in RATIO_RANGES:
            ap.error(f'unknown scenario {s!r}; choose from {sorted(RATIO_RANGES)}')

    gen = torch.Generator().manual_seed(0)
    shapes = f0_shapes()
    params = make_params(shapes, args.device, getattr(torch, args.dtype), gen)
    n_params = sum(p.numel() for p in params)
    dev_name = torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or 'cpu'
    print(f'nfnet_f0 gradients: {len(params)} tensors, {n_params / 1e6:.1f}M params, '
          f'{args.dtype} on {args.device} ({dev_name}, {torch.get_num_threads()} CPU threads); '
          f'torch {torch.__version__}, timm {timm.__version__}; {args.repeats} rounds')
    header = (f"{'scenario':<9}{'stat':<7}{'clipped':>8}{'timm clip':>11}{'ours':>10}"
              f"{'speedup':>9}{'SGD step':>11}{'sgdagc':>10}{'ratio':>7}")
    print(header + '\n' + '-' * len(header))
    results = {}
    for s in scenarios:
        r = results[s] = run_scenario(params, s, args, gen)
        for stat in ('median', 'min'):
            print(f"{s:<9}{stat:<7}{r['clipped_share']:>7.0%} "
                  f"{r[f'timm_clip_ms_{stat}']:>8.1f} ms{r[f'ours_clip_ms_{stat}']:>7.1f} ms"
                  f"{r[f'clip_speedup_{stat}']:>8.2f}x{r[f'sgd_step_ms_{stat}']:>8.1f} ms"
                  f"{r[f'sgdagc_step_ms_{stat}']:>7.1f} ms{r[f'sgdagc_over_sgd_{stat}']:>6.2f}x")
    print('speedup = timm adaptive_clip_grad / ours (targets: >= 2.5x CPU, >= 5x CUDA); '
          'ratio = sgdagc step / SGD(foreach) step (target <= 1.2x)')
    if args.json:
        meta = dict(device=args.device, device_name=dev_name, dtype=args.dtype,
                    tensors=len(params), params=n_params, repeats=args.repeats,
                    torch=torch.__version__, timm=timm.__version__,
                    threads=torch.get_num_threads(), cpu_chunk_bytes=agc_clip.CPU_CHUNK_BYTES)
        with open(args.json, 'w') as f:
            json.dump({'meta': meta, 'results': results}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
