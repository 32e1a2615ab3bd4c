#include <string.h>

#include "model/sd_model.h"

void sd_model_init(struct sd_model *m, lora_ctx *ctx) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    tmap_init(&m->unet, ctx);
    tmap_init(&m->vae, ctx);
    tmap_init(&m->te, ctx);
    tmap_init(&m->extra, ctx);
}

void sd_model_clear(struct sd_model *m) {
    lora_ctx *ctx = m->ctx;
    tmap_clear(&m->unet);
    tmap_clear(&m->vae);
    tmap_clear(&m->te);
    tmap_clear(&m->extra);
    memset(&m->cfg, 0, sizeof m->cfg);
    m->ctx = ctx;
}
