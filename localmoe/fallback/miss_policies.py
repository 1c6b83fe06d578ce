"""What to do with a routed expert that is not resident: one interface, one class per answer.

A miss policy sees one layer's routing and a `MissContext` (which experts are resident, the expert
count, the cost model, the buddy table: what the scheduler hands it, not the scheduler) and returns
a `MissPlan`: possibly changed routing (a substitute expert, a dropped slot) and, for each missing expert
still to run, where it runs — `FETCH` (load it over PCIe, wait, compute on the GPU) or `CPU`
(compute it on the CPU from the quantized weights, beside the GPU's work). Buddy and little-expert
fallback plug in here as further policies.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import LocalMoEError

if TYPE_CHECKING:
    from .buddies import BuddyTable

FETCH, CPU = "fetch", "cpu"


@dataclass(frozen=True)
class MissContext:
    """What a miss policy knows of the residency engine; the scheduler builds one per layer that
    misses. Any object with these attributes will do (tests hand a small fake)."""

    cache: Container[tuple[int, int]]  # the resident set: (layer, expert) in cache ⇔ on the GPU tier now
    n_expert: int  # experts per layer
    fetch_is_faster: Callable[[int, int], bool]  # (layer, rows) → loading the expert beats computing it on the CPU
    buddy_table: BuddyTable | None = None  # when the model has been calibrated


@dataclass
class MissPlan:
    """A miss policy's answer for one layer: the routing to run and where each missing expert runs.
    The scheduler turns it, with the resident set, into compute's ExpertPlan (compute/plan.py)."""

    ids: torch.Tensor  # [T, k] expert to run per slot; -1 = dropped
    weights: torch.Tensor  # [T, k]
    where: dict[int, str] = field(default_factory=dict)  # missing expert id → FETCH | CPU
    substitutions: dict[str, int] = field(default_factory=dict)  # by kind: buddy, little, drop


class MissPolicy:
    name = "base"

    def plan(
        self, ctx: MissContext, layer: int, ids: torch.Tensor, weights: torch.Tensor, missing: list[int]
    ) -> MissPlan:
        raise NotImplementedError


class FetchOnMiss(MissPolicy):
    """Load every missing expert on demand and wait for it."""

    name = "fetch"

    def plan(self, ctx, layer, ids, weights, missing):
        return MissPlan(ids, weights, {e: FETCH for e in missing})


class CpuOnMiss(MissPolicy):
    """Fiddler: move activations, not weights. A missing expert computes on the CPU unless the
    cost model says loading it is faster (many tokens routed to it, as in prefill)."""

    name = "cpu"

    def plan(self, ctx, layer, ids, weights, missing):
        where = {}
        for e in missing:
            rows = int((ids == e).sum())
            where[e] = FETCH if ctx.fetch_is_faster(layer, rows) else CPU
        return MissPlan(ids, weights, where)


class DropOnMiss(MissPolicy):
    """Skip missing experts and rescale the remaining weights of each token to the original sum
    (a token whose experts are all missing keeps none: its MoE output is zero)."""

    name = "drop"

    def plan(self, ctx, layer, ids, weights, missing):
        return drop_experts(ids, weights, missing)


class StaticPlacement(MissPolicy):
    """llama.cpp's --n-cpu-moe: a CPU layer's experts compute on the CPU; for a batch of 32 or
    more tokens (prefill) llama.cpp copies the used experts to the GPU for that batch instead."""

    name = "static"
    BATCH_TO_GPU = 32

    def plan(self, ctx, layer, ids, weights, missing):
        return MissPlan(ids, weights, {e: FETCH if ids.shape[0] >= self.BATCH_TO_GPU else CPU for e in missing})


def drop_experts(ids: torch.Tensor, weights: torch.Tensor, drop: list[int]) -> MissPlan:
    mask = torch.isin(ids, torch.tensor(drop, dtype=ids.dtype)) if drop else torch.zeros_like(ids, dtype=torch.bool)
    kept = weights.masked_fill(mask, 0.0)
    total, kept_sum = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    scale = torch.where(kept_sum > 0, total / kept_sum.clamp(min=1e-12), torch.zeros_like(total))
    n = int(mask.sum())
    return MissPlan(ids.masked_fill(mask, -1), kept * scale, {}, {"drop": n} if n else {})


def stand_in_error(weights: list[float], cosines: list[float]) -> float:
    """Relative L2 error ‖m − y‖ of standing in for an expert's output y with the weighted mix
    m = Σ a_j·y_j of other experts' outputs (a_j: `weights` normalised), given each
    cos(y_j, y) = c_j — modelling every output as unit-norm and each y_j as c_j·y plus a part
    orthogonal to y, independent across experts. One stand-in is a substitution: √(2 − 2c), 0 for
    a copy, √2 for an unrelated expert. Several are what a dropped slot's rescaled weight buys:
    the mix averages part of their differences away (two at 0.6: 0.69, against 0.89 for one), and
    the mix of unrelated experts errs less (√(1 + Σ a_j²)) than one unrelated substitute."""
    total = sum(weights)
    if total <= 0:
        return 1.0  # nothing stands in: the output loses y
    a = [w / total for w in weights]
    along = sum(ai * ci for ai, ci in zip(a, cosines))  # m's component along y
    across = sum(ai * ai * max(1.0 - ci * ci, 0.0) for ai, ci in zip(a, cosines))  # ‖m's orthogonal part‖²
    return math.sqrt(max((along - 1.0) ** 2 + across, 0.0))


def _finish_with(
    fallback: MissPolicy, ctx: MissContext, layer: int, ids: torch.Tensor, weights: torch.Tensor, subs: dict[str, int]
) -> MissPlan:
    """Hand the experts still missing after a substitution step to the fallback policy."""
    still = [e for e in torch.unique(ids).tolist() if e >= 0 and (layer, e) not in ctx.cache]
    plan = fallback.plan(ctx, layer, ids, weights, still) if still else MissPlan(ids, weights)
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
    2. pressure: in a batch (prefill) where more than `max_missing_share` of the routed slots miss,
       loading them pays (many tokens share each copy): the fallback takes them all. A single
       decoding token has no batch to share copies; its substitutions are bounded by the cap;
    3. candidates: the missing expert's buddies in score order, resident, not already chosen for
       this token, with score ≥ `min_score`; the substitute keeps the original router weight.
    At most `max_per_token` substitutions per token and layer (BuddyMoE's 3, and never all k: by
    default min(3, k − 1); 1 for a top-1 model), lightest slots first. What is not substituted
    goes to the fallback policy (`cpu` by default)."""

    name = "buddy"

    def __init__(
        self,
        fallback: str = "cpu",
        min_score: float = 0.5,
        max_missing_share: float = 0.75,
        max_per_token: int | None = None,
    ):
        self.fallback = make_miss_policy(fallback)
        self.min_score, self.max_missing_share, self.max_per_token = min_score, max_missing_share, max_per_token

    def plan(self, ctx, layer, ids, weights, missing):
        from .buddies import token_activating_entropy

        table = ctx.buddy_table
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        crowded = ids.shape[0] > 1 and float(miss_mask.float().mean()) > self.max_missing_share
        if table is None or crowded:
            return self.fallback.plan(ctx, layer, ids, weights, missing)
        k = ids.shape[1]
        cap = self.max_per_token if self.max_per_token is not None else max(1, min(3, k - 1))
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
                    if j not in chosen and (layer, j) in ctx.cache:
                        new_ids[t, slot] = j
                        chosen.add(j)
                        done += 1
                        break
            n_subs += done
        return _finish_with(self.fallback, ctx, layer, new_ids, weights, {"buddy": n_subs} if n_subs else {})


class LittleOnMiss(MissPolicy):
    """MoBiLE's big-little split with missing experts as the trigger.

    A token's *confidence* at a layer is the share of its router weight on its heaviest ⌈k/2⌉
    experts. The token is unimportant when its confidence ranks among the top `share` of the
    confidences of the tokens that met a miss at this layer so far (an online quantile — the policy
    sees no other tokens — so one setting means the same on any model and any k: share 0.9 sends
    all but the least confident tenth of them to the little set); `threshold`, when given, is an
    absolute confidence instead. Until a layer has seen `WARMUP` tokens every token is important.

    An unimportant token that meets a missing expert runs its little set: the k/2 slots ranked
    highest by router-weight share plus `prefer_resident` for a resident expert (0, the default:
    MoBiLE's heaviest half; ≥ 1: resident experts first), and every other resident expert too (it
    costs no transfer); its weights are rescaled to the original sum. Missing experts in the little
    set, and all of an important token's, go to the fallback (`cpu` by default). share 0 (or
    threshold > 1) never goes little: exactly the all-resident results. The defaults are the
    fastest setting within 3% perplexity on the demo model's calibration text (docs/fallback.md)."""

    name = "little"
    BINS = 256  # confidence histogram resolution per layer (confidence is in [0, 1])
    WARMUP = 32

    def __init__(
        self, share: float = 0.9, threshold: float | None = None, prefer_resident: float = 0.0, fallback: str = "cpu"
    ):
        if not 0.0 <= share <= 1.0:
            raise LocalMoEError(f"little: share must be between 0 and 1, got {share}")
        if prefer_resident < 0.0:
            raise LocalMoEError(f"little: prefer_resident must be at least 0, got {prefer_resident}")
        self.share, self.threshold, self.fallback = share, threshold, make_miss_policy(fallback)
        self.prefer_resident = prefer_resident
        self._seen: dict[int, np.ndarray] = {}  # layer → confidence histogram [BINS]

    def unimportant(self, layer: int, confidence: torch.Tensor) -> torch.Tensor:
        """confidence [T] → [T] bool, and the tokens join the layer's histogram."""
        conf = confidence.double().numpy()
        bins = np.minimum((conf * self.BINS).astype(np.int64), self.BINS - 1)
        hist = self._seen.setdefault(layer, np.zeros(self.BINS))
        if self.threshold is not None:
            out = conf >= self.threshold
        elif self.share <= 0.0 or hist.sum() < self.WARMUP:
            out = np.zeros(len(conf), dtype=bool)
        else:  # rank of each confidence among those seen: the share strictly below its bin
            below = np.concatenate([[0.0], np.cumsum(hist)])[bins] / hist.sum()
            out = below >= 1.0 - self.share
        np.add.at(hist, bins, 1.0)
        return torch.from_numpy(out)

    def plan(self, ctx, layer, ids, weights, missing):
        k = ids.shape[1]
        half = max(1, k // 2)
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        sorted_w = weights.sort(-1, descending=True).values
        confidence = sorted_w[:, : (k + 1) // 2].sum(-1) / weights.sum(-1).clamp(min=1e-12)  # [T]
        little = self.unimportant(layer, confidence) & miss_mask.any(-1)
        if not bool(little.any()):
            return self.fallback.plan(ctx, layer, ids, weights, missing)
        # a little token keeps its `half` best-ranked slots (weight share, plus prefer_resident if
        # resident) and every other resident slot
        rank = (~miss_mask).float() * self.prefer_resident + weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
        in_top = torch.zeros_like(miss_mask).scatter(1, rank.topk(half, dim=-1).indices, True)
        keep = torch.where(little[:, None], in_top | ~miss_mask, torch.ones_like(miss_mask))
        new_w = _rescale(weights, keep.float())
        new_ids = ids.masked_fill(~keep, -1)
        return _finish_with(self.fallback, ctx, layer, new_ids, new_w, {"little": int((~keep).sum())})


class CostAwareOnMiss(MissPolicy):
    """Ours: choose per miss between fetch, cpu, a substitute and dropping the slot, from what each
    costs.

    Time: fetch costs copy + GPU compute on the critical path; cpu costs what CPU work adds beyond
    the GPU's (they overlap); a substitute or a dropped slot costs no transfer. Quality: the error
    it adds to the token's MoE output, w·‖stand-in − y_i‖ relative to ‖y_i‖ (w: the slot's share of
    the router weight), estimated by `stand_in_error` from the calibrated functional similarity
    c(i→j) (cosine of expert j's output to expert i's, on the inputs routed to i):
      * a substitute j costs w·√(2 − 2c(i→j)); the policy takes the resident expert, not already
        chosen for the token, with the highest c(i→j) ≥ `min_similarity`;
      * dropping the slot rescales the token's other experts, so their weighted mix stands in for
        i: cheap when one of them is a near-copy of i, as replicas in upcycled MoEs are, and
        cheaper than any one of them alone, since the mix averages their differences;
      * fetch and cpu cost nothing.
    Unlike BuddyMoE's ranking score, which mixes in the router's correlation to order candidates,
    the cost is the similarity alone: it is what the substitution changes in the output.
    Each token may add `quality_budget` of such error per layer; within it the policy takes
    the cheaper of substitute and drop, lightest slots first. Whatever exceeds the budget runs
    exactly, via fetch or cpu, whichever the cost model says is faster for the number of tokens
    that need that expert."""

    name = "cost"

    def __init__(self, quality_budget: float = 0.2, min_similarity: float = 0.2):
        self.quality_budget, self.min_similarity = quality_budget, min_similarity

    def plan(self, ctx, layer, ids, weights, missing):
        table = ctx.buddy_table
        miss_mask = torch.isin(ids, torch.tensor(missing, dtype=ids.dtype))
        share = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
        sim = table.similarity_matrix(layer) if table is not None else None  # [E, E]
        if sim is not None:  # [E] bool, for choosing substitutes
            resident = np.array([(layer, j) in ctx.cache for j in range(ctx.n_expert)])
        new_ids, keep = ids.clone(), torch.ones_like(weights)
        subs = {"buddy": 0, "drop": 0}
        for t in range(ids.shape[0]):
            if not bool(miss_mask[t].any()):
                continue
            left = self.quality_budget
            chosen = set(ids[t].tolist())
            running = [slot for slot in range(ids.shape[1]) if not miss_mask[t, slot]]  # slots sure to run
            for slot in torch.argsort(weights[t]).tolist():
                if not miss_mask[t, slot]:
                    continue
                e, w = int(ids[t, slot]), float(share[t, slot])
                # dropping: the experts that run stand in for e together, at their weights
                cos_running = [float(sim[e, int(new_ids[t, s])]) if sim is not None else 0.0 for s in running]
                best = (w * stand_in_error([float(share[t, s]) for s in running], cos_running), "drop", -1)
                if sim is not None:  # the most similar resident expert the token has not chosen
                    free = resident.copy()
                    free[list(chosen)] = False
                    if free.any():
                        j = int(np.flatnonzero(free)[np.argmax(sim[e, free])])
                        cost = w * stand_in_error([1.0], [float(sim[e, j])])
                        if float(sim[e, j]) >= self.min_similarity and cost < best[0]:
                            best = (cost, "buddy", j)
                if best[0] > left:
                    continue
                left -= best[0]
                subs[best[1]] += 1
                if best[1] == "buddy":
                    new_ids[t, slot] = best[2]
                    chosen.add(best[2])
                    running.append(slot)
                else:
                    keep[t, slot] = 0.0
                    new_ids[t, slot] = -1
        new_w = _rescale(weights, keep) if subs["drop"] else weights
        return _finish_with(CpuOnMiss(), ctx, layer, new_ids, new_w, {k: v for k, v in subs.items() if v})


MISS_POLICIES: dict[str, type[MissPolicy]] = {
    p.name: p for p in (FetchOnMiss, CpuOnMiss, DropOnMiss, BuddyOnMiss, LittleOnMiss, CostAwareOnMiss)
}


def make_miss_policy(name: str, **params) -> MissPolicy:
    cls = MISS_POLICIES.get(name)
    if cls is None:
        raise LocalMoEError(f"miss policy '{name}' is not available; choose one of {', '.join(MISS_POLICIES)}")
    known = {
        n: p.default
        for n, p in inspect.signature(cls).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key, value in params.items():
        if key not in known:
            raise LocalMoEError(
                f"miss policy '{name}' has no option '{key}'; its options: {', '.join(known) or 'none'}"
            )
        wants_text = isinstance(known[key], str)  # the others are numbers (a None default: a number or unset)
        if value is not None and (isinstance(value, str) != wants_text or isinstance(value, bool)):
            raise LocalMoEError(
                f"miss policy '{name}': option '{key}' takes {'a name' if wants_text else 'a number'}, not {value!r}"
            )
    return cls(**params)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """ "buddy:min_score=0.3:max_per_token=2" → ("buddy", {"min_score": 0.3, "max_per_token": 2}):
    a miss policy with options, as `localmoe eval --on-miss` takes them. Numbers become int or
    float; anything else stays a string (e.g. fallback=fetch). The options are checked here."""
    name, *pairs = spec.strip().split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise LocalMoEError(
                f"cannot read '{pair}' in miss policy '{spec}'; write NAME:option=value, e.g. buddy:min_score=0.3"
            )
        try:
            options[key] = int(value)
        except ValueError:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value
    make_miss_policy(name, **options)  # the name, the options and their values are accepted
    return name, options
