"""Continuous batching in a background thread: requests from any thread join the running batch,
and each gets its tokens back through callbacks as they are produced.

The batcher (and so the backend and its state) is touched by the loop thread only; other threads
talk to it through a queue. A request that is refused (bad ids, over capacity) gets its error
through its own callback and never disturbs the others.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mosaicrt.errors import MosaicError
from mosaicrt.runtime.backend import Backend, torch_threads_for
from mosaicrt.runtime.generator import ContinuousBatcher, Request, RunLimits, check_request
from mosaicrt.runtime.sampling import SamplingParams


@dataclass
class Job:
    """A request and where its results go."""

    request: Request
    on_token: Callable[[int], None]
    on_done: Callable[[], None]
    on_error: Callable[[Exception], None]
    start_session: bool = False


class ServingLoop:
    def __init__(
        self, backend: Backend, limits: RunLimits, idle_timeout_s: float | None = None
    ) -> None:
        self.backend, self.limits, self.idle_timeout_s = backend, limits, idle_timeout_s
        self.batcher = ContinuousBatcher(backend, SamplingParams(), limits)
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.last_used: dict[object, float] = {}  # session -> time of its last token
        self.next_rid = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mosaicrt-serving", daemon=True)
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
    ) -> None:
        """Queue a request (any thread). A session's request continues its earlier turns unless
        start_session; end_session closes it when this turn finishes."""
        what = "input_ids"
        try:
            if max_new_tokens < 1:
                raise MosaicError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            check_request(prompt, max_new_tokens, self.backend.config.vocab_size, self.limits, what)
        except MosaicError as exc:
            on_error(exc)
            return
        with self.lock:
            rid, self.next_rid = self.next_rid, self.next_rid + 1
        request = Request(rid, list(prompt), max_new_tokens, sampling=sampling, session=session,
                          end_session=end_session)  # fmt: skip
        self.inbox.put(Job(request, on_token, on_done, on_error, start_session))

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def _accept(self, job: Job) -> None:
        request = job.request
        if request.session is not None and job.start_session:
            self.batcher.release(request.session)  # START begins the session afresh
        try:
            self.batcher.check_session(request)
        except MosaicError as exc:
            job.on_error(exc)
            return
        self.jobs[request.rid] = job
        self.batcher.submit(request)

    def _run(self) -> None:
        with torch_threads_for(self.backend):
            while self._drain(wait=not self.batcher.busy):
                if self.batcher.busy:
                    self._step()
                self._expire_sessions()

    def _drain(self, wait: bool) -> bool:
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

    def _step(self) -> None:
        try:
            events = self.batcher.step()
        except Exception as exc:  # the backend failed: every request in flight learns it
            for job in self.jobs.values():
                job.on_error(exc)
            self.jobs.clear()
            self.batcher = ContinuousBatcher(self.backend, SamplingParams(), self.limits)
            return
        now = time.monotonic()
        for request, token, finished in events:
            job = self.jobs[request.rid]
            if request.error is not None:
                del self.jobs[request.rid]
                job.on_error(request.error)
                continue
            job.on_token(token)
            if request.session is not None:
                self.last_used[request.session] = now
            if finished:
                del self.jobs[request.rid]
                job.on_done()

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
