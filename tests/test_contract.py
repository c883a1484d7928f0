"""The ecosystem contract: timm's device=/dtype= factory keywords, TorchScript (alone and after
torch.fx), public APIs only on the reference path, and no warnings of this package's own."""
import ast
import io
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_nfnet_ext
from timm_nfnet_ext import MODEL_CFGS
from timm_nfnet_ext.accel import FastActivation
from timm_nfnet_ext.layers import GAMMAS, apply_activation

from conftest import tiny_model

THREE = ['nfnet_f0', 'nf_seresnextd_f0', 'nfnet_f0_plus']  # the models timm's own test suite runs on
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _script(module):
    with warnings.catch_warnings():  # torch's own notice that torch.jit.script is deprecated
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.script(module)


def _tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


# --- device= and dtype= ------------------------------------------------------------------------
@pytest.mark.parametrize('name', THREE)
def test_meta_device_builds_every_parameter_on_meta_with_its_shape(name):
    """create_model(device='meta') without a device context: shapes only, as timm's own models."""
    model = timm.create_model(name, device='meta')
    assert {t.device.type for _, t in _tensors(model)} == {'meta'}
    with torch.device('meta'):
        reference = timm.create_model(name)
    assert [(n, t.shape, t.dtype) for n, t in _tensors(model)] == \
        [(n, t.shape, t.dtype) for n, t in _tensors(reference)]
    if name == 'nfnet_f0':
        assert sum(p.numel() for p in model.parameters()) == 71_489_284
    features = timm.create_model(name, device='meta', features_only=True)
    assert {t.device.type for _, t in _tensors(features)} == {'meta'}


def test_meta_model_runs_shapes_and_materialises_on_cpu():
    model = tiny_model(device='meta').eval()
    out = model(torch.randn(2, 3, 64, 64, device='meta'))
    assert out.device.type == 'meta' and out.shape == (2, 10)
    real = model.to_empty(device='cpu')
    real.load_state_dict(tiny_model().state_dict())
    assert torch.isfinite(real(torch.randn(1, 3, 64, 64))).all()


def test_bfloat16_dtype_creates_bfloat16_parameters_that_run():
    model = tiny_model(dtype=torch.bfloat16)
    assert {t.dtype for _, t in _tensors(model)} == {torch.bfloat16}
    model.train()
    out = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_float64_model_on_a_real_device_computes_the_float32_function():
    m32 = tiny_model().eval()
    m64 = tiny_model(device='cpu', dtype=torch.float64).eval()
    assert {t.dtype for _, t in _tensors(m64)} == {torch.float64}
    m64.load_state_dict(m32.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out64 = m64(x.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64, m32.double()(x.double()), rtol=0, atol=1e-13)
        torch.testing.assert_close(out64.float(), m32.float()(x), rtol=1e-5, atol=1e-6)


def test_factory_dtype_keeps_the_initialisation_draws():
    """dtype=None changes nothing: the same random init as before these keywords existed."""
    torch.manual_seed(0)
    a = tiny_model()
    torch.manual_seed(0)
    b = tiny_model(device=None, dtype=None)
    torch.manual_seed(0)
    c = tiny_model(device='cpu', dtype=torch.float32)
    for (n, t), (_, u), (_, v) in zip(_tensors(a), _tensors(b), _tensors(c)):
        assert torch.equal(t, u) and torch.equal(t, v), n


def test_reset_classifier_follows_the_model_device_and_dtype():
    model = tiny_model(device='meta', dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(3)
    fc = model.get_classifier()
    assert (fc.weight.device.type, fc.weight.dtype, fc.out_features) == ('meta', torch.float64, 3)
    with pytest.raises(TypeError, match='unknown NFNet argument'):
        timm.create_model('nfnet_f0', device='meta', not_a_model_arg=1)


@CUDA
def test_cuda_device_creates_parameters_there():
    model = tiny_model(device='cuda', dtype=torch.float16)
    assert {(t.device.type, t.dtype) for _, t in _tensors(model)} == {('cuda', torch.float16)}
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64, device='cuda', dtype=torch.float16))).all()


# --- TorchScript --------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(MODEL_CFGS))
def test_every_registered_model_scripts(name):
    """torch.jit.script compiles every architecture (built on meta: compiling needs no numbers)."""
    scripted = _script(timm.create_model(name, device='meta'))
    assert isinstance(scripted, torch.jit.ScriptModule)


def test_scripted_model_equals_eager_in_float32_and_float64():
    model = tiny_model().eval()
    scripted = _script(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # eager runs the hand-written CPU GELU and WS function, TorchScript ATen's ops: float rounding apart
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-7)
        model64 = tiny_model(dtype=torch.float64).eval()
        torch.testing.assert_close(_script(model64)(x.double()), model64(x.double()), rtol=1e-12, atol=1e-14)
    with pytest.raises(torch.jit.Error, match='too small'):  # the input check is compiled too
        scripted(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize('name', THREE)
def test_scripted_full_size_models_equal_eager(name):
    model = timm.create_model(name).eval()
    scripted = _script(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


def test_scripted_training_step_equals_eager():
    """Train mode: dropout and stochastic depth draw the same numbers, and the gradients agree."""
    model = tiny_model(drop_rate=0.3, drop_path_rate=0.5).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('skip_gain'):
                p.fill_(0.7)  # every residual branch live (0 at init)
    scripted = _script(model)
    x = torch.randn(4, 3, 64, 64)

    def step(m):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = m(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    out_eager, grads_eager = step(model)
    out_script, grads_script = step(scripted)  # the scripted module shares the model's parameters
    torch.testing.assert_close(out_script, out_eager, rtol=1e-5, atol=1e-6)
    for n, g in grads_eager.items():
        torch.testing.assert_close(grads_script[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('kwargs', [
    dict(output_stride=16), dict(num_classes=0, global_pool=''), dict(activation='silu'),
    dict(use_two_convs=False), dict(in_chans=1),
])
def test_scripted_variants_equal_eager(kwargs):
    model = tiny_model(**kwargs).eval()
    x = torch.randn(2, model.in_chans, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_script(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_speed_paths_step_aside_under_scripting():
    """Grouped weight standardisation asked for (the CUDA default), the fused model and the
    prepacked one all script; TorchScript runs each conv's plain form."""
    from timm.utils import reparameterize_model
    from timm_nfnet_ext import prepack_for_cpu
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        model.set_grouped_ws(True)
        torch.testing.assert_close(_script(model)(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_script(reparameterize_model(model))(x), want, rtol=1e-5, atol=1e-6)
        if timm_nfnet_ext.accel.prepack.onednn_available():
            torch.testing.assert_close(_script(prepack_for_cpu(model))(x), want, rtol=1e-5, atol=1e-6)


def test_scripted_model_saves_and_loads():
    model = tiny_model().eval()
    buffer = io.BytesIO()
    torch.jit.save(_script(model), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-7)


# JAX's defaults, each written with torch's own function (log_softmax over JAX's channel axis)
_JAX_ACTIVATIONS = {
    'identity': lambda x: x, 'celu': F.celu, 'elu': F.elu, 'gelu': lambda x: F.gelu(x, approximate='tanh'),
    'leaky_relu': F.leaky_relu, 'log_sigmoid': F.logsigmoid, 'log_softmax': lambda x: F.log_softmax(x, dim=1),
    'relu': F.relu, 'relu6': F.relu6, 'selu': F.selu, 'sigmoid': torch.sigmoid, 'silu': F.silu,
    'soft_sign': F.softsign, 'softplus': F.softplus, 'tanh': torch.tanh,
}


def test_every_activation_of_the_gamma_table_is_defined():
    assert sorted(_JAX_ACTIVATIONS) == sorted(GAMMAS)


@pytest.mark.parametrize('name', sorted(GAMMAS))
def test_scripted_activation_is_the_eager_one(name):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(apply_activation(x, name), _JAX_ACTIVATIONS[name](x))  # float64: ATen in eager too
    act = FastActivation(name, scale=1.5, inplace=True)
    torch.testing.assert_close(_script(act)(x.clone()), act(x.clone()), rtol=1e-15, atol=0)


def test_fx_trace_then_script_equals_eager():
    """timm's test_model_forward_fx_torchscript: a torch.fx graph of the model (this package's
    notrace leaves kept whole), then TorchScript."""
    from timm.models import create_feature_extractor
    model = tiny_model().eval()
    graph = create_feature_extractor(model, return_nodes={'head.fc': 'logits'})
    scripted = _script(graph)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)['logits'], model(x), rtol=1e-5, atol=1e-7)
    torch.manual_seed(3)
    features = _script(tiny_model(features_only=True, feature_cls='fx').eval())
    torch.manual_seed(3)
    hooks = tiny_model(features_only=True).eval()
    with torch.no_grad():
        for a, b in zip(features(x), hooks(x), strict=True):  # unnormalised maps: an absolute tolerance
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.jit.Error, match='too small'):  # the wrapper's input check is compiled too
        features(torch.randn(1, 3, 16, 16))


# --- public APIs, no warnings -------------------------------------------------------------------
def test_import_forward_and_backward_print_no_warnings():
    """A fresh import, forward and backward passes in train and eval mode (fast CPU paths, grouped
    weight standardisation, stochastic depth) record no warnings and log nothing."""
    code = textwrap.dedent('''
        import warnings
        import torch, timm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import timm_nfnet_ext
            m = timm.create_model('nfnet_f0', widths=(64, 128, 192, 192), depths=(1, 2, 2, 1), group_width=32,
                                  num_classes=10, drop_path_rate=0.2)
            x = torch.randn(2, 3, 64, 64)
            for grouped in (None, True):
                m.set_grouped_ws(grouped)
                m.train()
                m(x).sum().backward()
                m.set_grad_checkpointing(True)
                m(x).sum().backward()
                m.set_grad_checkpointing(False)
                m.eval()
                with torch.no_grad():
                    m(x)
        for w in caught:
            print('WARNING', w.category.__name__, w.filename, w.lineno, w.message)
    ''')
    res = subprocess.run([sys.executable, '-W', 'error', '-c', code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'WARNING' not in res.stdout, res.stdout
    assert res.stderr == ''  # torch's logged warnings (e.g. is_fx_tracing's) go to stderr


_PACKAGE = Path(timm_nfnet_ext.__file__).parent
_ALL_FILES = sorted(str(p.relative_to(_PACKAGE)) for p in _PACKAGE.rglob('*.py'))
# the network as DeepMind wrote it: these files import no speed path and no private torch API
_REFERENCE_FILES = ['models/network.py', 'models/contract.py'] + sorted(str(p.relative_to(_PACKAGE)) for p in (_PACKAGE / 'layers').glob('*.py'))


@pytest.mark.parametrize('filename', _ALL_FILES)
def test_no_private_timm_or_torch_imports(filename):
    """Imports name public modules only (private names are looked up at run time, detected once)."""
    tree = ast.parse((_PACKAGE / filename).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module != '__future__':
            private = [part for part in node.module.split('.') if part.startswith('_')]
            # torch's checkpoint_wrapper lives only in a private module (grouped_ws' off switch)
            if node.module != 'torch.distributed.algorithms._checkpoint.checkpoint_wrapper':
                assert not private, f'{filename}:{node.lineno} imports from {node.module}'


@pytest.mark.parametrize('filename', _REFERENCE_FILES)
def test_reference_files_use_no_speed_path_and_no_private_torch(filename):
    """The model and layer files compute the reference alone: no import from accel/, no private
    torch attribute (``torch._C``, ``torch.ops``, ``_``-names), no hand-written autograd function."""
    source = (_PACKAGE / filename).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert 'accel' not in (node.module or ''), f'{filename}:{node.lineno} imports a speed path'
            assert not any(a.name == 'accel' for a in node.names), f'{filename}:{node.lineno} imports accel'
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'torch':
            assert not node.attr.startswith('_') and node.attr != 'ops', f'{filename}:{node.lineno} uses torch.{node.attr}'
    assert 'autograd.Function' not in source


def test_agc_registry_without_timm_default_registry(monkeypatch):
    """Where timm's private default registry is not found, nothing is registered and an explicit
    registry still works."""
    from timm.optim import OptimizerRegistry
    from timm_nfnet_ext.agc import registry as agc_registry
    monkeypatch.setattr(agc_registry, 'DEFAULT_REGISTRY', None)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        agc_registry.register_builtin_optimizers()  # a no-op, without a warning
    with pytest.raises(RuntimeError, match='pass registry='):
        agc_registry.register_agc_optimizer('sgdtestagc', torch.optim.SGD)
    mine = OptimizerRegistry()
    info = agc_registry.register_agc_optimizer('sgdtestagc', torch.optim.SGD, registry=mine)
    assert mine.get_optimizer_info('sgdtestagc') is info
    assert 'sgdtestagc' not in timm.optim.list_optimizers()


# --- the base install ---------------------------------------------------------------------------
BASE_ONLY = textwrap.dedent('''
    import sys
    # the optional extras ([train], [hub], [test], [docs]) are absent: importing one fails, and
    # importlib.util.find_spec reports it missing (pyyaml comes with huggingface_hub, a base need)
    BLOCKED = ['sklearn', 'matplotlib', 'olah', 'onnx', 'onnxruntime', 'pytest', 'mkdocs']
    for name in BLOCKED:
        sys.modules[name] = None
    import numpy as np, timm, torch, timm_nfnet_ext
    from timm_nfnet_ext.data import create_eval_transform
    import timm_nfnet_ext.validate, timm_nfnet_ext.weights.convert
    model = timm.create_model('nfnet_f0', widths=(32, 64, 96, 96), depths=(1, 1, 1, 1), group_width=16).eval()
    x = create_eval_transform(model, img_size=64)(np.zeros((50, 60, 3), np.uint8))
    assert model(x[None]).shape == (1, 1000)
    opt = timm.optim.create_optimizer_v2(model, 'sgdagc', lr=0.1, clipping=0.01)
    assert [m for m in BLOCKED if sys.modules.get(m) is not None] == []
    print('ok')
''')


def test_base_install_imports_and_runs_without_the_extras():
    """No optional extra is needed to import, build a model, preprocess, forward, make an AGC
    optimizer, or import the validate and convert commands."""
    res = subprocess.run([sys.executable, '-c', BASE_ONLY], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr[-3000:]
