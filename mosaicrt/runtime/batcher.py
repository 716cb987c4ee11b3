"""Continuous batching over one preallocated state of max_batch rows.

Requests wait in a queue, take the lowest free row (which is reset), prefill in chunks, decode one
token per step, and leave at EOS, a stop token or max_new_tokens, freeing the row for the next one.
A step either advances rows still prefilling (a chunk each, over PREFILL_CHUNKS_PER_STEP rows at
most) or decodes the others, alternating while both wait, and it runs only the range of rows
that have work: one request in a 16-row batcher costs one row, not sixteen (rows between two
working ones take 0 tokens). Prefill chunks end at multiples of the prefill chunk.

When the backend keeps the LTM in a pool of blocks (runtime.paging), rows are cheap and blocks
are the budget: a request is admitted when the pool has the blocks for its prompt, and gives
them back when it ends. When the pool runs dry mid-decode, the prefix cache gives back its
entries first, then the youngest running request is preempted: its blocks are freed and it goes
back to the head of the queue, to be prefilled again and to replay the tokens it had produced
one decode step at a time, so that it resumes bit for bit where it stopped (its sampler's random
stream included). The prefix cache (runtime.prefix_cache) starts a request from the state after
the longest prompt prefix another request has prefilled; a request whose first chunk a running
one is still prefilling waits for it.

A request with a `session` keeps its memory state after it finishes; the next request of that
session continues from it, until one with `end_session` finishes or the session is released. With
a pool of blocks, an idle session holds no row: its state is parked like a prefix-cache entry (its
LTM blocks held, its small state copied), and its next turn starts in any free row from there.
Parked states give their blocks back after the prefix cache's, least recently parked first; a
session whose state was given back is prefilled again from its tokens, which it keeps. Without a
pool, a session keeps its row between turns, and one that cannot get a row is refused alone. A
request can be cancelled at any
time; one whose logits go non-finite, or whose step raises, fails alone: the other rows' states
are untouched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend, Logits, nonfinite_error
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.paging import OutOfBlocks, blocks_for, pool_report, run_plan
from mosaicrt.runtime.prefix_cache import (
    CacheEntry,
    PrefixCache,
    keep_row,
    prefix_keys,
    release_entry,
    restore_row,
)
from mosaicrt.runtime.sampling import Sampler, SamplingParams, host_logits

PREFILL_CHUNKS_PER_STEP = 8  # rows a prefill step spans at most (a chunk each)


@dataclass
class Request:
    """One generation request and its progress through the batch."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of prompt + output consumed so far
    sampling: SamplingParams | None = None  # None: the batcher's
    session: object | None = None
    end_session: bool = False
    stop_ids: frozenset[int] = frozenset()  # tokens that end the request (kept in the output)
    error: MosaicError | None = None  # why it stopped early, if it failed
    admitted: int = -1  # admission order (the first admission's, kept across preemptions)
    keys: list[tuple[int, bytes]] | None = None  # prefix-cache keys of the prompt's chunks

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def sampling_next(self) -> bool:
        """Has it consumed every token it knows (so the next step's logits give a new one)?"""
        return self.fed == len(self.prompt) + len(self.output)


@dataclass
class Session:
    """A conversation's state between its requests: in the row it keeps (no pool of blocks) or,
    with a pool, parked between turns (row None)."""

    row: int | None  # the row it keeps, or runs in
    history: list[int] = field(default_factory=list)  # every token its state has consumed
    pending: list[int] = field(default_factory=list)  # generated, not yet consumed
    parked: CacheEntry | None = None  # its state between turns, with a pool of blocks
    parked_at: int = 0  # order of parking: the oldest parked state gives its blocks back first

    @property
    def tokens(self) -> int:
        return len(self.history)


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
        self.state = new_batch_state(backend, limits)
        self.table = backend.block_table(self.state)  # None: one store per row, no paging
        self.cache = None
        entries = run_plan(backend, limits).cache_entries if self.table is not None else 0
        self.row_copies = entries  # copies of rows the plan budgets: cache entries, parked states
        if entries:  # the prefix cache, when on and the budget leaves it room
            self.cache = PrefixCache(backend, self.state, self.table, entries)
        self.rows: list[Request | None] = [None] * limits.max_batch
        self.waiting: deque[Request] = deque()
        self.eos = None if ignore_eos else backend.config.eos_token_id  # benchmarks ignore EOS
        self.sessions: dict[object, Session] = {}  # open sessions
        self.admissions = self.preemptions = self.peak_running = self.parkings = 0
        self.unparked = 0  # parked session states given back for their blocks
        self.last_prefill = False  # was the last step a prefill step?

    # -- admission ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request that passed check_request; a session's is checked here (its context,
        and a row for a new session), and one the state pool cannot hold even alone is refused,
        with a CapacityError."""
        self.check_session(request)
        if self.table is not None:
            tokens = len(request.prompt) + request.max_new_tokens
            need, pool = blocks_for(tokens, self.table.block), self.table.pool
            if need > pool.total:
                raise CapacityError(
                    f"a request of {tokens} tokens needs {need} LTM blocks but the state pool "
                    f"holds {pool.total}: raise --state-memory or shorten the request"
                )
        self.waiting.append(request)

    def pool_report(self) -> dict | None:
        """The state pool's blocks, cache hits and preemptions so far (None: no pool)."""
        if self.table is None:
            return None
        hits = self.cache.hits if self.cache else 0
        report = pool_report(self.table.pool, self.backend.state_sizes(), hits, self.preemptions)
        return report | {"peak_running": self.peak_running}

    def check_session(self, request: Request) -> None:
        session = self.sessions.get(request.session)
        if session is None:
            if request.session is not None and self.table is None and self.free_rows() == 0:
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
        new_sessions = {r.session for r in self.waiting if r.session is not None}
        return len(self.rows) - len(self.kept_rows()) - len(new_sessions - set(self.sessions))

    def kept_rows(self) -> set[int]:
        return {s.row for s in self.sessions.values() if s.row is not None}

    def release(self, session: object) -> None:
        """Close a session and free its state (no-op for an unknown one)."""
        closed = self._close_session(session)
        if closed is None or closed.row is None or self.rows[closed.row] is not None:
            return  # parked (its blocks are back) or running (freed when its turn ends)
        if self.table is not None:
            self._reset(closed.row)  # its LTM blocks back to the pool

    def _close_session(self, session: object) -> Session | None:
        """Forget a session; a parked state gives its blocks back."""
        closed = self.sessions.pop(session, None)
        if closed is not None and closed.parked is not None:
            release_entry(self.table, closed.parked)
            closed.parked = None
        return closed

    def cancel(self, rid: int) -> Request | None:
        """Stop a request now, waiting or running; its row is free for the next (a session's
        state is dropped: a cancelled turn leaves it half-consumed). Returns it, if found."""
        for request in self.waiting:
            if request.rid == rid:
                self.waiting.remove(request)
                self._close_session(request.session)
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
                self._finish_turn(request, row)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def _admit(self) -> None:
        if not self.waiting:
            return
        kept = self.kept_rows()
        placed = []
        for request in self.waiting:
            session = self.sessions.get(request.session)
            entry = None
            if session is not None and self.table is None:  # its own row, once free
                if self.rows[session.row] is not None:
                    continue
                row = session.row
                request.prompt = session.pending + request.prompt
                session.pending = []
            elif session is not None:  # any free row, from its parked state or its tokens
                free = [i for i, r in enumerate(self.rows) if r is None and i not in kept]
                if not free or session.row is not None:  # its last turn is still running
                    continue
                entry = session.parked
                tokens = session.tokens + len(session.pending) + len(request.prompt)
                shared = len(entry.blocks) if entry is not None else 0
                if not self._room(blocks_for(tokens, self.table.block) - shared, entry):
                    break
                row = free[0]
                self._reset(row)
                if entry is not None:
                    restore_row(self.backend, self.state, self.table, entry, row)
                    release_entry(self.table, entry)  # the row holds its blocks now
                    session.parked, entry = None, None
                    request.prompt = session.pending + request.prompt
                else:  # its parked state was given back: prefill every token again
                    request.prompt = session.history + session.pending + request.prompt
                    session.history = []
                session.pending, session.row = [], row
            else:
                free = [i for i, r in enumerate(self.rows) if r is None and i not in kept]
                if not free:
                    continue
                if self.table is not None:
                    if self._shares_a_running_prefill(request):
                        continue
                    entry = self._cached_prefix(request)
                    tokens = len(request.prompt) + len(request.output)
                    shared = len(entry.blocks) if entry is not None else 0
                    if not self._room(blocks_for(tokens, self.table.block) - shared, entry):
                        break  # first come, first served: wait for blocks
                row = free[0]  # the lowest: working rows stay together
                self._reset(row)
                if entry is not None:
                    self.cache.restore(entry, row)
                    request.fed = entry.tokens
                if request.session is not None:
                    self.sessions[request.session] = Session(row)
                    if self.table is None:
                        kept.add(row)
            self.rows[row] = request
            if request.admitted < 0:  # a preempted request keeps its sampler's stream
                request.admitted = self.admissions
                self.admissions += 1
                self.sampler.start(request.rid, request.sampling)
            placed.append(request)
        for request in placed:
            self.waiting.remove(request)
        running = sum(r is not None for r in self.rows)
        self.peak_running = max(self.peak_running, running)

    def _reset(self, row: int) -> None:
        """Free one row's state (and its LTM blocks)."""
        mask = torch.zeros(len(self.rows), dtype=torch.bool)
        mask[row] = True
        self.backend.reset(self.state, mask)

    def _room(self, need: int, entry: CacheEntry | None = None) -> bool:
        """Are `need` LTM blocks free? If not, prefix-cache entries, then parked session
        states (least recently parked first), other than `entry`, give theirs back."""
        if self.table.pool.free >= need:
            return True
        if self.cache is not None and self.cache.evict(need, keep=entry):
            return True
        for session in self._parked_oldest_first():
            if session.parked is entry:
                continue
            self._unpark(session)
            if self.table.pool.free >= need:
                return True
        return False

    def _parked_oldest_first(self) -> list[Session]:
        parked = (s for s in self.sessions.values() if s.parked is not None)
        return sorted(parked, key=lambda s: s.parked_at)

    def _unpark(self, session: Session) -> None:
        """Give a parked state's blocks back: the session's next turn prefills its tokens again."""
        release_entry(self.table, session.parked)
        session.parked = None
        self.unparked += 1

    def _trim_row_copies(self) -> None:
        """Parked states and prefix-cache entries share the row copies the plan budgets: past
        that count, cache entries go first, then the oldest parked states."""
        parked = self._parked_oldest_first()
        cached = len(self.cache.entries) if self.cache is not None else 0
        while parked and len(parked) + cached > self.row_copies:
            if cached:
                self.cache.evict_oldest()
                cached -= 1
            else:
                self._unpark(parked.pop(0))

    def _keys(self, request: Request) -> list[tuple[int, bytes]]:
        if request.keys is None:
            request.keys = prefix_keys(request.prompt, self.limits.prefill_chunk)
        return request.keys

    def _cached_prefix(self, request: Request):
        """The prefix-cache entry a fresh request starts from, if any."""
        if self.cache is None or request.session is not None:
            return None
        return self.cache.lookup(self._keys(request), len(request.prompt))

    def _shares_a_running_prefill(self, request: Request) -> bool:
        """Is a running request prefilling the same first chunk (whose state this one should
        wait for, to start from the cache)?"""
        if self.cache is None or request.session is not None or request.output:
            return False
        keys = self._keys(request)
        return bool(keys) and any(
            r is not None and r.prefilling and r.session is None and self._keys(r)[:1] == keys[:1]
            for r in self.rows
        )

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Run one model step; return (request, new token, finished) for each token produced, and
        (request, None, True) for each request that failed in it (request.error says why)."""
        self._admit()
        events: list[Event] = []
        while True:
            prefill, feeds = self._work()
            if not feeds:
                return events
            lo, hi = min(feeds), max(feeds) + 1  # the range of rows that have work
            counts = [len(feeds.get(i, ())) for i in range(lo, hi)]
            width = max(counts)  # rows without work are padding, their length 0
            padded = [
                [*feeds.get(i, ()), *[0] * (width - n)] for i, n in zip(range(lo, hi), counts)
            ]
            ids = np.array(padded, np.int64)  # (rows, C)
            lengths = np.array(counts, np.int64)  # (rows,)
            try:
                logits = self.backend.step(
                    ids, lengths, self.state, True, rows=slice(lo, hi), device_logits=True
                )
            except OutOfBlocks as exc:  # nothing ran: make room, then step again
                events += self._make_room(exc)
                continue
            except Exception as exc:  # the step failed: its requests fail, the others are intact
                error = (
                    exc if isinstance(exc, MosaicError) else BackendError(f"model failure: {exc}")
                )
                return events + [self.fail(i, error) for i in feeds]
            return events + self._advance(feeds, logits, lo, prefill)

    def _work(self) -> tuple[bool, dict[int, list[int]]]:
        """(prefill?, tokens to feed by row): rows still prefilling, a chunk each (ending at a
        multiple of the prefill chunk), those among the PREFILL_CHUNKS_PER_STEP rows from the
        oldest one's (a step computes every row of its range, padding included); or every other
        row's next token. When rows of both kinds wait, steps alternate, so that prompts
        arriving all the time do not stall the tokens of running requests."""
        prefilling = [i for i, r in enumerate(self.rows) if r is not None and r.prefilling]
        decoding = [i for i, r in enumerate(self.rows) if r is not None and not r.prefilling]
        prefill = bool(prefilling) and not (decoding and self.last_prefill)
        self.last_prefill = prefill
        chunk, feeds = self.limits.prefill_chunk, {}
        if prefill:  # the rows of a step are a range, every row of it computed: keep it short
            first = min(prefilling, key=lambda i: self.rows[i].admitted)
            for i in prefilling:
                if first <= i < first + PREFILL_CHUNKS_PER_STEP:
                    r = self.rows[i]
                    feeds[i] = r.prompt[r.fed : (r.fed // chunk + 1) * chunk]
            return True, feeds
        for i in decoding:  # the last token produced, or one replayed after a preemption
            r = self.rows[i]
            feeds[i] = [r.output[r.fed - len(r.prompt)]]
        return False, feeds

    def _make_room(self, shortage: OutOfBlocks) -> list[Event]:
        """Free LTM blocks for a step the pool cannot serve: drop prefix-cache entries, else
        preempt the youngest running request that is not a session's (whose earlier turns could
        not be prefilled again); with none, the youngest fails."""
        if self._room(shortage.needed):  # cache entries, then parked sessions, oldest first
            return []
        running = [(r.admitted, i) for i, r in enumerate(self.rows) if r is not None]
        movable = [(n, i) for n, i in running if self.rows[i].session is None]
        if len(running) == 1 or not movable:  # nothing else to take blocks from
            return [self.fail(max(running)[1], shortage)]
        row = max(movable)[1]
        request = self.rows[row]
        self.rows[row] = None
        self._reset(row)
        request.fed = 0
        self.waiting.appendleft(request)
        self.preemptions += 1
        return []

    def _advance(self, feeds: dict, logits: Logits, lo: int, prefill: bool) -> list[Event]:
        finite, greedy = self.backend.scan_rows(logits)  # (rows,) each
        logits = host_logits(logits)  # (rows, V): numpy on the CPU
        ready, events = [], []
        for i, f in feeds.items():
            r = self.rows[i]
            r.fed += len(f)
            if not finite[i - lo]:  # this row's numbers overflowed: it fails alone
                events.append(self.fail(i, nonfinite_error(self.backend, self.state, i)))
                continue
            if prefill and self.cache is not None and r.session is None:
                self._cache_prefix(r, i)
            if r.sampling_next:
                ready.append(i)
        rows = [i - lo for i in ready]
        if rows != list(range(logits.shape[0])):  # some rows are still prefilling, or failed
            logits = logits[rows]
        rids, row_greedy = [self.rows[i].rid for i in ready], [greedy[r] for r in rows]
        tokens = self.sampler(logits, rids, row_greedy) if rows else []
        for i, token in zip(ready, tokens):
            r = self.rows[i]
            r.output.append(token)
            finished = token == self.eos or token in r.stop_ids or len(r.output) >= r.max_new_tokens
            events.append((r, token, finished))
            if finished:
                self.rows[i] = None
                self.sampler.finish(r.rid)
                self._finish_turn(r, i)
        return events

    def _cache_prefix(self, request: Request, row: int) -> None:
        """Keep the state of a row whose prefill has just reached a multiple of the chunk."""
        chunk = self.limits.prefill_chunk
        if request.fed % chunk == 0 and request.fed <= len(request.prompt):
            p, key = self._keys(request)[request.fed // chunk - 1]
            self.cache.insert(key, row)

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
        self._close_session(request.session)  # its state is no longer one to continue
        if self.table is not None:
            self._reset(row)  # its LTM blocks back to the pool

    def _finish_turn(self, request: Request, row: int) -> None:
        """A request ended complete: its session keeps the row or parks its state, else its
        blocks go back."""
        session = self.sessions.get(request.session)
        if session is None or request.end_session:
            self._close_session(request.session)
            if self.table is not None:
                self._reset(row)
            return
        # The row has consumed the prompt and every new token but the last, which the next turn
        # feeds first: the session then equals one pass over all its tokens.
        session.history += request.prompt + request.output[:-1]
        session.pending = [request.output[-1]]
        if self.table is not None:  # park the state; the row is free for anyone
            if self.row_copies:
                session.parked = keep_row(self.backend, self.state, self.table, row, self._room)
            self.parkings += 1
            session.parked_at, session.row = self.parkings, None
            self._reset(row)
            self._trim_row_copies()


def pool_blocks(backend: Backend, limits: RunLimits) -> int | None:
    """LTM pool blocks for these limits (runtime.paging.plan_state), or None for a static
    allocation. A budget that cannot hold the rows and one block is a CapacityError."""
    if limits.state_memory is None:
        return None
    plan = run_plan(backend, limits)
    if plan.blocks < 1 and plan.sizes.block_bytes:
        raise plan.sizes.budget_error(limits.state_memory, limits.max_batch, 2)
    return plan.blocks


def new_batch_state(backend: Backend, limits: RunLimits):
    """The state of a batcher: max_batch rows, the LTM pool sized by limits.state_memory."""
    return backend.new_state(limits.max_batch, limits.max_context, pool_blocks(backend, limits))


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
