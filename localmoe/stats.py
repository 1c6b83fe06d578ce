"""Counters of what the runtime did, and the one immutable snapshot (`Stats`) everyone reads.

The runtime mutates a `StatsCollector`; the TUI, `run --verbose`, bench and the server only ever
see frozen `Stats` snapshots, so a reader on another thread never sees a half-updated figure.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .compute import counters


@dataclass(frozen=True)
class LayerStats:
    layer: int
    hits: int  # routed (token, expert) uses served by a resident expert
    misses: int  # uses whose expert was not resident
    cpu_experts: int  # uses computed on the CPU from quantized weights
    prefetch_issued: int
    prefetch_used: int
    substitutions: dict[str, int]  # by kind: buddy, little, drop
    bytes_to_gpu: int
    expert_uses: tuple[int, ...]  # uses per expert of this layer (heat for the expert map)
    resident: tuple[int, ...]  # ids of this layer's experts in the GPU tier now (all of them without a budget)


@dataclass(frozen=True)
class Stats:
    tokens: int  # tokens run through the model (prompt + generated)
    prompt_tokens: int  # of the last request
    prompt_tps: float  # prompt tokens per second, last request
    decode_tokens: int  # decode steps of the last request (each samples one token; the first comes from the prompt)
    decode_tps: float  # decode steps per second, last request
    hits: int
    misses: int
    hit_rate: float
    prefetch_issued: int
    prefetch_used: int
    prefetch_precision: float  # share of predicted experts that the router then chose
    prefetch_recall: float  # share of routed experts that had been predicted
    substitutions: dict[str, int]
    cpu_experts: int
    bytes_to_gpu: int
    gpu_bytes_in_use: int
    gpu_bytes_peak: int
    gpu_budget: int | None  # None: no budget (every expert resident)
    clock: str  # "measured" or "modelled:PROFILE"
    prompt_tps_measured: float = 0.0  # wall clock, whatever `clock` says
    decode_tps_measured: float = 0.0
    decode_host_syncs: int = 0  # device→host readbacks since the last prompt ended (compute/counters.py)
    decode_launches: int = 0  # Triton kernel launches since then (torch's own ops not counted)
    layers: tuple[LayerStats, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        d = asdict(self)
        d["layers"] = [
            asdict(layer) | {"expert_uses": list(layer.expert_uses), "resident": list(layer.resident)}
            for layer in self.layers
        ]
        return d


SUBSTITUTION_KINDS = ("buddy", "little", "drop")


class StatsCollector:
    """Mutable counters, per layer; `snapshot()` freezes them."""

    def __init__(self, n_layer: int, n_expert: int, clock: str = "measured", moe_layers: tuple[int, ...] | None = None):
        self._lock = threading.Lock()
        self.n_layer = n_layer
        self.n_expert = n_expert
        self.moe_layers = frozenset(
            range(n_layer) if moe_layers is None else moe_layers
        )  # layers without experts have none resident
        self.clock = clock
        self._on_snapshot: list = []  # callables that bring counts still on the device in first
        self.reset()

    def reset(self) -> None:
        with self._lock:
            L = self.n_layer
            self.tokens = 0
            self.prompt_tokens = 0
            self.prompt_seconds = 0.0
            self.decode_tokens = 0
            self.decode_seconds = 0.0
            self.prompt_wall = 0.0
            self.decode_wall = 0.0
            self.predicted = 0
            self.predicted_correct = 0
            self.routed_unique = 0
            self.hits = [0] * L
            self.misses = [0] * L
            self.cpu_experts = [0] * L
            self.prefetch_issued = [0] * L
            self.prefetch_used = [0] * L
            self.bytes_to_gpu = [0] * L
            self.substitutions = [dict.fromkeys(SUBSTITUTION_KINDS, 0) for _ in range(L)]
            self.expert_uses = np.zeros((L, self.n_expert), dtype=np.int64)
            self.gpu_bytes_in_use = 0
            self.gpu_bytes_peak = 0
            self.gpu_budget: int | None = None
            self._counters_at_prompt = (counters.host_syncs, counters.triton_launches())
            self.resident: list[list[int]] | None = None  # per layer; None → every expert resident

    # -- updates from the engine ------------------------------------------------------------------
    def count_routed(self, layer: int, ids: torch.Tensor, resident: torch.Tensor | None = None) -> None:
        """Record the routed uses of one layer. ids [T, k]; resident [T, k] bool (None: all resident)."""
        flat = ids.reshape(-1).cpu().numpy()  # numpy: a decode step's few ids cost a torch op ~10 µs each
        n_hit = len(flat) if resident is None else int(resident.sum())
        with self._lock:
            np.add.at(self.expert_uses[layer], flat[flat >= 0], 1)
            self.hits[layer] += n_hit
            self.misses[layer] += ids.numel() - n_hit

    def add_uses(self, uses: np.ndarray) -> None:
        """Routed uses [L, E] counted elsewhere (on the device, every expert resident): all hits."""
        with self._lock:
            self.expert_uses += uses
            for layer, n in enumerate(uses.sum(axis=1).tolist()):
                self.hits[layer] += n

    def on_snapshot(self, fn) -> None:
        """Call fn() before each snapshot (the scheduler's device-side counts; it never blocks)."""
        self._on_snapshot.append(fn)

    def remove_on_snapshot(self, fn) -> None:
        if fn in self._on_snapshot:
            self._on_snapshot.remove(fn)

    def count_prediction(self, layer: int, predicted: list[int], routed: list[int]) -> None:
        """The prefetcher guessed `predicted` for this layer; the router then chose `routed`."""
        with self._lock:
            self.predicted += len(predicted)
            self.predicted_correct += len(set(predicted) & set(routed))
            self.routed_unique += len(routed)

    def add(self, layer: int, **counters: int) -> None:
        """Add to per-layer counters: cpu_experts, prefetch_issued, prefetch_used, bytes_to_gpu."""
        with self._lock:
            for name, n in counters.items():
                getattr(self, name)[layer] += n

    def add_substitution(self, layer: int, kind: str, n: int = 1) -> None:
        with self._lock:
            self.substitutions[layer][kind] += n

    def set_gpu_tier(
        self, in_use: int, peak: int, budget: int | None, resident: dict[int, list[int]], reset: bool = False
    ) -> None:
        """The GPU tier's bytes and budget, and the resident experts of the layers in `resident`
        (the others are unchanged; `reset`: every layer not given holds none)."""
        with self._lock:
            self.gpu_bytes_in_use, self.gpu_bytes_peak, self.gpu_budget = in_use, peak, budget
            if reset or self.resident is None:
                self.resident = [[] for _ in range(self.n_layer)]
            for layer, experts in resident.items():
                self.resident[layer] = experts

    def record_prompt(self, n_tokens: int, seconds: float, wall: float | None = None) -> None:
        """`seconds` on the runtime's clock (modelled or measured); `wall` measured."""
        with self._lock:
            self.tokens += n_tokens
            self.prompt_tokens = n_tokens
            self.prompt_seconds = seconds
            self.prompt_wall = seconds if wall is None else wall
            self.decode_tokens = 0
            self.decode_seconds = 0.0
            self.decode_wall = 0.0
            self._counters_at_prompt = (counters.host_syncs, counters.triton_launches())

    def record_decode(self, n_tokens: int, seconds: float, wall: float | None = None) -> None:
        with self._lock:
            self.tokens += n_tokens
            self.decode_tokens += n_tokens
            self.decode_seconds += seconds
            self.decode_wall += seconds if wall is None else wall

    # -- the snapshot -----------------------------------------------------------------------------
    def snapshot(self) -> Stats:
        for fn in self._on_snapshot:
            fn()
        return self._snapshot()

    def _snapshot(self) -> Stats:
        with self._lock:
            hits, misses = sum(self.hits), sum(self.misses)
            subs = {k: sum(s[k] for s in self.substitutions) for k in SUBSTITUTION_KINDS}
            layers = tuple(
                LayerStats(
                    layer=i,
                    hits=self.hits[i],
                    misses=self.misses[i],
                    cpu_experts=self.cpu_experts[i],
                    prefetch_issued=self.prefetch_issued[i],
                    prefetch_used=self.prefetch_used[i],
                    substitutions=dict(self.substitutions[i]),
                    bytes_to_gpu=self.bytes_to_gpu[i],
                    expert_uses=tuple(self.expert_uses[i].tolist()),
                    resident=tuple(self.resident[i])
                    if self.resident is not None
                    else tuple(range(self.n_expert))
                    if i in self.moe_layers
                    else (),
                )
                for i in range(self.n_layer)
            )
            return Stats(
                tokens=self.tokens,
                prompt_tokens=self.prompt_tokens,
                prompt_tps=_rate(self.prompt_tokens, self.prompt_seconds),
                decode_tokens=self.decode_tokens,
                decode_tps=_rate(self.decode_tokens, self.decode_seconds),
                hits=hits,
                misses=misses,
                hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                prefetch_issued=sum(self.prefetch_issued),
                prefetch_used=sum(self.prefetch_used),
                prefetch_precision=self.predicted_correct / self.predicted if self.predicted else 0.0,
                prefetch_recall=self.predicted_correct / self.routed_unique if self.routed_unique else 0.0,
                substitutions=subs,
                cpu_experts=sum(self.cpu_experts),
                bytes_to_gpu=sum(self.bytes_to_gpu),
                gpu_bytes_in_use=self.gpu_bytes_in_use,
                gpu_bytes_peak=self.gpu_bytes_peak,
                gpu_budget=self.gpu_budget,
                clock=self.clock,
                prompt_tps_measured=_rate(self.prompt_tokens, self.prompt_wall),
                decode_tps_measured=_rate(self.decode_tokens, self.decode_wall),
                decode_host_syncs=counters.host_syncs - self._counters_at_prompt[0],
                decode_launches=counters.triton_launches() - self._counters_at_prompt[1],
                layers=layers,
            )


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0
