"""deepseek2 beyond the shared oracle cases (tests/test_oracle.py runs its V2-Lite-like file): the
V3 routing (sigmoid + selection bias + expert groups) with q_lora_rank > 0, YaRN actually mattering,
no GQA fast path on MLA, and the residency engine on a model whose first layer has no experts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import localmoe
import localmoe.layers.attention as attention_mod
import localmoe.layers.routers as routers_mod
import localmoe.model as model_mod
from conftest import arch_config, expert_budget
from localmoe.bench.synth import write_model
from localmoe.fallback.buddies import builtin_calibration_text, calibrate
from localmoe.residency.trace import load_trace
from oracle import compare, llama_logits

V3 = dict(
    gating="sigmoid",
    n_expert_groups=4,
    n_group_used=2,
    expert_weights_norm=True,
    expert_weights_scale=2.5,
    q_lora_rank=64,
)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 300, 64).tolist() for _ in range(3)]


@pytest.fixture(scope="module")
def v3_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ds3")
    return {
        q: write_model(root / f"v3-{q}.gguf", arch_config("deepseek2", **V3, weight_type=q)) for q in ("F32", "Q8_0")
    }


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_v3_routing_and_q_lora_match_llama_cpp(v3_files, qtype):
    path, prompts = v3_files[qtype], _prompts()
    ref = llama_logits(path, prompts)
    with localmoe.load(path, device="cpu") as rt:
        assert rt.spec.routing == "sigmoid_bias_groups" and rt.spec.q_lora_rank == 64 and rt.spec.n_expert_groups == 4
        ours = np.concatenate([rt.logits(p) for p in prompts])
    rel, agree = compare(ours, ref)
    if qtype == "F32":
        assert rel <= 1e-4 and agree >= 0.99, (rel, agree)
    else:  # the same bound as tests/test_oracle.py: llama.cpp's own 8-bit activations are the floor
        floor_rel, floor_agree = compare(llama_logits(path, prompts, f16_kv=True), ref)
        assert rel <= max(1e-2, 2 * floor_rel), (rel, floor_rel)
        assert 1 - agree <= max(0.01, 2 * (1 - floor_agree))


def test_groups_bias_and_yarn_each_change_the_logits(make_model, v3_files):
    """The features the oracle cases check are exercised: dropping any one moves the logits far
    beyond the F32 tolerance."""
    ids = _prompts()[0]

    def logits(path: str, **changes) -> np.ndarray:
        with localmoe.load(path, device="cpu") as rt:
            if changes:
                rt.gguf.spec = spec = dataclasses.replace(rt.spec, **changes)
                rt.spec = spec
                rt.model = model_mod.MoEModel(rt.gguf, rt.model.experts, rt.device)
            return rt.logits(ids)

    v3 = v3_files["F32"]
    base = logits(v3)
    for changes in ({"n_expert_groups": 0}, {"routing": "softmax_topk"}):
        rel, _ = compare(logits(v3, **changes), base)
        assert rel > 1e-3, (changes, rel)
    v2 = make_model("deepseek2", "F32")
    rel, _ = compare(logits(v2, rope_scaling="none", rope_freq_scale=1.0, yarn_ext_factor=0.0), logits(v2))
    assert rel > 1e-3, rel


def test_no_gqa_fast_path_runs_on_mla(v3_files, monkeypatch):
    calls = []
    for mod, name in ((routers_mod, "route"), (attention_mod, "attn_decode"), (attention_mod, "qk_norm_rope")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: calls.append(_n))
    ids = _prompts()[0][:20]
    with localmoe.load(v3_files["F32"], device="cpu") as rt:
        full = rt.logits(ids)
        cache = model_mod.KVCache(rt.spec, rt.n_ctx, rt.device)
        steps = [rt.model.forward(torch.tensor(ids[:12]), cache)[-1]]
        for t in ids[12:]:  # decode: one token at a time through the latent cache
            steps.append(rt.model.forward(torch.tensor([t]), cache)[-1])
    assert calls == []
    np.testing.assert_allclose(torch.stack(steps).numpy(), full[11:], rtol=1e-4, atol=1e-4)


def test_budgeted_run_equals_all_resident_with_a_dense_layer(v3_files, tmp_path):
    path = v3_files["Q8_0"]
    ids = _prompts()[0][:40]
    with localmoe.load(path, device="cpu") as rt:
        assert rt.spec.moe_layers == (1, 2) and rt.gguf.expert_bytes(0) == 0
        ref = rt.logits(ids)
        ref_text = rt.generate("the model of", max_tokens=8, temperature=0)
        budget = expert_budget(rt, 0.3)
    for on_miss in ("fetch", "cpu"):
        trace = str(tmp_path / f"{on_miss}.jsonl")
        with localmoe.load(path, device="cpu", gpu_mem=budget, on_miss=on_miss, trace=trace) as rt:
            np.testing.assert_array_equal(rt.logits(ids), ref)
            assert rt.generate("the model of", max_tokens=8, temperature=0) == ref_text
            s = rt.stats()
            assert s.misses > 0 and s.gpu_bytes_peak <= s.gpu_budget
            assert s.layers[0].hits == s.layers[0].misses == 0 and s.layers[0].resident == ()
            rt.scheduler.check()
        tr = load_trace(trace)
        assert {tick.layer for tick, _, _ in tr.steps} == {1, 2}


def test_calibrate_and_buddy_on_a_model_with_a_dense_layer(v3_files):
    path = v3_files["Q8_0"]
    with localmoe.load(path, device="cpu") as rt:
        table = calibrate(rt, builtin_calibration_text(), max_tokens=256)
    assert len(table.layers) == 3 and not table.layers[0].buddies and table.layers[1].buddies


def test_info_shows_mla_dense_layers_and_shared_experts(v3_files):
    out = subprocess.run(
        [sys.executable, "-m", "localmoe", "info", v3_files["F32"], "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["attention"] == {
        "kind": "mla",
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_rope_dim": 16,
        "qk_nope_dim": 32,
        "v_head_dim": 32,
    }
    assert d["dense_layers"] == [0] and d["experts"]["shared_count"] == 2
    assert d["routing"]["kind"] == "sigmoid_bias_groups" and d["routing"]["groups"] == {"count": 4, "used": 2}
    text = subprocess.run(
        [sys.executable, "-m", "localmoe", "info", v3_files["F32"]], capture_output=True, text=True, timeout=120
    ).stdout
    assert "MLA" in text and "dense" in text and "shared" in text
