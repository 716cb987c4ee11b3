"""Continuous batching over one preallocated state of max_batch rows.

Requests wait in a queue, take the lowest free row (which is reset), prefill in chunks, decode one
token per step, and leave at EOS, a stop token or max_new_tokens, freeing the row for the next one.
A step either advances the rows still prefilling or decodes the others, and it runs only the
range of rows that have work: one request in a 16-row batcher costs one row, not sixteen (rows
between two working ones take 0 tokens).

A request with a `session` keeps its row (and so its memory state) after it finishes; the next
request of that session continues from it, until one with `end_session` finishes or the session
is released. A session that cannot get a row is refused alone. A request can be cancelled at any
time; one whose logits go non-finite, or whose step raises, fails alone: the other rows' states
are untouched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from mosaicrt.errors import BackendError, CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend, nonfinite_error
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.sampling import Sampler, SamplingParams


@dataclass
class Request:
    """One generation request and its progress through the batch."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens consumed so far
    sampling: SamplingParams | None = None  # None: the batcher's
    session: object | None = None
    end_session: bool = False
    stop_ids: frozenset[int] = frozenset()  # tokens that end the request (kept in the output)
    error: MosaicError | None = None  # why it stopped early, if it failed

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass
class Session:
    """A conversation that keeps its row of the state between requests."""

    row: int
    tokens: int = 0  # tokens the row has consumed
    pending: list[int] = field(default_factory=list)  # generated, not yet consumed


Event = tuple[Request, "int | None", bool]  # (request, token or None if it failed, finished)


class ContinuousBatcher:
    def __init__(
        self,
        backend: Backend,
        sampling: SamplingParams,
        limits: RunLimits,
        ignore_eos: bool = False,
    ) -> None:
        self.backend, self.limits = backend, limits
        self.sampler = Sampler(sampling)
        self.state = backend.new_state(limits.max_batch, limits.max_context)
        self.rows: list[Request | None] = [None] * limits.max_batch
        self.waiting: deque[Request] = deque()
        self.eos = None if ignore_eos else backend.config.eos_token_id  # benchmarks ignore EOS
        self.sessions: dict[object, Session] = {}  # open sessions and the rows they keep

    # -- admission ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request that passed check_request; a session's is checked here (its context,
        and a row for a new session), and refused with a CapacityError."""
        self.check_session(request)
        self.waiting.append(request)

    def check_session(self, request: Request) -> None:
        session = self.sessions.get(request.session)
        if session is None:
            if request.session is not None and self.free_rows() == 0:
                raise CapacityError(
                    f"all {len(self.rows)} rows hold open sessions: end one (session_end) or "
                    "wait until one expires"
                )
            return
        total = session.tokens + len(session.pending) + len(request.prompt)
        total += request.max_new_tokens
        if total > self.limits.max_context:
            raise CapacityError(
                f"the session would reach {total} tokens ({session.tokens} so far) but the "
                f"context limit is {self.limits.max_context}: end the session and start a new one"
            )

    def free_rows(self) -> int:
        """Rows a new session could still keep: not kept by one, not reserved by a waiting one."""
        kept = {s.row for s in self.sessions.values()}
        new_sessions = {r.session for r in self.waiting if r.session is not None}
        return len(self.rows) - len(kept) - len(new_sessions - set(self.sessions))

    def release(self, session: object) -> None:
        """Close a session and free its row (no-op for an unknown one)."""
        self.sessions.pop(session, None)

    def cancel(self, rid: int) -> Request | None:
        """Stop a request now, waiting or running; its row is free for the next (a session's
        state is dropped: a cancelled turn leaves it half-consumed). Returns it, if found."""
        for request in self.waiting:
            if request.rid == rid:
                self.waiting.remove(request)
                self.sessions.pop(request.session, None)
                return request
        for row, request in enumerate(self.rows):
            if request is not None and request.rid == rid:
                self._free(row)
                return request
        return None

    def finish(self, rid: int) -> None:
        """End a running request as complete now (a stop string seen by the caller): its
        session, if any, continues from what it consumed, like a request that reached its limit."""
        for row, request in enumerate(self.rows):
            if request is not None and request.rid == rid:
                self.rows[row] = None
                self.sampler.finish(rid)
                self._finish_turn(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def _admit(self) -> None:
        kept = {s.row for s in self.sessions.values()}
        fresh, placed = [], []
        for request in self.waiting:
            session = self.sessions.get(request.session)
            if session is not None:  # a continuation: its own row, once the last turn is done
                if self.rows[session.row] is not None:
                    continue
                row = session.row
                request.prompt = session.pending + request.prompt
                session.pending = []
            else:
                free = [i for i, r in enumerate(self.rows) if r is None and i not in kept]
                if not free:
                    continue
                row = free[0]  # the lowest: working rows stay together
                fresh.append(row)
                if request.session is not None:
                    self.sessions[request.session] = Session(row)
                    kept.add(row)
            self.rows[row] = request
            self.sampler.start(request.rid, request.sampling)
            placed.append(request)
        for request in placed:
            self.waiting.remove(request)
        if fresh:
            mask = torch.zeros(len(self.rows), dtype=torch.bool)
            mask[fresh] = True
            self.backend.reset(self.state, mask)

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Run one model step; return (request, new token, finished) for each token produced, and
        (request, None, True) for each request that failed in it (request.error says why)."""
        self._admit()
        prefill = any(r is not None and r.prefilling for r in self.rows)
        feeds = {}
        for i, r in enumerate(self.rows):
            if r is not None and r.prefilling == prefill:
                feeds[i] = (
                    r.prompt[r.fed : r.fed + self.limits.prefill_chunk]
                    if prefill
                    else [r.output[-1]]
                )
        if not feeds:
            return []
        lo, hi = min(feeds), max(feeds) + 1  # the range of rows that have work
        lengths = torch.tensor([len(feeds.get(i, ())) for i in range(lo, hi)], dtype=torch.int64)
        ids = torch.zeros(hi - lo, int(lengths.max()), dtype=torch.int64)
        for i, f in feeds.items():
            ids[i - lo, : len(f)] = torch.tensor(f, dtype=torch.int64)
        try:
            logits = self.backend.step(ids, lengths, self.state, True, rows=slice(lo, hi))
        except Exception as exc:  # the step failed: its requests fail, the other rows are intact
            error = exc if isinstance(exc, MosaicError) else BackendError(f"model failure: {exc}")
            return [self.fail(i, error) for i in feeds]
        return self._advance(feeds, logits, lo, prefill)

    def _advance(self, feeds: dict, logits: torch.Tensor, lo: int, prefill: bool) -> list[Event]:
        finite = logits.isfinite().all(dim=-1)  # (rows,)
        ready, events = [], []
        for i, f in feeds.items():
            r = self.rows[i]
            r.fed += len(f) if prefill else 0
            if not finite[i - lo]:  # this row's numbers overflowed: it fails alone
                events.append(self.fail(i, nonfinite_error(self.backend, self.state, i)))
            elif not r.prefilling:
                ready.append(i)
        rows = [i - lo for i in ready]
        tokens = self.sampler(logits[rows], [self.rows[i].rid for i in ready]) if ready else []
        for i, token in zip(ready, tokens):
            r = self.rows[i]
            r.output.append(token)
            finished = token == self.eos or token in r.stop_ids or len(r.output) >= r.max_new_tokens
            events.append((r, token, finished))
            if finished:
                self.rows[i] = None
                self.sampler.finish(r.rid)
                self._finish_turn(r)
        return events

    def fail(self, row: int, error: MosaicError) -> Event:
        """End the request in `row` with an error; its row (and session) is freed."""
        request = self.rows[row]
        request.error = error
        self._free(row)
        return request, None, True

    def _free(self, row: int) -> None:
        request = self.rows[row]
        self.rows[row] = None
        self.sampler.finish(request.rid)
        self.sessions.pop(request.session, None)  # its state is no longer one to continue

    def _finish_turn(self, request: Request) -> None:
        session = self.sessions.get(request.session)
        if session is None:
            return
        if request.end_session:
            del self.sessions[request.session]
            return
        # The row has consumed the prompt and every new token but the last, which the next turn
        # feeds first: the session then equals one pass over all its tokens.
        session.tokens += len(request.prompt) + len(request.output) - 1
        session.pending = [request.output[-1]]


def check_ids(ids, vocab_size: int, what: str) -> None:
    """Raise InputError unless ids is a non-empty list of ints in [0, vocab)."""
    if len(ids) == 0:
        raise InputError(f"{what} is empty: give at least one token")
    bad = [
        i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size
    ]
    if bad:
        raise InputError(
            f"{what} has token id {bad[0]!r} outside [0, {vocab_size}): "
            "use the model's tokenizer or check the vocabulary size"
        )


def check_request(
    ids, max_new_tokens: int, vocab_size: int, limits: RunLimits, what: str, serving: bool = False
) -> None:
    """Token ids in range, and room for the prompt and max_new_tokens; the messages name the
    command line's option, or (serving) the request's fields."""
    check_ids(ids, vocab_size, what)
    total = len(ids) + max_new_tokens
    if total > limits.max_context:
        fix = ("lower max_new_tokens or shorten the prompt" if serving
               else "raise --max-context or shorten the request")  # fmt: skip
        limit = "the server's context limit" if serving else "--max-context"
        raise CapacityError(
            f"{what} needs {total} tokens ({len(ids)} prompt + {max_new_tokens} new) "
            f"but {limit} is {limits.max_context}: {fix}"
        )
