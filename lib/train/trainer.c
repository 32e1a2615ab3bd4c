/* kohya-ss train_network.py's training loop (spec/kohya-lora.md §1.7-1.8, §4.4, §5.5, §9):
 * see trainer.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/dtype.h"
#include "io/tensor_map.h"
#include "network/network.h"
#include "train/trainer.h"

#define LATENT_SCALE 0.18215f

/* Pixels per latent pixel: 2^(VAE levels - 1), 8 in SD. */
static int64_t vae_factor(const struct lora_trainer *tr) {
    int32_t lv = tr->model->sd.cfg.vae_n_levels;
    return (int64_t)1 << (lv > 0 ? lv - 1 : 0);
}

static void copy_str(char *dst, size_t cap, const char *src) {
    snprintf(dst, cap, "%s", src ? src : "");
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double mono_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- options ---- */

static lora_status parse_resolution(lora_ctx *ctx, const char *r, int32_t *w, int32_t *h) {
    char *end = NULL;
    long a = strtol(r, &end, 10), b = a;
    if (end && *end == ',') b = strtol(end + 1, &end, 10);
    if (!end || *end || a < 64 || b < 64 || a > 8192 || b > 8192 || a % 8 || b % 8)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "resolution: '%s' is not \"W\" or \"W,H\" with sides 64..8192, multiples of 8", r);
    *w = (int32_t)a;
    *h = (int32_t)b;
    return LORA_OK;
}

static void cfg_read(const lora_params *p, struct trainer_cfg *c) {
    memset(c, 0, sizeof *c);
    copy_str(c->model_path, sizeof c->model_path, lora_params_str(p, LORA_P_PRETRAINED_MODEL_NAME_OR_PATH));
    copy_str(c->train_data_dir, sizeof c->train_data_dir, lora_params_str(p, LORA_P_TRAIN_DATA_DIR));
    copy_str(c->reg_data_dir, sizeof c->reg_data_dir, lora_params_str(p, LORA_P_REG_DATA_DIR));
    copy_str(c->output_dir, sizeof c->output_dir, lora_params_str(p, LORA_P_OUTPUT_DIR));
    copy_str(c->output_name, sizeof c->output_name, lora_params_str(p, LORA_P_OUTPUT_NAME));
    copy_str(c->network_weights, sizeof c->network_weights, lora_params_str(p, LORA_P_NETWORK_WEIGHTS));
    copy_str(c->training_comment, sizeof c->training_comment, lora_params_str(p, LORA_P_TRAINING_COMMENT));
    copy_str(c->optimizer_type, sizeof c->optimizer_type, lora_params_str(p, LORA_P_OPTIMIZER_TYPE));
    copy_str(c->optimizer_args, sizeof c->optimizer_args, lora_params_str(p, LORA_P_OPTIMIZER_ARGS));
    copy_str(c->lr_scheduler, sizeof c->lr_scheduler, lora_params_str(p, LORA_P_LR_SCHEDULER));
    copy_str(c->mixed_precision, sizeof c->mixed_precision, lora_params_str(p, LORA_P_MIXED_PRECISION));
    copy_str(c->save_model_as, sizeof c->save_model_as, lora_params_str(p, LORA_P_SAVE_MODEL_AS));
    copy_str(c->save_precision, sizeof c->save_precision, lora_params_str(p, LORA_P_SAVE_PRECISION));
    copy_str(c->caption_extension, sizeof c->caption_extension, lora_params_str(p, LORA_P_CAPTION_EXTENSION));
    copy_str(c->resolution, sizeof c->resolution, lora_params_str(p, LORA_P_RESOLUTION));
    c->learning_rate = lora_params_float(p, LORA_P_LEARNING_RATE);
    c->unet_lr = lora_params_float(p, LORA_P_UNET_LR);
    c->text_encoder_lr = lora_params_float(p, LORA_P_TEXT_ENCODER_LR);
    c->max_grad_norm = lora_params_float(p, LORA_P_MAX_GRAD_NORM);
    c->noise_offset = lora_params_float(p, LORA_P_NOISE_OFFSET);
    c->min_snr_gamma = lora_params_float(p, LORA_P_MIN_SNR_GAMMA);
    c->prior_loss_weight = lora_params_float(p, LORA_P_PRIOR_LOSS_WEIGHT);
    c->caption_dropout_rate = lora_params_float(p, LORA_P_CAPTION_DROPOUT_RATE);
    c->caption_tag_dropout_rate = lora_params_float(p, LORA_P_CAPTION_TAG_DROPOUT_RATE);
    c->lr_power = lora_params_float(p, LORA_P_LR_SCHEDULER_POWER);
    c->network_alpha = lora_params_float(p, LORA_P_NETWORK_ALPHA);
    c->max_train_steps = lora_params_int(p, LORA_P_MAX_TRAIN_STEPS);
    c->max_train_epochs = lora_params_int(p, LORA_P_MAX_TRAIN_EPOCHS);
    c->seed = lora_params_int(p, LORA_P_SEED);
    c->batch_size = lora_params_int(p, LORA_P_TRAIN_BATCH_SIZE);
    c->grad_accum = lora_params_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS);
    c->warmup = lora_params_int(p, LORA_P_LR_WARMUP_STEPS);
    c->num_cycles = lora_params_int(p, LORA_P_LR_SCHEDULER_NUM_CYCLES);
    c->clip_skip = lora_params_int(p, LORA_P_CLIP_SKIP);
    c->max_token_length = lora_params_int(p, LORA_P_MAX_TOKEN_LENGTH);
    c->network_dim = lora_params_int(p, LORA_P_NETWORK_DIM);
    c->save_every_n_epochs = lora_params_int(p, LORA_P_SAVE_EVERY_N_EPOCHS);
    c->save_last_n_epochs = lora_params_int(p, LORA_P_SAVE_LAST_N_EPOCHS);
    c->save_n_epoch_ratio = lora_params_int(p, LORA_P_SAVE_N_EPOCH_RATIO);
    c->save_every_n_steps = lora_params_int(p, LORA_P_SAVE_EVERY_N_STEPS);
    c->caption_dropout_every_n_epochs = lora_params_int(p, LORA_P_CAPTION_DROPOUT_EVERY_N_EPOCHS);
    c->v2 = (int32_t)lora_params_int(p, LORA_P_V2);
    c->v_param = (int32_t)lora_params_int(p, LORA_P_V_PARAMETERIZATION);
    c->train_unet = !lora_params_int(p, LORA_P_NETWORK_TRAIN_TEXT_ENCODER_ONLY);
    c->train_te = !lora_params_int(p, LORA_P_NETWORK_TRAIN_UNET_ONLY);
    c->cache_latents = (int32_t)lora_params_int(p, LORA_P_CACHE_LATENTS);
    c->cache_to_disk = (int32_t)lora_params_int(p, LORA_P_CACHE_LATENTS_TO_DISK);
    c->gradient_checkpointing = (int32_t)lora_params_int(p, LORA_P_GRADIENT_CHECKPOINTING);
    c->shuffle_caption = (int32_t)lora_params_int(p, LORA_P_SHUFFLE_CAPTION);
    c->keep_tokens = (int32_t)lora_params_int(p, LORA_P_KEEP_TOKENS);
    c->enable_bucket = (int32_t)lora_params_int(p, LORA_P_ENABLE_BUCKET);
    c->min_bucket_reso = (int32_t)lora_params_int(p, LORA_P_MIN_BUCKET_RESO);
    c->max_bucket_reso = (int32_t)lora_params_int(p, LORA_P_MAX_BUCKET_RESO);
    c->bucket_reso_steps = (int32_t)lora_params_int(p, LORA_P_BUCKET_RESO_STEPS);
    c->bucket_no_upscale = (int32_t)lora_params_int(p, LORA_P_BUCKET_NO_UPSCALE);
    c->flip_aug = (int32_t)lora_params_int(p, LORA_P_FLIP_AUG);
    c->color_aug = (int32_t)lora_params_int(p, LORA_P_COLOR_AUG);
    c->random_crop = (int32_t)lora_params_int(p, LORA_P_RANDOM_CROP);
    c->save_state = (int32_t)lora_params_int(p, LORA_P_SAVE_STATE);
    c->no_metadata = (int32_t)lora_params_int(p, LORA_P_NO_METADATA);
    const char *bad = lora_params_str(p, LORA_P_BAD_IMAGE);
    c->bad_refuse = bad && strcmp(bad, "refuse") == 0;
}

/* kohya's --optimizer_args: "key=value" words, values float/bool or comma tuples. */
static lora_status parse_optimizer_args(lora_ctx *ctx, const char *args, struct train_opts *o) {
    char buf[1024];
    copy_str(buf, sizeof buf, args);
    char *save = NULL;
    for (char *w = strtok_r(buf, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
        char *eq = strchr(w, '=');
        if (!eq) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "optimizer_args: '%s' is not key=value", w);
        *eq = 0;
        const char *k = w, *v = eq + 1;
        char *end = NULL;
        double a = strtod(v, &end), b = 0;
        int two = 0;
        if (end && *end == ',') {
            b = strtod(end + 1, &end);
            two = 1;
        }
        int is_bool = strcasecmp(v, "true") == 0 || strcasecmp(v, "false") == 0;
        if (is_bool) a = strcasecmp(v, "true") == 0, end = (char *)v + strlen(v);
        if (!end || *end || !isfinite(a) || !isfinite(b))
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "optimizer_args: %s=%s: not a number, bool or pair", k, v);
        if (strcmp(k, "betas") == 0 && two) o->beta1 = a, o->beta2 = b;
        else if (strcmp(k, "weight_decay") == 0 && !two) o->weight_decay = a;
        else if (strcmp(k, "eps") == 0 && !two) o->eps = a;
        else if (strcmp(k, "momentum") == 0 && !two) o->momentum = a;
        else if (strcmp(k, "dampening") == 0 && !two) o->dampening = a;
        else if (strcmp(k, "nesterov") == 0 && is_bool) o->nesterov = a != 0;
        else return lora_fail(ctx, LORA_E_CONFIG_RANGE, "optimizer_args: '%s' is not supported here (weight_decay, betas=b1,b2, eps, momentum, dampening, nesterov)", k);
    }
    return LORA_OK;
}

/* ---- mixed precision: kohya casts the frozen U-Net (and the VAE) to the weight dtype, the text
 * encoder stays float32 (§5.5). A copy of `src` with every floating tensor rounded to `dt`;
 * the models then widen the 16-bit values exactly, so the arithmetic stays float32. ---- */
static lora_status cast_copy(lora_ctx *ctx, const struct tensor_map *src, lora_dtype dt, struct tensor_map *dst) {
    tmap_init(dst, ctx);
    for (int64_t i = 0; i < src->n; i++) {
        const struct lora_tensor *t = &src->t[i];
        int64_t n = tmap_numel(t);
        int fl = t->dtype == LORA_DTYPE_F32 || t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16;
        if (!fl || t->dtype == dt) {
            LORA_TRY(tmap_add(dst, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0, 0));
            continue;
        }
        uint16_t *h = lora_malloc(ctx, (size_t)(n ? n : 1) * 2);
        if (!h) return LORA_E_NOMEM;
        for (int64_t j = 0; j < n; j++) {
            float f;
            if (t->dtype == LORA_DTYPE_F32) memcpy(&f, (const uint8_t *)t->data + 4 * j, 4);
            else {
                uint16_t u;
                memcpy(&u, (const uint8_t *)t->data + 2 * j, 2);
                f = t->dtype == LORA_DTYPE_F16 ? lora_f16_to_f32(u) : lora_bf16_to_f32(u);
            }
            h[j] = dt == LORA_DTYPE_F16 ? lora_f32_to_f16(f) : lora_f32_to_bf16(f);
        }
        lora_status s = tmap_add(dst, t->name, dt, t->ndim, t->shape, h, (uint64_t)n * 2, 0, 1);
        if (s != LORA_OK) {
            lora_free(ctx, h);
            return s;
        }
    }
    return LORA_OK;
}

static lora_dtype weight_dtype(const struct trainer_cfg *c) {
    if (strcmp(c->mixed_precision, "fp16") == 0) return LORA_DTYPE_F16;
    if (strcmp(c->mixed_precision, "bf16") == 0) return LORA_DTYPE_BF16;
    return 0;
}

/* ---- dataset source ---- */

static lora_status ds_source_batch(void *user, int64_t epoch, int64_t index, struct ds_batch *b) {
    return ds_batch((struct lora_dataset *)user, epoch, index, b);
}

/* ---- VAE encode (cache_latents and per-step encoding): posterior sample as diffusers'
 * DiagonalGaussianDistribution.sample with torch.randn from the run's generator ---- */

static lora_status vae_encode_sample(struct lora_trainer *tr, const float *pixels, int32_t n, int32_t h, int32_t w,
                                     float *latents) {
    lora_ctx *ctx = tr->ctx;
    struct lora_backend_impl *be = ctx->backend;
    if (!tr->have_vae) {
        lora_dtype wd = weight_dtype(&tr->c);
        if (wd) {
            struct tensor_map half;
            lora_status s = cast_copy(ctx, &tr->model->sd.vae, wd, &half);
            if (s == LORA_OK) s = vae_init(&tr->vae, be, &half, &tr->model->sd.cfg);
            tmap_clear(&half);
            LORA_TRY(s);
        } else {
            LORA_TRY(vae_init(&tr->vae, be, &tr->model->sd.vae, &tr->model->sd.cfg));
        }
        tr->have_vae = 1;
    }
    int64_t f = (int64_t)1 << (tr->vae.levels - 1), lc = tr->vae.latent;
    if (h % f || w % f)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "training: image %dx%d is not a multiple of the VAE's %lld", w, h, (long long)f);
    int64_t ni = (int64_t)n * 3 * h * w, nl = (int64_t)n * lc * (h / f) * (w / f);
    if (!tr->have_vp || tr->vp.batch != n || tr->vp.h != h || tr->vp.w != w) {
        if (tr->have_vp) {
            vae_plan_free(&tr->vp);
            be->iface->buf_free(be, tr->vae_io);
            lora_free(ctx, tr->vae_host);
            tr->vae_io = NULL;
            tr->vae_host = NULL;
            tr->have_vp = 0;
        }
        LORA_TRY(vae_plan_init(&tr->vp, &tr->vae, n, h, w));
        void *io = NULL;
        lora_status s = be->iface->buf_alloc(be, (size_t)(ni + 2 * nl) * sizeof(float), &io);
        /* the host side of mean/logvar, made once per shape: nothing allocates per step */
        float *host = s == LORA_OK ? lora_malloc(ctx, (size_t)(2 * nl) * sizeof(float)) : NULL;
        if (s == LORA_OK && !host) s = LORA_E_NOMEM;
        if (s != LORA_OK) {
            if (io) be->iface->buf_free(be, io);
            vae_plan_free(&tr->vp);
            return s;
        }
        tr->vae_io = io;
        tr->vae_host = host;
        tr->have_vp = 1;
    }
    float *img = tr->vae_io, *mean = img + ni, *logvar = mean + nl;
    LORA_TRY(be->iface->upload(be, img, pixels, (size_t)ni * sizeof(float)));
    LORA_TRY(vae_encode(&tr->vp, img, mean, logvar));
    float *m = tr->vae_host, *lv = m + nl;
    LORA_TRY(be->iface->download(be, m, mean, (size_t)nl * sizeof(float)));
    LORA_TRY(be->iface->download(be, lv, logvar, (size_t)nl * sizeof(float)));
    lora_torch_randn(&tr->rng, latents, nl);
    for (int64_t i = 0; i < nl; i++) latents[i] = m[i] + expf(0.5f * lv[i]) * latents[i];
    return LORA_OK;
}

static lora_status cache_encode(void *user, const float *pixels, int32_t n, int32_t h, int32_t w, float *latents) {
    struct lora_trainer *tr = user;
    LORA_TRY(vae_encode_sample(tr, pixels, n, h, w, latents));
    return lora_check_cancel(tr->ctx);
}

/* ---- setup ---- */

static lora_status load_network_weights(struct lora_trainer *tr) {
    /* kohya (§1.7): load_state_dict(strict=False) into the network built from dim/alpha; the
     * file's alpha replaces the buffer (saved again) but not the scale fixed at creation. */
    lora_ctx *ctx = tr->ctx;
    struct lora_network *src = NULL;
    LORA_TRY(net_load(ctx, tr->c.network_weights, &src));
    lora_status s = LORA_OK;
    int has_te = 0, has_unet = 0;
    for (int64_t i = 0; i < src->n; i++) {
        if (strncmp(src->m[i].name, "lora_te", 7) == 0) has_te = 1;
        else has_unet = 1;
    }
    if (has_te != tr->c.train_te || has_unet != tr->c.train_unet)
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE,
                      "network_weights %s: it holds %s modules, the run trains %s (kohya refuses this too)",
                      tr->c.network_weights, has_te && has_unet ? "text encoder and U-Net" : has_te ? "text encoder" : "U-Net",
                      tr->c.train_te && tr->c.train_unet ? "both" : tr->c.train_te ? "the text encoder" : "the U-Net");
    for (int64_t i = 0; i < src->n && s == LORA_OK; i++) {
        const struct net_module *a = &src->m[i];
        int64_t j = net_find(tr->net, a->name);
        if (j < 0) continue;   /* strict=False: unexpected keys are ignored */
        struct net_module *b = &tr->net->m[j];
        if (a->rank != b->rank || a->in * a->kh * a->kw != b->in * b->kh * b->kw || a->out != b->out) {
            s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "network_weights %s: %s has rank %lld %lld -> %lld, the network %lld %lld -> %lld",
                          tr->c.network_weights, a->name, (long long)a->rank, (long long)a->in, (long long)a->out,
                          (long long)b->rank, (long long)b->in, (long long)b->out);
            break;
        }
        memcpy(b->down, a->down, (size_t)(a->rank * a->in * a->kh * a->kw) * sizeof(float));
        memcpy(b->up, a->up, (size_t)(a->out * a->rank) * sizeof(float));
        if (a->has_alpha) b->alpha = a->alpha;
    }
    net_free(src);
    return s;
}

static lora_status setup(struct lora_trainer *tr, const struct trainer_source *src) {
    lora_ctx *ctx = tr->ctx;
    struct trainer_cfg *c = &tr->c;
    const struct sd_config *cfg = &tr->model->sd.cfg;
    LORA_TRY(parse_resolution(ctx, c->resolution, &c->width, &c->height));
    if (!c->train_unet && !c->train_te)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "network_train_unet_only and network_train_text_encoder_only exclude each other");
    if (c->max_token_length != 75 && c->max_token_length != 150 && c->max_token_length != 225)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "max_token_length: %lld (75, 150 or 225)", (long long)c->max_token_length);
    if (cfg->te_heads <= 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "training: the text encoder's head count is unknown (LDM files do not "
                         "store it and SD's rule, width/64, does not fit width %d); use a diffusers folder", cfg->te_hidden);
    if (c->clip_skip > cfg->te_layers)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "clip_skip: %lld is more than the text encoder's %d layers",
                         (long long)c->clip_skip, cfg->te_layers);
    if (c->cache_latents && (c->color_aug || c->random_crop))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "cache_latents cannot be combined with color_aug or random_crop (kohya asserts this too)");
    if (strcmp(c->save_model_as, "safetensors") && strcmp(c->save_model_as, "ckpt") && strcmp(c->save_model_as, "pt"))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "save_model_as: a LoRA is saved as safetensors, ckpt or pt, not '%s'", c->save_model_as);
    /* optimizer and schedule */
    struct train_optim_opts oo;
    LORA_TRY(train_optim_parse(ctx, c->optimizer_type, &oo));
    struct train_opts *o = &tr->topts;
    train_opts_default(o);
    o->optimizer = oo.kind;
    o->beta1 = oo.beta1, o->beta2 = oo.beta2, o->eps = oo.eps, o->weight_decay = oo.weight_decay;
    o->momentum = oo.momentum, o->dampening = oo.dampening, o->nesterov = oo.nesterov;
    LORA_TRY(parse_optimizer_args(ctx, c->optimizer_args, o));
    o->max_grad_norm = c->max_grad_norm;
    o->unet_train = unet_train_mode(c->gradient_checkpointing);
    o->n_chunks = (int32_t)(c->max_token_length / 75);
    o->clip_skip = (int32_t)c->clip_skip;
    o->v_parameterization = c->v_param || cfg->v_prediction;
    o->train_unet = c->train_unet;
    o->train_text_encoder = c->train_te;
    o->unet_lr = c->unet_lr > 0 ? c->unet_lr : c->learning_rate;
    o->text_encoder_lr = c->text_encoder_lr > 0 ? c->text_encoder_lr : c->learning_rate;
    train_lr_schedule_default(&tr->sched);
    LORA_TRY(train_lr_kind_parse(ctx, c->lr_scheduler, &tr->sched.kind));
    tr->sched.warmup = c->warmup;
    tr->sched.num_cycles = (double)c->num_cycles;
    tr->sched.power = c->lr_power;
    tr->sched.lr_init = c->learning_rate;
    if (strcmp(c->mixed_precision, "no") && strcmp(c->mixed_precision, "fp16") && strcmp(c->mixed_precision, "bf16"))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "mixed_precision: '%s' (no, fp16 or bf16)", c->mixed_precision);
    train_scaler_init(&tr->scaler, strcmp(c->mixed_precision, "fp16") == 0);
    /* seed: accelerate's set_seed only when given; else a random one */
    uint64_t seed = c->seed >= 0 ? (uint64_t)c->seed : ((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 16));
    lora_mt_seed(&tr->rng, seed);
    tr->session_id = (int64_t)(lora_mt_next(&tr->rng) & 0x7fffffff);   /* kohya: random.randint */
    lora_mt_seed(&tr->rng, seed);
    tr->started_at = now_s();
    /* the base model's hashes for ss_sd_model_hash / ss_new_sd_model_hash, once (as kohya) */
    if (c->model_path[0] && !c->no_metadata)
        LORA_TRY(md_file_hashes(ctx, c->model_path, &tr->model_is_file, tr->model_legacy, tr->model_sha));
    /* models */
    struct lora_backend_impl *be = ctx->backend;
    LORA_TRY(clip_init(&tr->clip, be, &tr->model->sd.te, cfg));
    tr->have_clip = 1;
    lora_dtype wd = weight_dtype(c);
    if (wd) {
        struct tensor_map half;
        lora_status s = cast_copy(ctx, &tr->model->sd.unet, wd, &half);
        if (s == LORA_OK) s = unet_init(&tr->unet, be, &half, cfg);   /* copies: the map can go */
        tmap_clear(&half);
        LORA_TRY(s);
    } else {
        /* 16-bit checkpoint matrices are read in place (widened per GEMM) instead of copied:
         * the model outlives the trainer and its weights stay put while it exists (lora.h). */
        LORA_TRY(unet_init_ex(&tr->unet, be, &tr->model->sd.unet, cfg, UNET_BORROW_16BIT));
    }
    tr->have_unet = 1;
    LORA_TRY(tok_create(ctx, cfg->version == 2 ? LORA_TOKENIZER_SD2 : LORA_TOKENIZER_SD1, &tr->tok));
    if (tr->clip.vocab < 49408)
        lora_log(ctx, LORA_LOG_WARN, "training: the text encoder has %lld tokens, fewer than CLIP's 49408; token ids are "
                 "taken modulo %lld (a test-size model)", (long long)tr->clip.vocab, (long long)tr->clip.vocab);
    /* network: modules that are not trained are dropped by kohya; here they stay at their values
     * (a created network's up is zero) and get no gradient */
    for (int64_t i = 0; i < tr->net->n; i++) tr->net->m[i].dtype = LORA_DTYPE_F32;   /* fp32 parameters */
    if (c->network_weights[0]) LORA_TRY(load_network_weights(tr));
    /* batches */
    if (src) {
        tr->src = *src;
    } else {
        if (!c->train_data_dir[0])
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "train_data_dir is not set");
        struct ds_opts d;
        ds_opts_default(&d);
        d.train_data_dir = c->train_data_dir;
        d.reg_data_dir = c->reg_data_dir[0] ? c->reg_data_dir : NULL;
        d.caption_extension = c->caption_extension[0] ? c->caption_extension : NULL;
        d.shuffle_caption = c->shuffle_caption;
        d.keep_tokens = c->keep_tokens;
        d.caption_dropout_rate = c->caption_dropout_rate;
        d.caption_dropout_every_n_epochs = (int32_t)c->caption_dropout_every_n_epochs;
        d.caption_tag_dropout_rate = c->caption_tag_dropout_rate;
        d.width = c->width;
        d.height = c->height;
        d.enable_bucket = c->enable_bucket;
        d.min_bucket_reso = c->min_bucket_reso;
        d.max_bucket_reso = c->max_bucket_reso;
        d.bucket_reso_steps = c->bucket_reso_steps;
        d.bucket_no_upscale = c->bucket_no_upscale;
        d.flip_aug = c->flip_aug;
        d.color_aug = c->color_aug;
        d.random_crop = c->random_crop;
        d.prior_loss_weight = c->prior_loss_weight;
        d.batch_size = (int32_t)c->batch_size;
        d.bad_input = c->bad_refuse ? DS_BAD_REFUSE : DS_BAD_SKIP;
        d.cache = c->cache_latents ? (c->cache_to_disk ? DS_CACHE_DISK : DS_CACHE_MEMORY) : DS_CACHE_NONE;
        d.seed = seed;
        LORA_TRY(ds_open(&tr->ds, ctx, &d));
        tr->src.user = tr->ds;
        tr->src.batch = ds_source_batch;
        tr->src.n_train_images = ds_num_train_images(tr->ds);
        tr->src.n_reg_images = ds_num_reg_images(tr->ds);
        tr->src.batches_per_epoch = ds_batches_per_epoch(tr->ds);
        if (c->cache_latents) {
            LORA_TRY(lora_progress(ctx, LORA_PHASE_CACHE_LATENTS, 0, 1, NAN));
            LORA_TRY(ds_cache_latents(tr->ds, cache_encode, tr));
            LORA_TRY(lora_progress(ctx, LORA_PHASE_CACHE_LATENTS, 1, 1, NAN));
        }
    }
    int64_t bpe = tr->src.batches_per_epoch;
    if (bpe < 1) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "training: the dataset has no batches (no images found in %s)",
                                  c->train_data_dir[0] ? c->train_data_dir : "the source");
    /* §5.5: steps and epochs */
    tr->max_train_steps = c->max_train_epochs > 0 ? c->max_train_epochs * bpe : c->max_train_steps;
    int64_t upe = (bpe + c->grad_accum - 1) / c->grad_accum;
    tr->num_epochs = (tr->max_train_steps + upe - 1) / upe;
    tr->save_every_n_epochs = c->save_every_n_epochs;
    if (c->save_n_epoch_ratio > 0) {
        tr->save_every_n_epochs = tr->num_epochs / c->save_n_epoch_ratio;
        if (tr->save_every_n_epochs < 1) tr->save_every_n_epochs = 1;
    }
    tr->sched.total = tr->max_train_steps * c->grad_accum;
    tr->loss_list = lora_calloc(ctx, (size_t)bpe, sizeof(double));
    tr->loss_undo = lora_calloc(ctx, (size_t)bpe, sizeof(double));
    if (!tr->loss_list || !tr->loss_undo) return LORA_E_NOMEM;
    int64_t f = vae_factor(tr);
    if (c->width % f || c->height % f)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "resolution %dx%d is not a multiple of the VAE's factor %lld",
                         (int)c->width, (int)c->height, (long long)f);
    LORA_TRY(train_init(&tr->st, ctx, tr->net, &tr->clip, &tr->unet, o, c->batch_size, c->height / f, c->width / f, 77));
    tr->have_state = 1;
    tr->lr_unet = train_lr_at(&tr->sched, o->unet_lr, 0);
    tr->lr_te = train_lr_at(&tr->sched, o->text_encoder_lr, 0);
    md_init(&tr->meta, ctx);
    return LORA_OK;
}

lora_status trainer_create(lora_model *model, lora_network *net, const lora_params *opts,
                           const struct trainer_source *src, struct lora_trainer **out) {
    lora_ctx *ctx = model->ctx;
    *out = NULL;
    struct lora_trainer *tr = lora_calloc(ctx, 1, sizeof *tr);
    if (!tr) return LORA_E_NOMEM;
    tr->magic = LORA_TRAINER_MAGIC;
    tr->ctx = ctx;
    tr->model = model;
    tr->net = net;
    md_init(&tr->meta, ctx);
    cfg_read(opts, &tr->c);
    lora_status s = setup(tr, src);
    if (s != LORA_OK) {
        trainer_free(tr);
        return s;
    }
    *out = tr;
    return LORA_OK;
}

void trainer_free(struct lora_trainer *tr) {
    if (!tr) return;
    lora_ctx *ctx = tr->ctx;
    struct lora_backend_impl *be = ctx->backend;
    if (tr->have_state) train_free(&tr->st);
    if (tr->have_vp) {
        vae_plan_free(&tr->vp);
        be->iface->buf_free(be, tr->vae_io);
        lora_free(ctx, tr->vae_host);
    }
    if (tr->have_vae) vae_free(&tr->vae);
    if (tr->have_unet) unet_free(&tr->unet);
    if (tr->have_clip) clip_free(&tr->clip);
    if (tr->tok) tok_free(tr->tok);
    if (tr->ds) ds_free(tr->ds);
    md_free(&tr->meta);
    lora_free(ctx, tr->loss_list);
    lora_free(ctx, tr->loss_undo);
    lora_free(ctx, tr->lat);
    lora_free(ctx, tr->noise);
    lora_free(ctx, tr->offs);
    lora_free(ctx, tr->ids);
    lora_free(ctx, tr->ts);
    lora_free(ctx, tr->snr_w);
    tr->magic = 0;
    lora_free(ctx, tr);
}

/* ---- file names (§5.5) ---- */

static const char *model_name(const struct lora_trainer *tr, int last) {
    if (tr->c.output_name[0]) return tr->c.output_name;
    return last ? "last" : "epoch";
}

static lora_status out_path(struct lora_trainer *tr, char *buf, size_t cap, const char *stem, const char *ext) {
    int n = snprintf(buf, cap, "%s/%s.%s", tr->c.output_dir, stem, ext);
    if (n < 0 || (size_t)n >= cap)
        return lora_fail(tr->ctx, LORA_E_LIMIT, "output path %s/%s.%s is too long", tr->c.output_dir, stem, ext);
    return LORA_OK;
}

static lora_status ensure_output_dir(struct lora_trainer *tr) {
    struct stat sb;
    if (stat(tr->c.output_dir, &sb) == 0) {
        if (S_ISDIR(sb.st_mode)) return LORA_OK;
        return lora_fail(tr->ctx, LORA_E_IO, "output_dir %s exists and is not a folder", tr->c.output_dir);
    }
    /* os.makedirs(exist_ok=True): every missing parent too */
    char b[TRAINER_PATH];
    copy_str(b, sizeof b, tr->c.output_dir);
    for (char *p = b + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(b, 0777);
            *p = '/';
        }
    if (mkdir(b, 0777) != 0 && (stat(b, &sb) != 0 || !S_ISDIR(sb.st_mode)))
        return lora_fail(tr->ctx, LORA_E_IO, "output_dir %s cannot be created", tr->c.output_dir);
    return LORA_OK;
}

/* ---- metadata (§9.1) ---- */

static const char *none_if_empty(const char *s) { return s && s[0] ? s : "None"; }

lora_status trainer_metadata(struct lora_trainer *tr) {
    struct md_list *m = &tr->meta;
    const struct trainer_cfg *c = &tr->c;
    char b[64];
    md_free(m);
    if (c->no_metadata) {
        /* kohya's minimum metadata */
        LORA_TRY(md_set(m, "ss_network_module", "networks.lora"));
        if (c->network_dim == 4) LORA_TRY(md_set(m, "ss_network_dim", "None"));
        else LORA_TRY(md_setf(m, "ss_network_dim", "%lld", (long long)c->network_dim));
        return md_set_float(m, "ss_network_alpha", c->network_alpha);
    }
    LORA_TRY(md_setf(m, "ss_session_id", "%lld", (long long)tr->session_id));
    LORA_TRY(md_set_float(m, "ss_training_started_at", tr->started_at));
    LORA_TRY(md_set(m, "ss_output_name", none_if_empty(c->output_name)));
    LORA_TRY(md_set_float(m, "ss_learning_rate", c->learning_rate));
    if (c->text_encoder_lr > 0) LORA_TRY(md_set_float(m, "ss_text_encoder_lr", c->text_encoder_lr));
    else LORA_TRY(md_set(m, "ss_text_encoder_lr", "None"));
    if (c->unet_lr > 0) LORA_TRY(md_set_float(m, "ss_unet_lr", c->unet_lr));
    else LORA_TRY(md_set(m, "ss_unet_lr", "None"));
    LORA_TRY(md_setf(m, "ss_num_train_images", "%lld", (long long)tr->src.n_train_images));
    /* kohya writes the reg count before its balancing (dataset.num_reg_images). */
    LORA_TRY(md_setf(m, "ss_num_reg_images", "%lld",
                     (long long)(tr->ds ? ds_num_reg_images_kohya(tr->ds) : tr->src.n_reg_images)));
    LORA_TRY(md_setf(m, "ss_num_batches_per_epoch", "%lld", (long long)tr->src.batches_per_epoch));
    LORA_TRY(md_setf(m, "ss_num_epochs", "%lld", (long long)tr->num_epochs));
    LORA_TRY(md_set(m, "ss_gradient_checkpointing", md_py_bool(c->gradient_checkpointing)));
    LORA_TRY(md_setf(m, "ss_gradient_accumulation_steps", "%lld", (long long)c->grad_accum));
    LORA_TRY(md_setf(m, "ss_max_train_steps", "%lld", (long long)tr->max_train_steps));
    LORA_TRY(md_setf(m, "ss_lr_warmup_steps", "%lld", (long long)c->warmup));
    LORA_TRY(md_set(m, "ss_lr_scheduler", c->lr_scheduler));
    LORA_TRY(md_set(m, "ss_network_module", "networks.lora"));
    /* kohya's --network_dim default is None (-> 4 inside the network) */
    if (c->network_dim == 4) LORA_TRY(md_set(m, "ss_network_dim", "None"));
    else LORA_TRY(md_setf(m, "ss_network_dim", "%lld", (long long)c->network_dim));
    LORA_TRY(md_set_float(m, "ss_network_alpha", c->network_alpha));
    LORA_TRY(md_set(m, "ss_mixed_precision", c->mixed_precision));
    LORA_TRY(md_set(m, "ss_full_fp16", "False"));
    LORA_TRY(md_set(m, "ss_v2", md_py_bool(c->v2 || tr->model->sd.cfg.version == 2)));
    if (c->clip_skip == 1) LORA_TRY(md_set(m, "ss_clip_skip", "None"));
    else LORA_TRY(md_setf(m, "ss_clip_skip", "%lld", (long long)c->clip_skip));
    if (c->max_token_length == 75) LORA_TRY(md_set(m, "ss_max_token_length", "None"));
    else LORA_TRY(md_setf(m, "ss_max_token_length", "%lld", (long long)c->max_token_length));
    LORA_TRY(md_set(m, "ss_cache_latents", md_py_bool(c->cache_latents)));
    if (c->seed >= 0) LORA_TRY(md_setf(m, "ss_seed", "%lld", (long long)c->seed));
    else LORA_TRY(md_set(m, "ss_seed", "None"));
    LORA_TRY(md_set(m, "ss_lowram", "False"));
    if (c->noise_offset > 0) LORA_TRY(md_set_float(m, "ss_noise_offset", c->noise_offset));
    else LORA_TRY(md_set(m, "ss_noise_offset", "None"));
    LORA_TRY(md_set(m, "ss_training_comment", none_if_empty(c->training_comment)));
    if (c->min_snr_gamma > 0) LORA_TRY(md_set_float(m, "ss_min_snr_gamma", c->min_snr_gamma));
    LORA_TRY(md_setf(m, "ss_sd_scripts_commit_hash", "liblora %s", lora_version_string()));
    /* "module.Class(args)" as kohya writes it */
    static const char *const cls[] = {"torch.optim.adamw.AdamW", "torch.optim.sgd.SGD", "lion_pytorch.lion_pytorch.Lion",
                                      "bitsandbytes.optim.adamw.AdamW8bit"};
    char opt[1200];
    int on = snprintf(opt, sizeof opt, "%s", cls[tr->topts.optimizer]);
    char args[1024] = "";
    size_t al = 0;
    if (tr->topts.optimizer == TRAIN_OPT_SGD) al += (size_t)snprintf(args + al, sizeof args - al, "momentum=0.9");
    if (c->optimizer_args[0]) {
        /* kohya: ",".join(f"{k}={v}") with Python values; pairs become tuples */
        char w[1024];
        copy_str(w, sizeof w, c->optimizer_args);
        char *save = NULL;
        for (char *t = strtok_r(w, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
            char *eq = strchr(t, '=');
            if (!eq) continue;
            *eq = 0;
            if (tr->topts.optimizer == TRAIN_OPT_SGD && strcmp(t, "momentum") == 0 && al >= 12 &&
                strncmp(args, "momentum=0.9", 12) == 0) {
                memmove(args, args + 12, al - 11);
                al -= 12;
                if (args[0] == ',') memmove(args, args + 1, al--);
            }
            char v1[32], v2[32], *end = NULL;
            const char *v = eq + 1;
            double a = strtod(v, &end);
            if (strcasecmp(v, "true") == 0 || strcasecmp(v, "false") == 0) snprintf(v1, sizeof v1, "%s", md_py_bool(strcasecmp(v, "true") == 0));
            else md_py_float(a, v1);
            if (end && *end == ',') {
                md_py_float(strtod(end + 1, NULL), v2);
                al += (size_t)snprintf(args + al, sizeof args - al, "%s%s=(%s, %s)", al ? "," : "", t, v1, v2);
            } else {
                al += (size_t)snprintf(args + al, sizeof args - al, "%s%s=%s", al ? "," : "", t, v1);
            }
            if (al >= sizeof args) al = sizeof args - 1;
        }
    }
    if (al) snprintf(opt + on, sizeof opt - (size_t)on, "(%s)", args);
    LORA_TRY(md_set(m, "ss_optimizer", opt));
    LORA_TRY(md_set_float(m, "ss_max_grad_norm", c->max_grad_norm));
    LORA_TRY(md_set_float(m, "ss_caption_dropout_rate", c->caption_dropout_rate));
    if (c->caption_dropout_every_n_epochs > 0)
        LORA_TRY(md_setf(m, "ss_caption_dropout_every_n_epochs", "%lld", (long long)c->caption_dropout_every_n_epochs));
    else LORA_TRY(md_set(m, "ss_caption_dropout_every_n_epochs", "None"));
    LORA_TRY(md_set_float(m, "ss_caption_tag_dropout_rate", c->caption_tag_dropout_rate));
    LORA_TRY(md_set(m, "ss_face_crop_aug_range", "None"));
    LORA_TRY(md_set_float(m, "ss_prior_loss_weight", c->prior_loss_weight));
    LORA_TRY(md_setf(m, "ss_batch_size_per_device", "%lld", (long long)c->batch_size));
    LORA_TRY(md_setf(m, "ss_total_batch_size", "%lld", (long long)(c->batch_size * c->grad_accum)));
    LORA_TRY(md_setf(m, "ss_resolution", "(%d, %d)", (int)c->width, (int)c->height));
    LORA_TRY(md_set(m, "ss_color_aug", md_py_bool(c->color_aug)));
    LORA_TRY(md_set(m, "ss_flip_aug", md_py_bool(c->flip_aug)));
    LORA_TRY(md_set(m, "ss_random_crop", md_py_bool(c->random_crop)));
    LORA_TRY(md_set(m, "ss_shuffle_caption", md_py_bool(c->shuffle_caption)));
    LORA_TRY(md_set(m, "ss_enable_bucket", md_py_bool(c->enable_bucket)));
    LORA_TRY(md_set(m, "ss_bucket_no_upscale", md_py_bool(c->bucket_no_upscale)));
    LORA_TRY(md_setf(m, "ss_min_bucket_reso", "%d", (int)c->min_bucket_reso));
    LORA_TRY(md_setf(m, "ss_max_bucket_reso", "%d", (int)c->max_bucket_reso));
    LORA_TRY(md_setf(m, "ss_keep_tokens", "%d", (int)c->keep_tokens));
    char *js = NULL;
    if (tr->ds) {
        LORA_TRY(ds_dataset_dirs_json(tr->ds, "train", &js));
        lora_status s = md_set(m, "ss_dataset_dirs", js);
        lora_free(tr->ctx, js);
        LORA_TRY(s);
        LORA_TRY(ds_dataset_dirs_json(tr->ds, "reg", &js));
        s = md_set(m, "ss_reg_dataset_dirs", js);
        lora_free(tr->ctx, js);
        LORA_TRY(s);
        LORA_TRY(ds_tag_frequency_json(tr->ds, &js));
        s = md_set(m, "ss_tag_frequency", js);
        lora_free(tr->ctx, js);
        LORA_TRY(s);
    } else {
        LORA_TRY(md_set(m, "ss_dataset_dirs", "{}"));
        LORA_TRY(md_set(m, "ss_reg_dataset_dirs", "{}"));
        LORA_TRY(md_set(m, "ss_tag_frequency", "{}"));
    }
    if (tr->ds) {   /* json.dumps(dataset.bucket_info): "null" without enable_bucket */
        LORA_TRY(ds_bucket_info_json(tr->ds, &js));
        lora_status s = md_set(m, "ss_bucket_info", js);
        lora_free(tr->ctx, js);
        LORA_TRY(s);
    } else {
        LORA_TRY(md_set(m, "ss_bucket_info", "null"));
    }
    if (c->model_path[0]) {
        if (tr->model_is_file) {
            LORA_TRY(md_set(m, "ss_sd_model_hash", tr->model_legacy));
            LORA_TRY(md_set(m, "ss_new_sd_model_hash", tr->model_sha));
        }
        const char *base = c->model_path;
        size_t L = strlen(base);
        while (L > 1 && base[L - 1] == '/') L--;   /* os.path.basename("dir/") is "" in Python */
        const char *sl = NULL;
        for (size_t i = 0; i < L; i++)
            if (base[i] == '/') sl = base + i;
        struct stat sb;
        if (stat(c->model_path, &sb) == 0) {
            const char *nm = sl ? sl + 1 : base;
            if (c->model_path[strlen(c->model_path) - 1] == '/') LORA_TRY(md_set(m, "ss_sd_model_name", ""));
            else LORA_TRY(md_setf(m, "ss_sd_model_name", "%.*s", (int)(base + L - nm), nm));
        } else {
            LORA_TRY(md_set(m, "ss_sd_model_name", c->model_path));
        }
    }
    int64_t ep = tr->md_epoch > 0 ? tr->md_epoch : tr->epoch + 1 > tr->num_epochs ? tr->num_epochs : tr->epoch + 1;
    LORA_TRY(md_setf(m, "ss_epoch", "%lld", (long long)ep));
    LORA_TRY(md_setf(m, "ss_steps", "%lld", (long long)tr->global_step));
    md_py_float(now_s(), b);
    LORA_TRY(md_set(m, "ss_training_finished_at", b));
    return LORA_OK;
}

lora_status trainer_save_network(struct lora_trainer *tr, const char *path) {
    LORA_TRY(trainer_metadata(tr));
    lora_dtype dt = 0;   /* "": keep (fp32 parameters) */
    if (strcmp(tr->c.save_precision, "float") == 0) dt = LORA_DTYPE_F32;
    else if (strcmp(tr->c.save_precision, "fp16") == 0) dt = LORA_DTYPE_F16;
    else if (strcmp(tr->c.save_precision, "bf16") == 0) dt = LORA_DTYPE_BF16;
    lora_status s = md_save_network(tr->net, path, &tr->meta, dt);
    if (s == LORA_OK) lora_log(tr->ctx, LORA_LOG_INFO, "saved %s", path);
    return s;
}

static lora_status save_epoch(struct lora_trainer *tr, int64_t e) {
    char path[TRAINER_PATH + 1200], stem[1100];
    LORA_TRY(ensure_output_dir(tr));
    snprintf(stem, sizeof stem, "%s-%06lld", model_name(tr, 0), (long long)e);
    LORA_TRY(out_path(tr, path, sizeof path, stem, tr->c.save_model_as));
    LORA_TRY(trainer_save_network(tr, path));
    if (tr->c.save_last_n_epochs > 0) {
        int64_t old = e - tr->save_every_n_epochs * tr->c.save_last_n_epochs;
        snprintf(stem, sizeof stem, "%s-%06lld", model_name(tr, 0), (long long)old);
        if (out_path(tr, path, sizeof path, stem, tr->c.save_model_as) == LORA_OK && access(path, F_OK) == 0) {
            lora_log(tr->ctx, LORA_LOG_INFO, "removing old checkpoint %s", path);
            unlink(path);
        }
    }
    if (tr->c.save_state) {
        snprintf(stem, sizeof stem, "%s-%06lld-state", model_name(tr, 0), (long long)e);
        LORA_TRY(out_path(tr, path, sizeof path, stem, "safetensors"));
        LORA_TRY(trainer_save_state(tr, path));
        if (tr->c.save_last_n_epochs > 0) {
            int64_t old = e - tr->save_every_n_epochs * tr->c.save_last_n_epochs;
            snprintf(stem, sizeof stem, "%s-%06lld-state", model_name(tr, 0), (long long)old);
            if (out_path(tr, path, sizeof path, stem, "safetensors") == LORA_OK) unlink(path);
        }
    }
    return LORA_OK;
}

lora_status trainer_save_final(struct lora_trainer *tr) {
    if (!tr->c.output_dir[0]) return LORA_OK;
    char path[TRAINER_PATH + 1200], stem[1100];
    LORA_TRY(ensure_output_dir(tr));
    if (tr->c.save_state) {
        snprintf(stem, sizeof stem, "%s-state", model_name(tr, 1));
        LORA_TRY(out_path(tr, path, sizeof path, stem, "safetensors"));
        LORA_TRY(trainer_save_state(tr, path));
    }
    LORA_TRY(out_path(tr, path, sizeof path, model_name(tr, 1), tr->c.save_model_as));
    tr->md_epoch = tr->num_epochs;   /* kohya: ss_epoch = num_train_epochs at the end */
    lora_status s = trainer_save_network(tr, path);
    tr->md_epoch = 0;
    return s;
}

/* ---- one micro-step ---- */

static lora_status grow(struct lora_trainer *tr, int64_t n_lat, int64_t b) {
    lora_ctx *ctx = tr->ctx;
    if (n_lat > tr->buf_lat) {
        lora_free(ctx, tr->lat);
        lora_free(ctx, tr->noise);
        tr->lat = lora_malloc(ctx, (size_t)n_lat * sizeof(float));
        tr->noise = lora_malloc(ctx, (size_t)n_lat * sizeof(float));
        tr->buf_lat = tr->lat && tr->noise ? n_lat : 0;
        if (!tr->buf_lat) return LORA_E_NOMEM;
    }
    if (b > tr->buf_b) {
        lora_free(ctx, tr->offs);
        lora_free(ctx, tr->ids);
        lora_free(ctx, tr->ts);
        lora_free(ctx, tr->snr_w);
        tr->snr_w = lora_malloc(ctx, (size_t)b * sizeof(float));
        tr->offs = lora_malloc(ctx, (size_t)(4 * b) * sizeof(float));
        tr->ids = lora_malloc(ctx, (size_t)(77 * 3 * b) * sizeof(int32_t));
        tr->ts = lora_malloc(ctx, (size_t)b * sizeof(int64_t));
        tr->buf_b = tr->offs && tr->ids && tr->ts && tr->snr_w ? b : 0;
        if (!tr->buf_b) return LORA_E_NOMEM;
    }
    return LORA_OK;
}

/* One micro-step; at a sync also the optimizer step. *skipped: the fp16 scaler skipped it. */
static lora_status micro_step(struct lora_trainer *tr, int sync, double *loss_out, int64_t *images, int *skipped) {
    lora_ctx *ctx = tr->ctx;
    struct ds_batch b;
    memset(&b, 0, sizeof b);
    LORA_TRY(tr->src.batch(tr->src.user, tr->epoch + 1, tr->batch_index, &b));
    const int64_t f = vae_factor(tr);
    if (b.n < 1 || b.width < f || b.height < f || b.width % f || b.height % f || (!b.latents && !b.pixels))
        return lora_fail(ctx, LORA_E_INTERNAL, "training: batch %lld of epoch %lld is malformed (%d images %dx%d)",
                         (long long)tr->batch_index, (long long)tr->epoch + 1, (int)b.n, (int)b.width, (int)b.height);
    int64_t B = b.n, h = b.height / f, w = b.width / f, per = 4 * h * w, nl = B * per;
    LORA_TRY(grow(tr, nl, B));
    /* latents: cached (unscaled) or a fresh posterior sample; then * 0.18215 */
    if (b.latents) memcpy(tr->lat, b.latents, (size_t)nl * sizeof(float));
    else LORA_TRY(vae_encode_sample(tr, b.pixels, b.n, b.height, b.width, tr->lat));
    for (int64_t i = 0; i < nl; i++) tr->lat[i] = tr->lat[i] * LATENT_SCALE;
    /* captions -> ids (kohya get_input_ids: max_token_length/75 chunks of 77 per caption) */
    const int64_t nid = 77 * (tr->c.max_token_length / 75);
    for (int64_t i = 0; i < B; i++) {
        const char *cap = b.captions && b.captions[i] ? b.captions[i] : "";
        size_t got = 0;
        LORA_TRY(tok_encode(tr->tok, cap, strlen(cap), (int32_t)tr->c.max_token_length, tr->ids + nid * i, (size_t)nid, &got));
        if ((int64_t)got != nid)
            return lora_fail(ctx, LORA_E_INTERNAL, "training: the tokenizer gave %zu ids, %lld expected", got, (long long)nid);
    }
    clip_fold_ids(&tr->clip, tr->ids, nid * B);   /* a test-size encoder (setup warned) */
    /* torch.randn_like(latents); noise_offset * torch.randn((B, C, 1, 1)); torch.randint(0, 1000, (B,)) */
    lora_torch_randn(&tr->rng, tr->noise, nl);
    if (tr->c.noise_offset > 0) {
        lora_torch_randn(&tr->rng, tr->offs, 4 * B);
        train_noise_offset(tr->noise, tr->offs, tr->c.noise_offset, B, 4, h * w);
    }
    for (int64_t i = 0; i < B; i++) tr->ts[i] = (int64_t)(lora_mt_next(&tr->rng) % TRAIN_T);
    LORA_TRY(train_reshape(&tr->st, B, h, w));
    /* accelerate's backward divides by G; GradScaler multiplies by its scale */
    tr->st.loss_mult = (float)(1.0 / (double)tr->c.grad_accum) * tr->scaler.scale;
    /* per-sample loss weights: the dataset's (prior_loss_weight), times min_snr_gamma's
     * min(snr, gamma) / snr (kohya's later apply_snr_weight; v-prediction: / (snr + 1)) */
    const float *lw = b.loss_weights;
    if (tr->c.min_snr_gamma > 0) {
        for (int64_t i = 0; i < B; i++) {
            float a = sqrtf(tr->st.acp[tr->ts[i]]), sg = sqrtf(1.0f - tr->st.acp[tr->ts[i]]);
            float snr = (a / sg) * (a / sg), gm = (float)tr->c.min_snr_gamma;
            float wt = tr->topts.v_parameterization ? fminf(snr, gm) / (snr + 1.0f) : fminf(snr, gm) / snr;
            tr->snr_w[i] = (b.loss_weights ? b.loss_weights[i] : 1.0f) * wt;
        }
        lw = tr->snr_w;
    }
    double loss = 0;
    lora_status as = train_accumulate(&tr->st, tr->lat, tr->noise, tr->ts, tr->ids, lw, &loss);
    if (as == LORA_E_NAN_LOSS && tr->scaler.enabled) {
        /* under GradScaler a non-finite loss makes non-finite gradients: the sync step is then
         * skipped and the scale backs off, and training goes on */
        lora_clear_error(ctx);
        tr->found_inf = 1;
    } else if (as != LORA_OK) {
        return as;
    }
    *loss_out = loss;
    *images += B;
    if (!sync) return LORA_OK;
    /* the optimizer step at the current scheduler position */
    tr->st.o.unet_lr = train_lr_at(&tr->sched, tr->topts.unet_lr, tr->sched_steps);
    tr->st.o.text_encoder_lr = train_lr_at(&tr->sched, tr->topts.text_encoder_lr, tr->sched_steps);
    tr->lr_unet = tr->st.o.unet_lr;
    tr->lr_te = tr->st.o.text_encoder_lr;
    int skip = 0;
    if (tr->scaler.enabled) {
        int bad = train_unscale_grads(&tr->st, train_scaler_inv(&tr->scaler)) | tr->found_inf;
        tr->found_inf = 0;
        skip = train_scaler_update(&tr->scaler, bad);
    }
    if (skip) {
        tr->last_norm = NAN;
        train_zero_grad(&tr->st);
        lora_log(ctx, LORA_LOG_WARN, "step %lld: gradients overflowed in fp16; step skipped, loss scale now %g",
                 (long long)tr->global_step + 1, (double)tr->scaler.scale);
    } else {
        double norm = 0;
        LORA_TRY(train_optimizer_step(&tr->st, &norm));
        tr->last_norm = norm;
    }
    *skipped = skip;   /* then the scheduler does not step either (accelerate) */
    return LORA_OK;
}

static lora_status epoch_end(struct lora_trainer *tr) {
    /* the counters move first, so a state saved here resumes at the next epoch's first batch */
    int64_t e = tr->epoch + 1;
    tr->epoch++;
    tr->batch_index = 0;
    tr->accum = 0;
    if (tr->c.output_dir[0] && tr->save_every_n_epochs > 0 && e % tr->save_every_n_epochs == 0 && e < tr->num_epochs) {
        tr->md_epoch = e;
        lora_status s = save_epoch(tr, e);
        tr->md_epoch = 0;
        LORA_TRY(s);
    }
    return LORA_OK;
}

lora_status trainer_step(struct lora_trainer *tr, int64_t n_steps, int64_t *done) {
    lora_ctx *ctx = tr->ctx;
    int64_t taken = 0;
    if (done) *done = 0;
    const int64_t bpe = tr->src.batches_per_epoch, G = tr->c.grad_accum;
    while (taken < n_steps && tr->global_step < tr->max_train_steps) {
        if (tr->batch_index >= bpe) LORA_TRY(epoch_end(tr));
        double t0 = mono_s();
        int64_t images = 0;
        /* what a failed or cancelled micro-step must undo, so the trainer stays at this step
         * boundary (and a state saved now resumes exactly) */
        struct lora_mt19937 rng0 = tr->rng;
        const int64_t bi0 = tr->batch_index, ss0 = tr->sched_steps, ln0 = tr->loss_n;
        const double lt0 = tr->loss_total, ll0 = tr->last_loss;
        memcpy(tr->loss_undo, tr->loss_list, (size_t)bpe * sizeof(double));
        /* micro-steps up to the next sync: every G-th of the epoch, and its last */
        for (;;) {
            int sync = (tr->batch_index + 1) % G == 0 || tr->batch_index + 1 == bpe;
            double loss = 0;
            int skipped = 0;
            lora_status s = micro_step(tr, sync, &loss, &images, &skipped);
            if (s != LORA_OK) {
                train_zero_grad(&tr->st);
                tr->rng = rng0;
                tr->found_inf = 0;
                tr->batch_index = bi0;
                tr->sched_steps = ss0;
                tr->loss_n = ln0;
                tr->loss_total = lt0;
                tr->last_loss = ll0;
                memcpy(tr->loss_list, tr->loss_undo, (size_t)bpe * sizeof(double));
                tr->accum = 0;
                return s;
            }
            if (!skipped) tr->sched_steps++;
            /* kohya's running average over the epoch's step positions */
            int64_t pos = tr->batch_index;
            if (tr->epoch == 0 && tr->loss_n <= pos) {
                tr->loss_list[pos] = loss;
                tr->loss_n = pos + 1;
            } else {
                tr->loss_total -= tr->loss_list[pos];
                tr->loss_list[pos] = loss;
            }
            tr->loss_total += loss;
            tr->last_loss = loss;
            tr->batch_index++;
            if (sync) break;
        }
        tr->global_step++;
        taken++;
        double dt = mono_s() - t0;
        tr->images_per_s = dt > 0 ? (double)images / dt : 0;
        if (done) *done = taken;
        if (tr->c.output_dir[0] && tr->c.save_every_n_steps > 0 && tr->global_step % tr->c.save_every_n_steps == 0 &&
            tr->global_step < tr->max_train_steps) {
            char path[TRAINER_PATH + 1200], stem[1100];
            LORA_TRY(ensure_output_dir(tr));
            snprintf(stem, sizeof stem, "%s-step%08lld", model_name(tr, 0), (long long)tr->global_step);
            LORA_TRY(out_path(tr, path, sizeof path, stem, tr->c.save_model_as));
            LORA_TRY(trainer_save_network(tr, path));
        }
        LORA_TRY(lora_progress(ctx, LORA_PHASE_TRAIN_STEP, tr->global_step, tr->max_train_steps, tr->last_loss));
    }
    /* an epoch that ended exactly here is closed (its save) before returning */
    if (tr->batch_index >= bpe && tr->global_step < tr->max_train_steps) LORA_TRY(epoch_end(tr));
    return LORA_OK;
}

lora_status trainer_run(struct lora_trainer *tr) {
    if (!tr->finished) {
        int64_t done = 0;
        LORA_TRY(trainer_step(tr, INT64_MAX, &done));
        tr->finished = 1;
    }
    return trainer_save_final(tr);
}

void trainer_fingerprint(const struct lora_trainer *tr, char *buf, size_t cap) {
    const struct trainer_cfg *c = &tr->c;
    const struct train_opts *o = &tr->topts;
    int64_t params = 0;
    for (int64_t i = 0; i < tr->net->n; i++) params += tr->net->m[i].rank * (tr->net->m[i].in + tr->net->m[i].out);
    snprintf(buf, cap,
             "modules=%lld\nlora_params=%lld\nnetwork_dim=%lld\nnetwork_alpha=%.17g\noptimizer=%d\n"
             "betas=%.17g,%.17g\neps=%.17g\nweight_decay=%.17g\nmomentum=%.17g\nunet_lr=%.17g\ntext_encoder_lr=%.17g\n"
             "lr_scheduler=%s\nlr_warmup_steps=%lld\nnum_cycles=%lld\npower=%.17g\nmax_train_steps=%lld\n"
             "train_batch_size=%lld\ngradient_accumulation_steps=%lld\nbatches_per_epoch=%lld\nnum_train_images=%lld\n"
             "num_reg_images=%lld\nresolution=%dx%d\nseed=%lld\nmixed_precision=%s\nnoise_offset=%.17g\nclip_skip=%lld\n"
             "max_grad_norm=%.17g\nv_parameterization=%d\ntrain_unet=%d\ntrain_text_encoder=%d\ncache_latents=%d\n"
             "min_snr_gamma=%.17g\nmax_token_length=%lld\n",
             (long long)tr->net->n, (long long)params, (long long)c->network_dim, c->network_alpha, (int)o->optimizer,
             o->beta1, o->beta2, o->eps, o->weight_decay, o->momentum, o->unet_lr, o->text_encoder_lr, c->lr_scheduler,
             (long long)c->warmup, (long long)c->num_cycles, c->lr_power, (long long)tr->max_train_steps,
             (long long)c->batch_size, (long long)c->grad_accum, (long long)tr->src.batches_per_epoch,
             (long long)tr->src.n_train_images, (long long)tr->src.n_reg_images, (int)c->width, (int)c->height,
             (long long)c->seed, c->mixed_precision, c->noise_offset, (long long)c->clip_skip, c->max_grad_norm,
             (int)o->v_parameterization, (int)o->train_unet, (int)o->train_text_encoder, (int)c->cache_latents,
             c->min_snr_gamma, (long long)c->max_token_length);
}
