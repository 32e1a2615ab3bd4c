/* SD 1.5-shaped U-Net (860M parameters, random weights from build-bench/sd15_random.safetensors,
 * written by bench/load_peer.py) on the CPU backend: 64x64 latent, batch 1, 77-token context.
 * Cases: forward (inference plan) and forward + backward to the input latent and the context
 * (train plan, base weights frozen). Prints "# ..." lines and "name seconds" (median of reps);
 * scripts/bench.sh unet pairs them with bench/unet_peer.py (diffusers UNet2DConditionModel on
 * PyTorch CPU). Not a test. The U-Net's 16-bit matrices are read in place from the mapped
 * checkpoint (unet_init_ex, UNET_BORROW_16BIT); UNET_BORROW=0 copies them (unet_init).
 * usage: bench_unet [reps] [checkpoint] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "bench_util.h"

#include "internal.h"
#include "backend/backend.h"
#include "model/sd_model.h"
#include "model/unet.h"

#define UNET_FWD_GFLOP 803.0   /* SD1.5 U-Net forward at 64x64, batch 1, 77 tokens (spec) */

static uint64_t vm_hwm_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu", (unsigned long long *)&kb) == 1) break;
    fclose(f);
    return kb;
}

static void fill(float *x, int64_t n, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        x[i] = (float)((seed >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
    }
}

/* The machine's sgemm rate in this process (2048^3, best of 3, the kernels OpenBLAS picked),
 * the yardstick for the U-Net's achieved fraction. */
static double sgemm_peak_gflops(void) {
    const int n = 2048;
    float *a = malloc((size_t)n * n * 4), *b = malloc((size_t)n * n * 4), *c = malloc((size_t)n * n * 4);
    if (!a || !b || !c) { free(a); free(b); free(c); return 0; }
    for (size_t i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 7) * 1e-3f; b[i] = (float)(i % 5) * 1e-3f; }
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        double s = bench_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double t = bench_now() - s;
        if (t < best) best = t;
    }
    free(a); free(b); free(c);
    return 2.0 * n * n * (double)n / best / 1e9;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 1;
    const char *ck = argc > 2 ? argv[2] : "build-bench/sd15_random.safetensors";
    if (reps < 1) reps = 1;
    if (reps > 16) reps = 16;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    lora_model *model = NULL;
    if (lora_model_load(ctx, ck, NULL, &model) != LORA_OK) {
        fprintf(stderr, "bench_unet: %s: %s (run bench/load_peer.py write build-bench)\n", ck, lora_errmsg(ctx));
        return 1;
    }
    struct unet_model m;
    /* UNET_BORROW=0 copies the checkpoint's 16-bit matrices instead of pointing into it */
    const char *bv = getenv("UNET_BORROW");
    int borrow = !bv || atoi(bv) != 0;
    if (unet_init_ex(&m, ctx->backend, &model->sd.unet, &model->sd.cfg, borrow ? UNET_BORROW_16BIT : 0) != LORA_OK) {
        fprintf(stderr, "bench_unet: unet_init: %s\n", lora_errmsg(ctx));
        return 1;
    }
    const int64_t B = 1, H = 64, W = 64, T = 77, X = m.ctx_dim, C = m.in_ch;
    uint64_t host0 = 0, peak = 0;
    lora_ctx_memory(ctx, &host0, NULL, NULL, NULL);
    printf("# SD1.5-shaped U-Net (random weights from %s), latent %lldx%lld, batch %lld, %lld tokens\n", ck,
           (long long)H, (long long)W, (long long)B, (long long)T);
    printf("# threads(ctx): %d; host bytes after loading (U-Net weights: %s; the checkpoint is mapped, not counted "
           "here): %.2f GiB; VmHWM %.2f GiB\n", ctx->n_threads,
           m.wmax ? (borrow ? "16-bit borrowed from the mapping, fp32 vectors" : "16-bit copy, fp32 vectors") : "fp32",
           host0 / 1073741824.0, vm_hwm_kb() / 1048576.0);
    const double peak_gf = sgemm_peak_gflops();
    printf("# sgemm peak here (2048^3): %.1f GFLOP/s\n", peak_gf);
    float *x = malloc((size_t)(B * C * H * W) * 4), *out = malloc((size_t)(B * m.out_ch * H * W) * 4);
    float *ctxt = malloc((size_t)(B * T * X) * 4), *dx = malloc((size_t)(B * C * H * W) * 4);
    float *dctx = malloc((size_t)(B * T * X) * 4), *dout = malloc((size_t)(B * m.out_ch * H * W) * 4);
    float t[1] = {500.0f};
    fill(x, B * C * H * W, 1);
    fill(ctxt, B * T * X, 2);
    fill(dout, B * m.out_ch * H * W, 3);
    double ts[16];
    {
        struct unet_plan p;
        if (unet_plan_init(&p, &m, B, H, W, T) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
        printf("# forward plan: %.2f GiB\n", unet_plan_bytes(&p) / 1073741824.0);
        /* untimed warm-up: borrowed weights are first read from the mapped file here */
        if (unet_forward(&p, x, t, ctxt, out) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
        for (int r = 0; r < reps; r++) {
            double s = bench_now();
            if (unet_forward(&p, x, t, ctxt, out) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
            ts[r] = bench_now() - s;
        }
        double f = bench_median(ts, reps);
        lora_ctx_memory(ctx, NULL, &peak, NULL, NULL);
        printf("# forward: %.1f GFLOP/s (803 GFLOP, %.0f%% of sgemm peak), host peak %.2f GiB, plan-only %.2f GiB, "
               "VmHWM %.2f GiB\n", UNET_FWD_GFLOP / f, peak_gf > 0 ? 100.0 * UNET_FWD_GFLOP / f / peak_gf : 0.0,
               peak / 1073741824.0, (peak - host0) / 1073741824.0, vm_hwm_kb() / 1048576.0);
        printf("unet_fwd %.3f\n", f);
        unet_plan_free(&p);
    }
    /* gradient_checkpointing on (per-block recompute), then off (save all): host peak is a
     * high-water mark, so the smaller plan runs first */
    for (int mode = UNET_TRAIN_CHECKPOINT; mode <= UNET_TRAIN_SAVE_ALL; mode++) {
        struct unet_plan p;
        if (unet_plan_init_ex(&p, &m, B, H, W, T, mode, 0) != LORA_OK) { fprintf(stderr, "%s\n", lora_errmsg(ctx)); return 1; }
        printf("# train plan (%s): %.2f GiB\n", mode == UNET_TRAIN_CHECKPOINT ? "gradient_checkpointing" :
               "no checkpointing", unet_plan_bytes(&p) / 1073741824.0);
        for (int r = 0; r < reps; r++) {
            double s = bench_now();
            if (unet_forward(&p, x, t, ctxt, out) != LORA_OK || unet_backward(&p, dout, dx, dctx) != LORA_OK) {
                fprintf(stderr, "%s\n", lora_errmsg(ctx));
                return 1;
            }
            ts[r] = bench_now() - s;
        }
        double f = bench_median(ts, reps);
        lora_ctx_memory(ctx, NULL, &peak, NULL, NULL);
        printf("# forward+backward (input grads, %s): %.1f GFLOP/s counting 3x803 GFLOP (%.0f%% of sgemm peak), "
               "host peak %.2f GiB, VmHWM %.2f GiB\n", mode == UNET_TRAIN_CHECKPOINT ? "per-block recompute" : "all saved",
               3 * UNET_FWD_GFLOP / f, peak_gf > 0 ? 100.0 * 3 * UNET_FWD_GFLOP / f / peak_gf : 0.0,
               peak / 1073741824.0, vm_hwm_kb() / 1048576.0);
        printf("unet_fwd_bwd%s %.3f\n", mode == UNET_TRAIN_CHECKPOINT ? "" : "_nockpt", f);
        unet_plan_free(&p);
    }
    free(x); free(out); free(ctxt); free(dx); free(dctx); free(dout);
    unet_free(&m);
    lora_model_free(model);
    lora_ctx_free(ctx);
    return 0;
}
