"""Each layer's memory nodes as one native LayerMemories node (mosaicrt.runtime.ort_fusion and
mosaicrt/ops/ort_layer_memories.h) against the same graph with the mosaic ops' native kernels
and its standard nodes; the graph against the oracle is tests/test_onnx.py's (--ort-ops fused)."""

import collections

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the fused graph is ONNX Runtime's ([onnx] extra)")
pytest.importorskip("onnxruntime", reason="the fused graph is ONNX Runtime's ([onnx] extra)")

from mosaicrt.errors import BackendError  # noqa: E402
from mosaicrt.export.artifact import export_artifact, read_manifest  # noqa: E402
from mosaicrt.model import preset, random_model, save_checkpoint  # noqa: E402
from mosaicrt.runtime.ort_backend import OrtBackend  # noqa: E402
from mosaicrt.runtime.ort_fusion import (  # noqa: E402
    fuse_layer_memories,
    fuse_skip_norms,
    fuse_swiglu,
)

# The fused kernel sums each value's squares for its L2 norm in its own order (ReduceL2's is
# another): values differ in their last bits, the state and stores by up to 8.6e-7 and the tiny
# model's logits (of magnitude ~2) by up to 2.1e-6, measured over this file's schedule; 1e-5
# bounds both.
ATOL_LOGITS = 1e-5
ATOL_STATE = 1e-5


def assert_runs_in_order(model) -> None:
    """The rewritten graph's nodes are in an order that runs: every input made before it is
    read."""
    made = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        assert all(x in made for x in node.input if x), node.name
        made |= {x for x in node.output if x}


def counted_rewrite(artifact, rewrite):
    """The artifact's graph with its layers fused, then rewritten by `rewrite`: (the graph, its
    config, what rewrite returned, the op counts before and after it)."""
    model = onnx.load(str(artifact / "model.onnx"))
    config = read_manifest(artifact)[1]
    assert fuse_layer_memories(model, config.num_layers, config.memories) == ""
    before = collections.Counter(n.op_type for n in model.graph.node)
    result = rewrite(model)
    return model, config, result, before, collections.Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module", params=[("stm", "ltm"), ("stm",)], ids=["stm+ltm", "stm"])
def artifact(request, tmp_path_factory):
    """The tiny model's artifact, with both memories and with the STM alone."""
    root = tmp_path_factory.mktemp("fusion")
    config = preset("tiny").replace(use_ltm="ltm" in request.param)
    assert config.memories == request.param
    save_checkpoint(random_model(config, seed=5), root / "ckpt")
    return export_artifact(root / "ckpt", root / "onnx", max_context=128, ltm_block=8)


def test_every_layer_becomes_one_node_and_the_rest_stays(artifact):
    model = onnx.load(str(artifact / "model.onnx"))
    config = read_manifest(artifact)[1]
    before = collections.Counter(n.op_type for n in model.graph.node)
    outputs = [o.name for o in model.graph.output]
    assert fuse_layer_memories(model, config.num_layers, config.memories) == ""
    after = collections.Counter(n.op_type for n in model.graph.node)
    assert after["LayerMemories"] == config.num_layers
    assert after["GatedKeyScan"] == after["AssociativeMemory"] == 0
    assert after["MatMul"] == before["MatMul"]  # the weights' products are untouched
    assert sum(after.values()) <= sum(before.values()) - 25 * config.num_layers
    assert [o.name for o in model.graph.output] == outputs
    read = {x for node in model.graph.node for x in node.input}
    assert all(t.name in read for t in model.graph.initializer)  # the replaced nodes' are gone
    assert_runs_in_order(model)


def test_residual_adds_and_their_norms_become_one_node(artifact):
    """Every RMSNorm of a residual sum becomes one SkipSimplifiedLayerNormalization with its Add
    (which also returns the sum for the next one); the first layer's, of the embeddings, stays.
    The logits of the rewritten graph are test_fused_layers_match_the_native_ops'."""
    model, config, fused, before, after = counted_rewrite(artifact, fuse_skip_norms)
    assert fused == after["SkipSimplifiedLayerNormalization"] == 2 * config.num_layers
    assert after["Pow"] == before["Pow"] - fused == 1  # the embeddings' norm
    assert after["Add"] == before["Add"] - 2 * fused  # each norm's epsilon and residual Add
    assert_runs_in_order(model)


def test_each_feed_forward_activation_becomes_one_node(artifact):
    """Split, Sigmoid and two Muls of every layer's feed-forward become one SwiGLU of the
    gate-and-up projection. The logits of the rewritten graph are
    test_fused_layers_match_the_native_ops'."""
    model, config, fused, before, after = counted_rewrite(artifact, fuse_swiglu)
    assert fused == after["SwiGLU"] == config.num_layers
    assert after["Sigmoid"] == 0 and after["Split"] == before["Split"] - fused
    assert after["Mul"] == before["Mul"] - 2 * fused
    assert all(n.domain == "mosaic" for n in model.graph.node if n.op_type == "SwiGLU")
    assert_runs_in_order(model)
    assert fuse_swiglu(model) == 0  # nothing left to fuse


def test_a_last_only_graph_scans_its_rows_in_the_run(tmp_path):
    """A fused last-only graph ends in RowScan: the backend's scan of each step's logits (the
    batcher's finite check and greedy tokens) is sampling.scan_rows' of them, a row whose state
    went NaN included (RowScan marks it -1, where numpy's argmax would name its first NaN); a
    graph of every position's logits has none and scans on the host."""
    from mosaicrt.export import io_spec
    from mosaicrt.runtime.sampling import scan_rows

    save_checkpoint(random_model(preset("tiny"), seed=3), tmp_path / "ckpt")
    artifact = export_artifact(tmp_path / "ckpt", tmp_path / "onnx", max_context=64, last_only=True)
    backend = OrtBackend(artifact, ort_ops="fused")
    assert io_spec.ROW_SCAN in backend.output_specs
    state = backend.new_state(3, 64)
    rng = np.random.default_rng(1)
    for step, lengths in enumerate([[9, 4, 0], [1, 1, 1], [1, 1, 1], [2, 1, 1]]):
        if step == 2:
            state.small["past.0.s"][1] = np.nan  # row 1's logits go NaN from here on
        ids = rng.integers(0, 256, (3, max(lengths)))
        logits = backend.step(ids, np.array(lengths), state, True, device_logits=True)
        finite, greedy = backend.scan_rows(logits)
        want_finite, want_greedy = scan_rows(np.array(logits))
        assert finite == want_finite and finite[1] == (step < 2)
        assert greedy[1] == (want_greedy[1] if step < 2 else -1)  # RowScan's mark, not argmax's
        assert [g for g, ok in zip(greedy, finite) if ok] == [
            g for g, ok in zip(want_greedy, want_finite) if ok
        ]
    full = export_artifact(tmp_path / "ckpt", tmp_path / "full", max_context=64)
    assert io_spec.ROW_SCAN not in OrtBackend(full, ort_ops="fused").output_specs


def test_fused_layers_match_the_native_ops(artifact):
    """Chunks longer than the STM ring and the LTM delay, decode steps across ring wraps and LTM
    block edges, rows at different positions, an idle row, a step on a row range: the logits,
    the constant-size state and the stores (which the fused kernel writes itself, or, with
    pairs_in_run=False, the runtime) follow the graph with the ops' native kernels."""
    native = OrtBackend(artifact, ort_ops="native")
    fused = [OrtBackend(artifact, ort_ops="fused"), OrtBackend(artifact, pairs_in_run=False)]
    assert [b.ort_ops for b in fused] == ["fused", "fused"]
    assert fused[0].pairs_in_run and not fused[1].pairs_in_run
    assert all(b.present_in_run for b in fused) and not native.present_in_run  # state in place
    backends = [native, *fused]
    states = [backend.new_state(2, 128) for backend in backends]
    schedule = [([20, 7], None), ([0, 19], None), ([3, 1], None)]  # ring 15, delay 8, blocks 8
    schedule += [([1, 1], None)] * 20 + [([4], slice(1, 2)), ([1], slice(0, 1))]
    schedule += [([1, 1], None)] * 10
    rng = np.random.default_rng(0)
    for lengths, rows in schedule:
        ids = rng.integers(0, 256, (len(lengths), max(lengths)))
        lengths = np.array(lengths)
        want, *got = (
            b.step(ids, lengths, s, last_only=True, rows=rows) for b, s in zip(backends, states)
        )
        for logits in got:
            assert np.abs(logits[lengths > 0] - want[lengths > 0]).max() <= ATOL_LOGITS
    for state in states[1:]:
        for name, buffer in state.small.items():
            assert np.abs(buffer - states[0].small[name]).max() <= ATOL_STATE, name
        for name, pool in state.pairs.items():
            assert np.abs(pool - states[0].pairs[name]).max() <= ATOL_STATE, name


def test_a_graph_with_fp16_stores_runs_the_ops_kernels(tmp_path):
    save_checkpoint(random_model(preset("tiny"), seed=2), tmp_path / "ckpt")
    artifact = export_artifact(
        tmp_path / "ckpt", tmp_path / "onnx", max_context=64, store_dtype="float16"
    )
    assert OrtBackend(artifact).ort_ops == "native"  # auto: the ops' kernels, unfused
    with pytest.raises(BackendError, match=r"float32 stores only\): use --ort-ops native"):
        OrtBackend(artifact, ort_ops="fused")


def test_a_fused_graph_reads_its_weights_inline_or_from_external_data(tmp_path, monkeypatch):
    """The rewritten graph reaches ONNX Runtime from memory: weights held in model.onnx go as
    OrtValues (ort_backend.detach_weights), those in model.onnx.data are read from beside it."""
    import mosaicrt.export.artifact as artifact_module

    save_checkpoint(random_model(preset("tiny"), seed=3), tmp_path / "ckpt")
    inline = export_artifact(tmp_path / "ckpt", tmp_path / "inline", max_context=64)
    monkeypatch.setattr(artifact_module, "EXTERNAL_DATA_BYTES", 0)
    external = export_artifact(tmp_path / "ckpt", tmp_path / "external", max_context=64)
    assert (external / "model.onnx.data").is_file()
    ids = np.random.default_rng(4).integers(0, 256, (2, 9))
    lengths = np.array([9, 5])
    want = OrtBackend(inline, ort_ops="native")
    want = want.step(ids, lengths, want.new_state(2, 64), last_only=True)
    for artifact in (inline, external):
        backend = OrtBackend(artifact, ort_ops="fused")
        got = backend.step(ids, lengths, backend.new_state(2, 64), last_only=True)
        assert np.abs(got - want).max() <= ATOL_LOGITS
