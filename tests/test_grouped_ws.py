"""Weight standardisation in groups (``grouped_ws.py``): the same numbers as per conv, fewer kernels."""
import collections

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from timm_nfnet_ext.checkpoint import checkpoint_filter_fn, load_checkpoint_file
from timm_nfnet_ext.grouped_ws import _StandardizeRows, plan_groups, ws_convs
from timm_nfnet_ext.layers import WSConv2d, _standardize_weight_autograd, standardize_weight

from conftest import FIXTURE_NAMES, FIXTURES, fixture_arrays, fixture_model_kwargs, tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _seen_packed(model):
    """Forward pre-hooks recording, per conv call, the dtype of the grouped weight (None: per conv)."""
    seen = []
    for m in ws_convs(model):
        m.register_forward_pre_hook(lambda mod, _: seen.append(None if mod.packed is None else mod.packed[0].dtype))
    return seen


def _live(model):
    """Nonzero skip gains (0 at init), so that every conv of a residual branch gets a gradient."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('skip_gain'):
                p.fill_(0.7)
    return model


def _step(model, x, y, grouped, amp=None):
    model.set_grouped_ws(grouped)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout mask for both paths
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return out.float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('floor', [False, True])
def test_standardize_rows_value_and_gradients(floor):
    """Against the per-conv function, with one input_scale per row, rows on the eps floor included."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    if floor:
        a[1] = 0.25  # a constant row: ||w - mean||^2 = 0, on the floor
        b[2] *= 1e-4
    ga, gb = torch.rand(5, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64) + 0.5
    row_scale = torch.tensor([1.7] * 5 + [0.3] * 3, dtype=torch.float64)
    w = torch.cat([a, b]).reshape(8, -1).requires_grad_()
    gain = torch.cat([ga, gb]).requires_grad_()
    eps = 1e-4
    assert torch.autograd.gradcheck(lambda w, g: _StandardizeRows.apply(w, g, row_scale, eps), (w, gain))
    got = _StandardizeRows.apply(w, gain, row_scale, eps)
    want = torch.cat([standardize_weight(a, ga, 1.7, eps), standardize_weight(b, gb, 0.3, eps)]).reshape(8, -1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    gw, gg = torch.autograd.grad(got, (w, gain), grad)
    a_, b_, ga_, gb_ = (t.clone().requires_grad_() for t in (a, b, ga, gb))
    want = torch.cat([standardize_weight(a_, ga_, 1.7, eps), standardize_weight(b_, gb_, 0.3, eps)]).reshape(8, -1)
    wa, wb, wga, wgb = torch.autograd.grad(want, (a_, b_, ga_, gb_), grad)
    torch.testing.assert_close(gw, torch.cat([wa, wb]).reshape(8, -1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gg, torch.cat([wga, wgb]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_grouped_model_reproduces_deepmind_outputs(name):
    model = timm.create_model('nfnet_f0', **fixture_model_kwargs(name)).eval()
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(FIXTURES / name / 'params.pkl'), model))
    model.set_grouped_ws(True)
    seen = _seen_packed(model)
    x, logits, _ = fixture_arrays(name)
    with torch.no_grad():
        got = model(x)
    assert seen and all(s == torch.float32 for s in seen)  # every conv ran on its group's weight
    np.testing.assert_array_less(np.abs(got.numpy() - logits).max(), 1e-5)


def test_grouped_training_step_equals_per_conv():
    model = _live(tiny_model(drop_rate=0.3, drop_path_rate=0.2)).train()
    x, y = torch.randn(3, 3, 64, 48), torch.randint(0, 10, (3,))
    out_a, grads_a = _step(model, x, y, grouped=False)
    out_b, grads_b = _step(model, x, y, grouped=True)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert grads_a[n].abs().max() > 0, n
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(m.packed is None for m in ws_convs(model))  # nothing kept after the forward


def test_groups_follow_segments_and_fan_in():
    model = timm.create_model('nfnet_f0')
    segments = [ws_convs(model.stem), *(ws_convs(s) for s in model.stages), ws_convs(model.final_conv)]
    groups = plan_groups(segments)
    assert len(groups) == 17  # F0: 57 convs
    assert sum(len(g.convs) for g in groups) == 57
    for g in groups:
        assert len({c.fan_in for c in g.convs}) == 1
        assert len({id(s) for c in g.convs for s in segments if c in s}) == 1  # one segment each
        want = torch.cat([torch.full((c.out_channels,), c.input_scale) for c in g.convs])
        assert torch.equal(g.row_scale, want)


def test_autocast_casts_each_group_once_and_matches_per_conv():
    """Under CPU autocast the convs get bf16 weights from their group, as per-conv autocast would."""
    model = _live(tiny_model()).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    seen = _seen_packed(model)
    out_a, grads_a = _step(model, x, y, grouped=False, amp=torch.bfloat16)
    assert seen and set(seen) == {None}
    seen.clear()
    out_b, grads_b = _step(model, x, y, grouped=True, amp=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(out_b, out_a, rtol=0.05, atol=0.02)
    conv_grads = [n for n in grads_a if n.endswith('conv1.weight')]
    for n in conv_grads:
        cos = F.cosine_similarity(grads_a[n].flatten(), grads_b[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos)


def test_cpu_default_is_per_conv_and_checkpointing_turns_grouping_off():
    model = tiny_model().train()
    seen = _seen_packed(model)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert seen and set(seen) == {None}  # auto: per conv on CPU
    seen.clear()
    model.set_grouped_ws(True)
    model.set_grad_checkpointing(True)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # recomputation must see the same per-conv forward: no error
    assert seen and set(seen) == {None}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_packed_weights_are_dropped_after_an_error():
    model = tiny_model().eval()
    model.set_grouped_ws(True)

    def boom(*_):
        assert all(m.packed is not None for m in ws_convs(model))
        raise RuntimeError('boom')
    handle = model.stages[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match='boom'):
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert all(m.packed is None for m in ws_convs(model))


def test_plan_follows_replaced_convs_changed_constants_and_early_stop(monkeypatch):
    from timm_nfnet_ext import grouped_ws
    standardized = []

    def counting(group):
        standardized.extend(group.convs)
        return orig(group)
    orig = grouped_ws.standardize_group
    monkeypatch.setattr(grouped_ws, 'standardize_group', counting)
    model = _live(tiny_model()).eval()
    model.set_grouped_ws(True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        model.stages[1][0].conv1 = model.stages[1][0].conv1.fuse()  # no longer a WSConv2d
        seen = _seen_packed(model)
        got = model(x)
        assert len(seen) == len(ws_convs(model)) and set(seen) == {torch.float32}
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # a changed input_scale reaches the plan's per-row constants
        model.stages[2][0].conv0.input_scale *= 1.5
        got = model(x)
        model.set_grouped_ws(False)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-4)
        model.set_grouped_ws(True)
        standardized.clear()
        seen.clear()
        feats = model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
    assert len(feats) == 1
    ran = ws_convs(model.stem) + ws_convs(model.stages[0]) + ws_convs(model.stages[1])
    assert len(seen) == len(ran)
    assert {id(c) for c in standardized} == {id(c) for c in ran}  # only the stages that ran


def test_fewer_kernels_than_per_conv(monkeypatch):
    """The point of grouping: far fewer ops per training step than the per-conv GPU path (the
    plain expression, ``_standardize_weight_autograd``), each a kernel launch on a GPU."""
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))
    views = {'view', '_unsafe_view', 't', 'detach', 'expand', 'reshape', 'unsqueeze', 'squeeze', 'split',
             'split_with_sizes', 'select', 'slice', 'alias', 'as_strided', 'permute', 'transpose'}
    model = tiny_model(depths=(2, 2, 3, 2)).train()
    x = torch.randn(2, 3, 64, 64)
    counts = {}
    for grouped in (False, True):
        model.set_grouped_ws(grouped)
        with Count() as c, monkeypatch.context() as mp:
            mp.setattr(WSConv2d, 'standardized_weight', lambda self: _standardize_weight_autograd(
                self.weight, self.gain, self.input_scale, self.eps))
            model(x).sum().backward()
        counts[grouped] = sum(n for op, n in c.ops.items() if op not in views)
    assert counts[True] < 0.7 * counts[False], counts  # (F0 under bf16 autocast: 0.41)


def test_compiled_model_with_grouping_asked_for_has_no_graph_break():
    model = tiny_model().eval()
    model.set_grouped_ws(True)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@CUDA
@pytest.mark.parametrize('amp', [None, torch.bfloat16])
def test_cuda_default_is_grouped_and_matches_per_conv(amp):
    model = _live(tiny_model(drop_rate=0.3)).cuda().train()
    seen = _seen_packed(model)
    x, y = torch.randn(4, 3, 64, 64, device='cuda'), torch.randint(0, 10, (4,), device='cuda')
    out_a, grads_a = _step(model, x, y, grouped=None, amp=amp)
    assert seen and set(seen) == {amp or torch.float32}  # auto: grouped on CUDA
    out_b, grads_b = _step(model, x, y, grouped=False, amp=amp)
    tol = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=0.05, atol=0.02)
    torch.testing.assert_close(out_a, out_b, **tol)
    for n in grads_a:
        if n.endswith('conv1.weight'):
            assert F.cosine_similarity(grads_a[n].flatten(), grads_b[n].flatten(), dim=0) > 0.99, n


@CUDA
@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_cuda_grouped_reproduces_deepmind_outputs(name):
    model = timm.create_model('nfnet_f0', **fixture_model_kwargs(name)).eval()
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(FIXTURES / name / 'params.pkl'), model))
    model.cuda()
    x, logits, _ = fixture_arrays(name)
    with torch.no_grad():
        got = model(x.cuda()).cpu()
    # TF32 convs on the GPU: looser than the CPU's 1e-5
    np.testing.assert_array_less(np.abs(got.numpy() - logits).max(), 2e-3)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason='needs gloo')
def test_ddp_with_grouped_weights_gets_the_same_gradients(tmp_path):
    """DDP's reducer sees every parameter's gradient once, also when a group's backward writes
    many at a time (gloo, one rank; bucketing and the all-reduce run as with more)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model = _live(tiny_model()).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    _, want = _step(model, x, y, grouped=False)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, bucket_cap_mb=1)  # small buckets: several all-reduces
        for _ in range(2):  # the second step checks the reducer's state was reset cleanly
            model.set_grouped_ws(True)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            F.cross_entropy(ddp(x), y).backward()
    finally:
        dist.destroy_process_group()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
