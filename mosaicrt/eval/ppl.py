"""Bits per byte of a text through any backend: the text in windows of `context` tokens, each
after a BOS, every token predicted from the ones before it in its window."""

from __future__ import annotations

import math

import torch

from mosaicrt.errors import InputError
from mosaicrt.runtime.backend import Backend
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
    config = backend.config
    if config.bos_token_id is None:
        raise InputError("bits per byte needs a model with a BOS token (bos_token_id)")
    if context < 2:
        raise InputError(f"--context must be >= 2, got {context}")
    ids = tokenizer.encode(text)
    nbytes = len(text.encode("utf-8"))
    if not ids or nbytes == 0:
        raise InputError("the text is empty: give some text to score")
    span = context - 1  # tokens per window after its BOS
    windows = [[config.bos_token_id] + ids[i : i + span] for i in range(0, len(ids), span)]
    limits = RunLimits(max_context=context, prefill_chunk=min(prefill_chunk, context))
    nats = 0.0
    for start in range(0, len(windows), batch):
        group = windows[start : start + batch]
        length = max(map(len, group))
        x = torch.tensor([w + [0] * (length - len(w)) for w in group])  # right-padded
        logp = torch.log_softmax(score(backend, x, limits), dim=-1)  # (B, T, V)
        for row, window in enumerate(group):
            targets = torch.tensor(window[1:])
            nats -= float(logp[row, : len(window) - 1].gather(1, targets[:, None]).sum())
    return {
        "bits_per_byte": nats / math.log(2) / nbytes,
        "bytes": nbytes,
        "tokens": len(ids),
        "windows": len(windows),
        "context": context,
    }
