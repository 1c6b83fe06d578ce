// Many-token matmuls (prefill) through ggml's own graph: ggml_mul_mat on a weight tensor whose data
// is the file's bytes in the memory map (no copy, no repacking), computed by ggml_graph_compute.
// ggml then picks what llama.cpp itself runs for a plain CPU buffer: its tiled loop over vec_dot
// with the activations quantized once, or llamafile's tinyBLAS kernels where the type has them
// (Q8_0, Q4_0, ...) — 1.3-2.6x the per-row driver (ggml_driver.c) at 128 tokens on the machine we
// measure on. One token (decode) stays on the driver: a graph costs more than it saves there.
//
// Compiled against the ggml headers installed with llama-cpp-python (site-packages/include) and
// linked to its libggml-base / libggml-cpu, so struct layouts are the installed library's own; the
// build key includes the headers' hash (cbuild).
#include <stdlib.h>
#include <string.h>

#include "ggml-cpu.h"
#include "ggml.h"

static struct ggml_threadpool *pool = NULL;
static int pool_threads = 0;

// y [T, N] = x [T, K] (float32, rows ldx floats apart... contiguous here) @ W [N, K].T, W of ggml type
// `type` with rows row_bytes apart starting at w. Returns 0, or a negative code.
int lgg_matmul(int type, const void *w, int64_t N, int64_t K, int64_t row_bytes, int T, const float *x, float *y, int nthreads) {
    if (row_bytes != (int64_t)ggml_row_size((enum ggml_type)type, K)) return -3;  // rows must be contiguous
    size_t mem = ggml_tensor_overhead() * 8 + ggml_graph_overhead_custom(8, false) + 1024;
    struct ggml_init_params ip = {mem, NULL, true};
    struct ggml_context *ctx = ggml_init(ip);
    if (!ctx) return -1;
    struct ggml_tensor *wt = ggml_new_tensor_2d(ctx, (enum ggml_type)type, K, N);
    wt->data = (void *)w;
    struct ggml_tensor *xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, T);
    xt->data = (void *)x;
    struct ggml_tensor *yt = ggml_mul_mat(ctx, wt, xt);
    yt->data = y;
    struct ggml_cgraph *gf = ggml_new_graph_custom(ctx, 8, false);
    ggml_build_forward_expand(gf, yt);
    if (pool == NULL || pool_threads != nthreads) {  // one pool, remade when the thread count changes
        if (pool) ggml_threadpool_free(pool);
        struct ggml_threadpool_params p = ggml_threadpool_params_default(nthreads);
        pool = ggml_threadpool_new(&p);
        pool_threads = nthreads;
    }
    struct ggml_cplan cp = ggml_graph_plan(gf, nthreads, pool);
    uint8_t *work = cp.work_size ? malloc(cp.work_size) : NULL;
    if (cp.work_size && !work) { ggml_free(ctx); return -1; }
    cp.work_data = work;
    int rc = ggml_graph_compute(gf, &cp) == GGML_STATUS_SUCCESS ? 0 : -2;
    free(work);
    ggml_free(ctx);
    return rc;
}
