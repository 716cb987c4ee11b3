"""Memory Mosaics v2, the PyTorch reference: one file, equation by equation (mmv2-model.md).

Dimensions: B batch, C tokens in a chunk (C = T for a full forward), d hidden size, H heads per
memory, hs head size, N stored pairs, V vocabulary.

One code path serves both uses. `step` consumes a chunk of any length against a DecodeState and
updates it in place (C = 1 decodes, C > 1 is chunked prefill); `forward` is a step of the whole
sequence from a fresh state. Positions are per sequence, so rows of a batch may be at different
points of their sequences, and `lengths` marks how many tokens of each row's chunk are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mosaicrt.errors import CapacityError
from mosaicrt.model.config import ModelConfig
from mosaicrt.model.state import DecodeState, MemoryState
from mosaicrt.ops import geometry
from mosaicrt.ops.associative_memory.reference import associative_memory
from mosaicrt.ops.gated_key_scan.reference import gated_key_scan, l2_normalize


def fuse_linears(linears: list[nn.Module]) -> torch.Tensor | None:
    """One weight (sum of outputs, inputs) for Linear layers that read the same input, each
    layer's weight now a view of its rows (nothing held twice); None, nothing changed, where one
    is not a plain nn.Linear without bias (a quantized one)."""
    if any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears):
        return None
    fused = torch.cat([lin.weight.detach() for lin in linears])
    at = 0
    for lin in linears:
        lin.weight = nn.Parameter(fused[at : at + lin.out_features], requires_grad=False)
        at += lin.out_features
    return fused


@dataclass(frozen=True)
class Chunk:
    """Where a step's tokens stand, the same for every layer and memory (made once a step).

    pos (B,) each row's first position; valid (B, C) its real tokens; t (B, C) their positions;
    new_ok (B, C) the pairs the chunk completes (pair j is tau = t_j - 1, complete when token j
    is real and t_j >= 1); new_tau (B, C) their positions, -1 where none; last (B,) each row's
    last real token (0 in a row of none); has (B, 1, 1) the rows with a token; rows (B,) 0..B-1.
    """

    pos: torch.Tensor
    valid: torch.Tensor
    t: torch.Tensor
    new_ok: torch.Tensor
    new_tau: torch.Tensor
    last: torch.Tensor
    has: torch.Tensor
    rows: torch.Tensor

    @staticmethod
    def of(pos: torch.Tensor, lengths: torch.Tensor, C: int) -> Chunk:
        """The chunk of C tokens at pos (B,) whose first lengths (B,) tokens are real."""
        steps = torch.arange(C, device=pos.device)[None, :]  # (1, C)
        valid = steps < lengths[:, None]  # (B, C)
        t = pos[:, None] + steps  # (B, C) query positions
        new_ok = valid & (t >= 1)
        new_tau = torch.where(new_ok, t - 1, -1)
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(pos.shape[0], device=pos.device)
        return Chunk(pos, valid, t, new_ok, new_tau, last, (lengths > 0)[:, None, None], rows)


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


class AssociativeMemory(nn.Module):
    """One memory (STM or LTM): gated keys, look-ahead values, retrieval with bandwidth beta(n).

    Which memory it is comes down to its (window, delay) (mosaicrt.ops.geometry): a memory with a
    window keeps its pairs in a ring of window - 1 slots, one without keeps them all."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__()
        d, H, hs = config.hidden_size, config.num_heads, config.head_dim
        self.H, self.hs = H, hs
        self.window, self.delay = geometry.memory_window_delay(
            kind, config.stm_window, config.ltm_delay
        )
        self.ring = geometry.has_window(self.window)
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
        self.kernels: MemoryKernels | None = None  # None: the reference ops
        self.frozen: dict[str, torch.Tensor] | None = None  # `freeze`: the transforms, once

    def transforms(self) -> dict[str, torch.Tensor]:
        """The Tab. 6 reparameterisations, each (H,) fp32 (those of `freeze` once frozen)."""
        if self.frozen is not None:
            return self.frozen
        return {
            "gamma": self.value_mix.float(),
            "alpha_psi": torch.exp(self.value_scale.float().abs().clamp(max=15.0)),
            "beta0": torch.exp(self.bandwidth_beta0.float().clamp(max=10.0)),
            "beta1": torch.exp(self.bandwidth_beta1.float().clamp(max=10.0)),
            "alpha": self.bandwidth_alpha.float().abs().clamp(max=1.0),
        }

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the transforms once, for inference on parameters that no longer change: a
        step then launches none of their ops (some ten per memory). Call it again after the
        parameters change, device and dtype included."""
        self.frozen = None
        self.frozen = self.transforms()

    def stored_pairs(
        self, st: MemoryState, pos: torch.Tensor, C: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored pairs this chunk may read, as views of the store (no copy), with positions.

        Before the chunk a row at position p has completed pairs tau in [0, p-2].
        Returns keys, vals (B, N, H, hs) and their positions tau (B, N), -1 for an empty slot.
        """
        if self.ring:
            slots = torch.arange(st.keys.shape[1], device=pos.device)
            return st.keys, st.vals, geometry.ring_positions(pos - 2, st.keys.shape[1], slots)
        n = geometry.readable_pairs(pos, C, self.delay)
        tau = torch.arange(n, device=pos.device)[None, :].expand(pos.shape[0], n)
        tau = torch.where(tau <= (pos - 2)[:, None], tau, -1)
        if st.blocks is None:
            return st.keys[:, :n], st.vals[:, :n], tau
        # Paged: gather each row's blocks, (B, nb, S, H, hs) -> (B, nb*S, H, hs) (one copy).
        S = st.keys.shape[1]
        ids = st.blocks[:, : -(-n // S)]
        keys, vals = (x[ids].flatten(1, 2)[:, :n] for x in (st.keys, st.vals))
        return keys, vals, tau

    def write_pairs(
        self,
        st: MemoryState,
        keys: torch.Tensor,
        vals: torch.Tensor,
        tau: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """Write completed pairs (B, C, H, hs) at positions tau (B, C) where ok, in place."""
        if self.ring:
            slots = st.keys.shape[1]
            if keys.shape[1] > 1:  # a ring keeps only the newest h-1 pairs (one: the newest)
                newest = torch.where(ok, tau, -1).amax(dim=1, keepdim=True)  # (B, 1)
                ok = ok & (tau > newest - slots)
            slot = geometry.ring_slot(tau, slots)
        elif st.blocks is not None:  # paged: block blocks[b, tau // S], slot tau % S
            self.write_paged(st, keys, vals, tau, ok)
            return
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

    @staticmethod
    def write_paged(
        st: MemoryState, keys: torch.Tensor, vals: torch.Tensor, tau: torch.Tensor, ok: torch.Tensor
    ) -> None:
        """write_pairs into a pool (P + 1, S, H, hs) through the block table: pairs that are not
        ok go to the scratch block P, so no host sync is needed to leave them out."""
        S, scratch = st.keys.shape[1], st.keys.shape[0] - 1
        index = (tau.clamp(min=0) // S).clamp(max=st.blocks.shape[1] - 1)  # (B, C)
        block = torch.where(ok, st.blocks.gather(1, index), scratch)
        slot = tau.clamp(min=0) % S
        st.keys[block, slot] = keys.to(st.keys.dtype)  # (B, C, H, hs)
        st.vals[block, slot] = vals.to(st.vals.dtype)

    def projections(self) -> list[nn.Module]:
        """The input projections in the order of a fused projection's columns: W_phi (H*hs),
        W_g (H), W_lam (H), W_psi (H*hs)."""
        return [self.key_proj, self.key_gate, self.key_decay, self.value_proj]

    def forward(
        self, u: torch.Tensor, st: MemoryState, chunk: Chunk, proj: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One chunk: u (B, C, d) at the positions `chunk` gives -> y (B, C, H*hs).
        proj: u through `projections` at once (B, C, 2*H*hs + 2*H), when the layer fused them."""
        B, C, _ = u.shape
        H, hs = self.H, self.hs
        p = self.transforms()
        ops = self.kernels or REFERENCE_OPS
        if proj is None:
            k_raw, log_g, log_decay, v_raw = (lin(u) for lin in self.projections())
        else:
            k_raw, log_g, log_decay, v_raw = proj.split([H * hs, H, H, H * hs], dim=-1)

        # Keys (eq. 8), fp32.
        k_raw = k_raw.float().view(B, C, H, hs)
        log_g = log_g.float()  # (B, C, H)
        log_lam = -log_decay.float().abs()  # (B, C, H)
        keys = ops.gated_key_scan(k_raw, log_g, log_lam, chunk.valid, st.s, st.mx, self.eps)

        # Values (eq. 9) of the pairs this chunk completes: pair j is tau = pos-1+j; its key and
        # v~ come from the token before chunk token j (the pending one for j = 0), v~_{tau+1} from
        # chunk token j. So it is complete only when chunk token j is real.
        v_raw = v_raw.float().view(B, C, H, hs)
        k_pairs, v_prev = st.k_pend[:, None], st.v_pend[:, None]  # decode: the pending ones
        if C > 1:  # (the pending ones are updated in place only after the pairs are written)
            k_pairs = torch.cat([k_pairs, keys[:, :-1]], dim=1)  # (B, C, H, hs)
            v_prev = torch.cat([v_prev, v_raw[:, :-1]], dim=1)  # (B, C, H, hs)
        gamma = p["gamma"][:, None]  # (H, 1)
        v_pairs = p["alpha_psi"][:, None] * l2_normalize(
            gamma * v_prev + (1 - gamma) * v_raw, self.eps
        )  # (B, C, H, hs)

        # Retrieval over the stored pairs and this chunk's, beta(n_t) inside the op: (B, C, H, hs).
        t, pos, new_tau = chunk.t, chunk.pos, chunk.new_tau
        y = ops.retrieve(self, st, keys, t, pos, k_pairs, v_pairs, new_tau, p)

        # Update the state in place: publish the new pairs, keep the last real token pending.
        self.write_pairs(st, k_pairs, v_pairs, chunk.new_tau, chunk.new_ok)
        rows, last, has = chunk.rows, chunk.last, chunk.has
        st.k_pend.copy_(torch.where(has, keys[rows, last], st.k_pend))
        st.v_pend.copy_(torch.where(has, v_raw[rows, last], st.v_pend))
        return y.reshape(B, C, H * hs).to(u.dtype)


class MemoryKernels(Protocol):
    """The implementations of the two ops a memory runs: REFERENCE_OPS by default, or others
    (e.g. the Triton kernels, mosaicrt.runtime.torch_kernels) with the same contracts."""

    def gated_key_scan(
        self,
        k_raw: torch.Tensor,
        log_g: torch.Tensor,
        log_lam: torch.Tensor,
        valid: torch.Tensor,
        s: torch.Tensor,
        mx: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """mosaicrt.ops.gated_key_scan, state (s, mx) updated in place; returns the keys."""

    def retrieve(
        self,
        mem: AssociativeMemory,
        st: MemoryState,
        q: torch.Tensor,
        t: torch.Tensor,
        pos: torch.Tensor,
        new_k: torch.Tensor,
        new_v: torch.Tensor,
        new_tau: torch.Tensor,
        params: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """mosaicrt.ops.associative_memory over mem's stores in st and the chunk's new pairs."""


class ReferenceOps:
    """The ops' torch references, reading the stores through AssociativeMemory.stored_pairs."""

    gated_key_scan = staticmethod(gated_key_scan)

    @staticmethod
    def retrieve(mem, st, q, t, pos, new_k, new_v, new_tau, params) -> torch.Tensor:
        keys, vals, tau = mem.stored_pairs(st, pos, q.shape[1])  # (B, N, H, hs), (B, N)
        return associative_memory(q, t, keys, vals, tau, new_k, new_v, new_tau, params["beta0"],
                                  params["beta1"], params["alpha"], mem.window,
                                  mem.delay)  # fmt: skip


REFERENCE_OPS = ReferenceOps()


class FeedForward(nn.Module):
    """Persistent memory: SwiGLU, down(silu(gate(z)) * up(z))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None  # `fuse`: gate_proj's and up_proj's rows

    def fuse(self) -> None:
        """gate_proj and up_proj as one product (fuse_linears)."""
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(z), self.up_proj(z)
        else:
            gate, up = F.linear(z, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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
        self.memory_in: torch.Tensor | None = None  # `fuse`: every memory's projections' rows

    def fuse(self) -> None:
        """The input projections of all the layer's memories as one product, and the FFN's gate
        and up as another (fuse_linears): a decode step reads the same weights in 4 products
        instead of 4 per memory + 4."""
        mems = [getattr(self, mem) for mem in self.memories]
        self.memory_in = fuse_linears([lin for mem in mems for lin in mem.projections()])
        self.ffn.fuse()

    def forward(
        self, x: torch.Tensor, states: dict[str, MemoryState], chunk: Chunk
    ) -> torch.Tensor:
        u = self.memory_norm(x)  # one shared input norm for both memories
        projs = [None] * len(self.memories)
        if self.memory_in is not None:
            projs = F.linear(u, self.memory_in).chunk(len(self.memories), dim=-1)
        ys = [getattr(self, mem)(u, states[mem], chunk, proj)
              for mem, proj in zip(self.memories, projs)]  # fmt: skip
        x = x + self.out_proj(torch.cat(ys, dim=-1))  # [yS ; yL] -> d
        return x + self.ffn(self.ffn_norm(x))


def check_capacity(state: DecodeState, lengths: torch.Tensor) -> None:
    """Refuse a step that would take a sequence past the state's capacity (lengths (B,) on the
    CPU, against the state's host positions: nothing is read back from a device)."""
    reach = int((state.host_pos + lengths).max())
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

    def freeze(self) -> None:
        """Inference on weights that stay as they are: AssociativeMemory.freeze of every memory
        and Layer.fuse of every layer (after any move and quantization: a quantized product is
        not fused)."""
        for layer in self.layers:
            layer.fuse()
            for mem in layer.memories:
                getattr(layer, mem).freeze()

    def new_state(
        self, batch: int, capacity: int, block: int | None = None, pool_blocks: int | None = None
    ) -> DecodeState:
        """A fresh state for `batch` sequences of up to `capacity` tokens, on the model's device
        (its LTM paged in blocks of `block` pairs when given: DecodeState.allocate)."""
        w = self.embed_tokens.weight
        return DecodeState.allocate(
            self.config, batch, capacity, w.dtype, w.device, block, pool_blocks
        )

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
        check_capacity(state, lengths.cpu())
        logits = self.advance(ids, state, lengths, last_only)
        state.host_pos += lengths.cpu()
        return logits

    def advance(
        self, ids: torch.Tensor, state: DecodeState, lengths: torch.Tensor, last_only: bool
    ) -> torch.Tensor:
        """`step` without the capacity check and without updating state.host_pos (the caller
        does both). With kernels that take the whole store (the Triton ones) a decode step
        (C = 1) makes no host sync, so it can be captured in a CUDA graph."""
        chunk = Chunk.of(state.pos.clone(), lengths, ids.shape[1])
        x = self.embed_tokens(torch.where(chunk.valid, ids, 0))  # (B, C, d)
        for layer, states in zip(self.layers, state.memories):
            x = layer(x, states, chunk)
        state.pos += lengths
        if last_only:
            x = x[chunk.rows, chunk.last]  # (B, d)
            return self.lm_head(self.norm(x))  # (B, V)
        logits = self.lm_head(self.norm(x))  # (B, C, V)
        return logits.masked_fill(~chunk.valid[..., None], 0.0)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits (B, T, V) for right-padded rows of `lengths` tokens each."""
        state = self.new_state(ids.shape[0], ids.shape[1])
        return self.step(ids, state, lengths)
