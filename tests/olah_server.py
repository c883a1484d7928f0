"""Start and stop an olah Hugging Face mirror (PyPI package ``olah``) on 127.0.0.1 for tests.

olah serves ``ORG/NAME`` from the git repository ``MIRROR/models/ORG/NAME`` (``mirrors-path``);
with ``offline = true`` it never contacts huggingface.co. Clients reach it with
``HF_ENDPOINT=http://127.0.0.1:PORT``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class OlahServer:
    """``with OlahServer(mirror_dir, work_dir) as server: server.endpoint``."""

    def __init__(self, mirror_dir: Path, work_dir: Path):
        self.mirror_dir, self.work_dir = Path(mirror_dir), Path(work_dir)
        self.port = free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.work_dir / 'olah.log'

    def _config(self) -> Path:
        cfg = self.work_dir / 'olah.toml'
        cfg.write_text(
            '[basic]\n'
            'host = "127.0.0.1"\n'
            f'port = {self.port}\n'
            f'repos-path = "{self.work_dir / "cache"}"\n'
            f'mirrors-path = ["{self.mirror_dir}"]\n'
            '[accessibility]\n'
            'offline = true\n')
        return cfg

    def start(self) -> 'OlahServer':
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'olah.server', '-c', str(self._config()),
               '--log-path', str(self.work_dir / 'logs')]
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(cmd, cwd=self.work_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll until the server answers HTTP (any status), or raise with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'olah exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}')
            try:
                urllib.request.urlopen(f'{self.endpoint}/api/models/none/none/revision/main', timeout=2)
                return
            except urllib.error.HTTPError:
                return  # an HTTP answer: it is serving
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f'olah did not answer within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}')

    def stop(self) -> None:
        """Terminate the server's process group (only the processes this object started)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> 'OlahServer':
        self.start().wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
