"""prepack_for_cpu: oneDNN-reordered conv weights for CPU inference, against the fused model."""
import copy
import io

import numpy as np
import pytest
import timm
import torch

from timm_nfnet_ext.accel import prepack
from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn, load_checkpoint_file
from timm_nfnet_ext.layers import SameConv2d, WSConv2d
from timm_nfnet_ext.accel.prepack import PrepackedConv2d, prepack_for_cpu

from conftest import FIXTURE_NAMES, FIXTURES, fixture_arrays, fixture_model_kwargs, tiny_model

pytestmark = pytest.mark.skipif(not prepack.onednn_available(), reason='this PyTorch has no oneDNN')


def _convs(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _packed(model):
    """Each conv's reordered weight (None where there is none)."""
    return [m.pack.weight for m in _convs(model)]


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_prepacked_model_reproduces_deepmind_outputs(name):
    model = timm.create_model('nfnet_f0', **fixture_model_kwargs(name)).eval()
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(FIXTURES / name / 'params.pkl'), model))
    packed = prepack_for_cpu(model)
    assert all(type(m) is PrepackedConv2d for m in _convs(packed))
    assert any(isinstance(m, WSConv2d) for m in model.modules())  # the original is left as it was
    x, logits, _ = fixture_arrays(name)
    with torch.inference_mode():
        first = packed(x)  # a new input shape: plain convs
        assert all(w is None for w in _packed(packed))
        second = packed(x)  # the same shape again: reordered weights
    assert all(w is not None for w in _packed(packed))
    for got in (first, second):
        np.testing.assert_array_less(np.abs(got.numpy() - logits).max(), 1e-5)


@pytest.mark.parametrize('shape', [(1, 3, 64, 64), (2, 3, 67, 45)])  # even and odd sizes: both 'SAME' paths
def test_prepacked_equals_fused_and_follows_shapes(shape):
    model = tiny_model(drop_rate=0.5)  # in training mode, as timm.create_model returns it
    fused = timm.utils.reparameterize_model(model).eval()
    packed = prepack_for_cpu(model)
    assert not packed.training and model.training  # the copy is for inference; the original untouched
    assert any(m.same_padding for m in _convs(packed)) and not all(m.same_padding for m in _convs(packed))
    x, x2 = torch.randn(shape), torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for _ in range(2):
            assert (packed(x) - fused(x)).abs().max().item() <= 1e-5
        first = _packed(packed)
        for _ in range(2):  # another shape, twice: reordered for it, the old one dropped
            assert (packed(x2) - fused(x2)).abs().max().item() <= 1e-5
        kept = _packed(packed)
        assert all(w is not None and w is not v for w, v in zip(kept, first))
        for xi in (x, x2, x, x2, x):  # a shape change on every call: plain convs, no reorder each time
            assert (packed(xi) - fused(xi)).abs().max().item() <= 1e-5
    assert all(w is v for w, v in zip(_packed(packed), kept))


def test_prepacked_weights_follow_in_place_weight_changes():
    model, other = tiny_model().eval(), tiny_model().eval()  # two different random inits
    packed = prepack_for_cpu(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = [packed(x) for _ in range(2)][-1]
        packed.load_state_dict(timm.utils.reparameterize_model(other).state_dict())
        after = [packed(x) for _ in range(2)]  # the new weights at once, then reordered
        expected = timm.utils.reparameterize_model(other)(x)
    assert all(w is not None for w in _packed(packed))
    for got in after:
        assert (got - expected).abs().max().item() <= 1e-5
    assert (after[-1] - before).abs().max().item() > 1e-2


def test_autograd_and_other_dtypes_take_the_plain_conv():
    model = tiny_model().eval()
    fused = timm.utils.reparameterize_model(model)
    packed = prepack_for_cpu(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = [packed(x) for _ in range(2)][-1]  # autograd recording: F.conv2d, gradients as the fused model's
    assert all(w is None for w in _packed(packed))
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(fused(x).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-5)
    with torch.no_grad():
        y64 = [packed.double()(x.detach().double()) for _ in range(2)][-1]
    assert y64.dtype == torch.float64 and all(w is None for w in _packed(packed))


def test_copies_state_dict_and_pickles_of_a_prepacked_model():
    model = tiny_model().eval()
    packed = prepack_for_cpu(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = [packed(x) for _ in range(2)][-1]
    assert all(w is not None for w in _packed(packed))
    twin = copy.deepcopy(packed)  # oneDNN's opaque weights cannot be copied: the copy remakes them
    assert all(w is None for w in _packed(twin))
    assert list(packed.state_dict()) == list(timm.utils.reparameterize_model(model).state_dict())
    conv = packed.stem.conv0
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        for _ in range(2):
            assert torch.allclose(twin(x), y, atol=1e-5)
        z = torch.randn(1, 3, 33, 33)
        for _ in range(2):
            assert torch.allclose(again(z), conv(z), atol=1e-5)
    assert all(w is not None for w in _packed(twin)) and again.pack.weight is not None
    assert isinstance(again, PrepackedConv2d) and again.same_padding and "padding='SAME'" in repr(again)


def test_bad_inputs_are_named(monkeypatch):
    with pytest.raises(TypeError, match='zero padding'):
        PrepackedConv2d(torch.nn.Conv2d(3, 8, 3, padding='same'))
    with pytest.raises(TypeError, match='dilation 1'):
        PrepackedConv2d(SameConv2d(3, 8, 3, stride=2, dilation=2))
    with pytest.raises(ValueError, match='no nn.Conv2d'):
        prepack_for_cpu(torch.nn.Linear(3, 4))
    monkeypatch.setattr(prepack.torch.backends.mkldnn, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='oneDNN'):
        prepack_for_cpu(tiny_model())


@pytest.mark.parametrize('make', [
    lambda: torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
    lambda: torch.nn.Conv2d(8, 16, 1, stride=2),
    lambda: torch.nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4),
    lambda: SameConv2d(8, 16, 3, stride=2),
])
@pytest.mark.parametrize('channels_last', [False, True])
def test_prepacked_conv_matches_its_conv(make, channels_last):
    conv = make().eval()
    wrapped = PrepackedConv2d(conv)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias  # shared, not copied
    x = torch.randn(2, 8, 14, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            assert (wrapped(x) - conv(x)).abs().max().item() <= 1e-5
    assert wrapped.pack.weight is not None


def test_replaced_or_inference_mode_weights_are_reordered_again():
    model = tiny_model().eval()
    packed = prepack_for_cpu(model)
    x = torch.randn(1, 3, 64, 64)

    def plain():  # autograd recording: every conv is a plain F.conv2d
        with torch.enable_grad():
            return packed(x).detach()

    with torch.no_grad():
        [packed(x) for _ in range(2)]
        for m in _convs(packed):  # replaced behind the version counter (new storage, same version)
            m.weight.data = torch.randn_like(m.weight) * 0.05
        for _ in range(2):
            assert (packed(x) - plain()).abs().max().item() <= 1e-5
        packed.half().float()  # a dtype round trip rounds the weights: remade from the rounded ones
        for _ in range(2):
            assert (packed(x) - plain()).abs().max().item() <= 1e-5
    with torch.inference_mode():  # a model built under inference_mode (no version counters)
        model = tiny_model().eval()
        packed, fused = prepack_for_cpu(model), timm.utils.reparameterize_model(model)
        for _ in range(2):
            assert (packed(x) - fused(x)).abs().max().item() <= 1e-5
        assert all(w is not None for w in _packed(packed))


def test_cpu_autocast_takes_the_plain_conv():
    model = tiny_model().eval()
    packed, fused = prepack_for_cpu(model), timm.utils.reparameterize_model(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = [packed(x) for _ in range(2)]
        ref = fused(x)
    assert all(o.dtype == ref.dtype == torch.bfloat16 and torch.equal(o, ref) for o in outs)
    assert all(w is None for w in _packed(packed))


def _raise(*args, **kwargs):
    raise RuntimeError('a changed private op')


@pytest.mark.parametrize('missing', ['REORDER_WEIGHT', 'CONV_POINTWISE'])
def test_without_the_private_onednn_ops_every_conv_is_plain(missing, monkeypatch):
    """The two private ops are looked up once at import; without one, prepacked convs run the
    fused model's plain conv (and onednn_available says so)."""
    model = tiny_model().eval()
    packed, fused = prepack_for_cpu(model), timm.utils.reparameterize_model(model)
    monkeypatch.setattr(prepack, missing, None)
    assert not prepack.onednn_available()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(packed(x), fused(x))
    assert all(w is None for w in _packed(packed))


@pytest.mark.parametrize('failing', ['REORDER_WEIGHT', 'CONV_POINTWISE'])
def test_a_private_onednn_op_that_raises_leaves_the_plain_conv(failing, monkeypatch):
    model = tiny_model().eval()
    packed, fused = prepack_for_cpu(model), timm.utils.reparameterize_model(model)
    monkeypatch.setattr(prepack, failing, _raise)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(packed(x), fused(x))
    assert all(m.pack.failed and m.pack.weight is None for m in _convs(packed))
