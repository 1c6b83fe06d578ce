"""Calibration, buddy and little-expert fallback, the cost-aware policy, and eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import localmoe
from localmoe import LocalMoEError
from localmoe.buddies import BuddyTable, builtin_calibration_text, calibrate, sidecar_path, token_activating_entropy
from localmoe.synth import SynthConfig, write_model

CLI = [sys.executable, "-m", "localmoe"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> str:
    path = write_model(tmp_path_factory.mktemp("fb") / "fb.gguf", SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0", seed=5))
    r = subprocess.run(CLI + ["calibrate", path, "--tokens", "512", "--json"], capture_output=True, text=True, timeout=600)
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
    other = write_model(tmp_path / "other.gguf", SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0", seed=6))
    with open(sidecar_path(calibrated)) as src, open(sidecar_path(other), "w") as dst:
        dst.write(src.read())
    with pytest.raises(LocalMoEError, match="another model file"):
        localmoe.load(other, device="cpu", gpu_mem=_budget(other, 0.3), on_miss="buddy")
    os.remove(sidecar_path(other))
    with pytest.raises(LocalMoEError, match="calibrate"):
        localmoe.load(other, device="cpu", gpu_mem=_budget(other, 0.3), on_miss="buddy")


def test_substitution_only_picks_resident_experts(calibrated):
    with localmoe.load(calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.3), on_miss="buddy", miss_options={"min_score": 0.0}) as rt:
        sched = rt.scheduler
        policy = sched.miss_policy
        rng = np.random.default_rng(1)
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
                        assert (layer, e) in sched.cache  # a substitute is always resident
                    assert len(set(plan.ids[0].tolist()) - {-1}) == int((plan.ids[0] >= 0).sum())  # never a duplicate
                    n_subs += int(changed.sum())
                sched(layer, x, ids, w)
        assert n_subs > 0


@pytest.mark.parametrize("on_miss,options", [("buddy", {"min_score": 2.0}), ("little", {"threshold": 2.0}), ("cost", {"quality_budget": 0.0})])
def test_never_thresholds_give_all_resident_logits(calibrated, on_miss, options):
    ids = list(np.random.default_rng(2).integers(0, 300, 32))
    with localmoe.load(calibrated, device="cpu") as rt:
        ref = rt.logits(ids)
    every = _budget(calibrated, 1.0)
    with localmoe.load(calibrated, device="cpu", gpu_mem=every, on_miss=on_miss, miss_options=options) as rt:
        np.testing.assert_array_equal(rt.logits(ids), ref)
    with localmoe.load(calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.2), on_miss=on_miss, miss_options=options) as rt:
        np.testing.assert_array_equal(rt.logits(ids), ref)  # "never" also means exact under a budget
        assert sum(rt.stats().substitutions.values()) == 0


def test_little_and_drop_substitute_and_are_counted(calibrated):
    with localmoe.load(calibrated, device="cpu", gpu_mem=_budget(calibrated, 0.2), on_miss="little", miss_options={"threshold": 0.0}) as rt:
        rt.generate("the model of", max_tokens=8, temperature=0)
        s = rt.stats()
        assert s.substitutions["little"] > 0
        assert sum(layer.substitutions["little"] for layer in s.layers) == s.substitutions["little"]


def test_token_activating_entropy():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    tae = token_activating_entropy(w)
    assert tae[0] == pytest.approx(0.0, abs=1e-6) and tae[1] == pytest.approx(1.0) and tae[2] == pytest.approx(0.5)


def test_eval_cli_json(calibrated, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the model of experts and the expert model of the model " * 6)
    r = subprocess.run(CLI + ["eval", calibrated, "--text", str(text), "--on-miss", "fetch,buddy,drop", "--tokens", "40", "--window", "20", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["policies"]) == {"fetch", "buddy", "drop"}
    assert res["baseline"]["perplexity"] > 0
    fetch = res["policies"]["fetch"]
    assert fetch["perplexity"] == pytest.approx(res["baseline"]["perplexity"], rel=1e-5) and fetch["top1_agreement"] == 1.0
    for p in res["policies"].values():
        assert {"perplexity", "top1_agreement", "kl", "decode_tps", "clock"} <= set(p)
    r = subprocess.run(CLI + ["eval", calibrated, "--text", str(text), "--on-miss", "teleport"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error:")
