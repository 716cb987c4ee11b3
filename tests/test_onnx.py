"""ONNX export and the ONNX Runtime backend against the reference and the float64 oracle."""

import json

import numpy as np
import onnx
import oracle
import pytest
import torch

from mosaicrt.errors import BackendError, CapacityError, CheckpointError
from mosaicrt.export import io_spec
from mosaicrt.export.artifact import export_artifact
from mosaicrt.model import preset, random_model, save_checkpoint
from mosaicrt.ops import DOMAIN
from mosaicrt.runtime.generator import RunLimits, generate, score
from mosaicrt.runtime.ort_backend import OrtBackend
from mosaicrt.runtime.sampling import SamplingParams
from mosaicrt.runtime.torch_backend import TorchBackend

ATOL_ORACLE = 1e-4  # fp32 ONNX Runtime vs float64 oracle
ATOL_TORCH = 1e-5  # fp32 ONNX Runtime vs fp32 reference


@pytest.fixture(scope="module")
def artifact(oracle_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact")
    return export_artifact(oracle_ckpt, out, max_context=200, ltm_block=4)


def test_artifact_carries_custom_ops_with_function_bodies(artifact):
    model = onnx.load(str(artifact / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in custom} == {"AssociativeMemory", "GatedKeyScan"}
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"mosaic" and attrs["plugin_version"] == b"1"
        if node.op_type == "AssociativeMemory":
            assert set(attrs) >= {"window", "delay"} and "kind" not in attrs
    assert {(f.domain, f.name) for f in model.functions} == {
        (DOMAIN, "AssociativeMemory"),
        (DOMAIN, "GatedKeyScan"),
    }
    assert (DOMAIN, 1) in {(o.domain, o.version) for o in model.opset_import}
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["ltm_block"] == 4 and manifest["max_context"] == 200
    assert "past.0.s" in [i.name for i in model.graph.input]
    # Stores go in, and only the new pairs come out: no output is as large as a store.
    assert not [
        o.name
        for o in model.graph.output
        if o.name.startswith("present.") and o.name.endswith(("keys", "values"))
    ]


def test_onnxruntime_matches_oracle_and_reference(oracle_ckpt, artifact, ort_ops_fp32):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    T = 3 * config["stm_window"] + 2 * config["ltm_delay"] + 1
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, config["vocab_size"], (2, T)))
    limits = RunLimits(max_context=T, prefill_chunk=6)
    backend = OrtBackend(artifact, ort_ops=ort_ops_fp32)
    assert backend.ort_ops == ort_ops_fp32
    got = score(backend, ids, limits)
    want = score(TorchBackend(oracle_ckpt, device="cpu"), ids, limits)
    assert (got - want).abs().max() <= ATOL_TORCH
    for row in range(2):
        f64 = oracle.logits(oracle_ckpt, ids[row].tolist())
        assert np.abs(got[row].double().numpy() - f64).max() <= ATOL_ORACLE


def test_cli_onnxruntime_greedy_matches_oracle(cli, oracle_ckpt, artifact, tmp_path):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, config["vocab_size"], n).tolist() for n in (2, 9, 23)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    proc = cli("generate", artifact, "--backend", "onnxruntime", "--input", tmp_path / "p.jsonl",
               "--max-new-tokens", 6, "--max-batch", 2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "memory plan" in proc.stderr
    for prompt, line in zip(prompts, proc.stdout.splitlines()):
        assert json.loads(line)["output_ids"] == oracle.greedy(oracle_ckpt, prompt, 6)


def test_continuous_batching_gives_each_request_its_own_result(artifact):
    backend = OrtBackend(artifact)
    prompts = [[1 + i] * (1 + 5 * i) for i in range(7)]
    batched = generate(
        backend,
        prompts,
        9,
        SamplingParams(),
        RunLimits(max_batch=3, max_context=64, prefill_chunk=4),
    )
    for prompt, got in zip(prompts, batched):
        assert got == generate(backend, [prompt], 9, SamplingParams(), RunLimits(max_context=64))[0]


def test_io_binding_runs_the_same_steps_as_numpy_feeds(oracle_ckpt, artifact):
    """The IOBinding path (device tensors bound by pointer, as with the CUDA provider) on the
    CPU: same logits bit for bit, and continuous batching (row resets) on the torch state."""
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    ids = torch.from_numpy(np.random.default_rng(8).integers(0, config["vocab_size"], (2, 30)))
    limits = RunLimits(max_context=40, prefill_chunk=7)
    bound = OrtBackend(artifact, device="cpu", io_binding=True)
    assert isinstance(bound.new_state(1, 8).pos, torch.Tensor)
    assert torch.equal(
        score(bound, ids, limits), score(OrtBackend(artifact, device="cpu"), ids, limits)
    )
    prompts = [[1 + i] * (1 + 4 * i) for i in range(5)]
    batching = RunLimits(max_batch=2, max_context=48, prefill_chunk=4)
    for prompt, got in zip(prompts, generate(bound, prompts, 7, SamplingParams(), batching)):
        assert got == oracle.greedy(oracle_ckpt, prompt, 7)


@pytest.mark.parametrize("last_only_graph", [False, True])
def test_step_takes_numpy_ids_and_keeps_host_logits_as_numpy(
    artifact, oracle_ckpt, tmp_path, last_only_graph
):
    """The batcher's step: numpy ids and lengths in, and with device_logits the CPU provider's
    logits as a numpy array (no torch calls on the decode path), equal to the torch path's: the
    graph's output buffer itself when it computes the last positions only (valid until the next
    step), else the rows taken from it at those positions. Without device_logits the logits are
    the caller's, and the next steps do not overwrite them."""
    if last_only_graph:
        artifact = export_artifact(
            oracle_ckpt, tmp_path / "last", max_context=200, ltm_block=4, last_only=True
        )
    backend = OrtBackend(artifact)
    states = [backend.new_state(2, 16) for _ in range(2)]
    ids = np.array([[5, 9, 3], [7, 1, 0]], np.int64)
    lengths = np.array([3, 2], np.int64)
    as_torch = backend.step(torch.from_numpy(ids), torch.from_numpy(lengths), states[0], True)
    as_numpy = backend.step(ids, lengths, states[1], True, device_logits=True)
    assert isinstance(as_torch, torch.Tensor) and isinstance(as_numpy, np.ndarray)
    assert np.array_equal(as_numpy, as_torch.numpy())
    output_buffer = backend.outputs[1][io_spec.LOGITS]
    assert np.may_share_memory(as_numpy, output_buffer) == last_only_graph  # no copy
    kept = as_torch.clone()
    for next_ids, next_lengths in ((ids, lengths), (ids[:, :1], np.ones(2, np.int64))):
        backend.step(next_ids, next_lengths, states[0], True)
        assert torch.equal(as_torch, kept)  # a step of the same shape reuses the buffers


def test_output_buffers_of_every_shape_share_one_growing_arena(artifact):
    """Going from a prefill chunk's outputs to a decode step's and back allocates nothing: each
    shape's buffers are carved, aligned, from one arena that grows only for a larger shape (and
    every test of the ONNX Runtime backend runs on such buffers)."""
    from mosaicrt.runtime.graph_state import ALIGN, address

    backend = OrtBackend(artifact)
    state = backend.new_state(2, 64)

    def step(chunk: int) -> dict:
        ids = np.full((2, chunk), 7, np.int64)
        backend.step(ids, np.full(2, chunk, np.int64), state, True)
        return backend.outputs[1]

    step(8)
    arena = backend.arena.buffer
    for chunk in (1, 4, 1, 8, 1):
        outputs = step(chunk)
        assert backend.arena.buffer is arena  # no smaller shape allocates
        assert all(np.shares_memory(a, arena) for a in outputs.values() if a.size)
        assert address(outputs[io_spec.LOGITS]) % ALIGN == 0  # each buffer carved is aligned
    step(16)
    assert backend.arena.buffer.nbytes > arena.nbytes  # a larger shape grows it


def test_row_ranges_stepped_in_turn_keep_their_inputs_bound(artifact, monkeypatch):
    """Each state, and each view of a range of rows, keeps its own IOBinding: steps that take
    turns between ranges (prefill rows, then every row's decode) bind none of the state's ~100
    buffers again, only a block table that changed."""
    import onnxruntime as ort

    bound = []
    bind_input = ort.IOBinding.bind_input

    def counted(self, name, *args):
        bound.append(name)
        return bind_input(self, name, *args)

    monkeypatch.setattr(ort.IOBinding, "bind_input", counted)
    backend = OrtBackend(artifact)
    state = backend.new_state(4, 64)
    ranges = [slice(0, 2), slice(0, 4), slice(1, 3)]

    def step(rows: slice) -> np.ndarray:
        n = rows.stop - rows.start
        ids = np.full((n, 1), 7, np.int64)
        return backend.step(ids, np.ones(n, np.int64), state, True, rows=rows, device_logits=True)

    for rows in ranges:  # each range's first step binds its buffers
        step(rows)
    first = len(bound)
    assert first >= 3 * len(backend.session.get_inputs())
    bound.clear()
    for _ in range(3):
        for rows in ranges:
            step(rows)
    assert set(bound) <= {io_spec.LTM_BLOCKS}, sorted(set(bound))
    # Every buffer of the state and of its views is bound by address, none as a copy.
    assert len(backend.host_bindings) == len(ranges)
    assert all(not host.copied for host in backend.host_bindings.values())


def test_a_store_that_cannot_be_bound_in_place_is_refused(artifact, native_ort_library):
    """A store that is not contiguous would be bound as a copy, and the native retrieval would
    write its pairs into that copy: refused, with the reason."""
    backend = OrtBackend(artifact, ort_ops="native")
    assert backend.pairs_in_run
    state = backend.new_state(1, 16)
    name = io_spec.store_name(0, "stm", "keys")
    store = state.stores[name]
    state.stores[name] = store[:, ::-1]  # heads reversed: a view, not contiguous
    with pytest.raises(BackendError, match="not contiguous"):
        backend.step(np.full((1, 1), 7, np.int64), np.ones(1, np.int64), state, True)


def test_a_recurrence_that_cannot_be_updated_in_place_is_refused(artifact, native_ort_library):
    """The fused layers write the present state over the past buffers they are bound to: a
    buffer that is not contiguous would be bound as a copy and never updated: refused."""
    backend = OrtBackend(artifact, ort_ops="fused")
    assert backend.present_in_run
    state = backend.new_state(1, 16)
    name = next(iter(state.small))
    state.small[name] = state.small[name][:, ::-1]  # heads reversed: a view, not contiguous
    with pytest.raises(BackendError, match=f"{name} is not contiguous"):
        backend.step(np.full((1, 1), 7, np.int64), np.ones(1, np.int64), state, True)


@pytest.mark.slow
def test_step_graph_greedy_equals_full_recompute_for_1000_tokens(tmp_path, ort_ops_fp32):
    config = preset("tiny").replace(stm_window=8, ltm_delay=4, eos_token_id=None)
    model = random_model(config, seed=9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("key_proj.weight", "value_proj.weight", "out_proj.weight")):
                p.mul_(6.0)
    save_checkpoint(model, tmp_path / "ckpt")
    artifact = export_artifact(tmp_path / "ckpt", tmp_path / "onnx", max_context=1100)
    backend = OrtBackend(artifact, ort_ops=ort_ops_fp32)
    prompt = [5, 17, 33, 2, 250, 7, 7, 100]
    [streamed] = generate(
        backend, [prompt], 1000, SamplingParams(), RunLimits(max_context=1010, prefill_chunk=3)
    )
    # Full recompute: the logits of every prefix from a fresh state, in one pass over the
    # whole sequence (the graph is causal: position t sees tokens <= t only); greedy decoding
    # from scratch picks the argmax at every position.
    ids = torch.tensor([prompt + streamed])
    logits = score(backend, ids, RunLimits(max_context=ids.shape[1], prefill_chunk=ids.shape[1]))
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == streamed


def test_artifact_errors(cli, artifact, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["mosaicrt_version"] = "0.0.1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="exported by mosaicrt 0.0.1.*re-export"):
        OrtBackend(other)
    proc = cli("generate", other, "--prompt", "x")
    assert proc.returncode == 2 and "re-export" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    missing = tmp_path / "missing"
    shutil.copytree(artifact, missing)
    model = onnx.load(str(missing / "model.onnx"))
    keep = [i for i in model.graph.input if i.name != "past.0.s"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(missing / "model.onnx"))
    with pytest.raises(BackendError, match="past.0.s"):
        OrtBackend(missing)

    with pytest.raises(CheckpointError, match="not an ONNX artifact"):
        OrtBackend(tmp_path)
    with pytest.raises(CapacityError, match="max_context 200"):
        OrtBackend(artifact).new_state(1, 500)


def test_check_compares_with_polygraphy(cli, tmp_path):
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    config = preset("tiny").replace(stm_window=6, ltm_delay=4)
    save_checkpoint(random_model(config, seed=1), ckpt)
    save_checkpoint(random_model(config, seed=2), other)
    export_artifact(ckpt, tmp_path / "onnx", max_context=64, ltm_block=4)
    proc = cli("check", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "check PASSED" in proc.stdout
    assert "PASSED | Output: 'logits'" in proc.stdout + proc.stderr
    assert "PASSED | Output: 'new.1.values'" in proc.stdout + proc.stderr
    proc = cli("check", tmp_path / "onnx", "--checkpoint", other)
    assert proc.returncode == 1 and "check FAILED" in proc.stdout


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda_ep(),
    reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU; this machine has neither",
)
def test_cuda_execution_provider_matches_reference(oracle_ckpt, artifact):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, config["vocab_size"], (2, 40)))
    limits = RunLimits(max_context=40, prefill_chunk=8)
    backend = OrtBackend(artifact, device="cuda")
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider" and backend.io_binding
    got = score(backend, ids, limits)
    want = score(TorchBackend(oracle_ckpt, device="cpu"), ids, limits)
    assert (got - want).abs().max() <= ATOL_ORACLE


def test_fp16_artifact_matches_the_oracle(tmp_path, ort_ops):
    ckpt = oracle.write_random_checkpoint(tmp_path / "ckpt", dtype="float16", seed=5)
    artifact = export_artifact(ckpt, tmp_path / "onnx", dtype="float16", max_context=64)
    model = onnx.load(str(artifact / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    stores = [i for i in model.graph.input if i.name.endswith(("keys", "values"))]
    assert {i.type.tensor_type.elem_type for i in stores} == {onnx.TensorProto.FLOAT16}
    ids = torch.from_numpy(np.random.default_rng(6).integers(0, 300, (2, 30)))
    limits = RunLimits(max_context=30, prefill_chunk=7)
    got = score(OrtBackend(artifact, ort_ops=ort_ops), ids, limits)
    # fp16 stores and new pairs through the IOBinding path too: the same run, bit for bit.
    bound = OrtBackend(artifact, io_binding=True, ort_ops=ort_ops)
    assert torch.equal(score(bound, ids, limits), got)
    for row in range(2):
        want = oracle.logits(ckpt, ids[row].tolist())  # float64 of the same fp16 weights
        # MatMul inputs rounded to fp16 (2^-11 relative) through 2 layers: logits of magnitude
        # ~10 move by a few 1e-3; 1e-2 bounds it, and the argmax must not move.
        assert np.abs(got[row].double().numpy() - want).max() <= 1e-2
        assert (got[row].numpy().argmax(-1) == want.argmax(-1)).all()


def test_bf16_artifact_builds_and_is_refused_by_the_cpu_provider(oracle_ckpt, tmp_path):
    artifact = export_artifact(oracle_ckpt, tmp_path / "onnx", dtype="bfloat16", max_context=64)
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    assert json.loads((artifact / "manifest.json").read_text())["state_dtype"]["stores"] == (
        "bfloat16"
    )
    with pytest.raises(BackendError, match="bf16 artifact.*TensorRT"):
        OrtBackend(artifact)


def test_large_models_stream_their_weights_to_external_data(oracle_ckpt, tmp_path, monkeypatch):
    """Above the size threshold the weights go straight to model.onnx.data as the graph is built;
    the artifact runs and gives the same logits as the all-in-one file."""
    import mosaicrt.export.artifact as artifact_module

    inline = export_artifact(oracle_ckpt, tmp_path / "inline", max_context=64)
    monkeypatch.setattr(artifact_module, "EXTERNAL_DATA_BYTES", 0)
    external = export_artifact(oracle_ckpt, tmp_path / "external", max_context=64)
    data = external / "model.onnx.data"
    assert data.stat().st_size > (external / "model.onnx").stat().st_size
    assert not (inline / "model.onnx.data").exists()
    ids = torch.randint(0, 50, (2, 9))
    limits = RunLimits(max_batch=2, max_context=64)
    want = score(OrtBackend(inline, device="cpu"), ids, limits)
    assert torch.equal(score(OrtBackend(external, device="cpu"), ids, limits), want)


def test_the_device_is_where_the_session_runs(artifact):
    """Asked for CUDA then the CPU on a machine where the CUDA provider cannot start, ONNX
    Runtime runs on the CPU: the backend says so and keeps its state in host arrays."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT warns that the provider is not available
        backend = OrtBackend(artifact, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if backend.session.get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("the CUDA provider started here: nothing falls back")
    assert backend.device.type == "cpu" and not backend.io_binding
    assert isinstance(backend.new_state(1, 8).pos, np.ndarray)
