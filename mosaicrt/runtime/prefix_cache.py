"""The prefix cache: the state after a prompt prefix, kept so that a later request with the same
prefix starts from it and prefills only the rest.

An MMv2 state splits into a small constant part per row (key recurrences, pending pair, STM ring)
and LTM pairs that never change once written. An entry at prefix length p keeps
    - a copy of the row's small state at p (the backend's snapshot),
    - the LTM blocks its pairs fill (tau <= p-2), held in the pool: shared, never copied,
    - when pair p-2 ends inside a block, a private copy of that block: the request that
      continues writes pair p-1 into its own copy of it.
Entries sit at multiples of the prefill chunk, where every prefill's chunks end anyway: a request
that starts from an entry steps through exactly the chunks it would have stepped through
alone, so its tokens are bit for bit the ones it would have produced. Entries are keyed by a hash
chained chunk by chunk, and evicted least recently used when the pool needs their blocks or
when there are more than `max_entries`. The same kind of entry parks a serving session's state
between its turns (keep_row, restore_row, release_entry), so that an idle session holds LTM blocks
but no row.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.paging import BlockTable


@dataclass
class CacheEntry:
    tokens: int  # prefix length p: the state has consumed tokens[:p]
    blocks: list[int]  # full LTM blocks (pairs tau < S * len(blocks)), held by the entry
    partial: int | None  # a pool block of the entry's own holding the last, partial block
    small: dict[str, Any]  # the backend's snapshot of the row's constant-size state at p


def prefix_keys(tokens: list[int], chunk: int) -> list[tuple[int, bytes]]:
    """(p, key of tokens[:p]) for p = chunk, 2 * chunk, ... <= len(tokens): a hash chained chunk
    by chunk, so that every prefix's key costs one chunk's hashing."""
    keys, key = [], b""
    ids = np.asarray(tokens, np.int64)
    for p in range(chunk, len(tokens) + 1, chunk):
        key = hashlib.blake2b(key + ids[p - chunk : p].tobytes(), digest_size=16).digest()
        keys.append((p, key))
    return keys


def stored_blocks(tokens: int, block: int) -> tuple[int, int]:
    """(full LTM blocks, pairs in the partial last one) of a row that has consumed `tokens`
    tokens: it has stored tokens - 1 pairs (the newest token's pair waits for its value)."""
    return divmod(max(tokens - 1, 0), block)


def keep_row(
    backend: Backend, state: Any, table: BlockTable, row: int, room: Callable[[int], bool]
) -> CacheEntry | None:
    """Row `row`'s state as an entry: a snapshot of its small state, its full LTM blocks held
    (shared, not copied), its partial last block copied into a block of the entry's own. None
    when no block is free for that copy even after room(1), which may evict to make one."""
    pool = table.pool
    small = backend.snapshot(state, row)
    p = int(small["pos"])
    full, rest = stored_blocks(p, table.block)
    partial = None
    if rest:
        if pool.free == 0 and not room(1):
            return None
        [partial] = pool.take(1)
        backend.copy_block(state, int(table.table[row, full]), partial, rest)
    blocks = table.row_blocks(row)[:full]
    pool.hold(blocks)
    return CacheEntry(p, blocks, partial, small)


def restore_row(backend: Backend, state: Any, table: BlockTable, entry: CacheEntry, row: int):
    """Start `row` (holding no blocks) from an entry: its blocks shared, its partial block
    copied into a block of the row's own, its small state put back. The entry is unchanged."""
    table.share(row, entry.blocks)
    if entry.partial is not None:
        [own] = table.pool.take(1)
        backend.copy_block(state, entry.partial, own, stored_blocks(entry.tokens, table.block)[1])
        table.append(row, own)
    backend.restore(state, row, entry.small)


def release_entry(table: BlockTable, entry: CacheEntry) -> None:
    """Give back the blocks an entry holds."""
    own = [entry.partial] if entry.partial is not None else []
    table.pool.release(entry.blocks + own)


class PrefixCache:
    """Entries keyed by the prompt prefix they hold, over one batcher's state and block table;
    at most max_entries, least recently used evicted first."""

    def __init__(self, backend: Backend, state: Any, table: BlockTable, max_entries: int) -> None:
        self.backend, self.state, self.table = backend, state, table
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, CacheEntry] = OrderedDict()  # oldest use first
        self.hits = 0  # requests started from an entry

    def lookup(self, keys: list[tuple[int, bytes]], tokens: int) -> CacheEntry | None:
        """The longest entry among `keys` that leaves at least one of `tokens` to prefill (the
        last token's logits must come from a step)."""
        for p, key in reversed(keys):
            entry = self.entries.get(key)
            if p < tokens and entry is not None:
                self.entries.move_to_end(key)
                return entry
        return None

    def insert(self, key: bytes, row: int) -> None:
        """Keep the state of `row`, which has just consumed the prefix `key` names."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        entry = keep_row(self.backend, self.state, self.table, row, self.evict)
        if entry is None:
            return  # no block to copy the partial one into: not cached
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.evict_oldest()

    def restore(self, entry: CacheEntry, row: int) -> None:
        """Start `row` (holding no blocks) from an entry: its blocks shared, its partial block
        copied into a block of the row's own, its small state put back."""
        self.hits += 1
        restore_row(self.backend, self.state, self.table, entry, row)

    def evict(self, free: int, keep: CacheEntry | None = None) -> bool:
        """Evict least recently used entries (never `keep`) until the pool has `free` free
        blocks; False when that was not enough."""
        for key in list(self.entries):
            if self.table.pool.free >= free:
                break
            if self.entries[key] is not keep:
                self._drop(key)
        return self.table.pool.free >= free

    def evict_oldest(self) -> None:
        self._drop(next(iter(self.entries)))

    def _drop(self, key: bytes) -> None:
        release_entry(self.table, self.entries.pop(key))

    def blocks_held(self) -> set[int]:
        """The pool blocks the entries hold."""
        own = {e.partial for e in self.entries.values() if e.partial is not None}
        return own.union(*(e.blocks for e in self.entries.values()))
