"""Worker for tests/test_agc_ddp.py, started by ``torchrun --nproc_per_node 2``.

Each rank trains a DDP-wrapped model with SGDAGC on its half of a global batch for a few
steps. Rank 0 writes a JSON report to ``argv[1]``: whether every rank's parameters are
bit-identical, the largest difference to a single-process run on the whole batch (same
optimizer), the difference had each rank clipped its local gradient before averaging,
and how many units were clipped.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm_nfnet_ext.agc import SGDAGC, adaptive_clip_grad_, agc_param_groups, unitwise_norm

STEPS, BATCH, LR, CLIP = 3, 8, 0.5, 0.01


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(8))
        self.skip_gain = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(8, 4)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        h = torch.relu(self.conv(x) * self.gain[:, None, None]).mean((2, 3))
        return self.fc(h + self.skip_gain * h)


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, SGDAGC(agc_param_groups(model, weight_decay=1e-4), lr=LR, clipping=CLIP)


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_ddp(rank, world):
    model, opt = make()
    ddp = DistributedDataParallel(model)
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad()
        F.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
        opt.step()
    return model


def train_single(local_clip_world=0):
    """The whole batch in one process; with local_clip_world, clip each shard's gradient
    (as a per-rank clip before all-reduce would) and average the clipped gradients."""
    model, opt = make()
    clipped = 0
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad()
        if not local_clip_world:
            F.cross_entropy(model(x), y).backward()
            w, g = model.conv.weight, model.conv.weight.grad
            clipped += int((unitwise_norm(g) > unitwise_norm(w).clamp_min(1e-3) * CLIP).sum())
            opt.step()
            continue
        total = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(local_clip_world):
            model.zero_grad()
            F.cross_entropy(model(x[r::local_clip_world]), y[r::local_clip_world]).backward()
            adaptive_clip_grad_(model.parameters(), CLIP)
            total = [t + p.grad / local_clip_world for t, p in zip(total, model.parameters())]
        for p, t in zip(model.parameters(), total):
            p.grad = t
        opt.step()
    return model, clipped


def main():
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    params = flat(train_ddp(rank, world))
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    if rank == 0:
        single, clipped = train_single()
        local, _ = train_single(local_clip_world=world)
        report = {
            'world': world,
            'ranks_bit_identical': all(torch.equal(gathered[0], t) for t in gathered[1:]),
            'max_diff_to_single_process': (params - flat(single)).abs().max().item(),
            'max_diff_local_clipping': (params - flat(local)).abs().max().item(),
            'clipped_units': clipped,
        }
        with open(sys.argv[1], 'w') as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
