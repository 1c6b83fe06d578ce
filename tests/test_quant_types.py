"""The quant types people download, made by llama.cpp's own quantizer from the bundled demo model.

The demo model (Q8_0) is requantized with `llama_model_quantize` (allow_requantize) into each type
llama.cpp's quantizer makes for MoE models without an importance matrix. Each file must load, and
localmoe's perplexity on held-out text (the first 1,024 tokens of models/demo-heldout.txt as four
windows of 256, the model's context; next-token log-likelihood from one prompt pass per window) must
be within 0.5% of llama.cpp's on the same file. (One window is too short: there a kernel whose
rounding differs from llama.cpp's by float16 scales moved perplexity by 0.7%, which four windows
bring to 0.2%.) Types the VNNI kernel computes are run on both CPU paths (vnni and ggml); the others run on
ggml. The demo model's expert FFN is 128 wide, so llama.cpp's quantizer stores the down
projections of the 256-block types in its fallback types (IQ4_NL, Q5_0, Q5_1, Q8_0): the mixes
below hold Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ4_NL, MXFP4, Q4_0, Q5_0, Q8_0 tensors.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import localmoe
from localmoe.bundled import demo_model_path
from localmoe.compute.ggml_backend import ggml, ggml_error
from localmoe.gguf.file import GGUFModel
from localmoe.compute.kernels import native_lib
from localmoe.bench.synth import quantize_with_llama_cpp
from oracle import llama_logits

FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "IQ4_NL", "MXFP4_MOE")
VNNI_TYPES = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}
HELDOUT = os.path.join(os.path.dirname(demo_model_path()), "demo-heldout.txt")
N_TOKENS = 256  # per window (the demo model's context)
N_WINDOWS = 4


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-types")
    made: dict[str, str] = {}

    def get(ftype: str) -> str:
        if ftype not in made:
            made[ftype] = quantize_with_llama_cpp(demo_model_path(), str(root / f"demo-{ftype}.gguf"), ftype)
        return made[ftype]

    return get


@pytest.fixture(scope="module")
def heldout_windows() -> list[list[int]]:
    with localmoe.load(None, device="cpu") as rt:
        ids = rt.tokenize(open(HELDOUT, encoding="utf-8").read()[:12000])
    assert len(ids) >= N_TOKENS * N_WINDOWS
    return [ids[i * N_TOKENS : (i + 1) * N_TOKENS] for i in range(N_WINDOWS)]


def perplexity(logits: list[np.ndarray], windows: list[list[int]]) -> float:
    """exp(mean NLL of each next token) over windows; logits[i] [len(windows[i]), V]."""
    nll = []
    for lg, ids in zip(logits, windows):
        z = lg[:-1].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]])
    return math.exp(float(np.concatenate(nll).mean()))


_LLAMA_PPL: dict[str, float] = {}
CASES = [(f, "auto") for f in FTYPES] + [(f, "ggml") for f in ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")]


@pytest.mark.parametrize("ftype,kernel", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_perplexity_matches_llama_cpp(quantized, heldout_windows, ftype, kernel):
    if ggml() is None:
        pytest.skip(f"ggml backend unavailable: {ggml_error()}")
    path = quantized(ftype)
    qtypes = {t.qtype for t in GGUFModel(path).tensors.values()}
    if path not in _LLAMA_PPL:  # once per file (the two CPU paths share it)
        _LLAMA_PPL[path] = perplexity(np.split(llama_logits(path, heldout_windows), N_WINDOWS), heldout_windows)
    ref = _LLAMA_PPL[path]
    # a float32 KV cache, as llama.cpp's reference runs (tests/test_oracle.py's docstring)
    opts = dict(n_ctx=N_TOKENS, kernel=None if kernel == "auto" else kernel, kv_type="f32")
    with localmoe.load(path, device="cpu", **opts) as rt:
        ours = perplexity([rt.logits(w) for w in heldout_windows], heldout_windows)
        backends = {w.backend for lw in rt.model.layers for w in lw.wqkv} | {rt.model.output.backend}
        experts = rt.store.weights(0, 0)
        backends |= {experts.gate_up.backend, experts.down.backend}
    if kernel == "ggml" or not qtypes & VNNI_TYPES or native_lib() is None:
        assert "vnni" not in backends
    # `pytest tests/test_quant_types.py -s` prints the measured rows (docs/models.md)
    print(
        f"\n| {ftype} | {kernel} ({', '.join(sorted(backends))}) | {ref:.3f} | {ours:.3f} | "
        f"{ours / ref - 1:+.2%} | {', '.join(sorted(q.name for q in qtypes))} |"
    )
    assert ours == pytest.approx(ref, rel=5e-3), (
        f"{ftype} ({kernel}): localmoe {ours:.3f}, llama.cpp {ref:.3f}; types {sorted(q.name for q in qtypes)}"
    )
    assert ref < 100  # the file is a working model, not noise (the Q8_0 demo model: ≈ 37 here)


def test_ggml_decode_steps_match_the_prompt_pass(quantized, heldout_windows):
    """Token-by-token decode (the k experts in one lg_moe_decode call) gives the prompt pass's logits
    on an IQ4_XS file, where every expert runs on ggml."""
    if ggml() is None:
        pytest.skip(f"ggml backend unavailable: {ggml_error()}")
    import torch

    from localmoe.model import KVCache

    ids = heldout_windows[0][:40]
    with localmoe.load(quantized("IQ4_XS"), device="cpu", n_ctx=64) as rt:
        assert rt.store.backend(0)[0] == "ggml"
        full = rt.logits(ids)
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        steps = [rt.model.forward(torch.tensor(ids[:8]), cache)[-1]]
        for t in ids[8:]:
            steps.append(rt.model.forward(torch.tensor([t]), cache)[-1])
    inc = torch.stack(steps).numpy()
    # equal up to int8 rounding flips of activations whose float sums differ in order (measured
    # ≈ 2e-3 relative; an expert computed wrong or weighted wrong gives ≳ 1e-1)
    assert np.linalg.norm(inc - full[7:]) / np.linalg.norm(full[7:]) <= 1e-2
    assert (inc.argmax(-1) == full[7:].argmax(-1)).mean() >= 0.95


def test_gpu_tier_takes_ggml_only_types(quantized, heldout_windows):
    """The GPU tier keeps experts in their GGUF bytes and dequantizes per matmul ("gguf" backend):
    for a type with no torch decoding (IQ4_XS here, IQ4_NL down projections) the dequantization goes
    through ggml's to_float. Under a modelled budget (resident experts on the tier, the rest on the
    CPU) the prompt's logits are the all-CPU run's, to the activation rounding of ggml's kernels."""
    path = quantized("IQ4_XS")
    ids = heldout_windows[0][:48]
    with localmoe.load(path, device="cpu") as rt:
        ref = rt.logits(ids)
        dense, per_expert = rt.gguf.dense_bytes(), rt.gguf.expert_bytes(0)
        total = rt.spec.n_layer * rt.spec.n_expert
    with localmoe.load(
        path, device="cpu", gpu_mem=dense + per_expert * total // 4, profile="laptop-8gb", on_miss="cpu"
    ) as rt:
        rt.logits(ids)  # fills the tier
        ours = rt.logits(ids)
        st = rt.stats()
    assert st.hits > 0 and st.misses > 0  # experts on the tier (gguf bytes) and off it
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
