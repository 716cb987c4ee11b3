"""`mosaicrt inspect MODEL`: config, parameter count and the decode state's memory plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaicrt.argtypes import add_weight_check_arg, positive_int, size

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
        help="dtype of the stores: fp32, fp16, bf16, int8 or fp8 (default: the artifact's "
        "stores, or the checkpoint's dtype)",
    )
    p.add_argument(
        "--state-memory",
        type=size,
        metavar="SIZE",
        help="show the LTM pool this budget of decode state holds (e.g. 2GiB)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_weight_check_arg(p)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mosaicrt.export.artifact import DEFAULT_LTM_BLOCK, quantization_label
    from mosaicrt.model.config import load_config
    from mosaicrt.model.state import human_bytes, inspect_report

    config = load_config(args.model)
    manifest = artifact_manifest(Path(args.model))
    stores = args.state_dtype or (manifest and manifest["state_dtype"]["stores"])
    report = inspect_report(config, args.max_context, args.max_batch, stores)
    if manifest:
        report["quantization"] = quantization_label(manifest) or "none"
        report["weights_read_bytes"] = manifest.get("weights_read_bytes")
    block = manifest["ltm_block"] if manifest else DEFAULT_LTM_BLOCK
    stores = report["memory_plan"]["store_dtype"]
    limits = (args.max_batch, args.max_context, args.state_memory)
    report["state_pool"] = pool_plan(config, block, stores, *limits)
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
    pool = report["state_pool"]
    budget = human_bytes(pool["state_memory"]) if pool["state_memory"] else "static"
    paged = Table(title=f"state pool ({budget}): LTM blocks of {pool['block']} pairs")
    paged.add_column("pool")
    paged.add_column("", justify="right")
    for key in POOL_ROWS:
        value = pool[key]
        paged.add_row(key, human_bytes(value) if key.endswith("bytes") else f"{value:,}")
    console.print(paged)
    return 0


POOL_ROWS = ("block_bytes", "row_bytes", "blocks_total", "pool_bytes", "ltm_tokens",
             "sequences_at_max_context", "prefix_cache_rows", "state_bytes")  # fmt: skip


def pool_plan(config, block: int, store_dtype: str, max_batch: int, max_context: int,
              budget: int | None) -> dict:  # fmt: skip
    """The LTM pool of a run with these limits (runtime.paging): its blocks, and how many
    tokens and full-length sequences it holds."""
    from mosaicrt.runtime.paging import StateSizes, blocks_for, plan_state

    sizes = StateSizes.of(config, block, store_dtype)
    plan = plan_state(sizes, max_batch, max_context, budget, prefix_cache=True)
    blocks = plan.blocks
    per_sequence = max(blocks_for(max_context, block), 1)
    return {
        "state_memory": budget,
        "block": block,
        "block_bytes": sizes.block_bytes,
        "row_bytes": sizes.row_bytes,
        "blocks_total": blocks,
        "pool_bytes": blocks * sizes.block_bytes,
        "ltm_tokens": blocks * block,
        "sequences_at_max_context": min(max_batch, blocks // per_sequence),
        "prefix_cache_rows": plan.cache_entries,
        "state_bytes": plan.bytes,
    }


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
