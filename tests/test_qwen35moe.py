"""qwen35moe beyond the shared oracle cases (tests/test_oracle.py): the hybrid layout read from the
file, 200 positions against llama.cpp through one pass and token by token (the DeltaNet state is
carried across them), a file with fused gate_up experts, the two forms of the delta rule, the pieces
that would go unnoticed if wrong (the state, the M-RoPE axis), chat turns and a served conversation
equal to one uninterrupted run, and the residency engine. Snapshots and rewinds of the state:
tests/test_model.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import localmoe
from conftest import arch_config, check_budgeted_equals_all_resident, expert_budget, served
from localmoe.archs.common import DeltaNetShape, fast_paths
from localmoe.bench.synth import write_model
from localmoe.layers.deltanet import GatedDeltaNet, delta_rule_chunked, delta_rule_recurrent
from localmoe.layers.rope import Rope, text_mrope_mask
from localmoe.model import KVCache
from oracle import compare, llama_logits

IDS_200 = np.random.default_rng(35).integers(0, 300, 200).tolist()


def test_spec_reads_the_hybrid_layout(make_model):
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt:
        s = rt.spec
        assert s.recurrent_layers == (True, True, True, False)  # full_attention_interval 4
        assert s.deltanet == DeltaNetShape(d_conv=4, n_k_heads=2, n_v_heads=4, d_k=32, d_v=32)
        assert s.rope_sections == (1, 1, 1, 1) and s.n_rot == 16 and s.head_dim == 64
        assert s.n_ff_shexp == 192 and s.norm_topk and s.arch.shared_expert == "gated"
        assert {"c_router", "c_decode_attention", "fused_qk_norm_rope", "fused_experts"} <= fast_paths(s)
        layers = rt.model.layers
        assert all(isinstance(layers[i].attn, GatedDeltaNet) for i in range(3)) and layers[3].attn.out_gate
        assert rt.model.cache_rows[:3] == [((0, 0), (0, 0))] * 3  # DeltaNet layers keep no KV rows


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_200_positions_match_llama_cpp_in_one_pass_and_token_by_token(make_model, qtype):
    """200 positions through the recurrent state: the prompt in one call (chunks of 64) and one
    token at a time (the per-token update) both match llama.cpp."""
    path = make_model("qwen35moe", qtype)
    ref = llama_logits(path, [IDS_200])
    with localmoe.load(path, device="cpu", kv_type="f32") as rt:  # llama.cpp's reference cache (test_oracle.py)
        full = rt.logits(IDS_200)
        steps = np.stack([logits.float().numpy() for logits, _, _ in rt.decode_logits(IDS_200)])
    if qtype == "F32":
        tol, min_agree = 1e-4, 0.99
    else:  # as test_oracle: twice llama.cpp's own F16-KV floor, at least 1e-2 / 1% of top-1
        floor_rel, floor_agree = compare(llama_logits(path, [IDS_200], f16_kv=True), ref)
        tol, min_agree = max(1e-2, 2 * floor_rel), 1 - max(0.01, 2 * (1 - floor_agree))
    for ours in (full, steps):
        rel, agree = compare(ours, ref)
        assert rel <= tol and agree >= min_agree, (rel, agree)


def test_fused_gate_up_experts_match_llama_cpp(tmp_path):
    """A file with ffn_gate_up_exps (gate rows first) runs as llama.cpp runs it, on the default path
    and under a budget (the experts are fetched from the split views of the file)."""
    f32 = write_model(tmp_path / "fused-f32.gguf", arch_config("qwen35moe", gate_up_fused=True))
    with localmoe.load(f32, device="cpu", kv_type="f32") as rt:  # llama.cpp's reference cache (test_oracle.py)
        assert not any("ffn_gate_up_exps" in n for n in rt.gguf.tensors) and rt.gguf.has("blk.0.ffn_gate_exps.weight")
        rel, agree = compare(rt.logits(IDS_200[:64]), llama_logits(f32, [IDS_200[:64]]))
    assert rel <= 1e-4 and agree == 1.0
    q8 = write_model(tmp_path / "fused-q8.gguf", arch_config("qwen35moe", gate_up_fused=True, weight_type="Q8_0"))
    with localmoe.load(q8, device="cpu", kv_type="f32") as rt:
        rel, _ = compare(rt.logits(IDS_200[:64]), llama_logits(q8, [IDS_200[:64]]))
    assert rel <= 1e-2
    check_budgeted_equals_all_resident(q8, IDS_200[:24])


def test_chunked_and_recurrent_delta_rules_agree():
    """The prompt's chunked form and the decode step's recurrence are one function: same outputs
    and same final state over 150 tokens (three chunks, the last padded), from a non-zero state."""
    g = torch.Generator().manual_seed(0)
    T, H, dk, dv = 150, 3, 16, 16
    q = torch.nn.functional.normalize(torch.randn(T, H, dk, generator=g), dim=-1) * dk**-0.5
    k = torch.nn.functional.normalize(torch.randn(T, H, dk, generator=g), dim=-1)
    v = torch.randn(T, H, dv, generator=g)
    decay = -torch.rand(T, H, generator=g) * 0.2
    beta = torch.rand(T, H, generator=g)
    S0 = torch.randn(H, dk, dv, generator=g) * 0.1
    S1, S2 = S0.clone(), S0.clone()
    a = delta_rule_recurrent(q, k, v, decay, beta, S1)
    b = delta_rule_chunked(q, k, v, decay, beta, S2)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S2, S1, rtol=1e-4, atol=1e-5)


def test_text_mrope_mask():
    """Qwen3.5's sections [11, 11, 10] cover all 32 pairs; [1, 1, 1, 1] leaves every 4th pair to
    the fourth axis, whose text position is 0 (unrotated)."""
    assert text_mrope_mask((11, 11, 10, 0), 32).tolist() == [1.0] * 32
    assert text_mrope_mask((1, 1, 1, 1), 8).tolist() == [1, 1, 1, 0, 1, 1, 1, 0]


def test_the_state_and_the_mrope_axis_each_change_the_logits(make_model):
    """Matching llama.cpp means something only if these pieces act: a DeltaNet whose state forgets
    at once (decay e^-50), or plain RoPE instead of the sections, move the logits far from the file's."""
    ids = IDS_200[:48]
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt:
        ref = rt.logits(ids)
        saved = [lw.attn.a.clone() for lw in rt.model.layers[:3]]
        for lw in rt.model.layers[:3]:
            lw.attn.a.fill_(-1e3)  # softplus(·) ≥ ~0.05 here: every token's decay ≤ e^-50
        forgetful = rt.logits(ids)
        for lw, a in zip(rt.model.layers[:3], saved):
            lw.attn.a.copy_(a)
        rope = rt.model.rope
        rt.model.rope = Rope(dataclasses.replace(rt.spec, rope_sections=()))
        plain_rope = rt.logits(ids)
        rt.model.rope = rope
        np.testing.assert_array_equal(rt.logits(ids), ref)
    rel = lambda other: np.linalg.norm(other - ref[-len(other) :]) / np.linalg.norm(ref[-len(other) :])  # noqa: E731
    assert rel(forgetful) > 1e-2
    # the sections reach one pair in four of the one attention layer in four: a smaller move, still
    # thousands of times the F32 file's distance from llama.cpp (3.5e-7) and ten times the oracle's bound
    assert rel(plain_rope[1:]) > 1e-3  # (position 0 turns by nothing either way)


def test_chat_turns_and_a_served_conversation_equal_one_run(make_model, monkeypatch):
    """A second chat turn resumes from the first prompt's snapshot (it does not start over) and says
    what a fresh runtime says to the whole conversation; so does the server, whose one runtime
    carries its state from request to request."""
    import httpx

    path = make_model("qwen35moe", "F32")
    turn1 = [{"role": "user", "content": "the model of the expert"}]
    resumed_at = []
    rewind = KVCache.rewind
    monkeypatch.setattr(KVCache, "rewind", lambda self, n: resumed_at.append(rewind(self, n)) or resumed_at[-1])
    with localmoe.load(path, device="cpu") as rt:
        reply1 = rt.chat(turn1, max_tokens=10, temperature=0)
        turn2 = turn1 + [
            {"role": "assistant", "content": reply1},
            {"role": "user", "content": "and the expert of the model"},
        ]
        reply2 = rt.chat(turn2, max_tokens=10, temperature=0)
        first_prompt = len(rt.tokenizer.tokenize_chat(turn1))
    assert resumed_at[-1] >= first_prompt > 0  # the second turn reused the first turn's state
    with localmoe.load(path, device="cpu") as rt:
        assert rt.chat(turn2, max_tokens=10, temperature=0) == reply2
    with served(path, "qwen35moe") as url:
        said = []
        for messages in (turn1, turn2):
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 10, "temperature": 0},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            said.append(r.json()["choices"][0]["message"]["content"])
        assert said == [reply1, reply2]


def test_budgeted_run_miss_policies_and_calibrate(make_model, tmp_path):
    """The residency engine on the hybrid: a 30% budget gives the all-resident logits (fetch, cpu);
    every miss policy decodes and traces every layer's routing; calibrate writes its buddy table."""
    import shutil

    path = str(tmp_path / "qwen35moe.gguf")
    shutil.copy(make_model("qwen35moe", "Q8_0"), path)
    check_budgeted_equals_all_resident(path, IDS_200[:24])
    r = subprocess.run(
        [sys.executable, "-m", "localmoe", "calibrate", path, "--tokens", "128", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 128
    with localmoe.load(path, device="cpu") as rt:
        budget = expert_budget(rt, 0.3)
    from localmoe.residency.trace import load_trace

    for on_miss in ("drop", "buddy", "little", "cost"):
        options = {"little": {"threshold": 0.0}, "buddy": {"min_score": 0.0}}.get(on_miss)
        trace = str(tmp_path / f"{on_miss}.jsonl")
        with localmoe.load(
            path, device="cpu", gpu_mem=budget, on_miss=on_miss, miss_options=options, trace=trace
        ) as rt:
            assert rt.generate("the model", max_tokens=6, temperature=0)
            s = rt.stats()
            assert s.misses > 0 and s.gpu_bytes_peak <= s.gpu_budget
            rt.scheduler.check()
        assert {tick.layer for tick, _, _ in load_trace(trace).steps} == {
            0,
            1,
            2,
            3,
        }  # the DeltaNet layers' experts too


def test_c_helper_equals_the_torch_forms(make_model):
    """The C helper (conv, norms, delta rule, gated norm) gives the torch ops' output and leaves the
    same state: 20 decode steps (against the recurrent form) and a 70-token prompt (against the
    chunked form), on a layer with key heads tiled over value heads."""
    from localmoe.compute.ggml_backend import ggml

    if ggml() is None:
        pytest.skip("the C helper lives in the ggml driver")
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt, torch.inference_mode():
        layer, s = rt.model.layers[0].attn, rt.spec
        c_cache, torch_cache = KVCache(s, rt.n_ctx, rt.device), KVCache(s, rt.n_ctx, rt.device)
        h = torch.randn(20, s.n_embd, generator=torch.Generator().manual_seed(1))
        import localmoe.layers.deltanet as dn

        for t in range(20):
            ours = layer(s, 0, h[t : t + 1], c_cache, t, None)
            real = dn.deltanet_step
            dn.deltanet_step = lambda *a: None  # the torch ops
            try:
                ref = layer(s, 0, h[t : t + 1], torch_cache, t, None)
            finally:
                dn.deltanet_step = real
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(c_cache.states[0], torch_cache.states[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # a prompt: the C helper's tokens in order against torch's chunked form (70 tokens: two chunks)
        h = torch.randn(70, s.n_embd, generator=torch.Generator().manual_seed(2))
        c_cache, torch_cache = KVCache(s, rt.n_ctx, rt.device), KVCache(s, rt.n_ctx, rt.device)
        ours = layer(s, 0, h, c_cache, 0, None)
        real = dn.deltanet_step
        dn.deltanet_step = lambda *a: None
        try:
            ref = layer(s, 0, h, torch_cache, 0, None)
        finally:
            dn.deltanet_step = real
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(c_cache.states[0], torch_cache.states[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_info_shows_the_hybrid_layout(make_model):
    """`localmoe info` names which layers are DeltaNet and which attention, the state's fixed size,
    and the M-RoPE sections."""
    from localmoe.gguf.file import GGUFModel
    from localmoe.info import describe, format_text

    d = describe(GGUFModel(make_model("qwen35moe", "F32")), backends=False)
    assert d["attention"]["deltanet_layers"] == [0, 1, 2] and d["attention"]["attention_layers"] == [3]
    state = d["attention"]["deltanet"]["state_bytes_per_layer"]
    assert state == 4 * (256 * 3 + 4 * 32 * 32)  # conv: (2·2·32 + 4·32) channels × 3 inputs; S: 4 heads × 32 × 32
    text = format_text(d)
    assert "GQA with an output gate on 1 layer (3)" in text and "Gated DeltaNet on 3 layers (0, 1, 2)" in text
    assert "M-RoPE sections [1, 1, 1, 1]" in text
