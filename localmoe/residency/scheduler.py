"""The expert residency engine: where every routed expert runs — resident, fetched, on the CPU, or
replaced by a fallback — and the accounting of it.

`ExpertScheduler.plan` is residency's per-layer entry; the MoE block (layers/moe.py) hands the plan
to compute (compute/plan.run_plan) and calls `finish` after. For one layer, plan:
  1. records the routed uses in the cache policy (hits and misses),
  2. asks the miss policy what to do with the missing experts (fetch / cpu / drop / …),
  3. loads what must be loaded (evicting by the cache policy, never the layer's own experts),
  4. places each expert: resident or fetched experts on the "GPU", the rest on the CPU,
  5. charges each step to the modelled timeline (also on CUDA, where the reported clock is the wall
     clock and the timeline only feeds the cost model);
and finish, once compute has been issued:
  6. starts the prefetch for the next layer from the prediction the model handed over after this
     layer's attention (give_prediction: the model routes, residency never calls it back),
  7. uploads in the background the experts the layer needed but did not load.

On the modelled tier numerics never depend on residency: every path computes with the same expert
weights in the same order, so `fetch` and `cpu` give exactly the all-resident logits; only `drop`
(and the substitution policies) change them. On a real device tier the GPU's experts compute from
exactly dequantized float32 weights and the CPU's with int8 activations (llama.cpp's numerics), so
results there agree within the oracle tests' tolerance, not bit for bit.

Without CUDA the "GPU tier" is the CPU device and the timeline of a HardwareProfile gives time.
On CUDA a `DeviceTier` holds the resident experts in GPU memory and does the copies (a side stream,
pinned staging); the timeline still runs beside it, and the wall clock is the reported one.

Host syncs: a layer reads its routing back once (ids, weights and the next layer's prediction in
one copy, compute/counters.py). With every expert resident on a Triton tier a decode step reads
nothing back at all: the experts run from device-side ids through the tier's address table, and
their use counts are summed on the device and read with the token's logits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .cache_policies import Key, Tick, make_policy
from ..errors import LocalMoEError
from .expert_cache import ExpertCache
from ..compute.counters import readback
from ..compute.experts import ExpertStore, ExpertWeights
from ..compute.plan import CPU, FETCHED, RESIDENT, STREAMED, DeviceRouting, ExpertPlan, Rows, rows_by_expert
from .gpu_tier import DeviceTier
from ..fallback.miss_policies import CPU as MISS_CPU, FETCH, MissContext, StaticPlacement, make_miss_policy
from .profiles import HardwareProfile, Timeline
from ..stats import StatsCollector
from .trace import TraceRecorder


@dataclass(frozen=True)
class ResidencyConfig:
    expert_budget: int  # bytes of experts the GPU tier may hold (after the dense weights)
    policy: str = "lfu"
    on_miss: str = "cpu"
    prefetch: bool = True
    cpu_layers: frozenset[int] | None = (
        None  # static placement (--n-cpu-moe): these layers' experts stay on the CPU, nothing moves
    )
    miss_params: tuple[tuple[str, object], ...] = ()  # keyword parameters of the miss policy (thresholds, fallback)
    all_resident: bool = False  # no budget: every expert resident from the start


@dataclass(frozen=True)
class _OpenLayer:
    """What plan() leaves for finish() of the same layer."""

    tick: Tick
    n_tokens: int
    routed: float  # modelled time the layer's routing reached the host
    protected: list[Key]  # the layer's routed experts: never evicted while it runs
    upload_later: list[int]  # experts needed but not loaded: background uploads, in this order


class ExpertScheduler:
    def __init__(
        self,
        store: ExpertStore,
        stats: StatsCollector,
        config: ResidencyConfig,
        profile: HardwareProfile,
        tier: DeviceTier | None = None,
    ):
        gguf = store.model
        self.tier = tier  # the physical GPU tier (CUDA); None: the GPU tier is modelled on the CPU device
        spec = gguf.spec
        self.store, self.stats, self.spec, self.profile = store, stats, spec, profile
        self.config = config
        self.n_layer, self.n_expert, self.top_k = spec.n_layer, spec.n_expert, spec.n_expert_used
        self.bytes_per_expert = [gguf.expert_bytes(layer) for layer in range(spec.n_layer)]
        # per expert and row: gate+up+down matmuls, 2 FLOPs per multiply-add
        self.flops_per_row = 2 * 3 * spec.n_embd * spec.n_ff_exp
        # dense work (attention, norms, router, shared expert, output head) charged evenly per layer
        self.dense_bytes_per_layer = gguf.dense_bytes() / spec.n_layer
        self.dense_flops_per_row = 2 * gguf.dense_elements() / spec.n_layer
        self.timeline = Timeline()
        self.trace: TraceRecorder | None = None
        self.buddy_table = None  # a BuddyTable when the model has been calibrated
        self.token = 0  # tokens run so far: the clock of the cache policies
        self._predicted: dict[int, list[int]] = {}  # layer → experts predicted for it
        self._arrival: dict[Key, float] = {}  # modelled time a loading expert becomes usable
        self._prefetched: set[Key] = set()  # loaded by prefetch and not yet used
        self._predictions = [0, 0]  # predicted experts so far, and how many the router then chose
        self._predicted_dev: dict[int, torch.Tensor] = {}  # layer → predicted ids [k], still on the device
        # all-resident decode on the device: expert uses counted there, copied out without a sync
        self._device_uses: torch.Tensor | None = None  # [L, E] int64 on the device
        self._uses_host: torch.Tensor | None = None  # its pinned host copy, valid once _uses_copied is done
        self._uses_copied = None  # the event of the last copy (or True on the CPU device)
        self._uses_seen = None  # the counts already given to the stats
        self._ones: torch.Tensor | None = None  # [k] int64 ones on the device, the index_add source
        self._open: _OpenLayer | None = None  # the layer between plan() and finish()
        stats.on_snapshot(self.absorb_device_uses)
        self._configure(config)

    # -- settings ---------------------------------------------------------------------------------
    def _configure(self, config: ResidencyConfig) -> None:
        self.config = config
        self.policy = make_policy(config.policy, self.n_layer, self.n_expert, top_k=self.top_k)
        self.miss_policy = (
            StaticPlacement()
            if config.cpu_layers is not None
            else make_miss_policy(config.on_miss, **dict(config.miss_params))
        )
        self.cache = ExpertCache(config.expert_budget, self.bytes_per_expert, self.policy)
        if self.tier is not None:
            self.tier.clear()
        if (
            config.cpu_layers is not None or config.all_resident
        ):  # static placement: every expert of the GPU layers, fixed
            cpu_layers = config.cpu_layers or frozenset()
            self.preload(
                [(layer, e) for layer in self.spec.moe_layers if layer not in cpu_layers for e in range(self.n_expert)]
            )
        self._arrival.clear()
        self._prefetched.clear()
        self._publish(reset=True)  # a new cache: every layer's resident set is new

    def preload(self, keys: list[Key]) -> None:
        """Make `keys` resident before the first token (static placement; every expert without a budget).
        An expert that does not fit is an error: these placements promise residency."""
        tick = Tick(0, 0)
        for key in keys:
            if self.cache.admit(key, tick) is None:
                need = sum(self.bytes_per_expert[layer] for layer, _ in keys)
                raise LocalMoEError(
                    f"this placement needs {need / 2**30:.2f} GiB of GPU memory for the experts it keeps on the GPU; "
                    "raise --gpu-mem or move more layers to the CPU with --n-cpu-moe"
                )
            if self.tier is not None:
                self.tier.upload(key)

    def reconfigure(self, **changes) -> None:
        """Apply new settings (policy, on_miss, prefetch, expert_budget, ...) between requests. The
        cache restarts empty under a new cache policy, budget or placement; a new miss policy or
        prefetch setting keeps the warm cache."""
        fields = {**self.config.__dict__, **{k: v for k, v in changes.items() if v is not None}}
        config = ResidencyConfig(**fields)
        keeps_cache = all(
            getattr(config, f) == getattr(self.config, f)
            for f in ("expert_budget", "policy", "cpu_layers", "all_resident")
        )
        if keeps_cache:
            self.config = config
            self.miss_policy = (
                StaticPlacement()
                if config.cpu_layers is not None
                else make_miss_policy(config.on_miss, **dict(config.miss_params))
            )
            return
        table, old = self.buddy_table, self.config
        try:
            self._configure(config)
        except LocalMoEError:
            self._configure(old)  # back to a whole, working configuration (its cache restarts empty)
            raise
        finally:
            self.buddy_table = table

    @property
    def measured(self) -> bool:
        """True on a real GPU tier: the wall clock is the one to report."""
        return self.tier is not None and self.tier.cuda

    @property
    def clock(self) -> str:
        return "measured" if self.measured else f"modelled:{self.profile.name}"

    def elapsed(self) -> float:
        return self.timeline.now

    # -- cost model ----------------------------------------------------------------------------------
    def fetch_is_faster(self, layer: int, rows: int) -> bool:
        """Fiddler's choice for one missing expert: copy + GPU compute vs CPU compute."""
        nbytes, flops = self.bytes_per_expert[layer], self.flops_per_row * rows
        p = self.profile
        return (
            p.copy_seconds(nbytes) + p.gpu_seconds(nbytes, flops) < p.cpu_seconds(nbytes, flops) + 2 * p.pcie_latency_s
        )

    def miss_context(self) -> MissContext:
        """What the miss policy sees: the resident set, the expert count, the cost model, the buddy table."""
        return MissContext(self.cache, self.n_expert, self.fetch_is_faster, self.buddy_table)

    def _prefetch_pays(self, start: float, next_routed: float, nbytes: int) -> bool:
        """Whether a prefetch copy that can start at `start` is worth its link time: right (with
        the predictions' precision q so far), it saves what a demand fetch at the next layer's
        routing would wait beyond it; wrong, it holds the link past that routing and delays the
        next layer's own fetches by as much."""
        copy = self.profile.copy_seconds(nbytes)
        q = (self._predictions[1] + 1) / (self._predictions[0] + 2)
        saved = min(copy, next_routed - start)
        delay = max(0.0, start + copy - next_routed)
        return q * saved > (1 - q) * delay

    # -- the per-layer entry: routing in, a plan out (the MoE block hands it to compute) ----------
    def wants_prediction(self, layer: int, n_tokens: int) -> bool:
        """Whether the model should hand over the experts `layer`'s router picks on the residual
        stream after the previous layer's attention (decode only: in prefill nearly every expert
        is used), for the prefetch."""
        c = self.config
        moves = c.prefetch and c.cpu_layers is None and not c.all_resident
        return moves and n_tokens == 1 and 0 < layer < self.n_layer and self.spec.is_moe(layer)

    def give_prediction(self, layer: int, ids: torch.Tensor) -> None:
        """ids [k] (on the device): the experts predicted for `layer`, read back with the previous
        layer's routing (no sync of its own)."""
        self._predicted_dev[layer] = ids

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> ExpertPlan:
        """ids, weights [T, k] (the router's, on the compute device) → where each routed expert runs,
        with the hits, misses, loads and modelled time accounted. finish(plan) follows its execution."""
        if ids.shape[0] == 1 and self._on_device(layer):
            return self._device_plan(layer, ids, weights)
        ids, weights, predicted = self._read_routing(layer, ids, weights)
        tick = Tick(self.token, layer)
        if self.trace is not None:
            self.trace.record(self.token, layer, ids, weights, predicted)
        resident = self._account_uses(layer, ids, predicted, tick)  # 1. hits and misses
        routed = self._charge_dense(ids.shape[0])
        protected = [(layer, e) for e in resident]  # never evicted while this layer needs them
        missing = [e for e, hit in resident.items() if not hit]
        decision = self.miss_policy.plan(self.miss_context(), layer, ids, weights, missing) if missing else None
        substitutions = {}
        if decision is not None:  # 2. the miss policy: substitutes, drops, fetch or CPU per missing expert
            ids, weights, substitutions = decision.ids, decision.weights, decision.substitutions
            for kind, n in substitutions.items():
                self.stats.add_substitution(layer, kind, n)
        rows = rows_by_expert(ids, weights)
        where = self._place(layer, rows, decision.where if decision is not None else {}, tick, protected, routed)
        on_cpu = {e for e, place in where.items() if place == CPU}
        # needed but not loaded (substituted, skipped, computed on the CPU): uploaded after the prefetch
        upload_later = [e for e in missing if e not in decision.where] if decision is not None else []
        self._open = _OpenLayer(tick, ids.shape[0], routed, protected, upload_later + sorted(on_cpu))
        source = partial(self._weights_for, layer, on_cpu)
        split = self.tier is not None and self.tier.kernel == "triton"
        return ExpertPlan(layer, ids, weights, source, where, substitutions, split, grouped=rows)

    def finish(self, plan: ExpertPlan) -> None:
        """After the plan's experts are issued: the next layer's prefetch, then background uploads
        (last: they must never delay a fetch or a prefetch), the token clock, the stats."""
        layer, opened, self._open = plan.layer, self._open, None
        if plan.device is not None:
            self._finish_device(layer)
            return
        protected = self._prefetch_next(layer, opened)
        for e in opened.upload_later:
            self._background_upload((layer, e), opened.tick, protected, opened.routed)
        if layer == self.n_layer - 1:
            self.token += opened.n_tokens
        self._publish()

    # -- the plan's steps -------------------------------------------------------------------------
    def _read_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor):
        """Decisions are made on the host: one readback per layer, the next layer's prediction with
        it. Returns (ids, weights) [T, k] on the host and the experts predicted for this layer."""
        pred = self._predicted_dev.pop(layer + 1, None)
        if pred is not None:
            ids, weights, pred = readback(ids, weights, pred)
            self._predicted[layer + 1] = pred.tolist()
        else:
            ids, weights = readback(ids, weights)
        return ids, weights, self._predicted.pop(layer, None)

    def _account_uses(self, layer: int, ids: torch.Tensor, predicted: list[int] | None, tick: Tick) -> dict[int, bool]:
        """Record the routed uses ids [T, k] in the cache policy and the stats, the prediction's
        precision and the prefetches used. Returns routed expert → resident, by expert id."""
        uses = Counter(ids.reshape(-1).tolist())  # expert → routed (token, slot) uses
        experts = sorted(uses)
        resident = {e: self.cache.access((layer, e), tick) for e in experts}
        for e in experts:  # one access per routed (token, slot): frequency counts every use
            for _ in range(uses[e] - 1):
                self.policy.on_access((layer, e), tick)
        resident_mask = torch.tensor([[resident[e] for e in row] for row in ids.tolist()], dtype=torch.bool)
        self.stats.count_routed(layer, ids, resident_mask)
        if predicted is not None:
            self.stats.count_prediction(layer, predicted, experts)
            self._predictions[0] += len(predicted)
            self._predictions[1] += len(set(predicted) & set(experts))
        for e in experts:
            if resident[e] and (layer, e) in self._prefetched:
                self._prefetched.discard((layer, e))
                self.stats.add(layer, prefetch_used=1)
        return resident

    def _charge_dense(self, n_tokens: int) -> float:
        """Charge attention + router readback on the GPU; returns when the routing is on the host."""
        p, tl = self.profile, self.timeline
        dense = p.gpu_seconds(self.dense_bytes_per_layer, self.dense_flops_per_row * n_tokens)
        attn_end = tl.run_gpu(dense, ready=tl.now)
        return attn_end + p.sync_latency_s

    def _place(
        self, layer: int, rows: Rows, decided: dict[int, str], tick: Tick, protected: list[Key], routed: float
    ) -> dict[int, str]:
        """Steps 3–5 for each routed expert: where it runs (RESIDENT, FETCHED, STREAMED or CPU),
        loading what must be loaded (evicting by the cache policy, never `protected`) and charging
        the link, the GPU and the CPU on the timeline; ends the layer's modelled time.
        decided: the miss policy's FETCH or CPU per missing expert."""
        p, tl, st = self.profile, self.timeline, self.stats
        cpu_end, where = routed, {}
        for e, (tok, _) in rows.items():
            key = (layer, e)
            nbytes, flops = self.bytes_per_expert[layer], self.flops_per_row * len(tok)
            action = decided.get(e)
            if action is None and self._still_arriving(key, routed, nbytes, flops):
                action = MISS_CPU  # its copy lands later than the CPU could finish it: co-execute
            place = CPU if action == MISS_CPU else RESIDENT
            if place != CPU and key not in self.cache:
                if self._load(key, tick, protected, ready=routed):
                    place = FETCHED
                elif action == FETCH:  # not admitted: stream it through a scratch buffer, as llama.cpp does
                    self._arrival[key] = tl.copy(p.copy_seconds(nbytes), ready=routed)
                    st.add(layer, bytes_to_gpu=nbytes)
                    place = STREAMED
                else:
                    place = CPU
            if place == CPU:
                cpu_end = tl.run_cpu(p.cpu_seconds(nbytes, flops), ready=routed + p.pcie_latency_s)
                st.add(layer, cpu_experts=len(tok))
            else:
                tl.run_gpu(p.gpu_seconds(nbytes, flops), ready=max(routed, self._arrival.pop(key, 0.0)))
            where[e] = place
        # the layer ends when the GPU is done and the CPU's sum is back on it (no CPU share: no copy)
        on_cpu = CPU in where.values()
        tl.now = max(tl.gpu, routed, cpu_end + p.pcie_latency_s if on_cpu else routed)
        return where

    def _prefetch_next(self, layer: int, opened: _OpenLayer) -> list[Key]:
        """6. Prefetch the next layer's predicted experts, overlapping this layer's compute. The
        prediction is read back with this layer's routing (one sync), so the copies can start at
        `routed`; on the link they queue behind this layer's demand fetches only. Returns the keys
        protected from eviction from now on (this layer's and the predicted ones)."""
        p, tl, tick, routed = self.profile, self.timeline, opened.tick, opened.routed
        protected = opened.protected
        nxt = self._predicted.get(layer + 1)
        if not nxt:
            return protected
        protected = protected + [(layer + 1, n) for n in nxt]
        for e in nxt:  # the policy hears the prediction before it decides on admissions
            self.policy.hint((layer + 1, e), tick)
        dense = p.gpu_seconds(self.dense_bytes_per_layer, self.dense_flops_per_row * opened.n_tokens)
        next_routed = tl.now + dense + p.sync_latency_s
        for e in nxt:
            key = (layer + 1, e)
            if key in self.cache:
                continue
            if not self._prefetch_pays(max(tl.link, routed), next_routed, self.bytes_per_expert[layer + 1]):
                break
            if self._load(key, tick, protected, ready=routed, prefetch=True):
                self.stats.add(layer + 1, prefetch_issued=1)
                self._prefetched.add(key)
        return protected

    def _weights_for(self, layer: int, on_cpu: set[int], expert: int) -> ExpertWeights:
        """The weights compute reads for `expert`: the store's (in place or repacked) on the CPU, the
        GPU tier's otherwise."""
        return self.store.weights(layer, expert) if expert in on_cpu else self._gpu_weights((layer, expert))

    def _on_device(self, layer: int) -> bool:
        """Every expert resident on a Triton tier and nothing to record per layer on the host: the
        layer runs from device-side routing."""
        c = self.config
        return (
            self.tier is not None
            and self.tier.kernel == "triton"
            and c.all_resident
            and c.cpu_layers is None
            and self.trace is None
            and self.store.epilogue.fused_ok
        )

    def _device_plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> ExpertPlan:
        """One decode token, every expert resident: compute runs 3 launches from the device-side ids,
        no sync. The routed uses are counted on the device (hits, by definition) and reach the stats
        when the copy made after the last layer has landed (absorb_device_uses)."""
        tier = self.tier
        if tier.ready:
            tier.wait_all()  # the preload's copies: the kernels read experts the host never named
        if self._device_uses is None:
            self._device_uses = torch.zeros((self.n_layer, self.n_expert), dtype=torch.int64, device=ids.device)
            self._uses_seen = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
            self._uses_host = torch.zeros((self.n_layer, self.n_expert), dtype=torch.int64, pin_memory=tier.cuda)
            self._ones = torch.ones(self.top_k, dtype=torch.int64, device=ids.device)
        self._device_uses[layer].index_add_(0, ids[0], self._ones)
        routing = DeviceRouting(tier.addresses[:, layer], tier.weights((layer, 0)))
        return ExpertPlan(layer, ids, weights, partial(self._weights_for, layer, set()), device=routing)

    def _finish_device(self, layer: int) -> None:
        """After a device-routed layer: at the token's last layer, copy the use counts out (no sync)."""
        if layer != self.n_layer - 1:
            return
        self.token += 1
        self._uses_host.copy_(self._device_uses, non_blocking=True)
        if self.tier.cuda:
            self._uses_copied = torch.cuda.Event()
            self._uses_copied.record()
        else:
            self._uses_copied = True

    def absorb_device_uses(self) -> None:
        """Give the stats the expert uses counted on the device, once their copy has landed (never
        waits: the token's logits readback has normally finished it)."""
        done = self._uses_copied
        if done is None or not (done is True or done.query()):
            return
        self._uses_copied = None
        now = self._uses_host.numpy().copy()
        delta, self._uses_seen = now - self._uses_seen, now
        self.stats.add_uses(delta)

    def _gpu_weights(self, key: Key) -> ExpertWeights:
        """The weights a GPU-tier computation reads: the resident buffer, or a one-use copy of an
        expert that was fetched without being admitted."""
        if self.tier is None:
            return self.store.weights(*key)  # modelled tier: the GPU is the CPU device
        return self.tier.weights(key) if key in self.tier.buffers else self.tier.streamed(key)

    def _still_arriving(self, key: Key, routed: float, nbytes: int, flops: float) -> bool:
        """A resident expert whose (pre)fetch copy is still on the link: with CPU co-execution on,
        compute it on the CPU when that finishes sooner than waiting for the copy."""
        arrival = self._arrival.get(key, 0.0)
        if arrival <= routed or self.config.on_miss == "fetch":
            return False
        p = self.profile
        gpu_done = max(routed, arrival, self.timeline.gpu) + p.gpu_seconds(nbytes, flops)
        cpu_done = max(routed + p.pcie_latency_s, self.timeline.cpu) + p.cpu_seconds(nbytes, flops) + p.pcie_latency_s
        return cpu_done < gpu_done

    # -- moving experts ---------------------------------------------------------------------------
    def _load(self, key: Key, tick: Tick, protected: list[Key], ready: float, prefetch: bool = False) -> bool:
        """Make `key` resident; charge the copy on the link. False when it cannot be admitted."""
        nbytes = self.bytes_per_expert[key[0]]
        if self.config.cpu_layers is not None:  # static placement: a batch-only copy, nothing stays
            self._arrival[key] = self.timeline.copy(self.profile.copy_seconds(nbytes), ready=ready)
            self.stats.add(key[0], bytes_to_gpu=nbytes)
            return True
        evicted = self.cache.admit(key, tick, protected)
        if evicted is None:
            return False
        for k in evicted:
            self._arrival.pop(k, None)
            self._prefetched.discard(k)
            if self.tier is not None:
                self.tier.evict(k)
        if self.tier is not None:
            self.tier.upload(key)
        self._arrival[key] = self.timeline.copy(self.profile.copy_seconds(nbytes), ready=ready)
        self.stats.add(key[0], bytes_to_gpu=nbytes)
        return True

    def _background_upload(self, key: Key, tick: Tick, protected: list[Key], ready: float) -> None:
        """After a CPU-computed miss, upload the expert for later tokens — only when the link is
        idle, so background uploads never queue up behind each other (rate limit)."""
        if self.config.cpu_layers is None and key not in self.cache and self.timeline.link <= ready:
            self._load(key, tick, protected, ready)

    def _publish(self, reset: bool = False) -> None:
        """Tell the stats the tier's bytes and the resident experts of the layers that changed."""
        self.stats.set_gpu_tier(
            self.cache.used_bytes, self.cache.peak_bytes, self.cache.budget, self.cache.take_dirty(), reset=reset
        )

    def check(self) -> None:
        self.cache.check()
        if self.tier is not None:
            self.tier.check(set(self.cache.resident))
