"""The registry, configs and the timm model contract of the NFNet family."""
import io
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import group_parameters

from timm_nfnet_ext import MODEL_CFGS, NFNet

from conftest import tiny_model

F_PARAMS = {  # the reference's parameter counts (NFNETS.md; F0 exact, others to 0.1M)
    'nfnet_f0': 71.5, 'nfnet_f1': 132.6, 'nfnet_f2': 193.8, 'nfnet_f3': 254.9,
    'nfnet_f4': 316.1, 'nfnet_f5': 377.2, 'nfnet_f6': 438.4, 'nfnet_f7': 499.5,
}


def _meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_every_family_member_is_registered():
    expected = {f'nfnet_f{i}' for i in range(8)} | {f'nfnet_f{i}_plus' for i in range(8)} | \
        {f'nf_seresnextd_f{i}' for i in range(4)} | {'nf_seresnext50d', 'nf_seresnext101d'}
    assert expected == set(MODEL_CFGS)
    for name in expected:
        assert timm.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == 'timm_nfnet_ext.models.nfnet'
    # listed with timm's own NFNets: timm's forward_intermediates tests select models by module name
    assert expected <= set(timm.list_models(module='nfnet'))
    # timm's own DeepMind ports stay untouched
    assert timm.models.model_entrypoint('dm_nfnet_f0').__module__ == 'timm.models.nfnet'


def test_import_replaces_timm_entries_without_warnings():
    code = ('import warnings; warnings.simplefilter("error"); import timm, timm_nfnet_ext; '
            'print(type(timm.models.model_entrypoint("nfnet_f3")).__name__)')
    res = subprocess.run([sys.executable, '-W', 'error', '-c', code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'Overwriting' not in res.stderr


def test_f0_parameter_count_is_exact():
    assert _count(_meta_model('nfnet_f0')) == 71_489_284


@pytest.mark.parametrize('name', sorted(F_PARAMS))
def test_f_parameter_counts(name):
    count = _count(_meta_model(name))
    assert round(count / 1e6, 1) == F_PARAMS[name]
    if name != 'nfnet_f7':  # timm's port has the same parameters, in another layout
        assert count == _count(_meta_model('dm_' + name))


def test_wide_and_resnext_variants():
    wide = _meta_model('nfnet_f4_plus')
    assert [s[-1].conv2.out_channels for s in wide.stages] == [384, 768, 2048, 2048]
    assert wide.stem.conv3.out_channels == 192
    rx = _meta_model('nf_seresnext101d')
    assert [len(s) for s in rx.stages] == [3, 4, 23, 3]
    assert [s[0].conv2.out_channels for s in rx.stages] == [256, 512, 1024, 2048]
    assert all(b.conv1b is None for s in rx.stages for b in s)
    assert rx.stages[2][0].conv1.groups == 512 // 128
    rx_f1 = _meta_model('nf_seresnextd_f1')
    assert [len(s) for s in rx_f1.stages] == [2, 4, 12, 6]


def test_pretrained_cfgs():
    for i, (train, test) in enumerate([(192, 256), (224, 320), (256, 352), (320, 416), (384, 512), (416, 544),
                                       (448, 576)]):
        cfg = timm.models.get_pretrained_cfg(f'nfnet_f{i}.dm_in1k')
        assert cfg.input_size == (3, train, train) and cfg.test_input_size == (3, test, test)
        assert cfg.test_crop_pct == pytest.approx(test / (test + 32))  # resize S+32, crop S
        assert cfg.crop_pct == pytest.approx(train / (train + 32))
        assert (cfg.crop_mode, cfg.interpolation, cfg.license) == ('squash', 'bicubic', 'apache-2.0')
        assert cfg.hf_hub_id and cfg.num_classes == 1000 and '2102.06171' in cfg.paper_ids
        assert (cfg.first_conv, cfg.classifier) == ('stem.conv0', 'head.fc')
    assert timm.models.get_pretrained_cfg('nfnet_f0').tag == 'dm_in1k'  # the default tag
    pretrained = set(timm.list_models('nf*', pretrained=True))
    assert {f'nfnet_f{i}.dm_in1k' for i in range(7)} <= pretrained
    # architectures without released weights claim none
    assert not pretrained & {'nfnet_f7', 'nfnet_f0_plus', 'nf_seresnext50d'}
    assert not timm.models.get_pretrained_cfg('nfnet_f7').has_weights


def test_data_config_is_the_reference_preprocessing():
    model = _meta_model('nfnet_f1')
    cfg = timm.data.resolve_model_data_config(model, use_test_size=True)
    assert cfg['input_size'] == (3, 320, 320) and cfg['crop_pct'] == pytest.approx(320 / 352)
    transform = timm.data.create_transform(**cfg)
    text = repr(transform)
    assert 'bicubic' in text.lower() and '352' in text and '320' in text
    cfg = timm.data.resolve_model_data_config(model)  # at the train size: resize 256, crop 224
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == pytest.approx(224 / 256)
    assert 'size=(256, 256)' in repr(timm.data.create_transform(**cfg))


def test_create_model_keywords_build_any_architecture():
    m = timm.create_model('nfnet_f0', widths=[32, 64, 96, 128], depths=[1, 1, 2, 1], group_width=16,
                          use_two_convs=False, activation='silu', alpha=0.3, se_ratio=0.25, drop_path_rate=0.1,
                          drop_rate=0.0, num_classes=3, in_chans=1)
    assert m.cfg.widths == (32, 64, 96, 128) and m.cfg.alpha == 0.3
    assert m.stages[2][1].drop_path.rate == pytest.approx(0.1 * 3 / 5)
    assert m.stages[0][0].drop_path.rate == 0.0
    assert m.stages[1][0].se.fc1.out_features == 16
    assert m(torch.randn(2, 1, 40, 40)).shape == (2, 3)


def test_beta_and_alpha_bookkeeping():
    m = tiny_model(alpha=0.5)
    betas = [b.beta for s in m.stages for b in s]
    # beta = 1/expected_std; expected_std grows by alpha^2 per block and resets after a stage's first block
    r1, r2 = 1 / 1.25 ** 0.5, 1 / 1.5 ** 0.5
    assert betas == pytest.approx([1.0, r1, r1, r2, r1, r2])


def test_forward_features_head_and_classifier():
    m = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, 2, 2)
    pooled = m.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3)))
    assert torch.allclose(m.forward_head(feats), m.get_classifier()(pooled))
    m.reset_classifier(5)
    assert m(x).shape == (2, 5) and m.get_classifier().out_features == 5
    assert m.get_classifier().weight.std().item() == pytest.approx(0.01, rel=0.2)
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    m.reset_classifier(0, '')
    assert m(x).shape == (2, m.num_features, 2, 2)


def test_default_cfg_pool_size_matches_features():
    m = tiny_model()  # the F0 cfg's input size and strides
    assert m.forward_features(torch.randn(1, 3, 192, 192)).shape[-2:] == m.pretrained_cfg['pool_size']


def test_features_only_and_forward_intermediates_agree():
    torch.manual_seed(3)
    m = tiny_model().eval()
    torch.manual_seed(3)  # the same draws: the feature wrapper is built from the same model
    feat = timm.create_model('nfnet_f0', features_only=True, widths=(64, 128, 192, 192), depths=(1, 2, 2, 1),
                             group_width=32, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = feat(x)
        final, inter = m.forward_intermediates(x)
    assert feat.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert feat.feature_info.channels() == [64, 64, 128, 192, 384]
    assert [o.shape[1] for o in outs] == feat.feature_info.channels()
    assert [64 // o.shape[-1] for o in outs] == feat.feature_info.reduction()
    for a, b in zip(outs, inter):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(final, m.forward_features(x), atol=1e-6)
    only = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert len(only) == 2 and torch.allclose(only[1], inter[3], atol=1e-5)
    kept = m.prune_intermediate_layers(indices=[0, 1, 2])
    assert kept == [0, 1, 2] and len(m.stages) == 2 and m.num_classes == 0
    assert m.forward_intermediates(x, indices=[2], intermediates_only=True)[0].shape == inter[2].shape


TINY = dict(widths=(64, 128, 192, 192), depths=(1, 2, 2, 1), group_width=32, num_classes=10)


def test_torch_fx_feature_extraction():
    """timm's fx paths (features_only with feature_cls='fx', create_feature_extractor,
    get_graph_node_names) trace the model, in eval and in training (stochastic depth)."""
    from timm.models import create_feature_extractor, get_graph_node_names
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(3)
    fx = timm.create_model('nfnet_f0', features_only=True, feature_cls='fx', **TINY).eval()
    torch.manual_seed(3)
    hooks = timm.create_model('nfnet_f0', features_only=True, **TINY).eval()
    with torch.no_grad():
        for a, b in zip(fx(x), hooks(x), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match='too small'):
        fx(torch.randn(1, 3, 16, 16))
    m = tiny_model(drop_path_rate=0.5).train()
    train_nodes = get_graph_node_names(m)[0]
    assert 'check_input' in train_nodes and any(n.startswith('stages.3.0.conv1b') for n in train_nodes)
    extractor = create_feature_extractor(m, {'stages.1': 'mid', 'stages.3': 'deep'})
    torch.manual_seed(5)
    out = extractor(x)
    torch.manual_seed(5)  # the same stochastic depth draws as the module forward
    ref = m.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    assert torch.equal(out['mid'], ref) and out['deep'].shape == (2, 192, 2, 2)
    out['deep'].sum().backward()
    assert m.stem.conv0.weight.grad is not None
    # grouped weight standardisation (the CUDA default) steps aside while fx traces
    m.set_grouped_ws(True)
    torch.testing.assert_close(create_feature_extractor(m.eval(), {'stages.1': 'mid'})(x)['mid'],
                               m.forward_intermediates(x, indices=[2], intermediates_only=True)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('grad', [True, False])
def test_torch_jit_trace(grad):
    """torch.jit.trace (and so timm's ONNX export) records ATen's ops: the hand-written CPU GELU
    steps aside while tracing, with or without autograd, and for the fused model."""
    m = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(m, x, check_trace=False)
        torch.testing.assert_close(traced(x), m(x), atol=1e-5, rtol=0)
    fused = timm.utils.reparameterize_model(m)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(fused, x, check_trace=False)(x), m(x), atol=1e-5, rtol=0)
    m.set_grouped_ws(True)  # the CUDA default: a trace records each conv's own expression, and saves
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(m, x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), m(x), atol=1e-5, rtol=0)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    """torch.onnx.export (the TorchScript exporter, as timm's onnx_export uses): the fused model
    as is, the unfused one without the exporter's constant folding (with it, torch's exporter
    writes a graph onnxruntime rejects)."""
    import numpy as np
    import onnxruntime
    m = tiny_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = m(x).numpy()
        for name, model, folding in (('fused', timm.utils.reparameterize_model(m), True), ('plain', m, False)):
            path = tmp_path / f'{name}.onnx'
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['x'], do_constant_folding=folding)
            out = onnxruntime.InferenceSession(str(path)).run(None, {'x': x.numpy()})[0]
            assert np.abs(out - expected).max() < 1e-5, name


def test_output_stride_dilates_the_last_stages():
    """timm's output_stride: the strides beyond it become dilation, the weights keep their
    shapes (pretrained checkpoints load), and the features match timm's dm_nfnet_f0's scheme."""
    x = torch.randn(1, 3, 64, 64)
    for output_stride, reductions in ((32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])):
        torch.manual_seed(0)
        m = tiny_model(output_stride=output_stride).eval()
        assert [f['reduction'] for f in m.feature_info] == reductions and m.min_input_size == reductions[-1]
        assert m.forward_features(x).shape[-1] == 64 // output_stride
        with torch.no_grad():
            torch.testing.assert_close(timm.utils.reparameterize_model(m)(x), m(x), atol=1e-5, rtol=0)
        feat = timm.create_model('nfnet_f0', features_only=True, output_stride=output_stride, **TINY)
        assert feat.feature_info.reduction() == reductions
        assert [64 // o.shape[-1] for o in feat(x)] == reductions
    dilated = _meta_model('nfnet_f0', output_stride=8)
    assert {k: v.shape for k, v in dilated.state_dict().items()} == \
        {k: v.shape for k, v in _meta_model('nfnet_f0').state_dict().items()}
    assert dilated.stages[3][0].conv1.dilation == (2, 2) and dilated.stages[3][0].conv1b.dilation == (4, 4)
    with pytest.raises(ValueError, match='output_stride must be 8, 16 or 32'):
        tiny_model(output_stride=4)
    # without output_stride, a config with a larger total stride keeps its strides
    five = dict(depths=(1, 1, 1, 1), strides=(2, 2, 2, 2))
    assert [f['reduction'] for f in tiny_model(**five).feature_info] == [2, 8, 16, 32, 64]
    assert [f['reduction'] for f in tiny_model(output_stride=32, **five).feature_info] == [2, 8, 16, 32, 32]


def test_output_stride_follows_timm_dm_nfnet():
    """With the same weights, ours and timm's dm_nfnet_f0 differ as much at output_stride 16 and
    8 as at 32 (timm's port: erf-GELU, its padding): the same dilations and pools."""
    from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn
    x = torch.randn(1, 3, 64, 64)
    gaps = {}
    for output_stride in (32, 16, 8):
        torch.manual_seed(0)
        theirs = timm.create_model('dm_nfnet_f0', output_stride=output_stride).eval()
        with torch.no_grad():
            for p in theirs.parameters():
                if p.ndim == 0:
                    p.fill_(0.3)  # every residual branch counts
        ours = timm.create_model('nfnet_f0', output_stride=output_stride).eval()
        ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours))
        with torch.no_grad():
            a, b = theirs.forward_features(x), ours.forward_features(x)
        assert a.shape == b.shape
        gaps[output_stride] = ((a - b).norm() / a.norm()).item()
    assert gaps[32] < 0.1 and gaps[16] < 2 * gaps[32] and gaps[8] < 2 * gaps[32], gaps


def test_timm_act_layer_keyword_and_out_indices_errors():
    assert tiny_model(act_layer='relu').cfg.activation == 'relu'
    with pytest.raises(TypeError, match='act_layer must be an activation name'):
        tiny_model(act_layer=torch.nn.GELU)
    with pytest.raises(TypeError, match='disagree'):
        tiny_model(act_layer='relu', activation='silu')
    with pytest.raises(ValueError, match='out_indices selects no feature'):
        timm.create_model('nfnet_f0', features_only=True, out_indices=-1, **TINY)
    assert timm.create_model('nfnet_f0', features_only=True, out_indices=2, **TINY).feature_info.reduction() == [16, 32]


def test_group_matcher_covers_every_parameter():
    m = tiny_model()
    groups = group_parameters(m, m.group_matcher())
    names = {n for g in groups.values() for n in g}
    assert names == {n for n, _ in m.named_parameters()}
    coarse = group_parameters(m, m.group_matcher(coarse=True))
    assert len(coarse) < len(groups)


def test_no_weight_decay_names_gains_biases_and_skip_gains():
    m = tiny_model()
    nwd = m.no_weight_decay()
    params = dict(m.named_parameters())
    assert nwd == {n for n, p in params.items() if p.ndim <= 1}
    assert 'stages.0.0.skip_gain' in nwd and 'stem.conv0.gain' in nwd and 'head.fc.bias' in nwd
    assert 'stem.conv0.weight' not in nwd and 'stages.0.0.se.fc1.weight' not in nwd


def test_grad_checkpointing_gives_same_output_and_grads():
    m = tiny_model(drop_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_backward_reaches_every_parameter():
    m = tiny_model(num_classes=42).train()
    m(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_float32_cpu_training_gradients_match_float64():
    """The CPU float32 training path (in-place sigmoid-form GELU with its own backward, weight
    standardisation through the batch-norm backward kernel) against float64, where ATen's GELU
    runs (the float64 weight standardisation is checked against autograd in test_layers)."""
    import copy
    from timm_nfnet_ext.accel.gelu import _GeluTanhCPU
    m = tiny_model(drop_rate=0.0).train()
    for p in m.parameters():  # non-trivial gains, biases and skip gains
        p.data.add_(torch.randn_like(p) * 0.1)
    m64 = copy.deepcopy(m).double()
    x = torch.randn(2, 3, 64, 64)
    used = []
    real_apply = _GeluTanhCPU.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_GeluTanhCPU, 'apply', lambda *a: used.append(a[1]) or real_apply(*a))
        out = m(x)
    assert used and any(used) and not all(used)  # both the in-place and the out-of-place form ran
    g = torch.randn_like(out)
    out.backward(g)
    out64 = m64(x.double())
    out64.backward(g.double())
    assert torch.allclose(out.double(), out64, atol=1e-4)
    for (n, p), p64 in zip(m.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().item()
        assert (p.grad.double() - p64.grad).abs().max().item() <= 1e-4 * max(scale, 1.0), n


def test_stochastic_depth_drops_whole_samples_without_rescale():
    m = tiny_model(drop_path_rate=0.9, drop_rate=0.0).train()
    block = m.stages[3][0]
    assert block.drop_path.rate == pytest.approx(0.9 * 5 / 6)
    torch.manual_seed(1)
    masks = torch.stack([block.drop_path(torch.zeros(64, 1, 1, 1)) for _ in range(20)])
    assert set(masks.unique().tolist()) <= {0.0, 1.0}  # kept samples are not rescaled by 1/keep
    assert masks.mean().item() == pytest.approx(1 - 0.75, abs=0.05)
    assert block.drop_path.eval()(torch.zeros(3, 1)) is None


def test_torch_compile_fullgraph_at_several_input_sizes():
    """A second input size makes dynamo recompile with dynamic shapes: the 'SAME' padding must stay
    cheap symbolically (timm's ceil-based helper made that recompile run for over 20 minutes)."""
    import time
    torch._dynamo.reset()
    m = tiny_model().eval()
    compiled = torch.compile(m, backend='eager', fullgraph=True)  # fullgraph: fails on any graph break
    start = time.monotonic()
    with torch.no_grad():
        for size in (64, 96, 80):  # 96: the dynamic-shape recompile; 80: must reuse it
            x = torch.randn(1, 3, size, size)
            assert torch.allclose(compiled(x), m(x), atol=1e-6), size
    assert time.monotonic() - start < 120, 'compiling for a second input size took minutes'


def test_compiled_cpu_gelu_is_the_sigmoid_form_with_the_same_values_and_gradients():
    from timm_nfnet_ext.accel import gelu
    traced = []
    real = gelu._gelu_tanh_sigmoid

    def spy(x):
        traced.append(x.shape)
        return real(x)
    m = tiny_model().eval()  # eval: no random stochastic depth; autograd still runs through the params
    x = torch.randn(2, 3, 64, 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gelu, '_gelu_tanh_sigmoid', spy)
        # aot_eager: dynamo + AOTAutograd's backward graph, without needing a C++ compiler
        compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
        out_c = compiled(x)
    assert traced, 'the sigmoid form was not traced'
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out_e = m(x)  # eager: the chunked CPU GELU and its own backward
    out_e.square().sum().backward()
    assert torch.allclose(out_c, out_e, atol=1e-5)
    for gc, p in zip(grads_c, m.parameters()):
        assert torch.allclose(gc, p.grad, rtol=1e-3, atol=1e-5)


def test_reparameterize_fuses_every_ws_conv():
    from timm_nfnet_ext.layers import WSConv2d
    m = tiny_model().eval()
    for p in m.parameters():  # non-trivial gains and biases
        p.data.add_(torch.randn_like(p) * 0.1)
    fused = timm.utils.reparameterize_model(m)
    assert not any(isinstance(mod, WSConv2d) for mod in fused.modules())
    assert all(type(mod) in (torch.nn.Conv2d,) or mod.stride[0] > 1
               for mod in fused.modules() if isinstance(mod, torch.nn.Conv2d))
    for size in [(64, 64), (45, 51)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert (fused(x) - m(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('shape,match', [
    ((2, 1, 64, 64), 'expected 3 input channels'),
    ((2, 3, 16, 64), 'too small'),
    ((3, 64, 64), 'NCHW'),
])
def test_bad_inputs_are_named(shape, match):
    m = tiny_model().eval()
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))
    features = tiny_model(features_only=True).eval()  # timm's wrapper calls the modules directly
    with pytest.raises(ValueError, match=match):
        features(torch.randn(*shape))


def test_minimum_input_size_follows_the_strides():
    three_stages = tiny_model(depths=(1, 1, 1), widths=(64, 128, 192), strides=(1, 2, 2)).eval()
    assert three_stages.min_input_size == 16
    with torch.no_grad():
        assert three_stages(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match='at least 16x16'):
        three_stages(torch.randn(1, 3, 15, 16))
    early = tiny_model(features_only=True, out_indices=(0, 1)).eval()  # strides 2 and 4
    with torch.no_grad():
        assert [f.shape[-1] for f in early(torch.randn(1, 3, 8, 8))] == [4, 2]
    pruned = tiny_model().eval()
    pruned.prune_intermediate_layers([1])  # keep up to stage 0 (stride 4)
    assert pruned.min_input_size == 4
    with pytest.raises(ValueError, match='at least 4x4'):
        pruned.forward_intermediates(torch.randn(1, 3, 3, 3))


def test_unknown_keyword_and_bad_config():
    with pytest.raises(TypeError, match='unknown NFNet argument.*widht'):
        timm.create_model('nfnet_f0', widht=(1, 2, 3, 4))
    with pytest.raises(ValueError, match='unknown activation'):
        timm.create_model('nfnet_f0', activation='swishy')
    with pytest.raises(ValueError, match='widths has 3 entries'):
        timm.create_model('nfnet_f0', widths=(64, 128, 256))
    with pytest.raises(ValueError, match='narrower than group_width'):
        timm.create_model('nfnet_f0', widths=(64, 128, 192, 192), group_width=256)
    with pytest.raises(ValueError, match=r'strides must each be 1 or 2, got \(1, 2, 2, 3\)'):
        timm.create_model('nfnet_f0', strides=(1, 2, 2, 3))
    with pytest.raises(ValueError, match='depths must be integers >= 1'):
        timm.create_model('nfnet_f0', depths=(1, 0, 1, 1))
    with pytest.raises(ValueError, match='stem_widths needs 3 entries'):
        timm.create_model('nfnet_f0', stem_widths=(16, 32))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('nfnet_f9')


def test_model_class_is_usable_without_timm_factory():
    m = NFNet(depths=(1, 1, 1, 1), widths=(32, 64, 64, 64), group_width=16, num_classes=4)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize('form', ['plain', 'fused', 'prepacked', 'features'])
def test_whole_models_pickle(form):
    """torch.save(model) and multiprocessing pickle modules: no lambdas may hide in them."""
    import pickle
    from timm.utils import reparameterize_model
    from timm_nfnet_ext import prepack_for_cpu
    torch.manual_seed(0)
    m = tiny_model(activation='silu' if form == 'plain' else 'gelu').eval()
    m = {'plain': lambda: m, 'fused': lambda: reparameterize_model(m),
         'prepacked': lambda: prepack_for_cpu(m), 'features': lambda: tiny_model(features_only=True).eval()}[form]()
    x = torch.randn(1, 3, 64, 64)
    copy = pickle.loads(pickle.dumps(m))
    with torch.no_grad():
        a, b = copy(x), m(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)


@pytest.mark.parametrize('name', ['identity', 'gelu', 'log_softmax', 'elu', 'silu'])
def test_activations_pickle_in_both_forms(name):
    import pickle
    from timm_nfnet_ext.accel import FastActivation
    from timm_nfnet_ext.layers import Activation
    x = torch.randn(2, 3, 4, 4)
    for act in (Activation(name), FastActivation(name), FastActivation(name, scale=1.5, inplace=True)):
        copy = pickle.loads(pickle.dumps(act))
        assert torch.equal(copy(x.clone()), act(x.clone())) and copy.extra_repr() == act.extra_repr()
