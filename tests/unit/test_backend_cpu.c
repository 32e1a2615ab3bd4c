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

    free(a); free(b); free(c); free(c0); free(ref); free(x); free(y); free(dy); free(dx); free(h);
    free(img); free(wt); free(cols); free(out);
    lora_ctx_free(ctx);
    return test_finish("test_backend_cpu");
}
