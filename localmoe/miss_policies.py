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
    substitutions: dict[str, int] = field(default_factory=dict)  # by kind: buddy, little, drop


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
    n = int(mask.sum())
    return Plan(ids.masked_fill(mask, -1), kept * scale, {}, {"drop": n} if n else {})


def _finish_with(fallback: MissPolicy, sched, layer: int, ids: torch.Tensor, weights: torch.Tensor, subs: dict[str, int]) -> Plan:
    """Hand the experts still missing after a substitution step to the fallback policy."""
    still = [e for e in torch.unique(ids).tolist() if e >= 0 and (layer, e) not in sched.cache]
    plan = fallback.plan(sched, layer, ids, weights, still) if still else Plan(ids, weights)
    for kind, n in subs.items():
        plan.substitutions[kind] = plan.substitutions.get(kind, 0) + n
    return plan


def _rescale(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the slots not kept and rescale each token's kept weights to its original sum."""
    kept = weights * keep
    ks = kept.sum(-1, keepdim=True)
    return torch.where(ks > 0, kept * weights.sum(-1, keepdim=True) / ks.clamp(min=1e-12), kept)


class BuddyOnMiss(MissPolicy):
    """BuddyMoE, with its three gates in order:
    1. tolerance: a token whose router bets on few experts (token activating entropy ≤ the layer's
       calibrated τ) is never substituted;
    2. pressure: when more than `max_missing_share` of the layer's routed slots miss, substitution
       would rewrite too much of the layer: fall back for all of them;
    3. candidates: the missing expert's buddies in score order, resident, not already chosen for
       this token, with score ≥ `min_score`; the substitute keeps the original router weight.
    At most `max_per_token` substitutions per token and layer (low-weight slots first). What is not
    substituted goes to the fallback policy (`cpu` by default)."""

    name = "buddy"

    def __init__(self, fallback: str = "cpu", min_score: float = 0.3, max_missing_share: float = 0.75, max_per_token: int | None = None):
        self.fallback = make_miss_policy(fallback)
        self.min_score, self.max_missing_share, self.max_per_token = min_score, max_missing_share, max_per_token

    def plan(self, sched, layer, ids, weights, missing):
        from .buddies import token_activating_entropy

        table = sched.buddy_table
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        if table is None or float(miss_mask.float().mean()) > self.max_missing_share:
            return self.fallback.plan(sched, layer, ids, weights, missing)
        k = ids.shape[1]
        cap = self.max_per_token if self.max_per_token is not None else max(1, min(3, k // 2))
        tae = token_activating_entropy(weights)
        tau = table.tau(layer)
        new_ids = ids.clone()
        n_subs = 0
        for t in range(ids.shape[0]):
            if float(tae[t]) <= tau or not bool(miss_mask[t].any()):
                continue
            chosen = set(ids[t].tolist())
            done = 0
            for slot in torch.argsort(weights[t]).tolist():  # lightest slots first
                e = int(ids[t, slot])
                if not miss_mask[t, slot] or done >= cap:
                    continue
                for j, score in table.buddies(layer, e):
                    if score < self.min_score:
                        break
                    if j not in chosen and (layer, j) in sched.cache:
                        new_ids[t, slot] = j
                        chosen.add(j)
                        done += 1
                        break
            n_subs += done
        return _finish_with(self.fallback, sched, layer, new_ids, weights, {"buddy": n_subs} if n_subs else {})


class LittleOnMiss(MissPolicy):
    """MoBiLE's big-little split with missing experts as the trigger. A token is unimportant when
    its router is confident: the heaviest ⌈k/2⌉ of its k experts carry at least `threshold` of its
    weight. An unimportant token that hits a missing expert runs a little set of k/2 experts from
    its top-k, resident ones first, weights rescaled to the original sum; an important one keeps
    all k (missing ones via the fallback, `cpu` by default). threshold > 1 means never little."""

    name = "little"

    def __init__(self, threshold: float = 0.75, fallback: str = "cpu"):
        self.threshold, self.fallback = threshold, make_miss_policy(fallback)

    def plan(self, sched, layer, ids, weights, missing):
        k = ids.shape[1]
        half = max(1, k // 2)
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        sorted_w = weights.sort(-1, descending=True).values
        confident = sorted_w[:, : (k + 1) // 2].sum(-1) >= self.threshold * weights.sum(-1)  # [T]
        little = confident & miss_mask.any(-1)
        if not bool(little.any()):
            return self.fallback.plan(sched, layer, ids, weights, missing)
        # rank slots: resident first, then by weight; keep the best `half` for little tokens
        rank = (~miss_mask).float() * 10.0 + weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
        top = rank.topk(half, dim=-1).indices
        keep = torch.ones_like(weights, dtype=torch.bool)
        keep[little] = False
        keep[little] = keep[little].scatter(1, top[little], True)
        new_w = _rescale(weights, keep.float())
        new_ids = ids.masked_fill(~keep, -1)
        return _finish_with(self.fallback, sched, layer, new_ids, new_w, {"little": int((~keep).sum())})


class CostAwareOnMiss(MissPolicy):
    """Ours: choose per miss between fetch, cpu, buddy and little/drop from what each costs.

    Time: fetch costs copy + GPU compute on the critical path; cpu costs what CPU work adds beyond
    the GPU's (they overlap); a buddy or a dropped slot costs no transfer. Quality: a buddy costs
    w·(1 − s) (w the slot's router weight share, s the buddy score: how well it stands in), a
    dropped slot costs w, fetch and cpu cost nothing. Each token may spend `quality_budget` of its
    router mass per layer; within it the policy takes the cheapest-in-time option, lightest slots
    first, and a substitution never uses a non-resident expert or one the token already has.
    Whatever exceeds the budget runs exactly, via fetch or cpu, whichever the cost model says is
    faster for the number of tokens that need that expert."""

    name = "cost"

    def __init__(self, quality_budget: float = 0.15, min_score: float = 0.2):
        self.quality_budget, self.min_score = quality_budget, min_score

    def plan(self, sched, layer, ids, weights, missing):
        table = sched.buddy_table
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        share = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
        new_ids, keep = ids.clone(), torch.ones_like(weights)
        subs = {"buddy": 0, "drop": 0}
        for t in range(ids.shape[0]):
            if not bool(miss_mask[t].any()):
                continue
            left = self.quality_budget
            chosen = set(ids[t].tolist())
            for slot in torch.argsort(weights[t]).tolist():
                if not miss_mask[t, slot]:
                    continue
                e, w = int(ids[t, slot]), float(share[t, slot])
                best = None  # (quality cost, kind, substitute)
                if table is not None:
                    for j, score in table.buddies(layer, e):
                        if score >= self.min_score and j not in chosen and (layer, j) in sched.cache:
                            best = (w * (1.0 - score), "buddy", j)
                            break
                if best is None or w < best[0]:
                    best = (w, "drop", -1)
                if best[0] <= left:
                    left -= best[0]
                    subs[best[1]] += 1
                    if best[1] == "buddy":
                        new_ids[t, slot] = best[2]
                        chosen.add(best[2])
                    else:
                        keep[t, slot] = 0.0
                        new_ids[t, slot] = -1
        new_w = _rescale(weights, keep) if subs["drop"] else weights
        return _finish_with(CpuOnMiss(), sched, layer, new_ids, new_w, {k: v for k, v in subs.items() if v})


MISS_POLICIES: dict[str, type[MissPolicy]] = {p.name: p for p in (FetchOnMiss, CpuOnMiss, DropOnMiss, BuddyOnMiss, LittleOnMiss, CostAwareOnMiss)}


def make_miss_policy(name: str, **params) -> MissPolicy:
    cls = MISS_POLICIES.get(name)
    if cls is None:
        raise LocalMoEError(f"miss policy '{name}' is not available; choose one of {', '.join(MISS_POLICIES)}")
    return cls(**params)
