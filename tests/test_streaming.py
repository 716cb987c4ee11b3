"""Streaming decode (chunks of any length against a DecodeState) equals the full forward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaicrt.model import preset, random_model
from mosaicrt.runtime.generator import RunLimits, generate
from mosaicrt.runtime.sampling import SamplingParams
from mosaicrt.runtime.torch_backend import TorchBackend

ATOL = 1e-5  # fp32 streaming vs fp32 full forward
H, M = 8, 5  # window and delay of the test models


def make_model(use_ltm: bool, seed: int = 0):
    config = preset("tiny").replace(stm_window=H, ltm_delay=M, use_ltm=use_ltm)
    model = random_model(config, seed)
    # Tab. 6 init gives the memories a tiny share of the residual stream; scale them up so the
    # logits really depend on retrieval (checked in test_memories_shape_the_logits).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("key_proj.weight", "value_proj.weight", "out_proj.weight")):
                p.mul_(6.0)
    return model


def test_memories_shape_the_logits():
    model = make_model(True)
    ids = torch.randint(0, 256, (1, 4 * H), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        for layer in model.layers:
            layer.out_proj.weight.zero_()
        assert (full - model(ids)).abs().max() > 0.5


def test_a_frozen_model_computes_as_before_until_refrozen():
    """freeze computes the memories' transforms once and fuses each layer's products: the same
    logits (to fp32 rounding: a fused product may sum in another order); a transform's parameter
    changed after it is seen only after the next freeze."""
    model = make_model(True)
    ids = torch.randint(0, 256, (1, 3 * H), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        live = model(ids)
        model.freeze()
        assert all(layer.memory_in is not None for layer in model.layers)
        frozen = model(ids)
        assert (frozen - live).abs().max() <= ATOL
        for layer in model.layers:
            layer.stm.bandwidth_beta0.add_(1.0)
        assert torch.equal(model(ids), frozen)  # still the frozen transforms
        model.freeze()
        assert (model(ids) - live).abs().max() > 1e-3


def test_fused_products_share_the_weights():
    """A fused layer holds its projections once: each Linear's weight is a view of the fused
    rows, so an in-place change of one is the fused product's too."""
    model = make_model(True)
    model.freeze()
    layer = model.layers[0]
    assert layer.stm.key_proj.weight.untyped_storage().data_ptr() == (
        layer.memory_in.untyped_storage().data_ptr()
    )
    ids = torch.randint(0, 256, (1, 2 * H), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        layer.ltm.value_proj.weight.mul_(3.0)
        layer.ffn.up_proj.weight.mul_(3.0)
        assert (model(ids) - before).abs().max() > 1e-3
        assert torch.equal(layer.memory_in[-layer.ltm.value_proj.out_features :],
                           layer.ltm.value_proj.weight)  # fmt: skip


def stream(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    state = model.new_state(ids.shape[0], ids.shape[1])
    out, start = [], 0
    for c in chunks:
        out.append(model.step(ids[:, start : start + c], state))
        start += c
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("use_ltm", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 7, H, 2 * H])
def test_chunked_streaming_equals_full_forward(use_ltm, chunk):
    model = make_model(use_ltm)
    T = 4 * H + 3
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        full = model(ids)
        got = stream(model, ids, [chunk] * (T // chunk) + ([T % chunk] if T % chunk else []))
    assert (got - full).abs().max() <= ATOL
    assert full.abs().max() > 1.0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 2 * H + 1), min_size=1, max_size=12), st.booleans())
def test_any_chunk_schedule_equals_full_forward(chunks, use_ltm):
    model = make_model(use_ltm, seed=1)
    ids = torch.randint(0, 256, (1, sum(chunks)), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (stream(model, ids, chunks) - model(ids)).abs().max() <= ATOL


def test_rows_at_different_positions_share_a_step():
    """Rows advance by different amounts per step (0 included) and still match their forward."""
    model = make_model(True)
    T = 5 * H
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(3))
    schedule = [[1, 4, 0], [7, 1, 3], [0, 9, 1], [12, 2, 2], [20, 24, 34]]
    state = model.new_state(3, T)
    got = [[] for _ in range(3)]
    with torch.no_grad():
        for lengths in schedule:
            C = max(lengths)
            chunk = torch.zeros(3, C, dtype=torch.int64)
            for r, n in enumerate(lengths):
                start = int(state.pos[r])
                chunk[r, :n] = ids[r, start : start + n]
            logits = model.step(chunk, state, torch.tensor(lengths))
            for r, n in enumerate(lengths):
                got[r].append(logits[r, :n])
        for r in range(3):
            want = model(ids[r : r + 1, : int(state.pos[r])])[0]
            assert (torch.cat(got[r]) - want).abs().max() <= ATOL


def test_padded_batch_equals_each_row_alone():
    model = make_model(True)
    ids = torch.randint(0, 256, (3, 4 * H), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([4 * H, 2 * H + 1, 3])
    with torch.no_grad():
        batched = model(ids, lengths)
        for r, n in enumerate(lengths.tolist()):
            alone = model(ids[r : r + 1, :n])[0]
            assert (batched[r, :n] - alone).abs().max() <= ATOL
            assert not batched[r, n:].any()  # padding positions are zeroed


def test_stores_are_updated_in_place():
    model = make_model(True)
    state = model.new_state(1, 64)
    pointers = [
        (m.keys.data_ptr(), m.vals.data_ptr(), m.s.data_ptr())
        for layer in state.memories
        for m in layer.values()
    ]
    with torch.no_grad():
        for _ in range(3 * H):
            model.step(torch.randint(0, 256, (1, 1)), state)
    assert pointers == [
        (m.keys.data_ptr(), m.vals.data_ptr(), m.s.data_ptr())
        for layer in state.memories
        for m in layer.values()
    ]


@pytest.mark.parametrize("use_ltm", [True, False])
def test_streaming_greedy_equals_full_recompute_for_100_tokens(use_ltm):
    model = make_model(use_ltm, seed=5)
    model.config = model.config.replace(eos_token_id=None)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2]]
    [a, b] = generate(
        TorchBackend(model, device="cpu"),
        prompts,
        100,
        SamplingParams(),
        RunLimits(max_batch=2, max_context=128, prefill_chunk=5),
    )
    for prompt, streamed in zip(prompts, (a, b)):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(100):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert streamed == ids[len(prompt) :]
