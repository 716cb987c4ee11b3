"""Names, dtypes and symbolic shapes of the step graph's inputs and outputs, in one place.

Written into the ONNX graph by the builder and into the artifact manifest, which the runtime reads.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from mosaicrt.model.config import ModelConfig

INPUT_IDS, LENGTHS, POSITIONS, LOGITS = "input_ids", "lengths", "positions", "logits"
SMALL_FIELDS = ("s", "mx", "k_pend", "v_pend")  # constant-size state, re-emitted each step
STORE_FIELDS = ("keys", "values")  # stores: read by the graph, new pairs emitted
STATE_FIELDS = SMALL_FIELDS + STORE_FIELDS


def state_name(kind: str, layer: int, memory: str, field: str) -> str:
    """past.{l}.{M}.{field} (input), present.{l}.{M}.{field} or new.{l}.{M}.{field} (outputs)."""
    return f"{kind}.{layer}.{memory}.{field}"


def state_shapes(config: ModelConfig) -> dict[str, list]:
    """Symbolic shape of each state field. Stores are blocks: (NB, B, H, S, hs); the STM ring is
    one block of S = h-1 slots, the LTM a prefix of its blocks (NB_ltm readable blocks)."""
    H, hs = config.num_heads, config.head_dim
    return {"s": ["batch", H, hs], "mx": ["batch", H], "k_pend": ["batch", H, hs],
            "v_pend": ["batch", H, hs]}


def store_shape(memory: str, config: ModelConfig) -> list:
    H, hs = config.num_heads, config.head_dim
    if memory == "stm":
        return [1, "batch", H, config.stm_window - 1, hs]
    return ["ltm_blocks", "batch", H, "ltm_block", hs]


def graph_inputs(config: ModelConfig, dtype: int) -> list:
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "chunk"]),
              helper.make_tensor_value_info(LENGTHS, TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["batch"])]
    shapes = state_shapes(config)
    for layer in range(config.num_layers):
        for memory in config.memories:
            for field in SMALL_FIELDS:
                inputs.append(helper.make_tensor_value_info(
                    state_name("past", layer, memory, field), TensorProto.FLOAT, shapes[field]))
            for field in STORE_FIELDS:
                inputs.append(helper.make_tensor_value_info(
                    state_name("past", layer, memory, field), dtype, store_shape(memory, config)))
    return inputs


def graph_outputs(config: ModelConfig, dtype: int, last_only: bool) -> list:
    logits_shape = ["batch", config.vocab_size] if last_only else ["batch", "chunk",
                                                                  config.vocab_size]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, logits_shape)]
    shapes = state_shapes(config)
    H, hs = config.num_heads, config.head_dim
    for layer in range(config.num_layers):
        for memory in config.memories:
            for field in SMALL_FIELDS:
                outputs.append(helper.make_tensor_value_info(
                    state_name("present", layer, memory, field), TensorProto.FLOAT, shapes[field]))
            for field in STORE_FIELDS:
                outputs.append(helper.make_tensor_value_info(
                    state_name("new", layer, memory, field), TensorProto.FLOAT,
                    ["batch", "chunk", H, hs]))
    return outputs
