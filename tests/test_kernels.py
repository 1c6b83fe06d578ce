"""Every repacked layout reproduces the dequantized matmul, for every supported quant type.

Test matrices are random *blocks*: random bytes with valid float16 scale fields, so every code,
scale and min bit pattern of a type occurs. The reference is gguf.quants.dequantize (llama.cpp's
own Python reference) followed by a float64 matmul.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from localmoe.bench import speed as bench
from localmoe.compute import kernels, policy
from localmoe.gguf import blocks as gguf_blocks
from localmoe.gguf.blocks import decode
from localmoe.compute.kernels import fuse_rows, repack
from localmoe.compute.ggml_backend import ggml

BLOCKS = {Q[name]: layout for name, layout in bench.BLOCK_LAYOUTS.items()}  # the block types and their layouts
FLOATS = (Q.F32, Q.F16, Q.BF16)
ALL_TYPES = FLOATS + tuple(BLOCKS)


def random_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return bench.random_blocks(qtype.name, n, k, rng)


def random_ffns(n: int, gate_up: Q, down: Q, n_ff: int, d: int, rng: np.random.Generator) -> list:
    """n experts of random blocks, repacked (pack_ffn): gate and up [n_ff, d] of one type, down [d, n_ff]."""
    from localmoe.compute.experts import pack_ffn

    def raw(qtype: Q, rows: int, cols: int):
        return random_blocks(qtype, rows, cols, rng), qtype, (rows, cols)

    return [
        pack_ffn(raw(gate_up, n_ff, d), raw(gate_up, n_ff, d), raw(down, d, n_ff), torch.device("cpu"))
        for _ in range(n)
    ]


def random_matrix(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((n, k), dtype=np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.BF16:
        return quantize(w, Q.BF16)
    return random_blocks(qtype, n, k, rng)


def reference(raw: np.ndarray, qtype: Q, n: int, k: int) -> np.ndarray:
    if qtype in (Q.F32, Q.F16):
        return np.asarray(raw, dtype=np.float64)
    return dequantize(raw, qtype).reshape(n, k).astype(np.float64)


def backends_for(qtype: Q) -> list[str]:
    if qtype == Q.F32:
        return ["f32", "gguf"]
    if qtype in FLOATS:
        return ["bf16", "gguf"]
    out = ["bf16", "gguf"]
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
        out.append("int4")
    if kernels.native_lib() is not None:
        out.append("vnni")
    if ggml() is not None and ggml().computes(qtype):
        out.append("ggml")
    return out


def rel_err(y: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.double().numpy() - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("qtype", tuple(BLOCKS), ids=lambda q: q.name)
def test_decode_is_exact(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 8, 512, rng)
    np.testing.assert_array_equal(decode(raw, qtype, (8, 512)).dequantize().numpy(), reference(raw, qtype, 8, 512))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_torch_dequantize_is_bit_exact(qtype):
    """The dequantizer every GPU-tier matmul runs (gguf_blocks.dequantize) equals gguf's reference."""
    rng = np.random.default_rng(3)
    raw = random_matrix(qtype, 8, 512, rng)
    got = gguf_blocks.dequantize(raw, qtype, (8, 512))
    assert got.dtype == torch.float32 and got.shape == (8, 512)
    np.testing.assert_array_equal(got.numpy(), reference(raw, qtype, 8, 512).astype(np.float32))
    assert gguf_blocks.raw_bytes(raw, 8).shape == (8, gguf_blocks.row_bytes(qtype, 512))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 9, 130])
def test_every_layout_matches_the_dequantized_matmul(qtype, rows):
    rng = np.random.default_rng(2)
    n, k = 80, 512
    raw = random_matrix(qtype, n, k, rng)
    x = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32))
    ref = x.double().numpy() @ reference(raw, qtype, n, k).T
    for backend in backends_for(qtype):
        w = repack(raw, qtype, (n, k), backend=backend)
        assert w.backend == backend
        y = w(x)
        assert y.shape == (rows, n) and y.dtype == torch.float32
        tol = 1e-5 if backend in ("f32", "gguf") else 1e-2
        assert rel_err(y, ref) <= tol, f"{qtype.name} {backend}: rel {rel_err(y, ref):.2e}"


def q8_activations(x: torch.Tensor, qtype: Q = Q.Q8_0) -> np.ndarray:
    """x quantized as llama.cpp quantizes the activations a weight of `qtype` meets (and as the C
    kernel does, kernels.ACT_BLOCK): codes round(x · 127/amax) (half to even) per block; per 32
    values (Q8_0) times amax/127 rounded to float16, per 256 (Q8_K, the K-types) times the float32
    1/(127/amax)."""
    block = kernels.ACT_BLOCK.get(qtype, 32)
    b = x.numpy().reshape(x.shape[0], -1, block)
    amax = np.abs(b).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    if block == 32:
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    else:
        d = np.where(inv > 0, np.float32(1) / np.where(inv > 0, inv, 1), 0).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(x.shape).astype(np.float64)


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", tuple(BLOCKS), ids=lambda q: q.name)
def test_sgemm_path_is_the_exact_dequantized_matmul(qtype):
    """With LOCALMOE_GEMM_ROWS set, many rows dequantize the weight to float32 for SGEMM: exact up to
    float rounding (the K-types' composite scales are made exactly from their own bytes)."""
    rng = np.random.default_rng(6)
    raw = random_blocks(qtype, 80, 512, rng)
    x = torch.from_numpy(rng.standard_normal((130, 512), dtype=np.float32))
    with policy.override(gemm_rows=128):
        y = repack(raw, qtype, (80, 512), backend="vnni")(x)
    tol = 1e-5
    assert rel_err(y, x.double().numpy() @ reference(raw, qtype, 80, 512).T) <= tol


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", tuple(BLOCKS), ids=lambda q: q.name)
def test_vnni_kernel_is_the_matmul_with_int8_activations(qtype):
    """The kernel computes W @ x_q exactly up to float rounding, x_q being llama.cpp's int8
    activations for the type (the K-types' composite scales d·sc made in float32, as llama.cpp)."""
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, 64, 1024, rng)
    x = torch.from_numpy(rng.standard_normal((5, 1024), dtype=np.float32))
    w = reference(raw, qtype, 64, 1024)
    y = repack(raw, qtype, (64, 1024), backend="vnni")(x)
    tol = 1e-5
    assert rel_err(y, q8_activations(x, qtype) @ w.T) <= tol
    assert rel_err(y, x.double().numpy() @ w.T) <= 1e-2  # and the quantization error itself is small


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
def test_vnni_pads_columns_that_are_not_a_multiple_of_64():
    rng = np.random.default_rng(4)
    raw = random_blocks(Q.Q8_0, 16, 96, rng)  # 96 = 3 blocks of 32
    x = torch.from_numpy(rng.standard_normal((2, 96), dtype=np.float32))
    ref = q8_activations(x) @ reference(raw, Q.Q8_0, 16, 96).T
    assert rel_err(repack(raw, Q.Q8_0, (16, 96), backend="vnni")(x), ref) <= 1e-5


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", tuple(BLOCKS), ids=lambda q: q.name)
def test_row_blocks_take_any_row_count(qtype):
    """The row-interleaved layout pads rows to blocks of 16: 37 rows (two full blocks and a tail of
    5) give the same products as each row alone, through the one-weight, the many-weight, the
    dequantizing and the row-gathering (embedding) entry points."""
    rng = np.random.default_rng(7)
    k = 256
    raw = random_blocks(qtype, 37, k, rng)
    w = repack(raw, qtype, (37, k), backend="vnni")
    assert w.r16
    x = torch.from_numpy(rng.standard_normal((6, k), dtype=np.float32))
    ref = reference(raw, qtype, 37, k)
    tol = 1e-5
    assert rel_err(w(x), q8_activations(x, qtype) @ ref.T) <= tol
    assert rel_err(kernels.dequant_f32(w)[:, :k], ref) <= tol
    rows = torch.tensor([36, 0, 17, 16])  # the embedding lookup: the tail block, both ends of a block
    assert rel_err(kernels.gather_rows(w, rows), ref[rows.numpy()]) <= tol
    with pytest.raises(IndexError):
        kernels.gather_rows(w, torch.tensor([37]))
    many = kernels.matvec_many([w, w], x[:2])  # row e of x against weight e
    assert rel_err(many, np.stack([q8_activations(x[e : e + 1], qtype)[0] @ ref.T for e in range(2)])) <= tol


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", sorted(kernels.R16_TYPES, key=int), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [37, 64])
def test_c_repack_writes_the_python_layout_byte_for_byte(qtype, rows):
    """lm_repack_r16 (C, from the file's blocks) and decode + _pack_r16 (torch, numpy) make the
    same bytes: codes, float16 scales and zeros, padding rows; random blocks hit every bit pattern."""
    raw = random_blocks(qtype, rows, 512, np.random.default_rng(int(qtype) + rows))
    ours = kernels._repack_r16_native(raw, qtype, rows, 512, kscales=False)  # (the K-types' own scales: see below)
    ref = kernels._pack_vnni(decode(raw, qtype, (rows, 512)), rows, 512)
    assert ours is not None and ref.r16
    assert (ours.offset, ours.group, ours.nibble, ours.bits, ours.r16) == (
        ref.offset,
        ref.group,
        ref.nibble,
        ref.bits,
        ref.r16,
    )
    assert set(ours.tensors) == set(ref.tensors)
    for name, t in ref.tensors.items():
        assert ours.tensors[name].dtype == t.dtype and ours.tensors[name].shape == t.shape, name
        assert torch.equal(ours.tensors[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("gate_rows", [32, 37])
def test_fused_rows_repack_each_part_in_place_as_the_joined_copy(qtype, gate_rows):
    """fuse_rows repacks gate and up each from its own place into its share of one layout
    (_repack_r16_parts): the same bytes as repacking a joined copy of their rows. A first part that
    is not a whole number of 16-row blocks cannot start the next one's blocks: the joined copy then."""
    rng = np.random.default_rng(int(qtype) + gate_rows)
    gate, up = random_blocks(qtype, gate_rows, 512, rng), random_blocks(qtype, 21, 512, rng)
    joined = kernels.repack(np.concatenate([gate, up]), qtype, (gate_rows + 21, 512))
    parts = kernels._repack_r16_parts([(gate, gate_rows), (up, 21)], qtype, 512)
    assert (parts is None) == (gate_rows % 16 != 0)
    fused = fuse_rows([(gate, qtype, (gate_rows, 512)), (up, qtype, (21, 512))])
    assert fused.act_block == joined.act_block  # the activations' rounding as llama.cpp pairs the type
    for got in [fused] + ([parts] if parts is not None else []):
        assert got.backend == "vnni" and got.n == gate_rows + 21
        assert set(got.tensors) == set(joined.tensors)
        for name, t in joined.tensors.items():
            assert got.tensors[name].shape == t.shape, name
            assert torch.equal(got.tensors[name].view(torch.uint8), t.view(torch.uint8)), name


def test_fused_rows_equal_separate_matmuls():
    rng = np.random.default_rng(5)
    gate, up = random_blocks(Q.Q4_K, 32, 256, rng), random_blocks(Q.Q4_K, 32, 256, rng)
    x = torch.from_numpy(rng.standard_normal((3, 256), dtype=np.float32))
    fused = fuse_rows([(gate, Q.Q4_K, (32, 256)), (up, Q.Q4_K, (32, 256))])
    sep = torch.cat([repack(gate, Q.Q4_K, (32, 256))(x), repack(up, Q.Q4_K, (32, 256))(x)], dim=-1)
    torch.testing.assert_close(fused(x), sep, rtol=1e-5, atol=1e-5)
    mixed = fuse_rows([(gate, Q.Q4_K, (32, 256)), (random_blocks(Q.Q6_K, 32, 256, rng), Q.Q6_K, (32, 256))])
    assert mixed.backend == "bf16" and mixed.n == 64


def test_default_backend_per_type():
    cpu = torch.device("cpu")
    assert kernels.choose_backend(Q.F32, cpu) == "f32"
    assert kernels.choose_backend(Q.F16, cpu) == "bf16"
    has_ggml = ggml() is not None
    fast = "vnni" if kernels.native_lib() is not None else "ggml" if has_ggml else "int4"
    assert kernels.choose_backend(Q.Q4_K, cpu) == (
        fast if Q.Q4_K in kernels.VNNI_PREFERRED or fast != "vnni" else "ggml"
    )
    if has_ggml:  # types the VNNI kernel has no layout for, on any CPU
        assert kernels.backend_reason(Q.IQ4_XS, cpu) == ("ggml", "no vnni kernel for this type")
        with policy.override(kernel="ggml"):  # forced: every quantized type
            assert {kernels.choose_backend(q, cpu) for q in (Q.Q4_0, Q.Q4_K, Q.Q6_K, Q.Q8_0)} == {"ggml"}
        with policy.override(kernel="torch"):
            assert kernels.backend_reason(Q.Q4_0, cpu) == ("int4", "LOCALMOE_KERNEL=torch")
            assert kernels.choose_backend(Q.IQ4_XS, cpu) == "bf16"
    cuda = torch.device("cuda")
    for qtype in (Q.F32, Q.F16):  # off the CPU: float types as the file's bytes, through torch
        assert kernels.choose_backend(qtype, cuda) == "gguf"
    try:  # block types: the Triton kernels where Triton is installed, else dequantize per call
        import triton  # noqa: F401

        gpu = "triton"
    except ImportError:
        gpu = "gguf"
    for qtype in (Q.Q4_K, Q.Q6_K):
        assert kernels.choose_backend(qtype, cuda) == gpu


def test_failed_kernel_build_reports_the_compiler_message(tmp_path, monkeypatch):
    """A compiler error is kept and reported in one line (not a silent fallback), and a build goes
    through a temporary file in the cache directory itself (no cross-device rename)."""
    from localmoe.compute import cbuild

    monkeypatch.setenv("LOCALMOE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "csrc"
    bad.mkdir()
    (bad / "broken.c").write_text("int f(void) { return undeclared_name; }\n")
    monkeypatch.setattr(cbuild, "CSRC", str(bad))
    with pytest.raises(cbuild.BuildError) as err:
        cbuild.build("broken.c", "broken", ["-O1"])
    assert "broken.c" in str(err.value) and "undeclared_name" in str(err.value) and "\n" not in str(err.value)
    assert "error" in err.value.stderr
    assert os.listdir(tmp_path / "cache") == [
        "broken-build.log"
    ]  # the temporary output was removed, the compiler's output kept
    assert "undeclared_name" in (tmp_path / "cache" / "broken-build.log").read_text()
    os.unlink(tmp_path / "cache" / "broken-build.log")
    (bad / "ok.c").write_text("int f(void) { return 1; }\n")
    so = cbuild.build("ok.c", "ok", ["-O1"])
    assert os.path.dirname(so) == str(tmp_path / "cache") and os.listdir(tmp_path / "cache") == [os.path.basename(so)]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cbuild.BuildError, match="no C compiler"):
        cbuild.build("broken.c", "broken2", ["-O1"])


def test_a_shared_header_change_rebuilds_the_library(tmp_path, monkeypatch):
    """The cache key covers the csrc/ headers a source includes (csrc/common.h for vnni.c and
    ggml_driver.c): the same files reuse the library, a changed header builds a new one."""
    from localmoe.compute import cbuild

    monkeypatch.setenv("LOCALMOE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "lib.c").write_text('#include "shared.h"\nint f(void) { return g(); }\n')
    (src / "shared.h").write_text('#include "inner.h"\nstatic inline int g(void) { return h() + 1; }\n')
    (src / "inner.h").write_text("static inline int h(void) { return 1; }\n")
    monkeypatch.setattr(cbuild, "CSRC", str(src))
    first = cbuild.build("lib.c", "lib", ["-O1"])
    assert cbuild.build("lib.c", "lib", ["-O1"]) == first
    (src / "inner.h").write_text("static inline int h(void) { return 2; }\n")  # a header of a header
    second = cbuild.build("lib.c", "lib", ["-O1"])
    assert second != first and ctypes.CDLL(second).f() == 3 and ctypes.CDLL(first).f() == 2


def test_kv_cache_halves_converted_by_hand_are_torchs(tmp_path, monkeypatch):
    """common.h converts the KV cache's halves by hand where the compiler has no _Float16 (this one
    has: the kernels use it, so the hand conversion is built here on its own, LOCALMOE_KV_BITS):
    every one of the 65536 halves to float, and floats of every magnitude to half, rounded to
    nearest even, bit for bit as torch does (NaNs: a NaN)."""
    from localmoe.compute import cbuild

    monkeypatch.setenv("LOCALMOE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "common.h").write_text(open(cbuild.source_path("common.h")).read())
    (src / "kv.c").write_text(
        '#define LOCALMOE_KV_BITS\n#include "common.h"\n'
        "void to_float(const kv_t *h, float *f, int n) { for (int i = 0; i < n; i++) f[i] = kv_float(h[i]); }\n"
        "void to_half(const float *f, kv_t *h, int n) { for (int i = 0; i < n; i++) h[i] = kv_half(f[i]); }\n"
    )
    monkeypatch.setattr(cbuild, "CSRC", str(src))
    lib = cbuild.load("kv.c", "kv", ["-O2"])
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    floats = torch.empty(halves.numel(), dtype=torch.float32)
    lib.to_float(ctypes.c_void_p(halves.data_ptr()), ctypes.c_void_p(floats.data_ptr()), halves.numel())
    nan = halves.isnan()
    assert torch.equal(floats[~nan].view(torch.int32), halves[~nan].float().view(torch.int32))
    assert floats[nan].isnan().all()

    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    sign = torch.where(torch.rand(1 << 16, generator=g) < 0.5, -1.0, 1.0)
    near = (2.0 ** (torch.rand(1 << 16, generator=g) * 50 - 32)) * sign  # 2^-32 .. 2^18
    edges = [0.0, -0.0, 65504.0, 65519.0, 65520.0, 70000.0, float("inf"), -float("inf"), 2**-14, 2**-25]
    edges = torch.tensor(edges + [2**-24 * 0.5, 2**-24 * 1.5, 1 + 2**-11, 1 + 3 * 2**-11])  # + ties
    x = torch.cat([bits.view(torch.float32), near, edges, -edges])
    got = torch.empty(x.numel(), dtype=torch.float16)
    lib.to_half(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(got.data_ptr()), x.numel())
    want, nan = x.half(), x.isnan()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)) and got[nan].isnan().all()


def test_kernel_build_failure_is_visible_in_info(monkeypatch):
    """kernel_status / kernel_warnings (what `info` and `run --verbose` print) carry a build failure."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(
        kernels, "_lib_error", "kernel build failed: cc failed on vnni.c: error: unknown type name '__m512i'"
    )
    assert kernels.kernel_status()["vnni"].startswith("kernel build failed")
    assert any("__m512i" in w for w in kernels.kernel_warnings())


def test_model_runs_on_the_torch_fallback_kernels(make_model, tmp_path):
    """LOCALMOE_KERNEL=torch (no C kernel: int4 / bf16 layouts) gives the same logits, to bf16 rounding."""
    import subprocess
    import sys

    import localmoe

    path = make_model("qwen3moe", "Q4_K_M")
    ids = list(range(10, 42))
    out = tmp_path / "fallback.npy"
    code = (
        f"import numpy, localmoe; rt = localmoe.load({path!r}, device='cpu'); "
        f"numpy.save({str(out)!r}, rt.logits({ids!r}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "LOCALMOE_KERNEL": "torch"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    with localmoe.load(path, device="cpu") as rt:
        ours = rt.logits(ids)
        backends = {w.backend for lw in rt.model.layers for w in lw.wqkv}
    assert backends <= {"vnni", "f32"} if kernels.native_lib() is not None else True
    fallback = np.load(out)
    assert np.linalg.norm(ours - fallback) / np.linalg.norm(ours) <= 2e-2
    assert (ours.argmax(-1) == fallback.argmax(-1)).mean() >= 0.9


HELPERS = [h for h, ok in (("vnni", kernels.native_lib() is not None), ("portable", ggml() is not None)) if ok]


@pytest.mark.skipif(not HELPERS, reason="neither the AVX-512 kernel nor the ggml driver is available")
@pytest.mark.parametrize("helpers", HELPERS)
def test_fused_decode_ops_equal_their_torch_definitions(helpers, monkeypatch):
    """The C helpers of the decode path (RMS norm, q/k norm + RoPE, router, attention over the KV
    cache, SwiGLU block) compute what their torch definitions do: the AVX-512 ones (vnni.c) and the
    portable ones of the ggml driver, which CPUs without AVX-512 run."""
    import torch.nn.functional as F

    if helpers == "portable":
        monkeypatch.setattr(kernels, "native_lib", lambda: None)

    from localmoe.compute.experts import swiglu_expert

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 256, generator=g), torch.randn(256, generator=g)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (256,), w, 1e-6), rtol=1e-5, atol=1e-5)

    # per-head norm + RoPE, both pair layouts, on q (4 heads) and k (2 heads) at the start of each row
    T, H, Hkv, d, n_rot = 3, 4, 2, 64, 48
    qn, kn = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    theta = torch.arange(5, 5 + T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(n_rot // 2, dtype=torch.float64) * 2 / n_rot
    )
    cos, sin = theta.cos().float(), theta.sin().float()
    for neox in (True, False):
        qkv = torch.randn(T, (H + 2 * Hkv) * d, generator=g)
        heads = qkv[:, : (H + Hkv) * d].reshape(T, H + Hkv, d)
        normed = torch.cat([F.rms_norm(heads[:, :H], (d,), qn, 1e-6), F.rms_norm(heads[:, H:], (d,), kn, 1e-6)], dim=1)
        rot, rest = normed[..., :n_rot], normed[..., n_rot:]
        c, s = cos[:, None, :], sin[:, None, :]
        if neox:
            x0, x1 = rot[..., : n_rot // 2], rot[..., n_rot // 2 :]
            rot = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
        else:
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
        want = torch.cat([torch.cat([rot, rest], dim=-1).flatten(1), qkv[:, (H + Hkv) * d :]], dim=-1)
        assert kernels.qk_norm_rope(qkv, H + Hkv, H, d, qn, kn, 1e-6, n_rot, cos, sin, neox)
        torch.testing.assert_close(qkv, want, rtol=1e-5, atol=1e-5)

    # router: softmax, top-k, renormalised and scaled
    h, router = torch.randn(5, 64, generator=g), torch.randn(16, 64, generator=g)
    for norm, scale in ((True, 0.0), (False, 2.5)):
        ids, wts = kernels.route(h, router, 4, norm, scale)
        ref_w, ref_i = (h @ router.T).softmax(-1).topk(4, dim=-1)
        if norm:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        ref_w = ref_w * (scale if scale not in (0.0, 1.0) else 1.0)
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(wts, ref_w, rtol=1e-5, atol=1e-6)

    # decode attention: appends the token's K/V at `pos` to the half-precision cache, then
    # softmax(scale q·Kᵀ) V per query head (GQA) over the cached halves
    assert kernels.KV_DTYPE == torch.float16
    # heads per KV head 4, 8, 16 (two blocks of 8) and 6 (blocks of 3: no unrolled case); dv ≠ d; head
    # sizes that are not multiples of 16; a long cache
    shapes = ((8, 2, 64, 48, 40, 29), (16, 2, 64, 48, 40, 29), (32, 2, 128, 128, 300, 257), (6, 1, 72, 40, 50, 33))
    for H, Hkv, d, dv, cap, pos in shapes + ((4, 1, 128, 128, 300, 257),):
        kc = torch.randn(Hkv, cap, d, generator=g).half()
        vc = torch.randn(Hkv, cap, dv, generator=g).half()
        qkv = torch.randn(1, (H + Hkv) * d + Hkv * dv, generator=g) * 4
        k_want, v_want = kc.clone(), vc.clone()
        k_want[:, pos] = qkv[0, H * d : (H + Hkv) * d].view(Hkv, d)  # (the assignment rounds as torch does)
        v_want[:, pos] = qkv[0, (H + Hkv) * d :].view(Hkv, dv)
        out = kernels.attn_decode(qkv, kc, vc, pos, H, Hkv, d, dv, 0.125)
        assert out is not None and torch.equal(kc, k_want) and torch.equal(vc, v_want)
        q = qkv[0, : H * d].view(H, 1, d)
        keys, vals = (
            k_want[:, : pos + 1].float().repeat_interleave(H // Hkv, 0),
            v_want[:, : pos + 1].float().repeat_interleave(H // Hkv, 0),
        )
        want = ((q @ keys.transpose(1, 2)) * 0.125).softmax(-1) @ vals  # [H, 1, dv]
        torch.testing.assert_close(out.view(H, dv), want[:, 0], rtol=1e-5, atol=1e-5)
    # a float32 cache is not the kernel's: the caller runs torch's attention
    assert kernels.attn_decode(qkv, kc.float(), vc.float(), pos, H, Hkv, d, dv, 0.125) is None
    # the append rounds each float to the nearest half (ties to even) as torch's .half(): every
    # magnitude from below float16's subnormals to beyond its range, ties, signed zeros, infinities
    mag = torch.rand(4096, generator=g) * 50 - 32  # 2^-32 .. 2^18
    sign = torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0)
    vals = (2.0**mag) * (1 + torch.rand(4096, generator=g)) * sign
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-24 * 2.5, 2**-25, 65504.0, 65519.0, 65520.0])
    special = torch.tensor([0.0, -0.0, 70000.0, -1e30, float("inf"), float("-inf"), 6.1e-5, 5.9e-8])
    row = torch.cat([vals, ties, -ties, special]).float()
    D = row.numel()  # one head of D values: its key and value rows are `row`
    kc, vc = torch.zeros(1, 1, D, dtype=torch.float16), torch.zeros(1, 1, D, dtype=torch.float16)
    kernels.attn_decode(torch.cat([row, row, row])[None], kc, vc, 0, 1, 1, D, D, 0.125)
    want = row.half()
    assert torch.equal(kc[0, 0].view(torch.int16), want.view(torch.int16))  # bit for bit: the zeros' signs too
    assert torch.equal(vc[0, 0].view(torch.int16), want.view(torch.int16))

    # the SwiGLU block of k experts for one token: the weighted sum of the experts one by one
    experts = random_ffns(3, Q.Q4_K, Q.Q8_0, 128, 256, np.random.default_rng(9))
    x1 = torch.randn(1, 256, generator=g)
    coef = [0.5, 0.3, 0.2]
    fused = kernels.swiglu_decode([e.gate_up for e in experts], [e.down for e in experts], x1, coef)
    assert fused is not None
    loop = sum(c * swiglu_expert(e, x1) for c, e in zip(coef, experts))
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HELPERS, reason="neither the AVX-512 kernel nor the ggml driver is available")
@pytest.mark.parametrize("helpers", HELPERS)
def test_decode_attention_window_and_sinks_equal_attend_explicit(helpers, monkeypatch):
    """The C decode attention with a sliding window and per-head sinks (gpt-oss, Gemma 4) computes
    what layers/attention.py's attend_explicit (llama.cpp's soft_max_ext) does over the same halves:
    windows shorter than the context, of one position, of exactly and beyond the context; sinks
    random, −inf (no mass), and one that takes ~88% of its head's mass. Only the window's rows are
    read: every other row of the cache the kernel sees is NaN, which would reach the output."""
    from localmoe.layers.attention import attend_explicit

    if helpers == "portable":
        monkeypatch.setattr(kernels, "native_lib", lambda: None)
    g = torch.Generator().manual_seed(1)
    # heads per KV head 4, 8, 16, 6 and 1; dv ≠ d; head sizes that are not multiples of 16; a long cache
    shapes = ((8, 2, 64, 48, 40, 29), (16, 2, 64, 48, 40, 29), (32, 2, 128, 128, 300, 257), (6, 1, 72, 40, 50, 33))
    for H, Hkv, d, dv, cap, pos in shapes + ((4, 4, 64, 64, 20, 11),):
        group = H // Hkv
        kc = torch.randn(Hkv, cap, d, generator=g).half()
        vc = torch.randn(Hkv, cap, dv, generator=g).half()
        qkv = torch.randn(1, (H + Hkv) * d + Hkv * dv, generator=g) * 4
        k_want, v_want = kc.clone(), vc.clone()  # the cache after the append, every row clean
        k_want[:, pos] = qkv[0, H * d : (H + Hkv) * d].view(Hkv, d)
        v_want[:, pos] = qkv[0, (H + Hkv) * d :].view(Hkv, dv)
        qh = qkv[0, : H * d].view(Hkv, group, d)  # attend_explicit's rows g·T + t, T = 1
        keys, vals = k_want[:, : pos + 1].float(), v_want[:, : pos + 1].float()
        for n_swa in (0, 1, 2, 7, pos, pos + 1, pos + 40):
            lo = max(0, pos + 1 - n_swa) if n_swa > 0 else 0
            for kind in ("none", "random", "large"):
                sinks = None
                if kind != "none":
                    sinks = torch.randn(H, generator=g) * 2
                    sinks[-1] = float("-inf")
                if kind == "large":  # head 0's sink: the logsumexp of its visible logits + 2, e²/(1 + e²) of its mass
                    sinks[0] = torch.logsumexp((keys[0, lo:] @ qh[0, 0]) * 0.125, -1) + 2
                kc_run, vc_run = kc.clone(), vc.clone()
                for c in (kc_run, vc_run):  # rows outside lo..pos: NaN, so a read of any of them shows
                    c[:, :lo] = float("nan")
                    c[:, pos + 1 :] = float("nan")
                out = kernels.attn_decode(qkv, kc_run, vc_run, pos, H, Hkv, d, dv, 0.125, n_swa=n_swa, sinks=sinks)
                assert out is not None
                assert torch.equal(kc_run[:, pos], k_want[:, pos]) and torch.equal(vc_run[:, pos], v_want[:, pos])
                want = attend_explicit(qh, keys, vals, pos, 1, 0.125, sinks, n_swa)  # [Hkv, group, dv]
                torch.testing.assert_close(out.view(H, dv), want.reshape(H, dv), rtol=1e-5, atol=1e-5)
                if kind == "large":  # the sink took its mass: head 0's output ~12% of its sink-free one
                    free = attend_explicit(qh, keys, vals, pos, 1, 0.125, None, n_swa)[0, 0]
                    torch.testing.assert_close(out[0, :dv], free * (1 / (1 + np.e**2)), rtol=1e-4, atol=1e-5)
    # sinks the kernel cannot read as float32 [H]: the caller runs torch's attention
    for bad in (torch.zeros(H, dtype=torch.float64), torch.zeros(H + 1), torch.zeros(2 * H)[::2]):
        assert kernels.attn_decode(qkv, kc.clone(), vc.clone(), pos, H, Hkv, d, dv, 0.125, sinks=bad) is None


def test_torch_fallback_runs_a_model_whose_head_rows_are_not_a_multiple_of_16(tmp_path):
    """LOCALMOE_KERNEL=torch on a Q4_0 file with a 307-row output head (it crashed in torch's int4
    packing: 'expect N to be dividable by 16'): loads and gives the default path's logits."""
    import subprocess
    import sys

    import localmoe
    from localmoe.bench.synth import SynthConfig, write_model

    path = str(tmp_path / "odd-head.gguf")
    write_model(path, SynthConfig(weight_type="Q4_0", n_vocab=307))
    ids = list(range(10, 30))
    out = tmp_path / "logits.npy"
    code = (
        f"import numpy, localmoe; rt = localmoe.load({path!r}, device='cpu'); "
        f"assert rt.model.output.backend == 'int4'; numpy.save({str(out)!r}, rt.logits({ids!r}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "LOCALMOE_KERNEL": "torch"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with localmoe.load(path, device="cpu") as rt:
        ours = rt.logits(ids)
    fallback = np.load(out)
    assert fallback.shape == (20, 307)
    assert np.linalg.norm(ours - fallback) / np.linalg.norm(ours) <= 2e-2


@pytest.mark.skipif(kernels.native_lib() is None or ggml() is None, reason="needs the VNNI C kernel and ggml")
@pytest.mark.parametrize("qtype", tuple(BLOCKS), ids=lambda q: q.name)
def test_vnni_products_are_llama_cpps(qtype, monkeypatch):
    """The VNNI kernel rounds activations as llama.cpp pairs them with the type (Q8_0 per 32 with a
    float16 scale; Q8_K per 256 for the K-types) and keeps the K-types' own sub-scales, so its
    products are ggml's own to float rounding (Q4_1/Q5_1: llama.cpp's Q8_1 also rounds the block
    sum, ≤ 2e-4). Rounded per 32 instead, a K-type is ~1e-2 away."""
    rng = np.random.default_rng(11)
    raw = random_blocks(qtype, 64, 1024, rng)
    x = torch.from_numpy(rng.standard_normal((3, 1024), dtype=np.float32))
    theirs = repack(raw, qtype, (64, 1024), backend="ggml")(x).double().numpy()
    ours = repack(raw, qtype, (64, 1024), backend="vnni")(x)
    k_type = qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K)
    assert rel_err(ours, theirs) <= (2e-4 if qtype in (Q.Q4_1, Q.Q5_1) else 1e-6)
    if k_type:
        monkeypatch.setattr(kernels, "ACT_BLOCK", {})
        assert rel_err(repack(raw, qtype, (64, 1024), backend="vnni")(x), theirs) > 3e-3


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("qtype", (Q.Q4_K, Q.Q5_K, Q.Q6_K), ids=lambda q: q.name)
def test_k_types_keep_their_own_scales_at_the_files_size(qtype):
    """The C repack keeps a K-type's sub-scales (a byte per group) and d/dmin (float16 per 256-block):
    the repacked weight is within 3% of the file's blocks (Q4_K/Q5_K: a byte for each 6-bit sub-scale
    and min; the float16-per-group layout was ~10% larger), and its products equal the float16-scale
    layout's up to that layout's rounding."""
    rows, k = 64, 1024
    raw = random_blocks(qtype, rows, k, np.random.default_rng(21))
    own = kernels._repack_r16_native(raw, qtype, rows, k)
    f16 = kernels._repack_r16_native(raw, qtype, rows, k, kscales=False)
    assert own.kmode and not f16.kmode
    assert own.nbytes <= 1.03 * raw.nbytes and own.nbytes < f16.nbytes
    x = torch.from_numpy(np.random.default_rng(22).standard_normal((3, k), dtype=np.float32))
    assert rel_err(own(x), f16(x).double().numpy()) <= 1e-3
    assert rel_err(kernels.dequant_f32(own)[:, :k], reference(raw, qtype, rows, k)) <= 1e-6


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
def test_swiglu_decode_silu_where_its_exponential_overflows():
    """The decode SiLU (vectorised e^x in vnni.c) at gate values of ±100s, where e^−g overflows to
    inf or underflows below float32: silu's limits, g and −0, as torch computes them."""
    from localmoe.compute.experts import swiglu_expert

    experts = random_ffns(2, Q.Q8_0, Q.Q8_0, 64, 256, np.random.default_rng(11))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    gates = experts[0].gate_up(x)[0, :64]
    x = x * (400.0 / gates.abs().max())  # the largest gate value ≈ ±400
    gates = experts[0].gate_up(x)[0, :64]
    assert gates.max() > 90 and gates.min() < -90  # e^−g beyond float32 both ways
    coef = [0.6, 0.4]
    fused = kernels.swiglu_decode([e.gate_up for e in experts], [e.down for e in experts], x, coef)
    assert fused is not None and torch.isfinite(fused).all()
    loop = sum(c * swiglu_expert(e, x) for c, e in zip(coef, experts))
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4 * float(loop.abs().max()))


@pytest.mark.skipif(kernels.native_lib() is None, reason="no AVX-512 VNNI C kernel on this machine")
@pytest.mark.parametrize("row_blocks", [True, False], ids=["r16", "rows"])
@pytest.mark.parametrize(
    "gate_up,down,n_ff,d",
    [(Q.Q4_0, Q.Q4_0, 128, 256), (Q.Q8_0, Q.Q8_0, 96, 96), (Q.Q5_0, Q.Q4_1, 96, 160), (Q.Q4_K, Q.Q6_K, 256, 512)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_swiglu_prefill_is_the_per_expert_loop(gate_up, down, n_ff, d, row_blocks):
    """A prompt's routed experts in one C call (lm_swiglu_prefill) against run_plan's loop, one
    expert at a time (gather, gate|up, torch's SiLU, down, index_add_): uneven token counts — one
    token, none, more than the C call's 256-row pass, every token — and, with per-row layouts, row
    lengths the kernel pads. The matmuls are the same products and c · y is rounded before it is
    added, as index_add_ of y * w rounds it; only the SiLU (the C one's e^x against torch's) may
    round differently, and the down matmul's int8 activations absorb nearly all of that: measured,
    every output here equal to the bit (with a fused multiply-add in the sum, ~23% differed, by up to
    1e-7 of the largest output)."""
    from localmoe.compute.experts import swiglu_expert, swiglu_prompt

    rng = np.random.default_rng(31)
    T = 300
    counts = [1, 0, 20, T, 5, 2, 257]
    with policy.override(row_blocks=row_blocks):
        experts = random_ffns(len(counts), gate_up, down, n_ff, d, rng)
        x = torch.from_numpy(rng.standard_normal((T, d), dtype=np.float32))
        rows = [
            (torch.from_numpy(np.sort(rng.choice(T, n, replace=False))), torch.from_numpy(rng.random(n, np.float32)))
            for n in counts
        ]
        got = swiglu_prompt(experts, x, rows)
        loop = torch.zeros(T, d)
        for w, (tok, c) in zip(experts, rows):
            loop.index_add_(0, tok, swiglu_expert(w, x[tok]) * c.unsqueeze(1))
        assert got is not None
        scale = float(loop.abs().max())
        torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-6 * scale)
        assert float((got == loop).float().mean()) > 0.99  # (the same products, summed in the same order)
        # from policy().gemm_rows rows on an expert takes the dequantize + SGEMM path: the caller loops
        with policy.override(gemm_rows=T):
            assert swiglu_prompt(experts, x, rows) is None
        # experts of two shapes, or one that is not plain SwiGLU: the caller loops
        other = random_ffns(1, gate_up, down, 2 * n_ff, d, rng)
        assert swiglu_prompt(experts[:1] + other, x, rows[:2]) is None
        import dataclasses

        oai = dataclasses.replace(experts[0], act="swiglu_oai", fused_ok=False)
        assert swiglu_prompt([oai], x, rows[:1]) is None
