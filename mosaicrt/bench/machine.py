"""What machine and software a benchmark ran on, for the result JSON."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from datetime import datetime, timezone

import numpy as np
import torch

from mosaicrt import __version__
from mosaicrt.ops.ort_library import cpu_vectors
from mosaicrt.runtime import huge_pages


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git(*args: str) -> str | None:
    """What `git ARGS` prints in the checkout, None where there is no git or no checkout."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """The checkout's commit; MOSAICRT_GIT_COMMIT names it where the tree travelled without .git."""
    if os.environ.get("MOSAICRT_GIT_COMMIT"):
        return os.environ["MOSAICRT_GIT_COMMIT"]
    return (git("rev-parse", "HEAD") or "").strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from that commit (the numbers are then not the commit's
    alone); None where git cannot tell."""
    if os.environ.get("MOSAICRT_GIT_COMMIT"):
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def peak_memory() -> tuple[int, int | None]:
    """(host, GPU) peak bytes so far (since restart_peaks, where it ran): the resident set, as
    Linux's VmHWM, which counts this program only (getrusage's maxrss also keeps the peak of the
    process that started it, from before its exec), else getrusage's; and torch's CUDA
    allocations (None without a GPU)."""
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, gpu  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, gpu


def restart_peaks() -> bool:
    """Restart both peaks from the current use (the host's through Linux's
    /proc/self/clear_refs); False where the host's cannot be."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Host read bandwidth: the best of `repeats` multi-threaded sums over a `gib` GiB buffer, on
    huge pages where the OS has them (as the ONNX Runtime backend's weights and stores are:
    runtime.huge_pages), which read faster than small ones."""
    buf = torch.from_numpy(huge_pages.full((int(gib * 2**30) // 4,), 1.0, np.float32))
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def measure_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    """fp32 matmul throughput on the host, the prefill roofline's denominator."""
    a = torch.randn(n, n)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def cuda_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median CUDA-event time of fn in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_gpu_bandwidth_gb_s(gib: float = 2.0) -> float:
    """HBM bandwidth: a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def measure_gpu_peak_gflops(n: int = 8192) -> float:
    """bf16 matmul throughput on the GPU, the prefill roofline's denominator there."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (cuda_ms(lambda: a @ a, iters=10) * 1e-3) / 1e9


def gpu_info() -> dict:
    """GPU name, CUDA and Triton versions, driver and clocks (nvidia-smi), where present."""
    info = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["nvidia_smi"] = dict(zip(query.split(","), [v.strip() for v in out.split(",")]))
    except (ImportError, OSError, subprocess.TimeoutExpired):
        pass
    return info


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_vectors": cpu_vectors(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mosaicrt": __version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }
    if torch.cuda.is_available():
        info |= gpu_info()
    return info
