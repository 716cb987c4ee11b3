"""The `mosaicrt` model of a Triton Inference Server repository (Python backend, decoupled).

`mosaicrt triton-export` copies this file to REPO/mosaicrt/1/model.py; it runs inside Triton's
Python-backend stub, in the environment mosaicrt is installed in. Requests of every client are
decoded together by one ServingLoop.

A request is plain: `input_ids` (INT64 [-1]) or `text_input` (BYTES [1], encoded with the model's
tokenizer, no special tokens added), `max_new_tokens`, and optionally `temperature` (0: greedy),
`top_k`, `top_p`, `seed`, `stop` (strings), `stop_ids`, `stream` and a session. With `stream`
true it gets one response per token (`output_ids` [1] and its `text_output` piece, never a split
UTF-8 character) and then an empty final one; with `stream` false (the default) one response
with every new token and the whole text, which is what HTTP `generate` takes. A client that asks
for `output_ids` alone (its request's requested outputs) gets no text, and none is worked out
unless stop strings need it. A request with a `session_id` keeps its state for the next turn of
that session (`session_start` true on the first turn, `session_end` true on the last): a later
turn costs only its new tokens.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mosaicrt.errors import InputError, MosaicError
from mosaicrt.runtime.backends import open_backend
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.paging import state_bytes
from mosaicrt.runtime.sampling import SamplingParams
from mosaicrt.runtime.serving.loop import LoopMetrics, ServingLoop
from mosaicrt.runtime.serving.repository import DRAIN_FILE_ENV, SETTINGS
from mosaicrt.runtime.tokenizer import TextStream, load_tokenizer


def optional(request, name: str):
    """An optional input as a flat numpy array, or None."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def scalar(request, name: str, default=None):
    """The one element of an optional [1] input, or default when the request has none."""
    values = optional(request, name)
    if values is None:
        return default
    if values.size != 1:
        raise InputError(f"{name} must hold exactly one value, got {values.size}")
    value = values[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value.item()


def strings(request, name: str) -> list[str]:
    values = optional(request, name)
    return [] if values is None else [v.decode("utf-8", errors="replace") for v in values]


class Parsed:
    """A request's inputs, checked, with errors that name the request field."""

    def __init__(self, request, tokenizer, config) -> None:
        ids, text = optional(request, "input_ids"), scalar(request, "text_input")
        if (ids is None) == (text is None):
            raise InputError("give exactly one of input_ids or text_input")
        if text is not None:
            if tokenizer is None:
                raise InputError("this model has no tokenizer for text_input: send input_ids")
            if not text:
                raise InputError("text_input is empty")
            ids = tokenizer.encode(text)
            if config.bos_token_id is not None:
                ids = [config.bos_token_id] + ids
        self.ids = [int(i) for i in ids]
        max_new_tokens = scalar(request, "max_new_tokens")
        if max_new_tokens is None:
            raise InputError("max_new_tokens is required: the most tokens to generate")
        self.max_new_tokens = int(max_new_tokens)
        self.stream = bool(scalar(request, "stream", False))
        self.text_output = "text_output" in request.requested_output_names()
        self.stop = [s for s in strings(request, "stop") if s]
        if self.stop and tokenizer is None:
            raise InputError("stop strings need the model's tokenizer: use stop_ids")
        stop_ids = optional(request, "stop_ids")
        self.stop_ids = frozenset() if stop_ids is None else frozenset(int(i) for i in stop_ids)
        self.sampling = sampling(request)
        self.session = scalar(request, "session_id")
        self.session_start = bool(scalar(request, "session_start", False))
        self.session_end = bool(scalar(request, "session_end", False))
        if self.session is None and (self.session_start or self.session_end):
            raise InputError("session_start and session_end need a session_id")


def sampling(request) -> SamplingParams | None:
    """None (greedy, the default) or the request's sampling; messages name the fields."""
    temperature = scalar(request, "temperature")
    if temperature is None or temperature == 0:
        if temperature == 0 or all(scalar(request, n) is None for n in ("top_k", "top_p", "seed")):
            return None
        temperature = 1.0
    return SamplingParams(
        greedy=False,
        temperature=float(temperature),
        top_k=int(scalar(request, "top_k", 0)),
        top_p=float(scalar(request, "top_p", 1.0)),
        seed=int(scalar(request, "seed", 0)),
    )


class StopText:
    """Text pieces with the stop strings cut out: a piece is held back while its end could be
    the start of a stop string; once one appears, the text before it is the last."""

    def __init__(self, stop: list[str]) -> None:
        self.stop, self.held, self.stopped = stop, "", False

    def push(self, piece: str) -> str:
        text = self.held + piece
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Reply:
    """How one request's results go out: text and stop strings are worked out in the loop
    (on_step), the responses sent from the sender thread."""

    def __init__(self, sender, parsed: Parsed, tokenizer) -> None:
        self.sender, self.stream, self.text_output = sender, parsed.stream, parsed.text_output
        wants_text = tokenizer is not None and (parsed.text_output or parsed.stop)
        self.text = TextStream(tokenizer) if wants_text else None
        self.stop = StopText(parsed.stop)
        self.pieces: deque[str] = deque()
        self.ids: list[int] = []
        self.tail = ""

    def on_step(self, token: int) -> bool:
        """In the loop thread, for every token: its text piece; True when a stop string ends."""
        piece = self.stop.push(self.text.push(token)) if self.text is not None else ""
        self.pieces.append(piece)
        return self.stop.stopped

    def token(self, token: int) -> None:
        piece = self.pieces.popleft() if self.pieces else ""
        if self.stream:
            self.sender.send(self.response([token], piece))
        else:
            self.ids.append(token)
            self.tail += piece

    def done(self) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        rest = ""
        if self.text is not None and not self.stop.stopped:
            rest = self.stop.push(self.text.flush()) + self.stop.flush()
        if self.stream:
            if rest:
                self.sender.send(self.response([], rest))
            self.sender.send(flags=final)
        else:
            self.sender.send(self.response(self.ids, self.tail + rest), flags=final)

    def error(self, exc: Exception) -> None:
        send_error(self.sender, exc)

    def response(self, ids: list[int], text: str):
        """A response of these ids, and of their text when the client asked for it."""
        tensors = [pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64))]
        if self.text_output:
            encoded = np.array([text.encode("utf-8")], dtype=np.object_)
            tensors.append(pb_utils.Tensor("text_output", encoded))
        return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonMetrics(LoopMetrics):
    """The loop's measures as Triton custom metrics (on the server's metrics port), updated from
    the loop's sender thread only: a Metric is not safe to update from two threads at once."""

    BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

    def __init__(self, state_bytes: int) -> None:
        family = pb_utils.MetricFamily
        labels = {"model": "mosaicrt"}
        self.families = []  # a family must outlive its metrics

        def metric(name, text, kind, **kw):
            self.families.append(family(name=name, description=text, kind=kind))
            return self.families[-1].Metric(labels=labels, **kw)

        H, C, G = family.HISTOGRAM, family.COUNTER, family.GAUGE
        self.ttft = metric("mosaicrt_time_to_first_token_seconds", "time to first token", H,
                           buckets=self.BUCKETS)  # fmt: skip
        self.itl = metric("mosaicrt_inter_token_latency_seconds", "time between tokens", H,
                          buckets=self.BUCKETS)  # fmt: skip
        self.out = metric("mosaicrt_output_tokens_total", "tokens generated", C)
        self.rate = metric("mosaicrt_output_tokens_per_second", "tokens/s, last 10 s", G)
        self.ok = metric("mosaicrt_requests_succeeded_total", "requests completed", C)
        self.failed = metric("mosaicrt_requests_failed_total", "requests failed or refused", C)
        self.running = metric("mosaicrt_requests_running", "requests decoding", G)
        self.waiting = metric("mosaicrt_requests_waiting", "requests waiting for a row", G)
        self.rows = metric("mosaicrt_rows_in_use", "state rows running or kept", G)
        self.sessions = metric("mosaicrt_sessions_open", "open sessions", G)
        self.state = metric("mosaicrt_state_bytes", "decode state allocated", G)
        self.state.set(state_bytes)
        self.blocks = metric("mosaicrt_state_blocks_used", "LTM pool blocks in use", G)
        self.shared = metric("mosaicrt_state_blocks_shared", "LTM blocks held twice or more", G)
        self.hits = metric("mosaicrt_prefix_cache_hits_total", "requests started from the "
                           "prefix cache", C)  # fmt: skip
        self.preempted = metric("mosaicrt_preemptions_total", "requests preempted", C)
        self.counted = {"prefix_cache_hits": 0, "preemptions": 0}  # what the counters hold
        self.recent: deque[float] = deque()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, count: int) -> None:
        self.out.increment(count)
        self.recent.extend([time.monotonic()] * count)

    def finished(self, ok: bool) -> None:
        (self.ok if ok else self.failed).increment(1)

    def load(self, running: int, waiting: int, rows: int, sessions: int) -> None:
        now = time.monotonic()
        while self.recent and now - self.recent[0] > 10:
            self.recent.popleft()
        self.rate.set(len(self.recent) / 10)
        self.running.set(running)
        self.waiting.set(waiting)
        self.rows.set(rows)
        self.sessions.set(sessions)

    def pool(self, report: dict) -> None:
        self.blocks.set(report["blocks_used"])
        self.shared.set(report["blocks_shared"])
        for key, counter in (("prefix_cache_hits", self.hits), ("preemptions", self.preempted)):
            if report[key] > self.counted[key]:
                counter.increment(report[key] - self.counted[key])
                self.counted[key] = report[key]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((here / SETTINGS).read_text())
        backend = open_backend(settings["backend"], here / "model", device=settings["device"])
        limits = RunLimits(
            max_batch=settings["max_batch"],
            max_context=settings["max_context"],
            prefill_chunk=settings["prefill_chunk"],
            state_memory=settings.get("state_memory"),
            prefix_cache=settings.get("prefix_cache", True),
        )
        self.config = backend.config
        try:
            self.tokenizer = load_tokenizer(here / "model", self.config.vocab_size)
        except InputError:  # too small a vocabulary for bytes, and no tokenizer.json
            self.tokenizer = None
        self.loop = ServingLoop(
            backend,
            limits,
            idle_timeout_s=settings["idle_timeout_s"],
            metrics=TritonMetrics(state_bytes(backend, limits)),
            drain_file=os.environ.get(DRAIN_FILE_ENV),
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            self.accept(request)
        return None  # decoupled: responses go out through each request's sender

    def accept(self, request) -> None:
        sender = request.get_response_sender()
        try:
            parsed = Parsed(request, self.tokenizer, self.config)
        except (MosaicError, ValueError, TypeError) as exc:
            return self.loop.refuse(partial(send_error, sender), exc)
        reply = Reply(sender, parsed, self.tokenizer)
        self.loop.submit(
            parsed.ids,
            parsed.max_new_tokens,
            parsed.sampling,
            reply.token,
            reply.done,
            reply.error,
            session=parsed.session,
            start_session=parsed.session_start,
            end_session=parsed.session_end,
            is_cancelled=sender.is_cancelled,
            stop_ids=parsed.stop_ids,
            on_step=reply.on_step,
        )

    def finalize(self) -> None:
        self.loop.stop()


def send_error(sender, exc: Exception) -> None:
    sender.send(
        pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
