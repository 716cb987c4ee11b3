"""Config and checkpoint I/O: strict names and shapes, dtypes, shards, Tab. 6 initialisation."""

import json
import math

import pytest
import torch

from mosaicrt.errors import CheckpointError, ConfigError
from mosaicrt.model import ModelConfig, load_model, preset, random_model, save_checkpoint
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import load_config, tensor_shapes


def test_model_parameters_are_exactly_the_contract_tensors():
    for use_ltm in (True, False):
        config = preset("tiny").replace(use_ltm=use_ltm)
        shapes = {k: tuple(v.shape) for k, v in random_model(config).state_dict().items()}
        assert shapes == tensor_shapes(config)
    assert "layers.0.ltm.key_proj.weight" not in tensor_shapes(
        preset("tiny").replace(use_ltm=False)
    )
    assert tensor_shapes(preset("tiny").replace(use_ltm=False))["layers.0.out_proj.weight"] == (
        64,
        64,
    )


def test_config_rejects_unknown_and_missing_keys_by_name():
    data = preset("tiny").to_dict()
    data["rope_theta"] = 10000.0
    del data["ltm_delay"]
    with pytest.raises(ConfigError, match="missing keys: ltm_delay; unknown keys: rope_theta"):
        ModelConfig.from_dict(data)


def test_config_round_trip_and_bad_values(tmp_path):
    config = preset("tiny")
    write_checkpoint(random_tensors(config, 0), config, tmp_path)
    assert load_config(tmp_path) == config
    with pytest.raises(ConfigError, match="stm_window must be >= 2"):
        config.replace(stm_window=1)
    with pytest.raises(ConfigError, match="eos_token_id"):
        config.replace(eos_token_id=config.vocab_size)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_keeps_every_tensor(tmp_path, dtype):
    model = random_model(preset("tiny"), seed=3)
    save_checkpoint(model, tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == dtype
    loaded = load_model(tmp_path)
    want = {k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, want[name]), name
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        fp32 = load_model(tmp_path, dtype=torch.float32)(ids)
        assert (fp32 - model.to(getattr(torch, dtype)).float()(ids)).abs().max() == 0


def test_sharded_round_trip(tmp_path):
    model = random_model(preset("tiny"), seed=4)
    save_checkpoint(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    save_checkpoint(model, tmp_path)  # back to one file: the stale index goes
    assert not (tmp_path / "model.safetensors.index.json").exists()
    load_model(tmp_path)


def test_mismatch_error_lists_missing_unexpected_and_mismatched(tmp_path):
    config = preset("tiny")
    tensors = dict(random_tensors(config, 0))
    del tensors["layers.1.ltm.key_gate.weight"]
    tensors["layers.0.stm.bias"] = torch.zeros(4)
    tensors["norm.weight"] = torch.ones(65)
    write_checkpoint(iter(tensors.items()), config, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "missing: layers.1.ltm.key_gate.weight" in message
    assert "unexpected: layers.0.stm.bias" in message
    assert "shape mismatch: norm.weight (65,) != (64,)" in message


def test_checkpoint_from_another_config_is_rejected(tmp_path):
    write_checkpoint(random_tensors(preset("tiny"), 0), preset("tiny"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_ltm"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected: layers.0.ltm.bandwidth_alpha"):
        load_model(tmp_path)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    write_checkpoint(random_tensors(preset("tiny"), 0), preset("tiny"), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_initialisation_follows_table_6():
    config = preset("mini").replace(num_layers=2)
    t = dict(random_tensors(config, 0))
    d, f = config.hidden_size, config.intermediate_size
    for name, sigma in [
        ("layers.1.stm.key_proj.weight", 1 / math.sqrt(2 * d * 2)),
        ("layers.0.out_proj.weight", 1 / math.sqrt(2 * d)),
        ("layers.1.ffn.down_proj.weight", 1 / math.sqrt(2 * f * 2)),
        ("embed_tokens.weight", 1 / math.sqrt(2 * d)),
    ]:
        w = t[name]
        assert w.abs().max() <= 3 * sigma + 1e-12  # clamped at 3 sigma
        assert abs(w.std().item() - sigma) < 0.05 * sigma
    assert torch.all(t["layers.0.ltm.bandwidth_beta0"] == 1.5)
    assert torch.all(t["layers.0.ltm.bandwidth_beta1"] == 1.5)
    assert torch.allclose(t["layers.0.stm.bandwidth_alpha"], torch.tensor(1 / 3))
    assert torch.all(t["layers.0.stm.value_scale"] == 0)
    gamma = t["layers.1.ltm.value_mix"]
    assert gamma.min() >= 0 and gamma.max() <= 1
    assert torch.all(t["layers.0.ffn_norm.weight"] == 1)
