"""Every expert addressable where it is (no GPU budget, no modelled tier): the trivial plan.

The residency the model starts with: each routed expert runs from the store's weights on the
compute device, every use a hit. The scheduler (scheduler.py) replaces it when a budget, a
profile, a trace, a static placement or a CUDA tier asks for residency decisions.
"""

from __future__ import annotations

import torch

from ..compute.experts import ExpertStore
from ..compute.plan import RESIDENT, ExpertPlan
from ..stats import StatsCollector


class AllResident:
    def __init__(self, store: ExpertStore, stats: StatsCollector):
        self.store = store
        self.stats = stats

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> ExpertPlan:
        """ids [T, k] int64, weights [T, k] float32 (host) → every routed expert resident."""
        self.stats.count_routed(layer, ids)
        where = dict.fromkeys((e for e in ids.reshape(-1).tolist() if e >= 0), RESIDENT)
        return ExpertPlan(layer, ids, weights, lambda e: self.store.weights(layer, e), where)

    def finish(self, plan: ExpertPlan) -> None:
        """Nothing moves: no prefetch, no uploads."""

    def wants_prediction(self, layer: int, n_tokens: int) -> bool:
        return False  # nothing to prefetch

    def give_prediction(self, layer: int, ids: torch.Tensor) -> None:
        pass
