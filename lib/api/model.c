/* lora_model: load/save SD checkpoints in any of the formats users bring. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/ckpt.h"
#include "io/diffusers.h"
#include "io/keymap.h"
#include "io/st_map.h"
#include "io/atomic_file.h"
#include "model/clip.h"
#include "model/sd_model.h"
#include "model/tokenizer.h"
#include "model/unet.h"
#include "model/vae.h"
#include "network/network.h"
#include "backend/backend.h"


static int model_valid(const lora_model *m) { return m && m->magic == LORA_MODEL_MAGIC; }

/* Drops every network built from the weights (fp32 text encoder, U-Net, VAE and their plans):
 * called when the weights change (merges, casts) and when the model is freed. */
void model_drop_runs(lora_model *m) {
    if (m->te_run) {
        clip_free(m->te_run);
        lora_free(m->ctx, m->te_run);
        m->te_run = NULL;
    }
    model_drop_image_runs(m);
}

/* The maps first: their borrowed tensors point into the mappings. */
static void model_release_files(lora_model *m) {
    model_drop_runs(m);
    tok_free(m->tokenizer);
    m->tokenizer = NULL;
    sd_model_clear(&m->sd);
    for (int i = 0; i < 3; i++) {
        st_close(m->backing[i]);
        m->backing[i] = NULL;
    }
    struct ckpt_mapping map = {m->ckpt_map, m->ckpt_map_size};
    ckpt_unmap(&map);
    m->ckpt_map = NULL;
}

/* Sniffs a file: zip (torch) or anything else (safetensors, which names what it finds). */
static lora_status sniff(lora_ctx *ctx, const char *path, lora_format *fmt) {
    struct stat sb;
    if (stat(path, &sb) != 0) return io_fail(ctx, errno, "open", path);
    if (S_ISDIR(sb.st_mode)) {
        if (diffusers_is_folder(path)) {
            *fmt = LORA_FORMAT_DIFFUSERS;
            return LORA_OK;
        }
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: a folder without model_index.json is not a diffusers model", path);
    }
    unsigned char magic[4] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return io_fail(ctx, errno, "open", path);
    ssize_t n = read(fd, magic, sizeof magic);
    close(fd);
    *fmt = (n == 4 && memcmp(magic, "PK\x03\x04", 4) == 0) ? LORA_FORMAT_CKPT : LORA_FORMAT_SAFETENSORS;
    /* legacy (pre-1.6) torch files start with a pickle: ckpt_read names that format */
    if (n >= 2 && magic[0] == 0x80 && magic[1] <= 5) *fmt = LORA_FORMAT_CKPT;
    return LORA_OK;
}

static lora_status load_into(lora_ctx *ctx, const char *path, const lora_params *opts, lora_model *m) {
    LORA_TRY(sniff(ctx, path, &m->format));
    LORA_TRY(lora_progress(ctx, LORA_PHASE_LOAD, 0, 2, NAN));
    if (m->format == LORA_FORMAT_DIFFUSERS) {
        LORA_TRY(diffusers_load(ctx, path, &m->sd, m->backing));
        char p[4200];
        struct stat sb;
        snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", path);
        if (stat(p, &sb) == 0) m->format = LORA_FORMAT_DIFFUSERS_SAFETENSORS;
    } else {
        struct tensor_map ldm;
        tmap_init(&ldm, ctx);
        struct ckpt_mapping map = {NULL, 0};
        lora_status s = m->format == LORA_FORMAT_CKPT ? ckpt_read_mapped(ctx, path, &ldm, &map)
                                                       : st_read_map(ctx, path, &ldm, &m->backing[0]);
        m->ckpt_map = map.base;
        m->ckpt_map_size = map.size;
        if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_LOAD, 1, 2, NAN);
        if (s == LORA_OK) s = sd_from_ldm(ctx, &ldm, &m->sd);
        tmap_clear(&ldm);
        if (s != LORA_OK) {
            /* name the file: the key map only knows key names */
            if (strstr(ctx->errmsg, path) == NULL && ctx->err == s) {
                char msg[LORA_ERRMSG_CAP];
                snprintf(msg, sizeof msg, "%s", ctx->errmsg);
                lora_fail(ctx, s, "%s: %s", path, msg);
            }
            return s;
        }
    }
    /* the mappings merges may release pages of (sd_release_borrowed) */
    m->sd.n_mapped = 0;
    for (int i = 0; i < 3; i++)
        if (m->backing[i] && m->backing[i]->mapped) {
            m->sd.mapped[m->sd.n_mapped].base = m->backing[i]->base;
            m->sd.mapped[m->sd.n_mapped++].size = m->backing[i]->size;
        }
    if (m->ckpt_map) {
        m->sd.mapped[m->sd.n_mapped].base = m->ckpt_map;
        m->sd.mapped[m->sd.n_mapped++].size = m->ckpt_map_size;
    }
    if (lora_params_int(opts, LORA_P_V2) && m->sd.cfg.version != 2)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE,
                         "%s: --v2 was given but the checkpoint is SD 1.x (its text encoder is CLIP ViT-L, width %d)",
                         path, m->sd.cfg.te_hidden);
    if (lora_params_int(opts, LORA_P_V_PARAMETERIZATION)) m->sd.cfg.v_prediction = 1;
    lora_log(ctx, LORA_LOG_INFO, "%s: SD %d.x, %s, %lld U-Net / %lld VAE / %lld text encoder tensors, %lld extra", path,
             m->sd.cfg.version, m->sd.cfg.v_prediction ? "v-prediction" : "epsilon", (long long)m->sd.unet.n,
             (long long)m->sd.vae.n, (long long)m->sd.te.n, (long long)m->sd.extra.n);
    return lora_progress(ctx, LORA_PHASE_LOAD, 2, 2, NAN);
}

LORA_API lora_status lora_model_load(lora_ctx *ctx, const char *path, const lora_params *opts, lora_model **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    lora_model *m = NULL;
    if (!path || !out) {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_model_load: path and out must not be NULL");
    } else if (!(m = lora_calloc(ctx, 1, sizeof *m))) {
        s = LORA_E_NOMEM;
    } else {
        m->magic = LORA_MODEL_MAGIC;
        m->ctx = ctx;
        sd_model_init(&m->sd, ctx);
        s = load_into(ctx, path, opts, m);
        if (s != LORA_OK) {
            model_release_files(m);
            lora_free(ctx, m);
            m = NULL;
        }
    }
    if (s == LORA_OK) {
        lora_ctx_retain(ctx);
        *out = m;
    }
    lora_leave(ctx);
    return s;
}

LORA_API void lora_model_free(lora_model *model) {
    if (!model_valid(model)) return;
    lora_ctx *ctx = model->ctx;
    attach_release(model);   /* lib/network/attach.c: originals back, attached networks released */
    model_release_files(model);
    model->magic = 0;
    lora_free(ctx, model);
    lora_ctx_release(ctx);
}

static int64_t map_params(const struct tensor_map *t) {
    int64_t n = 0;
    for (int64_t i = 0; i < t->n; i++) n += tmap_numel(&t->t[i]);
    return n;
}

LORA_API lora_status lora_model_get_int(const lora_model *model, lora_model_info key, int64_t *out) {
    if (!model_valid(model) || !out) return LORA_E_INVALID_ARG;
    const struct sd_model *sd = &model->sd;
    switch (key) {
    case LORA_MODEL_SD_VERSION: *out = sd->cfg.version; break;
    case LORA_MODEL_PREDICTION: *out = sd->cfg.v_prediction; break;
    case LORA_MODEL_CONTEXT_DIM: *out = sd->cfg.context_dim; break;
    case LORA_MODEL_UNET_PARAMS: *out = map_params(&sd->unet); break;
    case LORA_MODEL_TE_PARAMS: *out = map_params(&sd->te); break;
    case LORA_MODEL_VAE_PARAMS: *out = map_params(&sd->vae); break;
    case LORA_MODEL_TENSORS: *out = sd->unet.n + sd->vae.n + sd->te.n + sd->extra.n; break;
    case LORA_MODEL_DTYPE: {
        int64_t i = tmap_find(&sd->unet, "conv_in.weight");
        *out = i >= 0 ? sd->unet.t[i].dtype : (sd->unet.n ? sd->unet.t[0].dtype : LORA_DTYPE_F32);
        break;
    }
    case LORA_MODEL_FORMAT: *out = model->format; break;
    case LORA_MODEL_LINEAR_PROJECTION: *out = sd->cfg.use_linear_projection; break;
    case LORA_MODEL_UNET_CHANNELS: *out = sd->cfg.block_channels[0]; break;
    case LORA_MODEL_TE_LAYERS: *out = sd->cfg.te_layers; break;
    case LORA_MODEL_TE_HIDDEN: *out = sd->cfg.te_hidden; break;
    case LORA_MODEL_EXTRA_TENSORS: *out = sd->extra.n; break;
    default: return LORA_E_UNKNOWN_KEY;
    }
    return LORA_OK;
}

/* ---- save ----------------------------------------------------------------------------- */
static int is_float(lora_dtype t) {
    return t == LORA_DTYPE_F32 || t == LORA_DTYPE_F16 || t == LORA_DTYPE_BF16 || t == LORA_DTYPE_F64;
}

/* `out` gets every tensor of `in`: floating ones converted to `to` (owned copies) when `to`
 * is set and differs, the rest borrowed. */
static lora_status cast_map(lora_ctx *ctx, const struct tensor_map *in, lora_dtype to, struct tensor_map *out) {
    for (int64_t i = 0; i < in->n; i++) {
        const struct lora_tensor *t = &in->t[i];
        if (!to || !is_float(t->dtype) || t->dtype == to) {
            LORA_TRY(tmap_add(out, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0, 0));
            continue;
        }
        int64_t n = tmap_numel(t);
        uint64_t nbytes = (uint64_t)n * (uint64_t)(lora_dtype_bits(to) / 8);
        void *dst = lora_malloc(ctx, nbytes ? (size_t)nbytes : 1);
        if (!dst) return LORA_E_NOMEM;
        for (int64_t k = 0; k < n; k++) {
            float v;
            switch (t->dtype) {
            case LORA_DTYPE_F16: { uint16_t h; memcpy(&h, (const uint8_t *)t->data + 2 * k, 2); v = lora_f16_to_f32(h); break; }
            case LORA_DTYPE_BF16: { uint16_t h; memcpy(&h, (const uint8_t *)t->data + 2 * k, 2); v = lora_bf16_to_f32(h); break; }
            case LORA_DTYPE_F64: { double d; memcpy(&d, (const uint8_t *)t->data + 8 * k, 8); v = (float)d; break; }
            default: memcpy(&v, (const uint8_t *)t->data + 4 * k, 4); break;
            }
            if (to == LORA_DTYPE_F32) memcpy((uint8_t *)dst + 4 * k, &v, 4);
            else {
                uint16_t h = to == LORA_DTYPE_F16 ? lora_f32_to_f16(v) : lora_f32_to_bf16(v);
                memcpy((uint8_t *)dst + 2 * k, &h, 2);
            }
        }
        lora_status s = tmap_add(out, t->name, to, t->ndim, t->shape, dst, nbytes, 0, 1);
        if (s != LORA_OK) {
            lora_free(ctx, dst);
            return s;
        }
    }
    return LORA_OK;
}

static lora_status save_model(const lora_model *model, const char *path, const lora_params *opts) {
    lora_ctx *ctx = model->ctx;
    const char *as = lora_params_str(opts, LORA_P_SAVE_MODEL_AS);
    const char *prec = lora_params_str(opts, LORA_P_SAVE_PRECISION);
    lora_dtype to = strcmp(prec, "float") == 0 ? LORA_DTYPE_F32 : strcmp(prec, "fp16") == 0 ? LORA_DTYPE_F16
                  : strcmp(prec, "bf16") == 0 ? LORA_DTYPE_BF16 : 0;
    lora_status s = lora_progress(ctx, LORA_PHASE_SAVE, 0, 1, NAN);
    if (s != LORA_OK) return s;
    /* networks attached at run time as low-rank branches: the file holds their merge, as it
     * holds the float32 sums of the weights they replace (lib/network/attach.c) */
    struct sd_model merged;
    const struct sd_model *src = &model->sd;
    sd_model_init(&merged, ctx);
    if (attach_has_lowrank(model, 0) || attach_has_lowrank(model, 1)) {
        merged.cfg = model->sd.cfg;
        s = attach_merged_map(model, 0, &merged.unet);
        if (s == LORA_OK) s = attach_merged_map(model, 1, &merged.te);
        if (s == LORA_OK) s = cast_map(ctx, &model->sd.vae, 0, &merged.vae);
        if (s == LORA_OK) s = cast_map(ctx, &model->sd.extra, 0, &merged.extra);
        src = &merged;
    }
    if (s == LORA_OK && strncmp(as, "diffusers", 9) == 0) {
        struct sd_model view;
        sd_model_init(&view, ctx);
        view.cfg = model->sd.cfg;
        s = cast_map(ctx, &src->unet, to, &view.unet);
        if (s == LORA_OK) s = cast_map(ctx, &src->vae, to, &view.vae);
        if (s == LORA_OK) s = cast_map(ctx, &src->te, to, &view.te);
        if (s == LORA_OK) s = diffusers_save(ctx, path, &view, strcmp(as, "diffusers_safetensors") == 0);
        if (s == LORA_OK && model->sd.extra.n)
            lora_log(ctx, LORA_LOG_WARN, "%s: %lld tensors without a diffusers name (EMA, buffers) are not part of a "
                     "diffusers folder; save as safetensors or ckpt to keep them", path, (long long)model->sd.extra.n);
        sd_model_clear(&view);
    } else if (s == LORA_OK) {
        struct tensor_map ldm, cast;
        tmap_init(&ldm, ctx);
        tmap_init(&cast, ctx);
        s = sd_to_ldm(src, &ldm);
        if (s == LORA_OK) s = cast_map(ctx, &ldm, to, &cast);
        if (s == LORA_OK) {
            if (strcmp(as, "ckpt") == 0 || strcmp(as, "pt") == 0) s = ckpt_write(ctx, path, &cast, 1);
            else s = st_write_map(ctx, path, &cast, NULL, NULL, 0);
        }
        tmap_clear(&cast);
        tmap_clear(&ldm);
    }
    sd_model_clear(&merged);
    if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_SAVE, 1, 1, NAN);
    return s;
}

LORA_API lora_status lora_model_save(const lora_model *model, const char *path, const lora_params *opts) {
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = path ? save_model(model, path, opts)
                         : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_model_save: path is NULL");
    lora_leave(ctx);
    return s;
}

/* ---- prompt encoding ------------------------------------------------------------------- */
static lora_status encode_prompt(lora_model *model, const char *prompt, const lora_params *opts, float *out,
                                 uint64_t cap, int64_t *tokens, int64_t *width) {
    lora_ctx *ctx = model->ctx;
    const struct sd_config *cfg = &model->sd.cfg;
    int64_t max_len = lora_params_int(opts, LORA_P_MAX_TOKEN_LENGTH);
    int32_t clip_skip = (int32_t)lora_params_int(opts, LORA_P_CLIP_SKIP);
    int64_t n_chunks = max_len / 75, T = n_chunks * 75 + 2, C = cfg->te_hidden;
    if (tokens) *tokens = T;
    if (width) *width = C;
    if (!out && cap == 0) return LORA_OK;   /* size query */
    if (!out || cap < (uint64_t)(T * C))
        return lora_fail(ctx, LORA_E_LIMIT, "encode_prompt: the output needs %lld x %lld floats, the buffer holds %llu",
                         (long long)T, (long long)C, (unsigned long long)cap);
    if (clip_skip > cfg->te_layers)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "clip_skip: %d is more than the text encoder's %d layers", clip_skip,
                         cfg->te_layers);
    LORA_TRY(model_text_encoder_ready(model, "encode_prompt"));
    int64_t n_ids = n_chunks * 77;
    int32_t *ids = lora_malloc(ctx, (size_t)n_ids * sizeof *ids);
    float *enc = lora_malloc(ctx, (size_t)(n_ids * C) * sizeof *enc);
    struct clip_plan plan;
    memset(&plan, 0, sizeof plan);
    int planned = 0;
    size_t got = 0;
    lora_status s = (ids && enc) ? LORA_OK : LORA_E_NOMEM;
    /* runtime-attached networks' low-rank branches (lib/network/attach.c) */
    const struct nn_lora **te_lora = NULL;
    int64_t te_rank = 0;
    if (s == LORA_OK && attach_has_lowrank(model, 1)) {
        te_lora = lora_malloc(ctx, (size_t)(model->te_run->layers * CLIP_N_SLOTS) * sizeof *te_lora);
        s = te_lora ? attach_te_adapters(model, model->te_run->layers, te_lora, &te_rank) : LORA_E_NOMEM;
    }
    if (s == LORA_OK) s = tok_encode(model->tokenizer, prompt, strlen(prompt), (int32_t)max_len, ids, (size_t)n_ids, &got);
    if (s == LORA_OK && (int64_t)got != n_ids)
        s = lora_fail(ctx, LORA_E_INTERNAL, "encode_prompt: the tokenizer gave %zu ids, %lld expected", got, (long long)n_ids);
    /* kohya encodes each 77-token chunk as its own sequence, then re-joins them (spec 4.5) */
    if (s == LORA_OK) s = clip_plan_init(&plan, model->te_run, n_chunks, 77, te_rank, 0);
    planned = s == LORA_OK;
    if (s == LORA_OK) s = clip_forward(&plan, ids, te_lora, clip_skip);
    if (s == LORA_OK) s = clip_download_output(&plan, enc, NULL);
    if (s == LORA_OK) clip_rejoin_chunks(out, enc, 1, n_chunks, 77, C);
    if (planned) clip_plan_free(&plan);
    lora_free(ctx, (void *)te_lora);
    lora_free(ctx, ids);
    lora_free(ctx, enc);
    return s;
}

LORA_API lora_status lora_model_encode_prompt(lora_model *model, const char *prompt, const lora_params *opts,
                                              float *out, uint64_t cap, int64_t *tokens, int64_t *width) {
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = prompt ? encode_prompt(model, prompt, opts, out, cap, tokens, width)
                           : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_model_encode_prompt: prompt is NULL");
    lora_leave(ctx);
    return s;
}

/* ---- U-Net and VAE for hosts ----------------------------------------------------------- */

/* The fp32 U-Net and, for the last (batch, h, w, tokens), its plan and the backend copies of
 * the inputs and the output. */
struct model_unet_run {
    struct unet_model m;
    struct unet_plan p;
    int planned;
    void *io;                   /* backend: sample, context, out */
    float *x, *c, *o;
    struct unet_adapters *ad;   /* runtime-attached networks' low-rank branches, or NULL */
    int64_t rank;               /* their largest rank: the plan's max_rank */
};
struct model_vae_run {
    struct vae_model m;
    struct vae_plan p;
    int planned;
    void *io;                   /* backend: image, mean, logvar (the latent for decode) */
    float *img, *mean, *logvar;
};

static void unet_run_unplan(struct model_unet_run *r) {
    if (r->planned) unet_plan_free(&r->p);
    if (r->io) r->m.be->iface->buf_free(r->m.be, r->io);
    r->planned = 0;
    r->io = NULL;
}

static void vae_run_unplan(struct model_vae_run *r) {
    if (r->planned) vae_plan_free(&r->p);
    if (r->io) r->m.be->iface->buf_free(r->m.be, r->io);
    r->planned = 0;
    r->io = NULL;
}

void model_drop_image_runs(lora_model *m) {
    if (m->unet_run) {
        unet_run_unplan(m->unet_run);
        unet_free(&m->unet_run->m);
        lora_free(m->ctx, m->unet_run->ad);
        lora_free(m->ctx, m->unet_run);
        m->unet_run = NULL;
    }
    if (m->vae_run) {
        vae_run_unplan(m->vae_run);
        vae_free(&m->vae_run->m);
        lora_free(m->ctx, m->vae_run);
        m->vae_run = NULL;
    }
}

static lora_status check_finite(lora_ctx *ctx, const char *what, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return lora_fail(ctx, LORA_E_NONFINITE_INPUT, "%s: element %lld is not finite (%g)", what, (long long)i,
                             (double)v[i]);
    return LORA_OK;
}

static int64_t align16(int64_t n) { return (n + 15) & ~(int64_t)15; }

static lora_status unet_predict(lora_model *model, const float *latent, int64_t B, int64_t H, int64_t W,
                                const float *timesteps, const float *context, int64_t T, float *out, uint64_t cap) {
    lora_ctx *ctx = model->ctx;
    const struct sd_config *cfg = &model->sd.cfg;
    if (!latent || !timesteps || !context || !out)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "unet_predict: latent, timesteps, context and out must not be NULL");
    /* any latent size: the U-Net's levels round odd sizes up (diffusers' Downsample2D) */
    if (B < 1 || B > (1 << 16) || H < 1 || W < 1 || H > (1 << 14) || W > (1 << 14) || T < 1 || T > (1 << 16))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE,
                         "unet_predict: batch %lld, latent %lldx%lld, %lld context tokens: the batch and token count "
                         "must be positive and the latent sides in 1..16384",
                         (long long)B, (long long)H, (long long)W, (long long)T);
    int64_t n_in = B * cfg->unet_in_channels * H * W, n_out = B * cfg->unet_out_channels * H * W;
    int64_t n_ctx = B * T * cfg->context_dim;
    if (cap < (uint64_t)n_out)
        return lora_fail(ctx, LORA_E_LIMIT, "unet_predict: the output needs %lld floats, the buffer holds %llu",
                         (long long)n_out, (unsigned long long)cap);
    LORA_TRY(check_finite(ctx, "unet_predict: latent", latent, n_in));
    LORA_TRY(check_finite(ctx, "unet_predict: timesteps", timesteps, B));
    LORA_TRY(check_finite(ctx, "unet_predict: context", context, n_ctx));
    struct lora_backend_impl *be = ctx->backend;
    if (!model->unet_run) {
        struct model_unet_run *r = lora_calloc(ctx, 1, sizeof *r);
        if (!r) return LORA_E_NOMEM;
        /* borrows 16-bit matrices from the loaded checkpoint: runs are dropped whenever the
         * weights change (model_drop_image_runs) */
        lora_status s = unet_init_ex(&r->m, be, &model->sd.unet, cfg, UNET_BORROW_16BIT);
        if (s != LORA_OK) {
            lora_free(ctx, r);
            return s;
        }
        /* attached networks (lib/network/attach.c): their branches; attachment changes drop the run */
        if (attach_has_lowrank(model, 0)) {
            r->ad = lora_malloc(ctx, sizeof *r->ad);
            s = r->ad ? attach_unet_adapters(model, &r->m, r->ad, &r->rank) : LORA_E_NOMEM;
            if (s != LORA_OK) {
                unet_free(&r->m);
                lora_free(ctx, r->ad);
                lora_free(ctx, r);
                return s;
            }
        }
        model->unet_run = r;
    }
    struct model_unet_run *r = model->unet_run;
    if (!r->planned || r->p.batch != B || r->p.h != H || r->p.w != W || r->p.tokens != T) {
        unet_run_unplan(r);
        LORA_TRY(unet_plan_init_ex(&r->p, &r->m, B, H, W, T, UNET_FORWARD, r->rank));
        r->planned = 1;
        lora_status sa = unet_set_adapters(&r->p, r->ad);
        if (sa != LORA_OK) {
            unet_run_unplan(r);
            return sa;
        }
        int64_t a = align16(n_in), b = align16(n_ctx);
        lora_status s = be->iface->buf_alloc(be, (size_t)(a + b + n_out) * 4, &r->io);
        if (s != LORA_OK) {
            r->io = NULL;
            unet_run_unplan(r);
            return s;
        }
        r->x = r->io;
        r->c = r->x + a;
        r->o = r->c + b;
    }
    LORA_TRY(be->iface->upload(be, r->x, latent, (size_t)n_in * 4));
    LORA_TRY(be->iface->upload(be, r->c, context, (size_t)n_ctx * 4));
    LORA_TRY(unet_forward(&r->p, r->x, timesteps, r->c, r->o));
    return be->iface->download(be, out, r->o, (size_t)n_out * 4);
}

LORA_API lora_status lora_model_unet_predict(lora_model *model, const float *latent, int64_t batch, int64_t height,
                                             int64_t width, const float *timesteps, const float *context,
                                             int64_t context_tokens, float *out, uint64_t out_cap) {
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = unet_predict(model, latent, batch, height, width, timesteps, context, context_tokens, out, out_cap);
    lora_leave(ctx);
    return s;
}

/* The VAE run with a plan for images of n x h x w (h, w image pixels). */
static lora_status vae_ready(lora_model *model, int64_t n, int64_t h, int64_t w, const char *what) {
    lora_ctx *ctx = model->ctx;
    const struct sd_config *cfg = &model->sd.cfg;
    struct lora_backend_impl *be = ctx->backend;
    if (!model->vae_run) {
        struct model_vae_run *r = lora_calloc(ctx, 1, sizeof *r);
        if (!r) return LORA_E_NOMEM;
        lora_status s = vae_init(&r->m, be, &model->sd.vae, cfg);
        if (s != LORA_OK) {
            lora_free(ctx, r);
            return s;
        }
        model->vae_run = r;
    }
    struct model_vae_run *r = model->vae_run;
    if (r->planned && r->p.batch == n && r->p.h == h && r->p.w == w) return LORA_OK;
    vae_run_unplan(r);
    (void)what;
    LORA_TRY(vae_plan_init(&r->p, &r->m, n, h, w));
    r->planned = 1;
    int64_t f = (int64_t)1 << (r->m.levels - 1);
    int64_t ni = align16(n * 3 * h * w), nl = align16(n * r->m.latent * (h / f) * (w / f));
    if (r->m.in_ch > 3) ni = align16(n * r->m.in_ch * h * w);
    lora_status s = be->iface->buf_alloc(be, (size_t)(ni + 2 * nl) * 4, &r->io);
    if (s != LORA_OK) {
        r->io = NULL;
        vae_run_unplan(r);
        return s;
    }
    r->img = r->io;
    r->mean = r->img + ni;
    r->logvar = r->mean + nl;
    return LORA_OK;
}

static lora_status vae_sizes(lora_model *model, const char *what, int64_t n, int64_t h, int64_t w, int64_t mult) {
    if (n < 1 || n > (1 << 16) || h < 1 || w < 1 || h > (1 << 16) || w > (1 << 16) || h % mult || w % mult)
        return lora_fail(model->ctx, LORA_E_CONFIG_RANGE,
                         "%s: %lld x %lldx%lld: the count must be positive and the sides positive multiples of %lld",
                         what, (long long)n, (long long)h, (long long)w, (long long)mult);
    return LORA_OK;
}

static int64_t vae_factor(const lora_model *model) {
    int32_t lv = model->sd.cfg.vae_n_levels;
    return (int64_t)1 << (lv > 0 ? lv - 1 : 0);
}

static lora_status vae_encode_host(lora_model *model, const float *image, int64_t n, int64_t h, int64_t w,
                                   float *mean_out, float *logvar_out, uint64_t cap) {
    lora_ctx *ctx = model->ctx;
    if (!image || !mean_out)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "vae_encode: image and mean_out must not be NULL");
    int64_t f = vae_factor(model), lat = model->sd.cfg.vae_latent_channels;
    LORA_TRY(vae_sizes(model, "vae_encode", n, h, w, f));
    int64_t n_img = n * 3 * h * w, n_lat = n * lat * (h / f) * (w / f);
    if (cap < (uint64_t)n_lat)
        return lora_fail(ctx, LORA_E_LIMIT, "vae_encode: the latent needs %lld floats, the buffers hold %llu",
                         (long long)n_lat, (unsigned long long)cap);
    LORA_TRY(check_finite(ctx, "vae_encode: image", image, n_img));
    if (h / f > VAE_TILE_LATENT || w / f > VAE_TILE_LATENT) {
        /* large images: overlapping tiles of VAE_TILE_LATENT latents, plan sized for one */
        int64_t th = h / f < VAE_TILE_LATENT ? h : VAE_TILE_LATENT * f, tw = w / f < VAE_TILE_LATENT ? w : VAE_TILE_LATENT * f;
        LORA_TRY(vae_ready(model, n, th, tw, "vae_encode"));
        struct model_vae_run *r = model->vae_run;
        return vae_encode_tiled(&r->p, image, h, w, VAE_TILE_OVERLAP, r->img, r->mean, mean_out, logvar_out);
    }
    LORA_TRY(vae_ready(model, n, h, w, "vae_encode"));
    struct model_vae_run *r = model->vae_run;
    struct lora_backend_impl *be = ctx->backend;
    LORA_TRY(be->iface->upload(be, r->img, image, (size_t)n_img * 4));
    LORA_TRY(vae_encode(&r->p, r->img, r->mean, r->logvar));
    LORA_TRY(be->iface->download(be, mean_out, r->mean, (size_t)n_lat * 4));
    if (logvar_out) LORA_TRY(be->iface->download(be, logvar_out, r->logvar, (size_t)n_lat * 4));
    return LORA_OK;
}

LORA_API lora_status lora_model_vae_encode(lora_model *model, const float *image, int64_t n, int64_t height,
                                           int64_t width, float *mean_out, float *logvar_out, uint64_t cap) {
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = vae_encode_host(model, image, n, height, width, mean_out, logvar_out, cap);
    lora_leave(ctx);
    return s;
}

static lora_status vae_decode_host(lora_model *model, const float *latent, int64_t n, int64_t h, int64_t w,
                                   float *image_out, uint64_t cap) {
    lora_ctx *ctx = model->ctx;
    if (!latent || !image_out)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "vae_decode: latent and image_out must not be NULL");
    int64_t f = vae_factor(model), lat = model->sd.cfg.vae_latent_channels;
    LORA_TRY(vae_sizes(model, "vae_decode", n, h, w, 1));
    if (h > (1 << 16) / f || w > (1 << 16) / f)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "vae_decode: a %lldx%lld latent is too large", (long long)h,
                         (long long)w);
    int64_t n_img = n * 3 * (h * f) * (w * f), n_lat = n * lat * h * w;
    if (cap < (uint64_t)n_img)
        return lora_fail(ctx, LORA_E_LIMIT, "vae_decode: the image needs %lld floats, the buffer holds %llu",
                         (long long)n_img, (unsigned long long)cap);
    LORA_TRY(check_finite(ctx, "vae_decode: latent", latent, n_lat));
    if (h > VAE_TILE_LATENT || w > VAE_TILE_LATENT) {
        int64_t th = h < VAE_TILE_LATENT ? h : VAE_TILE_LATENT, tw = w < VAE_TILE_LATENT ? w : VAE_TILE_LATENT;
        LORA_TRY(vae_ready(model, n, th * f, tw * f, "vae_decode"));
        struct model_vae_run *r = model->vae_run;
        return vae_decode_tiled(&r->p, latent, h, w, VAE_TILE_OVERLAP, r->mean, r->img, image_out);
    }
    LORA_TRY(vae_ready(model, n, h * f, w * f, "vae_decode"));
    struct model_vae_run *r = model->vae_run;
    struct lora_backend_impl *be = ctx->backend;
    LORA_TRY(be->iface->upload(be, r->mean, latent, (size_t)n_lat * 4));
    LORA_TRY(vae_decode(&r->p, r->mean, r->img));
    return be->iface->download(be, image_out, r->img, (size_t)n_img * 4);
}

LORA_API lora_status lora_model_vae_decode(lora_model *model, const float *latent, int64_t n, int64_t height,
                                           int64_t width, float *image_out, uint64_t cap) {
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = vae_decode_host(model, latent, n, height, width, image_out, cap);
    lora_leave(ctx);
    return s;
}
