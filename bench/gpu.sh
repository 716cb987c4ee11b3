#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the kernel tests on the GPU, the kernel benchmark
# and the decode benchmark of the torch backends. Results go to $OUT (default bench/results).
#   bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -5
timeout 150 python3 -m mosaicrt.bench.kernels --json "$OUT/kernels_$GPU.json" 2>&1 | tail -6
timeout 120 python3 -m mosaicrt.bench.decode --device cuda --dtype bfloat16 \
    --backends torch,torch+triton --contexts 1024,4096,16384 --stm-only-contexts "" \
    --json "$OUT/decode_${GPU}.json" 2>&1 | grep -v "it/s\]"
