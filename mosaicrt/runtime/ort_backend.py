"""The ONNX Runtime backend: runs an exported step graph; this module owns the state buffers.

State per layer and memory, allocated once by `new_state` (numpy, fp32):
    s, mx, k_pend, v_pend   (B, H, hs) / (B, H): fed in, replaced by the graph's present.* outputs
    STM ring                (1, B, H, h-1, hs): fed whole (constant size)
    LTM store               (NB_cap, B, H, S, hs), blocks of S pairs: only the leading blocks that
                            hold readable pairs are fed, as a zero-copy view of the buffer
The graph returns the pairs each step completes; `step` writes them into the ring and the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError
from mosaicrt.export import io_spec
from mosaicrt.export.artifact import MODEL_FILE, read_manifest
from mosaicrt.runtime.backend import Backend


@dataclass
class OrtState:
    pos: np.ndarray  # (B,) int64, tokens consumed per row
    small: dict[str, np.ndarray]  # past.{l}.{M}.{s,mx,k_pend,v_pend}
    stores: dict[str, np.ndarray]  # past.{l}.{M}.{keys,values}
    capacity: int

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self, artifact: str | Path, device: str = "auto", threads: int | None = None
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed: pip install 'mosaicrt[onnx]'"
            ) from None
        self.manifest, self.config = read_manifest(artifact)
        stores = self.manifest["state_dtype"]["stores"]
        if stores == "bfloat16":
            raise BackendError(
                f"{artifact} is a bf16 artifact: ONNX Runtime's CPU provider has no "
                "bf16 MatMul; build a TensorRT engine from it, or export fp16/fp32"
            )
        self.store_dtype = {"float32": np.float32, "float16": np.float16}[stores]
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device.startswith("cuda"):
            raise BackendError(
                "--device cuda needs onnxruntime-gpu and a CUDA GPU: use --device cpu"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(Path(artifact) / MODEL_FILE), options, providers=providers
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            reason = str(exc).splitlines()[0][:300]
            raise BackendError(
                f"ONNX Runtime cannot load {artifact}/{MODEL_FILE} ({reason}): "
                "re-export the artifact with `mosaicrt export`"
            ) from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.block = int(self.manifest["ltm_block"])
        self.max_context = int(self.manifest["max_context"])
        self.last_only_graph = bool(self.manifest["last_only"])
        expected = {i.name for i in self.session.get_inputs()}
        names = {io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS} | set(self._state_names())
        if expected != names:
            missing = sorted(names - expected)[:3] + sorted(expected - names)[:3]
            raise BackendError(
                f"{artifact}: graph inputs do not match the manifest's state layout "
                f"({', '.join(missing)}): re-export the artifact"
            )

    def _state_names(self) -> list[str]:
        cfg = self.config
        return [
            io_spec.small_name("past", layer, f)
            for layer in range(cfg.num_layers)
            for f in io_spec.SMALL_FIELDS
        ] + [
            io_spec.store_name(layer, m, f)
            for layer in range(cfg.num_layers)
            for m in cfg.memories
            for f in io_spec.STORE_FIELDS
        ]

    def new_state(self, batch: int, capacity: int) -> OrtState:
        if capacity > self.max_context:
            raise CapacityError(
                f"a context of {capacity} tokens exceeds the artifact's "
                f"max_context {self.max_context}: re-export with a larger "
                "--max-context or lower --max-context here"
            )
        cfg = self.config
        H, hs, S = cfg.num_heads, cfg.head_dim, self.block
        heads = H * len(cfg.memories)
        blocks = max(1, -(-(capacity - 1) // S))
        small, stores = {}, {}
        for layer in range(cfg.num_layers):
            for field in io_spec.SMALL_FIELDS:
                shape = (batch, heads) if field == "mx" else (batch, heads, hs)
                fill = -np.inf if field == "mx" else 0.0
                small[io_spec.small_name("past", layer, field)] = np.full(shape, fill, np.float32)
            for memory in cfg.memories:
                shape = (
                    (1, batch, H, cfg.stm_window - 1, hs)
                    if memory == "stm"
                    else (blocks, batch, H, S, hs)
                )
                for field in io_spec.STORE_FIELDS:
                    name = io_spec.store_name(layer, memory, field)
                    stores[name] = np.zeros(shape, self.store_dtype)
        return OrtState(np.zeros(batch, np.int64), small, stores, capacity)

    def reset(self, state: OrtState, rows: torch.Tensor) -> None:
        rows = rows.numpy()
        state.pos[rows] = 0
        for name, array in state.small.items():
            array[rows] = -np.inf if name.endswith(".mx") else 0.0

    def readable_blocks(self, pos: np.ndarray, chunk: int) -> int:
        """LTM blocks holding a pair some query of this chunk can see: tau <= min(p-2, p+C-1-m)."""
        readable = int(
            np.clip(np.minimum(pos - 1, pos + chunk - self.config.ltm_delay), 0, None).max()
        )
        return max(1, -(-readable // self.block))

    def step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: OrtState, last_only: bool
    ) -> torch.Tensor:
        ids_np, lengths_np = ids.numpy().astype(np.int64), lengths.numpy().astype(np.int64)
        reach = state.pos + lengths_np
        if int(reach.max()) > state.capacity:
            raise CapacityError(
                f"a sequence would reach {int(reach.max())} tokens but the state "
                f"holds {state.capacity}: raise --max-context"
            )
        if not last_only and self.last_only_graph:
            raise BackendError(
                "this artifact returns last-position logits only (exported with "
                "--last-only): re-export without it to score every position"
            )
        C = ids_np.shape[1]
        nb = self.readable_blocks(state.pos, C)
        feeds = {
            io_spec.INPUT_IDS: ids_np,
            io_spec.LENGTHS: lengths_np,
            io_spec.POSITIONS: state.pos.copy(),
        }
        feeds.update(state.small)
        for name, store in state.stores.items():
            feeds[name] = store if ".stm." in name else store[:nb]  # leading blocks: a view
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        for name, array in state.small.items():
            np.copyto(array, outputs["present" + name[len("past") :]])  # small: (B, nM*H, hs)
        self._write_pairs(state, outputs, lengths_np, C)
        state.pos += lengths_np
        logits = outputs[io_spec.LOGITS]
        if last_only and not self.last_only_graph:
            logits = logits[np.arange(len(lengths_np)), np.maximum(lengths_np - 1, 0)]
        return torch.from_numpy(logits)

    def _write_pairs(
        self, state: OrtState, outputs: dict[str, np.ndarray], lengths: np.ndarray, C: int
    ) -> None:
        """Store the pairs this step completed: pair j of row b is tau = pos_b - 1 + j."""
        cfg, S = self.config, self.block
        j = np.arange(C)[None, :]
        tau = state.pos[:, None] - 1 + j  # (B, C)
        ok = (j < lengths[:, None]) & (tau >= 0)
        ring = cfg.stm_window - 1
        newest = (state.pos + lengths - 2)[:, None]
        rows = {
            "ltm": np.nonzero(ok),  # a ring keeps only its newest h-1 pairs:
            "stm": np.nonzero(ok & (tau > newest - ring)),
        }
        H = cfg.num_heads
        for layer in range(cfg.num_layers):
            for field in io_spec.STORE_FIELDS:
                new = outputs[io_spec.new_pairs_name(layer, field)]  # (B, C, nM*H, hs)
                for i, memory in enumerate(cfg.memories):
                    b, c = rows[memory]
                    if not len(b):
                        continue
                    pairs = new[b, c, i * H : (i + 1) * H]  # (n, H, hs)
                    store = state.stores[io_spec.store_name(layer, memory, field)]
                    t = tau[b, c]
                    if memory == "stm":
                        store[0, b, :, t % ring] = pairs
                    else:
                        store[t // S, b, :, t % S] = pairs
