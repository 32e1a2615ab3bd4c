/* CPU image-op primitives: im2col/col2im with explicit padding, per-row scalar add and row
 * sums, GroupNorm (+ fused SiLU) forward/backward, nearest upsample (2x, and to any size),
 * GEGLU, sinusoidal timestep embedding. Loops over independent rows/planes run with OpenMP. */
#include <math.h>
#include <string.h>

#include "backend/cpu_image.h"

#define PAR_MIN 32768

static lora_status bad(struct lora_backend_impl *be, const char *op) {
    return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cpu %s: bad shape", op);
}

lora_status cpu_im2col_ex_f32(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h,
                              int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                              int64_t pad_l, int64_t oh, int64_t ow, float *cols) {
    if (c < 0 || h < 1 || w < 1 || kh < 1 || kw < 1 || stride < 1 || oh < 0 || ow < 0)
        return bad(be, "im2col_ex");
    int64_t rows = c * kh * kw;
    int nt = lora_threads(be->ctx);
    /* Rows are independent; run them on all threads (a serial copy left the second core idle
     * for ~10% of a VAE decode). Stride 1: each output row is one zero-filled margin on each
     * side and a memcpy of the in-bounds span, the same values as the per-pixel loop. */
#pragma omp parallel for num_threads(nt) if (rows * oh * ow > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t ci = r / (kh * kw), ky = (r / kw) % kh, kx = r % kw;
        float *dst = cols + r * oh * ow;
        /* stride 1: ox in [lo, hi) reads src[ox - pad_l + kx], in bounds */
        int64_t lo = pad_l - kx > 0 ? pad_l - kx : 0, hi = w + pad_l - kx < ow ? w + pad_l - kx : ow;
        if (hi < lo) hi = lo;
        if (lo > ow) lo = hi = ow;
        for (int64_t oy = 0; oy < oh; oy++) {
            int64_t iy = oy * stride - pad_t + ky;
            float *row = dst + oy * ow;
            if (iy < 0 || iy >= h) {
                memset(row, 0, (size_t)ow * sizeof(float));
                continue;
            }
            const float *src = x + (ci * h + iy) * w;
            if (stride == 1) {
                if (lo > 0) memset(row, 0, (size_t)lo * sizeof(float));
                if (hi > lo) memcpy(row + lo, src + lo - pad_l + kx, (size_t)(hi - lo) * sizeof(float));
                if (ow > hi) memset(row + hi, 0, (size_t)(ow - hi) * sizeof(float));
                continue;
            }
            for (int64_t ox = 0; ox < ow; ox++) {
                int64_t ix = ox * stride - pad_l + kx;
                row[ox] = ix >= 0 && ix < w ? src[ix] : 0.0f;
            }
        }
    }
    return LORA_OK;
}

lora_status cpu_col2im_f32(struct lora_backend_impl *be, const float *cols, int64_t c, int64_t h,
                           int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                           int64_t pad_l, int64_t oh, int64_t ow, float *x, int accumulate) {
    if (c < 0 || h < 1 || w < 1 || kh < 1 || kw < 1 || stride < 1 || oh < 0 || ow < 0)
        return bad(be, "col2im");
    int nt = lora_threads(be->ctx);
    /* channels are independent: one thread per channel plane */
#pragma omp parallel for num_threads(nt) if (c * h * w * kh * kw > PAR_MIN) schedule(static)
    for (int64_t ci = 0; ci < c; ci++) {
        float *xp = x + ci * h * w;
        if (!accumulate) memset(xp, 0, (size_t)(h * w) * sizeof(float));
        for (int64_t ky = 0; ky < kh; ky++)
            for (int64_t kx = 0; kx < kw; kx++) {
                const float *src = cols + ((ci * kh + ky) * kw + kx) * oh * ow;
                for (int64_t oy = 0; oy < oh; oy++) {
                    int64_t iy = oy * stride - pad_t + ky;
                    if (iy < 0 || iy >= h) continue;
                    float *row = xp + iy * w;
                    const float *s = src + oy * ow;
                    for (int64_t ox = 0; ox < ow; ox++) {
                        int64_t ix = ox * stride - pad_l + kx;
                        if (ix >= 0 && ix < w) row[ix] += s[ox];
                    }
                }
            }
    }
    return LORA_OK;
}

lora_status cpu_add_row_scalar_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols,
                                   const float *v, int64_t period, float *y) {
    if (rows < 0 || cols < 0 || period < 1) return bad(be, "add_row_scalar");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (rows * cols > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float a = v[r % period], *yr = y + r * cols;
        for (int64_t j = 0; j < cols; j++) yr[j] += a;
    }
    return LORA_OK;
}

lora_status cpu_row_sum_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols, const float *x,
                            float beta, float *out) {
    if (rows < 0 || cols < 0) return bad(be, "row_sum");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (rows * cols > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        double s = 0.0;
        const float *xr = x + r * cols;
        for (int64_t j = 0; j < cols; j++) s += xr[j];
        out[r] = beta == 0.0f ? (float)s : beta * out[r] + (float)s;
    }
    return LORA_OK;
}

static inline float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

/* GroupNorm's statistics and affine loops run several times faster with AVX-512/AVX2 (double
 * lanes, independent partial sums instead of one dependent chain); GCC clones them per ISA
 * level as cpu.c does. Not under sanitizers (ifunc resolvers run before their runtime). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define GN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GN_ISA_CLONES
#endif

/* sum of x[0..n) - mu, squared when sq, in float64 over 8 partial sums */
GN_ISA_CLONES static double gn_sum(const float *x, int64_t n, double mu, int sq) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    if (sq)
        for (; j + 8 <= n; j += 8)
            for (int l = 0; l < 8; l++) {
                double d = x[j + l] - mu;
                acc[l] += d * d;
            }
    else
        for (; j + 8 <= n; j += 8)
            for (int l = 0; l < 8; l++) acc[l] += x[j + l];
    double t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) {
        double d = sq ? x[j] - mu : x[j];
        t += sq ? d * d : d;
    }
    return t;
}

/* y = (float)((x - mu) * r) * g + b over one channel plane (the scalar formula, in lanes) */
GN_ISA_CLONES static void gn_affine(const float *x, float *y, int64_t n, double mu, double r, float g, float b) {
    for (int64_t j = 0; j < n; j++) y[j] = (float)((x[j] - mu) * r) * g + b;
}

lora_status cpu_groupnorm_f32(struct lora_backend_impl *be, int64_t batch, int64_t c, int64_t hw,
                              int64_t groups, float eps, int silu, const float *x, const float *gamma,
                              const float *beta, float *y, float *mean, float *rstd) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups) return bad(be, "groupnorm");
    int64_t cg = c / groups, n = batch * groups, len = cg * hw;
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * len > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xg = x + i * len;
        float *yg = y + i * len;
        double mu = gn_sum(xg, len, 0.0, 0) / (double)len;
        double s2 = gn_sum(xg, len, mu, 1);
        double r = 1.0 / sqrt(s2 / (double)len + (double)eps);
        mean[i] = (float)mu;
        rstd[i] = (float)r;
        int64_t c0 = (i % groups) * cg;
        for (int64_t k = 0; k < cg; k++) {
            float g = gamma ? gamma[c0 + k] : 1.0f, b = beta ? beta[c0 + k] : 0.0f;
            float *yc = yg + k * hw;
            gn_affine(xg + k * hw, yc, hw, mu, r, g, b);
            if (silu)
                for (int64_t j = 0; j < hw; j++) yc[j] = yc[j] * sigmoidf_(yc[j]);
        }
    }
    return LORA_OK;
}

lora_status cpu_groupnorm_backward_f32(struct lora_backend_impl *be, int64_t batch, int64_t c,
                                       int64_t hw, int64_t groups, int silu, const float *dy,
                                       const float *x, const float *mean, const float *rstd,
                                       const float *gamma, const float *beta, float *dx,
                                       int accumulate) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups) return bad(be, "groupnorm backward");
    int64_t cg = c / groups, n = batch * groups, len = cg * hw;
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * len > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xg = x + i * len, *dyg = dy + i * len;
        float *dxg = dx + i * len;
        double mu = mean[i], r = rstd[i];
        int64_t c0 = (i % groups) * cg;
        /* pass 1: sums of dxhat and dxhat * xhat, dxhat = dz * gamma */
        double s1 = 0.0, s2 = 0.0;
        for (int64_t k = 0; k < cg; k++) {
            float g = gamma ? gamma[c0 + k] : 1.0f, b = beta ? beta[c0 + k] : 0.0f;
            for (int64_t j = 0; j < hw; j++) {
                int64_t o = k * hw + j;
                double xh = (xg[o] - mu) * r, dz = dyg[o];
                if (silu) {
                    float z = (float)xh * g + b, sg = sigmoidf_(z);
                    dz *= (double)sg * (1.0 + (double)z * (1.0 - sg));
                }
                double dxh = dz * g;
                s1 += dxh;
                s2 += dxh * xh;
            }
        }
        double m1 = s1 / (double)len, m2 = s2 / (double)len;
        for (int64_t k = 0; k < cg; k++) {
            float g = gamma ? gamma[c0 + k] : 1.0f, b = beta ? beta[c0 + k] : 0.0f;
            for (int64_t j = 0; j < hw; j++) {
                int64_t o = k * hw + j;
                double xh = (xg[o] - mu) * r, dz = dyg[o];
                if (silu) {
                    float z = (float)xh * g + b, sg = sigmoidf_(z);
                    dz *= (double)sg * (1.0 + (double)z * (1.0 - sg));
                }
                float v = (float)(r * (dz * g - m1 - xh * m2));
                dxg[o] = accumulate ? dxg[o] + v : v;
            }
        }
    }
    return LORA_OK;
}

lora_status cpu_upsample2x_f32(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                               const float *x, float *y) {
    if (planes < 0 || h < 1 || w < 1) return bad(be, "upsample2x");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (planes * h * w * 4 > PAR_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < h; i++) {
            const float *xs = x + (p * h + i) * w;
            float *y0 = y + (p * 2 * h + 2 * i) * 2 * w, *y1 = y0 + 2 * w;
            for (int64_t j = 0; j < w; j++) y0[2 * j] = y0[2 * j + 1] = xs[j];
            memcpy(y1, y0, (size_t)(2 * w) * sizeof(float));
        }
    return LORA_OK;
}

lora_status cpu_upsample2x_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                        int64_t w, const float *dy, float *dx) {
    if (planes < 0 || h < 1 || w < 1) return bad(be, "upsample2x backward");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (planes * h * w * 4 > PAR_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < h; i++) {
            float *d = dx + (p * h + i) * w;
            const float *y0 = dy + (p * 2 * h + 2 * i) * 2 * w, *y1 = y0 + 2 * w;
            for (int64_t j = 0; j < w; j++) d[j] = (y0[2 * j] + y0[2 * j + 1]) + (y1[2 * j] + y1[2 * j + 1]);
        }
    return LORA_OK;
}

/* PyTorch 1.13's nearest source index (UpSample.h nearest_idx): the 1x and 2x cases exact,
 * otherwise floor(o * (float)in / out) in float32, clamped. */
static int64_t nearest_src(int64_t o, int64_t in, int64_t out) {
    if (out == in) return o;
    if (out == 2 * in) return o >> 1;
    float scale = (float)in / (float)out;
    int64_t s = (int64_t)floorf((float)o * scale);
    return s < in - 1 ? s : in - 1;
}

/* [*lo, *hi): the outputs reading source index s (the map is monotone) */
static void nearest_range(int64_t s, int64_t in, int64_t out, int64_t *lo, int64_t *hi) {
    int64_t o = s * out / in;
    while (o > 0 && nearest_src(o - 1, in, out) >= s) o--;
    while (o < out && nearest_src(o, in, out) < s) o++;
    *lo = o;
    while (o < out && nearest_src(o, in, out) == s) o++;
    *hi = o;
}

lora_status cpu_upsample_nearest_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                     int64_t w, int64_t oh, int64_t ow, const float *x, float *y) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1) return bad(be, "upsample nearest");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (planes * oh * ow > PAR_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < oh; i++) {
            const float *xs = x + (p * h + nearest_src(i, h, oh)) * w;
            float *yr = y + (p * oh + i) * ow;
            for (int64_t j = 0; j < ow; j++) yr[j] = xs[nearest_src(j, w, ow)];
        }
    return LORA_OK;
}

lora_status cpu_upsample_nearest_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                              int64_t w, int64_t oh, int64_t ow, const float *dy,
                                              float *dx) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1) return bad(be, "upsample nearest backward");
    int nt = lora_threads(be->ctx);
    /* a gather per dx element over its dy rectangle, summed row-major (the CUDA kernel's order) */
#pragma omp parallel for num_threads(nt) if (planes * oh * ow > PAR_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < h; i++) {
            int64_t r0, r1;
            nearest_range(i, h, oh, &r0, &r1);
            for (int64_t j = 0; j < w; j++) {
                int64_t c0, c1;
                nearest_range(j, w, ow, &c0, &c1);
                float acc = 0.0f;
                for (int64_t r = r0; r < r1; r++)
                    for (int64_t c = c0; c < c1; c++) acc += dy[(p * oh + r) * ow + c];
                dx[(p * h + i) * w + j] = acc;
            }
        }
    return LORA_OK;
}

lora_status cpu_geglu_f32(struct lora_backend_impl *be, int64_t n, int64_t inner, const float *x,
                          float *y) {
    if (n < 0 || inner < 1) return bad(be, "geglu");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * inner > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *h = x + i * 2 * inner, *g = h + inner;
        float *yi = y + i * inner;
        for (int64_t j = 0; j < inner; j++) {
            float gg = g[j];
            float ge = 0.5f * gg * (1.0f + erff(gg * 0.70710678118654752f));
            yi[j] = h[j] * ge;
        }
    }
    return LORA_OK;
}

lora_status cpu_geglu_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t inner,
                                   const float *x, const float *dy, float *dx) {
    if (n < 0 || inner < 1) return bad(be, "geglu backward");
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * inner > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *h = x + i * 2 * inner, *g = h + inner, *d = dy + i * inner;
        float *dh = dx + i * 2 * inner, *dg = dh + inner;
        for (int64_t j = 0; j < inner; j++) {
            float gg = g[j];
            float cdf = 0.5f * (1.0f + erff(gg * 0.70710678118654752f));
            float pdf = 0.39894228040143268f * expf(-0.5f * gg * gg);
            float hj = h[j], dj = d[j];
            dh[j] = dj * gg * cdf;
            dg[j] = dj * hj * (cdf + gg * pdf);
        }
    }
    return LORA_OK;
}

lora_status cpu_timestep_embedding_f32(struct lora_backend_impl *be, int64_t batch, int64_t dim,
                                       const float *t, int flip_sin_to_cos, float freq_shift,
                                       float max_period, float *y) {
    int64_t half = dim / 2;
    if (batch < 0 || dim < 2 || (float)half == freq_shift) return bad(be, "timestep embedding");
    /* torch: exponent = -log(max_period) * arange(half) (fp32) / (half - shift); exp; t * freq */
    float nl = (float)-log((double)max_period), den = (float)half - freq_shift;
    for (int64_t b = 0; b < batch; b++) {
        float *yb = y + b * dim;
        for (int64_t i = 0; i < half; i++) {
            float e = (nl * (float)i) / den;
            float f = expf(e);
            float a = t[b] * f;
            float s = (float)sin((double)a), co = (float)cos((double)a);
            yb[flip_sin_to_cos ? half + i : i] = s;
            yb[flip_sin_to_cos ? i : half + i] = co;
        }
        if (dim % 2) yb[dim - 1] = 0.0f;
    }
    return LORA_OK;
}

lora_status cpu_clamp_f32(struct lora_backend_impl *be, int64_t n, float lo, float hi, float *x) {
    if (n < 0) return bad(be, "clamp");
    for (int64_t i = 0; i < n; i++) x[i] = x[i] < lo ? lo : x[i] > hi ? hi : x[i];
    return LORA_OK;
}
