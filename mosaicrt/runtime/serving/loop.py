"""Continuous batching in a background thread: requests from any thread join the running batch,
and each gets its tokens back through callbacks as they are produced.

The batcher (and so the backend and its state) is touched by the loop thread only; other threads
talk to it through a queue. Callbacks run on a sender thread of their own, so a slow client never
holds up decoding. Every step the loop asks each running request whether it was cancelled (a
client that went away), and stops it within that step. A request that is refused (bad ids, over
capacity, no row for a new session) or fails (its step raised, its numbers overflowed) gets its
error alone: no other request's state is touched.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mosaicrt.errors import BackendError, CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend, torch_threads_for
from mosaicrt.runtime.batcher import ContinuousBatcher, Request, check_request
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.sampling import SamplingParams


class Cancelled(MosaicError):
    """The client cancelled the request or went away."""


class LoopMetrics:
    """What the loop reports as it runs; the Triton model sends it to Triton's metrics."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, count: int) -> None: ...
    def finished(self, ok: bool) -> None: ...
    def load(self, running: int, waiting: int, rows: int, sessions: int) -> None: ...
    def pool(self, report: dict) -> None: ...  # the batcher's pool_report


@dataclass
class Job:
    """A request, where its results go, and how to tell it was cancelled."""

    request: Request
    on_token: Callable[[int], None]
    on_done: Callable[[], None]
    on_error: Callable[[Exception], None]
    is_cancelled: Callable[[], bool] = lambda: False
    on_step: Callable[[int], bool] | None = None  # per token, in the loop: True ends the request
    start_session: bool = False
    submitted: float = field(default_factory=time.monotonic)
    last_token: float | None = None


class ServingLoop:
    def __init__(
        self,
        backend: Backend,
        limits: RunLimits,
        idle_timeout_s: float | None = None,
        metrics: LoopMetrics | None = None,
        drain_file: str | None = None,
    ) -> None:
        """drain_file: while it exists, every request is answered with an error (a server that
        is shutting down)."""
        self.backend, self.limits, self.idle_timeout_s = backend, limits, idle_timeout_s
        self.metrics = metrics or LoopMetrics()
        self.drain_file = drain_file
        self.batcher = ContinuousBatcher(backend, SamplingParams(), limits)
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.last_used: dict[object, float] = {}  # session -> time of its last token
        self.next_rid = 0
        self.lock = threading.Lock()
        self.sender = threading.Thread(target=self._send, name="mosaicrt-sender", daemon=True)
        self.thread = threading.Thread(target=self._run, name="mosaicrt-serving", daemon=True)
        self.sender.start()
        self.thread.start()

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: SamplingParams | None,
        on_token: Callable[[int], None],
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
        session: object | None = None,
        start_session: bool = False,
        end_session: bool = False,
        is_cancelled: Callable[[], bool] = lambda: False,
        stop_ids: frozenset[int] = frozenset(),
        on_step: Callable[[int], bool] | None = None,
    ) -> None:
        """Queue a request (any thread). A session's request continues its earlier turns unless
        start_session; end_session closes it when this turn finishes."""
        try:
            if max_new_tokens < 1:
                raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            vocab = self.backend.config.vocab_size
            check_request(prompt, max_new_tokens, vocab, self.limits, "input_ids", serving=True)
        except MosaicError as exc:
            self.metrics.finished(ok=False)
            self.outbox.put((on_error, exc))
            return
        with self.lock:
            rid, self.next_rid = self.next_rid, self.next_rid + 1
        request = Request(rid, list(prompt), max_new_tokens, sampling=sampling, session=session,
                          end_session=end_session, stop_ids=stop_ids)  # fmt: skip
        job = Job(request, on_token, on_done, on_error, is_cancelled, on_step, start_session)
        self.inbox.put(job)

    def stop(self) -> None:
        """Answer every request still here with an error, then end both threads."""
        self.inbox.put(None)
        self.thread.join(timeout=30)
        self.outbox.put(None)
        self.sender.join(timeout=30)

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch_threads_for(self.backend):
            while self._drain_inbox(wait=not self.batcher.busy):
                if self.drain_file and os.path.exists(self.drain_file):
                    self._fail_all(BackendError("the server is shutting down"))
                self._cancelled()
                if self.batcher.busy:
                    self._step()
                self._expire_sessions()
                self._report_load()
        self._fail_all(BackendError("the server is shutting down"))

    def _drain_inbox(self, wait: bool) -> bool:
        """Accept the queued requests, waiting up to a second for one when there is nothing to
        decode (so idle sessions still expire). False once stopped."""
        try:
            item = self.inbox.get(timeout=1.0) if wait else self.inbox.get_nowait()
            while True:
                if item is None:
                    return False
                self._accept(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _accept(self, job: Job) -> None:
        request = job.request
        if self.drain_file and os.path.exists(self.drain_file):
            self._reply(job, job.on_error, BackendError("the server is shutting down"))
            return
        if request.session is not None and job.start_session:
            self.batcher.release(request.session)  # START begins the session afresh
        elif request.session is not None and request.session not in self.batcher.sessions:
            error = InputError(
                f"session {request.session!r} is not open (it ended, expired, or lives on "
                "another instance): start it with session_start true"
            )
            self._reply(job, job.on_error, error)
            return
        try:
            self.batcher.submit(request)
        except CapacityError as exc:
            self._reply(job, job.on_error, exc)
            return
        self.jobs[request.rid] = job

    def _cancelled(self) -> None:
        for rid, job in list(self.jobs.items()):
            if job.is_cancelled():
                self.batcher.cancel(rid)
                del self.jobs[rid]
                self._reply(job, job.on_error, Cancelled("the request was cancelled"))

    def _step(self) -> None:
        events = self.batcher.step()
        now = time.monotonic()
        for request, token, finished in events:
            job = self.jobs.get(request.rid)
            if job is None:
                continue
            if request.error is not None:
                del self.jobs[request.rid]
                self._reply(job, job.on_error, request.error)
                continue
            self._timed(job, now)
            stop = job.on_step is not None and job.on_step(token)  # before on_token is sent
            self.outbox.put((job.on_token, token))
            if stop and not finished:
                self.batcher.finish(request.rid)  # a stop string: the request is complete
                finished = True
            if request.session is not None:
                self.last_used[request.session] = now
            if finished:
                del self.jobs[request.rid]
                self._reply(job, job.on_done)

    def _timed(self, job: Job, now: float) -> None:
        if job.last_token is None:
            self.metrics.first_token(now - job.submitted)
        else:
            self.metrics.inter_token(now - job.last_token)
        job.last_token = now
        self.metrics.tokens(1)

    def _reply(self, job: Job, callback: Callable, *args) -> None:
        self.metrics.finished(ok=callback is job.on_done)
        self.outbox.put((callback, *args))

    def _fail_all(self, error: MosaicError) -> None:
        for rid, job in list(self.jobs.items()):
            self.batcher.cancel(rid)
            self._reply(job, job.on_error, error)
        self.jobs.clear()

    def _expire_sessions(self) -> None:
        if self.idle_timeout_s is None:
            return
        now = time.monotonic()
        for session, used in list(self.last_used.items()):
            if session not in self.batcher.sessions:
                del self.last_used[session]
            elif now - used > self.idle_timeout_s:
                self.batcher.release(session)
                del self.last_used[session]

    def _report_load(self) -> None:
        b = self.batcher
        running = sum(r is not None for r in b.rows)
        rows = len({i for i, r in enumerate(b.rows) if r is not None} | b.kept_rows())
        self.metrics.load(running, len(b.waiting), rows, len(b.sessions))
        report = b.pool_report()
        if report is not None:
            self.metrics.pool(report)

    # -- the sender thread -------------------------------------------------------------------

    def _send(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            callback, *args = item
            try:
                callback(*args)
            except Exception:  # a client that went away: its request is cancelled next step
                pass
