"""Quantized deployment on ONNX Runtime: decode TPOT and bytes read per step of each quantization
variant against the fp32 artifact, in one run (batch 1, random weights of a preset's shape).

Every variant is exported from the same checkpoint, then prefilled to each context and decoded
one token a step in a process of its own, every variant once per round for several rounds, so
that a slow spell of the machine hits all alike. Bytes per step are the weights the artifact
really holds (its manifest) plus the valid stored pairs in the variant's store dtype (int8 and
fp8: with their scales); the read bandwidth is measured in the same run. Every row records how
the mosaic ops ran (native kernels where `mosaicrt ort-ops build` made them, else the function
bodies); a run whose processes ran them differently is refused. What each variant does
to the demo model's recall and bits per byte is bench.demo_quality's (backends onnxruntime-int8,
onnxruntime-int4+int8-stores, onnxruntime-fp8-stores, ...).

    python -m mosaicrt.bench.quantization --preset mini --contexts 1024,4096 \\
        --json bench/results/quantization_cpu.json
    python -m mosaicrt.bench.quantization --json bench/results/quantization_fp8_cpu.json \\
        --variants fp32,int8-stores,fp8-stores,int4+int8-stores,int4+fp8-stores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mosaicrt.argtypes import context_list, positive_int
from mosaicrt.bench.decode import prefill
from mosaicrt.bench.machine import machine_info, measure_bandwidth_gb_s
from mosaicrt.bench.roofline import decode_bytes
from mosaicrt.errors import InputError
from mosaicrt.export.artifact import export_artifact, read_manifest
from mosaicrt.export.quantize import WeightQuantization
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import preset
from mosaicrt.outputs import check_output_file, write_json

# name -> (weight quantization, store dtype); "+int8-stores" or "+fp8-stores" adds int8 or fp8
# stores to any weights.
WEIGHTS = {"fp32": None, "int8": "int8", "int4": "int4"}
STORES = {"int8-stores": "int8", "fp8-stores": "float8_e4m3fn"}
DEFAULT_VARIANTS = "fp32,int8-stores,int8,int4,int8+int8-stores,int4+int8-stores"


def parse_variant(name: str) -> tuple[str | None, str]:
    """'int4+int8-stores' -> ("int4", "int8"); 'fp8-stores' -> (None, "float8_e4m3fn")."""
    weights, plus, stores = name.partition("+")
    if not plus:  # weights alone, or stores alone
        weights, stores = ("fp32", name) if name in STORES else (name, None)
    if weights not in WEIGHTS or (stores is not None and stores not in STORES):
        raise InputError(
            f"unknown variant {name!r}: give fp32, int8 or int4, optionally with "
            f"+int8-stores or +fp8-stores, or int8-stores or fp8-stores alone"
        )
    return WEIGHTS[weights], STORES[stores] if stores else "float32"


def variant_artifact(
    name: str,
    checkpoint: Path,
    out: Path,
    max_context: int,
    block: int = 32,
    last_only: bool = False,
) -> Path:
    """The variant's artifact of `checkpoint`, exported into out/name."""
    scheme, stores = parse_variant(name)
    quantize = WeightQuantization(scheme, block) if scheme else None
    return export_artifact(checkpoint, out / name, max_context=max_context, last_only=last_only,
                           quantize=quantize, store_dtype=stores)  # fmt: skip


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--contexts", type=context_list, default=[1024, 4096])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated; default {DEFAULT_VARIANTS}")  # fmt: skip
    parser.add_argument("--block-size", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=16,
                        help="timed decode steps per variant and round")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="every variant is timed once per round, in turn")  # fmt: skip
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--time-one", nargs=3, metavar=("ARTIFACT", "CONTEXT", "STEPS"),
                        help=argparse.SUPPRESS)  # one timing, in a process of its own  # fmt: skip


def time_one(artifact: str, context: int, steps: int) -> dict:
    """Seconds of `steps` decode steps of a fresh process's backend at this context (after 4
    untimed ones), and how it ran the mosaic ops: the ops' native kernels where they are built,
    else their function bodies, for every variant alike (the fused layers read fp32 stores only)."""
    from mosaicrt.runtime.ort_backend import OrtBackend, native_ops_library

    ops = "native" if native_ops_library("auto", ["CPUExecutionProvider"]) else "functions"
    backend = OrtBackend(artifact, device="cpu", ort_ops=ops)
    state = prefill(backend, context, context + steps + 5, 512)
    token, one = np.ones((1, 1), np.int64), np.ones(1, np.int64)  # as the batcher steps
    samples = []
    for i in range(steps + 4):
        start = time.perf_counter()
        backend.step(token, one, state, last_only=True, device_logits=True)
        samples.append(time.perf_counter() - start)
    return {"ort_ops": backend.ort_ops, "seconds": samples[4:]}


def timed_in_turn(
    artifacts: dict[str, Path], context: int, steps: int, rounds: int
) -> tuple[dict, str]:
    """Decode step seconds per variant: each timed in a process of its own (ONNX Runtime's
    sessions in one process would spin their thread pools against each other), every variant
    once per round, so that a slow spell of the machine hits all alike. Also how every process
    ran the mosaic ops: one way for all, or the comparison is refused."""
    times: dict = {name: [] for name in artifacts}
    ops: set[str] = set()
    for _ in range(rounds):
        for name, artifact in artifacts.items():
            done = subprocess.run(
                [sys.executable, "-m", "mosaicrt.bench.quantization", "--time-one",
                 str(artifact), str(context), str(steps)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            timing = json.loads(done.stdout.strip().splitlines()[-1])
            times[name] += timing["seconds"]
            ops.add(timing["ort_ops"])
    if len(ops) != 1:  # the native library appeared or went away during the run
        raise InputError(f"the variants ran the mosaic ops as {sorted(ops)}: rerun the benchmark")
    return times, ops.pop()


def main(args: argparse.Namespace) -> int:
    import onnxruntime

    if args.time_one:
        artifact, context, steps = args.time_one
        print(json.dumps(time_one(artifact, int(context), int(steps))))
        return 0
    if args.json:
        check_output_file(args.json, flag="--json")
    names = args.variants.split(",")
    for name in names:
        parse_variant(name)  # refuse a bad name before any export
    if "fp32" not in names:
        raise InputError("--variants must include fp32: speed-ups are against it")
    config = preset(args.preset)
    capacity = max(args.contexts) + args.steps + 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        write_checkpoint(random_tensors(config, 0), config, checkpoint)
        artifacts = {name: variant_artifact(name, checkpoint, Path(tmp), capacity,
                                            args.block_size, last_only=True)
                     for name in names}  # fmt: skip
        manifests = {name: read_manifest(a)[0] for name, a in artifacts.items()}
        bandwidth = measure_bandwidth_gb_s()
        for context in args.contexts:
            times, ort_ops = timed_in_turn(artifacts, context, args.steps, args.rounds)
            base = statistics.median(times["fp32"])
            for name, samples in times.items():
                manifest, tpot = manifests[name], statistics.median(samples)
                stores = manifest["state_dtype"]["stores"]
                step_bytes = decode_bytes(config, [context], stores,
                                          manifest["weights_read_bytes"])  # fmt: skip
                rows.append({
                    "variant": name,
                    "context": context,
                    "weights": parse_variant(name)[0] or "fp32",
                    "stores": stores,
                    "tpot_ms": {"p50": 1e3 * tpot, "min": 1e3 * min(samples)},
                    "speedup_vs_fp32": base / tpot,
                    "bytes_per_step": step_bytes,
                    "weights_bytes": manifest["weights_read_bytes"],
                    "roofline_fraction": step_bytes / (bandwidth * 1e9) / tpot,
                    "ort_ops": ort_ops,
                })  # fmt: skip
                fraction = rows[-1]["roofline_fraction"]
                print(f"{name:18s} ctx {context:6d}: tpot p50 {1e3 * tpot:7.2f} ms, "
                      f"{base / tpot:4.2f}x fp32, {step_bytes / 2**20:6.1f} MiB/step, "
                      f"{100 * fraction:3.0f} % of {bandwidth:.1f} GB/s", flush=True)  # fmt: skip
    result = {
        "benchmark": "quantization",
        "preset": args.preset,
        "batch": 1,
        "block_size": args.block_size,
        "steps": args.steps * args.rounds,
        "rounds": args.rounds,
        "rows": rows,
        "machine": machine_info()
        | {"bandwidth_gb_s": bandwidth, "onnxruntime": onnxruntime.__version__},
    }
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


def markdown(result: dict) -> str:
    """The README's table: per context and variant, bytes read, TPOT and speed-up."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores; onnxruntime {m.get('onnxruntime', '?')}; "
        f"measured bandwidth {m['bandwidth_gb_s']:.1f} GB/s; `{result['preset']}` preset, "
        f"batch 1, block size {result['block_size']}, median of {result['steps']} decode steps "
        f"in {result['rounds']} rounds, variants in turn ({m['date'][:10]}).",
        "",
        "| context | variant | weights | stores | bytes per step | TPOT p50 (ms) | vs fp32 "
        "| roofline fraction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['context']} | {r['variant']} | {r['weights']} | {r['stores']} "
            f"| {r['bytes_per_step'] / 2**20:.1f} MiB | {r['tpot_ms']['p50']:.2f} "
            f"| {r['speedup_vs_fp32']:.2f}x | {100 * r['roofline_fraction']:.0f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))
