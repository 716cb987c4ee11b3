"""Serving: the background batching loop here; the Triton Inference Server model repository and a
real server on loopback further down."""

import os
import threading

import pytest

from mosaicrt.errors import CapacityError, InputError
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.runtime.serving.loop import ServingLoop
from mosaicrt.runtime.torch_backend import TorchBackend


class Collect:
    """Callbacks of one request: tokens, then done or an error."""

    def __init__(self) -> None:
        self.tokens, self.error, self.done = [], None, threading.Event()

    def submit(self, loop: ServingLoop, prompt, n, **kw) -> "Collect":
        loop.submit(prompt, n, None, self.tokens.append, self.done.set, self.fail, **kw)
        return self

    def fail(self, exc) -> None:
        self.error = exc
        self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(60)
        return self.tokens


def test_loop_batches_concurrent_requests_and_isolates_bad_ones(tiny_ckpt):
    backend = TorchBackend(tiny_ckpt, device="cpu")
    limits = RunLimits(max_batch=4, max_context=48, prefill_chunk=5)
    loop = ServingLoop(backend, limits)
    prompts = [[(7 * i + j) % 256 for j in range(3 + i)] for i in range(8)]
    results = [None] * 8
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(
            i, Collect().submit(loop, prompts[i], 10).wait()))
        for i in range(8)
    ]  # fmt: skip
    bad = [Collect().submit(loop, [1, 999], 4), Collect().submit(loop, [1] * 45, 10),
           Collect().submit(loop, [], 3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == generate(backend, prompts, 10, limits=limits)
    errors = [b.wait() == [] and b.error for b in bad]
    assert isinstance(errors[0], InputError) and "outside [0, 258)" in str(errors[0])
    assert isinstance(errors[1], CapacityError) and isinstance(errors[2], InputError)
    # Two turns of a session equal one pass over every token; an idle session expires.
    first = Collect().submit(loop, [3, 4, 5], 4, session="s", start_session=True).wait()
    second = Collect().submit(loop, [6, 7], 5, session="s", end_session=True).wait()
    assert second == generate(backend, [[3, 4, 5] + first + [6, 7]], 5, limits=limits)[0]
    loop.stop()


# A real Triton Inference Server on loopback, serving an ONNX Runtime artifact of the tiny model.

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc", reason="needs the [serve] extra (tritonclient)")
    from mosaicrt.runtime.serving.repository import export_repository
    from mosaicrt.runtime.serving.server import TritonServer, server_binary

    try:
        server_binary()
    except Exception as exc:
        pytest.skip(f"no tritonserver: {exc}")
    from mosaicrt.export.artifact import export_artifact

    root = tmp_path_factory.mktemp("triton")
    export_artifact(tiny_ckpt, root / "onnx", max_context=MAX_CONTEXT)
    export_repository(root / "onnx", root / "repo", max_batch=8, max_context=MAX_CONTEXT,
                      prefill_chunk=8, idle_timeout_s=30)  # fmt: skip
    shm_before = set(os.listdir("/dev/shm"))
    server = TritonServer(root / "repo").start()
    yield server, root / "onnx"
    pgid = server.process.pid
    assert server.stop() == 0, server.log_path.read_text()[-2000:]
    with pytest.raises(ProcessLookupError):  # the stubs are gone with the server
        os.killpg(pgid, 0)
    leaked = [f for f in set(os.listdir("/dev/shm")) - shm_before if "triton" in f]
    assert not leaked


def stream(url: str, prompt, max_new_tokens, sequence_id, start=True, end=True, with_max=True):
    """One streaming request over gRPC: (tokens, error message or None)."""
    from mosaicrt.runtime.serving.client import stream_generate

    n = max_new_tokens if with_max else None
    return stream_generate(url, prompt, n, sequence_id, start=start, end=end, timeout_s=120)


def test_concurrent_streams_equal_generate_alone_and_bad_requests_fail_alone(server):
    from mosaicrt.runtime.ort_backend import OrtBackend

    srv, artifact = server
    prompts = [[(11 * i + 3 * j) % 250 + 1 for j in range(2 + i % 7)] for i in range(16)]
    bad = {  # each gets an error response; the 16 others complete
        "out of range": ([1, 2, 9999], 4, True),
        "over capacity": ([1] * 60, 10, True),
        "missing input": ([1, 2, 3], 4, False),
    }
    jobs = [(p, 12, True) for p in prompts] + list(bad.values())
    results = [None] * len(jobs)

    def run(i):
        prompt, n, with_max = jobs[i]
        results[i] = stream(srv.grpc_url, prompt, n, 100 + i, with_max=with_max)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    backend = OrtBackend(artifact, device="cpu")
    limits = RunLimits(max_batch=1, max_context=MAX_CONTEXT)
    for prompt, (tokens, error) in zip(prompts, results):
        assert error is None
        assert tokens == generate(backend, [prompt], 12, limits=limits)[0]
    errors = dict(zip(bad, (e for _, e in results[len(prompts) :])))
    assert "outside [0, 258)" in errors["out of range"]
    assert "--max-context is 64" in errors["over capacity"]
    assert "max_new_tokens" in errors["missing input"]


def test_a_two_turn_sequence_equals_one_pass(server):
    from mosaicrt.runtime.ort_backend import OrtBackend

    srv, artifact = server
    first, error = stream(srv.grpc_url, [5, 6, 7, 8], 6, 7001, start=True, end=False)
    assert error is None
    second, error = stream(srv.grpc_url, [9, 10, 11], 7, 7001, start=False, end=True)
    assert error is None
    backend = OrtBackend(artifact, device="cpu")
    limits = RunLimits(max_batch=1, max_context=MAX_CONTEXT)
    assert second == generate(backend, [[5, 6, 7, 8] + first + [9, 10, 11]], 7, limits=limits)[0]


def test_mosaicrt_serve_starts_and_stops_on_ctrl_c(server, tmp_path):
    """The CLI: triton-export, then serve until SIGINT, which stops the server cleanly."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from mosaicrt.runtime.serving.server import free_port

    _, artifact = server
    cli = [sys.executable, "-m", "mosaicrt.cli"]
    too_long = subprocess.run(cli + ["triton-export", str(artifact), "-o", str(tmp_path / "r"),
                              "--max-context", "4096"], capture_output=True, text=True)  # fmt: skip
    assert too_long.returncode == 2 and "exceeds the 64 tokens" in too_long.stderr
    made = subprocess.run(cli + ["triton-export", str(artifact), "-o", str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        cli + ["serve", str(tmp_path / "repo"), "--http-port", str(http), "--grpc-port",
               str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready") as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "tritonserver ready" in out and "stopped (exit code 0)" in out
