"""Long-context recall: held-out episodes (mosaicrt.train.episodes) answered by greedy decoding.

An episode of context L is BOS, L - 16 or so bytes of held-out filler text with four facts
`@KEY:VALUE\\n` at random line boundaries at least two STM windows before the end, and a query
`?KEY:` for one of them. The answer is right when greedy decoding gives exactly `VALUE\\n`.
Accuracy per context comes with a 95 % Wilson interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mosaicrt.errors import InputError, MosaicError
from mosaicrt.model.config import ModelConfig
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.train.corpus import load_corpus
from mosaicrt.train.episodes import WORD, RecallEpisode, recall_episode

FACTS = 4  # facts per episode: the asked one and three distractors


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def check_byte_model(config: ModelConfig, what: str) -> None:
    """Recall episodes and bits per byte need a byte-level vocabulary with a BOS token."""
    if config.vocab_size < 256 or config.bos_token_id is None or config.bos_token_id < 256:
        raise InputError(
            f"{what} needs a byte-level model (ids 0-255 are bytes, a BOS id above them); "
            f"this one has vocab_size {config.vocab_size} and bos_token_id "
            f"{config.bos_token_id}: use the demo model (`mosaicrt init DIR --preset demo`)"
        )


def recall_episodes(
    config: ModelConfig, context: int, count: int, seed: int, text: bytes | None = None
) -> list[RecallEpisode]:
    """`count` episodes of `context` tokens; the same seed gives the same episodes."""
    text = text if text is not None else load_corpus("heldout")
    rng = np.random.default_rng([seed, context])
    min_distance = 2 * config.stm_window
    if context < min_distance + FACTS * (2 * WORD + 3) + 64:
        raise InputError(
            f"a recall context of {context} tokens is too short for this model: facts must sit "
            f"{min_distance} tokens back; use at least {min_distance + 4 * (2 * WORD + 3) + 64}"
        )
    return [
        recall_episode(rng, text, context, config.bos_token_id, min_distance, FACTS)
        for _ in range(count)
    ]


@dataclass
class RecallResult:
    context: int
    episodes: int
    correct: int
    answers: list[list[int] | str]  # per episode: the tokens generated, or the error

    @property
    def accuracy(self) -> float:
        return self.correct / self.episodes

    def to_dict(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.episodes)
        return {"context": self.context, "episodes": self.episodes, "correct": self.correct,
                "accuracy": self.accuracy, "ci95": [lo, hi]}  # fmt: skip


def run_recall(
    backend: Backend,
    context: int,
    count: int,
    seed: int = 0,
    max_batch: int = 8,
    progress: bool = False,
) -> RecallResult:
    """Greedy answers of `count` held-out episodes of `context` tokens through `backend`."""
    if count < 1:
        raise InputError(f"--episodes must be >= 1, got {count}")
    check_byte_model(backend.config, "a recall test")
    episodes = recall_episodes(backend.config, context, count, seed)
    limits = RunLimits(max_batch=max_batch, max_context=context)
    outputs = generate(
        backend, [e.prompt for e in episodes], WORD + 1, limits=limits, progress=progress
    )
    answers: list[list[int] | str] = [
        str(out) if isinstance(out, MosaicError) else list(out) for out in outputs
    ]
    correct = sum(a == e.answer for a, e in zip(answers, episodes))
    return RecallResult(context, count, correct, answers)


def ablate_ltm(model) -> None:
    """Zero every layer's LTM output: the columns of out_proj that read the LTM heads."""
    import torch

    width = model.config.memory_width
    with torch.no_grad():
        for layer in model.layers:
            if "ltm" in layer.memories:
                layer.out_proj.weight[:, width:] = 0.0
