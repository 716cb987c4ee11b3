"""Training: the differentiable forward equals the reference, the episodes follow their format,
and a few seeded steps on a tiny config lower the loss, reproducibly."""

import json

import numpy as np
import pytest
import torch

from mosaicrt.errors import InputError
from mosaicrt.model import preset, random_model
from mosaicrt.model.checkpoint import load_tensors
from mosaicrt.model.config import load_config
from mosaicrt.model.parallel import parallel_forward, shifted_retrieval
from mosaicrt.ops import geometry
from mosaicrt.ops.gated_key_scan.reference import PARALLEL_CHUNK
from mosaicrt.train.corpus import MARKERS, load_corpus
from mosaicrt.train.episodes import WORD, recall_episode, training_episode
from mosaicrt.train.loop import TrainSettings, train

ATOL = 1e-4  # fp32 parallel forward vs fp32 streaming forward, logits of O(1..10)


@pytest.mark.parametrize("use_ltm", [True, False])
def test_parallel_forward_equals_the_reference(use_ltm):
    """Several scan blocks (T > PARALLEL_CHUNK), T > h and T > m, memories scaled up so that
    retrieval shapes the logits; gradients reach every parameter."""
    config = preset("tiny").replace(stm_window=9, ltm_delay=5, use_ltm=use_ltm)
    model = random_model(config, seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("key_proj.weight", "value_proj.weight", "out_proj.weight")):
                p.mul_(6.0)
    T = 2 * PARALLEL_CHUNK + 37
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    got = parallel_forward(model, ids)
    assert (got.detach() - want).abs().max() <= ATOL
    assert want.abs().max() > 1.0
    got.logsumexp(-1).mean().backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    # alpha_psi = exp(min(|theta|, 15)) at theta = 0, the Tab. 6 init: |theta| has no slope there.
    assert missing == {f"layers.{i}.{m}.value_scale" for i in range(2) for m in config.memories}


@pytest.mark.parametrize(
    "T, window, delay",
    [(37, 9, 1), (64, 64, 1), (65, 64, 1), (130, 64, 1), (20, 30, 1), (1, 9, 1),
     (37, geometry.NO_WINDOW, 5), (5, geometry.NO_WINDOW, 5), (4, geometry.NO_WINDOW, 8)],
)  # fmt: skip
def test_shifted_retrieval_equals_a_masked_softmax(T, window, delay):
    """Banded (window) and causal (no window) retrieval against a dense softmax over the visible
    sets of mosaicrt.ops.geometry, at block edges and with sequences shorter than the delay."""
    gen = torch.Generator().manual_seed(T + delay)
    q = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64) * 4
    k = torch.nn.functional.normalize(
        torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64), dim=-1
    )
    v = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    t = torch.arange(T)
    visible = geometry.visible(t[:, None], t[None, :], window, delay)  # (T, T)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    want = torch.nan_to_num(torch.softmax(scores, -1)) @ v  # rows with nothing visible: 0
    assert (shifted_retrieval(q, k, v, window, delay) - want).abs().max() <= 1e-12


def test_episodes_follow_their_format():
    text = load_corpus("heldout")
    assert not set(text) & set(MARKERS)
    rng = np.random.default_rng(0)
    episode = training_episode(rng, text, 1024, bos=256, min_distance=80)
    assert len(episode.ids) == 1025 and episode.ids[0] == 256
    body = bytes(episode.ids[1:].tolist())
    answers = bytes(episode.ids[episode.answer].tolist())
    for line in body.split(b"\n")[:-1]:  # the last line may be cut
        if line.startswith(b"?"):
            key = line[1 : 1 + WORD]
            fact = body.index(b"@" + key + b":")
            assert body.index(line) - fact >= 80  # asked from beyond the STM window
            assert line == b"?" + key + b":" + body[fact + WORD + 2 : fact + 2 * WORD + 2]
    assert answers and set(answers) <= set(b"abcdefghijklmnopqrstuvwxyz\n")

    ep = recall_episode(rng, text, 4096, bos=256, min_distance=128, facts=4)
    assert len(ep.prompt) + len(ep.answer) <= 4096 and ep.prompt[0] == 256
    prompt = bytes(ep.prompt[1:])
    key = prompt[-WORD - 1 : -1]
    assert prompt.endswith(b"?" + key + b":") and prompt.count(b"@") == 4
    assert bytes(ep.answer) == prompt[prompt.index(b"@" + key) + WORD + 2 :][:WORD] + b"\n"
    assert ep.distance >= 128


def tiny_run(out, seed=0):
    config = preset("tiny")
    settings = TrainSettings(steps=8, batch=2, context=128, lr=3e-3, warmup=2, seed=seed,
                             log_every=1, save_every=100)  # fmt: skip
    return train(out, config, settings, progress=False)


def test_training_lowers_the_loss_reproducibly(tmp_path):
    tiny_run(tmp_path / "a")
    tiny_run(tmp_path / "b")
    log = [
        json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == list(range(8))
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # from ~5.6 (uniform over 258) downwards
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    config = load_config(tmp_path / "a")
    a, b = load_tensors(tmp_path / "a", config), load_tensors(tmp_path / "b", config)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed, the same weights


def test_bad_training_settings_are_refused():
    with pytest.raises(InputError, match="--steps must be >= 1"):
        TrainSettings(steps=0)
    with pytest.raises(InputError, match="--lr must be a positive number"):
        TrainSettings(lr=float("nan"))
