"""Serving through Triton Inference Server: aggregate output tokens/s with 1 and with N concurrent
streaming clients (in-flight batching at work), the same requests through the batcher in process
on 1 and on N rows (what batching gives without the server), the model steps alone on 1 and N rows
(a prefill of their prompts, a decode step: what bounds batching), and the per-request overhead of
the server path against the same request through `mosaicrt generate`'s code in process (the two
timed in turn, 5 times each, while the server runs idle between its requests).

Each client keeps one gRPC connection and stream and sends its requests over it one after another
(greedy), asking for `output_ids` alone, as the in-process runs give ids; tokens are counted as
they arrive (a request may stop early at EOS). The artifact is exported with last_only, as for
serving: a step needs each row's last logits only. Each clients' run also reports the CPU time the
model processes, tritonserver and the clients (this process) used: on a small machine the clients
and the server's own work take cores from the model's threads.

The 1-client and N-client runs (and the in-process ones) take turns, --rounds times: a machine's
speed can move between runs seconds apart, and a ratio of two runs far apart measures that too.
Each ratio is the median of its rounds'.

    mosaicrt bench serve --json bench/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.errors import BackendError
from mosaicrt.export.artifact import export_artifact
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import preset
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.runtime.ort_backend import OrtBackend
from mosaicrt.runtime.serving.client import StreamClient
from mosaicrt.runtime.serving.repository import export_repository
from mosaicrt.runtime.serving.server import TritonServer

IDS_ONLY = ("output_ids",)


def stream_tokens(client: StreamClient, prompt: list[int], max_new_tokens: int) -> int:
    """One greedy streaming request; returns the number of tokens received."""
    result = client.generate(prompt, max_new_tokens)
    if result.error is not None:
        raise RuntimeError(result.error)
    return len(result.tokens)


def client_prompts(clients: int, requests_each: int, prompt_len: int) -> list:
    """(clients, requests_each, prompt_len) token ids, the same for the server and in process."""
    gen = torch.Generator().manual_seed(clients)
    return torch.randint(1, 8000, (clients, requests_each, prompt_len), generator=gen).tolist()


def in_process_run(backend, clients: int, requests_each: int, prompt_len: int, new: int) -> dict:
    """The same requests through the continuous batcher in process, on `clients` rows."""
    prompts = [p for c in client_prompts(clients, requests_each, prompt_len) for p in c]
    limits = RunLimits(max_batch=clients, max_context=prompt_len + new, prefill_chunk=prompt_len)
    start = time.perf_counter()
    tokens = sum(len(out) for out in generate(backend, prompts, new, limits=limits))
    wall = time.perf_counter() - start
    return {"rows": clients, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall}  # fmt: skip


def step_ms(backend, rows: int, prompt_len: int, repeats: int = 5) -> dict:
    """Median ms of the model steps the requests are made of, straight through the backend:
    one prefill step of `rows` prompts of prompt_len tokens, and a decode step of `rows` rows
    right after it (what bounds batching, without the batcher or the server)."""
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, 8000, (rows, prompt_len), generator=gen)
    prompt_lengths = torch.full((rows,), prompt_len, dtype=torch.int64)
    token, one = ids[:, :1].contiguous(), torch.ones(rows, dtype=torch.int64)
    prefill, decode = [], []
    for _ in range(repeats):
        state = backend.new_state(rows, prompt_len + repeats + 1)
        t0 = time.perf_counter()
        backend.step(ids, prompt_lengths, state, last_only=True)
        prefill.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.step(token, one, state, last_only=True)
            decode.append(time.perf_counter() - t0)
    return {"rows": rows, "prefill_ms": 1e3 * statistics.median(prefill),
            "decode_ms": 1e3 * statistics.median(decode)}  # fmt: skip


def median_round(rounds: list[list[dict]]) -> tuple[int, list[float]]:
    """(the round whose N-vs-1 tokens/s ratio is the median of the rounds', every round's ratio)
    of rounds of [1-client run, N-client run]."""
    ratios = [many["output_tokens_per_s"] / one["output_tokens_per_s"] for one, many in rounds]
    return sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2], ratios


def cpu_seconds(server: TritonServer) -> dict[str, float]:
    """CPU seconds used so far by the model processes (Triton's Python-backend stubs: the
    runtime and its model), by tritonserver itself, and by this process (the clients)."""
    import psutil  # the [bench] extra

    root = psutil.Process(server.process.pid)
    used = {"model_processes": 0.0, "tritonserver": 0.0, "clients": 0.0}
    for process, kind in [(root, "tritonserver")] + [
        (child, "model_processes") for child in root.children(recursive=True)
    ]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a process that ended meanwhile
            continue
        used[kind] += times.user + times.system
    times = psutil.Process(os.getpid()).cpu_times()
    used["clients"] = times.user + times.system
    return used


def clients_run(
    server: TritonServer, clients: int, requests_each: int, prompt_len: int, new: int
) -> dict:
    """`clients` threads, each sending requests_each requests in turn; aggregate tokens/s, and
    the cores each side kept busy meanwhile (CPU seconds per second)."""
    prompts = client_prompts(clients, requests_each, prompt_len)
    counts = [0] * clients

    connections = [StreamClient(server.grpc_url, IDS_ONLY) for _ in range(clients)]

    def client(c: int) -> None:
        for r in range(requests_each):
            counts[c] += stream_tokens(connections[c], prompts[c][r], new)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    before = cpu_seconds(server)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = cpu_seconds(server)
    for connection in connections:
        connection.close()
    cores = {kind: (after[kind] - before[kind]) / wall for kind in after}
    return {"clients": clients, "output_tokens": sum(counts), "wall_s": wall,
            "output_tokens_per_s": sum(counts) / wall, "cores_busy": cores}  # fmt: skip


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--clients", type=positive_int, default=16)
    parser.add_argument("--requests", type=positive_int, default=3, help="requests per client")
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="1-client and N-client runs in turn, this many times")  # fmt: skip
    parser.add_argument("--json", help="write results here")


def main(args: argparse.Namespace) -> int:
    for module in ("psutil", "tritonclient.grpc"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise BackendError(
                f"mosaicrt bench serve needs {module.split('.')[0]}: pip install "
                f"'mosaicrt[serve,bench]'"
            ) from None
    if args.json:
        check_output_file(args.json, flag="--json")
    config = preset(args.preset)
    context = args.prompt_len + args.new_tokens
    prompt = [7] * args.prompt_len  # the one request timed alone
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_checkpoint(random_tensors(config, 0), config, tmp / "ckpt")
        export_artifact(tmp / "ckpt", tmp / "onnx", max_context=context, last_only=True)
        export_repository(tmp / "onnx", tmp / "repo", max_batch=args.clients,
                          max_context=context, prefill_chunk=args.prompt_len)  # fmt: skip
        backend = OrtBackend(tmp / "onnx", device="cpu")
        served = served_runs(tmp / "repo", args, prompt, backend)
        in_process = in_process_runs(backend, args)
    result = report(args, served, in_process)
    print_summary(result, args.clients)
    if args.json:
        write_json(args.json, result)
    return 0


def served_runs(
    repo: Path, args: argparse.Namespace, prompt: list[int], backend: OrtBackend
) -> dict:
    """Through the server: the rounds of 1 and N clients; and `prompt` alone, 5 times through
    the server and 5 through generate's code in process on `backend`, in turn (the machine's
    speed drifts between runs minutes apart)."""
    with TritonServer(repo) as server:
        with StreamClient(server.grpc_url, IDS_ONLY) as client:
            stream_tokens(client, [1] * args.prompt_len, 4)  # warm up
        rounds = [
            [
                clients_run(server, c, args.requests, args.prompt_len, args.new_tokens)
                for c in (1, args.clients)
            ]
            for _ in range(args.rounds)
        ]
        limits = RunLimits(max_batch=1, max_context=args.prompt_len + args.new_tokens,
                           prefill_chunk=args.prompt_len)  # fmt: skip
        alone, direct = [], []
        with StreamClient(server.grpc_url, IDS_ONLY) as client:
            for _ in range(5):
                t0 = time.perf_counter()
                stream_tokens(client, prompt, args.new_tokens)
                alone.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                generate(backend, [prompt], args.new_tokens, limits=limits)
                direct.append(time.perf_counter() - t0)
    return {"rounds": rounds, "alone_s": alone, "direct_s": direct}


def in_process_runs(backend: OrtBackend, args: argparse.Namespace) -> dict:
    """The same requests in process: the rounds of 1 and N rows through the batcher, and the
    model steps of 1 and N rows."""
    rounds = [
        [
            in_process_run(backend, c, args.requests, args.prompt_len, args.new_tokens)
            for c in (1, args.clients)
        ]
        for _ in range(args.rounds)
    ]
    steps = [step_ms(backend, rows, args.prompt_len) for rows in (1, args.clients)]
    return {"rounds": rounds, "steps": steps}


def report(args: argparse.Namespace, served: dict, in_process: dict) -> dict:
    """The benchmark's JSON: each ratio from its median round, the one request's medians."""
    mid, speedups = median_round(served["rounds"])
    mid_in_process, in_process_speedups = median_round(in_process["rounds"])
    steps = in_process["steps"]
    served_s, direct_s = (
        statistics.median(served["alone_s"]),
        statistics.median(served["direct_s"]),
    )
    return {
        "benchmark": "serve",
        "preset": args.preset,
        "backend": "onnxruntime",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "one_client": served["rounds"][mid][0],
        "many_clients": served["rounds"][mid][1],
        "speedup": speedups[mid],
        "speedups": speedups,
        "in_process": in_process["rounds"][mid_in_process],
        "in_process_speedup": in_process_speedups[mid_in_process],
        "in_process_speedups": in_process_speedups,
        "steps": steps,
        # tokens/s of a decode step of all rows against one row's: what batching could give
        "decode_step_speedup": args.clients * steps[0]["decode_ms"] / steps[1]["decode_ms"],
        "request_ms_server": 1e3 * served_s,
        "request_ms_in_process": 1e3 * direct_s,
        "server_vs_in_process": served_s / direct_s,
        "overhead_ms_per_request": 1e3 * (served_s - direct_s),
        "machine": machine_info(),
    }


def print_summary(result: dict, clients: int) -> None:
    one, many, steps = result["one_client"], result["many_clients"], result["steps"]
    spread = ", ".join(f"{x:.1f}x" for x in result["speedups"])
    print(
        f"1 client {one['output_tokens_per_s']:.1f} tokens/s; {clients} clients "
        f"{many['output_tokens_per_s']:.1f} tokens/s ({result['speedup']:.1f}x, the median of "
        f"rounds of {spread}; in process {result['in_process_speedup']:.1f}x); one request "
        f"{result['request_ms_server']:.1f} ms served vs {result['request_ms_in_process']:.1f} ms "
        f"in process (overhead {result['overhead_ms_per_request']:.1f} ms); a decode step of "
        f"{clients} rows {steps[1]['decode_ms']:.1f} ms vs {steps[0]['decode_ms']:.1f} ms for "
        f"one ({result['decode_step_speedup']:.1f}x the tokens/s), a prefill step of "
        f"{clients} x {result['prompt_len']} tokens {steps[1]['prefill_ms']:.0f} ms"
    )
    busy = many["cores_busy"]
    print(
        f"cores kept busy by {clients} clients' run: model processes "
        f"{busy['model_processes']:.2f}, tritonserver {busy['tritonserver']:.2f}, the clients "
        f"{busy['clients']:.2f} (of {os.cpu_count()})"
    )


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))
