"""The benchmarks' own arithmetic, which their printed GFLOP/s and shares of the peak rest on."""
import sys
from pathlib import Path

import torch
import torch.nn as nn

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import conv_efficiency  # noqa: E402  (needs the benchmarks folder on sys.path)


def _step(model: nn.Module, x: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
    return step


def test_conv_flops_by_shape_add_up_to_the_hook_count():
    """Per-shape FLOPs come from the profiled op's own shapes and arguments (padding, stride,
    groups, which gradients it computed); they must add up to the count taken from each conv's
    actual output, for a model with explicit 'SAME' pads, stride-2 and grouped convs and a first
    conv whose input needs no gradient."""
    model = tiny_model().train()
    step = _step(model, torch.randn(2, 3, 40, 40))
    step()
    total = conv_efficiency.conv_flops(model, step)
    shapes = conv_efficiency.profile_step(step, steps=2, by_shape=True)['shapes']
    assert shapes, 'no conv op was recorded with its shapes'
    assert sum(r['forward_flops'] for r in shapes.values()) == total['forward']
    assert sum(r['backward_flops'] for r in shapes.values()) == total['backward']
    assert round(sum(r['calls'] for r in shapes.values())) == sum(
        isinstance(m, nn.Conv2d) for m in model.modules())
    assert any(key[2] == 2 for key in shapes), 'the stride-2 convs are missing'


def test_conv_flops_from_op_arguments_with_implicit_padding_and_groups():
    """A conv that pads inside the op (not by an explicit pad), a dilated grouped one, and a
    transposed conv, which neither count includes."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
                          nn.ConvTranspose2d(8, 4, 2, stride=2))
    step = _step(model, torch.randn(3, 4, 17, 15))
    total = conv_efficiency.conv_flops(model, step)
    shapes = conv_efficiency.profile_step(step, steps=1, by_shape=True)['shapes']
    # forward FLOPs: 2 * output elements * (in channels per group * kernel area)
    first = 2 * (3 * 8 * 9 * 8) * (4 * 9)
    second = 2 * (3 * 8 * 9 * 8) * (2 * 9)
    assert total['forward'] == first + second
    assert sum(r['forward_flops'] for r in shapes.values()) == first + second
    # the first conv's input needs no gradient: its backward is the weight gradient alone
    assert sum(r['backward_flops'] for r in shapes.values()) == first + 2 * second == total['backward']
