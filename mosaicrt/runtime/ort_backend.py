"""The ONNX Runtime backend: runs an exported step graph over state buffers allocated once
(mosaicrt.runtime.graph_state): the rings and the LTM pool are fed whole with the block table of
the readable blocks, and the pairs each step completes are written into the ring and the pool
in place.

On the CPU provider the state is numpy arrays, fed by value (ONNX Runtime wraps them without a
copy). With the CUDA provider the state is torch tensors on the GPU, bound to the graph by
pointer (IOBinding) together with preallocated output buffers, so no step moves state between
host and device; the same binding path runs on the CPU with `io_binding=True` (the tests).
"""

from __future__ import annotations

import os
import time
import weakref
from collections import ChainMap
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError, CheckpointError
from mosaicrt.export import io_spec
from mosaicrt.export.artifact import MODEL_FILE, read_manifest
from mosaicrt.export.builder import STORE_TYPES
from mosaicrt.ops import geometry
from mosaicrt.runtime.backend import Backend, HostInts, Logits
from mosaicrt.runtime.graph_state import (
    ALIGN,
    STACKED_NEW_PAIRS,
    STACKED_NEW_SCALES,
    STACKED_PRESENT,
    GraphState,
    GraphStatePaging,
    address,
    allocate,
    carve,
    first_nonfinite_layer,
    graph_step,
    reset_rows,
    small_layout,
)
from mosaicrt.runtime.huge_pages import collapse_new_memory
from mosaicrt.runtime.huge_pages import full as full_on_huge_pages

if TYPE_CHECKING:
    import onnx

OrtState = GraphState  # numpy buffers, or torch tensors on the device with IOBinding
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                torch.int8: np.int8}  # fmt: skip
# What the stores are held in: fp8 e4m3 pairs as their bits in int8, as the graph carries them.
STORE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8,
                "float8_e4m3fn": np.int8}  # fmt: skip
TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
               "tensor(int8)": torch.int8, "tensor(int64)": torch.int64}  # fmt: skip


ORT_OPS = ("auto", "fused", "native", "functions")
DETACHED_BYTES = 4096  # weights this large reach a rewritten graph's session as OrtValues
STAGED_SHAPES = 16  # ids and lengths buffers kept, a decode step's and a few prefill chunks


def session_options(
    threads: int | None = None, library: Path | None = None, append_pairs: bool = False
):
    """The session options every step graph runs with: all graph optimizations, `threads` for
    the operators (default: one per core), one graph node at a time, and the native library of
    the mosaic ops when given (its kernels replace the ops' function bodies; append_pairs: its
    retrieval also writes the new pairs into fp32/fp16 stores, ort_library.APPEND_PAIRS)."""
    import onnxruntime as ort

    from mosaicrt.ops.ort_library import APPEND_PAIRS

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    # The pool's threads stop spinning when a run returns: spinning on between runs they take
    # the cores from whatever runs next (the bookkeeping's threads, another session or process).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if library is not None:
        if append_pairs:  # read by the library as it registers its kernels
            options.add_session_config_entry(APPEND_PAIRS, "1")
        options.register_custom_ops_library(str(library))
    return options


def runnable_stores(manifest: dict, artifact: str | Path) -> str:
    """The artifact's store dtype, refused where ONNX Runtime's CPU provider cannot run it."""
    stores = manifest["state_dtype"]["stores"]
    if stores == "bfloat16":
        raise BackendError(
            f"{artifact} is a bf16 artifact: ONNX Runtime's CPU provider has no "
            "bf16 MatMul; build a TensorRT engine from it, or export fp16/fp32"
        )
    return stores


def native_ops_library(ort_ops: str, providers: list[str]) -> Path | None:
    """The native mosaic-ops library to register: for `fused` and `native` (required), or `auto`
    (when it is built for this machine and the session runs on the CPU); None runs the function
    bodies."""
    from mosaicrt.ops import ort_library

    if ort_ops not in ORT_OPS:
        raise BackendError(f"unknown --ort-ops {ort_ops!r}: choose one of {', '.join(ORT_OPS)}")
    if ort_ops == "functions" or (ort_ops == "auto" and providers[0] != "CPUExecutionProvider"):
        return None
    library = ort_library.find_library()
    usable = library is not None and ort_library.supported_by_runtime()
    if ort_ops != "auto" and library is None:
        raise BackendError(
            f"--ort-ops {ort_ops}: the native ONNX Runtime ops are not built for this machine: "
            "run `mosaicrt ort-ops build`, or use --ort-ops functions"
        )
    if ort_ops != "auto" and not usable:
        raise BackendError(
            f"--ort-ops {ort_ops} needs onnxruntime >= 1.{ort_library.HEADERS_API}: upgrade it, "
            "or use --ort-ops functions"
        )
    return library if usable else None


def wanted_providers(device: str) -> list[str]:
    """The providers to ask for: CUDA first where onnxruntime-gpu and a GPU are there."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    if device in ("auto", "cuda") and cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise BackendError("--device cuda needs onnxruntime-gpu and a CUDA GPU: use --device cpu")
    return ["CPUExecutionProvider"]


def open_session(
    artifact: str | Path,
    threads: int | None,
    providers: list[str],
    library: Path | None = None,
    append_pairs: bool = False,
    fused: onnx.ModelProto | None = None,
    huge_pages: bool = True,
):
    """The artifact's session, or (fused) one of that rewrite of its graph (ort_fusion); with
    huge_pages, the memory it maps as it loads moved onto huge pages (runtime.huge_pages)."""
    import onnxruntime as ort

    model_file = Path(artifact) / MODEL_FILE
    options = session_options(threads, library, append_pairs)
    source: str | bytes = str(model_file)
    if fused is not None:  # its external data, if any, next to the artifact's graph
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model_file.parent)
        )
        weights = detach_weights(fused)  # alive until the session has copied them
        options.add_external_initializers(*weights)
        source = fused.SerializeToString()
    try:
        # (the weights ONNX Runtime packs for its MatMuls)
        with collapse_new_memory() if huge_pages else nullcontext():
            return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types
        reason = str(exc).splitlines()[0][:300]
        raise BackendError(
            f"ONNX Runtime cannot load {artifact}/{MODEL_FILE} ({reason}): "
            "re-export the artifact with `mosaicrt export`"
        ) from None


def detach_weights(model: onnx.ModelProto) -> tuple[list[str], list]:
    """The weights held in `model` itself, moved out: each becomes an external-data reference
    that the returned (names, OrtValues) fill (SessionOptions.add_external_initializers), so that
    a graph rewritten in memory reaches ONNX Runtime without its weights serialized again."""
    import onnxruntime as ort
    from onnx import external_data_helper, helper

    names, values = [], []
    for tensor in model.graph.initializer:
        raw = tensor.raw_data  # a copy of the bytes (b"" for data held elsewhere): read once
        if len(raw) < DETACHED_BYTES:
            continue
        array = np.frombuffer(raw, helper.tensor_dtype_to_np_dtype(tensor.data_type))
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array.reshape(tuple(tensor.dims))))
        external_data_helper.set_external_data(tensor, "detached", 0, len(raw))
        tensor.ClearField("raw_data")
    return names, values


def fused_graph(
    graph: onnx.ModelProto, config, ort_ops: str, artifact: str | Path
) -> onnx.ModelProto | None:
    """The artifact's graph with each layer's memory nodes one LayerMemories node, each
    feed-forward's activation one SwiGLU node, each residual Add with the RMSNorm after it one
    SkipSimplifiedLayerNormalization, and a last-only graph's logits scanned by one RowScan
    (rewritten in place), for --ort-ops `fused` or `auto`; None where the graph does not allow
    it, which `fused` refuses with the reason."""
    from mosaicrt.runtime import ort_fusion

    why = ort_fusion.fuse_layer_memories(graph, config.num_layers, config.memories)
    if not why:
        ort_fusion.fuse_swiglu(graph)
        ort_fusion.fuse_skip_norms(graph)
        ort_fusion.add_row_scan(graph)
    if why and ort_ops == "fused":
        raise BackendError(
            f"--ort-ops fused: {artifact} cannot run its layers' memories as one native node "
            f"({why}): use --ort-ops native"
        )
    return None if why else graph


def read_graph(model_file: Path, weights: bool) -> onnx.ModelProto:
    """An artifact's graph, with its external weights too when asked; a missing, truncated or
    corrupt file is a CheckpointError."""
    import onnx

    try:
        return onnx.load(str(model_file), load_external_data=weights)
    except Exception as exc:  # protobuf's DecodeError, a missing or short external data file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{model_file} cannot be read ({reason}): re-export the artifact with `mosaicrt export`"
        ) from None


def check_graph_weights(model_file: Path) -> onnx.ModelProto:
    """Every weight of the graph (external data included) is finite, or a CheckpointError names
    the first that is not. A missing or truncated file is a CheckpointError too. Returns the
    graph, its weights loaded."""
    from onnx import numpy_helper

    from mosaicrt.model.checkpoint import check_finite_tensors

    model = read_graph(model_file, weights=True)
    arrays = ((t.name, numpy_helper.to_array(t)) for t in model.graph.initializer)
    check_finite_tensors(arrays, model_file)
    return model


@dataclass
class HostBinding:
    """A state's IOBinding on the CPU: the inputs bound to it by name (bound by address, so kept
    alive here), which set of the backend's output buffers is bound to it (0: none), and the
    state's buffers once they are bound."""

    binding: Any
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: int = 0
    buffers: dict | None = None  # the state's buffers, once bound
    copied: list[str] = field(default_factory=list)  # those bound as copies, again each step

    def bind_input(self, name: str, array: np.ndarray) -> bool:
        """Bind `array` by address (a contiguous copy of it if it is not: False)."""
        contiguous = array.flags.c_contiguous
        if not contiguous:
            array = np.ascontiguousarray(array)
        self.binding.bind_input(name, "cpu", 0, array.dtype.type, list(array.shape),
                                array.ctypes.data)  # fmt: skip
        self.inputs[name] = array  # bound by address: kept alive while it is bound
        return contiguous


def stacked_buffers(
    shapes: dict, names: list[str], stacked_name: str, empty: Callable = np.empty
) -> dict[str, np.ndarray]:
    """One buffer (len(names), *shape) whose slices are the outputs `names` (all one shape), so
    that a run writes them already stacked; under stacked_name too."""
    shape, dtype = shapes[names[0]]
    stacked = empty([len(names), *shape], dtype)  # written in place by the run
    return {name: stacked[i] for i, name in enumerate(names)} | {stacked_name: stacked}


class OutputArena:
    """The CPU path's output buffers, carved from one buffer that only grows: a new (batch,
    chunk) shape's outputs take the memory of the last shape's, so that going from a prefill
    chunk's large outputs to a decode step's small ones and back frees and faults in nothing
    (freeing a 512-token chunk's few hundred MB, then touching them again at the next prefill,
    cost more than a decode step). It keeps the largest shape's outputs allocated: the peak that
    shape's steps needed anyway."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, np.uint8)
        self.used = 0

    def restart(self, nbytes: int) -> None:
        """Carve anew, `nbytes` at most (ALIGN padding included): the earlier views are reused."""
        if nbytes > self.buffer.nbytes:
            self.buffer = np.empty(nbytes, np.uint8)
        self.used = 0

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialized array of `shape` starting on an ALIGN-byte boundary."""
        start = self.used + (-(address(self.buffer) + self.used) % ALIGN)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if start + nbytes > self.buffer.nbytes:
            raise RuntimeError("OutputArena: restart() was given too few bytes")
        self.used = start + nbytes
        return self.buffer[start : self.used].view(dtype).reshape(shape)


class OrtBackend(GraphStatePaging, Backend):
    name = "onnxruntime"
    torch_threads = 1  # ONNX Runtime computes in its own pool; torch only keeps the books

    def __init__(
        self,
        artifact: str | Path,
        device: str = "auto",
        threads: int | None = None,
        io_binding: bool | None = None,
        check_weights: bool = True,
        providers: list[str] | None = None,
        ort_ops: str = "auto",
        pairs_in_run: bool = True,
        present_in_run: bool = True,
        huge_pages: bool = True,
    ) -> None:
        """device: auto (the CUDA provider when onnxruntime-gpu and a GPU are there), cpu or
        cuda. io_binding: state as device tensors bound by pointer (default: on CUDA only).
        check_weights: refuse weights that hold NaN or inf. providers: ask ONNX Runtime for
        these instead (the device is the one the session runs on, whatever was asked).
        ort_ops: the mosaic ops as native kernels, each layer's memory nodes as one (fused); the
        ops' kernels alone (native); their function bodies (functions); or the first of these
        that the library built for this machine, the provider (the CPU) and the graph allow (auto).
        pairs_in_run: let the native retrieval write each step's new pairs into fp32/fp16
        stores (False: the runtime writes them after the run, as for the function bodies).
        present_in_run: let the fused layers write the recurrence state over the past (False:
        the runtime copies it after the run, as on every other path). huge_pages: the weights
        and the state on huge pages where the OS has them (runtime.huge_pages; CPU only)."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed: pip install 'mosaicrt[onnx]'"
            ) from None
        self.manifest, self.config = read_manifest(artifact)
        stores = runnable_stores(self.manifest, artifact)
        self.store_dtype = STORE_DTYPES[stores]
        self.store_type = STORE_TYPES[stores]
        model_file = Path(artifact) / MODEL_FILE
        graph = check_graph_weights(model_file) if check_weights else None
        providers = providers or wanted_providers(device)
        library = native_ops_library(ort_ops, providers)
        fused = None
        if library is not None and ort_ops in ("auto", "fused"):
            graph = read_graph(model_file, weights=False) if graph is None else graph
            fused = fused_graph(graph, self.config, ort_ops, artifact)
        self.ort_ops = "fused" if fused is not None else "native" if library else "functions"
        # The native retrieval writes each step's new pairs into fp32/fp16 stores in place (the
        # state's buffers are bound by address); int8/fp8 pairs are quantized by the graph, and
        # the runtime writes those.
        self.pairs_in_run = (
            pairs_in_run and library is not None and stores in ("float32", "float16")
        )
        self.huge_pages = huge_pages and providers[0] == "CPUExecutionProvider"  # host memory
        self.session = open_session(
            artifact, threads, providers, library, self.pairs_in_run, fused, self.huge_pages
        )
        # ONNX Runtime falls back to the CPU when a provider fails to load (missing CUDA
        # libraries): the state goes where the session really runs.
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if device.startswith("cuda") and not on_cuda:
            raise BackendError(
                "--device cuda: ONNX Runtime could not start its CUDA provider (see its log "
                "above: CUDA or cuDNN libraries): fix that, or use --device cpu"
            )
        self.device = torch.device("cuda" if on_cuda else "cpu")
        self.io_binding = self.device.type == "cuda" if io_binding is None else io_binding
        # (the fused layers' kernel, through the CPU path's binding: no copy after the run)
        self.present_in_run = present_in_run and self.ort_ops == "fused" and not self.io_binding
        self.output_specs = {
            o.name: (o.shape, TORCH_TYPES[o.type]) for o in self.session.get_outputs()
        }
        self.run_seconds: list[float] | None = None  # a list: each session.run's time is added
        # The CPU path's IOBindings, one per state (a view of some rows is a state of its own), and
        # the last (batch, chunk)'s outputs from the arena: (shape, buffers by name, sets before).
        self.host_bindings: dict[int, HostBinding] = {}
        self.outputs: tuple[tuple[int, int] | None, dict, int] = (None, {}, 0)
        self.arena = OutputArena()
        self.staging: dict[tuple, np.ndarray] = {}  # ids and lengths, by input name and shape
        self.block = int(self.manifest["ltm_block"])
        self.max_context = int(self.manifest["max_context"])
        self.last_only_graph = bool(self.manifest["last_only"])
        self.check_graph(artifact)

    def check_graph(self, artifact: str | Path) -> None:
        """The graph's inputs and outputs are the ones the config and manifest describe."""
        found = {i.name: i.shape for i in self.session.get_inputs()}
        names = {io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS} | set(self._state_names())
        if set(found) != names:
            missing = sorted(names - set(found))[:3] + sorted(set(found) - names)[:3]
            raise BackendError(
                f"{artifact}: graph inputs do not match the manifest's state layout "
                f"({', '.join(missing)}): re-export the artifact"
            )
        expected = {
            v.name: v.type.tensor_type.shape
            for v in io_spec.graph_inputs(self.config, self.store_type)
        }
        expected_outputs = io_spec.graph_outputs(self.config, self.last_only_graph, self.store_type)
        expected.update({v.name: v.type.tensor_type.shape for v in expected_outputs})
        found.update({o.name: o.shape for o in self.session.get_outputs()})
        for name, shape in expected.items():
            dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
            got = found.get(name)
            if (
                got is None
                or len(got) != len(dims)
                or any(d is not None and g != d for d, g in zip(dims, got))
            ):
                raise BackendError(
                    f"{artifact}: its config.json does not match its graph ({name} has shape "
                    f"{got}, the config implies {[d or '?' for d in dims]}): re-export the artifact"
                )

    def _state_names(self) -> list[str]:
        names = [v.name for v in io_spec.graph_inputs(self.config, self.store_type)]
        return [
            n for n in names if n not in (io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS)
        ]

    def new_state(self, batch: int, capacity: int, pool_blocks: int | None = None) -> OrtState:
        if capacity > self.max_context:
            raise CapacityError(
                f"a context of {capacity} tokens exceeds the artifact's "
                f"max_context {self.max_context}: re-export with a larger "
                "--max-context or lower --max-context here"
            )

        full: Callable[[tuple, float, bool], Any]
        if self.io_binding:
            store = next(t for t, np_t in NUMPY_DTYPES.items() if np_t == self.store_dtype)
            dtypes = {True: store, False: torch.float32}
            full = lambda shape, value, is_store: torch.full(  # noqa: E731
                shape, value, dtype=dtypes[is_store], device=self.device
            )
            pos = torch.zeros(batch, dtype=torch.int64, device=self.device)
        else:
            host_full = full_on_huge_pages if self.huge_pages else np.full
            full = lambda shape, value, is_store: host_full(  # noqa: E731
                shape, value, self.store_dtype if is_store else np.float32
            )
            pos = np.zeros(batch, np.int64)
        stores = self.manifest["state_dtype"]["stores"]
        return allocate(self.config, batch, capacity, self.block, full, pos, stores, pool_blocks)

    def first_nonfinite_layer(self, state: GraphState, row: int) -> int | None:
        return first_nonfinite_layer(state, row)

    def reset(self, state: OrtState, rows: torch.Tensor) -> None:
        host = rows.numpy()
        reset_rows(state, rows.to(self.device) if self.io_binding else host, host)

    def readable_blocks(self, pos: np.ndarray, chunk: int) -> int:
        return geometry.readable_blocks(pos, chunk, self.config.ltm_delay, self.block)

    def run_bound(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One run with every input and output bound by pointer: tensors on self.device by
        input name in, freshly allocated ones by output name out."""
        binding = self.session.io_binding()
        where = (self.device.type, self.device.index or 0)
        kept = []  # what is bound, alive until the run ends
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            kept.append(tensor)
            binding.bind_input(name, *where, NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape),
                               tensor.data_ptr())  # fmt: skip
        dims = {
            "batch": feeds[io_spec.INPUT_IDS].shape[0],
            "chunk": feeds[io_spec.INPUT_IDS].shape[1],
        }
        outputs = {}
        for name, (shape, dtype) in self.output_specs.items():
            tensor = torch.empty([dims.get(d, d) for d in shape], dtype=dtype, device=self.device)
            binding.bind_output(name, *where, NUMPY_DTYPES[dtype], tuple(tensor.shape),
                                tensor.data_ptr())  # fmt: skip
            outputs[name] = tensor
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the inputs are written
        self.session.run_with_iobinding(binding)  # returns when the outputs are written
        return outputs

    def host_binding(self, state: OrtState) -> HostBinding:
        """The IOBinding of `state`'s steps, kept while the state lives: its buffers stay bound
        from step to step, also when steps take turns between states (or views of rows)."""
        key = id(state)
        found = self.host_bindings.get(key)
        if found is None:
            found = self.host_bindings[key] = HostBinding(self.session.io_binding())
            weakref.finalize(state, self.host_bindings.pop, key, None)
        return found

    def run_numpy(self, host: HostBinding, feeds: ChainMap) -> dict[str, np.ndarray]:
        """One run with numpy arrays by input name in (feeds.maps: this step's inputs, the
        state's buffers), by output name out, through the state's IOBinding: the state's buffers
        are bound on its first step, a step's input again only when its buffer moved, and the
        outputs go to buffers allocated once per (batch, chunk) shape. The outputs are those
        buffers, valid until the next step."""
        step_feeds, buffers = feeds.maps
        binding = host.binding
        if host.buffers is not buffers:  # the state's first step
            host.copied = [name for name, array in buffers.items()
                           if not host.bind_input(name, array)]  # fmt: skip
            host.buffers = buffers
            if self.present_in_run:
                self.bind_present_over_past(host)
        for name in host.copied:  # (none: allocate makes every buffer contiguous)
            host.bind_input(name, buffers[name])
        for name, array in step_feeds.items():
            if host.inputs.get(name) is not array:  # ids, lengths: the same, step after step
                host.bind_input(name, array)
        outputs = self.cpu_outputs(*feeds[io_spec.INPUT_IDS].shape)
        if host.outputs != self.outputs[2]:  # bound to an older set, freed since
            for name in self.output_specs:
                if self.present_in_run and name.startswith("present."):  # bound to the state
                    continue
                array = outputs[name]
                binding.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape),
                                    array.ctypes.data)  # fmt: skip
            host.outputs = self.outputs[2]
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        if self.run_seconds is not None:
            self.run_seconds.append(time.perf_counter() - start)
        return outputs

    def bind_present_over_past(self, host: HostBinding) -> None:
        """Bind each present.* output to its past.* input's buffer, so that the run updates the
        state in place (present_in_run)."""
        for name, _ in small_layout(self.config, 0, "past"):
            array = host.buffers[name]
            if name in host.copied:  # a copy is bound: the run would not write the state
                raise BackendError(
                    f"the state buffer {name} is not contiguous, so the run cannot update it "
                    "in place: allocate the state with new_state"
                )
            host.binding.bind_output("present" + name[len("past") :], "cpu", 0,
                                     array.dtype.type, list(array.shape),
                                     array.ctypes.data)  # fmt: skip

    def cpu_outputs(self, batch: int, chunk: int) -> dict[str, np.ndarray]:
        """The output buffers of a (batch, chunk) step: those of the last step if it had this
        shape (a new shape's replace them: a prefill chunk's are large)."""
        if self.outputs[0] != (batch, chunk):
            dims = {"batch": batch, "chunk": chunk}
            shapes = {name: ([dims.get(d, d) for d in shape], NUMPY_DTYPES[dtype])
                      for name, (shape, dtype) in self.output_specs.items()}  # fmt: skip
            # every output, each aligned, and the stacks and carved block that hold some of them
            self.arena.restart(sum(int(np.prod(shape)) * np.dtype(dtype).itemsize + ALIGN
                                   for shape, dtype in shapes.values()) + 8 * ALIGN)  # fmt: skip
            empty, cfg = self.arena.empty, self.config
            pair_names = [io_spec.new_pairs_name(layer, f) for layer in range(cfg.num_layers)
                          for f in io_spec.STORE_FIELDS]  # fmt: skip
            buffers = stacked_buffers(shapes, pair_names, STACKED_NEW_PAIRS, empty)
            full = lambda shape, value, is_store: empty(shape, np.float32)  # noqa: E731
            buffers[STACKED_PRESENT], present = carve(full, small_layout(cfg, batch, "present"))
            buffers |= present
            if io_spec.scaled(self.store_type):
                scale_names = [name + io_spec.SCALE_SUFFIX for name in pair_names]
                buffers |= stacked_buffers(shapes, scale_names, STACKED_NEW_SCALES, empty)
            for name, (shape, dtype) in shapes.items():
                if name not in buffers:
                    buffers[name] = empty(shape, dtype)
            self.outputs = ((batch, chunk), buffers, self.outputs[2] + 1)
        return self.outputs[1]

    def staged(self, name: str, array: np.ndarray) -> np.ndarray:
        """`array` as int64 in a host buffer kept for its name and shape: the same buffer step
        after step, so that the CPU bindings keep it bound."""
        buffer = self.staging.get((name, array.shape))
        if buffer is None:
            if len(self.staging) >= STAGED_SHAPES:  # the oldest shape goes
                self.staging.pop(next(iter(self.staging)))
            buffer = self.staging[(name, array.shape)] = np.empty(array.shape, np.int64)
        buffer[...] = array  # (cheaper than np.copyto right after a run)
        return buffer

    def to_state(self, array: np.ndarray) -> Any:
        """A host int64 array in the state's library: numpy, or a tensor on the device."""
        if self.io_binding:
            return torch.as_tensor(array, dtype=torch.int64).to(self.device, non_blocking=True)
        return array

    def step(
        self,
        ids: HostInts,
        lengths: HostInts,
        state: OrtState,
        last_only: bool,
        rows: slice | None = None,
        device_logits: bool = False,
    ) -> Logits:
        if rows and (rows.start or 0, rows.stop) != (0, state.batch_size):
            state = state.view(rows)
        if self.pairs_in_run and not state.stores_in_place:  # the run would write into copies
            raise BackendError(
                "a store of this state is not contiguous, so it cannot be bound in place for "
                "the native retrieval to write: allocate it with new_state"
            )
        run = (
            self.run_bound if self.io_binding else partial(self.run_numpy, self.host_binding(state))
        )
        logits = graph_step(
            self.config,
            self.block,
            state,
            self.to_state(self.staged(io_spec.INPUT_IDS, np.asarray(ids))),
            self.staged(io_spec.LENGTHS, np.asarray(lengths)),
            last_only,
            self.last_only_graph,
            run,
            self.to_state,
            pairs_in_run=self.pairs_in_run,
            present_in_run=self.present_in_run,
        )
        if self.io_binding:
            return logits.float() if device_logits else logits.float().cpu()
        if device_logits:  # (the output buffer itself, with a last-only graph)
            return logits
        if np.may_share_memory(logits, self.outputs[1][io_spec.LOGITS]):
            logits = np.array(logits)  # a copy: the output buffer is the next step's
        return torch.from_numpy(logits)

    def scan_rows(self, logits: Logits) -> tuple[list[bool], list[int]]:
        """The fused last-only graph's RowScan of its logits when `logits` is the last step's
        output buffer (device_logits): B numbers read, not B x V; else sampling.scan_rows."""
        buffers = self.outputs[1]
        scanned = buffers.get(io_spec.ROW_SCAN)
        if scanned is None or logits is not buffers[io_spec.LOGITS]:
            return super().scan_rows(logits)
        greedy = scanned.tolist()
        return [token >= 0 for token in greedy], greedy
