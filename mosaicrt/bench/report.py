"""Turn benchmark JSON into markdown tables (the README's) and a TPOT-vs-context plot.

    python -m mosaicrt.bench.report bench/results/decode_cpu.json --plot decode_cpu.png
    python -m mosaicrt.bench.report --readme README.md   # rewrite every results section

A README section is the text between `<!-- results:NAME -->` and `<!-- /results -->`; it is
regenerated from bench/results/NAME.json (and NAME.png, where present).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

from mosaicrt.errors import InputError

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SECTION = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def machine_line(result: dict) -> str:
    m = result["machine"]
    if result.get("device", "cpu").startswith("cuda") or result["benchmark"] == "kernels":
        smi = m.get("nvidia_smi", {})
        return (
            f"Machine: {m['gpu']} (driver {smi.get('driver_version', '?')}, CUDA {m.get('cuda')}), "
            f"{m['cpu_cores']} CPU cores; torch {m['torch']}, Triton {m.get('triton')}"
        )
    return f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}"


# Benchmarks whose module renders its own results (markdown(result), and plot(result, path) if any).
OWN_RENDERING = ("demo_quality", "soak", "sweep", "quantization")


def own_module(result: dict):
    """The benchmark's own module, where it renders its results itself; else None."""
    if result["benchmark"] not in OWN_RENDERING:
        return None
    return importlib.import_module(f"mosaicrt.bench.{result['benchmark']}")


def decode_bandwidth(result: dict) -> str:
    """The read bandwidth of a decode comparison: one measured at the start (older results) or
    the mean of one before and one after each backend's steps (the range over backends)."""
    if "bandwidth_gb_s" in result:
        return f"measured bandwidth {result['bandwidth_gb_s']:.1f} GB/s"
    means = [r["bandwidth_gb_s"] for r in result["rows"]]
    return (
        f"bandwidth {min(means):.1f}-{max(means):.1f} GB/s (each backend's: the mean of a "
        "measure just before and one just after its steps)"
    )


def markdown(result: dict) -> str:
    """The table of a result file, whichever benchmark wrote it."""
    if result["benchmark"] == "kernels":
        return kernels_markdown(result)
    if result["benchmark"] == "serve":
        return serve_markdown(result)
    own = own_module(result)
    if own is not None:
        return own.markdown(result)
    m = result["machine"]
    dtype = result.get("dtype", "float32")
    lines = [
        f"{machine_line(result)}; {decode_bandwidth(result)}; "
        f"{result['preset']} preset, batch 1, {dtype}, median of {result['steps']} steps "
        f"({m['date'][:10]}).",
        "",
        "| backend | LTM | context | TPOT p50 (ms) | roofline (ms) | roofline fraction "
        "| speedup vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "n/a"
        lines.append(
            f"| {r['backend']} | {'yes' if r['use_ltm'] else 'no'} | {r['context']} "
            f"| {r['tpot_ms']['p50']:.2f} | {r['roofline_ms']:.2f} "
            f"| {100 * r['roofline_fraction']:.0f} % | {speedup} |"
        )
    return "\n".join(lines)


def kernels_markdown(result: dict) -> str:
    m = result["machine"]
    bw = result["copy_bandwidth_gb_s"]
    title = (
        f"{machine_line(result)}; copy bandwidth {bw:.0f} GB/s (read + write) ({m['date'][:10]})."
    )
    table_head = [
        "| kernel | shape | time (ms) | measure | best tiling |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines = [title, "", *table_head]
    for r in result.get("chunk_retrieval", []):
        b = r["best"]
        products = r.get("products", "bf16")  # before the variants: bf16 products only
        dtype = "bf16" if products == "bf16" else f"bf16 pairs, {products} products"
        if b is None:
            lines.append(f"| chunk retrieval | T={r['T']}, {dtype} | no tiling ran | | |")
            continue
        lines.append(
            f"| chunk retrieval | T={r['T']}, {r['heads']} heads of {r['head_dim']}, {dtype} "
            f"| {b['ms']:.3f} (SDPA flash {r['sdpa_flash_ms']:.3f}) "
            f"| {b['tflops']:.0f} vs {r['sdpa_tflops']:.0f} TFLOP/s: "
            f"{r['throughput_vs_sdpa']:.2f}x SDPA flash | {b['tiling']} |"
        )
    for r in result.get("decode_retrieval", []):
        b = r["best"]
        lines.append(
            f"| decode retrieval | batch {r['batch']}, context {r['context']}, {r['heads']} heads "
            f"of {r['head_dim']}, bf16 | {b['graph_ms']:.3f} | "
            f"{100 * r['bandwidth_fraction']:.0f} % of bandwidth | {b['tiling']} |"
        )
    for r in result.get("gated_scan", []):
        b = r["best"]
        lines.append(
            f"| gated key scan | batch {r['batch']}, chunk {r['chunk']}, {r['heads']} heads of "
            f"{r['head_dim']} | {b['ms']:.3f} | {100 * r['bandwidth_fraction']:.0f} % of "
            f"bandwidth | {b['tiling']} |"
        )
    if lines[-1] == table_head[-1]:  # no row: a run of the split sweep alone
        lines = [title]
    if "decode_splits" in result:
        lines += ["", *decode_splits_markdown(result["decode_splits"])]
    return "\n".join(lines)


def decode_splits_markdown(rows: list[dict]) -> list[str]:
    """Decode retrieval per number of slices: time from a CUDA graph and % of bandwidth, the
    kernel's own choice first."""
    counts = [t["tiling"][0] for t in rows[0]["tilings"]]
    head = ["own choice" if c == "auto" else f"{c} slice{'s' * (c != 1)}" for c in counts]
    lines = [
        f"| decode retrieval, {rows[0]['heads']} heads of {rows[0]['head_dim']}, bf16 | "
        + " | ".join(head)
        + " |",
        "| --- |" + " --- |" * len(head),
    ]
    for r in rows:
        cells = [
            f"{t['graph_ms'] * 1e3:.1f} us, {100 * t['bandwidth_fraction']:.0f} %"
            for t in r["tilings"]
        ]
        lines.append(f"| batch {r['batch']}, context {r['context']} | " + " | ".join(cells) + " |")
    return lines


VECTOR_NAMES = {"avx512": "AVX-512", "avx2": "AVX2"}  # machine_info's cpu_vectors, as written


def serve_markdown(result: dict) -> str:
    m, one, many = result["machine"], result["one_client"], result["many_clients"]
    alone, rows = result["in_process"]
    vectors = VECTOR_NAMES.get(m.get("cpu_vectors"), m.get("cpu_vectors"))
    return (
        f"Machine: {m['cpu']}{f' ({vectors})' if vectors else ''}, {m['cpu_cores']} cores; "
        f"{result['preset']} preset through "
        f"{result['backend']}, {result['prompt_len']} prompt tokens and up to "
        f"{result['new_tokens']} new tokens per request, {result['requests_per_client']} requests "
        f"per client in turn ({m['date'][:10]}).\n\n"
        "| clients | output tokens/s | vs one client | in process on as many rows | vs one row |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"| 1 | {one['output_tokens_per_s']:.1f} | 1.0x | {alone['output_tokens_per_s']:.1f} | "
        "1.0x |\n"
        f"| {many['clients']} | {many['output_tokens_per_s']:.1f} | {result['speedup']:.1f}x | "
        f"{rows['output_tokens_per_s']:.1f} | {result['in_process_speedup']:.1f}x |\n\n"
        + (
            f"The ratios are the medians of {result['rounds']} rounds, each a 1-client (1-row) "
            f"run and then a {many['clients']}-client one: "
            f"{', '.join(f'{x:.1f}x' for x in result['speedups'])} through the server, "
            f"{', '.join(f'{x:.1f}x' for x in result['in_process_speedups'])} in process.\n\n"
            if "speedups" in result
            else ""
        )
        + f"One request alone: {result['request_ms_server']:.0f} ms through the server, "
        f"{result['request_ms_in_process']:.0f} ms through `generate`'s code in process "
        f"(overhead {result['overhead_ms_per_request']:.0f} ms, "
        f"{result['server_vs_in_process']:.2f}x)."
    )


def update_readme(path: Path, results: Path = RESULTS) -> str:
    """The README with every results section regenerated from its JSON."""

    def section(match: re.Match) -> str:
        name = match.group(2)
        source = results / f"{name}.json"
        if not source.is_file():
            raise InputError(f"{path} has a results section {name} but {source} does not exist: "
                             "run its benchmark with --json, or remove the section")  # fmt: skip
        body = markdown(json.loads(source.read_text()))
        if (results / f"{name}.png").exists():
            body += f"\n\n![{name}](bench/results/{name}.png)"
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return SECTION.sub(section, path.read_text())


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    backends = sorted({r["backend"] for r in result["rows"]})
    colors = {name: f"C{i}" for i, name in enumerate(backends)}  # one color per backend
    for use_ltm in (True, False):
        for backend in backends:
            rows = [
                r for r in result["rows"] if r["backend"] == backend and r["use_ltm"] == use_ltm
            ]
            if rows:
                ax.plot(
                    [r["context"] for r in rows],
                    [r["tpot_ms"]["p50"] for r in rows],
                    marker="o",
                    color=colors[backend],
                    linestyle="-" if use_ltm else "--",
                    label=f"{backend} ({'STM+LTM' if use_ltm else 'STM only'})",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # full recompute takes seconds where cached steps take milliseconds
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode TPOT p50 (ms)")
    where = result["machine"].get("gpu") if result.get("device", "cpu") != "cpu" else None
    ax.set_title(f"{result['preset']}, batch 1, {where or result['machine']['cpu']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", nargs="?")
    parser.add_argument("--plot", help="write a PNG here")
    parser.add_argument("--readme", help="regenerate this README's results sections in place")


def main(args: argparse.Namespace) -> int:
    if args.readme:
        Path(args.readme).write_text(update_readme(Path(args.readme)))
        return 0
    if not args.result:
        raise InputError("name a result JSON, or --readme README.md")
    result = json.loads(Path(args.result).read_text())
    print(markdown(result))
    if args.plot:
        own = own_module(result)
        if own is not None and not hasattr(own, "plot"):
            raise InputError(f"{args.result}: a {result['benchmark']} result has no plot")
        (own.plot if own is not None else plot)(result, args.plot)
    return 0


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))
