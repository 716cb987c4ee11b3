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

import weakref
from pathlib import Path

import torch

from mosaicrt.errors import BackendError, CapacityError
from mosaicrt.export import io_spec
from mosaicrt.model.checkpoint import TORCH_DTYPES
from mosaicrt.model.config import ModelConfig
from mosaicrt.plugins.engine import read_build_manifest
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.graph_state import (
    GraphState,
    allocate,
    first_nonfinite_layer,
    graph_step,
    reset_rows,
)


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


class CapturedDecode:
    """The engine's decode profile for one state, captured as a CUDA graph over static buffers;
    called with the step's feeds, it copies the per-step inputs in and replays."""

    def __init__(self, backend: "TrtBackend", state: GraphState) -> None:
        B, device = state.batch_size, state.pos.device
        self.feeds = {
            io_spec.INPUT_IDS: torch.zeros(B, 1, dtype=torch.int64, device=device),
            io_spec.LENGTHS: torch.zeros(B, dtype=torch.int64, device=device),
            io_spec.POSITIONS: torch.zeros(B, dtype=torch.int64, device=device),
            **state.small,
            **state.stores,  # whole: see the module docstring
        }
        backend.run_graph(self.feeds)  # TensorRT finishes its deferred work before a capture
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=backend.stream):
            self.outputs = backend.run_graph(self.feeds)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in (io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS):
            self.feeds[name].copy_(feeds[name])
        self.graph.replay()
        return self.outputs


class TrtBackend(Backend):
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
        self.context = self.engine.create_execution_context()
        self.config = ModelConfig.from_dict(manifest["config"])
        self.block, self.max_context = manifest["ltm_block"], manifest["max_context"]
        self.max_batch, self.max_chunk = manifest["max_batch"], manifest["max_chunk"]
        self.last_only_graph = bool(manifest["last_only"])
        self.store_dtype = TORCH_DTYPES[manifest["state_dtype"]["stores"]]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self.torch_dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
        }
        self.stream = torch.cuda.Stream()
        self.profile = -1
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, CapturedDecode] = {}

    def new_state(self, batch: int, capacity: int) -> GraphState:
        if batch > self.max_batch or capacity > self.max_context:
            raise CapacityError(
                f"{batch} sequences of {capacity} tokens exceed the engine's {self.max_batch} x "
                f"{self.max_context}: rebuild with larger --max-batch / --max-context"
            )

        def full(shape: tuple, value: float, is_store: bool) -> torch.Tensor:
            dtype = self.store_dtype if is_store else torch.float32
            return torch.full(shape, value, dtype=dtype, device=self.device)

        pos = torch.zeros(batch, dtype=torch.int64, device=self.device)
        return allocate(self.config, batch, capacity, self.block, full, pos)

    def first_nonfinite_layer(self, state: GraphState, row: int) -> int | None:
        return first_nonfinite_layer(state, row)

    def reset(self, state: GraphState, rows: torch.Tensor) -> None:
        reset_rows(state, rows.to(self.device))

    def run_graph(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One execution of the step graph: CUDA tensors by input name in, by output name out."""
        chunk = feeds[io_spec.INPUT_IDS].shape[1]
        profile = 0 if chunk == 1 else 1  # the build's profiles: decode, then prefill
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.torch_dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT failed to run the engine: see its log above")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: GraphState, last_only: bool
    ) -> torch.Tensor:
        C = ids.shape[1]
        if C > self.max_chunk:
            raise CapacityError(
                f"a chunk of {C} tokens exceeds the engine's --max-chunk {self.max_chunk}: "
                f"lower --prefill-chunk to {self.max_chunk} or rebuild"
            )
        run = self.run_graph
        if C == 1 and self.cuda_graphs:
            run = self.graphs.get(id(state))
            if run is None:
                run = self.graphs[id(state)] = CapturedDecode(self, state)
                weakref.finalize(state, self.graphs.pop, id(state), None)
        logits = graph_step(
            self.config,
            self.block,
            state,
            ids.to(self.device, torch.int64),
            lengths.to(self.device, torch.int64),
            last_only,
            self.last_only_graph,
            run,
            lambda n: torch.arange(n, device=self.device),
        )
        return logits.float().cpu()
