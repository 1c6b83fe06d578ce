"""gpt-oss beyond the shared oracle cases (tests/test_oracle.py, which include MXFP4_MOE): what the
file declares is what runs (windowed layers, sinks, biases, the clamped SwiGLU, the harmony
template), each piece changes the numbers it should, and the residency engine runs it exactly as
the all-resident run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import localmoe
from conftest import check_budgeted_equals_all_resident, expert_budget, served
from localmoe.archs.common import fast_paths
from localmoe.compute.experts import OAI_LIMIT, swiglu_act
from localmoe.errors import LocalMoEError
from localmoe.layers.attention import attend_explicit


def test_spec_reads_window_sinks_and_routing(make_model):
    with localmoe.load(make_model("gpt-oss", "F32"), device="cpu") as rt:
        s = rt.spec
        assert s.n_swa == 8 and s.swa_layers == (
            True,
            False,
            True,
        )  # llama.cpp's default pattern: every other layer, the first windowed
        assert [s.is_swa(i) for i in range(3)] == [True, False, True]
        assert s.routing == "topk_softmax" and not s.norm_topk
        assert s.kq_scale == pytest.approx(1 / math.sqrt(s.n_rot)) and s.rope_scaling == "yarn"
        assert fast_paths(s) == {"embedding_gather", "c_decode_attention"}  # (the C attention: windows and sinks)
        assert all(
            lw.sinks is not None and lw.sinks.shape == (s.n_head,) and lw.router_bias is not None and lw.bo is not None
            for lw in rt.model.layers
        )
        w = rt.store.weights(0, 1)
        assert w.act == "swiglu_oai" and not w.plain
        assert w.gate_up_bias.shape == (2 * s.n_ff_exp,) and w.down_bias.shape == (s.n_embd,)


def test_window_and_sinks_each_change_the_logits(make_model):
    """The oracle test passing with llama.cpp means nothing if the window and sinks did nothing:
    removing either moves the logits of a 48-token prompt (6 windows of 8) far beyond rounding."""
    ids = np.random.default_rng(5).integers(0, 300, 48).tolist()
    with localmoe.load(make_model("gpt-oss", "F32"), device="cpu") as rt:
        ref = rt.logits(ids)
        spec = rt.model.spec
        rt.model.spec = dataclasses.replace(spec, swa_layers=(False,) * spec.n_layer)
        no_window = rt.logits(ids)
        rt.model.spec = spec
        sinks = [lw.sinks for lw in rt.model.layers]
        for lw in rt.model.layers:
            lw.sinks = None
        no_sinks = rt.logits(ids)
        for lw, sk in zip(rt.model.layers, sinks):
            lw.sinks = sk
        np.testing.assert_array_equal(rt.logits(ids), ref)
    # positions 0..7 see at most 8 keys: the window cuts nothing there, and only there
    np.testing.assert_allclose(no_window[:8], ref[:8], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    for other in (no_window[8:], no_sinks):
        assert np.linalg.norm(other - ref[-len(other) :]) / np.linalg.norm(ref[-len(other) :]) > 1e-2


def test_explicit_attention_without_sinks_or_window_is_sdpa(make_model):
    with localmoe.load(make_model("gpt-oss", "F32"), device="cpu"):
        g = torch.Generator().manual_seed(0)
        Hkv, group, T, S, d = 2, 2, 5, 9, 16
        qh, keys, vals = (torch.randn(*shape, generator=g) for shape in ((Hkv, group * T, d), (Hkv, S, d), (Hkv, S, d)))
        pos0 = S - T
        got = attend_explicit(qh, keys, vals, pos0, T, 0.25, None, 0)
        mask = (torch.arange(S)[None, :] <= torch.arange(pos0, pos0 + T)[:, None]).repeat(group, 1)
        want = F.scaled_dot_product_attention(qh[None], keys[None], vals[None], attn_mask=mask, scale=0.25)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # a sink of −inf takes nothing; a finite one takes mass, shrinking every output row
        no_mass = attend_explicit(qh, keys, vals, pos0, T, 0.25, torch.full((Hkv * group,), float("-inf")), 0)
        torch.testing.assert_close(no_mass, want, rtol=1e-5, atol=1e-6)
        # a window of 1: each query sees only itself
        only_self = attend_explicit(qh, keys, vals, pos0, T, 0.25, None, 1)
        torch.testing.assert_close(only_self, vals[:, pos0:].repeat(1, group, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_swa", [0, 1, 7, 40, 100])
@pytest.mark.parametrize("budget", [1, 700, 1 << 24])
def test_explicit_attention_in_blocks_is_the_whole_softmax(monkeypatch, n_swa, budget):
    """A prompt's queries go in blocks of at most EXPLICIT_SCORES score elements, each block against
    only the keys it can see: the same outputs as the whole masked softmax, with sinks and windows
    (budget 1: one query a block; 700: a few; 2^24: one block)."""
    from localmoe.layers import attention

    g = torch.Generator().manual_seed(n_swa)
    Hkv, group, T, S, d, dv = 2, 3, 37, 50, 16, 12
    qh, keys = torch.randn(Hkv, group * T, d, generator=g), torch.randn(Hkv, S, d, generator=g)
    vals, sinks = torch.randn(Hkv, S, dv, generator=g), torch.randn(Hkv * group, generator=g)
    pos0 = S - T
    # the whole computation: every query against every key, masked
    scores = (qh @ keys.transpose(1, 2)) * 0.3  # [Hkv, group·T, S]
    q_pos = torch.arange(pos0, pos0 + T).repeat(group)[:, None]
    k_pos = torch.arange(S)[None, :]
    hidden = (k_pos > q_pos) | ((q_pos - k_pos >= n_swa) if n_swa > 0 else torch.zeros_like(k_pos, dtype=torch.bool))
    sink = sinks.view(Hkv, group, 1).expand(Hkv, group, T).reshape(Hkv, group * T, 1)
    probs = torch.cat([scores.masked_fill(hidden, float("-inf")), sink], dim=-1).softmax(-1)[..., :S]
    want = probs @ vals
    monkeypatch.setattr(attention, "EXPLICIT_SCORES", budget)
    got = attention.attend_explicit(qh, keys, vals, pos0, T, 0.3, sinks, n_swa)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_clamped_swiglu_matches_its_definition():
    gate = torch.tensor([[-20.0, -1.0, 0.5, 6.9, 7.0, 30.0]])
    up = torch.tensor([[-20.0, 8.0, -0.5, 0.0, 7.5, -9.0]])
    got = swiglu_act("swiglu_oai", torch.cat([gate, up], dim=-1))
    g = torch.minimum(gate, torch.tensor(OAI_LIMIT))
    want = g / (1 + torch.exp(-1.702 * g)) * (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1)
    torch.testing.assert_close(got, want)
    assert got[0, 5] == pytest.approx(7.0 / (1 + math.exp(-1.702 * 7.0)) * (1 - 7.0))  # both clamps bite


def test_mxfp4_experts_decode_in_one_ggml_call_a_layer(make_model, monkeypatch):
    """gpt-oss as it ships (MXFP4 experts on ggml's kernels in place, with biases and the clamped
    SwiGLU): a decode step's routed experts are one lg_moe_decode call per layer, and the logits
    are those of the experts run one by one in torch (the path before), to float rounding."""
    import localmoe.compute.experts as experts_mod
    from localmoe.compute.ggml_backend import GGML, ggml

    if ggml() is None:
        pytest.skip("no ggml library")
    ids = np.random.default_rng(7).integers(0, 300, 24).tolist()
    calls = []
    real = GGML.moe_decode
    monkeypatch.setattr(
        GGML,
        "moe_decode",
        lambda self, *a, **k: calls.append(a[-1] if len(a) > 8 else k.get("act")) or real(self, *a, **k),
    )

    def decode(rt) -> np.ndarray:
        cache = rt.new_cache()
        rt.model.forward(torch.tensor(ids[:8]), cache)
        return torch.cat([rt.model.forward(torch.tensor([t]), cache) for t in ids[8:]]).numpy()

    with localmoe.load(make_model("gpt-oss", "MXFP4_MOE"), device="cpu") as rt:
        assert rt.store.weights(rt.spec.moe_layers[0], 0).gate_up.backend == "ggml"
        got = decode(rt)
        assert calls == [1] * (len(ids) - 8) * len(rt.spec.moe_layers)  # ACT_SWIGLU_OAI, once a layer a token
        monkeypatch.setattr(experts_mod, "ggml_experts_decode", lambda *a, **k: None)  # the path before
        ref = decode(rt)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("qtype", ["Q8_0", "MXFP4_MOE"])
def test_budgeted_run_equals_all_resident(make_model, qtype):
    check_budgeted_equals_all_resident(
        make_model("gpt-oss", qtype), np.random.default_rng(3).integers(0, 300, 40).tolist()
    )


def test_harmony_template_renders_in_the_sandbox(make_model):
    with localmoe.load(make_model("gpt-oss", "F32"), device="cpu") as rt:
        tok = rt.tokenizer
        text = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
        assert (
            text.startswith("<|start|>system<|message|>")
            and "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in text
        )
        assert text.endswith("<|start|>user<|message|>hi<|end|><|start|>assistant")
        ids = tok.tokenize_chat([{"role": "user", "content": "hi"}])
        start = tok.tokenize("<|start|>")
        assert len(start) == 1 and ids.count(start[0]) == 3  # control tokens are single ids: system, user, assistant
        assert tok.is_eog(tok.eos_id) and tok.token_text(tok.eos_id) == "<|return|>"
        with pytest.raises(LocalMoEError, match="unexpected role"):
            tok.render_chat([{"role": "tool", "content": "x"}])


def test_info_names_sinks_window_and_biases(make_model):
    from localmoe.gguf.file import GGUFModel
    from localmoe.info import describe, format_text

    d = describe(GGUFModel(make_model("gpt-oss", "F32")), backends=False)
    assert d["attention"] == {
        "kind": "gqa",
        "sinks": True,
        "sliding_window": 8,
        "windowed_layers": [0, 2],
        "biases": True,
    }
    assert d["experts"]["activation"] == "swiglu_oai" and d["experts"]["biases"] and d["routing"]["router_bias"]
    assert "a sink per head, sliding window 8 on 2 layers (0, 2)" in format_text(d)


def test_every_miss_policy_trace_calibrate_and_serve_run_on_gpt_oss(make_model, tmp_path):
    """What the runtime does around the forward pass works on gpt-oss as on the others: calibrate's
    buddy table, each miss policy under a 30% budget (misses happen, substitutes are counted, the
    logits stay finite), the routing trace, and a served chat completion through the harmony template."""
    import json
    import shutil
    import subprocess
    import sys

    import httpx

    from localmoe.residency.trace import load_trace

    path = str(tmp_path / "gpt-oss.gguf")
    shutil.copy(make_model("gpt-oss", "Q8_0"), path)  # its own buddy sidecar beside it
    r = subprocess.run(
        [sys.executable, "-m", "localmoe", "calibrate", path, "--tokens", "256", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 256
    ids = np.random.default_rng(9).integers(0, 300, 24).tolist()
    with localmoe.load(path, device="cpu") as rt:
        budget = expert_budget(rt, 0.3)
    substituted = {}
    for on_miss in ("fetch", "cpu", "drop", "buddy", "little", "cost"):
        trace = str(tmp_path / f"{on_miss}.jsonl")
        # threshold 0: every token counts as unimportant (its misses go to the little set); any resident buddy accepted
        options = {"little": {"threshold": 0.0}, "buddy": {"min_score": 0.0}}.get(on_miss)
        with localmoe.load(
            path, device="cpu", gpu_mem=budget, on_miss=on_miss, miss_options=options, trace=trace
        ) as rt:
            logits = rt.logits(ids)
            assert np.isfinite(logits).all()
            assert rt.generate("the model", max_tokens=6, temperature=0)  # decode steps: one token a layer
            s = rt.stats()
            assert s.misses > 0 and s.gpu_bytes_peak <= s.gpu_budget
            substituted[on_miss] = sum(s.substitutions.values())
            rt.scheduler.check()
        assert {tick.layer for tick, _, _ in load_trace(trace).steps} == {0, 1, 2}
    # (whether a buddy qualifies depends on the calibration's entropy threshold: tests/test_fallback.py checks its
    # rules)
    assert substituted["fetch"] == substituted["cpu"] == 0 and substituted["drop"] > 0 and substituted["little"] > 0
    with served(path, "gpt-oss") as url:
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["role"] == "assistant"
