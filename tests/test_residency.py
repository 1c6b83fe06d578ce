"""The expert residency engine: budgets, policies, miss policies, prefetch, traces."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import localmoe
from localmoe import LocalMoEError
from localmoe.residency.cache_policies import ONLINE_POLICIES, Tick, make_policy
from localmoe.residency.expert_cache import ExpertCache
from localmoe.bench.synth import SynthConfig, write_model
from localmoe.layers.moe import routed_experts
from localmoe.residency.trace import load_trace, replay


@pytest.fixture(scope="module")
def moe16(tmp_path_factory) -> str:
    """3 layers × 16 experts, top-4: enough experts for caching to matter."""
    return write_model(
        tmp_path_factory.mktemp("res") / "moe16.gguf",
        SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0"),
    )


def _budget(rt_or_path, share: float) -> int:
    with localmoe.load(rt_or_path, device="cpu") as rt:
        return rt.gguf.dense_bytes() + int(rt.gguf.all_expert_bytes() * share)


IDS = list(np.random.default_rng(3).integers(0, 300, 48))


@pytest.fixture(scope="module")
def reference(moe16):
    with localmoe.load(moe16, device="cpu") as rt:
        return rt.logits(IDS), rt.generate("the model of", max_tokens=10, temperature=0)


@pytest.mark.parametrize("on_miss", ["fetch", "cpu"])
@pytest.mark.parametrize("policy", ONLINE_POLICIES)
@pytest.mark.parametrize("share", [0.1, 0.4])
def test_caching_never_changes_results(moe16, reference, on_miss, policy, share):
    ref_logits, ref_text = reference
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, share), policy=policy, on_miss=on_miss) as rt:
        np.testing.assert_array_equal(rt.logits(IDS), ref_logits)
        assert rt.generate("the model of", max_tokens=10, temperature=0) == ref_text
        s = rt.stats()
        assert s.misses > 0 and s.gpu_bytes_peak <= s.gpu_budget
        assert s.clock == "modelled:laptop-8gb"
        rt.scheduler.check()


def test_drop_changes_logits_and_counts_substitutions(moe16, reference):
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, 0.3), on_miss="drop") as rt:
        out = rt.logits(IDS)
        assert np.abs(out - reference[0]).max() > 1e-3
        assert rt.stats().substitutions["drop"] > 0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    policy=st.sampled_from(ONLINE_POLICIES),
    budget_experts=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
)
def test_cache_never_exceeds_budget(seed, policy, budget_experts, sizes):
    """Random routing, budgets and policies: bytes in use ≤ budget after every step, and the
    resident set is exactly what the accounting says."""
    rng = random.Random(seed)
    n_layer, n_expert, k = 3, 16, 4
    bytes_per_expert = [s * 1000 for s in sizes]
    cache = ExpertCache(budget_experts * 1000, bytes_per_expert, make_policy(policy, n_layer, n_expert, top_k=k))
    for token in range(30):
        for layer in range(n_layer):
            tick = Tick(token, layer)
            keys = [(layer, e) for e in rng.sample(range(n_expert), k)]
            for key in keys:
                if not cache.access(key, tick):
                    evicted = cache.admit(key, tick, protected=keys)
                    if evicted is not None:
                        assert key in cache and not set(evicted) & set(cache.resident)
                cache.check()
                assert cache.used_bytes == sum(bytes_per_expert[l] for l, _ in cache.resident)


def test_scheduler_budget_holds_under_random_routing(moe16):
    """Drive the live scheduler with random routing at several budgets and miss policies."""
    rng = np.random.default_rng(0)
    for share, on_miss, policy in [
        (0.05, "fetch", "lru"),
        (0.2, "cpu", "reuse"),
        (0.5, "drop", "least-stale"),
        (0.12, "cpu", "lfu"),
    ]:
        with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, share), on_miss=on_miss, policy=policy) as rt:
            sched = rt.scheduler
            x = torch.randn(1, rt.spec.n_embd)
            for _ in range(40):
                for layer in range(rt.spec.n_layer):
                    rt.model.predict_next(layer, x)
                    ids = torch.from_numpy(rng.choice(16, 4, replace=False)).reshape(1, 4)
                    routed_experts(sched, layer, x, ids, torch.full((1, 4), 0.25))
                    sched.check()
                    assert sched.cache.used_bytes <= sched.cache.budget
                    st_ = rt.stats()
                    assert sorted(k for k in sched.cache.resident) == sorted(
                        (l, e) for l, ls in enumerate(st_.layers) for e in ls.resident
                    )


def test_budget_smaller_than_dense_weights_is_an_error(moe16):
    with localmoe.load(moe16, device="cpu") as rt:
        dense = rt.gguf.dense_bytes()
    with pytest.raises(LocalMoEError, match="dense weights"):
        localmoe.load(moe16, device="cpu", gpu_mem=dense // 2)
    with pytest.raises(LocalMoEError, match="cache policy"):
        localmoe.load(moe16, device="cpu", gpu_mem="1GB", policy="belady")


def test_static_placement_moves_nothing_in_decode(moe16, reference):
    with localmoe.load(moe16, device="cpu", n_cpu_moe=2) as rt:
        text = rt.generate("the model of", max_tokens=10, temperature=0)
        s = rt.stats()
        assert text == reference[1]
        assert s.bytes_to_gpu == 0 and s.prefetch_issued == 0
        assert s.layers[0].cpu_experts > 0 and s.layers[1].cpu_experts > 0 and s.layers[2].cpu_experts == 0
        assert s.layers[2].misses == 0


def test_prefetch_counts_and_configure(moe16):
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, 0.3), policy="reuse") as rt:
        rt.generate("the model of", max_tokens=12, temperature=0)
        s = rt.stats()
        assert s.prefetch_issued > 0 and 0 <= s.prefetch_used <= s.prefetch_issued
        assert 0 < s.prefetch_recall <= 1
        rt.configure(policy="lru", on_miss="fetch", gpu_mem=_budget(moe16, 0.5))
        assert rt.scheduler.config.policy == "lru" and rt.scheduler.miss_policy.name == "fetch"
        with pytest.raises(LocalMoEError):
            rt.configure(on_miss="teleport")
        assert rt.on_miss == "fetch"
        rt.configure(prefetch=False)
        before = rt.stats().prefetch_issued
        rt.generate("the", max_tokens=4, temperature=0)
        assert rt.stats().prefetch_issued == before
        # a new miss policy keeps the warm cache; a new cache policy starts a new one
        warm = set(rt.scheduler.cache.resident)
        assert warm
        rt.configure(on_miss="drop")
        assert set(rt.scheduler.cache.resident) == warm and rt.scheduler.miss_policy.name == "drop"
        assert rt.stats().gpu_bytes_in_use == rt.scheduler.cache.used_bytes > 0
        rt.configure(policy="lfu")
        assert not rt.scheduler.cache.resident


def test_prefetch_is_issued_only_when_it_pays(moe16):
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, 0.3), profile="laptop-8gb") as rt:
        sched = rt.scheduler
        nbytes = sched.bytes_per_expert[1]
        copy = sched.profile.copy_seconds(nbytes)
        assert sched._predictions == [0, 0]  # no evidence yet: precision 1/2
        assert sched._prefetch_pays(0.0, 2 * copy, nbytes)  # lands before it is needed: nothing to lose
        assert not sched._prefetch_pays(0.0, 0.1 * copy, nbytes)  # saves 10% of a copy, risks 90%
        assert not sched._prefetch_pays(copy, copy, nbytes)  # could not even start in time
        sched._predictions = [1000, 950]  # precise predictions make the same late copy worth it
        assert sched._prefetch_pays(0.0, 0.1 * copy, nbytes)


def test_background_uploads_never_delay_a_prefetch(moe16):
    """Within one layer's step the link serves demand fetches, then the next layer's prefetch, then
    background uploads of what the layer skipped (here: dropped experts)."""
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget(moe16, 0.3), on_miss="drop", profile="laptop-8gb") as rt:
        sched, steps = rt.scheduler, {}
        real_load, real_background = sched._load, sched._background_upload
        tag = [None]

        def load(key, tick, protected, ready, prefetch=False):
            kind = "prefetch" if prefetch else tag[0] or "demand"
            step = (sched.token, key[0] - 1 if prefetch else key[0])
            steps.setdefault(step, []).append(kind)
            return real_load(key, tick, protected, ready, prefetch)

        def background(*args):
            tag[0] = "background"
            try:
                real_background(*args)
            finally:
                tag[0] = None

        sched._load, sched._background_upload = load, background
        rt.generate("the model of experts", max_tokens=16, temperature=0)
        kinds = [k for seq in steps.values() for k in seq]
        assert "prefetch" in kinds and "background" in kinds
        order = {"demand": 0, "prefetch": 1, "background": 2}
        for seq in steps.values():
            assert [order[k] for k in seq] == sorted(order[k] for k in seq), seq


def test_trace_records_and_replays(moe16, tmp_path):
    path = str(tmp_path / "t.jsonl")
    with localmoe.load(moe16, device="cpu", trace=path) as rt:
        rt.generate("the model of experts", max_tokens=8, temperature=0)
        n_prompt = len(rt.tokenize("the model of experts"))
    lines = open(path).read().splitlines()
    assert json.loads(lines[0])["localmoe_trace"] == 1
    tr = load_trace(path)
    assert tr.n_layer == 3 and tr.n_tokens >= n_prompt + 1
    assert all(len(ids) == 4 for _, ids, _ in tr.steps)
    results = {p: replay(tr, p, 0.25) for p in (*ONLINE_POLICIES, "belady")}
    accesses = sum(len(ids) for _, ids, _ in tr.steps)
    for r in results.values():
        assert r.hits + r.misses == accesses
    assert all(r.hits <= results["belady"].hits for r in results.values())
    with pytest.raises(LocalMoEError, match="not a localmoe trace"):
        load_trace(moe16)


def test_bench_cli_replays_trace_and_compares_strategies(moe16, tmp_path):
    import subprocess
    import sys

    trace = str(tmp_path / "r.jsonl")
    cli = [sys.executable, "-m", "localmoe"]
    r = subprocess.run(
        cli + ["run", moe16, "-p", "the model of", "-n", "12", "--temp", "0", "--trace", trace],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli + ["bench", "trace", trace, "--json"], capture_output=True, text=True, timeout=300)
    rows = json.loads(r.stdout)
    by = {(row["budget_share"], row["policy"]): row["hit_rate"] for row in rows}
    assert {p for _, p in by} == {*ONLINE_POLICIES, "belady"}
    for share in (0.25, 0.5):
        assert all(by[(share, p)] <= by[(share, "belady")] for p in ONLINE_POLICIES)
    r = subprocess.run(
        cli + ["bench", "policies", moe16, "-n", "6", "--json"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    names = [row["strategy"] for row in out["results"]]
    assert names[0].startswith("static --n-cpu-moe") and names[1:] == ["fetch + lru", "cpu + reuse + prefetch"]
    assert all(row["clock"] == "modelled:laptop-8gb" and row["decode_tps"] > 0 for row in out["results"])
    r = subprocess.run(cli + ["bench", "trace", moe16], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_reuse_policy_trusts_predictions_by_their_measured_precision():
    """A predicted expert is expected at the next step with the predictions' precision so far; a
    prefetch is issued during the previous layer step (Tick.before)."""
    from localmoe.residency.cache_policies import ReuseDistance

    pol = ReuseDistance(n_layer=4, n_expert=16, top_k=2)
    now = Tick(10, 1)
    key = (2, 5)  # layer 2: the next step after layer 1
    plain = pol.expected_distance(key, now)
    pol.hint(key, now)
    hinted = pol.expected_distance(key, now)
    assert hinted < plain and hinted >= 1
    assert Tick(10, 2).before(4) == now and Tick(11, 0).before(4) == Tick(10, 3)
    # predictions that come true raise the trust, wrong ones lower it: the same accesses and the
    # same number of hints in both, only their timing differs
    right = ReuseDistance(n_layer=4, n_expert=16, top_k=2)
    wrong = ReuseDistance(n_layer=4, n_expert=16, top_k=2)
    for t in range(20):
        if t % 4 == 0:
            right.hint(key, Tick(t, 1))
        if t % 4 == 1:
            wrong.hint(key, Tick(t, 1))
        for pol_ in (right, wrong):
            pol_.on_access(key if t % 4 == 0 else (2, 8), Tick(t, 2))
    assert (right.hints_right, right.hints, wrong.hints_right, wrong.hints) == (5, 5, 0, 5)
    right.hint(key, Tick(20, 1))
    wrong.hint(key, Tick(20, 1))
    assert right.expected_distance(key, Tick(20, 1)) < wrong.expected_distance(key, Tick(20, 1))
