"""The speed paths (accel/) against the reference path (models/, layers/): attached at one point,
switchable, and the same numbers."""
import copy
import pickle

import pytest
import timm
import torch

from conftest import tiny_model
from timm_nfnet_ext import accel
from timm_nfnet_ext.accel import AcceleratedNFNet, FastActivation, FastWSConv2d
from timm_nfnet_ext.agc import SGDAGC, agc_param_groups
from timm_nfnet_ext.layers import Activation, WSConv2d
from timm_nfnet_ext.models import NFNet


def _classes(model):
    return {type(m) for m in model.modules()}


def test_create_model_attaches_the_speed_paths_and_reference_detaches_them():
    model = tiny_model()
    assert type(model) is AcceleratedNFNet and {FastWSConv2d, FastActivation} <= _classes(model)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    accel.reference(model)
    assert type(model) is NFNet and not {FastWSConv2d, FastActivation, AcceleratedNFNet} & _classes(model)
    assert {WSConv2d, Activation} <= _classes(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params  # nothing copied
    assert accel.accelerate(model) is model and type(model) is AcceleratedNFNet


def test_models_switch_gives_the_reference_classes():
    with accel.configure(models=False):
        model = tiny_model()
    assert type(model) is NFNet and FastWSConv2d not in _classes(model)
    assert type(tiny_model()) is AcceleratedNFNet  # restored on exit


def test_configure_names_unknown_switches_and_restores_on_exit():
    with pytest.raises(TypeError, match=r"unknown speed path switch\(es\) \['gleu'\]"):
        accel.configure(gleu=False)
    with accel.configure(gelu=False, sgd=False):
        assert not accel.switches.gelu and not accel.switches.sgd
    assert accel.switches.gelu and accel.switches.sgd


@pytest.mark.parametrize('train', [False, True])
def test_accelerated_forward_and_backward_match_the_reference(train):
    fast = tiny_model(drop_rate=0.0)
    for p in fast.parameters():  # non-trivial gains, biases and skip gains
        p.data.add_(torch.randn_like(p) * 0.1)
    ref = accel.reference(copy.deepcopy(fast))
    fast.train(train), ref.train(train)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    out_f = fast(x)
    torch.manual_seed(1)
    out_r = ref(x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    out_f.square().sum().backward()
    out_r.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('switch', ['gelu', 'weight_std'])
def test_each_cpu_path_switches_off_to_the_reference_expression(switch):
    model = tiny_model().eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    conv, act = model.stages[0][0].conv0, model.stages[0][0].act
    on_w, on_a = conv.standardized_weight(), act(x[:, :1].clone() * 1.0)
    names_on = {type(on_w.grad_fn).__name__, type(on_a.grad_fn).__name__}
    with accel.configure(**{switch: False}):
        off_w, off_a = conv.standardized_weight(), act(x[:, :1].clone() * 1.0)
    names_off = {type(off_w.grad_fn).__name__, type(off_a.grad_fn).__name__}
    hand_written = '_StandardizeWeightBackward' if switch == 'weight_std' else '_GeluTanhCPUBackward'
    assert hand_written in names_on and hand_written not in names_off
    torch.testing.assert_close(on_w, off_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on_a, off_a, rtol=1e-6, atol=1e-6)


def test_grouped_ws_switch_turns_grouping_off():
    from timm_nfnet_ext.accel import grouped_ws
    model = tiny_model().eval()
    model.set_grouped_ws(True)
    x = torch.randn(1, 3, 64, 64)
    assert model._use_grouped_ws(x)
    with accel.configure(grouped_ws=False):
        assert not model._use_grouped_ws(x)
    calls = []
    real = grouped_ws.standardize_group
    grouped_ws.standardize_group = lambda g: calls.append(g) or real(g)
    try:
        with accel.configure(grouped_ws=False):
            off = model(x)
        on = model(x)
    finally:
        grouped_ws.standardize_group = real
    assert calls and len(calls) == len({id(g) for g in calls})  # only the grouped forward grouped
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('foreach', [False, True])
def test_chunked_sgd_is_bit_identical_to_the_reference_step(foreach):
    def run(fast):
        torch.manual_seed(0)
        model = tiny_model(drop_rate=0.0)
        opt = SGDAGC(agc_param_groups(model, clipping=0.01, weight_decay=2e-5), lr=0.1, foreach=foreach)
        with accel.configure(sgd=fast):
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(2, 3, 64, 64)).square().mean().backward()
                opt.step()
        return model.state_dict()
    from timm_nfnet_ext.accel import sgd
    assert sgd.applies(SGDAGC([torch.nn.Parameter(torch.ones(2))]))
    fast, ref = run(True), run(False)
    for k in fast:
        assert torch.equal(fast[k], ref[k]), k


def test_scripting_an_accelerated_model_leaves_it_accelerated():
    model = tiny_model().eval()
    scripted = torch.jit.script(model)
    assert type(model) is AcceleratedNFNet and FastWSConv2d in _classes(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    # the scripted twin shares the parameters: training the model moves the scripted one too
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


def test_an_accelerated_model_pickles_and_copies_as_itself():
    model = tiny_model().eval()
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(twin) is AcceleratedNFNet and FastWSConv2d in _classes(twin)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(twin(x), model(x))


def test_features_only_models_get_the_layer_paths():
    model = timm.create_model('nfnet_f0', features_only=True, out_indices=(1, 2), widths=(64, 128, 192, 192),
                              depths=(1, 1, 1, 1), group_width=32)
    assert FastWSConv2d in _classes(model) and WSConv2d not in _classes(model)


def test_scripting_a_container_or_a_block_leaves_the_eager_modules_accelerated():
    model = tiny_model().eval()
    wrap = torch.nn.Sequential(model, torch.nn.Identity())
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(wrap)
    assert type(wrap[0]) is AcceleratedNFNet and FastWSConv2d in _classes(wrap[0])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    torch.jit.script(model.stages[0])
    assert FastWSConv2d in _classes(model.stages[0]) and FastActivation in _classes(model.stages[0])
    features = timm.create_model('nfnet_f0', features_only=True, out_indices=(1, 2), widths=(64, 128, 192, 192),
                                 depths=(1, 1, 1, 1), group_width=32).eval()
    torch.jit.script(features)
    assert FastWSConv2d in _classes(features) and WSConv2d not in _classes(features)
