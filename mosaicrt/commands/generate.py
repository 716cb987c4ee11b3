"""`mosaicrt generate MODEL --input prompts.jsonl | --prompt TEXT`: new tokens or text."""

from __future__ import annotations

import argparse
import json
import sys

from mosaicrt.argtypes import nonneg_float, nonneg_int, positive_int, probability, seed
from mosaicrt.errors import InputError, MosaicError
from mosaicrt.outputs import atomic_file, check_output_file
from mosaicrt.runtime.backends import add_run_args, open_run_backend, state_limits


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--input", help='JSONL, one {"input_ids": [...]} per line')
    p.add_argument("--prompt", help="text, encoded with the model's tokenizer")
    p.add_argument("--output", default="-", help="JSONL to write (default stdout)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=nonneg_float, help="sample at this temperature")
    p.add_argument("--top-k", type=nonneg_int, default=0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-context",
        type=positive_int,
        help="tokens per sequence, prompt + new (default: the artifact's, or 4096)",
    )


def main(args: argparse.Namespace) -> int:
    from mosaicrt.runtime.generator import RunLimits
    from mosaicrt.runtime.sampling import SamplingParams

    if (args.input is None) == (args.prompt is None):
        raise InputError("give exactly one of --input prompts.jsonl or --prompt TEXT")
    if args.prompt is not None and args.output != "-":
        raise InputError("--output is for --input: --prompt prints its text")
    check_output_file(args.output, inputs=[args.input, args.model])
    greedy = args.greedy or (args.temperature is None and args.top_k == 0 and args.top_p == 1.0)
    sampling = SamplingParams(
        greedy=greedy,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    backend = open_run_backend(args)
    limits = RunLimits(
        max_batch=args.max_batch,
        max_context=args.max_context or getattr(backend, "max_context", 4096),
        prefill_chunk=args.prefill_chunk,
        **state_limits(args),
    )
    if args.prompt is not None:
        return generate_text(args, backend, sampling, limits)
    return generate_jsonl(args, backend, sampling, limits)


def generate_text(args: argparse.Namespace, backend, sampling, limits) -> int:
    """--prompt: text in, the prompt and its continuation out, printed as the tokens come (from
    the first one on: a prompt refused prints nothing)."""
    from mosaicrt.runtime.generator import generate
    from mosaicrt.runtime.tokenizer import TextStream, load_tokenizer

    if not args.prompt:
        raise InputError("--prompt is empty: give some text")
    config = backend.config
    tokenizer = load_tokenizer(args.model, config.vocab_size)
    bos = [config.bos_token_id] if config.bos_token_id is not None else []
    text = TextStream(tokenizer)

    def show(_: int, token: int) -> None:
        if not text.ids:
            print(args.prompt, end="")
        print(text.push(token), end="", flush=True)

    [result] = generate(backend, [bos + tokenizer.encode(args.prompt)], args.max_new_tokens,
                        sampling, limits, on_token=show)  # fmt: skip
    if isinstance(result, MosaicError):
        if text.ids:
            print()  # the line of text so far ends before the error
        raise result
    print(text.flush())
    return 0


def generate_jsonl(args: argparse.Namespace, backend, sampling, limits) -> int:
    """--input: output line N answers input line N, {"output_ids": ...} or {"error": ...};
    request N samples from --seed + N - 1, whatever the other lines hold."""
    from mosaicrt.runtime.files import read_prompts
    from mosaicrt.runtime.generator import generate
    from mosaicrt.runtime.paging import plan_line, run_plan

    results = generate(
        backend,
        read_prompts(args.input),
        args.max_new_tokens,
        sampling,
        limits,
        progress=sys.stderr.isatty(),
        on_start=lambda run: print(
            plan_line(run_plan(backend, run), run.max_context, run.state_memory), file=sys.stderr
        ),
    )
    lines = []
    for number, result in enumerate(results, start=1):
        if isinstance(result, MosaicError):
            print(f"error: request {number}: {result}", file=sys.stderr)
            lines.append(json.dumps({"error": str(result)}))
        else:
            lines.append(json.dumps({"output_ids": result}))
    text = "".join(line + "\n" for line in lines)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with atomic_file(args.output) as tmp:
            tmp.write_text(text)
    return 2 if any(isinstance(r, MosaicError) for r in results) else 0
