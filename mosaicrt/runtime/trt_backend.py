"""The TensorRT backend: runs an engine built by `mosaicrt build` over torch CUDA state buffers
(mosaicrt.runtime.graph_state, the layout ONNX Runtime uses), bound to the engine by address.

Before deserializing, the engine's build manifest is checked against this process: the TensorRT
flavour and version, and the GPU architecture it was built for. The mosaic plugins are registered
first (a Python plugin lives in the process, not in the engine).

Decode steps (chunk 1) run as CUDA graphs, one captured per state (that is, per batch size):
static ids, lengths and positions buffers, the state's own tensors, and the whole stores bound (the
plugins' kernels read only the pairs each position can see, so binding the capacity costs no
bandwidth and keeps every address fixed). The bookkeeping around the engine (capacity check,
writing the new pairs) stays eager.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError
from mosaicrt.export import io_spec
from mosaicrt.model.checkpoint import TORCH_DTYPES
from mosaicrt.model.config import ModelConfig
from mosaicrt.plugins.engine import read_build_manifest
from mosaicrt.runtime.backend import Backend, HostInts, whole_batch
from mosaicrt.runtime.graph_state import (
    ALIGN,
    GraphState,
    GraphStatePaging,
    allocate,
    first_nonfinite_layer,
    graph_step,
    reset_rows,
)

# What an engine's stores may hold (fp8 e4m3: their bits in int8, as the graph carries them).
STORE_DTYPES = TORCH_DTYPES | {"int8": torch.int8, "float8_e4m3fn": torch.int8}


def check_runtime(manifest: dict, engine_dir: str | Path) -> None:
    """Refuse an engine this process cannot run, saying what it was built with and what runs."""
    built = (
        f"built with {manifest['tensorrt_flavour']} {manifest['tensorrt_version']} for "
        f"{', '.join(manifest['targets'])}"
    )
    rebuild = f"rebuild it here: `mosaicrt build {manifest['artifact']} -o {engine_dir}`"
    from mosaicrt.plugins.tensorrt import load_tensorrt

    tensorrt = load_tensorrt()
    FLAVOUR = tensorrt.flavour
    running = f"this process has {FLAVOUR} {tensorrt.version}"
    if (FLAVOUR, tensorrt.version) != (manifest["tensorrt_flavour"], manifest["tensorrt_version"]):
        raise BackendError(f"{engine_dir} was {built}; {running}: {rebuild}")
    if not torch.cuda.is_available():
        raise BackendError(
            f"{engine_dir} is a TensorRT engine ({built}); running it needs a CUDA GPU and "
            "this machine has none: use --backend onnxruntime with the ONNX artifact"
        )
    major, minor = torch.cuda.get_device_capability()
    here = f"sm{major}{minor}"
    running += f" on {here}"
    if FLAVOUR == "tensorrt_rtx" and manifest["targets"][0].startswith("sm"):
        if here not in manifest["targets"]:
            raise BackendError(f"{engine_dir} was {built}; {running}: {rebuild} --target {here}")


def bind(context, name: str, tensor: torch.Tensor) -> None:
    """Bind a tensor's address to the context, or say which tensor TensorRT refused."""
    if tensor.data_ptr() % ALIGN:
        raise BackendError(f"tensor {name!r} is not {ALIGN}-byte aligned for TensorRT")
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise BackendError(f"TensorRT refused the address of tensor {name!r}")


class CapturedDecode:
    """The engine's decode profile for one state, captured as a CUDA graph over static buffers,
    on an execution context of its own (prefill steps and other states shape and bind the
    backend's main context, never this one); called with the step's feeds, it copies the
    per-step inputs in and replays."""

    def __init__(self, backend: "TrtBackend", state: GraphState, context: tuple) -> None:
        """context: (execution context, its device memory) from backend.new_context()."""
        B, device = state.batch_size, state.pos.device
        self.feeds = {
            io_spec.INPUT_IDS: torch.zeros(B, 1, dtype=torch.int64, device=device),
            io_spec.LENGTHS: torch.zeros(B, dtype=torch.int64, device=device),
            io_spec.POSITIONS: torch.zeros(B, dtype=torch.int64, device=device),
            **state.small,
            **state.stores,  # rings and pools whole: see the module docstring
        }
        # The whole block table (rows' blocks past their count are masked by the positions),
        # copied in before a replay when it changed.
        self.blocks = state.blocks
        if self.blocks is not None:
            self.blocks.take_changes()  # the copy below is current
            self.feeds[io_spec.LTM_BLOCKS] = torch.from_numpy(self.blocks.table).to(device)
        self.context, self.memory = context
        backend.run_graph(self.feeds, self.context)  # deferred work finishes before a capture
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=backend.stream):
            self.outputs = backend.run_graph(self.feeds, self.context)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in (io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS):
            self.feeds[name].copy_(feeds[name])
        if self.blocks is not None and self.blocks.take_changes():  # the table, when it moved
            self.feeds[io_spec.LTM_BLOCKS].copy_(torch.from_numpy(self.blocks.table))
        self.graph.replay()
        return self.outputs


class TrtBackend(GraphStatePaging, Backend):
    name = "tensorrt"

    def __init__(
        self, engine_dir: str | Path, device: str = "auto", cuda_graphs: bool = True
    ) -> None:
        """cuda_graphs: run decode steps as CUDA graphs (one captured per state)."""
        if device not in ("auto", "cuda") and not device.startswith("cuda"):
            raise BackendError("the TensorRT backend runs on a CUDA GPU: use --device cuda")
        self.manifest = manifest = read_build_manifest(engine_dir)
        check_runtime(manifest, engine_dir)
        from mosaicrt.plugins.tensorrt import load_tensorrt, register

        register()
        trt = load_tensorrt().module
        self.trt, self.device = trt, torch.device("cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = (Path(engine_dir) / manifest["engine_file"]).read_bytes()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise BackendError(
                f"TensorRT could not deserialize {engine_dir}/{manifest['engine_file']} (see its "
                f"log above): rebuild it with `mosaicrt build {manifest['artifact']}`"
            )
        self.context, self.memory = self.new_context()
        self.profiles: dict[int, int] = {}  # id(context) -> the profile it is set to
        self.config = ModelConfig.from_dict(manifest["config"])
        self.block, self.max_context = manifest["ltm_block"], manifest["max_context"]
        self.max_batch, self.max_chunk = manifest["max_batch"], manifest["max_chunk"]
        self.last_only_graph = bool(manifest["last_only"])
        self.store_dtype = STORE_DTYPES[manifest["state_dtype"]["stores"]]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self.torch_dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT8: torch.int8,  # int8 and fp8 stores' new pairs
        }
        self.stream = torch.cuda.Stream()
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, CapturedDecode | None] = {}  # None: that state decodes eagerly

    def new_context(self) -> tuple:
        """An execution context on device memory this backend allocates (a fixed address, as
        stream capture and TensorRT-RTX's REQUIRE_USER_ALLOCATION want), with TensorRT-RTX's
        shape-specialized kernels compiled eagerly (not lazily in the background, which a
        capture would record half-done). Returns (context, its memory)."""
        trt = self.trt
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT-RTX
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
            strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            config.dynamic_shapes_kernel_specialization_strategy = strategy
            context = self.engine.create_execution_context(config)
        else:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            context = self.engine.create_execution_context(strategy)
        if context is None:
            raise BackendError("TensorRT could not create an execution context: see its log above")
        size = self.engine.device_memory_size_v2
        memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        context.set_device_memory(memory.data_ptr(), size)
        return context, memory

    def new_state(self, batch: int, capacity: int, pool_blocks: int | None = None) -> GraphState:
        if batch > self.max_batch or capacity > self.max_context:
            raise CapacityError(
                f"{batch} sequences of {capacity} tokens exceed the engine's {self.max_batch} x "
                f"{self.max_context}: rebuild with larger --max-batch / --max-context"
            )

        def full(shape: tuple, value: float, is_store: bool) -> torch.Tensor:
            dtype = self.store_dtype if is_store else torch.float32
            return torch.full(shape, value, dtype=dtype, device=self.device)

        pos = torch.zeros(batch, dtype=torch.int64, device=self.device)
        stores = self.manifest["state_dtype"]["stores"]
        return allocate(self.config, batch, capacity, self.block, full, pos, stores, pool_blocks)

    def first_nonfinite_layer(self, state: GraphState, row: int) -> int | None:
        return first_nonfinite_layer(state, row)

    def reset(self, state: GraphState, rows: torch.Tensor) -> None:
        reset_rows(state, rows.to(self.device), rows.numpy())

    def run_graph(self, feeds: dict[str, torch.Tensor], context=None) -> dict[str, torch.Tensor]:
        """One execution of the step graph on `context` (default: the backend's main one): CUDA
        tensors by input name in, by output name out. Every shape and address is set again, so
        a context another state or chunk size used last is right for this one."""
        context = context or self.context
        chunk = feeds[io_spec.INPUT_IDS].shape[1]
        profile = 0 if chunk == 1 else 1  # the build's profiles: decode, then prefill
        if self.profiles.get(id(context)) != profile:
            if not context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise BackendError(f"TensorRT refused optimization profile {profile}")
            self.profiles[id(context)] = profile
        for name, tensor in feeds.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(
                    f"TensorRT refused the shape {tuple(tensor.shape)} of input {name!r} "
                    f"(profile {profile}): the engine was built for other limits; rebuild it"
                )
            bind(context, name, tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = self.torch_dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            bind(context, name, outputs[name])
        self.stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT failed to run the engine: see its log above")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def decode_runner(self, state: GraphState):
        """The captured decode graph of this state, made on first use; the eager run_graph when
        the context cannot be captured (said once)."""
        if id(state) not in self.graphs:
            captured = None
            context = self.new_context()  # the graph's own (context, memory)
            if hasattr(context[0], "is_stream_capturable") and not context[0].is_stream_capturable(
                self.stream.cuda_stream
            ):
                print("TensorRT says this engine's decode step cannot be captured in a CUDA "
                      "graph: decoding eagerly", file=sys.stderr)  # fmt: skip
            else:
                captured = CapturedDecode(self, state, context)
            self.graphs[id(state)] = captured
            weakref.finalize(state, self.graphs.pop, id(state), None)
        return self.graphs[id(state)] or self.run_graph

    def step(
        self,
        ids: HostInts,
        lengths: HostInts,
        state: GraphState,
        last_only: bool,
        rows: slice | None = None,
        device_logits: bool = False,  # the logits come back through the host buffer
    ) -> torch.Tensor:
        """Every row runs (TensorRT binds whole buffers); rows outside `rows` take 0 tokens."""
        full_ids, full_lengths = whole_batch(ids, lengths, rows, state.batch_size)
        logits = self._step(full_ids, full_lengths, state, last_only)
        return logits[rows] if rows is not None else logits

    def _step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: GraphState, last_only: bool
    ) -> torch.Tensor:
        C = ids.shape[1]
        if C > self.max_chunk:
            raise CapacityError(
                f"a chunk of {C} tokens exceeds the engine's --max-chunk {self.max_chunk}: "
                f"lower --prefill-chunk to {self.max_chunk} or rebuild"
            )
        run = self.decode_runner(state) if C == 1 and self.cuda_graphs else self.run_graph
        logits = graph_step(
            self.config,
            self.block,
            state,
            self.to_state(ids.numpy().astype(np.int64)),
            lengths.numpy().astype(np.int64),
            last_only,
            self.last_only_graph,
            run,
            self.to_state,
        )
        return logits.float().cpu()

    def to_state(self, array: np.ndarray) -> torch.Tensor:
        """A host int64 array as a tensor on the GPU (a host-to-device copy, no sync)."""
        return torch.as_tensor(array, dtype=torch.int64).to(self.device, non_blocking=True)
