"""GPU matmuls on GGUF blocks as they are stored, in Triton: no dequantized copy of any weight.

A weight in GPU memory is its GGUF bytes, uint8 [N rows, row bytes] (the same bytes the GPU tier
counts against its budget). Each kernel loads a tile of those bytes and turns it into float32
weights in registers, w = scale · code + zero per group of G weights (G = 32, or 16 for Q6_K, Q2_K
and Q3_K), then multiplies:

    gemv    decode, one activation row per slot: y[s, n] = Σ_k w_s[n, k] · x[s, k]. With a pointer
            table, slot s reads expert `table[s]`'s bytes: all of a layer's routed GPU experts in
            one launch (the grid's second axis is the slot), as llama.cpp's mul_mat_id does.
    gemm    prefill: tiles of BM activation rows × BN weight rows with tl.dot. Grouped, the rows
            are sorted by expert and padded to BM per expert (the host builds that index once per
            layer from the routing it already read back); each row block names its slot.

Both take `swiglu=True` for a down projection: the input is then [.., 2·K] (gate, then up, the
gate_up output) and the kernel reads silu(gate) · up on the fly, so no SwiGLU launch runs.

Exactness: the weights are decoded exactly (the products scale · code are exact in float32, as in
gguf/blocks.py); only the order of the float32 sums differs from dequantize-then-F.linear, and tl.dot
on a GPU rounds its inputs to TF32. tests/test_triton.py states the tolerance per type. The
kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks
them without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..gguf.qtypes import TYPES

# -- block layouts of the types with a kernel here (gguf/qtypes.py: `triton`, the code _dequant's
# branches test, and `group`) --------------------------------------------------------------------
LAYOUTS = {  # GGML type name → (code, weights per block, bytes per block, weights per scale group)
    t.name: (t.triton, t.block, t.type_size, t.group)
    for t in sorted((t for t in TYPES.values() if t.triton is not None), key=lambda t: t.triton)
}
# Non-linear code books, indexed by a 4-bit code (ggml's kvalues_iq4nl and kvalues_mxfp4; the MXFP4
# values are e2m1 doubled, which the block's halved E8M0 scale undoes).
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """A little-endian float16 at byte pointer p (any alignment) → float32."""
    v = (_u8(p, mask) | (_u8(p + 1, mask) << 8)).to(tl.uint16)
    return v.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(p, l, mask):
    """Weight l (< 32) of a 16-byte run of nibbles: the low nibbles hold 0-15, the high ones 16-31."""
    return (_u8(p + (l % 16), mask) >> (4 * (l // 16))) & 0xF


@triton.jit
def _lut(lut, code, mask):
    return tl.load(lut + code, mask=mask, other=0).to(tl.float32)


@triton.jit
def _dequant(row, kg, l, mask, gm, lut, QT: tl.constexpr, G: tl.constexpr):
    """row: byte pointers [BN, 1, 1] to each weight row; kg [1, NG, 1]: the groups' index along the
    row; l [1, 1, G]: the index inside a group. Returns float32 weights [BN, NG, G]."""
    if QT == 0:  # Q4_0: d f16, 16 bytes of nibbles; w = d · (q − 8)
        blk = row + kg * 18
        d = _f16(blk, gm)
        return d * (_nibble(blk + 2, l, mask).to(tl.float32) - 8.0)
    elif QT == 1:  # Q4_1: d, m f16, nibbles; w = d · q + m
        blk = row + kg * 20
        return _f16(blk, gm) * _nibble(blk + 4, l, mask).to(tl.float32) + _f16(blk + 2, gm)
    elif QT == 2:  # Q5_0: d, 32 high bits, nibbles; w = d · (q − 16)
        blk = row + kg * 22
        hi = (_u8(blk + 2 + l // 8, mask) >> (l % 8)) & 1
        q = _nibble(blk + 6, l, mask) | (hi << 4)
        return _f16(blk, gm) * (q.to(tl.float32) - 16.0)
    elif QT == 3:  # Q5_1: d, m, 32 high bits, nibbles; w = d · q + m
        blk = row + kg * 24
        hi = (_u8(blk + 4 + l // 8, mask) >> (l % 8)) & 1
        q = _nibble(blk + 8, l, mask) | (hi << 4)
        return _f16(blk, gm) * q.to(tl.float32) + _f16(blk + 2, gm)
    elif QT == 4:  # Q8_0: d, 32 int8; w = d · q
        blk = row + kg * 34
        q = _u8(blk + 2 + l, mask)
        return _f16(blk, gm) * (q - ((q >> 7) << 8)).to(tl.float32)
    elif QT == 5 or QT == 6:  # Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins
        sb = row + (kg // 8) * (144 if QT == 5 else 176)
        j = kg % 8
        a = _u8(sb + 4 + j, gm)  # the 12 scale bytes start at 4
        b = _u8(sb + 8 + j, gm)  # scales[j + 4]
        c = _u8(sb + 4 + j % 4, gm)  # scales[j − 4] for j ≥ 4
        sc = tl.where(j < 4, a & 63, (b & 0xF) | ((c >> 6) << 4))
        mn = tl.where(j < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
        qs = sb + (16 if QT == 5 else 48)
        q = (_u8(qs + (j // 2) * 32 + l, mask) >> (4 * (j % 2))) & 0xF
        if QT == 6:
            q = q | (((_u8(sb + 16 + l, mask) >> j) & 1) << 4)
        return _f16(sb, gm) * sc.to(tl.float32) * q.to(tl.float32) - _f16(sb + 2, gm) * mn.to(tl.float32)
    elif QT == 7:  # Q6_K: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, d; w = d · s · (q − 32)
        sb = row + (kg // 16) * 210
        j = kg % 16
        w = j * 16 + l  # weight index in the super-block
        h = w // 128
        r = w % 128
        low = (_u8(sb + h * 64 + r % 64, mask) >> (4 * (r // 64))) & 0xF
        hi = (_u8(sb + 128 + h * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
        s = _u8(sb + 192 + j, gm)
        s = (s - ((s >> 7) << 8)).to(tl.float32)
        return _f16(sb + 208, gm) * s * ((low | (hi << 4)).to(tl.float32) - 32.0)
    elif QT == 8:  # Q2_K: 16 scale bytes (4-bit scale | 4-bit min), 64 B of 2-bit codes, d, dmin
        sb = row + (kg // 16) * 84
        j = kg % 16
        jj = j % 8
        q = (_u8(sb + 16 + (j // 8) * 32 + (jj % 2) * 16 + l, mask) >> (2 * (jj // 2))) & 3
        sc = _u8(sb + j, gm)
        return _f16(sb + 80, gm) * (sc & 0xF).to(tl.float32) * q.to(tl.float32) - _f16(sb + 82, gm) * (sc >> 4).to(
            tl.float32
        )
    elif QT == 9:  # Q3_K: 32 B high-bit mask, 64 B 2-bit codes, 12 B of 6-bit scales, d
        sb = row + (kg // 16) * 110
        j = kg % 16
        jj = j % 8
        lo = (_u8(sb + 32 + (j // 8) * 32 + (jj % 2) * 16 + l, mask) >> (2 * (jj // 2))) & 3
        hm = (_u8(sb + (jj % 2) * 16 + l, mask) >> ((j // 8) * 4 + jj // 2)) & 1
        q = lo - 4 * (1 - hm)
        s = ((_u8(sb + 96 + j % 8, gm) >> (4 * (j // 8))) & 0xF) | (
            ((_u8(sb + 104 + j % 4, gm) >> (2 * (j // 4))) & 3) << 4
        )
        return _f16(sb + 108, gm) * (s - 32).to(tl.float32) * q.to(tl.float32)
    elif QT == 10:  # IQ4_NL: d, nibbles indexing a 16-value code book
        blk = row + kg * 18
        return _f16(blk, gm) * _lut(lut, _nibble(blk + 2, l, mask), mask)
    elif QT == 11:  # IQ4_XS: d, 2-bit scale highs (u16), 4-bit scale lows, 8 sub-blocks of nibbles
        sb = row + (kg // 8) * 136
        j = kg % 8
        sh = _u8(sb + 2, gm) | (_u8(sb + 3, gm) << 8)
        ls = ((_u8(sb + 4 + j // 2, gm) >> (4 * (j % 2))) & 0xF) | (((sh >> (2 * j)) & 3) << 4)
        return _f16(sb, gm) * (ls - 32).to(tl.float32) * _lut(lut, _nibble(sb + 8 + j * 16, l, mask), mask)
    else:  # MXFP4: an E8M0 exponent byte (halved scale), nibbles indexing e2m1 values
        blk = row + kg * 17
        e = _u8(blk, gm)
        bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # 2^(e − 128) exactly, as ggml builds it
        return bits.to(tl.uint32).to(tl.float32, bitcast=True) * _lut(lut, _nibble(blk + 1, l, mask), mask)


@triton.jit
def _load_x(x, k, kmask, K, SWIGLU: tl.constexpr):
    """Activations at k; with SWIGLU, x holds [gate (K), up (K)] and this is silu(gate) · up."""
    if SWIGLU:
        g = tl.load(x + k, mask=kmask, other=0.0)
        u = tl.load(x + K + k, mask=kmask, other=0.0)
        return g / (1.0 + tl.exp(-g)) * u
    else:
        return tl.load(x + k, mask=kmask, other=0.0)


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    table_ptr,
    ids_ptr,
    y_ptr,
    lut_ptr,
    N,
    K,
    row_bytes,
    x_stride,
    y_stride,
    QT: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BN: tl.constexpr,
    GROUPED: tl.constexpr,
    IDS: tl.constexpr,
    SWIGLU: tl.constexpr,
):
    """y[s, n] = Σ_k w_s[n, k] · x[s, k]; grid (cdiv(N, BN), slots). x [slots, K] (or [slots, 2K]
    with SWIGLU; x_stride 0: one row for every slot), y [slots, N], float32. GROUPED: slot s's
    weight bytes start at address table[s], or with IDS at table[ids[s]] (device-side routing)."""
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    if GROUPED:
        if IDS:
            base = tl.load(table_ptr + tl.load(ids_ptr + slot)).to(tl.pointer_type(tl.uint8))
        else:
            base = tl.load(table_ptr + slot).to(tl.pointer_type(tl.uint8))
    else:
        base = w_ptr
    rows = pid * BN + tl.arange(0, BN)
    rmask = (rows < N)[:, None, None]
    row = base + (rows.to(tl.int64) * row_bytes)[:, None, None]  # [BN, 1, 1]
    g = tl.arange(0, NG)[None, :, None]
    l = tl.arange(0, G)[None, None, :]
    x = x_ptr + slot.to(tl.int64) * x_stride
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, NG * G):
        k = k0 + g * G + l  # [1, NG, G]
        kmask = k < K
        w = _dequant(row, k0 // G + g, l, rmask & kmask, rmask & (k0 + g * G < K), lut_ptr, QT, G)
        xv = _load_x(x, k, kmask, K, SWIGLU)
        acc += tl.sum(tl.sum(w * xv, axis=2), axis=1)
    tl.store(y_ptr + slot.to(tl.int64) * y_stride + rows, acc, mask=rows < N)


@triton.jit
def gemm_kernel(
    x_ptr,
    x_rows_ptr,
    w_ptr,
    table_ptr,
    block_slot_ptr,
    y_ptr,
    lut_ptr,
    M,
    N,
    K,
    row_bytes,
    x_stride,
    y_stride,
    QT: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUPED: tl.constexpr,
    GATHER: tl.constexpr,
    SWIGLU: tl.constexpr,
):
    """y[m, n] = Σ_k x[r(m), k] · w[n, k] for M output rows; grid (cdiv(M, BM), cdiv(N, BN)).
    GATHER: r(m) = x_rows[m] (−1: a padding row, skipped), else r(m) = m. GROUPED: row block b
    uses the weight at table[block_slot[b]]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        slot = tl.load(block_slot_ptr + pid_m)
        base = tl.load(table_ptr + slot).to(tl.pointer_type(tl.uint8))
    else:
        base = w_ptr
    m = pid_m * BM + tl.arange(0, BM)
    if GATHER:
        src = tl.load(x_rows_ptr + m, mask=m < M, other=-1)
    else:
        src = tl.where(m < M, m, -1)
    mmask = src >= 0
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = (rows < N)[:, None, None]
    row = base + (rows.to(tl.int64) * row_bytes)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    l = tl.arange(0, G)[None, None, :]
    kt = tl.arange(0, NG * G)
    xrow = x_ptr + (tl.maximum(src, 0).to(tl.int64) * x_stride)[:, None]  # [BM, 1]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, NG * G):
        kmask3 = (k0 + g * G + l) < K
        w = _dequant(row, k0 // G + g, l, rmask & kmask3, rmask & (k0 + g * G < K), lut_ptr, QT, G)  # [BN, NG, G]
        k2 = (k0 + kt)[None, :]
        xmask = mmask[:, None] & (k2 < K)
        xv = _load_x(xrow, k2, xmask, K, SWIGLU)  # [BM, BK]
        acc += tl.dot(xv, tl.trans(tl.reshape(w, (BN, NG * G))))
    out = y_ptr + (m.to(tl.int64) * y_stride)[:, None] + rows[None, :]
    tl.store(out, acc, mask=(m < M)[:, None] & (rows < N)[None, :])


@triton.jit
def dequant_kernel(
    w_ptr, y_ptr, lut_ptr, N, K, row_bytes, QT: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, BN: tl.constexpr
):
    """float32 [N, K] from the bytes (tests, and weights a torch op needs as floats)."""
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    rmask = (rows < N)[:, None, None]
    row = w_ptr + (rows.to(tl.int64) * row_bytes)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    l = tl.arange(0, G)[None, None, :]
    k = kb * NG * G + g * G + l
    w = _dequant(row, kb * NG + g, l, rmask & (k < K), rmask & (kb * NG * G + g * G < K), lut_ptr, QT, G)
    tl.store(y_ptr + (rows.to(tl.int64) * K)[:, None, None] + k, w, mask=rmask & (k < K))


# -- launching -------------------------------------------------------------------------------------
import torch  # noqa: E402  (after the kernels: the module's first half is the kernels alone)

from . import counters  # noqa: E402
from .counters import to_device  # noqa: E402

GEMV_BN = 32
GEMM_BM, GEMM_BN, GEMM_BK = 32, 64, 64
GEMV_BK = 256
_luts: dict[tuple[str, int], torch.Tensor] = {}


def supports(qtype_name: str) -> bool:
    """Whether a GGML type (by name) has Triton kernels here."""
    return qtype_name in LAYOUTS


def _code_book(qtype_name: str, device: torch.device) -> torch.Tensor:
    """The 16-entry code book of IQ4_NL / IQ4_XS / MXFP4 on `device` (made once per device)."""
    key = (str(device), 0 if qtype_name.startswith("IQ4") else 1)
    t = _luts.get(key)
    if t is None:
        vals = IQ4NL_VALUES if key[1] == 0 else MXFP4_VALUES
        t = _luts[key] = torch.tensor(vals, dtype=torch.float32, device=device)
    return t


def _check(qtype_name: str, K: int) -> tuple[int, int]:
    code, per, _, G = LAYOUTS[qtype_name]
    if K % per:
        raise ValueError(f"{qtype_name}: row length {K} is not a multiple of its block ({per})")
    return code, G


def gemv(
    raw: torch.Tensor,
    qtype_name: str,
    N: int,
    K: int,
    x: torch.Tensor,
    table: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """y [S, N] float32 from x [S or 1, K] (or [.., 2K] with swiglu; one row serves every slot).
    raw: uint8 [N, row bytes], the weight of every slot; or `table` (int64 device addresses of
    weights of this type and shape): slot s reads table[s], or table[ids[s]] with `ids` (int64
    [S] on the device). With a table, raw only names the device."""
    code, G = _check(qtype_name, K)
    x = x.contiguous()
    S = ids.numel() if ids is not None else (table.numel() if table is not None and x.shape[0] == 1 else x.shape[0])
    y = torch.empty((S, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, GEMV_BN), S)
    gemv_kernel[grid](
        x,
        raw,
        table if table is not None else raw,
        ids if ids is not None else raw,
        y,
        _code_book(qtype_name, x.device),
        N,
        K,
        _row_bytes(qtype_name, K),
        0 if x.shape[0] == 1 else x.stride(0),
        y.stride(0),
        QT=code,
        G=G,
        NG=GEMV_BK // G,
        BN=GEMV_BN,
        GROUPED=table is not None,
        IDS=ids is not None,
        SWIGLU=swiglu,
    )
    counters.launches += 1
    return y


def gemm(
    raw: torch.Tensor,
    qtype_name: str,
    N: int,
    K: int,
    x: torch.Tensor,
    x_rows: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    block_slot: torch.Tensor | None = None,
    M: int | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """y [M, N] = x[rows] @ wᵀ. Plain: M = x rows, one weight `raw`. Grouped: x_rows [M] (int32,
    −1 = padding) picks x's rows (or None: row m is x's row m), block_slot [M / BM] the slot of
    each block of GEMM_BM rows, table [slots] the weights' addresses."""
    code, G = _check(qtype_name, K)
    x = x.contiguous()
    M = x.shape[0] if M is None else M
    y = torch.empty((M, N), dtype=torch.float32, device=x.device)
    NG = GEMM_BK // G
    grid = (triton.cdiv(M, GEMM_BM), triton.cdiv(N, GEMM_BN))
    grouped = table is not None
    dummy = raw
    gemm_kernel[grid](
        x,
        x_rows if x_rows is not None else dummy,
        raw,
        table if grouped else dummy,
        block_slot if grouped else dummy,
        y,
        _code_book(qtype_name, x.device),
        M,
        N,
        K,
        _row_bytes(qtype_name, K),
        x.stride(0),
        y.stride(0),
        QT=code,
        G=G,
        NG=NG,
        BM=GEMM_BM,
        BN=GEMM_BN,
        GROUPED=grouped,
        GATHER=x_rows is not None,
        SWIGLU=swiglu,
    )
    counters.launches += 1
    return y


def dequantize(raw: torch.Tensor, qtype_name: str, N: int, K: int) -> torch.Tensor:
    """float32 [N, K] from GGUF bytes uint8 [N, row bytes] on the kernel's device."""
    code, G = _check(qtype_name, K)
    NG = GEMV_BK // G
    y = torch.empty((N, K), dtype=torch.float32, device=raw.device)
    dequant_kernel[(triton.cdiv(N, GEMV_BN), triton.cdiv(K, NG * G))](
        raw, y, _code_book(qtype_name, raw.device), N, K, raw.shape[-1], QT=code, G=G, NG=NG, BN=GEMV_BN
    )
    counters.launches += 1
    return y


def _row_bytes(qtype_name: str, K: int) -> int:
    _, per, size, _ = LAYOUTS[qtype_name]
    return K // per * size


class GroupedRows:
    """The row plan of one grouped prefill launch: each slot's tokens, sorted by slot and padded to
    a whole number of GEMM_BM-row blocks, so every block reads one weight. Built on the host from
    the routing it already holds; two small uploads, no sync."""

    def __init__(self, rows: torch.Tensor, block_slot: torch.Tensor, starts: dict[int, int], n_rows: int):
        self.rows = rows  # int32 [n_rows]: the x row each output row reads, −1 for padding
        self.block_slot = block_slot  # int32 [n_rows / GEMM_BM]: the slot of each row block
        self.starts = starts  # slot → the first output row of its tokens
        self.n_rows = n_rows

    @classmethod
    def build(cls, groups: list[tuple[int, torch.Tensor]], device: torch.device) -> "GroupedRows":
        """groups: (slot, token indices [n] int64 on the host) in output order."""
        rows, block_slot, starts, at = [], [], {}, 0
        for slot, tok in groups:
            n = int(tok.numel())
            nb = -(-n // GEMM_BM)
            starts[slot] = at
            rows.append(tok.to(torch.int32))
            rows.append(torch.full((nb * GEMM_BM - n,), -1, dtype=torch.int32))
            block_slot += [slot] * nb
            at += nb * GEMM_BM
        return cls(
            to_device(torch.cat(rows), device),
            to_device(torch.tensor(block_slot, dtype=torch.int32), device),
            starts,
            at,
        )
