#!/usr/bin/env bash
# The whole GPU check in one call, from the repo root: the CUDA-only tests (AGC, grouped weight
# standardisation), the side-by-side bf16 benchmark of inference and of the training step at
# batch 64 (NCHW and channels_last), the step profile (forward+backward per weight-standardisation
# variant, optimizer step), the training command's quick start with bf16 and fp16 autocast, then
# inference compiled on both sides (inductor, freezing, static shapes); ~3-5 minutes on an H200
# (186 s on 2026-11-30, before the training row also timed each side in its own processes).
# Outputs go to $OUT (default /tmp/out). Wheels in .whl/ (e.g. the timm version CI tests, on a
# machine without internet) are installed into /tmp/site first; without them the installed
# packages are used.
set -o pipefail
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
# the CUDA-only tests first (skipped on CPU-only CI), where the device machine has pytest
if python3 -c 'import pytest' 2>/dev/null; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_agc.py tests/test_grouped_ws.py -k cuda 2>&1 \
    | tail -8 | tee $OUT/cuda_tests.log
fi
timeout 260 python3 benchmarks/bench.py --device cuda --amp bf16 --batch-sizes 8 64 --sizes 256 \
  --train-batch 64 --train-px 192 --train-channels-last --no-compile --repeats 10 --train-repeats 15 \
  --json $OUT/bench_cuda.json 2>&1 | grep -v gpuGetDeviceCount | tee $OUT/bench_cuda.log
# where the step's time goes on the GPU (forward+backward per WS variant, optimizer step)
timeout 150 python3 benchmarks/profile_step.py --device cuda --amp bf16 --batch 64 --px 192 --repeats 10 --top 8 2>&1 \
  | grep -v gpuGetDeviceCount | tee $OUT/profile_cuda.log
# the training command's quick start on CUDA, bf16 and fp16 autocast (fp16: GradScaler + AGC)
for dt in bfloat16 float16; do
  timeout 150 python3 -m timm_nfnet_ext.train --quickstart --device cuda --amp --amp-dtype $dt --output /tmp/qs_$dt 2>&1 \
    | grep -E "^epoch|^best|^exported|rror" | tee $OUT/quickstart_$dt.log
done
# compiled inference last (the slowest part: four inductor compiles), so that a timeout loses only it
timeout 330 python3 benchmarks/bench.py --device cuda --amp bf16 --batch-sizes 8 64 --sizes 256 --no-train \
  --repeats 10 --json $OUT/bench_cuda_compiled.json 2>&1 | grep -v gpuGetDeviceCount | tee $OUT/bench_cuda_compiled.log
