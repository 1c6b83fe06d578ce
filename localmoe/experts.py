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

from . import names
from .gguf_file import GGUFModel
from .quants import to_torch
from .stats import StatsCollector

ExpertId = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor  # [n_ff_exp, n_embd]
    up: torch.Tensor  # [n_ff_exp, n_embd]
    down: torch.Tensor  # [n_embd, n_ff_exp]

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.gate, self.up, self.down))


def swiglu_expert(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """One expert on the rows routed to it: x [n, n_embd] → [n, n_embd]."""
    return (F.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T


class ExpertStore:
    """Expert weights at rest stay quantized in the memory-mapped file; computing needs them
    dequantized. Dequantized experts are kept in an LRU in host RAM under `host_cache_bytes`
    (float32 bytes) so a hot expert is not dequantized every token."""

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
        parts = [to_torch(*self.model.expert_raw(layer, expert, p), device=self.device) for p in names.EXPERT_PARTS]
        w = ExpertWeights(*parts)
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
