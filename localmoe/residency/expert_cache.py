"""The GPU tier's accounting: which experts are resident, and how many bytes they take.

One class serves the live runtime and trace replay, so the hit rates `bench --trace` reports are
those the runtime would see. Bytes are each expert's bytes at rest (its gate, up and down rows as
stored in the GGUF: what crosses PCIe and what a quantized GPU kernel holds). The invariant —
`used_bytes ≤ budget` and `used_bytes == Σ bytes of resident experts` — holds after every call.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .cache_policies import CachePolicy, Key, Tick


class ExpertCache:
    def __init__(self, budget_bytes: int, bytes_per_expert: Sequence[int], policy: CachePolicy):
        self.budget = int(budget_bytes)
        self.bytes_per_expert = list(bytes_per_expert)  # by layer
        self.policy = policy
        self.resident: dict[Key, int] = {}  # key → bytes it holds
        self.by_layer: dict[int, set[int]] = {}  # layer → its resident experts
        self.dirty: set[int] = set()  # layers whose resident set changed since take_dirty()
        self.used_bytes = 0
        self.peak_bytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.resident

    def size_of(self, key: Key) -> int:
        return self.bytes_per_expert[key[0]]

    def access(self, key: Key, tick: Tick) -> bool:
        """Record a routed use; True when the expert is resident (a hit)."""
        self.policy.on_access(key, tick)
        return key in self.resident

    def admit(self, key: Key, tick: Tick, protected: Collection[Key] = ()) -> list[Key] | None:
        """Make `key` resident, evicting by policy as needed. Returns the evicted keys, or None
        when it is not admitted: larger than the budget, only protected experts could make room,
        or the policy prefers the victim (bypass). Nothing changes then."""
        if key in self.resident:
            return []
        need = self.size_of(key)
        if need > self.budget:
            return None
        evicted: list[Key] = []
        while self.used_bytes + need > self.budget:
            candidates = [k for k in self.resident if k not in protected]
            if not candidates:
                return None if not evicted else self._undo(evicted, tick)
            victim = self.policy.victim(candidates, tick)
            if not self.policy.admits(key, victim, tick):
                return None if not evicted else self._undo(evicted, tick)
            self._remove(victim)
            evicted.append(victim)
        self.resident[key] = need
        self.by_layer.setdefault(key[0], set()).add(key[1])
        self.dirty.add(key[0])
        self.used_bytes += need
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        self.policy.on_insert(key, tick)
        return evicted

    def _remove(self, key: Key) -> None:
        self.used_bytes -= self.resident.pop(key)
        self.by_layer[key[0]].discard(key[1])
        self.dirty.add(key[0])
        self.policy.on_evict(key)

    def _undo(self, evicted: list[Key], tick: Tick) -> None:
        # Put back what was evicted for an admission that could not complete: nothing changes.
        for k in evicted:
            self.resident[k] = self.size_of(k)
            self.by_layer.setdefault(k[0], set()).add(k[1])
            self.used_bytes += self.resident[k]
            self.policy.on_insert(k, tick)
        return None

    def take_dirty(self) -> dict[int, list[int]]:
        """The resident experts of each layer that changed since the last call (for the stats)."""
        out = {layer: sorted(self.by_layer.get(layer, ())) for layer in self.dirty}
        self.dirty.clear()
        return out

    def check(self) -> None:
        """Assert the accounting invariants (used by tests)."""
        assert self.used_bytes == sum(self.resident.values()) == sum(self.size_of(k) for k in self.resident)
        assert {(layer, e) for layer, es in self.by_layer.items() for e in es} == set(self.resident)
        assert self.used_bytes <= self.budget
