/* SVD for LoRA extraction on the GPU: cuSOLVER's Jacobi SVD (cusolverDnSgesvdj, economy, sorted
 * singular values) of one float32 matrix at a time. Used by ops_extract when the context's
 * backend is CUDA; without CUDA compiled in, or without a usable device, ops_gpu_svd_open
 * answers LORA_E_NO_GPU and the extraction runs on the CPU.
 *
 * Row-major A [m, n] is column-major A^T [n, m], so the SVD cuSOLVER computes is
 * A^T = U' S V'^T, i.e. A = V' S U'^T: up = V'_r S_r [m, r] and down = U'_r^T [r, n] (the first
 * r columns of U', each contiguous, are exactly the rows of down). */
#include <string.h>

#include "internal.h"
#include "ops/ops.h"

#if LORA_HAVE_CUDA

#include <cuda_runtime_api.h>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"   /* cusolverDn.h declares f() */
#include <cusolverDn.h>
#pragma GCC diagnostic pop

#include "backend/backend.h"

struct ops_gpu_svd {
    lora_ctx *ctx;
    int device;
    cusolverDnHandle_t h;
    gesvdjInfo_t info;
    float *d_a, *d_s, *d_u, *d_v, *d_work;   /* grown on demand */
    int *d_info;
    size_t cap_a, cap_s, cap_u, cap_v, cap_work;
};

static lora_status cu_fail(struct ops_gpu_svd *g, cudaError_t e, const char *what) {
    cudaGetLastError();
    return lora_fail(g->ctx, e == cudaErrorMemoryAllocation ? LORA_E_GPU_OOM : LORA_E_GPU_FATAL,
                     "cuSOLVER SVD: %s: %s", what, cudaGetErrorString(e));
}

static lora_status grow(struct ops_gpu_svd *g, float **p, size_t *cap, size_t n, const char *what) {
    if (n <= *cap) return LORA_OK;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    cudaError_t e = cudaMalloc((void **)p, n * sizeof(float));
    if (e != cudaSuccess) return cu_fail(g, e, what);
    *cap = n;
    return LORA_OK;
}

lora_status ops_gpu_svd_open(lora_ctx *ctx, struct ops_gpu_svd **out, const char **why) {
    *out = NULL;
    *why = NULL;
    if (lora_cuda_probe(why, NULL) != LORA_OK) return LORA_E_NO_GPU;   /* no message: the caller falls back */
    struct ops_gpu_svd *g = lora_calloc(ctx, 1, sizeof *g);
    if (!g) return LORA_E_NOMEM;
    g->ctx = ctx;
    g->device = ctx->device;
    cudaError_t e = cudaSetDevice(g->device);
    if (e != cudaSuccess) {
        lora_status s = cu_fail(g, e, "cudaSetDevice");
        lora_free(ctx, g);
        return s == LORA_E_GPU_FATAL ? lora_fail(ctx, LORA_E_NO_GPU, "%s", ctx->errmsg) : s;
    }
    if (cusolverDnCreate(&g->h) != CUSOLVER_STATUS_SUCCESS) {
        lora_free(ctx, g);
        return lora_fail(ctx, LORA_E_NO_GPU, "cuSOLVER SVD: cusolverDnCreate failed (library or driver missing?)");
    }
    if (cusolverDnCreateGesvdjInfo(&g->info) != CUSOLVER_STATUS_SUCCESS) {
        cusolverDnDestroy(g->h);
        lora_free(ctx, g);
        return lora_fail(ctx, LORA_E_NOMEM, "cuSOLVER SVD: cusolverDnCreateGesvdjInfo failed");
    }
    /* Jacobi sweeps until the off-diagonal mass is at float32 rounding (the default) */
    cusolverDnXgesvdjSetMaxSweeps(g->info, 100);
    e = cudaMalloc((void **)&g->d_info, sizeof(int));
    if (e != cudaSuccess) {
        lora_status s = cu_fail(g, e, "cudaMalloc");
        ops_gpu_svd_close(g);
        return s;
    }
    *out = g;
    return LORA_OK;
}

void ops_gpu_svd_close(struct ops_gpu_svd *g) {
    if (!g) return;
    cudaFree(g->d_a);
    cudaFree(g->d_s);
    cudaFree(g->d_u);
    cudaFree(g->d_v);
    cudaFree(g->d_work);
    cudaFree(g->d_info);
    if (g->info) cusolverDnDestroyGesvdjInfo(g->info);
    if (g->h) cusolverDnDestroy(g->h);
    lora_free(g->ctx, g);
}

lora_status ops_gpu_svd_factor(struct ops_gpu_svd *g, const char *what, const float *a, int64_t m, int64_t n,
                               int64_t r, float *up, float *down) {
    lora_ctx *ctx = g->ctx;
    if (m < 1 || n < 1 || r < 1 || m > 1000000 || n > 1000000 || m * n > ((int64_t)1 << 31))
        return lora_fail(ctx, LORA_E_LIMIT, "cuSOLVER SVD of '%s': [%lld, %lld] is outside what gesvdj takes", what,
                         (long long)m, (long long)n);
    int64_t k = m < n ? m : n;
    if (r > k) r = k;
    /* column-major B = A^T: rows n, cols m, ld n; U' [n, k] (ld n), V' [m, k] (ld m) */
    int bm = (int)n, bn = (int)m;
    LORA_TRY(grow(g, &g->d_a, &g->cap_a, (size_t)(m * n), "matrix"));
    LORA_TRY(grow(g, &g->d_s, &g->cap_s, (size_t)k, "singular values"));
    LORA_TRY(grow(g, &g->d_u, &g->cap_u, (size_t)(n * k), "U"));
    LORA_TRY(grow(g, &g->d_v, &g->cap_v, (size_t)(m * k), "V"));
    int lwork = 0;
    if (cusolverDnSgesvdj_bufferSize(g->h, CUSOLVER_EIG_MODE_VECTOR, 1, bm, bn, g->d_a, bm, g->d_s, g->d_u, bm, g->d_v,
                                     bn, &lwork, g->info) != CUSOLVER_STATUS_SUCCESS)
        return lora_fail(ctx, LORA_E_GPU_FATAL, "cuSOLVER SVD of '%s': gesvdj_bufferSize failed", what);
    LORA_TRY(grow(g, &g->d_work, &g->cap_work, (size_t)(lwork > 0 ? lwork : 1), "workspace"));
    cudaError_t e = cudaMemcpy(g->d_a, a, (size_t)(m * n) * sizeof(float), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return cu_fail(g, e, "upload");
    cusolverStatus_t cs = cusolverDnSgesvdj(g->h, CUSOLVER_EIG_MODE_VECTOR, 1, bm, bn, g->d_a, bm, g->d_s, g->d_u, bm,
                                            g->d_v, bn, g->d_work, lwork, g->d_info, g->info);
    if (cs != CUSOLVER_STATUS_SUCCESS)
        return lora_fail(ctx, LORA_E_GPU_FATAL, "cuSOLVER SVD of '%s' [%lld, %lld]: gesvdj status %d", what,
                         (long long)m, (long long)n, (int)cs);
    int info = 0;
    float *s = lora_malloc(ctx, (size_t)k * sizeof(float));
    if (!s) return LORA_E_NOMEM;
    e = cudaMemcpy(&info, g->d_info, sizeof info, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(s, g->d_s, (size_t)k * sizeof(float), cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(down, g->d_u, (size_t)(r * n) * sizeof(float), cudaMemcpyDeviceToHost);
    /* up[i, j] = V'[i, j] S[j]: V' column-major [m, k] -> the first r columns, then transpose */
    float *v = e == cudaSuccess ? lora_malloc(ctx, (size_t)(m * r) * sizeof(float)) : NULL;
    if (e == cudaSuccess && !v) { lora_free(ctx, s); return LORA_E_NOMEM; }
    if (e == cudaSuccess) e = cudaMemcpy(v, g->d_v, (size_t)(m * r) * sizeof(float), cudaMemcpyDeviceToHost);
    lora_status st = LORA_OK;
    if (e != cudaSuccess) st = cu_fail(g, e, "download");
    else if (info < 0) st = lora_fail(ctx, LORA_E_INTERNAL, "cuSOLVER SVD of '%s': argument %d rejected", what, -info);
    else if (info > 0)   /* not converged within the sweeps: still a usable factorisation, say so */
        lora_log(ctx, LORA_LOG_WARN, "cuSOLVER SVD of '%s' [%lld, %lld]: Jacobi did not converge (info %d)", what,
                 (long long)m, (long long)n, info);
    if (!st)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < r; j++) up[i * r + j] = v[j * m + i] * s[j];
    lora_free(ctx, v);
    lora_free(ctx, s);
    return st;
}

#else /* !LORA_HAVE_CUDA */

lora_status ops_gpu_svd_open(lora_ctx *ctx, struct ops_gpu_svd **out, const char **why) {
    (void)ctx;
    *out = NULL;
    *why = "liblora was built without CUDA";
    return LORA_E_NO_GPU;
}

void ops_gpu_svd_close(struct ops_gpu_svd *g) { (void)g; }

lora_status ops_gpu_svd_factor(struct ops_gpu_svd *g, const char *what, const float *a, int64_t m, int64_t n,
                               int64_t r, float *up, float *down) {
    (void)g; (void)a; (void)m; (void)n; (void)r; (void)up; (void)down;
    return lora_fail(NULL, LORA_E_NO_GPU, "cuSOLVER SVD of '%s': liblora was built without CUDA", what);
}

#endif
