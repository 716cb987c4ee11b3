"""Train a byte-level MMv2 on the CPU: plain PyTorch, AdamW, a cosine schedule, gradient clipping.

Every batch is a set of recall episodes (mosaicrt.train.episodes) cut from the training split of the
corpus. The model is the reference network; its differentiable full-sequence forward
(mosaicrt.model.parallel) computes the logits. Everything random comes from the seed: the
initialisation (the paper's Tab. 6), the episodes and their order.

OUT_DIR receives the checkpoint (config.json + model.safetensors, written again at every
checkpoint interval and at the end), train_log.jsonl (one JSON object per logged step) and
loss.png (the loss curve).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mosaicrt.errors import InputError
from mosaicrt.model.checkpoint import random_model, save_checkpoint
from mosaicrt.model.config import ModelConfig
from mosaicrt.model.mmv2 import MMv2
from mosaicrt.model.parallel import parallel_forward
from mosaicrt.train.corpus import load_corpus
from mosaicrt.train.episodes import TrainingEpisode, training_episode

LOG_FILE, PLOT_FILE = "train_log.jsonl", "loss.png"
# Per-head raw parameters (bandwidth, value scale, value mix): few, and far from where recall
# needs them at init (beta ~ 5 vs ~100), so they learn faster and without weight decay.
HEAD_PARAMS = ("bandwidth_beta0", "bandwidth_beta1", "bandwidth_alpha", "value_scale", "value_mix")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 900
    batch: int = 8  # episodes per step
    context: int = 1024  # tokens per episode (the targets are the next 1024)
    lr: float = 1.5e-3
    head_lr_scale: float = 3.0  # learning rate of the per-head raw parameters, relative
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    answer_weight: float = 4.0  # loss weight of the answer bytes VALUE\n of queries
    seed: int = 0
    log_every: int = 10
    save_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "context", "warmup", "log_every", "save_every"):
            value, least = getattr(self, name), 0 if name == "warmup" else 1
            if value < least:
                raise InputError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        for name in ("lr", "clip", "head_lr_scale", "answer_weight", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "weight_decay"):
                raise InputError(
                    f"--{name.replace('_', '-')} must be a positive number, got {value}"
                )


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then a cosine from lr down to lr / 10 at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    done = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def optimizer(model: MMv2, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, per-head parameters) do not."""
    groups: dict[str, list] = {"matrix": [], "vector": [], "head": []}
    for name, p in model.named_parameters():
        kind = "head" if name.rsplit(".", 1)[-1] in HEAD_PARAMS else "matrix"
        groups["vector" if kind == "matrix" and p.dim() < 2 else kind].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups["matrix"], "weight_decay": s.weight_decay, "scale": 1.0},
            {"params": groups["vector"], "weight_decay": 0.0, "scale": 1.0},
            {"params": groups["head"], "weight_decay": 0.0, "scale": s.head_lr_scale},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
    )


def batch(rng: np.random.Generator, text: bytes, config: ModelConfig, s: TrainSettings):
    """(ids (B, T+1) int64, answer (B, T+1) bool) of s.batch fresh episodes."""
    episodes: list[TrainingEpisode] = [
        training_episode(rng, text, s.context, config.bos_token_id, config.stm_window + 16)
        for _ in range(s.batch)
    ]
    ids = torch.from_numpy(np.stack([e.ids for e in episodes]))
    answer = torch.from_numpy(np.stack([e.answer for e in episodes]))
    return ids, answer


def episode_loss(model: MMv2, ids: torch.Tensor, answer: torch.Tensor, answer_weight: float):
    """Weighted next-token loss and the two parts it is made of: (loss, text nats, answers)."""
    logits = parallel_forward(model, ids[:, :-1])  # (B, T, V)
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T)
    is_answer = answer[:, 1:]
    weights = torch.where(is_answer, answer_weight, 1.0)
    loss = (nll * weights).sum() / weights.sum()
    nll, hits = nll.detach(), (logits.detach().argmax(-1) == ids[:, 1:]) | ~is_answer
    stats = {
        "text_bits_per_byte": float(nll[~is_answer].mean()) / math.log(2),
        "answer_bits_per_byte": float(nll[is_answer].mean()) / math.log(2)
        if is_answer.any()
        else float("nan"),
        "answer_byte_accuracy": float(hits[is_answer].float().mean())
        if is_answer.any()
        else float("nan"),
    }
    return loss, stats


def train(
    out_dir: str | Path,
    config: ModelConfig,
    settings: TrainSettings,
    data: list[str] | None = None,
    progress: bool = True,
    dtype: str | None = None,
) -> Path:
    """Train from the seed and write the checkpoint (its weights in dtype, default fp32: the
    training runs in fp32 whatever it is), the log and the loss plot to out_dir."""
    if config.bos_token_id is None or config.vocab_size < 256:
        raise InputError("training needs a byte-level config (vocab >= 256 and a BOS id)")
    require_matplotlib()
    text = load_corpus("train", data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = random_model(config, settings.seed).train()
    opt = optimizer(model, settings)
    log_path = out / LOG_FILE
    log_path.write_text("")
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        lr = learning_rate(step, settings)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        ids, answer = batch(rng, text, config, settings)
        loss, stats = episode_loss(model, ids, answer, settings.answer_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip))
        opt.step()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            value = loss.item()
            record = {"step": step, "loss": value, "lr": lr, "grad_norm": grad_norm,
                      **stats, "tokens": (step + 1) * settings.batch * settings.context,
                      "elapsed_s": round(time.perf_counter() - start, 1)}  # fmt: skip
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{value:.3f}", ans=f"{stats['answer_byte_accuracy']:.2f}")
        if (step + 1) % settings.save_every == 0 or step == settings.steps - 1:
            save_checkpoint(model.eval(), out, dtype)
            model.train()
    (out / "train_settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    plot_loss(log_path, out / PLOT_FILE)
    return out


def require_matplotlib() -> None:
    """Fail before the first step, not after the last, when the loss plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(
            "training draws its loss curve with matplotlib: pip install 'mosaicrt[train]'"
        )


def plot_loss(log_path: Path, png: Path) -> None:
    """Loss and answer accuracy against the step, from the JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(steps, [r["text_bits_per_byte"] for r in rows], label="text")
    left.plot(steps, [r["answer_bits_per_byte"] for r in rows], label="answers")
    left.set_xlabel("step")
    left.set_ylabel("bits per byte")
    left.set_yscale("log")
    left.legend()
    right.plot(steps, [r["answer_byte_accuracy"] for r in rows])
    right.set_xlabel("step")
    right.set_ylabel("answer bytes right (teacher-forced)")
    right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
