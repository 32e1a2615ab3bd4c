/* SD 1.5-size CLIP ViT-L/14 text encoder on the CPU backend, random weights: forward for
 * batch 1 and 4 of 77 tokens, and a text-encoder LoRA step (forward + backward to rank-8
 * adapters on all 72 q/k/v/out/fc1/fc2 modules). Prints "# ..." lines and one line per case:
 * "name ms" (median); scripts/bench.sh clip pairs them with bench/clip_peer.py (transformers
 * CLIPTextModel on PyTorch CPU, same shapes and thread count) and prints ratios. Not a test.
 * usage: bench_clip [reps] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

#include "internal.h"
#include "backend/backend.h"
#include "io/tensor_map.h"
#include "model/clip.h"



static float urand(uint64_t *st) {   /* xorshift64*, uniform in [-1, 1) */
    *st ^= *st >> 12;
    *st ^= *st << 25;
    *st ^= *st >> 27;
    return (float)((*st * 2685821657736338717ull) >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
}

static int add(struct tensor_map *tm, uint64_t *st, const char *name, int64_t d0, int64_t d1, float scale,
               float shift) {
    int64_t n = d1 ? d0 * d1 : d0;
    float *data = malloc((size_t)n * sizeof(float));
    if (!data) return 0;
    for (int64_t i = 0; i < n; i++) data[i] = shift + scale * urand(st);
    int64_t shape[2] = {d0, d1};
    lora_status s = tmap_add(tm, name, LORA_DTYPE_F32, d1 ? 2 : 1, shape, data, (uint64_t)n * 4, 1, 0);
    free(data);
    return s == LORA_OK;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 5;
    if (reps < 1) reps = 1;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    struct sd_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.te_layers = 12; cfg.te_hidden = 768; cfg.te_heads = 12; cfg.te_intermediate = 3072;
    cfg.te_max_positions = 77; cfg.te_vocab = 49408; cfg.te_gelu = 0;
    const int64_t C = 768, I = 3072, T = 77;
    struct tensor_map tm;
    tmap_init(&tm, ctx);
    uint64_t st = 0x9e3779b97f4a7c15ull;
    int ok = add(&tm, &st, "text_model.embeddings.token_embedding.weight", 49408, C, 0.02f, 0) &&
             add(&tm, &st, "text_model.embeddings.position_embedding.weight", 77, C, 0.01f, 0) &&
             add(&tm, &st, "text_model.final_layer_norm.weight", C, 0, 0.1f, 1) &&
             add(&tm, &st, "text_model.final_layer_norm.bias", C, 0, 0.1f, 0);
    for (int l = 0; l < 12 && ok; l++) {
        char n[160];
        for (int k = 0; k < CLIP_N_SLOTS && ok; k++) {
            int64_t out = k == CLIP_FC1 ? I : C, in = k == CLIP_FC2 ? I : C;
            snprintf(n, sizeof n, "text_model.encoder.layers.%d.%s.weight", l, clip_slot_name(k));
            ok = add(&tm, &st, n, out, in, 0.03f, 0);
            snprintf(n, sizeof n, "text_model.encoder.layers.%d.%s.bias", l, clip_slot_name(k));
            ok = ok && add(&tm, &st, n, out, 0, 0.01f, 0);
        }
        for (int j = 1; j <= 2 && ok; j++) {
            snprintf(n, sizeof n, "text_model.encoder.layers.%d.layer_norm%d.weight", l, j);
            ok = add(&tm, &st, n, C, 0, 0.1f, 1);
            snprintf(n, sizeof n, "text_model.encoder.layers.%d.layer_norm%d.bias", l, j);
            ok = ok && add(&tm, &st, n, C, 0, 0.1f, 0);
        }
    }
    struct clip_model m;
    if (!ok || clip_init(&m, ctx->backend, &tm, &cfg) != LORA_OK) {
        fprintf(stderr, "bench_clip: setup failed: %s\n", lora_errmsg(ctx));
        return 1;
    }
    tmap_clear(&tm);
    printf("# CLIP-L text encoder: 12 layers, 768 wide, 12 heads, MLP 3072, quick_gelu, 77 tokens\n");
    printf("# threads(ctx): %d\n", ctx->n_threads);

    /* ids: BOS, 20 tokens, EOS, EOS padding (v1) */
    int32_t ids[4 * 77];
    for (int b = 0; b < 4; b++)
        for (int t = 0; t < T; t++)
            ids[b * T + t] = t == 0 ? 49406 : t <= 20 ? (int32_t)(1000 + 97 * (b * 31 + t) % 40000) : 49407;

    for (int batch = 1; batch <= 4; batch *= 4) {
        struct clip_plan p;
        if (clip_plan_init(&p, &m, batch, T, 0, 0) != LORA_OK) return 1;
        double t;
        TIME_MEDIAN(reps, clip_forward(&p, ids, NULL, 1), t);
        printf("clip_fwd_b%d %.2f\n", batch, t * 1e3);
        clip_plan_free(&p);
    }

    /* LoRA step: rank 8, alpha 1 (kohya defaults for network_alpha), up non-zero */
    {
        const int64_t R = 8, n_ad = 12 * CLIP_N_SLOTS;
        int64_t per = R * C + C * R, total = 0;
        for (int64_t a = 0; a < n_ad; a++) total += (a % CLIP_N_SLOTS == CLIP_FC1 || a % CLIP_N_SLOTS == CLIP_FC2) ? R * C + I * R : per;
        float *wts = malloc((size_t)total * sizeof(float)), *grads = calloc((size_t)total, sizeof(float));
        struct nn_lora *ad = calloc((size_t)n_ad, sizeof *ad);
        const struct nn_lora **ptr = calloc((size_t)n_ad, sizeof *ptr);
        float *dout = malloc((size_t)(T * C) * sizeof(float));
        for (int64_t i = 0; i < total; i++) wts[i] = 0.05f * urand(&st);
        for (int64_t i = 0; i < T * C; i++) dout[i] = urand(&st);
        int64_t off = 0;
        for (int64_t a = 0; a < n_ad; a++) {
            int k = (int)(a % CLIP_N_SLOTS);
            struct nn_lora *l = &ad[a];
            l->in = k == CLIP_FC2 ? I : C;
            l->out = k == CLIP_FC1 ? I : C;
            l->rank = R;
            l->scale = nn_lora_scale(1.0, R, 1.0);
            l->down = wts + off; l->d_down = grads + off; off += R * l->in;
            l->up = wts + off; l->d_up = grads + off; off += l->out * R;
            ptr[a] = l;
        }
        struct clip_plan p;
        if (clip_plan_init(&p, &m, 1, T, R, 1) != LORA_OK) return 1;
        double t;
        TIME_MEDIAN(reps, { clip_forward(&p, ids, ptr, 1); clip_backward(&p, dout, ptr); }, t);
        printf("clip_lora_step_b1 %.2f\n", t * 1e3);
        clip_plan_free(&p);
        free(wts); free(grads); free(ad); free(ptr); free(dout);
    }
    clip_free(&m);
    lora_ctx_free(ctx);
    return 0;
}
