/* kohya module names -> CLIP slots and U-Net transformer targets (spec/kohya-lora.md §1.2,
 * §2.2, §2.3). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/train.h"

/* a == b with '.' in b read as '_' */
static int eq_us(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char c = b[i] == '.' ? '_' : b[i];
        if (a[i] != c) return 0;
    }
    return 1;
}

static int eq_us_full(const char *a, const char *b) {
    size_t n = strlen(b);
    return strlen(a) == n && eq_us(a, b, n);
}

static lora_status map_te(const struct clip_model *clip, const struct net_module *mm,
                          lora_ctx *ctx, int32_t *where) {
    static const char pre[] = "lora_te_text_model_encoder_layers_";
    const char *p = mm->name + sizeof pre - 1;
    if (!clip) return lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: no text encoder", mm->name);
    char *endp = NULL;
    long layer = strtol(p, &endp, 10);
    if (endp == p || *endp != '_' || layer < 0 || layer >= clip->layers)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: no such text encoder layer", mm->name);
    for (int k = 0; k < CLIP_N_SLOTS; k++) {
        if (!eq_us_full(endp + 1, clip_slot_name(k))) continue;
        int64_t in = k == CLIP_FC2 ? clip->inter : clip->hidden;
        int64_t out = k == CLIP_FC1 ? clip->inter : clip->hidden;
        if (mm->nn.in != in || mm->nn.out != out)
            return lora_fail(ctx, LORA_E_INVALID_ARG,
                             "training: %s: LoRA is %lld -> %lld, the layer %lld -> %lld", mm->name,
                             (long long)mm->nn.in, (long long)mm->nn.out, (long long)in, (long long)out);
        *where = (int32_t)(layer * CLIP_N_SLOTS + k);
        return LORA_OK;
    }
    return lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: not a text encoder LoRA target", mm->name);
}

static lora_status map_unet(const struct unet_model *u, const struct net_module *mm,
                            lora_ctx *ctx, int32_t *where) {
    const char *p = mm->name + strlen("lora_unet_");
    if (!u) return lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: no U-Net", mm->name);
    for (int64_t x = 0; x < u->n_xf; x++) {
        const struct unet_xf *xf = u->xf[x];
        size_t n = strlen(xf->name);
        if (strlen(p) <= n || !eq_us(p, xf->name, n) || p[n] != '_') continue;
        const char *rest = p + n + 1;
        for (int t = 0; t < UNET_T_N; t++) {
            int ok;
            if (t == UNET_T_PROJ_IN || t == UNET_T_PROJ_OUT) ok = eq_us_full(rest, unet_target_names[t]);
            else {
                static const char tb[] = "transformer_blocks_0_";
                ok = strncmp(rest, tb, sizeof tb - 1) == 0 && eq_us_full(rest + sizeof tb - 1, unet_target_names[t]);
            }
            if (!ok) continue;
            int64_t in = xf->c, out = xf->c;
            if (t == UNET_T_K2 || t == UNET_T_V2) in = u->ctx_dim;
            if (t == UNET_T_FF0) out = 8 * xf->c;
            if (t == UNET_T_FF2) in = 4 * xf->c;
            if (mm->nn.in != in || mm->nn.out != out)
                return lora_fail(ctx, LORA_E_INVALID_ARG,
                                 "training: %s: LoRA is %lld -> %lld, the layer %lld -> %lld", mm->name,
                                 (long long)mm->nn.in, (long long)mm->nn.out, (long long)in,
                                 (long long)out);
            *where = (int32_t)(x * UNET_T_N + t);
            return LORA_OK;
        }
        break;
    }
    return lora_fail(ctx, LORA_E_UNSUPPORTED,
                     "training: %s: not a U-Net transformer LoRA target (conv LoRA cannot be trained yet)",
                     mm->name);
}

lora_status train_map_init(struct train_map *mp, lora_ctx *ctx, const struct lora_network *net,
                           const struct clip_model *clip, const struct unet_model *unet) {
    memset(mp, 0, sizeof *mp);
    if (!net) return lora_fail(ctx, LORA_E_INVALID_ARG, "training: no network");
    mp->n = net->n;
    int64_t nte = clip ? clip->layers * CLIP_N_SLOTS : 0;
    mp->lora = lora_calloc(ctx, (size_t)(net->n ? net->n : 1), sizeof *mp->lora);
    mp->where = lora_calloc(ctx, (size_t)(net->n ? net->n : 1), sizeof *mp->where);
    mp->te = lora_calloc(ctx, (size_t)(nte ? nte : 1), sizeof *mp->te);
    mp->ad = lora_calloc(ctx, 1, sizeof *mp->ad);
    if (!mp->lora || !mp->where || !mp->te || !mp->ad) {
        train_map_free(mp, ctx);
        return LORA_E_NOMEM;
    }
    for (int64_t i = 0; i < net->n; i++) {
        const struct net_module *mm = &net->m[i];
        lora_status s;
        int te = strncmp(mm->name, "lora_te_", 8) == 0;
        if (mm->kind == NET_CONVKXK)
            s = lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: conv LoRA cannot be trained yet", mm->name);
        else if (strncmp(mm->name, "lora_te_", 8) == 0) s = map_te(clip, mm, ctx, &mp->where[i]);
        else if (strncmp(mm->name, "lora_unet_", 10) == 0) s = map_unet(unet, mm, ctx, &mp->where[i]);
        else s = lora_fail(ctx, LORA_E_UNSUPPORTED, "training: %s: unknown module", mm->name);
        if (s != LORA_OK) {
            train_map_free(mp, ctx);
            return s;
        }
        int32_t w = mp->where[i];
        int dup = te ? mp->te[w] != NULL : mp->ad->lora[w / UNET_T_N][w % UNET_T_N] != NULL;
        if (dup) {
            train_map_free(mp, ctx);
            return lora_fail(ctx, LORA_E_INVALID_ARG, "training: %s: a second module on the same layer", mm->name);
        }
        mp->lora[i] = mm->nn;
        mp->lora[i].d_down = mp->lora[i].d_up = NULL;
        if (te) mp->te[w] = &mp->lora[i];
        else mp->ad->lora[w / UNET_T_N][w % UNET_T_N] = &mp->lora[i];
        if (mm->rank > mp->max_rank) mp->max_rank = mm->rank;
    }
    return LORA_OK;
}

void train_map_free(struct train_map *mp, lora_ctx *ctx) {
    lora_free(ctx, mp->lora);
    lora_free(ctx, mp->where);
    lora_free(ctx, (void *)mp->te);
    lora_free(ctx, mp->ad);
    memset(mp, 0, sizeof *mp);
}
