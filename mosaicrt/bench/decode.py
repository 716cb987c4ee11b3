"""Decode TPOT at batch 1 vs context, per backend, against a DRAM roofline measured in the run.

Bytes that must be read per decode step (the roofline's numerator, bench.roofline.decode_bytes) =
the weights without the embedding table + the *valid* STM and LTM pairs: min(t, h-1) STM pairs and
max(0, t-m+1) LTM pairs per layer, keys and values, fp32. Roofline time = bytes / read bandwidth,
the mean of one measured just before and one just after each backend's steps (the machine's speed
drifts over a run); roofline fraction = roofline time / measured TPOT.

    python -m mosaicrt.bench.decode --json bench/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mosaicrt.argtypes import context_list, nonneg_int, optional_context_list, positive_int
from mosaicrt.bench.machine import (
    machine_info,
    measure_bandwidth_gb_s,
    measure_gpu_bandwidth_gb_s,
)
from mosaicrt.bench.roofline import decode_bytes
from mosaicrt.errors import InputError
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import ModelConfig, load_config, preset
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backend import Backend, torch_threads_for


def prefill(backend: Backend, context: int, capacity: int, chunk: int):
    """A batch-1 state that has consumed `context` random tokens."""
    gen = torch.Generator().manual_seed(context)
    state = backend.new_state(1, capacity)
    ids = torch.randint(0, backend.config.vocab_size, (1, context), generator=gen)
    for start in range(0, context, chunk):
        part = ids[:, start : start + chunk]
        backend.step(part, torch.tensor([part.shape[1]]), state, last_only=True)
    return state


def interleaved_tpot(cases: dict, steps: int, warmup: int) -> dict:
    """Time single-token steps of every (backend, state) case in turn, round after round, so that
    a slow spell of the machine hits all cases alike (cases of one backend only: two runtimes'
    spinning thread pools would slow each other). Returns seconds per step for each case."""
    token = torch.tensor([[1]])
    one = torch.ones(1, dtype=torch.int64)
    times: dict = {key: [] for key in cases}
    for i in range(warmup + steps):
        for key, (backend, state) in cases.items():
            t0 = time.perf_counter()
            backend.step(token, one, state, last_only=True).argmax(-1)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


class FullRecompute(Backend):
    """No decode state at all, as the v1 reference code generates: every step runs the whole
    sequence so far through another backend from a fresh state (in chunks). For scale only."""

    name = "full-recompute"

    def __init__(self, inner: Backend, chunk: int = 512) -> None:
        self.inner, self.config, self.chunk = inner, inner.config, chunk

    def new_state(self, batch: int, capacity: int, pool_blocks: int | None = None) -> list:
        return [[] for _ in range(batch)]

    def reset(self, state: list[list[int]], rows: torch.Tensor) -> None:
        for row in rows.nonzero().flatten().tolist():
            state[row].clear()

    def step(self, ids, lengths, state, last_only, rows=None, device_logits=False):
        if not last_only:
            raise ValueError("full recompute returns last-token logits only")
        for row, n in enumerate(lengths.tolist()):
            state[row].extend(ids[row, :n].tolist())
        assert len(state) == 1, "the benchmark recomputes batch 1"
        history = torch.tensor(state)  # (1, T)
        fresh = self.inner.new_state(1, history.shape[1])
        for start in range(0, history.shape[1], self.chunk):
            part = history[:, start : start + self.chunk]
            logits = self.inner.step(part, torch.tensor([part.shape[1]]), fresh, last_only=True)
        return logits


def open_backends(
    names: list[str],
    config: ModelConfig,
    workdir: Path,
    max_context: int,
    device: str = "cpu",
    dtype: str = "float32",
    checkpoint: Path | None = None,
) -> dict[str, Backend]:
    """torch: the eager cached decoder; torch.compile: the same through torch.compile; torch+triton:
    with the Triton kernels (and CUDA graphs for decode on a GPU); torch.compile+triton: both
    (the compiled step inside the CUDA graph); onnxruntime: the exported artifact (the native
    kernels of the mosaic ops where built); onnxruntime-functions: with their function bodies;
    full-recompute: no state at all."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint
    if ckpt is None:
        ckpt = workdir / "ckpt"
        write_checkpoint(random_tensors(config, 0), config, ckpt)
    backends: dict[str, Backend] = {}
    for name in names:
        if name in ("torch", "torch.compile", "torch+triton", "torch.compile+triton"):
            from mosaicrt.runtime.torch_backend import TorchBackend

            backends[name] = TorchBackend(
                ckpt,
                device=device,
                dtype=dtype,
                kernels="triton" if name.endswith("+triton") else "torch",
                compile=name.startswith("torch.compile"),
            )
        elif name in ("onnxruntime", "onnxruntime-functions"):
            from mosaicrt.export.artifact import export_artifact
            from mosaicrt.runtime.ort_backend import OrtBackend

            if not (workdir / "onnx").is_dir():
                export_artifact(ckpt, workdir / "onnx", max_context=max_context)
            ort_ops = "functions" if name.endswith("functions") else "auto"
            backends[name] = OrtBackend(workdir / "onnx", device="cpu", ort_ops=ort_ops)
        elif name == "full-recompute":  # through ONNX Runtime, the fastest full forward here
            backends[name] = FullRecompute(
                backends.get("onnxruntime")
                or open_backends(
                    ["onnxruntime"], config, workdir / "recompute", max_context, checkpoint=ckpt
                )["onnxruntime"]
            )
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return backends


def measure(name: str, backend: Backend, contexts: list[int], capacity: int, args) -> dict:
    """Prefill a state per context, then time single-token steps of all of them in turn."""
    recompute = name == "full-recompute"  # seconds per token: a few steps suffice
    cases = {
        (name, c): (
            backend,
            prefill(backend, c, capacity, c if recompute else args.prefill_chunk),
        )
        for c in tqdm(contexts, desc=f"prefill {name}")
        if not recompute or c <= args.recompute_max_context
    }
    return interleaved_tpot(cases, 3 if recompute else args.steps, 1 if recompute else args.warmup)


DECODE_BACKENDS = ("torch", "torch.compile", "torch+triton", "torch.compile+triton",
                   "onnxruntime", "onnxruntime-functions", "full-recompute")  # fmt: skip
DEFAULT_BACKENDS = "torch,torch.compile,onnxruntime,onnxruntime-functions,full-recompute"
MAX_CONTEXT = 1 << 20  # contexts beyond this would take hours to prefill


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """`mosaicrt bench compare [MODEL]` and `python -m mosaicrt.bench.decode [MODEL]`."""
    p.add_argument(
        "model", nargs="?", help="checkpoint to benchmark (default: random weights of --preset)"
    )
    p.add_argument("--preset", default="mini")
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help="backends to run (torch, torch.compile, torch+triton, "
                   "torch.compile+triton, onnxruntime, onnxruntime-functions, "
                   "full-recompute)")  # fmt: skip
    p.add_argument(
        "--contexts", type=context_list, default=[1024, 4096], help="decode contexts: 1024,4096"
    )
    p.add_argument(
        "--stm-only-contexts",
        type=optional_context_list,
        default=[1024, 4096, 16384],
        help="contexts of the same preset without its LTM (random weights only)",
    )
    p.add_argument(
        "--steps", "--iters", dest="steps", type=positive_int, default=40, help="timed steps"
    )
    p.add_argument("--warmup", type=nonneg_int, default=5)
    p.add_argument("--prefill-chunk", type=positive_int, default=512)
    p.add_argument(
        "--recompute-max-context",
        type=positive_int,
        default=4096,
        help="full recompute only up to this context (each of its steps is a whole forward)",
    )
    p.add_argument("--device", default="auto", help="for the torch backends: cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="torch backends: float32, bfloat16")
    p.add_argument("--json", help="write results here")
    p.add_argument(
        "--append",
        action="store_true",
        help="add this run's rows to the --json file (backends too large to load together run "
        "one per process)",
    )


def main(args: argparse.Namespace) -> int:
    from mosaicrt.runtime.torch_backend import pick_device

    if args.json:
        check_output_file(args.json, inputs=[args.model], flag="--json")
    args.device = pick_device(args.device).type
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DECODE_BACKENDS)) or ([] if names else ["(none)"])
    if unknown:
        raise InputError(
            f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(DECODE_BACKENDS)}"
        )
    checkpoint = Path(args.model) if args.model else None
    base = load_config(checkpoint) if checkpoint else preset(args.preset)
    plans = [(True, c) for c in args.contexts] + [(False, c) for c in args.stm_only_contexts]
    if checkpoint:  # its own memories: no STM-only variant
        plans = [(base.use_ltm, c) for c in args.contexts]
    longest = max(c for _, c in plans)
    if longest > MAX_CONTEXT:
        raise InputError(
            f"--contexts {longest}: the benchmark decodes at most {MAX_CONTEXT} tokens of context "
            "(each context is prefilled first)"
        )
    check_state_fits(base, longest + args.warmup + args.steps + 1)
    gpu = args.device.startswith("cuda")
    bandwidth = measure_gpu_bandwidth_gb_s if gpu else measure_bandwidth_gb_s
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for use_ltm in sorted({u for u, _ in plans}, reverse=True):
            config = base.replace(use_ltm=use_ltm)
            contexts = [c for u, c in plans if u == use_ltm]
            capacity = max(contexts) + args.warmup + args.steps + 1
            workdir = Path(tmp) / f"ltm{int(use_ltm)}"
            backends = open_backends(
                names, config, workdir, capacity, args.device, args.dtype, checkpoint
            )
            for name, backend in backends.items():  # one runtime at a time: their thread pools
                before = bandwidth()  # the machine's speed drifts: measured around each
                with torch_threads_for(getattr(backend, "inner", backend)):
                    times = measure(name, backend, contexts, capacity, args)
                rows += tpot_rows(times, config, (before, bandwidth()), args.dtype)
            del backends
    if args.append and args.json and Path(args.json).exists():
        rows = json.loads(Path(args.json).read_text())["rows"] + rows
    add_speedups(rows)
    result = {
        "benchmark": "decode_tpot_batch1",
        "preset": checkpoint.name if checkpoint else args.preset,  # init names it the preset
        "model": str(checkpoint) if checkpoint else None,
        "config": base.to_dict(),
        "batch": 1,
        "device": args.device,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "roofline_bytes": f"weights without embedding + valid STM/LTM pairs, {args.dtype}",
        "machine": machine_info(),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    return 0


def check_state_fits(config: ModelConfig, capacity: int) -> None:
    """Refuse a context whose batch-1 decode state alone would not fit in this machine's memory
    (it would swap or be killed, not fail)."""
    from mosaicrt.model.state import human_bytes, memory_plan

    need = memory_plan(config, capacity, 1, "float32").state_bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise InputError(
            f"a context of {capacity} tokens needs {human_bytes(need)} of decode state and this "
            f"machine has {human_bytes(have)} of memory: lower --contexts"
        )


def tpot_rows(
    times: dict, config: ModelConfig, before_after: tuple[float, float], dtype: str
) -> list[dict]:
    """One row per (backend, context): TPOT against the roofline, printed as it is made. The
    roofline's bandwidth is the mean of the read bandwidth measured just before and just after
    the backend's steps (before_after, GB/s)."""
    bandwidth = statistics.fmean(before_after)
    rows = []
    for (name, context), samples in times.items():
        tpot = statistics.median(samples)
        step_bytes = decode_bytes(config, [context], dtype)
        roof = step_bytes / (bandwidth * 1e9)
        rows.append(
            {
                "backend": name,
                "use_ltm": config.use_ltm,
                "context": context,
                "bandwidth_gb_s": bandwidth,
                "bandwidth_before_after_gb_s": list(before_after),
                "tpot_ms": {
                    "p50": 1e3 * tpot,
                    "mean": 1e3 * statistics.fmean(samples),
                    "min": 1e3 * min(samples),
                },
                "bytes_per_step": step_bytes,
                "roofline_ms": 1e3 * roof,
                "roofline_fraction": roof / tpot,
            }
        )
        print(
            f"{name:12s} ltm={config.use_ltm!s:5} ctx={context:6d} tpot p50 {1e3 * tpot:7.2f} ms"
            f"  roofline {1e3 * roof:6.2f} ms ({100 * roof / tpot:5.1f} %)"
        )
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch on every row that has a torch eager row of the same memory and context."""
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["backend"] == "torch"
                and r["use_ltm"] == row["use_ltm"]
                and r["context"] == row["context"]
            ),
            None,
        )
        if ref:
            row["speedup_vs_torch"] = ref["tpot_ms"]["p50"] / row["tpot_ms"]["p50"]


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))
