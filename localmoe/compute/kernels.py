"""Fast matmuls on quantized GGUF weights: repack once, then compute without dequantizing.

Every GGUF block type we support is, per group of G weights (G = 32, or 16 for Q6_K), an affine
code: w = scale · code + zero with an unsigned integer code of 4, 5, 6 or 8 bits (gguf/blocks.py
decodes it). For the CPU, `repack` decodes a tensor once into that form — codes (4 low bits packed two per byte plus a plane of the 1-2 high
bits for 5- and 6-bit types; bytes for 8-bit), float16 scales, and float16 zeros (or, for the
symmetric types, zero = −offset · scale with no zeros stored): about the file's size — and
`QLinear` multiplies activations by it with one of these backends:

    "vnni"     our C kernel (AVX-512 VNNI, built on first use with the system C compiler): the
               activations are quantized to int8 per 32 values as llama.cpp does (Q8_0 rounding)
               and each group's integer dot products are scaled in float. Reads only the packed
               bytes, stored row-interleaved in blocks of 16 rows ("r16": 16 rows' dot products
               per instruction, summed in int32 per group; LOCALMOE_ROW_BLOCKS=0 keeps one row at
               a time). With LOCALMOE_GEMM_ROWS=N, from N rows on it dequantizes the weight once to
               float32 for an SGEMM instead.
    "int4"     torch._weight_int4pack_mm_for_cpu (bf16 activations), for 4-bit codes with G = 32.
    "bf16"     dequantized once to bfloat16 + F.linear (CPU fallback for 5-8 bit types, F16, BF16).
    "f32"      float32 + F.linear: F32 files, which must match llama.cpp to float rounding.
    "triton"   the GGUF bytes as they are in the file, on the GPU: Triton kernels decode the blocks
               in registers inside the matmul (compute/triton_gguf.py; GEMV for a few rows, GEMM
               beyond). A weight in GPU memory takes exactly its bytes in the file.
    "gguf"     the same bytes on any device; every call dequantizes them (exactly, to float32,
               with torch ops) and runs F.linear: the reference the Triton kernels are tested
               against, and the GPU path where Triton is missing (LOCALMOE_GPU_KERNEL=gguf forces it).

`QLinear.backend` says which one a weight uses; `choose_backend` is the policy (docs/speed.md has
the measurements behind it). Set LOCALMOE_KERNEL=torch to never build or use the C kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from .counters import to_device
from ..gguf.blocks import BLOCK_TYPES, FLOAT_TYPES, Affine, decode, dequantize, raw_bytes

Q = GGMLQuantizationType
# From this many rows, dequantize to float32 + SGEMM instead of the integer kernel. Off by default: on
# the machine we measure on the integer kernel is faster at every row count tried (128-1024 rows,
# docs/speed.md); LOCALMOE_GEMM_ROWS=N turns the SGEMM path on where it pays.
GEMM_ROWS = int(os.environ.get("LOCALMOE_GEMM_ROWS", str(1 << 30)))
CHUNK = 64  # weights per SIMD step of the C kernel; rows are padded to a multiple of it (of 128 for 4-6 bit codes)
# Every block type is stored row-interleaved in blocks of 16 rows ("r16" in the C source), which
# the C kernel multiplies 2-3x faster per core than one row at a time;
# LOCALMOE_ROW_BLOCKS=0 keeps the per-row layout (for comparisons).
ROW_BLOCKS = os.environ.get("LOCALMOE_ROW_BLOCKS", "1") != "0"
R16_FORMATS = {(4, 32), (5, 32), (6, 16), (8, 32)}  # (bits per code, group size) with an r16 kernel


# -- the C kernel --------------------------------------------------------------------------------
_C_SOURCE = r"""
// y[t, n] = sum_i w[n, i] * x[t, i] for weights stored as w = scale * code + zero per group of G.
// x is quantized per 32 values as llama.cpp quantizes activations (Q8_0): xq = round(x / dx),
// dx = max|x| / 127. One VPDPBUSD per 64-weight chunk (u8 codes x s8 activations, 16 int32 lanes
// of 4 products each), scaled in float by weight scale x dx per lane. The zero term,
// sum_g zero[n, g] * sum_{i in g} xq[t, i] * dx, uses the sums of the quantized x.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int T, K, N, G, nibble, offset;  // K: padded to a multiple of 64; G: 16 or 32
    const uint8_t *codes;             // [N, K / 2] (nibble: byte j of 128 weights = w[j] | w[j + 64] << 4) or [N, K]
    const uint16_t *scale, *zero;     // float16 [N, K / G]; zero may be NULL (zero = -offset * scale)
    const int8_t *xq;                 // [T, K] quantized activations
    const float *dxg;                 // [T, K / G] activation scale dx of the 32-block holding each weight group
    const float *xs;                  // [T, K / G] sum of the quantized x over each group
    float *y;                         // [T, N]
    const uint8_t *high;              // 5- and 6-bit codes: their bits above the nibble, [N, K / 64, 8 * hbits]
    int hbits;                        // 0, 1 or 2
    int r16;                          // 1: the row-interleaved layout below (codes, scale, zero)
} job_t;

// The high-bit plane of one 64-weight chunk → bits 4.. of each code byte. hbits = 2: byte j of the
// plane holds weight j + 16 L in bits 2L..2L+1 (L = 0..3); hbits = 1: byte j holds weight j + 8 L in bit L.
static inline __m512i high_bits(const job_t *j, const uint8_t *hrow, int c) {
    __m512i v;
    if (j->hbits == 2) {
        v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(hrow + c * 16)));
        v = _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                                                     0x0002000200020002LL, 0x0002000200020002LL, 0, 0)), _mm512_set1_epi8(3));
    } else {
        uint64_t q;
        memcpy(&q, hrow + c * 8, 8);
        v = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((long long)q), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)), _mm512_set1_epi8(1));
    }
    return _mm512_slli_epi16(v, 4);
}

// The 64 codes of chunk c. Nibbles: 64 bytes hold 128 weights, chunk 2i in the low and 2i + 1 in the
// high nibbles, so a pair of chunks costs one load and three logic ops (the compiler merges the loads).
static inline __m512i load_codes(const job_t *j, const uint8_t *row, const uint8_t *hrow, int c) {
    if (j->nibble) {
        __m512i v = _mm512_loadu_si512((const void *)(row + (c >> 1) * 64));
        if (c & 1) v = _mm512_srli_epi16(v, 4);
        __m512i w = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        return j->hbits ? _mm512_or_si512(w, high_bits(j, hrow, c)) : w;
    }
    return _mm512_loadu_si512((const void *)(row + c * 64));
}

// At the first chunk of every 16 weight groups (8 chunks for G = 32, 4 for G = 16): the per-lane
// factors weight scale x activation scale of those groups (one float16 load, convert and multiply;
// a chunk then takes its lanes' factors with one permute), and the zero term of the groups,
// sum_g zero_g * xs_g, accumulated in `zacc` (symmetric types: sum_g scale_g * xs_g, times -offset
// at the end). The tail (< 16 groups) loads under a mask.
static inline void group_batch(const job_t *j, const uint16_t *srow, const uint16_t *zrow, const float *dxg, const float *xs,
                               int g0, int ng, __m512 *f, __m512 *zacc) {
    __mmask16 m = g0 + 16 <= ng ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g0)) - 1);
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, srow + g0));
    *f = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, dxg + g0));
    __m512 z = zrow ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, zrow + g0)) : s;
    *zacc = _mm512_fmadd_ps(z, _mm512_maskz_loadu_ps(m, xs + g0), *zacc);
}

// acc + the zero term, summed across lanes.
static inline float finish(const job_t *j, __m512 acc, __m512 zacc) {
    return _mm512_reduce_add_ps(_mm512_fmadd_ps(zacc, _mm512_set1_ps(j->zero ? 1.f : -(float)j->offset), acc));
}

// One weight row against tokens [t0, t0 + TT): each chunk's codes are unpacked once for TT tokens.
// idx: lane -> group within the chunk (lanes hold 4 consecutive weights; G / 4 lanes per group).
#define TILE(TT)                                                                                   \
    static void tile##TT(const job_t *j, int n, int t0, __m512i idx) {                            \
        int nc = j->K / 64, ng = j->K / j->G, gpc = 64 / j->G;                                     \
        const uint8_t *row = j->codes + (size_t)n * (j->nibble ? j->K / 2 : j->K);                 \
        const uint8_t *hrow = j->high + (size_t)n * (j->K / 64) * 8 * j->hbits;                    \
        const uint16_t *srow = j->scale + (size_t)n * ng, *zrow = j->zero ? j->zero + (size_t)n * ng : 0; \
        __m512 acc[TT], f[TT], zacc[TT];                                                           \
        for (int u = 0; u < TT; u++) acc[u] = zacc[u] = _mm512_setzero_ps();                       \
        for (int c = 0; c < nc; c++) {                                                             \
            int g = c * gpc;                                                                       \
            if (g % 16 == 0)                                                                       \
                for (int u = 0; u < TT; u++)                                                       \
                    group_batch(j, srow, zrow, j->dxg + (size_t)(t0 + u) * ng, j->xs + (size_t)(t0 + u) * ng, g, ng, &f[u], &zacc[u]); \
            __m512i w = load_codes(j, row, hrow, c);                                               \
            __m512i pi = _mm512_add_epi32(idx, _mm512_set1_epi32(g % 16));                        \
            for (int u = 0; u < TT; u++) {                                                         \
                __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512((const void *)(j->xq + ((size_t)(t0 + u) * nc + c) * 64))); \
                acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_permutexvar_ps(pi, f[u]), acc[u]); \
            }                                                                                      \
        }                                                                                          \
        for (int u = 0; u < TT; u++) j->y[(size_t)(t0 + u) * j->N + n] = finish(j, acc[u], zacc[u]); \
    }
TILE(4)

// One token (decode): four chunks per step into four accumulators (independent FMA chains).
static void tile1(const job_t *j, int n, int t0, __m512i idx) {
    int nc = j->K / 64, ng = j->K / j->G, gpc = 64 / j->G;
    const uint8_t *row = j->codes + (size_t)n * (j->nibble ? j->K / 2 : j->K);
    const uint8_t *hrow = j->high + (size_t)n * (j->K / 64) * 8 * j->hbits;
    const uint16_t *srow = j->scale + (size_t)n * ng, *zrow = j->zero ? j->zero + (size_t)n * ng : 0;
    const int8_t *xq = j->xq + (size_t)t0 * nc * 64;
    const float *dxg = j->dxg + (size_t)t0 * ng, *xs = j->xs + (size_t)t0 * ng;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 f = _mm512_setzero_ps(), zacc = _mm512_setzero_ps();
    int c = 0;
    for (; c + 4 <= nc; c += 4) {  // 16 % (4 gpc) == 0: four chunks never straddle 16 groups
        int g = c * gpc;
        if (g % 16 == 0) group_batch(j, srow, zrow, dxg, xs, g, ng, &f, &zacc);
        _mm_prefetch((const char *)row + (c + 16) * (j->nibble ? 32 : 64), _MM_HINT_T0);
        __m512i p = _mm512_add_epi32(idx, _mm512_set1_epi32(g % 16));
        for (int u = 0; u < 4; u++) {
            __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), load_codes(j, row, hrow, c + u), _mm512_loadu_si512((const void *)(xq + (c + u) * 64)));
            a[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_permutexvar_ps(_mm512_add_epi32(p, _mm512_set1_epi32(u * gpc)), f), a[u]);
        }
    }
    for (; c < nc; c++) {
        int g = c * gpc;
        if (g % 16 == 0) group_batch(j, srow, zrow, dxg, xs, g, ng, &f, &zacc);
        __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), load_codes(j, row, hrow, c), _mm512_loadu_si512((const void *)(xq + c * 64)));
        a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(g % 16)), f), a[0]);
    }
    j->y[(size_t)t0 * j->N + n] = finish(j, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])), zacc);
}

// ---- The row-interleaved layout ("r16") ---------------------------------------------------------
// Rows in blocks of 16, a block's bytes in one run over K: per group of G weights, its 16 rows x G
// codes as G / 4 steps of 4 weights (lane r of a step = 4 consecutive weights of row r: one VPDPBUSD
// against 4 activations broadcast to every lane). 8-bit codes: one 64-byte vector per step. 4-6 bit
// codes: one vector per pair of steps, step 2p in the low nibbles and 2p + 1 in the high ones, then
// (5 and 6 bits) one vector of the bits above the nibble: for byte i of a step, bit s (5-bit, G = 32)
// or bits 2s..2s+1 (6-bit, G = 16) of byte i belong to step s. Scales and zeros: [blocks, groups, 16]
// float16. A group's products add up in int32 and meet the float factors once per group, not once
// per 64 weights: about 3 vector ops per 64 weights instead of 7 (the per-row layout above is
// compute-bound at 13-19 GB/s per core on the machine we measure on).
static inline __m512i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

// The high bits of step s moved to bits 4.. of each byte (HB bits per step).
static inline __m512i r16_high(__m512i hb, int s, int HB) {
    int k = 4 - HB * s;  // left shift that takes step s's bits to bit 4
    __m512i v = k > 0 ? _mm512_slli_epi16(hb, k) : k < 0 ? _mm512_srli_epi16(hb, -k) : hb;
    return _mm512_and_si512(v, _mm512_set1_epi8(HB == 1 ? 0x10 : 0x30));
}

#define R16_TILE(NAME, TT, G, HB)                                                                    \
    static void NAME(const job_t *j, int b, int t0) {                                               \
        int ng = j->K / G;                                                                           \
        size_t gb = j->nibble ? G * 8 + (HB ? 64 : 0) : G * 16;  /* bytes per group of 16 rows */   \
        const uint8_t *cb = j->codes + (size_t)b * ng * gb;                                          \
        const uint16_t *sb = j->scale + (size_t)b * ng * 16, *zb = j->zero ? j->zero + (size_t)b * ng * 16 : 0; \
        const __m512i m4 = _mm512_set1_epi8(0x0F);                                                   \
        __m512 acc[TT];                                                                              \
        for (int u = 0; u < TT; u++) acc[u] = _mm512_setzero_ps();                                   \
        for (int g = 0; g < ng; g++) {                                                               \
            const uint8_t *cg = cb + g * gb;                                                         \
            __m512i ia[TT], ib[TT];                                                                  \
            for (int u = 0; u < TT; u++) ia[u] = ib[u] = _mm512_setzero_si512();                     \
            __m512i hb = HB ? _mm512_loadu_si512((const void *)(cg + G * 8)) : _mm512_setzero_si512(); \
            for (int p = 0; p < G / 8; p++) {                                                        \
                __m512i lo, hi;                                                                      \
                if (j->nibble) {                                                                     \
                    __m512i v = _mm512_loadu_si512((const void *)(cg + p * 64));                     \
                    lo = _mm512_and_si512(v, m4);                                                    \
                    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);                              \
                    if (HB) {                                                                        \
                        lo = _mm512_or_si512(lo, r16_high(hb, 2 * p, HB));                           \
                        hi = _mm512_or_si512(hi, r16_high(hb, 2 * p + 1, HB));                       \
                    }                                                                                \
                } else {                                                                             \
                    lo = _mm512_loadu_si512((const void *)(cg + 2 * p * 64));                        \
                    hi = _mm512_loadu_si512((const void *)(cg + (2 * p + 1) * 64));                  \
                }                                                                                    \
                for (int u = 0; u < TT; u++) {                                                       \
                    const int8_t *xr = j->xq + (size_t)(t0 + u) * j->K + g * G + p * 8;              \
                    ia[u] = _mm512_dpbusd_epi32(ia[u], lo, bcast4(xr));                              \
                    ib[u] = _mm512_dpbusd_epi32(ib[u], hi, bcast4(xr + 4));                          \
                }                                                                                    \
            }                                                                                        \
            __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * 16)));          \
            __m512 z = zb ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zb + g * 16)))      \
                          : _mm512_mul_ps(s, _mm512_set1_ps(-(float)j->offset));                     \
            for (int u = 0; u < TT; u++) {                                                           \
                size_t q = (size_t)(t0 + u) * ng + g;                                                \
                __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[u], ib[u]));                    \
                acc[u] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(j->dxg[q])), acc[u]);  \
                acc[u] = _mm512_fmadd_ps(z, _mm512_set1_ps(j->xs[q]), acc[u]);                       \
            }                                                                                        \
        }                                                                                            \
        int rows = j->N - b * 16;                                                                    \
        __mmask16 m = rows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);                \
        for (int u = 0; u < TT; u++) _mm512_mask_storeu_ps(j->y + (size_t)(t0 + u) * j->N + b * 16, m, acc[u]); \
    }
R16_TILE(r16_tile1, 1, 32, 0)
R16_TILE(r16_tile4, 4, 32, 0)
R16_TILE(r16_tile1_h1, 1, 32, 1)
R16_TILE(r16_tile4_h1, 4, 32, 1)
R16_TILE(r16_tile1_h2, 1, 16, 2)
R16_TILE(r16_tile4_h2, 4, 16, 2)

// Row block b (r16) or row n (per-row layout) of a job against tokens [0, T).
static inline void job_rows(const job_t *j, int r, __m512i idx) {
    int t = 0;
    if (j->r16) {
        void (*one)(const job_t *, int, int) = j->hbits == 2 ? r16_tile1_h2 : j->hbits == 1 ? r16_tile1_h1 : r16_tile1;
        void (*four)(const job_t *, int, int) = j->hbits == 2 ? r16_tile4_h2 : j->hbits == 1 ? r16_tile4_h1 : r16_tile4;
        for (; t + 4 <= j->T; t += 4) four(j, r, t);
        for (; t < j->T; t++) one(j, r, t);
    } else {
        for (; t + 4 <= j->T; t += 4) tile4(j, r, t, idx);
        for (; t < j->T; t++) tile1(j, r, t, idx);
    }
}

// Work items of a job: row blocks of 16 (r16) or rows.
static inline int job_items(const job_t *j) { return j->r16 ? (j->N + 15) / 16 : j->N; }

static inline __m512i group_index(int G) {
    return G == 16 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                   : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
}

static void quantize_x(const float *x, int T, int K, int G, int8_t *xq, float *dxg, float *xs) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * K;
        for (int b = 0; b < K / 32; b++) {
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xr[b * 32 + i]));
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            for (int i = 0; i < 32; i++) xq[(size_t)t * K + b * 32 + i] = (int8_t)nearbyintf(xr[b * 32 + i] * id);
            // the zero term uses the sums of the *quantized* x, so the result is exactly W @ x_q and
            // its error W @ (x_q - x) (with exact sums, uncentred codes would amplify the error)
            for (int g = b * 32 / G; g < (b + 1) * 32 / G; g++) {
                int s = 0;
                for (int i = 0; i < G; i++) s += xq[(size_t)t * K + g * G + i];
                xs[(size_t)t * (K / G) + g] = d * (float)s;
                dxg[(size_t)t * (K / G) + g] = d;
            }
        }
    }
}

int lm_qmatmul(const float *x, int T, int K, int N, const uint8_t *codes, int nibble, const uint16_t *scale,
               const uint16_t *zero, int offset, int G, float *y, int nthreads, const uint8_t *high, int hbits, int r16) {
    int8_t *xq = aligned_alloc(64, (size_t)T * K + 64);
    float *dxg = aligned_alloc(64, ((size_t)T * (K / 16) + 16) * 4);
    float *xs = aligned_alloc(64, ((size_t)T * (K / 16) + 16) * 4);
    if (!xq || !dxg || !xs) { free(xq); free(dxg); free(xs); return -1; }
    quantize_x(x, T, K, G, xq, dxg, xs);
    job_t j = {T, K, N, G, nibble, offset, codes, scale, zero, xq, dxg, xs, y, high, hbits, r16};
    __m512i idx = group_index(G);
    // Few weights: one thread (waking others costs more than it saves).
    int nth = (size_t)N * K * T < (1u << 18) ? 1 : nthreads, items = job_items(&j);
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (int r = 0; r < items; r++) job_rows(&j, r, idx);
    free(xq); free(dxg); free(xs);
    return 0;
}

// One row of activations against E weights at once (decode: the k routed experts of a layer), in
// one parallel region over all their rows. x_stride 0: every weight reads the same x.
typedef struct {
    const uint8_t *codes, *high;
    const uint16_t *scale, *zero;
    int N, K, nibble, offset, G, hbits, r16;
} wdesc_t;

int lm_qmatvec_multi(int E, const wdesc_t *w, const float *x, int x_stride, float *y, int y_stride, int nthreads) {
    job_t *jobs = calloc(E, sizeof(job_t));
    int *start = malloc((E + 1) * sizeof(int));
    int8_t **bufs = calloc(E, sizeof(int8_t *));
    int ok = jobs && start && bufs;
    for (int e = 0; ok && e < E; e++) {
        int K = w[e].K;
        size_t nq = (size_t)K + 64, nd = ((size_t)(K / 16) + 16) * 4, ns = ((size_t)(K / 16) + 16) * 4;
        bufs[e] = aligned_alloc(64, (nq + nd + ns + 63) / 64 * 64);
        if (!bufs[e]) { ok = 0; break; }
        int8_t *xq = bufs[e];
        job_t j = {1, K, w[e].N, w[e].G, w[e].nibble, w[e].offset, w[e].codes, w[e].scale, w[e].zero,
                   xq, (float *)(xq + nq), (float *)(xq + nq + nd), y + (size_t)e * y_stride, w[e].high, w[e].hbits, w[e].r16};
        jobs[e] = j;
    }
    if (ok) {
        start[0] = 0;
        for (int e = 0; e < E; e++) start[e + 1] = start[e] + job_items(&jobs[e]);
        #pragma omp parallel num_threads(nthreads)
        {
            // a shared x (x_stride 0) is quantized once when every weight has its K and G
            int shared = x_stride == 0;
            for (int e = 1; e < E; e++) shared &= jobs[e].K == jobs[0].K && jobs[e].G == jobs[0].G;
            #pragma omp for schedule(static)
            for (int e = 0; e < E; e++)
                if (!shared || e == 0)
                    quantize_x(x + (size_t)e * x_stride, 1, jobs[e].K, jobs[e].G, (int8_t *)jobs[e].xq, (float *)jobs[e].dxg, (float *)jobs[e].xs);
            #pragma omp single
            if (shared)
                for (int e = 1; e < E; e++) { jobs[e].xq = jobs[0].xq; jobs[e].dxg = jobs[0].dxg; jobs[e].xs = jobs[0].xs; }
            #pragma omp for schedule(static)
            for (int r = 0; r < start[E]; r++) {  // row blocks or rows of every weight
                int e = 0;
                while (r >= start[e + 1]) e++;
                job_rows(&jobs[e], r - start[e], group_index(jobs[e].G));
            }
        }
    }
    for (int e = 0; bufs && e < E; e++) free(bufs[e]);
    free(bufs); free(start); free(jobs);
    return ok ? 0 : -1;
}

// The router of T tokens: logits = W x (W float32 [E, D]), softmax over the E experts, the k largest
// probabilities (ties: the lower id first), renormalised to sum 1 when norm (with
// llama.cpp's floor on the sum), times scale when scale is neither 0 nor 1.
void lm_route(const float *x, int T, int D, const float *W, int E, int k, int norm, float scale,
              int64_t *ids, float *wts, float *scratch, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if ((size_t)E * D * T >= (1u << 16))
    for (int r = 0; r < T * E; r++) {
        const float *xr = x + (size_t)(r / E) * D, *wr = W + (size_t)(r % E) * D;
        __m512 acc = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i), _mm512_loadu_ps(xr + i), acc);
        float sum = _mm512_reduce_add_ps(acc);
        for (; i < D; i++) sum += wr[i] * xr[i];
        scratch[r] = sum;
    }
    for (int t = 0; t < T; t++) {
        float *p = scratch + (size_t)t * E, mx = p[0], total = 0.f;
        for (int e = 1; e < E; e++) mx = fmaxf(mx, p[e]);
        for (int e = 0; e < E; e++) { p[e] = expf(p[e] - mx); total += p[e]; }
        for (int e = 0; e < E; e++) p[e] /= total;
        float picked = 0.f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int q = 0; q < j; q++) taken |= ids[(size_t)t * k + q] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[(size_t)t * k + j] = best;
            wts[(size_t)t * k + j] = p[best];
            picked += p[best];
        }
        float div = norm ? fmaxf(picked, 6.103515625e-5f) : 1.f;
        for (int j = 0; j < k; j++) {
            float w = wts[(size_t)t * k + j] / div;
            wts[(size_t)t * k + j] = (scale != 0.f && scale != 1.f) ? w * scale : w;
        }
    }
}

// Row-wise RMS norm: y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w (w has n values).
void lm_rms_norm(const float *x, float *y, int rows, int n, const float *w, float eps, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows >= 16)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        double ss = 0.0;  // double: a sequential float sum would round more than torch's blocked one
        for (int i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
    }
}

// In place on the q and k heads at the start of each of `rows` token rows (row stride `stride`
// floats): nh heads of d floats, the first nq of them queries. Each head is RMS-normed with qw
// (queries) or kw (keys) when those are given, then its first n_rot dims rotated with cos/sin
// [rows, n_rot / 2]: neox pairs (i, i + n_rot / 2), otherwise adjacent pairs (2i, 2i + 1).
void lm_qk_norm_rope(float *buf, int rows, int stride, int nh, int nq, int d, const float *qw, const float *kw,
                     float eps, int n_rot, const float *cosv, const float *sinv, int neox, int nthreads) {
    int half = n_rot / 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows >= 16)
    for (int r = 0; r < rows; r++) {
        const float *c = cosv + (size_t)r * half, *s = sinv + (size_t)r * half;
        for (int h = 0; h < nh; h++) {
            float *x = buf + (size_t)r * stride + (size_t)h * d;
            const float *w = h < nq ? qw : kw;
            if (w) {
                double ss = 0.0;
                for (int i = 0; i < d; i++) ss += (double)x[i] * x[i];
                float inv = 1.f / sqrtf((float)(ss / d) + eps);
                for (int i = 0; i < d; i++) x[i] = x[i] * inv * w[i];
            }
            for (int i = 0; i < half; i++) {
                int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                float x0 = x[a], x1 = x[b];
                x[a] = x0 * c[i] - x1 * s[i];
                x[b] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

// The routed experts of one decode token: y = sum_e c[e] * down_e(silu(gate_e x) * up_e x), with every
// expert's gate+up rows in one parallel pass and every down row in another. h: scratch [E, 2 F].
int lm_swiglu_decode(int E, const wdesc_t *gu, const wdesc_t *dn, const float *x, const float *c, float *h, float *y, int nthreads) {
    int F = gu[0].N / 2, D = dn[0].N;
    float *act = malloc((size_t)E * dn[0].K * sizeof(float)), *out = malloc((size_t)E * D * sizeof(float));
    if (!act || !out) { free(act); free(out); return -1; }
    int rc = lm_qmatvec_multi(E, gu, x, 0, h, 2 * F, nthreads);
    if (rc == 0) {
        for (int e = 0; e < E; e++) {
            const float *g = h + (size_t)e * 2 * F, *u = g + F;
            float *a = act + (size_t)e * dn[0].K;
            for (int i = 0; i < F; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
            for (int i = F; i < dn[0].K; i++) a[i] = 0.f;  // padding columns of the down weights
        }
        rc = lm_qmatvec_multi(E, dn, act, dn[0].K, out, D, nthreads);
    }
    if (rc == 0)
        for (int i = 0; i < D; i++) {
            float s = 0.f;
            for (int e = 0; e < E; e++) s += c[e] * out[(size_t)e * D + i];
            y[i] = s;
        }
    free(act); free(out);
    return rc;
}

// e^x for 16 floats (x <= 0 here): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7), times 2^n. Scalar expf made a decode step's softmax cost more
// than its dot products.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.f / 720.f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120.f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24.f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6.f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(y, n);
}

// Attention of one new token (decode) against the KV cache, after q/k norm and RoPE: appends its
// key and value (from qkv = [q: nq heads x d | k: nkv x d | v: nkv x dv]) at position `pos` of the
// per-layer cache k [nkv, cap, d], v [nkv, cap, dv], then for each query head h (KV head h / (nq /
// nkv)): out[h] = softmax(scale * q_h . k[0..pos]) @ v[0..pos]. out: [nq, dv].
void lm_attn_decode(const float *qkv, float *kc, float *vc, int cap, int pos, int nq, int nkv, int d, int dv,
                    float scale, float *out, float *scores, int nthreads) {
    const float *q = qkv, *kn = qkv + (size_t)nq * d, *vn = kn + (size_t)nkv * d;
    for (int h = 0; h < nkv; h++) {
        memcpy(kc + ((size_t)h * cap + pos) * d, kn + (size_t)h * d, (size_t)d * sizeof(float));
        memcpy(vc + ((size_t)h * cap + pos) * dv, vn + (size_t)h * dv, (size_t)dv * sizeof(float));
    }
    int S = pos + 1, group = nq / nkv;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if ((size_t)S * nq * d >= (1u << 15))
    for (int h = 0; h < nq; h++) {
        const float *qh = q + (size_t)h * d, *kh = kc + (size_t)(h / group) * cap * d, *vh = vc + (size_t)(h / group) * cap * dv;
        float *p = scores + (size_t)h * S, mx = -INFINITY, total = 0.f;
        for (int s = 0; s < S; s++) {  // four accumulators: the FMA latency chain is d / 64 long, not d / 16
            const float *kr = kh + (size_t)s * d;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int i = 0;
            for (; i + 64 <= d; i += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(kr + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 16), _mm512_loadu_ps(kr + i + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 32), _mm512_loadu_ps(kr + i + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 48), _mm512_loadu_ps(kr + i + 48), a3);
            }
            for (; i + 16 <= d; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(kr + i), a0);
            float dot = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            for (; i < d; i++) dot += qh[i] * kr[i];
            p[s] = dot * scale;
            mx = fmaxf(mx, p[s]);
        }
        __m512 vmx = _mm512_set1_ps(mx), vt = _mm512_setzero_ps();
        int s = 0;
        for (; s + 16 <= S; s += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + s), vmx));
            _mm512_storeu_ps(p + s, e);
            vt = _mm512_add_ps(vt, e);
        }
        total = _mm512_reduce_add_ps(vt);
        for (; s < S; s++) { p[s] = expf(p[s] - mx); total += p[s]; }
        float inv = 1.f / total, *o = out + (size_t)h * dv;
        int i = 0;
        for (; i + 128 <= dv; i += 128) {  // 8 independent accumulators over positions
            __m512 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm512_setzero_ps();
            for (int s = 0; s < S; s++) {
                __m512 ps = _mm512_set1_ps(p[s]);
                const float *vr = vh + (size_t)s * dv + i;
                for (int c = 0; c < 8; c++) acc[c] = _mm512_fmadd_ps(ps, _mm512_loadu_ps(vr + 16 * c), acc[c]);
            }
            for (int c = 0; c < 8; c++) _mm512_storeu_ps(o + i + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        }
        for (; i + 16 <= dv; i += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int s = 0; s < S; s++) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_loadu_ps(vh + (size_t)s * dv + i), acc);
            _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
        }
        for (; i < dv; i++) {
            float acc = 0.f;
            for (int s = 0; s < S; s++) acc += p[s] * vh[(size_t)s * dv + i];
            o[i] = acc * inv;
        }
    }
}

// Row n of an r16 weight as float32 (see the layout above): out [K].
static void r16_row(const wdesc_t *w, int n, float *out) {
    int G = w->G, ng = w->K / G, b = n / 16, lane = n % 16;
    size_t gb = w->nibble ? G * 8 + (w->hbits ? 64 : 0) : G * 16;
    for (int g = 0; g < ng; g++) {
        size_t sg = ((size_t)b * ng + g) * 16 + lane;
        float sc = _cvtsh_ss(w->scale[sg]), zc = w->zero ? _cvtsh_ss(w->zero[sg]) : -(float)w->offset * sc;
        const uint8_t *cg = w->codes + ((size_t)b * ng + g) * gb;
        for (int step = 0; step < G / 4; step++)
            for (int q = 0; q < 4; q++) {
                int i = lane * 4 + q, c;
                if (w->nibble) {
                    c = (cg[(step / 2) * 64 + i] >> (4 * (step % 2))) & 15;
                    if (w->hbits) c |= ((cg[G * 8 + i] >> (w->hbits * step)) & ((1 << w->hbits) - 1)) << 4;
                } else {
                    c = cg[step * 64 + i];
                }
                out[g * G + step * 4 + q] = sc * (float)c + zc;
            }
    }
}

// Rows ids[0..T) of an r16 weight as float32 (an embedding lookup): out [T, K].
void lm_r16_rows(const wdesc_t *w, const int64_t *ids, int T, float *out) {
    for (int t = 0; t < T; t++) r16_row(w, (int)ids[t], out + (size_t)t * w->K);
}

// Dequantize rows to float32: out [N, K] for a dense GEMM when many tokens share the weights
// (prefill), where MKL's SGEMM beats per-token integer dot products.
void lm_dequant_f32(int K, int N, const uint8_t *codes, int nibble, const uint16_t *scale, const uint16_t *zero,
                    int offset, int G, float *out, int nthreads, const uint8_t *high, int hbits, int r16) {
    job_t j = {0, K, N, G, nibble, offset, codes, scale, zero, 0, 0, 0, 0, high, hbits, r16};
    int nc = K / 64, ng = K / G;
    if (r16) {
        wdesc_t w = {codes, high, scale, zero, N, K, nibble, offset, G, hbits, r16};
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int n = 0; n < N; n++) r16_row(&w, n, out + (size_t)n * K);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (nibble ? K / 2 : K);
        const uint8_t *hrow = high + (size_t)n * (K / 64) * 8 * hbits;
        const uint16_t *sr = scale + (size_t)n * ng, *zr = zero ? zero + (size_t)n * ng : 0;
        for (int c = 0; c < nc; c++) {
            __m512i w = load_codes(&j, row, hrow, c);
            for (int q = 0; q < 4; q++) {  // 16 weights at a time
                int g = (c * 64 + q * 16) / G;
                float sc = _cvtsh_ss(sr[g]), zc = zr ? _cvtsh_ss(zr[g]) : -(float)offset * sc;
                __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, q)));
                f = _mm512_fmadd_ps(f, _mm512_set1_ps(sc), _mm512_set1_ps(zc));
                _mm512_storeu_ps(out + (size_t)n * K + c * 64 + q * 16, f);
            }
        }
    }
}
"""

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> str:
    base = os.environ.get("LOCALMOE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localmoe")
    os.makedirs(base, exist_ok=True)
    return base


def native_lib() -> ctypes.CDLL | None:
    """The compiled C kernel, built once per source version and CPU; None when unavailable
    (not x86 with AVX-512 VNNI, no C compiler, or LOCALMOE_KERNEL=torch). `native_error()` says why."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if os.environ.get("LOCALMOE_KERNEL", "").lower() == "torch":
            _lib_error = "disabled by LOCALMOE_KERNEL=torch"
            return None
        needed = {"avx512f", "avx512bw", "avx512_vnni", "f16c"}
        if not needed <= _cpu_flags():
            _lib_error = "this CPU lacks AVX-512 VNNI"
            return None
        # -march=native: the build is for this CPU, so the CPU's flags are part of the cache key.
        key = hashlib.sha256((_C_SOURCE + sys.platform + " ".join(sorted(_cpu_flags()))).encode()).hexdigest()[:16]
        try:
            so = os.path.join(_cache_dir(), f"kernels-{key}.so")
            if not os.path.exists(so):
                _compile(so)
            lib = ctypes.CDLL(so)
        except (OSError, subprocess.SubprocessError) as exc:
            _lib_error = f"could not build the C kernel: {exc}"
            return None
        f = lib.lm_qmatmul
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        f = lib.lm_qmatvec_multi
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        f = lib.lm_dequant_f32
        f.restype = None
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        f = lib.lm_route
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        f = lib.lm_swiglu_decode
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        f = lib.lm_rms_norm
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
        f = lib.lm_qk_norm_rope
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        f = lib.lm_r16_rows
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        f = lib.lm_attn_decode
        f.restype = None
        f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        _lib = lib
        return lib


def native_error() -> str | None:
    native_lib()
    return _lib_error


def _compile(so: str) -> None:
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernels.c")
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        out = os.path.join(tmp, "kernels.so")
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", src, "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise subprocess.SubprocessError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"{cc} failed")
        os.replace(out, so)  # atomic: concurrent builders never load a half-written file


# -- QLinear: one repacked weight matrix ---------------------------------------------------------
@dataclass
class QLinear:
    """A weight matrix [N, K] in a layout with a fast kernel; `qlinear(x)` computes x @ W.T."""

    backend: str  # "vnni" | "int4" | "bf16" | "f32" | "triton" | "gguf"
    n: int
    k: int
    tensors: dict[str, torch.Tensor]
    offset: int = 0
    group: int = 32
    nibble: bool = False
    bits: int = 8  # bits per code ("vnni": 4-6 → nibbles + a high-bit plane, 8 → bytes)
    qtype: GGMLQuantizationType | None = None  # "gguf": the type of the raw bytes
    r16: bool = False  # "vnni": rows interleaved in blocks of 16 (R16_FORMATS)

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
            return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), t["w"], 32, t["sz"]).float()
        if self.backend == "triton":
            return _triton_matmul(self, x.float())
        if self.backend == "gguf":
            return _gguf_matmul(self, x.float())
        return _vnni_matmul(self, x)


GEMV_ROWS = 8  # "triton": up to this many activation rows run the GEMV kernel (one pass over the weight per row), beyond it the GEMM


def _triton_matmul(w: QLinear, x: torch.Tensor) -> torch.Tensor:
    from . import triton_gguf as tg

    raw = w.tensors["raw"]
    if x.shape[0] <= GEMV_ROWS:
        return tg.gemv(raw, w.qtype.name, w.n, w.k, x)
    return tg.gemm(raw, w.qtype.name, w.n, w.k, x)


def gpu_kernel(qtype: GGMLQuantizationType) -> str:
    """The GPU-side backend for block type `qtype`: "triton" when Triton is importable and has a
    kernel for it, else "gguf" (dequantize + F.linear). LOCALMOE_GPU_KERNEL=gguf forces the latter."""
    if os.environ.get("LOCALMOE_GPU_KERNEL", "triton") == "gguf":
        return "gguf"
    try:
        from . import triton_gguf as tg
    except ImportError:
        return "gguf"
    return "triton" if tg.supports(qtype.name) else "gguf"


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
    zero = w.tensors.get("zero")
    native_lib().lm_dequant_f32(
        kp, w.n, w.tensors["codes"].data_ptr(), int(w.nibble), w.tensors["scale"].data_ptr(),
        zero.data_ptr() if zero is not None else None, w.offset, w.group, out.data_ptr(), torch.get_num_threads(), *_high(w), int(w.r16),
    )
    return out


class _WeightDesc(ctypes.Structure):  # wdesc_t in the C source
    _fields_ = [("codes", ctypes.c_void_p), ("high", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)] + [
        (name, ctypes.c_int) for name in ("N", "K", "nibble", "offset", "G", "hbits", "r16")
    ]


def _desc(w: QLinear) -> _WeightDesc:
    d = w.__dict__.get("_desc")
    if d is None:
        t = w.tensors
        high, hbits = _high(w)
        kp = _kp(w)
        zero = t.get("zero")
        d = _WeightDesc(t["codes"].data_ptr(), high, t["scale"].data_ptr(), zero.data_ptr() if zero is not None else None, w.n, kp, int(w.nibble), w.offset, w.group, hbits, int(w.r16))
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
    rc = native_lib().lm_qmatvec_multi(len(ws), descs, x.data_ptr(), 0 if x.shape[0] == 1 else kp, y.data_ptr(), w0.n, torch.get_num_threads())
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
    if T >= GEMM_ROWS:  # many tokens: dequantize once (exactly), then an SGEMM
        return F.linear(x, dequant_f32(w))
    x = x.contiguous()
    y = torch.empty(T, w.n, dtype=torch.float32)
    if T == 0:
        return y
    zero = w.tensors.get("zero")
    rc = lib.lm_qmatmul(
        x.data_ptr(), T, kp, w.n, w.tensors["codes"].data_ptr(), int(w.nibble), w.tensors["scale"].data_ptr(),
        zero.data_ptr() if zero is not None else None, w.offset, w.group, y.data_ptr(), torch.get_num_threads(), *_high(w), int(w.r16),
    )
    if rc != 0:
        raise MemoryError("lm_qmatmul could not allocate its scratch buffers")
    return y


def choose_backend(qtype: GGMLQuantizationType, device: torch.device, prefer: str | None = None) -> str:
    """The backend for a weight of `qtype` on `device` (see the module docstring)."""
    if device.type != "cpu":
        return "gguf" if qtype in FLOAT_TYPES else gpu_kernel(qtype)
    if qtype == Q.F32:
        return "f32"
    if qtype in FLOAT_TYPES:
        return "bf16"
    if prefer is not None:
        return prefer
    if native_lib() is not None:
        return "vnni"
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
        return "int4"
    return "bf16"


def repack(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int], device: torch.device | str = "cpu", backend: str | None = None) -> QLinear:
    """Raw GGUF data of a [N, K] matrix → a QLinear with `backend` (None → choose_backend's pick)."""
    device = torch.device(device)
    N, K = shape
    backend = backend or choose_backend(qtype, device)
    if backend in ("gguf", "triton"):
        return QLinear(backend, N, K, {"raw": to_device(raw_bytes(raw, N), device)}, qtype=qtype)
    if backend in ("f32", "bf16"):
        dtype = torch.float32 if backend == "f32" else torch.bfloat16
        return QLinear(backend, N, K, {"w": dequantize(raw, qtype, shape).to(device=device, dtype=dtype)})
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"backend {backend} needs a block-quantized type, not {qtype.name}")
    a = decode(raw, qtype, shape)
    if backend == "int4":
        return _pack_int4(a, N, K)
    if backend == "vnni":
        return _pack_vnni(a, N, K)
    raise ValueError(f"unknown backend '{backend}'")


RawMatrix = tuple[np.ndarray, GGMLQuantizationType, tuple[int, int]]  # (GGUF data, quant type, [rows, cols])


def fuse_rows(mats: list[RawMatrix], device: torch.device | str = "cpu") -> QLinear:
    """Stack matrices with the same columns into one QLinear (one matmul for, e.g., gate and up).
    The same quant type: the raw rows are concatenated and repacked. Mixed types (no llama.cpp
    mix does this for gate/up; callers check): dequantized into one bfloat16 matrix."""
    cols = {shape[1] for _, _, shape in mats}
    if len(cols) != 1:
        raise ValueError("fused matrices must have the same number of columns")
    rows = sum(shape[0] for _, _, shape in mats)
    qtypes = {qtype for _, qtype, _ in mats}
    if len(qtypes) == 1:
        raw = torch.cat([raw_bytes(data, shape[0]) for data, _, shape in mats])
        return repack(raw, qtypes.pop(), (rows, cols.pop()), device)
    w = torch.cat([dequantize(*m) for m in mats])
    return QLinear("bf16", rows, cols.pop(), {"w": w.to(device=device, dtype=torch.bfloat16)})


def _pack_vnni(a: Affine, N: int, K: int) -> QLinear:
    if ROW_BLOCKS and (a.bits, a.group) in R16_FORMATS and K % a.group == 0:
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
    c = codes.reshape(nb, 16, ng, G // 4, 4).transpose(0, 2, 3, 1, 4).reshape(nb, ng, G // 4, 64)  # [block, group, step, lane·4]
    if a.bits <= 6:
        low = c & 0x0F
        parts = [low[:, :, 0::2] | (low[:, :, 1::2] << 4)]  # [block, group, G/8, 64]
        if hb:
            shifts = (np.arange(G // 4, dtype=np.uint8) * hb)[None, None, :, None]
            parts.append(np.bitwise_or.reduce((c >> 4) << shifts, axis=2)[:, :, None].astype(np.uint8))  # [block, group, 1, 64]
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
    """torch's int4 layout: w = (code − 8) · scale + zero', group 32, bf16 scales and zeros."""
    if a.bits > 4 or a.group != 32 or K % 32:
        raise ValueError("the int4 backend takes 4-bit codes in groups of 32")
    zero = a.zero if a.zero is not None else -a.offset * a.scale
    zero = zero + 8 * a.scale
    sz = torch.stack([a.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/32, N, 2]
    w = torch._convert_weight_to_int4pack_for_cpu(a.codes.to(torch.int32), 1)
    return QLinear("int4", N, K, {"w": w, "sz": sz})


# -- small fused ops for the decode path (one C call instead of several torch ops) ---------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dimension: the C kernel for CPU float32
    tensors when it is built (per-op overhead dominates at decode), torch otherwise."""
    lib = native_lib()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x, weight = x.contiguous(), weight.contiguous()  # held here: the C call reads their memory
    y = torch.empty_like(x)
    n = x.shape[-1]
    lib.lm_rms_norm(x.data_ptr(), y.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, torch.get_num_threads())
    return y


def qk_norm_rope(qkv: torch.Tensor, n_heads: int, n_q: int, head_dim: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, n_rot: int, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> bool:
    """In place on the first n_heads·head_dim columns of qkv [T, width] (queries, then keys): per-head
    RMS norm (when the weights are given) and RoPE with cos/sin [T, n_rot/2]. False, and nothing
    done, when the C kernel is not available or the tensors do not fit it."""
    lib = native_lib()
    tensors = [t for t in (qkv, cos, sin, q_norm, k_norm) if t is not None]
    if lib is None or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return False
    lib.lm_qk_norm_rope(
        qkv.data_ptr(), qkv.shape[0], qkv.shape[1], n_heads, n_q, head_dim,
        q_norm.data_ptr() if q_norm is not None else None, k_norm.data_ptr() if k_norm is not None else None,
        eps, n_rot, cos.data_ptr(), sin.data_ptr(), int(neox), torch.get_num_threads(),
    )
    return True


def gather_rows(w: QLinear, ids: torch.Tensor) -> torch.Tensor | None:
    """Rows `ids` [T] of an r16 weight [N, K] as float32 [T, K] (an embedding lookup, one C call);
    None when the weight is not in that layout."""
    if w.backend != "vnni" or not w.r16:
        return None
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if any(not 0 <= i < w.n for i in ids.tolist()):  # the C code does not check
        raise IndexError(f"row id out of range for a weight of {w.n} rows")
    out = torch.empty(ids.numel(), _kp(w), dtype=torch.float32)
    native_lib().lm_r16_rows(ctypes.byref(_desc(w)), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out[:, : w.k] if _kp(w) != w.k else out


def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_q: int, n_kv: int, head_dim: int, head_dim_v: int, scale: float) -> torch.Tensor | None:
    """One token's attention in one C call: writes its key and value (from qkv [1, (n_q + n_kv)·d +
    n_kv·dv], q and k already normed and rotated) at `pos` of the caches [n_kv, cap, d] / [n_kv, cap,
    dv], and returns softmax(scale · q·Kᵀ) V over positions 0..pos as [1, n_q·dv]; None when the C
    kernel does not apply (the caller runs torch's attention)."""
    lib = native_lib()
    tensors = (qkv, k_cache, v_cache)
    if lib is None or qkv.shape[0] != 1 or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    out = torch.empty(1, n_q * head_dim_v, dtype=torch.float32)
    scores = torch.empty(n_q, pos + 1, dtype=torch.float32)
    lib.lm_attn_decode(qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], pos, n_q, n_kv, head_dim, head_dim_v, scale,
                       out.data_ptr(), scores.data_ptr(), torch.get_num_threads())
    return out


def route(h: torch.Tensor, router: torch.Tensor, k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The router in one C call: h [T, D] @ router [E, D].T → softmax → top-k (→ renormalised, scaled):
    (ids [T, k] int64, weights [T, k] float32), or None when the C kernel does not apply."""
    lib = native_lib()
    if lib is None or h.device.type != "cpu" or h.dtype != torch.float32 or router.dtype != torch.float32:
        return None
    h, router, T = h.contiguous(), router.contiguous(), h.shape[0]  # held here: the C call reads them
    E, D = router.shape
    ids = torch.empty(T, k, dtype=torch.int64)
    w = torch.empty(T, k, dtype=torch.float32)
    scratch = torch.empty(T, E, dtype=torch.float32)
    lib.lm_route(h.data_ptr(), T, D, router.data_ptr(), E, k, int(norm), scale, ids.data_ptr(), w.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return ids, w


def swiglu_decode(gate_up: list[QLinear], down: list[QLinear], x: torch.Tensor, coef: list[float]) -> torch.Tensor | None:
    """Σ_e coef[e] · down_e(silu(gate_e x) · up_e x) for one row x [1, D] in one C call; None when the
    weights are not all C-kernel weights of one shape per matrix (the caller computes it in torch)."""
    gu_batch, dn_batch = _batch(gate_up, x), _batch(down, None)
    if gu_batch is None or dn_batch is None:
        return None
    (gu, x, _), (dn, _, _) = gu_batch, dn_batch
    w0, d0, E = gate_up[0], down[0], len(gate_up)
    c = torch.tensor(coef, dtype=torch.float32)
    h = torch.empty(E, w0.n, dtype=torch.float32)
    y = torch.empty(1, d0.n, dtype=torch.float32)
    if native_lib().lm_swiglu_decode(E, gu, dn, x.data_ptr(), c.data_ptr(), h.data_ptr(), y.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("lm_swiglu_decode could not allocate its scratch buffers")
    return y
