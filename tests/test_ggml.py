"""The ggml backend: ggml's own CPU kernels on weights as stored in the file, for every quant type.

Test weights are random float rows quantized by ggml's own quantizer (`ggml_quantize_chunk`, a
uniform importance matrix for the types that need one), so they are the blocks llama.cpp writes.
References: the weights dequantized by gguf-py (llama.cpp's Python reference, independent of the
library under test) times the activations, exactly (float64) and after the activation
quantization ggml applies (Q8_0 / Q8_K rows, dequantized by gguf-py as well).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from localmoe.compute import ggml_backend, kernels, policy
from localmoe.gguf import blocks as gguf_blocks
from localmoe.compute.experts import mapped_ffn, swiglu_expert
from localmoe.compute.ggml_backend import GGML_COMPUTE_TYPES, ggml
from localmoe.compute.kernels import fuse_rows, repack

pytestmark = pytest.mark.skipif(ggml() is None, reason=f"ggml backend unavailable: {ggml_backend.ggml_error()}")
NEEDS_IMATRIX = {Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S}


def ggml_rows(qtype: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n random rows of k weights quantized by ggml_quantize_chunk → uint8 [n, row bytes]."""
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)
    return ggml().quantize(w, qtype, np.ones(k, np.float32))


def act_quantized(x: torch.Tensor, qtype: Q) -> np.ndarray:
    """x as ggml's vec_dot sees it: quantized to qtype's activation type (Q8_0 or Q8_K), then
    dequantized (gguf-py for Q8_0; the Q8_1 and Q8_K layouts read here)."""
    vdt = ggml().kernels(qtype).vec_dot_type
    g = ggml()
    out = np.zeros(x.shape, dtype=np.float64)
    for t, row in enumerate(x.numpy()):
        buf = np.zeros(g.kernels(vdt).row_bytes(row.size), dtype=np.uint8)
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(g.kernels(qtype).from_float)(
            row.ctypes.data, buf.ctypes.data, row.size
        )
        if vdt == Q.Q8_0:
            out[t] = dequantize(buf, Q.Q8_0).reshape(-1)
        elif vdt == Q.Q8_1:  # float16 d, float16 d·sum, 32 int8
            b = buf.reshape(-1, 36)
            out[t] = (
                b[:, :2].copy().view(np.float16).astype(np.float32) * b[:, 4:].view(np.int8).astype(np.float32)
            ).reshape(-1)
        else:  # Q8_K: float32 d, 256 int8, 16 int16 block sums
            b = buf.reshape(-1, 292)
            d = b[:, :4].copy().view(np.float32)
            out[t] = (d * b[:, 4:260].view(np.int8).astype(np.float32)).reshape(-1)
    return out


def rel(y: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    y = y.double().numpy() if isinstance(y, torch.Tensor) else y
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_every_moe_quant_type_is_computed_by_ggml():
    g = ggml()
    for qtype in GGML_COMPUTE_TYPES:
        assert g.computes(qtype), qtype.name
        tk = g.kernels(qtype)
        assert (tk.block, tk.block_bytes) == gguf_blocks.BLOCK_SIZES[qtype]


@pytest.mark.parametrize("qtype", GGML_COMPUTE_TYPES, ids=lambda q: q.name)
def test_ggml_matmul_is_the_dequantized_matmul(qtype):
    """W·x through the C driver (rows split across threads, odd row counts, several tokens) and, from
    GGML_GRAPH_ROWS tokens, through ggml's graph, equals the dequantized weights times the quantized
    activations to float rounding, and the exact product to the activation quantization's error."""
    n, k = 37, 512  # 37: two work items of 16 rows and a tail
    raw = ggml_rows(qtype, n, k, seed=int(qtype))
    ref_w = dequantize(raw, qtype).reshape(n, k).astype(np.float64)
    assert np.abs(ref_w).max() > 0
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((9, k), dtype=np.float32))
    w = repack(raw, qtype, (n, k), backend="ggml")
    assert w.backend == "ggml" and w.tensors["raw0"].data_ptr() == raw.ctypes.data  # in place: no copy
    assert policy.current().ggml_graph_rows <= 9
    if ggml().graph is not None:  # the two many-token paths agree
        torch.testing.assert_close(
            ggml().graph_matmul(w.tensors["raw0"], qtype, n, k, x, 2),
            ggml().matmul(kernels._ggml_segs(w), n, x, 2),
            rtol=1e-5,
            atol=1e-5,
        )
    for rows in (1, 5, 9):
        y = w(x[:rows])
        assert y.shape == (rows, n)
        # Q4_1 / Q5_1 meet Q8_1 activations, whose block sums d·Σq are stored as float16: ≤ 2e-3
        assert rel(y, act_quantized(x[:rows], qtype) @ ref_w.T) <= (2e-3 if qtype in (Q.Q4_1, Q.Q5_1) else 1e-5), (
            qtype.name
        )
        assert rel(y, x[:rows].double().numpy() @ ref_w.T) <= 1.5e-2, qtype.name


@pytest.mark.parametrize("qtype", GGML_COMPUTE_TYPES, ids=lambda q: q.name)
def test_dequantize_every_type_equals_gguf_reference(qtype):
    """gguf_blocks.dequantize (the dense, GPU-tier and router paths) is exact for every type we read."""
    raw = ggml_rows(qtype, 8, 512, seed=3)
    got = gguf_blocks.dequantize(raw, qtype, (8, 512))
    np.testing.assert_array_equal(got.numpy(), dequantize(raw, qtype).reshape(8, 512).astype(np.float32))
    rows = torch.tensor([7, 0, 3])
    np.testing.assert_array_equal(
        kernels.gather_rows(repack(raw, qtype, (8, 512), backend="ggml"), rows).numpy(), got.numpy()[rows.numpy()]
    )


def test_fused_segments_of_different_types_are_one_matmul():
    """gate (IQ4_XS) and up (Q8_0) as one weight of two in-place segments: the same as two matmuls."""
    gate, up = ggml_rows(Q.IQ4_XS, 24, 256, 1), ggml_rows(Q.Q8_0, 40, 256, 2)
    x = torch.randn(3, 256)
    fused = kernels.ggml_weight([(torch.from_numpy(gate), Q.IQ4_XS, 24), (torch.from_numpy(up), Q.Q8_0, 40)], 256)
    sep = torch.cat(
        [repack(gate, Q.IQ4_XS, (24, 256), backend="ggml")(x), repack(up, Q.Q8_0, (40, 256), backend="ggml")(x)], dim=-1
    )
    torch.testing.assert_close(fused(x), sep, rtol=0, atol=0)


@pytest.mark.parametrize(
    "qtypes", [(Q.Q4_K, Q.Q6_K), (Q.IQ2_XXS, Q.Q3_K), (Q.MXFP4, Q.MXFP4)], ids=lambda t: "-".join(q.name for q in t)
)
def test_moe_decode_equals_the_experts_one_by_one(qtypes):
    """lg_moe_decode (k experts' gate+up, SwiGLU, down and the weighted sum in one call) equals the
    experts run one at a time through the matmul entry point."""
    gu_t, dn_t = qtypes
    D, Fh, E = 256, 512, 4
    experts = [
        mapped_ffn(
            (ggml_rows(gu_t, Fh, D, 10 + e), gu_t, (Fh, D)),
            (ggml_rows(gu_t, Fh, D, 20 + e), gu_t, (Fh, D)),
            (ggml_rows(dn_t, D, Fh, 30 + e), dn_t, (D, Fh)),
        )
        for e in range(E)
    ]
    x = torch.randn(1, D)
    coef = [0.4, 0.3, 0.2, 0.1]
    fused = kernels.swiglu_decode([w.gate_up for w in experts], [w.down for w in experts], x, coef)
    assert fused is not None
    loop = sum(c * swiglu_expert(w, x) for c, w in zip(coef, experts))
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["swiglu", "swiglu_oai"])
def test_moe_decode_with_biases_equals_the_experts_one_by_one(act):
    """lg_moe_decode with gpt-oss's epilogue (kernels.ggml_experts_decode: biases on gate, up and
    down, some experts without; the clamped SwiGLU) equals the experts run one at a time in torch
    (swiglu_expert). Large activations reach the clamps at ±7, so a missing clamp or a bias added
    at the wrong step fails."""
    import dataclasses

    D, Fh, E = 256, 512, 4
    experts = []
    for e in range(E):
        w = mapped_ffn(
            (ggml_rows(Q.MXFP4, Fh, D, 10 + e), Q.MXFP4, (Fh, D)),
            (ggml_rows(Q.MXFP4, Fh, D, 20 + e), Q.MXFP4, (Fh, D)),
            (ggml_rows(Q.MXFP4, D, Fh, 30 + e), Q.MXFP4, (D, Fh)),
        )
        gen = torch.Generator().manual_seed(e)
        gub = None if e == 2 else torch.randn(2 * Fh, generator=gen) * 3.0
        db = None if e == 1 else torch.randn(D, generator=gen)
        experts.append(dataclasses.replace(w, act=act, gate_up_bias=gub, down_bias=db, fused_ok=False))
    x = torch.randn(1, D) * 8.0
    gu = experts[0].gate_up(x) + experts[0].gate_up_bias
    assert (gu.abs() > 7).any()  # the clamps are reached
    coef = [0.4, 0.3, 0.2, 0.1]
    fused = kernels.ggml_experts_decode(
        [w.gate_up for w in experts],
        [w.down for w in experts],
        x,
        coef,
        act,
        [w.gate_up_bias for w in experts],
        [w.down_bias for w in experts],
    )
    assert fused is not None
    loop = sum(c * swiglu_expert(w, x) for c, w in zip(coef, experts))
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)
    nobias = [None] * E
    assert (
        kernels.ggml_experts_decode(
            [w.gate_up for w in experts], [w.down for w in experts], x, coef, "geglu", nobias, nobias
        )
        is None
    )


def test_struct_layout_mismatch_is_one_clear_error(monkeypatch):
    """A libggml whose ggml_type_traits has another layout (here: read without one field) is refused
    with a message that names the version and the way out, not used to compute garbage."""

    class Shifted(ctypes.Structure):
        _fields_ = [(n, t) for n, t in ggml_backend._Traits._fields_ if n != "blck_size_interleave"]

    monkeypatch.setattr(ggml_backend, "_Traits", Shifted)
    with pytest.raises(ggml_backend.GGMLLayoutError, match="struct layout"):
        ggml_backend.GGML()


def test_torch_int4_fallback_takes_odd_row_counts():
    """torch's int4 packing needs rows in multiples of 16: an output head of 267 rows must work (it
    crashed with 'expect N to be dividable by 16')."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((267, 256), dtype=np.float32)
    raw = quantize(w, Q.Q4_0)
    lin = repack(raw, Q.Q4_0, (267, 256), backend="int4")
    x = torch.randn(3, 256)
    ref = x.double().numpy() @ dequantize(raw, Q.Q4_0).reshape(267, 256).astype(np.float64).T
    y = lin(x)
    assert y.shape == (3, 267)
    assert rel(y, ref) <= 1e-2


def test_mixed_fuse_rows_is_zero_copy_under_ggml(monkeypatch):
    """Where ggml is the backend, gate and up are fused without concatenating their bytes."""
    monkeypatch.setattr(kernels, "choose_backend", lambda q, d, prefer=None: "ggml")
    gate, up = ggml_rows(Q.Q4_K, 16, 256, 4), ggml_rows(Q.Q4_K, 16, 256, 5)
    fused = fuse_rows([(gate, Q.Q4_K, (16, 256)), (up, Q.Q4_K, (16, 256))])
    assert (
        fused.backend == "ggml"
        and fused.tensors["raw0"].data_ptr() == gate.ctypes.data
        and fused.tensors["raw1"].data_ptr() == up.ctypes.data
    )


@pytest.mark.skipif(
    kernels.native_lib() is None, reason="no AVX-512 VNNI kernel: every expert is computed in place already"
)
def test_experts_beyond_host_mem_run_in_place_and_are_never_repacked_twice(make_model, monkeypatch):
    """Under a host-RAM budget of about two repacked experts, the rest are computed by ggml from the
    memory map: nothing is repacked twice, the budget holds, and the logits are those of the
    all-repacked run to the activation rounding of the two kernels."""
    import localmoe
    from localmoe.compute import experts as experts_mod

    path = make_model("qwen3moe", "Q4_0")
    ids = list(range(10, 40))
    with localmoe.load(path, device="cpu") as rt:
        full = rt.logits(ids)
        per_expert = rt.store.weights(0, 0).nbytes
    packed: list[tuple[int, int]] = []
    real_pack = experts_mod.pack_ffn

    def counting_pack(*a, **kw):
        packed.append(a[0][0].ctypes.data)
        return real_pack(*a, **kw)

    monkeypatch.setattr(experts_mod, "pack_ffn", counting_pack)
    with localmoe.load(path, device="cpu", host_mem=int(2.5 * per_expert)) as rt:
        small = rt.logits(ids)
        small2 = rt.logits(ids)
        store = rt.store
        assert 1 <= len(store._cache) <= 2 and store._cached_bytes <= 2.5 * per_expert
        assert len(store._mapped) >= rt.spec.n_layer * rt.spec.n_expert - 2
        assert {w.gate_up.backend for w in store._mapped.values()} == {"ggml"}
    assert len(packed) == len(set(packed)) <= 2  # the second pass repacked nothing
    np.testing.assert_array_equal(small, small2)
    assert np.linalg.norm(small - full) / np.linalg.norm(full) <= 1e-2
    assert (small.argmax(-1) == full.argmax(-1)).mean() >= 0.9
