"""The LTM pool: fixed-size blocks shared by every sequence, a block table per row, and the byte
accounting of the whole decode state.

An LTM store only grows, and a pair never changes once written (contract, "Decoding state"). So a
sequence's LTM is a list of blocks of S pairs taken from one pool as it grows and given back when
it ends, and a block written by one sequence can be read by another that shares its prefix (a
reference count per block says how many hold it). The constant-size part of a row's state (key
recurrences, pending pair, STM ring) stays per row.

    pool    P blocks; block p holds pairs of every layer and head (the backends' pool buffers)
    table   (B, NB) int64: row b's i-th block (pairs tau in [i*S, (i+1)*S)) is pool block
            table[b, i]; entries past the row's count point at block 0 and are never read (the
            positions mask them)

Everything here is host bookkeeping in numpy; the backends keep the pool buffers and feed the
table (mosaicrt.runtime.graph_state for the exported graph, mosaicrt.runtime.torch_paging for
the torch backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mosaicrt.errors import CapacityError
from mosaicrt.model.config import ModelConfig
from mosaicrt.model.state import human_bytes, pair_bytes


class OutOfBlocks(CapacityError):
    """The pool has fewer free blocks than a step needs (the batcher preempts and retries)."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed  # free blocks the step needs


def blocks_for(tokens: int, block: int) -> int:
    """LTM blocks a sequence of `tokens` tokens holds: its pairs tau <= tokens-2 are stored."""
    return -(-max(tokens - 1, 0) // block)


@dataclass(frozen=True)
class StateSizes:
    """Bytes of the decode state, by part (the contract's formulas; int8 and fp8 stores with
    their scales)."""

    block_bytes: int  # one pool block: S pairs of every layer, keys and values
    row_bytes: int  # one row's constant state: recurrences, pending pair, STM ring
    block: int  # pairs per block

    @classmethod
    def of(cls, config: ModelConfig, block: int, store_dtype: str) -> StateSizes:
        pair = pair_bytes(config, store_dtype)  # one pair of one memory, every head
        recurrence = len(config.memories) * (3 * config.memory_width + config.num_heads) * 4
        row = config.num_layers * (recurrence + pair * (config.stm_window - 1))
        ltm = config.num_layers * pair * block if config.use_ltm else 0
        return cls(block_bytes=ltm, row_bytes=row, block=block)

    def static_blocks(self, max_batch: int, max_context: int) -> int:
        """The pool of a static allocation: every row sized for max_context."""
        return max_batch * blocks_for(max_context, self.block)

    def budget_blocks(self, budget: int, max_batch: int) -> int:
        """Pool blocks a state budget of `budget` bytes holds after max_batch rows."""
        left = budget - max_batch * self.row_bytes
        return left // self.block_bytes if self.block_bytes and left > 0 else 0

    def budget_error(self, budget: int, max_batch: int, need_tokens: int) -> CapacityError:
        """The error for a budget that cannot hold even one sequence of need_tokens tokens."""
        need = max_batch * self.row_bytes + blocks_for(need_tokens, self.block) * self.block_bytes
        return CapacityError(
            f"--state-memory {human_bytes(budget)} cannot hold one sequence of {need_tokens} "
            f"tokens with {max_batch} rows (that needs {human_bytes(need)}): raise "
            "--state-memory, or lower --max-batch or --max-context"
        )


class BlockPool:
    """`total` blocks, each free or held by one or more holders (rows, prefix-cache entries)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.refs = np.zeros(total, np.int32)  # holders per block
        self.free_list = list(range(total - 1, -1, -1))  # popped from the end: lowest first
        self.peak_used = 0

    @property
    def free(self) -> int:
        return len(self.free_list)

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def shared(self) -> int:
        """Blocks with more than one holder."""
        return int((self.refs > 1).sum())

    def take(self, n: int) -> list[int]:
        """n free blocks, now held once; OutOfBlocks when fewer are free."""
        if n > self.free:
            raise OutOfBlocks(
                f"the state pool has {self.free} free LTM blocks and a step needs {n}: raise "
                "--state-memory or lower --max-batch",
                n,
            )
        blocks = [self.free_list.pop() for _ in range(n)]
        self.refs[blocks] = 1
        self.peak_used = max(self.peak_used, self.used)
        return blocks

    def hold(self, blocks) -> None:
        """One more holder of each of `blocks` (a prefix shared)."""
        np.add.at(self.refs, np.asarray(blocks, np.int64), 1)

    def release(self, blocks) -> None:
        """One holder fewer of each of `blocks`; a block nobody holds is free again."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_list.append(int(block))


class BlockTable:
    """Every row's LTM blocks in one pool: (B, NB) table and a block count per row."""

    def __init__(self, pool: BlockPool, batch: int, max_blocks: int, block: int) -> None:
        self.pool, self.block = pool, block
        self.table = np.zeros((batch, max(max_blocks, 1)), np.int64)  # (B, NB)
        self.count = np.zeros(batch, np.int64)  # (B,) blocks each row holds
        # [changes, changes when last copied to a device]: shared with the views
        self.versions = np.zeros(2, np.int64)
        self.fed: tuple = (None, None)  # (version and width, the array feed() gave)
        self.root = self  # the table of every row, which views of some rows share

    def view(self, rows: slice) -> BlockTable:
        """The table of a range of rows, as views: growing it grows this table."""
        table = BlockTable.__new__(BlockTable)
        table.pool, table.block, table.versions = self.pool, self.block, self.versions
        table.table, table.count = self.table[rows], self.count[rows]
        table.fed, table.root = (None, None), self.root
        return table

    def changed(self) -> None:
        self.versions[0] += 1

    def take_changes(self) -> bool:
        """Has the table changed since the last call (a device copy of it is stale)?"""
        stale = bool(self.versions[0] != self.versions[1])
        self.versions[1] = self.versions[0]
        return stale

    def row_blocks(self, row: int) -> list[int]:
        return self.table[row, : self.count[row]].tolist()

    def holds(self, ends: list[int]) -> bool:
        """Does every row already hold the blocks for ends (B,) tokens? (Most steps take no
        block: one check of all rows instead of a look at each.)"""
        return all(end <= n * self.block + 1 for end, n in zip(ends, self.count.tolist()))

    def shortfall(self, rows, reach) -> int:
        """Blocks the pool must still give so that each row in `rows` can hold `reach` tokens."""
        need = [blocks_for(int(r), self.block) - int(self.count[b]) for b, r in zip(rows, reach)]
        return sum(max(n, 0) for n in need)

    def grow(self, rows, reach) -> None:
        """Give each row in `rows` the blocks to hold `reach` (same length) tokens; all or none
        (OutOfBlocks leaves the table as it was)."""
        short = self.shortfall(rows, reach)
        if short == 0:
            return
        most = max(blocks_for(int(r), self.block) for r in reach)
        if most > self.table.shape[1]:
            raise CapacityError(
                f"a sequence would reach {max(int(r) for r in reach)} tokens but the state "
                f"holds {self.table.shape[1] * self.block + 1}: raise --max-context"
            )
        if short > self.pool.free:
            self.pool.take(short)  # raises OutOfBlocks with the numbers
        for b, r in zip(rows, reach):
            have, want = int(self.count[b]), blocks_for(int(r), self.block)
            if want > have:
                self.table[b, have:want] = self.pool.take(want - have)
                self.count[b] = want
        self.changed()

    def share(self, row: int, blocks: list[int]) -> None:
        """Row `row` (holding nothing) starts with `blocks`, held by someone else too."""
        self.pool.hold(blocks)
        self.table[row, : len(blocks)] = blocks
        self.count[row] = len(blocks)
        self.changed()

    def append(self, row: int, block: int) -> None:
        """Row `row`'s next block is `block`, which the caller took from the pool."""
        self.table[row, self.count[row]] = block
        self.count[row] += 1
        self.changed()

    def release(self, rows) -> None:
        """Rows `rows` give their blocks back (a block shared with another holder stays)."""
        for b in rows:
            self.pool.release(self.table[b, : self.count[b]].tolist())
            self.table[b, : self.count[b]] = 0
            self.count[b] = 0
        self.changed()

    def feed(self, blocks: int) -> np.ndarray:
        """The table's leading `blocks` columns, contiguous (B, blocks): what a step reads (the
        same array while the table does not change, so a runtime binds it once)."""
        key = (int(self.versions[0]), blocks)
        if self.fed[0] != key:
            self.fed = (key, np.ascontiguousarray(self.table[:, :blocks]))
        return self.fed[1]


CACHE_SHARE = 0.1  # of a state budget: the prefix cache's copies of rows
CACHE_ENTRIES_PER_ROW = 4  # prefix-cache entries per row at most


@dataclass(frozen=True)
class StatePlan:
    """What a run allocates: rows, the LTM pool's blocks, and the prefix cache's entries (each
    a copy of one row's constant-size state, kept beside the rows)."""

    sizes: StateSizes
    rows: int
    blocks: int
    cache_entries: int

    @property
    def bytes(self) -> int:
        rows = (self.rows + self.cache_entries) * self.sizes.row_bytes
        return rows + self.blocks * self.sizes.block_bytes


def plan_state(
    sizes: StateSizes, max_batch: int, max_context: int, budget: int | None, prefix_cache: bool
) -> StatePlan:
    """The state of max_batch rows of up to max_context tokens. Without a budget: a pool holding
    every row at max_context (a static allocation) and a cache entry per row. With one: the
    cache takes up to CACHE_SHARE of it, the rows their constant part, and the pool the rest,
    never more than a static allocation."""
    static = sizes.static_blocks(max_batch, max_context)
    if budget is None:
        return StatePlan(sizes, max_batch, static, max_batch if prefix_cache else 0)
    entries = 0
    if prefix_cache and sizes.row_bytes:
        entries = min(
            CACHE_ENTRIES_PER_ROW * max_batch, int(CACHE_SHARE * budget) // sizes.row_bytes
        )
    blocks = sizes.budget_blocks(budget - entries * sizes.row_bytes, max_batch)
    return StatePlan(sizes, max_batch, min(blocks, static), entries)


def state_bytes(backend, limits) -> int:
    """Bytes of the decode state a run of these RunLimits allocates on this backend."""
    return run_plan(backend, limits).bytes


def run_plan(backend, limits) -> StatePlan:
    """plan_state for a backend and RunLimits."""
    return plan_state(backend.state_sizes(), limits.max_batch, limits.max_context,
                      limits.state_memory, limits.prefix_cache)  # fmt: skip


def plan_line(plan: StatePlan, max_context: int, budget: int | None) -> str:
    """One line on the state a run allocates, printed before generation."""
    sizes = plan.sizes
    if budget is None:
        how = f"{plan.rows} x {max_context} tokens"
    else:
        how = f"--state-memory {human_bytes(budget)}: LTM pool of {plan.blocks} blocks"
    return (
        f"memory plan: {how} -> {human_bytes(plan.bytes)} of state (LTM "
        f"{human_bytes(sizes.block_bytes / sizes.block)}/token, "
        f"{human_bytes(sizes.row_bytes)}/row constant, prefix cache {plan.cache_entries} rows)"
    )


def pool_report(pool: BlockPool, sizes: StateSizes, cache_hits: int = 0,
                preemptions: int = 0) -> dict:  # fmt: skip
    """What `inspect` and `bench` show of a pool."""
    return {
        "blocks_total": pool.total,
        "blocks_used": pool.used,
        "blocks_shared": pool.shared,
        "blocks_peak": pool.peak_used,
        "block_bytes": sizes.block_bytes,
        "pool_bytes": pool.total * sizes.block_bytes,
        "prefix_cache_hits": cache_hits,
        "preemptions": preemptions,
    }
