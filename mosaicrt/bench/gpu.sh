#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the kernel benchmark, the kernel tests on the GPU,
# the decode benchmark of the torch backends and `mosaicrt bench` with the Triton kernels.
# Results go to $OUT (default bench/results).
#   bash mosaicrt/bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 -m mosaicrt.bench.kernels --json "$OUT/kernels_$GPU.json" 2>&1 | tail -7
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_plugins.py \
    "tests/test_quantize.py::test_torch_backend_int4_weights_keep_the_demo_models_predictions_on_a_gpu" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -5
timeout 240 python3 -m mosaicrt.bench.decode --device cuda --dtype bfloat16 \
    --backends torch,torch+triton,torch.compile+triton --contexts 1024,4096,16384 --stm-only-contexts "" \
    --json "$OUT/decode_$GPU.json" 2>&1 | grep -v "it/s\]"
CKPT=$(mktemp -d)/mini
python3 -m mosaicrt.cli init "$CKPT" --preset mini --dtype bf16 >/dev/null
for mode in latency throughput; do
    timeout 25 python3 -m mosaicrt.cli bench "$mode" "$CKPT" --backend torch --kernels triton \
        --device cuda --batch 8 --input-len 1024 --output-len 64 \
        --json "$OUT/bench_${mode}_mini_$GPU.json" 2>&1 | tail -12
done
