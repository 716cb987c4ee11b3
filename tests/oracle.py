"""An independent float64 implementation of MMv2, written from the contract (mmv2-model.md) alone.

It imports nothing from mosaicrt: it reads config.json and safetensors files itself, and it
computes every equation the plain way (naive key recurrence, explicit visible sets, loops over
positions). `write_random_checkpoint` is likewise a separate writer of the contract's format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def load_checkpoint(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    weights: dict[str, np.ndarray] = {}
    for name in files:
        weights.update(load_file(str(model_dir / name)))
    return config, {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def unit(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def memory(u: np.ndarray, w: dict[str, np.ndarray], cfg: dict, kind: str) -> np.ndarray:
    """One memory over a whole sequence u (T, d) -> (T, H*hs)."""
    T = u.shape[0]
    H, hs, eps = cfg["num_heads"], cfg["head_dim"], cfg["key_norm_eps"]
    k_tilde = (u @ w["key_proj.weight"].T).reshape(T, H, hs)
    g = np.exp(u @ w["key_gate.weight"].T)  # (T, H)
    lam = np.exp(-np.abs(u @ w["key_decay.weight"].T))
    k_bar = np.zeros((H, hs))
    keys = np.zeros((T, H, hs))
    for t in range(T):  # eq. 8, as written
        k_bar = g[t][:, None] * k_tilde[t] + lam[t][:, None] * k_bar
        keys[t] = unit(k_bar, eps)
    v_tilde = (u @ w["value_proj.weight"].T).reshape(T, H, hs)
    v_next = np.concatenate([v_tilde[1:], np.zeros((1, H, hs))])  # v~_T = 0
    gamma = w["value_mix"][:, None]
    alpha_psi = np.exp(np.minimum(np.abs(w["value_scale"]), 15.0))[:, None]
    values = alpha_psi * unit(gamma * v_tilde + (1 - gamma) * v_next, eps)
    beta0 = np.exp(np.minimum(w["bandwidth_beta0"], 10.0))
    beta1 = np.exp(np.minimum(w["bandwidth_beta1"], 10.0))
    alpha = np.minimum(np.abs(w["bandwidth_alpha"]), 1.0)
    h, m = cfg["stm_window"], cfg["ltm_delay"]
    y = np.zeros((T, H, hs))
    for t in range(T):
        S = list(range(max(0, t - h + 1), t)) if kind == "stm" else list(range(0, t - m + 1))
        if not S:
            continue  # empty visible set: y_t = 0
        beta = beta1 * float(len(S)) ** alpha + beta0  # (H,)
        for head in range(H):
            s = beta[head] * (keys[S, head] @ keys[t, head])
            p = np.exp(s - s.max())
            y[t, head] = (p / p.sum()) @ values[S, head]
    return y.reshape(T, H * hs)


def logits(model_dir: str | Path, ids: list[int]) -> np.ndarray:
    """Float64 logits (T, V) of one sequence."""
    cfg, w = load_checkpoint(model_dir)
    eps = cfg["rms_norm_eps"]
    mems = ["stm", "ltm"] if cfg["use_ltm"] else ["stm"]
    x = w["embed_tokens.weight"][np.asarray(ids)]
    for layer in range(cfg["num_layers"]):
        p = f"layers.{layer}."
        lw = {k[len(p) :]: v for k, v in w.items() if k.startswith(p)}
        u = rmsnorm(x, lw["memory_norm.weight"], eps)
        ys = [
            memory(u, {k[len(m) + 1 :]: v for k, v in lw.items() if k.startswith(m + ".")}, cfg, m)
            for m in mems
        ]
        x = x + np.concatenate(ys, axis=-1) @ lw["out_proj.weight"].T
        z = rmsnorm(x, lw["ffn_norm.weight"], eps)
        gate = z @ lw["ffn.gate_proj.weight"].T
        x = (
            x
            + ((gate / (1 + np.exp(-gate))) * (z @ lw["ffn.up_proj.weight"].T))
            @ lw["ffn.down_proj.weight"].T
        )
    return rmsnorm(x, w["norm.weight"], eps) @ w["lm_head.weight"].T


def greedy(model_dir: str | Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by full recompute at every step, stopping after the config's EOS."""
    eos = json.loads((Path(model_dir) / "config.json").read_text())["eos_token_id"]
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(logits(model_dir, ids)[-1])))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    vocab: int = 300,
    d: int = 32,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    ffn: int = 64,
    window: int = 6,
    delay: int = 3,
    use_ltm: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random checkpoint in the contract's format, weights scaled to give O(1) activations."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w: dict[str, np.ndarray] = {"embed_tokens.weight": rng.normal(0, 1, (vocab, d))}
    width = heads * head_dim
    mems = ["stm", "ltm"] if use_ltm else ["stm"]
    for layer in range(layers):
        p = f"layers.{layer}."
        w[p + "memory_norm.weight"] = 1 + rng.normal(0, 0.1, d)
        for m in mems:
            w[p + m + ".key_proj.weight"] = rng.normal(0, d**-0.5, (width, d))
            w[p + m + ".key_gate.weight"] = rng.normal(0, 0.3 * d**-0.5, (heads, d))
            w[p + m + ".key_decay.weight"] = rng.normal(0, d**-0.5, (heads, d))
            w[p + m + ".value_proj.weight"] = rng.normal(0, d**-0.5, (width, d))
            w[p + m + ".value_mix"] = rng.uniform(0, 1, heads)
            w[p + m + ".value_scale"] = rng.normal(0, 0.3, heads)
            w[p + m + ".bandwidth_beta0"] = 1.0 + rng.normal(0, 0.3, heads)
            w[p + m + ".bandwidth_beta1"] = 0.5 + rng.normal(0, 0.3, heads)
            w[p + m + ".bandwidth_alpha"] = 0.3 + rng.normal(0, 0.1, heads)
        w[p + "out_proj.weight"] = rng.normal(
            0, (width * len(mems)) ** -0.5, (d, width * len(mems))
        )
        w[p + "ffn_norm.weight"] = 1 + rng.normal(0, 0.1, d)
        w[p + "ffn.gate_proj.weight"] = rng.normal(0, d**-0.5, (ffn, d))
        w[p + "ffn.up_proj.weight"] = rng.normal(0, d**-0.5, (ffn, d))
        w[p + "ffn.down_proj.weight"] = rng.normal(0, ffn**-0.5, (d, ffn))
    w["norm.weight"] = 1 + rng.normal(0, 0.1, d)
    w["lm_head.weight"] = rng.normal(0, 2 * d**-0.5, (vocab, d))
    if dtype == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16 of its own

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    save_file({k: v.astype(np_dtype) for k, v in w.items()}, str(out / "model.safetensors"))
    config = {
        "model_type": "memory_mosaics_v2",
        "vocab_size": vocab,
        "hidden_size": d,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "stm_window": window,
        "ltm_delay": delay,
        "use_ltm": use_ltm,
        "rms_norm_eps": 1e-5,
        "key_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": vocab - 1,
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
