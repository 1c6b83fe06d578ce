"""Routing traces: record what the router chose, replay cache policies on it without the model.

File format (JSON lines): a header `{"localmoe_trace": 1, "model": ..., "n_layer", "n_expert",
"top_k", "bytes_per_expert": [by layer]}`, then one line per (token, layer):
`{"t": token, "l": layer, "ids": [...], "w": [...], "pred": [...]}` — `pred` is the prefetcher's
guess for this layer made at the previous layer (absent when none was made).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

import torch

from .cache_policies import Belady, Key, Tick, make_policy
from ..errors import LocalMoEError
from .expert_cache import ExpertCache


class TraceRecorder:
    def __init__(
        self, path: str, model_name: str, n_layer: int, n_expert: int, top_k: int, bytes_per_expert: Sequence[int]
    ):
        try:
            self._f: IO[str] = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise LocalMoEError(f"cannot write the trace file {path}: {exc.strerror}") from None
        header = {
            "localmoe_trace": 1,
            "model": model_name,
            "n_layer": n_layer,
            "n_expert": n_expert,
            "top_k": top_k,
            "bytes_per_expert": list(bytes_per_expert),
        }
        self._f.write(json.dumps(header) + "\n")

    def record(self, token0: int, layer: int, ids: torch.Tensor, weights: torch.Tensor, pred: list[int] | None) -> None:
        """ids, weights [T, k] for tokens token0..token0+T-1 at `layer`."""
        for i, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
            line = {"t": token0 + i, "l": layer, "ids": row_ids, "w": [round(w, 5) for w in row_w]}
            if pred is not None and ids.shape[0] == 1:
                line["pred"] = pred
            self._f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class Trace:
    model: str
    n_layer: int
    n_expert: int
    top_k: int
    bytes_per_expert: list[int]
    steps: list[tuple[Tick, list[int], list[int] | None]] = field(default_factory=list)  # (tick, ids, pred)

    @property
    def n_tokens(self) -> int:
        return len({tick.token for tick, _, _ in self.steps})

    def accesses(self) -> Iterable[tuple[Tick, Key]]:
        for tick, ids, _ in self.steps:
            for e in ids:
                yield tick, (tick.layer, e)


def load_trace(path: str) -> Trace:
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
            if header.get("localmoe_trace") != 1:
                raise ValueError("missing header")
            tr = Trace(
                header["model"], header["n_layer"], header["n_expert"], header["top_k"], header["bytes_per_expert"]
            )
            for line in f:
                d = json.loads(line)
                tr.steps.append((Tick(d["t"], d["l"]), d["ids"], d.get("pred")))
    except FileNotFoundError:
        raise LocalMoEError(f"trace file not found: {path}") from None
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise LocalMoEError(
            f"{path} is not a localmoe trace ({exc}); record one with `localmoe run --trace FILE`"
        ) from None
    tr.steps.sort(key=lambda s: (s[0].token, s[0].layer))
    return tr


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    budget_bytes: int
    budget_share: float  # of all expert bytes
    hits: int
    misses: int
    prefetch_issued: int
    prefetch_used: int

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


def replay(trace: Trace, policy_name: str, budget_share: float, prefetch: bool = False) -> ReplayResult:
    """Demand paging on the recorded accesses: every miss loads the expert (evicting by policy).
    With `prefetch`, the recorded predictions are loaded before their layer runs."""
    total = sum(trace.bytes_per_expert) * trace.n_expert
    budget = int(total * budget_share)
    if policy_name == "belady":
        policy = Belady(trace.n_layer, trace.n_expert, trace.top_k, future=list(trace.accesses()))
    else:
        policy = make_policy(policy_name, trace.n_layer, trace.n_expert, top_k=trace.top_k)
    cache = ExpertCache(budget, trace.bytes_per_expert, policy)
    hits = misses = issued = used = 0
    prefetched: set[Key] = set()
    for tick, ids, pred in trace.steps:
        keys = [(tick.layer, e) for e in ids]
        if prefetch and pred:
            issued_at = tick.before(trace.n_layer)  # during the previous layer, as the runtime does
            for e in pred:
                policy.hint((tick.layer, e), issued_at)
            for e in pred:
                key = (tick.layer, e)
                if (
                    key not in cache
                    and cache.admit(key, issued_at, protected=[(tick.layer, p) for p in pred]) is not None
                ):
                    issued += 1
                    prefetched.add(key)
        for key in keys:
            if cache.access(key, tick):
                hits += 1
                if key in prefetched:
                    used += 1
                    prefetched.discard(key)
            else:
                misses += 1
                cache.admit(key, tick, protected=keys)
        prefetched &= set(cache.resident)
    return ReplayResult(policy_name, budget, budget_share, hits, misses, issued, used)
