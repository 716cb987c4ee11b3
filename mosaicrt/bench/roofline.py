"""What a step must read or compute: the numerators of the benchmarks' roofline fractions."""

from __future__ import annotations

from mosaicrt.model.config import DTYPE_BYTES, ModelConfig, parameter_count
from mosaicrt.model.state import pair_bytes
from mosaicrt.ops.associative_memory import SCALED_STORES


def decode_bytes(
    config: ModelConfig,
    contexts: list[int],
    store_dtype: str = "float32",
    weights: int | None = None,
) -> int:
    """Bytes one decode step must read for sequences at these contexts: the weights (without the
    embedding table) once, in the stores' dtype unless `weights` gives their bytes (quantized
    artifacts record theirs in the manifest), plus each sequence's valid STM and LTM pairs."""
    if weights is None:
        elem = DTYPE_BYTES[store_dtype] if store_dtype not in SCALED_STORES else 4
        weights = (parameter_count(config) - config.vocab_size * config.hidden_size) * elem
    pair = pair_bytes(config, store_dtype) * config.num_layers
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
