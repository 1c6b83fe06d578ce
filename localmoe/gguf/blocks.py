"""GGUF block formats decoded with torch ops, on any device: the one place that knows the bit layout.

Every block type of BLOCK_TYPES is, per group of G weights (G = 32, or 16 for Q6_K), an affine code
w = scale · code + zero with an unsigned code of 4, 5, 6 or 8 bits. `decode` turns the raw bytes of
a [N, K] matrix into that form exactly (no rounding anywhere: every product below is exact in
float32), and `dequantize` turns raw bytes into float32 weights — on the CPU when repacking for the
CPU kernels, and on the GPU for every matmul of a GPU-tier weight, which stays in its GGUF bytes in
device memory (so the tier's bytes are the file's bytes). Both are checked bit for bit against
`gguf.quants.dequantize` (tests/test_kernels.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .qtypes import AFFINE_TYPES, FLOAT_TYPES, QUANT_TYPES, TYPES

Q = GGMLQuantizationType
# Block types with an exact affine decoding here (`decode`): what the repacked kernels take.
BLOCK_TYPES = AFFINE_TYPES
# The other types llama.cpp's quantizer makes for MoE models (Q2_K; Q3_K of the Q3_K_S/M/L mixes;
# the non-linear IQ4_NL / IQ4_XS, the grid-coded IQ1 / IQ2 / IQ3 types, gpt-oss's MXFP4): ggml's
# kernels compute on them as stored (ggml_backend.py), and `dequantize` turns them into float32
# with ggml's own dequantizer (else gguf-py's).
GGML_ONLY_TYPES = QUANT_TYPES - BLOCK_TYPES
# (weights per block, bytes per block) of every quantized type we read (gguf/qtypes.py)
BLOCK_SIZES = {q: (t.block, t.type_size) for q, t in TYPES.items()}
_FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# Weights are read zero-copy from the read-only memory map and never written through: torch's
# warning about tensors over read-only numpy memory says nothing useful here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    """Bytes of one row of k weights of `qtype`."""
    if qtype in FLOAT_TYPES:
        return k * _FLOAT_DTYPES[qtype].itemsize
    per, size = BLOCK_SIZES[qtype]
    return k // per * size


def raw_bytes(raw: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """Raw GGUF data of an n-row matrix (a numpy view from the file, or a tensor) → uint8 [n, row bytes]."""
    if isinstance(raw, np.ndarray):
        arr = raw if raw.dtype != np.dtype("V2") else raw.view(np.uint8)  # gguf reads BF16 as raw bytes
        raw = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8))
    return raw.reshape(n, -1).view(torch.uint8) if raw.dtype != torch.uint8 else raw.reshape(n, -1)


@dataclass
class Affine:
    """A [N, K] weight as w[n, i] = scale[n, i // G] · codes[n, i] + zero[n, i // G] (torch tensors)."""

    codes: torch.Tensor  # [N, K] uint8
    scale: torch.Tensor  # [N, K / G] float32
    zero: torch.Tensor | None  # [N, K / G] float32; None → zero = −offset · scale
    offset: int
    bits: int  # codes < 2**bits
    group: int  # G

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]. Each product scale · code is exact in float32 (an 11-bit float16 mantissa,
        times a ≤ 6-bit integer sub-scale, times a ≤ 8-bit code), so the order of operations cannot
        change a bit."""
        n, k = self.codes.shape
        s = self.scale[:, :, None]
        z = self.zero[:, :, None] if self.zero is not None else -self.offset * s
        return (s * self.codes.view(n, -1, self.group).float() + z).view(n, k)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 → [...] float32 read as little-endian float16."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes → [..., 32] codes: the low nibbles first, then the high ones (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes → [..., 8n] bits as uint8, little-endian (bit b of byte i is element 8i + b)."""
    return ((qh[..., :, None] >> _shifts(0, 8, 1, qh.device)) & 1).flatten(-2)


def _shifts(start: int, end: int, step: int, device: torch.device) -> torch.Tensor:
    """Bit-shift amounts as uint8, made on `device` (arange is a kernel there: no host-to-device copy
    that would synchronise a CUDA stream)."""
    return torch.arange(start, end, step, dtype=torch.uint8, device=device)


def _k_scales(sc12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of a Q4_K / Q5_K super-block → (scales [.., 8], mins [.., 8]), 6 bits each."""
    a, b, c = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def decode(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> Affine:
    """Raw bytes of a block-quantized [N, K] matrix → its exact affine form, on raw's device."""
    N, K = shape
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"no affine decoding for {qtype.name}")
    per, size = BLOCK_SIZES[qtype]
    b = raw_bytes(raw, N).reshape(N, K // per, size)
    if per == 32:
        d = _f16(b[..., 0:2])  # [N, K/32]
        if qtype == Q.Q8_0:
            codes = (b[..., 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
            return Affine(codes.reshape(N, K), d, None, 128, 8, 32)
        if qtype == Q.Q4_0:
            return Affine(_nibbles(b[..., 2:18]).reshape(N, K), d, None, 8, 4, 32)
        if qtype == Q.Q4_1:
            return Affine(_nibbles(b[..., 4:20]).reshape(N, K), d, _f16(b[..., 2:4]), 0, 4, 32)
        qh_at = 2 if qtype == Q.Q5_0 else 4
        codes = _nibbles(b[..., qh_at + 4 : qh_at + 20]) | (_bits(b[..., qh_at : qh_at + 4]) << 4)
        if qtype == Q.Q5_0:
            return Affine(codes.reshape(N, K), d, None, 16, 5, 32)
        return Affine(codes.reshape(N, K), d, _f16(b[..., 2:4]), 0, 5, 32)
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [N, nb, 1]
        sc, mn = _k_scales(b[..., 4:16])  # [N, nb, 8] each
        qs = b[..., -128:].reshape(N, K // 256, 4, 1, 32)  # 4 chunks of 64 weights: low nibbles, then high
        codes = ((qs >> _shifts(0, 8, 4, b.device).view(2, 1)) & 0x0F).reshape(
            N, K // 256, 8, 32
        )  # sub-block j = chunk j // 2, half j % 2
        if qtype == Q.Q5_K:
            qh = b[..., 16:48]  # bit j of qh[l] is the fifth bit of weight l of sub-block j
            hi = (qh[..., None, :] >> _shifts(0, 8, 1, b.device)[:, None]) & 1  # [N, nb, 8, 32]
            codes = codes | (hi << 4)
        return Affine(
            codes.reshape(N, K),
            (d * sc).reshape(N, -1),
            (-dmin * mn).reshape(N, -1),
            0,
            4 if qtype == Q.Q4_K else 5,
            32,
        )
    # Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 sub-scales, a float16 scale
    ql = b[..., 0:128].reshape(N, -1, 2, 1, 64) >> _shifts(0, 8, 4, b.device).view(2, 1)
    qh = b[..., 128:192].reshape(N, -1, 2, 1, 32) >> _shifts(0, 8, 2, b.device).view(4, 1)
    codes = (ql & 0x0F).reshape(N, -1, 2, 128) | ((qh & 3).reshape(N, -1, 2, 128) << 4)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, nb, 16], one per 16 weights
    d = _f16(b[..., 208:210])[..., None]
    return Affine(codes.reshape(N, K), (d * sc).reshape(N, -1), None, 32, 6, 16)


def dequantize(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    """Raw GGUF data of a [N, K] matrix (any supported type) → float32 [N, K] on raw's device."""
    N, K = shape
    if qtype in FLOAT_TYPES:
        return raw_bytes(raw, N).view(_FLOAT_DTYPES[qtype]).reshape(N, K).float()
    if qtype in GGML_ONLY_TYPES:
        return _dequantize_other(raw_bytes(raw, N), qtype, shape)
    return decode(raw, qtype, shape).dequantize()


def _dequantize_other(b: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    """A type without a torch decoding: ggml's dequantizer (to_float, C) on the CPU, else gguf-py's
    numpy one; bytes on another device make a round trip through host memory (exact, not fast)."""
    from ..compute.ggml_backend import usable_ggml

    N, K = shape
    host = b if b.device.type == "cpu" else b.cpu()
    g = usable_ggml()
    if g is not None and g.kernels(qtype) is not None and g.kernels(qtype).to_float:
        out = g.to_float(host.contiguous(), qtype, N, K, torch.get_num_threads())
    else:
        from gguf.quants import dequantize as np_dequantize

        out = torch.from_numpy(np.ascontiguousarray(np_dequantize(host.numpy(), qtype), dtype=np.float32).reshape(N, K))
    return out if b.device.type == "cpu" else out.to(b.device)


def to_torch(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A tensor of any logical `shape` (norms, biases, routers) as float32 on `device` (a fresh copy)."""
    k = shape[-1]
    n = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return dequantize(raw, qtype, (n, k)).reshape(shape).to(device=device, copy=True)
