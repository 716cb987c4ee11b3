"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a per-request seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mosaicrt.errors import InputError
from mosaicrt.runtime.backend import Logits

SEED_LIMIT = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """greedy, or sampling at `temperature` (0 means greedy) from the top_k tokens (0: all)
    whose probabilities first reach top_p, with a generator seeded from `seed`. Messages name
    the fields as requests spell them; the command line's options have the same names."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps the whole vocabulary
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(
                f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}"
            )
        if self.temperature == 0:
            object.__setattr__(self, "greedy", True)
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise InputError(f"seed must be in [0, 2^64), got {self.seed}")


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on (V,) logits; removed entries become -inf."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = (
            cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        )  # keep the first to reach p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Chooses tokens for the rows of a batch; each request has its own seeded generator, so a
    request's tokens do not depend on what else is in the batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params  # the default; a request may bring its own
        self.requests: dict[int, tuple[SamplingParams, torch.Generator]] = {}
        self.sampling: set[int] = set()  # the requests that do not choose greedily

    def start(self, request_id: int, params: SamplingParams | None = None) -> None:
        """A request's own params keep their seed; with the batch's, request i draws from
        seed + i (mod 2^64), whatever the other requests are."""
        params = params or self.params
        seed = params.seed if params is not self.params else params.seed + request_id
        self.requests[request_id] = (params, torch.Generator().manual_seed(seed % SEED_LIMIT))
        self.sampling.discard(request_id)
        if not params.greedy:
            self.sampling.add(request_id)

    def finish(self, request_id: int) -> None:
        self.requests.pop(request_id, None)
        self.sampling.discard(request_id)

    def __call__(self, logits: Logits, request_ids: list[int], greedy: list[int]) -> list[int]:
        """logits (B, V) for requests request_ids -> one token id per row; greedy: the rows'
        greedy tokens (scan_rows)."""
        if self.params.greedy and not self.sampling:  # every row greedy
            return greedy
        chosen = [self.requests.get(rid, (self.params, None)) for rid in request_ids]
        tokens = []
        for i, (params, generator) in enumerate(chosen):
            if params.greedy:
                tokens.append(greedy[i])
                continue
            row = torch.as_tensor(logits[i]).cpu()
            probs = torch.softmax(filtered_logits(row, params), dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
        return tokens


def host_logits(logits: Logits) -> Logits:
    """A step's logits as the batcher reduces them: numpy when they are on the host (a decode
    step's few torch calls cost more than its arithmetic once the step's weight reads have
    evicted them from the caches), else the device tensor."""
    if isinstance(logits, np.ndarray) or logits.device.type != "cpu":
        return logits
    return (logits if logits.dtype == torch.float32 else logits.float()).numpy()


def scan_rows(logits: Logits) -> tuple[list[bool], list[int]]:
    """(B, V) logits -> (does each row hold no NaN or inf, each row's greedy token): the
    batcher's one look at a step's logits (Backend.scan_rows; a fused last-only ONNX Runtime
    graph makes the same scan in its run, ops/ort_row_scan.h). On the host, a row's first
    largest and first smallest values are both finite exactly when the row is (numpy's argmax
    and argmin stop at the first NaN, and an inf is an extreme). Right after a decode step has
    read the weights through the caches, every call's code comes back from memory
    (bench.cold_calls, batch-1 `mini` on a CPU: a max and a min of 8k logits 163 us, this
    104 us; an isinstance check against torch.Tensor 36 us, against np.ndarray 20 us): so two
    index passes, as array methods, numpy first.
    On a GPU the reductions run there and 2B values come back, not the logits (32 MB at
    64 x 128k); on a CPU numpy's argmax vectorizes where torch's does not (6x faster at
    64 x 128k logits, 1.3 against 8.3 ms, and at 1 x 8k)."""
    if not isinstance(logits, np.ndarray):  # (first: a torch isinstance costs more)
        logits = host_logits(logits)
        if isinstance(logits, torch.Tensor):
            finite = logits.amax(dim=-1).isfinite() & logits.amin(dim=-1).isfinite()
            return finite.tolist(), logits.argmax(dim=-1).tolist()
    top, low = logits.argmax(axis=-1).tolist(), logits.argmin(axis=-1).tolist()
    extremes = [(logits.item(r, t), logits.item(r, m)) for r, (t, m) in enumerate(zip(top, low))]
    return [math.isfinite(hi) and math.isfinite(lo) for hi, lo in extremes], top
