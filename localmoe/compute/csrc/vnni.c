// y[t, n] = sum_i w[n, i] * x[t, i] for weights stored as w = scale * code + zero per group of G.
// x is quantized per 32 values as llama.cpp quantizes activations (Q8_0): xq = round(x · 127 / max|x|),
// dx = max|x| / 127 rounded to float16. One VPDPBUSD per 64-weight chunk (u8 codes x s8 activations, 16 int32 lanes
// of 4 products each), scaled in float by weight scale x dx per lane. The zero term,
// sum_g zero[n, g] * sum_{i in g} xq[t, i] * dx, uses the sums of the quantized x.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"  // the router's softmax/top-k, RMS norm, q/k norm + RoPE: shared with ggml_driver.c

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
    int ablock;                       // values per activation scale: 32 (llama.cpp's Q8_0) or 256 (Q8_K, for the K-types)
    const uint16_t *kd, *kdmin;       // kmode: float16 [nb, K / 256, 16] super-block scale d (and dmin) of each row
    int kmode;                        // 0: scale/zero are float16 per group; K_UNSIGNED / K_SIGNED: the K-types' own
                                      // sub-scales, one byte per group and row (scale: sc, zero: mn, both uint8; Q6_K's
                                      // sc int8), the group's scale d·sc and zero −dmin·mn made exactly in float32
} job_t;

enum { K_NONE = 0, K_UNSIGNED = 1, K_SIGNED = 2 };

// The float32 scale and zero of group g of row block b for the 16 lanes (rows) of an r16 weight:
// float16 values, or (kmode) d·sc and −dmin·mn from the K-types' bytes. Symmetric types (no zero):
// zero = −offset·scale.
static inline void r16_scale_zero(const uint16_t *scale, const uint16_t *zero, const uint16_t *kd, const uint16_t *kdmin,
                                  int kmode, int G, int K, int offset, int b, int g, __m512 *s, __m512 *z) {
    const int ng = K / G;
    if (kmode) {
        const int nsb = K / 256, sbi = g / (256 / G);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kd + ((size_t)b * nsb + sbi) * 16)));
        const __m128i sc = _mm_loadu_si128((const __m128i *)((const uint8_t *)scale + ((size_t)b * ng + g) * 16));
        *s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(kmode == K_SIGNED ? _mm512_cvtepi8_epi32(sc) : _mm512_cvtepu8_epi32(sc)));
        if (zero) {
            const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kdmin + ((size_t)b * nsb + sbi) * 16)));
            const __m128i mn = _mm_loadu_si128((const __m128i *)((const uint8_t *)zero + ((size_t)b * ng + g) * 16));
            *z = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dm), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
        } else {
            *z = _mm512_mul_ps(*s, _mm512_set1_ps(-(float)offset));
        }
        return;
    }
    const size_t o = ((size_t)b * ng + g) * 16;
    *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + o)));
    *z = zero ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zero + o))) : _mm512_mul_ps(*s, _mm512_set1_ps(-(float)offset));
}

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
            __m512 s, z;                                                                             \
            r16_scale_zero(j->scale, j->zero, j->kd, j->kdmin, j->kmode, G, j->K, j->offset, b, g, &s, &z); \
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

static void quantize_x(const float *x, int T, int K, int G, int ablock, int8_t *xq, float *dxg, float *xs) {
    // ablock 32: as llama.cpp's quantize_row_q8_0, codes round(x·127/amax) (to nearest even) and the
    // scale the dot products use, amax/127, rounded to float16 (block_q8_0's d). ablock 256: as its
    // quantize_row_q8_K (the K-types' activations), codes round(x·127/amax) and the float32 scale
    // 1/(127/amax) (its sign flip, x·(−127/max) with max the signed extreme, gives the same products).
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * K;
        for (int b = 0; b < K / ablock; b++) {
            const float *xb = xr + (size_t)b * ablock;
            int8_t *qb = xq + (size_t)t * K + (size_t)b * ablock;
            float amax = 0.f;
            for (int i = 0; i < ablock; i++) amax = fmaxf(amax, fabsf(xb[i]));
            float id = amax > 0.f ? 127.f / amax : 0.f, d;
            if (ablock == 32)
                d = _cvtsh_ss(_cvtss_sh(amax / 127.f, _MM_FROUND_TO_NEAREST_INT));
            else
                d = amax > 0.f ? 1.f / id : 0.f;
            for (int i = 0; i < ablock; i++) qb[i] = (int8_t)nearbyintf(xb[i] * id);
            // the zero term uses the sums of the *quantized* x, so the result is exactly W @ x_q and
            // its error W @ (x_q - x) (with exact sums, uncentred codes would amplify the error)
            for (int g = b * ablock / G; g < (b + 1) * ablock / G; g++) {
                int sum = 0;
                for (int i = 0; i < G; i++) sum += xq[(size_t)t * K + g * G + i];
                xs[(size_t)t * (K / G) + g] = d * (float)sum;
                dxg[(size_t)t * (K / G) + g] = d;
            }
        }
    }
}

int lm_qmatmul(const float *x, int T, int K, int N, const uint8_t *codes, int nibble, const uint16_t *scale,
               const uint16_t *zero, int offset, int G, float *y, int nthreads, const uint8_t *high, int hbits, int r16, int ablock,
               const uint16_t *kd, const uint16_t *kdmin, int kmode) {
    int8_t *xq = aligned_alloc(64, (size_t)T * K + 64);
    float *dxg = aligned_alloc(64, ((size_t)T * (K / 16) + 16) * 4);
    float *xs = aligned_alloc(64, ((size_t)T * (K / 16) + 16) * 4);
    if (!xq || !dxg || !xs) { free(xq); free(dxg); free(xs); return -1; }
    quantize_x(x, T, K, G, ablock, xq, dxg, xs);
    job_t j = {T, K, N, G, nibble, offset, codes, scale, zero, xq, dxg, xs, y, high, hbits, r16, ablock, kd, kdmin, kmode};
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
    int ablock;  // values per activation scale (job_t's)
    const uint16_t *kd, *kdmin;
    int kmode;   // (job_t's)
} wdesc_t;

// A job for weight w (a wdesc_t) on T rows of quantized activations (xq, dxg, xs as quantize_x
// writes them) into y [T, w->N].
static inline job_t desc_job(const wdesc_t *w, int T, const int8_t *xq, const float *dxg, const float *xs, float *y) {
    job_t j = {T, w->K, w->N, w->G, w->nibble, w->offset, w->codes, w->scale, w->zero, xq, dxg, xs, y,
               w->high, w->hbits, w->r16, w->ablock, w->kd, w->kdmin, w->kmode};
    return j;
}

// lm_qmatvec_multi with weight e's output at ys[e] (outputs of different lengths, e.g. q | k | v).
static int qmatvec_multi(int E, const wdesc_t *w, const float *x, int x_stride, float *const *ys, int nthreads) {
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
        jobs[e] = desc_job(&w[e], 1, xq, (float *)(xq + nq), (float *)(xq + nq + nd), ys[e]);
    }
    if (ok) {
        start[0] = 0;
        for (int e = 0; e < E; e++) start[e + 1] = start[e] + job_items(&jobs[e]);
        #pragma omp parallel num_threads(nthreads)
        {
            // a shared x (x_stride 0) is quantized once when every weight has its K and G
            int shared = x_stride == 0;
            for (int e = 1; e < E; e++) shared &= jobs[e].K == jobs[0].K && jobs[e].G == jobs[0].G && jobs[e].ablock == jobs[0].ablock;
            #pragma omp for schedule(static)
            for (int e = 0; e < E; e++)
                if (!shared || e == 0)
                    quantize_x(x + (size_t)e * x_stride, 1, jobs[e].K, jobs[e].G, jobs[e].ablock, (int8_t *)jobs[e].xq, (float *)jobs[e].dxg, (float *)jobs[e].xs);
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

int lm_qmatvec_multi(int E, const wdesc_t *w, const float *x, int x_stride, float *y, int y_stride, int nthreads) {
    float **ys = malloc((size_t)E * sizeof(float *));
    if (!ys) return -1;
    for (int e = 0; e < E; e++) ys[e] = y + (size_t)e * y_stride;
    int rc = qmatvec_multi(E, w, x, x_stride, ys, nthreads);
    free(ys);
    return rc;
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
    for (int t = 0; t < T; t++)
        softmax_topk(scratch + (size_t)t * E, E, k, norm, scale, ids + (size_t)t * k, wts + (size_t)t * k);
}

// Row-wise RMS norm: y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w (w has n values).
void lm_rms_norm(const float *x, float *y, int rows, int n, const float *w, float eps, int nthreads) {
    rms_norm_rows(x, y, rows, n, w, eps, nthreads);
}

// In place on the q and k heads at the start of each of `rows` token rows (row stride `stride`
// floats): nh heads of d floats, the first nq of them queries. Each head is RMS-normed with qw
// (queries) or kw (keys) when those are given, then its first n_rot dims rotated with cos/sin
// [rows, n_rot / 2]: neox pairs (i, i + n_rot / 2), otherwise adjacent pairs (2i, 2i + 1).
void lm_qk_norm_rope(float *buf, int rows, int stride, int nh, int nq, int d, const float *qw, const float *kw,
                     float eps, int n_rot, const float *cosv, const float *sinv, int neox, int nthreads) {
    qk_norm_rope_rows(buf, rows, stride, nh, nq, d, qw, kw, eps, n_rot, cosv, sinv, neox, nthreads);
}

// e^x for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7), times 2^n; x below -87 counts as -87 (e^x then < 2e-38), x above 88.7 gives inf, as
// expf does. Scalar expf made a decode step's softmax cost more than its dot products, and the
// experts' SiLU 1.3 ms of a 48-layer token (docs/speed.md).
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

// Seconds spent in each step of a decode token (lm_decode_layer's, and lm_swiglu_decode's wherever
// it runs), summed over the process: scripts/token-profile reads them around a stream
// (compute/fused_decode.PHASES names them, in this order). One clock read a step, 11 a layer: ~530
// reads of ~26 ns (measured here) in a 48-layer token, 0.02% of its ~60 ms.
enum { PH_QKV, PH_ROPE, PH_ATTN, PH_WO, PH_NORM, PH_ROUTE, PH_GATE_UP, PH_ACT, PH_DOWN, PH_N };
static double phase_s[PH_N];
void lm_phase_seconds(double *out) { memcpy(out, phase_s, sizeof phase_s); }
static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
// the time since t to step ph; t becomes now
#define LAP(ph, t) do { double now_ = now_s(); phase_s[ph] += now_ - (t); (t) = now_; } while (0)

// One row of gate | up (g = gu[0..F), u = gu[F..2F)) → a[0..F) = silu(g) · u, and a[F..Kd) = 0 (the
// padding columns of the down weights).
static inline void swiglu_row(const float *gu, int F, float *a, int Kd) {
    const float *g = gu, *u = gu + F;
    int i = 0;
    for (; i + 16 <= F; i += 16) {  // silu(g) · u = g / (1 + e^-g) · u
        __m512 gv = _mm512_loadu_ps(g + i), e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u + i)));
    }
    for (; i < F; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    for (i = F; i < Kd; i++) a[i] = 0.f;
}

// The routed experts of one decode token: y = sum_e c[e] * down_e(silu(gate_e x) * up_e x), with every
// expert's gate+up rows in one parallel pass and every down row in another. h: scratch [E, 2 F].
int lm_swiglu_decode(int E, const wdesc_t *gu, const wdesc_t *dn, const float *x, const float *c, float *h, float *y, int nthreads) {
    int F = gu[0].N / 2, D = dn[0].N;
    float *act = malloc((size_t)E * dn[0].K * sizeof(float)), *out = malloc((size_t)E * D * sizeof(float));
    if (!act || !out) { free(act); free(out); return -1; }
    double t = now_s();
    int rc = lm_qmatvec_multi(E, gu, x, 0, h, 2 * F, nthreads);
    LAP(PH_GATE_UP, t);
    if (rc == 0) {
        for (int e = 0; e < E; e++) swiglu_row(h + (size_t)e * 2 * F, F, act + (size_t)e * dn[0].K, dn[0].K);
        LAP(PH_ACT, t);
        rc = lm_qmatvec_multi(E, dn, act, dn[0].K, out, D, nthreads);
        LAP(PH_DOWN, t);
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

// o[i] += c · y[i] with the product rounded to float before the sum, as torch's
// `out.index_add_(0, tok, y * w)` rounds it (the empty asm keeps any compiler from fusing the two).
static inline void add_scaled(float *o, const float *y, float c, int n) {
    __m512 cv = _mm512_set1_ps(c);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 p = _mm512_mul_ps(cv, _mm512_maskz_loadu_ps(m, y + i));
        __asm__("" : "+v"(p));
        _mm512_mask_storeu_ps(o + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o + i), p));
    }
}

// Token rows per pass of one expert in lm_swiglu_prefill: its scratch is bounded whatever the
// prompt (a multiple of 4, so the 4-token tiles group the rows as one lm_qmatmul call would).
#define PREFILL_ROWS 256

// The routed experts of a prompt in one call: for expert j (0..E-1, in the order given: the Python
// loop's, sorted ids), its token rows rows[offsets[j]..offsets[j+1]) of x [T, gu.K] and their router
// weights coefs[same]: out[row] += coef · down_j(silu(gate_j x[row]) · up_j x[row]) (out [T, dn.N]).
// Each matmul is lm_qmatmul's arithmetic on the expert's rows (quantize_x, then job_rows): the same
// products as one lm_qmatmul per matrix and expert; the SiLU is lm_swiglu_decode's. The experts run
// one after another, each stage split over the threads in one parallel region, so every output
// element sums its experts' terms in the given order. Scratch: PREFILL_ROWS rows of each stage.
int lm_swiglu_prefill(int E, const wdesc_t *gu, const wdesc_t *dn, const float *x, const int64_t *rows,
                      const int *offsets, const float *coefs, float *out, int nthreads) {
    if (E <= 0) return 0;
    int K = gu[0].K, F2 = gu[0].N, Kd = dn[0].K, D = dn[0].N, Kx = K > Kd ? K : Kd, nmax = 0;
    for (int j = 0; j < E; j++) {
        int n = offsets[j + 1] - offsets[j];
        if (n > nmax) nmax = n;
    }
    if (nmax > PREFILL_ROWS) nmax = PREFILL_ROWS;
    if (nmax == 0) return 0;
    int8_t *xq = aligned_alloc(64, ((size_t)nmax * Kx + 64 + 63) / 64 * 64);
    float *dxg = aligned_alloc(64, ((size_t)nmax * (Kx / 16) + 16) * 4);
    float *xs = aligned_alloc(64, ((size_t)nmax * (Kx / 16) + 16) * 4);
    float *h = aligned_alloc(64, ((size_t)nmax * F2 * 4 + 63) / 64 * 64);
    float *act = aligned_alloc(64, ((size_t)nmax * Kd * 4 + 63) / 64 * 64);
    float *y = aligned_alloc(64, ((size_t)nmax * D * 4 + 63) / 64 * 64);
    int ok = xq && dxg && xs && h && act && y;
    if (ok) {
        #pragma omp parallel num_threads(nthreads)
        for (int j = 0; j < E; j++)
            for (int p0 = offsets[j]; p0 < offsets[j + 1]; p0 += PREFILL_ROWS) {  // every thread takes every pass
                int n = offsets[j + 1] - p0 < PREFILL_ROWS ? offsets[j + 1] - p0 : PREFILL_ROWS;
                const int64_t *r = rows + p0;
                const float *c = coefs + p0;
                int Gu = gu[j].G, Gd = dn[j].G;
                job_t jg = desc_job(&gu[j], n, xq, dxg, xs, h), jd = desc_job(&dn[j], n, xq, dxg, xs, y);
                #pragma omp for schedule(static)
                for (int t = 0; t < n; t++)  // the expert's rows of x, quantized as lm_qmatmul does
                    quantize_x(x + (size_t)r[t] * K, 1, K, Gu, gu[j].ablock, xq + (size_t)t * K, dxg + (size_t)t * (K / Gu),
                               xs + (size_t)t * (K / Gu));
                #pragma omp for schedule(static)
                for (int b = 0; b < job_items(&jg); b++) job_rows(&jg, b, group_index(Gu));
                #pragma omp for schedule(static)
                for (int t = 0; t < n; t++) {
                    float *a = act + (size_t)t * Kd;
                    swiglu_row(h + (size_t)t * F2, F2 / 2, a, Kd);
                    quantize_x(a, 1, Kd, Gd, dn[j].ablock, xq + (size_t)t * Kd, dxg + (size_t)t * (Kd / Gd), xs + (size_t)t * (Kd / Gd));
                }
                #pragma omp for schedule(static)
                for (int b = 0; b < job_items(&jd); b++) job_rows(&jd, b, group_index(Gd));
                // out[r[t]] += c[t] · y[t], threads split by columns, each column's rows in order (as
                // index_add_ adds them, a token listed twice included)
                #pragma omp for schedule(static)
                for (int c0 = 0; c0 < D; c0 += 64) {
                    int c1 = c0 + 64 < D ? c0 + 64 : D;
                    for (int t = 0; t < n; t++) {
                        float *o = out + (size_t)r[t] * D;
                        const float *yt = y + (size_t)t * D;
                        add_scaled(o + c0, yt + c0, c[t], c1 - c0);
                    }
                }
            }
    }
    free(xq); free(dxg); free(xs); free(h); free(act); free(y);
    return ok ? 0 : -1;
}

// Attention of one new token (decode) against the KV cache, after q/k norm and RoPE: appends its
// key and value (from qkv = [q: nq heads x d | k: nkv x d | v: nkv x dv]) at position `pos` of the
// per-layer cache k [nkv, cap, d], v [nkv, cap, dv] (half precision, common.h's kv_t), then for each
// query head h (KV head h / (nq / nkv)): out[h] = softmax(scale * q_h . k[lo..pos]) @ v[lo..pos]. out:
// [nq, dv]. The cache's halves become floats as they are loaded (one vcvtph2ps per 16); the heads of a
// group read their KV head's rows after the first has brought them into L2.
// As llama.cpp (and layers/attention.py's attend_explicit): a sliding window n_swa > 0 keeps the last
// n_swa positions, lo = max(0, pos + 1 - n_swa), else lo = 0; only those rows are read, so a windowed
// layer's work is the window's, not the context's. sinks [nq] or NULL: one more logit per head,
// unscaled, in the softmax's max and denominator only (it takes probability mass, adds no value).
// scores: scratch [nq, pos + 1 - lo].
static inline __m512 load_kv16(const kv_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

void lm_attn_decode(const float *qkv, kv_t *kc, kv_t *vc, int cap, int pos, int nq, int nkv, int d, int dv,
                    float scale, int n_swa, const float *sinks, float *out, float *scores, int nthreads) {
    const float *q = qkv;
    append_kv(qkv, kc, vc, cap, pos, nq, nkv, d, dv);
    int lo = attn_window_start(pos, n_swa);
    int S = pos + 1 - lo, group = nq / nkv;  // S positions lo..pos; below, s counts from lo
    #pragma omp parallel for schedule(static) num_threads(nthreads) if ((size_t)S * nq * d >= (1u << 15))
    for (int h = 0; h < nq; h++) {
        const float *qh = q + (size_t)h * d;
        const kv_t *kh = kc + ((size_t)(h / group) * cap + lo) * d, *vh = vc + ((size_t)(h / group) * cap + lo) * dv;
        float *p = scores + (size_t)h * S, mx = sinks ? sinks[h] : -INFINITY, total = 0.f;
        for (int s = 0; s < S; s++) {  // four accumulators: the FMA latency chain is d / 64 long, not d / 16
            const kv_t *kr = kh + (size_t)s * d;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int i = 0;
            for (; i + 64 <= d; i += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load_kv16(kr + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 16), load_kv16(kr + i + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 32), load_kv16(kr + i + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 48), load_kv16(kr + i + 48), a3);
            }
            for (; i + 16 <= d; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load_kv16(kr + i), a0);
            float dot = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            for (; i < d; i++) dot += qh[i] * kv_float(kr[i]);
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
        if (sinks) total += expf(sinks[h] - mx);  // (a sink of -inf adds 0)
        float inv = 1.f / total, *o = out + (size_t)h * dv;
        int i = 0;
        for (; i + 128 <= dv; i += 128) {  // 8 independent accumulators over positions
            __m512 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm512_setzero_ps();
            for (int s = 0; s < S; s++) {
                __m512 ps = _mm512_set1_ps(p[s]);
                const kv_t *vr = vh + (size_t)s * dv + i;
                for (int c = 0; c < 8; c++) acc[c] = _mm512_fmadd_ps(ps, load_kv16(vr + 16 * c), acc[c]);
            }
            for (int c = 0; c < 8; c++) _mm512_storeu_ps(o + i + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        }
        for (; i + 16 <= dv; i += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int s = 0; s < S; s++) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), load_kv16(vh + (size_t)s * dv + i), acc);
            _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
        }
        for (; i < dv; i++) {
            float acc = 0.f;
            for (int s = 0; s < S; s++) acc += p[s] * kv_float(vh[(size_t)s * dv + i]);
            o[i] = acc * inv;
        }
    }
}

// Row n of an r16 weight as float32 (see the layout above): out [K].
static void r16_row(const wdesc_t *w, int n, float *out) {
    int G = w->G, ng = w->K / G, b = n / 16, lane = n % 16;
    size_t gb = w->nibble ? G * 8 + (w->hbits ? 64 : 0) : G * 16;
    for (int g = 0; g < ng; g++) {
        __m512 sv, zv;
        r16_scale_zero(w->scale, w->zero, w->kd, w->kdmin, w->kmode, G, w->K, w->offset, b, g, &sv, &zv);
        float sl[16], zl[16];
        _mm512_storeu_ps(sl, sv);
        _mm512_storeu_ps(zl, zv);
        float sc = sl[lane], zc = zl[lane];
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
                    int offset, int G, float *out, int nthreads, const uint8_t *high, int hbits, int r16,
                    const uint16_t *kd, const uint16_t *kdmin, int kmode) {
    job_t j = {0, K, N, G, nibble, offset, codes, scale, zero, 0, 0, 0, 0, high, hbits, r16, 32, kd, kdmin, kmode};
    int nc = K / 64, ng = K / G;
    if (r16) {
        wdesc_t w = {codes, high, scale, zero, N, K, nibble, offset, G, hbits, r16, 32, kd, kdmin, kmode};
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

// ---------------------------------------------------------------------------------------------
// Repacking GGUF blocks into the r16 layout above, straight from the file's bytes (what
// kernels.py's _pack_r16 computes with torch and numpy, ~40x slower: 10-20 ms per Qwen3-30B-A3B
// expert there, well under a millisecond here). One 16-row block per task, blocks split across
// threads. Per block and group of G weights: the low nibbles as G/8 rows of 64 bytes (byte
// lane*4 + j of row p = code(step 2p) | code(step 2p + 1) << 4, step s = weights 4s..4s+3), then
// for 5/6-bit codes a 64-byte plane of the bits above the nibble (step s at bit hb*s); 8-bit codes
// as G/4 rows of 64 bytes. Scales (and zeros) as float16 [block, group, lane], rounded to nearest
// even like numpy's astype(float16). Padding rows: codes 0, scale 0, zero 0.

// ggml type ids (ggml.h)
enum { GT_Q4_0 = 2, GT_Q4_1 = 3, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14 };

static inline float f16_to_f32(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// Per type: weights per block, bytes per block, the layout's group G, bits per code, a zero per group.
// Returns 0 for a type this repacker does not know.
static int block_geometry(int qtype, int *per, int *size, int *G, int *bits, int *has_zero) {
    switch (qtype) {
    case GT_Q4_0: *per = 32; *size = 18; *G = 32; *bits = 4; *has_zero = 0; return 1;
    case GT_Q4_1: *per = 32; *size = 20; *G = 32; *bits = 4; *has_zero = 1; return 1;
    case GT_Q5_0: *per = 32; *size = 22; *G = 32; *bits = 5; *has_zero = 0; return 1;
    case GT_Q5_1: *per = 32; *size = 24; *G = 32; *bits = 5; *has_zero = 1; return 1;
    case GT_Q8_0: *per = 32; *size = 34; *G = 32; *bits = 8; *has_zero = 0; return 1;
    case GT_Q4_K: *per = 256; *size = 144; *G = 32; *bits = 4; *has_zero = 1; return 1;
    case GT_Q5_K: *per = 256; *size = 176; *G = 32; *bits = 5; *has_zero = 1; return 1;
    case GT_Q6_K: *per = 256; *size = 210; *G = 16; *bits = 6; *has_zero = 0; return 1;
    }
    return 0;
}

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

// spread4[x]: the 4 bits of x one per byte (bit k → bit 0 of byte k)
static const uint32_t spread4[16] = {
    0x00000000u, 0x00000001u, 0x00000100u, 0x00000101u, 0x00010000u, 0x00010001u, 0x00010100u, 0x00010101u,
    0x01000000u, 0x01000001u, 0x01000100u, 0x01000101u, 0x01010000u, 0x01010001u, 0x01010100u, 0x01010101u,
};

// The scales (and zeros) of one block of the type: one per group of G weights in it.
static void block_scales(int qtype, const uint8_t *b, float *scale, float *zero) {
    switch (qtype) {
    case GT_Q4_0: case GT_Q5_0: case GT_Q8_0: scale[0] = f16_to_f32(b); break;
    case GT_Q4_1: case GT_Q5_1: scale[0] = f16_to_f32(b); zero[0] = f16_to_f32(b + 2); break;
    case GT_Q4_K: case GT_Q5_K: {
        const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
        const uint8_t *sc12 = b + 4;
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            if (j < 4) { sc = sc12[j] & 63; mn = sc12[j + 4] & 63; }
            else { sc = (sc12[j + 4] & 0x0F) | ((sc12[j - 4] >> 6) << 4); mn = (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4); }
            scale[j] = d * (float)sc;
            zero[j] = -dmin * (float)mn;
        }
        break;
    }
    case GT_Q6_K: {
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16_to_f32(b + 208);
        for (int g = 0; g < 16; g++) scale[g] = d * (float)sc[g];
        break;
    }
    }
}

// The K-types' own scales of one 256-weight block (kmode): the raw float16 d (and dmin) and, per group,
// the sub-scale sc (and min mn) as bytes (Q4_K/Q5_K: 6-bit unsigned; Q6_K: int8).
static void block_kscales(int qtype, const uint8_t *b, uint8_t *sc, uint8_t *mn, uint16_t *d, uint16_t *dmin) {
    if (qtype == GT_Q6_K) {
        memcpy(sc, b + 192, 16);
        memcpy(d, b + 208, 2);
        return;
    }
    memcpy(d, b, 2);
    memcpy(dmin, b + 2, 2);
    const uint8_t *sc12 = b + 4;
    for (int j = 0; j < 8; j++) {
        if (j < 4) { sc[j] = sc12[j] & 63; mn[j] = sc12[j + 4] & 63; }
        else { sc[j] = (sc12[j + 4] & 0x0F) | ((sc12[j - 4] >> 6) << 4); mn[j] = (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4); }
    }
}

// The codes of group gi of one block, four per word: w[s] holds weights 4s..4s+3 of the group
// (byte j = weight 4s + j), as unsigned codes (the type's offset is the kernel's).
static inline void group_words(int qtype, const uint8_t *b, int gi, uint32_t *w) {
    const uint32_t m = 0x0F0F0F0Fu;
    switch (qtype) {
    case GT_Q4_0: case GT_Q4_1: case GT_Q5_0: case GT_Q5_1: {  // weight i < 16: low nibble of qs[i]; else the high one of qs[i - 16]
        const int q5 = qtype == GT_Q5_0 || qtype == GT_Q5_1, m1 = qtype == GT_Q4_1 || qtype == GT_Q5_1;
        const uint8_t *qs = b + 2 + (m1 ? 2 : 0) + (q5 ? 4 : 0);
        uint32_t qh = q5 ? ld32(b + 2 + (m1 ? 2 : 0)) : 0;  // bit i: the fifth bit of weight i
        for (int st = 0; st < 8; st++) {
            const uint32_t v = st < 4 ? ld32(qs + 4 * st) & m : (ld32(qs + 4 * (st - 4)) >> 4) & m;
            w[st] = q5 ? v | (spread4[(qh >> (4 * st)) & 15] << 4) : v;
        }
        break;
    }
    case GT_Q8_0:  // int8 + 128 as a byte: the sign bit flipped
        for (int st = 0; st < 8; st++) w[st] = ld32(b + 2 + 4 * st) ^ 0x80808080u;
        break;
    case GT_Q4_K: case GT_Q5_K: {  // sub-block j: the low (j even) or high (j odd) nibbles of qs[32 (j / 2) ..]
        const uint8_t *qs = b + (qtype == GT_Q5_K ? 48 : 16) + (gi / 2) * 32, *qh = b + 16;
        const int sh = 4 * (gi % 2);
        for (int st = 0; st < 8; st++) {
            uint32_t v = (ld32(qs + 4 * st) >> sh) & m;
            if (qtype == GT_Q5_K) v |= ((ld32(qh + 4 * st) >> gi) & 0x01010101u) << 4;  // bit j of qh[l]: weight l of sub-block j
            w[st] = v;
        }
        break;
    }
    case GT_Q6_K: {  // weight i = 128 h + 32 q + l: nibble q / 2 of ql[64 h + 32 (q % 2) + l], bits 2q.. of qh[32 h + l]
        const int h = gi / 8, q = (gi % 8) / 2, l0 = (gi % 2) * 16;
        const uint8_t *ql = b + h * 64 + 32 * (q % 2) + l0, *qh = b + 128 + h * 32 + l0;
        for (int st = 0; st < 4; st++)
            w[st] = ((ld32(ql + 4 * st) >> (4 * (q / 2))) & m) | (((ld32(qh + 4 * st) >> (2 * q)) & 0x03030303u) << 4);
        break;
    }
    }
}

// raw: [N, K / per * size] as in the file; codes: [nb, K / G * bytes per group]; scale, zero:
// [nb, K / G, 16] float16 (zero NULL for types without one). kmode (the K-types only): scale and
// zero are bytes [nb, K / G, 16] (sc, mn) and kd, kdmin float16 [nb, K / 256, 16] (d, dmin), as
// job_t reads them. 0 on success, -1: unknown type or K, or kmode for a type without super-blocks.
int lm_repack_r16(int qtype, const uint8_t *raw, int N, int K, uint8_t *codes, uint16_t *scale, uint16_t *zero, int nthreads,
                  int kmode, uint16_t *kd, uint16_t *kdmin) {
    int per, size, G, bits, has_zero;
    if (!block_geometry(qtype, &per, &size, &G, &bits, &has_zero) || K % per) return -1;
    if (kmode && per != 256) return -1;
    const int nsb = K / 256;
    const int nb = (N + 15) / 16, ng = K / G, hb = bits <= 6 ? (bits > 4 ? bits - 4 : 0) : 0;
    const int bpg = bits <= 6 ? G / 8 * 64 + (hb ? 64 : 0) : G / 4 * 64;  // code bytes per block and group
    const size_t row_bytes = (size_t)(K / per) * size;
    #pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads > 0 ? nthreads : 1)
    for (int blk = 0; blk < nb; blk++) {
        const int gpb = per / G;  // groups per block of the type
        const uint32_t low = 0x0F0F0F0Fu, hmask = hb == 1 ? 0x01010101u : 0x03030303u;
        uint8_t *cb = codes + (size_t)blk * ng * bpg;
        uint16_t *sb = scale + (size_t)blk * ng * 16, *zb = zero ? zero + (size_t)blk * ng * 16 : NULL;
        uint8_t *sb8 = (uint8_t *)scale + (size_t)blk * ng * 16, *zb8 = zero ? (uint8_t *)zero + (size_t)blk * ng * 16 : NULL;
        for (int lane = 0; lane < 16; lane++) {
            const int n = blk * 16 + lane;
            if (n >= N) {  // padding row: codes 0, scale 0, zero 0
                for (int g = 0; g < ng; g++) {
                    uint8_t *out = cb + (size_t)g * bpg;
                    for (int r = 0; r < bpg / 64; r++) memset(out + r * 64 + lane * 4, 0, 4);
                    if (kmode) {
                        sb8[g * 16 + lane] = 0;
                        if (zb8) zb8[g * 16 + lane] = 0;
                    } else {
                        sb[g * 16 + lane] = 0;
                        if (zb) zb[g * 16 + lane] = 0;
                    }
                }
                for (int kb = 0; kmode && kb < nsb; kb++) {
                    kd[((size_t)blk * nsb + kb) * 16 + lane] = 0;
                    if (kdmin) kdmin[((size_t)blk * nsb + kb) * 16 + lane] = 0;
                }
                continue;
            }
            const uint8_t *row = raw + (size_t)n * row_bytes;
            for (int kb = 0; kb < K / per; kb++) {
                const uint8_t *b = row + (size_t)kb * size;
                float sc[16], zr[16] = {0};
                uint8_t ksc[16], kmn[16] = {0};
                if (kmode) {
                    uint16_t d = 0, dmin = 0;
                    block_kscales(qtype, b, ksc, kmn, &d, &dmin);
                    kd[((size_t)blk * nsb + kb) * 16 + lane] = d;
                    if (kdmin) kdmin[((size_t)blk * nsb + kb) * 16 + lane] = dmin;
                } else {
                    block_scales(qtype, b, sc, zr);
                }
                for (int gi = 0; gi < gpb; gi++) {
                    const int g = kb * gpb + gi;
                    uint8_t *out = cb + (size_t)g * bpg;
                    if (kmode) {
                        sb8[g * 16 + lane] = ksc[gi];
                        if (zb8) zb8[g * 16 + lane] = kmn[gi];
                    } else {
                        sb[g * 16 + lane] = f32_to_f16(sc[gi]);
                        if (zb) zb[g * 16 + lane] = f32_to_f16(zr[gi]);
                    }
                    uint32_t w[8];  // G / 4 ≤ 8 steps of four codes
                    group_words(qtype, b, gi, w);
                    if (bits == 8) {
                        for (int st = 0; st < G / 4; st++) memcpy(out + st * 64 + lane * 4, &w[st], 4);
                        continue;
                    }
                    for (int p = 0; p < G / 8; p++) {
                        const uint32_t v = (w[2 * p] & low) | ((w[2 * p + 1] & low) << 4);
                        memcpy(out + p * 64 + lane * 4, &v, 4);
                    }
                    if (hb) {
                        uint32_t v = 0;
                        for (int st = 0; st < G / 4; st++) v |= ((w[st] >> 4) & hmask) << (hb * st);
                        memcpy(out + G / 8 * 64 + lane * 4, &v, 4);
                    }
                }
            }
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// One decode token through one llama-style MoE layer in one call (compute/fused_decode.py): the
// same C steps the Python decode path calls one by one, in the same order on the same buffers, so
// the result is the same to the bit. Between those dozen calls Python spent ~0.1-0.15 ms a layer,
// 5-7 ms of a 48-layer token (docs/speed.md).
//   h = rms_norm(x) · attn_norm;  qkv = Wqkv h;  q/k norm + RoPE;  att = attention over the cache
//   x += Wo att;  h = rms_norm(x) · ffn_norm;  (ids, wts) = route(h);  x += Σ wts · expert(h)
typedef struct {
    const float *attn_rms, *ffn_rms;    // [D]: the RMS norms' weights
    const float *q_rms, *k_rms;         // [d] per head, or NULL (no q/k norm)
    const float *router;                // [E, D]
    const wdesc_t *qkv, *wo;            // n_qkv weights whose rows stack to [(nq + nkv) d + nkv dv, D]; [D, nq dv]; K unpadded
    const wdesc_t *gate_up, *down;      // [E] each: every expert of the layer, resident
    int n_qkv, D, nq, nkv, d, dv, n_rot, neox, E, k, norm_topk;
    float eps, kq_scale, w_scale;
} lm_layer_t;

static int matvec1(const wdesc_t *w, const float *x, float *y, int nthreads) {
    return lm_qmatmul(x, 1, w->K, w->N, w->codes, w->nibble, w->scale, w->zero, w->offset, w->G, y, nthreads,
                      w->high, w->hbits, w->r16, w->ablock, w->kd, w->kdmin, w->kmode);
}

// x [D] updated in place; the layer's cache kc [nkv, cap, d], vc [nkv, cap, dv] gets position pos;
// cosv/sinv [n_rot / 2] at pos; ids [k] / wts [k] receive the routing. 0, or -1 when out of memory.
static int lm_decode_layer(const lm_layer_t *L, float *x, kv_t *kc, kv_t *vc, int cap, int pos, const float *cosv,
                           const float *sinv, int64_t *ids, float *wts, int nthreads) {
    int D = L->D, nqkv = 0, k = L->k, F2 = L->gate_up[0].N;
    for (int j = 0; j < L->n_qkv; j++) nqkv += L->qkv[j].N;
    size_t n = (size_t)D + nqkv + (size_t)L->nq * L->dv + D + (size_t)L->nq * (pos + 1) + L->E + (size_t)k * F2 + D;
    float *buf = malloc(n * sizeof(float));
    wdesc_t *sel = malloc(2 * (size_t)k * sizeof(wdesc_t));
    if (!buf || !sel) { free(buf); free(sel); return -1; }
    float *h = buf, *qkv = h + D, *att = qkv + nqkv, *o = att + (size_t)L->nq * L->dv, *scores = o + D;
    float *rscratch = scores + (size_t)L->nq * (pos + 1), *gu = rscratch + L->E, *y = gu + (size_t)k * F2;
    int rc;
    double t = now_s();
    lm_rms_norm(x, h, 1, D, L->attn_rms, L->eps, nthreads);
    float *qkv_at[3];  // q | k | v (one weight, or one per type) in one parallel pass, x quantized once
    for (int j = 0, at = 0; j < L->n_qkv; at += L->qkv[j].N, j++) qkv_at[j] = qkv + at;
    rc = qmatvec_multi(L->n_qkv, L->qkv, h, 0, qkv_at, nthreads);
    LAP(PH_QKV, t);
    if (rc == 0) {
        lm_qk_norm_rope(qkv, 1, nqkv, L->nq + L->nkv, L->nq, L->d, L->q_rms, L->k_rms, L->eps, L->n_rot, cosv, sinv,
                        L->neox, nthreads);
        LAP(PH_ROPE, t);
        lm_attn_decode(qkv, kc, vc, cap, pos, L->nq, L->nkv, L->d, L->dv, L->kq_scale, 0, NULL, att, scores, nthreads);
        LAP(PH_ATTN, t);
        rc = matvec1(L->wo, att, o, nthreads);
        LAP(PH_WO, t);
    }
    if (rc == 0) {
        for (int i = 0; i < D; i++) x[i] = x[i] + o[i];
        lm_rms_norm(x, h, 1, D, L->ffn_rms, L->eps, nthreads);
        LAP(PH_NORM, t);
        lm_route(h, 1, D, L->router, L->E, k, L->norm_topk, L->w_scale, ids, wts, rscratch, nthreads);
        LAP(PH_ROUTE, t);
        for (int j = 0; j < k; j++) { sel[j] = L->gate_up[ids[j]]; sel[k + j] = L->down[ids[j]]; }
        rc = lm_swiglu_decode(k, sel, sel + k, h, wts, gu, y, nthreads);
    }
    if (rc == 0)
        for (int i = 0; i < D; i++) x[i] = x[i] + y[i];
    free(buf); free(sel);
    return rc;
}

// n consecutive layers of one decode token in one call (x updated in place): lm_decode_layer on each
// in turn, layer j with its caches kc[j], vc[j] and routing ids [j, k], wts [j, k]. One call per
// token instead of one per layer: a call from Python costs ~20 us, ~1 ms of a 48-layer token.
int lm_decode_layers(int n, const lm_layer_t *const *L, float *x, kv_t *const *kc, kv_t *const *vc, int cap, int pos,
                     const float *cosv, const float *sinv, int64_t *ids, float *wts, int nthreads) {
    for (int j = 0; j < n; j++) {
        int rc = lm_decode_layer(L[j], x, kc[j], vc[j], cap, pos, cosv, sinv, ids + (size_t)j * L[j]->k,
                                 wts + (size_t)j * L[j]->k, nthreads);
        if (rc != 0) return rc;
    }
    return 0;
}

// A whole decode token after its embedding, in one call from Python: the n layers (lm_decode_layers,
// every layer of the model), the routed uses of layer j added to uses [n, E] (running totals, read
// by Python when the stats are looked at), then the output head on the RMS-normed last hidden
// state: logits [head->N]. x [D] is left as that hidden state, unnormed. A token's Python steps
// between these calls (the rope table slice, the use count, the norm and the head's wrapper) ran
// with caches the weights had just swept: ~0.2 ms of a 4-layer Qwen3-30B-A3B token (docs/speed.md).
int lm_decode_token(int n, const lm_layer_t *const *L, float *x, kv_t *const *kc, kv_t *const *vc, int cap, int pos,
                    const float *cosv, const float *sinv, int64_t *ids, float *wts, int64_t *uses, const float *out_rms,
                    float eps, const wdesc_t *head, float *logits, int nthreads) {
    int rc = lm_decode_layers(n, L, x, kc, vc, cap, pos, cosv, sinv, ids, wts, nthreads);
    if (rc != 0) return rc;
    for (int j = 0; j < n; j++)  // (ids [n, k] as lm_decode_layers writes them)
        for (int t = 0; t < L[j]->k; t++) uses[(size_t)j * L[j]->E + ids[(size_t)j * L[j]->k + t]]++;
    int D = L[0]->D;
    float *h = malloc((size_t)D * sizeof(float));
    if (!h) return -1;
    lm_rms_norm(x, h, 1, D, out_rms, eps, nthreads);
    rc = matvec1(head, h, logits, nthreads);
    free(h);
    return rc;
}
