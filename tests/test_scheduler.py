"""The residency scheduler's plan (residency/scheduler.py, compute/plan.py): given the cache's state and
one layer's routing, which experts are resident, fetched, computed on the CPU or replaced by a buddy,
how the hits and misses are counted, and that compute executes any plan to the all-resident sums."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import localmoe
from localmoe.bench.synth import SynthConfig, write_model
from localmoe.compute.plan import CPU, FETCHED, RESIDENT, ExpertPlan, rows_by_expert, run_plan
from localmoe.fallback.buddies import BuddyTable, LayerCalibration
from localmoe.fallback.miss_policies import BuddyOnMiss, DropOnMiss
from localmoe.residency.resident import AllResident
from localmoe.residency.scheduler import ExpertScheduler
from test_layout import _imports, _modules

E, K = 16, 4


@pytest.fixture(scope="module")
def moe16(tmp_path_factory) -> str:
    """3 layers × 16 experts, top-4."""
    config = SynthConfig(n_layer=3, n_expert=E, n_expert_used=K, weight_type="Q8_0")
    return write_model(tmp_path_factory.mktemp("sched") / "moe16.gguf", config)


def _budget_bytes(path: str, share: float) -> int:
    """The dense weights plus `share` of all experts."""
    with localmoe.load(path, device="cpu") as rt:
        return rt.gguf.dense_bytes() + int(rt.gguf.all_expert_bytes() * share)


def _budgeted(path: str, on_miss: str, share: float = 0.5):
    """A runtime whose scheduler models a GPU tier of `share` of the experts (no prefetch)."""
    return localmoe.load(path, device="cpu", gpu_mem=_budget_bytes(path, share), on_miss=on_miss, prefetch=False)


def _route(*experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token routed to `experts`, equal weights: ids, weights [1, k]."""
    return torch.tensor([list(experts)]), torch.full((1, len(experts)), 1.0 / len(experts))


def test_rows_by_expert_groups_tokens_once():
    """One token: slot order, a dropped slot (−1) left out, an expert in two slots summed; a batch:
    by expert id, each expert's tokens and weights in token order."""
    rows = rows_by_expert(torch.tensor([[5, -1, 2, 5]]), torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert list(rows) == [5, 2]
    assert rows[5][0].tolist() == [0] and rows[5][1].tolist() == pytest.approx([0.5])
    assert rows[2][1].tolist() == pytest.approx([0.3])
    rows = rows_by_expert(torch.tensor([[3, 1], [1, 0]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    assert list(rows) == [0, 1, 3]
    assert rows[1][0].tolist() == [0, 1] and rows[1][1].tolist() == pytest.approx([0.4, 0.7])
    assert rows[0][0].tolist() == [1] and rows[3][0].tolist() == [0]


def test_decode_terms_read_the_routing_as_the_rows_do():
    """A decode plan's experts and weights as Python values: in slot order without dropped slots,
    and an expert in two slots once with its weights summed, exactly as rows_by_expert gives them."""
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    for ids, order in (([[5, -1, 2, 7]], [5, 2, 7]), ([[5, 2, 5, 1]], [5, 2, 1])):
        ids = torch.tensor(ids)
        lazy = ExpertPlan(0, ids, w, source=None)
        grouped = ExpertPlan(0, ids, w, source=None, grouped=rows_by_expert(ids, w))
        assert lazy.decode_terms() == grouped.decode_terms()
        got, coefs = lazy.decode_terms()
        assert got == order and len(coefs) == len(order)
    assert coefs[0] == float(torch.tensor(0.1) + torch.tensor(0.3))  # summed in float32, as the rows are


def test_all_resident_is_the_trivial_plan(moe16):
    with localmoe.load(moe16, device="cpu") as rt:
        assert rt.scheduler is None and isinstance(rt.model.experts, AllResident)
        plan = rt.model.experts.plan(1, *_route(7, 3, 9, 0))
        assert plan.where == {7: RESIDENT, 3: RESIDENT, 9: RESIDENT, 0: RESIDENT} and not plan.on_cpu
        assert list(plan.rows) == [7, 3, 9, 0] and plan.device is None and not plan.substitutions
        s = rt.stats()
        assert s.layers[1].hits == 4 and s.misses == 0
        assert not rt.model.experts.wants_prediction(1, 1)


@pytest.mark.parametrize("on_miss", ["fetch", "cpu"])
def test_plan_places_hits_on_the_gpu_and_misses_by_policy(moe16, on_miss):
    """Experts 0 and 1 resident, 2 and 3 missing: the hits run where they are; a miss is fetched
    (then resident) under `fetch`, and under `cpu` goes where the cost model says, for one row."""
    with _budgeted(moe16, on_miss) as rt:
        sched = rt.scheduler
        sched.preload([(0, 0), (0, 1)])
        plan = sched.plan(0, *_route(0, 1, 2, 3))
        sched.finish(plan)
        miss = FETCHED if on_miss == "fetch" or sched.fetch_is_faster(0, 1) else CPU
        assert plan.where == {0: RESIDENT, 1: RESIDENT, 2: miss, 3: miss}
        assert plan.on_cpu == ({2, 3} if miss == CPU else set())
        if miss == FETCHED:
            assert (0, 2) in sched.cache and (0, 3) in sched.cache
        layer = rt.stats().layers[0]
        assert (layer.hits, layer.misses) == (2, 2)
        assert layer.cpu_experts == (2 if miss == CPU else 0)
        resident = sum((0, e) in sched.cache for e in range(4))  # CPU misses may upload in the background
        again = sched.plan(0, *_route(0, 1, 2, 3))  # the next token: what is resident now hits
        sched.finish(again)
        assert set(again.where.values()) == ({RESIDENT} if resident == 4 else {RESIDENT, miss})
        layer = rt.stats().layers[0]
        assert (layer.hits, layer.misses) == (2 + resident, 2 + 4 - resident)


def test_cpu_misses_go_to_the_cpu_when_fetching_loses(moe16):
    with _budgeted(moe16, "cpu") as rt:
        sched = rt.scheduler
        sched.fetch_is_faster = lambda layer, rows: False  # the cost model's verdict, fixed
        sched.preload([(2, 5)])
        plan = sched.plan(2, *_route(5, 6, 7, 8))
        sched.finish(plan)
        assert plan.where == {5: RESIDENT, 6: CPU, 7: CPU, 8: CPU} and plan.on_cpu == {6, 7, 8}
        layer = rt.stats().layers[2]
        assert (layer.hits, layer.misses, layer.cpu_experts) == (1, 3, 3)


def test_buddy_substitutes_are_resident_and_counted(moe16):
    """Experts 4–7 resident, 0–3 routed and missing, each with buddy i + 4: one token gets
    min(3, k − 1) = 3 substitutes (resident, run on the GPU) and its fourth expert goes to the
    fallback; the routed uses still count as 4 misses."""
    with _budgeted(moe16, "cpu") as rt:
        sched = rt.scheduler
        buddies = {i: [(i + 4, 0.9)] for i in range(4)}
        similarity, corr = np.eye(E, dtype=np.float32), np.zeros((E, E), np.float32)
        calib = LayerCalibration(np.ones(E), np.zeros((E, E)), similarity, corr, 0.0, buddies)
        sched.buddy_table = BuddyTable([calib] * rt.spec.n_layer, {})
        sched.miss_policy = BuddyOnMiss()
        sched.fetch_is_faster = lambda layer, rows: False
        sched.preload([(0, e) for e in range(4, 8)])
        plan = sched.plan(0, *_route(0, 1, 2, 3))
        sched.finish(plan)
        assert plan.substitutions == {"buddy": 3}
        substitutes = [e for e in plan.where if e >= 4]
        kept = [e for e in plan.where if e < 4]
        assert len(substitutes) == 3 and len(kept) == 1
        assert all(plan.where[e] == RESIDENT for e in substitutes) and plan.where[kept[0]] == CPU
        assert sorted(substitutes) == sorted(e + 4 for e in range(4) if e != kept[0])
        s = rt.stats()
        assert (s.layers[0].hits, s.layers[0].misses) == (0, 4) and s.substitutions["buddy"] == 3


def test_dropped_experts_leave_the_plan(moe16):
    with _budgeted(moe16, "cpu") as rt:
        sched = rt.scheduler
        sched.miss_policy = DropOnMiss()
        sched.preload([(1, 9), (1, 10)])
        plan = sched.plan(1, *_route(9, 10, 11, 12))
        sched.finish(plan)
        assert plan.where == {9: RESIDENT, 10: RESIDENT} and plan.substitutions == {"drop": 2}
        assert sum(float(w.sum()) for _, w in plan.rows.values()) == pytest.approx(1.0)  # renormalised


def test_any_plan_computes_the_all_resident_sum(moe16):
    """On the modelled tier, where an expert runs changes no bit: the scheduler's plan (hits, CPU
    misses, fetches) executes to the trivial plan's result, for decode and for a batch."""
    rng = torch.Generator().manual_seed(0)
    with localmoe.load(moe16, device="cpu") as rt:
        x1, x6 = torch.randn(1, rt.spec.n_embd, generator=rng), torch.randn(6, rt.spec.n_embd, generator=rng)
        ids6 = torch.stack([torch.randperm(E, generator=rng)[:K] for _ in range(6)])
        w6 = torch.rand(6, K, generator=rng)
        trivial = rt.model.experts
        want1 = run_plan(trivial.plan(0, *_route(3, 1, 4, 15)), x1)
        want6 = run_plan(trivial.plan(0, ids6, w6), x6)
    with _budgeted(moe16, "cpu", share=0.2) as rt:
        sched = rt.scheduler
        sched.preload([(0, 3), (0, 4)])
        for x, route, want in ((x1, _route(3, 1, 4, 15), want1), (x6, (ids6, w6), want6)):
            plan = sched.plan(0, *route)
            assert set(plan.where.values()) - {RESIDENT}  # something missed
            got = run_plan(plan, x)
            sched.finish(plan)
            assert torch.equal(got, want)


def test_prediction_is_handed_in_by_the_model(moe16):
    """The model routes layer i+1 on the stream after layer i's attention and hands the ids to the
    scheduler (decode only); the scheduler keeps no model to call back."""
    with localmoe.load(moe16, device="cpu", gpu_mem=_budget_bytes(moe16, 0.3)) as rt:
        sched = rt.scheduler
        assert not hasattr(sched, "model") and not hasattr(sched, "bind")
        assert sched.wants_prediction(1, 1) and not sched.wants_prediction(1, 8) and not sched.wants_prediction(0, 1)
        x = torch.randn(1, rt.spec.n_embd, generator=torch.Generator().manual_seed(1))
        rt.model.predict_next(0, x)
        want, _ = rt.model.route(1, rt.model.ffn_input(1, x))
        assert torch.equal(sched._predicted_dev[1], want[0])
        rt.model.predict_next(0, x.repeat(3, 1))  # a batch: nothing predicted
        assert torch.equal(sched._predicted_dev[1], want[0])


def test_residency_never_reaches_back_into_the_model():
    """No module of localmoe.residency imports the model, its layers or the architectures."""
    modules = set(_modules())
    model_side = ("localmoe.model", "localmoe.layers", "localmoe.archs")
    for m in (m for m in modules if m.startswith("localmoe.residency")):
        bad = sorted(t for t in _imports(m, modules) if t.startswith(model_side))
        assert not bad, f"{m} imports {bad}"


def test_the_per_layer_entry_is_short():
    """ExpertScheduler.plan orchestrates (its steps are methods); it stays under 50 lines."""
    assert len(inspect.getsource(ExpertScheduler.plan).splitlines()) < 50
    assert len(inspect.getsource(ExpertScheduler.finish).splitlines()) < 50
