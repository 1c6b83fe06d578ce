// Pieces both CPU libraries compute the same way (vnni.c for AVX-512, ggml_driver.c everywhere):
// the router's softmax and top-k, the row-wise RMS norm, the per-head q/k norm + RoPE (and the
// row loops both export over them), and the decode attention's KV-cache append. Static
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

// A decode token's key and value (qkv = [q: nq heads x d | k: nkv x d | v: nkv x dv]) written at
// position pos of a layer's caches k [nkv, cap, d], v [nkv, cap, dv] (both attention kernels' first step).
static inline void append_kv(const float *qkv, float *kc, float *vc, int cap, int pos, int nq, int nkv, int d, int dv) {
    const float *kn = qkv + (size_t)nq * d, *vn = kn + (size_t)nkv * d;
    for (int h = 0; h < nkv; h++) {
        memcpy(kc + ((size_t)h * cap + pos) * d, kn + (size_t)h * d, (size_t)d * sizeof(float));
        memcpy(vc + ((size_t)h * cap + pos) * dv, vn + (size_t)h * dv, (size_t)dv * sizeof(float));
    }
}

#endif
