/* The layer-op primitives of the CUDA backend (LayerNorm, softmax, quick_gelu, row broadcast,
 * column sums, embedding, copy/fill/scale) and the lib/nn ops built on them (linear, LoRA,
 * attention, embedding), each against the CPU backend on the same random inputs. Error is
 * max|gpu - cpu| / max|cpu| over the whole output; the comparator is shown to catch a 1e-3
 * error in one element, so the tolerances can fail. Exits 77 (skipped) without a usable GPU. */
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "core/rng.h"
#include "nn/nn.h"
#include "../test.h"

static struct lora_backend_impl *cpu, *gpu;
static struct lora_mt19937 rng;

#define TOL_EW 2e-6     /* elementwise: a few ulp of the largest value */
#define TOL_RED 2e-5    /* reductions (row statistics, column sums, atomics) */
#define TOL_GEMM 1e-4   /* cuBLAS sgemm (no TF32) inside the op */

static float *host_randn(int64_t n, float scale, float shift) {
    float *h = malloc((size_t)n * 4);
    lora_torch_randn(&rng, h, n);
    for (int64_t i = 0; i < n; i++) h[i] = h[i] * scale + shift;
    return h;
}

static void *dev(int64_t bytes) {
    void *d = NULL;
    CHECK_STATUS(gpu->iface->buf_alloc(gpu, (size_t)bytes, &d), LORA_OK);
    return d;
}

static float *up(const float *h, int64_t n) {
    float *d = dev(n * 4);
    if (d) CHECK_STATUS(gpu->iface->upload(gpu, d, h, (size_t)n * 4), LORA_OK);
    return d;
}

static float *down(const float *d, int64_t n) {
    float *h = malloc((size_t)n * 4);
    CHECK_STATUS(gpu->iface->download(gpu, h, d, (size_t)n * 4), LORA_OK);
    return h;
}

static double max_err(const float *got, const float *want, int64_t n) {
    double m = 0, e = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!(fabs((double)want[i]) <= m)) m = fabs((double)want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= e)) e = d;   /* NaN counts as the worst */
    }
    return e / (m > 0 ? m : 1);
}

/* Downloads d (n floats) and compares with the CPU result. */
static void same(const char *what, const float *d, const float *want, int64_t n, double tol) {
    float *h = down(d, n);
    double e = max_err(h, want, n);
    CHECK_MSG(e <= tol, "%s: max err / max |cpu| = %.3e > %.1e", what, e, tol);
    printf("  %-34s %.2e\n", what, e);
    free(h);
}

static void test_primitives(void) {
    printf("primitives (gpu vs cpu, max err / max |cpu|):\n");
    enum { N = 333, C = 777, NE = (1 << 20) + 7 };
    float *x = host_randn(N * C, 1.5f, 0.25f), *row = host_randn(C, 1, 0), *y = host_randn(N * C, 1, 0);
    float *dx = up(x, N * C), *drow = up(row, C), *dy = up(y, N * C), *r = malloc(N * C * 4);

    /* copy, fill, scale */
    float *dc = dev(N * C * 4);
    CHECK_STATUS(gpu->iface->copy(gpu, dc, dx, N * C * 4), LORA_OK);
    same("copy", dc, x, N * C, 0);
    CHECK_STATUS(gpu->iface->fill_f32(gpu, N * C, 0.75f, dc), LORA_OK);
    CHECK_STATUS(cpu->iface->fill_f32(cpu, N * C, 0.75f, r), LORA_OK);
    same("fill", dc, r, N * C, 0);
    memcpy(r, x, N * C * 4);
    CHECK_STATUS(gpu->iface->copy(gpu, dc, dx, N * C * 4), LORA_OK);
    CHECK_STATUS(gpu->iface->scale_f32(gpu, N * C, -1.25f, dc), LORA_OK);
    CHECK_STATUS(cpu->iface->scale_f32(cpu, N * C, -1.25f, r), LORA_OK);
    same("scale", dc, r, N * C, 0);

    /* add_rows: beta 0 over NaN (must not read y), beta 0.5 */
    float *nan = malloc(N * C * 4);
    for (int i = 0; i < N * C; i++) nan[i] = NAN;
    CHECK_STATUS(gpu->iface->upload(gpu, dc, nan, N * C * 4), LORA_OK);
    CHECK_STATUS(gpu->iface->add_rows_f32(gpu, N, C, drow, 0.0f, dc), LORA_OK);
    memcpy(r, nan, N * C * 4);
    CHECK_STATUS(cpu->iface->add_rows_f32(cpu, N, C, row, 0.0f, r), LORA_OK);
    same("add_rows beta 0 (bias fill)", dc, r, N * C, 0);
    CHECK_STATUS(gpu->iface->copy(gpu, dc, dy, N * C * 4), LORA_OK);
    CHECK_STATUS(gpu->iface->add_rows_f32(gpu, N, C, drow, 0.5f, dc), LORA_OK);
    memcpy(r, y, N * C * 4);
    CHECK_STATUS(cpu->iface->add_rows_f32(cpu, N, C, row, 0.5f, r), LORA_OK);
    same("add_rows beta 0.5", dc, r, N * C, TOL_EW);

    /* col_sum: written, then accumulated */
    float *dcs = dev(C * 4), *cs = malloc(C * 4);
    CHECK_STATUS(gpu->iface->col_sum_f32(gpu, N, C, dx, 0.0f, dcs), LORA_OK);
    CHECK_STATUS(gpu->iface->col_sum_f32(gpu, N, C, dy, 1.0f, dcs), LORA_OK);
    CHECK_STATUS(cpu->iface->col_sum_f32(cpu, N, C, x, 0.0f, cs), LORA_OK);
    CHECK_STATUS(cpu->iface->col_sum_f32(cpu, N, C, y, 1.0f, cs), LORA_OK);
    same("col_sum (=, then +=)", dcs, cs, C, TOL_RED);

    /* quick_gelu forward and backward (in place on dy, as the encoder calls it) */
    {
        float *ex = host_randn(NE, 3, 0), *eg = host_randn(NE, 1, 0), *er = malloc(NE * 4);
        float *dex = up(ex, NE), *deg = up(eg, NE), *dout = dev(NE * 4);
        CHECK_STATUS(gpu->iface->quick_gelu_f32(gpu, NE, dex, dout), LORA_OK);
        CHECK_STATUS(cpu->iface->quick_gelu_f32(cpu, NE, ex, er), LORA_OK);
        same("quick_gelu", dout, er, NE, TOL_EW);
        CHECK_STATUS(gpu->iface->quick_gelu_backward_f32(gpu, NE, dex, deg, deg), LORA_OK);
        CHECK_STATUS(cpu->iface->quick_gelu_backward_f32(cpu, NE, ex, eg, er), LORA_OK);
        same("quick_gelu backward (dx aliases dy)", deg, er, NE, TOL_EW);
        gpu->iface->buf_free(gpu, dex); gpu->iface->buf_free(gpu, deg); gpu->iface->buf_free(gpu, dout);
        free(ex); free(eg); free(er);
    }

    /* LayerNorm: widths around the warp size and the CLIP widths, mean far from 0 */
    int64_t widths[4] = {5, 33, 768, 1000};
    for (int wi = 0; wi < 4; wi++) {
        int64_t c = widths[wi], n = N;
        char what[80];
        float *lx = host_randn(n * c, 2, 20), *g = host_randn(c, 0.3f, 1), *b = host_randn(c, 0.3f, 0);
        float *ldy = host_randn(n * c, 1, 0);
        float *ly = malloc(n * c * 4), *mu = malloc(n * 4), *rs = malloc(n * 4), *ldx = malloc(n * c * 4);
        float *dg = malloc(c * 4), *db = malloc(c * 4);
        float *d_x = up(lx, n * c), *d_g = up(g, c), *d_b = up(b, c), *d_dy = up(ldy, n * c);
        float *d_y = dev(n * c * 4), *d_mu = dev(n * 4), *d_rs = dev(n * 4), *d_dx = dev(n * c * 4);
        for (int64_t j = 0; j < c; j++) dg[j] = db[j] = 0.5f;
        float *d_dg = up(dg, c), *d_db = up(db, c);
        CHECK_STATUS(cpu->iface->layernorm_f32(cpu, n, c, 1e-5f, lx, g, b, ly, mu, rs), LORA_OK);
        CHECK_STATUS(gpu->iface->layernorm_f32(gpu, n, c, 1e-5f, d_x, d_g, d_b, d_y, d_mu, d_rs), LORA_OK);
        snprintf(what, sizeof what, "layernorm c=%lld y", (long long)c);
        same(what, d_y, ly, n * c, TOL_RED);
        snprintf(what, sizeof what, "layernorm c=%lld mean", (long long)c);
        same(what, d_mu, mu, n, TOL_RED);
        snprintf(what, sizeof what, "layernorm c=%lld rstd", (long long)c);
        same(what, d_rs, rs, n, TOL_RED);
        /* backward from the CPU's statistics on both sides: dx written then added */
        CHECK_STATUS(gpu->iface->upload(gpu, d_mu, mu, n * 4), LORA_OK);
        CHECK_STATUS(gpu->iface->upload(gpu, d_rs, rs, n * 4), LORA_OK);
        CHECK_STATUS(cpu->iface->layernorm_backward_f32(cpu, n, c, ldy, lx, mu, rs, g, ldx, dg, db, 0), LORA_OK);
        CHECK_STATUS(cpu->iface->layernorm_backward_f32(cpu, n, c, ldy, lx, mu, rs, g, ldx, NULL, NULL, 1), LORA_OK);
        CHECK_STATUS(gpu->iface->layernorm_backward_f32(gpu, n, c, d_dy, d_x, d_mu, d_rs, d_g, d_dx, d_dg, d_db, 0),
                     LORA_OK);
        CHECK_STATUS(gpu->iface->layernorm_backward_f32(gpu, n, c, d_dy, d_x, d_mu, d_rs, d_g, d_dx, NULL, NULL, 1),
                     LORA_OK);
        snprintf(what, sizeof what, "layernorm c=%lld dx (=, then +=)", (long long)c);
        same(what, d_dx, ldx, n * c, TOL_RED);
        snprintf(what, sizeof what, "layernorm c=%lld d_gamma (+=)", (long long)c);
        same(what, d_dg, dg, c, TOL_RED);
        snprintf(what, sizeof what, "layernorm c=%lld d_beta (+=)", (long long)c);
        same(what, d_db, db, c, TOL_RED);
        /* no gamma/beta, in place */
        CHECK_STATUS(cpu->iface->layernorm_f32(cpu, n, c, 1e-5f, lx, NULL, NULL, lx, mu, rs), LORA_OK);
        CHECK_STATUS(gpu->iface->layernorm_f32(gpu, n, c, 1e-5f, d_x, NULL, NULL, d_x, d_mu, d_rs), LORA_OK);
        snprintf(what, sizeof what, "layernorm c=%lld in place, no affine", (long long)c);
        same(what, d_x, lx, n * c, TOL_RED);
        float *ptrs[] = {d_x, d_g, d_b, d_dy, d_y, d_mu, d_rs, d_dx, d_dg, d_db};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) gpu->iface->buf_free(gpu, ptrs[i]);
        free(lx); free(g); free(b); free(ldy); free(ly); free(mu); free(rs); free(ldx); free(dg); free(db);
    }

    /* softmax: rows of [.., t, t] score stacks, causal and full, t below/above a warp */
    int64_t ts[3] = {7, 77, 130};
    for (int ti = 0; ti < 3; ti++)
        for (int causal = 0; causal < 2; causal++) {
            int64_t t = ts[ti], rows = 3 * 4 * t;
            char what[80];
            float *s = host_randn(rows * t, 4, 0), *g = host_randn(rows * t, 1, 0), *sg = malloc(rows * t * 4);
            float *d_s = up(s, rows * t), *d_g = up(g, rows * t);
            CHECK_STATUS(cpu->iface->softmax_f32(cpu, rows, t, causal, s), LORA_OK);
            CHECK_STATUS(gpu->iface->softmax_f32(gpu, rows, t, causal, d_s), LORA_OK);
            snprintf(what, sizeof what, "softmax t=%lld %s", (long long)t, causal ? "causal" : "full");
            same(what, d_s, s, rows * t, TOL_RED);
            float *h = down(d_s, rows * t);
            int zeros = 1;
            for (int64_t r2 = 0; causal && r2 < rows; r2++)
                for (int64_t j = r2 % t + 1; j < t; j++) zeros &= h[r2 * t + j] == 0.0f;
            CHECK_MSG(zeros, "softmax t=%lld: masked probabilities are not exact zeros", (long long)t);
            free(h);
            /* backward from the CPU's probabilities, in place on the gradient */
            CHECK_STATUS(gpu->iface->upload(gpu, d_s, s, rows * t * 4), LORA_OK);
            CHECK_STATUS(cpu->iface->softmax_backward_f32(cpu, rows, t, s, g, sg), LORA_OK);
            CHECK_STATUS(gpu->iface->softmax_backward_f32(gpu, rows, t, d_s, d_g, d_g), LORA_OK);
            snprintf(what, sizeof what, "softmax backward t=%lld %s", (long long)t, causal ? "causal" : "full");
            same(what, d_g, sg, rows * t, TOL_RED);
            gpu->iface->buf_free(gpu, d_s); gpu->iface->buf_free(gpu, d_g);
            free(s); free(g); free(sg);
        }

    /* embedding: gather + positions; repeated ids scatter-add in the backward */
    {
        enum { V = 1000, P = 77, EC = 96, EN = 4 * P };
        float *tab = host_randn(V * EC, 1, 0), *pos = host_randn(P * EC, 1, 0), *g = host_randn(EN * EC, 1, 0);
        int32_t ids[EN];
        for (int i = 0; i < EN; i++) ids[i] = i % 11 == 0 ? 7 : (int32_t)((i * 7919 + 13) % V);
        float *d_tab = up(tab, V * EC), *d_pos = up(pos, P * EC), *d_g = up(g, EN * EC);
        float *d_y = dev(EN * EC * 4), *ey = malloc(EN * EC * 4);
        int32_t *d_ids = dev(sizeof ids);
        CHECK_STATUS(gpu->iface->upload(gpu, d_ids, ids, sizeof ids), LORA_OK);
        int64_t bad_c = 5, bad_g = 5;
        int32_t id_c = 5, id_g = 5;
        for (int with_pos = 0; with_pos < 2; with_pos++) {
            CHECK_STATUS(cpu->iface->embedding_f32(cpu, EN, EC, ids, tab, with_pos ? pos : NULL, P, V, ey, &bad_c,
                                                   &id_c), LORA_OK);
            CHECK_STATUS(gpu->iface->embedding_f32(gpu, EN, EC, d_ids, d_tab, with_pos ? d_pos : NULL, P, V, d_y,
                                                   &bad_g, &id_g), LORA_OK);
            CHECK(bad_c == -1 && bad_g == -1);
            same(with_pos ? "embedding + positions" : "embedding", d_y, ey, EN * EC, TOL_EW);
        }
        /* d_table starts non-zero: += */
        float *dt = malloc(V * EC * 4), *dp = calloc(P * EC, 4);
        for (int i = 0; i < V * EC; i++) dt[i] = 0.25f;
        float *d_dt = up(dt, V * EC), *d_dp = up(dp, P * EC);
        CHECK_STATUS(cpu->iface->embedding_backward_f32(cpu, EN, EC, ids, g, P, dt, dp), LORA_OK);
        CHECK_STATUS(gpu->iface->embedding_backward_f32(gpu, EN, EC, d_ids, d_g, P, d_dt, d_dp), LORA_OK);
        same("embedding backward d_table", d_dt, dt, V * EC, TOL_RED);
        same("embedding backward d_pos", d_dp, dp, P * EC, TOL_RED);
        /* two bad ids: the first row is reported with its id, on both backends */
        ids[200] = V;
        ids[41] = -3;
        CHECK_STATUS(gpu->iface->upload(gpu, d_ids, ids, sizeof ids), LORA_OK);
        CHECK_STATUS(cpu->iface->embedding_f32(cpu, EN, EC, ids, tab, pos, P, V, ey, &bad_c, &id_c), LORA_OK);
        CHECK_STATUS(gpu->iface->embedding_f32(gpu, EN, EC, d_ids, d_tab, d_pos, P, V, d_y, &bad_g, &id_g), LORA_OK);
        CHECK_MSG(bad_c == 41 && id_c == -3 && bad_g == 41 && id_g == -3, "bad id: cpu row %lld id %d, gpu row %lld id %d",
                  (long long)bad_c, (int)id_c, (long long)bad_g, (int)id_g);
        /* through nn: the message names the row and the id, and the backend stays usable */
        CHECK_STATUS(nn_embedding_forward(gpu, d_y, d_ids, d_tab, d_pos, EN, P, V, EC), LORA_E_INVALID_ARG);
        CHECK_MSG(strstr(lora_errmsg(gpu->ctx), "token id -3 at position 41") != NULL, "message: %s",
                  lora_errmsg(gpu->ctx));
        CHECK_STATUS(gpu->iface->sync(gpu), LORA_OK);
        float *ptrs[] = {d_tab, d_pos, d_g, d_y, d_dt, d_dp};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) gpu->iface->buf_free(gpu, ptrs[i]);
        gpu->iface->buf_free(gpu, d_ids);
        free(tab); free(pos); free(g); free(ey); free(dt); free(dp);
    }

    gpu->iface->buf_free(gpu, dx); gpu->iface->buf_free(gpu, drow); gpu->iface->buf_free(gpu, dy);
    gpu->iface->buf_free(gpu, dc); gpu->iface->buf_free(gpu, dcs);
    free(x); free(row); free(y); free(r); free(nan); free(cs);
}

/* lib/nn ops on both backends: linear (+bias, db), LoRA, attention (causal and full, the
 * one-head scratch and the all-heads scratch). */
static void test_nn_ops(void) {
    printf("nn ops (gpu vs cpu):\n");
    enum { N = 154, IN = 96, OUT = 80, R = 8 };
    float *x = host_randn(N * IN, 1, 0), *w = host_randn(OUT * IN, 0.2f, 0), *b = host_randn(OUT, 1, 0);
    float *dyv = host_randn(N * OUT, 1, 0), *y = malloc(N * OUT * 4), *dx = malloc(N * IN * 4);
    float *dw = calloc(OUT * IN, 4), *db = calloc(OUT, 4);
    float *d_x = up(x, N * IN), *d_w = up(w, OUT * IN), *d_b = up(b, OUT), *d_dyv = up(dyv, N * OUT);
    float *d_y = dev(N * OUT * 4), *d_dx = dev(N * IN * 4), *d_dw = up(dw, OUT * IN), *d_db = up(db, OUT);
    CHECK_STATUS(nn_linear_forward(cpu, y, x, w, b, N, IN, OUT), LORA_OK);
    CHECK_STATUS(nn_linear_forward(gpu, d_y, d_x, d_w, d_b, N, IN, OUT), LORA_OK);
    same("linear forward", d_y, y, N * OUT, TOL_GEMM);
    CHECK_STATUS(nn_linear_backward(cpu, dx, dw, db, dyv, x, w, N, IN, OUT, 0), LORA_OK);
    CHECK_STATUS(nn_linear_backward(gpu, d_dx, d_dw, d_db, d_dyv, d_x, d_w, N, IN, OUT, 0), LORA_OK);
    same("linear backward dx", d_dx, dx, N * IN, TOL_GEMM);
    same("linear backward dW", d_dw, dw, OUT * IN, TOL_GEMM);
    same("linear backward db", d_db, db, OUT, TOL_RED);

    /* LoRA on the same layer */
    float *dn = host_randn(R * IN, 0.3f, 0), *upw = host_randn(OUT * R, 0.3f, 0), *h = malloc(N * R * 4);
    float *dh = malloc(N * R * 4), *gd = calloc(R * IN, 4), *gu = calloc(OUT * R, 4);
    float *d_dn = up(dn, R * IN), *d_up = up(upw, OUT * R), *d_h = dev(N * R * 4), *d_dh = dev(N * R * 4);
    float *d_gd = up(gd, R * IN), *d_gu = up(gu, OUT * R);
    struct nn_lora lc = {IN, OUT, R, nn_lora_scale(4.0, R, 0.8), dn, upw, gd, gu};
    struct nn_lora lg = {IN, OUT, R, lc.scale, d_dn, d_up, d_gd, d_gu};
    CHECK_STATUS(nn_lora_forward(cpu, &lc, y, h, x, N), LORA_OK);
    CHECK_STATUS(nn_lora_forward(gpu, &lg, d_y, d_h, d_x, N), LORA_OK);
    same("lora forward (added onto linear)", d_y, y, N * OUT, TOL_GEMM);
    CHECK_STATUS(nn_lora_backward(cpu, &lc, dx, dh, dyv, x, h, N), LORA_OK);
    CHECK_STATUS(nn_lora_backward(gpu, &lg, d_dx, d_dh, d_dyv, d_x, d_h, N), LORA_OK);
    same("lora backward dx (+=)", d_dx, dx, N * IN, TOL_GEMM);
    same("lora backward d_down", d_gd, gd, R * IN, TOL_GEMM);
    same("lora backward d_up", d_gu, gu, OUT * R, TOL_GEMM);

    /* attention: batch 2, 77 tokens, 4 heads of 24 */
    enum { B = 2, T = 77, H = 4, D = 24, AN = B * T * H * D, PN = B * H * T * T };
    float *q = host_randn(AN, 1, 0), *k = host_randn(AN, 1, 0), *v = host_randn(AN, 1, 0);
    float *dout = host_randn(AN, 1, 0), *out = malloc(AN * 4), *probs = malloc(PN * 4);
    float *dq = malloc(AN * 4), *dk = malloc(AN * 4), *dv = malloc(AN * 4), *scr = malloc(T * T * 4);
    float *d_q = up(q, AN), *d_k = up(k, AN), *d_v = up(v, AN), *d_dout = up(dout, AN);
    float *d_out = dev(AN * 4), *d_probs = dev(PN * 4), *d_dq = dev(AN * 4), *d_dk = dev(AN * 4);
    float *d_dv = dev(AN * 4), *d_scr = dev(H * T * T * 4);
    for (int causal = 1; causal >= 0; causal--) {
        char what[80];
        CHECK_STATUS(nn_attention_forward(cpu, out, probs, q, k, v, B, T, H, D, causal), LORA_OK);
        CHECK_STATUS(nn_attention_forward(gpu, d_out, d_probs, d_q, d_k, d_v, B, T, H, D, causal), LORA_OK);
        snprintf(what, sizeof what, "attention %s out", causal ? "causal" : "full");
        same(what, d_out, out, AN, TOL_GEMM);
        snprintf(what, sizeof what, "attention %s probs", causal ? "causal" : "full");
        same(what, d_probs, probs, PN, TOL_GEMM);
        CHECK_STATUS(nn_attention_backward(cpu, dq, dk, dv, scr, dout, probs, q, k, v, B, T, H, D), LORA_OK);
        for (int all = 0; all < 2; all++) {
            CHECK_STATUS(nn_attention_backward_ex(gpu, d_dq, d_dk, d_dv, d_scr, all ? H * T * T : T * T, d_dout,
                                                  d_probs, d_q, d_k, d_v, B, T, H, D), LORA_OK);
            const char *mode = all ? "all heads" : "one head";
            snprintf(what, sizeof what, "attention %s dq (%s)", causal ? "causal" : "full", mode);
            same(what, d_dq, dq, AN, TOL_GEMM);
            snprintf(what, sizeof what, "attention %s dk (%s)", causal ? "causal" : "full", mode);
            same(what, d_dk, dk, AN, TOL_GEMM);
            snprintf(what, sizeof what, "attention %s dv (%s)", causal ? "causal" : "full", mode);
            same(what, d_dv, dv, AN, TOL_GEMM);
        }
    }
    CHECK_STATUS(nn_attention_backward_ex(gpu, d_dq, d_dk, d_dv, d_scr, T * T - 1, d_dout, d_probs, d_q, d_k, d_v,
                                          B, T, H, D), LORA_E_INVALID_ARG);

    float *ptrs[] = {d_x, d_w, d_b, d_dyv, d_y, d_dx, d_dw, d_db, d_dn, d_up, d_h, d_dh, d_gd, d_gu,
                     d_q, d_k, d_v, d_dout, d_out, d_probs, d_dq, d_dk, d_dv, d_scr};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) gpu->iface->buf_free(gpu, ptrs[i]);
    float *hp[] = {x, w, b, dyv, y, dx, dw, db, dn, upw, h, dh, gd, gu, q, k, v, dout, out, probs, dq, dk, dv, scr};
    for (size_t i = 0; i < sizeof hp / sizeof hp[0]; i++) free(hp[i]);
}

int main(void) {
    /* the comparator fails on a 1e-3 error in one element (runs without a GPU too) */
    float a[4] = {1, -2, 3, 0.5f}, bb[4] = {1, -2, 3, 0.5f};
    bb[3] += 3e-3f;
    if (!(max_err(bb, a, 4) > TOL_GEMM) || !(max_err(a, a, 4) == 0)) {
        printf("test_cuda_nn: the comparator does not detect a 1e-3 error\n");
        return 1;
    }
    const char *why = NULL;
    if (lora_cuda_probe(&why, NULL) != LORA_OK) {
        printf("test_cuda_nn: skipped: %s\n", why);
        return 77;
    }
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_cuda_nn");
    CHECK_STATUS(lora_backend_cpu_create(ctx, &cpu), LORA_OK);
    CHECK_STATUS(lora_backend_cuda_create(ctx, 0, &gpu), LORA_OK);
    if (!gpu || !cpu) {
        lora_backend_free(cpu);
        lora_ctx_free(ctx);
        return test_finish("test_cuda_nn");
    }
    lora_mt_seed(&rng, 4321);
    test_primitives();
    test_nn_ops();
    CHECK_STATUS(gpu->iface->sync(gpu), LORA_OK);
    lora_backend_free(gpu);
    lora_backend_free(cpu);
    lora_ctx_free(ctx);
    return test_finish("test_cuda_nn");
}
