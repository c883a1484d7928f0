"""The hand-written CPU tanh-GELU (gelu.py) against the tanh form in float64 and ATen's kernels."""
import pytest
import torch
import torch.nn.functional as F

from timm_nfnet_ext.accel import gelu
from timm_nfnet_ext.accel import FastActivation as Activation
from timm_nfnet_ext.accel import configure, probes
from timm_nfnet_ext.accel.gelu import gelu_tanh


def _tanh_gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'strided'])
def test_fast_nograd_gelu_matches_the_tanh_form(layout, monkeypatch):
    monkeypatch.setattr(gelu, '_GELU_CHUNK', 4096)  # several chunks at a test's size
    # more elements than one chunk, and not a multiple of it; values far into both tails
    x = torch.randn(3, 37, 11, 9) * 4
    assert x.numel() > gelu._GELU_CHUNK and x.numel() % gelu._GELU_CHUNK
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == 'strided':
        x = x[:, ::2]  # not dense: ATen's kernel
    ref = _tanh_gelu64(x)
    kept = x.clone()
    out = gelu_tanh(x)
    assert torch.equal(x, kept)  # out of place leaves the input alone
    assert out.stride() == x.stride() or layout == 'strided'
    assert (out.double() - ref).abs().max().item() < 2e-6
    assert torch.allclose(out, F.gelu(x, approximate='tanh'), rtol=1e-6, atol=1e-6)
    inplace = gelu_tanh(x, inplace=True)
    assert inplace.data_ptr() == x.data_ptr() and torch.equal(inplace, out)


def _gelu_grad64(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    xd = x.detach().double().requires_grad_()
    _tanh_gelu64(xd).backward(g.double())
    return xd.grad


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('grad_layout', ['same', 'other', 'expanded'])
def test_fast_cpu_gelu_backward_matches_the_tanh_form(layout, grad_layout, monkeypatch):
    monkeypatch.setattr(gelu, '_GELU_CHUNK', 4096)
    x = torch.randn(3, 37, 11, 9) * 4  # more than one chunk, not a multiple of it
    assert x.numel() > gelu._GELU_CHUNK and x.numel() % gelu._GELU_CHUNK
    x.view(-1)[:6] = torch.tensor([-40.0, -12.0, -9.5, 0.0, 1e-20, 40.0])  # sigmoid underflows below ~-9.5
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = gelu_tanh(x)
    assert type(y.grad_fn).__name__ == '_GeluTanhCPUBackward'
    assert (y.detach().double() - _tanh_gelu64(x.detach())).abs().max().item() < 2e-6
    if grad_layout == 'expanded':
        g = torch.ones(()).expand(x.shape)  # what y.sum().backward() sends: stride 0
    else:
        g = torch.randn(x.shape)
        if (grad_layout == 'other') != (layout == 'channels_last'):
            g = g.contiguous(memory_format=torch.channels_last)
    y.backward(g)
    ref = _gelu_grad64(x, g)
    assert torch.isfinite(x.grad).all()
    assert (x.grad.double() - ref).abs().max().item() < 1e-5 * max(1.0, g.abs().max().item())
    assert x.grad.stride() == x.stride()


def test_fast_cpu_gelu_keeps_only_its_derivative():
    x = torch.randn(4, 16, 9, 9, requires_grad=True)
    inp = x * 1.0  # a non-leaf, like a conv output
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gelu_tanh(inp)
    assert len(saved) == 1 and saved[0].shape == x.shape  # one tensor, as ATen (which keeps the input)
    assert saved[0].data_ptr() not in (inp.data_ptr(), y.data_ptr())  # neither input nor output
    ref = _gelu_grad64(x.detach(), torch.ones_like(x))
    assert (saved[0].double() - ref).abs().max().item() < 3e-6  # d gelu / dx itself (ATen float32: ~1e-6 off)


def test_fast_cpu_gelu_refuses_double_backward_and_can_be_switched_off():
    x = torch.randn(50, requires_grad=True)
    (gx,) = torch.autograd.grad(gelu_tanh(x).sum(), x)  # first order: fine
    with pytest.raises(RuntimeError, match=r'double backward.*configure\(gelu=False\)'):
        torch.autograd.grad(gelu_tanh(x).sum(), x, create_graph=True)
    with configure(gelu=False):
        y = gelu_tanh(x)
        assert type(y.grad_fn).__name__ == 'GeluBackward0'  # ATen's, twice differentiable
        (g1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), x)
        xd = x.detach().double().requires_grad_()
        (r1,) = torch.autograd.grad(_tanh_gelu64(xd).sum(), xd, create_graph=True)
        (r2,) = torch.autograd.grad(r1.sum(), xd)
        assert torch.allclose(g1.double(), r1, atol=1e-5) and torch.allclose(g2.double(), r2, atol=1e-4)
        assert torch.allclose(gx, g1, atol=1e-5)
    assert type(gelu_tanh(x).grad_fn).__name__ == '_GeluTanhCPUBackward'


def test_gelu_under_vmap_and_forward_ad_falls_back_to_aten():
    import torch.autograd.forward_ad as fwAD
    act = Activation('gelu')
    x, v = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ref = F.gelu(x, approximate='tanh')
    assert torch.allclose(torch.func.vmap(act)(x), ref, atol=1e-6)  # functorch-wrapped: no out= ops
    out, tangent = torch.func.jvp(act, (x,), (v,))
    assert torch.allclose(out, ref, atol=1e-6)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(act(fwAD.make_dual(x, v)))
    assert torch.allclose(dual.tangent, tangent, atol=1e-6)
    tracked = x.clone().requires_grad_()
    y = gelu_tanh(tracked, inplace=True)  # a leaf: the fast autograd path, out of place
    assert type(y.grad_fn).__name__ == '_GeluTanhCPUBackward' and torch.equal(tracked.detach(), x)


def test_fast_gelu_backward_stays_finite_for_huge_inputs():
    x = torch.tensor([1e3, 1e8, 1e14, 1e20, -1e3, -1e14, 30.0, -30.0], requires_grad=True)
    gelu_tanh(x * 1.0).sum().backward()  # x * 1.0: a non-leaf, the in-place-capable path
    ref = _gelu_grad64(x.detach(), torch.ones(8))
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad.double(), ref, atol=1e-6)


def test_fast_nograd_gelu_is_used_only_without_autograd():
    act = Activation('gelu')  # not in place: the block's input activation
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = act(x)
    assert torch.allclose(y.double(), _tanh_gelu64(x), atol=2e-6) and y.data_ptr() != x.data_ptr()
    assert y.grad_fn is None


def test_inplace_gelu_in_training_overwrites_only_non_leaf_inputs(monkeypatch):
    monkeypatch.setattr(gelu, '_GELU_CHUNK', 500)  # in place over several chunks
    act = Activation('gelu', inplace=True)
    w = torch.randn(4, 8, 6, 6, requires_grad=True)
    conv_out = w * 2.0  # a non-leaf nothing else reads, like a conv output
    y = act(conv_out)
    assert y.data_ptr() == conv_out.data_ptr()  # in place: no new feature map
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(w.grad.double(), 2.0 * _gelu_grad64(w.detach() * 2.0, g), atol=1e-5)
    leaf = torch.randn(4, 8, 6, 6, requires_grad=True)
    kept = leaf.detach().clone()
    y = act(leaf)
    assert y.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), kept)


def test_inplace_gelu_leaves_views_and_hooked_outputs_alone():
    act = Activation('gelu', inplace=True)
    base = torch.randn(4, 8, 6, 6, requires_grad=True)
    view = base[:, :4]  # a view of a leaf: autograd refuses to modify it in place
    act(view).sum().backward()
    assert torch.allclose(base.grad[:, :4].double(), _gelu_grad64(base.detach()[:, :4], torch.ones(4, 4, 6, 6)),
                          atol=1e-5)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    conv.register_full_backward_hook(lambda *a: None)  # its output is a view made by a custom Function
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = act(conv(x))
    y.sum().backward()
    assert torch.allclose(y, F.gelu(conv(x), approximate='tanh'), atol=1e-6)


def _raise(*args, **kwargs):
    raise RuntimeError('a changed private API')


@pytest.mark.parametrize('query', [None, _raise])
def test_without_torchs_functorch_query_gelu_takes_atens_kernels(query, monkeypatch):
    """torch's private functorch query is looked up once at import; missing or failing, the
    hand-written passes step aside (ATen's GELU, bit for bit), with and without autograd."""
    monkeypatch.setattr(probes, 'FUNCTORCH_WRAPPED_QUERY', query)
    x = torch.randn(4, 8, 9, 9)
    assert not gelu._fast_cpu_dense(x)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate='tanh'))
    a = x.clone().requires_grad_()
    y = gelu_tanh(a * 1.0, inplace=True)
    assert 'GeluTanhCPU' not in type(y.grad_fn).__name__
    (g,) = torch.autograd.grad(y.sum(), a)
    b = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.gelu(b, approximate='tanh').sum(), b)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize('query', [None, _raise])
def test_without_torchs_view_query_training_gelu_keeps_its_input(query, monkeypatch):
    """Missing or failing, the view query answers 'a view': the training GELU runs out of place."""
    monkeypatch.setattr(probes, 'IS_VIEW_QUERY', query)
    a = torch.randn(4, 8, 9, 9, requires_grad=True)
    x = a * 1.0  # not a leaf, not a view: overwritten in place with the query
    before = x.detach().clone()
    y = gelu_tanh(x, inplace=True)
    assert y is not x and torch.equal(x.detach(), before)
    torch.testing.assert_close(y, F.gelu(before, approximate='tanh'), rtol=1e-6, atol=1e-6)
