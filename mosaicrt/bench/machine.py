"""What machine and software a benchmark ran on, for the result JSON."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone

import torch

from mosaicrt import __version__


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def measure_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Host read bandwidth: the best of `repeats` multi-threaded sums over a `gib` GiB buffer."""
    buf = torch.ones(int(gib * 2**30) // 4)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def measure_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    """fp32 matmul throughput on the host, the prefill roofline's denominator."""
    a = torch.randn(n, n)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mosaicrt": __version__,
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
