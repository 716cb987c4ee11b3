"""`mosaicrt` command line: a thin dispatcher over the public Python API.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input (one line on stderr; --debug for a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosaicrt import __version__
from mosaicrt.errors import InputError, MosaicError

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def cmd_init(args: argparse.Namespace) -> int:
    from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
    from mosaicrt.model.config import normalize_dtype, parameter_count, preset

    config = preset(args.preset)
    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        raise InputError(f"{out} already holds a checkpoint: pass --force to overwrite it")
    dtype = normalize_dtype(args.dtype) if args.dtype else config.torch_dtype
    n = parameter_count(config)
    print(
        f"initialising {args.preset} ({n / 1e6:,.1f}M parameters, {dtype}, seed {args.seed}) "
        f"-> {out}",
        file=sys.stderr,
    )
    write_checkpoint(random_tensors(config, args.seed), config, out, dtype, progress=n > 50_000_000)
    print(out)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mosaicrt.model.config import load_config, normalize_dtype, parameter_count
    from mosaicrt.model.state import memory_plan

    config = load_config(args.model)
    store_dtype = normalize_dtype(args.state_dtype) if args.state_dtype else config.torch_dtype
    plan = memory_plan(config, args.max_context, args.max_batch, store_dtype)
    report = {
        "config": config.to_dict(),
        "parameters": parameter_count(config),
        "memory_plan": {
            "store_dtype": store_dtype,
            "max_context": args.max_context,
            "max_batch": args.max_batch,
            "ltm_bytes_per_token": plan.ltm_bytes_per_token,
            "stm_bytes_per_sequence": plan.stm_bytes_per_sequence,
            "recurrence_bytes_per_sequence": plan.recurrence_bytes_per_sequence,
            "bytes_per_sequence": plan.bytes_per_sequence,
            "state_bytes": plan.state_bytes,
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    table = Table(title=f"{args.model}", show_header=False)
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{report['parameters']:,}")
    console.print(table)
    mem = Table(
        title=f"memory plan: {args.max_batch} x {args.max_context} tokens, stores in {store_dtype}"
    )
    mem.add_column("state")
    mem.add_column("bytes", justify="right")
    mem.add_column("", justify="right")
    for key in (
        "ltm_bytes_per_token",
        "stm_bytes_per_sequence",
        "recurrence_bytes_per_sequence",
        "bytes_per_sequence",
        "state_bytes",
    ):
        value = report["memory_plan"][key]
        mem.add_row(key, f"{value:,}", human_bytes(value))
    console.print(mem)
    return 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def read_token_array(path: str):
    import numpy as np

    if not Path(path).is_file():
        raise InputError(f"token file {path} does not exist")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a .npy array ({exc}): save int64 [B, T] with numpy.save")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"{path} holds {ids.dtype} values; token ids must be integers (int64 [B, T])"
        )
    if ids.ndim != 2:
        raise InputError(f"{path} has shape {list(ids.shape)}; expected [B, T] token ids")
    return ids.astype(np.int64)


def cmd_build(args: argparse.Namespace) -> int:
    from mosaicrt.plugins.engine import build_engine

    build_engine(
        args.artifact,
        args.output,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_chunk=args.max_chunk,
        target=args.target,
        timing_cache=args.timing_cache,
    )
    return 0


def cmd_triton_export(args: argparse.Namespace) -> int:
    from mosaicrt.runtime.serving.repository import export_repository

    home = export_repository(
        args.model,
        args.output,
        backend=args.backend,
        max_batch=args.max_batch,
        max_context=args.max_context,
        instances=args.instances,
        prefill_chunk=args.prefill_chunk,
        idle_timeout_s=args.idle_timeout,
        device=args.device,
    )
    print(f"model repository: {args.output} (model `mosaicrt`: {home})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from mosaicrt.runtime.serving.server import TritonServer

    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(
        f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
        f"127.0.0.1:{server.metrics_port} (log {server.log_path}); Ctrl-C stops it",
        flush=True,
    )
    while not stop.is_set() and server.process.poll() is None:
        stop.wait(1.0)
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return 0 if code == 0 else 1


def cmd_export(args: argparse.Namespace) -> int:
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.model.config import normalize_dtype

    out = export_artifact(
        args.checkpoint,
        args.output,
        dtype=normalize_dtype(args.dtype),
        max_context=args.max_context,
        last_only=args.last_only,
        progress=sys.stderr.isatty(),
    )
    print(out)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mosaicrt.export.artifact import read_manifest
    from mosaicrt.runtime.check import run_check

    manifest, _ = read_manifest(args.artifact)
    checkpoint = args.checkpoint or manifest.get("source_checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InputError(
            f"the torch reference needs the checkpoint {args.artifact} was exported "
            f"from ({checkpoint or 'not recorded'} is not there): pass --checkpoint"
        )
    passed = run_check(args.artifact, checkpoint, args.atol, args.rtol, args.engine)
    against = "onnxruntime and tensorrt" if args.engine else "onnxruntime"
    print(
        f"check {'PASSED' if passed else 'FAILED'}: {against} vs torch reference "
        f"(atol {args.atol}, rtol {args.rtol})"
    )
    return 0 if passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.mode == "compare":
        from mosaicrt.bench import decode
        from mosaicrt.runtime.torch_backend import pick_device

        decode.main(
            [
                "--checkpoint",
                args.model,
                "--backends",
                args.backends,
                "--contexts",
                args.contexts,
                "--steps",
                str(args.iters),
                "--device",
                pick_device(args.device).type,
            ]  # fmt: skip
            + (["--json", args.json] if args.json else [])
        )
        return 0
    from mosaicrt.bench.serving import print_table, run_bench, write_json
    from mosaicrt.runtime.generator import check_ids

    for name in ("batch", "input_len", "output_len", "iters"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    backend = open_run_backend(args)
    dataset = None
    if args.dataset:
        dataset = read_prompts(args.dataset)
        for number, ids in enumerate(dataset, start=1):
            if isinstance(ids, MosaicError):
                raise ids
            check_ids(ids, backend.config.vocab_size, f"{args.dataset} line {number}")
    report = run_bench(
        backend,
        args.mode,
        args.batch,
        args.context or args.input_len,
        args.output_len,
        args.warmup,
        args.iters,
        args.num_requests,
        dataset,
    )
    print_table(report)
    if args.json:
        write_json(report, args.json)
    return 0


def print_memory_plan(config, limits) -> None:
    from mosaicrt.model.state import memory_plan

    plan = memory_plan(config, limits.max_context, limits.max_batch, "float32")
    print(
        f"memory plan: {limits.max_batch} x {limits.max_context} tokens -> "
        f"{human_bytes(plan.state_bytes)} of state (LTM {human_bytes(plan.ltm_bytes_per_token)}"
        f"/token, STM {human_bytes(plan.stm_bytes_per_sequence)}/sequence)",
        file=sys.stderr,
    )


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mosaicrt.runtime.generator import RunLimits, score

    ids = read_token_array(args.input)
    limits = RunLimits(
        max_context=args.max_context or max(ids.shape[1], 1), prefill_chunk=args.prefill_chunk
    )
    backend = open_run_backend(args)
    logits = score(backend, torch.from_numpy(ids), limits)
    np.save(args.output, logits.numpy().astype(np.float32))
    print(f"wrote {args.output}: float32 {list(logits.shape)}", file=sys.stderr)
    return 0


def open_run_backend(args: argparse.Namespace):
    """The backend that add_run_args' options name."""
    from mosaicrt.runtime.backends import open_backend

    return open_backend(
        args.backend,
        args.model,
        args.device,
        dtype_arg(args.dtype),
        args.kernels,
        compile=args.compile,
    )


def dtype_arg(value: str | None) -> str | None:
    from mosaicrt.model.config import normalize_dtype

    return normalize_dtype(value) if value else None


def read_prompts(path: str) -> list[list[int] | MosaicError]:
    """One {"input_ids": [...]} per line; a bad line becomes that request's error."""
    if not Path(path).is_file():
        raise InputError(f"prompt file {path} does not exist")
    prompts: list[list[int] | MosaicError] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise TypeError
            prompts.append(ids)
        except (json.JSONDecodeError, KeyError, TypeError):
            prompts.append(InputError(f'{path} line {number} is not {{"input_ids": [int, ...]}}'))
    if not prompts:
        raise InputError(f"{path} has no prompts: write one JSON object per line")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from mosaicrt.runtime.generator import RunLimits, generate
    from mosaicrt.runtime.sampling import SamplingParams
    from mosaicrt.runtime.tokenizer import load_tokenizer

    if (args.input is None) == (args.prompt is None):
        raise InputError("give exactly one of --input prompts.jsonl or --prompt TEXT")
    greedy = args.greedy or (args.temperature is None and args.top_k == 0 and args.top_p == 1.0)
    sampling = SamplingParams(
        greedy=greedy,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    backend = open_run_backend(args)
    config = backend.config
    limits = RunLimits(
        max_batch=args.max_batch,
        max_context=args.max_context or getattr(backend, "max_context", 4096),
        prefill_chunk=args.prefill_chunk,
    )
    if args.prompt is not None:
        if not args.prompt:
            raise InputError("--prompt is empty: give some text")
        tokenizer = load_tokenizer(args.model, config.vocab_size)
        bos = [config.bos_token_id] if config.bos_token_id is not None else []
        [result] = generate(
            backend, [bos + tokenizer.encode(args.prompt)], args.max_new_tokens, sampling, limits
        )
        if isinstance(result, MosaicError):
            raise result
        print(args.prompt + tokenizer.decode(result))
        return 0
    requests = read_prompts(args.input)
    good = [i for i, r in enumerate(requests) if not isinstance(r, MosaicError)]
    outputs = generate(
        backend,
        [requests[i] for i in good],
        args.max_new_tokens,
        sampling,
        limits,
        progress=sys.stderr.isatty(),
        on_start=lambda run: print_memory_plan(config, run),
    )
    results = list(requests)
    for i, out in zip(good, outputs):
        results[i] = out
    failed = 0
    with open_output(args.output) as fh:
        for number, result in enumerate(results, start=1):
            if isinstance(result, MosaicError):
                failed += 1
                print(f"error: request {number}: {result}", file=sys.stderr)
                fh.write(json.dumps({"error": str(result)}) + "\n")
            else:
                fh.write(json.dumps({"output_ids": result}) + "\n")
    return 2 if failed else 0


class open_output:
    """A file to write, or stdout for '-'."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        self.fh = sys.stdout if self.path == "-" else open(self.path, "w")
        return self.fh

    def __exit__(self, *exc) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


def add_run_args(p: argparse.ArgumentParser) -> None:
    from mosaicrt.runtime.backends import BACKENDS

    p.add_argument("model", help="checkpoint directory (torch) or ONNX artifact (onnxruntime)")
    p.add_argument(
        "--backend",
        default="auto",
        help=f"one of {', '.join(BACKENDS)} (default auto: tensorrt for an engine directory, "
        "onnxruntime for an artifact, torch for a checkpoint)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--dtype",
        help="compute dtype fp32|fp16|bf16 (default fp32 on CPU, the checkpoint's on GPU)",
    )
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step")
    p.add_argument(
        "--kernels",
        default="torch",
        help="torch backend: torch (reference code) or triton (needs a GPU, or "
        "TRITON_INTERPRET=1 on a CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend: decode steps through torch.compile (the first steps compile; with "
        "--kernels triton on a GPU, the compiled step is what the CUDA graph replays)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaicrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mosaicrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a random-init checkpoint")
    p.add_argument("dir")
    p.add_argument("--preset", required=True, help="tiny, mini (~40M), small (~2B) or large (~10B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="fp32|fp16|bf16 on disk (default: the preset's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("inspect", help="config, parameter count and memory plan")
    p.add_argument("model")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--state-dtype", help="dtype of the stores (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a checkpoint to an ONNX artifact")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="fp32, fp16 or bf16: weights, their MatMuls and the stores (norms, key scan "
        "and softmax stay fp32); bf16 runs on TensorRT or CUDA, not the ORT CPU EP",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=4096,
        help="most tokens one sequence may hold at run time",
    )
    p.add_argument(
        "--last-only",
        action="store_true",
        help="emit logits of each row's last token only (no `score`)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build a TensorRT engine from an ONNX artifact")
    from mosaicrt.plugins.engine import add_build_args

    add_build_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("triton-export", help="write a Triton Inference Server model repository")
    p.add_argument("model", help="ONNX artifact, TensorRT engine or checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="model repository to write")
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "tensorrt", "torch"],
        help="default: the one the model directory is for",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-context",
        type=int,
        help="tokens per sequence (default: the artifact's or engine's, 4096 for a checkpoint)",
    )
    p.add_argument("--instances", type=int, default=1, help="model instances (processes)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step")
    p.add_argument(
        "--idle-timeout", type=float, default=600.0, help="seconds before an idle sequence is freed"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.set_defaults(func=cmd_triton_export)

    p = sub.add_parser("serve", help="run tritonserver on 127.0.0.1 for a model repository")
    p.add_argument("repo")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="latency or throughput through the runtime")
    p.add_argument(
        "mode",
        choices=["latency", "throughput", "compare"],
        help="compare: decode TPOT of several backends side by side, ratios vs torch eager",
    )
    add_run_args(p)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request")
    p.add_argument("--context", type=int, help="decode at this context (sets --input-len)")
    p.add_argument("--dataset", help='JSONL of {"input_ids": [...]} prompts instead of random')
    p.add_argument("--num-requests", type=int, help="throughput: requests queued (4x batch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=3, help="latency: timed rounds")
    p.add_argument("--json", help="write the report here")
    p.add_argument(
        "--backends",
        default="torch,torch.compile,onnxruntime,full-recompute",
        help="compare: backends to run (torch, torch.compile, torch+triton, "
        "torch.compile+triton, onnxruntime, full-recompute)",
    )
    p.add_argument("--contexts", default="1024,4096", help="compare: decode contexts")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", help="compare an artifact's backends with the torch reference")
    p.add_argument("artifact")
    p.add_argument(
        "--checkpoint", help="the source checkpoint (default: the one recorded at export)"
    )
    p.add_argument("--engine", help="also run this TensorRT engine (built from the artifact)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("score", help="logits of token arrays")
    add_run_args(p)
    p.add_argument("--input", required=True, help="int64 [B, T] .npy")
    p.add_argument("--output", required=True, help="float32 [B, T, V] .npy to write")
    p.add_argument("--max-context", type=int, help="default: T")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="generate tokens or text")
    add_run_args(p)
    p.add_argument("--input", help='JSONL, one {"input_ids": [...]} per line')
    p.add_argument("--prompt", help="text, encoded with the model's tokenizer")
    p.add_argument("--output", default="-", help="JSONL to write (default stdout)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-context",
        type=int,
        help="tokens per sequence, prompt + new (default: the artifact's, or 4096)",
    )
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MosaicError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line unless --debug
        if args.debug:
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
