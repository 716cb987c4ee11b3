"""Turn decode benchmark JSON into the README's markdown table and a TPOT-vs-context plot.

python -m mosaicrt.bench.report bench/results/decode_cpu.json --plot bench/results/decode_cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB; torch "
        f"{m['torch']}; measured read bandwidth {result['bandwidth_gb_s']:.1f} GB/s; "
        f"{result['preset']} preset, batch 1, fp32, median of {result['steps']} steps "
        f"({m['date'][:10]}).",
        "",
        "| backend | LTM | context | TPOT p50 (ms) | roofline (ms) | roofline fraction "
        "| speedup vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {'yes' if r['use_ltm'] else 'no'} | {r['context']} "
            f"| {r['tpot_ms']['p50']:.2f} | {r['roofline_ms']:.2f} "
            f"| {100 * r['roofline_fraction']:.0f} % | {r.get('speedup_vs_torch', 1):.2f}x |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for use_ltm in (True, False):
        for backend in sorted({r["backend"] for r in result["rows"]}):
            rows = [
                r for r in result["rows"] if r["backend"] == backend and r["use_ltm"] == use_ltm
            ]
            if rows:
                ax.plot(
                    [r["context"] for r in rows],
                    [r["tpot_ms"]["p50"] for r in rows],
                    marker="o",
                    linestyle="-" if use_ltm else "--",
                    label=f"{backend} ({'STM+LTM' if use_ltm else 'STM only'})",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # full recompute takes seconds where cached steps take milliseconds
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode TPOT p50 (ms)")
    ax.set_title(f"{result['preset']}, batch 1, {result['machine']['cpu']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
