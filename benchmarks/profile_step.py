"""Where a training step's time goes: forward+backward and optimizer step, ours vs timm, per variant.

    python benchmarks/profile_step.py --device cuda --amp bf16 --batch 64 --px 192
    python benchmarks/profile_step.py --device cpu --batch 8 --px 192 --repeats 3   # fp32 on CPU

Times forward+backward alone for timm's ``dm_nfnet_*`` and for this package's model with
each weight-standardisation variant (``grouped``: the convs of a stage with one fan-in
standardised together, ``grouped_ws.py``, the default on CUDA; per conv: ``shipped``, what
``standardize_weight`` picks for the device; ``custom``: the hand-written autograd function;
``autograd``: the plain expression; ``batchnorm``: ``F.batch_norm`` on the weights, which
ignores the reference's eps floor and is shown only as a bound), ours with ATen's GELU instead of the hand-written CPU one, then the
optimizer step alone (timm's ``adaptive_clip_grad`` + SGD vs ``sgdagc``), and prints the top
kernels of one step of each model.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import timm
from timm_nfnet_ext import layers  # (registers the models)
from timm_nfnet_ext.accel import FastWSConv2d, configure, weight_std

from bench import autocast, time_fn  # this script's folder is on sys.path


def ws_custom(weight, gain, input_scale=1.0, eps=1e-4):
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return weight_std._StandardizeWeight.apply(weight, gain, input_scale, eps)


def ws_batchnorm(weight, gain, input_scale=1.0, eps=1e-4):
    o = weight.shape[0]
    scale = gain * (input_scale / weight[0].numel() ** 0.5)
    return F.batch_norm(weight.reshape(1, o, -1), None, None, weight=scale, training=True, momentum=0.,
                        eps=1e-10).reshape_as(weight)


VARIANTS = {'shipped': weight_std.fast_standardize_weight, 'custom': ws_custom,
            'autograd': layers.standardize_weight, 'batchnorm': ws_batchnorm}


def timed(fn, device, repeats):
    """Median milliseconds per call."""
    return 1e3 * time_fn(fn, device, warmup=3, repeats=repeats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='nfnet_f0')
    p.add_argument('--device', default='cuda')
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                   help='autocast dtype (default: bf16 on CUDA; none on CPU, where bf16 convs are emulated and slow)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--px', type=int, default=192)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--top', type=int, default=12)
    args = p.parse_args()
    dev = args.device
    if args.amp is None:
        args.amp = 'bf16' if dev == 'cuda' else 'none'
    x = torch.randn(args.batch, 3, args.px, args.px, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    models = {'timm': timm.create_model('dm_' + args.model).to(dev).train(),
              'ours': timm.create_model(args.model).to(dev).train()}

    def fwd_bwd(model):
        def f():
            model.zero_grad(set_to_none=True)
            with autocast(dev, None if args.amp == 'none' else args.amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        return f

    print(f'{args.model} b{args.batch} {args.px}px {dev} {args.amp}')
    print(f'fwd+bwd timm               {timed(fwd_bwd(models["timm"]), dev, repeats=args.repeats):8.2f} ms', flush=True)
    models['ours'].set_grouped_ws(True)
    print(f'fwd+bwd ours, WS grouped   {timed(fwd_bwd(models["ours"]), dev, repeats=args.repeats):8.2f} ms', flush=True)
    models['ours'].set_grouped_ws(False)
    for name, fn in VARIANTS.items():
        orig = FastWSConv2d.standardized_weight
        FastWSConv2d.standardized_weight = lambda self, fn=fn: fn(self.weight, self.gain, self.input_scale, self.eps)
        try:
            print(f'fwd+bwd ours, WS {name:<9} {timed(fwd_bwd(models["ours"]), dev, repeats=args.repeats):8.2f} ms',
                  flush=True)
        finally:
            FastWSConv2d.standardized_weight = orig

    models['ours'].set_grouped_ws(None)  # the default again, for the rest
    with configure(gelu=False):  # ATen's tanh-GELU (only differs on CPU float32)
        print(f'fwd+bwd ours, ATen GELU    {timed(fwd_bwd(models["ours"]), dev, repeats=args.repeats):8.2f} ms',
              flush=True)

    from timm.utils.agc import adaptive_clip_grad
    fwd_bwd(models['timm'])()
    fwd_bwd(models['ours'])()
    sgd = timm.optim.create_optimizer_v2(models['timm'], 'sgd', lr=0.1, momentum=0.9, weight_decay=2e-5,
                                         foreach=True)  # as in bench.py: no decay on gains and biases
    ours_opt = timm.optim.create_optimizer_v2(models['ours'], 'sgdagc', lr=0.1, momentum=0.9, weight_decay=2e-5,
                                              clipping=0.01)

    def timm_step():
        adaptive_clip_grad(models['timm'].parameters(), clip_factor=0.01)
        sgd.step()
    print(f'optimizer timm clip + SGD   {timed(timm_step, dev, repeats=args.repeats):8.2f} ms')
    print(f'optimizer sgdagc            {timed(ours_opt.step, dev, repeats=args.repeats):8.2f} ms')

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == 'cuda' else [])
    for name, model in models.items():
        with profile(activities=acts) as prof:
            fwd_bwd(model)()
            if dev == 'cuda':
                torch.cuda.synchronize()
        key = 'self_cuda_time_total' if dev == 'cuda' else 'self_cpu_time_total'
        print(f'--- top kernels, {name} fwd+bwd ---')
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == '__main__':
    main()
