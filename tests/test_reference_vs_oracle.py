"""The reference model against the independent float64 implementation (tests/oracle.py)."""

import numpy as np
import oracle
import torch

from mosaicrt.model import load_model

ATOL = 1e-4  # fp32 reference vs float64 oracle, logits of O(1..10)


def test_logits_match_float64_oracle(oracle_ckpt):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    T = 3 * config["stm_window"] + 2 * config["ltm_delay"]  # T > h and T > m
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], T).tolist()
    want = oracle.logits(oracle_ckpt, ids)
    model = load_model(oracle_ckpt)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double().numpy()
    assert np.abs(got - want).max() <= ATOL
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero logits


def test_oracle_reads_sharded_checkpoints_like_the_model(tmp_path, oracle_ckpt):
    from mosaicrt.model import save_checkpoint

    model = load_model(oracle_ckpt)
    save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = list(range(1, 20))
    np.testing.assert_allclose(
        oracle.logits(tmp_path, ids), oracle.logits(oracle_ckpt, ids), rtol=0, atol=1e-12
    )
