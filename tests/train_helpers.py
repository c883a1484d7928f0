"""Helpers for tests/test_train.py: a small ImageFolder, tiny-model flags, subprocess runs."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

TINY = ['--model', 'nfnet_f0', '--model-kwargs', 'widths=(32,64,96,96)', 'depths=(1,1,1,1)', 'group_width=16',
        '--img-size', '32', '--workers', '0', '--hflip', '0', '--scale', '0.6', '1.0', '--log-interval', '1',
        '--interpolation', 'bilinear', '--train-interpolation', 'bilinear', '--crop-pct', '1.0']


def make_digits_folder(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """An ImageFolder (train/ and validation/, one folder per class) of scikit-learn digits PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        for split, chosen in (('train', idx[:train_per_class]),
                              ('validation', idx[train_per_class:train_per_class + val_per_class])):
            d = root / split / f'class_{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).resize((32, 32), Image.BICUBIC).convert('RGB').save(d / f'{i}.png')
    return root


def child_env() -> Dict[str, str]:
    """Environment of a training subprocess: 1 thread (bit-reproducible), offline. The package is
    the installed one (editable for development, the wheel in CI)."""
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')


def train_cmd(args: Sequence[str]) -> List[str]:
    return [sys.executable, '-m', 'timm_nfnet_ext.train', *args]


def torchrun_cmd(nproc: int, args: Sequence[str]) -> List[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            '-m', 'timm_nfnet_ext.train', *args]


def run_ok(cmd: Sequence[str], timeout: float = 240) -> str:
    """Run to completion; return stdout+stderr; fail with the output when it does not exit 0."""
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{out[-4000:]}'
    return out


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}: {k} differs (max abs diff {(a[k] - b[k]).abs().max()})'


def run_main(argv) -> tuple:
    """main() in this process, on 1 thread (2 shared cores oversubscribe): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from timm_nfnet_ext.train import main
            code = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()
