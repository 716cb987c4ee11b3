"""What the trained demo model does, through every backend: long-context recall on held-out
episodes (the same episodes for every backend), the answers each backend agrees on with torch,
recall with the LTM's output zeroed, and bits per byte on held-out text.

    python -m mosaicrt.bench.demo_quality --json bench/results/demo_quality_cpu.json \\
        --plot bench/results/demo_quality_cpu.png

Backends: torch (the reference), onnxruntime-fp32 and onnxruntime-fp16 (artifacts exported from
the checkpoint), torch+triton (the Triton kernels; under the interpreter on a CPU, so on fewer
episodes and contexts: --triton-episodes, --triton-contexts), and quantized ONNX Runtime artifacts
named as bench.quantization's variants: onnxruntime-int8, onnxruntime-int4+int8-stores, ... Every
ONNX Runtime backend is also compared with the fp32 torch reference on held-out text (top-1
agreement, KL divergence: eval.compare).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaicrt.argtypes import context_list, count_list, nonneg_int, positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.bench.quantization import variant_artifact
from mosaicrt.errors import InputError
from mosaicrt.eval.compare import compare_logits
from mosaicrt.eval.ppl import HELDOUT_BYTES, bits_per_byte
from mosaicrt.eval.recall import ablate_ltm, run_recall, wilson_interval
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backend import torch_threads_for
from mosaicrt.runtime.tokenizer import load_tokenizer
from mosaicrt.train.corpus import load_corpus


def open_backend(name: str, checkpoint: Path, workdir: Path, max_context: int):
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.runtime.ort_backend import OrtBackend
    from mosaicrt.runtime.torch_backend import TorchBackend

    if name in ("onnxruntime-fp32", "onnxruntime-fp16"):
        dtype = "float16" if name.endswith("fp16") else "float32"
        export_artifact(checkpoint, workdir / name, dtype=dtype, max_context=max_context)
        return OrtBackend(workdir / name, device="cpu")
    if name.startswith("onnxruntime-"):  # a quantization variant
        variant = name.removeprefix("onnxruntime-")
        return OrtBackend(variant_artifact(variant, checkpoint, workdir, max_context), "cpu")
    kernels = "triton" if name == "torch+triton" else "torch"
    backend = TorchBackend(checkpoint, device="cpu", kernels=kernels)
    if name == "torch-no-ltm":
        ablate_ltm(backend.model)
    return backend


def measure(name: str, backend, contexts: list[int], episodes: list[int], args) -> dict:
    """Recall at each context (episodes[i] episodes at contexts[i]) and bits per byte."""
    rows = []
    with torch_threads_for(backend):
        for context, count in zip(contexts, episodes):
            result = run_recall(backend, context, count, args.seed, args.max_batch,
                                progress=sys.stderr.isatty())  # fmt: skip
            rows.append(result.to_dict() | {"answers": result.answers})
            print(f"{name:18s} {context:6d}: {result.correct}/{count}", flush=True)
        text = load_corpus("heldout")[: args.ppl_bytes].decode("utf-8", errors="ignore")
        ppl = None
        if args.ppl_bytes and name != "torch+triton":
            tokenizer = load_tokenizer(args.model, backend.config.vocab_size)
            ppl = bits_per_byte(backend, tokenizer, text)
    result = {"recall": rows, "bits_per_byte": ppl and ppl["bits_per_byte"], "ppl": ppl}
    if hasattr(backend, "ort_ops"):  # ONNX Runtime: native kernels of the mosaic ops, or bodies
        result["ort_ops"] = backend.ort_ops
        if args.compare_bytes:  # outside ONNX Runtime's thread setting: torch runs the reference
            result["vs_torch_fp32"] = compare_with_reference(backend, args)
    return result


def compare_with_reference(backend, args) -> dict:
    """Top-1 agreement, KL and logit error against the fp32 torch reference on held-out text."""
    from mosaicrt.runtime.torch_backend import TorchBackend

    text = load_corpus("heldout")[: args.compare_bytes].decode("utf-8", errors="ignore")
    reference = TorchBackend(args.model, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(args.model, backend.config.vocab_size)
    report = compare_logits(reference, backend, tokenizer, text)
    print(f"vs torch fp32: top-1 agreement {report['top1_agreement']:.4f}, "
          f"KL {report['kl_mean']:.2e} nats", flush=True)  # fmt: skip
    return report


def agreement(result: dict) -> None:
    """Per backend and context: the share of episodes whose answer equals torch's."""
    torch_rows = {r["context"]: r["answers"] for r in result["backends"]["torch"]["recall"]}
    for data in result["backends"].values():
        for row in data["recall"]:
            ref = torch_rows.get(row["context"])
            if ref is not None:
                same = sum(a == b for a, b in zip(row["answers"], ref))
                row["same_answers_as_torch"] = same / len(row["answers"])


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint (default: the packaged demo model)")
    parser.add_argument("--backends", default="torch,onnxruntime-fp32,onnxruntime-fp16,"
                        "torch+triton,torch-no-ltm")  # fmt: skip
    parser.add_argument("--contexts", type=context_list, default=[1024, 4096, 16384])
    parser.add_argument("--episodes", type=count_list, default=[100, 100, 32],
                        help="episodes per context: one count, or one per context")  # fmt: skip
    parser.add_argument("--triton-contexts", type=context_list, default=[1024])
    parser.add_argument("--triton-episodes", type=count_list, default=[16])
    parser.add_argument("--ablation-contexts", type=context_list, default=[1024, 4096])
    parser.add_argument("--max-batch", type=positive_int, default=8)
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--ppl-bytes", type=nonneg_int, default=HELDOUT_BYTES)
    parser.add_argument("--compare-bytes", type=nonneg_int, default=8192,
                        help="held-out bytes on which ONNX Runtime backends are compared with "
                        "the fp32 torch reference (0: skip)")  # fmt: skip
    parser.add_argument("--json", help="write results here (merged into an existing file)")
    parser.add_argument("--plot", help="write a PNG here")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.model.checkpoint import DEMO_DIR

    if args.json:
        check_output_file(args.json, flag="--json")
    args.model = Path(args.model or DEMO_DIR)
    result = {"benchmark": "demo_quality", "model": str(args.model), "seed": args.seed,
              "machine": machine_info(), "backends": {}}  # fmt: skip
    if args.json and Path(args.json).is_file():  # add to an earlier run (one backend at a time)
        result["backends"] = json.loads(Path(args.json).read_text())["backends"]
    plans = {"torch+triton": (args.triton_contexts, args.triton_episodes),
             "torch-no-ltm": (args.ablation_contexts, args.episodes[:1])}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            contexts, episodes = plans.get(name, (args.contexts, args.episodes))
            episodes = episodes * len(contexts) if len(episodes) == 1 else episodes
            if len(episodes) != len(contexts):
                raise InputError(f"{name}: give one episode count, or one per context")
            backend = open_backend(name, args.model, Path(tmp), max(contexts) + 1)
            result["backends"][name] = measure(name, backend, contexts, episodes, args)
            del backend
    if "torch" in result["backends"]:
        agreement(result)
    print(markdown(result))
    if args.json:
        write_json(args.json, result, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores; torch {m['torch']}; demo model, held-out "
        f"episodes (seed {result['seed']}), greedy answers ({m['date'][:10]}).",
        "",
        "| backend | context | recall | 95 % interval | same answers as torch | bits per byte "
        "| top-1 = torch fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ops = {"fused": " (fused layers)", "native": " (native ops)", "functions": " (function bodies)"}
    for name, data in result["backends"].items():
        bpb = f"{data['bits_per_byte']:.4f}" if data.get("bits_per_byte") else "n/a"
        vs = data.get("vs_torch_fp32")
        top1 = f"{100 * vs['top1_agreement']:.1f} %" if vs else "n/a"
        name += ops.get(data.get("ort_ops"), "")
        for row in data["recall"]:
            lo, hi = wilson_interval(row["correct"], row["episodes"])
            same = row.get("same_answers_as_torch")
            lines.append(
                f"| {name} | {row['context']} | {row['correct']}/{row['episodes']} = "
                f"{100 * row['accuracy']:.1f} % | {100 * lo:.1f}-{100 * hi:.1f} % | "
                f"{'n/a' if same is None else f'{100 * same:.0f} %'} | {bpb} | {top1} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(result["backends"])
    for i, name in enumerate(names):
        rows = result["backends"][name]["recall"]
        shift = 2 ** (0.05 * (i - (len(names) - 1) / 2))  # side by side: equal values stay visible
        x = [r["context"] * shift for r in rows]
        y = [100 * r["accuracy"] for r in rows]
        bounds = [wilson_interval(r["correct"], r["episodes"]) for r in rows]
        # Distances to the interval's ends (clipped at 0: at 0 % or 100 % one end is the value).
        lo = [max(0.0, 100 * (r["accuracy"] - b[0])) for r, b in zip(rows, bounds)]
        hi = [max(0.0, 100 * (b[1] - r["accuracy"])) for r, b in zip(rows, bounds)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for d in result["backends"].values() for r in d["recall"]})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens); trained on <= 1024")
    ax.set_ylabel("recall (%), 95 % interval")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))
