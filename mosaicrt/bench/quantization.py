"""Quantized deployment on ONNX Runtime: decode TPOT and bytes read per step of each quantization
variant against the fp32 artifact, in one run (batch 1, random weights of a preset's shape).

Every variant is exported from the same checkpoint, prefilled to each context, and decoded one
token a step in turn with the others (decode.interleaved_tpot), so a slow spell of the machine
hits all alike. Bytes per step are the weights the artifact really holds (its manifest) plus the
valid stored pairs in the variant's store dtype (int8: with their scales); the read bandwidth is
measured in the same run. What each variant does to the demo model's recall and bits per byte is
bench.demo_quality's (backends onnxruntime-int8, onnxruntime-int4+int8-stores, ...).

    python -m mosaicrt.bench.quantization --preset mini --contexts 1024,4096 \\
        --json bench/results/quantization_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mosaicrt.argtypes import context_list, positive_int
from mosaicrt.bench.decode import interleaved_tpot, prefill
from mosaicrt.bench.machine import machine_info, measure_bandwidth_gb_s
from mosaicrt.bench.roofline import decode_bytes
from mosaicrt.errors import InputError
from mosaicrt.export.artifact import export_artifact
from mosaicrt.export.quantize import WeightQuantization
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import preset
from mosaicrt.outputs import check_output_file, write_json

# name -> (weight quantization, store dtype); "+int8-stores" adds int8 stores to any weights.
WEIGHTS = {"fp32": None, "int8": "int8", "int4": "int4"}
STORES_SUFFIX = "+int8-stores"
DEFAULT_VARIANTS = "fp32,int8-stores,int8,int4,int8+int8-stores,int4+int8-stores"


def parse_variant(name: str) -> tuple[str | None, str]:
    """'int4+int8-stores' -> ("int4", "int8"); 'int8-stores' -> (None, "int8")."""
    if name == "int8-stores":
        return None, "int8"
    weights, stores = (
        name.removesuffix(STORES_SUFFIX),
        "int8" if name.endswith(STORES_SUFFIX) else "float32",
    )
    if weights not in WEIGHTS:
        raise InputError(
            f"unknown variant {name!r}: give fp32, int8 or int4, optionally with "
            f"{STORES_SUFFIX}, or int8-stores"
        )
    return WEIGHTS[weights], stores


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
    parser.add_argument("--steps", type=positive_int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=positive_int, default=4)
    parser.add_argument("--json", help="write results here")


def main(args: argparse.Namespace) -> int:
    import onnxruntime

    from mosaicrt.runtime.ort_backend import OrtBackend

    if args.json:
        check_output_file(args.json, flag="--json")
    names = args.variants.split(",")
    for name in names:
        parse_variant(name)  # refuse a bad name before any export
    if "fp32" not in names:
        raise InputError("--variants must include fp32: speed-ups are against it")
    config = preset(args.preset)
    capacity = max(args.contexts) + args.warmup + args.steps + 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        write_checkpoint(random_tensors(config, 0), config, checkpoint)
        backends = {
            name: OrtBackend(variant_artifact(name, checkpoint, Path(tmp), capacity,
                                              args.block_size, last_only=True), device="cpu")
            for name in names
        }  # fmt: skip
        bandwidth = measure_bandwidth_gb_s()
        for context in args.contexts:
            cases = {name: (b, prefill(b, context, capacity, 512)) for name, b in backends.items()}
            times = interleaved_tpot(cases, args.steps, args.warmup)
            base = statistics.median(times["fp32"])
            for name, samples in times.items():
                backend, tpot = backends[name], statistics.median(samples)
                stores = backend.manifest["state_dtype"]["stores"]
                step_bytes = decode_bytes(config, [context], stores,
                                          backend.manifest["weights_read_bytes"])  # fmt: skip
                rows.append({
                    "variant": name,
                    "context": context,
                    "weights": parse_variant(name)[0] or "fp32",
                    "stores": stores,
                    "tpot_ms": {"p50": 1e3 * tpot, "min": 1e3 * min(samples)},
                    "speedup_vs_fp32": base / tpot,
                    "bytes_per_step": step_bytes,
                    "weights_bytes": backend.manifest["weights_read_bytes"],
                    "roofline_fraction": step_bytes / (bandwidth * 1e9) / tpot,
                    "ort_ops": backend.ort_ops,
                })  # fmt: skip
                fraction = rows[-1]["roofline_fraction"]
                print(f"{name:18s} ctx {context:6d}: tpot p50 {1e3 * tpot:7.2f} ms, "
                      f"{base / tpot:4.2f}x fp32, {step_bytes / 2**20:6.1f} MiB/step, "
                      f"{100 * fraction:3.0f} % of {bandwidth:.1f} GB/s")  # fmt: skip
            del cases
    result = {
        "benchmark": "quantization",
        "preset": args.preset,
        "batch": 1,
        "block_size": args.block_size,
        "steps": args.steps,
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
        f"batch 1, block size {result['block_size']}, median of {result['steps']} decode steps, "
        f"variants interleaved ({m['date'][:10]}).",
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
