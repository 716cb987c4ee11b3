"""Batched scoring and generation over any backend, with requests validated at admission.

A bad request (empty, ids out of range, too long for the context) gets its own error and never
stops the others: results come back in request order, each a token list or a MosaicError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from mosaicrt.errors import CapacityError, InputError, MosaicError
from mosaicrt.runtime.backend import Backend, nonfinite_error, torch_threads_for
from mosaicrt.runtime.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class RunLimits:
    max_batch: int = 8  # sequences decoded together
    max_context: int = 4096  # tokens one sequence may hold (prompt + generated)
    prefill_chunk: int = 512  # prompt tokens consumed per step

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_context", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
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
    ids: Sequence[int], max_new_tokens: int, vocab_size: int, limits: RunLimits, what: str
) -> None:
    check_ids(ids, vocab_size, what)
    total = len(ids) + max_new_tokens
    if total > limits.max_context:
        raise CapacityError(
            f"{what} needs {total} tokens ({len(ids)} prompt + {max_new_tokens} new) "
            f"but --max-context is {limits.max_context}: raise --max-context or "
            "shorten the request"
        )


@dataclass
class Request:
    """One generation request and its progress through the batch.

    A request with a `session` keeps its row (and so its memory state) after it finishes; the next
    request of that session continues from it instead of starting over, until one with
    `end_session` finishes or the session is released."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens consumed so far
    sampling: SamplingParams | None = None  # None: the batcher's
    session: object | None = None
    end_session: bool = False
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


class ContinuousBatcher:
    """Continuous batching over one preallocated state of max_batch rows.

    Requests wait in a queue, take a free row (which is reset), prefill in chunks, decode one token
    per step, and leave at EOS or max_new_tokens, freeing the row for the next request. A step
    either advances the rows still prefilling (the others take 0 tokens) or decodes every row.
    """

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

    def submit(self, request: Request) -> None:
        """Queue a request that passed check_request (for a session: check_session too)."""
        self.waiting.append(request)

    def check_session(self, request: Request) -> None:
        """Refuse a continuation that would overflow its row's context."""
        session = self.sessions.get(request.session)
        if session is None:
            return
        total = session.tokens + len(session.pending) + len(request.prompt)
        total += request.max_new_tokens
        if total > self.limits.max_context:
            raise CapacityError(
                f"the session would reach {total} tokens ({session.tokens} so far) but "
                f"--max-context is {self.limits.max_context}: end the session and start a new one"
            )

    def release(self, session: object) -> None:
        """Close a session and free its row (no-op for an unknown one)."""
        self.sessions.pop(session, None)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def _admit(self) -> None:
        kept = {s.row for s in self.sessions.values()}
        fresh, placed = [], []
        for request in self.waiting:
            session = self.sessions.get(request.session)
            if session is not None:  # a continuation: its own row, once the last turn is done
                row = session.row if self.rows[session.row] is None else None
                if row is not None:
                    request.prompt = session.pending + request.prompt
                    session.pending = []
            else:
                row = next(
                    (i for i, r in enumerate(self.rows) if r is None and i not in kept), None
                )
                if row is not None:
                    fresh.append(row)
                    if request.session is not None:
                        self.sessions[request.session] = Session(row)
                        kept.add(row)
            if row is None:
                continue
            self.rows[row] = request
            self.sampler.start(request.rid, request.sampling)
            placed.append(request)
        for request in placed:
            self.waiting.remove(request)
        if fresh:
            mask = torch.zeros(len(self.rows), dtype=torch.bool)
            mask[fresh] = True
            self.backend.reset(self.state, mask)

    def step(self) -> list[tuple[Request, int | None, bool]]:
        """Run one model step; return (request, new token, finished) for each token produced, and
        (request, None, True) for a request that failed in it (request.error says why)."""
        self._admit()
        B = len(self.rows)
        prefill = any(r is not None and r.prefilling for r in self.rows)
        feeds: list[list[int]] = [[] for _ in range(B)]
        for i, r in enumerate(self.rows):
            if r is None:
                continue
            if prefill and r.prefilling:
                feeds[i] = r.prompt[r.fed : r.fed + self.limits.prefill_chunk]
            elif not prefill:
                feeds[i] = [r.output[-1]]
        lengths = torch.tensor([len(f) for f in feeds], dtype=torch.int64)
        ids = torch.zeros(B, int(lengths.max()), dtype=torch.int64)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f, dtype=torch.int64)
        logits = self.backend.step(ids, lengths, self.state, last_only=True)  # (B, V)
        finite = logits.isfinite().all(dim=-1)  # (B,)
        ready, events = [], []
        for i, r in enumerate(self.rows):
            if r is None or not feeds[i]:
                continue
            r.fed += len(feeds[i]) if prefill else 0
            if not finite[i]:  # this row's numbers overflowed: it fails alone
                events.append(self.fail(i, nonfinite_error(self.backend, self.state, i)))
            elif not r.prefilling:
                ready.append(i)
        tokens = self.sampler(logits[ready], [self.rows[i].rid for i in ready]) if ready else []
        for i, token in zip(ready, tokens):
            r = self.rows[i]
            r.output.append(token)
            finished = token == self.eos or len(r.output) >= r.max_new_tokens
            events.append((r, token, finished))
            if finished:
                self.rows[i] = None
                self.sampler.finish(r.rid)
                self._finish_turn(r)
        return events

    def fail(self, row: int, error: MosaicError) -> tuple[Request, None, bool]:
        """End the request in `row` with an error; its row (and session) is freed."""
        request = self.rows[row]
        request.error = error
        self.rows[row] = None
        self.sampler.finish(request.rid)
        self.sessions.pop(request.session, None)  # its state is no longer one to continue
        return request, None, True

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


def generate(
    backend: Backend,
    prompts: list[list[int] | MosaicError],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    limits: RunLimits = RunLimits(),
    progress: bool = False,
    on_start: Callable[[RunLimits], None] | None = None,
) -> list[list[int] | MosaicError]:
    """New tokens for every prompt (stopping at EOS, which is kept, or max_new_tokens). A prompt
    that is already an error (a bad input line) stays one, and keeps its place: prompt i is
    request i whatever the others are (its sampling seed is the batch's seed + i).

    on_start is called with the limits the state is sized for, once the requests are admitted and
    before the state is allocated (the CLI prints the memory plan there).
    """
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    results: list[list[int] | MosaicError] = []
    requests = []
    for i, ids in enumerate(prompts):
        try:
            if isinstance(ids, MosaicError):
                raise ids
            check_request(ids, max_new_tokens, backend.config.vocab_size, limits, "the prompt")
            requests.append(Request(i, list(ids), max_new_tokens))
            results.append(requests[-1].output)
        except MosaicError as exc:
            results.append(exc)
    if not requests:
        return results
    limits = replace(limits, max_batch=min(limits.max_batch, len(requests)))
    if on_start:
        on_start(limits)
    batcher = ContinuousBatcher(backend, sampling, limits)
    for request in requests:
        batcher.submit(request)
    with (
        torch_threads_for(backend),
        tqdm(
            total=len(requests) * max_new_tokens,
            desc="generating",
            unit="tok",
            disable=not progress,
        ) as bar,
    ):
        while batcher.busy:
            for request, token, finished in batcher.step():
                bar.update((token is not None) + (max_new_tokens - len(request.output)) * finished)
    for request in requests:
        if request.error is not None:
            results[request.rid] = request.error
    return results


def score(backend: Backend, ids: torch.Tensor, limits: RunLimits = RunLimits()) -> torch.Tensor:
    """Logits (B, T, V) fp32 of every position of ids (B, T), prefilled chunk by chunk."""
    B, T = ids.shape
    if B == 0 or T == 0:
        raise InputError(f"the token array has shape [{B}, {T}]: give at least one token")
    if T > limits.max_context:
        raise CapacityError(
            f"sequences of {T} tokens exceed --max-context {limits.max_context}: "
            "raise --max-context"
        )
    vocab = backend.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise InputError(f"token id {bad} is outside [0, {vocab}): check the vocabulary size")
    state = backend.new_state(B, T)
    parts = []
    with torch_threads_for(backend):
        for start in range(0, T, limits.prefill_chunk):
            chunk = ids[:, start : start + limits.prefill_chunk]  # (B, C)
            lengths = torch.full((B,), chunk.shape[1], dtype=torch.int64)
            logits = backend.step(chunk, lengths, state, last_only=False)  # (B, C, V)
            bad = (~logits.isfinite()).flatten(1).any(dim=1).nonzero()
            if len(bad):
                row = int(bad[0])
                raise InputError(f"sequence {row}: {nonfinite_error(backend, state, row)}")
            parts.append(logits)
    return torch.cat(parts, dim=1)
