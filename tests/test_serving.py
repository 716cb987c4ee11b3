"""Serving: the background batching loop here; the Triton Inference Server model repository and a
real server on loopback further down."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from mosaicrt.errors import CapacityError, InputError
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.runtime.serving.loop import STEPS_AHEAD, Cancelled, LoopMetrics, ServingLoop
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
           Collect().submit(loop, [], 3),
           Collect().submit(loop, [1], 3, session="nope")]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == generate(backend, prompts, 10, limits=limits)
    errors = [b.wait() == [] and b.error for b in bad]
    assert isinstance(errors[0], InputError) and "outside [0, 258)" in str(errors[0])
    assert isinstance(errors[1], CapacityError) and isinstance(errors[2], InputError)
    assert "session 'nope' is not open" in str(errors[3])
    # Two turns of a session equal one pass over every token.
    first = Collect().submit(loop, [3, 4, 5], 4, session="s", start_session=True).wait()
    second = Collect().submit(loop, [6, 7], 5, session="s", end_session=True).wait()
    assert second == generate(backend, [[3, 4, 5] + first + [6, 7]], 5, limits=limits)[0]
    # A cancelled request stops within a step and frees its row.
    cancel = threading.Event()
    long = Collect().submit(loop, [1, 2, 3], 40, is_cancelled=cancel.is_set)
    while len(long.tokens) < 2:
        time.sleep(0.01)
    cancel.set()
    long.wait()
    assert isinstance(long.error, Cancelled) and len(long.tokens) < 40
    assert Collect().submit(loop, [9, 9], 3).wait() == generate(backend, [[9, 9]], 3)[0]
    loop.stop()


def test_loop_keeps_pace_with_a_slow_client_so_a_cancel_stops_early(tiny_ckpt):
    """A client slower than the steps: the loop decodes at most STEPS_AHEAD steps ahead of what
    was sent, so a cancel after 3 tokens stops the request a few tokens later, not after all
    the tokens it could have decoded in the meantime."""
    loop = ServingLoop(
        TorchBackend(tiny_ckpt, device="cpu"), RunLimits(max_batch=2, max_context=48)
    )
    cancel = threading.Event()
    slow = Collect()

    def on_token(token: int) -> None:
        time.sleep(0.02)  # each send takes longer than a tiny model's step
        slow.tokens.append(token)
        if len(slow.tokens) == 3:
            cancel.set()

    loop.submit([1, 2, 3], 40, None, on_token, slow.done.set, slow.fail, is_cancelled=cancel.is_set)
    slow.wait()
    loop.stop()
    assert isinstance(slow.error, Cancelled)
    assert len(slow.tokens) <= 3 + 2 * STEPS_AHEAD + 2, slow.tokens


class Recorded(LoopMetrics):
    """Every metrics call and the thread it came on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple]] = []

    def __getattribute__(self, name: str):
        if name in ("first_token", "inter_token", "tokens", "finished", "load", "pool"):
            calls = object.__getattribute__(self, "calls")
            return lambda *args: calls.append((name, threading.current_thread().name, args))
        return object.__getattribute__(self, name)


def test_loop_reports_off_its_thread_and_a_failing_cancel_check_cancels(tiny_ckpt):
    """The metrics and the cancellation checks (round trips to the server in Triton) run on the
    sender thread: tokens counted once per step, load reported when it changes; a request whose
    check raises (its client is gone) is cancelled."""
    backend = TorchBackend(tiny_ckpt, device="cpu")
    metrics = Recorded()
    loop = ServingLoop(backend, RunLimits(max_batch=2, max_context=48), metrics=metrics)
    a, b = Collect().submit(loop, [1, 2, 3], 12), Collect().submit(loop, [4, 5], 12)

    def gone() -> bool:
        raise RuntimeError("Stub process is not healthy")

    dropped = Collect().submit(loop, [6, 7], 40, is_cancelled=gone)
    assert len(a.wait()) == len(b.wait()) == 12
    dropped.wait()
    assert isinstance(dropped.error, Cancelled) and len(dropped.tokens) < 40
    loop.stop()
    calls = metrics.calls
    assert {thread for _, thread, _ in calls} == {"mosaicrt-sender"}
    counted = [args[0] for name, _, args in calls if name == "tokens"]
    generated = len(a.tokens) + len(b.tokens) + len(dropped.tokens)
    assert sum(counted) == generated and len(counted) < generated  # per step, not per token
    started = sum(bool(c.tokens) for c in (a, b, dropped))  # (dropped may end before a token)
    assert sum(name == "first_token" for name, _, _ in calls) == started
    assert sum(name == "inter_token" for name, _, _ in calls) == generated - started
    finished = [args[0] for name, _, args in calls if name == "finished"]
    assert sorted(finished) == [False, True, True]
    loads = [args for name, _, args in calls if name == "load"]
    assert len(loads) < len(counted) and len(set(loads)) == len(loads)  # only when it changed


# A real Triton Inference Server on loopback, serving an ONNX Runtime artifact of the tiny model.

MAX_CONTEXT, MAX_BATCH = 512, 8


def shm_regions() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if "triton" in f}


def temp_dirs() -> set[str]:
    import tempfile

    return {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("mosaicrt-triton-")}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc", reason="needs the [serve] extra (tritonclient)")
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.runtime.serving.repository import export_repository
    from mosaicrt.runtime.serving.server import TritonServer, server_binary

    try:
        server_binary()
    except Exception as exc:
        pytest.skip(f"no tritonserver: {exc}")
    root = tmp_path_factory.mktemp("triton")
    export_artifact(tiny_ckpt, root / "onnx", max_context=MAX_CONTEXT)
    export_repository(root / "onnx", root / "repo", max_batch=MAX_BATCH, max_context=MAX_CONTEXT,
                      prefill_chunk=8, idle_timeout_s=30)  # fmt: skip
    shm_before, tmp_before = shm_regions(), temp_dirs()
    server = TritonServer(root / "repo").start()
    yield server, root
    pgid = server.process.pid
    assert server.stop() == 0, server.log_path.read_text()[-2000:]
    with pytest.raises(ProcessLookupError):  # the stubs are gone with the server
        os.killpg(pgid, 0)
    assert shm_regions() <= shm_before and temp_dirs() <= tmp_before


@pytest.fixture(scope="module")
def reference(server):
    from mosaicrt.runtime.ort_backend import OrtBackend

    backend = OrtBackend(server[1] / "onnx", device="cpu")
    limits = RunLimits(max_batch=1, max_context=MAX_CONTEXT)
    return lambda prompt, n: generate(backend, [prompt], n, limits=limits)[0]


def stream(srv, prompt=None, n=8, **kw):
    from mosaicrt.runtime.serving.client import stream_generate

    return stream_generate(srv.grpc_url, prompt, n, timeout_s=120, **kw)


def http(srv, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{srv.http_url}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_plain_requests_over_grpc_and_http_with_ids_or_text(server, reference):
    srv, _ = server
    prompt, text = [104, 105, 33], "hi!"  # the byte tokenizer: "hi!" is [104, 105, 33]
    bos = [256]
    want = reference(prompt, 8)
    assert stream(srv, prompt).tokens == want  # gRPC, a response per token
    one = stream(srv, prompt, stream=False)  # gRPC, one response with every token
    assert one.tokens == want and one.responses == 1
    assert stream(srv, None, 8, text=text).tokens == reference(bos + prompt, 8)
    code, body = http(srv, "/v2/models/mosaicrt/generate",
                      {"input_ids": prompt, "max_new_tokens": 8})  # fmt: skip
    assert code == 200 and body["output_ids"] == want, body
    code, body = http(
        srv, "/v2/models/mosaicrt/generate", {"text_input": text, "max_new_tokens": 8}
    )
    assert code == 200 and body["output_ids"] == reference(bos + prompt, 8), body
    assert isinstance(body["text_output"], (str, list))
    code, body = http(srv, "/v2/models/mosaicrt/generate_stream",
                      {"input_ids": prompt, "max_new_tokens": 8, "stream": True})  # fmt: skip
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    streamed = [e["output_ids"] for e in events if e.get("output_ids") not in (None, [])]
    assert code == 200 and streamed == want  # one token per event (a scalar in JSON)
    infer = {
        "inputs": [
            {"name": "input_ids", "shape": [3], "datatype": "INT64", "data": prompt},
            {"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [8]},
        ]
    }
    code, body = http(srv, "/v2/models/mosaicrt_unary/infer", infer)  # fmt: skip
    assert code == 200, body
    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    assert outputs["output_ids"] == want


def test_text_is_utf8_safe_and_stop_strings_end_the_request(server, reference):
    srv, _ = server
    prompt = list("é€".encode())  # multi-byte characters in, any bytes out
    result = stream(srv, prompt, 12)
    assert result.error is None and result.tokens == reference(prompt, 12)
    want = bytes(t for t in result.tokens if t < 256).decode("utf-8", errors="replace")
    assert result.text == want  # pieces never split a character
    stop = want[3:5] if len(want) > 5 and "\ufffd" not in want[:5] else None
    if stop:
        cut = stream(srv, prompt, 12, stop=[stop])
        assert cut.text == want[: want.index(stop)] and len(cut.tokens) < 12
    stopped = stream(srv, prompt, 12, stop_ids=[result.tokens[2]])
    assert stopped.tokens == result.tokens[: result.tokens.index(result.tokens[2]) + 1]


def test_a_client_that_asks_for_ids_alone_gets_no_text(server):
    """The requested outputs: output_ids alone gets the same tokens and no text (none is worked
    out), stop strings still end the request, and the unary companion answers the same way."""
    srv, _ = server
    prompt = list("é€".encode())
    whole = stream(srv, prompt, 12)
    ids_only = stream(srv, prompt, 12, outputs=("output_ids",))
    assert ids_only.error is None and ids_only.tokens == whole.tokens and ids_only.text == ""
    from mosaicrt.runtime.serving.client import StreamClient

    with StreamClient(srv.grpc_url, ("output_ids",)) as client:  # requests in turn, one stream
        turns = [client.generate(prompt, 12, timeout_s=120) for _ in range(2)]
    assert [(t.tokens, t.text) for t in turns] == [(whole.tokens, "")] * 2
    stop = next(whole.text[i : i + 2] for i in range(1, len(whole.text) - 1)
                if "\ufffd" not in whole.text[i : i + 2])  # fmt: skip
    with_text = stream(srv, prompt, 12, stop=[stop])
    cut = stream(srv, prompt, 12, stop=[stop], outputs=("output_ids",))
    assert cut.tokens == with_text.tokens and len(cut.tokens) < 12 and cut.text == ""
    infer = {
        "inputs": [
            {"name": "input_ids", "shape": [2], "datatype": "INT64", "data": [5, 6]},
            {"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [3]},
        ],
        "outputs": [{"name": "output_ids"}],
    }
    code, body = http(srv, "/v2/models/mosaicrt_unary/infer", infer)
    assert code == 200 and [o["name"] for o in body["outputs"]] == ["output_ids"], body


def test_concurrent_streams_equal_generate_alone_and_bad_requests_fail_alone(server, reference):
    srv, _ = server
    prompts = [[(11 * i + 3 * j) % 250 + 1 for j in range(2 + i % 7)] for i in range(16)]
    bad = {  # each gets an error response; the 16 others complete
        "out of range": dict(prompt=[1, 2, 9999], n=4),
        "over capacity": dict(prompt=[1] * 500, n=20),
        "missing input": dict(prompt=[1, 2, 3], n=None),
        "temperature": dict(prompt=[1], n=2, temperature=-1.0),
        "top_p": dict(prompt=[1], n=2, temperature=1.0, top_p=2.0),
        "both inputs": dict(prompt=[1], n=2, text="x"),
    }
    jobs = [dict(prompt=p, n=12) for p in prompts] + list(bad.values())
    results = [None] * len(jobs)

    def run(i):
        results[i] = stream(srv, **jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for prompt, result in zip(prompts, results):
        assert result.error is None and result.tokens == reference(prompt, 12)
    errors = dict(zip(bad, (r.error for r in results[len(prompts) :])))
    assert "outside [0, 258)" in errors["out of range"]
    assert "the server's context limit is 512" in errors["over capacity"]
    assert "max_new_tokens" in errors["missing input"]
    assert "temperature must be a finite number >= 0" in errors["temperature"]
    assert "top_p must be in (0, 1]" in errors["top_p"]
    assert "exactly one of input_ids or text_input" in errors["both inputs"]
    assert not any("--" in e for e in errors.values())  # no command-line flag names


def test_sessions_beyond_the_rows_are_isolated(server, reference):
    """More open sessions than rows: an idle session's state is parked (its LTM blocks held,
    no row), so none is refused, and each next turn equals one pass over its tokens."""
    srv, _ = server
    turns = {}
    for i in range(MAX_BATCH + 2):
        key = f"s{i}"
        first = stream(srv, [5 + i, 6, 7], 3, session_id=key, session_start=True)
        assert first.error is None
        turns[key] = [5 + i, 6, 7] + first.tokens
    unknown = stream(srv, [1, 2], 3, session_id="never")
    assert "is not open" in unknown.error
    for key, history in turns.items():
        nxt = stream(srv, [9, 10], 4, session_id=key, session_end=True)
        assert nxt.error is None and nxt.tokens == reference(history + [9, 10], 4)
    assert stream(srv, [3], 3).tokens == reference([3], 3)


def metrics(srv) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics") as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("mosaicrt_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


# A client that goes away without a word after 5 tokens of a 400-token stream: its process ends
# with the stream open (tritonclient's close() would wait for the stream's end instead).
VANISHING_CLIENT = """
import os, sys, threading
import tritonclient.grpc as grpcclient
from mosaicrt.runtime.serving.client import inputs_for
url, prompt = sys.argv[1], [int(token) for token in sys.argv[2:]]
seen, enough = [], threading.Event()
def callback(result, error):
    seen.append(error)
    if len(seen) >= 5 or error is not None:
        enough.set()
client = grpcclient.InferenceServerClient(url)
client.start_stream(callback=callback)
print("ready", flush=True)
sys.stdin.readline()  # the go: every client's start-up is over before any request decodes
client.async_stream_infer("mosaicrt", inputs_for(prompt, None, 400))
enough.wait(60)
os._exit(0 if len(seen) >= 5 and seen[-1] is None else 1)
"""


def test_cancelled_and_dropped_streams_free_their_rows(server, reference):
    """8 clients drop 400-token streams after 5 tokens (4 cancel, 4 go away): each request ends
    as failed, not decoded to its end for nobody, the rows free within a step, and the next
    request starts as fast as one on an idle server."""
    from mosaicrt.runtime.serving.client import stream_generate

    srv, _ = server

    def ttft() -> float:
        start = time.perf_counter()
        stream_generate(srv.grpc_url, [7, 8, 9], 1, timeout_s=60)
        return time.perf_counter() - start

    idle = min(ttft() for _ in range(3))
    # prompts whose 400 tokens hold no EOS: a request ends only by being dropped
    prompts = [[k, 2, 3] for k in range(1, 80) if len(reference([k, 2, 3], 400)) == 400][:8]
    assert len(prompts) == 8

    # The vanishing clients start (python, tritonclient) before any request decodes: a start-up
    # beside the decoding could hold a client back from reading its 5 tokens until its request
    # was decoded to the end.
    gone = [
        subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, srv.grpc_url, *map(str, p)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for p in prompts[0::2]
    ]  # fmt: skip
    assert all(client.stdout.readline().strip() == "ready" for client in gone)
    before = metrics(srv)
    threads = [
        threading.Thread(target=stream, args=(srv, p, 400), kwargs={"cancel_after": 5})
        for p in prompts[1::2]
    ]
    for t in threads:
        t.start()
    for client in gone:
        client.stdin.write("go\n")
        client.stdin.flush()
    for t in threads:
        t.join(120)
    vanished = [client.wait(120) for client in gone]
    deadline = time.monotonic() + 10
    while metrics(srv).get("mosaicrt_requests_running", 1) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    now = metrics(srv)
    assert vanished == [0] * 4  # each saw its 5 tokens, then went
    assert now["mosaicrt_requests_running"] == 0  # nobody decodes for the dropped
    counts = {  # (before, now): what a failure here reports
        key: (before.get(f"mosaicrt_{key}", 0), now[f"mosaicrt_{key}"])
        for key in ("requests_failed_total", "requests_succeeded_total", "output_tokens_total")
    }
    assert counts["requests_failed_total"][1] - counts["requests_failed_total"][0] == 8, counts
    assert counts["requests_succeeded_total"][1] == counts["requests_succeeded_total"][0], counts
    after = min(ttft() for _ in range(3))
    assert after <= 2 * idle + 0.05, (idle, after)


def test_requests_refused_on_two_threads_at_once_are_each_counted(server):
    """Requests refused as they arrive (a missing input) and by the loop (ids out of range),
    many at once beside running ones: the server lives, every refusal gets its error and is
    counted once (each count of a Triton metric is a round trip to the server that two threads
    must not make at once on one metric)."""
    srv, _ = server
    before = metrics(srv)
    kinds = [dict(prompt=[1, 2, 3], n=None), dict(prompt=[1, 99999], n=2)]
    errors = []

    def refused(i: int) -> None:
        for k in range(12):
            errors.append(stream(srv, **kinds[(i + k) % 2]).error)

    running = [threading.Thread(target=stream, args=(srv, [5, 6, 7], 40)) for _ in range(2)]
    threads = running + [threading.Thread(target=refused, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(errors) == 96 and all(errors), errors
    assert stream(srv, [1, 2, 3], 4).error is None  # still serving
    failed = metrics(srv)["mosaicrt_requests_failed_total"]
    assert failed - before.get("mosaicrt_requests_failed_total", 0) == 96


def test_metrics_count_tokens_latency_and_failures(server):
    srv, _ = server
    before = metrics(srv)
    assert stream(srv, [1, 2, 3], 6).error is None
    assert "outside" in stream(srv, [1, 99999], 2).error
    after = metrics(srv)
    assert after["mosaicrt_time_to_first_token_seconds_count"] > before.get(
        "mosaicrt_time_to_first_token_seconds_count", 0
    )
    assert (
        after["mosaicrt_output_tokens_total"] >= before.get("mosaicrt_output_tokens_total", 0) + 6
    )
    assert after["mosaicrt_output_tokens_per_second"] > 0
    assert after["mosaicrt_requests_failed_total"] > before.get("mosaicrt_requests_failed_total", 0)
    assert after["mosaicrt_state_bytes"] > 0
    assert "mosaicrt_state_blocks_used" in after and "mosaicrt_preemptions_total" in after


def test_serve_restarts_a_dead_model_and_stops_cleanly_with_open_streams(server, reference):
    """`mosaicrt serve`: kill -9 of the model's process makes the model not ready and the
    server restart; Ctrl-C with a stream open ends it with an error, exits 0 within 10 s, and
    leaves no process, shared memory or temporary directory behind."""
    from mosaicrt.runtime.serving.server import free_port, stub_processes

    _, root = server
    long = next([k, 2] for k in range(1, 60) if len(reference([k, 2], 400)) == 400)  # no EOS
    shm_before, tmp_before = shm_regions(), temp_dirs()
    ports = [free_port() for _ in range(3)]
    cli = [sys.executable, "-m", "mosaicrt.cli"]
    proc = subprocess.Popen(
        cli + ["serve", str(root / "repo"), "--http-port", str(ports[0]), "--grpc-port",
               str(ports[1]), "--metrics-port", str(ports[2])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def ready() -> bool:
        try:
            url = f"http://127.0.0.1:{ports[0]}/v2/models/mosaicrt/ready"
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_for(condition, seconds):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)
        return condition()

    try:
        assert wait_for(ready, 120)
        server_pid = int(subprocess.check_output(["pgrep", "-P", str(proc.pid), "tritonserver"]))
        stubs = stub_processes(server_pid)
        assert stubs
        os.kill(next(iter(stubs)), signal.SIGKILL)
        assert wait_for(lambda: not ready(), 10)  # noticed: the server restarts
        assert wait_for(ready, 120)
        from mosaicrt.runtime.serving.client import stream_generate

        url = f"127.0.0.1:{ports[1]}"
        assert stream_generate(url, [1, 2, 3], 4, timeout_s=60).error is None
        import tritonclient.grpc as grpcclient

        from mosaicrt.runtime.serving.client import inputs_for

        answers, first, failed = [], threading.Event(), threading.Event()

        def callback(result, error):
            answers.append(error)
            first.set()
            if error is not None:
                failed.set()

        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=callback)
        # More 400-token requests than the rows hold: the tiny model decodes one in well under a
        # second, so a single request could end before the Ctrl-C reaches the server; these
        # keep the stream busy for seconds, most of them waiting for a row.
        requests = 8 * MAX_BATCH
        for _ in range(requests):
            client.async_stream_infer("mosaicrt", inputs_for(long, None, 400))
        assert first.wait(60)  # the stream is open and decoding
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert failed.wait(10)  # the server ends the stream with an error; the client closes it
        client.stop_stream()
        client.close()
        out, err = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "restarting tritonserver" in err and "stopped (exit code 0)" in out
    assert stopped_in < 10
    errors = [error for error in answers if error is not None]
    assert len(answers) - len(errors) < requests * 400  # ended before all the tokens were out
    assert errors and all("shutting down" in str(error) for error in errors)
    assert shm_regions() <= shm_before and temp_dirs() <= tmp_before
