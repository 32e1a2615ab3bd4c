/* Extraction (extract_lora_from_models.py) of SD1.5-size modules at dim 64: per module
 * dW = tuned - base, SVD, up = U_r S_r, down = Vh_r; exact (LAPACK sgesdd, economy) against the
 * randomized range finder. The 264 kohya LoRA targets of SD1.5 (spec/kohya-lora.md §2.4): text
 * encoder 12 x (q, k, v, out 768x768; fc1 3072x768; fc2 768x3072) = 72, U-Net 16 transformer
 * blocks (5 at 320, 5 at 640, 6 at 1280 channels) x (proj_in, proj_out, attn1 q/k/v/out,
 * attn2 q/out CxC; attn2 k/v Cx768; GEGLU proj 8CxC; ff.net.2 Cx4C) = 192.
 * usage: bench_ops [all|subset]   subset (default): one module per distinct shape, timed and
 * scaled by the shape's count; all: every one of the 264 modules.
 * Prints "name seconds" lines (the 264-module total) and '#' notes. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cblas.h>

#include "bench_util.h"
#include "internal.h"
#include "core/rng.h"
#include "ops/ops.h"

struct shape { int64_t out, in, count; };
static const struct shape shapes[] = {
    {768, 768, 48}, {3072, 768, 12}, {768, 3072, 12},                       /* text encoder: 72 */
    {320, 320, 40}, {320, 768, 10}, {2560, 320, 5}, {320, 1280, 5},          /* 320: 5 blocks */
    {640, 640, 40}, {640, 768, 10}, {5120, 640, 5}, {640, 2560, 5},          /* 640: 5 blocks */
    {1280, 1280, 48}, {1280, 768, 12}, {10240, 1280, 6}, {1280, 5120, 6},    /* 1280: 6 blocks */
};

static double fro(const float *a, int64_t n) { double s = 0; for (int64_t i = 0; i < n; i++) s += (double)a[i] * a[i]; return sqrt(s); }

int main(int argc, char **argv) {
    int all = argc > 1 && strcmp(argv[1], "all") == 0;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    const int64_t r = 64;
    int64_t total = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) total += shapes[s].count;
    printf("# modules: %lld (%s), dim %lld, float32, threads(openblas): %d\n", (long long)total,
           all ? "all timed" : "one per distinct shape timed, scaled by its count", (long long)r,
           openblas_get_num_threads());
    double t_exact = 0, t_rand = 0, err_e = 0, err_r = 0, worst_ratio = 0;
    int64_t nerr = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t m = shapes[s].out, n = shapes[s].in, reps = all ? shapes[s].count : 1, n_el = m * n;
        float *base = malloc((size_t)n_el * 4), *tuned = malloc((size_t)n_el * 4), *d = malloc((size_t)n_el * 4);
        float *keep = malloc((size_t)n_el * 4), *up = malloc((size_t)(m * r) * 4), *down = malloc((size_t)(r * n) * 4);
        double te = 0, tr = 0, ee = 0, er = 0;
        for (int64_t k = 0; k < reps; k++) {
            lora_philox_normal(1000 + s * 100 + (uint64_t)k, 0, base, n_el);
            lora_philox_normal(5000 + s * 100 + (uint64_t)k, 0, tuned, n_el);
            for (int64_t i = 0; i < n_el; i++) tuned[i] = base[i] * 0.02f + tuned[i] * 1e-3f, base[i] *= 0.02f;
            for (int method = 0; method < 2; method++) {
                double t0 = bench_now();
                for (int64_t i = 0; i < n_el; i++) d[i] = tuned[i] - base[i];
                if (!method) memcpy(keep, d, (size_t)n_el * 4);
                if (ops_svd_factor(ctx, "bench", d, m, n, r, method ? OPS_SVD_RANDOMIZED : OPS_SVD_EXACT, 7 + (uint64_t)k,
                                   up, down) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
                double t = bench_now() - t0;
                /* reconstruction error |dW - up down| / |dW| (not timed) */
                double nd = fro(keep, n_el);
                memcpy(d, keep, (size_t)n_el * 4);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, -1.f, up, (int)r, down,
                            (int)n, 1.f, d, (int)n);
                double e = fro(d, n_el) / nd;
                if (method) { tr += t; er += e; } else { te += t; ee += e; }
            }
        }
        double scale = (double)shapes[s].count / (double)reps;
        t_exact += te * scale; t_rand += tr * scale;
        err_e += ee * scale; err_r += er * scale; nerr += shapes[s].count;
        if (er / ee > worst_ratio) worst_ratio = er / ee;
        printf("# %5lldx%-5lld x%-2lld exact %.3f s/module, randomized %.4f s/module, error exact %.4f randomized %.4f\n",
               (long long)m, (long long)n, (long long)shapes[s].count, te / reps, tr / reps, ee / reps, er / reps);
        free(base); free(tuned); free(d); free(keep); free(up); free(down);
    }
    printf("# reconstruction error |dW - up down|/|dW| (mean over modules): exact %.5f, randomized %.5f "
           "(randomized/exact %.5f, worst shape %.5f)\n", err_e / nerr, err_r / nerr, err_r / err_e, worst_ratio);
    printf("extract_exact %.3f\n", t_exact);
    printf("extract_randomized %.3f\n", t_rand);
    lora_ctx_free(ctx);
    return 0;
}
