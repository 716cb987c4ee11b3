#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in parts (default: all, about 14 minutes on an H200; each step
# under its own timeout; the parts run in the order they are named in, so that a short lease runs
# the ones that matter most first; name parts to run fewer):
#   tests       the tests marked `gpu` (CUDA graphs, paging through the compiled Triton kernels,
#               int4 and fp8 weights, no-sync checks), then the kernel and plugin tests on the
#               device
#   decode      the decode benchmark of the `small` preset (bf16, batch 1) against the HBM
#               roofline: the CUDA graph of the eager step, then of the torch.compile'd one
#   throughput  `mosaicrt bench throughput` of `small` at batch 64 (output tokens/s), eager step
#   throughput-compiled   the same with the torch.compile'd step (compiling takes minutes)
#   profile     torch.profiler over a prefill and a decode step of `small` at batch 64, and over
#               the torch.compile'd steps at batch 1 (where the time goes:
#               bench/results/profile_small[_b1_compiled]_<gpu>.txt)
#   paged       the paged state under a 20 GiB budget with a long-tailed length mix: sequences
#               admitted against a static allocation of the same bytes
#   kernels     the kernel benchmark (each kernel over a few tilings, against float64, SDPA flash
#               and the copy bandwidth); KERNEL_PARTS=prefill,chunk,decode,splits,scan picks some
# Results go to $OUT (default bench/results), named after the GPU. The `small` checkpoint (random
# weights) is made once at $CKPT (default: a new temporary folder) and reused when it is there.
#   bash mosaicrt/bench/gpu.sh [tests] [decode] [throughput] [throughput-compiled] [profile]
#                              [paged] [kernels]
set -uo pipefail
OUT=${OUT:-bench/results}
PARTS=${*:-tests decode throughput throughput-compiled profile paged kernels}
CKPT=${CKPT:-$(mktemp -d)/small}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
part() { echo "== $1 ($(date +%T))"; }
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs"
python3 -c "import xdist" 2>/dev/null && PYTEST="$PYTEST -n 6"  # Triton compiles on every core

small() {  # the small preset's checkpoint, made on first use
    [[ -f "$CKPT/config.json" ]] && return
    part "small preset, random weights"
    python3 -m mosaicrt.cli init "$CKPT" --preset small --dtype bf16 >/dev/null
}

tests() {
    local log="$OUT/gpu_tests_$GPU.log"
    git log -1 --format="commit %h" 2>/dev/null | tee "$log"
    part "tests marked gpu" | tee -a "$log"
    timeout 150 $PYTEST -m gpu tests/test_graph_state.py tests/test_paging.py \
        tests/test_kernels.py tests/test_quantize.py 2>&1 | tee -a "$log" | tail -25
    part "kernel and plugin tests on the GPU" | tee -a "$log"
    timeout 120 $PYTEST -m "not gpu" tests/test_kernels.py tests/test_plugins.py 2>&1 \
        | tee -a "$log" | tail -25
}

kernels() {
    part "kernel benchmark"
    local kp=${KERNEL_PARTS:-}  # KERNEL_PARTS=prefill: those only, into kernels_prefill_<gpu>.json
    local all=prefill,chunk,decode,splits,scan
    timeout 300 python3 -m mosaicrt.bench.kernels --only "${kp:-$all}" \
        --json "$OUT/kernels${kp:+_${kp//,/_}}_$GPU.json" 2>&1 | tail -40
}

profile() {
    small
    part "profile of the batcher's steps, small, batch 64"
    timeout 90 python3 -m mosaicrt.bench.profile_steps "$CKPT" --device cuda --kernels triton \
        --batch 64 --prefill-rows 8 --chunk 512 --context 1024 \
        --out "$OUT/profile_small_$GPU.txt" 2>&1 | grep "^==\|Self CUDA time total"
    part "profile of the torch.compile'd steps, small, batch 1"  # compiling: minutes (120 s missed)
    timeout 240 python3 -m mosaicrt.bench.profile_steps "$CKPT" --device cuda --kernels triton \
        --compile --batch 1 --prefill-rows 1 --chunk 512 --context 1024 \
        --out "$OUT/profile_small_b1_compiled_$GPU.txt" 2>&1 | grep "^==\|Self CUDA time total"
}

decode() {
    small
    part "decode, small, batch 1"
    local json="$OUT/decode_small_$GPU.json"
    rm -f "$json"
    for backend in torch+triton torch.compile+triton; do  # one process each, rows appended
        timeout 150 python3 -m mosaicrt.bench.decode "$CKPT" --device cuda --dtype bfloat16 \
            --backends $backend --contexts 1024,4096 --append --json "$json" 2>&1 \
            | grep -v "it/s\]" | tail -4
    done
}

throughput() {  # $1: the time limit; the rest: extra flags
    local limit=$1 name=$2
    shift 2
    small
    timeout "$limit" python3 -m mosaicrt.cli bench throughput "$CKPT" --backend torch \
        --kernels triton "$@" --device cuda --batch 64 --num-requests 64 --input-len 1024 \
        --output-len 128 --json "$OUT/bench_throughput_small_b64${name}_$GPU.json" 2>&1 | tail -14
}

paged() {
    small
    part "paged state, small, long-tailed lengths under 20 GiB"
    timeout 120 python3 -m mosaicrt.cli bench throughput "$CKPT" --backend torch \
        --kernels triton --device cuda --batch 64 --num-requests 64 \
        --input-len-mix 256-1024:90,8192:10 --output-len 32 --max-context 8448 \
        --state-memory 20GiB --warmup 0 --json "$OUT/paged_small_$GPU.json" 2>&1 | tail -14
}

for p in $PARTS; do
    case $p in
        tests | kernels | profile | decode | paged) $p ;;
        throughput) part "throughput, small, batch 64" && throughput 100 "" ;;
        throughput-compiled)  # compiling the 24-layer step takes minutes
            part "throughput, small, batch 64, torch.compile'd step"
            throughput 240 _compile --compile ;;
        *) echo "unknown part: $p (parts: tests decode throughput throughput-compiled profile" \
               "paged kernels)" >&2 && exit 2 ;;
    esac
done
part "done"
