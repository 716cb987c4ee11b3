"""Continuous batching in a background thread: requests from any thread join the running batch, and
each gets its tokens back through callbacks as they are produced.

The batcher (and so the backend and its state) is touched by the loop thread only; other threads
talk to it through a queue. Whatever may wait on someone else runs on a sender thread of its own,
so that it overlaps the decode steps instead of holding them up: the callbacks (a slow client), the
metrics, and asking each running request whether it was cancelled (in Triton, each metric update
and each such question is a round trip to the server process). Metrics are updated from the sender
thread only: a Triton metric updated from two threads at once can crash the server (each update
replaces the shared memory that the server may still be reading from the last). The sender checks
every running request once per step, and the loop stops a cancelled one at its next step. The loop
runs at most STEPS_AHEAD steps ahead of the sender: where a step is quicker than sending its
tokens, it waits for the sends instead of decoding whole requests that nobody has seen yet (a
client that cancels after a few tokens would otherwise find them all decoded, and the check queued
behind them). The load is reported when it changes, and the tokens once per step. A request that is
refused (bad ids, over capacity, no row for a new session) or fails (its step raised, its numbers
overflowed) gets its error alone: no other request's state is touched.
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


LOAD_REPORT_S = 1.0  # the load is reported when it changes, and at least this often
STEPS_AHEAD = 2  # steps the loop may decode before the sender has sent the first's tokens


class LoopMetrics:
    """What the loop reports as it runs (the loop calls these on its sender thread); the Triton
    model sends it to Triton's metrics."""

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
        self.outbox: queue.Queue = queue.Queue()  # (callable, *args) for the sender thread
        self.cancelled: queue.SimpleQueue = queue.SimpleQueue()  # rids the sender found cancelled
        self.checking = threading.Event()  # set while a cancellation check waits in the outbox
        self.step_slots = threading.Semaphore(STEPS_AHEAD)  # taken by a step, freed once sent
        self.last_load: tuple = ()  # (time, what was reported)
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
            return self.refuse(on_error, exc)
        with self.lock:
            rid, self.next_rid = self.next_rid, self.next_rid + 1
        request = Request(rid, list(prompt), max_new_tokens, sampling=sampling, session=session,
                          end_session=end_session, stop_ids=stop_ids)  # fmt: skip
        job = Job(request, on_token, on_done, on_error, is_cancelled, on_step, start_session)
        self.inbox.put(job)

    def refuse(self, on_error: Callable[[Exception], None], error: Exception) -> None:
        """Answer a request that never joins the loop (any thread): its count and its error go
        out on the sender thread, as every other request's (a metric is updated from that thread
        only)."""
        self.outbox.put((self.metrics.finished, False))
        self.outbox.put((on_error, error))

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
                # (waiting for the sender a short while at most: the inbox and drain are seen)
                if self.batcher.busy and self.step_slots.acquire(timeout=0.05):
                    try:
                        self._step()
                    finally:  # the sender frees the slot once it has sent this step's tokens
                        self.outbox.put((self.step_slots.release,))
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
        """Stop the requests the sender found cancelled, and have it check the running ones
        again (one check at a time: it waits behind the tokens already queued)."""
        while True:
            try:
                rid = self.cancelled.get_nowait()
            except queue.Empty:
                break
            job = self.jobs.pop(rid, None)
            if job is not None:
                self.batcher.cancel(rid)
                self._reply(job, job.on_error, Cancelled("the request was cancelled"))
        if self.jobs and not self.checking.is_set():
            self.checking.set()
            checks = [(rid, job.is_cancelled) for rid, job in self.jobs.items()]
            self.outbox.put((self._check_cancelled, checks))

    def _check_cancelled(self, checks: list[tuple[int, Callable[[], bool]]]) -> None:
        """On the sender thread: which requests were cancelled (a check that raises: the
        client is gone)."""
        self.checking.clear()
        for rid, is_cancelled in checks:
            try:
                cancelled = is_cancelled()
            except Exception:
                cancelled = True
            if cancelled:
                self.cancelled.put(rid)

    def _step(self) -> None:
        events = self.batcher.step()
        now = time.monotonic()
        firsts, gaps = [], []  # seconds to first tokens, between tokens
        for request, token, finished in events:
            job = self.jobs.get(request.rid)
            if job is None:
                continue
            if request.error is not None:
                del self.jobs[request.rid]
                self._reply(job, job.on_error, request.error)
                continue
            if job.last_token is None:
                firsts.append(now - job.submitted)
            else:
                gaps.append(now - job.last_token)
            job.last_token = now
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
        if firsts or gaps:
            self.outbox.put((self._record_tokens, firsts, gaps))

    def _record_tokens(self, firsts: list[float], gaps: list[float]) -> None:
        for seconds in firsts:
            self.metrics.first_token(seconds)
        for seconds in gaps:
            self.metrics.inter_token(seconds)
        self.metrics.tokens(len(firsts) + len(gaps))

    def _reply(self, job: Job, callback: Callable, *args) -> None:
        self.outbox.put((self.metrics.finished, callback is job.on_done))
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
        """The load and the pool's use, to the metrics when they changed or LOAD_REPORT_S passed
        (the rate of tokens is worked out from the reports)."""
        b = self.batcher
        running = sum(r is not None for r in b.rows)
        rows = len({i for i, r in enumerate(b.rows) if r is not None} | b.kept_rows())
        load = (running, len(b.waiting), rows, len(b.sessions))
        report = b.pool_report()
        now = time.monotonic()
        if self.last_load and self.last_load[1:] == (load, report):
            if now - self.last_load[0] < LOAD_REPORT_S:
                return
        self.last_load = (now, load, report)
        self.outbox.put((self._record_load, load, report))

    def _record_load(self, load: tuple[int, int, int, int], report: dict | None) -> None:
        self.metrics.load(*load)
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
