"""Bits per byte of a text through any backend: the text in windows of `context` tokens, each
after a BOS, every token predicted from the ones before it in its window."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from mosaicrt.errors import InputError
from mosaicrt.runtime.backend import Backend, torch_threads_for
from mosaicrt.runtime.generator import RunLimits, score
from mosaicrt.runtime.tokenizer import Tokenizer

HELDOUT_BYTES = 1 << 16  # the default text: this much of the corpus' held-out split


def bits_per_byte(
    backend: Backend,
    tokenizer: Tokenizer,
    text: str,
    context: int = 1024,
    batch: int = 8,
    prefill_chunk: int = 512,
) -> dict:
    """{"bits_per_byte", "bytes", "tokens", "windows"} of `text` under the model."""
    ids = encode(backend, tokenizer, text, context)
    nbytes = len(text.encode("utf-8"))
    nats = 0.0
    groups = batched_windows(backend.config, ids, context, batch)
    for group, logits in zip(groups, window_logits(backend, groups, context, prefill_chunk)):
        logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        for row, window in enumerate(group):
            targets = torch.tensor(window[1:])
            nats -= float(logp[row, : len(window) - 1].gather(1, targets[:, None]).sum())
    return {
        "bits_per_byte": nats / math.log(2) / nbytes,
        "bytes": nbytes,
        "tokens": len(ids),
        "windows": sum(map(len, groups)),
        "context": context,
    }


def encode(backend: Backend, tokenizer: Tokenizer, text: str, context: int) -> list[int]:
    """The text's token ids, refused with the fix when it cannot be scored in windows."""
    if backend.config.bos_token_id is None:
        raise InputError("bits per byte needs a model with a BOS token (bos_token_id)")
    if context < 2:
        raise InputError(f"--context must be >= 2, got {context}")
    ids = tokenizer.encode(text)
    if not ids or not text.encode("utf-8"):
        raise InputError("the text is empty: give some text to score")
    return ids


def batched_windows(config, ids: list[int], context: int, batch: int) -> list[list[list[int]]]:
    """ids cut into windows of `context` tokens, each after a BOS, in groups of `batch`."""
    span = context - 1  # tokens per window after its BOS
    windows = [[config.bos_token_id] + ids[i : i + span] for i in range(0, len(ids), span)]
    return [windows[i : i + batch] for i in range(0, len(windows), batch)]


def window_logits(
    backend: Backend, groups: list[list[list[int]]], context: int, prefill_chunk: int
) -> Iterator[torch.Tensor]:
    """Per group, the logits (B, T, V) of every position of its right-padded windows. An
    artifact that returns last-position logits only is run one token a step."""
    last_only = getattr(backend, "last_only_graph", False)
    limits = RunLimits(max_context=context, prefill_chunk=min(prefill_chunk, context))
    for group in groups:
        length = max(map(len, group))
        x = torch.tensor([w + [0] * (length - len(w)) for w in group])  # (B, T) right-padded
        yield decode_logits(backend, x) if last_only else score(backend, x, limits)


def decode_logits(backend: Backend, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of every position of ids (B, T), fed one token a step."""
    B, T = ids.shape
    state = backend.new_state(B, T)
    ones = torch.ones(B, dtype=torch.int64)
    with torch_threads_for(backend):
        steps = [backend.step(ids[:, t : t + 1], ones, state, last_only=True) for t in range(T)]
    return torch.stack([torch.as_tensor(s) for s in steps], dim=1)
