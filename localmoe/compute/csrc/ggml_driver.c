// Drives ggml's own CPU kernels (libggml-cpu, shipped with llama-cpp-python) over weight rows as
// they are stored in the GGUF file: no repacking, no copy (the rows are read from the memory map).
//
// For a weight of ggml type T, ggml_get_type_traits_cpu(T) gives vec_dot (a row of T against an
// activation row in vec_dot_type) and vec_dot_type; the from_float of vec_dot_type's traits
// quantizes the activations (Q8_0 for the 32-weight types, Q8_K for the K- and IQ-types). Python
// looks those function pointers up with ctypes and passes them here; this file only splits rows
// across threads (OpenMP), so it is plain C with no ISA requirement: ggml picks the SIMD code for
// this CPU at run time (AVX2, AVX-512, NEON, ...).
//
// Also here: portable versions of the small decode-path helpers (RMS norm, q/k norm + RoPE, the
// router, one token's attention) for CPUs without the AVX-512 kernel (vnni.c has the same
// signatures), written so that -O3 vectorises them for whatever the CPU has; the pieces both
// files compute alike live in common.h.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"  // the router's softmax/top-k, RMS norm, q/k norm + RoPE: shared with vnni.c

typedef void (*vec_dot_t)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
typedef void (*from_float_t)(const float *x, void *y, int64_t k);
typedef void (*to_float_t)(const void *x, float *y, int64_t k);

// One weight matrix (or a segment of rows of a fused one) as stored in the file.
typedef struct {
    const uint8_t *data;     // row 0
    int64_t row_bytes;       // stride between rows
    int64_t N, K;            // rows, weights per row
    vec_dot_t vec_dot;
    from_float_t from_float; // of vec_dot_type: quantizes an activation row
    int64_t q_row_bytes;     // bytes of one activation row of K values in vec_dot_type
} lg_w_t;

#define ROWS_PER_ITEM 16  // rows per work item: small enough to balance 2-16 threads, large enough to amortise
#define PREFETCH_ROWS 2   // rows ahead whose bytes are prefetched while a row is multiplied

// Rows [n0, n1) of w against one quantized activation row: out[n - n0]. ggml's vec_dot kernels have no
// software prefetch; reading rows from RAM, the row PREFETCH_ROWS ahead is requested while this one is
// multiplied.
static inline void dot_rows(const lg_w_t *w, int64_t n0, int64_t n1, const void *xq, float *out) {
    const int64_t lines = (w->row_bytes + 63) / 64;
    for (int64_t n = n0; n < n1; n++) {
        if (n + PREFETCH_ROWS < w->N) {
            const char *p = (const char *)(w->data + (n + PREFETCH_ROWS) * w->row_bytes);
            for (int64_t l = 0; l < lines; l++) __builtin_prefetch(p + l * 64, 0, 0);
        }
        w->vec_dot((int)w->K, out + (n - n0), 0, w->data + n * w->row_bytes, 0, xq, 0, 1);
    }
}

// Work sharing of the row loops: schedule(runtime), static by default (each thread reads one
// contiguous run of rows: the hardware prefetchers' best case); lg_set_schedule changes it.
#include <omp.h>
void lg_set_schedule(int kind, int chunk) { omp_set_schedule((omp_sched_t)kind, chunk); }

// Activations quantized once per distinct from_float among the segments (at most 4 kinds).
typedef struct {
    from_float_t fn[4];
    int64_t bytes[4];
    uint8_t *buf[4];
    int n;
} qx_t;

static int qx_slot(qx_t *q, from_float_t fn, int64_t bytes) {
    for (int i = 0; i < q->n; i++)
        if (q->fn[i] == fn && q->bytes[i] == bytes) return i;
    if (q->n == 4) return -1;
    q->fn[q->n] = fn;
    q->bytes[q->n] = bytes;
    q->buf[q->n] = NULL;
    return q->n++;
}

static void qx_free(qx_t *q) {
    for (int i = 0; i < q->n; i++) free(q->buf[i]);
}

// y[t, :] = concat over segments s of W_s @ x[t] for T rows of x [T, K] (ldx floats apart); y [T, ldy].
// Work items: blocks of ROWS_PER_ITEM rows of one segment, each against every token (the block's
// bytes stay in cache across the tokens). Returns 0, or -1 when scratch memory is short.
int lg_matmul(int nseg, const lg_w_t *w, int T, const float *x, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    if (T <= 0 || nseg <= 0) return 0;
    qx_t q = {0};
    int slot[16];
    if (nseg > 16) return -2;
    for (int s = 0; s < nseg; s++) {
        slot[s] = qx_slot(&q, w[s].from_float, w[s].q_row_bytes);
        if (slot[s] < 0) return -2;
    }
    for (int i = 0; i < q.n; i++) {
        q.buf[i] = malloc((size_t)T * q.bytes[i]);
        if (!q.buf[i]) { qx_free(&q); return -1; }
    }
    int64_t items = 0, first[17], col[17];
    for (int s = 0; s < nseg; s++) {
        first[s] = items;
        col[s] = s ? col[s - 1] + w[s - 1].N : 0;
        items += (w[s].N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    }
    first[nseg] = items;
    const int64_t K = w[0].K;
    #pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)q.n * T; r++) {
            int i = (int)(r / T);
            int64_t t = r % T;
            q.fn[i](x + t * ldx, q.buf[i] + t * q.bytes[i], K);
        }
        #pragma omp for schedule(runtime)
        for (int64_t it = 0; it < items; it++) {
            int s = 0;
            while (it >= first[s + 1]) s++;
            const lg_w_t *ws = &w[s];
            int64_t n0 = (it - first[s]) * ROWS_PER_ITEM, n1 = n0 + ROWS_PER_ITEM < ws->N ? n0 + ROWS_PER_ITEM : ws->N;
            const uint8_t *xq = q.buf[slot[s]];
            for (int64_t t = 0; t < T; t++)
                dot_rows(ws, n0, n1, xq + t * q.bytes[slot[s]], y + t * ldy + col[s] + n0);
        }
    }
    qx_free(&q);
    return 0;
}

// The activations between an expert's gate|up and down (layers: experts.swiglu_act's names).
enum { ACT_SWIGLU = 0, ACT_SWIGLU_OAI = 1 };
#define OAI_ALPHA 1.702f
#define OAI_LIMIT 7.0f

// The k routed experts of one decode token, in one call:
//     y = sum_e c[e] * (down_e(act(gate_e x + gb_e, up_e x + ub_e)) + db_e)
// act: silu(g) * u (ACT_SWIGLU), or gpt-oss's clamped one (ACT_SWIGLU_OAI): g' = min(g, 7),
// u' = clamp(u, -7, 7), g' * sigmoid(1.702 g') * (u' + 1). The biases gb[e], ub[e] [F] and db[e]
// [D] may be NULL (the arrays too: no biases). gate[e], up[e]: [F, D]; down[e]: [D, F]. One
// parallel region: x quantized once per activation type, every expert's gate and up rows, the
// activation and each expert's activation quantized for its down type, every down row, then the
// weighted sum. Returns 0, or -1 when scratch memory is short.
int lg_moe_decode(int E, const lg_w_t *gate, const lg_w_t *up, const lg_w_t *down, const float *x, const float *c,
                  const float *const *gb, const float *const *ub, const float *const *db, int act, float *y, int nthreads) {
    if (E <= 0) return 0;
    const int64_t F = gate[0].N, D = down[0].N;
    qx_t q = {0};
    int *gs = malloc(sizeof(int) * 2 * (size_t)E);
    if (!gs) return -1;
    int64_t aq_bytes = 0;
    for (int e = 0; e < E; e++) {
        gs[e] = qx_slot(&q, gate[e].from_float, gate[e].q_row_bytes);
        gs[E + e] = qx_slot(&q, up[e].from_float, up[e].q_row_bytes);
        if (gs[e] < 0 || gs[E + e] < 0 || gate[e].N != F || up[e].N != F || down[e].N != D || down[e].K != F) { free(gs); return -2; }
        if (down[e].q_row_bytes > aq_bytes) aq_bytes = down[e].q_row_bytes;
    }
    float *h = malloc(sizeof(float) * (size_t)E * 2 * F), *out = malloc(sizeof(float) * (size_t)E * D);
    uint8_t *aq = malloc((size_t)E * aq_bytes);
    int ok = h && out && aq;
    for (int i = 0; i < q.n && ok; i++) ok = (q.buf[i] = malloc(q.bytes[i])) != NULL;
    if (!ok) { free(h); free(out); free(aq); free(gs); qx_free(&q); return -1; }
    const int64_t gu_items = (F + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, dn_items = (D + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int i = 0; i < q.n; i++) q.fn[i](x, q.buf[i], gate[0].K);
        #pragma omp for schedule(runtime)
        for (int64_t it = 0; it < (int64_t)E * 2 * gu_items; it++) {  // expert e, gate (m = 0) or up (m = 1), row block b
            int e = (int)(it / (2 * gu_items)), m = (int)(it / gu_items % 2);
            int64_t n0 = it % gu_items * ROWS_PER_ITEM, n1 = n0 + ROWS_PER_ITEM < F ? n0 + ROWS_PER_ITEM : F;
            const lg_w_t *w = m ? &up[e] : &gate[e];
            dot_rows(w, n0, n1, q.buf[gs[m * E + e]], h + ((size_t)e * 2 + m) * F + n0);
        }
        #pragma omp for schedule(static)
        for (int e = 0; e < E; e++) {
            float *g = h + (size_t)e * 2 * F, *u = g + F;
            const float *gbe = gb ? gb[e] : NULL, *ube = ub ? ub[e] : NULL;
            if (gbe) for (int64_t i = 0; i < F; i++) g[i] += gbe[i];
            if (ube) for (int64_t i = 0; i < F; i++) u[i] += ube[i];
            if (act == ACT_SWIGLU_OAI)
                for (int64_t i = 0; i < F; i++) {  // in place: g becomes the activation
                    float gc = fminf(g[i], OAI_LIMIT), uc = fminf(fmaxf(u[i], -OAI_LIMIT), OAI_LIMIT);
                    g[i] = gc / (1.f + expf(-OAI_ALPHA * gc)) * (uc + 1.f);
                }
            else
                for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
            down[e].from_float(g, aq + (size_t)e * aq_bytes, F);
        }
        #pragma omp for schedule(runtime)
        for (int64_t it = 0; it < (int64_t)E * dn_items; it++) {
            int e = (int)(it / dn_items);
            int64_t n0 = it % dn_items * ROWS_PER_ITEM, n1 = n0 + ROWS_PER_ITEM < D ? n0 + ROWS_PER_ITEM : D;
            dot_rows(&down[e], n0, n1, aq + (size_t)e * aq_bytes, out + (size_t)e * D + n0);
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < D; i++) {
            float s = 0.f;
            for (int e = 0; e < E; e++) {
                const float *dbe = db ? db[e] : NULL;
                s += c[e] * (dbe ? out[(size_t)e * D + i] + dbe[i] : out[(size_t)e * D + i]);
            }
            y[i] = s;
        }
    }
    free(h); free(out); free(aq); free(gs); qx_free(&q);
    return 0;
}

// Rows ids[0..T) of a matrix as float32 (an embedding lookup): out [T, K].
void lg_rows(const uint8_t *data, int64_t row_bytes, to_float_t to_float, const int64_t *ids, int T, int64_t K, float *out) {
    for (int t = 0; t < T; t++) to_float(data + ids[t] * row_bytes, out + (size_t)t * K, K);
}

// A whole [N, K] matrix as float32 (rows split across threads): out [N, K].
void lg_to_float(const uint8_t *data, int64_t row_bytes, to_float_t to_float, int64_t N, int64_t K, float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) to_float(data + n * row_bytes, out + n * K, K);
}

// ---- Portable decode helpers (vnni.c has AVX-512 versions with the same signatures) -------------
// Sums of products in 16 independent lanes, so -O3 vectorises them without reassociating floats.
static inline float dot16(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void lg_route(const float *x, int T, int D, const float *W, int E, int k, int norm, float scale,
              int64_t *ids, float *wts, float *scratch, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if ((size_t)E * D * T >= (1u << 16))
    for (int r = 0; r < T * E; r++) scratch[r] = dot16(W + (size_t)(r % E) * D, x + (size_t)(r / E) * D, D);
    for (int t = 0; t < T; t++)
        softmax_topk(scratch + (size_t)t * E, E, k, norm, scale, ids + (size_t)t * k, wts + (size_t)t * k);
}

void lg_rms_norm(const float *x, float *y, int rows, int n, const float *w, float eps, int nthreads) {
    rms_norm_rows(x, y, rows, n, w, eps, nthreads);
}

void lg_qk_norm_rope(float *buf, int rows, int stride, int nh, int nq, int d, const float *qw, const float *kw,
                     float eps, int n_rot, const float *cosv, const float *sinv, int neox, int nthreads) {
    qk_norm_rope_rows(buf, rows, stride, nh, nq, d, qw, kw, eps, n_rot, cosv, sinv, neox, nthreads);
}

// dot16 with b a row of the KV cache (kv_t): the same 16 lanes, each half converted as it is read.
static float dot16_kv(const float *a, const kv_t *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * kv_float(b[i + l]);
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += a[i] * kv_float(b[i]);
    return s;
}

// One new token's attention against the KV cache (see lm_attn_decode in vnni.c): appends its key and
// value at `pos` (the cache in half precision, common.h's kv_t), then out[h] = softmax(scale * q_h .
// k[lo..pos]) @ v[lo..pos] per query head (GQA): lo = max(0, pos + 1 - n_swa) with a sliding window
// (n_swa > 0), else 0, only those rows read; sinks [nq] or NULL: one more unscaled logit per head, in
// the softmax's max and denominator only. scores: scratch [nq, pos + 1 - lo].
void lg_attn_decode(const float *qkv, kv_t *kc, kv_t *vc, int cap, int pos, int nq, int nkv, int d, int dv,
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
        for (int s = 0; s < S; s++) {
            p[s] = dot16_kv(qh, kh + (size_t)s * d, d) * scale;
            mx = fmaxf(mx, p[s]);
        }
        for (int s = 0; s < S; s++) { p[s] = expf(p[s] - mx); total += p[s]; }
        if (sinks) total += expf(sinks[h] - mx);  // (a sink of -inf adds 0)
        float *o = out + (size_t)h * dv, inv = 1.f / total;
        for (int i = 0; i < dv; i++) o[i] = 0.f;
        for (int s = 0; s < S; s++) {
            const kv_t *vr = vh + (size_t)s * dv;
            float ps = p[s] * inv;
            for (int i = 0; i < dv; i++) o[i] += ps * kv_float(vr[i]);
        }
    }
}

// T tokens of a Gated DeltaNet layer, one after another (layers/deltanet.py has the math): the
// causal conv over q, k, v with its rolling state, SiLU, the L2 norms of q and k, the gated delta
// rule on the state, and the RMS norm of the output gated by silu(z), in one call: the torch ops of
// a decode step cost ~1.4 ms a layer at the 35B-A3B shape (this: 0.14 ms), and a prompt's chunked
// torch form ~0.4-0.6 ms a token (this: ~0.14, the state staying in cache from token to token).
// proj [T, C + Hv·dv + 2·Hv], rows [q k v | z | β logits | α]; conv_state [C, K − 1] (oldest input
// first), conv_w [C, K]; dt_bias, A [Hv]; norm_w [dv]; S [Hv, dk, dv] advanced in place; out
// [T, Hv·dv]; scratch [C]. Value head h reads key head h mod Hk.
void lg_deltanet_step(const float *proj0, float *conv_state, const float *conv_w, int C, int K, int Hk, int Hv,
                      int dk, int dv, const float *dt_bias, const float *A, const float *norm_w, float eps,
                      float *S, float *out0, float *scratch, int T, int nthreads) {
    const size_t P = (size_t)C + (size_t)Hv * dv + 2 * (size_t)Hv;
    for (int t = 0; t < T; t++) {
        const float *proj = proj0 + (size_t)t * P;
        float *out = out0 + (size_t)t * Hv * dv;
        float *y = scratch;
        for (int c = 0; c < C; c++) {
            float *st = conv_state + (size_t)c * (K - 1);
            const float *w = conv_w + (size_t)c * K;
            float acc = 0.f;
            for (int j = 0; j < K - 1; j++) acc += st[j] * w[j];
            acc += proj[c] * w[K - 1];
            for (int j = 0; j + 1 < K - 1; j++) st[j] = st[j + 1];
            if (K > 1) st[K - 2] = proj[c];
            y[c] = acc / (1.f + expf(-acc));
        }
        const float qscale = 1.f / sqrtf((float)dk);
        for (int h = 0; h < 2 * Hk; h++) {  // q heads, then k heads: x / max(‖x‖, eps) (ggml_l2_norm); q also / √dk
            float *x = y + (size_t)h * dk;
            double ss = 0.0;
            for (int i = 0; i < dk; i++) ss += (double)x[i] * x[i];
            float n = sqrtf((float)ss), inv = 1.f / (n > eps ? n : eps);
            if (h < Hk) inv *= qscale;
            for (int i = 0; i < dk; i++) x[i] *= inv;
        }
        const float *v = y + (size_t)2 * Hk * dk, *z = proj + C, *bl = proj + C + (size_t)Hv * dv, *al = bl + Hv;
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int h = 0; h < Hv; h++) {
            const float *q = y + (size_t)(h % Hk) * dk, *k = y + (size_t)(Hk + h % Hk) * dk, *vh = v + (size_t)h * dv;
            float g = al[h] + dt_bias[h];
            g = (g > 20.f ? g : log1pf(expf(g))) * A[h];
            const float decay = expf(g), beta = 1.f / (1.f + expf(-bl[h]));
            float *Sh = S + (size_t)h * dk * dv;
            float sk[dv], d[dv], o[dv];
            for (int j = 0; j < dv; j++) sk[j] = 0.f, o[j] = 0.f;
            for (int i = 0; i < dk; i++) {  // Sᵀk of the state before the decay
                const float *row = Sh + (size_t)i * dv, ki = k[i];
                for (int j = 0; j < dv; j++) sk[j] += row[j] * ki;
            }
            for (int j = 0; j < dv; j++) d[j] = (vh[j] - decay * sk[j]) * beta;
            for (int i = 0; i < dk; i++) {  // S = decay·S + k ⊗ d, o = Sᵀq, in one pass
                float *row = Sh + (size_t)i * dv;
                const float ki = k[i], qi = q[i];
                for (int j = 0; j < dv; j++) {
                    float s = decay * row[j] + ki * d[j];
                    row[j] = s;
                    o[j] += s * qi;
                }
            }
            double ss = 0.0;
            for (int j = 0; j < dv; j++) ss += (double)o[j] * o[j];
            const float inv = 1.f / sqrtf((float)(ss / dv) + eps);
            const float *zh = z + (size_t)h * dv;
            float *oh = out + (size_t)h * dv;
            for (int j = 0; j < dv; j++) oh[j] = o[j] * inv * norm_w[j] * (zh[j] / (1.f + expf(-zh[j])));
        }
    }
}
