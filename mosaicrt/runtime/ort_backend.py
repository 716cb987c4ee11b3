"""The ONNX Runtime backend: runs an exported step graph over numpy state buffers
(mosaicrt.runtime.graph_state): the LTM store's readable blocks are fed as a zero-copy view, and
the pairs each step completes are written into the ring and the store in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError
from mosaicrt.export import io_spec
from mosaicrt.export.artifact import MODEL_FILE, read_manifest
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.graph_state import (
    GraphState,
    allocate,
    graph_step,
    readable_blocks,
    reset_rows,
)

OrtState = GraphState  # numpy buffers


class OrtBackend(Backend):
    name = "onnxruntime"
    torch_threads = 1  # ONNX Runtime computes in its own pool; torch only keeps the books

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

        def full(shape: tuple, value: float, is_store: bool) -> np.ndarray:
            return np.full(shape, value, self.store_dtype if is_store else np.float32)

        return allocate(self.config, batch, capacity, self.block, full, np.zeros(batch, np.int64))

    def reset(self, state: OrtState, rows: torch.Tensor) -> None:
        reset_rows(state, rows.numpy())

    def readable_blocks(self, pos: np.ndarray, chunk: int) -> int:
        return readable_blocks(self.config, self.block, pos, chunk)

    def step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: OrtState, last_only: bool
    ) -> torch.Tensor:
        logits = graph_step(
            self.config,
            self.block,
            state,
            ids.numpy().astype(np.int64),
            lengths.numpy().astype(np.int64),
            last_only,
            self.last_only_graph,
            lambda feeds: dict(zip(self.output_names, self.session.run(self.output_names, feeds))),
            np.arange,
        )
        return torch.from_numpy(logits)
