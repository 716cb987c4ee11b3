"""Benchmark metrics on hand-built timings, and `mosaicrt bench` reports on a tiny model."""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import mosaicrt

from mosaicrt.bench.metrics import RequestTiming, request_metrics, summary
from mosaicrt.errors import InputError
from mosaicrt.model import preset


def test_request_metrics_follow_the_definitions():
    a = RequestTiming(submitted_s=10.0, token_times_s=(10.5, 10.7, 10.8, 11.0), prompt_tokens=5)
    b = RequestTiming(submitted_s=10.0, token_times_s=(10.2,), prompt_tokens=3)
    assert a.ttft_ms == pytest.approx(500) and a.e2el_ms == pytest.approx(1000)
    assert a.tpot_ms == pytest.approx(500 / 3)  # excludes the first token
    assert a.itl_ms == pytest.approx([200, 100, 200])
    assert b.tpot_ms is None and b.itl_ms == []
    m = request_metrics([a, b], duration_s=2.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(350)
    assert m["tpot_ms"]["p50"] == pytest.approx(500 / 3)  # one-token requests have no TPOT
    assert m["itl_ms"]["p50"] == pytest.approx(200)
    assert m["requests_per_s"] == 1.0
    assert m["output_tokens_per_s"] == 2.5 and m["total_tokens_per_s"] == 6.5
    assert summary([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    assert summary([1, 2, 3, 4])["p50"] == 2.5


@pytest.fixture
def tiny(tiny_ckpt):
    return tiny_ckpt


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_bench_reports(cli, tiny, tmp_path, mode):
    out = tmp_path / "report.json"
    proc = cli("bench", mode, tiny, "--backend", "torch", "--batch", 2, "--input-len", 20,
               "--output-len", 6, "--warmup", 1, "--iters", 2, "--json", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ttft_ms" in proc.stdout and "output tokens/s" in proc.stdout
    report = json.loads(out.read_text())
    requests = 4 if mode == "latency" else 8  # 2 rounds of 2, or 4 x batch queued
    assert report["requests"] == requests
    assert report["output_tokens"] == 6 * requests and report["prompt_tokens"] == 20 * requests
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < report[key]["p50"] <= report[key]["p99"]
    assert report["e2el_ms"]["mean"] > report["ttft_ms"]["mean"]
    assert report["output_tokens_per_s"] == pytest.approx(
        report["output_tokens"] / report["duration_s"]
    )
    state = report["memory"]["state"]
    # A pool of one 128-pair block per row, and the scratch block: blocks x pairs x pair bytes.
    assert state["ltm_store_bytes"] == (2 + 1) * 128 * 2 * 64 * 4 * 2
    assert abs(state["ltm_bytes_per_token_ratio"] - 1) <= 0.05  # allocated vs the formula
    assert 0 < report["roofline"]["decode_fraction"] and 0 < report["roofline"]["prefill_fraction"]
    machine = report["machine"]
    assert machine["cpu_cores"] >= 1
    # The roofline's rates: the means of those measured before, between the rounds of (latency:
    # 2 rounds, one probe between them) and after the timed requests.
    before, after = machine["bandwidth_before_after_gb_s"]
    between = machine["bandwidth_between_rounds_gb_s"]
    assert len(between) == (1 if mode == "latency" else 0)
    probes = [before, *between, after]
    assert machine["bandwidth_gb_s"] == pytest.approx(sum(probes) / len(probes))
    assert min(probes) > 0
    peaks = machine["peak_before_after_gflops"]
    peaks = [peaks[0], *machine["peak_between_rounds_gflops"], peaks[1]]
    assert machine["peak_gflops"] == pytest.approx(sum(peaks) / len(peaks))


def test_bench_peak_host_memory_leaves_the_bandwidth_probes_out(tiny, tmp_path):
    """The bandwidth probes before and after the timed requests read a 1 GiB buffer; a tiny
    model's process (its own, as a user runs it) peaks well below that, probes left out."""
    out = tmp_path / "report.json"
    proc = mosaicrt("bench", "latency", tiny, "--backend", "torch", "--batch", 1,
                    "--input-len", 8, "--output-len", 4, "--iters", 1, "--json", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert all(report["machine"]["bandwidth_before_after_gb_s"])  # both probes ran
    assert 0 < report["memory"]["peak_host_bytes"] < 2**30


def test_bench_measures_the_onnxruntime_state(cli, tiny, tmp_path):
    """The LTM bytes per token of the ONNX Runtime state (blocks of 128 pairs), measured on its
    buffers, within 5 % of the formula."""
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    from mosaicrt.export.artifact import export_artifact

    export_artifact(tiny, tmp_path / "onnx", max_context=512)
    out = tmp_path / "report.json"
    proc = cli("bench", "latency", tmp_path / "onnx", "--batch", 2, "--input-len", 20,
               "--output-len", 4, "--iters", 1, "--json", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == "onnxruntime"
    state = report["memory"]["state"]
    assert state["ltm_bytes_per_token_formula"] == 2 * 2 * 64 * 4  # layers x (key + value) fp32
    assert abs(state["ltm_bytes_per_token_ratio"] - 1) <= 0.05
    assert state["ltm_store_bytes"] == 2 * 2 * (128 * 2) * 64 * 4  # 2 layers x k/v x 1 block/row
    # Every decode step after the first token runs the model once: 3 steps of 2 rows, each split
    # into the model run and the runtime's bookkeeping around it.
    step = report["decode_step"]
    assert step["steps"] == 3
    assert 0 < step["model_run_ms"] < step["step_ms"]
    assert step["bookkeeping_ms"] > 0
    assert "runtime bookkeeping" in proc.stdout


def test_bench_compare_reports_ratios_against_torch_eager(cli, tiny, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    out = tmp_path / "compare.json"
    proc = cli("bench", "compare", tiny, "--backends", "torch,onnxruntime,full-recompute",
               "--contexts", "16,40", "--iters", 3, "--device", "cpu", "--json", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["context"]) for r in rows} == {
        (b, c) for b in ("torch", "onnxruntime", "full-recompute") for c in (16, 40)
    }
    for r in rows:
        assert r["tpot_ms"]["p50"] > 0 and 0 < r["roofline_fraction"]
        # Each backend's roofline uses the mean of the bandwidth measured around its own steps.
        before, after = r["bandwidth_before_after_gb_s"]
        assert r["bandwidth_gb_s"] == pytest.approx((before + after) / 2) and min(before, after) > 0
        assert r["roofline_ms"] == pytest.approx(
            r["bytes_per_step"] / (r["bandwidth_gb_s"] * 1e9) * 1e3
        )
        torch_p50 = next(
            x["tpot_ms"]["p50"]
            for x in rows
            if x["backend"] == "torch" and x["context"] == r["context"]
        )
        assert r["speedup_vs_torch"] == pytest.approx(torch_p50 / r["tpot_ms"]["p50"])


def test_full_recompute_decodes_like_the_cached_backend(tiny):
    from mosaicrt.bench.decode import FullRecompute
    from mosaicrt.runtime.generator import RunLimits, generate
    from mosaicrt.runtime.sampling import SamplingParams
    from mosaicrt.runtime.torch_backend import TorchBackend

    cached = TorchBackend(tiny, device="cpu")
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    limits = RunLimits(max_batch=1, max_context=64)
    want = generate(cached, prompt, 12, SamplingParams(), limits)
    assert generate(FullRecompute(cached, chunk=4), prompt, 12, SamplingParams(), limits) == want


def test_readme_results_match_the_committed_json():
    """The README's results sections are what `mosaicrt.bench.report --readme` makes of the JSON."""
    from mosaicrt.bench.report import update_readme

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert "<!-- results:decode_cpu -->" in readme.read_text()
    assert update_readme(readme) == readme.read_text(), (
        "README results are stale: run python -m mosaicrt.bench.report --readme README.md"
    )


def test_ort_ceiling_reads_the_bytes_the_roofline_counts(tmp_path):
    """The ceiling benchmark's MatMuls read the weights and the valid pairs of bench.roofline."""
    from mosaicrt.bench import ort_ceiling
    from mosaicrt.bench.roofline import decode_bytes

    config, context = preset("tiny"), 40
    out = tmp_path / "ceiling.json"
    parser = argparse.ArgumentParser()
    ort_ceiling.add_cli_args(parser)
    args = ["--preset", "tiny", "--context", str(context), "--steps", "5", "--json", str(out)]
    assert ort_ceiling.main(parser.parse_args(args)) == 0
    result = json.loads(out.read_text())
    weights_only = decode_bytes(config, [])
    assert result["stores"]["bytes"] == decode_bytes(config, [context]) - weights_only
    # Every weight matrix is read; what the ceiling leaves out is norms and per-head scalars.
    assert 0.99 * weights_only <= result["weights"]["bytes"] <= weights_only
    for part in ("weights", "stores", "step", "weights_batch", "weights_summed"):
        assert result[part]["ms"] > 0 and result[part]["roofline_fraction"] > 0
    assert result["weights_batch"]["rows"] == 8  # the default
    assert result["weights_batch"]["bytes"] == result["weights"]["bytes"]
    assert result["weights_summed"]["bytes"] == result["weights"]["bytes"]
    graphs = result["step_graphs"]
    assert set(graphs) in ({"functions"}, {"functions", "native", "fused"})
    if "native" in graphs:  # one node per mosaic op instead of its inlined body
        assert graphs["native"]["nodes"] < graphs["functions"]["nodes"] / 2
        # and one node per layer for its memories: 25 fewer a layer at least
        assert graphs["fused"]["nodes"] <= graphs["native"]["nodes"] - 25 * config.num_layers
    # The real step graph, measured in the same run: its MatMuls are among its nodes, its
    # session.run is part of its TPOT, and the budget is the arithmetic the docstring states.
    step, budget = result["step_graph"], result["budget"]
    assert 0 < step["matmul_nodes"] < step["nodes"]
    for timing in (step, step["short_context"]):
        assert 0 < timing["session_run_ms"] < timing["tpot_ms"]
    assert step["short_context"]["context"] < context
    roofline_ms = decode_bytes(config, [context]) / (result["bandwidth_gb_s"] * 1e9) * 1e3
    assert step["roofline_fraction"] == pytest.approx(roofline_ms / step["tpot_ms"])
    assert budget["step_ms"] == pytest.approx(roofline_ms / 0.8)
    assert budget["left_ms"] == pytest.approx(budget["step_ms"] - result["step"]["ms"])
    other = step["nodes"] - step["matmul_nodes"]
    assert budget["dispatch_floor_ms"] == pytest.approx(
        other * result["dispatch_us_per_node"] / 1e3
    )
    assert budget["rest_ms"] == step["no_weight_reads_run_ms"] > 0
    assert step["short_context"]["no_weight_reads_run_ms"] > 0
    assert step["short_context"]["no_weight_reads_back_to_back_run_ms"] > 0


def test_the_step_graph_without_weight_reads_keeps_its_nodes_and_shapes(tiny, tmp_path):
    """ort_ceiling's cut graph: every weight MatMul keeps its node and output shape, on
    WEIGHT_ROWS rows of its weight and as many columns of its input (one Slice each)."""
    import numpy as np
    import onnx

    from mosaicrt.bench.ort_ceiling import WEIGHT_ROWS, without_weight_reads
    from mosaicrt.export.artifact import MODEL_FILE, export_artifact
    from mosaicrt.runtime.ort_backend import OrtBackend

    artifact = export_artifact(tiny, tmp_path / "onnx", max_context=32)
    cut = without_weight_reads(artifact, tmp_path / "cut")
    full, small = onnx.load(artifact / MODEL_FILE).graph, onnx.load(cut / MODEL_FILE).graph
    weights = {w.name: list(w.dims) for w in full.initializer if len(w.dims) == 2}
    on_weights = [n for n in full.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert on_weights and len(small.node) == len(full.node) + len(on_weights)
    kept = {w.name: list(w.dims) for w in small.initializer}
    for node in on_weights:
        assert kept[node.input[1]] == [WEIGHT_ROWS, weights[node.input[1]][1]]
    ids, lengths, shapes = np.array([[5, 6, 7]]), np.array([3]), []
    for path in (artifact, cut):  # both run: the same inputs, logits of the same shape
        backend = OrtBackend(path, device="cpu")
        shapes.append(backend.step(ids, lengths, backend.new_state(1, 32), True).shape)
    assert shapes[0] == shapes[1] == (1, preset("tiny").vocab_size)


def test_profile_steps_tables_both_steps_by_op(tiny, tmp_path):
    from mosaicrt.bench import profile_steps

    out = tmp_path / "profile.txt"
    args = argparse.Namespace(model=str(tiny), device="cpu", kernels="torch", compile=False,
                              batch=3, prefill_rows=2, chunk=16, context=40,
                              out=str(out))  # fmt: skip
    assert profile_steps.main(args) == 0
    text = out.read_text()
    assert "== prefill (2 rows x 16 tokens):" in text and "== decode (3 rows):" in text
    assert text.count("aten::mm") >= 2  # each step's table lists its matmuls


def test_quantization_bench_times_every_variant_the_same_way(tmp_path):
    """Each variant's decode in processes of their own, all of them running the mosaic ops one
    way (native where the library is built, else the function bodies), recorded per row."""
    from mosaicrt.bench import quantization
    from mosaicrt.ops.ort_library import find_library

    out = tmp_path / "q.json"
    parser = argparse.ArgumentParser()
    quantization.add_cli_args(parser)
    args = ["--preset", "tiny", "--contexts", "40", "--variants", "fp32,int8-stores",
            "--steps", "2", "--rounds", "1", "--json", str(out)]  # fmt: skip
    assert quantization.main(parser.parse_args(args)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "int8-stores"]
    ops = "native" if find_library() else "functions"
    assert {r["ort_ops"] for r in rows} == {ops}
    assert rows[0]["speedup_vs_fp32"] == 1.0 and rows[1]["stores"] == "int8"


def test_ort_ops_bench_times_the_native_kernel_per_build(tmp_path, native_ort_library):
    """One AssociativeMemory node per case and build: decode bytes are every stored key and
    value once (int8: a byte per element and an fp32 scale per pair and head); a chunk's FLOPs
    count each query against the stored pairs and the chunk's earlier ones (itself included), a
    product and a weighted sum of hs each."""
    from mosaicrt.bench import ort_ops

    out = tmp_path / "ops.json"
    args = ["--context", "300", "--chunk", "10", "--chunk-stored", "130", "--stores", "fp16,int8",
            "--layers", "2", "--repeats", "2", "--json", str(out)]  # fmt: skip
    parser = argparse.ArgumentParser()
    ort_ops.add_cli_args(parser)
    assert ort_ops.main(parser.parse_args(args)) == 0
    result = json.loads(out.read_text())
    rows, H, hs = result["rows"], result["heads"], result["head_size"]
    assert [(r["kind"], r["batch"], r["store"]) for r in rows] == [
        ("decode", 1, "fp16"), ("decode", 8, "fp16"), ("chunk", 1, "fp16"),
        ("decode", 1, "int8"), ("decode", 8, "int8"), ("chunk", 1, "int8"),
    ]  # fmt: skip
    assert {r["march"] for r in rows} == {"native"}
    assert rows[1]["bytes"] == 2 * 8 * 300 * H * hs * 2
    assert rows[4]["bytes"] == 2 * 8 * 300 * H * (hs + 4)
    assert rows[2]["flops"] == 4 * (10 * 130 + 10 * 11 // 2) * H * hs
    assert all(r["ms"] > 0 for r in rows)


def test_ort_ops_bench_times_group_query_attention_beside_the_native_kernel(
    tmp_path, native_ort_library
):
    """--gqa: each fp32 decode case also runs as ONNX Runtime's GroupQueryAttention over the same
    pairs, which must give the native kernel's output (the run stops otherwise), and is timed in
    turn with it; the prefill chunk has no GQA time."""
    from mosaicrt.bench import ort_ops

    out = tmp_path / "ops.json"
    args = ["--context", "300", "--chunk", "4", "--chunk-stored", "20", "--layers", "2",
            "--repeats", "2", "--gqa", "--json", str(out)]  # fmt: skip
    parser = argparse.ArgumentParser()
    ort_ops.add_cli_args(parser)
    assert ort_ops.main(parser.parse_args(args)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["batch"], "gqa_ms" in r) for r in rows] == [
        ("decode", 1, True), ("decode", 8, True), ("chunk", 1, False),
    ]  # fmt: skip
    assert all(r["gqa_gb_s"] == r["bytes"] / (r["gqa_ms"] * 1e-3) / 1e9 for r in rows[:2])


def test_gqa_check_refuses_different_retrievals():
    from mosaicrt.bench.ort_ops import check_gqa

    y = np.zeros((1, 1, 8, 64), np.float32)
    check_gqa(y, y + 5e-5)
    with pytest.raises(RuntimeError, match="differ by"):
        check_gqa(y, y + 1e-3)
    with pytest.raises(RuntimeError, match="differ by"):
        check_gqa(y, y * np.nan)


def test_cold_calls_bench_times_each_call_after_a_run(tiny_ckpt, tmp_path, native_ort_library):
    """Every call of the list is timed, after a run each (a last-only artifact's: its RowScan
    read too), and the medians go to the JSON with the path the artifact ran on."""
    from mosaicrt.bench import cold_calls
    from mosaicrt.export.artifact import export_artifact

    artifact = export_artifact(tiny_ckpt, tmp_path / "onnx", max_context=64, last_only=True)
    out = tmp_path / "cold.json"
    parser = argparse.ArgumentParser()
    cold_calls.add_cli_args(parser)
    args = [str(artifact), "--context", "20", "--rounds", "3", "--json", str(out)]
    assert cold_calls.main(parser.parse_args(args)) == 0
    result = json.loads(out.read_text())
    assert result["ort_ops"] == "fused" and result["context"] == 20
    medians = result["median_us"]
    assert "scan_rows (argmax, argmin, their values)" in medians and len(medians) == 15
    assert "backend.scan_rows (the run's RowScan)" in medians  # a fused last-only graph's
    assert all(us > 0 for us in medians.values())


def test_ort_paths_bench_times_each_way_in_turn(tiny_ckpt, tmp_path, native_ort_library):
    """Every way decodes the same requests each round, in alternating order; the bookkeeping
    is a step's time outside its session.run. A way the artifact cannot run is refused."""
    from mosaicrt.bench import ort_paths
    from mosaicrt.export.artifact import export_artifact

    artifact = export_artifact(tiny_ckpt, tmp_path / "onnx", max_context=64)
    out = tmp_path / "paths.json"
    parser = argparse.ArgumentParser()
    ort_paths.add_cli_args(parser)
    paths = "fused,fused-state-after,fused-small-pages,native,native-pairs-after"
    args = [str(artifact), "--paths", paths, "--rows", "2", "--prompt-len", "20",
            "--new-tokens", "12", "--rounds", "2", "--json", str(out)]  # fmt: skip
    assert ort_paths.main(parser.parse_args(args)) == 0
    rounds = json.loads(out.read_text())["rounds"]
    assert set(rounds) == set(paths.split(","))
    small_pages = ort_paths.open_paths(str(artifact), ["fused", "fused-small-pages"])
    assert [b.huge_pages for b in small_pages.values()] == [True, False]
    for result in sum(rounds.values(), []):
        assert result["steps"] == 11 and 0 < result["model_run_ms"] < result["step_ms"]
        assert result["bookkeeping_ms"] > 0
    with pytest.raises(InputError, match="--paths: two or more of fused"):
        ort_paths.main(parser.parse_args([str(artifact), "--paths", "fused"]))


def test_read_rates_bench_measures_one_core_and_all(tmp_path):
    """Each round measures the sum and the weight products with one thread and with all: through
    ONNX Runtime's MatMul, and through the native RowMatMul where the library is built."""
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    from mosaicrt.bench import ort_ceiling, read_rates
    from mosaicrt.ops.ort_library import find_library

    out = tmp_path / "rates.json"
    parser = argparse.ArgumentParser()
    read_rates.add_cli_args(parser)
    args = ["--rounds", "2", "--repeats", "2", "--pause", "0", "--json", str(out)]
    assert read_rates.main(parser.parse_args(args)) == 0
    result = json.loads(out.read_text())
    cores = os.cpu_count() or 1
    kinds = ("sum", "gemv", "row") if find_library() else ("sum", "gemv")
    keys = {f"{kind}_{threads}t_gb_s" for kind in kinds for threads in (1, cores)}
    assert len(result["rounds"]) == 2
    assert all(set(row) == keys and min(row.values()) > 0 for row in result["rounds"])
    mini = preset("mini")
    assert result["weight_bytes"] == sum(k * n * 4 for k, n in ort_ceiling.weight_shapes(mini))
