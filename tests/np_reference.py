"""An independent NumPy (float64, NHWC) NFNet forward pass, written from NFNETS.md.

It shares no code with the package: it names parameters the way DeepMind's Haiku modules do,
initialises them itself, and computes in float64, so the port can be checked on architectures
and input sizes the golden fixtures do not cover.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

GAMMA = {'gelu': 1.7015043497085571, 'relu': 1.7139588594436646, 'silu': 1.7881293296813965}


def _act(name: str, x: np.ndarray) -> np.ndarray:
    if name == 'gelu':  # JAX's default gelu: the tanh approximation
        y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    elif name == 'relu':
        y = np.maximum(x, 0.0)
    elif name == 'silu':
        y = x / (1.0 + np.exp(-x))
    else:
        raise ValueError(name)
    return y * GAMMA[name]


def _same(size: int, k: int, s: int) -> Tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _conv(p: Dict[str, np.ndarray], name: str, x: np.ndarray, stride: int = 1, groups: int = 1) -> np.ndarray:
    w = p[name + '/w'].astype(np.float64)  # HWIO
    kh, kw, cin_g, cout = w.shape
    mean = w.mean(axis=(0, 1, 2))
    var = w.var(axis=(0, 1, 2))
    scale = 1.0 / np.sqrt(np.maximum(var * (kh * kw * cin_g), 1e-4)) * p[name + '/gain']
    w = w * scale - mean * scale
    (t, b), (l, r) = _same(x.shape[1], kh, stride), _same(x.shape[2], kw, stride)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # N,Ho,Wo,C,kh,kw
    n, ho, wo, c = win.shape[:4]
    win = win.reshape(n, ho, wo, groups, c // groups, kh, kw)
    wg = w.reshape(kh, kw, cin_g, groups, cout // groups)
    out = np.einsum('nhwgcij,ijcgo->nhwgo', win, wg, optimize=True).reshape(n, ho, wo, cout)
    return out + p[name + '/bias']


def _avg_pool_same(x: np.ndarray) -> np.ndarray:
    (t, b), (l, r) = _same(x.shape[1], 2, 2), _same(x.shape[2], 2, 2)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    ones = np.pad(np.ones_like(x[..., :1]), ((0, 0), (t, b), (l, r), (0, 0)))
    sums = sliding_window_view(xp, (2, 2), axis=(1, 2))[:, ::2, ::2].sum(axis=(-1, -2))
    counts = sliding_window_view(ones, (2, 2), axis=(1, 2))[:, ::2, ::2].sum(axis=(-1, -2))
    return sums / counts


def block_names(depths: List[int]) -> List[str]:
    return ['NFNet/~/nf_block' + (f'_{i}' if i else '') for i in range(sum(depths))]


def init_params(spec: dict, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Random parameters in DeepMind's flat layout, every path non-trivial (gains, biases, skip gains)."""
    p: Dict[str, np.ndarray] = {}

    def conv(name, cin, cout, k, groups=1):
        fan_in = k * k * cin // groups
        p[name + '/w'] = rng.normal(0, 1 / math.sqrt(fan_in), (k, k, cin // groups, cout)).astype(np.float32)
        p[name + '/gain'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        p[name + '/bias'] = rng.normal(0, 0.1, cout).astype(np.float32)

    def linear(name, cin, cout, std):
        p[name + '/w'] = rng.normal(0, std, (cin, cout)).astype(np.float32)
        p[name + '/b'] = rng.normal(0, 0.1, cout).astype(np.float32)

    for i, (cin, cout) in enumerate(zip([spec['in_chans'], 16, 32, 64], [16, 32, 64, spec['width'][0] // 2])):
        conv(f'NFNet/~/stem_conv{i}', cin, cout, 3)
    names = iter(block_names(spec['depth']))
    ch = spec['width'][0] // 2
    for s, (width, depth) in enumerate(zip(spec['width'], spec['depth'])):
        for b in range(depth):
            name = next(names)
            mid = int(width * 0.5) // spec['group_width'] * spec['group_width']
            groups = mid // spec['group_width']
            conv(name + '/~/conv0', ch, mid, 1)
            conv(name + '/~/conv1', mid, mid, 3, groups)
            if spec['use_two_convs']:
                conv(name + '/~/conv1b', mid, mid, 3, groups)
            conv(name + '/~/conv2', mid, width, 1)
            if b == 0 and (s > 0 or ch != width):
                conv(name + '/~/conv_shortcut', ch, width, 1)
            linear(name + '/~/squeeze_excite/~/linear', width, int(width * 0.5), 1 / math.sqrt(width))
            linear(name + '/~/squeeze_excite/~/linear_1', int(width * 0.5), width, 1 / math.sqrt(width * 0.5))
            p[name + '/skip_gain'] = np.asarray(rng.uniform(0.2, 1.0), np.float32)
            ch = width
    conv('NFNet/~/final_conv', ch, 2 * ch, 1)
    linear('NFNet/~/linear', 2 * ch, spec['num_classes'], 0.05)
    return p


def forward(p: Dict[str, np.ndarray], x_nchw: np.ndarray, spec: dict) -> Tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits and pooled features, following the reference step by step."""
    act = lambda v: _act(spec['activation'], v)  # noqa: E731
    alpha = 0.2
    x = x_nchw.astype(np.float64).transpose(0, 2, 3, 1)
    x = act(_conv(p, 'NFNet/~/stem_conv0', x, stride=2))
    x = act(_conv(p, 'NFNet/~/stem_conv1', x))
    x = act(_conv(p, 'NFNet/~/stem_conv2', x))
    x = _conv(p, 'NFNet/~/stem_conv3', x, stride=2)
    names = iter(block_names(spec['depth']))
    expected_std = 1.0
    for s, (width, depth) in enumerate(zip(spec['width'], spec['depth'])):
        for b in range(depth):
            name = next(names)
            stride = 2 if (b == 0 and s > 0) else 1
            groups = (int(width * 0.5) // spec['group_width'])
            out = act(x) * (1.0 / expected_std)
            if stride > 1:
                shortcut = _conv(p, name + '/~/conv_shortcut', _avg_pool_same(out))
            elif name + '/~/conv_shortcut/w' in p:
                shortcut = _conv(p, name + '/~/conv_shortcut', out)
            else:
                shortcut = x
            out = _conv(p, name + '/~/conv0', out)
            out = _conv(p, name + '/~/conv1', act(out), stride=stride, groups=groups)
            if spec['use_two_convs']:
                out = _conv(p, name + '/~/conv1b', act(out), groups=groups)
            out = _conv(p, name + '/~/conv2', act(out))
            h = out.mean(axis=(1, 2))
            h = np.maximum(h @ p[name + '/~/squeeze_excite/~/linear/w'] + p[name + '/~/squeeze_excite/~/linear/b'], 0)
            h = h @ p[name + '/~/squeeze_excite/~/linear_1/w'] + p[name + '/~/squeeze_excite/~/linear_1/b']
            gate = 1.0 / (1.0 + np.exp(-h))
            out = (gate[:, None, None, :] * 2) * out
            x = out * p[name + '/skip_gain'] * alpha + shortcut
            if b == 0:
                expected_std = 1.0
            expected_std = math.sqrt(expected_std ** 2 + alpha ** 2)
    x = act(_conv(p, 'NFNet/~/final_conv', x))
    pool = x.mean(axis=(1, 2))
    return pool @ p['NFNet/~/linear/w'] + p['NFNet/~/linear/b'], pool
