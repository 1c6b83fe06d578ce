"""What to do with a routed expert that is not resident: one interface, one class per answer.

A miss policy sees one layer's routing and the residency of every routed expert and returns a
`Plan`: possibly changed routing (a substitute expert, a dropped slot) and, for each missing expert
still to run, where it runs — `FETCH` (load it over PCIe, wait, compute on the GPU) or `CPU`
(compute it on the CPU from the quantized weights, beside the GPU's work). Buddy and little-expert
fallback plug in here as further policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import LocalMoEError

if TYPE_CHECKING:
    from .scheduler import ExpertScheduler

FETCH, CPU = "fetch", "cpu"


@dataclass
class Plan:
    ids: torch.Tensor  # [T, k] expert to run per slot; -1 = dropped
    weights: torch.Tensor  # [T, k]
    where: dict[int, str] = field(default_factory=dict)  # missing expert id → FETCH | CPU
    dropped: int = 0  # slots skipped


class MissPolicy:
    name = "base"

    def plan(self, sched: "ExpertScheduler", layer: int, ids: torch.Tensor, weights: torch.Tensor, missing: list[int]) -> Plan:
        raise NotImplementedError


class FetchOnMiss(MissPolicy):
    """Load every missing expert on demand and wait for it."""

    name = "fetch"

    def plan(self, sched, layer, ids, weights, missing):
        return Plan(ids, weights, {e: FETCH for e in missing})


class CpuOnMiss(MissPolicy):
    """Fiddler: move activations, not weights. A missing expert computes on the CPU unless the
    cost model says loading it is faster (many tokens routed to it, as in prefill)."""

    name = "cpu"

    def plan(self, sched, layer, ids, weights, missing):
        where = {}
        for e in missing:
            rows = int((ids == e).sum())
            where[e] = FETCH if sched.fetch_is_faster(layer, rows) else CPU
        return Plan(ids, weights, where)


class DropOnMiss(MissPolicy):
    """Skip missing experts and rescale the remaining weights of each token to the original sum
    (a token whose experts are all missing keeps none: its MoE output is zero)."""

    name = "drop"

    def plan(self, sched, layer, ids, weights, missing):
        return drop_experts(ids, weights, missing)


class StaticPlacement(MissPolicy):
    """llama.cpp's --n-cpu-moe: a CPU layer's experts compute on the CPU; for a batch of 32 or
    more tokens (prefill) llama.cpp copies the used experts to the GPU for that batch instead."""

    name = "static"
    BATCH_TO_GPU = 32

    def plan(self, sched, layer, ids, weights, missing):
        return Plan(ids, weights, {e: FETCH if ids.shape[0] >= self.BATCH_TO_GPU else CPU for e in missing})


def drop_experts(ids: torch.Tensor, weights: torch.Tensor, drop: list[int]) -> Plan:
    mask = torch.isin(ids, torch.tensor(drop, dtype=ids.dtype)) if drop else torch.zeros_like(ids, dtype=torch.bool)
    kept = weights.masked_fill(mask, 0.0)
    total, kept_sum = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    scale = torch.where(kept_sum > 0, total / kept_sum.clamp(min=1e-12), torch.zeros_like(total))
    return Plan(ids.masked_fill(mask, -1), kept * scale, {}, int(mask.sum()))


MISS_POLICIES: dict[str, type[MissPolicy]] = {p.name: p for p in (FetchOnMiss, CpuOnMiss, DropOnMiss)}


def make_miss_policy(name: str) -> MissPolicy:
    cls = MISS_POLICIES.get(name)
    if cls is None:
        raise LocalMoEError(f"miss policy '{name}' is not available; choose one of {', '.join(MISS_POLICIES)}")
    return cls()
