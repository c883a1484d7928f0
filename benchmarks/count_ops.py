"""How many ATen ops one training step's forward+backward dispatches: timm vs ours, per variant.

    python benchmarks/count_ops.py                      # NFNet-F0, bf16 autocast, on CPU (seconds)
    python benchmarks/count_ops.py --model nfnet_f3 --no-amp

On a GPU each op that is not a view is a kernel launch, and an NFNet training step at common
batch sizes is bound by launches, not arithmetic (see the README's Performance section). The
count does not depend on the device or the input size, so it is taken on CPU on a small
input. Variants of ours: ``grouped`` (grouped weight standardisation, the CUDA default),
``per-conv`` (the plain expression per conv, what CUDA runs with grouping off), and
``per-conv, cpu`` (the hand-written CPU function, the CPU default).
"""
from __future__ import annotations

import argparse
import collections
from typing import Dict

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import timm_nfnet_ext  # noqa: F401  (registers the models)
from timm_nfnet_ext.accel import FastWSConv2d as WSConv2d
from timm_nfnet_ext.layers import standardize_weight

VIEWS = {'view', '_unsafe_view', 't', 'detach', 'expand', 'reshape', 'unsqueeze', 'squeeze', 'split',
         'split_with_sizes', 'select', 'slice', 'alias', 'as_strided', 'permute', 'transpose', '_reshape_alias'}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(model: torch.nn.Module, amp: bool) -> Dict[str, int]:
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    model(x).sum().backward()  # warm: lazily built state stays out of the count
    model.zero_grad(set_to_none=True)
    with CountOps() as c:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return c.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='nfnet_f0')
    p.add_argument('--no-amp', dest='amp', action='store_false', help='float32 instead of bf16 autocast')
    args = p.parse_args()
    theirs = timm.create_model('dm_' + args.model).train()
    ours = timm.create_model(args.model).train()
    print(f'{args.model}, forward+backward, {"bf16 autocast" if args.amp else "float32"}: ATen ops (not views) / all')
    rows = [('timm dm_' + args.model, theirs, None, None)]
    plain = lambda self: standardize_weight(self.weight, self.gain, self.input_scale, self.eps)  # noqa: E731
    rows += [('ours, grouped', ours, True, None), ('ours, per-conv', ours, False, plain),
             ('ours, per-conv, cpu', ours, False, None)]
    for label, model, grouped, ws in rows:
        orig = WSConv2d.standardized_weight
        if ws is not None:
            WSConv2d.standardized_weight = ws
        try:
            if grouped is not None:
                model.set_grouped_ws(grouped)
            ops = count_step(model, args.amp)
        finally:
            WSConv2d.standardized_weight = orig
        real = sum(n for op, n in ops.items() if op not in VIEWS)
        print(f'{label:<24} {real:6d} / {sum(ops.values()):6d}')


if __name__ == '__main__':
    main()
