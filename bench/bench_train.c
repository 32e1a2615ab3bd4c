/* One kohya LoRA training step on an SD 1.5-shaped model (random weights from
 * build-bench/sd15_random.safetensors, written by bench/load_peer.py) on the CPU backend:
 * 512x512 (64x64 latent), batch 1, cached latents (no VAE), 77 tokens, rank-4 LoRA on the
 * text encoder and the U-Net (kohya's module list), text-encoder LoRA trained, AdamW.
 * Cases: a full step (CLIP + U-Net forward/backward, clip_grad_norm_, AdamW) with
 * gradient_checkpointing on (per-block recompute) and off (kohya's default). Prints "# ..." lines
 * (plan bytes, host peak, VmHWM) and "name seconds" (median of reps); scripts/bench.sh train
 * pairs them with bench/train_peer.py (diffusers + transformers + the LoRA math on PyTorch CPU).
 * Not a test.
 * usage: bench_train [reps] [checkpoint] [latent side] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

#include "internal.h"
#include "backend/backend.h"
#include "core/rng.h"
#include "model/sd_model.h"
#include "model/unet.h"
#include "network/network.h"
#include "train/train.h"

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

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 1;
    const char *ck = argc > 2 ? argv[2] : "build-bench/sd15_random.safetensors";
    int64_t side = argc > 3 ? atoll(argv[3]) : 64;
    if (reps < 1) reps = 1;
    if (reps > 16) reps = 16;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    lora_model *model = NULL;
    if (lora_model_load(ctx, ck, NULL, &model) != LORA_OK) {
        fprintf(stderr, "bench_train: %s: %s (run bench/load_peer.py write build-bench)\n", ck, lora_errmsg(ctx));
        return 1;
    }
    lora_network *net = NULL;
    if (lora_network_create(model, NULL, &net) != LORA_OK) {
        fprintf(stderr, "bench_train: network: %s\n", lora_errmsg(ctx));
        return 1;
    }
    struct clip_model clip;
    struct unet_model unet;
    memset(&clip, 0, sizeof clip);
    memset(&unet, 0, sizeof unet);
    if (clip_init(&clip, ctx->backend, &model->sd.te, &model->sd.cfg) != LORA_OK ||
        unet_init_ex(&unet, ctx->backend, &model->sd.unet, &model->sd.cfg, UNET_BORROW_16BIT) != LORA_OK) {   /* as the trainer */
        fprintf(stderr, "bench_train: models: %s\n", lora_errmsg(ctx));
        return 1;
    }
    const int64_t B = 1, T = 77, per = 4 * side * side;
    float *lat = malloc((size_t)(B * per) * 4), *noise = malloc((size_t)(B * per) * 4);
    int32_t ids[77];
    struct lora_mt19937 g;
    lora_mt_seed(&g, 1);
    lora_torch_randn(&g, lat, B * per);
    for (int64_t i = 0; i < B * per; i++) lat[i] *= 0.18215f;
    for (int i = 0; i < 77; i++) ids[i] = i == 0 ? 49406 % (int32_t)clip.vocab : (int32_t)(lora_mt_next(&g) % (uint32_t)clip.vocab);
    int64_t ts[1] = {500};
    uint64_t host0 = 0, peak = 0;
    lora_ctx_memory(ctx, &host0, NULL, NULL, NULL);
    printf("# SD1.5-shaped model (random weights, %s): latent %lldx%lld, batch 1, 77 tokens, cached latents; "
           "LoRA rank 4 alpha 1 on %lld modules (text encoder trained), AdamW\n", ck, (long long)side, (long long)side,
           (long long)net->n);
    printf("# threads(ctx): %d; host bytes after loading: %.2f GiB; VmHWM %.2f GiB\n", ctx->n_threads,
           host0 / 1073741824.0, vm_hwm_kb() / 1048576.0);
    /* checkpointing first: host peak is a high-water mark, so the smaller plan runs first */
    for (int mode = UNET_TRAIN_CHECKPOINT; mode <= UNET_TRAIN_SAVE_ALL; mode++) {
        struct train_opts o;
        train_opts_default(&o);
        o.unet_train = mode;
        struct train_state s;
        if (train_init(&s, ctx, net, &clip, &unet, &o, B, side, side, T) != LORA_OK) {
            fprintf(stderr, "bench_train: %s\n", lora_errmsg(ctx));
            return 1;
        }
        double t[16], loss = 0;
        for (int r = 0; r < reps; r++) {
            lora_torch_randn(&g, noise, B * per);
            double st = bench_now();
            if (train_step(&s, lat, noise, ts, ids, NULL, &loss) != LORA_OK) {
                fprintf(stderr, "bench_train: %s\n", lora_errmsg(ctx));
                return 1;
            }
            t[r] = bench_now() - st;
        }
        double med = bench_median(t, reps);
        lora_ctx_memory(ctx, NULL, &peak, NULL, NULL);
        printf("# train step (%s): plan %.2f GiB, host peak %.2f GiB, VmHWM %.2f GiB, loss %.4f\n",
               mode == UNET_TRAIN_CHECKPOINT ? "gradient_checkpointing" : "no checkpointing",
               unet_plan_bytes(&s.up) / 1073741824.0, peak / 1073741824.0, vm_hwm_kb() / 1048576.0, loss);
        printf("train_step%s %.3f\n", mode == UNET_TRAIN_CHECKPOINT ? "_ckpt" : "", med);
        train_free(&s);
    }
    free(lat);
    free(noise);
    clip_free(&clip);
    unet_free(&unet);
    lora_network_free(net);
    lora_model_free(model);
    lora_ctx_free(ctx);
    return 0;
}
