"""Tests of timm_nfnet_ext.agc against an independent NumPy implementation of the
reference SGD_AGC (written here from ../shared/reference/NFNETS.md, section "AGC")."""
import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import Lamb, Lookahead, create_optimizer_v2, list_optimizers
from torch import nn

from timm_nfnet_ext import agc
from timm_nfnet_ext.agc import clip as agc_clip
from timm_nfnet_ext.agc import (
    AdamWAGC, LambAGC, SGDAGC, adaptive_clip_grad_, agc_param_groups, register_agc_optimizer,
    unitwise_norm, with_agc,
)

CLIP = 0.01
EPS = 1e-3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


# --------------------------------------------------------------------------- NumPy reference

def np_unitwise_norm(x):
    """Scalars/vectors: whole norm; else one norm per index of the output dim 0."""
    if x.ndim <= 1:
        return np.sqrt(np.sum(np.square(x)))
    return np.sqrt(np.sum(np.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def np_clip(param, grad, clipping=CLIP, eps=EPS):
    max_norm = np.maximum(np_unitwise_norm(param), eps) * clipping
    grad_norm = np_unitwise_norm(grad)
    clipped = grad * (max_norm / np.maximum(grad_norm, 1e-6))
    return np.where(grad_norm > max_norm, clipped, grad)


class NpSGDAGC:
    """Reference SGD_AGC: clip, + wd * p, momentum buffer from zeros, Nesterov update."""

    def __init__(self, params, lr, momentum=0.9):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.bufs = [np.zeros_like(p) for p in self.params]
        self.lr, self.momentum = lr, momentum

    def step(self, grads, wds, clips):
        for i, (g, wd, clip) in enumerate(zip(grads, wds, clips)):
            if g is None:
                continue
            p = self.params[i]
            if clip is not None:
                g = np_clip(p, g, clip)
            g = g + wd * p
            self.bufs[i] = self.momentum * self.bufs[i] + g
            self.params[i] = p - self.lr * (g + self.momentum * self.bufs[i])


def unit_ratios_grad(rng, p, clipping=CLIP, lo=0.1, hi=10.0):
    """A gradient whose unit norms are ratio * AGC threshold, ratios log-uniform in [lo, hi]."""
    g = rng.standard_normal(p.shape)
    units = np_unitwise_norm(g).shape
    ratio = np.exp(rng.uniform(math.log(lo), math.log(hi), size=units))
    return g * ratio * clipping * np.maximum(np_unitwise_norm(p), EPS) / np_unitwise_norm(g)


SHAPES = {'conv': (8, 4, 3, 3), 'linear': (6, 5), 'bias': (8,), 'scalar': (), 'conv1d': (3, 4, 5)}


def np_params(rng):
    out = {k: rng.standard_normal(s) / math.sqrt(max(1, int(np.prod(s[1:])))) for k, s in SHAPES.items()}
    out['zero_conv'] = np.zeros((4, 2, 1, 1))   # eps floor
    out['zero_scalar'] = np.zeros(())           # skip gain at init
    return out


def to_params(arrays, dtype=torch.float64, device='cpu'):
    return [nn.Parameter(torch.tensor(a, dtype=dtype, device=device)) for a in arrays]


def set_grads(params, grads, dtype=None):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g, dtype=dtype or p.dtype, device=p.device)


class TinyNet(nn.Module):
    """Conv (weight, bias), 1-D gain, zero-init skip gain, linear classifier."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(8))
        self.skip_gain = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(8, num_classes) if num_classes else nn.Identity()

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        h = torch.relu(self.conv(x) * self.gain[:, None, None]).mean((2, 3))
        return self.fc(h + self.skip_gain * h)


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]


# --------------------------------------------------------------------------- clipping

def test_unitwise_norm_matches_numpy():
    rng = np.random.default_rng(0)
    for shape in [(), (7,), (6, 5), (8, 4, 3, 3), (3, 4, 5)]:
        x = rng.standard_normal(shape)
        got = unitwise_norm(torch.tensor(x))
        want = np_unitwise_norm(x)
        assert got.shape == np.shape(want)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize('dtype,rtol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adaptive_clip_grad_matches_numpy(dtype, rtol):
    rng = np.random.default_rng(1)
    arrays = np_params(rng)
    grads = [unit_ratios_grad(rng, p) for p in arrays.values()]
    params = to_params(arrays.values(), dtype)
    set_grads(params, grads)
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad_(params, CLIP, EPS)
    n_clipped = n_kept = 0
    for p, b in zip(params, before):
        want = np_clip(p.detach().double().numpy(), b.double().numpy())
        np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=rtol, atol=0)
        kept = np.broadcast_to(want == b.double().numpy(), want.shape)
        assert torch.equal(p.grad[torch.tensor(kept)], b[torch.tensor(kept)])  # untouched: exact
        n_kept += kept.sum()
        n_clipped += (~kept).sum()
    assert n_kept > 0 and n_clipped > 0


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_grads(dtype):
    rng = np.random.default_rng(2)
    arrays = np_params(rng)
    params = to_params(arrays.values(), dtype)
    grads = [unit_ratios_grad(rng, p.detach().double().numpy()) for p in params]
    set_grads(params, grads)
    exact = [(p.detach().double().numpy(), p.grad.double().numpy()) for p in params]
    adaptive_clip_grad_(params, CLIP, EPS)
    for p, (pa, ga) in zip(params, exact):
        assert p.grad.dtype == dtype
        want = np_clip(pa, ga)
        np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=1e-2, atol=1e-8)


def test_channels_last_and_strided_grads_match_contiguous():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((8, 4, 3, 3))
    g = unit_ratios_grad(rng, p)
    a, b = to_params([p, p], torch.float32)
    a.grad = torch.tensor(g, dtype=torch.float32)
    b.grad = torch.tensor(g, dtype=torch.float32).to(memory_format=torch.channels_last)
    adaptive_clip_grad_([a, b])
    assert b.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_zero_params_use_eps_floor():
    p = nn.Parameter(torch.zeros(4, 2, 3, 3, dtype=torch.float64))
    s = nn.Parameter(torch.zeros((), dtype=torch.float64))
    p.grad = torch.ones_like(p)
    s.grad = torch.tensor(5.0, dtype=torch.float64)
    adaptive_clip_grad_([p, s], clipping=0.02, eps=1e-3)
    norms = unitwise_norm(p.grad).flatten()
    torch.testing.assert_close(norms, torch.full_like(norms, 1e-3 * 0.02), rtol=1e-12, atol=0)
    assert s.grad.item() == pytest.approx(1e-3 * 0.02, rel=1e-12)


def test_threshold_is_exact():
    # p norm 4, clipping 0.25: max_norm 1. At the threshold: untouched; just above: scaled to it.
    params = to_params([np.array([4.0, 0.0]), np.array([4.0, 0.0]), np.zeros(2)])
    set_grads(params, [np.array([0.0, 1.0]), np.array([0.0, 1.0 + 1e-9]), np.array([0.0, 3e-4])])
    adaptive_clip_grad_(params, clipping=0.25, eps=1e-3)
    assert params[0].grad.tolist() == [0.0, 1.0]
    assert params[1].grad.tolist() == [0.0, 1.0]
    assert params[2].grad.tolist() == [0.0, pytest.approx(2.5e-4, rel=1e-12)]  # eps floor


def test_params_without_grad_and_empty_params_are_skipped():
    a = nn.Parameter(torch.randn(3, 3))
    b = nn.Parameter(torch.randn(0, 3))
    b.grad = torch.zeros(0, 3)
    adaptive_clip_grad_([a, b])
    assert a.grad is None


def test_cpu_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(4)
    arrays = list(np_params(rng).values()) * 3
    grads = [unit_ratios_grad(rng, p) for p in arrays]
    results = []
    for chunk in (1, 1 << 40):
        monkeypatch.setattr(agc_clip, 'CPU_CHUNK_BYTES', chunk)
        params = to_params(arrays, torch.float32)
        set_grads(params, grads)
        adaptive_clip_grad_(params)
        results.append([p.grad for p in params])
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize('check', [False, True])
def test_batched_device_path_matches_chunked_cpu_path(monkeypatch, check):
    # the path used off CPU (one batch, one host read at most), exercised here on CPU
    rng = np.random.default_rng(10)
    arrays = list(np_params(rng).values()) * 3  # same-shape weights: stacked off CPU
    grads = [unit_ratios_grad(rng, p) for p in arrays]
    a, b = to_params(arrays, torch.float32), to_params(arrays, torch.float32)
    set_grads(a, grads)
    set_grads(b, grads)
    adaptive_clip_grad_(a, error_if_nonfinite=check)
    monkeypatch.setattr(agc_clip, '_immediate', lambda device: False)
    adaptive_clip_grad_(b, error_if_nonfinite=check)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)
    if check:
        set_grads(b, grads)
        b[1].grad[0, 0] = float('nan')
        before = [p.grad.clone() for p in b]
        with pytest.raises(FloatingPointError, match='parameter 1'):
            adaptive_clip_grad_(b, error_if_nonfinite=True)
        for p, g in zip(b, before):  # batched path: nothing modified, clippable grads included
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


def test_error_if_nonfinite():
    params = to_params([np.ones((3, 2)), np.ones(3)], torch.float32)
    set_grads(params, [np.ones((3, 2)), np.array([1.0, np.inf, 0.0])])
    adaptive_clip_grad_(params)  # no check: passes, the inf unit is not repaired
    assert not torch.isfinite(params[1].grad).all()
    set_grads(params, [np.ones((3, 2)), np.array([1.0, np.nan, 0.0])])
    with pytest.raises(FloatingPointError, match=r'parameter 1 \(shape \(3,\)\)'):
        adaptive_clip_grad_(params, error_if_nonfinite=True)
    assert torch.isnan(params[1].grad[1])
    assert torch.equal(params[0].grad, torch.ones(3, 2))  # would be clipped: left untouched


# --------------------------------------------------------------------------- optimizers

def reference_setup(seed, dtype):
    """Groups: clipped with decay, clipped without decay, unclipped (classifier-like)."""
    rng = np.random.default_rng(seed)
    arr = np_params(rng)
    arr['head'] = rng.standard_normal((3, 6)) * 0.1
    arr['no_grad'] = rng.standard_normal((2, 2))
    names = list(arr)
    params = dict(zip(names, to_params(arr.values(), dtype)))
    layout = [  # (names, weight decay, clipping)
        (['conv', 'linear', 'conv1d', 'zero_conv', 'no_grad'], 1e-3, CLIP),
        (['bias', 'scalar', 'zero_scalar'], 0.0, 0.02),
        (['head'], 1e-3, None),
    ]
    groups = [{'params': [params[n] for n in ns], 'weight_decay': wd, 'clipping': c}
              for ns, wd, c in layout]
    wds = {n: wd for ns, wd, _ in layout for n in ns}
    clips = {n: c for ns, _, c in layout for n in ns}
    return rng, arr, params, groups, wds, clips


def step_both(rng, opt, ref, params, names, wds, clips):
    """One step of the optimizer and of the NumPy reference on the same fresh gradients."""
    grads = [None if n == 'no_grad' else unit_ratios_grad(rng, ref.params[i], clips[n] or CLIP)
             for i, n in enumerate(names)]
    set_grads(params.values(), grads)
    opt.step()
    ref.step(grads, [wds[n] for n in names], [clips[n] for n in names])


@pytest.mark.parametrize('dtype,rtol,foreach', [
    (torch.float64, 1e-10, False), (torch.float64, 1e-10, True), (torch.float32, 2e-5, True)])
def test_sgdagc_matches_numpy_reference_over_steps(dtype, rtol, foreach):
    rng, arr, params, groups, wds, clips = reference_setup(5, dtype)
    names = list(arr)
    opt = SGDAGC(groups, lr=0.5, foreach=foreach)
    ref = NpSGDAGC(arr.values(), lr=0.5)
    for _ in range(5):
        step_both(rng, opt, ref, params, names, wds, clips)
        for i, n in enumerate(names):
            np.testing.assert_allclose(params[n].detach().double().numpy(), ref.params[i],
                                       rtol=rtol, atol=rtol * 1e-3, err_msg=n)
            if n != 'no_grad':
                buf = opt.state[params[n]]['momentum_buffer']
                np.testing.assert_allclose(buf.double().numpy(), ref.bufs[i], rtol=rtol,
                                           atol=rtol * 1e-3, err_msg=n)
    assert torch.equal(params['no_grad'], torch.tensor(arr['no_grad'], dtype=dtype))
    assert params['no_grad'] not in opt.state


@pytest.mark.parametrize('chunk_bytes,foreach,variant', [
    (1, True, {}), (1, False, {}), (1 << 40, True, {}), (1 << 40, False, {}),
    (1, False, dict(nesterov=False, dampening=0.1, weight_decay=0.0)),
    (1, False, dict(maximize=True)), (1, False, dict(momentum=0.0, nesterov=False)),
])
def test_sgdagc_is_clip_then_torch_sgd_bit_exact(monkeypatch, chunk_bytes, foreach, variant):
    monkeypatch.setattr(agc_clip, 'CPU_CHUNK_BYTES', chunk_bytes)  # chunked updates on CPU
    rng = np.random.default_rng(6)
    arrays = list(np_params(rng).values()) * 2
    a, b = to_params(arrays, torch.float32), to_params(arrays, torch.float32)
    kw = {**dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=foreach), **variant}
    opt_a, opt_b = SGDAGC(a, clipping=CLIP, **kw), torch.optim.SGD(b, **kw)
    for _ in range(3):
        grads = [unit_ratios_grad(rng, p.detach().numpy()) for p in a]
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        adaptive_clip_grad_(b, CLIP)
        opt_b.step()
        for x, y in zip(a, b):  # the gradients are left clipped, as torch's step leaves them
            assert torch.equal(x.grad, y.grad)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        if kw['momentum']:
            assert torch.equal(opt_a.state[x]['momentum_buffer'], opt_b.state[y]['momentum_buffer'])


@pytest.mark.parametrize('variant', [{}, dict(maximize=True), dict(nesterov=False, dampening=0.3)])
def test_sgdagc_bit_exact_for_half_and_non_contiguous_params(monkeypatch, variant):
    # the scratch buffer must take the parameter's memory order: an elementwise op's output
    # layout picks its inner loop, which changes bf16/fp16 rounding (and the buffers' strides)
    monkeypatch.setattr(agc_clip, 'CPU_CHUNK_BYTES', 1)
    rng = np.random.default_rng(8)

    def make():
        torch.manual_seed(0)
        conv = torch.randn(16, 8, 3, 3)
        lin = torch.randn(12, 10)
        return [nn.Parameter(conv.contiguous(memory_format=torch.channels_last)),
                nn.Parameter(conv.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)),
                nn.Parameter(conv.to(torch.float16).contiguous(memory_format=torch.channels_last)),
                nn.Parameter(lin.to(torch.bfloat16).t()),  # not contiguous; its gradient is
                nn.Parameter(lin.to(torch.bfloat16))]
    a, b = make(), make()
    kw = {**dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=False), **variant}
    opt_a, opt_b = SGDAGC(a, clipping=CLIP, **kw), torch.optim.SGD(b, **kw)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.tensor(rng.standard_normal(x.shape), dtype=x.dtype)
            x.grad = torch.empty_like(x).copy_(g) if x.is_contiguous(memory_format=torch.channels_last) \
                and x.dim() == 4 else g
            y.grad = x.grad.clone()
        opt_a.step()
        adaptive_clip_grad_(b, CLIP)
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y) and torch.equal(x.grad, y.grad)
        buf_a, buf_b = opt_a.state[x]['momentum_buffer'], opt_b.state[y]['momentum_buffer']
        assert torch.equal(buf_a, buf_b) and buf_a.stride() == buf_b.stride()


@pytest.mark.parametrize('cls,base,kw', [
    (AdamWAGC, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    (LambAGC, Lamb, dict(lr=1e-2, weight_decay=0.05)),
    (with_agc(torch.optim.RMSprop), torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
])
def test_agc_optimizers_clip_then_delegate(cls, base, kw):
    rng = np.random.default_rng(7)
    arrays = list(np_params(rng).values())
    a, b = to_params(arrays), to_params(arrays)
    opt_a, opt_b = cls(a, clipping=CLIP, **kw), base(b, **kw)
    for _ in range(3):
        grads = [unit_ratios_grad(rng, p.detach().numpy()) for p in a]
        set_grads(a, grads)
        set_grads(b, [np_clip(p.detach().numpy(), g) for p, g in zip(b, grads)])  # NumPy clip
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_with_agc_generic_class():
    cls = with_agc(torch.optim.RMSprop)
    assert with_agc(torch.optim.RMSprop) is cls and issubclass(cls, torch.optim.RMSprop)
    assert with_agc(torch.optim.AdamW) is AdamWAGC and with_agc(SGDAGC) is SGDAGC
    with pytest.raises(TypeError, match='Optimizer subclass'):
        with_agc(nn.Linear)


def test_closure_is_evaluated_before_clipping():
    model = TinyNet()
    ref = copy.deepcopy(model)
    x, y = batch(0)
    opt = SGDAGC(agc_param_groups(model), lr=0.1)
    opt_ref = SGDAGC(agc_param_groups(ref), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    F.cross_entropy(ref(x), y).backward()
    opt_ref.step()
    assert torch.is_tensor(loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_step_hooks_run_once():
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # torch now wraps SGD.step with its hooks
    p = nn.Parameter(torch.randn(3, 3))
    opt = SGDAGC([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append('pre'))
    opt.register_step_post_hook(lambda *a: calls.append('post'))
    p.grad = torch.randn(3, 3)
    opt.step()
    assert calls == ['pre', 'post']


# --------------------------------------------------------------------------- groups and timm

def test_agc_param_groups_paper_grouping():
    model = TinyNet()
    groups = agc_param_groups(model, weight_decay=2e-5, clipping=0.01)
    by_param = {id(p): g for g in groups for p in g['params']}
    assert len(by_param) == len(list(model.parameters()))
    assert by_param[id(model.fc.weight)]['clipping'] is None
    assert by_param[id(model.fc.weight)]['weight_decay'] == 2e-5
    conv = by_param[id(model.conv.weight)]
    assert conv['clipping'] == 0.01 and conv['weight_decay'] == 2e-5
    for p in (model.fc.bias, model.conv.bias, model.gain, model.skip_gain):
        assert by_param[id(p)]['clipping'] == 0.01 and by_param[id(p)]['weight_decay'] == 0.0
    inherit = agc_param_groups(model)  # values come from the optimizer
    assert 'clipping' not in inherit[0] and 'weight_decay' not in inherit[0]
    assert inherit[1]['weight_decay'] == 0.0 and inherit[2]['clipping'] is None


def test_agc_param_groups_timm_nfnet_layout_and_wrappers():
    model = timm.create_model('test_nfnet', num_classes=7)
    groups = agc_param_groups(nn.DataParallel(model))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]['params']}
    assert [names[id(p)] for p in groups[2]['params']] == ['head.fc.weight']
    assert 'head.fc.bias' in no_decay
    gains = {n for n in names.values() if n.endswith('.gain')}  # (O,1,1,1): found by name
    assert gains and gains <= no_decay
    assert all(p.ndim > 1 for p in groups[0]['params'])


def test_agc_param_groups_see_through_torch_compile_and_find_two_heads():
    """Compiled models' names carry ``_orig_mod.``: no_weight_decay() patterns must still match;
    distilled models return two classifiers (a tuple), repvit a head module holding its linears."""
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=5)
    plain, compiled = agc_param_groups(vit), agc_param_groups(torch.compile(vit))
    assert [[id(p) for p in g['params']] for g in plain] == [[id(p) for p in g['params']] for g in compiled]
    no_decay = {id(p) for p in plain[1]['params']}
    assert id(vit.cls_token) in no_decay and id(vit.pos_embed) in no_decay  # from vit.no_weight_decay()
    deit = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=5)
    heads = {id(p) for p in agc_param_groups(deit)[-1]['params']}
    assert heads == {id(deit.head.weight), id(deit.head_dist.weight)}
    with pytest.raises(ValueError, match=r'num_classes=0\?'):
        agc_param_groups(timm.create_model('vit_tiny_patch16_224', num_classes=0))
    repvit = timm.create_model('repvit_m1', num_classes=5)  # get_classifier(): a module holding two linears
    heads = {id(p) for p in agc_param_groups(repvit)[-1]['params']}
    linears = [m for m in repvit.get_classifier().modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and heads == {id(m.weight) for m in linears}


def test_loading_a_state_dict_with_a_bad_clipping_is_refused_and_changes_nothing():
    p = nn.Parameter(torch.ones(3))
    opt = SGDAGC([p], lr=1.0, clipping=0.02)
    state = opt.state_dict()
    state['param_groups'][0]['clipping'] = -5.0  # would flip and amplify the gradient
    with pytest.raises(ValueError, match='clipping must be a finite number > 0, got -5.0'):
        opt.load_state_dict(state)
    assert opt.param_groups[0]['clipping'] == 0.02 and opt.param_groups[0]['params'][0] is p


def test_loading_a_plain_state_dict_keeps_the_unclipped_classifier():
    model = TinyNet()
    opt = SGDAGC(agc_param_groups(model), lr=0.1, clipping=0.02)
    plain = torch.optim.SGD(agc_param_groups(model), lr=0.1, momentum=0.9)  # same groups, no AGC keys
    opt.load_state_dict(plain.state_dict())
    assert [g['clipping'] for g in opt.param_groups] == [0.02, 0.02, None]


def test_registered_names_and_lookahead():
    assert set(agc.AGC_OPTIMIZER_NAMES) <= set(list_optimizers())
    model = TinyNet()
    for name, cls in [('sgdagc', SGDAGC), ('adamwagc', AdamWAGC), ('lambagc', LambAGC)]:
        opt = create_optimizer_v2(model, name, lr=0.1, weight_decay=1e-4, clipping=0.02)
        assert type(opt) is cls
        assert all(g['clipping'] == 0.02 for g in opt.param_groups)  # --opt-kwargs clipping=
    opt = create_optimizer_v2(model, 'sgdagc', lr=0.1)
    assert opt.defaults['momentum'] == 0.9 and opt.defaults['nesterov'] is True
    la = create_optimizer_v2(model, 'lookahead_sgdagc', lr=0.1)
    assert isinstance(la, Lookahead) and type(la._base_optimizer) is SGDAGC
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    la.step()


def test_create_optimizer_v2_param_group_fn_leaves_classifier_unclipped():
    model = TinyNet().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, 'sgdagc', lr=0.1, weight_decay=0.0, momentum=0.0,
                              nesterov=False, clipping=CLIP, param_group_fn=agc_param_groups)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # far above every threshold
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(before['fc.weight'] - after['fc.weight'].detach(),
                               torch.full_like(before['fc.weight'], 10.0))  # lr * raw grad
    for n in ('fc.bias', 'conv.weight', 'gain'):
        moved = np_clip(before[n].double().numpy(), np.full(before[n].shape, 100.0)) * 0.1
        np.testing.assert_allclose((before[n] - after[n].detach()).double().numpy(), moved,
                                   rtol=1e-5, err_msg=n)


def test_plain_parameter_list_is_all_clipped():
    model = TinyNet()
    opt = create_optimizer_v2(list(model.parameters()), 'sgdagc', lr=0.1)
    assert all(g['clipping'] == CLIP for g in opt.param_groups)


def test_register_agc_optimizer_generic(monkeypatch):
    from timm.optim._optim_factory import OptimizerRegistry, _register_adam_variants
    registry = OptimizerRegistry()
    _register_adam_variants(registry)
    info = register_agc_optimizer('nadamwtest', 'adamw', registry=registry)
    assert info.has_betas and issubclass(info.opt_class, torch.optim.AdamW)
    assert registry.get_optimizer_info('nadamwtest').opt_class is AdamWAGC
    with pytest.raises(ValueError, match="without '_'"):
        register_agc_optimizer('adamw_agc', 'adamw', registry=registry)


# --------------------------------------------------------------------------- training conditions

@pytest.mark.parametrize('fused', [False, True])
def test_gradscaler_clips_unscaled_grads(fused):
    torch.manual_seed(0)
    model_a = TinyNet()
    model_b = copy.deepcopy(model_a)
    opt_a = SGDAGC(agc_param_groups(model_a, 1e-4), lr=0.5, clipping=CLIP, fused=fused)
    opt_b = SGDAGC(agc_param_groups(model_b, 1e-4), lr=0.5, clipping=CLIP)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 14)
    clipped_units = 0
    for step in range(3):
        x, y = batch(step)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            if opt is opt_a:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                w, g = model.conv.weight.detach().numpy(), model.conv.weight.grad.numpy()
                clipped_units += int((np_unitwise_norm(g) > np_unitwise_norm(w) * CLIP).sum())
                opt.step()
    assert clipped_units > 0  # clipping is active, so clipping scaled grads would differ
    assert scaler.get_scale() == 2.0 ** 14
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_gradscaler_skips_inf_step_and_leaves_no_nan():
    torch.manual_seed(0)
    model = TinyNet()
    opt = SGDAGC(agc_param_groups(model, 1e-4), lr=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)

    def step(poison):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(batch(1)[0]), batch(1)[1])).backward()
        if poison:
            model.conv.weight.grad[0, 0, 0, 0] = float('inf')
        scaler.step(opt)
        scaler.update()

    step(False)
    snap = snapshot(model, opt)
    step(True)
    assert_unchanged(model, opt, snap)
    assert scaler.get_scale() == 2.0 ** 9
    step(False)
    assert not torch.equal(model.conv.weight, snap[0][0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize('where', ['conv.weight', 'fc.weight'])  # clipped and unclipped group
def test_nonfinite_without_scaler_raises_by_default(where):
    model = TinyNet()
    opt = SGDAGC(agc_param_groups(model), lr=0.1)
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    opt.step()
    snap = snapshot(model, opt)
    model.get_parameter(where).grad.view(-1)[1] = float('nan')
    with pytest.raises(FloatingPointError, match=r"param_groups\[\d\]\['params'\]\[\d\] \(shape"):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_nonfinite_skip_mode_skips_and_counts():
    model = TinyNet()
    opt = AdamWAGC(agc_param_groups(model), lr=0.1, nonfinite='skip')
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    opt.step()
    snap = snapshot(model, opt)
    model.gain.grad[0] = float('-inf')
    with pytest.warns(RuntimeWarning, match='skipped a step'):
        opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(model, opt, snap)
    opt.zero_grad()
    F.cross_entropy(model(batch(1)[0]), batch(1)[1]).backward()
    opt.step()
    assert not torch.equal(model.conv.weight, snap[0][0])


def test_gradient_accumulation_clips_once_per_step():
    torch.manual_seed(0)
    model = TinyNet()
    w0 = [p.detach().double().numpy().copy() for p in model.parameters()]
    micro = []
    for seed in (3, 4):  # each micro-batch's gradients, from a copy
        m = copy.deepcopy(model)
        (F.cross_entropy(m(batch(seed)[0]), batch(seed)[1]) / 2).backward()
        micro.append([p.grad.double().numpy() for p in m.parameters()])
    opt = SGDAGC(list(model.parameters()), lr=0.5, clipping=CLIP)
    for seed in (3, 4):
        (F.cross_entropy(model(batch(seed)[0]), batch(seed)[1]) / 2).backward()
    opt.step()
    ref = NpSGDAGC(w0, lr=0.5)
    ref.step([a + b for a, b in zip(*micro)], [0.0] * len(w0), [CLIP] * len(w0))
    for p, want in zip(model.parameters(), ref.params):
        np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=1e-5, atol=1e-7)
    # clipping each micro-batch would give another result: the test can tell them apart
    assert any(not np.allclose(np_clip(w, a) + np_clip(w, b), np_clip(w, a + b))
               for w, a, b in zip(w0, *micro))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyNet()
    opt = SGDAGC(agc_param_groups(model, 1e-4, clipping=0.02), lr=0.3)
    for seed in range(2):
        opt.zero_grad()
        F.cross_entropy(model(batch(seed)[0]), batch(seed)[1]).backward()
        opt.step()
    model2 = copy.deepcopy(model)
    opt2 = SGDAGC(agc_param_groups(model2), lr=0.9, clipping=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [g['clipping'] for g in opt2.param_groups] == [0.02, 0.02, None]
    for seed in range(2, 4):
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            F.cross_entropy(m(batch(seed)[0]), batch(seed)[1]).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt3 = SGDAGC(model.parameters(), lr=0.1, clipping=0.03)
    opt3.load_state_dict(plain.state_dict())  # saved without AGC keys: defaults filled in
    assert opt3.param_groups[0]['clipping'] == 0.03 and opt3.param_groups[0]['agc_eps'] == EPS


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('value', [0, -0.01, float('nan'), float('inf')])
def test_bad_clipping_is_rejected_at_construction(value):
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match='clipping must be a finite number > 0'):
        adaptive_clip_grad_([p], clipping=value)
    with pytest.raises(ValueError, match='clipping'):
        SGDAGC([p], lr=0.1, clipping=value)
    with pytest.raises(ValueError, match='clipping'):
        SGDAGC([{'params': [p], 'clipping': value}], lr=0.1)
    with pytest.raises(ValueError, match='clipping'):
        agc_param_groups(TinyNet(), clipping=value)
    with pytest.raises(ValueError, match='clipping'):
        create_optimizer_v2(TinyNet(), 'sgdagc', lr=0.1, clipping=value)


@pytest.mark.parametrize('value', [0, -1e-3, float('nan')])
def test_bad_eps_is_rejected(value):
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match='eps must be a finite number > 0'):
        adaptive_clip_grad_([p], eps=value)
    with pytest.raises(ValueError, match='agc_eps'):
        LambAGC([p], agc_eps=value)


def test_bad_types_and_modes():
    with pytest.raises(TypeError, match='parameters\\[1\\] is a int'):
        adaptive_clip_grad_([nn.Parameter(torch.ones(1)), 3])
    with pytest.raises(TypeError, match='clipping must be a number'):
        adaptive_clip_grad_([nn.Parameter(torch.ones(1))], clipping='0.01')
    with pytest.raises(TypeError, match='Tensor'):
        SGDAGC([nn.Parameter(torch.ones(1)), 'w'], lr=0.1)
    with pytest.raises(ValueError, match='nonfinite must be one of'):
        SGDAGC([nn.Parameter(torch.ones(1))], nonfinite='ignore')
    sparse = nn.Parameter(torch.ones(3))
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match='sparse'):
        adaptive_clip_grad_([sparse])
    cplx = nn.Parameter(torch.ones(2, 3, dtype=torch.complex64))
    cplx.grad = torch.ones_like(cplx)
    with pytest.raises(TypeError, match='complex parameters'):
        adaptive_clip_grad_([cplx])
    with pytest.raises(TypeError, match='complex parameters'):
        SGDAGC([cplx], lr=0.1).step()


def test_model_without_classifier_is_rejected():
    with pytest.raises(ValueError, match='get_classifier'):
        agc_param_groups(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match='num_classes=0'):
        agc_param_groups(TinyNet(num_classes=0))
    with pytest.raises(ValueError, match='get_classifier'):
        create_optimizer_v2(nn.Sequential(nn.Linear(2, 2)), 'sgdagc', lr=0.1,
                            param_group_fn=agc_param_groups)


# --------------------------------------------------------------------------- CUDA

@CUDA
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    rng = np.random.default_rng(8)
    arrays = list(np_params(rng).values())
    grads = [unit_ratios_grad(rng, p) for p in arrays]
    cpu, gpu = to_params(arrays, dtype), to_params(arrays, dtype, 'cuda')
    set_grads(cpu, grads)
    set_grads(gpu, grads)
    adaptive_clip_grad_(cpu)
    adaptive_clip_grad_(gpu)
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.grad.cpu(), a.grad, **tol)


@CUDA
def test_cuda_sgdagc_reference_and_nonfinite():
    rng, arr, params, groups, wds, clips = reference_setup(9, torch.float64)
    names = list(arr)
    for p in params.values():
        p.data = p.data.cuda()
    opt = SGDAGC(groups, lr=0.5)
    ref = NpSGDAGC(arr.values(), lr=0.5)
    for _ in range(3):
        step_both(rng, opt, ref, params, names, wds, clips)
    for i, n in enumerate(names):
        np.testing.assert_allclose(params[n].detach().cpu().numpy(), ref.params[i], rtol=1e-10)
    params['conv'].grad[0, 0, 0, 0] = float('inf')
    before = params['conv'].grad.clone()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(params['conv'].grad, before)  # off CPU nothing is modified


def test_integer_hyperparameters_in_added_groups_are_stored_as_floats():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = SGDAGC([w], lr=0.1, clipping=0.01)
    extra = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({'params': [extra], 'agc_eps': 1, 'clipping': 1})
    assert opt.param_groups[1]['agc_eps'] == 1.0 and isinstance(opt.param_groups[1]['agc_eps'], float)
    before = extra.detach().clone()
    w.grad, extra.grad = torch.randn(4, 3), torch.full((5,), 100.0)
    opt.step()  # used to fail on the int eps
    # clip to max(|p|, 1) * 1, then Nesterov momentum 0.9 from an empty buffer: lr * 1.9 * clipped
    expected = 0.1 * 1.9 * max(before.norm().item(), 1.0)
    assert (extra.detach() - before).norm().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('batched', [False, True])  # True: the GPU (one batch per bucket) path, run on CPU
def test_optimizer_counts_clipped_units_until_read(batched, monkeypatch):
    from timm_nfnet_ext.agc import SGDAGC
    from timm_nfnet_ext.agc import clip as clip_mod
    if batched:
        monkeypatch.setattr(clip_mod, '_immediate', lambda device: False)
    lin = torch.nn.Linear(4, 3, bias=True)
    opt = SGDAGC(lin.parameters(), lr=0.0, clipping=0.01, nonfinite='skip')  # lr 0: weights stay put

    def set_grads(bias_grad=0.03):
        with torch.no_grad():
            lin.weight.copy_(torch.eye(3, 4))          # each row (unit) has norm 1
            lin.bias.copy_(torch.tensor([0.0, 3.0, 4.0]))  # one unit, norm 5
        lin.weight.grad = torch.tensor([[0.005, 0, 0, 0], [0.02, 0, 0, 0], [0, 0.5, 0, 0]])
        lin.bias.grad = torch.tensor([bias_grad, 0.0, 0.0])  # 0.03 < 0.01 * 5: not clipped
    set_grads()
    opt.step()
    set_grads(bias_grad=1.0)  # now the bias unit is clipped too
    opt.step()
    assert opt.pop_clip_stats() == (2 + 3, 4 + 4)
    assert opt.pop_clip_stats() == (0, 0)  # read resets
    set_grads(bias_grad=float('nan'))
    with pytest.warns(RuntimeWarning, match='skipped a step'):
        opt.step()
    assert opt.pop_clip_stats() == (0, 0)  # a skipped step counts nothing
    opt.param_groups[0]['clipping'] = None
    set_grads()
    opt.step()
    assert opt.pop_clip_stats() == (0, 0)  # unclipped groups are not looked at


def test_agc_optimizer_survives_deepcopy_and_pickle():
    import copy
    import io
    from timm_nfnet_ext.agc import SGDAGC
    lin = torch.nn.Linear(4, 3)
    opt = SGDAGC([lin.weight], lr=0.1, clipping=0.02, agc_eps=2e-3, nonfinite='skip')
    opt.skipped_steps = 2
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(opt), torch.load(buf, weights_only=False)):
        assert (clone.nonfinite, clone.skipped_steps) == ('skip', 2)
        clone.add_param_group({'params': [torch.nn.Parameter(torch.ones(3))]})  # needs the AGC defaults
        assert clone.param_groups[-1]['clipping'] == 0.02 and clone.param_groups[-1]['agc_eps'] == 2e-3
        assert clone.pop_clip_stats() == (0, 0)
