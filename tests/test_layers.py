"""The hand-written pieces of layers.py against their plain definitions."""
import pytest
import torch
import torch.nn.functional as F

from timm_nfnet_ext.layers import GAMMAS, Activation, WSConv2d, conv2d_same, same_pads, standardize_weight


def _reference_ws(w, gain, c, eps):
    """NFNETS.md: scale = rsqrt(max(var * fan_in, eps)) * gain; w_hat = w * scale - mean * scale."""
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=eps)) * (gain * c).view(-1, 1, 1, 1)
    return w * scale - mean * scale


@pytest.mark.parametrize('floor', ['no_row', 'one_row', 'every_row'])
def test_standardize_weight_value_and_gradients(floor):
    """No row on the eps floor: batch norm's backward kernel; otherwise the written-out one."""
    torch.manual_seed(0)
    eps = 1e3 if floor == 'every_row' else 1e-4
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(6, dtype=torch.float64, requires_grad=True)
    if floor == 'one_row':
        with torch.no_grad():
            w[2] = 0.5  # a constant row: zero variance, on the floor even at eps=1e-4
    assert torch.autograd.gradcheck(lambda w, g: standardize_weight(w, g, 1.7, eps), (w, gain))
    out = standardize_weight(w, gain, 1.7, eps)
    ref = _reference_ws(w, gain, 1.7, eps)
    assert torch.allclose(out, ref, atol=1e-12)
    go = torch.randn_like(out)
    ours = torch.autograd.grad((out * go).sum(), (w, gain))
    theirs = torch.autograd.grad((ref * go).sum(), (w, gain))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.isfinite(ours[0]).all()
    # the GPU path (the plain expression) gives the same values
    from timm_nfnet_ext.layers import _standardize_weight_autograd
    assert torch.allclose(_standardize_weight_autograd(w, gain, 1.7, eps), out, atol=1e-12)


def test_ws_conv_init_and_zero_weights_stay_finite():
    conv = WSConv2d(8, 16, 3)
    assert conv.weight.std().item() == pytest.approx((1 / 72) ** 0.5, rel=0.15)
    assert torch.equal(conv.gain, torch.ones(16)) and torch.equal(conv.bias, torch.zeros(16))
    with torch.no_grad():
        conv.weight.zero_()
    y = conv(torch.randn(1, 8, 5, 5, requires_grad=True))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize('size,k,s,expected', [(64, 3, 2, (0, 1)), (45, 3, 2, (1, 1)), (8, 3, 1, (1, 1)),
                                               (7, 1, 1, (0, 0)), (5, 2, 2, (0, 1)), (4, 2, 2, (0, 0))])
def test_same_pads_is_xla_same(size, k, s, expected):
    assert same_pads(size, k, s) == expected


@pytest.mark.parametrize('h,w', [(8, 8), (9, 8), (8, 9), (7, 7)])
def test_conv2d_same_matches_explicit_padding(h, w):
    x = torch.randn(2, 4, h, w)
    weight = torch.randn(6, 2, 3, 3)
    (t, b), (l, r) = same_pads(h, 3, 2), same_pads(w, 3, 2)
    ref = F.conv2d(F.pad(x, (l, r, t, b)), weight, None, 2, 0, 1, 2)
    assert torch.allclose(conv2d_same(x, weight, None, 2, 2), ref, atol=1e-5)


def test_gelu_is_the_tanh_form_and_inplace_only_without_autograd():
    x = torch.randn(1000, dtype=torch.float64)
    act = Activation('gelu', scale=GAMMAS['gelu'], inplace=True)
    tanh_form = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))) * GAMMAS['gelu']
    assert torch.allclose(act(x.clone()), tanh_form, atol=1e-12)
    xr = x.clone().requires_grad_()
    y = act(xr)
    assert torch.equal(xr.detach(), x)  # autograd needs the input: not overwritten
    y.sum().backward()
    buf = x.clone()
    with torch.no_grad():
        out = act(buf)
    assert out.data_ptr() == buf.data_ptr()  # inference: overwritten in place, no new buffer



def _tanh_gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'strided'])
def test_fast_nograd_gelu_matches_the_tanh_form(layout, monkeypatch):
    from timm_nfnet_ext import layers
    from timm_nfnet_ext.layers import gelu_tanh
    monkeypatch.setattr(layers, '_GELU_CHUNK', 4096)  # several chunks at a test's size
    # more elements than one chunk, and not a multiple of it; values far into both tails
    x = torch.randn(3, 37, 11, 9) * 4
    assert x.numel() > layers._GELU_CHUNK and x.numel() % layers._GELU_CHUNK
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


def test_fast_nograd_gelu_is_used_only_without_autograd():
    act = Activation('gelu')  # not in place: the block's input activation
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = act(x)
    assert torch.allclose(y.double(), _tanh_gelu64(x), atol=2e-6) and y.data_ptr() != x.data_ptr()
    assert y.grad_fn is None


def _gelu_grad64(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    xd = x.detach().double().requires_grad_()
    _tanh_gelu64(xd).backward(g.double())
    return xd.grad


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('grad_layout', ['same', 'other', 'expanded'])
def test_fast_cpu_gelu_backward_matches_the_tanh_form(layout, grad_layout, monkeypatch):
    from timm_nfnet_ext import layers
    from timm_nfnet_ext.layers import gelu_tanh
    monkeypatch.setattr(layers, '_GELU_CHUNK', 4096)
    x = torch.randn(3, 37, 11, 9) * 4  # more than one chunk, not a multiple of it
    assert x.numel() > layers._GELU_CHUNK and x.numel() % layers._GELU_CHUNK
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


def test_fast_cpu_gelu_keeps_its_output_and_sigmoid_not_its_input():
    from timm_nfnet_ext.layers import gelu_tanh
    x = torch.randn(4, 16, 9, 9, requires_grad=True)
    inp = x * 1.0  # a non-leaf, like a conv output
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gelu_tanh(inp)
    assert len(saved) == 2 and all(t.shape == x.shape for t in saved)
    assert any(t.data_ptr() == y.data_ptr() for t in saved)  # the output (the next conv keeps it anyway)
    assert all(t.data_ptr() != inp.data_ptr() for t in saved)  # the input can be freed


def test_fast_cpu_gelu_refuses_double_backward_and_can_be_switched_off():
    from timm_nfnet_ext.layers import fast_cpu_gelu, gelu_tanh
    x = torch.randn(50, requires_grad=True)
    (gx,) = torch.autograd.grad(gelu_tanh(x).sum(), x)  # first order: fine
    with pytest.raises(RuntimeError, match=r'double backward.*fast_cpu_gelu\(False\)'):
        torch.autograd.grad(gelu_tanh(x).sum(), x, create_graph=True)
    with fast_cpu_gelu(False):
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
    from timm_nfnet_ext.layers import gelu_tanh
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


def test_inplace_gelu_in_training_overwrites_only_non_leaf_inputs(monkeypatch):
    from timm_nfnet_ext import layers
    monkeypatch.setattr(layers, '_GELU_CHUNK', 500)  # in place over several chunks
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


def test_fast_gelu_backward_stays_finite_for_huge_inputs():
    from timm_nfnet_ext.layers import gelu_tanh
    x = torch.tensor([1e3, 1e8, 1e14, 1e20, -1e3, -1e14, 30.0, -30.0], requires_grad=True)
    gelu_tanh(x * 1.0).sum().backward()  # x * 1.0: a non-leaf, the in-place-capable path
    ref = _gelu_grad64(x.detach(), torch.ones(8))
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad.double(), ref, atol=1e-6)


def test_ws_backward_uses_batch_norm_kernel_only_off_the_floor(monkeypatch):
    calls = []
    real = torch.ops.aten.native_batch_norm_backward

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)
    monkeypatch.setattr(torch.ops.aten, 'native_batch_norm_backward', Spy())
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    gain = torch.rand(6, requires_grad=True)
    standardize_weight(w, gain, 1.7).sum().backward()
    assert calls == [1]
    with torch.no_grad():
        w[2] = 0.5  # a row on the eps floor
    standardize_weight(w, gain, 1.7).sum().backward()
    assert calls == [1]  # the written-out gradient
