"""Routed experts: where their weights come from, and the one function that runs them.

Every MoE block hands its routing decision — `(expert ids, weights)` per token — to
`ExpertExecutor.__call__`. That is the single place where residency, CPU/GPU co-execution and
substitution policies plug in; the forward pass knows nothing about them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..gguf import names
from ..gguf.file import GGUFModel
from .kernels import QLinear, RawMatrix, fuse_rows, matvec_many, repack, swiglu_decode
from ..stats import StatsCollector

ExpertId = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU FFN (a routed expert, or a shared one) in a layout with a fast kernel."""

    gate_up: QLinear  # [2·n_ff, n_embd]: the gate rows, then the up rows (one matmul for both)
    down: QLinear  # [n_embd, n_ff]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def pack_ffn(gate: RawMatrix, up: RawMatrix, down: RawMatrix, device: torch.device) -> ExpertWeights:
    """Repack one FFN's three GGUF matrices (raw data, quant type, [rows, cols]) once."""
    return ExpertWeights(fuse_rows([gate, up], device), repack(*down, device=device))


def swiglu_expert(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """One expert on the rows routed to it: x [n, n_embd] → [n, n_embd]."""
    gu = w.gate_up(x)  # [n, 2·n_ff]
    gate, up = gu.chunk(2, dim=-1)
    return w.down(F.silu(gate).mul_(up))


def swiglu_experts(ws: list[ExpertWeights], x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_e weights[e] · expert_e(x) for one row x [1, n_embd] → [1, n_embd] (decode). C-kernel
    experts of one shape run in one call (every gate+up, the SwiGLU, every down, the weighted sum);
    otherwise two calls — every gate+up, then every down — instead of 2·k."""
    y = swiglu_decode([w.gate_up for w in ws], [w.down for w in ws], x, weights)
    if y is not None:
        return y
    gu = matvec_many([w.gate_up for w in ws], x)  # [k, 2·n_ff]
    if gu is None:
        out = swiglu_expert(ws[0], x).mul_(weights[0])
        for w, c in zip(ws[1:], weights[1:]):
            out.add_(swiglu_expert(w, x).mul_(c))
        return out
    gate, up = gu.chunk(2, dim=-1)
    y = matvec_many([w.down for w in ws], F.silu(gate).mul_(up))  # [k, n_embd]
    if y is None:
        y = torch.cat([w.down(h[None]) for w, h in zip(ws, F.silu(gate).mul_(up))])
    return torch.tensor(weights, dtype=y.dtype)[None] @ y


class ExpertStore:
    """Expert weights at rest stay quantized in the memory-mapped file. Computing on them needs a
    one-time repack into the kernel's layout (compute/kernels.py) — about the file's size, not float32.
    Repacked experts are kept in an LRU in host RAM under `host_cache_bytes` so a hot expert is
    repacked once, not every token."""

    def __init__(self, model: GGUFModel, device: torch.device, host_cache_bytes: int):
        self.model = model
        self.device = device
        self.host_cache_bytes = host_cache_bytes
        self._cache: OrderedDict[ExpertId, ExpertWeights] = OrderedDict()
        self._cached_bytes = 0

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        key = (layer, expert)
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            return w
        w = pack_ffn(*(self.model.expert_raw(layer, expert, p) for p in names.EXPERT_PARTS), device=self.device)
        if w.nbytes <= self.host_cache_bytes:
            self._cache[key] = w
            self._cached_bytes += w.nbytes
            while self._cached_bytes > self.host_cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return w


class ExpertExecutor:
    """Runs the routed experts of one layer for a batch of tokens (all experts addressable).

    Tokens are grouped by expert, so each chosen expert runs once on all the rows routed to it.
    """

    def __init__(self, store: ExpertStore, stats: StatsCollector):
        self.store = store
        self.stats = stats

    def after_attention(self, layer: int, x: torch.Tensor) -> None:
        """Every expert is resident: nothing to prefetch."""

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, n_embd]; ids [T, k] int64; weights [T, k] float32 → weighted sum [T, n_embd]."""
        if x.shape[0] == 1:  # decode: k experts on one row, no grouping needed
            out = swiglu_experts([self.store.weights(layer, e) for e in ids[0].tolist()], x, weights[0].tolist())
            self.stats.count_routed(layer, ids)
            return out
        out = torch.zeros_like(x)
        flat_ids = ids.reshape(-1)
        rows = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1])  # token of each (t, slot)
        flat_w = weights.reshape(-1)
        for expert in torch.unique(flat_ids).tolist():
            sel = (flat_ids == expert).nonzero().squeeze(1)
            tok = rows[sel]
            y = swiglu_expert(self.store.weights(layer, expert), x[tok])
            out.index_add_(0, tok, y * flat_w[sel].unsqueeze(1))
        self.stats.count_routed(layer, ids)
        return out
