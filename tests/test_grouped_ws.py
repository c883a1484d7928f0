"""Weight standardisation in groups (``grouped_ws.py``): the same numbers as per conv, fewer kernels."""
import collections
import gc
import threading
import weakref

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from timm_nfnet_ext.accel import grouped_ws
from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn, load_checkpoint_file
from timm_nfnet_ext.accel.grouped_ws import _StandardizeRows, plan_groups
from timm_nfnet_ext.accel import FastWSConv2d
from timm_nfnet_ext.accel.grouped_ws import GROUPED
from timm_nfnet_ext.layers import WSConv2d, standardize_weight

from conftest import FIXTURE_NAMES, FIXTURES, fixture_arrays, fixture_model_kwargs, tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def ws_convs(module):
    return [m for m in module.modules() if isinstance(m, WSConv2d)]


@pytest.fixture
def seen(monkeypatch):
    """Records which convs got a grouped weight (and its dtype and layout), and which ones
    standardised their own."""
    rec = dict(grouped=[], dtypes=set(), channels_last=set(), per_conv=[])
    group_fn, own_fn = grouped_ws.standardize_group, FastWSConv2d.standardized_weight

    def group(g):
        out = group_fn(g)
        rec['grouped'] += g.convs
        rec['dtypes'].update(w.dtype for w, _ in out)
        rec['channels_last'].update(w.is_contiguous(memory_format=torch.channels_last) for w, _ in out
                                    if w.shape[-1] > 1)
        return out

    def own(self):
        rec['per_conv'].append(self)
        return own_fn(self)
    monkeypatch.setattr(grouped_ws, 'standardize_group', group)
    monkeypatch.setattr(FastWSConv2d, 'standardized_weight', own)
    rec['clear'] = lambda: [v.clear() for k, v in rec.items() if k != 'clear']
    return rec


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


def _rows_inputs(floor, channels_last):
    torch.manual_seed(0)
    a, b = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    if floor:
        a[1] = 0.25  # a constant row: ||w - mean||^2 = 0, on the floor
        b[2] *= 1e-4
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    ga, gb = torch.rand(5, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64) + 0.5
    return [t.requires_grad_() for t in (a, b, ga, gb)]


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('floor', [False, True])
def test_standardize_rows_value_and_gradients(floor, channels_last):
    """Against the per-conv function, one input_scale per conv, rows on the eps floor included;
    first and second derivatives."""
    params = _rows_inputs(floor, channels_last)
    a, b, ga, gb = params
    row_scale = torch.tensor([1.7] * 5 + [0.3] * 3, dtype=torch.float64)
    eps = 1e-4

    def rows(*p):
        return _StandardizeRows.apply(row_scale, eps, 2, channels_last, *p)
    assert torch.autograd.gradcheck(rows, tuple(params))
    assert torch.autograd.gradgradcheck(rows, tuple(params))
    got = rows(*params)
    want = torch.cat([standardize_weight(a, ga, 1.7, eps), standardize_weight(b, gb, 0.3, eps)])
    if channels_last:  # rows in memory order: (O, kh, kw, I)
        want = want.permute(0, 2, 3, 1)
    want = want.reshape(8, -1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_grouped_model_reproduces_deepmind_outputs(name, seen):
    model = timm.create_model('nfnet_f0', **fixture_model_kwargs(name)).eval()
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(FIXTURES / name / 'params.pkl'), model))
    model.set_grouped_ws(True)
    x, logits, _ = fixture_arrays(name)
    with torch.no_grad():
        got = model(x)
    assert len(seen['grouped']) == len(ws_convs(model)) and not seen['per_conv']
    np.testing.assert_array_less(np.abs(got.numpy() - logits).max(), 1e-5)


def test_grouped_training_step_equals_per_conv(seen):
    model = _live(tiny_model(drop_rate=0.3, drop_path_rate=0.2)).train()
    x, y = torch.randn(3, 3, 64, 48), torch.randint(0, 10, (3,))
    out_a, grads_a = _step(model, x, y, grouped=False)
    assert len(seen['per_conv']) == len(ws_convs(model)) and not seen['grouped']
    seen['clear']()
    out_b, grads_b = _step(model, x, y, grouped=True)
    assert len(seen['grouped']) == len(ws_convs(model)) and not seen['per_conv']
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert grads_a[n].abs().max() > 0, n
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)
    assert GROUPED.take is None  # nothing left behind after the forward


def test_groups_follow_segments_and_fan_in():
    model = timm.create_model('nfnet_f0')
    segments = [ws_convs(model.stem), *(ws_convs(s) for s in model.stages), ws_convs(model.final_conv)]
    groups = plan_groups(segments)
    assert len(groups) == 17  # F0: 57 convs
    assert sum(len(g.convs) for g in groups) == 57
    for g in groups:
        assert len({c.fan_in for c in g.convs}) == 1
        assert len({id(s) for c in g.convs for s in segments if c in s}) == 1  # one segment each


def test_autocast_casts_each_group_once_and_matches_per_conv(seen):
    """Under CPU autocast the convs get bf16 weights from their group, as per-conv autocast would;
    a float64 model is left in float64, as autocast leaves it."""
    model = _live(tiny_model()).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    out_a, grads_a = _step(model, x, y, grouped=False, amp=torch.bfloat16)
    out_b, grads_b = _step(model, x, y, grouped=True, amp=torch.bfloat16)
    assert seen['dtypes'] == {torch.bfloat16}
    torch.testing.assert_close(out_b, out_a, rtol=0.05, atol=0.02)
    for n in (n for n in grads_a if n.endswith('conv1.weight')):
        cos = F.cosine_similarity(grads_a[n].flatten(), grads_b[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos)
    seen['clear']()
    model.double()
    out_a, _ = _step(model, x.double(), y, grouped=False, amp=torch.bfloat16)
    out_b, _ = _step(model, x.double(), y, grouped=True, amp=torch.bfloat16)
    assert seen['dtypes'] == {torch.float64}
    torch.testing.assert_close(out_b, out_a, rtol=1e-9, atol=1e-12)


def test_cpu_default_is_per_conv_and_checkpointing_turns_grouping_off(seen):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    model = tiny_model().train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert seen['per_conv'] and not seen['grouped']  # auto: per conv on CPU
    model.set_grouped_ws(True)
    model.set_grad_checkpointing(True)
    seen['clear']()
    model(x).sum().backward()  # the recomputation must see the same per-conv forward: no error
    assert seen['per_conv'] and not seen['grouped']
    model.set_grad_checkpointing(False)
    model.stages[1][0] = checkpoint_wrapper(model.stages[1][0])  # as FSDP's apply_activation_checkpointing
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert not seen['grouped']
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_state_is_dropped_after_an_error():
    model = tiny_model().eval()
    model.set_grouped_ws(True)

    def boom(*_):
        assert GROUPED.take is not None
        raise RuntimeError('boom')
    handle = model.stages[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match='boom'):
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert GROUPED.take is None


def test_replaced_convs_changed_constants_and_early_stop(seen):
    model = _live(tiny_model()).eval()
    model.set_grouped_ws(True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        old = weakref.ref(model.stages[1][0].conv1)
        model.stages[1][0].conv1 = model.stages[1][0].conv1.fuse()  # no longer a WSConv2d
        seen['clear']()
        got = model(x)
        assert len(seen['grouped']) == len(ws_convs(model)) and not seen['per_conv']
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        gc.collect()
        assert old() is None  # nothing keeps a replaced conv alive
        # a changed input_scale reaches the per-row constants
        model.stages[2][0].conv0.input_scale *= 1.5
        got = model(x)
        model.set_grouped_ws(False)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-4)
        model.set_grouped_ws(True)
        seen['clear']()
        feats = model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
    assert len(feats) == 1
    ran = ws_convs(model.stem) + ws_convs(model.stages[0]) + ws_convs(model.stages[1])
    assert {id(c) for c in seen['grouped']} == {id(c) for c in ran}  # only the stages that ran


def test_convs_with_pre_hooks_standardise_their_own_weight(seen):
    """``torch.nn.utils.prune`` sets the weight in a forward pre-hook: the group would read it early."""
    import torch.nn.utils.prune as prune
    model = _live(tiny_model()).eval()
    conv = model.stages[1][0].conv1
    prune.l1_unstructured(conv, 'weight', amount=0.3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        conv.weight_orig.mul_(1.5)  # the pruned weight is recomputed by the hook on the next call
        model.set_grouped_ws(True)
        got = model(x)
        assert conv in seen['per_conv'] and conv not in seen['grouped']
        model.set_grouped_ws(False)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)


def test_threads_see_only_their_own_forward():
    """Two threads inside the same model's forward at once, one under bf16 autocast."""
    model = _live(tiny_model()).eval()
    model.set_grouped_ws(True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = {'fp32': model(x), 'bf16': None}
        with torch.autocast('cpu', dtype=torch.bfloat16):
            want['bf16'] = model(x).float()
    barrier, got, errors = threading.Barrier(2, timeout=60), {}, []

    def meet(*_):  # both threads mid-forward
        barrier.wait()
    model.stages[1].register_forward_pre_hook(meet)

    def run(kind):
        try:
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=kind == 'bf16'):
                got[kind] = model(x).float()
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in ('fp32', 'bf16')]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.testing.assert_close(got['fp32'], want['fp32'], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got['bf16'], want['bf16'], rtol=1e-2, atol=1e-3)


def test_double_backward_matches_the_plain_expression(monkeypatch):
    """A gradient penalty (create_graph=True) through grouped weights, against the per-conv
    plain expression (float64: ATen's GELU, which has a double backward)."""
    model = _live(tiny_model()).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def penalty_grads(grouped):
        model.set_grouped_ws(grouped)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout mask
        loss = model(x).square().sum()
        g = torch.autograd.grad(loss, model.stages[1][0].conv1.weight, create_graph=True)[0]
        g.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.setattr(FastWSConv2d, 'standardized_weight', WSConv2d.standardized_weight)  # the reference
    want, got = penalty_grads(False), penalty_grads(True)
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-7, atol=1e-12, msg=n)


def test_torch_func_grad_falls_back_to_per_conv(seen):
    model = _live(tiny_model()).eval()
    model.set_grouped_ws(True)
    x = torch.randn(1, 3, 64, 64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    assert not seen['grouped']
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_channels_last_weights_are_handed_out_channels_last(seen):
    model = _live(tiny_model()).train().to(memory_format=torch.channels_last)
    x, y = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last), torch.randint(0, 10, (2,))
    out_a, grads_a = _step(model, x, y, grouped=False)
    out_b, grads_b = _step(model, x, y, grouped=True)
    assert seen['channels_last'] == {True}
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fewer_kernels_than_per_conv(monkeypatch):
    """The point of grouping: far fewer ops per training step than the per-conv GPU path (the
    plain expression, ``layers.standardize_weight``), each a kernel launch on a GPU."""
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))
    views = {'view', '_unsafe_view', 't', 'detach', 'expand', 'reshape', 'unsqueeze', 'squeeze', 'split',
             'split_with_sizes', 'select', 'slice', 'alias', 'as_strided', 'permute', 'transpose'}
    monkeypatch.setattr(FastWSConv2d, 'standardized_weight', WSConv2d.standardized_weight)  # the reference
    model = tiny_model(depths=(2, 2, 3, 2)).train()
    x = torch.randn(2, 3, 64, 64)
    counts = {}
    for grouped in (False, True):
        model.set_grouped_ws(grouped)
        with Count() as c:
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


@CUDA
@pytest.mark.parametrize('amp', [None, torch.bfloat16, torch.float16])
def test_cuda_default_is_grouped_and_matches_per_conv(amp, seen):
    model = _live(tiny_model(drop_rate=0.3)).cuda().train()
    x, y = torch.randn(4, 3, 64, 64, device='cuda'), torch.randint(0, 10, (4,), device='cuda')
    out_a, grads_a = _step(model, x, y, grouped=None, amp=amp)
    assert seen['dtypes'] == {amp or torch.float32} and not seen['per_conv']  # auto: grouped on CUDA
    out_b, grads_b = _step(model, x, y, grouped=False, amp=amp)
    tol = dict(rtol=1e-3, atol=1e-4) if amp is None else dict(rtol=0.05, atol=0.02)  # (fp32: TF32 convs)
    torch.testing.assert_close(out_a, out_b, **tol)
    for n in grads_a:
        if n.endswith('.weight') and grads_a[n].dim() == 4:
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


@pytest.mark.parametrize('probe', ['FUNCTORCH_PROBE', 'FORWARD_AD_LEVEL_READABLE'])
def test_without_torchs_private_probes_grouping_steps_aside(probe, seen, monkeypatch):
    """Where torch's private functorch / forward-AD query is missing, grouping (asked for) steps
    aside for good: each conv standardises its own weight, with the same numbers."""
    from timm_nfnet_ext.accel import probes as layers
    model = _live(tiny_model()).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    out_a, grads_a = _step(model, x, y, grouped=True)
    assert seen['grouped'] and not seen['per_conv']
    seen['clear']()
    monkeypatch.setattr(layers, probe, None if probe == 'FUNCTORCH_PROBE' else False)
    out_b, grads_b = _step(model, x, y, grouped=True)
    assert not seen['grouped'] and seen['per_conv']
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)
