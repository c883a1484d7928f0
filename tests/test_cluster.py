"""timm-nfnet-train on a cluster (issue 21): elastic restart after a SIGKILLed worker, preemption by
SIGTERM / SIGUSR1, two hosts (network namespaces), damaged checkpoints, non-finite steps.

Every fault test ends by comparing the final weights with an uninterrupted run's, bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn as nn

import timm_nfnet_ext.train.checkpoint as ckpt_io
import timm_nfnet_ext.train.setup as train_setup
from timm_nfnet_ext.train.elastic import EXIT_DIVERGED, EXIT_PREEMPTED

from train_helpers import REPO, TINY, child_env, load_ckpt, make_digits_folder, run_main, run_ok, train_cmd

# 200 images, -b 8 on 2 processes (or -b 16 on 1): 12 steps an epoch; in-epoch checkpoints every 3
ARGS = [*TINY, '--epochs', '2', '--checkpoint-interval', '3', '--mixup', '0.2', '--drop-path', '0.1',
        '--model-ema', '--model-ema-decay', '0.9', '--agc', '0.02', '--lr', '0.05', '--warmup-epochs', '0',
        '--sched-on-updates', '--seed', '7', '--resume', 'auto']
FINGERPRINT = re.compile(r'rank 0 weights sha256 ([0-9a-f]{64})')


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory) -> Path:
    return make_digits_folder(tmp_path_factory.mktemp('digits'), 20, 5)


def torchrun(nproc: int, args: Sequence[str], *extra: str) -> List[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}', *extra,
            '-m', 'timm_nfnet_ext.train', *args]


def _children(pid: int) -> List[int]:
    """Direct children of ``pid`` (from /proc: no psutil needed)."""
    kids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> Optional[int]:
    try:
        env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError:
        return None
    for item in env:
        if item.startswith(b'RANK='):
            return int(item[5:])
    return None


def worker_pid(launcher: int, rank: int) -> int:
    for _ in range(50):
        found = [p for p in _children(launcher) if _rank_of(p) == rank]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f'no worker of rank {rank} under process {launcher}')


def _kill_tree(pid: int) -> None:
    for kid in _children(pid):
        _kill_tree(kid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def run_with_fault(cmd: Sequence[str], trigger: str, fault: Callable[[subprocess.Popen], None],
                   timeout: float = 240, env: Optional[Dict[str, str]] = None) -> tuple:
    """Run ``cmd``; call ``fault(proc)`` once, at the first output line matching ``trigger``.
    (exit code, output, whether the fault fired). A run past ``timeout`` is killed (with its
    workers) and fails the test: the hang this file guards against."""
    proc = subprocess.Popen(cmd, env=env or child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    hung = threading.Event()

    def watchdog() -> None:
        hung.set()
        _kill_tree(proc.pid)

    timer = threading.Timer(timeout, watchdog)
    timer.start()
    lines, fired = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not fired and re.search(trigger, line):
                fired = True
                fault(proc)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_tree(proc.pid)
    out = ''.join(lines)
    assert not hung.is_set(), f'{cmd} was still running after {timeout} s (killed):\n{out[-3000:]}'
    return code, out, fired


def fingerprint(out: str) -> str:
    found = FINGERPRINT.findall(out)
    assert found, out[-3000:]
    return found[-1]


@pytest.fixture(scope='module')
def reference(digits_dir, tmp_path_factory) -> str:
    """The weights fingerprint of an uninterrupted 2-process run (1 node x 2 processes)."""
    out = run_ok(torchrun(2, ['--data-dir', str(digits_dir), *ARGS, '-b', '8',
                              '--output', str(tmp_path_factory.mktemp('ref') / 'run')]))
    return fingerprint(out)


# --- 1. elastic restart ----------------------------------------------------------------------
def test_sigkilled_worker_is_restarted_by_torchrun_and_the_run_ends_bit_identical(digits_dir, tmp_path, reference):
    """Before: the restarted group read the killed attempt's keys from torchrun's store and never
    trained again (a connect failure, or a hang until the job's timeout)."""
    out_dir = tmp_path / 'run'
    cmd = torchrun(2, ['--data-dir', str(digits_dir), *ARGS, '-b', '8', '--output', str(out_dir)],
                   '--max-restarts=1')
    code, out, fired = run_with_fault(cmd, r'train: epoch 1 \[\s*5/12\]',
                                      lambda p: os.kill(worker_pid(p.pid, 1), signal.SIGKILL), timeout=180)
    assert fired and code == 0, out[-4000:]
    # from the interval checkpoint before the kill (step 3; 6 when both ranks got past step 6 before it)
    assert re.search(r'resuming .*last.pth.tar at epoch 1 step [36] ', out), out[-3000:]
    assert fingerprint(out) == reference


# --- 2. preemption ---------------------------------------------------------------------------
def test_sigusr1_and_sigterm_stop_every_rank_at_one_step_with_a_checkpoint_and_resume_exactly(
        digits_dir, tmp_path, reference):
    out_dir = tmp_path / 'run'
    cmd = torchrun(2, ['--data-dir', str(digits_dir), *ARGS, '-b', '8', '--output', str(out_dir)])
    # SIGUSR1 (SLURM's early warning) to one worker only: both ranks stop after the same step
    code, out, fired = run_with_fault(cmd, r'train: epoch 0 \[\s*4/12\]',
                                      lambda p: os.kill(worker_pid(p.pid, 1), signal.SIGUSR1))
    assert fired and code != 0, out[-3000:]
    stop = re.search(r'stopping on .*: epoch 0 step (\d+) ', out)
    assert stop, out[-3000:]
    assert re.search(rf'exitcode\s*:\s*{EXIT_PREEMPTED}\b', out), out[-3000:]  # both workers: 75
    assert out.count(f'exit code {EXIT_PREEMPTED}') == 2, out[-3000:]
    ckpt = load_ckpt(out_dir / 'last.pth.tar')
    assert (ckpt['epoch'], ckpt['step']) == (0, int(stop.group(1))) and ckpt['step'] >= 4

    # SIGTERM to torchrun (which forwards it to its workers): the progress since the last
    # interval checkpoint is kept
    code, out, fired = run_with_fault(cmd, r'train: epoch 1 \[\s*4/12\]', lambda p: p.send_signal(signal.SIGTERM))
    assert fired and code != 0, out[-3000:]
    assert re.search(rf'resuming .*last.pth.tar at epoch 0 step {ckpt["step"]} ', out), out[-3000:]
    stop = re.search(r'stopping on SIGTERM: epoch 1 step (\d+) ', out)
    assert stop, out[-3000:]
    ckpt = load_ckpt(out_dir / 'last.pth.tar')
    assert (ckpt['epoch'], ckpt['step']) == (1, int(stop.group(1))) and ckpt['step'] >= 4

    out = run_ok(cmd)
    assert re.search(rf'resuming .*last.pth.tar at epoch 1 step {ckpt["step"]} ', out), out[-3000:]
    assert fingerprint(out) == reference


# --- 3. two hosts ----------------------------------------------------------------------------
def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['ip', *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: [(namespace, interface, address)] x 2."""
    if shutil.which('ip') is None:
        pytest.skip('two hosts: the `ip` command (iproute2) is missing')
    tag = uuid.uuid4().hex[:6]
    subnet = f'10.77.{int(tag, 16) % 250 + 1}'
    hosts = [(f'tnx{tag}{s}', f'vtx{tag}{s}', f'{subnet}.{i + 1}') for i, s in enumerate('ab')]
    made: List[str] = []
    try:
        for ns, _, _ in hosts:
            r = _ip('netns', 'add', ns)
            if r.returncode != 0:
                pytest.skip(f'two hosts: cannot create a network namespace (ip netns add: {r.stderr.strip()}); '
                            'this test needs root or CAP_SYS_ADMIN')
            made.append(ns)
        (ns_a, if_a, _), (ns_b, if_b, _) = hosts
        steps = [('link', 'add', if_a, 'netns', ns_a, 'type', 'veth', 'peer', 'name', if_b, 'netns', ns_b)]
        for ns, ifname, addr in hosts:
            steps += [('-n', ns, 'addr', 'add', f'{addr}/24', 'dev', ifname), ('-n', ns, 'link', 'set', ifname, 'up'),
                      ('-n', ns, 'link', 'set', 'lo', 'up')]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f'two hosts: `ip {" ".join(step)}` failed: {r.stderr.strip()}')
        yield hosts
    finally:
        for ns in made:
            _ip('netns', 'delete', ns)  # the veth pair goes with its namespaces
        assert not [ns for ns in made if ns in _ip('netns', 'list').stdout]


def test_two_hosts_of_one_process_match_one_host_of_two(digits_dir, tmp_path, two_hosts, reference):
    (_, _, endpoint), _ = two_hosts
    out_dir = tmp_path / 'run'  # the shared file system of the two hosts
    port, run_id = 29400 + os.getpid() % 1000, uuid.uuid4().hex[:8]
    procs = []
    for i, (ns, ifname, addr) in enumerate(two_hosts):
        cmd = ['ip', 'netns', 'exec', ns, sys.executable, '-m', 'torch.distributed.run', '--nnodes=2',
               '--nproc-per-node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint={endpoint}:{port}',
               f'--rdzv-id={run_id}', f'--rdzv-conf=is_host={str(i == 0).lower()}', f'--local-addr={addr}',
               '-m', 'timm_nfnet_ext.train', '--data-dir', str(digits_dir), *ARGS, '-b', '8',
               '--output', str(out_dir)]
        env = dict(child_env(), GLOO_SOCKET_IFNAME=ifname)
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p.pid)
    out = '\n'.join(outs)
    assert [p.returncode for p in procs] == [0, 0], out[-4000:]
    assert 'DDP check: weights identical on all 2 ranks' in out, out[-3000:]
    assert fingerprint(out) == reference


# --- 4. damaged checkpoints --------------------------------------------------------------------
def test_a_corrupt_or_truncated_newest_checkpoint_is_reported_and_the_previous_good_one_used(digits_dir, tmp_path):
    args = ['--data-dir', str(digits_dir), *ARGS, '-b', '16']
    whole = subprocess.Popen(train_cmd([*args, '--output', str(tmp_path / 'whole')]), env=child_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_dir = tmp_path / 'run'
    cmd = train_cmd([*args, '--output', str(out_dir)])
    # a single process stops on SIGTERM too: last.pth.tar at the stop, previous.pth.tar 3 steps before
    code, out, fired = run_with_fault(cmd, r'train: epoch 1 \[\s*4/12\]', lambda p: p.send_signal(signal.SIGTERM))
    assert fired and code == EXIT_PREEMPTED, out[-3000:]
    last, previous = load_ckpt(out_dir / 'last.pth.tar'), load_ckpt(out_dir / 'previous.pth.tar')
    assert (last['epoch'], previous['epoch']) == (1, 1) and previous['step'] < last['step']
    assert (out_dir / 'checksums.json').is_file()

    # corrupt: same size, a few bytes changed inside the tensors (torch.load would not notice)
    data = bytearray((out_dir / 'last.pth.tar').read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    (out_dir / 'last.pth.tar').write_bytes(bytes(data))
    code, out, fired = run_with_fault(cmd, r'train: epoch 1 \[\s*8/12\]', lambda p: p.send_signal(signal.SIGTERM))
    assert fired and code == EXIT_PREEMPTED, out[-3000:]
    assert re.search(r"skipped checkpoint '.*last.pth.tar' is damaged: its SHA-256 differs", out), out[-3000:]
    assert re.search(rf'resuming .*previous.pth.tar at epoch 1 step {previous["step"]} ', out), out[-3000:]
    # the damaged file was replaced, never kept as the fallback: previous.pth.tar is the step-6 checkpoint
    previous = ckpt_io.load_checkpoint(out_dir / 'previous.pth.tar')  # checks size and SHA-256
    assert (previous['epoch'], previous['step']) == (1, 6)

    # truncated (half-written): the size tells
    data = (out_dir / 'last.pth.tar').read_bytes()
    (out_dir / 'last.pth.tar').write_bytes(data[:len(data) // 2])
    out = run_ok(cmd)
    assert re.search(r"skipped checkpoint '.*last.pth.tar' is damaged: its size is \d+ bytes", out), out[-3000:]
    assert re.search(rf'resuming .*previous.pth.tar at epoch 1 step {previous["step"]} ', out), out[-3000:]
    assert whole.wait(timeout=240) == 0, whole.stdout.read()[-3000:]
    a, b = load_ckpt(tmp_path / 'whole' / 'last.pth.tar'), load_ckpt(out_dir / 'last.pth.tar')
    for key in ('model', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key} {name}'
    assert a['history'] == b['history']


# --- 5. non-finite steps -----------------------------------------------------------------------
class _Poisoned(nn.Module):
    """The training loss, NaN at the given calls (1-based)."""

    def __init__(self, inner: nn.Module, bad: Callable[[int], bool]):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = self.inner(logits, targets)
        return loss * float('nan') if self.bad(self.calls) else loss


def _run_poisoned(monkeypatch, argv, bad) -> tuple:
    real = train_setup._loss
    monkeypatch.setattr(train_setup, '_loss', lambda cfg, mixup_on: _Poisoned(real(cfg, mixup_on), bad))
    return run_main(argv)


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_k_in_a_row(digits_dir, tmp_path, monkeypatch):
    # a plain optimizer (no AGC, whose own check would raise): the loop's policy holds for any
    args = ['--data-dir', digits_dir, *TINY, '-b', '20', '--epochs', '1', '--opt', 'sgd', '--lr', '0.05',
            '--warmup-epochs', '0', '--seed', '1', '--nonfinite-limit', '3', '--checkpoint-interval', '2']
    code, out, err = _run_poisoned(monkeypatch, [*args, '--output', tmp_path / 'some'], lambda n: n in (3, 5, 6))
    assert code == 0, out + err
    assert out.count('non-finite loss or gradient, step skipped') == 3
    assert '(2 in a row, 3 this epoch)' in out
    ckpt = load_ckpt(tmp_path / 'some' / 'last.pth.tar')
    assert _all_finite(ckpt['model']) and _all_finite(ckpt['optimizer']) and _all_finite(ckpt['history'])

    code, out, err = _run_poisoned(monkeypatch, [*args, '--output', tmp_path / 'all'], lambda n: n >= 4)
    assert code == EXIT_DIVERGED, out + err
    assert 'training diverged: 3 steps in a row with a non-finite loss or gradient (--nonfinite-limit 3)' in err
    ckpt = load_ckpt(tmp_path / 'all' / 'last.pth.tar')  # written after step 4, a skipped one
    assert ckpt['step'] == 4 and _all_finite(ckpt['model']) and _all_finite(ckpt['optimizer'])
