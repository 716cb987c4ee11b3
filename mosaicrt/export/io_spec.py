"""Names, dtypes and symbolic shapes of the step graph's inputs and outputs, in one place.

Written into the ONNX graph by the builder and into the artifact manifest, which the runtime reads.
Heads of a layer's two memories travel together where their shapes agree: index [0, H) is the
STM, [H, 2H) the LTM.

    past.{l}.{s, mx, k_pend, v_pend}   -> present.{l}.{...}   (B, nM*H, hs) / (B, nM*H), fp32
    past.{l}.stm.{keys, values}        STM rings, (B, H, h-1, hs)
    past.{l}.ltm.{keys, values}        LTM pools, (P, H, S, hs): blocks of S pairs, any row's
    ltm_blocks                         (B, NB) int64: row b's LTM block i is pool block [b, i]
                                       (one table for every layer; NB: the blocks it may read)
                                       -> new.{l}.{keys, values}   (B, C, nM*H, hs) new pairs

With int8 or fp8 stores (fp8 e4m3 as their bits, in int8 tensors) every store and new-pairs
tensor has a companion of fp32 scales, one per pair and head, named with SCALE_SUFFIX:
past.{l}.{M}.{keys,values}_scale (the store's shape without hs) and new.{l}.{keys,values}_scale
(B, C, nM*H).
"""

from __future__ import annotations

from onnx import TensorProto, helper

from mosaicrt.model.config import ModelConfig

INPUT_IDS, LENGTHS, POSITIONS, LOGITS = "input_ids", "lengths", "positions", "logits"
LTM_BLOCKS = "ltm_blocks"  # the block table of the LTM pools
# Not in an artifact: the output the runtime adds to a fused last-only graph (runtime.ort_fusion
# add_row_scan), each row's greedy token, -1 where its logits are not all finite.
ROW_SCAN = "row_scan"
SMALL_FIELDS = ("s", "mx", "k_pend", "v_pend")  # constant-size state, re-emitted each step
STORE_FIELDS = ("keys", "values")  # stores: read by the graph; only new pairs are emitted
SCALE_SUFFIX = "_scale"  # int8, fp8 stores: the scales beside a store or new-pairs tensor


def scaled(store_type: int) -> bool:
    """Do stores of this element type carry scales (int8: int8 values, or the bits of fp8 e4m3
    values)?"""
    return store_type == TensorProto.INT8


def small_name(kind: str, layer: int, field: str) -> str:
    """past.{l}.{field} (input) or present.{l}.{field} (output)."""
    return f"{kind}.{layer}.{field}"


def store_name(layer: int, memory: str, field: str) -> str:
    return f"past.{layer}.{memory}.{field}"


def new_pairs_name(layer: int, field: str) -> str:
    return f"new.{layer}.{field}"


def small_shape(config: ModelConfig, field: str) -> list:
    heads = config.num_heads * len(config.memories)
    return ["batch", heads] if field == "mx" else ["batch", heads, config.head_dim]


def store_shape(config: ModelConfig, memory: str) -> list:
    """The STM: a ring of h-1 slots per row; the LTM: a pool of blocks of S pairs, read through
    the ltm_blocks table."""
    H, hs = config.num_heads, config.head_dim
    if memory == "stm":
        return ["batch", H, config.stm_window - 1, hs]
    return ["ltm_pool", H, "ltm_block", hs]


def graph_inputs(config: ModelConfig, store_type: int = TensorProto.FLOAT) -> list:
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "chunk"]),
        helper.make_tensor_value_info(LENGTHS, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["batch"]),
    ]
    if config.use_ltm:
        inputs.append(
            helper.make_tensor_value_info(LTM_BLOCKS, TensorProto.INT64, ["batch", "ltm_blocks"])
        )
    for layer in range(config.num_layers):
        for field in SMALL_FIELDS:
            inputs.append(
                helper.make_tensor_value_info(
                    small_name("past", layer, field), TensorProto.FLOAT, small_shape(config, field)
                )
            )
        for memory in config.memories:
            for field in STORE_FIELDS:
                name, shape = store_name(layer, memory, field), store_shape(config, memory)
                inputs.append(helper.make_tensor_value_info(name, store_type, shape))
                if scaled(store_type):
                    inputs.append(
                        helper.make_tensor_value_info(
                            name + SCALE_SUFFIX, TensorProto.FLOAT, shape[:-1]
                        )
                    )
    return inputs


def graph_outputs(
    config: ModelConfig, last_only: bool, store_type: int = TensorProto.FLOAT
) -> list:
    logits_shape = (
        ["batch", config.vocab_size] if last_only else ["batch", "chunk", config.vocab_size]
    )
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, logits_shape)]
    heads = config.num_heads * len(config.memories)
    for layer in range(config.num_layers):
        for field in SMALL_FIELDS:
            outputs.append(
                helper.make_tensor_value_info(
                    small_name("present", layer, field),
                    TensorProto.FLOAT,
                    small_shape(config, field),
                )
            )
        for field in STORE_FIELDS:
            name, shape = new_pairs_name(layer, field), ["batch", "chunk", heads, config.head_dim]
            outputs.append(helper.make_tensor_value_info(name, store_type, shape))
            if scaled(store_type):
                outputs.append(
                    helper.make_tensor_value_info(
                        name + SCALE_SUFFIX, TensorProto.FLOAT, shape[:-1]
                    )
                )
    return outputs


def layout(config: ModelConfig, store_type: int = TensorProto.FLOAT) -> dict:
    """The state layout, for the manifest."""
    scales = {
        "store_scales": {
            store_name("{layer}", m, "{keys,values}") + SCALE_SUFFIX: store_shape(config, m)[:-1]
            for m in config.memories
        }
    }
    return {
        "heads": "per layer, STM heads first, then LTM heads",
        "small": {small_name("past", "{layer}", f): small_shape(config, f) for f in SMALL_FIELDS},
        "stores": {
            store_name("{layer}", m, "{keys,values}"): store_shape(config, m)
            for m in config.memories
        },
        "block_table": {LTM_BLOCKS: ["batch", "ltm_blocks"]} if config.use_ltm else {},
        "new_pairs": {
            new_pairs_name("{layer}", "{keys,values}"): [
                "batch",
                "chunk",
                config.num_heads * len(config.memories),
                config.head_dim,
            ]
        },
    } | (scales if scaled(store_type) else {})
