"""Sampling, the memory plan, and request admission in the generator."""

import copy

import pytest
import torch

from mosaicrt.errors import CapacityError, InputError
from mosaicrt.model import memory_plan, preset
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
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
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ]:
        with pytest.raises(InputError, match=match):
            SamplingParams(greedy=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    write_checkpoint(random_tensors(preset("tiny"), 0), preset("tiny"), out)
    return TorchBackend(out, device="cpu")


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
    )
    assert allocated == plan.state_bytes
