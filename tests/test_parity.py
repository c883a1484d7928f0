"""Numerical parity with DeepMind's reference: golden fixtures and an independent NumPy port."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from timm_nfnet_ext.weights import convert
from timm_nfnet_ext.weights.checkpoint import checkpoint_filter_fn

from conftest import FIXTURE_NAMES, FIXTURES, fixture_arrays, fixture_model_kwargs, fixture_spec
import np_reference


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_fixture_through_converter_and_timm_loader(name, tmp_path):
    """DeepMind pickle -> timm-nfnet-convert -> timm's pretrained path reproduces DeepMind's outputs."""
    kwargs = fixture_model_kwargs(name)
    out = tmp_path / 'converted'
    rc = convert.main([str(FIXTURES / name / 'params.pkl'), '-o', str(out), '--model', 'nfnet_f0',
                       '--model-kwargs', __import__('json').dumps(kwargs)])
    assert rc == 0
    model = timm.create_model(
        'nfnet_f0', pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'), num_classes=kwargs['num_classes']),
        **kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) == fixture_spec(name)['n_params']
    x, logits, pool = fixture_arrays(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        got_pool = model.forward_head(feats, pre_logits=True)
        got_logits = model.forward_head(feats)
    np.testing.assert_array_less(np.abs(got_logits.numpy() - logits).max(), 1e-5)
    np.testing.assert_array_less(np.abs(got_pool.numpy() - pool).max(), 1e-5)

    # the folder's own config.json rebuilds the architecture (timm's local-dir: scheme)
    again = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(again(x), got_logits)


def test_convert_command_line(tmp_path):
    """The installed console script runs end to end."""
    name = 'tiny_nfnet_odd'
    import json
    res = subprocess.run(
        [sys.executable, '-m', 'timm_nfnet_ext.weights.convert', str(FIXTURES / name / 'params.pkl'), '-o', str(tmp_path),
         '--model', 'nfnet_f0', '--model-kwargs', json.dumps(fixture_model_kwargs(name))],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / 'model.safetensors').is_file() and (tmp_path / 'config.json').is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.tmp')]


def _independent_check(model_name, spec, size, tol, **kwargs):
    rng = np.random.default_rng(0)
    params = np_reference.init_params(spec, rng)
    x = rng.normal(size=(1, spec['in_chans'], *size)).astype(np.float32)
    ref_logits, ref_pool = np_reference.forward(params, x, spec)
    model = timm.create_model(model_name, num_classes=spec['num_classes'], in_chans=spec['in_chans'], **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(params, model))
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x))
        pool = model.forward_head(feats, pre_logits=True).double().numpy()
        logits = model.forward_head(feats).double().numpy()
    scale = max(1.0, np.abs(ref_logits).max())
    assert np.abs(logits - ref_logits).max() / scale < tol, np.abs(logits - ref_logits).max()
    assert np.abs(pool - ref_pool).max() / max(1.0, np.abs(ref_pool).max()) < tol


def test_full_size_f0_matches_independent_numpy_port():
    """Full-size NFNet-F0 (71.5M params) on an odd, non-square input, against a float64 NumPy port."""
    spec = dict(width=[256, 512, 1536, 1536], depth=[1, 2, 6, 3], group_width=128, use_two_convs=True,
                activation='gelu', num_classes=1000, in_chans=3)
    _independent_check('nfnet_f0', spec, (67, 45), 1e-5)


@pytest.mark.parametrize('activation', ['relu', 'silu'])
def test_nf_seresnextd_matches_independent_numpy_port(activation):
    """The one-conv NF-SE-ResNeXt-D block, other activations, 2 input channels, even/odd sizes."""
    spec = dict(width=[64, 128, 256, 256], depth=[2, 1, 1, 2], group_width=16, use_two_convs=False,
                activation=activation, num_classes=7, in_chans=2)
    _independent_check('nf_seresnext50d', spec, (50, 33), 1e-5, widths=spec['width'], depths=spec['depth'],
                       group_width=16, activation=activation)
