/* CPU backend: the fp32 reference. GEMM through CBLAS (OpenBLAS), elementwise loops with
 * OpenMP using the context's thread count per call (no process-wide setting is changed). */
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "backend/backend.h"
#include "backend/cpu_image.h"
#include "core/dtype.h"

#if LORA_HAVE_OPENMP
#include <omp.h>
#endif

/* The library is built for baseline x86-64 (SSE2), but the element-wise hot loops (softmax,
 * fp16 widening) run 3-4x faster with AVX2/AVX-512: GCC clones them per ISA level and picks
 * one at load time (ifunc). Not under sanitizers (ifunc resolvers run before their runtime). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define CPU_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_ISA_CLONES
#endif

#define CPU_PAR_MIN 32768   /* below this, threads cost more than they save */

static lora_status cpu_buf_alloc(struct lora_backend_impl *be, size_t bytes, void **out) {
    *out = lora_malloc(be->ctx, bytes ? bytes : 1);
    return *out ? LORA_OK : LORA_E_NOMEM;
}

static void cpu_buf_free(struct lora_backend_impl *be, void *buf) { lora_free(be->ctx, buf); }

static lora_status cpu_copy(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memmove(dst, src, bytes);
    return LORA_OK;
}

static lora_status cpu_sync(struct lora_backend_impl *be) { (void)be; return LORA_OK; }

static lora_status cpu_convert(struct lora_backend_impl *be, int64_t n, lora_dtype st, const void *src,
                               lora_dtype dt, void *dst);

static int gemm_dims_ok(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
    /* CBLAS takes int: refuse what does not fit instead of truncating. */
    return m >= 0 && n >= 0 && k >= 0 && m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX &&
           lda > 0 && ldb > 0 && ldc > 0 && lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX;
}

static lora_status cpu_gemm_f32(struct lora_backend_impl *be, int ta, int tb, int64_t m, int64_t n,
                                int64_t k, float alpha, const float *a, int64_t lda, const float *b,
                                int64_t ldb, float beta, float *c, int64_t ldc) {
    if (!gemm_dims_ok(m, n, k, lda, ldb, ldc))
        return lora_fail(be->ctx, LORA_E_LIMIT, "cpu gemm: dimensions m=%lld n=%lld k=%lld exceed the BLAS int range",
                         (long long)m, (long long)n, (long long)k);
    if (m == 0 || n == 0) return LORA_OK;
#if LORA_HAVE_OPENMP
    /* An OpenMP build of OpenBLAS sizes its team from the calling thread's OpenMP setting:
     * set the context's count for this call and give the host its own value back. */
    int prev = omp_get_max_threads(), nt = lora_threads(be->ctx);
    if (prev != nt) omp_set_num_threads(nt);
#endif
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
#if LORA_HAVE_OPENMP
    if (prev != nt) omp_set_num_threads(prev);
#endif
    return LORA_OK;
}

/* Widen A and B to fp32, then sgemm: exact products of the half-precision inputs with fp32
 * accumulation, the reference the CUDA tensor-core path is compared with. */
static lora_status cpu_gemm_ex(struct lora_backend_impl *be, int ta, int tb, int64_t m, int64_t n, int64_t k,
                               float alpha, lora_dtype ab_type, const void *a, int64_t lda, const void *b,
                               int64_t ldb, float beta, float *c, int64_t ldc) {
    if (ab_type == LORA_DTYPE_F32)
        return cpu_gemm_f32(be, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    if (ab_type != LORA_DTYPE_F16 && ab_type != LORA_DTYPE_BF16)
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "cpu gemm_ex: input type %d is not F32, F16 or BF16", ab_type);
    if (!gemm_dims_ok(m, n, k, lda, ldb, ldc))
        return lora_fail(be->ctx, LORA_E_LIMIT, "cpu gemm_ex: dimensions exceed the BLAS int range");
    /* stored extents: A is (ta ? k : m) rows of lda with (ta ? m : k) used, B likewise; the
     * last row is read only up to its used width (the caller's buffer may end there). */
    int64_t ra = ta ? k : m, ca = ta ? m : k, rb = tb ? n : k, cb = tb ? k : n;
    size_t na = 0, nb = 0;
    if ((ra > 0 && (!ck_mul_size((size_t)(ra - 1), (size_t)lda, &na) || !ck_add_size(na, (size_t)ca, &na))) ||
        (rb > 0 && (!ck_mul_size((size_t)(rb - 1), (size_t)ldb, &nb) || !ck_add_size(nb, (size_t)cb, &nb))))
        return lora_fail(be->ctx, LORA_E_LIMIT, "cpu gemm_ex: operand size overflows");
    float *af = lora_calloc(be->ctx, na ? na : 1, sizeof(float));
    float *bf = lora_calloc(be->ctx, nb ? nb : 1, sizeof(float));
    lora_status s = (af && bf) ? LORA_OK : LORA_E_NOMEM;
    if (s == LORA_OK) s = cpu_convert(be, (int64_t)na, ab_type, a, LORA_DTYPE_F32, af);
    if (s == LORA_OK) s = cpu_convert(be, (int64_t)nb, ab_type, b, LORA_DTYPE_F32, bf);
    if (s == LORA_OK) s = cpu_gemm_f32(be, ta, tb, m, n, k, alpha, af, lda, bf, ldb, beta, c, ldc);
    lora_free(be->ctx, af);
    lora_free(be->ctx, bf);
    return s;
}

static lora_status cpu_axpby_f32(struct lora_backend_impl *be, int64_t n, float alpha, const float *x,
                                 float beta, float *y) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = alpha * x[i] + beta * y[i];
    return LORA_OK;
}

static lora_status cpu_mul_f32(struct lora_backend_impl *be, int64_t n, const float *a, const float *b,
                               float *out) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
    return LORA_OK;
}

static lora_status cpu_silu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
    return LORA_OK;
}

static lora_status cpu_silu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x,
                                         const float *dy, float *dx) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-x[i]));
        dx[i] = dy[i] * s * (1.0f + x[i] * (1.0f - s));
    }
    return LORA_OK;
}

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

static lora_status cpu_gelu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * INV_SQRT2));
    return LORA_OK;
}

static lora_status cpu_gelu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x,
                                         const float *dy, float *dx) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + erff(x[i] * INV_SQRT2));
        float pdf = INV_SQRT_2PI * expf(-0.5f * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
    return LORA_OK;
}

/* fp16 -> fp32, branch-free (vectorises), bit-identical to lora_f16_to_f32. */
CPU_ISA_CLONES static void f16_to_f32_row(const uint16_t *s, float *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t m = (uint32_t)(s[i] & 0x7fffu) << 13, e = m & 0x0f800000u, r;
        uint32_t nrm = m + 0x38000000u + (e == 0x0f800000u ? 0x38000000u : 0u);   /* normal, inf/nan */
        uint32_t den = m + 0x38800000u, mag = 0x38800000u;                         /* zero, subnormal */
        float fd, fm;
        memcpy(&fd, &den, 4);
        memcpy(&fm, &mag, 4);
        fd -= fm;
        memcpy(&den, &fd, 4);
        r = (e == 0 ? den : nrm) | (uint32_t)(s[i] & 0x8000u) << 16;
        memcpy(d + i, &r, 4);
    }
}

static lora_status cpu_convert(struct lora_backend_impl *be, int64_t n, lora_dtype st, const void *src,
                               lora_dtype dt, void *dst) {
    int nt = lora_threads(be->ctx);
    if (st == dt) {
        size_t bytes = (size_t)n * (size_t)(lora_dtype_bits(st) / 8);
        if (bytes) memmove(dst, src, bytes);
        return LORA_OK;
    }
    if (st == LORA_DTYPE_F32 && dt == LORA_DTYPE_F16) {
        const float *s = src; uint16_t *d = dst;
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) d[i] = lora_f32_to_f16(s[i]);
    } else if (st == LORA_DTYPE_F32 && dt == LORA_DTYPE_BF16) {
        const float *s = src; uint16_t *d = dst;
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) d[i] = lora_f32_to_bf16(s[i]);
    } else if (st == LORA_DTYPE_F16 && dt == LORA_DTYPE_F32) {
        /* Branch-free (vectorises), bit-identical to lora_f16_to_f32: the U-Net widens each
         * 16-bit weight right before its GEMM. Serial: memory-bound, and two threads measured
         * slower on 2 cores (0.99 vs 0.70 ns per element for a 29.5M-element conv weight). */
        f16_to_f32_row(src, dst, n);
    } else if (st == LORA_DTYPE_BF16 && dt == LORA_DTYPE_F32) {
        const uint16_t *s = src; float *d = dst;
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) d[i] = lora_bf16_to_f32(s[i]);
    } else {
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "cpu convert: %s -> %s is not supported",
                         lora_dtype_name(st) ? lora_dtype_name(st) : "?",
                         lora_dtype_name(dt) ? lora_dtype_name(dt) : "?");
    }
    return LORA_OK;
}

static lora_status cpu_im2col_f32(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h,
                                  int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad,
                                  float *cols) {
    if (stride < 1 || pad < 0 || kh < 1 || kw < 1 || h + 2 * pad < kh || w + 2 * pad < kw)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cpu im2col: kernel %lldx%lld stride %lld pad %lld does not fit %lldx%lld",
                         (long long)kh, (long long)kw, (long long)stride, (long long)pad, (long long)h, (long long)w);
    int64_t oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
    /* Serial on purpose: it is memory-bound, and an OpenMP team spinning after the loop
     * starves the OpenBLAS threads of the GEMM that follows (measured: 20x slower on
     * 2 cores for a 4->320 channel conv; see bench/bench_gemm.c). */
    int64_t rows = c * kh * kw;
    for (int64_t r = 0; r < rows; r++) {
        int64_t ci = r / (kh * kw), ky = (r / kw) % kh, kx = r % kw;
        float *dst = cols + r * oh * ow;
        /* output columns whose input column lies inside the image: ox in [lo, hi) */
        int64_t lo = 0, hi = ow;
        while (lo < ow && lo * stride - pad + kx < 0) lo++;
        while (hi > lo && (hi - 1) * stride - pad + kx >= w) hi--;
        for (int64_t oy = 0; oy < oh; oy++) {
            int64_t iy = oy * stride - pad + ky;
            float *row = dst + oy * ow;
            if (iy < 0 || iy >= h) {
                memset(row, 0, (size_t)ow * sizeof(float));
                continue;
            }
            const float *src = x + (ci * h + iy) * w - pad + kx;
            for (int64_t ox = 0; ox < lo; ox++) row[ox] = 0.0f;
            if (stride == 1) memcpy(row + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
            else for (int64_t ox = lo; ox < hi; ox++) row[ox] = src[ox * stride];
            for (int64_t ox = hi; ox < ow; ox++) row[ox] = 0.0f;
        }
    }
    return LORA_OK;
}

/* ---- layer-op primitives (the loops lib/nn ran before they moved behind the vtable) ---- */

static lora_status cpu_fill_f32(struct lora_backend_impl *be, int64_t n, float value, float *x) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] = value;
    return LORA_OK;
}

static lora_status cpu_scale_f32(struct lora_backend_impl *be, int64_t n, float alpha, float *x) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] *= alpha;
    return LORA_OK;
}

static lora_status cpu_add_rows_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const float *row,
                                    float beta, float *y) {
    int nt = lora_threads(be->ctx);
    if (beta == 0.0f) {
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) memcpy(y + i * c, row, (size_t)c * sizeof(float));
    } else {
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float *yi = y + i * c;
            for (int64_t j = 0; j < c; j++) yi[j] = row[j] + beta * yi[j];
        }
    }
    return LORA_OK;
}

static lora_status cpu_col_sum_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const float *x,
                                   float beta, float *out) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
    for (int64_t j = 0; j < c; j++) {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += x[i * c + j];
        out[j] = beta == 0.0f ? (float)s : beta * out[j] + (float)s;
    }
    return LORA_OK;
}

#define QG_K 1.702f

static lora_status cpu_quick_gelu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i];
        y[i] = xi * (1.0f / (1.0f + expf(-QG_K * xi)));
    }
    return LORA_OK;
}

static lora_status cpu_quick_gelu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x,
                                               const float *dy, float *dx) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i], s = 1.0f / (1.0f + expf(-QG_K * xi));
        dx[i] = dy[i] * (s + xi * QG_K * s * (1.0f - s));
    }
    return LORA_OK;
}

static lora_status cpu_layernorm_f32(struct lora_backend_impl *be, int64_t n, int64_t c, float eps,
                                     const float *x, const float *gamma, const float *beta, float *y,
                                     float *mean, float *rstd) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * c;
        double s = 0.0;
        for (int64_t j = 0; j < c; j++) s += xi[j];
        double m = s / (double)c, v = 0.0;
        for (int64_t j = 0; j < c; j++) {
            double dlt = xi[j] - m;
            v += dlt * dlt;
        }
        v /= (double)c;
        float mf = (float)m, rs = (float)(1.0 / sqrt(v + (double)eps));
        float *yi = y + i * c;
        for (int64_t j = 0; j < c; j++) {
            float nrm = (xi[j] - mf) * rs;
            yi[j] = nrm * (gamma ? gamma[j] : 1.0f) + (beta ? beta[j] : 0.0f);
        }
        mean[i] = mf;
        rstd[i] = rs;
    }
    return LORA_OK;
}

#define LN_COL_BLOCK 64   /* columns per task of the parameter-gradient pass */

static lora_status cpu_layernorm_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t c,
                                              const float *dy, const float *x, const float *mean,
                                              const float *rstd, const float *gamma, float *dx,
                                              float *d_gamma, float *d_beta, int accumulate) {
    int nt = lora_threads(be->ctx);
    if (dx) {
        /* with xh = (x - mean) rstd and g = dy * gamma:
         * dx = rstd * (g - mean(g) - xh * mean(g * xh)) */
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *xi = x + i * c, *gi = dy + i * c;
            float m = mean[i], rs = rstd[i];
            double sg = 0.0, sgx = 0.0;
            for (int64_t j = 0; j < c; j++) {
                float g = gi[j] * (gamma ? gamma[j] : 1.0f);
                sg += g;
                sgx += (double)g * ((xi[j] - m) * rs);
            }
            float mg = (float)(sg / (double)c), mgx = (float)(sgx / (double)c);
            float *di = dx + i * c;
            for (int64_t j = 0; j < c; j++) {
                float g = gi[j] * (gamma ? gamma[j] : 1.0f);
                float v = rs * (g - mg - (xi[j] - m) * rs * mgx);
                di[j] = accumulate ? di[j] + v : v;
            }
        }
    }
    if (d_gamma || d_beta) {
        int64_t nblk = (c + LN_COL_BLOCK - 1) / LN_COL_BLOCK;
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
        for (int64_t bk = 0; bk < nblk; bk++) {
            int64_t j0 = bk * LN_COL_BLOCK, j1 = j0 + LN_COL_BLOCK < c ? j0 + LN_COL_BLOCK : c;
            for (int64_t i = 0; i < n; i++) {
                const float *xi = x + i * c, *gi = dy + i * c;
                float m = mean[i], rs = rstd[i];
                for (int64_t j = j0; j < j1; j++) {
                    if (d_gamma) d_gamma[j] += gi[j] * ((xi[j] - m) * rs);
                    if (d_beta) d_beta[j] += gi[j];
                }
            }
        }
    }
    return LORA_OK;
}

/* exp(x) for x <= 0 (softmax after the max is subtracted), branch-free so the row loops
 * vectorise: round-to-nearest n = x / ln 2 with the 1.5 * 2^23 trick, Cody-Waite reduction,
 * Cephes' degree-6 polynomial (max relative error 8.3e-8 over [-87, 0], under one float
 * ulp), times 2^n; below -87.3 (n < -126, where expf turns subnormal) an integer mask makes
 * it 0, as it does for NaN (the row max would be NaN too, and the row then NaN). */
static inline float softmax_exp(float x) {
    /* -inf, NaN and huge negatives would overflow the float->int conversion below (UB): clamp
     * them to -100, which the mask turns into 0 as before. */
    x = x > -100.0f ? x : -100.0f;
    float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t n = (int32_t)fn, e = (n + 127) * (1 << 23), keep = -(int32_t)(n >= -126), bits;
    float sc, v;
    memcpy(&sc, &e, 4);
    v = p * sc;
    memcpy(&bits, &v, 4);
    bits &= keep;
    memcpy(&v, &bits, 4);
    return v;
}

#define SM_LANES 8   /* partial max / sum lanes: the reductions vectorise */

/* One row: s[0..lim) = softmax, s[lim..t) = 0 (causal rows). */
CPU_ISA_CLONES static void softmax_row(float *s, int64_t lim, int64_t t) {
    int64_t nb = lim / SM_LANES * SM_LANES;
    float mv[SM_LANES], sv[SM_LANES];
    for (int k = 0; k < SM_LANES; k++) mv[k] = s[0];
    for (int64_t j = 0; j < nb; j += SM_LANES) {
        for (int k = 0; k < SM_LANES; k++) mv[k] = s[j + k] > mv[k] ? s[j + k] : mv[k];
    }
    float mx = s[0];
    for (int k = 0; k < SM_LANES; k++) mx = mv[k] > mx ? mv[k] : mx;
    for (int64_t j = nb; j < lim; j++) mx = s[j] > mx ? s[j] : mx;
    for (int64_t j = 0; j < lim; j++) s[j] = softmax_exp(s[j] - mx);
    for (int k = 0; k < SM_LANES; k++) sv[k] = 0.0f;
    for (int64_t j = 0; j < nb; j += SM_LANES) {
        for (int k = 0; k < SM_LANES; k++) sv[k] += s[j + k];
    }
    float sum = 0.0f;
    for (int k = 0; k < SM_LANES; k++) sum += sv[k];
    for (int64_t j = nb; j < lim; j++) sum += s[j];
    float inv = 1.0f / sum;
    for (int64_t j = 0; j < lim; j++) s[j] *= inv;
    for (int64_t j = lim; j < t; j++) s[j] = 0.0f;
}

static lora_status cpu_softmax_f32(struct lora_backend_impl *be, int64_t rows, int64_t t, int causal, float *x) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (rows * t > CPU_PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = r % t;
        softmax_row(x + r * t, causal ? i + 1 : t, t);
    }
    return LORA_OK;
}

static lora_status cpu_softmax_backward_f32(struct lora_backend_impl *be, int64_t rows, int64_t t,
                                            const float *p, const float *dy, float *dx) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (rows * t > CPU_PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *pr = p + r * t, *gr = dy + r * t;
        float *dr = dx + r * t;
        float dv[SM_LANES] = {0}, dot = 0.0f;
        int64_t nb = t / SM_LANES * SM_LANES;
        for (int64_t j = 0; j < nb; j += SM_LANES) {
            for (int k = 0; k < SM_LANES; k++) dv[k] += pr[j + k] * gr[j + k];
        }
        for (int k = 0; k < SM_LANES; k++) dot += dv[k];
        for (int64_t j = nb; j < t; j++) dot += pr[j] * gr[j];
        for (int64_t j = 0; j < t; j++) dr[j] = pr[j] * (gr[j] - dot);
    }
    return LORA_OK;
}

static lora_status cpu_embedding_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const int32_t *ids,
                                     const float *table, const float *pos, int64_t positions,
                                     int64_t vocab, float *y, int64_t *bad_row, int32_t *bad_id) {
    *bad_row = -1;
    *bad_id = 0;
    for (int64_t i = 0; i < n; i++)   /* validate before touching any row */
        if (ids[i] < 0 || ids[i] >= vocab) {
            *bad_row = i;
            *bad_id = ids[i];
            return LORA_OK;
        }
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * c > CPU_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *e = table + (int64_t)ids[i] * c;
        float *yi = y + i * c;
        if (pos) {
            const float *p = pos + (i % positions) * c;
            for (int64_t j = 0; j < c; j++) yi[j] = e[j] + p[j];
        } else {
            memcpy(yi, e, (size_t)c * sizeof(float));
        }
    }
    return LORA_OK;
}

static lora_status cpu_embedding_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t c,
                                              const int32_t *ids, const float *dy, int64_t positions,
                                              float *d_table, float *d_pos) {
    (void)be;
    /* serial: several rows may share an id (or a position) */
    for (int64_t i = 0; i < n; i++) {
        const float *g = dy + i * c;
        if (d_table) {
            float *d = d_table + (int64_t)ids[i] * c;
            for (int64_t j = 0; j < c; j++) d[j] += g[j];
        }
        if (d_pos) {
            float *d = d_pos + (i % positions) * c;
            for (int64_t j = 0; j < c; j++) d[j] += g[j];
        }
    }
    return LORA_OK;
}

static void cpu_free(struct lora_backend_impl *be) {
    lora_free(NULL, be);   /* allocated without the context's hooks, see create */
}

static const struct lora_backend_iface cpu_iface = {
    .version = LORA_BACKEND_IFACE_VERSION,
    .name = "cpu",
    .free = cpu_free,
    .buf_alloc = cpu_buf_alloc,
    .buf_free = cpu_buf_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .gemm_f32 = cpu_gemm_f32,
    .gemm_ex = cpu_gemm_ex,
    .gemm_batched_f32 = NULL,
    .axpby_f32 = cpu_axpby_f32,
    .mul_f32 = cpu_mul_f32,
    .silu_f32 = cpu_silu_f32,
    .silu_backward_f32 = cpu_silu_backward_f32,
    .gelu_f32 = cpu_gelu_f32,
    .gelu_backward_f32 = cpu_gelu_backward_f32,
    .convert = cpu_convert,
    .im2col_f32 = cpu_im2col_f32,
    .memory = NULL,
    .copy = cpu_copy,
    .fill_f32 = cpu_fill_f32,
    .scale_f32 = cpu_scale_f32,
    .add_rows_f32 = cpu_add_rows_f32,
    .col_sum_f32 = cpu_col_sum_f32,
    .quick_gelu_f32 = cpu_quick_gelu_f32,
    .quick_gelu_backward_f32 = cpu_quick_gelu_backward_f32,
    .layernorm_f32 = cpu_layernorm_f32,
    .layernorm_backward_f32 = cpu_layernorm_backward_f32,
    .softmax_f32 = cpu_softmax_f32,
    .softmax_backward_f32 = cpu_softmax_backward_f32,
    .embedding_f32 = cpu_embedding_f32,
    .embedding_backward_f32 = cpu_embedding_backward_f32,
    .im2col_ex_f32 = cpu_im2col_ex_f32,
    .col2im_f32 = cpu_col2im_f32,
    .add_row_scalar_f32 = cpu_add_row_scalar_f32,
    .row_sum_f32 = cpu_row_sum_f32,
    .groupnorm_f32 = cpu_groupnorm_f32,
    .groupnorm_backward_f32 = cpu_groupnorm_backward_f32,
    .upsample2x_f32 = cpu_upsample2x_f32,
    .upsample2x_backward_f32 = cpu_upsample2x_backward_f32,
    .upsample_nearest_f32 = cpu_upsample_nearest_f32,
    .upsample_nearest_backward_f32 = cpu_upsample_nearest_backward_f32,
    .geglu_f32 = cpu_geglu_f32,
    .geglu_backward_f32 = cpu_geglu_backward_f32,
    .timestep_embedding_f32 = cpu_timestep_embedding_f32,
    .clamp_f32 = cpu_clamp_f32,
};

lora_status lora_backend_cpu_create(lora_ctx *ctx, struct lora_backend_impl **out) {
    /* Not through lora_malloc: the backend exists before the user may set hooks. */
    struct lora_backend_impl *be = lora_malloc(NULL, sizeof *be);
    if (!be) return lora_fail(ctx, LORA_E_NOMEM, "cpu backend: out of memory");
    be->iface = &cpu_iface;
    be->ctx = ctx;
    be->impl = NULL;
    *out = be;
    return LORA_OK;
}

void lora_backend_free(struct lora_backend_impl *be) {
    if (be) be->iface->free(be);
}
