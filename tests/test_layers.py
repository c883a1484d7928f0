"""The reference layers (layers/) and their hand-written speed paths (accel/) against the plain definitions."""
import pytest
import torch
import torch.nn.functional as F

from timm_nfnet_ext.accel import FastActivation
from timm_nfnet_ext.accel.weight_std import fast_standardize_weight
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
    assert torch.autograd.gradcheck(lambda w, g: fast_standardize_weight(w, g, 1.7, eps), (w, gain))
    out = fast_standardize_weight(w, gain, 1.7, eps)
    ref = _reference_ws(w, gain, 1.7, eps)
    assert torch.allclose(out, ref, atol=1e-12)
    go = torch.randn_like(out)
    ours = torch.autograd.grad((out * go).sum(), (w, gain))
    theirs = torch.autograd.grad((ref * go).sum(), (w, gain))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.isfinite(ours[0]).all()
    # the reference expression (layers/conv.py) gives the same values
    assert torch.allclose(standardize_weight(w, gain, 1.7, eps), out, atol=1e-12)

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
    act = FastActivation('gelu', scale=GAMMAS['gelu'], inplace=True)
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
    fast_standardize_weight(w, gain, 1.7).sum().backward()
    assert calls == [1]
    with torch.no_grad():
        w[2] = 0.5  # a row on the eps floor
    fast_standardize_weight(w, gain, 1.7).sum().backward()
    assert calls == [1]  # the written-out gradient


def _raise(*args, **kwargs):
    raise RuntimeError('a changed private API')


@pytest.mark.parametrize('patch', ['functorch_missing', 'functorch_raises', 'forward_ad_unreadable'])
def test_without_torchs_private_probes_ws_takes_the_plain_expression(patch, monkeypatch):
    """torch's private functorch / forward-AD queries are looked up once at import; where one is
    missing or fails, the CPU weight standardisation steps aside to the plain expression (same
    values and gradients)."""
    from timm_nfnet_ext.accel import probes as layers
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    gain = torch.rand(6, requires_grad=True)
    fast = fast_standardize_weight(w, gain, 1.7)
    assert type(fast.grad_fn).__name__ == '_StandardizeWeightBackward'
    assert not layers.functorch_active() and not layers.forward_ad_active()
    if patch == 'forward_ad_unreadable':
        monkeypatch.setattr(layers, 'FORWARD_AD_LEVEL_READABLE', False)
        assert layers.forward_ad_active()
    else:
        monkeypatch.setattr(layers, 'FUNCTORCH_PROBE', None if patch == 'functorch_missing' else _raise)
        assert layers.functorch_active()
    plain = fast_standardize_weight(w, gain, 1.7)
    assert type(plain.grad_fn).__name__ != '_StandardizeWeightBackward'
    torch.testing.assert_close(plain, fast, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad((plain * go).sum(), (w, gain)), torch.autograd.grad((fast * go).sum(), (w, gain))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_probes_see_torch_func_and_forward_ad():
    from torch.autograd import forward_ad
    from timm_nfnet_ext.accel import probes as layers
    seen = []
    torch.func.vmap(lambda t: seen.append(layers.functorch_active()) or t)(torch.randn(2, 3))
    with forward_ad.dual_level():
        seen.append(layers.forward_ad_active())
    assert seen == [True, True] and not layers.functorch_active() and not layers.forward_ad_active()


def test_forward_mode_ad_through_a_ws_conv_on_cpu():
    """Forward-mode AD through the weights (a dual-level open): the plain expression, whose jvp
    matches a central difference."""
    from torch.autograd import forward_ad
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3, input_scale=1.3).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    params = {n: p.detach() for n, p in conv.named_parameters()}
    tangent = torch.randn_like(params['weight'])
    with forward_ad.dual_level():
        dual = dict(params, weight=forward_ad.make_dual(params['weight'], tangent))
        jvp = forward_ad.unpack_dual(torch.func.functional_call(conv, dual, (x,))).tangent
    h = 1e-6
    plus = torch.func.functional_call(conv, dict(params, weight=params['weight'] + h * tangent), (x,))
    minus = torch.func.functional_call(conv, dict(params, weight=params['weight'] - h * tangent), (x,))
    torch.testing.assert_close(jvp, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)
