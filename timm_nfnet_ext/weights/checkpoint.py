"""Reading NFNet weights safely, and mapping the three layouts onto this package's modules.

One file on purpose: the three layouts' readers and the one rename table, used both ways
(timm -> native and native -> timm), belong together.

Layouts:
- ``deepmind``: DeepMind's released ``F*_haiku.npz`` files, which are dill pickles of
  ``{'NFNet/~/stem_conv0': {'w': HWIO array, 'gain': ..., 'bias': ...}, ...}`` (2021: haiku
  ``FlatMapping`` containers; newer: plain dicts and dill's array helper);
- ``timm``: timm's ``dm_nfnet_*`` state dicts (the weights timm hosts on the Hub);
- ``native``: this package's own state dict.

Pickles are untrusted input. ``read_deepmind_pickle`` runs a restricted unpickler that resolves
only the handful of globals those files use to rebuild mappings and numpy arrays; any other
global (``os.system``, ``builtins.eval``, ...) stops the load with ``UnsafeCheckpointError``
before anything is called. Neither dill nor haiku is needed.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..files import PathLike

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'read_deepmind_pickle', 'load_checkpoint_file',
    'sniff_checkpoint_format', 'detect_layout', 'deepmind_to_native', 'timm_to_native', 'native_to_timm',
    'checkpoint_filter_fn', 'check_state_dict',
]

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickle that asks for a global outside the allowed numpy/mapping reconstructors."""


# --- the restricted unpickler -------------------------------------------------------------------
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own `_reconstruct`, whatever its module


def _check_dtype(dtype: np.dtype, where: str = '') -> np.dtype:
    if dtype.hasobject or dtype.kind not in 'biufc':
        raise UnsafeCheckpointError(
            f'{where + ": " if where else ""}refusing numpy dtype {dtype!r}: only numeric arrays are accepted')
    return dtype


def _safe_dtype(*args: Any) -> np.dtype:
    return _check_dtype(np.dtype(*args))


class _NdarrayToken:
    """What the pickle's ``numpy.ndarray`` global resolves to: a name for ``_reconstruct``'s first
    argument that refuses to be called (``ndarray(shape, dtype)`` would build object arrays or
    allocate any size the pickle asks for)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafeCheckpointError('refusing a direct numpy.ndarray(...) call: arrays must come from _reconstruct')

    def __repr__(self) -> str:
        return 'numpy.ndarray (as an argument of _reconstruct only)'


_NDARRAY = _NdarrayToken()


def _safe_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    if cls is not _NDARRAY:
        raise UnsafeCheckpointError(f'refusing to rebuild {cls!r}: only numpy.ndarray is accepted')
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n <= 1 for n in shape):
        # numpy pickles an empty (0,) placeholder here and sends the real shape with the data
        raise UnsafeCheckpointError(f'refusing numpy _reconstruct with shape {shape!r}')
    return _NP_RECONSTRUCT(np.ndarray, shape, dtype)


def _safe_create_array(f: Any, args: Tuple, state: Any, npdict: Any = None) -> np.ndarray:
    """dill's ``_create_array``: ``f(*args)`` then ``__setstate__(state)``, for plain arrays only."""
    if f is not _safe_reconstruct or npdict:
        raise UnsafeCheckpointError('refusing a dill array built by anything but numpy _reconstruct')
    array = f(*args)
    array.__setstate__(state)
    _check_dtype(array.dtype)
    return array


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's pickle-protocol-5 array rebuild."""
    return np.frombuffer(buf, _check_dtype(np.dtype(dtype))).reshape(shape, order=order).copy()


def _safe_scalar(dtype: Any, data: bytes) -> np.ndarray:
    return np.frombuffer(data, _check_dtype(np.dtype(dtype)), count=1).reshape(()).copy()


def _safe_codecs_encode(text: Any, encoding: str = 'latin1') -> bytes:
    """Protocol-2 pickles spell raw bytes as ``_codecs.encode(str, 'latin1')``: that, and nothing else."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise UnsafeCheckpointError(f'refusing _codecs.encode with {type(text).__name__}, {encoding!r}')
    return text.encode('latin1')


def _safe_empty_bytes(*args: Any) -> bytes:
    """Protocol 2 spells an empty bytes object (a zero-size array's data) as ``bytes()``."""
    if args:
        raise UnsafeCheckpointError('refusing bytes(...) with arguments')
    return b''


def _flat_mapping(*args: Any) -> Dict[str, Any]:
    """Stand-in for haiku's ``FlatMapping``: pickled as ``FlatMapping(dict)``; rebuilt as a dict."""
    if len(args) != 1 or not isinstance(args[0], Mapping):
        raise UnsafeCheckpointError('haiku FlatMapping pickled with unexpected arguments')
    return dict(args[0])


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[..., Any]] = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('haiku._src.data_structures', 'FlatMapping'): _flat_mapping,
    ('haiku._src.data_structures', 'FlatMap'): _flat_mapping,
    ('numpy', 'ndarray'): _NDARRAY,  # only ever an argument of _reconstruct
    ('numpy', 'dtype'): _safe_dtype,
    ('numpy.core.multiarray', '_reconstruct'): _safe_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _safe_reconstruct,
    ('numpy.core.multiarray', 'scalar'): _safe_scalar,
    ('numpy._core.multiarray', 'scalar'): _safe_scalar,
    ('numpy.core.numeric', '_frombuffer'): _safe_frombuffer,
    ('numpy._core.numeric', '_frombuffer'): _safe_frombuffer,
    ('dill._dill', '_create_array'): _safe_create_array,
    ('_codecs', 'encode'): _safe_codecs_encode,
    ('__builtin__', 'bytes'): _safe_empty_bytes,
    ('builtins', 'bytes'): _safe_empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f'refusing unsafe pickle global {module}.{name}: NFNet checkpoints may only hold '
                'mappings and numpy arrays') from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f'refusing pickle persistent id {pid!r}')


def _flatten_tree(tree: Any, source: str) -> Dict[str, np.ndarray]:
    """``{module: {param: array}}`` (or already flat ``{'module/param': array}``) -> flat dict."""
    if not isinstance(tree, Mapping):
        raise CheckpointError(f'{source}: expected a mapping of module names, got {type(tree).__name__}')
    flat: Dict[str, np.ndarray] = {}
    for module, params in tree.items():
        if isinstance(params, np.ndarray):
            flat[str(module)] = params
            _check_dtype(params.dtype, f'{source}: {module}')
            continue
        if not isinstance(params, Mapping):
            raise CheckpointError(f'{source}: entry {module!r} is a {type(params).__name__}, not a mapping or array')
        for name, value in params.items():
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f'{source}: {module}/{name} is a {type(value).__name__}, not a numpy array')
            _check_dtype(value.dtype, f'{source}: {module}/{name}')
            flat[f'{module}/{name}'] = value
    return flat


def read_deepmind_pickle(data: Union[bytes, PathLike], source: str = '') -> Dict[str, np.ndarray]:
    """Read a DeepMind NFNet checkpoint (a dill pickle) without executing anything.

    Args:
        data: the pickle's bytes, or the path of the file.
        source: what to call it in error messages (default: the path, or ``<bytes>``).

    Returns:
        A flat ``{'NFNet/~/stem_conv0/w': array, ...}`` dict of numeric numpy arrays.

    Raises:
        UnsafeCheckpointError: any global other than numpy array / mapping reconstructors, or a
            non-numeric array dtype.
        CheckpointError: a truncated or corrupt file, or one that is not a tree of arrays.
        OSError: ``data`` is a path that cannot be read (e.g. ``FileNotFoundError``).
    """
    if not isinstance(data, (bytes, bytearray)):
        source = source or str(data)
        with open(data, 'rb') as f:
            data = f.read()
    source = source or '<bytes>'
    try:
        tree = _RestrictedUnpickler(io.BytesIO(data), encoding='latin1').load()  # latin1: Python 2 numpy data
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ValueError from numpy on short buffers ...
        raise CheckpointError(f'{source}: truncated or corrupt checkpoint ({type(e).__name__}: {e})') from None
    return _flatten_tree(tree, source)


_TORCH_LEGACY_MAGIC = b'\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'  # torch.save's pre-zip magic number


def sniff_checkpoint_format(path: PathLike) -> str:
    """What a weights file is, judged by its bytes (never by its name):
    'safetensors', 'pickle' (DeepMind's dill pickles), 'torch' (``torch.save``, zip or legacy),
    'npz' (a numpy zip archive) or 'unknown'.

    safetensors is tested first and fully: its first 8 bytes are the header length (little-endian)
    and its header is JSON, so a length whose low byte is 0x80 must not pass for a pickle.

    Args:
        path: the file.

    Returns:
        One of ``'safetensors'``, ``'pickle'``, ``'torch'``, ``'npz'``, ``'unknown'``.

    Raises:
        OSError: the file cannot be read (e.g. ``FileNotFoundError``).
    """
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(32)
    if len(head) >= 9 and head[8:9] == b'{' and 2 <= int.from_bytes(head[:8], 'little') <= size - 8:
        return 'safetensors'
    if head[:1] == b'\x80' and _TORCH_LEGACY_MAGIC in head:  # any pickle protocol: PROTO n, then the magic
        return 'torch'
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode, protocol 2-5
        return 'pickle'
    if head[:2] == b'PK':
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return 'npz'  # let the npz reader name the damage
        # torch's zip format keeps its pickle at '<archive>/data.pkl'; npz members are '.npy' files
        return 'torch' if any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names) else 'npz'
    return 'unknown'


def load_checkpoint_file(path: PathLike, use_ema: bool = True) -> Dict[str, Union[np.ndarray, torch.Tensor]]:
    """Load weights from a file of any supported kind, judged by its content, never by ``pickle``.

    - safetensors (any layout);
    - DeepMind's dill pickles (``F0_haiku.npz`` and friends) through the restricted unpickler;
    - real ``.npz`` archives (``allow_pickle=False``);
    - PyTorch ``torch.save`` files (zip or legacy) with ``torch.load(weights_only=True)``; of a
      training checkpoint, the EMA weights when it has them and ``use_ema`` is true.

    Args:
        path: the weights file.
        use_ema: of a training checkpoint, take the EMA weights when it has them.

    Returns:
        A flat dict of numpy arrays (DeepMind pickles, npz) or tensors (safetensors, torch),
        in the file's own layout (see :func:`detect_layout`).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: an empty, truncated, corrupt or unrecognised file, or a torch file
            that is not a weights-only state dict of tensors.
        UnsafeCheckpointError: a pickle that asks for a disallowed global, or a non-numeric array.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if os.path.getsize(path) < 2:
        raise CheckpointError(f'{path}: empty or truncated checkpoint')
    kind = sniff_checkpoint_format(path)
    if kind == 'pickle':
        return read_deepmind_pickle(path)
    if kind == 'torch':
        return _load_torch_weights(path, use_ema)
    if kind == 'npz':
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(f'{path}: truncated or corrupt npz archive ({e})') from None
        for name, array in arrays.items():
            _check_dtype(array.dtype, f'{path}: {name}')
        return arrays
    try:
        from safetensors.torch import load_file
        return load_file(path)
    except Exception as e:
        what = 'safetensors file' if kind == 'safetensors' else 'safetensors/pickle/npz/torch checkpoint'
        raise CheckpointError(f'{path}: not a readable {what} ({e})') from None


def _load_torch_weights(path: str, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """timm's own loader (EMA/state_dict unwrapping, 'module.' prefixes) with ``weights_only=True``."""
    from timm.models import load_state_dict
    try:
        state = load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path}: not a loadable weights-only PyTorch file ({e})') from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f'{path}: expected a state dict of tensors')
    return dict(state)


# --- layouts -------------------------------------------------------------------------------------
def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'deepmind', 'timm' (timm's ``dm_nfnet_*``) or 'native'.

    Args:
        state_dict: a flat weights dict, as :func:`load_checkpoint_file` returns.

    Returns:
        The layout's name, judged by the key names.
    """
    keys = list(state_dict)
    if any('/~/' in k for k in keys):
        return 'deepmind'
    if any(k.startswith('stem.conv4.') or k.endswith('skipinit_gain') for k in keys):
        return 'timm'
    return 'native'


def _block_index(model: nn.Module) -> Dict[Tuple[int, int], int]:
    """(stage, block) -> the flat block number DeepMind's module names use."""
    index, flat = {}, 0
    for s, stage in enumerate(model.stages):
        for b in range(len(stage)):
            index[(s, b)] = flat
            flat += 1
    return index


def _native_to_deepmind_name(name: str, blocks: Dict[Tuple[int, int], int], root: str) -> Tuple[str, str]:
    """Native parameter name -> (DeepMind 'module/param' name, kind), kind in conv/linear/plain."""
    module, param = name.rsplit('.', 1)
    m = re.fullmatch(r'stages\.(\d+)\.(\d+)(?:\.(.+))?', module)
    if m and param == 'skip_gain':
        k = blocks[(int(m[1]), int(m[2]))]
        return f'{root}/~/nf_block{"_" + str(k) if k else ""}/skip_gain', 'plain'
    if module.startswith('stem.conv'):
        dm_module = f'{root}/~/stem_conv{module[len("stem.conv"):]}'
    elif module == 'final_conv':
        dm_module = f'{root}/~/final_conv'
    elif module == 'head.fc':
        return f'{root}/~/linear/{"w" if param == "weight" else "b"}', 'linear' if param == 'weight' else 'plain'
    elif m:
        k = blocks[(int(m[1]), int(m[2]))]
        block = f'{root}/~/nf_block{"_" + str(k) if k else ""}'
        sub = m[3]
        if sub is None:
            raise CheckpointError(f'no DeepMind counterpart for parameter {name}: is this a model of this package?')
        if sub.startswith('se.fc'):
            linear = 'linear' if sub == 'se.fc1' else 'linear_1'
            dm_param = 'w' if param == 'weight' else 'b'
            return f'{block}/~/squeeze_excite/~/{linear}/{dm_param}', 'linear' if param == 'weight' else 'plain'
        dm_module = f'{block}/~/{sub}'
    else:
        raise CheckpointError(f'no DeepMind counterpart for parameter {name}')
    dm_param = {'weight': 'w'}.get(param, param)
    return f'{dm_module}/{dm_param}', 'conv' if param == 'weight' else 'plain'


def deepmind_to_native(flat: Mapping[str, Any], model: nn.Module, skip_shape: Iterable[str] = ()) -> StateDict:
    """Map a flat DeepMind param dict onto ``model``'s parameter names (HWIO -> OIHW, (in,out) -> (out,in)).

    Args:
        flat: the DeepMind weights, flat (``'NFNet/~/stem_conv0/w'``) or nested by module.
        model: the model whose state dict names and shapes to produce.
        skip_shape: native names whose shapes may differ from the model's.

    Returns:
        The model's state dict (float32 tensors).

    Raises:
        CheckpointError: listing every missing, unexpected and mis-shaped key at once; also
            for more than one root module or a kernel of the wrong rank.
    """
    flat = _flatten_tree(flat, 'DeepMind checkpoint') if any(isinstance(v, Mapping) for v in flat.values()) else flat
    roots = {k.split('/~/', 1)[0] for k in flat}
    if len(roots) != 1:
        raise CheckpointError(f'expected one root module in the DeepMind checkpoint, found {sorted(roots)}')
    root = roots.pop()
    blocks = _block_index(model)
    out: StateDict = {}
    used, missing = set(), []
    expected = model.state_dict()
    for name in expected:
        dm_name, kind = _native_to_deepmind_name(name, blocks, root)
        if dm_name not in flat:
            missing.append(f'{name} (DeepMind {dm_name})')
            continue
        value = np.asarray(flat[dm_name])
        if kind == 'conv':
            if value.ndim != 4:
                raise CheckpointError(f'{dm_name}: expected a 4-d HWIO kernel, got shape {value.shape}')
            value = value.transpose(3, 2, 0, 1)
        elif kind == 'linear':
            if value.ndim != 2:
                raise CheckpointError(f'{dm_name}: expected a 2-d (in, out) matrix, got shape {value.shape}')
            value = value.T
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
        used.add(dm_name)
    misshaped = _misshaped(out, expected, skip_shape)
    # a model without a classifier (num_classes=0) leaves the checkpoint's head unused, as timm does
    headless = getattr(model, 'num_classes', 1) == 0
    unexpected = sorted(k for k in set(flat) - used if not (headless and k.startswith(f'{root}/~/linear/')))
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(missing, unexpected, misshaped))
    return out


# timm's dm_nfnet block names <-> ours: applied in this order from timm's names, and swapped in
# the reverse order from ours (so that conv1 -> conv0 never meets conv2 -> conv1 twice).
_TIMM_BLOCK_RENAMES = (
    ('.downsample.conv.', '.conv_shortcut.'),
    ('.conv1.', '.conv0.'),
    ('.conv2.', '.conv1.'),
    ('.conv2b.', '.conv1b.'),
    ('.conv3.', '.conv2.'),
    ('.attn_last.', '.se.'),
    ('.skipinit_gain', '.skip_gain'),
)


def _timm_name(name: str, to_native: bool) -> str:
    """A parameter name in the other layout (timm's stem convs count from 1, ours from 0)."""
    stem = re.match(r'^stem\.conv(\d)(\..*)$', name)
    if stem:
        return f'stem.conv{int(stem[1]) + (-1 if to_native else 1)}{stem[2]}'
    if not name.startswith('stages.'):
        return name
    pairs = _TIMM_BLOCK_RENAMES if to_native else [(b, a) for a, b in reversed(_TIMM_BLOCK_RENAMES)]
    for old, new in pairs:
        name = name.replace(old, new)
    return name


def timm_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm ``dm_nfnet_*`` state dict -> this package's names (gains (O,1,1,1) -> (O,), SE 1x1 convs -> linears).

    Args:
        state_dict: timm's state dict.

    Returns:
        The same weights under this package's names and shapes.
    """
    out: StateDict = {}
    for name, value in state_dict.items():
        new = _timm_name(name, to_native=True)
        value = torch.as_tensor(value)
        if new.endswith('.gain'):
            value = value.reshape(-1)
        elif '.se.fc' in new and new.endswith('.weight'):
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def native_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """This package's state dict -> timm ``dm_nfnet_*`` names and shapes (for side-by-side checks).

    Args:
        state_dict: this package's state dict.

    Returns:
        The same weights under timm's names and shapes.
    """
    out: StateDict = {}
    for name, value in state_dict.items():
        new = _timm_name(name, to_native=False)
        if new.endswith('.gain'):
            value = value.reshape(-1, 1, 1, 1)
        elif '.attn_last.fc' in new and new.endswith('.weight'):
            value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def _mismatch_message(missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str]) -> str:
    parts = []
    for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
        items = list(items)
        if items:
            shown = ', '.join(items[:20]) + (f', ... ({len(items)} in all)' if len(items) > 20 else '')
            parts.append(f'{title} keys: {shown}')
    return 'checkpoint does not fit the model: ' + '; '.join(parts)


def _misshaped(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Tensor],
               skip_shape: Iterable[str]) -> List[str]:
    """``name (shape) vs model (shape)`` for each key both have whose shapes differ, in the
    model's order (the stem first)."""
    skip = set(skip_shape)
    return [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}' for k, v in expected.items()
            if k in state_dict and k not in skip and tuple(state_dict[k].shape) != tuple(v.shape)]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, skip_shape: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys.

    Args:
        state_dict: the weights, in the model's layout.
        model: the model they must fit.
        skip_shape: names whose shapes may differ from the model's.

    Raises:
        CheckpointError: any key is missing, unexpected or mis-shaped.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = _misshaped(state_dict, expected, skip_shape)
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(missing, unexpected, misshaped))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> StateDict:
    """timm ``pretrained_filter_fn``: any of the three layouts in, the model's state dict out.

    The first conv and the classifier may differ in shape (timm adapts ``in_chans`` and drops a
    classifier of another ``num_classes`` after this filter); everything else must match.

    Args:
        state_dict: the loaded weights, in any of the three layouts.
        model: the model being loaded (its ``pretrained_cfg`` names the first conv and classifier).

    Returns:
        The model's state dict; with the first conv's gain rescaled where timm will adapt its
        weight to another ``in_chans``.

    Raises:
        CheckpointError: the weights do not fit the model (missing, unexpected or mis-shaped keys).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_conv, classifier = cfg.get('first_conv', 'stem.conv0'), cfg.get('classifier', 'head.fc')
    skip = {f'{first_conv}.weight', f'{classifier}.weight', f'{classifier}.bias'}
    layout = detect_layout(state_dict)
    if layout == 'deepmind':
        out = deepmind_to_native(state_dict, model, skip_shape=skip)
    elif layout == 'timm':
        out = timm_to_native(state_dict)
    else:
        out = {k: torch.as_tensor(v) for k, v in state_dict.items()}
    if getattr(model, 'num_classes', 1) == 0:
        out = {k: v for k, v in out.items() if not k.startswith(classifier + '.')}
    check_state_dict(out, model, skip_shape=skip)
    _rescale_gain_for_input_adaptation(out, model, first_conv)
    return out


def _rescale_gain_for_input_adaptation(state: StateDict, model: nn.Module, first_conv: str) -> None:
    """Keep the first conv's response when timm adapts its weight to another ``in_chans``.

    After this filter, timm's ``adapt_input_conv`` sums the RGB kernels (``in_chans=1``) or
    repeats them scaled by 3/C: right for a plain conv, but weight standardisation divides the
    adapted kernel by its own norm, which undoes that scaling (a grayscale model came out ~1/sqrt(3)
    too weak on correlated kernels, a C-channel one sqrt(C/3) too strong). Standardisation is
    ``gain * D / ||D||`` per output row (``D`` the centred kernel), so with its gain scaled by
    ``||D_adapted|| / ||D||`` (norms floored at sqrt(eps) as the forward does) the adapted model
    computes what adapting the *standardised* kernel would give: exactly for 1 channel and for
    multiples of 3; for other counts the repeated-then-cut kernel's mean shifts a little, and the
    response is matched in scale only.
    """
    weight, gain = state.get(f'{first_conv}.weight'), state.get(f'{first_conv}.gain')
    try:
        conv = model.get_submodule(first_conv)
    except AttributeError:
        return
    in_chans = getattr(conv, 'in_channels', None)
    if weight is None or gain is None or weight.ndim != 4 or in_chans in (None, weight.shape[1]):
        return
    from timm.models import adapt_input_conv
    eps = float(getattr(conv, 'eps', 1e-4))
    try:  # as timm's loader calls it; a weight it cannot adapt is dropped there, its gain left here
        adapted = adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    except (NotImplementedError, ValueError, AssertionError):
        return

    def row_norm(w: torch.Tensor) -> torch.Tensor:
        d = w.double().reshape(w.shape[0], -1)
        return (d - d.mean(1, keepdim=True)).pow(2).sum(1).clamp_min(eps).sqrt()

    ratio = row_norm(adapted) / row_norm(weight)
    state[f'{first_conv}.gain'] = (gain.double() * ratio.reshape(gain.shape)).to(gain.dtype)
