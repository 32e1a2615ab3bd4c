/* Every CUDA backend op against the CPU backend on the same inputs. Exits 77 (skipped) when
 * no GPU is usable, so machines without one still get a green run that says "skipped". */
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "../test.h"

static struct lora_backend_impl *cpu, *gpu;

static float *upload(const float *h, int64_t n) {
    void *d = NULL;
    if (gpu->iface->buf_alloc(gpu, (size_t)n * 4, &d) != LORA_OK) return NULL;
    gpu->iface->upload(gpu, d, h, (size_t)n * 4);
    return d;
}

static double max_rel(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]) / (1e-3 + fabs((double)b[i])));
    return m;
}

int main(void) {
    const char *why = NULL;
    if (lora_cuda_probe(&why, NULL) != LORA_OK) {
        printf("test_cuda_ops: skipped: %s\n", why);
        return 77;
    }
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK_STATUS(lora_backend_cpu_create(ctx, &cpu), LORA_OK);
    CHECK_STATUS(lora_backend_cuda_create(ctx, 0, &gpu), LORA_OK);
    if (!gpu) return test_finish("test_cuda_ops");
    struct lora_mt19937 g;
    lora_mt_seed(&g, 99);

    /* GEMM (all transposes, odd sizes) and the batched form. */
    enum { M = 67, N = 45, K = 129 };
    float *a = malloc(M * K * 4), *b = malloc(K * N * 4), *c = malloc(M * N * 4), *r = malloc(M * N * 4);
    lora_torch_randn(&g, a, M * K);
    lora_torch_randn(&g, b, K * N);
    float *da = upload(a, M * K), *db = upload(b, K * N), *dc = upload(a, M * N);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N;
            CHECK_STATUS(cpu->iface->gemm_f32(cpu, ta, tb, M, N, K, 1.25f, a, lda, b, ldb, 0.0f, r, N), LORA_OK);
            CHECK_STATUS(gpu->iface->gemm_f32(gpu, ta, tb, M, N, K, 1.25f, da, lda, db, ldb, 0.0f, dc, N), LORA_OK);
            CHECK_STATUS(gpu->iface->download(gpu, c, dc, M * N * 4), LORA_OK);
            CHECK_MSG(max_rel(c, r, M * N) < 1e-3, "gemm ta=%d tb=%d rel err %g", ta, tb, max_rel(c, r, M * N));
        }
    CHECK_STATUS(lora_be_gemm_batched_f32(cpu, 0, 0, 5, 9, 3, 1.0f, a, 3, 15, b, 9, 27, 0.0f, r, 9, 45, 4), LORA_OK);
    CHECK_STATUS(lora_be_gemm_batched_f32(gpu, 0, 0, 5, 9, 3, 1.0f, da, 3, 15, db, 9, 27, 0.0f, dc, 9, 45, 4), LORA_OK);
    CHECK_STATUS(gpu->iface->download(gpu, c, dc, 180 * 4), LORA_OK);
    CHECK(max_rel(c, r, 180) < 1e-4);

    /* gemm_ex (cuBLASLt, fp32 accumulation) against the CPU's widen-then-sgemm. */
    lora_dtype ex_types[3] = {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16};
    for (int t = 0; t < 3; t++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                int lda = ta ? M : K, ldb = tb ? K : N, es = t ? 2 : 4;
                void *ah = malloc((size_t)M * K * es), *bh = malloc((size_t)K * N * es);
                cpu->iface->convert(cpu, M * K, LORA_DTYPE_F32, a, ex_types[t], ah);
                cpu->iface->convert(cpu, K * N, LORA_DTYPE_F32, b, ex_types[t], bh);
                void *dah = NULL, *dbh = NULL;
                gpu->iface->buf_alloc(gpu, (size_t)M * K * es, &dah);
                gpu->iface->buf_alloc(gpu, (size_t)K * N * es, &dbh);
                gpu->iface->upload(gpu, dah, ah, (size_t)M * K * es);
                gpu->iface->upload(gpu, dbh, bh, (size_t)K * N * es);
                CHECK_STATUS(cpu->iface->gemm_ex(cpu, ta, tb, M, N, K, 0.5f, ex_types[t], ah, lda, bh, ldb, 0.0f, r, N), LORA_OK);
                CHECK_STATUS(gpu->iface->gemm_ex(gpu, ta, tb, M, N, K, 0.5f, ex_types[t], dah, lda, dbh, ldb, 0.0f, dc, N), LORA_OK);
                CHECK_STATUS(gpu->iface->download(gpu, c, dc, M * N * 4), LORA_OK);
                CHECK_MSG(max_rel(c, r, M * N) < 2e-3, "gemm_ex type %d ta=%d tb=%d rel err %g", t, ta, tb,
                          max_rel(c, r, M * N));
                gpu->iface->buf_free(gpu, dah);
                gpu->iface->buf_free(gpu, dbh);
                free(ah); free(bh);
            }

    /* Elementwise forward/backward. */
    enum { NE = 1 << 20 };
    float *x = malloc(NE * 4), *dy = malloc(NE * 4), *yc = malloc(NE * 4), *yg = malloc(NE * 4);
    lora_torch_randn(&g, x, NE);
    lora_torch_randn(&g, dy, NE);
    float *dx = upload(x, NE), *ddy = upload(dy, NE), *dout = upload(x, NE);
    struct { const char *name; int kind; } ops[] = {{"silu", 0}, {"gelu", 1}, {"silu_bwd", 2}, {"gelu_bwd", 3},
                                                   {"mul", 4}, {"axpby", 5}};
    for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
        memcpy(yc, dy, NE * 4);
        gpu->iface->upload(gpu, dout, dy, NE * 4);
        switch (ops[o].kind) {
        case 0: cpu->iface->silu_f32(cpu, NE, x, yc); CHECK_STATUS(gpu->iface->silu_f32(gpu, NE, dx, dout), LORA_OK); break;
        case 1: cpu->iface->gelu_f32(cpu, NE, x, yc); CHECK_STATUS(gpu->iface->gelu_f32(gpu, NE, dx, dout), LORA_OK); break;
        case 2: cpu->iface->silu_backward_f32(cpu, NE, x, dy, yc); CHECK_STATUS(gpu->iface->silu_backward_f32(gpu, NE, dx, ddy, dout), LORA_OK); break;
        case 3: cpu->iface->gelu_backward_f32(cpu, NE, x, dy, yc); CHECK_STATUS(gpu->iface->gelu_backward_f32(gpu, NE, dx, ddy, dout), LORA_OK); break;
        case 4: cpu->iface->mul_f32(cpu, NE, x, dy, yc); CHECK_STATUS(gpu->iface->mul_f32(gpu, NE, dx, ddy, dout), LORA_OK); break;
        case 5: cpu->iface->axpby_f32(cpu, NE, 0.5f, x, 2.0f, yc); CHECK_STATUS(gpu->iface->axpby_f32(gpu, NE, 0.5f, dx, 2.0f, dout), LORA_OK); break;
        }
        CHECK_STATUS(gpu->iface->download(gpu, yg, dout, NE * 4), LORA_OK);
        CHECK_MSG(max_rel(yg, yc, NE) < 1e-5, "%s rel err %g", ops[o].name, max_rel(yg, yc, NE));
    }

    /* Conversions are bit-exact against the CPU (round to nearest even both sides). */
    uint16_t *hc = malloc(NE * 2), *hg = malloc(NE * 2);
    void *dh = NULL;
    CHECK_STATUS(gpu->iface->buf_alloc(gpu, NE * 2, &dh), LORA_OK);
    lora_dtype half_types[2] = {LORA_DTYPE_F16, LORA_DTYPE_BF16};
    for (int t = 0; t < 2; t++) {
        cpu->iface->convert(cpu, NE, LORA_DTYPE_F32, x, half_types[t], hc);
        CHECK_STATUS(gpu->iface->convert(gpu, NE, LORA_DTYPE_F32, dx, half_types[t], dh), LORA_OK);
        CHECK_STATUS(gpu->iface->download(gpu, hg, dh, NE * 2), LORA_OK);
        CHECK_MSG(memcmp(hc, hg, NE * 2) == 0, "f32 -> %s differs", t ? "bf16" : "f16");
        cpu->iface->convert(cpu, NE, half_types[t], hc, LORA_DTYPE_F32, yc);
        CHECK_STATUS(gpu->iface->convert(gpu, NE, half_types[t], dh, LORA_DTYPE_F32, dout), LORA_OK);
        CHECK_STATUS(gpu->iface->download(gpu, yg, dout, NE * 4), LORA_OK);
        CHECK(memcmp(yc, yg, NE * 4) == 0);
    }

    /* im2col. */
    enum { C = 4, H = 13, W = 10, KS = 3 };
    int64_t ncols = (int64_t)C * KS * KS * ((H + 2 - KS) / 1 + 1) * ((W + 2 - KS) / 1 + 1);
    float *colc = malloc(ncols * 4), *colg = malloc(ncols * 4), *dcol = NULL;
    cpu->iface->im2col_f32(cpu, x, C, H, W, KS, KS, 1, 1, colc);
    gpu->iface->buf_alloc(gpu, ncols * 4, (void **)&dcol);
    CHECK_STATUS(gpu->iface->im2col_f32(gpu, dx, C, H, W, KS, KS, 1, 1, dcol), LORA_OK);
    CHECK_STATUS(gpu->iface->download(gpu, colg, dcol, ncols * 4), LORA_OK);
    CHECK(memcmp(colc, colg, ncols * 4) == 0);

    /* Memory accounting and a recoverable out-of-memory. */
    uint64_t used = 0, avail = 0;
    gpu->iface->memory(gpu, &used, &avail);
    CHECK(used >= (uint64_t)NE * 4 && avail > 0);
    void *huge = NULL;
    CHECK_STATUS(gpu->iface->buf_alloc(gpu, (size_t)1 << 50, &huge), LORA_E_GPU_OOM);
    CHECK_STATUS(gpu->iface->sync(gpu), LORA_OK);   /* still usable after OOM */

    gpu->iface->buf_free(gpu, da); gpu->iface->buf_free(gpu, db); gpu->iface->buf_free(gpu, dc);
    gpu->iface->buf_free(gpu, dx); gpu->iface->buf_free(gpu, ddy); gpu->iface->buf_free(gpu, dout);
    gpu->iface->buf_free(gpu, dh); gpu->iface->buf_free(gpu, dcol);
    lora_backend_free(gpu);
    lora_backend_free(cpu);
    free(a); free(b); free(c); free(r); free(x); free(dy); free(yc); free(yg); free(hc); free(hg); free(colc); free(colg);
    lora_ctx_free(ctx);
    return test_finish("test_cuda_ops");
}
