"""Our logits against llama.cpp's on the same file, for every architecture and quant type.

Tolerance. llama.cpp quantizes activations to 8 bits before every matmul with quantized weights
(≈0.5% noise per matmul) and MoE routing is discontinuous, so quantized files differ from llama.cpp
by about 1e-2 even when every step is right. We measure that floor as llama.cpp against itself
(F16 vs F32 KV cache) on the same prompts, and hold localmoe to ‖a−b‖/‖b‖ ≤ max(1e-2, 2·floor) and
top-1 disagreement ≤ max(1%, 2·floor's). Floors measured here (4 prompts × 64 tokens, seed 1):
F32 ≈ 2e-4; Q8_0 / Q4_0 ≈ 5.5e-3–6.1e-3; Q4_K_M ≈ 7.7e-3–1.0e-2 (the hybrid qwen35moe's ≈ 3e-3:
its F16 cache covers one layer in four). localmoe's default path is 6e-4–3.7e-3 (docs/models.md).
localmoe runs a float32 KV cache here, as llama.cpp's reference does, so that the comparison is of the
arithmetic. F32 files, where both engines do exact float math, carry the strict check: rel ≤ 1e-4
(measured ≈ 7e-7; gemma4 ≈ 1.2e-5) and ≥ 99% top-1 agreement. gemma4's GELU is ggml's lookup in a
float16 table, so a float32 summation-order difference (1e-7) at its input moves its output by a
float16 step now and then (localmoe's logits move 1.5e-5 under a 1e-7 jitter of the GELU's input
with the table, 3.5e-7 without: tests/test_gemma4.py); decode against one pass, which sum in
different orders, is held to the same 1e-4 in relative norm there, not elementwise.

The default float16 KV cache is checked on the F32 files: its logits are no further from llama.cpp's
(F32 cache) than llama.cpp's own with an F16 cache (measured 0.69–0.85× that floor; deepseek2's latent
cache stays float32), and 24 tokens decoded one at a time through the C attention over the halves
(AVX-512 and portable) within twice it (measured up to 1.03×). Decode against one pass reads the
same halves, but a key that differs by a float32 rounding between a batched and a one-token matmul
can round to the next half: held to 1e-4 in relative norm at float16, elementwise at float32.
"""

from __future__ import annotations

import numpy as np
import pytest

import localmoe
from conftest import ARCHS
from oracle import compare, llama_logits

from localmoe.compute.ggml_backend import ggml
from localmoe.compute.kernels import native_lib

# Every quantized case runs on each CPU path this machine has: the default choice (the VNNI kernel
# for the types it measures faster on, where it is built) and ggml's kernels alone
# (LOCALMOE_KERNEL=ggml, what a CPU without AVX-512 runs); and one type per architecture on the torch
# fallbacks alone (LOCALMOE_KERNEL=torch).
KERNELS = ["auto"] + (["ggml"] if ggml() is not None and native_lib() is not None else [])
CASES = [(arch, q, "auto") for arch in ARCHS for q in ("F32", "Q8_0", "Q4_0", "Q4_K_M")]
CASES += [("qwen3moe", q, "auto") for q in ("F16", "BF16", "Q4_1", "Q5_0", "Q5_1")]
CASES += [("gpt-oss", "MXFP4_MOE", "auto")]  # how gpt-oss ships: MXFP4 experts (ggml's kernels), Q8_0 elsewhere
CASES += [(arch, q, k) for k in KERNELS[1:] for arch in ARCHS for q in ("Q8_0", "Q4_0", "Q4_K_M")]
CASES += [("qwen3moe", q, k) for k in KERNELS[1:] for q in ("Q4_1", "Q5_0", "Q5_1")]
CASES += [(arch, "Q4_0", "torch") for arch in ARCHS]  # the torch fallbacks (no C kernel at all) on every architecture
_REFS: dict[str, tuple] = {}
GELU_TABLE = {"gemma4"}  # ggml's float16 GELU table: decode vs one pass by relative norm (the module docstring)


def _refs(path: str, prompts: list[list[int]]) -> tuple:
    """llama.cpp's logits with an F32 and an F16 KV cache (the floor), once per file."""
    if path not in _REFS:
        _REFS[path] = (llama_logits(path, prompts), None)
    return _REFS[path]


def _prompts(n_vocab_real: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, n_vocab_real, 64).tolist() for _ in range(4)]


@pytest.mark.parametrize(
    "arch,qtype,kernel", CASES, ids=[f"{a}-{q}" + ("" if k == "auto" else f"-{k}") for a, q, k in CASES]
)
def test_logits_match_llama_cpp(make_model, arch, qtype, kernel):
    path = make_model(arch, qtype)
    prompts = _prompts()
    ref = _refs(path, prompts)[0]
    # against llama.cpp's float32 cache (ref), ours float32 too: the arithmetic alone (the module docstring)
    with localmoe.load(path, device="cpu", kernel=None if kernel == "auto" else kernel, kv_type="f32") as rt:
        ours = np.concatenate([rt.logits(p) for p in prompts])
        if kernel == "ggml":
            assert {w.backend for lw in rt.model.layers for w in lw.wqkv} <= {"ggml", "f32", "bf16"}
        if kernel == "torch":  # torch's int4 matmul on the dense weights and the experts: no C kernel
            assert {w.backend for lw in rt.model.layers for w in lw.wqkv} <= {"int4", "f32", "bf16"}
            assert rt.store.weights(rt.spec.moe_layers[0], 0).gate_up.backend in ("int4", "bf16")
    assert ours.shape == ref.shape == (256, rt.spec.n_vocab)
    rel, agree = compare(ours, ref)
    floor = _refs(path, prompts)[1]
    if floor is None:
        floor = compare(llama_logits(path, prompts, f16_kv=True), ref)
        _REFS[path] = (ref, floor)
    floor_rel, floor_agree = floor
    if qtype == "F32":
        assert rel <= 1e-4, f"F32 must match llama.cpp to float rounding: rel {rel:.2e}"
        assert agree >= 0.99
        # our default half-precision cache moves the logits no more than llama.cpp's F16 cache moves its
        # own: with the AVX-512 decode helpers and with the portable ones a CPU without it runs (ggml)
        for helpers in KERNELS:
            with localmoe.load(path, device="cpu", kernel=None if helpers == "auto" else helpers) as rt:
                assert rt.kv_type == "f16"
                half = np.concatenate([rt.logits(p) for p in prompts])
                half_decode = np.stack([lg.float().numpy() for lg, _, _ in rt.decode_logits(prompts[0][:24])])
            # the prompts in one pass each: within the floor itself; 24 tokens decoded one at a time (the
            # C attention over the halves): within twice it, as this module's quantized files (measured ≤ 1.03×)
            for ours16, want, bound in ((half, ref, floor_rel), (half_decode, ref[:24], 2 * floor_rel)):
                rel16, agree16 = compare(ours16, want)
                assert rel16 <= bound, f"f16 cache ({helpers}): rel {rel16:.2e} > {bound:.2e} (floor {floor_rel:.2e})"
                assert agree16 >= 0.99
        return
    rel_tol = max(1e-2, 2 * floor_rel)
    disagree_tol = max(0.01, 2 * (1 - floor_agree))
    assert rel <= rel_tol, f"rel {rel:.2e} > {rel_tol:.2e} (floor {floor_rel:.2e})"
    assert 1 - agree <= disagree_tol, f"top-1 agreement {agree:.3f} (floor {floor_agree:.3f})"


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decode_matches_full_pass(make_model, arch):
    """Prefill + one-token decode steps through the KV cache give the same logits as one pass."""
    import torch

    path = make_model(arch, "F32")
    ids = _prompts()[0][:24]
    for kv_type in ("f32", "f16"):
        with localmoe.load(path, device="cpu", kv_type=kv_type) as rt:
            full = rt.logits(ids)
            cache = rt.new_cache()
            steps = [rt.model.forward(torch.tensor(ids[:16]), cache)[-1]]
            for t in ids[16:]:
                steps.append(rt.model.forward(torch.tensor([t]), cache)[-1])
        inc = torch.stack(steps).numpy()
        # prefill and decode sum in different orders: the float16 GELU table's steps, a float16 key's (docstring)
        if arch in GELU_TABLE or kv_type == "f16":
            rel, agree = compare(inc, full[15:])
            assert rel <= 1e-4 and agree == 1.0, (kv_type, rel, agree)
            continue
        np.testing.assert_allclose(inc, full[15:], rtol=1e-4, atol=1e-4)
