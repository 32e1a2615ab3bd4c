/* Image ops of lib/nn (conv2d, GroupNorm(+SiLU), nearest upsample, channel concat, per-sample
 * channel add, GEGLU, timestep embedding, NCHW <-> token projections, blocked multi-head
 * attention): fp32 forwards against double-precision references, and fp32 input gradients
 * against central finite differences of those references (loss = sum(y * w)). */
#include <math.h>

#include "../test.h"
#include "internal.h"
#include "backend/backend.h"
#include "nn/nn.h"

#define FWD_TOL 2e-6   /* rel L2, fp32 forward vs double */
#define BWD_TOL 2e-5   /* rel L2, fp32 gradient vs double central differences */

static uint64_t g_seed = 88172645463325252ull;
static double urand(void) {   /* xorshift64, uniform [-1, 1) */
    g_seed ^= g_seed << 13; g_seed ^= g_seed >> 7; g_seed ^= g_seed << 17;
    return (double)(g_seed >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}
static void fill(float *x, int64_t n, double s) { for (int64_t i = 0; i < n; i++) x[i] = (float)(urand() * s); }

static double rel_l2d(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) { double d = a[i] - b[i]; num += d * d; den += b[i] * b[i]; }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* a reference forward in double: y = f(x) */
typedef void (*ref_fn)(const void *p, const double *x, double *y);

/* forward check of y (fp32) against ref(x), and dx (fp32, from dy = w) against central
 * differences of L = sum(ref(x) * w). */
static void check_op(const char *name, ref_fn ref, const void *p, const float *x, int64_t nx,
                     const float *y, int64_t ny, const float *w, const float *dx) {
    double *xd = malloc((size_t)nx * sizeof *xd), *yd = malloc((size_t)ny * sizeof *yd);
    double *g = malloc((size_t)nx * sizeof *g);
    for (int64_t i = 0; i < nx; i++) xd[i] = x[i];
    ref(p, xd, yd);
    double rf = rel_l2d(y, yd, ny);
    CHECK_MSG(rf <= FWD_TOL, "%s forward rel L2 %.3e", name, rf);
    if (dx) {
        const double h = 1e-5;
        for (int64_t i = 0; i < nx; i++) {
            double s = xd[i], lp = 0, lm = 0;
            xd[i] = s + h; ref(p, xd, yd);
            for (int64_t j = 0; j < ny; j++) lp += yd[j] * w[j];
            xd[i] = s - h; ref(p, xd, yd);
            for (int64_t j = 0; j < ny; j++) lm += yd[j] * w[j];
            xd[i] = s;
            g[i] = (lp - lm) / (2 * h);
        }
        double rb = rel_l2d(dx, g, nx);
        CHECK_MSG(rb <= BWD_TOL, "%s backward rel L2 %.3e", name, rb);
        printf("%-34s fwd %.2e  bwd %.2e\n", name, rf, rb);
    } else {
        printf("%-34s fwd %.2e\n", name, rf);
    }
    free(xd); free(yd); free(g);
}

/* ---- conv2d ---- */
struct conv_p { struct nn_conv2d_shape s; const float *w, *b; };
static void conv_ref(const void *vp, const double *x, double *y) {
    const struct conv_p *p = vp;
    const struct nn_conv2d_shape *s = &p->s;
    int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), k = s->k;
    for (int64_t b = 0; b < s->batch; b++)
        for (int64_t co = 0; co < s->cout; co++)
            for (int64_t oy = 0; oy < oh; oy++)
                for (int64_t ox = 0; ox < ow; ox++) {
                    double acc = p->b ? p->b[co] : 0.0;
                    for (int64_t ci = 0; ci < s->cin; ci++)
                        for (int64_t ky = 0; ky < k; ky++)
                            for (int64_t kx = 0; kx < k; kx++) {
                                int64_t iy = oy * s->stride - s->pad_t + ky, ix = ox * s->stride - s->pad_l + kx;
                                if (iy < 0 || iy >= s->h || ix < 0 || ix >= s->w) continue;
                                acc += p->w[((co * s->cin + ci) * k + ky) * k + kx] *
                                       x[((b * s->cin + ci) * s->h + iy) * s->w + ix];
                            }
                    y[((b * s->cout + co) * oh + oy) * ow + ox] = acc;
                }
}

static void test_conv(struct lora_backend_impl *be, const char *name, struct nn_conv2d_shape s, int bias) {
    int64_t oh = nn_conv2d_oh(&s), ow = nn_conv2d_ow(&s);
    int64_t nx = s.batch * s.cin * s.h * s.w, ny = s.batch * s.cout * oh * ow, nw = s.cout * s.cin * s.k * s.k;
    int64_t nc = nn_conv2d_cols_floats(&s);
    float *x = malloc(nx * 4), *y = malloc(ny * 4), *w = malloc(nw * 4), *b = malloc(s.cout * 4);
    float *lw = malloc(ny * 4), *dx = malloc(nx * 4), *cols = nc ? malloc(nc * 4) : NULL;
    fill(x, nx, 1); fill(w, nw, 0.5); fill(b, s.cout, 0.5); fill(lw, ny, 1);
    struct conv_p p = {s, w, bias ? b : NULL};
    CHECK_STATUS(nn_conv2d_forward(be, &s, y, cols, x, w, p.b), LORA_OK);
    CHECK_STATUS(nn_conv2d_backward(be, &s, dx, cols, lw, w, 0), LORA_OK);
    check_op(name, conv_ref, &p, x, nx, y, ny, lw, dx);
    /* accumulate adds onto what is there */
    float *dx2 = malloc(nx * 4);
    for (int64_t i = 0; i < nx; i++) dx2[i] = 1.0f;
    CHECK_STATUS(nn_conv2d_backward(be, &s, dx2, cols, lw, w, 1), LORA_OK);
    double e = 0;
    for (int64_t i = 0; i < nx; i++) e = fmax(e, fabs(dx2[i] - 1.0f - dx[i]));
    CHECK_MSG(e < 1e-5, "%s accumulate off by %.3e", name, e);
    free(x); free(y); free(w); free(b); free(lw); free(dx); free(dx2); free(cols);
}

/* ---- GroupNorm ---- */
struct gn_p { int64_t batch, c, hw, groups; const float *g, *b; double eps; int silu; };
static void gn_ref(const void *vp, const double *x, double *y) {
    const struct gn_p *p = vp;
    int64_t cg = p->c / p->groups, len = cg * p->hw;
    for (int64_t i = 0; i < p->batch * p->groups; i++) {
        const double *xg = x + i * len;
        double mu = 0, var = 0;
        for (int64_t j = 0; j < len; j++) mu += xg[j];
        mu /= len;
        for (int64_t j = 0; j < len; j++) var += (xg[j] - mu) * (xg[j] - mu);
        double r = 1 / sqrt(var / len + p->eps);
        for (int64_t j = 0; j < len; j++) {
            int64_t ch = (i % p->groups) * cg + j / p->hw;
            double z = (xg[j] - mu) * r * p->g[ch] + p->b[ch];
            y[i * len + j] = p->silu ? z / (1 + exp(-z)) : z;
        }
    }
}

static void test_groupnorm(struct lora_backend_impl *be, int silu) {
    struct gn_p p = {2, 6, 5, 3, NULL, NULL, 1e-5, silu};
    int64_t n = p.batch * p.c * p.hw;
    float *x = malloc(n * 4), *y = malloc(n * 4), *lw = malloc(n * 4), *dx = malloc(n * 4);
    float g[6], b[6], mean[6], rstd[6];
    fill(x, n, 2); fill(g, 6, 1); fill(b, 6, 1); fill(lw, n, 1);
    for (int64_t i = 0; i < n; i++) x[i] += 0.5f;   /* a non-zero mean */
    p.g = g; p.b = b;
    CHECK_STATUS(nn_groupnorm_forward(be, y, mean, rstd, x, g, b, p.batch, p.c, p.hw, p.groups, 1e-5f, silu), LORA_OK);
    CHECK_STATUS(nn_groupnorm_backward(be, dx, lw, x, mean, rstd, g, b, p.batch, p.c, p.hw, p.groups, silu, 0), LORA_OK);
    check_op(silu ? "groupnorm+silu" : "groupnorm", gn_ref, &p, x, n, y, n, lw, dx);
    CHECK_STATUS(nn_groupnorm_forward(be, y, mean, rstd, x, g, b, 1, 5, 5, 2, 1e-5f, 0), LORA_E_INVALID_ARG);
    free(x); free(y); free(lw); free(dx);
}

/* ---- upsample ---- */
struct up_p { int64_t planes, h, w; };
static void up_ref(const void *vp, const double *x, double *y) {
    const struct up_p *p = vp;
    for (int64_t q = 0; q < p->planes; q++)
        for (int64_t i = 0; i < 2 * p->h; i++)
            for (int64_t j = 0; j < 2 * p->w; j++)
                y[(q * 2 * p->h + i) * 2 * p->w + j] = x[(q * p->h + i / 2) * p->w + j / 2];
}
static void test_upsample(struct lora_backend_impl *be) {
    struct up_p p = {3, 2, 3};
    int64_t nx = 18, ny = 72;
    float x[18], y[72], lw[72], dx[18];
    fill(x, nx, 1); fill(lw, ny, 1);
    CHECK_STATUS(nn_upsample2x_forward(be, y, x, p.planes, p.h, p.w), LORA_OK);
    CHECK_STATUS(nn_upsample2x_backward(be, dx, lw, p.planes, p.h, p.w), LORA_OK);
    check_op("upsample2x", up_ref, &p, x, nx, y, ny, lw, dx);
}

/* ---- concat (x = [a | b] packed) ---- */
struct cat_p { int64_t batch, ca, cb, hw; };
static void cat_ref(const void *vp, const double *x, double *y) {
    const struct cat_p *p = vp;
    const double *a = x, *b = x + p->batch * p->ca * p->hw;
    for (int64_t i = 0; i < p->batch; i++) {
        for (int64_t j = 0; j < p->ca * p->hw; j++) y[i * (p->ca + p->cb) * p->hw + j] = a[i * p->ca * p->hw + j];
        for (int64_t j = 0; j < p->cb * p->hw; j++)
            y[i * (p->ca + p->cb) * p->hw + p->ca * p->hw + j] = b[i * p->cb * p->hw + j];
    }
}
static void test_concat(struct lora_backend_impl *be) {
    struct cat_p p = {2, 2, 3, 4};
    int64_t na = 16, nb = 24, ny = 40;
    float x[40], y[40], lw[40], dx[40];
    fill(x, na + nb, 1); fill(lw, ny, 1);
    CHECK_STATUS(nn_concat_channels(be, y, x, x + na, p.batch, p.ca, p.cb, p.hw), LORA_OK);
    CHECK_STATUS(nn_concat_channels_backward(be, dx, dx + na, lw, p.batch, p.ca, p.cb, p.hw, 0), LORA_OK);
    check_op("concat channels", cat_ref, &p, x, na + nb, y, ny, lw, dx);
}

/* ---- per-sample channel add: x = [h | v] packed, y = h + v[b, c] ---- */
struct addc_p { int64_t batch, c, hw; };
static void addc_ref(const void *vp, const double *x, double *y) {
    const struct addc_p *p = vp;
    int64_t n = p->batch * p->c * p->hw;
    for (int64_t i = 0; i < n; i++) y[i] = x[i] + x[n + i / p->hw];
}
static void test_add_channel(struct lora_backend_impl *be) {
    struct addc_p p = {2, 3, 5};
    int64_t n = 30, nv = 6;
    float x[36], y[30], lw[30], dx[36];
    fill(x, n + nv, 1); fill(lw, n, 1);
    memcpy(y, x, sizeof y);
    CHECK_STATUS(nn_add_channel(be, y, x + n, p.batch, p.c, p.hw, 1), LORA_OK);
    memcpy(dx, lw, sizeof lw);   /* identity path */
    CHECK_STATUS(nn_add_channel_backward(be, dx + n, lw, p.batch, p.c, p.hw, 0), LORA_OK);
    check_op("add_channel (per sample)", addc_ref, &p, x, n + nv, y, n, lw, dx);
}

/* ---- GEGLU ---- */
struct geglu_p { int64_t n, inner; };
static void geglu_ref(const void *vp, const double *x, double *y) {
    const struct geglu_p *p = vp;
    for (int64_t i = 0; i < p->n; i++)
        for (int64_t j = 0; j < p->inner; j++) {
            double h = x[i * 2 * p->inner + j], g = x[i * 2 * p->inner + p->inner + j];
            y[i * p->inner + j] = h * 0.5 * g * (1 + erf(g / sqrt(2.0)));
        }
}
static void test_geglu(struct lora_backend_impl *be) {
    struct geglu_p p = {3, 4};
    float x[24], y[12], lw[12], dx[24];
    fill(x, 24, 2); fill(lw, 12, 1);
    CHECK_STATUS(nn_geglu_forward(be, y, x, p.n, p.inner), LORA_OK);
    CHECK_STATUS(nn_geglu_backward(be, dx, lw, x, p.n, p.inner), LORA_OK);
    check_op("geglu", geglu_ref, &p, x, 24, y, 12, lw, dx);
}

/* ---- timestep embedding ---- */
static void test_timestep(struct lora_backend_impl *be) {
    const float t[4] = {0.0f, 1.0f, 999.0f, 250.5f};
    for (int flip = 0; flip < 2; flip++)
        for (int64_t dim = 7; dim <= 8; dim++) {
            float y[32];
            CHECK_STATUS(nn_timestep_embedding(be, y, t, 4, dim, flip, 0.0f), LORA_OK);
            int64_t half = dim / 2;
            double e = 0;
            for (int64_t b = 0; b < 4; b++)
                for (int64_t i = 0; i < half; i++) {
                    double a = t[b] * exp(-log(10000.0) * (double)i / (double)half);
                    double s = sin(a), c = cos(a);
                    e = fmax(e, fabs(y[b * dim + (flip ? half + i : i)] - s));
                    e = fmax(e, fabs(y[b * dim + (flip ? i : half + i)] - c));
                    if (dim % 2) e = fmax(e, fabs(y[b * dim + dim - 1]));
                }
            /* fp32 frequencies times t = 999: the argument carries ~1e-4 rad of rounding */
            CHECK_MSG(e < 3e-4, "timestep embedding dim %lld flip %d max error %.3e", (long long)dim, flip, e);
        }
    float y[8];
    CHECK_STATUS(nn_timestep_embedding(be, y, t, 1, 1, 1, 0.0f), LORA_E_INVALID_ARG);
    /* flip: t = 0 gives [cos | sin] = [1 .. 1 | 0 .. 0] */
    CHECK_STATUS(nn_timestep_embedding(be, y, t, 1, 8, 1, 0.0f), LORA_OK);
    CHECK(y[0] == 1.0f && y[3] == 1.0f && y[4] == 0.0f && y[7] == 0.0f);
}

/* ---- projections NCHW <-> tokens ---- */
struct proj_p { int64_t batch, hw, in, out; const float *w, *b; int to_tokens; };
static void proj_ref(const void *vp, const double *x, double *y) {
    const struct proj_p *p = vp;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t t = 0; t < p->hw; t++)
            for (int64_t o = 0; o < p->out; o++) {
                double acc = p->b[o];
                for (int64_t i = 0; i < p->in; i++)
                    acc += p->w[o * p->in + i] *
                           (p->to_tokens ? x[(b * p->in + i) * p->hw + t] : x[(b * p->hw + t) * p->in + i]);
                if (p->to_tokens) y[(b * p->hw + t) * p->out + o] = acc;
                else y[(b * p->out + o) * p->hw + t] = acc;
            }
}
static void test_proj(struct lora_backend_impl *be, int to_tokens) {
    struct proj_p p = {2, 5, 3, 4, NULL, NULL, to_tokens};
    float x[30], y[40], lw[40], dx[30], w[12], b[4];
    fill(x, 30, 1); fill(lw, 40, 1); fill(w, 12, 1); fill(b, 4, 1);
    p.w = w; p.b = b;
    if (to_tokens) {
        CHECK_STATUS(nn_proj_to_tokens_forward(be, y, x, w, b, p.batch, p.hw, p.in, p.out), LORA_OK);
        CHECK_STATUS(nn_proj_to_tokens_backward(be, dx, lw, w, p.batch, p.hw, p.in, p.out, 0), LORA_OK);
    } else {
        CHECK_STATUS(nn_proj_from_tokens_forward(be, y, x, w, b, p.batch, p.hw, p.in, p.out), LORA_OK);
        CHECK_STATUS(nn_proj_from_tokens_backward(be, dx, lw, w, p.batch, p.hw, p.in, p.out, 0), LORA_OK);
    }
    check_op(to_tokens ? "proj to tokens" : "proj from tokens", proj_ref, &p, x, 30, y, 40, lw, dx);
}

/* ---- blocked attention: x = [q | k | v] packed ---- */
struct mha_p { int64_t batch, tq, tk, heads, d; };
static void mha_ref(const void *vp, const double *x, double *y) {
    const struct mha_p *p = vp;
    int64_t c = p->heads * p->d;
    const double *q = x, *k = q + p->batch * p->tq * c, *v = k + p->batch * p->tk * c;
    double s[64];
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->heads; h++)
            for (int64_t i = 0; i < p->tq; i++) {
                double mx = -1e300, sum = 0;
                for (int64_t j = 0; j < p->tk; j++) {
                    double a = 0;
                    for (int64_t e = 0; e < p->d; e++)
                        a += q[(b * p->tq + i) * c + h * p->d + e] * k[(b * p->tk + j) * c + h * p->d + e];
                    s[j] = a / sqrt((double)p->d);
                    mx = fmax(mx, s[j]);
                }
                for (int64_t j = 0; j < p->tk; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
                for (int64_t e = 0; e < p->d; e++) {
                    double a = 0;
                    for (int64_t j = 0; j < p->tk; j++) a += s[j] / sum * v[(b * p->tk + j) * c + h * p->d + e];
                    y[(b * p->tq + i) * c + h * p->d + e] = a;
                }
            }
}
static void test_mha(struct lora_backend_impl *be, int64_t tq, int64_t tk, int64_t block) {
    struct mha_p p = {2, tq, tk, 2, 3};
    int64_t c = 6, nq = 2 * tq * c, nk = 2 * tk * c, nx = nq + 2 * nk;
    float *x = malloc(nx * 4), *y = malloc(nq * 4), *y1 = malloc(nq * 4), *lw = malloc(nq * 4), *dx = malloc(nx * 4);
    int64_t sf = nn_mha_scratch_floats(p.heads, tk, block, 1), sf1 = nn_mha_scratch_floats(p.heads, tk, 1, 1);
    float *scr = malloc(sf * 4);
    fill(x, nx, 1.5); fill(lw, nq, 1);
    const float *q = x, *k = x + nq, *v = x + nq + nk;
    CHECK_STATUS(nn_mha_forward(be, y, q, k, v, 2, tq, tk, 2, 3, 0.0f, scr, nn_mha_scratch_floats(2, tk, block, 0)), LORA_OK);
    CHECK_STATUS(nn_mha_forward(be, y1, q, k, v, 2, tq, tk, 2, 3, 0.0f, scr, 2 * tk), LORA_OK);   /* 1 row */
    CHECK(memcmp(y, y1, nq * 4) == 0);
    CHECK_STATUS(nn_mha_backward(be, dx, dx + nq, dx + nq + nk, lw, q, k, v, 2, tq, tk, 2, 3, 0.0f, scr, sf), LORA_OK);
    char name[64];
    snprintf(name, sizeof name, "attention tq=%lld tk=%lld block=%lld", (long long)tq, (long long)tk, (long long)block);
    check_op(name, mha_ref, &p, x, nx, y, nq, lw, dx);
    /* one row per block gives the same gradients up to summation order */
    float *dx1 = malloc(nx * 4);
    CHECK_STATUS(nn_mha_backward(be, dx1, dx1 + nq, dx1 + nq + nk, lw, q, k, v, 2, tq, tk, 2, 3, 0.0f, scr, sf1), LORA_OK);
    double e = 0;
    for (int64_t i = 0; i < nx; i++) e = fmax(e, fabs(dx1[i] - dx[i]));
    CHECK_MSG(e < 1e-5, "attention block size changes the gradient by %.3e", e);
    CHECK_STATUS(nn_mha_forward(be, y, q, k, v, 2, tq, tk, 2, 3, 0.0f, scr, 2 * tk - 1), LORA_E_INVALID_ARG);
    free(x); free(y); free(y1); free(lw); free(dx); free(dx1); free(scr);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_nn_image");
    struct lora_backend_impl *be = ctx->backend;
    test_conv(be, "conv 3x3 s1 p1 +bias", (struct nn_conv2d_shape){2, 3, 5, 6, 4, 3, 1, 1, 1, 1, 1}, 1);
    test_conv(be, "conv 3x3 s2 pad (0,1,0,1)", (struct nn_conv2d_shape){2, 3, 6, 6, 2, 3, 2, 0, 0, 1, 1}, 1);
    test_conv(be, "conv 3x3 s2 p1 odd", (struct nn_conv2d_shape){1, 2, 5, 7, 3, 3, 2, 1, 1, 1, 1}, 0);
    test_conv(be, "conv 1x1 +bias", (struct nn_conv2d_shape){2, 5, 3, 4, 3, 1, 1, 0, 0, 0, 0}, 1);
    test_groupnorm(be, 0);
    test_groupnorm(be, 1);
    test_upsample(be);
    test_concat(be);
    test_add_channel(be);
    test_geglu(be);
    test_timestep(be);
    test_proj(be, 1);
    test_proj(be, 0);
    test_mha(be, 5, 7, 2);
    test_mha(be, 6, 6, 4);
    test_mha(be, 4, 9, 100);
    lora_ctx_free(ctx);
    return test_finish("test_nn_image");
}
