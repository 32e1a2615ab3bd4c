/* Extraction (extract_lora_from_models.py) of SD1.5-size modules at dim 64: per module
 * dW = tuned - base, SVD, up = U_r S_r, down = Vh_r; exact (LAPACK sgesdd, economy) against the
 * float64 Gram path (--svd gram) and the randomized block Lanczos method (ops_svd_factor). The 264 kohya LoRA targets of SD1.5 (spec/kohya-lora.md §2.4): text
 * encoder 12 x (q, k, v, out 768x768; fc1 3072x768; fc2 768x3072) = 72, U-Net 16 transformer
 * blocks (5 at 320, 5 at 640, 6 at 1280 channels) x (proj_in, proj_out, attn1 q/k/v/out,
 * attn2 q/out CxC; attn2 k/v Cx768; GEGLU proj 8CxC; ff.net.2 Cx4C) = 192.
 * usage: bench_ops [all|subset|one M N] [seq] [nogesdd]   subset (default): two modules per
 * distinct shape, timed and scaled by the shape's count; all: every one of the 264 modules; one:
 * that shape only. The randomized modules of a shape go through ops_svd_factor_many together
 * (small ones side by side on the threads), or one at a time with "seq".
 * Prints "name seconds" lines (the 264-module total, wall clock) and '#' notes, CPU seconds
 * among them (the work done, also on a machine shared with other jobs). The randomized error
 * must be within 1% of the exact one on every module computed: else a FAIL line on stderr and
 * exit status 2 (after the timings). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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

/* CPU seconds of the process (all threads): on a machine shared with other jobs, this is the
 * work done, where the wall clock also counts the time spent waiting for a core */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double fro(const float *a, int64_t n) { double s = 0; for (int64_t i = 0; i < n; i++) s += (double)a[i] * a[i]; return sqrt(s); }

int main(int argc, char **argv) {
    int all = argc > 1 && strcmp(argv[1], "all") == 0;
    /* "one M N": that shape only (a per-module timing on a busy machine) */
    int64_t one_m = argc > 3 && strcmp(argv[1], "one") == 0 ? atoll(argv[2]) : 0, one_n = one_m ? atoll(argv[3]) : 0;
    /* options after the mode: "seq" times the randomized modules one at a time (ops_svd_factor)
     * instead of ops_svd_factor_many; "nogesdd" skips sgesdd and takes the Gram method's error
     * (an exact SVD in float64, products within ~2e-5 of sgesdd's) as the reference */
    int seq = 0, nogesdd = 0;
    for (int i = one_m ? 4 : 2; i < argc; i++) {
        seq |= strcmp(argv[i], "seq") == 0;
        nogesdd |= strcmp(argv[i], "nogesdd") == 0;
    }
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    const int64_t r = 64;
    int64_t total = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) total += shapes[s].count;
    printf("# modules: %lld (%s), dim %lld, float32, threads(openblas): %d, randomized %s%s\n", (long long)total,
           all ? "all timed" : "two per distinct shape timed, scaled by its count", (long long)r,
           openblas_get_num_threads(), seq ? "one module at a time" : "through ops_svd_factor_many",
           nogesdd ? ", no sgesdd (reference error: gram)" : "");
    double cpu_tot[3] = {0, 0, 0};
    double t_exact = 0, t_rand = 0, t_gram = 0, err_e = 0, err_r = 0, err_g = 0, worst_ratio = 0, worst_gram = 0;
    int64_t nerr = 0, worst_m = 0, worst_n = 0, nratio = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t m = shapes[s].out, n = shapes[s].in, n_el = m * n;
        /* two modules per shape (so that the side-by-side path has a pair), or all of them */
        int64_t reps = all ? shapes[s].count : (shapes[s].count < 2 ? shapes[s].count : 2);
        if (one_m && (m != one_m || n != one_n)) continue;
        float *base = malloc((size_t)n_el * 4), *tuned = malloc((size_t)n_el * 4), *d = malloc((size_t)n_el * 4);
        float *up = malloc((size_t)(m * r) * 4), *down = malloc((size_t)(r * n) * 4);
        double te = 0, tr = 0, tg = 0, ee = 0, er = 0, eg = 0, pg = 0, ce[3] = {0, 0, 0}, wr = 0;
        float *up0 = malloc((size_t)(m * r) * 4), *down0 = malloc((size_t)(r * n) * 4);
        float *p0 = malloc((size_t)n_el * 4), *p1 = malloc((size_t)n_el * 4);
        /* per module: dW kept, the randomized factors, the reference error */
        float **keep = calloc((size_t)reps, sizeof *keep), **rd = calloc((size_t)reps, sizeof *rd);
        float **rup = calloc((size_t)reps, sizeof *rup), **rdown = calloc((size_t)reps, sizeof *rdown);
        double *e_ref = calloc((size_t)reps, sizeof *e_ref);
        struct ops_svd_job *jobs = calloc((size_t)reps, sizeof *jobs);
        for (int64_t k = 0; k < reps; k++) {
            keep[k] = malloc((size_t)n_el * 4);
            rd[k] = malloc((size_t)n_el * 4);
            rup[k] = malloc((size_t)(m * r) * 4);
            rdown[k] = malloc((size_t)(r * n) * 4);
            lora_philox_normal(1000 + s * 100 + (uint64_t)k, 0, base, n_el);
            lora_philox_normal(5000 + s * 100 + (uint64_t)k, 0, tuned, n_el);
            for (int64_t i = 0; i < n_el; i++) tuned[i] = base[i] * 0.02f + tuned[i] * 1e-3f, base[i] *= 0.02f;
            for (int64_t i = 0; i < n_el; i++) keep[k][i] = tuned[i] - base[i];
            double nd = fro(keep[k], n_el);
            for (int method = 0; method < 3; method += 2) {   /* exact and gram, one module at a time */
                if (method == 0 && nogesdd) continue;
                double t0 = bench_now(), c0 = cpu_now();
                for (int64_t i = 0; i < n_el; i++) d[i] = tuned[i] - base[i];
                if (ops_svd_factor(ctx, "bench", d, m, n, r, method == 0 ? OPS_SVD_EXACT : OPS_SVD_GRAM, 7 + (uint64_t)k,
                                   up, down) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
                double t = bench_now() - t0;
                ce[method] += cpu_now() - c0;
                /* reconstruction error |dW - up down| / |dW| (not timed) */
                memcpy(d, keep[k], (size_t)n_el * 4);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, -1.f, up, (int)r, down,
                            (int)n, 1.f, d, (int)n);
                double e = fro(d, n_el) / nd;
                if (method == 2) { tg += t; eg += e; } else { te += t; ee += e; }
                if (method == 0 || nogesdd) e_ref[k] = e;
                if (method == 0) { memcpy(up0, up, (size_t)(m * r) * 4); memcpy(down0, down, (size_t)(r * n) * 4); }
                if (method == 2 && !nogesdd) {   /* Gram vs gesdd: relative distance of the products up @ down */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, 1.f, up0, (int)r,
                                down0, (int)n, 0.f, p0, (int)n);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, 1.f, up, (int)r,
                                down, (int)n, 0.f, p1, (int)n);
                    for (int64_t i = 0; i < n_el; i++) p1[i] -= p0[i];
                    double dp = fro(p1, n_el) / fro(p0, n_el);
                    if (dp > pg) pg = dp;
                }
            }
            jobs[k] = (struct ops_svd_job){"bench", rd[k], m, n, r, 7 + (uint64_t)k, rup[k], rdown[k]};
        }
        /* randomized: the shape's modules together (the dW copy timed, as the subtraction above) */
        double t0 = bench_now(), c0 = cpu_now();
        for (int64_t k = 0; k < reps; k++) memcpy(rd[k], keep[k], (size_t)n_el * 4);
        lora_status st = LORA_OK;
        if (seq)
            for (int64_t k = 0; k < reps && !st; k++)
                st = ops_svd_factor(ctx, "bench", rd[k], m, n, r, OPS_SVD_RANDOMIZED, jobs[k].seed, rup[k], rdown[k]);
        else st = ops_svd_factor_many(ctx, jobs, reps, OPS_SVD_RANDOMIZED, openblas_get_num_threads());
        if (st != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
        tr = bench_now() - t0;
        ce[1] = cpu_now() - c0;
        for (int64_t k = 0; k < reps; k++) {
            memcpy(d, keep[k], (size_t)n_el * 4);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, -1.f, rup[k], (int)r,
                        rdown[k], (int)n, 1.f, d, (int)n);
            double e = fro(d, n_el) / fro(keep[k], n_el);
            er += e;
            /* the 1% rule is per module: randomized error over the exact one of the same dW */
            nratio++;
            if (e / e_ref[k] > wr) wr = e / e_ref[k];
            if (e / e_ref[k] > worst_ratio) { worst_ratio = e / e_ref[k]; worst_m = m; worst_n = n; }
            free(keep[k]); free(rd[k]); free(rup[k]); free(rdown[k]);
        }
        if (nogesdd) ee = eg;
        double scale = (double)shapes[s].count / (double)reps;
        t_exact += te * scale; t_rand += tr * scale; t_gram += tg * scale;
        for (int q = 0; q < 3; q++) cpu_tot[q] += ce[q] * scale;
        err_e += ee * scale; err_r += er * scale; err_g += eg * scale; nerr += shapes[s].count;
        if (pg > worst_gram) worst_gram = pg;
        printf("# %5lldx%-5lld x%-2lld exact(gesdd) %.3f s/module, gram %.3f, randomized %.4f; error exact %.4f gram "
               "%.4f randomized %.4f (worst ratio %.5f); gram vs gesdd product %.2g\n",
               (long long)m, (long long)n, (long long)shapes[s].count, te / reps, tg / reps, tr / reps, ee / reps,
               eg / reps, er / reps, wr, pg);
        printf("#              cpu s/module: exact %.3f, gram %.3f, randomized %.4f\n", ce[0] / reps, ce[2] / reps,
               ce[1] / reps);
        fflush(stdout);
        free(base); free(tuned); free(d); free(up); free(down); free(up0); free(down0); free(p0); free(p1);
        free(keep); free(rd); free(rup); free(rdown); free(e_ref); free(jobs);
    }
    printf("# reconstruction error |dW - up down|/|dW| (mean over modules): exact %.5f, randomized %.5f "
           "(randomized/exact %.5f)\n", err_e / nerr, err_r / nerr, err_r / err_e);
    printf("# worst randomized/exact error ratio over the %lld modules computed: %.5f (%lldx%lld; limit 1.01)\n",
           (long long)nratio, worst_ratio, (long long)worst_m, (long long)worst_n);
    printf("# gram (dsyrk + dsyevr in float64): error %.5f, worst product distance to gesdd %.2g\n", err_g / nerr,
           worst_gram);
    printf("# cpu seconds (all threads) for the 264 modules: exact %.2f, gram %.2f, randomized %.2f\n", cpu_tot[0],
           cpu_tot[2], cpu_tot[1]);
    printf("extract_exact %.3f\n", t_exact);
    printf("extract_gram %.3f\n", t_gram);
    printf("extract_randomized %.3f\n", t_rand);
    lora_ctx_free(ctx);
    if (worst_ratio > 1.01) {   /* the accuracy rule of issue 8: fail loudly, whatever the speed */
        fprintf(stderr, "bench_ops: FAIL: randomized reconstruction error %.5f x the exact one (%lldx%lld), over 1.01\n",
                worst_ratio, (long long)worst_m, (long long)worst_n);
        return 2;
    }
    return 0;
}
