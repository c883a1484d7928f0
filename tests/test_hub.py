"""timm-nfnet-hub: manifest, conversion + validation, bad input, git-mirror publishing, and real
downloads through an olah Hub mirror on 127.0.0.1 (timm's ``pretrained=True`` and ``hf-hub:``)."""
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from timm_nfnet_ext import MODEL_CFGS
from timm_nfnet_ext.weights import checkpoint
from timm_nfnet_ext.weights.checkpoint import native_to_timm, read_deepmind_pickle, timm_to_native
from timm_nfnet_ext.weights.convert import build_model_from_state
from timm_nfnet_ext.models import HUB_NAMESPACE_ENV
from timm_nfnet_ext.variants import F_VARIANTS

from timm_nfnet_hub import publish
from timm_nfnet_hub.gitmirror import GitMirrorError, commit_folder, mirror_repo_path
from timm_nfnet_hub.manifest import load_manifest
from timm_nfnet_hub.timm_reference import timm_nfcfg, timm_reference_model
from timm_nfnet_hub.validate import fixed_input

from conftest import FIXTURES, fixture_model_kwargs
from olah_server import OlahServer, free_port

TINY = FIXTURES / 'tiny_nfnet'
# A small architecture timm's NormFreeNet can also express (its stem widths follow widths[0] = 256).
SMALL_TIMM_KWARGS = dict(widths=[256, 256, 384, 384], depths=[1, 1, 1, 1], group_width=64, num_classes=10)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine, 2 threads spin-wait and run ~20x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _release(model_kwargs, size=None, params_m=None, repo_name='nfnet_f0.dm_in1k', url=None, **extra):
    n = params_m if params_m is not None else round(
        sum(p.numel() for p in timm.create_model('nfnet_f0', **model_kwargs).parameters()) / 1e6, 1)
    return dict(model='nfnet_f0', model_kwargs=model_kwargs, repo_name=repo_name, title='Tiny NFNet',
                source=dict(url=url, size=size, sha256=None), train_size=48, test_size=64, params_m=n,
                top1=12.5, top5=None, **extra)


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
    tiny = fixture_model_kwargs('tiny_nfnet')
    size = os.path.getsize(TINY / 'params.pkl')
    releases = {
        'tiny': _release(tiny, size=size),
        'tiny_unsized': _release(tiny),
        'tiny_wrong_params': _release(tiny, params_m=0.9),
        'small_timm': _release(SMALL_TIMM_KWARGS, repo_name='small_timm.dm_test'),
    }
    path = tmp_path_factory.mktemp('manifest') / 'manifest.json'
    path.write_text(json.dumps({'format': 1, 'releases': releases}))
    return str(path)


def run_cli(capsys, *argv):
    rc = publish.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_expected():
    """Our model built straight from the fixture pickle, its input, and DeepMind's own logits."""
    kwargs = fixture_model_kwargs('tiny_nfnet')
    model = build_model_from_state(read_deepmind_pickle(TINY / 'params.pkl'), 'nfnet_f0', kwargs)
    x = torch.from_numpy(np.load(TINY / 'input.npy'))
    with torch.no_grad():
        return model(x), np.load(TINY / 'logits.npy')


def small_timm_state(seed=0):
    """A timm NormFreeNet (timm's layout, as timm hosts DeepMind's weights) with random non-trivial values."""
    from timm.models.nfnet import NormFreeNet
    torch.manual_seed(seed)
    ours = timm.create_model('nfnet_f0', **SMALL_TIMM_KWARGS)
    ref = NormFreeNet(timm_nfcfg(ours.cfg), num_classes=10)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(('gain', 'skipinit_gain')):
                p.uniform_(0.5, 1.5)
            elif name.endswith('bias'):
                p.normal_(0, 0.1)
            elif name == 'head.fc.weight':
                p.normal_(0, 0.05)
    return {k: v.clone() for k, v in ref.state_dict().items()}


# --- manifest and pretrained cfgs -----------------------------------------------------------------
def test_manifest_lists_the_released_weights():
    releases = load_manifest()
    assert list(releases) == [f'F{i}' for i in range(7)]
    for i, (key, r) in enumerate(releases.items()):
        assert r.source_url == f'https://storage.googleapis.com/dm-nfnets/F{i}_haiku.npz'
        v = F_VARIANTS[i]
        assert (r.train_size, r.test_size, r.params_m, r.top1, r.top5) == \
            (v.train_size, v.test_size, v.params_m, v.top1, v.top5)
        assert r.source_url == v.weights_url
        assert r.model == f'nfnet_f{i}' and r.repo_name == f'nfnet_f{i}.dm_in1k' and r.license == 'apache-2.0'
        with torch.device('meta'):
            n = sum(p.numel() for p in timm.create_model(r.model).parameters())
        assert round(n / 1e6, 1) == r.params_m, key
        assert r.top1 is not None and r.top5 is not None and r.top5 > r.top1
        # timm hosts the same weights (its layout) under this id today
        assert timm.models.get_pretrained_cfg(f'dm_nfnet_f{i}.dm_in1k').hf_hub_id == r.timm_repo_id
        assert timm_nfcfg(MODEL_CFGS[r.model]) == timm.models.nfnet.model_cfgs[r.timm_model], key
    assert releases['F0'].source_size == 285976842
    assert [r.top1 for r in releases.values()] == sorted(r.top1 for r in releases.values())


def test_default_cfgs_download_timm_hosted_weights():
    assert not os.environ.get(HUB_NAMESPACE_ENV), f'run the tests without {HUB_NAMESPACE_ENV}'
    assert publish.NAMESPACE_ENV == HUB_NAMESPACE_ENV  # --namespace defaults to the setting the cfgs read
    for i in range(7):
        ours = timm.models.get_pretrained_cfg(f'nfnet_f{i}.dm_in1k')
        assert ours.hf_hub_id == timm.models.get_pretrained_cfg(f'dm_nfnet_f{i}.dm_in1k').hf_hub_id
        assert ours.hf_hub_id == f'timm/dm_nfnet_f{i}.dm_in1k'
        assert ours.hf_hub_filename == 'model.safetensors'  # never a pickled pytorch_model.bin
        assert load_manifest()[f'F{i}'].from_deepmind


@pytest.mark.skipif(sys.version_info < (3, 11), reason='exception notes (add_note) need Python 3.11')
def test_offline_download_failure_names_the_repo(tmp_path, monkeypatch):
    """huggingface_hub's own offline error names neither the repo nor the setting: a note adds both."""
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    with pytest.raises(Exception) as info:
        timm.create_model('nfnet_f2', pretrained=True, cache_dir=str(tmp_path / 'empty'),
                          **fixture_model_kwargs('tiny_nfnet'))
    notes = '\n'.join(getattr(info.value, '__notes__', []))
    assert 'pretrained weights of nfnet_f2: could not fetch timm/dm_nfnet_f2.dm_in1k/model.safetensors' in notes
    assert 'HF_HUB_OFFLINE is set' in notes


# --- build: a DeepMind source ---------------------------------------------------------------------
def test_build_deepmind_checkpoint_with_reference(manifest, tmp_path, capsys):
    out = tmp_path / 'out'
    rc, stdout, err = run_cli(capsys, 'build', 'tiny', '--manifest', manifest, '--src', TINY / 'params.pkl',
                              '-o', out, '--namespace', 'testorg', '--reference', TINY)
    assert rc == 0, err
    assert 'reproduces the reference outputs' in stdout
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']

    with safe_open(out / 'model.safetensors', 'pt') as f:
        meta = f.metadata()
    assert meta['source'] == 'params.pkl' and meta['source_layout'] == 'deepmind' and meta['release'] == 'tiny'
    assert str(TINY) not in json.dumps(meta)  # no local path is published
    assert meta['converter'].startswith('timm-nfnet-ext') and 'timm-nfnet-hub' in meta['conversion']
    assert len(meta['source_sha256']) == 64

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'nfnet_f0' and config['model_args']['widths'] == [64, 128, 192, 192]
    cfg = config['pretrained_cfg']  # the release's sizes, not nfnet_f0's 192/256 defaults
    assert cfg['input_size'] == [3, 48, 48] and cfg['test_input_size'] == [3, 64, 64]
    assert cfg['test_crop_pct'] == pytest.approx(64 / 96) and cfg['crop_pct'] == pytest.approx(48 / 80)
    assert cfg['crop_mode'] == 'squash'
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    got, dm_logits = tiny_expected()
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(np.load(TINY / 'input.npy'))), got)
    assert np.abs(got.numpy() - dm_logits).max() < 1e-5

    card = (out / 'README.md').read_text()
    parsed = ModelCard(card)  # huggingface_hub's own reading of the header
    assert parsed.data.library_name == 'timm' and parsed.data.eval_results[0].metric_value == 12.5
    _, header, body = card.split('---\n', 2)
    meta = yaml.safe_load(header)
    assert meta['license'] == 'apache-2.0' and meta['library_name'] == 'timm'
    assert {'timm', 'image-classification', 'nfnet'} <= set(meta['tags'])
    assert meta['datasets'] == ['imagenet-1k'] and meta['metrics'] == ['accuracy']
    metrics = meta['model-index'][0]['results'][0]['metrics']
    assert [m['value'] for m in metrics] == [12.5]
    assert "timm.create_model('hf-hub:testorg/nfnet_f0.dm_in1k', pretrained=True)" in body
    assert 'squash' in body and '@article{brock2021high' in body and 'sha256' in body
    # a custom release (the manifest's default origin) does not claim DeepMind's training or results
    assert 'trained by DeepMind' not in body and 'as DeepMind released' not in body
    assert 'As given in the release manifest' in body
    assert 'source' not in meta['model-index'][0]['results'][0]  # not the paper's number


def test_card_of_deepmind_release():
    """The packaged releases are DeepMind's: the card tells their training, cites the paper's
    accuracy, evaluates at the test size and says the import is required."""
    from timm_nfnet_hub.card import render_card
    release = load_manifest()['F0']
    assert release.from_deepmind
    card = render_card(release, 'org/nfnet_f0.dm_in1k', 'F0_haiku.npz', '0' * 64, 'conv', ['ok'])
    _, header, body = card.split('---\n', 2)
    assert 'trained by DeepMind' in body and 'Results (as published)' in body
    assert 'resolve_data_config({}, model=model, use_test_size=True)' in body
    assert 'import timm_nfnet_ext  # required' in body
    assert 'TIMM_NFNET_HUB_NAMESPACE=org' in body  # the repo the pretrained cfgs point at
    metrics = yaml.safe_load(header)['model-index'][0]['results'][0]
    assert metrics['source']['url'] == 'https://arxiv.org/abs/2102.06171'
    other = render_card(release, 'org/my_f0', 'F0_haiku.npz', '0' * 64, 'conv', ['ok'])
    assert 'TIMM_NFNET_HUB_NAMESPACE' not in other  # create_model('nfnet_f0') would not load this repo


def test_invalid_namespace_is_refused_before_any_work(manifest, capsys):
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', '--manifest', manifest, '--src', TINY / 'params.pkl',
                              '--namespace', 'bad name!', '--dry-run')
    assert rc == 1 and "invalid Hub repo id 'bad name!/nfnet_f0.dm_in1k'" in err, err
    assert 'dry run' not in stdout


# --- bad input: a clear error and nothing left behind -----------------------------------------------
def _truncated(tmp_path):
    data = (TINY / 'params.pkl').read_bytes()
    (tmp_path / 'src.pkl').write_bytes(data[:len(data) // 2])
    return tmp_path / 'src.pkl'


def _corrupt(tmp_path):
    data = bytearray((TINY / 'params.pkl').read_bytes())
    data[100:4000] = os.urandom(3900)
    (tmp_path / 'src.pkl').write_bytes(bytes(data))
    return tmp_path / 'src.pkl'


class _Exploit:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def _unsafe(tmp_path):
    import pickle  # writing only: the tool must refuse to load it
    (tmp_path / 'src.pkl').write_bytes(pickle.dumps({'NFNet/~/stem_conv0': {'w': _Exploit()}}, protocol=3))
    return tmp_path / 'src.pkl'


def _non_finite(tmp_path):
    flat = read_deepmind_pickle(TINY / 'params.pkl')
    flat['NFNet/~/nf_block_1/~/conv1/w'][0, 0, 0, 0] = np.nan
    np.savez(tmp_path / 'src.npz', **flat)  # a real npz: read with allow_pickle=False
    return tmp_path / 'src.npz'


@pytest.mark.parametrize('case, release, extra, message', [
    ('truncated', 'tiny', (), f'where {os.path.getsize(TINY / "params.pkl"):,} are expected'),
    ('truncated', 'tiny_unsized', (), 'truncated or corrupt'),
    ('corrupt', 'tiny_unsized', (), 'corrupt'),
    ('size', 'tiny', ('--expected-size', '1234'), 'where 1,234 are expected'),
    ('unsafe', 'tiny_unsized', (), 'refusing unsafe pickle global'),
    ('non_finite', 'tiny_unsized', (), 'non-finite'),
    ('params', 'tiny_wrong_params', (), 'wrong parameter count'),
    ('reference', 'tiny', ('--reference', FIXTURES / 'tiny_nfnet_odd'), 'outputs do not reproduce'),
    ('cross_check', 'tiny_unsized', ('--cross-check', FIXTURES / 'tiny_nfnet_odd' / 'params.pkl'),
     'holds other weights'),
])
def test_bad_input_fails_cleanly(manifest, tmp_path, capsys, case, release, extra, message):
    src = {'truncated': _truncated, 'corrupt': _corrupt, 'unsafe': _unsafe, 'non_finite': _non_finite}.get(
        case, lambda _: TINY / 'params.pkl')(tmp_path)
    mirror, out = tmp_path / 'mirror', tmp_path / 'out'
    rc, stdout, err = run_cli(capsys, 'publish', release, '--manifest', manifest, '--src', src, '--namespace', 'org',
                              '--git-mirror', mirror, '-o', out, *extra)
    assert rc == 1
    assert message in err, err
    assert not out.exists()
    assert not mirror.exists()


# --- a timm dm_nfnet source (the layout timm hosts DeepMind's weights in) ----------------------------
def test_timm_layout_source_checked_against_timm(manifest, tmp_path, capsys, monkeypatch):
    state = small_timm_state()
    save_file(state, tmp_path / 'timm.safetensors')
    rc, stdout, err = run_cli(capsys, 'build', 'small_timm', '--manifest', manifest, '--src',
                              tmp_path / 'timm.safetensors', '-o', tmp_path / 'ok', '--namespace', 'org')
    assert rc == 0, err
    assert "reproduces timm's own model" in stdout

    # a mapping mistake in the converter that still loads (two same-shaped convs swapped) must be caught
    def swapped_mapping(state_dict):
        out = real_timm_to_native(state_dict)
        out['stages.1.0.conv1.weight'], out['stages.1.0.conv1b.weight'] = \
            out['stages.1.0.conv1b.weight'], out['stages.1.0.conv1.weight']
        return out
    real_timm_to_native = checkpoint.timm_to_native
    monkeypatch.setattr(checkpoint, 'timm_to_native', swapped_mapping)
    rc, stdout, err = run_cli(capsys, 'build', 'small_timm', '--manifest', manifest, '--src',
                              tmp_path / 'timm.safetensors', '-o', tmp_path / 'bad', '--namespace', 'org')
    assert rc == 1 and 'timm cross-check: outputs do not reproduce' in err, err
    assert not (tmp_path / 'bad').exists()


def test_timm_hosted_f0_layout_maps_tensor_by_tensor():
    """Full-size timm dm_nfnet_f0 state dict -> ours: every tensor lands once, unchanged; outputs agree."""
    with torch.device('meta'):
        theirs = timm.create_model('dm_nfnet_f0')
    theirs = theirs.to_empty(device='cpu')
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.75 if name.endswith('gain')
                    else torch.randn(p.shape, generator=gen) * (0.1 if name.endswith('bias') else 1.0))
    timm_sd = theirs.state_dict()
    native = timm_to_native(timm_sd)
    assert len(native) == len(timm_sd)
    with torch.device('meta'):
        ours = timm.create_model('nfnet_f0').eval()
    ours.load_state_dict(native, strict=True, assign=True)
    back = native_to_timm(ours.state_dict())
    assert set(back) == set(timm_sd)
    by_key = {}
    for k, v in timm_sd.items():  # random values: a tensor's size, sum and first values identify it
        key = (v.numel(), round(v.double().sum().item(), 6), tuple(v.reshape(-1)[:3].tolist()))
        by_key.setdefault(key, []).append(k)
    seen = []
    for name, value in ours.state_dict().items():
        key = (value.numel(), round(value.double().sum().item(), 6), tuple(value.reshape(-1)[:3].tolist()))
        matches = [k for k in by_key.get(key, []) if torch.equal(timm_sd[k].reshape(-1), value.reshape(-1))]
        assert len(matches) == 1, (name, matches)  # lands unchanged, from exactly one timm tensor
        seen.append(matches[0])
    assert sorted(seen) == sorted(timm_sd)  # every timm tensor used exactly once
    ref = timm_reference_model(ours, timm_sd, 'dm_nfnet_f0').double()
    x = fixed_input(ours, size=40).double()
    with torch.no_grad():
        a, b = ours.double()(x), ref(x)
    assert (a - b).abs().max() / max(1.0, b.abs().max()) < 1e-6  # float64: the ports agree to ~1e-7


def test_cross_check_against_a_copy_in_timm_layout(manifest, tmp_path, capsys):
    state = read_deepmind_pickle(TINY / 'params.pkl')
    model = build_model_from_state(state, 'nfnet_f0', fixture_model_kwargs('tiny_nfnet'))
    save_file(native_to_timm(model.state_dict()), tmp_path / 'copy.safetensors')  # the same weights, timm's layout
    rc, stdout, err = run_cli(capsys, 'build', 'tiny', '--manifest', manifest, '--src', TINY / 'params.pkl',
                              '--cross-check', tmp_path / 'copy.safetensors', '-o', tmp_path / 'o', '--namespace', 'o')
    assert rc == 0, err
    assert f'same tensors as {tmp_path / "copy.safetensors"} (timm layout)' in stdout


# --- publishing: dry run, the Hub (refusals), downloads of sources ------------------------------------
def test_dry_run_uploads_nothing(manifest, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(publish, 'connect_hub', lambda *a: pytest.fail('a dry run must not contact the Hub'))
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', '--manifest', manifest, '--src', TINY / 'params.pkl',
                              '--namespace', 'org', '--dry-run', '-o', tmp_path / 'out')
    assert rc == 0, err
    assert 'dry run: would publish to' in stdout and '/org/nfnet_f0.dm_in1k' in stdout
    for name in ('model.safetensors', 'config.json', 'README.md'):
        size = (tmp_path / 'out' / name).stat().st_size
        assert f'{name}' in stdout and f'{size:,} bytes' in stdout
    assert 'nothing was uploaded' in stdout


class FakeHub:
    """Records the calls publish makes; a Hub whose head moves only when content changes."""
    endpoint = 'https://hub.invalid'

    def __init__(self):
        self.calls, self.head, self.content = [], 'c0', None

    def create_repo(self, repo_id, repo_type, exist_ok, private=False):
        self.calls.append(('create_repo', repo_id, exist_ok, private))

    def repo_info(self, repo_id, repo_type):
        return type('Info', (), {'sha': self.head})

    def upload_folder(self, repo_id, repo_type, folder_path, allow_patterns, commit_message):
        files = {n: (Path(folder_path) / n).read_bytes() for n in allow_patterns}
        self.calls.append(('upload_folder', repo_id, sorted(files)))
        if files != self.content:
            self.content, self.head = files, f'c{len(self.calls)}'
        return type('Commit', (), {'oid': self.head})


def test_publish_to_hub_calls_and_refusals(manifest, tmp_path, capsys, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(publish, 'connect_hub', lambda endpoint, token, namespace: (hub, 'tester'))
    args = ['--manifest', manifest, '--src', TINY / 'params.pkl', '--namespace', 'org']
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', *args)
    assert rc == 0, err
    assert hub.calls == [('create_repo', 'org/nfnet_f0.dm_in1k', True, False),
                         ('upload_folder', 'org/nfnet_f0.dm_in1k', ['README.md', 'config.json', 'model.safetensors'])]
    assert 'committed' in stdout
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', *args)  # same content: same bytes, no new commit
    assert rc == 0 and 'unchanged, no new commit' in stdout
    hub.calls.clear()
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny_wrong_params', *args)
    assert rc == 1 and 'wrong parameter count' in err and hub.calls == []
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', *args, '--private')
    assert rc == 0 and hub.calls[0] == ('create_repo', 'org/nfnet_f0.dm_in1k', True, True)


def test_read_only_token_is_refused_before_any_work(monkeypatch):
    import huggingface_hub

    class ReadOnlyApi:
        endpoint = 'https://hub.invalid'

        def __init__(self, endpoint=None, token=None):
            pass

        def whoami(self):
            return {'name': 'u', 'orgs': [], 'auth': {'accessToken': {'role': 'read'}}}

    monkeypatch.setattr(huggingface_hub, 'HfApi', ReadOnlyApi)
    with pytest.raises(publish.PublishError, match='read-only'):
        publish.connect_hub(token='hf_x', namespace='u')


def hub_cli(*argv, env=None, timeout=60):
    """The installed console script (or the module when the script is not on disk)."""
    script = Path(sys.executable).with_name('timm-nfnet-hub')
    cmd = [str(script)] if script.exists() else [sys.executable, '-m', 'timm_nfnet_hub.publish']
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def test_console_script_refuses_without_token_or_endpoint(manifest, tmp_path):
    res = hub_cli('list')
    assert res.returncode == 0 and all(f'nfnet_f{i}.dm_in1k' in res.stdout for i in range(7))
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE')}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='0')
    args = ['publish', 'tiny', '--manifest', manifest, '--src', TINY / 'params.pkl', '--namespace', 'org',
            '-o', tmp_path / 'out']
    res = hub_cli(*args, env=env)
    assert res.returncode == 1 and 'no Hugging Face token' in res.stderr, res.stderr
    closed = f'http://127.0.0.1:{free_port()}'
    res = hub_cli(*args, '--endpoint', closed, env=dict(env, HF_TOKEN='hf_not_a_real_token'))
    assert res.returncode == 1 and f'cannot reach the Hub at {closed}' in res.stderr, res.stderr
    assert 'nothing was uploaded' in res.stderr and not (tmp_path / 'out').exists()


class _Server(http.server.ThreadingHTTPServer):
    body = b''
    claimed = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(self.server.claimed))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize('cut', [False, True])
def test_manifest_url_downloaded_checked_and_cached(tmp_path, capsys, cut):
    """Without --src the manifest's URL is fetched (here from 127.0.0.1), size-checked, then kept."""
    data = (TINY / 'params.pkl').read_bytes()
    server = _Server(('127.0.0.1', 0), _Handler)
    server.body, server.claimed = (data[:1000], len(data)) if cut else (data, len(data))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f'http://127.0.0.1:{server.server_address[1]}/F_tiny.pkl'
    manifest = tmp_path / 'manifest.json'
    manifest.write_text(json.dumps({'format': 1, 'releases': {
        'tiny': _release(fixture_model_kwargs('tiny_nfnet'), size=len(data), url=url)}}))
    try:
        rc, stdout, err = run_cli(capsys, 'build', 'tiny', '--manifest', manifest, '--namespace', 'o',
                                  '--cache-dir', tmp_path / 'cache', '-o', tmp_path / 'out')
    finally:
        server.shutdown()
        server.server_close()
    if cut:
        assert rc == 1 and 'cut short' in err, err
        assert list((tmp_path / 'cache').iterdir()) == [] and not (tmp_path / 'out').exists()
    else:
        assert rc == 0, err
        cached = list((tmp_path / 'cache').glob('*-F_tiny.pkl'))  # named by a hash of the URL, then the file
        assert len(cached) == 1 and cached[0].read_bytes() == data
        with safe_open(tmp_path / 'out' / 'model.safetensors', 'pt') as f:
            assert f.metadata()['source'] == f.metadata()['original_url'] == url


# --- git mirror + olah: real downloads by timm -------------------------------------------------------
# Run in a fresh interpreter, because huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE and
# timm_nfnet_ext reads TIMM_NFNET_HUB_NAMESPACE when they are imported.
CLIENT = r"""
import json, sys
import numpy as np, torch, timm
import timm_nfnet_ext
spec = json.loads(sys.argv[1])
out = {'cfg_ids': {f'nfnet_f{i}.dm_in1k': timm.models.get_pretrained_cfg(f'nfnet_f{i}.dm_in1k').hf_hub_id
                   for i in range(7)}}
for label, name, kwargs, overlay, x_path in spec['loads']:
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(x_path)))
    out[label] = {'logits': logits.tolist(), 'hf_hub_id': model.pretrained_cfg.get('hf_hub_id')}
from timm_nfnet_hub.publish import main
out['cli_rc'] = main(spec['cli'])
with open(spec['result'], 'w') as f:
    json.dump(out, f)
"""


@pytest.fixture(scope='module')
def mirror_and_server(tmp_path_factory):
    """A git mirror holding a small model in timm's layout at timm/dm_nfnet_f0.dm_in1k; olah serving it."""
    root = tmp_path_factory.mktemp('hub')
    mirror = root / 'mirror'
    timm_folder = root / 'timm_repo'
    timm_folder.mkdir()
    save_file(small_timm_state(), timm_folder / 'model.safetensors')
    commit_folder(timm_folder, mirror_repo_path(mirror, 'timm/dm_nfnet_f0.dm_in1k'), 'timm layout weights')
    server = OlahServer(mirror, root / 'olah').start()  # boots while the test publishes
    yield mirror, server
    server.stop()


def _git(repo, *args):
    return subprocess.run(['git', '-C', str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_git_mirror_publish_then_timm_downloads(manifest, mirror_and_server, tmp_path, capsys):
    mirror, server = mirror_and_server
    repo = mirror_repo_path(mirror, 'testorg/nfnet_f0.dm_in1k')
    args = ['--manifest', manifest, '--namespace', 'testorg', '--git-mirror', mirror]
    # other weights first, then the tiny fixture: two commits; publishing it again: none
    odd = FIXTURES / 'tiny_nfnet_odd' / 'params.pkl'
    assert run_cli(capsys, 'publish', 'tiny_unsized', '--src', odd, *args)[0] == 0
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', '--src', TINY / 'params.pkl', *args)
    assert rc == 0 and 'committed' in stdout, err
    head = _git(repo, 'rev-parse', 'HEAD')
    rc, stdout, err = run_cli(capsys, 'publish', 'tiny', '--src', TINY / 'params.pkl', *args)
    assert rc == 0 and 'unchanged, no new commit' in stdout, err
    assert _git(repo, 'rev-parse', 'HEAD') == head and _git(repo, 'rev-list', '--count', 'HEAD') == '2'
    assert _git(repo, 'status', '--porcelain') == ''
    assert _git(repo, 'show', 'HEAD:model.safetensors').startswith('version https://git-lfs.github.com/spec/v1')
    (repo / 'README.md').write_text('edited by hand')  # a mirror with local changes is refused, not overwritten
    with pytest.raises(GitMirrorError, match='uncommitted changes'):
        commit_folder(tmp_path, repo, 'must not happen', files=[])
    _git(repo, 'checkout', '--', 'README.md')
    assert _git(repo, 'rev-parse', 'HEAD') == head

    server.wait_ready()
    hf_home = tmp_path / 'hf'
    env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_CACHE', 'HF_TOKEN')}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=server.endpoint, HF_HUB_OFFLINE='0', HF_HUB_DISABLE_TELEMETRY='1',
               OMP_NUM_THREADS='1',
               **{HUB_NAMESPACE_ENV: 'testorg'})
    tiny_kw = fixture_model_kwargs('tiny_nfnet')
    small_x = tmp_path / 'small_x.npy'
    np.save(small_x, fixed_input(timm.create_model('nfnet_f0', **SMALL_TIMM_KWARGS)).numpy())
    tiny_x = str(TINY / 'input.npy')
    result = tmp_path / 'result.json'
    spec = dict(result=str(result), loads=[
        ['namespace', 'nfnet_f0', tiny_kw, dict(num_classes=tiny_kw['num_classes']), tiny_x],
        ['hf_hub', 'hf-hub:testorg/nfnet_f0.dm_in1k', {}, None, tiny_x],
        ['timm_copy', 'nfnet_f0', SMALL_TIMM_KWARGS, dict(hf_hub_id='timm/dm_nfnet_f0.dm_in1k', num_classes=10),
         str(small_x)],
    ], cli=['build', 'small_timm', '--manifest', manifest, '--src', 'hf-hub:timm/dm_nfnet_f0.dm_in1k',
            '--namespace', 'org', '-o', str(tmp_path / 'from_hub')])
    res = subprocess.run([sys.executable, '-c', CLIENT, json.dumps(spec)], env=env, capture_output=True, text=True,
                         timeout=240, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    online = json.loads(result.read_text())

    # the namespace setting moved every cfg; the published repo downloaded over HTTP, both ways
    assert online['cfg_ids'] == {f'nfnet_f{i}.dm_in1k': f'testorg/nfnet_f{i}.dm_in1k' for i in range(7)}
    assert online['namespace']['hf_hub_id'] == 'testorg/nfnet_f0.dm_in1k'
    expected, dm_logits = tiny_expected()
    for label in ('namespace', 'hf_hub'):
        assert torch.equal(torch.tensor(online[label]['logits']), expected), label
    assert np.abs(expected.numpy() - dm_logits).max() < 1e-5

    # timm's hosted layout, fetched by the CLI over HTTP, converted and checked against timm's own model
    assert online['cli_rc'] == 0
    small_state = small_timm_state()
    ours = build_model_from_state(small_state, 'nfnet_f0', SMALL_TIMM_KWARGS)
    x = torch.from_numpy(np.load(small_x))
    assert torch.equal(_logits(timm.create_model(f'local-dir:{tmp_path / "from_hub"}', pretrained=True), x),
                       _logits(ours, x))
    assert torch.equal(torch.tensor(online['timm_copy']['logits']), _logits(ours, x))  # timm's loader, timm layout

    # here HF_HUB_OFFLINE=1 (conftest) and the default namespace: the cache answers, no server needed
    import huggingface_hub.constants
    assert huggingface_hub.constants.is_offline_mode()
    server.stop()
    cache = hf_home / 'hub'
    default = timm.create_model('nfnet_f0', pretrained=True, cache_dir=cache,
                                pretrained_cfg_overlay=dict(num_classes=10), **SMALL_TIMM_KWARGS)
    assert default.pretrained_cfg['hf_hub_id'] == 'timm/dm_nfnet_f0.dm_in1k'  # the default cfg, timm's layout
    assert torch.equal(_logits(default, x), _logits(ours, x))
    again = timm.create_model('hf-hub:testorg/nfnet_f0.dm_in1k', pretrained=True, cache_dir=cache)
    assert torch.equal(_logits(again, torch.from_numpy(np.load(tiny_x))), expected)


def test_release_config_follows_the_architecture():
    """A custom release's config.json: its sizes and crops, and the model's channels and stride."""
    from timm_nfnet_hub.build import release_pretrained_cfg
    from timm_nfnet_hub.manifest import ManifestError, _release_from_dict
    model = timm.create_model('nfnet_f0', widths=(64, 128, 192), depths=(1, 1, 1), strides=(1, 2, 2),
                              group_width=32, in_chans=1, num_classes=7)
    release = _release_from_dict('r', _release({}, params_m=1.0), 'test')  # train 48, test 64
    cfg = release_pretrained_cfg(model, release)
    assert cfg['input_size'] == (1, 48, 48) and cfg['test_input_size'] == (1, 64, 64)
    assert cfg['pool_size'] == (3, 3)  # total stride 16, not 32
    assert cfg['num_classes'] == 7 and cfg['crop_pct'] == pytest.approx(48 / 80)
    assert cfg['tag'] == 'dm_in1k'  # from the repo name nfnet_f0.dm_in1k
    custom = _release_from_dict('r', _release({}, params_m=1.0, repo_name='nfnet_tiny.digits'), 'test')
    assert release_pretrained_cfg(model, custom)['tag'] == 'digits'  # not the architecture's dm_in1k
    untagged = _release_from_dict('r', _release({}, params_m=1.0, repo_name='nfnet-tiny'), 'test')
    assert 'tag' not in release_pretrained_cfg(model, untagged)
    assert 'origin_url' not in release_pretrained_cfg(model, custom)  # a custom release is not DeepMind's
    deepmind = _release_from_dict('r', _release({}, params_m=1.0, origin='deepmind'), 'test')
    assert 'deepmind' in release_pretrained_cfg(model, deepmind)['origin_url']
    for bad in ('nfnet_f0.DM-In1k', 'x.nfnet_f0.v2'):
        with pytest.raises(ManifestError, match='after its dot comes the pretrained tag'):
            _release_from_dict('r', _release({}, params_m=1.0, repo_name=bad), 'test')


def test_deepmind_releases_must_agree_with_the_variant_table():
    import dataclasses
    from timm_nfnet_hub.validate import ValidationError, check_release_facts
    releases = load_manifest()
    for release in releases.values():
        check_release_facts(release)  # the shipped manifest agrees
    f1 = releases['F1']
    with pytest.raises(ValidationError, match=r'top1 84.9 \(the variant table says 84.7\)'):
        check_release_facts(dataclasses.replace(f1, top1=84.9))
    with pytest.raises(ValidationError, match='test_size 256'):
        check_release_facts(dataclasses.replace(f1, test_size=256))
    check_release_facts(dataclasses.replace(f1, origin='custom', top1=12.0))  # not DeepMind's claim
