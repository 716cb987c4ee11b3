"""Sampling, the memory plan, and request admission in the generator."""

import copy

import numpy as np
import pytest
import torch

from mosaicrt.errors import CapacityError, InputError
from mosaicrt.model import memory_plan, preset
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.runtime.sampling import SamplingParams, filtered_logits
from mosaicrt.runtime.torch_backend import TorchBackend


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = filtered_logits(logits, SamplingParams(greedy=False, top_k=2)).isfinite()
    assert kept.tolist() == [True, True, False, False, False]
    kept = filtered_logits(logits, SamplingParams(greedy=False, top_p=0.7)).isfinite()
    assert kept.tolist() == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    kept = filtered_logits(logits, SamplingParams(greedy=False, top_p=0.71)).isfinite()
    assert kept.tolist() == [True, True, True, False, False]
    kept = filtered_logits(logits.flip(0), SamplingParams(greedy=False, top_p=0.3)).isfinite()
    assert kept.tolist() == [False, False, False, False, True]  # the top token always stays
    scaled = filtered_logits(logits, SamplingParams(greedy=False, temperature=0.5))
    assert torch.allclose(scaled, logits * 2)


def test_bad_sampling_params():
    for kwargs, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=2**64), "seed"),
    ]:
        with pytest.raises(InputError, match=match):
            SamplingParams(greedy=False, **kwargs)
    assert SamplingParams(greedy=False, temperature=0.0).greedy  # temperature 0 is greedy


@pytest.mark.parametrize(
    "device",
    ["cpu", "numpy", "numpy-fp16", "cpu-fp16",
     pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU"))],
)  # fmt: skip
def test_scan_rows_follows_torch(device):
    """The batcher's fast path on a step's logits (a CPU or device tensor, or the numpy array a
    host backend returns): scan_rows' tokens are torch.argmax (first index of a tie, a NaN's
    index), its finite flags isfinite().all() per row."""
    from mosaicrt.runtime.sampling import scan_rows

    logits = torch.randn(7, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 500]] = logits[1].max() + 1  # a tie
    logits[2, 9], logits[3, 4], logits[4, 0] = float("nan"), float("inf"), float("-inf")
    logits[6, 999] = float("nan")  # after the row's largest and smallest values
    want = logits.argmax(dim=-1).tolist()
    if device.startswith("numpy"):
        logits = logits.numpy().astype(np.float16 if device.endswith("fp16") else np.float32)
    elif device == "cpu-fp16":
        logits = logits.half()
    else:
        logits = logits.to(device)
    assert scan_rows(logits)[1][1] == 7
    assert scan_rows(logits) == ([True, True, False, False, False, True, False], want)


@pytest.fixture(scope="module")
def tiny_backend(tiny_ckpt):
    return TorchBackend(tiny_ckpt, device="cpu")


def test_greedy_and_sampled_requests_share_a_batch(tiny_backend):
    """A request with its own sampling params between greedy ones: every row gets the tokens it
    gets alone (the sampler's every-row-greedy shortcut holds only while no request samples),
    and the sampled row's differ from the greedy choice."""
    from mosaicrt.runtime.batcher import ContinuousBatcher, Request

    sampled = SamplingParams(greedy=False, temperature=1.5, seed=3)

    def requests(sampling: SamplingParams | None) -> list[Request]:
        return [Request(0, [1, 2, 3], 12), Request(1, [4, 5], 12, sampling=sampling),
                Request(2, [6], 12)]  # fmt: skip

    def run(batch: list[Request]) -> list[list[int]]:
        batcher = ContinuousBatcher(tiny_backend, SamplingParams(), RunLimits(max_batch=3))
        for request in batch:
            batcher.submit(request)
        while batcher.busy:
            batcher.step()
        return [request.output for request in batch]

    together = run(requests(sampled))
    assert together == [run([request])[0] for request in requests(sampled)]
    assert together[1] != run(requests(None))[1]


def test_sampled_tokens_do_not_depend_on_the_batch(tiny_backend):
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45], [7]]
    params = SamplingParams(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=11)
    together = generate(tiny_backend, prompts, 12, params, RunLimits(max_batch=3))
    one_by_one = generate(tiny_backend, prompts, 12, params, RunLimits(max_batch=1))
    assert together == one_by_one
    again = generate(tiny_backend, prompts, 12, params, RunLimits(max_batch=2))
    assert again == together
    other_seed = generate(
        tiny_backend,
        prompts,
        12,
        SamplingParams(greedy=False, temperature=1.5, seed=12),
        RunLimits(),
    )
    assert other_seed != together


def test_bad_requests_do_not_disturb_the_others(tiny_backend):
    prompts = [[1, 2, 3], [], [5, 300], list(range(40)), [9, 9]]
    results = generate(tiny_backend, prompts, 8, SamplingParams(), RunLimits(max_context=32))
    assert isinstance(results[1], InputError) and "empty" in str(results[1])
    assert isinstance(results[2], InputError) and "300 outside [0, 258)" in str(results[2])
    assert isinstance(results[3], CapacityError) and "--max-context" in str(results[3])
    alone = generate(tiny_backend, [[1, 2, 3], [9, 9]], 8, SamplingParams(), RunLimits())
    assert [results[0], results[4]] == alone
    assert all(len(r) == 8 for r in alone)


def test_generation_stops_at_eos(tiny_backend):
    [free] = generate(tiny_backend, [[1, 2, 3]], 6, SamplingParams(), RunLimits())
    eos = free[2]
    backend = copy.copy(tiny_backend)
    backend.config = tiny_backend.config.replace(eos_token_id=eos)
    [stopped] = generate(backend, [[1, 2, 3]], 6, SamplingParams(), RunLimits())
    assert stopped == free[: free.index(eos) + 1]


def test_memory_plan_matches_the_contract_and_the_allocation():
    small = memory_plan(preset("small"), max_context=4096, max_batch=1)
    assert small.ltm_bytes_per_token == 192 * 1024  # contract: 192 KiB per token (bf16)
    assert abs(small.stm_bytes_per_sequence / 2**20 - 47.8) < 0.1  # "about 48 MiB"
    large = memory_plan(preset("large"), max_context=4096, max_batch=1)
    assert large.ltm_bytes_per_token == 512 * 1024
    config = preset("tiny")
    plan = memory_plan(config, max_context=100, max_batch=3, store_dtype="float32")
    from mosaicrt.model import DecodeState

    state = DecodeState.allocate(config, batch=3, capacity=100)
    allocated = sum(
        t.numel() * t.element_size()
        for layer in state.memories
        for m in layer.values()
        for t in vars(m).values()
        if t is not None
    )
    assert allocated == plan.state_bytes
    # Paged: the same rows, the LTM in a pool of 128-pair blocks plus a scratch block.
    from mosaicrt.runtime.paging import StateSizes, blocks_for

    paged = DecodeState.allocate(config, batch=3, capacity=1000, block=128, pool_blocks=5)
    sizes = StateSizes.of(config, 128, "float32")
    ltm = [layer["ltm"] for layer in paged.memories]
    pool = sum(t.numel() * t.element_size() for st in ltm for t in (st.keys, st.vals))
    assert pool == (5 + 1) * sizes.block_bytes
    assert sizes.row_bytes * 3 + sizes.static_blocks(3, 100) * sizes.block_bytes >= plan.state_bytes
    assert blocks_for(100, 128) == 1 and blocks_for(130, 128) == 2 and blocks_for(1, 128) == 0


def run(batcher) -> None:
    while batcher.busy:
        batcher.step()


def test_a_session_continues_from_its_state(tiny_backend):
    """Turn 2 of a session, fed only its new tokens, equals one pass over all the tokens so far;
    a request beside it in the batch is unaffected, and the session's row is kept in between."""
    from mosaicrt.runtime.batcher import ContinuousBatcher, Request

    limits = RunLimits(max_batch=2, max_context=64, prefill_chunk=4)
    p1, p2, other = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43]
    batcher = ContinuousBatcher(tiny_backend, SamplingParams(), limits, ignore_eos=True)
    turn1 = Request(0, list(p1), 5, session="chat")
    batcher.submit(turn1)
    run(batcher)
    assert turn1.output == generate(tiny_backend, [p1], 5, limits=limits)[0]
    alone = Request(1, list(other), 6)  # takes the other row: the session keeps its own
    batcher.submit(alone)
    run(batcher)
    turn2 = Request(2, list(p2), 6, session="chat", end_session=True)
    batcher.check_session(turn2)
    batcher.submit(turn2)
    batcher.submit(Request(3, list(other), 6))
    run(batcher)
    want = generate(tiny_backend, [p1 + turn1.output + p2], 6, limits=limits)[0]
    assert turn2.output == want
    assert alone.output == generate(tiny_backend, [other], 6, limits=limits)[0]
    assert "chat" not in batcher.sessions  # ended: its row is free again


def test_a_session_past_its_context_is_refused(tiny_backend):
    from mosaicrt.runtime.batcher import ContinuousBatcher, Request

    limits = RunLimits(max_batch=1, max_context=20)
    batcher = ContinuousBatcher(tiny_backend, SamplingParams(), limits, ignore_eos=True)
    batcher.submit(Request(0, [1] * 10, 5, session=7))
    run(batcher)
    with pytest.raises(CapacityError, match="the session would reach 22 tokens"):
        batcher.check_session(Request(1, [2] * 2, 5, session=7))
    batcher.release(7)
    assert not batcher.sessions


class RowSpy:
    """A backend that records which rows each step runs."""

    def __init__(self, backend):
        self.backend, self.steps = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self, ids, lengths, state, last_only, rows=None, device_logits=False):
        self.steps.append((rows.start, rows.stop))
        return self.backend.step(ids, lengths, state, last_only, rows, device_logits)


def test_a_step_runs_only_the_rows_with_work(tiny_backend):
    """One request in a 16-row batcher runs one row; a new request takes the lowest free row,
    so the rows with work stay together; the tokens are those of each request alone."""
    from mosaicrt.runtime.batcher import ContinuousBatcher, Request

    spy = RowSpy(tiny_backend)
    limits = RunLimits(max_batch=16, max_context=64, prefill_chunk=4)
    batcher = ContinuousBatcher(spy, SamplingParams(), limits, ignore_eos=True)
    first = Request(0, [5, 6, 7], 4)
    batcher.submit(first)
    run(batcher)
    assert set(spy.steps) == {(0, 1)}
    spy.steps.clear()
    batcher.submit(Request(1, [9] * 6, 3))  # row 0 again
    batcher.submit(Request(2, [8] * 2, 8))  # row 1
    events = []
    while batcher.busy:
        events += batcher.step()
    assert set(spy.steps) <= {(0, 1), (0, 2), (1, 2)} and (0, 2) in spy.steps
    outputs = {r.rid: r.output for r, _, done in events if done}
    for rid, prompt, n in ((1, [9] * 6, 3), (2, [8] * 2, 8)):
        assert outputs[rid] == generate(tiny_backend, [prompt], n, limits=limits)[0]
    assert first.output == generate(tiny_backend, [[5, 6, 7]], 4, limits=limits)[0]


@pytest.mark.parametrize("memory", ["paged", "stm-only"])
def test_sessions_beyond_the_rows(tiny_backend, memory):
    """Three sessions on two rows. With a pool of LTM blocks an idle session keeps no row, so
    the third is served; a model without an LTM keeps a session's row between turns, so the
    third is refused with a clear error. Either way every open session continues exactly (one
    pass over its tokens), and a cancelled request frees its row."""
    from dataclasses import replace

    from mosaicrt.model import random_model
    from mosaicrt.runtime.batcher import ContinuousBatcher, Request

    backend = tiny_backend
    if memory == "stm-only":
        model = random_model(replace(tiny_backend.config, use_ltm=False), seed=1)
        backend = TorchBackend(model, device="cpu")
    limits = RunLimits(max_batch=2, max_context=64, prefill_chunk=4)
    batcher = ContinuousBatcher(backend, SamplingParams(), limits, ignore_eos=True)
    assert (batcher.table is not None) == (memory == "paged")
    turns = {"a": Request(0, [3, 4, 5], 3, session="a"), "b": Request(1, [6, 7], 3, session="b")}
    for request in turns.values():
        batcher.submit(request)
    third = Request(2, [1, 8], 3, session="c")
    if memory == "stm-only":
        with pytest.raises(CapacityError, match="all 2 rows hold open sessions"):
            batcher.submit(third)
    else:
        batcher.submit(third)
        turns["c"] = third
    run(batcher)
    if memory == "stm-only":
        with pytest.raises(CapacityError, match="all 2 rows hold open sessions"):
            batcher.submit(Request(3, [1], 3, session="c"))
    for rid, key in enumerate(turns, start=4):
        first = turns[key]
        nxt = Request(rid, [9, 9], 4, session=key, end_session=True)
        batcher.submit(nxt)
        run(batcher)
        want = generate(backend, [first.prompt + first.output + [9, 9]], 4, limits=limits)
        assert nxt.output == want[0]
    long = Request(9, [1, 2, 3], 50)
    batcher.submit(long)
    batcher.step()
    assert batcher.cancel(9) is long and not batcher.busy
