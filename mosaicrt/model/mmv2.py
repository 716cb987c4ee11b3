"""Memory Mosaics v2, the PyTorch reference: one file, equation by equation (mmv2-model.md).

Dimensions: B batch, C tokens in a chunk (C = T for a full forward), d hidden size, H heads per
memory, hs head size, N stored pairs, V vocabulary.

One code path serves both uses. `step` consumes a chunk of any length against a DecodeState and
updates it in place (C = 1 decodes, C > 1 is chunked prefill); `forward` is a step of the whole
sequence from a fresh state. Positions are per sequence, so rows of a batch may be at different
points of their sequences, and `lengths` marks how many tokens of each row's chunk are real.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mosaicrt.errors import CapacityError
from mosaicrt.model.config import ModelConfig
from mosaicrt.model.state import DecodeState, MemoryState


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) over the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def gated_key_scan(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    valid: torch.Tensor,
    st: MemoryState,
    eps: float,
) -> torch.Tensor:
    """Eq. 8, k_bar_t = g_t * k~_t + lam_t * k_bar_{t-1}, in the exact log-space stabilised form.

    The state keeps s = exp(-mx) * k_bar with a running max mx of the log-weights, so no gate
    ever overflows. Padding steps (valid False) leave the state unchanged.

    Args:
        k_raw: (B, C, H, hs) fp32 key projections k~.   log_g, log_lam: (B, C, H) fp32.
        valid: (B, C) bool.   st: the memory's state; s and mx are updated in place.
    Returns:
        (B, C, H, hs) fp32 unit keys k_t = k_bar_t / max(||k_bar_t||, eps).
    """
    s, mx = st.s, st.mx  # (B, H, hs), (B, H)
    keys = []
    for i in range(k_raw.shape[1]):
        carried = mx + log_lam[:, i]  # (B, H) log-weight of the old state
        mx_new = torch.maximum(carried, log_g[:, i])
        s_new = (
            torch.exp(carried - mx_new)[..., None] * s
            + torch.exp(log_g[:, i] - mx_new)[..., None] * k_raw[:, i]
        )
        ok = valid[:, i, None]  # (B, 1)
        s = torch.where(ok[..., None], s_new, s)
        mx = torch.where(ok, mx_new, mx)
        # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-mx): the same max, without leaving log-space.
        keys.append(l2_normalize(s, eps * torch.exp(-mx)[..., None]))
    st.s.copy_(s)
    st.mx.copy_(mx)
    return torch.stack(keys, dim=1)  # (B, C, H, hs)


class AssociativeMemory(nn.Module):
    """One memory (STM or LTM): gated keys, look-ahead values, retrieval with bandwidth beta(n)."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__()
        assert kind in ("stm", "ltm")
        d, H, hs = config.hidden_size, config.num_heads, config.head_dim
        self.kind, self.H, self.hs = kind, H, hs
        self.window, self.delay = config.stm_window, config.ltm_delay
        self.eps = config.key_norm_eps
        self.key_proj = nn.Linear(d, H * hs, bias=False)  # W_phi
        self.key_gate = nn.Linear(d, H, bias=False)  # W_g, log of the input gate
        self.key_decay = nn.Linear(d, H, bias=False)  # W_lam
        self.value_proj = nn.Linear(d, H * hs, bias=False)  # W_psi
        # Raw per-head parameters (Tab. 6); the transforms are applied in `transforms`.
        self.value_mix = nn.Parameter(torch.empty(H))  # gamma, unconstrained
        self.value_scale = nn.Parameter(torch.empty(H))  # alpha_psi = exp(min(|theta|, 15))
        self.bandwidth_beta0 = nn.Parameter(torch.empty(H))  # beta0 = exp(min(theta, 10))
        self.bandwidth_beta1 = nn.Parameter(torch.empty(H))  # beta1 = exp(min(theta, 10))
        self.bandwidth_alpha = nn.Parameter(torch.empty(H))  # alpha = min(|theta|, 1)
        self.kernels: MemoryKernels | None = None  # None: the reference code below

    def transforms(self) -> dict[str, torch.Tensor]:
        """The Tab. 6 reparameterisations, each (H,) fp32."""
        return {
            "gamma": self.value_mix.float(),
            "alpha_psi": torch.exp(self.value_scale.float().abs().clamp(max=15.0)),
            "beta0": torch.exp(self.bandwidth_beta0.float().clamp(max=10.0)),
            "beta1": torch.exp(self.bandwidth_beta1.float().clamp(max=10.0)),
            "alpha": self.bandwidth_alpha.float().abs().clamp(max=1.0),
        }

    def visible_count(self, t: torch.Tensor) -> torch.Tensor:
        """n_t = |S(t)|: min(t, h-1) for the STM, max(0, t-m+1) for the LTM."""
        if self.kind == "stm":
            return t.clamp(max=self.window - 1)
        return (t - self.delay + 1).clamp(min=0)

    def visible(self, t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Is pair tau in S(t)? STM: t-h+1 <= tau <= t-1; LTM: tau <= t-m (eq. 10)."""
        if self.kind == "stm":
            return (tau <= t - 1) & (tau >= t - self.window + 1)
        return tau <= t - self.delay

    def stored_pairs(
        self, st: MemoryState, pos: torch.Tensor, C: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored pairs this chunk may read, as views of the store (no copy), with positions.

        Before the chunk a row at position p has completed pairs tau in [0, p-2].
        Returns keys, vals (B, N, H, hs) and their positions tau (B, N), -1 for an empty slot.
        """
        if self.kind == "stm":
            slots = st.keys.shape[1]  # h - 1, pair tau lives in slot tau mod (h-1)
            last = (pos - 2)[:, None]  # (B, 1) newest stored pair
            idx = torch.arange(slots, device=pos.device)[None, :]
            tau = last - torch.remainder(last - idx, slots)  # newest tau <= last in each slot
            return st.keys, st.vals, torch.where(tau >= 0, tau, -1)
        # LTM: read only what some query of the chunk can see: tau <= min(p-2, p+C-1-m).
        n = int((torch.minimum(pos - 1, pos + C - self.delay)).clamp(min=0).max())
        tau = torch.arange(n, device=pos.device)[None, :].expand(pos.shape[0], n)
        return st.keys[:, :n], st.vals[:, :n], torch.where(tau <= (pos - 2)[:, None], tau, -1)

    def write_pairs(
        self,
        st: MemoryState,
        keys: torch.Tensor,
        vals: torch.Tensor,
        tau: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """Write completed pairs (B, C, H, hs) at positions tau (B, C) where ok, in place."""
        if self.kind == "stm":
            slots = st.keys.shape[1]
            newest = torch.where(ok, tau, -1).amax(dim=1, keepdim=True)  # (B, 1)
            ok = ok & (tau > newest - slots)  # a ring keeps only the newest h-1 pairs
            slot = torch.remainder(tau, slots)
        else:
            slot = tau
        if keys.shape[1] == 1:  # decode: one pair per row, written with no host sync
            rows, slot = torch.arange(keys.shape[0], device=keys.device), slot[:, 0].clamp(min=0)
            write = ok[:, 0, None, None]  # (B, 1, 1): rows without a pair rewrite their slot
            st.keys[rows, slot] = torch.where(
                write, keys[:, 0].to(st.keys.dtype), st.keys[rows, slot]
            )
            st.vals[rows, slot] = torch.where(
                write, vals[:, 0].to(st.vals.dtype), st.vals[rows, slot]
            )
            return
        rows, cols = ok.nonzero(as_tuple=True)
        st.keys[rows, slot[rows, cols]] = keys[rows, cols].to(st.keys.dtype)
        st.vals[rows, slot[rows, cols]] = vals[rows, cols].to(st.vals.dtype)

    def forward(
        self, u: torch.Tensor, st: MemoryState, pos: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """One chunk: u (B, C, d) at start positions pos (B,), valid (B, C) -> y (B, C, H*hs)."""
        B, C, _ = u.shape
        H, hs = self.H, self.hs
        p = self.transforms()

        # Keys (eq. 8), fp32.
        k_raw = self.key_proj(u).float().view(B, C, H, hs)
        log_g = self.key_gate(u).float()  # (B, C, H)
        log_lam = -self.key_decay(u).float().abs()  # (B, C, H)
        scan = self.kernels.gated_key_scan if self.kernels else gated_key_scan
        keys = scan(k_raw, log_g, log_lam, valid, st, self.eps)  # (B, C, H, hs)

        # Values (eq. 9) of the pairs this chunk completes: pair j is tau = pos-1+j; its key and
        # v~ come from the token before chunk token j (the pending one for j = 0), v~_{tau+1} from
        # chunk token j. So it is complete only when chunk token j is real.
        v_raw = self.value_proj(u).float().view(B, C, H, hs)
        k_pairs = torch.cat([st.k_pend[:, None], keys[:, :-1]], dim=1)  # (B, C, H, hs)
        v_prev = torch.cat([st.v_pend[:, None], v_raw[:, :-1]], dim=1)  # (B, C, H, hs)
        gamma = p["gamma"][:, None]  # (H, 1)
        v_pairs = p["alpha_psi"][:, None] * l2_normalize(
            gamma * v_prev + (1 - gamma) * v_raw, self.eps
        )  # (B, C, H, hs)
        steps = torch.arange(C, device=u.device)
        tau_new = pos[:, None] - 1 + steps  # (B, C)
        new_ok = valid & (tau_new >= 0)

        # Retrieval: beta(n_t) folded into the query, softmax scale exactly beta (no 1/sqrt(hs)).
        t = pos[:, None] + steps  # (B, C) query positions
        beta = p["beta1"] * self.visible_count(t)[..., None].float() ** p["alpha"] + p["beta0"]
        q = beta[..., None] * keys  # (B, C, H, hs)
        retrieve = self.kernels.retrieve if self.kernels else reference_retrieve
        lengths = valid.sum(dim=1)  # (B,)
        y = retrieve(self, q, pos, lengths, st, k_pairs, v_pairs)  # (B, C, H, hs)

        # Update the state in place: publish the new pairs, keep the last real token pending.
        self.write_pairs(st, k_pairs, v_pairs, tau_new, new_ok)
        last = (lengths - 1).clamp(min=0)
        has = (lengths > 0)[:, None, None]
        rows = torch.arange(B, device=u.device)
        st.k_pend.copy_(torch.where(has, keys[rows, last], st.k_pend))
        st.v_pend.copy_(torch.where(has, v_raw[rows, last], st.v_pend))
        return y.reshape(B, C, H * hs).to(u.dtype)


def reference_retrieve(
    mem: AssociativeMemory,
    q: torch.Tensor,
    pos: torch.Tensor,
    lengths: torch.Tensor,
    st: MemoryState,
    k_pairs: torch.Tensor,
    v_pairs: torch.Tensor,
) -> torch.Tensor:
    """Softmax over the stored pairs and the chunk's new pairs together, visibility by eq. 10.

    Args:
        q: (B, C, H, hs) queries with beta(n_t) folded in.   pos: (B,) chunk start positions.
        lengths: (B,) real tokens of each row's chunk.
        st: the memory's state (stores as before this chunk).
        k_pairs, v_pairs: (B, C, H, hs) the pairs the chunk completes (pair j is tau = pos-1+j,
            which exists when tau >= 0 and chunk token j is real).
    Returns:
        (B, C, H, hs) fp32; rows whose visible set is empty are 0.
    """
    C = q.shape[1]
    steps = torch.arange(C, device=q.device)
    t = pos[:, None] + steps  # (B, C)
    tau_new = torch.where((steps[None, :] < lengths[:, None]) & (t >= 1), t - 1, -1)
    k_old, v_old, tau_old = mem.stored_pairs(st, pos, C)  # (B, N, H, hs), (B, N)
    scores = torch.cat(
        [
            torch.einsum("bchd,bnhd->bhcn", q, k_old.float()),  # (B, H, C, N)
            torch.einsum("bchd,bjhd->bhcj", q, k_pairs),  # (B, H, C, C)
        ],
        dim=-1,
    )
    tau = torch.cat([tau_old, tau_new], dim=1)  # (B, N + C)
    mask = (tau[:, None, :] >= 0) & mem.visible(t[..., None], tau[:, None, :])  # (B, C, N+C)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1)[:, None, :, None], probs, 0.0)  # empty S(t) -> y = 0
    n_old = k_old.shape[1]
    return torch.einsum("bhcn,bnhd->bchd", probs[..., :n_old], v_old.float()) + torch.einsum(
        "bhcj,bjhd->bchd", probs[..., n_old:], v_pairs
    )  # (B, C, H, hs)


class MemoryKernels(Protocol):
    """Replacement implementations of the two hot spots (e.g. Triton kernels), same contracts as
    gated_key_scan and reference_retrieve."""

    def gated_key_scan(
        self,
        k_raw: torch.Tensor,
        log_g: torch.Tensor,
        log_lam: torch.Tensor,
        valid: torch.Tensor,
        st: MemoryState,
        eps: float,
    ) -> torch.Tensor: ...

    def retrieve(
        self,
        mem: AssociativeMemory,
        q: torch.Tensor,
        pos: torch.Tensor,
        lengths: torch.Tensor,
        st: MemoryState,
        k_pairs: torch.Tensor,
        v_pairs: torch.Tensor,
    ) -> torch.Tensor: ...


class FeedForward(nn.Module):
    """Persistent memory: SwiGLU, down(silu(gate(z)) * up(z))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(z)) * self.up_proj(z))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.memories = config.memories
        self.memory_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.stm = AssociativeMemory(config, "stm")
        if config.use_ltm:
            self.ltm = AssociativeMemory(config, "ltm")
        self.out_proj = nn.Linear(
            config.memory_width * len(self.memories), config.hidden_size, bias=False
        )
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        states: dict[str, MemoryState],
        pos: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        u = self.memory_norm(x)  # one shared input norm for both memories
        ys = [getattr(self, mem)(u, states[mem], pos, valid) for mem in self.memories]
        x = x + self.out_proj(torch.cat(ys, dim=-1))  # [yS ; yL] -> d
        return x + self.ffn(self.ffn_norm(x))


def check_capacity(state: DecodeState, lengths: torch.Tensor) -> None:
    """Refuse a step that would take a sequence past the state's capacity."""
    reach = int((state.pos + lengths).max())
    if reach > state.capacity:
        raise CapacityError(
            f"a sequence would reach {reach} tokens but the state holds {state.capacity}: "
            "allocate a larger capacity"
        )


class MMv2(nn.Module):
    """The network: embeddings (no positional encoding), layers, final norm, untied head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def use_kernels(self, kernels: MemoryKernels | None) -> None:
        """Swap the key scan and retrieval for another implementation (None: the reference)."""
        for layer in self.layers:
            for mem in layer.memories:
                getattr(layer, mem).kernels = kernels

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        """A fresh state for `batch` sequences of up to `capacity` tokens, on the model's device."""
        w = self.embed_tokens.weight
        return DecodeState.allocate(self.config, batch, capacity, w.dtype, w.device)

    def step(
        self,
        ids: torch.Tensor,
        state: DecodeState,
        lengths: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Consume a chunk and update `state` in place.

        Args:
            ids: (B, C) int64; row b's first lengths[b] tokens are real, the rest is padding.
            state: the batch's DecodeState; state.pos (B,) says where each row stands.
            lengths: (B,) int64, default all C. A row with length 0 is left untouched.
            last_only: return only the logits of each row's last real token.
        Returns:
            (B, C, V) logits (padding positions are 0), or (B, V) with last_only.
        """
        B, C = ids.shape
        if lengths is None:
            lengths = torch.full((B,), C, dtype=torch.int64, device=ids.device)
        check_capacity(state, lengths)
        return self.advance(ids, state, lengths, last_only)

    def advance(
        self, ids: torch.Tensor, state: DecodeState, lengths: torch.Tensor, last_only: bool
    ) -> torch.Tensor:
        """`step` without the capacity check. With kernels that take the whole store (the Triton
        ones) a decode step (C = 1) makes no host sync, so it can be captured in a CUDA graph."""
        B, C = ids.shape
        valid = torch.arange(C, device=ids.device)[None, :] < lengths[:, None]  # (B, C)
        pos = state.pos.clone()
        x = self.embed_tokens(torch.where(valid, ids, 0))  # (B, C, d)
        for layer, states in zip(self.layers, state.memories):
            x = layer(x, states, pos, valid)
        state.pos += lengths
        if last_only:
            x = x[torch.arange(B, device=ids.device), (lengths - 1).clamp(min=0)]  # (B, d)
            return self.lm_head(self.norm(x))  # (B, V)
        logits = self.lm_head(self.norm(x))  # (B, C, V)
        return logits.masked_fill(~valid[..., None], 0.0)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits (B, T, V) for right-padded rows of `lengths` tokens each."""
        state = self.new_state(ids.shape[0], ids.shape[1])
        return self.step(ids, state, lengths)
