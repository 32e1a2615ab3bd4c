/* OPS_SVD_RANDOMIZED (block Lanczos, lib/ops/ops.c) against LAPACK: on flat-spectrum Gaussian
 * matrices (the hard case: no spectral gap) of tall, wide and square shapes, the reconstruction
 * error |A - up down|_F / |A|_F is within 1% of the optimal rank-r error, computed
 * independently from LAPACK sgesdd's singular values (Eckart-Young: sqrt(sum_{i >= r} s_i^2)).
 * Also: the factor convention (down has orthonormal rows, the column norms of up are Ritz values,
 * so non-increasing and at most the true s_j), a steeply decaying spectrum (Ritz values against
 * sgesdd's), determinism for a seed, and the rank-deficient and zero inputs that send the method
 * to its Householder fallback. */
#include <cblas.h>
#include <lapacke.h>

#include "../test.h"
#include "internal.h"
#include "core/rng.h"
#include "ops/ops.h"

/* relative Frobenius error |a - up down| / |a| in float64 */
static double recon_err(const float *a, const float *up, const float *down, int64_t m, int64_t n, int64_t r) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double p = 0;
            for (int64_t k = 0; k < r; k++) p += (double)up[i * r + k] * down[k * n + j];
            double d = (double)a[i * n + j] - p;
            num += d * d;
            den += (double)a[i * n + j] * a[i * n + j];
        }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* singular values of a[m, n] by LAPACK sgesdd (a copied), descending; caller frees */
static float *singular_values(const float *a, int64_t m, int64_t n) {
    int64_t k = m < n ? m : n;
    float *c = malloc((size_t)(m * n) * 4), *s = malloc((size_t)k * 4), *dummy = malloc(4);
    memcpy(c, a, (size_t)(m * n) * 4);
    /* JOBZ 'N' references neither u nor vt, but row-major LAPACKE checks ldu and ldvt */
    lapack_int ld = (lapack_int)(m > n ? m : n);
    lapack_int info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'N', (lapack_int)m, (lapack_int)n, c, (lapack_int)n, s, dummy,
                                     ld, dummy, ld);
    CHECK_MSG(info == 0, "sgesdd info %d", (int)info);
    free(c);
    free(dummy);
    return s;
}

static void test_flat_spectrum(lora_ctx *ctx) {
    /* {m, n, r}: square, tall (the basis in the short dimension), wide, an SD1.5 shape at dim 64 */
    static const int64_t shapes[][3] = {{500, 500, 32}, {1500, 260, 32}, {260, 1100, 32}, {640, 640, 64},
                                        {900, 420, 16}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int64_t m = shapes[si][0], n = shapes[si][1], r = shapes[si][2], k = m < n ? m : n;
        float *a = malloc((size_t)(m * n) * 4), *keep = malloc((size_t)(m * n) * 4);
        float *up = malloc((size_t)(m * r) * 4), *down = malloc((size_t)(r * n) * 4);
        float *up2 = malloc((size_t)(m * r) * 4), *down2 = malloc((size_t)(r * n) * 4);
        lora_philox_normal(4242 + si, 0, a, m * n);
        for (int64_t i = 0; i < m * n; i++) a[i] *= 1e-3f;   /* bench_ops' dW scale */
        memcpy(keep, a, (size_t)(m * n) * 4);
        float *s = singular_values(a, m, n);
        double all = 0, tail = 0;
        for (int64_t i = 0; i < k; i++) {
            all += (double)s[i] * s[i];
            if (i >= r) tail += (double)s[i] * s[i];
        }
        double e_opt = sqrt(tail / all);
        CHECK_STATUS(ops_svd_factor(ctx, "flat", a, m, n, r, OPS_SVD_RANDOMIZED, 99 + si, up, down), LORA_OK);
        CHECK_MSG(memcmp(a, keep, (size_t)(m * n) * 4) == 0, "randomized SVD changed its input");
        double e = recon_err(a, up, down, m, n, r);
        CHECK_MSG(e <= 1.01 * e_opt, "[%lld, %lld] r %lld: randomized error %.6f vs optimal %.6f (ratio %.5f > 1.01)",
                  (long long)m, (long long)n, (long long)r, e, e_opt, e / e_opt);
        CHECK_MSG(e >= e_opt * (1 - 1e-4), "[%lld, %lld]: error %.6f below the optimum %.6f", (long long)m,
                  (long long)n, e, e_opt);
        printf("randomized [%lld, %lld] r %lld: error %.6f, optimal (sgesdd) %.6f, ratio %.5f\n", (long long)m,
               (long long)n, (long long)r, e, e_opt, e / e_opt);
        /* down = Vh_r: orthonormal rows; up = U_r S_r: column norms are Ritz values, which are
         * non-increasing and bounded by the true singular values (Cauchy interlacing) */
        double orth = 0;
        for (int64_t i = 0; i < r; i++)
            for (int64_t j = 0; j < r; j++) {
                double d = 0;
                for (int64_t c = 0; c < n; c++) d += (double)down[i * n + c] * down[j * n + c];
                orth = fmax(orth, fabs(d - (i == j)));
            }
        CHECK_MSG(orth < 1e-4, "[%lld, %lld]: down rows off orthonormal by %g", (long long)m, (long long)n, orth);
        double prev = INFINITY;
        int order_ok = 1, bound_ok = 1;
        for (int64_t j = 0; j < r; j++) {
            double c = 0;
            for (int64_t i = 0; i < m; i++) c += (double)up[i * r + j] * up[i * r + j];
            c = sqrt(c);
            if (c > prev * (1 + 1e-5)) order_ok = 0;
            if (c > s[j] * (1 + 1e-4)) bound_ok = 0;
            prev = c;
        }
        CHECK_MSG(order_ok && bound_ok, "[%lld, %lld]: up column norms not non-increasing (%d) or above s_j (%d)",
                  (long long)m, (long long)n, order_ok, bound_ok);
        /* deterministic for a seed; another seed gives other factors */
        CHECK_STATUS(ops_svd_factor(ctx, "flat", a, m, n, r, OPS_SVD_RANDOMIZED, 99 + si, up2, down2), LORA_OK);
        CHECK_MSG(memcmp(up, up2, (size_t)(m * r) * 4) == 0 && memcmp(down, down2, (size_t)(r * n) * 4) == 0,
                  "[%lld, %lld]: same seed, different factors", (long long)m, (long long)n);
        CHECK_STATUS(ops_svd_factor(ctx, "flat", a, m, n, r, OPS_SVD_RANDOMIZED, 1000 + si, up2, down2), LORA_OK);
        CHECK_MSG(memcmp(down, down2, (size_t)(r * n) * 4) != 0, "[%lld, %lld]: the seed is ignored", (long long)m,
                  (long long)n);
        free(a); free(keep); free(up); free(down); free(up2); free(down2); free(s);
    }
}

/* q[m, k] (m >= k) with orthonormal columns: LAPACK's QR of a Gaussian matrix */
static void orthonormal(float *q, int64_t m, int64_t k, uint64_t seed) {
    float *tau = malloc((size_t)k * 4);
    lora_philox_normal(seed, 0, q, m * k);
    lapack_int info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)k, q, (lapack_int)k, tau);
    if (!info)
        info = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)k, (lapack_int)k, q, (lapack_int)k, tau);
    CHECK_MSG(info == 0, "QR info %d", (int)info);
    free(tau);
}

/* A = U diag(s) V^T with s_j = 10^(-3 j / 63): s_0 / s_63 = 1000, the Gram matrices' condition
 * a million, as a real fine-tune's decaying spectrum but steeper. The Ritz values (up's column
 * norms) must match the singular values LAPACK sgesdd finds in A within 1e-4 relative, the
 * error the optimum within 0.01%, down's rows stay orthonormal: the float64 Gram, the
 * CholeskyQR with R^-1 applied by sgemm and the partial eigensolver keep their accuracy there. */
static void test_graded_spectrum(lora_ctx *ctx) {
    static const int64_t shapes[][2] = {{700, 500}, {400, 900}};
    const int64_t r = 64;
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int64_t m = shapes[si][0], n = shapes[si][1], k = m < n ? m : n;
        float *u = malloc((size_t)(m * k) * 4), *v = malloc((size_t)(n * k) * 4), *a = malloc((size_t)(m * n) * 4);
        float *up = malloc((size_t)(m * r) * 4), *down = malloc((size_t)(r * n) * 4);
        orthonormal(u, m, k, 31 + si);
        orthonormal(v, n, k, 41 + si);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < k; j++) u[i * k + j] *= (float)(1e-2 * pow(10.0, -3.0 * (double)j / 63.0));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)n, (int)k, 1.f, u, (int)k, v, (int)k, 0.f, a,
                    (int)n);
        float *s = singular_values(a, m, n);
        double all = 0, tail = 0;
        for (int64_t i = 0; i < k; i++) {
            all += (double)s[i] * s[i];
            if (i >= r) tail += (double)s[i] * s[i];
        }
        double e_opt = sqrt(tail / all);
        CHECK_STATUS(ops_svd_factor(ctx, "graded", a, m, n, r, OPS_SVD_RANDOMIZED, 5 + si, up, down), LORA_OK);
        double e = recon_err(a, up, down, m, n, r);
        CHECK_MSG(e <= 1.0001 * e_opt && e >= e_opt * (1 - 1e-4),
                  "graded [%lld, %lld]: error %.7f vs optimal %.7f (ratio %.6f, want 1 +- 1e-4)", (long long)m,
                  (long long)n, e, e_opt, e / e_opt);
        double orth = 0, ritz = 0;
        for (int64_t i = 0; i < r; i++)
            for (int64_t j = 0; j < r; j++) {
                double d = 0;
                for (int64_t c = 0; c < n; c++) d += (double)down[i * n + c] * down[j * n + c];
                orth = fmax(orth, fabs(d - (i == j)));
            }
        for (int64_t j = 0; j < r; j++) {
            double c = 0;
            for (int64_t i = 0; i < m; i++) c += (double)up[i * r + j] * up[i * r + j];
            ritz = fmax(ritz, fabs(sqrt(c) - s[j]) / s[j]);
        }
        CHECK_MSG(orth < 1e-4, "graded [%lld, %lld]: down rows off orthonormal by %g", (long long)m, (long long)n,
                  orth);
        CHECK_MSG(ritz < 1e-4, "graded [%lld, %lld]: Ritz values off sgesdd's by %g relative", (long long)m,
                  (long long)n, ritz);
        printf("graded [%lld, %lld] r %lld: error ratio %.7f, Ritz values within %.2g, down orthonormal within %.2g\n",
               (long long)m, (long long)n, (long long)r, e / e_opt, ritz, orth);
        free(u); free(v); free(a); free(up); free(down); free(s);
    }
}

/* rank 5 < r and the zero matrix: CholeskyQR refuses the rank-deficient blocks, the Householder
 * fallback must still give the exact (zero-error) factors */
static void test_rank_deficient(lora_ctx *ctx) {
    const int64_t m = 400, n = 300, r = 24, rank = 5;
    float *a = calloc((size_t)(m * n), 4), *x = malloc((size_t)(m * rank) * 4), *y = malloc((size_t)(rank * n) * 4);
    float *up = malloc((size_t)(m * r) * 4), *down = malloc((size_t)(r * n) * 4);
    lora_philox_normal(11, 0, x, m * rank);
    lora_philox_normal(12, 0, y, rank * n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)rank, 1.f, x, (int)rank, y, (int)n,
                0.f, a, (int)n);
    CHECK_STATUS(ops_svd_factor(ctx, "rank5", a, m, n, r, OPS_SVD_RANDOMIZED, 3, up, down), LORA_OK);
    double e = recon_err(a, up, down, m, n, r);
    CHECK_MSG(e < 1e-5, "rank-5 matrix: randomized error %g (want ~0)", e);
    for (int64_t i = 0; i < m * n; i++) a[i] = 0;
    CHECK_STATUS(ops_svd_factor(ctx, "zero", a, m, n, r, OPS_SVD_RANDOMIZED, 3, up, down), LORA_OK);
    double mx = 0;
    for (int64_t i = 0; i < m * r; i++) mx = fmax(mx, fabs(up[i]));
    CHECK_MSG(mx == 0, "zero matrix: up has %g", mx);
    free(a); free(x); free(y); free(up); free(down);
}

/* ops_svd_factor_many on 2 threads (small jobs side by side with one BLAS thread each, the large
 * one and a rank-deficient one after them): the products up @ down equal ops_svd_factor's one job
 * at a time within float32 rounding (the BLAS thread count may change the last bits), and a
 * second run gives the same bits */
static void test_many(lora_ctx *ctx) {
    enum { NJ = 6 };
    static const int64_t shp[NJ][3] = {{300, 300, 16}, {320, 700, 16}, {1600, 300, 16}, {300, 300, 16},
                                       {2000, 1300, 32}, {300, 300, 16}};
    struct ops_svd_job jobs[NJ];
    float *a[NJ], *keep[NJ], *up[NJ], *down[NJ], *up1[NJ], *down1[NJ];
    for (int j = 0; j < NJ; j++) {
        int64_t m = shp[j][0], n = shp[j][1], r = shp[j][2];
        a[j] = malloc((size_t)(m * n) * 4);
        keep[j] = malloc((size_t)(m * n) * 4);
        up[j] = malloc((size_t)(m * r) * 4); down[j] = malloc((size_t)(r * n) * 4);
        up1[j] = malloc((size_t)(m * r) * 4); down1[j] = malloc((size_t)(r * n) * 4);
        lora_philox_normal(600 + (uint64_t)j, 0, a[j], m * n);
        if (j == 5)   /* rank 1: the Householder fallback, after the side-by-side pass */
            for (int64_t i = 0; i < m; i++)
                for (int64_t c = 0; c < n; c++) a[j][i * n + c] = a[j][i] * a[j][c];
        memcpy(keep[j], a[j], (size_t)(m * n) * 4);
        jobs[j] = (struct ops_svd_job){"many", a[j], m, n, r, 70 + (uint64_t)j, up[j], down[j]};
    }
    CHECK_STATUS(ops_svd_factor_many(ctx, jobs, NJ, OPS_SVD_RANDOMIZED, 2), LORA_OK);
    for (int j = 0; j < NJ; j++) {
        int64_t m = shp[j][0], n = shp[j][1], r = shp[j][2];
        CHECK_STATUS(ops_svd_factor(ctx, "one", a[j], m, n, r, OPS_SVD_RANDOMIZED, 70 + (uint64_t)j, up1[j], down1[j]),
                     LORA_OK);
        double num = 0, den = 0;
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < n; c++) {
                double p = 0, q = 0;
                for (int64_t k = 0; k < r; k++) {
                    p += (double)up[j][i * r + k] * down[j][k * n + c];
                    q += (double)up1[j][i * r + k] * down1[j][k * n + c];
                }
                num += (p - q) * (p - q);
                den += q * q;
            }
        double e = sqrt(num / den);
        CHECK_MSG(e < 1e-4, "many job %d [%lld, %lld]: product %g from ops_svd_factor's", j, (long long)m, (long long)n,
                  e);
        if (j == 5) {
            double err = recon_err(keep[j], up[j], down[j], m, n, r);
            CHECK_MSG(err < 1e-5, "many: rank-1 job error %g", err);
        }
    }
    /* the same bits again */
    for (int j = 0; j < NJ; j++) {
        memcpy(up1[j], up[j], (size_t)(shp[j][0] * shp[j][2]) * 4);
        memcpy(down1[j], down[j], (size_t)(shp[j][2] * shp[j][1]) * 4);
    }
    CHECK_STATUS(ops_svd_factor_many(ctx, jobs, NJ, OPS_SVD_RANDOMIZED, 2), LORA_OK);
    int same = 1;
    for (int j = 0; j < NJ; j++)
        same &= memcmp(up1[j], up[j], (size_t)(shp[j][0] * shp[j][2]) * 4) == 0 &&
                memcmp(down1[j], down[j], (size_t)(shp[j][2] * shp[j][1]) * 4) == 0;
    CHECK_MSG(same, "ops_svd_factor_many: two runs differ");
    for (int j = 0; j < NJ; j++) { free(a[j]); free(keep[j]); free(up[j]); free(down[j]); free(up1[j]); free(down1[j]); }
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    test_flat_spectrum(ctx);
    test_graded_spectrum(ctx);
    test_rank_deficient(ctx);
    test_many(ctx);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_rsvd");
}
