"""What a step must read or compute: the numerators of the benchmarks' roofline fractions."""

from __future__ import annotations

from mosaicrt.model.config import ModelConfig, parameter_count


def decode_bytes(config: ModelConfig, contexts: list[int], elem: int = 4) -> int:
    """Bytes one decode step must read for sequences at these contexts: the weights (without the
    embedding table) once, plus each sequence's valid STM and LTM pairs."""
    weights = (parameter_count(config) - config.vocab_size * config.hidden_size) * elem
    pair = 2 * config.memory_width * elem * config.num_layers
    pairs = sum(
        min(t, config.stm_window - 1) + (max(0, t - config.ltm_delay + 1) if config.use_ltm else 0)
        for t in contexts
    )
    return weights + pairs * pair


def prefill_flops(config: ModelConfig, prompt_len: int) -> int:
    """2 x (non-embedding parameters) per token, plus 4 x width per visible pair per memory."""
    dense = 2 * (parameter_count(config) - config.vocab_size * config.hidden_size) * prompt_len
    pairs = sum(
        min(t, config.stm_window - 1) + (max(0, t - config.ltm_delay + 1) if config.use_ltm else 0)
        for t in range(prompt_len)
    )
    return dense + 4 * config.memory_width * config.num_layers * pairs
