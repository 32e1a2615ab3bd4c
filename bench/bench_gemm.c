/* CPU backend GEMM and conv-as-GEMM throughput on SD-shaped problems. Prints one line per
 * case: "name gflops ms"; scripts/bench.sh pairs them with the numpy peer run on the same
 * machine and prints ratios. Not a test: nothing here asserts a time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

#include "internal.h"
#include "backend/backend.h"
#include "core/rng.h"

char *openblas_get_config(void);
char *openblas_get_corename(void);




int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 5;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    struct lora_backend_impl *be = ctx->backend;
    printf("# openblas: %s (core %s)\n", openblas_get_config(), openblas_get_corename());
    printf("# threads(ctx): %d\n", ctx->n_threads);
    struct lora_mt19937 g;
    lora_mt_seed(&g, 0);

    /* GEMM shapes (M, N, K): SD1.5 64x64 latent at 320 channels, attention at 32x32, LoRA. */
    struct { const char *name; int m, n, k; } gemms[] = {
        {"gemm_proj_4096x320x320", 4096, 320, 320},
        {"gemm_ff_1024x2560x640", 1024, 2560, 640},
        {"gemm_attn_qk_1024x1024x40", 1024, 1024, 40},
        {"gemm_lora_down_4096x32x320", 4096, 32, 320},
    };
    for (size_t i = 0; i < sizeof gemms / sizeof gemms[0]; i++) {
        int m = gemms[i].m, n = gemms[i].n, k = gemms[i].k;
        float *a = malloc((size_t)m * k * 4), *b = malloc((size_t)k * n * 4), *c = malloc((size_t)m * n * 4);
        lora_torch_randn(&g, a, (int64_t)m * k);
        lora_torch_randn(&g, b, (int64_t)k * n);
        double t;
        TIME_MEDIAN(reps, be->iface->gemm_f32(be, 0, 0, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n), t);
        printf("%s %.2f %.3f\n", gemms[i].name, 2.0 * m * n * k / t * 1e-9, t * 1e3);
        free(a); free(b); free(c);
    }

    /* An elementwise OpenMP loop followed by a GEMM, as every layer of a training step does:
     * catches thread pools fighting over the cores (OpenMP vs pthread OpenBLAS). */
    {
        int m = 4096, n = 320, k = 320;
        float *a = malloc((size_t)m * k * 4), *b = malloc((size_t)k * n * 4), *c = malloc((size_t)m * n * 4);
        float *y = malloc((size_t)m * n * 4);
        lora_torch_randn(&g, a, (int64_t)m * k);
        lora_torch_randn(&g, b, (int64_t)k * n);
        lora_torch_randn(&g, c, (int64_t)m * n);
        double t;
        TIME_MEDIAN(reps, {
            be->iface->silu_f32(be, (int64_t)m * n, c, y);
            be->iface->gemm_f32(be, 0, 0, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
        }, t);
        printf("silu_then_gemm_4096x320x320 %.2f %.3f\n", 2.0 * m * n * k / t * 1e-9, t * 1e3);
        free(a); free(b); free(c); free(y);
    }

    /* conv 3x3 pad 1 as im2col + GEMM (the timing includes im2col). */
    struct { const char *name; int c, h, w, f; } convs[] = {
        {"conv3x3_320to320_64x64", 320, 64, 64, 320},
        {"conv3x3_640to640_32x32", 640, 32, 32, 640},
        {"conv3x3_4to320_64x64", 4, 64, 64, 320},
    };
    for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++) {
        int C = convs[i].c, H = convs[i].h, W = convs[i].w, F = convs[i].f, K = C * 9, P = H * W;
        float *x = malloc((size_t)C * H * W * 4), *wt = malloc((size_t)F * K * 4);
        float *cols = malloc((size_t)K * P * 4), *y = malloc((size_t)F * P * 4);
        lora_torch_randn(&g, x, (int64_t)C * H * W);
        lora_torch_randn(&g, wt, (int64_t)F * K);
        double t;
        TIME_MEDIAN(reps, {
            be->iface->im2col_f32(be, x, C, H, W, 3, 3, 1, 1, cols);
            be->iface->gemm_f32(be, 0, 0, F, P, K, 1.0f, wt, K, cols, P, 0.0f, y, P);
        }, t);
        printf("%s %.2f %.3f\n", convs[i].name, 2.0 * F * P * K / t * 1e-9, t * 1e3);
        free(x); free(wt); free(cols); free(y);
    }
    lora_ctx_free(ctx);
    return 0;
}
