/* kohya's --vae: a separate VAE (.safetensors or .ckpt with LDM names: "encoder.*",
 * "decoder.*", "quant_conv.*", "post_quant_conv.*", with or without "first_stage_model.")
 * replaces the model's for a generation. Its names go through the same LDM -> diffusers key map
 * as a whole checkpoint: the model's own LDM state dict with the VAE part swapped is read back
 * with sd_from_ldm, and its VAE half is what generate.c runs. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gen/gen.h"
#include "io/ckpt.h"
#include "io/keymap.h"
#include "io/st_map.h"
#include "model/sd_model.h"

static const char P_VAE[] = "first_stage_model.";

static int vae_key(const char *k) {
    return !strncmp(k, "encoder.", 8) || !strncmp(k, "decoder.", 8) || !strncmp(k, "quant_conv.", 11) ||
           !strncmp(k, "post_quant_conv.", 16);
}

static int is_zip(const char *path) {
    unsigned char m[4] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, m, 4);
    close(fd);
    return n == 4 && !memcmp(m, "PK\x03\x04", 4);
}

lora_status gen_vae_load(struct lora_model *model, const char *path, struct gen_vae *out) {
    lora_ctx *ctx = model->ctx;
    memset(out, 0, sizeof *out);
    out->ctx = ctx;
    out->file = lora_calloc(ctx, 1, sizeof *out->file);
    out->sd = lora_calloc(ctx, 1, sizeof *out->sd);
    if (!out->file || !out->sd) {
        gen_vae_free(out);
        return LORA_E_NOMEM;
    }
    tmap_init(out->file, ctx);
    sd_model_init(out->sd, ctx);
    lora_status s = is_zip(path) ? ckpt_read(ctx, path, out->file) : st_read_map(ctx, path, out->file, NULL);
    struct tensor_map ldm;
    tmap_init(&ldm, ctx);
    int64_t found = 0;
    if (s == LORA_OK) s = sd_to_ldm(&model->sd, &ldm);
    for (int64_t i = ldm.n - 1; s == LORA_OK && i >= 0; i--)
        if (!strncmp(ldm.t[i].name, P_VAE, sizeof P_VAE - 1)) tmap_remove(&ldm, i);
    for (int64_t i = 0; s == LORA_OK && i < out->file->n; i++) {
        const struct lora_tensor *t = &out->file->t[i];
        char name[512];
        if (!strncmp(t->name, P_VAE, sizeof P_VAE - 1) && vae_key(t->name + sizeof P_VAE - 1))
            snprintf(name, sizeof name, "%s", t->name);
        else if (vae_key(t->name))
            snprintf(name, sizeof name, "%s%s", P_VAE, t->name);
        else
            continue;   /* EMA copies, loss weights: not part of the decoder */
        if (tmap_find(&ldm, name) >= 0) continue;
        s = tmap_add(&ldm, name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0, 0);
        found++;
    }
    if (s == LORA_OK && found == 0)
        s = lora_fail(ctx, LORA_E_NOT_A_MODEL, "vae: %s has no tensor named encoder.*, decoder.*, quant_conv.* or "
                      "post_quant_conv.* (an LDM VAE)", path);
    if (s == LORA_OK) s = sd_from_ldm(ctx, &ldm, out->sd);
    tmap_clear(&ldm);
    const struct sd_config *a = &model->sd.cfg, *b = s == LORA_OK ? &out->sd->cfg : NULL;
    if (b && (a->vae_latent_channels != b->vae_latent_channels || a->vae_n_levels != b->vae_n_levels))
        s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "vae: %s has %d latent channels and %d levels, the model's VAE %d "
                      "and %d", path, b->vae_latent_channels, b->vae_n_levels, a->vae_latent_channels, a->vae_n_levels);
    if (s != LORA_OK) {
        if (strstr(ctx->errmsg, path) == NULL && ctx->err == s) {
            char msg[LORA_ERRMSG_CAP];
            snprintf(msg, sizeof msg, "%s", ctx->errmsg);
            lora_fail(ctx, s, "vae %s: %s", path, msg);
        }
        gen_vae_free(out);
        return s;
    }
    /* what the weights do not hold (GroupNorm groups: 32 in SD) comes from the model's VAE */
    if (out->sd->cfg.vae_norm_groups <= 0) out->sd->cfg.vae_norm_groups = model->sd.cfg.vae_norm_groups;
    out->vae = &out->sd->vae;
    out->cfg = &out->sd->cfg;
    return LORA_OK;
}

void gen_vae_free(struct gen_vae *v) {
    if (!v->ctx) return;
    if (v->sd) {
        sd_model_clear(v->sd);   /* first: it borrows from the file's tensors */
        lora_free(v->ctx, v->sd);
    }
    if (v->file) {
        tmap_clear(v->file);
        lora_free(v->ctx, v->file);
    }
    memset(v, 0, sizeof *v);
}
