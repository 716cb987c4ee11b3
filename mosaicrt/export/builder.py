"""Build the stateful step graph of an MMv2 model directly from its weights (config-driven, no tracing).

One graph serves decode (C = 1) and chunked prefill (C > 1); B and C are dynamic, and each row has
its own position and number of real tokens. Per layer l and memory M the state crosses the graph
boundary as follows (names in io_spec):

    past.l.M.{s, mx, k_pend, v_pend}  ->  present.l.M.{s, mx, k_pend, v_pend}    small, constant size
    past.l.M.{keys, values}           ->  new.l.M.{keys, values}                 the stores

The stores are never re-emitted: the graph reads them (the runtime passes the STM ring whole and
only the LTM blocks that hold readable pairs, as zero-copy views of its preallocated buffers) and
returns just the pairs this chunk completed, which the runtime writes in place. Copying a store in
or out of the graph on every step would cost as much as the retrieval itself.

    ids, lengths, positions
        |
    Gather(embed) -> x ---------------------------------------------------------+
        |  per layer:                                                           |
        RMSNorm -> u -> MatMul(W_phi^T), MatMul(W_g^T), MatMul(W_lam^T) -> GatedKeyScan -> keys
                      -> MatMul(W_psi^T) -> look-ahead values of the completed pairs
                      keys, pairs, stores -> AssociativeMemory -> y_M               |
        x += MatMul([y_stm ; y_ltm], W_o^T);  x += SwiGLU(RMSNorm(x)) <-------------+
    RMSNorm -> MatMul(lm_head^T) -> logits (all positions, or the last real one per row)

All weight MatMuls keep activations on the left and a pre-transposed constant on the right, the
orientation ONNX Runtime prepacks.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from mosaicrt.export import io_spec
from mosaicrt.export.graph import FLOAT, OPSET, GraphBuilder
from mosaicrt.export.ops import DOMAIN, DOMAIN_VERSION, NO_WINDOW, functions, plugin_attrs
from mosaicrt.model.mmv2 import MMv2


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


class StepGraphBuilder:
    def __init__(self, model: MMv2, last_only: bool) -> None:
        self.model, self.config = model, model.config
        self.last_only = last_only
        self.g = GraphBuilder()

    def linear(self, x: str, weight: torch.Tensor, name: str) -> str:
        """x @ W^T with W^T stored as the right-hand constant."""
        return self.g.op("MatMul", x, self.g.weight(name, _np(weight).T))

    def rmsnorm(self, x: str, weight: torch.Tensor, name: str) -> str:
        g = self.g
        ms = g.op("ReduceMean", g.op("Mul", x, x), g.ints(-1), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(self.config.rms_norm_eps))))
        return g.op("Mul", g.op("Mul", x, inv), g.weight(name, _np(weight)))

    def l2_normalize(self, x: str) -> str:
        g = self.g
        norm = g.op("ReduceL2", x, g.ints(-1), keepdims=1)
        return g.op("Div", x, g.op("Max", norm, g.const(self.config.key_norm_eps)))

    def last_real(self, x: str, lengths: str) -> str:
        """x (B, C, ...) at each row's last real token -> (B, ...); row of length 0 -> index 0."""
        g = self.g
        idx = g.op("Max", g.op("Sub", lengths, g.const(1, np.int64)), g.const(0, np.int64))
        return g.op("GatherND", x, g.unsqueeze(idx, 1), batch_dims=1)

    def store_positions(self, kind: str, store: str, positions: str) -> str:
        """Position tau of every stored slot (NB, B, S), -1 where the slot holds no pair yet.

        STM ring (NB = 1, S = h-1): slot i holds the newest tau <= pos-2 with tau = i mod (h-1).
        LTM blocks: slot (b, i) holds tau = b*S + i when tau <= pos-2.
        """
        g = self.g
        last = g.unsqueeze(g.op("Sub", positions, g.const(2, np.int64)), 0, 2)  # (1, B, 1)
        S = g.dim(store, 3)
        slot = g.unsqueeze(g.arange(S), 0, 1)  # (1, 1, S)
        if kind == "stm":
            tau = g.op("Sub", last, g.op("Mod", g.op("Sub", last, slot), S))  # (1, B, S)
        else:
            blocks = g.unsqueeze(g.op("Mul", g.arange(g.dim(store, 0)), S), 1, 2)  # (NB, 1, 1)
            tau = g.op("Add", blocks, slot)  # (NB, 1, S)
        # Broadcasting against `last` gives (NB, B, S).
        return g.op("Where", g.op("And", g.op("GreaterOrEqual", tau, g.const(0, np.int64)),
                                  g.op("LessOrEqual", tau, last)), tau, g.const(-1, np.int64))

    def memory(self, layer: int, kind: str, u: str, step: dict[str, str]) -> str:
        """One memory of one layer: keys, values, retrieval; declares its state I/O."""
        g, cfg = self.g, self.config
        mem = getattr(self.model.layers[layer], kind)
        H, hs = cfg.num_heads, cfg.head_dim
        prefix = f"layers.{layer}.{kind}"
        g.scope = f"{prefix}/"
        past = {f: io_spec.state_name("past", layer, kind, f) for f in io_spec.STATE_FIELDS}
        present = {f: io_spec.state_name("present", layer, kind, f) for f in io_spec.SMALL_FIELDS}
        new = {f: io_spec.state_name("new", layer, kind, f) for f in io_spec.STORE_FIELDS}

        k_raw = g.reshape(self.linear(u, mem.key_proj.weight, f"{prefix}.key_proj.weight_t"),
                          0, 0, H, hs)  # (B, C, H, hs)
        log_g = self.linear(u, mem.key_gate.weight, f"{prefix}.key_gate.weight_t")  # (B, C, H)
        log_lam = g.op("Neg", g.op("Abs", self.linear(u, mem.key_decay.weight,
                                                      f"{prefix}.key_decay.weight_t")))
        keys, _, _ = g.op("GatedKeyScan", k_raw, log_g, log_lam, step["valid"], past["s"],
                          past["mx"], outputs=[g.fresh("keys"), present["s"], present["mx"]],
                          domain=DOMAIN, name=f"/model/{prefix}/GatedKeyScan",
                          eps=cfg.key_norm_eps, **plugin_attrs())

        # Pairs completed by this chunk: pair j is tau = pos-1+j, from the token before chunk
        # token j (the pending one for j = 0) and v~ of chunk token j (eq. 9's look-ahead).
        v_raw = g.reshape(self.linear(u, mem.value_proj.weight, f"{prefix}.value_proj.weight_t"),
                          0, 0, H, hs)  # (B, C, H, hs)
        C = step["C"]
        before = g.op("Sub", C, g.const(1, np.int64))
        head = g.ints(0)
        k_pairs = g.op("Concat", g.unsqueeze(past["k_pend"], 1),
                       g.op("Slice", keys, head, g.unsqueeze(before, 0), g.ints(1)), axis=1)
        v_prev = g.op("Concat", g.unsqueeze(past["v_pend"], 1),
                      g.op("Slice", v_raw, head, g.unsqueeze(before, 0), g.ints(1)), axis=1)
        p = {k: _np(v) for k, v in mem.transforms().items()}
        gamma = g.const(p["gamma"][:, None])  # (H, 1)
        mixed = g.op("Add", g.op("Mul", gamma, v_prev),
                     g.op("Mul", g.const(1 - p["gamma"][:, None]), v_raw))
        v_pairs = g.op("Mul", g.const(p["alpha_psi"][:, None]), self.l2_normalize(mixed))
        g.op("Identity", k_pairs, outputs=[new["keys"]])
        g.op("Identity", v_pairs, outputs=[new["values"]])

        window, delay = (cfg.stm_window, 1) if kind == "stm" else (NO_WINDOW, cfg.ltm_delay)
        store_tau = self.store_positions(kind, past["keys"], step["positions"])
        y = g.op("AssociativeMemory", keys, step["t"], past["keys"], past["values"], store_tau,
                 k_pairs, v_pairs, step["new_tau"], g.const(p["beta0"]), g.const(p["beta1"]),
                 g.const(p["alpha"]), domain=DOMAIN, name=f"/model/{prefix}/AssociativeMemory",
                 kind=kind, window=window, delay=delay, **plugin_attrs())

        # Keep the last real token's key and v~ pending (rows of length 0 keep theirs).
        has = g.unsqueeze(g.op("Greater", step["lengths"], g.const(0, np.int64)), 1, 2)
        g.op("Where", has, self.last_real(keys, step["lengths"]), past["k_pend"],
             outputs=[present["k_pend"]])
        g.op("Where", has, self.last_real(v_raw, step["lengths"]), past["v_pend"],
             outputs=[present["v_pend"]])
        g.scope = ""
        return g.reshape(y, 0, 0, H * hs)  # (B, C, H*hs)

    def build(self) -> onnx.ModelProto:
        g, cfg, model = self.g, self.config, self.model
        ids, lengths, positions = io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS
        C = g.dim(ids, 1)
        steps = g.arange(C)  # (C,)
        valid = g.op("Less", g.unsqueeze(steps, 0), g.unsqueeze(lengths, 1))  # (B, C)
        t = g.op("Add", g.unsqueeze(positions, 1), g.unsqueeze(steps, 0))  # (B, C)
        tau = g.op("Sub", t, g.const(1, np.int64))
        new_tau = g.op("Where", g.op("And", valid, g.op("GreaterOrEqual", tau, g.const(0, np.int64))),
                       tau, g.const(-1, np.int64))  # (B, C)
        step = {"C": C, "valid": valid, "t": t, "new_tau": new_tau, "lengths": lengths,
                "positions": positions}

        safe_ids = g.op("Where", valid, ids, g.const(0, np.int64))
        x = g.op("Gather", g.weight("embed_tokens.weight", _np(model.embed_tokens.weight)), safe_ids)
        for i, layer in enumerate(model.layers):
            u = self.rmsnorm(x, layer.memory_norm.weight, f"layers.{i}.memory_norm.weight")
            ys = [self.memory(i, kind, u, step) for kind in cfg.memories]
            y = ys[0] if len(ys) == 1 else g.op("Concat", *ys, axis=-1)
            x = g.op("Add", x, self.linear(y, layer.out_proj.weight, f"layers.{i}.out_proj.weight_t"))
            z = self.rmsnorm(x, layer.ffn_norm.weight, f"layers.{i}.ffn_norm.weight")
            f = layer.ffn
            gate = self.linear(z, f.gate_proj.weight, f"layers.{i}.ffn.gate_proj.weight_t")
            act = g.op("Mul", gate, g.op("Sigmoid", gate))  # silu
            up = self.linear(z, f.up_proj.weight, f"layers.{i}.ffn.up_proj.weight_t")
            x = g.op("Add", x, self.linear(g.op("Mul", act, up), f.down_proj.weight,
                                           f"layers.{i}.ffn.down_proj.weight_t"))
        if self.last_only:
            x = self.last_real(x, lengths)  # (B, d)
        h = self.rmsnorm(x, model.norm.weight, "norm.weight")
        g.op("MatMul", h, g.weight("lm_head.weight_t", _np(model.lm_head.weight).T),
             outputs=[io_spec.LOGITS])
        graph = helper.make_graph(g.nodes, "mmv2_step", io_spec.graph_inputs(cfg, FLOAT),
                                  io_spec.graph_outputs(cfg, FLOAT, self.last_only),
                                  initializer=g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                       helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                                 functions=functions(), ir_version=9,
                                 producer_name="mosaicrt")


def build_step_model(model: MMv2, last_only: bool = False) -> onnx.ModelProto:
    """The ONNX step graph of `model` (fp32)."""
    return StepGraphBuilder(model, last_only).build()
