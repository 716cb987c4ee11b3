"""Build the stateful step graph of an MMv2 model straight from its weights (no tracing).

One graph serves decode (C = 1) and chunked prefill (C > 1); B and C are dynamic, and each row has
its own position and number of real tokens. Per layer l the state crosses the graph boundary as
follows (names and shapes in io_spec; the two memories' heads travel together where they can):

    past.l.{s, mx, k_pend, v_pend}     ->  present.l.{s, mx, k_pend, v_pend}   small, constant size
    past.l.{stm,ltm}.{keys, values}    ->  new.l.{keys, values}                the stores

The stores are never re-emitted: the graph reads them (the runtime passes its preallocated STM
rings and LTM pool whole, and the block table of the LTM blocks that hold readable pairs) and
returns just the pairs this chunk completed, which the runtime writes in place. Copying a store in
or out of the graph on every step would cost as much as the retrieval itself.

    ids, lengths, positions
        |
    Gather(embed) -> x ---------------------------------------------------------+
        |  per layer:                                                           |
        RMSNorm -> u -> MatMul([W_phi; W_psi; W_g; W_lam]^T of both memories) -> Split
                      k~, log g, log lam -> GatedKeyScan (all heads) -> keys
                      v~ -> look-ahead values of the completed pairs
                      per memory: keys, pairs, store -> AssociativeMemory -> y_M    |
        x += MatMul([y_stm ; y_ltm], W_o^T);  x += SwiGLU(RMSNorm(x)) <-------------+
    RMSNorm -> MatMul(lm_head^T) -> logits (all positions, or the last real one per row)

All weight MatMuls keep activations on the left and a pre-transposed constant on the right, the
orientation ONNX Runtime prepacks; projections that read the same input share one MatMul. With
weight quantization each becomes a MatMulNBits (export.quantize); the embedding stays a table.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from mosaicrt.export import io_spec
from mosaicrt.export.functions import functions, plugin_attrs
from mosaicrt.export.quantize import MS_DOMAIN, WeightQuantization, quantize_weight
from mosaicrt.model.mmv2 import MMv2
from mosaicrt.onnx_graph import FLOAT, IR_VERSION, ONNX_DTYPES, OPSET, ExternalData, GraphBuilder
from mosaicrt.ops import DOMAIN, DOMAIN_VERSION
from mosaicrt.ops.associative_memory import NAME, SCALED_STORES
from mosaicrt.ops.associative_memory.onnx import e4m3_bits

# What the stores may hold, as graph element types: fp8 e4m3 pairs travel as their bits in int8
# tensors (ONNX has no Gather for fp8 types).
STORE_TYPES = ONNX_DTYPES | {"int8": TensorProto.INT8, "float8_e4m3fn": TensorProto.INT8}


EMBEDDING = "embed_tokens.weight"  # the token table: a Gather reads one row per token


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """An fp32 array in the export dtype (numpy has no bfloat16: ml_dtypes provides it)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype({"float32": np.float32, "float16": np.float16}[dtype])


class StepGraphBuilder:
    def __init__(
        self,
        model: MMv2,
        last_only: bool,
        dtype: str,
        external: ExternalData | None = None,
        quantize: WeightQuantization | None = None,
        store_dtype: str | None = None,
    ) -> None:
        self.model, self.config = model, model.config
        self.last_only = last_only
        self.dtype = dtype  # weights, their MatMuls (and by default the stores); the rest fp32
        self.store_dtype = store_dtype or dtype  # float32, float16, bfloat16, int8, float8_e4m3fn
        self.store_type = STORE_TYPES[self.store_dtype]
        self.scaled_stores = io_spec.scaled(self.store_type)  # int8, fp8: a scale per pair
        self.memory_op = SCALED_STORES[self.store_dtype][0] if self.scaled_stores else NAME
        self.quantize = quantize  # weight-only quantization of the weight MatMuls, if any
        self.g = GraphBuilder(external=external)

    def half(self) -> bool:
        return self.dtype != "float32"

    def matmul(self, x: str, weight_t: np.ndarray, name: str) -> str:
        """x @ W^T with W^T (in, out) stored as the right-hand constant, in the export dtype
        (fp32 activations are cast to it and the product back to fp32), or block-quantized."""
        g = self.g
        if self.quantize is not None:
            q = quantize_weight(weight_t, self.quantize)
            return g.op(
                "MatMulNBits",
                x,
                g.weight(f"{name}.q{self.quantize.bits}", q["packed"]),
                g.weight(f"{name}.scales", q["scales"]),
                domain=MS_DOMAIN,
                K=weight_t.shape[0],
                N=weight_t.shape[1],
                bits=self.quantize.bits,
                block_size=self.quantize.block_size,
                accuracy_level=self.quantize.accuracy_level,
            )
        w = g.weight(name, as_dtype(weight_t, self.dtype))
        if not self.half():
            return g.op("MatMul", x, w)
        return g.op(
            "Cast", g.op("MatMul", g.op("Cast", x, to=ONNX_DTYPES[self.dtype]), w), to=FLOAT
        )

    def rmsnorm(self, x: str, weight: torch.Tensor, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, in the pattern ONNX Runtime fuses into one kernel."""
        g = self.g
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.ints(-1), keepdims=1)
        rms = g.op("Sqrt", g.op("Add", ms, g.const(self.config.rms_norm_eps)))
        return g.op("Mul", g.op("Div", x, rms), g.weight(name, _np(weight)))

    def l2_normalize(self, x: str) -> str:
        g = self.g
        norm = g.op("ReduceL2", x, g.ints(-1), keepdims=1)
        return g.op("Div", x, g.op("Max", norm, g.const(self.config.key_norm_eps)))

    def last_real(self, x: str, step: dict[str, str]) -> str:
        """x (B, C, ...) at each row's last real token -> (B, ...); a row of length 0 -> index 0."""
        return self.g.op("GatherND", x, step["last"], batch_dims=1)

    def store_positions(self, kind: str, store: str, positions: str) -> str:
        """Position tau of every stored slot (NB, B, S), -1 where the slot holds no pair yet.

        STM ring (NB = 1, S = h-1): slot i holds the newest tau <= pos-2 with tau = i mod (h-1).
        LTM (NB = the block table's width): slot i of row b's block n holds tau = n*S + i when
        tau <= pos-2.
        """
        g = self.g
        last = g.unsqueeze(g.op("Sub", positions, g.const(2, np.int64)), 0, 2)  # (1, B, 1)
        S = g.dim(store, 2)
        slot = g.unsqueeze(g.arange(S), 0, 1)  # (1, 1, S)
        if kind == "stm":
            tau = g.op("Sub", last, g.op("Mod", g.op("Sub", last, slot), S))  # (1, B, S)
        else:
            nb = g.dim(io_spec.LTM_BLOCKS, 1)
            blocks = g.unsqueeze(g.op("Mul", g.arange(nb), S), 1, 2)  # (NB, 1, 1)
            tau = g.op("Add", blocks, slot)  # (NB, 1, S)
        # Broadcasting against `last` gives (NB, B, S).
        return g.op(
            "Where",
            g.op(
                "And",
                g.op("GreaterOrEqual", tau, g.const(0, np.int64)),
                g.op("LessOrEqual", tau, last),
            ),
            tau,
            g.const(-1, np.int64),
        )

    def memory_weights(self, layer: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[int]]:
        """All of a layer's memory projections as one (d, out) matrix, the per-head parameters
        (heads of all memories concatenated), and the split sizes [k~, v~, log g, lam]."""
        mems = [getattr(self.model.layers[layer], m) for m in self.config.memories]
        blocks = [
            [m.key_proj.weight for m in mems],
            [m.value_proj.weight for m in mems],
            [m.key_gate.weight for m in mems],
            [m.key_decay.weight for m in mems],
        ]
        weight_t = np.concatenate([_np(w).T for block in blocks for w in block], axis=1)
        sizes = [sum(int(w.shape[0]) for w in block) for block in blocks]
        params = {
            k: np.concatenate([_np(m.transforms()[k]) for m in mems])
            for k in ("gamma", "alpha_psi", "beta0", "beta1", "alpha")
        }
        return weight_t, params, sizes

    def memories(self, layer: int, u: str, step: dict[str, str]) -> str:
        """Both memories of one layer: keys (one scan over all heads), values, retrieval."""
        g, cfg = self.g, self.config
        H, hs, nM = cfg.num_heads, cfg.head_dim, len(cfg.memories)
        g.scope = f"layers.{layer}/"
        past = {f: io_spec.small_name("past", layer, f) for f in io_spec.SMALL_FIELDS}
        present = {f: io_spec.small_name("present", layer, f) for f in io_spec.SMALL_FIELDS}
        weight_t, p, sizes = self.memory_weights(layer)
        proj = self.matmul(u, weight_t, f"layers.{layer}.memory_proj.weight_t")
        k_raw, v_raw, log_g, lam = g.op("Split", proj, g.ints(*sizes), axis=-1, outputs=4)
        k_raw = g.reshape(k_raw, 0, 0, nM * H, hs)  # (B, C, nM*H, hs)
        v_raw = g.reshape(v_raw, 0, 0, nM * H, hs)
        log_lam = g.op("Neg", g.op("Abs", lam))  # (B, C, nM*H)
        keys, _, _ = g.op(
            "GatedKeyScan",
            k_raw,
            log_g,
            log_lam,
            step["valid"],
            past["s"],
            past["mx"],
            outputs=[g.fresh("keys"), present["s"], present["mx"]],
            domain=DOMAIN,
            name=f"/model/layers.{layer}/GatedKeyScan",
            eps=cfg.key_norm_eps,
            **plugin_attrs(),
        )
        k_pairs, v_pairs = self.new_pairs(layer, keys, v_raw, p, past, step)
        ys = self.retrievals(layer, keys, k_pairs, v_pairs, p, step)
        # Keep the last real token's key and v~ pending (rows of length 0 keep theirs).
        for field, x in (("k_pend", keys), ("v_pend", v_raw)):
            last = self.last_real(x, step)
            g.op("Where", step["has"], last, past[field], outputs=[present[field]])
        g.scope = ""
        y = ys[0] if nM == 1 else g.op("Concat", *ys, axis=2)  # (B, C, nM*H, hs)
        return g.reshape(y, 0, 0, nM * H * hs)

    def new_pairs(
        self, layer: int, keys: str, v_raw: str, p: dict, past: dict, step: dict
    ) -> tuple[str, str]:
        """The pairs this chunk completes, (B, C, nM*H, hs) each, also emitted as the graph's
        new.{layer}.{keys,values} in the export dtype: pair j is tau = pos-1+j, from the token
        before chunk token j (the pending one for j = 0) and v~ of chunk token j (eq. 9)."""
        g = self.g
        out = {name: io_spec.new_pairs_name(layer, name) for name in ("keys", "values")}
        as_is = not self.scaled_stores and self.store_type == FLOAT  # fp32 pairs: no Cast copy
        k_pairs, v_prev = (
            g.op(
                "Concat",
                g.unsqueeze(past[pending], 1),
                g.op("Slice", x, g.ints(0), step["C-1"], g.ints(1)),
                axis=1,
                outputs=[out["keys"]] if as_is and pending == "k_pend" else 1,
            )  # fmt: skip
            for pending, x in (("k_pend", keys), ("v_pend", v_raw))
        )
        gamma = p["gamma"][:, None]  # (nM*H, 1)
        mixed = g.op(
            "Add", g.op("Mul", g.const(gamma), v_prev), g.op("Mul", g.const(1 - gamma), v_raw)
        )
        v_pairs = g.op("Mul", g.const(p["alpha_psi"][:, None]), self.l2_normalize(mixed),
                       outputs=[out["values"]] if as_is else 1)  # fmt: skip
        if as_is:
            return k_pairs, v_pairs
        for name, pairs in (("keys", k_pairs), ("values", v_pairs)):  # as the stores hold them
            if self.scaled_stores:
                self.quantize_pairs(pairs, out[name], out[name] + io_spec.SCALE_SUFFIX)
            else:
                g.op("Cast", pairs, to=self.store_type, outputs=[out[name]])
        return k_pairs, v_pairs

    def quantize_pairs(self, pairs: str, out: str, out_scale: str) -> None:
        """pairs (B, C, nM*H, hs) -> int8 or fp8 `out` and fp32 `out_scale` (B, C, nM*H), one
        scale per pair and head: max|x| / 127 or / 448, int8 rounded, fp8 the bits of the nearest
        e4m3 value (ops.associative_memory.reference.quantize_pairs)."""
        g = self.g
        scale = g.op(
            "Div",
            g.op("ReduceMax", g.op("Abs", pairs), g.ints(-1), keepdims=0),
            g.const(SCALED_STORES[self.store_dtype][1]),
            outputs=[out_scale],
        )
        safe = g.op("Max", scale, g.const(np.finfo(np.float32).tiny))  # an all-zero pair: 0
        q = g.op("Div", pairs, g.unsqueeze(safe, 3))
        if self.store_dtype == "int8":
            g.op("Cast", g.op("Round", q), to=TensorProto.INT8, outputs=[out])
        else:  # fp8: the bits of the nearest e4m3 value
            e4m3_bits(g, q, out)

    def retrievals(
        self, layer: int, keys: str, k_pairs: str, v_pairs: str, p: dict, step: dict
    ) -> list[str]:
        """One AssociativeMemory node per memory, on its heads: y (B, C, H, hs) each."""
        g, cfg = self.g, self.config
        H, nM = cfg.num_heads, len(cfg.memories)
        split = g.ints(*[H] * nM)
        per_mem = [
            g.op("Split", x, split, axis=2, outputs=nM) if nM > 1 else [x]
            for x in (keys, k_pairs, v_pairs)
        ]
        ys = []
        op = self.memory_op
        for i, kind in enumerate(cfg.memories):
            mem = getattr(self.model.layers[layer], kind)
            heads = slice(i * H, (i + 1) * H)
            stores = [io_spec.store_name(layer, kind, f) for f in io_spec.STORE_FIELDS]
            scales = [s + io_spec.SCALE_SUFFIX for s in stores] if self.scaled_stores else []
            ys.append(
                g.op(
                    op,
                    per_mem[0][i],
                    step["t"],
                    *stores,
                    step[f"blocks_{kind}"],
                    step[f"tau_{kind}"],
                    per_mem[1][i],
                    per_mem[2][i],
                    step["new_tau"],
                    g.const(p["beta0"][heads]),
                    g.const(p["beta1"][heads]),
                    g.const(p["alpha"][heads]),
                    *scales,
                    domain=DOMAIN,
                    name=f"/model/layers.{layer}/{kind}/{op}",
                    window=mem.window,
                    delay=mem.delay,
                    **plugin_attrs(),
                )
            )
        return ys

    def step_inputs(self) -> dict[str, str]:
        """Everything derived from ids, lengths and positions, computed once per step."""
        g, cfg = self.g, self.config
        ids, lengths, positions = io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS
        C = g.dim(ids, 1)
        steps = g.arange(C)  # (C,)
        valid = g.op("Less", g.unsqueeze(steps, 0), g.unsqueeze(lengths, 1))  # (B, C)
        t = g.op("Add", g.unsqueeze(positions, 1), g.unsqueeze(steps, 0))  # (B, C)
        tau = g.op("Sub", t, g.const(1, np.int64))
        zero = g.const(0, np.int64)
        new_tau = g.op(
            "Where",
            g.op("And", valid, g.op("GreaterOrEqual", tau, zero)),
            tau,
            g.const(-1, np.int64),
        )  # (B, C)
        last = g.op("Max", g.op("Sub", lengths, g.const(1, np.int64)), zero)  # (B,)
        step = {
            "C-1": g.unsqueeze(g.op("Sub", C, g.const(1, np.int64)), 0),
            "valid": valid,
            "t": t,
            "new_tau": new_tau,
            "last": g.unsqueeze(last, 1),
            "has": g.unsqueeze(g.op("Greater", lengths, zero), 1, 2),
        }
        for kind in cfg.memories:
            step[f"tau_{kind}"] = self.store_positions(
                kind, io_spec.store_name(0, kind, "keys"), positions
            )
        # Block tables: an STM ring is its row's own block; the LTM reads through ltm_blocks.
        step["blocks_stm"] = g.unsqueeze(g.arange(g.dim(positions, 0)), 1)  # (B, 1)
        step["blocks_ltm"] = io_spec.LTM_BLOCKS
        return step

    def build(self) -> onnx.ModelProto:
        g, cfg, model = self.g, self.config, self.model
        step = self.step_inputs()
        safe_ids = g.op("Where", step["valid"], io_spec.INPUT_IDS, g.const(0, np.int64))
        table = as_dtype(_np(model.embed_tokens.weight), self.dtype)
        x = g.op("Gather", g.weight(EMBEDDING, table), safe_ids)  # (B, C, d)
        if self.half():
            x = g.op("Cast", x, to=FLOAT)  # the residual stream stays fp32
        f = cfg.intermediate_size
        for i, layer in enumerate(model.layers):
            u = self.rmsnorm(x, layer.memory_norm.weight, f"layers.{i}.memory_norm.weight")
            y = self.memories(i, u, step)
            x = g.op(
                "Add",
                x,
                self.matmul(y, _np(layer.out_proj.weight).T, f"layers.{i}.out_proj.weight_t"),
            )
            z = self.rmsnorm(x, layer.ffn_norm.weight, f"layers.{i}.ffn_norm.weight")
            ffn = layer.ffn
            gate_up_t = np.concatenate([_np(ffn.gate_proj.weight).T, _np(ffn.up_proj.weight).T], 1)
            gate, up = g.op(
                "Split",
                self.matmul(z, gate_up_t, f"layers.{i}.ffn.gate_up.weight_t"),
                g.ints(f, f),
                axis=-1,
                outputs=2,
            )
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # silu(gate) * up
            x = g.op(
                "Add",
                x,
                self.matmul(act, _np(ffn.down_proj.weight).T, f"layers.{i}.ffn.down_proj.weight_t"),
            )
        if self.last_only:
            x = self.last_real(x, step)  # (B, d)
        h = self.rmsnorm(x, model.norm.weight, "norm.weight")
        g.op(
            "Identity",
            self.matmul(h, _np(model.lm_head.weight).T, "lm_head.weight_t"),
            outputs=[io_spec.LOGITS],
        )
        graph = helper.make_graph(
            g.nodes,
            "mmv2_step",
            io_spec.graph_inputs(cfg, self.store_type),
            io_spec.graph_outputs(cfg, self.last_only, self.store_type),
            initializer=g.initializers,
        )
        return helper.make_model(
            graph,
            opset_imports=[
                helper.make_opsetid("", OPSET),
                helper.make_opsetid(DOMAIN, DOMAIN_VERSION),
            ]
            + ([helper.make_opsetid(MS_DOMAIN, 1)] if self.quantize else []),
            functions=functions(self.memory_op),
            ir_version=IR_VERSION,
            producer_name="mosaicrt",
        )


def build_step_model(
    model: MMv2,
    last_only: bool = False,
    dtype: str = "float32",
    external: ExternalData | None = None,
    quantize: WeightQuantization | None = None,
    store_dtype: str | None = None,
) -> onnx.ModelProto:
    """The ONNX step graph of `model`: weights, weight MatMuls and stores in `dtype` (written to
    `external` as they are made, when given); weight MatMuls block-quantized with `quantize`;
    stores in `store_dtype` when given (int8, fp8: with a scale per pair and head)."""
    return StepGraphBuilder(model, last_only, dtype, external, quantize, store_dtype).build()
