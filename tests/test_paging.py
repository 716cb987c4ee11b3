"""The paged decode state (runtime.paging): a pool of LTM blocks shared by all rows, a state
budget, preemption and the prefix cache. Paging must not change a single token: every request
under a tight budget, in any arrival order, gives exactly the tokens it gives alone."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaicrt.argtypes import parse_size
from mosaicrt.errors import CapacityError, InputError
from mosaicrt.runtime.batcher import ContinuousBatcher, Request
from mosaicrt.runtime.generator import generate
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.paging import BlockPool, BlockTable, OutOfBlocks, blocks_for, plan_state
from mosaicrt.runtime.sampling import SamplingParams

BLOCK = 8  # pairs per LTM block: small, so that short sequences span many blocks
CONTEXT = 64  # tokens per sequence at most
LENGTHS = st.lists(st.integers(1, 40), min_size=10, max_size=10)  # prompt lengths


def test_pool_and_table_bookkeeping():
    pool = BlockPool(6)
    table = BlockTable(pool, batch=2, max_blocks=4, block=BLOCK)
    table.grow([0, 1], [BLOCK + 2, 2 * BLOCK + 1])  # 2 and 2 blocks
    assert pool.used == 4 and table.count.tolist() == [2, 2]
    with pytest.raises(OutOfBlocks, match="2 free LTM blocks and a step needs 3"):
        table.grow([0, 1], [4 * BLOCK + 1, 3 * BLOCK + 1])
    assert pool.used == 4 and table.count.tolist() == [2, 2]  # all or nothing
    table.release([1])
    table.share(1, table.row_blocks(0))  # row 1 starts from row 0's prefix
    assert pool.used == 2 and pool.shared == 2
    table.release([0])
    assert pool.used == 2 and pool.shared == 0  # row 1 still holds them
    table.release([1])
    assert pool.free == 6 and pool.peak_used == 4
    with pytest.raises(CapacityError, match="raise --max-context"):
        table.grow([0], [5 * BLOCK + 2])
    assert blocks_for(1, BLOCK) == 0 and blocks_for(BLOCK + 1, BLOCK) == 1


def test_sizes_parse_and_bad_sizes_are_refused():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "12XB", "-1GiB", "0", "GiB", "1e9"):
        with pytest.raises(InputError, match="state-memory"):
            parse_size(bad)


@pytest.fixture(scope="module")
def backends(tiny_ckpt, tmp_path_factory):
    """The tiny model through torch, ONNX Runtime (native ops where built) and torch with the
    Triton kernels (interpreter), every one with LTM blocks of BLOCK pairs."""
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.runtime.ort_backend import OrtBackend
    from mosaicrt.runtime.torch_backend import TorchBackend

    art = export_artifact(tiny_ckpt, tmp_path_factory.mktemp("paged") / "art",
                          max_context=CONTEXT, ltm_block=BLOCK)  # fmt: skip
    return {
        "torch": TorchBackend(tiny_ckpt, device="cpu", ltm_block=BLOCK),
        "onnxruntime": OrtBackend(art, device="cpu"),
        "torch+triton": TorchBackend(tiny_ckpt, device="cpu", kernels="triton", ltm_block=BLOCK),
    }


def prompts_of(lengths: list[int], shared: int, seed: int) -> list[list[int]]:
    """Random prompts of these lengths, the first `shared` tokens the same in all."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (shared,), generator=gen).tolist()
    return [
        (prefix + torch.randint(0, 256, (n,), generator=gen).tolist())[: max(n, 1)] for n in lengths
    ]


def budget_for(backend, rows: int, sequences: float) -> int:
    """The least --state-memory that gives `rows` rows an LTM pool of `sequences` full
    sequences of CONTEXT tokens (the prefix cache takes its share of it)."""
    sizes = backend.state_sizes()
    blocks = int(sequences * blocks_for(CONTEXT, BLOCK))
    budget = rows * sizes.row_bytes + blocks * sizes.block_bytes
    while plan_state(sizes, rows, CONTEXT, budget, True).blocks < blocks:
        budget += sizes.block_bytes
    return budget


def alone(backend, prompts, new, sampling=SamplingParams()):
    limits = RunLimits(max_batch=1, max_context=CONTEXT, prefill_chunk=8)
    return [generate(backend, [p], new, sampling, limits)[0] for p in prompts]


def check_paging_keeps_every_token(backend, lengths, order, sequences, shared, new) -> dict:
    """The requests (prompt lengths, arrival order) on 10 rows under a budget of `sequences`
    full sequences give each the tokens it gives alone; returns the pool report."""
    prompts = prompts_of(lengths, shared, seed=sum(lengths))
    want = alone(backend, prompts, new)
    limits = RunLimits(max_batch=10, max_context=CONTEXT, prefill_chunk=8,
                       state_memory=budget_for(backend, 10, sequences))  # fmt: skip
    batcher = ContinuousBatcher(backend, SamplingParams(), limits)
    requests = [Request(i, prompts[i], new) for i in order]
    for request in requests:
        batcher.submit(request)
    while batcher.busy:
        batcher.step()
    for request in requests:
        assert request.error is None
        assert request.output == want[request.rid], f"request {request.rid} changed"
    report = batcher.pool_report()  # every block is back, but those the prefix cache keeps
    held = batcher.cache.blocks_held() if batcher.cache else set()
    assert report["blocks_used"] == len(held)
    assert report["blocks_peak"] <= report["blocks_total"]
    return report


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lengths=LENGTHS, order=st.permutations(range(10)), sequences=st.floats(1.5, 3.0),
       shared=st.sampled_from([0, 17]), new=st.integers(4, 20))  # fmt: skip
@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_paging_under_a_tight_budget_keeps_every_token(
    backends, name, lengths, order, sequences, shared, new
):
    """10 mixed-length requests on 10 rows with an LTM pool of about two full sequences: the
    pool runs dry, requests wait for blocks and are preempted, the prefix cache shares blocks,
    and every request still gives exactly its tokens alone (greedy)."""
    check_paging_keeps_every_token(backends[name], lengths, order, sequences, shared, new)


def test_paging_with_the_triton_kernels_keeps_every_token(backends):
    """The same through the Triton kernels (interpreter: one small fixed case, a pool of one
    full sequence for four requests, with a preemption)."""
    report = check_paging_keeps_every_token(
        backends["torch+triton"], [20, 14, 18, 9], [2, 0, 3, 1], 1.0, 0, 6
    )
    assert report["preemptions"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled-graphs"])
def test_paging_on_a_gpu_keeps_every_token(tiny_ckpt, compile):
    """The Triton kernels compiled for the GPU, decode steps replayed from CUDA graphs (of the
    eager or the torch.compile'd step) over the pool's block tables: 10 requests under a budget
    of two full sequences, with preemptions and a shared prefix, keep every token (fp32)."""
    from mosaicrt.runtime.torch_backend import TorchBackend

    backend = TorchBackend(tiny_ckpt, device="cuda", dtype="float32", kernels="triton",
                           compile=compile, ltm_block=BLOCK)  # fmt: skip
    lengths = [38, 36, 30, 9, 33, 5, 25, 12, 40, 22]
    report = check_paging_keeps_every_token(backend, lengths, list(range(9, -1, -1)), 2.0, 17, 20)
    assert report["preemptions"] > 0 and report["prefix_cache_hits"] > 0


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_preempted_request_resumes_its_random_stream(backends, name):
    """Sampling (seeded per request): preemption replays the tokens a request had produced,
    so its sampler's stream continues where it stopped."""
    backend = backends[name]
    sampling = SamplingParams(greedy=False, temperature=1.2, top_k=40, seed=5)
    prompts = prompts_of([30, 28, 35, 31], 0, seed=3)
    limits = RunLimits(max_batch=4, max_context=CONTEXT, prefill_chunk=8,
                       state_memory=budget_for(backend, 4, 1.5))  # fmt: skip
    batcher = ContinuousBatcher(backend, sampling, limits)
    requests = [Request(i, p, 24) for i, p in enumerate(prompts)]
    for request in requests:
        batcher.submit(request)
    while batcher.busy:
        batcher.step()
    assert batcher.preemptions > 0
    for request in requests:  # request i samples from seed 5 + i, alone or not
        [want] = generate(backend, [request.prompt], 24, replace(sampling, seed=5 + request.rid),
                          RunLimits(max_batch=1, max_context=CONTEXT, prefill_chunk=8))  # fmt: skip
        assert request.output == want


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_the_prefix_cache_starts_requests_from_a_shared_prefix(backends, name):
    """Requests sharing a 40-token prefix: all but the first start from the cached state at 32
    tokens (a multiple of the chunk), with the tokens they give without the cache."""
    backend = backends[name]
    prompts = prompts_of([43, 45, 42, 47], shared=40, seed=9)
    runs = {}
    for cache in (True, False):
        limits = RunLimits(max_batch=4, max_context=CONTEXT, prefill_chunk=16, prefix_cache=cache)
        batcher = ContinuousBatcher(backend, SamplingParams(), limits)
        requests = [Request(i, p, 10) for i, p in enumerate(prompts)]
        for request in requests:
            batcher.submit(request)
        while batcher.busy:
            batcher.step()
        runs[cache] = ([r.output for r in requests], batcher.pool_report())
    assert runs[True][0] == runs[False][0]
    assert runs[True][1]["prefix_cache_hits"] == 3 and runs[False][1]["prefix_cache_hits"] == 0


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_short_cached_prefix_restored_over_a_longer_sequence_reads_only_its_own(backends, name):
    """A cached prefix keeps only the ring slots and the LTM pairs it has reached (8 of the
    ring's 15, 7 of a block's 8): restored into the row where a longer sequence has since left
    its pairs in every slot, the request still gives its tokens alone (positions keep the stale
    pairs unread)."""
    backend = backends[name]
    first, again = prompts_of([10, 11], shared=8, seed=4)
    # 7 tokens and 40 new ones: the whole ring and 6 of the pool's 8 blocks, no prefix cached
    longer = prompts_of([7], shared=0, seed=5)[0]
    want = alone(backend, [again], 12)[0]
    limits = RunLimits(max_batch=1, max_context=CONTEXT, prefill_chunk=8)
    batcher = ContinuousBatcher(backend, SamplingParams(), limits)
    requests = [Request(0, first, 6), Request(1, longer, 40), Request(2, again, 12)]
    for request in requests:  # one after the other, all in row 0
        batcher.submit(request)
        while batcher.busy:
            batcher.step()
    assert [r.error for r in requests] == [None] * 3
    assert batcher.pool_report()["prefix_cache_hits"] == 1  # `again` started from `first`'s 8
    assert requests[2].output == want


def test_a_request_larger_than_the_pool_is_refused_alone(backends):
    backend = backends["onnxruntime"]
    limits = RunLimits(max_batch=2, max_context=CONTEXT, prefill_chunk=8,
                       state_memory=budget_for(backend, 2, 0.5))  # 4 blocks: 33 tokens  # fmt: skip
    results = generate(backend, [[1] * 10, [2] * 40, [3] * 5], 8, SamplingParams(), limits)
    assert isinstance(results[1], CapacityError) and "raise --state-memory" in str(results[1])
    assert results[0] == alone(backend, [[1] * 10], 8)[0]
    assert results[2] == alone(backend, [[3] * 5], 8)[0]


def test_a_budget_too_small_for_one_sequence_is_an_error(backends):
    backend = backends["torch"]
    limits = RunLimits(max_batch=4, max_context=CONTEXT, state_memory=100)
    with pytest.raises(CapacityError, match="cannot hold one sequence.*raise --state-memory"):
        generate(backend, [[1, 2, 3]], 4, SamplingParams(), limits)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_paged_stores_read_the_blocks_the_table_names(backends, name):
    """A row's LTM blocks may lie anywhere in the pool: the step reads them through the table
    (two rows' blocks interleaved and out of order give the tokens of a fresh run)."""
    backend = backends[name]
    prompts = prompts_of([40, 36], 0, seed=1)
    want = alone(backend, prompts, 6)
    batcher = ContinuousBatcher(backend, SamplingParams(), RunLimits(max_batch=2,
                                max_context=CONTEXT, prefill_chunk=8))  # fmt: skip
    pool = batcher.table.pool
    pool.free_list = np.random.default_rng(0).permutation(pool.total).tolist()
    requests = [Request(i, p, 6) for i, p in enumerate(prompts)]
    for request in requests:
        batcher.submit(request)
    held = []
    while batcher.busy:
        batcher.step()
        held.append(batcher.table.row_blocks(0))
    assert max(held, key=len) != sorted(max(held, key=len))  # really out of order
    assert [r.output for r in requests] == want


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_prefix_restored_outside_the_running_rows_is_read_by_its_row(backends, name):
    """Found by hypothesis: two requests with the same 9-token prompt behind eight one-token
    ones, a pool of 1.5 sequences. The second starts from the first's cached state at 8 tokens
    in a row that the steps of the others do not span: its block table must still reach the
    state's device copy."""
    check_paging_keeps_every_token(
        backends[name], [1, 1, 1, 1, 1, 1, 1, 1, 9, 9], list(range(10)), 1.5, 17, 4
    )


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("room", ["roomy", "tight"])
def test_idle_sessions_park_their_state_and_continue_exactly(backends, name, room):
    """Four sessions on two rows: between turns a session holds LTM blocks and a copy of its
    row's constant part, but no row, and its next turn starts from there in whichever row is
    free; every turn equals one pass over the session's tokens. Under a budget of one sequence
    there is no room to keep every state: the oldest give theirs back, and those sessions are
    prefilled again from their tokens, still exactly. Nothing stays held when they end."""
    backend = backends[name]
    sizes = backend.state_sizes()
    if room == "roomy":  # four row copies and a pool of two full sequences
        budget = budget_for(backend, 2, 2)
        while plan_state(sizes, 2, CONTEXT, budget, True).cache_entries < 4:
            budget += sizes.row_bytes
    else:
        budget = budget_for(backend, 2, 1)
    limits = RunLimits(max_batch=2, max_context=CONTEXT, prefill_chunk=8, state_memory=budget)
    batcher = ContinuousBatcher(backend, SamplingParams(), limits, ignore_eos=True)
    prompts = prompts_of([5, 13, 21, 9], 0, seed=3)
    firsts = [Request(i, p, 4, session=i) for i, p in enumerate(prompts)]
    for request in firsts:
        batcher.submit(request)
    while batcher.busy:
        batcher.step()
    assert len(batcher.sessions) == 4 and batcher.kept_rows() == set()  # no row kept
    parked = sum(s.parked is not None for s in batcher.sessions.values())
    assert (parked == 4) == (room == "roomy")
    seconds = [Request(10 + i, [7, 8, 9], 5, session=i, end_session=True) for i in range(4)]
    for request in reversed(seconds):  # the newest parked first
        batcher.submit(request)
    while batcher.busy:
        batcher.step()
    for first, second in zip(firsts, seconds):
        assert second.error is None
        assert second.output == alone(backend, [first.prompt + first.output + [7, 8, 9]], 5)[0]
    assert not batcher.sessions
    held = batcher.cache.blocks_held() if batcher.cache is not None else set()
    assert batcher.table.pool.used == len(held)  # every other block is back in the pool
