/* SD 1.5 VAE decode of one 512x512 image (latent 4x64x64, random weights from
 * build-bench/sd15_random.safetensors, written by bench/load_peer.py) on the CPU backend
 * through lora_model_vae_decode. Prints "# ..." lines and "vae_decode_512 seconds" (median of
 * reps, after one warm-up run), the achieved GFLOP/s over the decoder's counted FLOPs and the
 * process's peak RSS. Not a test. Run it with and without OPENBLAS_CORETYPE to compare the
 * kernels OpenBLAS picks. usage: bench_vae [reps] [checkpoint] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

#include "lora/lora.h"

static unsigned long long vm_hwm_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    unsigned long long kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu", &kb) == 1) break;
    fclose(f);
    return kb;
}

/* FLOPs (2 per multiply-add) of a k x k conv cin -> cout over an hw-pixel output */
static double conv_flops(double cin, double cout, double k, double hw) { return 2.0 * cin * cout * k * k * hw; }

/* The SD 1.5 decoder (channels 128/256/512/512, 2+1 resnets a level, one mid attention) at a
 * 64x64 latent: convs, shortcuts and the attention's projections and two matmuls; the
 * norms and element-wise ops are not counted. */
static double decoder_flops(void) {
    const double ch[4] = {128, 256, 512, 512};
    double s = 64 * 64, f = 0;
    f += conv_flops(4, 4, 1, s) + conv_flops(4, 512, 3, s);
    f += 4 * conv_flops(512, 512, 3, s);                            /* mid resnets */
    f += 4 * 2.0 * s * 512 * 512 + 2 * 2.0 * s * s * 512;           /* mid attention */
    double prev = 512;
    for (int i = 0; i < 4; i++) {
        double out = ch[3 - i];
        for (int j = 0; j < 3; j++) {
            double cin = j == 0 ? prev : out;
            f += conv_flops(cin, out, 3, s) + conv_flops(out, out, 3, s);
            if (cin != out) f += conv_flops(cin, out, 1, s);
        }
        if (i < 3) { s *= 4; f += conv_flops(out, out, 3, s); }
        prev = out;
    }
    return f + conv_flops(128, 3, 3, s);
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
        fprintf(stderr, "bench_vae: %s: %s (run bench/load_peer.py write build-bench)\n", ck, lora_errmsg(ctx));
        return 1;
    }
    const int64_t H = 64, W = 64, n_lat = 4 * H * W, n_img = 3 * 8 * H * 8 * W;
    float *lat = malloc((size_t)n_lat * sizeof(float)), *img = malloc((size_t)n_img * sizeof(float));
    if (!lat || !img) return 1;
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (int64_t i = 0; i < n_lat; i++) {   /* xorshift, about unit scale like a decoded latent */
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        lat[i] = (float)((seed >> 40) / (double)(1ull << 24)) * 4.0f - 2.0f;
    }
    const char *ct = getenv("OPENBLAS_CORETYPE");
    printf("# OPENBLAS_CORETYPE=%s, OMP_NUM_THREADS=%s\n", ct ? ct : "(unset)",
           getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "(unset)");
    unsigned long long rss0 = vm_hwm_kb();
    double t = 0;
    lora_status st = LORA_OK;
    TIME_MEDIAN(reps, if (st == LORA_OK) st = lora_model_vae_decode(model, lat, 1, H, W, img, (uint64_t)n_img), t);
    if (st != LORA_OK) {
        fprintf(stderr, "bench_vae: decode: %s\n", lora_errmsg(ctx));
        return 1;
    }
    double sum = 0;
    for (int64_t i = 0; i < n_img; i++) sum += img[i];
    double gf = decoder_flops() / 1e9;
    printf("# decoder %.0f GFLOP (convs + attention), image mean %.6g\n", gf, sum / (double)n_img);
    printf("# peak RSS %.0f MiB (after load %.0f MiB)\n", vm_hwm_kb() / 1024.0, rss0 / 1024.0);
    printf("# %.1f GFLOP/s\n", gf / t);
    printf("vae_decode_512 %.3f\n", t);
    free(lat);
    free(img);
    lora_model_free(model);
    lora_ctx_free(ctx);
    return 0;
}
