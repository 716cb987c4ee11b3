"""`mosaicrt check`: run an artifact's step graph in ONNX Runtime and the torch reference on the
same inputs and compare every output with Polygraphy's Comparator.

The inputs are real decode states: a batch of two sequences is prefilled with random tokens to
different positions (past the STM window and the LTM delay, so both stores hold pairs), then each
runner takes the same chunk (a decode step and a short prefill chunk) from that state.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mosaicrt.errors import BackendError
from mosaicrt.export import io_spec
from mosaicrt.model.checkpoint import load_model
from mosaicrt.model.state import DecodeState
from mosaicrt.ops import geometry
from mosaicrt.runtime.graph_state import reference_rows
from mosaicrt.runtime.ort_backend import OrtBackend

try:
    from polygraphy.backend.base import BaseRunner
except ImportError:  # the check needs the [onnx] extra; the CLI says so
    BaseRunner = object


class TorchReferenceRunner(BaseRunner):
    """A Polygraphy runner that feeds the step graph's inputs to the PyTorch reference."""

    def __init__(self, checkpoint: str | Path, block: int, last_only: bool) -> None:
        super().__init__(name="torch-reference", prefix="torch-runner")
        self.checkpoint, self.block, self.last_only = checkpoint, block, last_only

    def activate_impl(self) -> None:
        self.model = load_model(self.checkpoint, dtype=torch.float32)
        self.config = self.model.config

    def deactivate_impl(self) -> None:
        del self.model

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for value in io_spec.graph_inputs(self.config):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            dtype = np.int64 if value.type.tensor_type.elem_type == 7 else np.float32
            meta.add(value.name, dtype, dims)
        return meta

    def to_state(self, feed: dict[str, np.ndarray]) -> DecodeState:
        """The graph's state inputs in the reference's layout."""
        cfg, H = self.config, self.config.num_heads
        pos = feed[io_spec.POSITIONS]
        fed_slots = feed[io_spec.LTM_BLOCKS].shape[1] * self.block if cfg.use_ltm else 0
        chunk = feed[io_spec.INPUT_IDS].shape[1]
        state = DecodeState.allocate(cfg, len(pos), max(fed_slots + 1, int(pos.max()) + chunk))
        state.pos.copy_(torch.from_numpy(pos))
        state.host_pos.copy_(state.pos)
        for layer, memories in enumerate(state.memories):
            for i, (memory, st) in enumerate(memories.items()):
                for field in io_spec.SMALL_FIELDS:
                    small = torch.from_numpy(feed[io_spec.small_name("past", layer, field)])
                    getattr(st, field).copy_(small[:, i * H : (i + 1) * H])
                for field, target in (("keys", st.keys), ("values", st.vals)):
                    store = torch.from_numpy(feed[io_spec.store_name(layer, memory, field)])
                    rows = reference_rows(store, feed.get(io_spec.LTM_BLOCKS), memory)
                    target[:, : rows.shape[1]] = rows
        return state

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        state = self.to_state(feed_dict)
        pos = state.pos.clone()
        ids = torch.from_numpy(feed_dict[io_spec.INPUT_IDS])
        lengths = torch.from_numpy(feed_dict[io_spec.LENGTHS])
        with torch.no_grad():
            logits = self.model.step(ids, state, lengths, last_only=self.last_only)
        out = OrderedDict([(io_spec.LOGITS, logits.numpy())])
        ring = self.config.stm_window - 1
        tau = (pos[:, None] - 1 + torch.arange(ids.shape[1])[None, :]).clamp(min=0)  # (B, C)
        rows = torch.arange(len(pos))[:, None]
        for layer, memories in enumerate(state.memories):
            for field in io_spec.SMALL_FIELDS:
                parts = [getattr(st, field) for st in memories.values()]
                out[io_spec.small_name("present", layer, field)] = torch.cat(parts, 1).numpy()
            for field, attr in (("keys", "keys"), ("values", "vals")):
                parts = []
                for memory, st in memories.items():
                    slot = geometry.ring_slot(tau, ring) if memory == "stm" else tau
                    parts.append(getattr(st, attr)[rows, slot])  # (B, C, H, hs)
                store_dtype = feed_dict[io_spec.store_name(layer, "stm", field)].dtype
                pairs = torch.cat(parts, 2).float().numpy()
                out[io_spec.new_pairs_name(layer, field)] = pairs.astype(store_dtype)
        self.inference_time = time.perf_counter() - start
        return out


class TensorRTRunner(BaseRunner):
    """A Polygraphy runner over a mosaicrt engine (its plugins registered by the backend)."""

    def __init__(self, engine_dir: str | Path) -> None:
        super().__init__(name="tensorrt", prefix="trt-runner")
        self.engine_dir = engine_dir

    def activate_impl(self) -> None:
        from mosaicrt.runtime.trt_backend import TrtBackend

        self.backend = TrtBackend(self.engine_dir)

    def deactivate_impl(self) -> None:
        del self.backend

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for value in io_spec.graph_inputs(self.backend.config):
            meta.add(value.name, None, None)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        feeds = {k: torch.from_numpy(v).cuda() for k, v in feed_dict.items()}
        outputs = self.backend.run_graph(feeds)
        out = OrderedDict(  # numpy has no bf16: those compare as fp32
            (k, (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy())
            for k, v in outputs.items()
        )
        self.inference_time = time.perf_counter() - start
        return out


def check_inputs(backend: OrtBackend, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds at real states: two rows prefilled to different positions, then a decode step and
    a prefill chunk, each with every new pair valid (positions >= 1, no padding)."""
    cfg = backend.config
    gen = torch.Generator().manual_seed(seed)
    reach = max(cfg.stm_window, cfg.ltm_delay if cfg.use_ltm else 0) + 5
    positions = [reach, reach + 3]
    chunk = min(7, cfg.stm_window - 1)
    if positions[1] + chunk > backend.max_context:
        raise BackendError(
            f"the artifact's max_context {backend.max_context} is too small to "
            f"check states past the window and delay ({positions[1] + chunk} "
            "tokens): re-export with a larger --max-context"
        )
    feeds = []
    for C in (1, chunk):
        state = backend.new_state(2, positions[1] + C)
        for row, n in enumerate(positions):
            lengths = torch.zeros(2, dtype=torch.int64)
            lengths[row] = n
            ids = torch.randint(0, cfg.vocab_size, (2, n), generator=gen)
            backend.step(ids, lengths, state, last_only=True)
        feed = {
            io_spec.INPUT_IDS: torch.randint(0, cfg.vocab_size, (2, C), generator=gen).numpy(),
            io_spec.LENGTHS: np.full(2, C, np.int64),
            io_spec.POSITIONS: state.pos.copy(),
        }
        blocks = backend.readable_blocks(state.pos, C)
        feed.update({k: v.copy() for k, v in state.small.items()})
        feed.update({k: v.copy() for k, v in state.store_feeds(blocks, np.asarray).items()})
        feeds.append(feed)
    return feeds


def run_check(
    artifact: str | Path,
    checkpoint: str | Path,
    atol: float,
    rtol: float,
    engine: str | Path | None = None,
) -> bool:
    """Compare ONNX Runtime with the torch reference (and a TensorRT engine built from the
    artifact); True when every output is within tolerance."""
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendError(
            "mosaicrt check needs Polygraphy: pip install 'mosaicrt[onnx]'"
        ) from None
    backend = OrtBackend(artifact, device="cpu")
    feeds = check_inputs(backend)
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(Path(artifact) / "model.onnx"), providers=["cpu"])),
        TorchReferenceRunner(checkpoint, backend.block, backend.last_only_graph),
    ]
    if engine is not None:
        runners.append(TensorRTRunner(engine))
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # the per-output error report is what matters
        results = Comparator.run(runners, data_loader=feeds)
    nonfinite = nonfinite_outputs(results)
    for line in nonfinite:
        print(f"check: {line}")
    compare = SimpleCompareFunc(atol={"": atol}, rtol={"": rtol})
    return not nonfinite and bool(Comparator.compare_accuracy(results, compare_func=compare))


def nonfinite_outputs(results) -> list[str]:
    """'output X of runner Y holds NaN/inf (step i)' for every output that is not finite: such
    outputs fail the check whatever the tolerances."""
    found = []
    for runner, iterations in results:
        for step, outputs in enumerate(iterations):
            for name, array in outputs.items():
                if not np.isfinite(np.asarray(array, dtype=np.float64)).all():
                    found.append(f"output {name!r} of {runner} holds NaN or inf (step {step})")
    return found
