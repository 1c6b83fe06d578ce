"""A prompt's routed experts in one C call per layer (compute/plan.run_plan → experts.swiglu_prompt
→ vnni.c's lm_swiglu_prefill): the logits of the per-expert loop to float rounding (the C SiLU's
e^x against torch's), the call really made during prefill, and the loop kept where the experts
are not what the C call computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import localmoe
import localmoe.compute.plan as P
import localmoe.model as M
from localmoe.compute import policy
from localmoe.compute.kernels import native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no AVX-512 VNNI C kernel")


def _prompt(rt, ids: list[int]) -> torch.Tensor:
    cache = M.KVCache(rt.spec, 64, torch.device("cpu"))
    return rt.model.forward(torch.tensor(ids), cache, all_logits=True)


def _spy(monkeypatch) -> list[int]:
    """Record the token count of every prompt whose experts the C call computed."""
    calls: list[int] = []
    real = P.swiglu_prompt

    def spy(ws, x, rows):
        out = real(ws, x, rows)
        if out is not None:
            calls.append(x.shape[0])
        return out

    monkeypatch.setattr(P, "swiglu_prompt", spy)
    return calls


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_prompt_experts_in_one_call_give_the_loops_logits(make_model, qtype, monkeypatch):
    path = make_model("qwen3moe", qtype)
    ids = np.random.default_rng(5).integers(0, 200, 24).tolist()
    with localmoe.load(path, device="cpu") as rt:  # (the default policy: these types on the VNNI kernel)
        calls = _spy(monkeypatch)
        got = _prompt(rt, ids)
        assert calls == [len(ids)] * rt.spec.n_layer  # every layer's experts: one C call
        monkeypatch.setattr(P, "swiglu_prompt", lambda ws, x, rows: None)  # the per-expert loop
        ref = _prompt(rt, ids)
    # the same products in the same order; only the C SiLU may round differently from torch's, and
    # the down matmul's int8 activations mostly absorb that: on these files the logits come out
    # equal to the bit (measured), which the tolerance below does not require
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_experts_past_gemm_rows_keep_the_loop(make_model, monkeypatch):
    """With policy gemm_rows below an expert's token count, that layer's experts run as before
    (dequantize + SGEMM for the big ones), and the logits are the loop's to the bit."""
    path = make_model("qwen3moe", "Q8_0")
    ids = np.random.default_rng(6).integers(0, 200, 24).tolist()
    with policy.override(kernel="vnni", gemm_rows=2), localmoe.load(path, device="cpu") as rt:
        calls = _spy(monkeypatch)
        got = _prompt(rt, ids)
        assert calls == []
        monkeypatch.setattr(P, "swiglu_prompt", lambda ws, x, rows: None)
        ref = _prompt(rt, ids)
    assert torch.equal(got, ref)


def test_biased_experts_keep_the_loop(make_model, monkeypatch):
    """gpt-oss's experts (biases, clamped SwiGLU) are not what the C call computes."""
    with policy.override(kernel="vnni"), localmoe.load(make_model("gpt-oss", "Q8_0"), device="cpu") as rt:
        calls = _spy(monkeypatch)
        _prompt(rt, np.random.default_rng(7).integers(0, 200, 12).tolist())
    assert calls == []
