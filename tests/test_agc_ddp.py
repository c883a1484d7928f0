"""AGC under DistributedDataParallel: a 2-process torchrun (gloo, CPU) run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name('_agc_ddp_worker.py')


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs gloo')
def test_ddp_clips_the_all_reduced_gradient(tmp_path):
    out = tmp_path / 'report.json'
    # the package is the installed one; the worker's folder for its own imports (PYTHONSAFEPATH in CI
    # keeps a script's folder off sys.path)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get('PYTHONPATH')])),
           'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['world'] == 2
    assert report['ranks_bit_identical']
    assert report['clipped_units'] > 0  # clipping is active in this run
    # the step matches one process on the whole batch (the all-reduced gradient) ...
    assert report['max_diff_to_single_process'] < 1e-6
    # ... and not what clipping each rank's local gradient would have given
    assert report['max_diff_local_clipping'] > 1e3 * max(report['max_diff_to_single_process'], 1e-9)
