"""Which resident expert leaves the GPU tier when room is needed: one small interface, five rules.

Time is the model's access order: a `Tick(token, layer)`; within a token, layers run 0..L-1, so
accesses are cyclic with period L — which is why plain recency (LRU) does badly on MoE traces: the
expert LRU evicts first is often the one of the *next* layer, needed a moment later.

Policies see every routed access (`on_access`), every insertion and eviction, and choose a victim
among the resident experts that are not protected (the ones the current layer is using).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import LocalMoEError

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True, order=True)
class Tick:
    token: int
    layer: int

    def index(self, n_layer: int) -> int:
        """Position in the global access order (layer steps since the start)."""
        return self.token * n_layer + self.layer

    def before(self, n_layer: int) -> "Tick":
        """The previous layer step: when a prefetch for this step's layer is issued."""
        return Tick(self.token, self.layer - 1) if self.layer > 0 else Tick(self.token - 1, n_layer - 1)


class CachePolicy:
    """Base class: bookkeeping hooks are no-ops; `victim` must be provided."""

    name = "base"
    needs_future = False  # True: only usable when replaying a recorded trace

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1):
        self.n_layer, self.n_expert, self.top_k = n_layer, n_expert, top_k

    def on_access(self, key: Key, tick: Tick) -> None: ...

    def on_insert(self, key: Key, tick: Tick) -> None: ...

    def on_evict(self, key: Key) -> None: ...

    def hint(self, key: Key, tick: Tick) -> None:
        """The prefetcher predicts `key` for the layer step right after `tick` (before any
        admission of it). The classic policies ignore predictions."""

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        raise NotImplementedError

    def admits(self, incoming: Key, victim: Key, tick: Tick) -> bool:
        """Is `incoming` worth evicting `victim` for? False bypasses the cache: the missed expert
        runs without becoming resident. The classic policies always admit."""
        return True


class LRU(CachePolicy):
    """Evict the expert whose last use is oldest."""

    name = "lru"

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1):
        super().__init__(n_layer, n_expert, top_k)
        self.last: dict[Key, int] = {}

    def on_access(self, key: Key, tick: Tick) -> None:
        self.last[key] = tick.index(self.n_layer)

    def on_insert(self, key: Key, tick: Tick) -> None:
        self.last.setdefault(key, tick.index(self.n_layer))

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        return min(candidates, key=lambda k: self.last.get(k, -1))


class AgedLFU(CachePolicy):
    """The LFU variant of the expert-caching study (arXiv 2511.05814): per-layer use counts that
    are halved every `half_life` tokens, so that past popularity fades; evict the lowest count,
    ties by least recent use."""

    name = "lfu"

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1, half_life: int = 64):
        super().__init__(n_layer, n_expert, top_k)
        self.half_life = half_life
        self.count: dict[Key, float] = defaultdict(float)
        self.last: dict[Key, int] = {}
        self._aged_at = [0] * n_layer  # token at which each layer's counts were last halved

    def on_access(self, key: Key, tick: Tick) -> None:
        layer = key[0]
        while tick.token - self._aged_at[layer] >= self.half_life:
            self._aged_at[layer] += self.half_life
            for k in [k for k in self.count if k[0] == layer]:
                self.count[k] *= 0.5
        self.count[key] += 1.0
        self.last[key] = tick.index(self.n_layer)

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0.0), self.last.get(k, -1)))


class Belady(CachePolicy):
    """Optimal offline policy: evict the expert whose next use is farthest in the future, and do
    not admit a missed expert whose own next use is farther still (with bypass allowed, this is
    the optimum). Needs the whole access sequence, so it exists for trace analysis (the bound)."""

    name = "belady"
    needs_future = True

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1, future: Iterable[tuple[Tick, Key]] = ()):
        super().__init__(n_layer, n_expert, top_k)
        self.uses: dict[Key, deque[int]] = defaultdict(deque)
        for tick, key in future:
            self.uses[key].append(tick.index(n_layer))

    def on_access(self, key: Key, tick: Tick) -> None:
        q, now = self.uses[key], tick.index(self.n_layer)
        while q and q[0] <= now:
            q.popleft()

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        now = tick.index(self.n_layer)

        return max(candidates, key=lambda k: self._next_use(k, now))

    def admits(self, incoming: Key, victim: Key, tick: Tick) -> bool:
        now = tick.index(self.n_layer)
        return self._next_use(incoming, now) < self._next_use(victim, now)

    def _next_use(self, k: Key, now: int) -> float:
        q = self.uses.get(k)
        while q and q[0] <= now:
            q.popleft()
        return q[0] if q else math.inf


class LeastStale(CachePolicy):
    """Least-Stale (SpecMD, arXiv 2602.03921). An expert is *current* when the ongoing forward pass
    (this token) has used or loaded it, *stale* when its last use was for an earlier token. Evict
    stale experts first, oldest insertion first (FIFO); only when none is left, current ones, FIFO.
    The paper's full text was not available offline; this follows its abstract and a third-party
    description of the rule (see docs/residency.md)."""

    name = "least-stale"

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1):
        super().__init__(n_layer, n_expert, top_k)
        self.last_token: dict[Key, int] = {}
        self.inserted: dict[Key, int] = {}
        self._order = 0

    def on_access(self, key: Key, tick: Tick) -> None:
        self.last_token[key] = tick.token

    def on_insert(self, key: Key, tick: Tick) -> None:
        self._order += 1
        self.inserted[key] = self._order
        self.last_token[key] = max(self.last_token.get(key, tick.token), tick.token)

    def on_evict(self, key: Key) -> None:
        self.inserted.pop(key, None)

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        def rank(k: Key) -> tuple[int, int]:
            current = 1 if self.last_token.get(k, -1) >= tick.token else 0
            return (current, self.inserted.get(k, 0))

        return min(candidates, key=rank)


class ReuseDistance(CachePolicy):
    """Ours: evict the expert with the largest *expected* time to its next use — Belady's rule
    with the future estimated instead of known.

    For expert e of layer l at tick (t, c): its layer next runs d = (l − c − 1) mod L + 1 steps
    ahead, and each pass uses it with probability p (its aged share of the layer's uses, from
    per-layer counts halved every `half_life` tokens, with a small prior so unseen experts are not
    treated as never used). The number of passes until it is used is geometric, so the expected
    distance is d + L·(1/p − 1). Frequency alone (LFU) ignores d; layer order alone (Least-Stale)
    ignores p; this weighs both. Recent router picks (the prefetcher's predictions, reported with
    `hint`) count as half a use. And like Belady it may refuse a missed expert: one whose own
    expected distance is larger than the victim's is not admitted (it runs without residency).
    An expert the prefetcher predicts for the next step is expected there with the predictions'
    measured precision q: its distance is q·d + (1 − q)·(the frequency estimate)."""

    name = "reuse"

    def __init__(self, n_layer: int, n_expert: int, top_k: int = 1, half_life: int = 32, prior: float = 0.25):
        super().__init__(n_layer, n_expert, top_k)
        self.half_life, self.prior = half_life, prior
        self.count: dict[Key, float] = defaultdict(float)
        self.layer_total = [0.0] * n_layer
        self.last: dict[Key, int] = {}
        self._aged_at = [0] * n_layer
        self.predicted: dict[Key, int] = {}  # key → the access step it is predicted for
        self.hints = self.hints_right = 0

    def _age(self, layer: int, token: int) -> None:
        while token - self._aged_at[layer] >= self.half_life:
            self._aged_at[layer] += self.half_life
            for k in [k for k in self.count if k[0] == layer]:
                self.count[k] *= 0.5
            self.layer_total[layer] *= 0.5

    def on_access(self, key: Key, tick: Tick) -> None:
        self._age(key[0], tick.token)
        now = tick.index(self.n_layer)
        if self.predicted.get(key) == now and self.last.get(key) != now:  # a prediction came true
            self.hints_right += 1
        self.count[key] += 1.0
        self.layer_total[key[0]] += 1.0
        self.last[key] = now

    def hint(self, key: Key, tick: Tick, weight: float = 0.5) -> None:
        """A predicted use at the next layer step: half a use for the frequency estimate, and the
        step it is expected at."""
        self.count[key] += weight
        self.layer_total[key[0]] += weight
        self.predicted[key] = tick.index(self.n_layer) + 1
        self.hints += 1

    def expected_distance(self, k: Key, tick: Tick) -> float:
        L = self.n_layer
        d = (k[0] - tick.layer - 1) % L + 1
        # each pass of a layer makes top_k uses, so p = top_k · (its share of the layer's uses)
        share = (self.count.get(k, 0.0) + self.prior) / (self.layer_total[k[0]] + self.prior * self.n_expert)
        p = min(1.0, max(self.top_k * share, 1e-6))
        estimate = d + L * (1.0 / p - 1.0)
        if self.predicted.get(k) == tick.index(L) + d:  # predicted for its next pass
            q = (self.hints_right + 1) / (self.hints + 2)  # the predictions' precision so far
            return q * d + (1 - q) * estimate
        return estimate

    def victim(self, candidates: Sequence[Key], tick: Tick) -> Key:
        return max(candidates, key=lambda k: (self.expected_distance(k, tick), -self.last.get(k, -1)))

    def admits(self, incoming: Key, victim: Key, tick: Tick) -> bool:
        return self.expected_distance(incoming, tick) < self.expected_distance(victim, tick)


POLICIES: dict[str, type[CachePolicy]] = {p.name: p for p in (LRU, AgedLFU, LeastStale, ReuseDistance, Belady)}
ONLINE_POLICIES = tuple(name for name, cls in POLICIES.items() if not cls.needs_future)


def make_policy(name: str, n_layer: int, n_expert: int, **kwargs) -> CachePolicy:
    cls = POLICIES.get(name)
    if cls is None:
        raise LocalMoEError(
            f"unknown cache policy '{name}'; choose one of {', '.join(ONLINE_POLICIES)} (belady only with "
            "`bench --trace`)"
        )
    return cls(n_layer, n_expert, **kwargs)
