/* CPU backend against independent references: GEMM against a float64 triple loop, SiLU/GELU
 * against their closed forms in double, backward passes against central finite
 * differences, conv-as-GEMM (im2col) against a direct convolution loop. */
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "../test.h"

static void fill(struct lora_mt19937 *g, float *x, int64_t n) { lora_torch_randn(g, x, n); }

static void ref_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                     int ldb, float beta, const float *c0, int ldc, double *out) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int p = 0; p < k; p++) {
                double av = ta ? a[p * lda + i] : a[i * lda + p];
                double bv = tb ? b[j * ldb + p] : b[p * ldb + j];
                s += av * bv;
            }
            out[i * ldc + j] = alpha * s + beta * (double)c0[i * ldc + j];
        }
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    struct lora_backend_impl *be = ctx->backend;
    CHECK(be && be->iface->version == LORA_BACKEND_IFACE_VERSION && strcmp(be->iface->name, "cpu") == 0);
    struct lora_mt19937 g;
    lora_mt_seed(&g, 1234);

    /* GEMM, all four transpose cases, non-square, with leading dimensions > width. */
    enum { M = 37, N = 29, K = 53, LD = 64 };
    float *a = calloc(LD * LD, 4), *b = calloc(LD * LD, 4), *c = calloc(LD * LD, 4), *c0 = calloc(LD * LD, 4);
    double *ref = calloc(LD * LD, 8);
    fill(&g, a, LD * LD);
    fill(&g, b, LD * LD);
    fill(&g, c0, LD * LD);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            memcpy(c, c0, LD * LD * 4);
            CHECK_STATUS(be->iface->gemm_f32(be, ta, tb, M, N, K, 0.75f, a, LD, b, LD, -0.5f, c, LD), LORA_OK);
            ref_gemm(ta, tb, M, N, K, 0.75f, a, LD, b, LD, -0.5f, c0, LD, ref);
            double maxerr = 0;
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) maxerr = fmax(maxerr, fabs(c[i * LD + j] - ref[i * LD + j]));
            CHECK_MSG(maxerr < 1e-4, "gemm ta=%d tb=%d max error %g", ta, tb, maxerr);
            CHECK(c[M * LD] == c0[M * LD]);   /* rows past m untouched */
        }
    CHECK_STATUS(be->iface->gemm_f32(be, 0, 0, (int64_t)1 << 40, 1, 1, 1, a, 1, b, 1, 0, c, 1), LORA_E_LIMIT);
    /* batched fallback loops gemm_f32 */
    memcpy(c, c0, LD * LD * 4);
    CHECK_STATUS(lora_be_gemm_batched_f32(be, 0, 1, 4, 5, 6, 1.0f, a, 6, 24, b, 6, 30, 0.0f, c, 5, 20, 3), LORA_OK);
    double e = 0;
    for (int bi = 0; bi < 3; bi++) {
        ref_gemm(0, 1, 4, 5, 6, 1.0f, a + bi * 24, 6, b + bi * 30, 6, 0.0f, c0 + bi * 20, 5, ref);
        for (int i = 0; i < 20; i++) e = fmax(e, fabs(c[bi * 20 + i] - ref[i]));
    }
    CHECK_MSG(e < 1e-4, "batched gemm error %g", e);

    /* gemm_ex: fp16/bf16 inputs, fp32 accumulation, against float64 on the decoded inputs.
     * Operands are packed tightly so the last row ends the buffer (no over-read: ASan). */
    for (int t = 0; t < 2; t++) {
        lora_dtype ty = t ? LORA_DTYPE_BF16 : LORA_DTYPE_F16;
        for (int ta = 0; ta < 2; ta++) {
            int tb = !ta;
            int lda = ta ? M : K, ldb = tb ? K : N;
            uint16_t *ah = malloc((size_t)M * K * 2), *bh = malloc((size_t)K * N * 2);
            float *ad = malloc((size_t)M * K * 4), *bd = malloc((size_t)K * N * 4);
            for (int i = 0; i < M * K; i++) {
                ah[i] = t ? lora_f32_to_bf16(a[i]) : lora_f32_to_f16(a[i]);
                ad[i] = t ? lora_bf16_to_f32(ah[i]) : lora_f16_to_f32(ah[i]);
            }
            for (int i = 0; i < K * N; i++) {
                bh[i] = t ? lora_f32_to_bf16(b[i]) : lora_f32_to_f16(b[i]);
                bd[i] = t ? lora_bf16_to_f32(bh[i]) : lora_f16_to_f32(bh[i]);
            }
            memcpy(c, c0, LD * LD * 4);
            CHECK_STATUS(be->iface->gemm_ex(be, ta, tb, M, N, K, 1.5f, ty, ah, lda, bh, ldb, 0.25f, c, LD), LORA_OK);
            ref_gemm(ta, tb, M, N, K, 1.5f, ad, lda, bd, ldb, 0.25f, c0, LD, ref);
            double err = 0;
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) err = fmax(err, fabs(c[i * LD + j] - ref[i * LD + j]));
            CHECK_MSG(err < 1e-4, "gemm_ex %s ta=%d error %g", t ? "bf16" : "f16", ta, err);
            free(ah); free(bh); free(ad); free(bd);
        }
    }
    CHECK_STATUS(be->iface->gemm_ex(be, 0, 0, 2, 2, 2, 1.0f, LORA_DTYPE_I8, a, 2, b, 2, 0.0f, c, 2), LORA_E_UNSUPPORTED);

    /* Elementwise against closed forms in double. */
    enum { NE = 100003 };   /* above the threading threshold, odd */
    float *x = malloc(NE * 4), *y = malloc(NE * 4), *dy = malloc(NE * 4), *dx = malloc(NE * 4);
    fill(&g, x, NE);
    for (int i = 0; i < NE; i++) x[i] *= 4.0f;
    fill(&g, dy, NE);
    double es = 0, eg = 0;
    CHECK_STATUS(be->iface->silu_f32(be, NE, x, y), LORA_OK);
    for (int i = 0; i < NE; i++) es = fmax(es, fabs(y[i] - x[i] / (1.0 + exp(-(double)x[i]))));
    CHECK_STATUS(be->iface->gelu_f32(be, NE, x, y), LORA_OK);
    for (int i = 0; i < NE; i++) eg = fmax(eg, fabs(y[i] - 0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0)))));
    CHECK_MSG(es < 1e-5 && eg < 1e-5, "silu %g gelu %g", es, eg);

    /* Backward against central differences of the forward (h = 1e-3, float forward). */
    for (int op = 0; op < 2; op++) {
        lora_status (*fwd)(struct lora_backend_impl *, int64_t, const float *, float *) =
            op ? be->iface->gelu_f32 : be->iface->silu_f32;
        lora_status (*bwd)(struct lora_backend_impl *, int64_t, const float *, const float *, float *) =
            op ? be->iface->gelu_backward_f32 : be->iface->silu_backward_f32;
        CHECK_STATUS(bwd(be, NE, x, dy, dx), LORA_OK);
        double worst = 0;
        for (int i = 0; i < 200; i++) {
            float xp = x[i] + 1e-3f, xm = x[i] - 1e-3f, yp, ym;
            fwd(be, 1, &xp, &yp);
            fwd(be, 1, &xm, &ym);
            double fd = dy[i] * ((double)yp - ym) / ((double)xp - xm);
            worst = fmax(worst, fabs(fd - dx[i]) / (1e-2 + fabs(fd)));
        }
        CHECK_MSG(worst < 2e-2, "%s backward vs finite difference: %g", op ? "gelu" : "silu", worst);
    }

    /* axpby and mul against the formula. */
    memcpy(y, dy, NE * 4);
    CHECK_STATUS(be->iface->axpby_f32(be, NE, 2.0f, x, -1.0f, y), LORA_OK);
    double ea = 0;
    for (int i = 0; i < NE; i++) ea = fmax(ea, fabs(y[i] - (2.0 * x[i] - dy[i])));
    CHECK(ea < 1e-5);
    CHECK_STATUS(be->iface->mul_f32(be, NE, x, dy, y), LORA_OK);
    ea = 0;
    for (int i = 0; i < NE; i++) ea = fmax(ea, fabs(y[i] - (double)x[i] * dy[i]));
    CHECK(ea < 1e-5);

    /* convert f32 -> f16 -> f32 and bf16 agree with the scalar converters. */
    uint16_t *h = malloc(NE * 2);
    CHECK_STATUS(be->iface->convert(be, NE, LORA_DTYPE_F32, x, LORA_DTYPE_F16, h), LORA_OK);
    CHECK_STATUS(be->iface->convert(be, NE, LORA_DTYPE_F16, h, LORA_DTYPE_F32, y), LORA_OK);
    double ec = 0;
    for (int i = 0; i < NE; i++) ec = fmax(ec, fabs(y[i] - x[i]) / fmax(fabs(x[i]), 1e-3));
    CHECK_MSG(ec < 1.0 / 1024, "f16 round trip relative error %g", ec);
    CHECK_STATUS(be->iface->convert(be, NE, LORA_DTYPE_F32, x, LORA_DTYPE_I8, h), LORA_E_UNSUPPORTED);

    /* conv2d via im2col + gemm against a direct loop: C=3 -> F=5, 3x3, stride 2, pad 1. */
    enum { C = 3, H = 11, W = 9, F = 5, KH = 3, KW = 3, S = 2, P = 1 };
    const int OH = (H + 2 * P - KH) / S + 1, OW = (W + 2 * P - KW) / S + 1;
    float *img = malloc(C * H * W * 4), *wt = malloc(F * C * KH * KW * 4);
    float *cols = malloc((size_t)C * KH * KW * OH * OW * 4), *out = malloc((size_t)F * OH * OW * 4);
    fill(&g, img, C * H * W);
    fill(&g, wt, F * C * KH * KW);
    CHECK_STATUS(be->iface->im2col_f32(be, img, C, H, W, KH, KW, S, P, cols), LORA_OK);
    CHECK_STATUS(be->iface->gemm_f32(be, 0, 0, F, OH * OW, C * KH * KW, 1.0f, wt, C * KH * KW, cols, OH * OW, 0.0f,
                                     out, OH * OW), LORA_OK);
    double ev = 0;
    for (int f = 0; f < F; f++)
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                double s = 0;
                for (int ci = 0; ci < C; ci++)
                    for (int ky = 0; ky < KH; ky++)
                        for (int kx = 0; kx < KW; kx++) {
                            int iy = oy * S - P + ky, ix = ox * S - P + kx;
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                            s += (double)wt[((f * C + ci) * KH + ky) * KW + kx] * img[(ci * H + iy) * W + ix];
                        }
                ev = fmax(ev, fabs(s - out[(f * OH + oy) * OW + ox]));
            }
    CHECK_MSG(ev < 1e-4, "conv as gemm error %g", ev);
    CHECK_STATUS(be->iface->im2col_f32(be, img, C, H, W, 20, 3, 1, 0, cols), LORA_E_INVALID_ARG);

    /* Layer-op primitives (lib/nn's loops) against double-precision formulas. */
    {
        enum { RN = 53, RC = 777 };   /* RN * RC above the threading threshold, odd widths */
        float *m0 = malloc(RN * RC * 4), *m1 = malloc(RN * RC * 4), *m2 = malloc(RN * RC * 4);
        float *row = malloc(RC * 4), *cs = malloc(RC * 4), *mu = malloc(RN * 4), *rs = malloc(RN * 4);
        float *gam = malloc(RC * 4), *bet = malloc(RC * 4), *dg = malloc(RC * 4), *dbt = malloc(RC * 4);
        fill(&g, m0, RN * RC);
        fill(&g, row, RC);
        fill(&g, gam, RC);
        fill(&g, bet, RC);
        /* copy, fill, scale */
        CHECK_STATUS(be->iface->copy(be, m1, m0, RN * RC * 4), LORA_OK);
        CHECK(memcmp(m1, m0, RN * RC * 4) == 0);
        CHECK_STATUS(be->iface->fill_f32(be, RN * RC, -2.5f, m1), LORA_OK);
        CHECK(m1[0] == -2.5f && m1[RN * RC - 1] == -2.5f);
        CHECK_STATUS(be->iface->copy(be, m1, m0, RN * RC * 4), LORA_OK);
        CHECK_STATUS(be->iface->scale_f32(be, RN * RC, 0.5f, m1), LORA_OK);
        int ok = 1;
        for (int i = 0; i < RN * RC; i++) ok &= m1[i] == 0.5f * m0[i];
        CHECK(ok);
        /* add_rows: beta 0 never reads y (NaN stays out), beta 0.5 scales it */
        for (int i = 0; i < RN * RC; i++) m1[i] = NAN;
        CHECK_STATUS(be->iface->add_rows_f32(be, RN, RC, row, 0.0f, m1), LORA_OK);
        ok = 1;
        for (int i = 0; i < RN * RC; i++) ok &= m1[i] == row[i % RC];
        CHECK(ok);
        memcpy(m1, m0, RN * RC * 4);
        CHECK_STATUS(be->iface->add_rows_f32(be, RN, RC, row, 0.5f, m1), LORA_OK);
        double er = 0;
        for (int i = 0; i < RN * RC; i++) er = fmax(er, fabs(m1[i] - (row[i % RC] + 0.5 * m0[i])));
        CHECK_MSG(er < 1e-6, "add_rows error %g", er);
        /* col_sum: written (beta 0), then added (beta 1) */
        CHECK_STATUS(be->iface->col_sum_f32(be, RN, RC, m0, 0.0f, cs), LORA_OK);
        CHECK_STATUS(be->iface->col_sum_f32(be, RN, RC, m0, 1.0f, cs), LORA_OK);
        er = 0;
        for (int j = 0; j < RC; j++) {
            double t = 0;
            for (int i = 0; i < RN; i++) t += m0[i * RC + j];
            er = fmax(er, fabs(cs[j] - 2 * t));
        }
        CHECK_MSG(er < 1e-4, "col_sum error %g", er);
        /* quick_gelu against the closed form, backward against central differences */
        double eq = 0;
        CHECK_STATUS(be->iface->quick_gelu_f32(be, NE, x, y), LORA_OK);
        for (int i = 0; i < NE; i++) eq = fmax(eq, fabs(y[i] - x[i] / (1.0 + exp(-1.702 * x[i]))));
        CHECK_MSG(eq < 1e-5, "quick_gelu %g", eq);
        CHECK_STATUS(be->iface->quick_gelu_backward_f32(be, NE, x, dy, dx), LORA_OK);
        eq = 0;
        for (int i = 0; i < 200; i++) {
            double xd = x[i], hh = 1e-4;
            double fp = (xd + hh) / (1.0 + exp(-1.702 * (xd + hh))), fm = (xd - hh) / (1.0 + exp(-1.702 * (xd - hh)));
            double fd = dy[i] * (fp - fm) / (2 * hh);
            eq = fmax(eq, fabs(fd - dx[i]) / (1e-3 + fabs(fd)));
        }
        CHECK_MSG(eq < 1e-4, "quick_gelu backward %g", eq);
        /* layernorm against double, rows shifted far from 0 (cancellation) */
        for (int i = 0; i < RN * RC; i++) m1[i] = m0[i] * 2.0f + 30.0f;
        CHECK_STATUS(be->iface->layernorm_f32(be, RN, RC, 1e-5f, m1, gam, bet, m2, mu, rs), LORA_OK);
        double el = 0;
        for (int i = 0; i < RN; i++) {
            double mm = 0, vv = 0;
            for (int j = 0; j < RC; j++) mm += m1[i * RC + j];
            mm /= RC;
            for (int j = 0; j < RC; j++) vv += (m1[i * RC + j] - mm) * (m1[i * RC + j] - mm);
            double r = 1.0 / sqrt(vv / RC + 1e-5);
            el = fmax(el, fabs(mu[i] - mm) / fabs(mm) + fabs(rs[i] - r) / r);
            for (int j = 0; j < RC; j++)
                el = fmax(el, fabs(m2[i * RC + j] - ((m1[i * RC + j] - mm) * r * gam[j] + bet[j])));
        }
        CHECK_MSG(el < 1e-5, "layernorm error %g", el);
        /* layernorm backward against the closed form in double */
        fill(&g, m2, RN * RC);   /* dy */
        for (int j = 0; j < RC; j++) dg[j] = dbt[j] = 1.0f;
        float *lx = malloc(RN * RC * 4);
        CHECK_STATUS(be->iface->layernorm_backward_f32(be, RN, RC, m2, m1, mu, rs, gam, lx, dg, dbt, 0), LORA_OK);
        el = 0;
        double eg2 = 0;
        for (int i = 0; i < RN; i++) {
            double sg = 0, sgx = 0;
            for (int j = 0; j < RC; j++) {
                double xh = (m1[i * RC + j] - (double)mu[i]) * rs[i], gg = (double)m2[i * RC + j] * gam[j];
                sg += gg;
                sgx += gg * xh;
            }
            for (int j = 0; j < RC; j++) {
                double xh = (m1[i * RC + j] - (double)mu[i]) * rs[i], gg = (double)m2[i * RC + j] * gam[j];
                el = fmax(el, fabs(lx[i * RC + j] - rs[i] * (gg - sg / RC - xh * sgx / RC)));
            }
        }
        for (int j = 0; j < RC; j++) {
            double tg = 1, tb = 1;
            for (int i = 0; i < RN; i++) {
                tg += (double)m2[i * RC + j] * ((m1[i * RC + j] - (double)mu[i]) * rs[i]);
                tb += m2[i * RC + j];
            }
            eg2 = fmax(eg2, fabs(dg[j] - tg) + fabs(dbt[j] - tb));
        }
        CHECK_MSG(el < 1e-4 && eg2 < 1e-3, "layernorm backward dx %g, params %g", el, eg2);
        free(lx);
        /* softmax over [.., T, T] rows, causal and full, and its backward */
        enum { ST = 77, SR = 6 * ST };
        for (int causal = 0; causal < 2; causal++) {
            memcpy(m1, m0, SR * ST * 4);
            for (int i = 0; i < SR * ST; i++) m1[i] *= 3.0f;
            CHECK_STATUS(be->iface->softmax_f32(be, SR, ST, causal, m1), LORA_OK);
            double es2 = 0;
            int mask_ok = 1;
            for (int r = 0; r < SR; r++) {
                int lim = causal ? r % ST + 1 : ST;
                double mx = -1e300, sum = 0;
                for (int j = 0; j < lim; j++) mx = fmax(mx, 3.0 * m0[r * ST + j]);
                for (int j = 0; j < lim; j++) sum += exp(3.0 * m0[r * ST + j] - mx);
                for (int j = 0; j < lim; j++)
                    es2 = fmax(es2, fabs(m1[r * ST + j] - exp(3.0 * m0[r * ST + j] - mx) / sum));
                for (int j = lim; j < ST; j++) mask_ok &= m1[r * ST + j] == 0.0f;
            }
            CHECK_MSG(es2 < 1e-6 && mask_ok, "softmax (causal %d) error %g, mask %d", causal, es2, mask_ok);
            /* backward in place: dx = p (dy - <p, dy>) */
            memcpy(m2, dy, SR * ST * 4);
            CHECK_STATUS(be->iface->softmax_backward_f32(be, SR, ST, m1, m2, m2), LORA_OK);
            es2 = 0;
            for (int r = 0; r < SR; r++) {
                double dot = 0;
                for (int j = 0; j < ST; j++) dot += (double)m1[r * ST + j] * dy[r * ST + j];
                for (int j = 0; j < ST; j++)
                    es2 = fmax(es2, fabs(m2[r * ST + j] - m1[r * ST + j] * (dy[r * ST + j] - dot)));
            }
            CHECK_MSG(es2 < 1e-6, "softmax backward error %g", es2);
        }
        /* embedding: gather + positions, the first bad row reported before any write */
        enum { EV = 50, EP = 7, EC = 33, EN = 3 * EP };
        int32_t ids[EN];
        for (int i = 0; i < EN; i++) ids[i] = (i * 17 + 3) % EV;
        int64_t bad_row = 99;
        int32_t bad_id = 99;
        CHECK_STATUS(be->iface->embedding_f32(be, EN, EC, ids, m0, row, EP, EV, m1, &bad_row, &bad_id), LORA_OK);
        ok = bad_row == -1;
        for (int i = 0; i < EN; i++)
            for (int j = 0; j < EC; j++) ok &= m1[i * EC + j] == m0[ids[i] * EC + j] + row[(i % EP) * EC + j];
        CHECK(ok);
        ids[9] = EV;
        ids[12] = -4;
        m1[0] = 12345.0f;
        CHECK_STATUS(be->iface->embedding_f32(be, EN, EC, ids, m0, NULL, EP, EV, m1, &bad_row, &bad_id), LORA_OK);
        CHECK(bad_row == 9 && bad_id == EV && m1[0] == 12345.0f);
        ids[9] = 1;
        ids[12] = 1;   /* a repeated id: its gradient rows add */
        memset(cs, 0, RC * 4);
        for (int i = 0; i < EV * EC; i++) m2[i] = 0.5f;
        CHECK_STATUS(be->iface->embedding_backward_f32(be, EN, EC, ids, dy, EP, m2, cs), LORA_OK);
        er = 0;
        for (int v = 0; v < EV; v++)
            for (int j = 0; j < EC; j++) {
                double t = 0.5;
                for (int i = 0; i < EN; i++) if (ids[i] == v) t += dy[i * EC + j];
                er = fmax(er, fabs(m2[v * EC + j] - t));
            }
        for (int p2 = 0; p2 < EP; p2++)
            for (int j = 0; j < EC; j++) {
                double t = 0;
                for (int i = p2; i < EN; i += EP) t += dy[i * EC + j];
                er = fmax(er, fabs(cs[p2 * EC + j] - t));
            }
        CHECK_MSG(er < 1e-5, "embedding backward error %g", er);
        free(m0); free(m1); free(m2); free(row); free(cs); free(mu); free(rs); free(gam); free(bet); free(dg); free(dbt);
    }

    free(a); free(b); free(c); free(c0); free(ref); free(x); free(y); free(dy); free(dx); free(h);
    free(img); free(wt); free(cols); free(out);
    lora_ctx_free(ctx);
    return test_finish("test_backend_cpu");
}
