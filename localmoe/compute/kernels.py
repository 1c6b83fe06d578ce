"""Fast matmuls on quantized GGUF weights: in place from the file (ggml), or repacked once (vnni).

Every GGUF block type of gguf/blocks.py BLOCK_TYPES is, per group of G weights (G = 32, or 16 for Q6_K), an affine
code: w = scale · code + zero with an unsigned integer code of 4, 5, 6 or 8 bits (gguf/blocks.py
decodes it). For the CPU, `repack` decodes a tensor once into that form — codes (4 low bits packed two
per byte plus a plane of the 1-2 high bits for 5- and 6-bit types; bytes for 8-bit), float16 scales,
and float16 zeros (or, for the symmetric types, zero = −offset · scale with no zeros stored): about the
file's size — and `QLinear` multiplies activations by it with one of these backends:

    "ggml"     ggml's own CPU kernels (the libggml in llama-cpp-python; ggml_backend.py) on the
               rows as they are in the memory-mapped file: no repacking, no copy, every quant
               type (the IQ and MXFP4 types included), whatever SIMD this CPU has.
    "vnni"     our C kernel (AVX-512 VNNI, localmoe/compute/csrc/vnni.c, built on first use): the
               activations are quantized to int8 per 32 values as llama.cpp does (Q8_0 rounding)
               and each group's integer dot products are scaled in float. Reads only the packed
               bytes, stored row-interleaved in blocks of 16 rows ("r16": 16 rows' dot products
               per instruction, summed in int32 per group; policy row_blocks=False keeps one row at
               a time). With policy gemm_rows=N, from N rows on it dequantizes the weight once to
               float32 for an SGEMM instead.
    "int4"     torch._weight_int4pack_mm_for_cpu (bf16 activations), for 4-bit codes with G = 32.
    "bf16"     dequantized once to bfloat16 + F.linear (CPU fallback for 5-8 bit types, F16, BF16).
    "f32"      float32 + F.linear: F32 files, which must match llama.cpp to float rounding.
    "triton"   the GGUF bytes as they are in the file, on the GPU: Triton kernels decode the blocks
               in registers inside the matmul (compute/triton_gguf.py; GEMV for a few rows, GEMM
               beyond). A weight in GPU memory takes exactly its bytes in the file.
    "gguf"     the same bytes on any device; every call dequantizes them (exactly, to float32,
               with torch ops) and runs F.linear: the reference the Triton kernels are tested
               against, and the GPU path where Triton is missing (policy gpu_kernel="gguf" forces it).

`QLinear.backend` says which one a weight uses; `choose_backend` is the policy and
`backend_reason` says why (docs/speed.md has the measurements behind it). The compute policy
(compute/policy.py: LOCALMOE_KERNEL, or load(..., kernel=...)) can narrow the choice: kernel="ggml"
uses ggml for every quantized weight (the VNNI kernel is not used), "vnni" never uses ggml where
the VNNI kernel applies, "torch" uses neither C library.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from . import cbuild, cdecl
from .counters import to_device
from .ggml_backend import LgW, ggml, ggml_error, usable_ggml
from .policy import current as policy
from ..gguf.qtypes import GGML_TYPES, INT4_TYPES, QUANT_TYPES, TYPES
from ..gguf.blocks import BLOCK_SIZES, BLOCK_TYPES, FLOAT_TYPES, Affine, decode, dequantize, raw_bytes

Q = GGMLQuantizationType
# policy().gemm_rows: from this many rows, dequantize to float32 + SGEMM instead of the integer kernel.
# Off by default: on the machine we measure on the integer kernel is faster at every row count tried
# (128-1024 rows, docs/speed.md).
CHUNK = 64  # weights per SIMD step of the C kernel; rows are padded to a multiple of it (of 128 for 4-6 bit codes)
# Every block type is stored row-interleaved in blocks of 16 rows ("r16" in the C source), which
# the C kernel multiplies 2-3x faster per core than one row at a time;
# policy().row_blocks=False keeps the per-row layout (for comparisons).
R16_FORMATS = {(4, 32), (5, 32), (6, 16), (8, 32)}  # (bits per code, group size) with an r16 kernel


# -- the C kernel (localmoe/compute/csrc/vnni.c, built on first use by cbuild) -----------------------------
VNNI_SOURCE = "vnni.c"
VNNI_FLAGS = ["-O3", "-march=native", "-fopenmp"]
VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512_vnni", "f16c"}

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def native_lib() -> ctypes.CDLL | None:
    """The compiled C kernel, built once per source version and CPU; None when unavailable
    (not x86 with AVX-512 VNNI, no C compiler). `native_error()` says why. Whether the compute policy
    lets it run is `vnni_lib()`."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if not VNNI_CPU_FLAGS <= cbuild.cpu_flags():
            _lib_error = "this CPU lacks AVX-512 VNNI"
            return None
        try:
            lib = cbuild.load(VNNI_SOURCE, "vnni", VNNI_FLAGS)
        except cbuild.BuildError as exc:
            _lib_error = f"kernel build failed: {exc}"
            warnings.warn(
                f"localmoe: the AVX-512 VNNI kernel could not be built, using slower kernels: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        cdecl.declare(lib, cdecl.VNNI, "lm_")
        cdecl.declare(lib, cdecl.DECODE_HELPERS, "lm_")
        _lib = lib
        return lib


def native_error() -> str | None:
    """Why the VNNI kernel does not run: the compute policy's kernel mode, or why it is unavailable."""
    if not policy().allows_vnni:
        return f"disabled by LOCALMOE_KERNEL={policy().kernel}"
    native_lib()
    return _lib_error


def vnni_lib() -> ctypes.CDLL | None:
    """The VNNI kernel where it is built and the compute policy lets it run, else None."""
    return native_lib() if policy().allows_vnni else None


# -- QLinear: one repacked weight matrix ---------------------------------------------------------
@dataclass
class QLinear:
    """A weight matrix [N, K] in a layout with a fast kernel; `qlinear(x)` computes x @ W.T."""

    backend: str  # "ggml" | "vnni" | "int4" | "bf16" | "f32" | "triton" | "gguf"
    n: int
    k: int
    tensors: dict[str, torch.Tensor]
    offset: int = 0
    group: int = 32
    nibble: bool = False
    bits: int = 8  # bits per code ("vnni": 4-6 → nibbles + a high-bit plane, 8 → bytes)
    qtype: GGMLQuantizationType | None = None  # "gguf": the type of the raw bytes
    r16: bool = False  # "vnni": rows interleaved in blocks of 16 (R16_FORMATS)
    parts: tuple[
        tuple[GGMLQuantizationType, int], ...
    ] = ()  # "ggml": (type, rows) of tensors raw0, raw1, ... (rows concatenated)
    act_block: int = (
        32  # "vnni": activations share a scale per this many values, as llama.cpp pairs the type (ACT_BLOCK)
    )
    kmode: int = 0  # "vnni" r16 of a K-type: 0, or its own sub-scales kept (K_SCALES; tensors kd, kdmin hold d, dmin)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] float32 → [T, N] float32."""
        if self.backend == "f32":
            return F.linear(x, self.tensors["w"])
        if self.backend == "bf16":
            return F.linear(x.to(torch.bfloat16), self.tensors["w"]).float()
        if self.backend == "int4":
            t = self.tensors
            y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), t["w"], 32, t["sz"]).float()
            return y[:, : self.n] if y.shape[1] != self.n else y  # rows padded to INT4_ROWS
        if self.backend == "triton":
            return _triton_matmul(self, x.float())
        if self.backend == "gguf":
            return _gguf_matmul(self, x.float())
        if self.backend == "ggml":
            return _ggml_matmul(self, x)
        return _vnni_matmul(self, x)


# "triton": up to this many activation rows run the GEMV kernel (one pass over the weight per row), beyond it the GEMM
GEMV_ROWS = 8


def _triton_matmul(w: QLinear, x: torch.Tensor) -> torch.Tensor:
    from . import triton_gguf as tg

    raw = w.tensors["raw"]
    if x.shape[0] <= GEMV_ROWS:
        return tg.gemv(raw, w.qtype.name, w.n, w.k, x)
    return tg.gemm(raw, w.qtype.name, w.n, w.k, x)


def gpu_kernel(qtype: GGMLQuantizationType) -> str:
    """The GPU-side backend for block type `qtype`: "triton" when Triton is importable and has a
    kernel for it, else "gguf" (dequantize + F.linear). The policy's gpu_kernel="gguf" forces the latter."""
    if policy().gpu_kernel == "gguf":
        return "gguf"
    try:
        from . import triton_gguf as tg
    except ImportError:
        return "gguf"
    return "triton" if tg.supports(qtype.name) else "gguf"


# From policy().ggml_graph_rows tokens (8) a "ggml" matmul goes through ggml's own graph (ggml_mul_mat:
# its tiled loops, llamafile's kernels): at 2 threads on the Qwen3-30B-A3B expert shapes it is 1.1-1.4x
# the per-row driver at 8 tokens and 1.4-4.6x at 128; at 1-4 tokens they are level (docs/speed.md).


def _ggml_matmul(w: QLinear, x: torch.Tensor) -> torch.Tensor:
    g, threads = ggml(), torch.get_num_threads()
    if x.shape[0] >= policy().ggml_graph_rows and g.graph is not None:
        ys = [g.graph_matmul(w.tensors[f"raw{i}"], q, rows, w.k, x, threads) for i, (q, rows) in enumerate(w.parts)]
        if all(y is not None for y in ys):
            return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    return g.matmul(_ggml_segs(w), w.n, x, threads)


def _ggml_segs(w: QLinear) -> ctypes.Array:
    """The ggml driver's descriptors of a "ggml" weight's row segments (made once per weight)."""
    segs = w.__dict__.get("_segs")
    if segs is None:
        g = ggml()
        segs = (LgW * len(w.parts))(
            *(g.weight(w.tensors[f"raw{i}"], q, rows, w.k) for i, (q, rows) in enumerate(w.parts))
        )
        w.__dict__["_segs"] = segs
    return segs


def ggml_weight(raws: list[tuple[torch.Tensor, GGMLQuantizationType, int]], k: int) -> QLinear:
    """A "ggml" QLinear over row segments (raw uint8 [rows, row bytes] on the CPU, quant type, rows),
    computed in place: the tensors may be views of the memory-mapped file."""
    return QLinear(
        "ggml",
        sum(r for _, _, r in raws),
        k,
        {f"raw{i}": t for i, (t, _, _) in enumerate(raws)},
        parts=tuple((q, r) for _, q, r in raws),
    )


GGUF_CHUNK_WEIGHTS = 1 << 24  # "gguf" backend: weights dequantized at once (64 MB of float32 scratch)


def _gguf_matmul(w: QLinear, x: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W.T from the raw GGUF bytes, dequantized a slice of rows at a time so the scratch
    stays bounded (an output head of 150k × 2048 would need 1.2 GB at once)."""
    raw, rows = w.tensors["raw"], max(1, GGUF_CHUNK_WEIGHTS // w.k)
    if rows >= w.n:
        return F.linear(x, dequantize(raw, w.qtype, (w.n, w.k)))
    out = torch.empty(x.shape[0], w.n, dtype=torch.float32, device=x.device)
    for r0 in range(0, w.n, rows):
        r1 = min(r0 + rows, w.n)
        out[:, r0:r1] = F.linear(x, dequantize(raw[r0:r1], w.qtype, (r1 - r0, w.k)))
    return out


def _kp(w: QLinear) -> int:
    """A "vnni" weight's row length as stored: K padded to whole chunks (whole groups of 32 in r16)."""
    if w.r16:
        return -(-w.k // w.group) * w.group
    return w.tensors["codes"].shape[1] * (2 if w.nibble else 1)


def _high(w: QLinear) -> tuple[int | None, int]:
    """(pointer, bits per code above 4) of a weight's high-bit plane; (None, 0) for 4- and 8-bit codes."""
    if w.r16:  # the plane is inside each group's bytes
        return None, w.bits - 4 if 4 < w.bits <= 6 else 0
    high = w.tensors.get("high")
    return (high.data_ptr(), w.bits - 4) if high is not None else (None, 0)


def dequant_f32(w: QLinear) -> torch.Tensor:
    """A "vnni" weight as a float32 [N, K_padded] matrix (the C kernel's dequantizer)."""
    kp = _kp(w)
    out = torch.empty(w.n, kp, dtype=torch.float32)
    native_lib().lm_dequant_f32(
        kp,
        w.n,
        w.tensors["codes"].data_ptr(),
        int(w.nibble),
        w.tensors["scale"].data_ptr(),
        _ptr(w.tensors.get("zero")),
        w.offset,
        w.group,
        out.data_ptr(),
        torch.get_num_threads(),
        *_high(w),
        int(w.r16),
        *_kscales(w),
    )
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _kscales(w: QLinear) -> tuple[int | None, int | None, int]:
    """(kd, kdmin, kmode) of a "vnni" weight for the C calls."""
    return _ptr(w.tensors.get("kd")), _ptr(w.tensors.get("kdmin")), w.kmode


class _WeightDesc(ctypes.Structure):  # wdesc_t in the C source
    _fields_ = (
        [("codes", ctypes.c_void_p), ("high", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]
        + [(name, ctypes.c_int) for name in ("N", "K", "nibble", "offset", "G", "hbits", "r16", "ablock")]
        + [("kd", ctypes.c_void_p), ("kdmin", ctypes.c_void_p), ("kmode", ctypes.c_int)]
    )


def _desc(w: QLinear) -> _WeightDesc:
    d = w.__dict__.get("_desc")
    if d is None:
        t = w.tensors
        high, hbits = _high(w)
        kp = _kp(w)
        zero = t.get("zero")
        d = _WeightDesc(
            t["codes"].data_ptr(),
            high,
            t["scale"].data_ptr(),
            zero.data_ptr() if zero is not None else None,
            w.n,
            kp,
            int(w.nibble),
            w.offset,
            w.group,
            hbits,
            int(w.r16),
            w.act_block,
            *_kscales(w),
        )
        w.__dict__["_desc"] = d
    return d


def _batch(ws: list[QLinear], x: torch.Tensor | None) -> tuple[ctypes.Array, torch.Tensor | None, int] | None:
    """The C descriptors of weights the multi-weight kernels can take together — all "vnni", one
    shape, one padded row length — and x as float32 padded to it; None when they cannot."""
    w0 = ws[0]
    if any(w.backend != "vnni" or w.n != w0.n or w.k != w0.k for w in ws):
        return None
    kp = _kp(w0)
    if any(_kp(w) != kp for w in ws):
        return None
    if x is not None:
        x = x.float()
        if kp != w0.k:
            x = F.pad(x, (0, kp - w0.k))
        x = x.contiguous()
    return (_WeightDesc * len(ws))(*(_desc(w) for w in ws)), x, kp


def matvec_many(ws: list[QLinear], x: torch.Tensor) -> torch.Tensor | None:
    """One row per weight, all at once: x [1, K] (shared) or [E, K] (row e for ws[e]) → [E, N].
    None when the weights are not all C-kernel weights of one shape (the caller loops instead)."""
    batch = _batch(ws, x)
    if batch is None:
        return None
    descs, x, kp = batch
    w0 = ws[0]
    y = torch.empty(len(ws), w0.n, dtype=torch.float32)
    rc = native_lib().lm_qmatvec_multi(
        len(ws), descs, x.data_ptr(), 0 if x.shape[0] == 1 else kp, y.data_ptr(), w0.n, torch.get_num_threads()
    )
    if rc != 0:
        raise MemoryError("lm_qmatvec_multi could not allocate its scratch buffers")
    return y


def _vnni_matmul(w: QLinear, x: torch.Tensor) -> torch.Tensor:
    lib = native_lib()
    T = x.shape[0]
    kp = _kp(w)
    x = x.float()
    if kp != w.k:
        x = F.pad(x, (0, kp - w.k))
    if T >= policy().gemm_rows:  # many tokens: dequantize once (exactly), then an SGEMM
        return F.linear(x, dequant_f32(w))
    x = x.contiguous()
    y = torch.empty(T, w.n, dtype=torch.float32)
    if T == 0:
        return y
    zero = w.tensors.get("zero")
    rc = lib.lm_qmatmul(
        x.data_ptr(),
        T,
        kp,
        w.n,
        w.tensors["codes"].data_ptr(),
        int(w.nibble),
        w.tensors["scale"].data_ptr(),
        zero.data_ptr() if zero is not None else None,
        w.offset,
        w.group,
        y.data_ptr(),
        torch.get_num_threads(),
        *_high(w),
        int(w.r16),
        w.act_block,
        *_kscales(w),
    )
    if rc != 0:
        raise MemoryError("lm_qmatmul could not allocate its scratch buffers")
    return y


# Types where our VNNI kernel measured faster than ggml's kernels on the machine we measure on (AMD
# EPYC Zen 4, 2 threads, the Qwen3-30B-A3B shape; docs/speed.md; gguf/qtypes.py's `cpu` column):
# there the VNNI kernel is used when it is built. Every other quantized type goes to ggml where ggml
# computes it (a VNNI type with cpu="ggml" too: "measured faster than vnni").
VNNI_PREFERRED = frozenset(q for q, t in TYPES.items() if t.affine is not None and t.cpu == "vnni")


def kernel_mode() -> str:
    """The compute policy's CPU kernel mode: "auto" (default), "ggml", "vnni" or "torch"."""
    return policy().kernel


def backend_reason(qtype: GGMLQuantizationType, device: torch.device | str = "cpu") -> tuple[str, str]:
    """(backend, why) for a weight of `qtype` on `device`: the policy `choose_backend` applies, with
    the reason `localmoe info` and `run --verbose` print."""
    device = torch.device(device)
    if device.type != "cpu":
        return "gguf", f"GGUF bytes on {device.type}, dequantized per matmul"
    if qtype == Q.F32:
        return "f32", "float32 weights"
    if qtype in FLOAT_TYPES:
        return "bf16", "float weights"
    mode = kernel_mode()
    vnni_ok = qtype in BLOCK_TYPES and vnni_lib() is not None
    g = usable_ggml()
    ggml_ok = g is not None and g.computes(qtype)
    if mode == "ggml" and ggml_ok:
        return "ggml", "LOCALMOE_KERNEL=ggml"
    if vnni_ok and (qtype in VNNI_PREFERRED or not ggml_ok):
        return "vnni", "built" + (
            "; measured faster than ggml for this type" if ggml_ok else f"; ggml unavailable: {ggml_error()}"
        )
    if ggml_ok:
        if qtype not in BLOCK_TYPES:
            return "ggml", "no vnni kernel for this type"
        return "ggml", f"vnni {native_error()}" if vnni_lib() is None else "measured faster than vnni for this type"
    if mode == "torch":
        why = "LOCALMOE_KERNEL=torch"
    else:
        why = "; ".join(
            f"{name}: {err}"
            for name, err in (
                ("ggml", ggml_error() if qtype in _ggml_types() or g is None else "no kernel for this type"),
                ("vnni", native_error() if qtype in BLOCK_TYPES else "no kernel for this type"),
            )
            if err
        )
    if qtype in INT4_TYPES:
        return "int4", why
    return "bf16", why + "; dequantized once"


def _ggml_types() -> frozenset[GGMLQuantizationType]:
    return frozenset(GGML_TYPES)


def choose_backend(qtype: GGMLQuantizationType, device: torch.device, prefer: str | None = None) -> str:
    """The backend for a weight of `qtype` on `device` (see the module docstring and backend_reason)."""
    if device.type != "cpu":
        return "gguf" if qtype in FLOAT_TYPES else gpu_kernel(qtype)
    if qtype in FLOAT_TYPES:
        return backend_reason(qtype, device)[0]
    if prefer is not None:
        return prefer
    return backend_reason(qtype, device)[0]


def kernel_status() -> dict[str, str]:
    """Each C library's state on this machine, one line each: "built" or why it is not used."""
    g = usable_ggml()
    out = {"vnni": "built" if vnni_lib() is not None else native_error() or "unavailable"}
    out["ggml"] = (
        (
            f"loaded (llama-cpp-python {g.version}; many-token matmuls "
            + ("through ggml's graph" if g.graph is not None else f"per row: graph {g.graph_error}")
            + ")"
        )
        if g is not None
        else ggml_error() or "unavailable"
    )
    return out


def kernel_warnings() -> list[str]:
    """Failures the user should see: a C library that should work here but could not be built or loaded."""
    return [
        f"{name}: {msg}"
        for name, msg in kernel_status().items()
        if "failed" in msg or "layout" in msg or "could not" in msg
    ]


def backend_table(qtypes: list[GGMLQuantizationType] | None = None) -> list[dict[str, str]]:
    """The CPU backend of each quant type (all quantized types we read when None), with the reason."""
    types = qtypes if qtypes is not None else sorted(QUANT_TYPES, key=int)
    return [dict(zip(("qtype", "backend", "reason"), (q.name, *backend_reason(q, "cpu")))) for q in types]


def repack(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    device: torch.device | str = "cpu",
    backend: str | None = None,
    threads: int | None = None,
) -> QLinear:
    """Raw GGUF data of a [N, K] matrix → a QLinear with `backend` (None → choose_backend's pick).
    threads: for the C repack (None → torch's thread count; a load repacking experts side by side
    gives each 1)."""
    device = torch.device(device)
    N, K = shape
    backend = backend or choose_backend(qtype, device)
    if backend in ("gguf", "triton"):
        return QLinear(backend, N, K, {"raw": to_device(raw_bytes(raw, N), device)}, qtype=qtype)
    if backend in ("f32", "bf16"):
        dtype = torch.float32 if backend == "f32" else torch.bfloat16
        return QLinear(backend, N, K, {"w": dequantize(raw, qtype, shape).to(device=device, dtype=dtype)})
    if backend == "ggml":
        return ggml_weight([(raw_bytes(raw, N), qtype, N)], K)
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"backend {backend} needs a block-quantized type, not {qtype.name}")
    if backend == "vnni":
        packed = _repack_r16_parts([(raw, N)], qtype, K, threads=threads) or _pack_vnni(decode(raw, qtype, shape), N, K)
        packed.act_block = ACT_BLOCK.get(qtype, 32)
        return packed
    if backend == "int4":
        return _pack_int4(decode(raw, qtype, shape), N, K)
    raise ValueError(f"unknown backend '{backend}'")


# How many activation values share a scale when llama.cpp multiplies a weight of the type: its
# vec_dot_type, Q8_K (256) for the K-types, Q8_0 or Q8_1 (32) for the others (gguf/qtypes.py). The
# VNNI kernel rounds activations the same way, so its products are llama.cpp's (tests/test_kernels.py).
ACT_BLOCK = {q: t.act_block for q, t in TYPES.items() if t.act_block != 32}


RawMatrix = tuple[np.ndarray, GGMLQuantizationType, tuple[int, int]]  # (GGUF data, quant type, [rows, cols])


def fuse_rows(mats: list[RawMatrix], device: torch.device | str = "cpu", threads: int | None = None) -> QLinear:
    """Stack matrices with the same columns into one QLinear (one matmul for, e.g., gate and up).
    The same quant type: the raw rows are concatenated and repacked. Mixed types (no llama.cpp
    mix does this for gate/up; callers check): dequantized into one bfloat16 matrix."""
    cols = {shape[1] for _, _, shape in mats}
    if len(cols) != 1:
        raise ValueError("fused matrices must have the same number of columns")
    rows = sum(shape[0] for _, _, shape in mats)
    qtypes = {qtype for _, qtype, _ in mats}
    if torch.device(device).type == "cpu" and all(choose_backend(q, torch.device("cpu")) == "ggml" for q in qtypes):
        return ggml_weight(
            [(raw_bytes(data, shape[0]), qtype, shape[0]) for data, qtype, shape in mats], cols.pop()
        )  # in place: no copy
    if len(qtypes) == 1:
        qtype, K = qtypes.pop(), cols.pop()
        if choose_backend(qtype, torch.device(device)) == "vnni":  # (a CPU backend: never picked for a GPU)
            packed = _repack_r16_parts([(data, shape[0]) for data, _, shape in mats], qtype, K, threads=threads)
            if packed is not None:  # each matrix repacked from the file into its rows: no joined copy first
                packed.act_block = ACT_BLOCK.get(qtype, 32)
                return packed
        raw = torch.cat([raw_bytes(data, shape[0]) for data, _, shape in mats])
        return repack(raw, qtype, (rows, K), device, threads=threads)
    w = torch.cat([dequantize(*m) for m in mats])
    return QLinear("bf16", rows, cols.pop(), {"w": w.to(device=device, dtype=torch.bfloat16)})


# The K-types keep their own scales in the r16 layout (C repack): per group a byte (sc, and mn for the
# types with mins; Q6_K's sc signed) and per 256-block of a row the float16 d (and dmin), so the
# repacked weight is the file's size (a float16 scale and zero per group were ≈ 10% more bytes) and
# each group's scale d·sc is exact, as in llama.cpp (gguf/qtypes.py's kscale: the C source's K_UNSIGNED, K_SIGNED).
K_SCALES = {q: t.kscale for q, t in TYPES.items() if t.kscale}

# (bits, group, offset, has a zero) of each type's affine form (gguf/blocks.py decode; gguf/qtypes.py),
# which the C repacker writes straight from the blocks
R16_TYPES = {q: t.affine for q, t in TYPES.items() if t.affine is not None}


def _repack_r16_native(
    raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, kscales: bool = True
) -> QLinear | None:
    """The r16 layout made in C from the file's blocks, on all threads (lm_repack_r16): the same
    bytes as decode() + _pack_r16, without the torch and numpy passes (~0.3 ms instead of 10-20 ms
    for a Qwen3-30B-A3B expert). None where it does not apply (the Python path then runs)."""
    return _repack_r16_parts([(raw, N)], qtype, K, kscales)


def _repack_r16_parts(
    parts: list[tuple[np.ndarray | torch.Tensor, int]],
    qtype: GGMLQuantizationType,
    K: int,
    kscales: bool = True,
    threads: int | None = None,
) -> QLinear | None:
    """_repack_r16_native of matrices stacked by rows — parts: (raw data, rows) in order, e.g. an
    expert's gate then up — each repacked from where it lies (the memory-mapped file) straight into
    its share of one output: no copy of the file's bytes first. Every part but the last must have a
    whole number of 16-row blocks (its r16 blocks then start where the next part's begin); None
    where that or anything else does not apply."""
    lib = vnni_lib()
    if lib is None or not policy().row_blocks or qtype not in R16_TYPES:
        return None
    bits, G, offset, has_zero = R16_TYPES[qtype]
    per = BLOCK_SIZES[qtype][0]
    if K % per or (bits, G) not in R16_FORMATS or any(rows % 16 for _, rows in parts[:-1]):
        return None
    srcs = [(raw_bytes(raw, rows), rows) for raw, rows in parts]
    if any(src.device.type != "cpu" for src, _ in srcs):
        return None
    N = sum(rows for _, rows in parts)
    nb, ng, nsb = -(-N // 16), K // G, K // 256
    bpg = G // 8 * 64 + (64 if bits in (5, 6) else 0) if bits <= 6 else G // 4 * 64
    kmode = K_SCALES.get(qtype, 0) if kscales else 0
    per_group = torch.uint8 if kmode else torch.float16  # a K-type's sub-scale byte, or a float16 scale
    # each tensor's elements per 16-row block, so a part starting at block b writes from b · this on
    t = {"codes": torch.empty(nb * ng * bpg, dtype=torch.uint8), "scale": torch.empty(nb * ng * 16, dtype=per_group)}
    per_block = {"codes": ng * bpg, "scale": ng * 16, "zero": ng * 16, "kd": nsb * 16, "kdmin": nsb * 16}
    if has_zero:
        t["zero"] = torch.empty(nb * ng * 16, dtype=per_group)
    if kmode:
        t["kd"] = torch.empty(nb * nsb * 16, dtype=torch.float16)
        if has_zero:
            t["kdmin"] = torch.empty(nb * nsb * 16, dtype=torch.float16)
    block = 0
    for src, rows in srcs:
        src = src.contiguous()  # a view of the file's rows already is: no copy
        at = {name: tensor[block * per_block[name] :] for name, tensor in t.items()}
        rc = lib.lm_repack_r16(
            int(qtype),
            src.data_ptr(),
            rows,
            K,
            at["codes"].data_ptr(),
            at["scale"].data_ptr(),
            _ptr(at.get("zero")),
            threads or torch.get_num_threads(),
            kmode,
            _ptr(at.get("kd")),
            _ptr(at.get("kdmin")),
        )
        if rc != 0:
            return None
        block += rows // 16
    t["codes"] = t["codes"].view(nb, ng * bpg)
    return QLinear("vnni", N, K, t, offset=offset, group=G, nibble=bits <= 6, bits=bits, r16=True, kmode=kmode)


def _pack_vnni(a: Affine, N: int, K: int) -> QLinear:
    if policy().row_blocks and (a.bits, a.group) in R16_FORMATS and K % a.group == 0:
        return _pack_r16(a, N, K)
    nibble = a.bits <= 6  # 8-bit codes stay bytes
    kp = -(-K // (2 * CHUNK if nibble else CHUNK)) * (2 * CHUNK if nibble else CHUNK)
    codes, scale = a.codes.numpy(), a.scale.numpy()
    zero = a.zero.numpy() if a.zero is not None else None
    if kp != K:  # padding columns: code 0, scale 0, zero 0 → contribute nothing
        codes = np.pad(codes, ((0, 0), (0, kp - K)))
        pad_g = (kp - K) // a.group
        scale = np.pad(scale, ((0, 0), (0, pad_g)))
        zero = np.pad(zero, ((0, 0), (0, pad_g))) if zero is not None else None
    high = None
    if a.bits in (5, 6):  # the bits above the nibble, per 64-weight chunk (see high_bits in the C source)
        hb = a.bits - 4
        h = (codes >> 4).reshape(N, kp // 64, 8 // hb, 8 * hb)  # [N, chunk, L, j]: weight j + 8·hb·L
        shifts = (np.arange(8 // hb, dtype=np.uint8) * hb)[:, None]
        high = np.bitwise_or.reduce(h << shifts, axis=2).astype(np.uint8)  # [N, chunk, 8·hb]
        codes = codes & 0x0F
    if nibble:  # per 128 weights (two chunks): byte j = w[j] | w[j + 64] << 4
        c = codes.reshape(N, kp // 128, 2, 64)
        codes = c[:, :, 0] | (c[:, :, 1] << 4)
    t = {"codes": torch.from_numpy(np.ascontiguousarray(codes.reshape(N, -1))), "scale": _f16_tensor(scale)}
    if high is not None:
        t["high"] = torch.from_numpy(np.ascontiguousarray(high.reshape(N, -1)))
    if zero is not None:
        t["zero"] = _f16_tensor(zero)
    return QLinear("vnni", N, K, t, offset=a.offset, group=a.group, nibble=nibble, bits=a.bits)


def _pack_r16(a: Affine, N: int, K: int) -> QLinear:
    """The row-interleaved layout (the C source's "r16"): rows padded to blocks of 16 (code 0, scale
    0, zero 0: padding rows compute 0 and are never stored); per block and group of G, codes
    [step G/4, lane 16, 4] — 4-6 bit codes two steps per byte (step 2p low nibble, 2p + 1 high),
    then for 5 and 6 bits a 64-byte plane of the bits above the nibble (step s at bit hb·s)."""
    G, hb = a.group, max(0, a.bits - 4) if a.bits <= 6 else 0
    nb, ng = -(-N // 16), K // G
    codes, scale = a.codes.numpy(), a.scale.numpy()  # [N, K], [N, ng]
    zero = a.zero.numpy() if a.zero is not None else None
    if nb * 16 != N:
        pad = ((0, nb * 16 - N), (0, 0))
        codes, scale = np.pad(codes, pad), np.pad(scale, pad)
        zero = np.pad(zero, pad) if zero is not None else None
    c = (
        codes.reshape(nb, 16, ng, G // 4, 4).transpose(0, 2, 3, 1, 4).reshape(nb, ng, G // 4, 64)
    )  # [block, group, step, lane·4]
    if a.bits <= 6:
        low = c & 0x0F
        parts = [low[:, :, 0::2] | (low[:, :, 1::2] << 4)]  # [block, group, G/8, 64]
        if hb:
            shifts = (np.arange(G // 4, dtype=np.uint8) * hb)[None, None, :, None]
            parts.append(
                np.bitwise_or.reduce((c >> 4) << shifts, axis=2)[:, :, None].astype(np.uint8)
            )  # [block, group, 1, 64]
        c = np.concatenate(parts, axis=2)

    def per_block(v: np.ndarray) -> np.ndarray:  # [rows, groups] → [block, group, lane]
        return v.reshape(nb, 16, ng).transpose(0, 2, 1)

    t = {"codes": torch.from_numpy(np.ascontiguousarray(c.reshape(nb, -1))), "scale": _f16_tensor(per_block(scale))}
    if zero is not None:
        t["zero"] = _f16_tensor(per_block(zero))
    return QLinear("vnni", N, K, t, offset=a.offset, group=G, nibble=a.bits <= 6, bits=a.bits, r16=True)


def _f16_tensor(a: np.ndarray) -> torch.Tensor:
    """float32 [N, G] → a flat float16 tensor (the kernel's scales and zeros)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float16).reshape(-1))


def _pack_int4(a: Affine, N: int, K: int) -> QLinear:
    """torch's int4 layout: w = (code − 8) · scale + zero', group 32, bf16 scales and zeros. torch packs
    rows in multiples of 16 only ("expect N to be dividable by 16"): other row counts (an output head
    of 267 rows) are padded with zero rows (scale 0, zero 0: they compute 0), cut off after the matmul."""
    if a.bits > 4 or a.group != 32 or K % 32:
        raise ValueError("the int4 backend takes 4-bit codes in groups of 32")
    zero = a.zero if a.zero is not None else -a.offset * a.scale
    zero = zero + 8 * a.scale
    scale, codes = a.scale, a.codes
    n_pad = -(-N // INT4_ROWS) * INT4_ROWS
    if n_pad != N:
        pad = (0, 0, 0, n_pad - N)
        scale, zero, codes = F.pad(scale, pad), F.pad(zero, pad), F.pad(codes, pad)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/32, N_pad, 2]
    w = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return QLinear("int4", N, K, {"w": w, "sz": sz})


INT4_ROWS = 16  # torch's CPU int4 packing needs rows in multiples of 16


# -- small fused ops for the decode path (one C call instead of several torch ops) ---------------
def _helper(name: str):
    """The C helper `name` of the decode path: the AVX-512 one in the VNNI kernel (lm_NAME) when it
    is built, else the portable one in the ggml driver (lg_NAME, any CPU), else None (torch ops)."""
    lib = vnni_lib()  # (ggml mode: the portable ones, as a CPU without AVX-512 runs; torch mode: none)
    if lib is not None:
        return getattr(lib, f"lm_{name}")
    g = usable_ggml()
    return getattr(g.driver, f"lg_{name}") if g is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dimension: the C kernel for CPU float32
    tensors when it is built (per-op overhead dominates at decode), torch otherwise."""
    fn = _helper("rms_norm")
    if fn is None or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x, weight = x.contiguous(), weight.contiguous()  # held here: the C call reads their memory
    y = torch.empty_like(x)
    n = x.shape[-1]
    fn(x.data_ptr(), y.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, torch.get_num_threads())
    return y


def qk_norm_rope(
    qkv: torch.Tensor,
    n_heads: int,
    n_q: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    n_rot: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    neox: bool,
) -> bool:
    """In place on the first n_heads·head_dim columns of qkv [T, width] (queries, then keys): per-head
    RMS norm (when the weights are given) and RoPE with cos/sin [T, n_rot/2]. False, and nothing
    done, when the C kernel is not available or the tensors do not fit it."""
    fn = _helper("qk_norm_rope")
    tensors = [t for t in (qkv, cos, sin, q_norm, k_norm) if t is not None]
    if fn is None or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return False
    fn(
        qkv.data_ptr(),
        qkv.shape[0],
        qkv.shape[1],
        n_heads,
        n_q,
        head_dim,
        q_norm.data_ptr() if q_norm is not None else None,
        k_norm.data_ptr() if k_norm is not None else None,
        eps,
        n_rot,
        cos.data_ptr(),
        sin.data_ptr(),
        int(neox),
        torch.get_num_threads(),
    )
    return True


def gather_rows(w: QLinear, ids: torch.Tensor) -> torch.Tensor | None:
    """Rows `ids` [T] of an r16 or one-segment ggml weight [N, K] as float32 [T, K] (an embedding
    lookup, one C call); None when the weight is in neither layout."""
    if w.backend == "ggml" and len(w.parts) == 1:
        return ggml().rows(w.tensors["raw0"], w.parts[0][0], w.k, ids)
    if w.backend != "vnni" or not w.r16:
        return None
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if any(not 0 <= i < w.n for i in ids.tolist()):  # the C code does not check
        raise IndexError(f"row id out of range for a weight of {w.n} rows")
    out = torch.empty(ids.numel(), _kp(w), dtype=torch.float32)
    native_lib().lm_r16_rows(ctypes.byref(_desc(w)), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out[:, : w.k] if _kp(w) != w.k else out


# The KV cache's element types by name (LoadOptions.kv_type, `--kv-type`), and the one the C decode
# kernels read (csrc/common.h's kv_t): half precision, as llama.cpp's default cache. A decode step reads
# every cached key and value once a layer; float32 made that 16 MB a token at 48 layers and 80
# positions and 400 MB at 2048 (docs/speed.md), float16 halves it, and the memory with it. A float32
# cache (exact keys and values, llama.cpp's `--cache-type-k f32`) decodes through torch's attention.
KV_TYPES = {"f16": torch.float16, "f32": torch.float32}
KV_DTYPE = KV_TYPES["f16"]


def attn_decode(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    n_q: int,
    n_kv: int,
    head_dim: int,
    head_dim_v: int,
    scale: float,
    n_swa: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One token's attention in one C call: writes its key and value (from qkv [1, (n_q + n_kv)·d +
    n_kv·dv] float32, q and k already normed and rotated) at `pos` of the caches [n_kv, cap, d] /
    [n_kv, cap, dv] (KV_DTYPE), and returns softmax(scale · q·Kᵀ) V over positions lo..pos as [1,
    n_q·dv], as layers/attention.py's attend_explicit: lo = max(0, pos + 1 − n_swa) with a sliding
    window (n_swa > 0), else 0; sinks [n_q] float32 (or None): one more logit per query head,
    unscaled, in the softmax's denominator only. None when the C kernel does not apply (the caller
    runs torch's attention)."""
    fn = _helper("attn_decode")
    if (
        fn is None
        or qkv.shape[0] != 1
        or qkv.dtype != torch.float32
        or any(t.dtype != KV_DTYPE for t in (k_cache, v_cache))
        or any(t.device.type != "cpu" or not t.is_contiguous() for t in (qkv, k_cache, v_cache))
        or (
            sinks is not None
            and (
                sinks.dtype != torch.float32
                or sinks.device.type != "cpu"
                or not sinks.is_contiguous()
                or sinks.numel() != n_q
            )
        )
    ):
        return None
    out = torch.empty(1, n_q * head_dim_v, dtype=torch.float32)
    # [n_q, positions read]: the window's, or the whole context's without one
    scores = torch.empty(n_q, min(pos + 1, n_swa) if n_swa > 0 else pos + 1, dtype=torch.float32)
    fn(
        qkv.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1],
        pos,
        n_q,
        n_kv,
        head_dim,
        head_dim_v,
        scale,
        n_swa,
        sinks.data_ptr() if sinks is not None else None,
        out.data_ptr(),
        scores.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def deltanet_step(
    proj: torch.Tensor,
    conv_state: torch.Tensor,
    conv_w: torch.Tensor,
    shape: Any,
    dt_bias: torch.Tensor,
    a: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    S: torch.Tensor,
) -> torch.Tensor | None:
    """T tokens of a Gated DeltaNet layer, one after another, in one C call (ggml driver's
    lg_deltanet_step): proj [T, C + Hv·dv + 2·Hv] = [qkv | z | β | α] → the gated, normed output
    [T, Hv·dv]; conv_state [C, K − 1] and S [Hv, dk, dv] advanced in place. None where the C helper
    does not apply (the caller runs layers/deltanet.py's torch ops)."""
    g = usable_ggml()  # None in torch (and vnni) mode
    tensors = (proj, conv_state, conv_w, dt_bias, a, norm_w, S)
    if g is None or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    T = proj.shape[0]
    out = torch.empty(T, shape.value_dim, dtype=torch.float32)
    scratch = torch.empty(shape.conv_dim, dtype=torch.float32)
    g.driver.lg_deltanet_step(
        proj.data_ptr(),
        conv_state.data_ptr(),
        conv_w.data_ptr(),
        shape.conv_dim,
        shape.d_conv,
        shape.n_k_heads,
        shape.n_v_heads,
        shape.d_k,
        shape.d_v,
        dt_bias.data_ptr(),
        a.data_ptr(),
        norm_w.data_ptr(),
        eps,
        S.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        T,
        torch.get_num_threads(),
    )
    return out


def route(
    h: torch.Tensor, router: torch.Tensor, k: int, norm: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The router in one C call: h [T, D] @ router [E, D].T → softmax → top-k (→ renormalised, scaled):
    (ids [T, k] int64, weights [T, k] float32), or None when the C kernel does not apply."""
    fn = _helper("route")
    if fn is None or h.device.type != "cpu" or h.dtype != torch.float32 or router.dtype != torch.float32:
        return None
    h, router, T = h.contiguous(), router.contiguous(), h.shape[0]  # held here: the C call reads them
    E, D = router.shape
    ids = torch.empty(T, k, dtype=torch.int64)
    w = torch.empty(T, k, dtype=torch.float32)
    scratch = torch.empty(T, E, dtype=torch.float32)
    fn(
        h.data_ptr(),
        T,
        D,
        router.data_ptr(),
        E,
        k,
        int(norm),
        scale,
        ids.data_ptr(),
        w.data_ptr(),
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    return ids, w


def swiglu_decode(
    gate_up: list[QLinear], down: list[QLinear], x: torch.Tensor, coef: list[float]
) -> torch.Tensor | None:
    """Σ_e coef[e] · down_e(silu(gate_e x) · up_e x) for one row x [1, D] in one C call; None when the
    weights are not all C-kernel weights of one shape per matrix (the caller computes it in torch)."""
    if all(w.backend == "ggml" for w in gate_up) and all(w.backend == "ggml" for w in down):
        return _ggml_swiglu_decode(gate_up, down, x, coef)
    gu_batch, dn_batch = _batch(gate_up, x), _batch(down, None)
    if gu_batch is None or dn_batch is None:
        return None
    (gu, x, _), (dn, _, _) = gu_batch, dn_batch
    w0, d0, E = gate_up[0], down[0], len(gate_up)
    c = torch.tensor(coef, dtype=torch.float32)
    h = torch.empty(E, w0.n, dtype=torch.float32)
    y = torch.empty(1, d0.n, dtype=torch.float32)
    if (
        native_lib().lm_swiglu_decode(
            E, gu, dn, x.data_ptr(), c.data_ptr(), h.data_ptr(), y.data_ptr(), torch.get_num_threads()
        )
        != 0
    ):
        raise MemoryError("lm_swiglu_decode could not allocate its scratch buffers")
    return y


# The expert activations ggml_driver.c's lg_moe_decode computes (its ACT_*), by experts.swiglu_act's names.
GGML_ACTS = {"swiglu": 0, "swiglu_oai": 1}


def ggml_experts_decode(
    gate_up: list[QLinear],
    down: list[QLinear],
    x: torch.Tensor,
    coef: list[float],
    act: str,
    gate_up_bias: list[torch.Tensor | None],
    down_bias: list[torch.Tensor | None],
) -> torch.Tensor | None:
    """Σ_e coef[e] · (down_e(act(gate_e x + gb_e, up_e x + ub_e)) + db_e) for one row x [1, D] in one
    ggml call (lg_moe_decode), for experts with what the fused kernels leave out — biases ([2·n_ff]
    gate | up and [D] per expert, or None) or another activation (GGML_ACTS: gpt-oss's clamped
    SwiGLU). None unless every weight is a ggml one of one shape per matrix and the activation is
    one that call computes: the caller computes it in torch. Not `swiglu_decode`, whose fused
    kernels run only where the architecture declares fused_experts (archs.common.fast_paths)."""
    if act not in GGML_ACTS or not all(w.backend == "ggml" for w in gate_up + down):
        return None
    return _ggml_swiglu_decode(gate_up, down, x, coef, act, gate_up_bias, down_bias)


def swiglu_prefill(
    gate_up: list[QLinear], down: list[QLinear], x: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor | None:
    """Σ_s weight · down_s(silu(gate_s x) · up_s x) over experts s on their token rows, x [T, D] →
    [T, D], in one C call (vnni.c's lm_swiglu_prefill): rows[s] = (token indices [n] int64, router
    weights [n] float32), the experts summed in the order given. Each matmul has the products one
    `_vnni_matmul` per expert and matrix would give; the SiLU is the decode kernel's (vectorised
    e^x), so the sum differs from the torch loop by float rounding only. None (the caller loops)
    unless every weight is a VNNI weight of one shape per matrix, x is float32 and no expert has
    policy().gemm_rows rows or more (those would take the dequantize + SGEMM path)."""
    lib = vnni_lib()
    if lib is None or not gate_up or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    counts = [int(tok.numel()) for tok, _ in rows]
    if max(counts) >= policy().gemm_rows:
        return None
    gu_batch, dn_batch = _batch(gate_up, x), _batch(down, None)
    if gu_batch is None or dn_batch is None:
        return None
    (gu, xp, _), (dn, _, _) = gu_batch, dn_batch
    w0, d0 = gate_up[0], down[0]
    if w0.n % 2 or d0.k != w0.n // 2 or d0.n != x.shape[1]:
        return None
    offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int32)
    tok = torch.cat([t for t, _ in rows]).to(torch.int64).contiguous()
    coef = torch.cat([w for _, w in rows]).to(torch.float32).contiguous()
    out = torch.zeros(x.shape[0], d0.n, dtype=torch.float32)
    rc = lib.lm_swiglu_prefill(
        len(gate_up),
        gu,
        dn,
        xp.data_ptr(),
        tok.data_ptr(),
        offsets.data_ptr(),
        coef.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("lm_swiglu_prefill could not allocate its scratch buffers")
    return out


def _ggml_halves(w: QLinear) -> tuple[LgW, LgW] | None:
    """A "ggml" gate+up weight [2F, D] as its gate and up descriptors (rows 0..F, F..2F)."""
    segs = _ggml_segs(w)
    if len(segs) == 2 and segs[0].N == segs[1].N:
        return segs[0], segs[1]
    if len(segs) == 1 and segs[0].N % 2 == 0:
        s, half = segs[0], segs[0].N // 2
        return LgW(s.data, s.row_bytes, half, s.K, s.vec_dot, s.from_float, s.q_row_bytes), LgW(
            s.data + half * s.row_bytes, s.row_bytes, half, s.K, s.vec_dot, s.from_float, s.q_row_bytes
        )
    return None


def _bias_addresses(bs: list[torch.Tensor | None] | None, offset: int, held: list[torch.Tensor]) -> ctypes.Array | None:
    """Each expert's bias (float32, from element `offset`) as an array of addresses for the C call
    (None entries stay NULL), or None when no expert has one; the float32 copies go in `held`."""
    if bs is None or all(b is None for b in bs):
        return None
    out = []
    for b in bs:
        if b is None:
            out.append(None)
            continue
        b = b.detach().to("cpu", torch.float32).contiguous()
        held.append(b)
        out.append(b.data_ptr() + 4 * offset)
    return (ctypes.c_void_p * len(bs))(*out)


def _ggml_swiglu_decode(
    gate_up: list[QLinear],
    down: list[QLinear],
    x: torch.Tensor,
    coef: list[float],
    act: str = "swiglu",
    gate_up_bias: list[torch.Tensor | None] | None = None,
    down_bias: list[torch.Tensor | None] | None = None,
) -> torch.Tensor | None:
    halves = [_ggml_halves(w) for w in gate_up]
    dn = [_ggml_segs(w) for w in down]
    if (
        any(h is None for h in halves)
        or any(len(d) != 1 for d in dn)
        or len({w.n for w in gate_up}) != 1
        or len({w.n for w in down}) != 1
    ):
        return None
    E = len(gate_up)
    gate = (LgW * E)(*(h[0] for h in halves))
    up = (LgW * E)(*(h[1] for h in halves))
    down_arr = (LgW * E)(*(d[0] for d in dn))
    held: list[torch.Tensor] = []  # the biases' float32 copies, alive through the call
    n_ff = gate_up[0].n // 2
    biases = (
        _bias_addresses(gate_up_bias, 0, held),
        _bias_addresses(gate_up_bias, n_ff, held),
        _bias_addresses(down_bias, 0, held),
    )
    return ggml().moe_decode(
        gate,
        up,
        down_arr,
        x,
        torch.tensor(coef, dtype=torch.float32),
        down[0].n,
        torch.get_num_threads(),
        biases,
        GGML_ACTS[act],
    )
