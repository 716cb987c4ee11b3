"""How far a candidate model (a quantized artifact, an fp16 one) is from a reference on the same
text: logit error, top-1 agreement and the KL divergence of its next-token distributions, over
every position of the text cut into windows as for bits per byte."""

from __future__ import annotations

import torch

from mosaicrt.eval.ppl import batched_windows, encode, window_logits
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.tokenizer import Tokenizer


def compare_logits(
    reference: Backend,
    candidate: Backend,
    tokenizer: Tokenizer,
    text: str,
    context: int = 1024,
    batch: int = 8,
    prefill_chunk: int = 512,
) -> dict:
    """{"positions", "top1_agreement", "kl_mean", "kl_max", "logit_abs_error_max",
    "logit_abs_error_mean"} of candidate against reference (KL(reference || candidate), nats)."""
    ids = encode(reference, tokenizer, text, context)
    groups = batched_windows(reference.config, ids, context, batch)
    positions = agree = 0
    kl_sum = kl_max = err_max = err_sum = 0.0
    pairs = zip(
        groups,
        window_logits(reference, groups, context, prefill_chunk),
        window_logits(candidate, groups, context, prefill_chunk),
    )
    for group, ref, cand in pairs:
        for row, window in enumerate(group):
            r, c = ref[row, : len(window)].double(), cand[row, : len(window)].double()  # (T, V)
            logp_r, logp_c = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
            kl = (logp_r.exp() * (logp_r - logp_c)).sum(-1)  # (T,)
            err = (r - c).abs()
            positions += len(window)
            agree += int((r.argmax(-1) == c.argmax(-1)).sum())
            kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
            err_sum, err_max = err_sum + float(err.mean(-1).sum()), max(err_max, float(err.max()))
    return {
        "positions": positions,
        "top1_agreement": agree / positions,
        "kl_mean": kl_sum / positions,
        "kl_max": kl_max,
        "logit_abs_error_mean": err_sum / positions,
        "logit_abs_error_max": err_max,
        "context": context,
    }
