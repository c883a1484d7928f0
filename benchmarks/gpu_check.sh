#!/usr/bin/env bash
# One prepared GPU session on the device machine (repo root, timm wheel carried in .whl/):
# the side-by-side bf16 benchmark of inference and the training step at batch 64.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 benchmarks/bench.py --device cuda --amp bf16 --batch-sizes 8 64 --sizes 256 \
  --train-batch 64 --train-px 192 --no-compile --repeats 10 --train-repeats 10 --json $OUT/bench_cuda.json 2>&1 \
  | grep -v gpuGetDeviceCount | tee $OUT/bench_cuda.log
