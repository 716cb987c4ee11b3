"""Batched scoring and generation over any backend, with requests validated at admission.

A bad request (empty, ids out of range, too long for the context) gets its own error and never
stops the others: results come back in request order, each a token list or a MosaicError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mosaicrt.errors import CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class RunLimits:
    max_batch: int = 8  # sequences decoded together
    max_context: int = 4096  # tokens one sequence may hold (prompt + generated)
    prefill_chunk: int = 512  # prompt tokens consumed per step

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_context", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Raise InputError unless ids is a non-empty list of ints in [0, vocab)."""
    if len(ids) == 0:
        raise InputError(f"{what} is empty: give at least one token")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"{what} has token id {bad[0]!r} outside [0, {vocab_size}): "
                         "use the model's tokenizer or check the vocabulary size")


def check_request(ids: Sequence[int], max_new_tokens: int, vocab_size: int, limits: RunLimits,
                  what: str) -> None:
    check_ids(ids, vocab_size, what)
    total = len(ids) + max_new_tokens
    if total > limits.max_context:
        raise CapacityError(f"{what} needs {total} tokens ({len(ids)} prompt + {max_new_tokens} new) "
                            f"but --max-context is {limits.max_context}: raise --max-context or "
                            "shorten the request")


def prefill(backend: Backend, state, prompts: list[list[int]], chunk: int) -> torch.Tensor:
    """Consume prompts in chunks of `chunk` tokens; return the logits (B, V) of each prompt's last
    token (an empty prompt is a free row: it consumes nothing and its logits are 0)."""
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    last = torch.zeros(B, backend.config.vocab_size)
    for start in range(0, int(lengths.max()), chunk):
        part = [p[start:start + chunk] for p in prompts]
        n = torch.tensor([len(p) for p in part])
        ids = torch.zeros(B, int(n.max()), dtype=torch.int64)
        for row, p in enumerate(part):
            ids[row, :len(p)] = torch.tensor(p, dtype=torch.int64)
        logits = backend.step(ids, n, state, last_only=True)  # (B, V)
        ends_here = (lengths > start) & (lengths <= start + chunk)
        last[ends_here] = logits[ends_here]
    return last


def generate(backend: Backend, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), limits: RunLimits = RunLimits(),
             progress: bool = False) -> list[list[int] | MosaicError]:
    """New tokens for every prompt (stopping at EOS, which is kept, or max_new_tokens)."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    results: list[list[int] | MosaicError] = []
    admitted = []
    for i, ids in enumerate(prompts):
        try:
            check_request(ids, max_new_tokens, backend.config.vocab_size, limits, "the prompt")
            results.append([])
            admitted.append(i)
        except MosaicError as exc:
            results.append(exc)
    if not admitted:
        return results
    sampler = Sampler(sampling)
    batch = min(limits.max_batch, len(admitted))
    state = backend.new_state(batch, limits.max_context)
    eos = backend.config.eos_token_id
    bar = tqdm(total=len(admitted) * max_new_tokens, desc="generating", unit="tok",
               disable=not progress)
    for start in range(0, len(admitted), batch):
        group = admitted[start:start + batch]
        backend.reset(state, torch.ones(batch, dtype=torch.bool))
        for rid in group:
            sampler.start(rid)
        padded = [prompts[i] for i in group] + [[]] * (batch - len(group))
        logits = prefill(backend, state, padded, limits.prefill_chunk)
        active = [True] * len(group) + [False] * (batch - len(group))
        while True:
            rows = [r for r in range(batch) if active[r]]
            tokens = sampler(logits[rows], [group[r] for r in rows])
            for r, tok in zip(rows, tokens):
                out = results[group[r]]
                out.append(tok)
                bar.update(1)
                if tok == eos or len(out) >= max_new_tokens:
                    active[r] = False
                    bar.update(max_new_tokens - len(out))
            if not any(active):
                break
            feed = torch.zeros(batch, 1, dtype=torch.int64)
            for r in range(batch):
                if active[r]:
                    feed[r, 0] = results[group[r]][-1]
            logits = backend.step(feed, torch.tensor(active, dtype=torch.int64), state,
                                  last_only=True)
    bar.close()
    return results


def score(backend: Backend, ids: torch.Tensor, limits: RunLimits = RunLimits()) -> torch.Tensor:
    """Logits (B, T, V) fp32 of every position of ids (B, T), prefilled chunk by chunk."""
    B, T = ids.shape
    if T == 0:
        raise InputError("the token array has no positions (T = 0): give at least one token")
    if T > limits.max_context:
        raise CapacityError(f"sequences of {T} tokens exceed --max-context {limits.max_context}: "
                            "raise --max-context")
    vocab = backend.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise InputError(f"token id {bad} is outside [0, {vocab}): check the vocabulary size")
    state = backend.new_state(B, T)
    parts = []
    for start in range(0, T, limits.prefill_chunk):
        chunk = ids[:, start:start + limits.prefill_chunk]  # (B, C)
        lengths = torch.full((B,), chunk.shape[1], dtype=torch.int64)
        parts.append(backend.step(chunk, lengths, state, last_only=False))
    return torch.cat(parts, dim=1)
