"""Calibration, buddy and little-expert fallback, the cost-aware policy, and eval."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import localmoe
from localmoe import LocalMoEError
from localmoe.fallback.buddies import (
    BuddyTable,
    builtin_calibration_text,
    calibrate,
    sidecar_path,
    token_activating_entropy,
)
from localmoe.bench.synth import SynthConfig, write_model
from localmoe.layers.moe import routed_experts

CLI = [sys.executable, "-m", "localmoe"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> str:
    path = write_model(
        tmp_path_factory.mktemp("fb") / "fb.gguf",
        SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0", seed=5),
    )
    r = subprocess.run(
        CLI + ["calibrate", path, "--tokens", "512", "--json"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["sidecar"] == sidecar_path(path) and summary["tokens"] == 512
    return path


def _budget(path: str, share: float) -> int:
    with localmoe.load(path, device="cpu") as rt:
        return rt.gguf.dense_bytes() + int(rt.gguf.all_expert_bytes() * share)


def test_buddy_table_is_deterministic_and_has_provenance(calibrated):
    table = BuddyTable.load(sidecar_path(calibrated), calibrated)
    assert table.provenance["calibration_text"] == "built-in sample" and table.provenance["tokens"] == 512
    assert len(table.provenance["calibration_text_sha256"]) == 64
    with localmoe.load(calibrated, device="cpu") as rt:
        again = calibrate(rt, builtin_calibration_text(), max_tokens=512)
    for a, b in zip(table.layers, again.layers):
        assert a.buddies == {i: [(j, round(s, 4)) for j, s in lst] for i, lst in b.buddies.items()}
        np.testing.assert_array_equal(a.usage, b.usage)
        assert abs(a.tae_tau - b.tae_tau) < 1e-4
        for i, lst in a.buddies.items():
            assert all(j != i for j, _ in lst) and [s for _, s in lst] == sorted((s for _, s in lst), reverse=True)


def test_sidecar_for_another_file_is_refused(calibrated, tmp_path):
    other = write_model(
        tmp_path / "other.gguf", SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0", seed=6)
    )
    with open(sidecar_path(calibrated)) as src, open(sidecar_path(other), "w") as dst:
        dst.write(src.read())
    with pytest.raises(LocalMoEError, match="another model file"):
        localmoe.load(other, device="cpu", gpu_mem=_budget(other, 0.3), on_miss="buddy")
    os.remove(sidecar_path(other))
    with pytest.raises(LocalMoEError, match="calibrate"):
        localmoe.load(other, device="cpu", gpu_mem=_budget(other, 0.3), on_miss="buddy")


@pytest.mark.parametrize(
    "on_miss,options", [("buddy", {"min_score": 0.0}), ("cost", {"min_similarity": -1.0, "quality_budget": 1.0})]
)
def test_substitution_only_picks_resident_experts(calibrated, on_miss, options):
    with localmoe.load(
        calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.3), on_miss=on_miss, miss_options=options
    ) as rt:
        sched = rt.scheduler
        policy = sched.miss_policy
        rng = np.random.default_rng(1)
        torch.manual_seed(1)
        x = torch.randn(1, rt.spec.n_embd)
        n_subs = 0
        for _ in range(30):
            for layer in range(rt.spec.n_layer):
                ids = torch.from_numpy(rng.choice(16, 4, replace=False)).reshape(1, 4)
                w = torch.softmax(torch.randn(1, 4), -1)
                missing = [e for e in ids[0].tolist() if (layer, e) not in sched.cache]
                if missing:
                    plan = policy.plan(sched, layer, ids, w, missing)
                    changed = plan.ids != ids
                    for e in plan.ids[changed].tolist():
                        assert e == -1 or (layer, e) in sched.cache  # a substitute is always resident (-1: dropped)
                    assert len(set(plan.ids[0].tolist()) - {-1}) == int((plan.ids[0] >= 0).sum())  # never a duplicate
                    n_subs += plan.substitutions.get("buddy", 0)  # substitutes, not drops
                routed_experts(sched, layer, x, ids, w)
        assert n_subs > 0


@pytest.mark.parametrize(
    "on_miss,options",
    [
        ("buddy", {"min_score": 2.0}),
        ("little", {"threshold": 2.0}),
        ("little", {"share": 0.0}),
        ("cost", {"quality_budget": 0.0}),
    ],
)
def test_never_thresholds_give_all_resident_logits(calibrated, on_miss, options):
    ids = list(np.random.default_rng(2).integers(0, 300, 32))
    with localmoe.load(calibrated, device="cpu") as rt:
        ref = rt.logits(ids)
    every = _budget(calibrated, 1.0)
    with localmoe.load(calibrated, device="cpu", gpu_mem=every, on_miss=on_miss, miss_options=options) as rt:
        np.testing.assert_array_equal(rt.logits(ids), ref)
    with localmoe.load(
        calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.2), on_miss=on_miss, miss_options=options
    ) as rt:
        np.testing.assert_array_equal(rt.logits(ids), ref)  # "never" also means exact under a budget
        assert sum(rt.stats().substitutions.values()) == 0


def test_little_and_drop_substitute_and_are_counted(calibrated):
    with localmoe.load(
        calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.2), on_miss="little", miss_options={"threshold": 0.0}
    ) as rt:
        rt.generate("the model of", max_tokens=8, temperature=0)
        s = rt.stats()
        assert s.substitutions["little"] > 0
        assert sum(layer.substitutions["little"] for layer in s.layers) == s.substitutions["little"]


class _FakeScheduler:
    """What a miss policy reads of the scheduler: the buddy table, residency, the cost model."""

    def __init__(self, table, n_expert, resident):
        self.buddy_table, self.n_expert, self.cache = table, n_expert, set(resident)

    def fetch_is_faster(self, layer, rows):
        return False


def _table(similarity: np.ndarray) -> BuddyTable:
    from localmoe.fallback.buddies import LayerCalibration

    E = similarity.shape[0]
    layer = LayerCalibration(
        np.ones(E),
        np.zeros((E, E)),
        similarity.astype(np.float32),
        np.zeros((E, E), np.float32),
        0.0,
        {i: [] for i in range(E)},
    )
    return BuddyTable([layer], {})


def test_buddy_caps_a_single_token_and_leaves_a_crowded_batch_to_the_fallback():
    """Experts 0-3 are missing, each with a resident buddy (i + 4, score 0.9). One decoding token
    routed to all four gets min(3, k - 1) = 3 substitutions and the fourth runs on the CPU; in a
    batch where more than 75% of the slots miss, loading pays, so none is substituted."""
    from localmoe.fallback.buddies import LayerCalibration
    from localmoe.fallback.miss_policies import BuddyOnMiss

    E = 8
    layer = LayerCalibration(
        np.ones(E),
        np.zeros((E, E)),
        np.eye(E, dtype=np.float32),
        np.zeros((E, E), np.float32),
        0.0,
        {i: [(i + 4, 0.9)] for i in range(4)},
    )
    sched = _FakeScheduler(BuddyTable([layer], {}), E, {(0, e) for e in range(4, 8)})
    one = BuddyOnMiss().plan(sched, 0, torch.tensor([[0, 1, 2, 3]]), torch.full((1, 4), 0.25), [0, 1, 2, 3])
    assert one.substitutions == {"buddy": 3} and len(one.where) == 1 and set(one.where.values()) == {"cpu"}
    kept = [e for e in one.ids[0].tolist() if e < 4]
    assert len(kept) == 1 and sorted(set(one.ids[0].tolist()) - set(kept)) == [e + 4 for e in range(4) if e not in kept]
    uncapped = BuddyOnMiss(max_per_token=4).plan(
        sched, 0, torch.tensor([[0, 1, 2, 3]]), torch.full((1, 4), 0.25), [0, 1, 2, 3]
    )
    assert uncapped.ids[0].tolist() == [4, 5, 6, 7] and not uncapped.where
    batch = BuddyOnMiss().plan(
        sched, 0, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), torch.full((2, 4), 0.25), [0, 1, 2, 3]
    )
    assert not batch.substitutions and batch.where == {e: "cpu" for e in range(4)}


@pytest.mark.parametrize("case", ["replica runs", "replica resident", "no replica"])
def test_cost_policy_substitutes_drops_or_runs_exactly_by_similarity(case):
    """Expert 1 is a copy of expert 0 (similarity 1), the others are unlike it (0); expert 0 misses.
    If its copy runs for the token anyway, dropping slot 0 costs 0.25 · √(6/9) = 0.204 (the three
    running experts, equally weighted, mix to 1/3 of it plus two unrelated thirds): within the
    budget of 0.25. If the copy is resident but not routed, it substitutes at no cost. Without it,
    dropping costs 0.25 · √(1 + 1/3) = 0.289: the expert runs exactly (here on the CPU)."""
    from localmoe.fallback.miss_policies import CostAwareOnMiss

    sim = np.eye(6)
    sim[0, 1] = sim[1, 0] = 1.0
    ids = torch.tensor([[0, 1, 2, 3]]) if case == "replica runs" else torch.tensor([[0, 4, 2, 3]])
    resident = {1, 2, 3, 4, 5} if case != "no replica" else {2, 3, 4, 5}
    weights = torch.full((1, 4), 0.25)
    sched = _FakeScheduler(_table(sim), 6, {(0, e) for e in resident})
    plan = CostAwareOnMiss(quality_budget=0.25).plan(sched, 0, ids, weights, [0])
    if case == "replica runs":
        assert plan.ids[0, 0] == -1 and plan.substitutions == {"drop": 1} and not plan.where
        assert float(plan.weights.sum()) == pytest.approx(1.0)
    elif case == "replica resident":
        assert plan.ids[0].tolist() == [1, 4, 2, 3] and plan.substitutions == {"buddy": 1} and not plan.where
    else:
        assert torch.equal(plan.ids, ids) and plan.where == {0: "cpu"} and not plan.substitutions


@pytest.mark.parametrize("prefer_resident,kept", [(0.0, [0, 1, 3]), (0.15, [0, 1, 3]), (0.35, [1, 3]), (1.0, [1, 3])])
def test_little_set_is_the_best_ranked_half_plus_resident_experts(prefer_resident, kept):
    """Router weights 0.4/0.3/0.2/0.1 on experts 0-3, experts 0 and 2 missing. The little set is the
    two slots with the highest weight share (+ prefer_resident if resident), plus every resident
    expert; a missing expert it keeps runs via the fallback (cpu), the others are dropped."""
    from localmoe.fallback.miss_policies import LittleOnMiss

    ids, weights = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    sched = _FakeScheduler(None, 4, {(0, 1), (0, 3)})
    plan = LittleOnMiss(threshold=0.0, prefer_resident=prefer_resident).plan(sched, 0, ids, weights, [0, 2])
    assert [e for e in plan.ids[0].tolist() if e >= 0] == kept
    assert plan.where == ({0: "cpu"} if 0 in kept else {})
    assert plan.substitutions == {"little": 4 - len(kept)}
    assert float(plan.weights.sum()) == pytest.approx(1.0) and float(plan.weights[plan.ids < 0].sum()) == 0.0


def test_little_importance_is_an_online_quantile_per_layer():
    from localmoe.fallback.miss_policies import LittleOnMiss

    rng = np.random.default_rng(0)
    conf = lambda n: torch.from_numpy(rng.uniform(0.5, 1.0, n))  # top-half share of k=4: [0.5, 1]
    policy = LittleOnMiss(share=0.25)
    assert not policy.unimportant(0, conf(1000)).any()  # nothing seen yet: every token is important
    little = policy.unimportant(0, conf(4000)).float().mean()
    assert 0.22 < float(little) < 0.28  # the most confident quarter
    assert not policy.unimportant(1, conf(10)).any()  # each layer has its own history
    confident = policy.unimportant(0, torch.tensor([0.99, 0.51], dtype=torch.float64))
    assert confident.tolist() == [True, False]
    always, never = LittleOnMiss(share=1.0), LittleOnMiss(share=0.0)
    for p in (always, never):
        p.unimportant(0, conf(100))
    assert always.unimportant(0, conf(50)).all() and not never.unimportant(0, conf(50)).any()
    with pytest.raises(LocalMoEError, match="share"):
        LittleOnMiss(share=1.5)


def test_token_activating_entropy():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    tae = token_activating_entropy(w)
    assert tae[0] == pytest.approx(0.0, abs=1e-6) and tae[1] == pytest.approx(1.0) and tae[2] == pytest.approx(0.5)


def test_eval_cli_json(calibrated, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the model of experts and the expert model of the model " * 6)
    r = subprocess.run(
        CLI
        + [
            "eval",
            calibrated,
            "--text",
            str(text),
            "--on-miss",
            "fetch,buddy,drop",
            "--tokens",
            "40",
            "--window",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["policies"]) == {"fetch", "buddy", "drop"}
    assert res["baseline"]["perplexity"] > 0
    fetch = res["policies"]["fetch"]
    assert (
        fetch["perplexity"] == pytest.approx(res["baseline"]["perplexity"], rel=1e-5) and fetch["top1_agreement"] == 1.0
    )
    for p in res["policies"].values():
        assert {"perplexity", "top1_agreement", "kl", "decode_tps", "clock"} <= set(p)
    for bad, says in [
        ("teleport", "not available"),
        ("buddy:min_scor=0.3", "no option 'min_scor'"),
        ("little:share", "cannot read 'share'"),
    ]:
        r = subprocess.run(
            CLI + ["eval", calibrated, "--text", str(text), "--on-miss", f"fetch,{bad}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            r.returncode == 2
            and r.stderr.startswith("error:")
            and says in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
        )


def test_eval_compares_one_policy_with_several_options(calibrated, tmp_path):
    """A row per spec. A bare name runs with the CLI knobs (--little-threshold 0: every token is
    unimportant), a spec with options with its own alone: `little:share=0` never goes little, so it
    is exactly the all-resident run, although the knob says otherwise."""
    text = tmp_path / "t.txt"
    text.write_text("the model of experts and the expert model of the model " * 6)
    args = [
        "eval",
        calibrated,
        "--text",
        str(text),
        "--tokens",
        "40",
        "--window",
        "20",
        "--json",
        "--gpu-mem",
        str(_budget(calibrated, 0.3)),
    ]
    specs = ["little", "little:share=0", "little:threshold=0:prefer_resident=0"]
    r = subprocess.run(
        CLI + args + ["--on-miss", ",".join(specs), "--little-threshold", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["policies"]
    assert list(rows) == specs
    assert rows["little:share=0"]["substitutions"]["little"] == 0 and rows["little:share=0"]["top1_agreement"] == 1.0
    assert (
        rows["little"]["substitutions"]["little"] > 0
        and rows["little:threshold=0:prefer_resident=0"]["substitutions"]["little"] > 0
    )
    r = subprocess.run(
        CLI + args + ["--on-miss", "fetch,little", "--little-share", "2"], capture_output=True, text=True, timeout=60
    )
    assert (
        r.returncode == 2 and "share must be between 0 and 1" in r.stderr and "%" not in r.stderr
    )  # refused before any decoding


def test_policy_specs_parse_numbers_and_words():
    from localmoe.fallback.miss_policies import parse_policy_spec

    assert parse_policy_spec("buddy:min_score=0.3:max_per_token=2:fallback=fetch") == (
        "buddy",
        {"min_score": 0.3, "max_per_token": 2, "fallback": "fetch"},
    )
    assert parse_policy_spec(" cost ") == ("cost", {})
    for bad, says in [
        ("fetch:args=1", "has no option 'args'; its options: none"),
        ("buddy:min_score=high", "takes a number"),
        ("buddy:fallback=2", "takes a name"),
        ("little:share=1.5", "between 0 and 1"),
    ]:
        with pytest.raises(LocalMoEError, match=says):
            parse_policy_spec(bad)


def test_stand_in_error_of_one_or_several_experts():
    """A substitute errs by √(2 − 2c); a dropped slot's weight goes to the experts that run, whose
    mix errs less than any one of them when their differences from the missing expert are
    independent."""
    from localmoe.fallback.miss_policies import stand_in_error

    assert stand_in_error([1.0], [1.0]) == pytest.approx(0.0)
    assert stand_in_error([1.0], [0.6]) == pytest.approx(math.sqrt(0.8))
    assert stand_in_error([1.0], [0.0]) == pytest.approx(math.sqrt(2))
    assert stand_in_error([1.0, 1.0], [0.6, 0.6]) == pytest.approx(math.sqrt(0.16 + 0.32))
    assert stand_in_error([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(4 / 3))
    assert stand_in_error([], []) == 1.0
    assert stand_in_error([0.8, 0.2], [0.9, 0.3]) < stand_in_error(
        [0.2, 0.8], [0.9, 0.3]
    )  # weight on the close one helps
