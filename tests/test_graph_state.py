"""The exported graph's state (runtime/graph_state.py): every address a backend binds is
256-byte aligned, and the bookkeeping of a decode step reads nothing back from a GPU."""

import numpy as np
import pytest
import torch

from mosaicrt.export import io_spec
from mosaicrt.model import preset
from mosaicrt.runtime.graph_state import ALIGN, address, allocate, graph_step

STORE_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
                "bfloat16": (None, torch.bfloat16)}  # fmt: skip


def full_fn(lib: str, store: str, device="cpu"):
    np_dtype, torch_dtype = STORE_DTYPES[store]
    if lib == "numpy":
        return lambda shape, value, is_store: np.full(
            shape, value, np_dtype if is_store else np.float32
        )
    return lambda shape, value, is_store: torch.full(
        shape, value, dtype=torch_dtype if is_store else torch.float32, device=device
    )


@pytest.mark.parametrize("name", ["tiny", "demo", "mini", "small", "large"])
def test_every_bound_address_is_256_byte_aligned(name):
    config = preset(name)
    capacity = 2 * 128 + 3  # three LTM blocks
    batches = (1,) if name == "large" else (1, 3)  # odd batches misalign unpadded views
    for store in STORE_DTYPES:
        for lib in ("numpy", "torch"):
            if lib == "numpy" and store == "bfloat16":
                continue  # numpy has no bf16: bf16 states are torch tensors (TensorRT)
            for batch in batches:
                pos = np.zeros(batch, np.int64) if lib == "numpy" else torch.zeros(batch)
                state = allocate(config, batch, capacity, 128, full_fn(lib, store), pos, store)
                views = list(state.stores.values()) + list(state.small.values())
                misaligned = [address(v) % ALIGN for v in views if address(v) % ALIGN]
                assert not misaligned, (name, store, lib, batch)
                ltm = [v for k, v in state.stores.items() if ".ltm." in k]
                assert all(address(v[:1]) == address(v) for v in ltm)  # readable prefixes too
                del state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_bookkeeping_makes_no_device_sync():
    """graph_state on CUDA tensors (the TensorRT backend's state), with the engine replaced by
    outputs of the right shapes: a decode step's feeds, present state and new pairs make no
    device-to-host copy or synchronisation."""
    config = preset("tiny")
    B, heads, hs = 3, 2 * config.num_heads, config.head_dim
    state = allocate(config, B, 300, 128, full_fn("torch", "float32", "cuda"),
                     torch.zeros(B, dtype=torch.int64, device="cuda"))  # fmt: skip

    def run(feeds):
        out = {io_spec.LOGITS: torch.randn(B, 1, config.vocab_size, device="cuda")}
        for layer in range(config.num_layers):
            for field in io_spec.SMALL_FIELDS:
                out[io_spec.small_name("present", layer, field)] = torch.zeros_like(
                    feeds[io_spec.small_name("past", layer, field)]
                )
            for field in io_spec.STORE_FIELDS:
                out[io_spec.new_pairs_name(layer, field)] = torch.randn(
                    B, 1, heads, hs, device="cuda"
                )
        return out

    def to_state(array):
        return torch.as_tensor(array, dtype=torch.int64).to("cuda", non_blocking=True)

    ids = torch.ones(B, 1, dtype=torch.int64, device="cuda")
    for _ in range(3):  # warm up allocations and kernels
        graph_step(config, 128, state, ids, np.ones(B, np.int64), True, False, run, to_state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            graph_step(config, 128, state, ids, np.ones(B, np.int64), True, False, run, to_state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.host_pos.tolist() == state.pos.tolist() == [23] * B


@pytest.mark.parametrize("store", ["float32", "int8"])
@pytest.mark.parametrize("positions", [[5, 0, 300], [1, 63, 64], [200], list(range(3, 99, 8))])
def test_decode_writes_row_by_row_where_the_general_path_would(store, positions, monkeypatch):
    """A decode step's pairs (and int8 scales) land where the general scatter puts them: rows at
    different positions, a row with no token, the first token (no pair), a ring wrap, more rows
    than FEW_ROWS. The general path runs on torch tensors (as on a GPU), the row-by-row one on
    numpy (which always takes it)."""
    from mosaicrt.runtime import graph_state

    config = preset("tiny")
    B, block = len(positions), 16
    rng = np.random.default_rng(len(positions))
    dtype = np.int8 if store == "int8" else np.float32

    def full_numpy(shape, value, is_store):
        return np.full(shape, value, dtype if is_store else np.float32)

    def full_torch(shape, value, is_store):
        return torch.from_numpy(full_numpy(shape, value, is_store))

    lengths = np.array(([1, 0] * B)[:B])
    heads, hs = config.num_heads * len(config.memories), config.head_dim
    new = {}
    for layer in range(config.num_layers):
        for field in io_spec.STORE_FIELDS:
            name = io_spec.new_pairs_name(layer, field)
            new[name] = rng.integers(-100, 100, (B, 1, heads, hs)).astype(dtype)
            new[name + io_spec.SCALE_SUFFIX] = rng.random((B, 1, heads), np.float32)
    monkeypatch.setattr(graph_state, "FEW_ROWS", 0)  # torch tensors: the general scatter always
    states = []
    for full, pos in ((full_torch, torch.tensor(positions)), (full_numpy, np.array(positions))):
        state = allocate(config, B, 400, block, full, pos, store)
        if isinstance(pos, torch.Tensor):
            state.host_pos = np.array(positions)  # a device state keeps them on the host too
        state.blocks.grow(np.arange(B), np.array(positions) + lengths)  # as graph_step does
        as_state = torch.from_numpy if full is full_torch else (lambda a: a)
        graph_state.write_new_pairs(
            config, block, state,
            lambda layer, f: as_state(new[io_spec.new_pairs_name(layer, f)]),
            lengths, 1, as_state,
        )  # fmt: skip
        states.append(state)
    general, row_by_row = states
    for memory in config.memories:
        np.testing.assert_array_equal(general.pairs[memory].numpy(), row_by_row.pairs[memory])
        if store == "int8":
            np.testing.assert_array_equal(general.scales[memory].numpy(), row_by_row.scales[memory])
    tau, H = positions[0] - 1, config.num_heads  # row 0's pair, when it has one
    if tau >= 0:
        pool_block = row_by_row.blocks.table[0, tau // block]
        stored = row_by_row.pairs["ltm"][0, pool_block, :, tau % block]  # layer 0's keys
        np.testing.assert_array_equal(stored, new[io_spec.new_pairs_name(0, "keys")][0, 0, H:])


def test_views_of_row_ranges_are_kept_and_write_through():
    """GraphState.view gives the same view for the same rows while the range is among the last
    KEPT_VIEWS asked for (a runner keeps its buffers bound), a new one after; a view's buffers
    are the state's own, so a step on it updates the state."""
    from mosaicrt.runtime.graph_state import KEPT_VIEWS

    config = preset("tiny")
    state = allocate(config, 6, 64, 128, full_fn("numpy", "float32"), np.zeros(6, np.int64))
    first = state.view(slice(1, 3))
    assert state.view(slice(1, 3)) is first
    assert first.buffers is first.buffers  # one mapping, step after step
    assert set(first.buffers) == set(state.small) | set(state.stores)
    for start in range(KEPT_VIEWS):  # newer ranges push it out
        state.view(slice(start, start + 4))
    assert state.view(slice(1, 3)) is not first
    assert len(state.views) == KEPT_VIEWS
    view = state.view(slice(1, 3))
    view.pos += 5
    name = io_spec.small_name("past", 0, "s")
    view.small[name][...] = 2.0
    assert state.pos.tolist() == [0, 5, 5, 0, 0, 0]
    assert (state.small[name][1:3] == 2.0).all() and (state.small[name][0] == 0.0).all()
