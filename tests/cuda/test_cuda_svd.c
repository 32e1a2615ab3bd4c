/* cuSOLVER SVD (lib/backend/cuda_svd.c, used by extraction on the CUDA backend) against the
 * CPU's LAPACK sgesdd: products up @ down within 1e-4 relative on tall, wide and square
 * matrices (the factors' signs may differ). Exits 77 when no CUDA device is usable. */
#include <stdlib.h>

#include "core/rng.h"
#include "ops/ops.h"
#include "../test.h"

static float *product(const float *up, const float *down, int64_t m, int64_t r, int64_t n) {
    float *p = calloc((size_t)(m * n) + 1, 4);
    for (int64_t o = 0; o < m; o++)
        for (int64_t j = 0; j < r; j++)
            for (int64_t c = 0; c < n; c++) p[o * n + c] += up[o * r + j] * down[j * n + c];
    return p;
}

static double rel(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) { num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]); den += (double)b[i] * b[i]; }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    struct ops_gpu_svd *g = NULL;
    const char *why = NULL;
    lora_status s = ops_gpu_svd_open(ctx, &g, &why);
    if (s == LORA_E_NO_GPU) {
        printf("test_cuda_svd: skipped (%s)\n", why ? why : lora_errmsg(ctx));
        lora_ctx_free(ctx);
        return 77;
    }
    CHECK_STATUS(s, LORA_OK);
    static const int64_t shapes[][3] = {{320, 768, 16}, {768, 320, 16}, {640, 640, 64}, {2560, 320, 64}, {33, 17, 4}};
    for (size_t i = 0; g && i < sizeof shapes / sizeof *shapes; i++) {
        int64_t m = shapes[i][0], n = shapes[i][1], r = shapes[i][2];
        float *a = malloc((size_t)(m * n) * 4), *b = malloc((size_t)(m * n) * 4);
        float *u0 = malloc((size_t)(m * r) * 4), *d0 = malloc((size_t)(r * n) * 4);
        float *u1 = malloc((size_t)(m * r) * 4), *d1 = malloc((size_t)(r * n) * 4);
        lora_philox_normal(31 + i, 0, a, m * n);
        /* a decaying spectrum, as fine-tuning deltas have: a[o, c] scaled by 1/(1 + o/8) */
        for (int64_t o = 0; o < m; o++)
            for (int64_t c = 0; c < n; c++) a[o * n + c] /= 1.0f + (float)o / 8.0f;
        memcpy(b, a, (size_t)(m * n) * 4);
        CHECK_STATUS(ops_svd_factor(ctx, "cpu", b, m, n, r, OPS_SVD_EXACT, 1, u0, d0), LORA_OK);
        CHECK_STATUS(ops_gpu_svd_factor(g, "gpu", a, m, n, r, u1, d1), LORA_OK);
        float *p0 = product(u0, d0, m, r, n), *p1 = product(u1, d1, m, r, n);
        double e = rel(p1, p0, m * n);
        CHECK_MSG(e < 1e-4, "cuSOLVER SVD [%lld, %lld] r %lld: product differs from sgesdd's by %g", (long long)m,
                  (long long)n, (long long)r, e);
        printf("[%lld, %lld] r %lld: cuSOLVER vs sgesdd product distance %.3g\n", (long long)m, (long long)n,
               (long long)r, e);
        free(p0); free(p1); free(a); free(b); free(u0); free(d0); free(u1); free(d1);
    }
    ops_gpu_svd_close(g);
    lora_ctx_free(ctx);
    return test_finish("test_cuda_svd");
}
