"""What ``timm-nfnet-train`` needs to live on a cluster: a process-group store of its own under
torchrun (so an elastic restart does not read the last attempt's keys), a finite collective
timeout, and a stop request on SIGTERM / SIGUSR1 that every rank honours at the same step.

Why a store of its own: torchrun's c10d rendezvous hands its workers the agent's own TCPStore
(``TORCHELASTIC_USE_AGENT_STORE=True``) and that store outlives a restart of the worker group
with every key the killed attempt wrote. ``init_process_group`` writes its keys under the same
names in each attempt, so the restarted workers read the dead workers' addresses and counters:
gloo connects to a peer that no longer exists and the group fails or waits until the
collective timeout (PyTorch issue 135712). Here rank 0 serves a fresh TCPStore for each
attempt and publishes its address with a random token through the agent's store; the other
ranks accept an address only when the store behind it answers with that token, so a stale
entry (its server died with the last attempt) is never used.
"""
from __future__ import annotations

import datetime
import os
import signal
import time
import uuid
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['EXIT_PREEMPTED', 'EXIT_DIVERGED', 'EXIT_BAD_INPUT', 'process_group_timeout', 'process_group_store', 'release_store',
           'StopRequest']

EXIT_DIVERGED = 3     # non-finite loss or gradients --nonfinite-limit steps in a row (or AGC 'raise'); not 1,
                      # Python's code for a crash, so that a scheduler can tell them apart
EXIT_BAD_INPUT = 2    # refused before training
EXIT_PREEMPTED = 75   # SIGTERM/SIGUSR1: a checkpoint was written; start again with --resume auto (EX_TEMPFAIL)

TIMEOUT_ENV = 'TIMM_NFNET_DIST_TIMEOUT'
_KEY = 'timm_nfnet_train/store'
_store: Any = None  # this process's store (on rank 0 also the server: it lives as long as the process)


def process_group_timeout() -> datetime.timedelta:
    """The collective timeout: ``$TIMM_NFNET_DIST_TIMEOUT`` seconds (default 600), so that a lost
    peer ends the run with an error instead of gloo's 30-minute wait. It must exceed the longest
    time one rank works alone (rank 0 writing a checkpoint).

    Returns:
        The timeout.

    Raises:
        ValueError: ``$TIMM_NFNET_DIST_TIMEOUT`` is not a number.
    """
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, '600')))


def process_group_store(rank: int, world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """A store only this attempt of the worker group uses, under torchrun's agent store; ``None``
    elsewhere (``init_process_group`` then makes its own, fresh, from ``MASTER_ADDR``).

    Rank 0 serves a new store and publishes its address with a token; the other ranks wait for an
    address whose store answers with that token.

    Args:
        rank: this process's rank.
        world_size: the number of processes.
        timeout: the stores' timeout, and how long a rank waits for rank 0's address.

    Returns:
        This attempt's store, or ``None`` outside torchrun's agent store.

    Raises:
        RuntimeError: rank 0 did not publish a store within ``timeout`` (or the agent's store is unreachable).
    """
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    host, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    agent = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    key = f'{_KEY}/{os.environ.get("TORCHELASTIC_RUN_ID", "none")}'
    global _store
    if rank == 0:
        token = uuid.uuid4().hex
        _store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        _store.set('token', token)
        agent.set(key, f'{_store.port} {token}')
        return _store
    deadline = time.monotonic() + timeout.total_seconds()
    stale = None
    while True:
        entry = agent.get(key).decode()
        if entry != stale:
            _store = _connect(host, entry, timeout)
            if _store is not None:
                return _store
            stale = entry  # the last attempt's: wait for rank 0 to publish this one's
        if time.monotonic() > deadline:
            raise RuntimeError(f'rank 0 did not publish a process-group store within {timeout} '
                               f'(last entry {entry!r} at {host})')
        time.sleep(0.2)


def _connect(host: str, entry: str, timeout: datetime.timedelta) -> Optional[dist.Store]:
    port, token = entry.split()
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=3))
        if store.get('token').decode() != token:
            return None
    except (RuntimeError, ValueError, OSError):  # refused: that server died with its attempt
        return None
    store.set_timeout(timeout)
    return store


def release_store(rank: int, world_size: int) -> None:
    """At the end of a run: rank 0 keeps serving the store until every other rank has left it.

    Rank 0 waits at most 30 seconds; nothing is done without a store of :func:`process_group_store`.

    Args:
        rank: this process's rank.
        world_size: the number of processes.
    """
    store = _store
    if store is None:
        return
    if rank != 0:
        store.add('left', 1)
        return
    deadline = time.monotonic() + 30
    while store.add('left', 0) < world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; :meth:`agreed` tells every rank, at the same step, whether any
    rank got one (one small all-reduce, which also carries the non-finite flag of the step).

    Attributes:
        SIGNALS: the names of the signals handled (those this platform lacks are skipped).
        signal: the first signal received, or ``None``.
    """

    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {}

    def install(self) -> 'StopRequest':
        """Handle :attr:`SIGNALS` (outside the main thread nothing is installed).

        Returns:
            ``self``.
        """
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption checkpoint
                pass
        return self

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or signum

    def agreed(self, bad_step: torch.Tensor, distributed: bool) -> Tuple[bool, bool]:
        """``(stop, bad)``: some rank was signalled / the step's loss or gradients are non-finite on
        some rank. ``bad_step`` is this rank's flag (a bool tensor on the device).

        A collective when ``distributed``: every rank must call it at the same step.

        Args:
            bad_step: this rank's non-finite flag, a 0-d (or 1-element) tensor.
            distributed: whether to all-reduce the flags across ranks.

        Returns:
            ``(stop, bad)``.
        """
        flags = torch.stack([bad_step.to(torch.float32).reshape(()),
                             torch.tensor(float(self.signal is not None), device=bad_step.device)])
        if distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = flags.tolist()
        return stop > 0, bad > 0

    def name(self) -> str:
        """The signal's name (``'SIGTERM'``...), or ``"a peer's signal"`` when only another rank got one."""
        return signal.Signals(self.signal).name if self.signal else 'a peer\'s signal'
