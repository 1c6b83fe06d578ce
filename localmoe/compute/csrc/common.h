// Pieces both CPU libraries compute the same way (vnni.c for AVX-512, ggml_driver.c everywhere):
// the router's softmax and top-k, the row-wise RMS norm, the per-head q/k norm + RoPE (and the
// row loops both export over them), and the decode attention's KV-cache append and window start. Static
// inline, so each library compiles them with its own flags; the arithmetic is written once, and
// cbuild.py's cache key covers this header, so a change here rebuilds both.
#ifndef LOCALMOE_COMMON_H
#define LOCALMOE_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

// One token's router probabilities from its logits p[E] (in place: softmax over the E experts),
// then the k largest (ties: the lower id first) into ids[k] and wts[k], renormalised to sum 1 when
// norm (with llama.cpp's floor on the sum), times scale when scale is neither 0 nor 1.
static inline void softmax_topk(float *p, int E, int k, int norm, float scale, int64_t *ids, float *wts) {
    float mx = p[0], total = 0.f;
    for (int e = 1; e < E; e++) mx = fmaxf(mx, p[e]);
    for (int e = 0; e < E; e++) { p[e] = expf(p[e] - mx); total += p[e]; }
    for (int e = 0; e < E; e++) p[e] /= total;
    float picked = 0.f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < j; q++) taken |= ids[q] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        wts[j] = p[best];
        picked += p[best];
    }
    float div = norm ? fmaxf(picked, 6.103515625e-5f) : 1.f;
    for (int j = 0; j < k; j++) {
        float w = wts[j] / div;
        wts[j] = (scale != 0.f && scale != 1.f) ? w * scale : w;
    }
}

// 1 / sqrt(mean(x[0..n)^2) + eps), the sum in double: a sequential float sum would round more than
// torch's blocked one.
static inline float rms_inv(const float *x, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return 1.f / sqrtf((float)(ss / n) + eps);
}

// One row: y[:] = x[:] / sqrt(mean(x^2) + eps) * w (w has n values).
static inline void rms_norm_row(const float *x, float *y, int n, const float *w, float eps) {
    float inv = rms_inv(x, n, eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

// One token row in place: nh heads of d floats, the first nq of them queries. Each head is
// RMS-normed with qw (queries) or kw (keys) when those are given, then its first 2·half dims
// rotated with c/s [half]: neox pairs (i, i + half), otherwise adjacent pairs (2i, 2i + 1).
static inline void qk_norm_rope_row(float *row, int nh, int nq, int d, const float *qw, const float *kw, float eps,
                                    int half, const float *c, const float *s, int neox) {
    for (int h = 0; h < nh; h++) {
        float *x = row + (size_t)h * d;
        const float *w = h < nq ? qw : kw;
        if (w) rms_norm_row(x, x, d, w, eps);
        for (int i = 0; i < half; i++) {
            int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
            float x0 = x[a], x1 = x[b];
            x[a] = x0 * c[i] - x1 * s[i];
            x[b] = x0 * s[i] + x1 * c[i];
        }
    }
}

// The exported row loops (vnni.c's lm_rms_norm / lm_qk_norm_rope, ggml_driver.c's lg_*): the row
// helpers above over `rows` token rows, the threads splitting rows only when there are 16 or more.
static inline void rms_norm_rows(const float *x, float *y, int rows, int n, const float *w, float eps, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows >= 16)
    for (int r = 0; r < rows; r++) rms_norm_row(x + (size_t)r * n, y + (size_t)r * n, n, w, eps);
}

// q/k norm + RoPE in place on each token row of buf (row stride `stride` floats), cos/sin [rows, n_rot / 2].
static inline void qk_norm_rope_rows(float *buf, int rows, int stride, int nh, int nq, int d, const float *qw,
                                     const float *kw, float eps, int n_rot, const float *cosv, const float *sinv,
                                     int neox, int nthreads) {
    int half = n_rot / 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows >= 16)
    for (int r = 0; r < rows; r++)
        qk_norm_rope_row(buf + (size_t)r * stride, nh, nq, d, qw, kw, eps, half, cosv + (size_t)r * half,
                         sinv + (size_t)r * half, neox);
}

// The KV cache's element: IEEE half precision, as llama.cpp's default cache (compute/kernels.KV_DTYPE, torch.float16).
// Half the bytes of float32: a decode step reads every cached key and value once a layer, 16 MB a token at
// 48 layers and 80 positions, 400 MB at 2048 in float32 (docs/speed.md). _Float16 where the compiler
// has it (GCC 12+, Clang 15+; F16C or Arm's fp16 make the conversions one vector instruction), else
// the bits converted by hand (also with LOCALMOE_KV_BITS defined: tests/test_kernels.py checks them);
// either way float -> half rounds to nearest even, as torch's .half() does.
#if defined(__FLT16_MAX__) && !defined(LOCALMOE_KV_BITS)
typedef _Float16 kv_t;
static inline float kv_float(kv_t h) { return (float)h; }
static inline kv_t kv_half(float f) { return (kv_t)f; }
#else
typedef uint16_t kv_t;
static inline float kv_float(kv_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);       // inf, NaN
    else if (e) u = sign | ((e + 112u) << 23) | (m << 13);   // normal: rebias 15 -> 127
    else {                                                    // zero, subnormal: m * 2^-24
        f = (float)m * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    memcpy(&f, &u, 4);
    return f;
}
static inline kv_t kv_half(float f) {
    uint32_t u, sign;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u >= 0x47800000u) return (kv_t)(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));  // >= 65536: inf; NaN
    if (u < 0x38800000u) {  // below 2^-14: a subnormal half (or zero); the float add rounds to nearest even
        float v, magic = 0.5f;  // 2^-1: its ulp is 2^-24, the half subnormals' step
        memcpy(&v, &u, 4);
        v += magic;
        memcpy(&u, &v, 4);
        return (kv_t)(sign | (u - 0x3f000000u));
    }
    u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias 127 -> 15 (mod 2^32) and round to nearest even
    return (kv_t)(sign | (u >> 13));
}
#endif

// The first cached position a decode query at `pos` attends to: with a sliding window (n_swa > 0,
// llama.cpp's and layers/attention.py's attend_explicit's rule) the last n_swa positions, itself
// included; without one, position 0. The decode attention reads rows lo..pos only.
static inline int attn_window_start(int pos, int n_swa) { return n_swa > 0 && pos + 1 > n_swa ? pos + 1 - n_swa : 0; }

// A decode token's key and value (qkv = [q: nq heads x d | k: nkv x d | v: nkv x dv], float32) written
// at position pos of a layer's caches k [nkv, cap, d], v [nkv, cap, dv] (kv_t; both attention kernels'
// first step).
static inline void append_kv(const float *qkv, kv_t *kc, kv_t *vc, int cap, int pos, int nq, int nkv, int d, int dv) {
    const float *kn = qkv + (size_t)nq * d, *vn = kn + (size_t)nkv * d;
    for (int h = 0; h < nkv; h++) {
        kv_t *kr = kc + ((size_t)h * cap + pos) * d, *vr = vc + ((size_t)h * cap + pos) * dv;
        for (int i = 0; i < d; i++) kr[i] = kv_half(kn[(size_t)h * d + i]);
        for (int i = 0; i < dv; i++) vr[i] = kv_half(vn[(size_t)h * dv + i]);
    }
}

#endif
