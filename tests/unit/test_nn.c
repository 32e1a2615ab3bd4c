/* lib/nn layer ops: every forward against a double-precision reference written here, every
 * backward against central differences of that double reference (loss = sum(out * w)), and
 * the gradient convention (parameter gradients +=, activation gradients = unless asked to
 * accumulate). The checker is shown to catch a 1% error, so the tolerances can fail. */
#include <math.h>

#include "../test.h"
#include "internal.h"
#include "backend/backend.h"
#include "core/rng.h"
#include "nn/nn.h"

static struct lora_mt19937 g_rng;   /* test-local generator (the library has no global state) */

static void randn(float *f, double *d, int64_t n, double scale, double shift) {
    lora_torch_randn(&g_rng, f, n);
    for (int64_t i = 0; i < n; i++) {
        f[i] = (float)(f[i] * scale + shift);
        if (d) d[i] = f[i];
    }
}

/* rel L2 of a float vector against a double reference */
static double rel_l2(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

typedef double (*loss_fn)(void *c);

/* Compares an analytic gradient with central differences of the double loss over every
 * element of p. Returns 1 when rel L2 <= tol and every element is within 10*tol of the
 * largest FD magnitude. */
static int grad_ok(const char *what, const float *got, loss_fn loss, void *c, double *p, int64_t n,
                   double tol, int quiet) {
    double *fd = malloc((size_t)n * sizeof *fd);
    double mx = 0, worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double s = p[i], h = 1e-6 * (fabs(s) > 1 ? fabs(s) : 1);
        p[i] = s + h;
        double lp = loss(c);
        p[i] = s - h;
        double lm = loss(c);
        p[i] = s;
        fd[i] = (lp - lm) / (2 * h);
        if (fabs(fd[i]) > mx) mx = fabs(fd[i]);
    }
    for (int64_t i = 0; i < n; i++)
        if (fabs(got[i] - fd[i]) > worst) worst = fabs(got[i] - fd[i]);
    double r = rel_l2(got, fd, n);
    int ok = r <= tol && worst <= 10 * tol * (mx > 0 ? mx : 1);
    if (!quiet) printf("  %-28s rel L2 %.2e  max|err|/max|g| %.2e  %s\n", what, r, mx > 0 ? worst / mx : worst,
                       ok ? "ok" : "FAIL");
    free(fd);
    return ok;
}

#define GRAD_TOL 1e-5
#define FWD_TOL 1e-5

/* ---- linear ------------------------------------------------------------------------------ */

struct lin_case { int64_t n, in, out; double *x, *w, *b, *wt; };

static void lin_ref(const struct lin_case *c, double *y) {
    for (int64_t i = 0; i < c->n; i++)
        for (int64_t o = 0; o < c->out; o++) {
            double s = c->b ? c->b[o] : 0;
            for (int64_t k = 0; k < c->in; k++) s += c->x[i * c->in + k] * c->w[o * c->in + k];
            y[i * c->out + o] = s;
        }
}

static double lin_loss(void *v) {
    struct lin_case *c = v;
    double *y = malloc((size_t)(c->n * c->out) * sizeof *y), l = 0;
    lin_ref(c, y);
    for (int64_t i = 0; i < c->n * c->out; i++) l += y[i] * c->wt[i];
    free(y);
    return l;
}

static void test_linear(struct lora_backend_impl *be) {
    enum { N = 5, IN = 7, OUT = 6 };
    float x[N * IN], w[OUT * IN], b[OUT], wt[N * OUT], y[N * OUT];
    double xd[N * IN], wd[OUT * IN], bd[OUT], wtd[N * OUT], yd[N * OUT];
    randn(x, xd, N * IN, 1, 0.2);
    randn(w, wd, OUT * IN, 0.5, 0);
    randn(b, bd, OUT, 1, 0);
    randn(wt, wtd, N * OUT, 1, 0);
    struct lin_case c = {N, IN, OUT, xd, wd, bd, wtd};
    CHECK_STATUS(nn_linear_forward(be, y, x, w, b, N, IN, OUT), LORA_OK);
    lin_ref(&c, yd);
    CHECK(rel_l2(y, yd, N * OUT) < FWD_TOL);
    /* without bias */
    c.b = NULL;
    CHECK_STATUS(nn_linear_forward(be, y, x, w, NULL, N, IN, OUT), LORA_OK);
    lin_ref(&c, yd);
    CHECK(rel_l2(y, yd, N * OUT) < FWD_TOL);
    c.b = bd;

    float dx[N * IN], dw[OUT * IN], db[OUT];
    for (int i = 0; i < OUT * IN; i++) dw[i] = 0;
    for (int i = 0; i < OUT; i++) db[i] = 0;
    for (int i = 0; i < N * IN; i++) dx[i] = 1234.0f;   /* written, not added to */
    printf("linear:\n");
    CHECK_STATUS(nn_linear_backward(be, dx, dw, db, wt, x, w, N, IN, OUT, 0), LORA_OK);
    CHECK(grad_ok("dx", dx, lin_loss, &c, xd, N * IN, GRAD_TOL, 0));
    CHECK(grad_ok("dW", dw, lin_loss, &c, wd, OUT * IN, GRAD_TOL, 0));
    CHECK(grad_ok("db", db, lin_loss, &c, bd, OUT, GRAD_TOL, 0));
    /* the checker catches a 1% error in one element */
    float bad[OUT];
    memcpy(bad, db, sizeof bad);
    float mx = 0;
    for (int i = 0; i < OUT; i++) mx = fabsf(db[i]) > mx ? fabsf(db[i]) : mx;
    bad[2] += 0.01f * mx;
    CHECK(!grad_ok("db (1% off, must fail)", bad, lin_loss, &c, bd, OUT, GRAD_TOL, 1));
    /* parameter gradients accumulate; dx accumulates only when asked */
    float dw2[OUT * IN], db2[OUT], dx2[N * IN];
    memcpy(dw2, dw, sizeof dw);
    memcpy(db2, db, sizeof db);
    memcpy(dx2, dx, sizeof dx);
    CHECK_STATUS(nn_linear_backward(be, dx2, dw2, db2, wt, x, w, N, IN, OUT, 1), LORA_OK);
    int acc = 1;
    for (int i = 0; i < OUT * IN; i++) acc &= fabsf(dw2[i] - 2 * dw[i]) <= 1e-5f * (1 + fabsf(dw[i]));
    for (int i = 0; i < OUT; i++) acc &= fabsf(db2[i] - 2 * db[i]) <= 1e-5f * (1 + fabsf(db[i]));
    for (int i = 0; i < N * IN; i++) acc &= fabsf(dx2[i] - 2 * dx[i]) <= 1e-5f * (1 + fabsf(dx[i]));
    CHECK_MSG(acc, "second backward did not add");
    /* NULL gradients are skipped */
    CHECK_STATUS(nn_linear_backward(be, NULL, NULL, NULL, wt, x, w, N, IN, OUT, 0), LORA_OK);
    CHECK_STATUS(nn_linear_forward(be, y, x, w, b, N, 0, OUT), LORA_E_INVALID_ARG);
}

/* ---- LoRA adapter ---------------------------------------------------------------------------- */

struct lora_case { int64_t n, in, out, r; double scale; double *x, *down, *up, *wt; };

static double lora_loss(void *v) {
    struct lora_case *c = v;
    double l = 0;
    for (int64_t i = 0; i < c->n; i++) {
        double h[8];
        for (int64_t k = 0; k < c->r; k++) {
            h[k] = 0;
            for (int64_t j = 0; j < c->in; j++) h[k] += c->x[i * c->in + j] * c->down[k * c->in + j];
        }
        for (int64_t o = 0; o < c->out; o++) {
            double y = 0;
            for (int64_t k = 0; k < c->r; k++) y += h[k] * c->up[o * c->r + k];
            l += c->scale * y * c->wt[i * c->out + o];
        }
    }
    return l;
}

static void test_lora(struct lora_backend_impl *be) {
    enum { N = 6, IN = 7, OUT = 5, R = 3 };
    float x[N * IN], down[R * IN], up[OUT * R], wt[N * OUT], y[N * OUT], h[N * R], dh[N * R];
    double xd[N * IN], downd[R * IN], upd[OUT * R], wtd[N * OUT];
    randn(x, xd, N * IN, 1, 0);
    randn(down, downd, R * IN, 0.4, 0);
    randn(up, upd, OUT * R, 0.3, 0);
    randn(wt, wtd, N * OUT, 1, 0);
    CHECK_NEAR(nn_lora_scale(2.0, 4, 0.75), 0.375, 1e-7);
    CHECK_NEAR(nn_lora_scale(0.0, 4, 1.0), 1.0, 0);     /* alpha absent -> rank */
    CHECK_NEAR(nn_lora_scale(-1.0, 8, 0.5), 0.5, 0);
    float d_down[R * IN] = {0}, d_up[OUT * R] = {0};
    struct nn_lora l = {IN, OUT, R, nn_lora_scale(2.0, R, 0.9), down, up, d_down, d_up};
    struct lora_case c = {N, IN, OUT, R, l.scale, xd, downd, upd, wtd};
    /* forward adds onto y */
    for (int i = 0; i < N * OUT; i++) y[i] = 0.5f;
    CHECK_STATUS(nn_lora_forward(be, &l, y, h, x, N), LORA_OK);
    double ref = 0, got = 0;
    for (int i = 0; i < N * OUT; i++) got += (double)(y[i] - 0.5f) * wt[i];
    ref = lora_loss(&c);
    CHECK_MSG(fabs(got - ref) <= 1e-5 * (1 + fabs(ref)), "lora forward: %.9g vs %.9g", got, ref);
    float dx[N * IN];
    for (int i = 0; i < N * IN; i++) dx[i] = 0.25f;   /* lora backward adds into dx */
    CHECK_STATUS(nn_lora_backward(be, &l, dx, dh, wt, x, h, N), LORA_OK);
    for (int i = 0; i < N * IN; i++) dx[i] -= 0.25f;
    printf("lora:\n");
    CHECK(grad_ok("dx (added)", dx, lora_loss, &c, xd, N * IN, GRAD_TOL, 0));
    CHECK(grad_ok("d_down", d_down, lora_loss, &c, downd, R * IN, GRAD_TOL, 0));
    CHECK(grad_ok("d_up", d_up, lora_loss, &c, upd, OUT * R, GRAD_TOL, 0));
    /* up = 0 (a fresh kohya network): no output change, d_down = 0, d_up != 0 */
    float zero_up[OUT * R] = {0}, dd2[R * IN] = {0}, du2[OUT * R] = {0};
    struct nn_lora z = {IN, OUT, R, 1.0f, down, zero_up, dd2, du2};
    for (int i = 0; i < N * OUT; i++) y[i] = 0.5f;
    CHECK_STATUS(nn_lora_forward(be, &z, y, h, x, N), LORA_OK);
    int same = 1, dzero = 1;
    double dun = 0;
    for (int i = 0; i < N * OUT; i++) same &= y[i] == 0.5f;
    CHECK_STATUS(nn_lora_backward(be, &z, NULL, dh, wt, x, h, N), LORA_OK);
    for (int i = 0; i < R * IN; i++) dzero &= dd2[i] == 0.0f;
    for (int i = 0; i < OUT * R; i++) dun += fabs(du2[i]);
    CHECK(same && dzero && dun > 0);
    struct nn_lora badl = l;
    badl.rank = 0;
    CHECK_STATUS(nn_lora_forward(be, &badl, y, h, x, N), LORA_E_INVALID_ARG);
}

/* ---- LayerNorm ---------------------------------------------------------------------------- */

struct ln_case { int64_t n, c; double *x, *g, *b, *wt; };

static void ln_ref(const struct ln_case *c, double *y) {
    for (int64_t i = 0; i < c->n; i++) {
        const double *xi = c->x + i * c->c;
        double m = 0, v = 0;
        for (int64_t j = 0; j < c->c; j++) m += xi[j];
        m /= c->c;
        for (int64_t j = 0; j < c->c; j++) v += (xi[j] - m) * (xi[j] - m);
        v /= c->c;
        for (int64_t j = 0; j < c->c; j++)
            y[i * c->c + j] = (xi[j] - m) / sqrt(v + 1e-5) * c->g[j] + c->b[j];
    }
}

static double ln_loss(void *v) {
    struct ln_case *c = v;
    double *y = malloc((size_t)(c->n * c->c) * sizeof *y), l = 0;
    ln_ref(c, y);
    for (int64_t i = 0; i < c->n * c->c; i++) l += y[i] * c->wt[i];
    free(y);
    return l;
}

static void test_layernorm(struct lora_backend_impl *be) {
    enum { N = 4, C = 9 };
    float x[N * C], g[C], b[C], wt[N * C], y[N * C], mean[N], rstd[N];
    double xd[N * C], gd[C], bd[C], wtd[N * C], yd[N * C];
    randn(x, xd, N * C, 2, 0.7);
    randn(g, gd, C, 0.3, 1);
    randn(b, bd, C, 0.3, 0);
    randn(wt, wtd, N * C, 1, 0);
    struct ln_case c = {N, C, xd, gd, bd, wtd};
    CHECK_STATUS(nn_layernorm_forward(be, y, mean, rstd, x, g, b, N, C, 1e-5f), LORA_OK);
    ln_ref(&c, yd);
    CHECK(rel_l2(y, yd, N * C) < FWD_TOL);
    float dx[N * C], dg[C] = {0}, dbb[C] = {0};
    printf("layernorm:\n");
    CHECK_STATUS(nn_layernorm_backward(be, dx, dg, dbb, wt, x, mean, rstd, g, N, C, 0), LORA_OK);
    CHECK(grad_ok("dx", dx, ln_loss, &c, xd, N * C, GRAD_TOL, 0));
    CHECK(grad_ok("d_gamma", dg, ln_loss, &c, gd, C, GRAD_TOL, 0));
    CHECK(grad_ok("d_beta", dbb, ln_loss, &c, bd, C, GRAD_TOL, 0));
    /* accumulate = 1 adds */
    float dx2[N * C];
    for (int i = 0; i < N * C; i++) dx2[i] = 1.0f;
    CHECK_STATUS(nn_layernorm_backward(be, dx2, NULL, NULL, wt, x, mean, rstd, g, N, C, 1), LORA_OK);
    int acc = 1;
    for (int i = 0; i < N * C; i++) acc &= fabsf(dx2[i] - 1.0f - dx[i]) <= 1e-5f;
    CHECK(acc);
    /* in place forward */
    float xi[N * C];
    memcpy(xi, x, sizeof x);
    CHECK_STATUS(nn_layernorm_forward(be, xi, mean, rstd, xi, g, b, N, C, 1e-5f), LORA_OK);
    CHECK(memcmp(xi, y, sizeof y) == 0);
}

/* ---- attention ---------------------------------------------------------------------------- */

struct att_case { int64_t b, t, h, d; int causal; double *q, *k, *v, *wt; };

static void att_ref(const struct att_case *c, double *out) {
    int64_t C = c->h * c->d;
    double s[16];
    for (int64_t b = 0; b < c->b; b++)
        for (int64_t h = 0; h < c->h; h++)
            for (int64_t i = 0; i < c->t; i++) {
                int64_t lim = c->causal ? i + 1 : c->t;
                double mx = -1e300, sum = 0;
                for (int64_t j = 0; j < lim; j++) {
                    double a = 0;
                    for (int64_t e = 0; e < c->d; e++)
                        a += c->q[(b * c->t + i) * C + h * c->d + e] * c->k[(b * c->t + j) * C + h * c->d + e];
                    s[j] = a / sqrt((double)c->d);
                    if (s[j] > mx) mx = s[j];
                }
                for (int64_t j = 0; j < lim; j++) sum += (s[j] = exp(s[j] - mx));
                for (int64_t e = 0; e < c->d; e++) {
                    double o = 0;
                    for (int64_t j = 0; j < lim; j++) o += s[j] / sum * c->v[(b * c->t + j) * C + h * c->d + e];
                    out[(b * c->t + i) * C + h * c->d + e] = o;
                }
            }
}

static double att_loss(void *v) {
    struct att_case *c = v;
    int64_t n = c->b * c->t * c->h * c->d;
    double *y = malloc((size_t)n * sizeof *y), l = 0;
    att_ref(c, y);
    for (int64_t i = 0; i < n; i++) l += y[i] * c->wt[i];
    free(y);
    return l;
}

static void test_attention(struct lora_backend_impl *be, int causal) {
    enum { B = 2, T = 5, H = 2, D = 3, N = B * T * H * D };
    float q[N], k[N], v[N], wt[N], out[N], probs[B * H * T * T], scratch[T * T];
    double qd[N], kd[N], vd[N], wtd[N], outd[N];
    randn(q, qd, N, 1, 0);
    randn(k, kd, N, 1, 0);
    randn(v, vd, N, 1, 0);
    randn(wt, wtd, N, 1, 0);
    struct att_case c = {B, T, H, D, causal, qd, kd, vd, wtd};
    CHECK_STATUS(nn_attention_forward(be, out, probs, q, k, v, B, T, H, D, causal), LORA_OK);
    att_ref(&c, outd);
    CHECK(rel_l2(out, outd, N) < FWD_TOL);
    int rows_ok = 1;
    for (int r = 0; r < B * H * T; r++) {
        double s = 0;
        for (int j = 0; j < T; j++) {
            s += probs[r * T + j];
            if (causal && j > r % T) rows_ok &= probs[r * T + j] == 0.0f;
        }
        rows_ok &= fabs(s - 1) < 1e-6;
    }
    CHECK_MSG(rows_ok, "probability rows do not sum to 1 or the mask leaks");
    float dq[N], dk[N], dv[N];
    printf("attention (%s):\n", causal ? "causal" : "full");
    CHECK_STATUS(nn_attention_backward(be, dq, dk, dv, scratch, wt, probs, q, k, v, B, T, H, D), LORA_OK);
    CHECK(grad_ok("dq", dq, att_loss, &c, qd, N, GRAD_TOL, 0));
    CHECK(grad_ok("dk", dk, att_loss, &c, kd, N, GRAD_TOL, 0));
    CHECK(grad_ok("dv", dv, att_loss, &c, vd, N, GRAD_TOL, 0));
}

/* ---- activations -------------------------------------------------------------------------- */

struct act_case { int64_t n; int gelu; double *x, *wt; };

static double act_ref(double x, int gelu) {
    return gelu ? 0.5 * x * (1 + erf(x / sqrt(2.0))) : x / (1 + exp(-1.702 * x));
}

static double act_loss(void *v) {
    struct act_case *c = v;
    double l = 0;
    for (int64_t i = 0; i < c->n; i++) l += act_ref(c->x[i], c->gelu) * c->wt[i];
    return l;
}

static void test_activation(struct lora_backend_impl *be, int gelu) {
    enum { N = 64 };
    float x[N], wt[N], y[N], dx[N];
    double xd[N], wtd[N], yd[N];
    for (int i = 0; i < N; i++) xd[i] = x[i] = (float)(-6.0 + 12.0 * i / (N - 1) + 0.013);
    randn(wt, wtd, N, 1, 0);
    struct act_case c = {N, gelu, xd, wtd};
    if (gelu) CHECK_STATUS(nn_gelu_forward(be, y, x, N), LORA_OK);
    else CHECK_STATUS(nn_quick_gelu_forward(be, y, x, N), LORA_OK);
    for (int i = 0; i < N; i++) yd[i] = act_ref(xd[i], gelu);
    CHECK(rel_l2(y, yd, N) < FWD_TOL);
    printf("%s:\n", gelu ? "gelu" : "quick_gelu");
    if (gelu) CHECK_STATUS(nn_gelu_backward(be, dx, wt, x, N), LORA_OK);
    else CHECK_STATUS(nn_quick_gelu_backward(be, dx, wt, x, N), LORA_OK);
    CHECK(grad_ok("dx", dx, act_loss, &c, xd, N, GRAD_TOL, 0));
    /* in place: dx may alias dy */
    float d2[N];
    memcpy(d2, wt, sizeof wt);
    if (gelu) nn_gelu_backward(be, d2, d2, x, N);
    else nn_quick_gelu_backward(be, d2, d2, x, N);
    CHECK(memcmp(d2, dx, sizeof dx) == 0);
}

/* ---- embedding and residual -------------------------------------------------------------- */

static void test_embedding(struct lora_backend_impl *be) {
    enum { V = 11, P = 4, C = 3, B = 2, N = B * P };
    float table[V * C], pos[P * C], y[N * C], dy[N * C], dt[V * C] = {0}, dp[P * C] = {0};
    randn(table, NULL, V * C, 1, 0);
    randn(pos, NULL, P * C, 1, 0);
    randn(dy, NULL, N * C, 1, 0);
    int32_t ids[N] = {3, 0, 10, 3, 7, 7, 1, 2};
    CHECK_STATUS(nn_embedding_forward(be, y, ids, table, pos, N, P, V, C), LORA_OK);
    int ok = 1;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < C; j++) ok &= y[i * C + j] == table[ids[i] * C + j] + pos[(i % P) * C + j];
    CHECK(ok);
    CHECK_STATUS(nn_embedding_backward(be, dt, dp, dy, ids, N, P, C), LORA_OK);
    /* the lookup is linear: gradients are sums of the dy rows that used each entry */
    ok = 1;
    for (int v = 0; v < V; v++)
        for (int j = 0; j < C; j++) {
            double s = 0;
            for (int i = 0; i < N; i++) if (ids[i] == v) s += dy[i * C + j];
            ok &= fabs(dt[v * C + j] - s) < 1e-6;
        }
    for (int p = 0; p < P; p++)
        for (int j = 0; j < C; j++) {
            double s = 0;
            for (int i = 0; i < N; i++) if (i % P == p) s += dy[i * C + j];
            ok &= fabs(dp[p * C + j] - s) < 1e-6;
        }
    CHECK(ok);
    int32_t bad[N] = {3, 0, 11, 3, 7, 7, 1, 2};
    CHECK_STATUS(nn_embedding_forward(be, y, bad, table, pos, N, P, V, C), LORA_E_INVALID_ARG);
    bad[2] = -1;
    CHECK_STATUS(nn_embedding_forward(be, y, bad, table, NULL, N, P, V, C), LORA_E_INVALID_ARG);
    float a[5] = {1, 2, 3, 4, 5}, b[5] = {10, 20, 30, 40, 50};
    CHECK_STATUS(nn_residual_add(be, a, b, 5), LORA_OK);
    CHECK(a[0] == 11 && a[4] == 55);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_nn");
    struct lora_backend_impl *be = ctx->backend;
    lora_mt_seed(&g_rng, 1234);
    test_linear(be);
    test_lora(be);
    test_layernorm(be);
    test_attention(be, 1);
    test_attention(be, 0);
    test_activation(be, 0);
    test_activation(be, 1);
    test_embedding(be);
    lora_ctx_free(ctx);
    return test_finish("test_nn");
}
