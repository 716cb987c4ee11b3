"""Request-level serving metrics with vLLM's definitions, from token timestamps (pure functions).

For one request submitted at s whose tokens arrived at t_1 < ... < t_n:
    TTFT = t_1 - s;  E2EL = t_n - s;  ITL = t_{i+1} - t_i;  TPOT = (E2EL - TTFT) / (n - 1)
(TPOT excludes the first token; a one-token request has no TPOT and no ITL.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestTiming:
    submitted_s: float
    token_times_s: tuple[float, ...]
    prompt_tokens: int

    @property
    def ttft_ms(self) -> float:
        return 1e3 * (self.token_times_s[0] - self.submitted_s)

    @property
    def e2el_ms(self) -> float:
        return 1e3 * (self.token_times_s[-1] - self.submitted_s)

    @property
    def itl_ms(self) -> list[float]:
        t = self.token_times_s
        return [1e3 * (b - a) for a, b in zip(t, t[1:])]

    @property
    def tpot_ms(self) -> float | None:
        n = len(self.token_times_s)
        return (self.e2el_ms - self.ttft_ms) / (n - 1) if n > 1 else None


def summary(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 of a list (empty lists give zeros, so the report keeps its keys)."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES},
    }


def request_metrics(timings: list[RequestTiming], duration_s: float) -> dict:
    """Latency distributions and throughput of a set of requests that ran for duration_s."""
    output_tokens = sum(len(t.token_times_s) for t in timings)
    prompt_tokens = sum(t.prompt_tokens for t in timings)
    return {
        "requests": len(timings),
        "duration_s": duration_s,
        "ttft_ms": summary([t.ttft_ms for t in timings]),
        "tpot_ms": summary([t.tpot_ms for t in timings if t.tpot_ms is not None]),
        "itl_ms": summary([x for t in timings for x in t.itl_ms]),
        "e2el_ms": summary([t.e2el_ms for t in timings]),
        "requests_per_s": len(timings) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / duration_s,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
    }
