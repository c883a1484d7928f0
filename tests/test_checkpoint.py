"""Safe reading of DeepMind pickles, layout mapping, and checkpoints that must be refused."""
import json
import os
import pickle
import struct

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_nfnet_ext.weights import convert
from timm_nfnet_ext.weights.convert import build_model_from_state
from timm_nfnet_ext.weights.checkpoint import (
    CheckpointError, UnsafeCheckpointError, checkpoint_filter_fn, detect_layout, load_checkpoint_file,
    native_to_timm, read_deepmind_pickle, timm_to_native,
)

from conftest import FIXTURES, fixture_model_kwargs, tiny_model


@pytest.mark.parametrize('name,encoding', [
    ('tiny_nfnet', 'haiku._src.data_structures FlatMapping'),  # the 2021 release encoding
    ('tiny_nfnet_odd', 'dill._dill'),
])
def test_reads_both_release_encodings_without_dill_or_haiku(name, encoding):
    raw = (FIXTURES / name / 'params.pkl').read_bytes()
    assert encoding.split()[-1].encode() in raw or encoding.encode() in raw
    flat = read_deepmind_pickle(raw)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())
    assert flat['NFNet/~/stem_conv0/w'].shape == (3, 3, 3, 16)
    assert flat['NFNet/~/nf_block/skip_gain'].shape == ()
    import sys
    assert 'dill' not in sys.modules and 'haiku' not in sys.modules


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / 'pwned'
    payload = pickle.dumps({'NFNet/~/stem_conv0': {'w': _RunsCode(marker)}})
    bad = tmp_path / 'F0_haiku.npz'
    bad.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r'(posix|os)\.system'):
        load_checkpoint_file(bad)
    assert not marker.exists()
    # the converter reports it and writes nothing
    out = tmp_path / 'out'
    assert convert.main([str(bad), '-o', str(out), '--model', 'nfnet_f0']) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize('obj', [
    {'a': {'w': eval}},  # builtins.eval
    {'a': {'w': np.array([object()], dtype=object)}},  # object arrays
])
def test_other_globals_are_refused(obj):
    with pytest.raises(UnsafeCheckpointError, match='refusing'):
        read_deepmind_pickle(pickle.dumps(obj))


@pytest.mark.parametrize('dtype', ['O', 'V16', 'U5'])
def test_arrays_built_by_calling_ndarray_are_refused(dtype):
    """``numpy.ndarray`` may only name _reconstruct's class argument: calling it directly would
    build object/void/string arrays (or allocate whatever shape the pickle asks for)."""
    payload = (b'\x80\x04}X\x0b\x00\x00\x00NFNet/~/a/w\x8c\x05numpy\x8c\x07ndarray\x93K\x02\x85'
               + b'X' + struct.pack('<I', len(dtype)) + dtype.encode() + b'\x86R\x94s.')
    with pytest.raises(UnsafeCheckpointError, match='refusing'):
        read_deepmind_pickle(payload)


def test_protocol_2_pickles_of_arrays_load():
    """Protocol 2 spells an array's bytes as ``_codecs.encode(str, 'latin1')`` (and empty data as
    ``bytes()``): allowed for that alone."""
    tree = {'NFNet/~/stem_conv0': {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
                                   'empty': np.zeros((0, 3), np.float32)}}
    flat = read_deepmind_pickle(pickle.dumps(tree, protocol=2))
    np.testing.assert_array_equal(flat['NFNet/~/stem_conv0/w'], tree['NFNet/~/stem_conv0']['w'])
    assert flat['NFNet/~/stem_conv0/empty'].shape == (0, 3)
    evil = b'\x80\x02c_codecs\nencode\nK\x01X\x06\x00\x00\x00base64\x86R.'  # encode(1, 'base64')
    with pytest.raises(UnsafeCheckpointError, match='_codecs.encode'):
        read_deepmind_pickle(evil)


def test_npz_of_strings_is_refused(tmp_path):
    np.savez(tmp_path / 'a.npz', **{'NFNet/~/x/w': np.array(['abc'])})
    with pytest.raises(UnsafeCheckpointError, match='only numeric arrays'):
        load_checkpoint_file(tmp_path / 'a.npz')


def _safetensors_with_header_low_byte(path, low_byte):
    """A valid safetensors file whose 8-byte header length has the given low byte."""
    for pad in range(64):
        save_file({'w': torch.arange(4.0)}, str(path), metadata={'format': 'pt', 'pad': 'x' * pad})
        if path.read_bytes()[0] == low_byte:
            return path
    raise AssertionError('no padding gave that header length')


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """A safetensors header length of 0x..80 must not send the file to the pickle reader."""
    from timm_nfnet_hub.sources import is_deepmind_format
    from timm_nfnet_ext.weights.checkpoint import sniff_checkpoint_format
    path = _safetensors_with_header_low_byte(tmp_path / 'w.safetensors', 0x80)
    assert sniff_checkpoint_format(path) == 'safetensors'
    assert torch.equal(load_checkpoint_file(path)['w'], torch.arange(4.0))
    assert not is_deepmind_format(path)
    assert is_deepmind_format(FIXTURES / 'tiny_nfnet' / 'params.pkl')


def test_torch_files_are_recognised_by_content(tmp_path):
    """Legacy (pre-zip) torch.save files and zip ones without a torch extension load weights-only."""
    from timm_nfnet_ext.weights.checkpoint import sniff_checkpoint_format
    sd = {'a.weight': torch.randn(3, 2), 'a.bias': torch.randn(3)}
    torch.save(sd, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    torch.save(sd, tmp_path / 'legacy4.pth', _use_new_zipfile_serialization=False, pickle_protocol=4)
    torch.save(sd, tmp_path / 'weights.data')
    # protocol 4 puts a frame before the magic number (torch's weights_only loader then refuses
    # that file itself, with the clear error of the case above): sniffed as torch all the same
    assert sniff_checkpoint_format(tmp_path / 'legacy4.pth') == 'torch'
    for name in ('legacy.pth', 'weights.data'):
        assert sniff_checkpoint_format(tmp_path / name) == 'torch'
        loaded = load_checkpoint_file(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    np.savez(tmp_path / 'n.npz', w=np.ones(2, np.float32))
    assert sniff_checkpoint_format(tmp_path / 'n.npz') == 'npz'


def test_non_array_leaves_are_refused():
    with pytest.raises(CheckpointError, match='not a numpy array'):
        read_deepmind_pickle(pickle.dumps({'NFNet/~/x': {'w': [1.0, 2.0]}}))


def test_truncated_and_corrupt_files(tmp_path):
    raw = (FIXTURES / 'tiny_nfnet' / 'params.pkl').read_bytes()
    cut = tmp_path / 'cut.npz'
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(cut)
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(struct.pack('<Q', 10 ** 9) + b'{"not": "json')
    with pytest.raises(CheckpointError, match='not a readable'):
        load_checkpoint_file(junk)
    empty = tmp_path / 'empty.bin'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_checkpoint_file(empty)
    with pytest.raises(FileNotFoundError):
        load_checkpoint_file(tmp_path / 'missing.npz')


def test_mismatched_checkpoints_list_the_keys():
    flat = read_deepmind_pickle(FIXTURES / 'tiny_nfnet' / 'params.pkl')
    model = tiny_model()
    missing = dict(flat)
    del missing['NFNet/~/nf_block_2/~/conv1b/w']
    with pytest.raises(CheckpointError, match=r'missing keys: stages\.1\.1\.conv1b\.weight'):
        checkpoint_filter_fn(missing, model)
    extra = dict(flat, **{'NFNet/~/nf_block_9/skip_gain': np.zeros((), np.float32)})
    with pytest.raises(CheckpointError, match='unexpected keys: NFNet/~/nf_block_9/skip_gain'):
        checkpoint_filter_fn(extra, model)
    native = checkpoint_filter_fn(flat, model)
    native['stages.0.0.conv0.gain'] = torch.ones(7)
    native['bogus.weight'] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r'unexpected keys: bogus\.weight.*mis-shaped keys: '
                                              r'stages\.0\.0\.conv0\.gain \(7,\)'):
        checkpoint_filter_fn(native, model)
    # a checkpoint of another architecture is refused with the list, not silently half-loaded
    with pytest.raises(CheckpointError, match='missing keys'):
        checkpoint_filter_fn(flat, timm.create_model('nfnet_f0', widths=(64, 128, 192, 192), depths=(1, 2, 3, 1),
                                                     group_width=32, num_classes=10))


def test_timm_dm_nfnet_layout_maps_tensor_by_tensor():
    """A state dict of timm's own dm_nfnet port loads into ours with every tensor in its place."""
    theirs = timm.create_model('dm_nfnet_f0', num_classes=10)
    for p in theirs.parameters():
        p.data.normal_()
    sd = theirs.state_dict()
    assert detect_layout(sd) == 'timm'
    ours = timm.create_model('nfnet_f0', num_classes=10)
    mapped = checkpoint_filter_fn(sd, ours)
    ours.load_state_dict(mapped)
    pairs = {
        'stem.conv0.weight': 'stem.conv1.weight',
        'stem.conv3.gain': 'stem.conv4.gain',
        'stages.0.0.conv_shortcut.weight': 'stages.0.0.downsample.conv.weight',
        'stages.2.3.conv0.bias': 'stages.2.3.conv1.bias',
        'stages.2.3.conv1.weight': 'stages.2.3.conv2.weight',
        'stages.2.3.conv1b.gain': 'stages.2.3.conv2b.gain',
        'stages.2.3.conv2.weight': 'stages.2.3.conv3.weight',
        'stages.3.2.se.fc1.weight': 'stages.3.2.attn_last.fc1.weight',
        'stages.3.2.skip_gain': 'stages.3.2.skipinit_gain',
        'final_conv.weight': 'final_conv.weight',
        'head.fc.weight': 'head.fc.weight',
    }
    ours_sd = ours.state_dict()
    for mine, timms in pairs.items():
        assert torch.equal(ours_sd[mine].flatten(), sd[timms].flatten()), mine
    # and every tensor round-trips through the inverse mapping
    back = native_to_timm(ours_sd)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert set(timm_to_native(back)) == set(ours_sd)


def test_timm_layout_outputs_are_close_to_timm_port():
    """With the same weights, timm's port and ours differ only by timm's numeric choices (small)."""
    torch.manual_seed(0)
    theirs = timm.create_model('dm_nfnet_f0', num_classes=10).eval()
    ours = timm.create_model('nfnet_f0', num_classes=10).eval()
    for p in theirs.parameters():
        if p.ndim == 0:
            p.data.fill_(0.5)  # non-zero skip gains so the residual branches count
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a - b).abs().max() > 0  # timm's var+eps and erf-GELU make it differ at all


def test_pretrained_load_adapts_in_chans_and_num_classes(tmp_path):
    name = 'tiny_nfnet'
    kwargs = fixture_model_kwargs(name)
    out = tmp_path / 'm'
    assert convert.main([str(FIXTURES / name / 'params.pkl'), '-o', str(out), '--model', 'nfnet_f0',
                         '--model-kwargs', __import__('json').dumps(kwargs)]) == 0
    file = str(out / 'model.safetensors')
    base = dict(kwargs, num_classes=10)
    src = timm.create_model('nfnet_f0', pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                            **base)
    five = timm.create_model('nfnet_f0', pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                             **dict(base, num_classes=5))
    assert five.get_classifier().out_features == 5
    assert torch.equal(five.final_conv.weight, src.final_conv.weight)
    gray = timm.create_model('nfnet_f0', pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                             **dict(base, in_chans=1))
    assert gray.stem.conv0.weight.shape[1] == 1
    headless = timm.create_model('nfnet_f0', pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                                 **dict(base, num_classes=0))
    assert torch.equal(headless.stages[1][1].conv1b.weight, src.stages[1][1].conv1b.weight)
    # the DeepMind file itself into a headless model (its classifier is left out, like timm's)
    no_head = tmp_path / 'no_head'
    assert convert.main([str(FIXTURES / name / 'params.pkl'), '-o', str(no_head), '--model', 'nfnet_f0',
                         '--model-kwargs', __import__('json').dumps(dict(kwargs, num_classes=0))]) == 0
    converted = timm.create_model('nfnet_f0', pretrained=True, **dict(kwargs, num_classes=0),
                                  pretrained_cfg_overlay=dict(file=str(no_head / 'model.safetensors')))
    assert torch.equal(converted.stages[1][1].conv1b.weight, src.stages[1][1].conv1b.weight)


def test_converter_errors(tmp_path, capsys):
    src = str(FIXTURES / 'tiny_nfnet' / 'params.pkl')
    assert convert.main([src, '-o', str(tmp_path / 'a'), '--model', 'nfnet_f9']) == 1
    assert 'unknown model' in capsys.readouterr().err
    assert convert.main([src, '-o', str(tmp_path / 'b'), '--model', 'nfnet_f0', '--model-kwargs', '{bad']) == 2
    assert 'not valid JSON' in capsys.readouterr().err
    # wrong architecture for the weights: mismatch listed, nothing written
    assert convert.main([src, '-o', str(tmp_path / 'c'), '--model', 'nfnet_f0']) == 1
    err = capsys.readouterr().err
    assert 'missing keys: stages.2.3.skip_gain (DeepMind NFNet/~/nf_block_6/skip_gain)' in err
    assert 'mis-shaped keys: ' in err and 'stem.conv3.weight (32, 64, 3, 3) vs model (128, 64, 3, 3)' in err
    assert not (tmp_path / 'c').exists()  # the folder it created is removed again
    assert convert.main([src, '-o', str(tmp_path / 'd'), '--model', 'nfnet_f0', '--model-kwargs', '[1]']) == 2
    assert 'must be a JSON object' in capsys.readouterr().err
    assert convert.main([src, '-o', str(tmp_path / 'e'), '--model', 'dm_nfnet_f0']) == 1  # timm's, not ours
    assert 'unknown model' in capsys.readouterr().err
    assert not (tmp_path / 'e').exists()
    nested = tmp_path / 'f' / 'g' / 'h'
    assert convert.main([src, '-o', str(nested), '--model', 'nfnet_f0']) == 1  # wrong architecture
    assert not (tmp_path / 'f').exists()  # parents it created are removed too
    capsys.readouterr()
    tagged = build_model_from_state(read_deepmind_pickle(src), 'nfnet_f0.dm_in1k', fixture_model_kwargs('tiny_nfnet'))
    assert tagged.pretrained_cfg['tag'] == 'dm_in1k'
    (tmp_path / 'file').write_text('x')
    assert convert.main([src, '-o', str(tmp_path / 'file'), '--model', 'nfnet_f0']) == 1
    assert 'exists and is not a folder' in capsys.readouterr().err


def test_converter_does_not_overwrite_without_asking(tmp_path, capsys):
    name = 'tiny_nfnet'
    args = [str(FIXTURES / name / 'params.pkl'), '-o', str(tmp_path / 'out'), '--model', 'nfnet_f0',
            '--model-kwargs', json.dumps(fixture_model_kwargs(name))]
    assert convert.main(args) == 0
    (tmp_path / 'out' / 'model.safetensors').write_bytes(b'mine')
    assert convert.main(args) == 1
    assert 'already holds model.safetensors' in capsys.readouterr().err
    assert (tmp_path / 'out' / 'model.safetensors').read_bytes() == b'mine'  # untouched
    assert convert.main(args + ['--overwrite']) == 0
    assert load_checkpoint_file(tmp_path / 'out' / 'model.safetensors').keys() == tiny_model().state_dict().keys()


def test_converter_config_describes_the_converted_weights(tmp_path, capsys):
    """config.json keeps the release tag only for the registered architecture, and carries the
    sizes and crops given on the command line; the folder still loads through timm."""
    src = str(FIXTURES / 'tiny_nfnet' / 'params.pkl')
    kwargs = ['--model-kwargs', json.dumps(fixture_model_kwargs('tiny_nfnet'))]

    def cfg(name: str) -> dict:
        return json.loads((tmp_path / name / 'config.json').read_text())['pretrained_cfg']

    assert convert.main([src, '-o', str(tmp_path / 'plain'), '--model', 'nfnet_f0', *kwargs]) == 0
    assert 'tag' not in cfg('plain')  # not DeepMind's ImageNet release: no dm_in1k
    assert 'origin_url' not in cfg('plain') and cfg('plain')['paper_ids'] == 'arXiv:2102.06171'  # the architecture's
    assert cfg('plain')['input_size'] == [3, 192, 192]  # the architecture's defaults when none given
    assert convert.main([src, '-o', str(tmp_path / 'sized'), '--model', 'nfnet_f0', *kwargs, '--tag', 'my_data',
                         '--input-size', '48', '--test-input-size', '64']) == 0
    sized = cfg('sized')
    assert (sized['tag'], sized['input_size'], sized['test_input_size']) == ('my_data', [3, 48, 48], [3, 64, 64])
    assert (sized['crop_pct'], sized['test_crop_pct'], sized['num_classes']) == (48 / 80, 64 / 96, 10)
    model = timm.create_model(f'local-dir:{tmp_path / "sized"}', pretrained=True)
    assert model.pretrained_cfg['tag'] == 'my_data' and model.pretrained_cfg['test_input_size'] == (3, 64, 64)
    assert convert.main([src, '-o', str(tmp_path / 'bad'), '--model', 'nfnet_f0', *kwargs, '--tag', 'My Data']) == 1
    assert 'tag must be lowercase' in capsys.readouterr().err and not (tmp_path / 'bad').exists()
    assert convert.main([src, '-o', str(tmp_path / 'bad'), '--model', 'nfnet_f0', *kwargs, '--input-size', '0']) == 1
    assert 'input_size must be a positive' in capsys.readouterr().err and not (tmp_path / 'bad').exists()
    # DeepMind's or timm's layout in the registered architecture may be the release: its tag stays
    release = convert.conversion_cfg(timm.create_model('nfnet_f0'), release_weights=True)
    assert release['tag'] == 'dm_in1k' and 'deepmind' in release['origin_url']
    assert convert.is_release_conversion('deepmind', {}) and convert.is_release_conversion('timm', None)
    assert convert.is_release_conversion('deepmind', dict(num_classes=10, in_chans=1, drop_rate=0.5, output_stride=16))
    assert not convert.is_release_conversion('deepmind', dict(activation='relu'))
    assert not convert.is_release_conversion('native', {})  # trained with this package
    assert not convert.is_release_conversion('deepmind', dict(widths=(64, 128, 192, 192)))


def test_converter_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['stages.1.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    src = tmp_path / 'nan.safetensors'
    save_file(sd, str(src))
    kwargs = dict(widths=[64, 128, 192, 192], depths=[1, 2, 2, 1], group_width=32, num_classes=10)
    with pytest.raises(CheckpointError, match=r'non-finite values in stages\.1\.0\.conv1\.weight'):
        convert.convert(src, tmp_path / 'out', 'nfnet_f0', kwargs)
    assert not (tmp_path / 'out' / 'model.safetensors').exists()


def test_native_safetensors_and_weights_only_pth_round_trip(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, tmp_path / 'ckpt.pth')
    loaded = load_checkpoint_file(tmp_path / 'ckpt.pth')
    assert detect_layout(loaded) == 'native'
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # a .pth that pickles arbitrary objects is refused by weights_only loading
    torch.save({'state_dict': sd, 'evil': _RunsCode(tmp_path / 'x')}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='weights-only'):
        load_checkpoint_file(tmp_path / 'evil.pth')
    assert not (tmp_path / 'x').exists()


def test_converted_files_are_byte_reproducible(tmp_path):
    """The same weights give the same bytes (safetensors' metadata order would otherwise vary)."""
    import hashlib
    import json as _json
    import subprocess
    import sys
    name = 'tiny_nfnet'
    args = [str(FIXTURES / name / 'params.pkl'), '--model', 'nfnet_f0', '--model-kwargs',
            _json.dumps(fixture_model_kwargs(name))]
    digests = set()
    for run in range(2):  # separate processes: the hash-map order differs between them
        out = tmp_path / f'run{run}'
        res = subprocess.run([sys.executable, '-m', 'timm_nfnet_ext.weights.convert', args[0], '-o', str(out)] + args[1:],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONHASHSEED=str(run)))
        assert res.returncode == 0, res.stderr
        digests.add(hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize('in_chans', [1, 6])
def test_adapted_input_channels_keep_the_pretrained_response(tmp_path, in_chans):
    """timm adapts the first conv to another in_chans after the filter (sum for 1, repeat x 3/C
    for C); weight standardisation would undo that scaling without the gain correction."""
    torch.manual_seed(0)
    rgb = tiny_model().eval()
    with torch.no_grad():  # colour-correlated kernels, as trained RGB stems have
        w = rgb.stem.conv0.weight
        w.copy_(w[:, :1] + 0.3 * torch.randn_like(w))
    save_file(rgb.state_dict(), str(tmp_path / 'rgb.safetensors'))
    kwargs = dict(widths=(64, 128, 192, 192), depths=(1, 2, 2, 1), group_width=32, num_classes=10)
    adapted = timm.create_model('nfnet_f0', pretrained=True, in_chans=in_chans, **kwargs,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'rgb.safetensors'), num_classes=10)).eval()
    g = torch.randn(2, 1, 64, 64)
    x_rgb = g.expand(2, 3, 64, 64) if in_chans == 1 else torch.randn(2, 3, 64, 64)
    x_adapted = g if in_chans == 1 else x_rgb.repeat(1, in_chans // 3, 1, 1)
    with torch.no_grad():
        want, got = rgb.stem.conv0(x_rgb), adapted.stem.conv0(x_adapted)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert torch.allclose(adapted(x_adapted), rgb(x_rgb), atol=1e-4)
