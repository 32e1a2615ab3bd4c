#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "model/sd_model.h"
#include "model/clip.h"
#include "model/tokenizer.h"
#include "backend/backend.h"

void sd_model_init(struct sd_model *m, lora_ctx *ctx) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    tmap_init(&m->unet, ctx);
    tmap_init(&m->vae, ctx);
    tmap_init(&m->te, ctx);
    tmap_init(&m->extra, ctx);
}

void sd_release_borrowed(const struct sd_model *m, const void *data, uint64_t nbytes) {
    if (!m || !data || nbytes == 0) return;
    uintptr_t p = (uintptr_t)data;
    for (int32_t i = 0; i < m->n_mapped && i < 4; i++) {
        uintptr_t b = (uintptr_t)m->mapped[i].base;
        if (!b || p < b || p - b > m->mapped[i].size || nbytes > m->mapped[i].size - (p - b)) continue;
        long pg = sysconf(_SC_PAGESIZE);
        if (pg <= 0) return;
        uintptr_t lo = (p + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1), hi = (p + nbytes) & ~((uintptr_t)pg - 1);
        if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
        return;
    }
}

void sd_model_clear(struct sd_model *m) {
    lora_ctx *ctx = m->ctx;
    tmap_clear(&m->unet);
    tmap_clear(&m->vae);
    tmap_clear(&m->te);
    tmap_clear(&m->extra);
    memset(&m->cfg, 0, sizeof m->cfg);
    memset(m->mapped, 0, sizeof m->mapped);
    m->n_mapped = 0;
    m->ctx = ctx;
}

lora_status model_tokenizer_ready(struct lora_model *m) {
    if (!m->tokenizer)
        LORA_TRY(tok_create(m->ctx, m->sd.cfg.version == 2 ? LORA_TOKENIZER_SD2 : LORA_TOKENIZER_SD1, &m->tokenizer));
    return LORA_OK;
}

lora_status model_text_encoder_ready(struct lora_model *m, const char *who) {
    lora_ctx *ctx = m->ctx;
    const struct sd_config *cfg = &m->sd.cfg;
    if (cfg->te_heads <= 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: the text encoder's head count is unknown (LDM files do not "
                         "store it and SD's rule, width/64, does not fit width %d)", who, cfg->te_hidden);
    LORA_TRY(model_tokenizer_ready(m));
    if (!m->te_run) {
        struct clip_model *cm = lora_calloc(ctx, 1, sizeof *cm);
        if (!cm) return LORA_E_NOMEM;
        lora_status s = clip_init(cm, ctx->backend, &m->sd.te, cfg);
        if (s != LORA_OK) {
            lora_free(ctx, cm);
            return s;
        }
        m->te_run = cm;
    }
    return LORA_OK;
}
