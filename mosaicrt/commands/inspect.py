"""`mosaicrt inspect MODEL`: config, parameter count and the decode state's memory plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaicrt.argtypes import add_weight_check_arg, positive_int

PLAN_ROWS = (
    "ltm_bytes_per_token",
    "stm_bytes_per_sequence",
    "recurrence_bytes_per_sequence",
    "bytes_per_sequence",
    "state_bytes",
)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--max-context", type=positive_int, default=4096)
    p.add_argument("--max-batch", type=positive_int, default=1)
    p.add_argument(
        "--state-dtype",
        help="dtype of the stores: fp32, fp16, bf16 or int8 (default: the artifact's stores, or "
        "the checkpoint's dtype)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_weight_check_arg(p)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mosaicrt.export.artifact import quantization_label
    from mosaicrt.model.config import load_config
    from mosaicrt.model.state import human_bytes, inspect_report

    config = load_config(args.model)
    manifest = artifact_manifest(Path(args.model))
    stores = args.state_dtype or (manifest and manifest["state_dtype"]["stores"])
    report = inspect_report(config, args.max_context, args.max_batch, stores)
    if manifest:
        report["quantization"] = quantization_label(manifest) or "none"
        report["weights_read_bytes"] = manifest.get("weights_read_bytes")
    if not args.no_weight_check:
        report["weights_finite"] = check_weights(Path(args.model), config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    table = Table(title=f"{args.model}", show_header=False)
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{report['parameters']:,}")
    if "weights_finite" in report:
        table.add_row("weights", "all finite (scanned)")
    if "quantization" in report:
        table.add_row("quantization", report["quantization"])
    if report.get("weights_read_bytes"):
        table.add_row("weights read per step", human_bytes(report["weights_read_bytes"]))
    console.print(table)
    plan = report["memory_plan"]
    mem = Table(
        title=f"memory plan: {args.max_batch} x {args.max_context} tokens, stores in "
        f"{plan['store_dtype']}"
    )
    mem.add_column("state")
    mem.add_column("bytes", justify="right")
    mem.add_column("", justify="right")
    for key in PLAN_ROWS:
        mem.add_row(key, f"{plan[key]:,}", human_bytes(plan[key]))
    console.print(mem)
    return 0


def artifact_manifest(model: Path) -> dict | None:
    """The manifest of an ONNX artifact (checked by read_manifest), None for anything else."""
    if not (model / "manifest.json").is_file():
        return None
    from mosaicrt.export.artifact import read_manifest

    return read_manifest(model)[0]


def check_weights(model: Path, config) -> bool:
    """Scan a checkpoint's or artifact's weights for NaN and inf (a CheckpointError names the
    first bad tensor); an engine's weights are in its engine file, which is not scanned."""
    if (model / "manifest.json").is_file():
        from mosaicrt.runtime.ort_backend import check_graph_weights

        check_graph_weights(model / "model.onnx")
    elif not (model / "build_manifest.json").is_file():
        from mosaicrt.model.checkpoint import load_tensors

        load_tensors(model, config, check_finite=True)
    return True
