"""Batched scoring and generation over any backend, with requests validated at admission.

A bad request (empty, ids out of range, too long for the context) gets its own error and never
stops the others: results come back in request order, each a token list or a MosaicError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

from mosaicrt.errors import CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend, nonfinite_error, torch_threads_for
from mosaicrt.runtime.batcher import ContinuousBatcher, Request, check_ids, check_request
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.paging import blocks_for
from mosaicrt.runtime.sampling import SamplingParams

__all__ = ["ContinuousBatcher", "Request", "RunLimits", "check_ids", "generate", "score"]


def generate(
    backend: Backend,
    prompts: list[list[int] | MosaicError],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    limits: RunLimits = RunLimits(),
    progress: bool = False,
    on_start: Callable[[RunLimits], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int] | MosaicError]:
    """New tokens for every prompt (stopping at EOS, which is kept, or max_new_tokens). A prompt
    that is already an error (a bad input line) stays one, and keeps its place: prompt i is
    request i whatever the others are (its sampling seed is the batch's seed + i).

    on_start is called with the limits the state is sized for, once the requests are admitted and
    before the state is allocated (the CLI prints the memory plan there). on_token(i, token) is
    called with each new token of prompt i as it is made (the CLI prints its text as it comes).
    """
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    results: list[list[int] | MosaicError] = []
    requests = []
    for i, ids in enumerate(prompts):
        try:
            if isinstance(ids, MosaicError):
                raise ids
            check_request(ids, max_new_tokens, backend.config.vocab_size, limits, "the prompt")
            requests.append(Request(i, list(ids), max_new_tokens))
            results.append(requests[-1].output)
        except MosaicError as exc:
            results.append(exc)
    if not requests:
        return results
    limits = replace(limits, max_batch=min(limits.max_batch, len(requests)))
    if on_start:
        on_start(limits)
    batcher = ContinuousBatcher(backend, sampling, limits)
    for request in requests:
        try:
            batcher.submit(request)
        except MosaicError as exc:  # more than the state pool holds: this request alone fails
            request.error = exc
    with (
        torch_threads_for(backend),
        tqdm(
            total=len(requests) * max_new_tokens,
            desc="generating",
            unit="tok",
            disable=not progress,
        ) as bar,
    ):
        while batcher.busy:
            for request, token, finished in batcher.step():
                bar.update((token is not None) + (max_new_tokens - len(request.output)) * finished)
                if on_token is not None and token is not None:
                    on_token(request.rid, token)
    for request in requests:
        if request.error is not None:
            results[request.rid] = request.error
    return results


def score(backend: Backend, ids: torch.Tensor, limits: RunLimits = RunLimits()) -> torch.Tensor:
    """Logits (B, T, V) fp32 of every position of ids (B, T), prefilled chunk by chunk."""
    B, T = ids.shape
    if B == 0 or T == 0:
        raise InputError(f"the token array has shape [{B}, {T}]: give at least one token")
    if T > limits.max_context:
        raise CapacityError(
            f"sequences of {T} tokens exceed --max-context {limits.max_context}: "
            "raise --max-context"
        )
    vocab = backend.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise InputError(f"token id {bad} is outside [0, {vocab}): check the vocabulary size")
    group = rows_within_budget(backend, B, T, limits.state_memory)
    parts = []
    with torch_threads_for(backend):
        for first in range(0, B, group):  # as many sequences at once as the budget holds
            parts.append(score_rows(backend, ids[first : first + group], limits, first))
    return torch.cat(parts, dim=0)


def rows_within_budget(backend: Backend, batch: int, tokens: int, budget: int | None) -> int:
    """How many sequences of `tokens` tokens to score at once: all, or what `budget` holds."""
    if budget is None:
        return batch
    sizes = backend.state_sizes()
    per_row = sizes.row_bytes + blocks_for(tokens, sizes.block) * sizes.block_bytes
    if budget < per_row:
        raise sizes.budget_error(budget, 1, tokens)
    return min(batch, budget // per_row)


def score_rows(backend: Backend, ids: torch.Tensor, limits: RunLimits, first: int) -> torch.Tensor:
    """Logits (B, T, V) of ids (B, T), rows `first`... of the caller's batch."""
    B, T = ids.shape
    state = backend.new_state(B, T)
    parts = []
    for start in range(0, T, limits.prefill_chunk):
        chunk = ids[:, start : start + limits.prefill_chunk]  # (B, C)
        lengths = torch.full((B,), chunk.shape[1], dtype=torch.int64)
        logits = backend.step(chunk, lengths, state, last_only=False)  # (B, C, V)
        bad = (~logits.isfinite()).flatten(1).any(dim=1).nonzero()
        if len(bad):
            row = int(bad[0])
            error = nonfinite_error(backend, state, row)
            raise InputError(f"sequence {first + row}: {error}")
        parts.append(logits)
    return torch.cat(parts, dim=1)
