"""Triton kernels against the reference code (under TRITON_INTERPRET=1 on a CPU)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package ([triton] extra)")

import oracle  # noqa: E402

from mosaicrt.model import preset  # noqa: E402
from mosaicrt.model.mmv2 import AssociativeMemory  # noqa: E402
from mosaicrt.model.state import MemoryState  # noqa: E402
from mosaicrt.ops.associative_memory.reference import associative_memory  # noqa: E402
from mosaicrt.ops.gated_key_scan.reference import gated_key_scan  # noqa: E402
from mosaicrt.runtime.torch_kernels import TritonKernels  # noqa: E402

ATOL = 1e-5  # fp32 kernel vs fp32 reference on O(1) outputs
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs them interpreted
H, M = 6, 4  # STM window and LTM delay of the test memories


def memory(kind: str, heads: int, head_dim: int) -> AssociativeMemory:
    config = preset("tiny").replace(num_heads=heads, head_dim=head_dim, stm_window=H, ltm_delay=M)
    return AssociativeMemory(config, kind)


def on_device(st: MemoryState) -> MemoryState:
    """The kernels' copy of a state (the reference keeps the CPU one)."""
    fields = (getattr(st, f) for f in st.__dataclass_fields__)
    return MemoryState(*(x.to(DEVICE, copy=True) if x is not None else None for x in fields))


# beta0 = 1, beta1 = 0: a bandwidth of 1, so the tests' queries carry their own scale.
UNIT_BANDWIDTH = {"beta0": torch.ones(1), "beta1": torch.zeros(1), "alpha": torch.ones(1)}


def step_positions(pos, lengths, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (B, C) and new_tau (B, C) of a chunk, as the model computes them."""
    t = pos[:, None] + torch.arange(C)
    new_ok = (torch.arange(C)[None, :] < lengths[:, None]) & (t >= 1)
    return t, torch.where(new_ok, t - 1, -1)


def reference_retrieve(mem, q, pos, lengths, st, k_new, v_new) -> torch.Tensor:
    """The reference op over the memory's stored pairs, with a bandwidth of 1."""
    t, new_tau = step_positions(pos, lengths, q.shape[1])
    keys, vals, tau = mem.stored_pairs(st, pos, q.shape[1])
    p = UNIT_BANDWIDTH
    return associative_memory(q, t, keys, vals, tau, k_new, v_new, new_tau, p["beta0"],
                              p["beta1"], p["alpha"], mem.window, mem.delay)  # fmt: skip


def kernel_retrieve(mem, q, pos, lengths, st, k_new, v_new) -> torch.Tensor:
    t, new_tau = step_positions(pos, lengths, q.shape[1])
    args = (x.to(DEVICE) for x in (q, t, pos, k_new, v_new, new_tau))
    params = {k: v.to(DEVICE) for k, v in UNIT_BANDWIDTH.items()}
    return TritonKernels().retrieve(mem, on_device(st), *args, params)


def filled_state(mem: AssociativeMemory, B: int, slots: int, dtype, gen) -> MemoryState:
    config = preset("tiny").replace(num_heads=mem.H, head_dim=mem.hs, stm_window=H)
    st = MemoryState.allocate(config, B, slots, dtype, "cpu")
    st.keys.copy_(torch.nn.functional.normalize(torch.randn(st.keys.shape, generator=gen), dim=-1))
    st.vals.copy_(3 * torch.randn(st.vals.shape, generator=gen))
    return st


@pytest.mark.parametrize("kind", ["stm", "ltm"])
@pytest.mark.parametrize("head_dim", [12, 16, 64])
@pytest.mark.parametrize("chunk", [1, 5, 17])
def test_retrieval_matches_reference(kind, head_dim, chunk):
    """Rows at different positions: t < m and t < h (pos 0, 2), ring wrap-around (pos 23), and
    padding (length < chunk, and a row with no tokens)."""
    gen = torch.Generator().manual_seed(chunk * head_dim)
    heads, B = 2, 4
    mem = memory(kind, heads, head_dim)
    pos = torch.tensor([0, 2, 23, 9])
    lengths = torch.tensor([chunk, max(chunk - 2, 1), chunk, 0])
    slots = H - 1 if kind == "stm" else 64
    st = filled_state(mem, B, slots, torch.float32, gen)
    q = torch.nn.functional.normalize(torch.randn(B, chunk, heads, head_dim, generator=gen), dim=-1)
    q = q * (1 + 20 * torch.rand(B, chunk, heads, 1, generator=gen))  # beta(n) up to ~20
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = 3 * torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    got = kernel_retrieve(mem, q, pos, lengths, st, k_new, v_new).cpu()
    for b in range(3):  # row 3 has no real tokens: its outputs are never read
        n = int(lengths[b])
        assert (got[b, :n] - want[b, :n]).abs().max() <= ATOL
    assert got[0, 0].abs().max() == 0  # t = 0 sees nothing


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("head_dim", [24, 32])
def test_long_chunk_takes_the_unmasked_tiles(head_dim, precision):
    """LTM chunks long enough that whole tiles of the store and of the chunk are visible to
    every query of a block (the unmasked path), next to the masked edge tiles; a head size that
    is not a power of two pads the tiles. tf32x3 products (tensor cores on a GPU; the
    interpreter computes them exactly) keep the same tolerance."""
    from mosaicrt.ops.associative_memory.kernel import retrieve

    gen = torch.Generator().manual_seed(head_dim)
    mem = memory("ltm", 2, head_dim)
    st = filled_state(mem, 3, 300, torch.float32, gen)
    pos, lengths = torch.tensor([150, 0, 37]), torch.tensor([100, 100, 61])
    q = torch.nn.functional.normalize(torch.randn(3, 100, 2, head_dim, generator=gen), dim=-1)
    q = q * (1 + 20 * torch.rand(3, 100, 2, 1, generator=gen))
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = 3 * torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    args = (q, st.keys, st.vals, k_new, v_new, pos, lengths)
    got = retrieve(*(x.to(DEVICE) for x in args), window=0, delay=M, ring=False,
                   precision=precision).cpu()  # fmt: skip
    for b in range(3):
        n = int(lengths[b])
        assert (got[b, :n] - want[b, :n]).abs().max() <= ATOL


@pytest.mark.parametrize("precision", ["bf16x3", "auto"])
@pytest.mark.parametrize("kind", ["stm", "ltm"])
def test_bf16_store_with_split_products_keeps_fp32_accuracy(kind, precision):
    """A bf16 store against fp32 queries split in three bf16 terms (tensor cores on a GPU): the
    same tolerance as fp32 products, through the unmasked and the masked tiles."""
    from mosaicrt.ops.associative_memory.kernel import retrieve

    gen = torch.Generator().manual_seed(11)
    mem = memory(kind, 2, 32)
    st = filled_state(mem, 2, H - 1 if kind == "stm" else 300, torch.bfloat16, gen)
    pos, lengths = torch.tensor([150, 3]), torch.tensor([100, 90])
    q = torch.nn.functional.normalize(torch.randn(2, 100, 2, 32, generator=gen), dim=-1)
    q = q * (1 + 20 * torch.rand(2, 100, 2, 1, generator=gen))
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = 3 * torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    args = (q, st.keys, st.vals, k_new, v_new, pos, lengths)
    window = mem.window if kind == "stm" else 0
    got = retrieve(*(x.to(DEVICE) for x in args), window=window, delay=mem.delay,
                   ring=kind == "stm", precision=precision).cpu()  # fmt: skip
    for b in range(2):
        n = int(lengths[b])
        assert (got[b, :n] - want[b, :n]).abs().max() <= ATOL


def test_bf16x3_products_refuse_other_stores():
    from mosaicrt.ops.associative_memory.kernel import retrieve

    x = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="bf16x3 products need a bf16 store"):
        retrieve(x, x, x, x, x, torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                 window=0, delay=1, ring=False, precision="bf16x3")  # fmt: skip
    with pytest.raises(ValueError, match="precision must be one of"):
        retrieve(x, x, x, x, x, torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                 window=0, delay=1, ring=False, precision="tf32")  # fmt: skip


@pytest.mark.parametrize("kind", ["stm", "ltm"])
def test_split_decode_matches_reference(kind):
    """One query per row over a long store, split in several slices and merged."""
    from mosaicrt.ops.associative_memory.kernel import retrieve_decode

    gen = torch.Generator().manual_seed(7)
    mem = memory(kind, 2, 32)
    slots = H - 1 if kind == "stm" else 700
    st = filled_state(mem, 5, slots, torch.float32, gen)
    pos = torch.tensor([0, 2, 3, 650, 300])  # t < m, t < h, first LTM pair, long, idle row
    lengths = torch.tensor([1, 1, 1, 1, 0])
    q = 30 * torch.nn.functional.normalize(torch.randn(5, 1, 2, 32, generator=gen), dim=-1)
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    got = retrieve_decode(
        *(x.to(DEVICE) for x in (q, st.keys, st.vals, k_new, v_new, pos, lengths)),
        window=H if kind == "stm" else 0,
        delay=1 if kind == "stm" else M,
        ring=kind == "stm",
        split_size=128,
    ).cpu()
    assert (got[:4] - want[:4]).abs().max() <= ATOL
    assert got[0].abs().max() == 0


@pytest.mark.parametrize(
    "reach, rows, want",
    [(1025, 16, 16), (1025, 128, 2), (1025, 1024, 1), (4097, 16, 16), (4097, 128, 2),
     (4097, 1024, 1), (257, 16, 4), (40, 16, 1)],
)  # fmt: skip
def test_decode_splits_fill_an_h200_with_few_long_slices(reach, rows, want):
    """The split the decode kernel takes on an H200 (132 multiprocessors, 264 programs aimed
    for): the measured best at 1k and 4k pairs for batch 1, 8 and 64 x 16 heads
    (bench/results/kernels_splits_h200.json); an STM ring of 256 pairs in slices of 64 and
    more; a store shorter than a slice in one."""
    from mosaicrt.ops.associative_memory.kernel import decode_splits

    assert decode_splits(reach, rows, split_size=64, max_splits=16, programs=264) == want
    got = decode_splits(reach, rows, split_size=64, max_splits=16, programs=None)
    assert got == min(16, 1 << (max(1, reach // 64).bit_length() - 1))  # unbounded: slices alone


def paged(st: MemoryState, block: int, gen) -> MemoryState:
    """The same LTM store as a pool of blocks (P + 1, S, H, hs), each row's blocks scattered
    over the pool in random order, and its block table: the torch backend's paged layout."""
    B, N, heads, hs = st.keys.shape
    per_row = N // block
    table = torch.randperm(B * per_row + 3, generator=gen)[: B * per_row].view(B, per_row)
    pools = []
    for store in (st.keys, st.vals):
        pool = torch.randn(B * per_row + 4, block, heads, hs, generator=gen).to(store.dtype)
        pool[table] = store.view(B, per_row, block, heads, hs)
        pools.append(pool)
    return MemoryState(st.s, st.mx, st.k_pend, st.v_pend, *pools, table)


@pytest.mark.parametrize("chunk", [1, 5, 17])
def test_retrieval_reads_a_paged_pool_through_its_table(chunk):
    """The paged LTM (pool and block table) gives what the flat store gives: the reference,
    which gathers the rows' blocks, and the kernels (chunk and split decode), which follow the
    table block by block."""
    gen = torch.Generator().manual_seed(chunk)
    heads, head_dim, B = 2, 16, 4
    mem = memory("ltm", heads, head_dim)
    pos = torch.tensor([0, 2, 40, 9])
    lengths = torch.tensor([chunk, max(chunk - 2, 1), chunk, 0])
    st = filled_state(mem, B, 64, torch.float32, gen)
    pages = paged(st, 8, gen)
    q = torch.nn.functional.normalize(torch.randn(B, chunk, heads, head_dim, generator=gen), dim=-1)
    q = q * (1 + 20 * torch.rand(B, chunk, heads, 1, generator=gen))
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = 3 * torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    from_pages = reference_retrieve(mem, q, pos, lengths, pages, k_new, v_new)
    got = kernel_retrieve(mem, q, pos, lengths, pages, k_new, v_new).cpu()
    for b in range(3):  # row 3 has no real tokens
        n = int(lengths[b])
        assert torch.equal(from_pages[b, :n], want[b, :n])
        assert (got[b, :n] - want[b, :n]).abs().max() <= ATOL


def test_retrieval_reads_half_precision_stores():
    gen = torch.Generator().manual_seed(1)
    mem = memory("ltm", 2, 32)
    st = filled_state(mem, 2, 64, torch.float16, gen)
    st.vals.mul_(100)  # values in the thousands: still exact in fp16's range
    pos, lengths = torch.tensor([40, 17]), torch.tensor([3, 3])
    q = 150 * torch.nn.functional.normalize(torch.randn(2, 3, 2, 32, generator=gen), dim=-1)
    k_new = torch.nn.functional.normalize(torch.randn(q.shape, generator=gen), dim=-1)
    v_new = torch.randn(q.shape, generator=gen)
    want = reference_retrieve(mem, q, pos, lengths, st, k_new, v_new)
    got = kernel_retrieve(mem, q, pos, lengths, st, k_new, v_new).cpu()
    # Scores reach beta = 150: fp32 rounds them by ~150 * 2^-24 * sqrt(hs), about 5e-5, and the
    # softmax passes that on as a relative error of the weights: 2e-4 relative is fp32's limit here.
    assert ((got - want).abs() / (want.abs() + 1)).max() <= 2e-4


@pytest.mark.parametrize("head_dim", [12, 16, 128])
def test_gated_scan_matches_reference(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    B, C, heads = 3, 37, 2  # several blocks of 16 tokens
    config = preset("tiny").replace(num_heads=heads, head_dim=head_dim)
    states = [MemoryState.allocate(config, B, 1, torch.float32, "cpu") for _ in range(2)]
    lengths = torch.tensor([C, 20, 0])
    valid = torch.arange(C)[None, :] < lengths[:, None]
    for step in range(2):  # the second chunk starts from the state the first one left
        k_raw = torch.randn(B, C, heads, head_dim, generator=gen)
        log_g = 40 * torch.randn(B, C, heads, generator=gen)  # exp(40+) overflows a naive scan
        log_lam = -torch.rand(B, C, heads, generator=gen) * 3
        want = gated_key_scan(k_raw, log_g, log_lam, valid, states[0].s, states[0].mx, 1e-6)
        kernel_state = on_device(states[1])
        args = (x.to(DEVICE) for x in (k_raw, log_g, log_lam, valid))
        got = TritonKernels().gated_key_scan(*args, kernel_state.s, kernel_state.mx, 1e-6).cpu()
        states[1].s.copy_(kernel_state.s)
        states[1].mx.copy_(kernel_state.mx)
        assert torch.isfinite(got).all()
        assert (got[valid] - want[valid]).abs().max() <= ATOL
        assert (states[0].s - states[1].s).abs().max() <= ATOL * states[0].s.abs().max()
        # The chunked kernel sums the same log-decays in another order: mx agrees to a few ulp.
        torch.testing.assert_close(states[0].mx, states[1].mx, rtol=1e-6, atol=0)


@pytest.mark.parametrize("segment", [16, 48])
def test_segmented_scan_matches_reference(segment):
    """A chunk cut into segments scanned in parallel and chained gives the sequential keys and
    final state; slow decays make the chaining matter, and an idle row keeps its empty state."""
    from mosaicrt.ops.gated_key_scan.kernel import gated_key_scan as kernel_scan

    gen = torch.Generator().manual_seed(segment)
    B, C, heads, hs = 3, 100, 2, 24
    config = preset("tiny").replace(num_heads=heads, head_dim=hs)
    st = MemoryState.allocate(config, B, 1, torch.float32, "cpu")
    st.s[:2] = torch.nn.functional.normalize(torch.randn(2, heads, hs, generator=gen), dim=-1)
    st.mx[:2] = 3 * torch.randn(2, heads, generator=gen)
    s, mx = st.s.to(DEVICE, copy=True), st.mx.to(DEVICE, copy=True)
    lengths = torch.tensor([C, 37, 0])
    valid = torch.arange(C)[None, :] < lengths[:, None]
    k_raw = torch.randn(B, C, heads, hs, generator=gen)
    log_g = torch.randn(B, C, heads, generator=gen)
    log_lam = -0.02 * torch.rand(B, C, heads, generator=gen)
    want = gated_key_scan(k_raw, log_g, log_lam, valid, st.s, st.mx, 1e-6)
    args = (x.to(DEVICE) for x in (k_raw, log_g, log_lam, lengths))
    got = kernel_scan(*args, s, mx, 1e-6, segment=segment).cpu()
    assert (got[valid] - want[valid]).abs().max() <= ATOL
    assert got[~valid].abs().max() == 0
    assert (s.cpu() - st.s).abs().max() <= ATOL
    torch.testing.assert_close(mx.cpu()[:2], st.mx[:2], rtol=1e-6, atol=0)
    assert torch.isneginf(mx[2]).all()


def test_cli_with_triton_kernels_matches_the_oracle(cli, oracle_ckpt, tmp_path):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    rng = np.random.default_rng(4)
    T = 2 * config["stm_window"] + config["ltm_delay"] + 2
    ids = rng.integers(0, config["vocab_size"], (2, T))
    np.save(tmp_path / "ids.npy", ids)
    proc = cli("score", oracle_ckpt, "--backend", "torch", "--kernels", "triton", "--input",
               tmp_path / "ids.npy", "--output", tmp_path / "logits.npy", "--prefill-chunk", 7,
               "--device", DEVICE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logits = np.load(tmp_path / "logits.npy")
    for row in range(2):
        assert np.abs(logits[row] - oracle.logits(oracle_ckpt, ids[row].tolist())).max() <= 1e-4
    prompts = [rng.integers(0, config["vocab_size"], n).tolist() for n in (3, 10)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    proc = cli("generate", oracle_ckpt, "--kernels", "triton", "--input", tmp_path / "p.jsonl",
               "--max-new-tokens", 5, "--device", DEVICE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for prompt, line in zip(prompts, proc.stdout.splitlines()):
        assert json.loads(line)["output_ids"] == oracle.greedy(oracle_ckpt, prompt, 5)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(cli, tiny_ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    proc = cli("generate", tiny_ckpt, "--device", "cpu", "--kernels", "triton", "--prompt", "hi")
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_step_of_length_zero_writes_only_the_scratch_block(tmp_path, kernels):
    """A CUDA graph is warmed up (and idle rows run) with steps of length 0: they must leave
    every state tensor as it was but the LTM pool's scratch block (the last one)."""
    from mosaicrt.model import random_model, save_checkpoint
    from mosaicrt.runtime.torch_backend import TorchBackend

    config = preset("tiny").replace(stm_window=H, ltm_delay=M)
    save_checkpoint(random_model(config), tmp_path)
    backend = TorchBackend(tmp_path, device=DEVICE, dtype="float32", kernels=kernels)
    state = backend.new_state(3, 64)
    prompts = torch.randint(
        0, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0)
    )
    backend.step(prompts, torch.tensor([20, 7, 0]), state, last_only=True)
    fields = ("s", "mx", "k_pend", "v_pend", "keys", "vals")
    before = [{kind: {f: getattr(st, f).clone() for f in fields} for kind, st in m.items()}
              for m in state.memories]  # fmt: skip
    idle = torch.zeros(3, dtype=torch.int64, device=DEVICE)  # (B,) lengths, and ids (B, 1)
    with torch.inference_mode():
        backend.model.advance(idle[:, None], state, idle, last_only=True)
    for layer, memories in enumerate(state.memories):
        for kind, st in memories.items():
            for field, was in before[layer][kind].items():
                now = getattr(st, field)
                if st.blocks is not None and field in ("keys", "vals"):  # the pool
                    was, now = was[:-1], now[:-1]  # without its scratch block
                assert torch.equal(was, now), (layer, kind, field)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_equals_eager_kernels(tmp_path, compile):
    """Decode steps replayed from a CUDA graph (of the step as written, or torch.compile'd) give
    the logits of the same kernels run eagerly, with rows at different positions and an idle row,
    and the states stay equal."""
    from mosaicrt.model import random_model, save_checkpoint
    from mosaicrt.runtime.torch_backend import TorchBackend

    config = preset("tiny").replace(stm_window=H, ltm_delay=M)
    save_checkpoint(random_model(config), tmp_path)
    graphed = TorchBackend(
        tmp_path, device="cuda", dtype="float32", kernels="triton", compile=compile
    )
    eager = TorchBackend(
        tmp_path, device="cuda", dtype="float32", kernels="triton", cuda_graphs=False
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (3, 20), generator=gen)
    prompt_lengths = torch.tensor([20, 7, 0])
    states = [b.new_state(3, 64) for b in (graphed, eager)]
    for backend, state in zip((graphed, eager), states):
        backend.step(prompts, prompt_lengths, state, last_only=True)
    for i in range(30):
        ids = torch.randint(0, config.vocab_size, (3, 1), generator=gen)
        lengths = torch.tensor([1, 1, int(i % 3 == 0)])  # row 2 joins now and then
        got = graphed.step(ids, lengths, states[0], last_only=True)
        want = eager.step(ids, lengths, states[1], last_only=True)
        assert (got - want).abs().max() <= 1e-5
    assert len(graphed.graphs) == 1
    assert torch.equal(states[0].pos, states[1].pos)
    for a, b in zip(states[0].memories, states[1].memories):
        for kind in a:  # the LTM pool's last block is scratch: idle rows' pairs go there
            owned = slice(None, -1) if a[kind].blocks is not None else slice(None)
            assert (a[kind].keys[owned] - b[kind].keys[owned]).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_decode_step_makes_no_sync(tiny_ckpt):
    """A decode step replayed from its CUDA graph (inputs copied in, the graph replayed) makes
    no device-to-host copy or synchronisation; the backend's capacity check reads host
    positions."""
    from mosaicrt.runtime.torch_backend import TorchBackend

    backend = TorchBackend(tiny_ckpt, device="cuda", dtype="float32", kernels="triton")
    state = backend.new_state(3, 64)
    backend.step(torch.ones(3, 5, dtype=torch.int64), torch.tensor([5, 3, 0]), state, True)
    one, ids = torch.ones(3, dtype=torch.int64), torch.ones(3, 1, dtype=torch.int64)
    backend.step(ids, one, state, True)  # captures the graph
    graph = backend.graphs[id(state)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            graph(ids, one)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.pos.tolist() == [16, 14, 11]
