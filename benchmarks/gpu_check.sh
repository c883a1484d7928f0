#!/usr/bin/env bash
# One prepared GPU session (device machine, repo root, timm wheel carried in .whl/):
# side-by-side bf16 benchmark, AGC benchmark, and the CUDA/AMP AGC tests.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 150 python3 benchmarks/bench.py --device cuda --amp bf16 --batch-sizes 8 64 --sizes 256 \
  --train-batch 64 --train-px 192 --no-compile --repeats 10 --train-repeats 10 --json $OUT/bench_cuda.json 2>&1 | tee $OUT/bench_cuda.log
timeout 40 python3 benchmarks/bench_agc.py --device cuda --repeats 20 --json $OUT/agc_cuda.json 2>&1 | tee $OUT/agc_cuda.log
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_agc.py -k "cuda or amp" 2>&1 | tail -15
