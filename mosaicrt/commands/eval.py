"""`mosaicrt eval recall|ppl MODEL`: long-context recall and bits per byte of a trained model
through any backend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mosaicrt.argtypes import context_list, positive_int, seed
from mosaicrt.errors import BackendError, InputError
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backends import add_run_args, open_run_backend


def add_cli_args(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    recall = kinds.add_parser("recall", help="held-out recall episodes, accuracy per context")
    add_run_args(recall)
    recall.add_argument(
        "--contexts", type=context_list, default=[1024, 4096, 16384], help="tokens per episode"
    )
    recall.add_argument("--episodes", type=positive_int, default=100, help="episodes per context")
    recall.add_argument("--seed", type=seed, default=0, help="which episodes")
    recall.add_argument(
        "--max-batch", type=positive_int, default=8, help="episodes decoded together"
    )
    recall.add_argument("--max-context", type=positive_int, help="refuse contexts beyond this")
    add_common(recall)
    ppl = kinds.add_parser("ppl", help="bits per byte of a text")
    add_run_args(ppl)
    ppl.add_argument("--input", help="text file (default: 64 KiB of the held-out corpus)")
    ppl.add_argument("--context", type=positive_int, default=1024, help="tokens per scoring window")
    add_common(ppl)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablate", choices=["ltm"], help="ltm: zero the LTM's output (torch backend)")
    p.add_argument("--json", help="write the results here")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.eval.recall import check_byte_model

    if args.json:
        check_output_file(args.json, inputs=[args.model], flag="--json")
    backend = open_run_backend(args)
    check_byte_model(backend.config, f"eval {args.kind}")
    if args.ablate:
        ablate(backend, args.ablate)
    result = run_recall(args, backend) if args.kind == "recall" else run_ppl(args, backend)
    result.update(model=str(args.model), backend=backend.name, ablate=args.ablate)
    if args.json:
        write_json(args.json, result)
    return 0


def ablate(backend, what: str) -> None:
    from mosaicrt.eval.recall import ablate_ltm

    if backend.name != "torch":
        raise BackendError(f"--ablate {what} works on the torch backend: add --backend torch")
    ablate_ltm(backend.model)


def run_recall(args: argparse.Namespace, backend) -> dict:
    from mosaicrt.eval.recall import run_recall as recall

    contexts = args.contexts
    limit = args.max_context or getattr(backend, "max_context", None)
    if limit is not None and max(contexts) > limit:
        raise InputError(
            f"a recall context of {max(contexts)} tokens exceeds --max-context {limit}: "
            "lower --contexts (or re-export the artifact with a larger --max-context)"
        )
    rows = []
    for context in contexts:
        result = recall(backend, context, args.episodes, args.seed, args.max_batch,
                        progress=sys.stderr.isatty())  # fmt: skip
        row = result.to_dict()
        lo, hi = row["ci95"]
        print(
            f"recall at {context:6d} tokens: {row['correct']}/{row['episodes']} = "
            f"{100 * row['accuracy']:.1f} % (95 % interval {100 * lo:.1f}-{100 * hi:.1f})"
        )
        rows.append(row | {"answers": result.answers})
    return {"eval": "recall", "seed": args.seed, "rows": rows}


def run_ppl(args: argparse.Namespace, backend) -> dict:
    from mosaicrt.eval.ppl import HELDOUT_BYTES, bits_per_byte
    from mosaicrt.runtime.tokenizer import load_tokenizer
    from mosaicrt.train.corpus import load_corpus

    if args.input:
        if not Path(args.input).is_file():
            raise InputError(f"--input {args.input} does not exist")
        try:
            text = Path(args.input).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"--input {args.input} is not UTF-8 text ({exc.reason})") from None
    else:
        text = load_corpus("heldout")[:HELDOUT_BYTES].decode("utf-8", errors="ignore")
    tokenizer = load_tokenizer(args.model, backend.config.vocab_size)
    result = bits_per_byte(backend, tokenizer, text, args.context, prefill_chunk=args.prefill_chunk)
    print(f"bits per byte: {result['bits_per_byte']:.4f} over {result['bytes']} bytes "
          f"({result['windows']} windows of up to {args.context} tokens)")  # fmt: skip
    return {"eval": "ppl", "input": args.input or "heldout corpus", **result}
