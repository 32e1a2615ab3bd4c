/* lora_params: a bag of typed values on pinned keys named after kohya's flags. One static
 * table holds name, type, default and bounds; the bag holds one slot per table row. */
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"
#include "core/utf8.h"

#define PARAM_STRING_MAX 4095

struct param_def {
    lora_param key;
    const char *name;
    lora_param_type type;
    double def, min, max;     /* numeric keys */
    const char *sdef;         /* string keys */
    const char *choices;      /* "a|b|c": allowed strings (NULL = any) */
    int resolution;           /* validated as "W" or "W,H" */
};

#define PI(k, n, d, lo, hi) { k, n, LORA_PARAM_INT, d, lo, hi, NULL, NULL, 0 }
#define PF(k, n, d, lo, hi) { k, n, LORA_PARAM_FLOAT, d, lo, hi, NULL, NULL, 0 }
#define PS(k, n, d, ch) { k, n, LORA_PARAM_STRING, 0, 0, 0, d, ch, 0 }

/* Sorted by key (lora_param_at enumerates in this order). */
static const struct param_def defs[] = {
    PS(LORA_P_PRETRAINED_MODEL_NAME_OR_PATH, "pretrained_model_name_or_path", "", NULL),
    PI(LORA_P_V2, "v2", 0, 0, 1),
    PI(LORA_P_V_PARAMETERIZATION, "v_parameterization", 0, 0, 1),
    PI(LORA_P_NETWORK_DIM, "network_dim", 4, 1, 4096),
    PF(LORA_P_NETWORK_ALPHA, "network_alpha", 1, 0, 65536),
    PS(LORA_P_NETWORK_MODULE, "network_module", "networks.lora", "networks.lora"),
    PS(LORA_P_NETWORK_WEIGHTS, "network_weights", "", NULL),
    PI(LORA_P_NETWORK_TRAIN_UNET_ONLY, "network_train_unet_only", 0, 0, 1),
    PI(LORA_P_NETWORK_TRAIN_TEXT_ENCODER_ONLY, "network_train_text_encoder_only", 0, 0, 1),
    PI(LORA_P_CONV_DIM, "conv_dim", 0, 0, 4096),
    PF(LORA_P_CONV_ALPHA, "conv_alpha", 1, 0, 65536),
    PF(LORA_P_LEARNING_RATE, "learning_rate", 2e-6, 0, 10),
    PF(LORA_P_UNET_LR, "unet_lr", 0, 0, 10),
    PF(LORA_P_TEXT_ENCODER_LR, "text_encoder_lr", 0, 0, 10),
    { LORA_P_RESOLUTION, "resolution", LORA_PARAM_STRING, 0, 0, 0, "512", NULL, 1 },
    PI(LORA_P_TRAIN_BATCH_SIZE, "train_batch_size", 1, 1, 1024),
    PI(LORA_P_MAX_TRAIN_STEPS, "max_train_steps", 1600, 1, 2147483647.0),
    PI(LORA_P_MAX_TRAIN_EPOCHS, "max_train_epochs", 0, 0, 1e6),
    PI(LORA_P_SEED, "seed", -1, -1, 4294967295.0),
    PS(LORA_P_MIXED_PRECISION, "mixed_precision", "no", "no|fp16|bf16"),
    PI(LORA_P_GRADIENT_ACCUMULATION_STEPS, "gradient_accumulation_steps", 1, 1, 4096),
    PI(LORA_P_GRADIENT_CHECKPOINTING, "gradient_checkpointing", 0, 0, 1),
    PS(LORA_P_LR_SCHEDULER, "lr_scheduler", "constant",
       "constant|constant_with_warmup|linear|cosine|cosine_with_restarts|polynomial"),
    PI(LORA_P_LR_WARMUP_STEPS, "lr_warmup_steps", 0, 0, 2147483647.0),
    PI(LORA_P_LR_SCHEDULER_NUM_CYCLES, "lr_scheduler_num_cycles", 1, 1, 1e6),
    PF(LORA_P_LR_SCHEDULER_POWER, "lr_scheduler_power", 1, 0, 100),
    PS(LORA_P_OPTIMIZER_TYPE, "optimizer_type", "AdamW", "AdamW|AdamW8bit|Lion|SGDNesterov|DAdaptation|AdaFactor"),
    PF(LORA_P_MAX_GRAD_NORM, "max_grad_norm", 1, 0, 1e6),
    PI(LORA_P_CLIP_SKIP, "clip_skip", 1, 1, 12),
    PI(LORA_P_MAX_TOKEN_LENGTH, "max_token_length", 75, 75, 225),
    PF(LORA_P_NOISE_OFFSET, "noise_offset", 0, 0, 1),
    PF(LORA_P_MIN_SNR_GAMMA, "min_snr_gamma", 0, 0, 1000),
    PS(LORA_P_TRAIN_DATA_DIR, "train_data_dir", "", NULL),
    PS(LORA_P_REG_DATA_DIR, "reg_data_dir", "", NULL),
    PS(LORA_P_CAPTION_EXTENSION, "caption_extension", ".caption", NULL),
    PI(LORA_P_SHUFFLE_CAPTION, "shuffle_caption", 0, 0, 1),
    PI(LORA_P_KEEP_TOKENS, "keep_tokens", 0, 0, 1000),
    PI(LORA_P_ENABLE_BUCKET, "enable_bucket", 0, 0, 1),
    PI(LORA_P_MIN_BUCKET_RESO, "min_bucket_reso", 256, 64, 8192),
    PI(LORA_P_MAX_BUCKET_RESO, "max_bucket_reso", 1024, 64, 8192),
    PI(LORA_P_BUCKET_RESO_STEPS, "bucket_reso_steps", 64, 8, 1024),
    PI(LORA_P_BUCKET_NO_UPSCALE, "bucket_no_upscale", 0, 0, 1),
    PI(LORA_P_CACHE_LATENTS, "cache_latents", 0, 0, 1),
    PI(LORA_P_FLIP_AUG, "flip_aug", 0, 0, 1),
    PI(LORA_P_COLOR_AUG, "color_aug", 0, 0, 1),
    PI(LORA_P_RANDOM_CROP, "random_crop", 0, 0, 1),
    PF(LORA_P_PRIOR_LOSS_WEIGHT, "prior_loss_weight", 1, 0, 1000),
    PF(LORA_P_CAPTION_DROPOUT_RATE, "caption_dropout_rate", 0, 0, 1),
    PI(LORA_P_SAVE_EVERY_N_EPOCHS, "save_every_n_epochs", 0, 0, 1e6),
    PS(LORA_P_OUTPUT_DIR, "output_dir", "", NULL),
    PS(LORA_P_OUTPUT_NAME, "output_name", "", NULL),
    PI(LORA_P_SAVE_STATE, "save_state", 0, 0, 1),
    PS(LORA_P_RESUME, "resume", "", NULL),
    PI(LORA_P_CAPTION_DROPOUT_EVERY_N_EPOCHS, "caption_dropout_every_n_epochs", 0, 0, 1e6),
    PF(LORA_P_CAPTION_TAG_DROPOUT_RATE, "caption_tag_dropout_rate", 0, 0, 1),
    PI(LORA_P_CACHE_LATENTS_TO_DISK, "cache_latents_to_disk", 0, 0, 1),
    PS(LORA_P_BAD_IMAGE, "bad_image", "skip", "skip|refuse"),
    PS(LORA_P_FACE_CROP_AUG_RANGE, "face_crop_aug_range", "", NULL),
    PS(LORA_P_OPTIMIZER_ARGS, "optimizer_args", "", NULL),
    PI(LORA_P_SAVE_LAST_N_EPOCHS, "save_last_n_epochs", 0, 0, 1e6),
    PI(LORA_P_SAVE_N_EPOCH_RATIO, "save_n_epoch_ratio", 0, 0, 1e6),
    PI(LORA_P_SAVE_EVERY_N_STEPS, "save_every_n_steps", 0, 0, 2147483647.0),
    PS(LORA_P_TRAINING_COMMENT, "training_comment", "", NULL),
    /* generation (4000; seed is LORA_P_SEED, clip_skip LORA_P_CLIP_SKIP) */
    PS(LORA_P_PROMPT, "prompt", "", NULL),
    PS(LORA_P_NEGATIVE_PROMPT, "negative_prompt", "", NULL),
    PI(LORA_P_STEPS, "steps", 50, 1, 1000),
    PF(LORA_P_SCALE, "scale", 7.5, 0, 1000),
    PF(LORA_P_NEGATIVE_SCALE, "negative_scale", 0, -1000, 1000),
    PS(LORA_P_SAMPLER, "sampler", "ddim",
       "ddim|pndm|lms|euler|euler_a|heun|dpm_2|dpm_2_a|dpmsolver|dpmsolver++|dpmsingle|k_lms|k_euler|k_euler_a|"
       "k_dpm_2|k_dpm_2_a"),
    PI(LORA_P_W, "W", 512, 8, 16384),
    PI(LORA_P_H, "H", 512, 8, 16384),
    PI(LORA_P_BATCH_SIZE, "batch_size", 1, 1, 64),
    PI(LORA_P_IMAGES_PER_PROMPT, "images_per_prompt", 1, 1, 100000),
    PI(LORA_P_ITER_SAME_SEED, "iter_same_seed", 0, 0, 1),
    PS(LORA_P_RNG, "rng", "cpu", "cpu|cuda"),
    PF(LORA_P_STRENGTH, "strength", 0.8, 0, 1),
    PS(LORA_P_IMAGE_PATH, "image_path", "", NULL),
    PS(LORA_P_VAE, "vae", "", NULL),
    PI(LORA_P_MAX_EMBEDDINGS_MULTIPLES, "max_embeddings_multiples", 1, 1, 64),
    PI(LORA_P_CLIP_SAMPLE, "clip_sample", 0, 0, 1),
    PS(LORA_P_MODEL_HASH, "model_hash", "", NULL),
    PS(LORA_P_LORA_HASHES, "lora_hashes", "", NULL),
    PS(LORA_P_SEEDS, "seeds", "", NULL),
    PI(LORA_P_JPEG_QUALITY, "jpeg_quality", 80, 1, 100),
    PI(LORA_P_WEBP_LOSSLESS, "webp_lossless", 0, 0, 1),
    /* merge / extract / resize (5000) */
    PI(LORA_P_DIM, "dim", 4, 1, 4096),
    PF(LORA_P_CLAMP_QUANTILE, "clamp_quantile", 0.99, 1e-6, 1),
    PF(LORA_P_MIN_DIFF, "min_diff", 0.01, 0, 1e6),
    PS(LORA_P_SVD, "svd", "exact", "exact|randomized|gram"),
    PI(LORA_P_NEW_RANK, "new_rank", 0, 0, 4096),
    PI(LORA_P_NEW_CONV_RANK, "new_conv_rank", 0, 0, 4096),
    PS(LORA_P_DYNAMIC_METHOD, "dynamic_method", "", "|sv_ratio|sv_fro|sv_cumulative"),
    PF(LORA_P_DYNAMIC_PARAM, "dynamic_param", 0, 0, 1e6),
    PS(LORA_P_PRECISION, "precision", "float", "float|fp16|bf16"),
    PS(LORA_P_RATIOS, "ratios", "", NULL),
    PS(LORA_P_DEVICE, "device", "", "|cpu|cuda"),
    PS(LORA_P_SAVE_MODEL_AS, "save_model_as", "safetensors", "ckpt|pt|safetensors|diffusers|diffusers_safetensors"),
    PS(LORA_P_SAVE_PRECISION, "save_precision", "", "|float|fp16|bf16"),
    PI(LORA_P_NO_METADATA, "no_metadata", 0, 0, 1),
};
#define N_DEFS ((int)(sizeof defs / sizeof defs[0]))

union param_value {
    int64_t i;
    double f;
    char *s;
};

#define LORA_PARAMS_MAGIC 0x50524d53u /* "PRMS" */

struct lora_params {
    uint32_t magic;
    lora_ctx *ctx;
    union param_value v[N_DEFS];
};

static int def_index(lora_param key) {
    int lo = 0, hi = N_DEFS - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (defs[mid].key == key) return mid;
        if (defs[mid].key < key) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

static int params_valid(const lora_params *p) { return p && p->magic == LORA_PARAMS_MAGIC; }

static void params_clear_strings(lora_params *p) {
    for (int i = 0; i < N_DEFS; i++)
        if (defs[i].type == LORA_PARAM_STRING) {
            lora_free(p->ctx, p->v[i].s);
            p->v[i].s = NULL;
        }
}

/* Strings keep NULL for "the default" so reset cannot fail on allocation. */
static void params_defaults(lora_params *p) {
    params_clear_strings(p);
    for (int i = 0; i < N_DEFS; i++) {
        if (defs[i].type == LORA_PARAM_INT) p->v[i].i = (int64_t)defs[i].def;
        else if (defs[i].type == LORA_PARAM_FLOAT) p->v[i].f = defs[i].def;
    }
}

LORA_API lora_status lora_params_create(lora_ctx *ctx, lora_params **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    if (!out) {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_params_create: out is NULL");
    } else {
        lora_params *p = lora_calloc(ctx, 1, sizeof *p);
        if (!p) {
            s = LORA_E_NOMEM;
        } else {
            p->magic = LORA_PARAMS_MAGIC;
            p->ctx = ctx;
            params_defaults(p);
            lora_ctx_retain(ctx);
            *out = p;
        }
    }
    lora_leave(ctx);
    return s;
}

LORA_API void lora_params_free(lora_params *p) {
    if (!params_valid(p)) return;
    lora_ctx *ctx = p->ctx;
    params_clear_strings(p);
    p->magic = 0;
    lora_free(ctx, p);
    lora_ctx_release(ctx);
}

LORA_API lora_status lora_params_reset(lora_params *p) {
    if (!params_valid(p)) return LORA_E_INVALID_ARG;
    LORA_TRY(lora_enter(p->ctx));
    params_defaults(p);
    lora_leave(p->ctx);
    return LORA_OK;
}

/* Finds the key and checks the type; enters the context on success. */
static lora_status param_begin(const lora_params *p, lora_param key, lora_param_type want, int *idx) {
    if (!params_valid(p)) return LORA_E_INVALID_ARG;
    LORA_TRY(lora_enter(p->ctx));
    int i = def_index(key);
    if (i < 0) {
        lora_status s = lora_fail(p->ctx, LORA_E_UNKNOWN_KEY, "parameter key %d is not known", key);
        lora_leave(p->ctx);
        return s;
    }
    int ok = defs[i].type == want || (want == LORA_PARAM_INT && defs[i].type == LORA_PARAM_FLOAT);
    if (!ok) {
        static const char *tn[] = {"?", "int", "float", "string"};
        lora_status s = lora_fail(p->ctx, LORA_E_INVALID_ARG, "parameter %s is of type %s, not %s", defs[i].name,
                                  tn[defs[i].type], tn[want]);
        lora_leave(p->ctx);
        return s;
    }
    *idx = i;
    return LORA_OK;
}

static lora_status set_number(lora_params *p, int i, double value, int64_t ivalue, int is_int) {
    const struct param_def *d = &defs[i];
    if (is_int) value = (double)ivalue;
    if (!isfinite(value))
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: value is not a finite number", d->name);
    if (value < d->min || value > d->max)
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: %.17g is outside %.17g..%.17g", d->name, value, d->min, d->max);
    if (d->key == LORA_P_MAX_TOKEN_LENGTH && ivalue != 75 && ivalue != 150 && ivalue != 225)
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "max_token_length: %lld is not 75, 150 or 225", (long long)ivalue);
    if (d->type == LORA_PARAM_INT) p->v[i].i = ivalue;
    else p->v[i].f = value;
    return LORA_OK;
}

LORA_API lora_status lora_params_set_int(lora_params *p, lora_param key, int64_t value) {
    int i;
    LORA_TRY(param_begin(p, key, LORA_PARAM_INT, &i));
    lora_status s = set_number(p, i, 0, value, 1);
    lora_leave(p->ctx);
    return s;
}

LORA_API lora_status lora_params_set_float(lora_params *p, lora_param key, double value) {
    int i;
    LORA_TRY(param_begin(p, key, LORA_PARAM_FLOAT, &i));
    lora_status s = defs[i].type == LORA_PARAM_FLOAT
        ? set_number(p, i, value, 0, 0)
        : lora_fail(p->ctx, LORA_E_INVALID_ARG, "parameter %s is an integer", defs[i].name);
    lora_leave(p->ctx);
    return s;
}

static int choice_ok(const char *choices, const char *v) {
    size_t n = strlen(v);
    const char *c = choices;
    for (;;) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && strncmp(c, v, n) == 0) return 1;
        if (!bar) return 0;
        c = bar + 1;
    }
}

/* "W" or "W,H": multiples of 64 in 64..8192 (VAE /8, then the U-Net halves the latent 3x). */
static int resolution_ok(const char *v) {
    long dims[2];
    int n = 0;
    const char *c = v;
    while (n < 2) {
        if (*c < '0' || *c > '9') return 0;
        long x = 0;
        while (*c >= '0' && *c <= '9') {
            x = x * 10 + (*c - '0');
            if (x > 100000) return 0;
            c++;
        }
        dims[n++] = x;
        if (*c == ',') { c++; continue; }
        break;
    }
    if (*c != '\0') return 0;
    for (int i = 0; i < n; i++)
        if (dims[i] < 64 || dims[i] > 8192 || dims[i] % 64 != 0) return 0;
    return 1;
}

static lora_status set_string(lora_params *p, int i, const char *utf8) {
    const struct param_def *d = &defs[i];
    if (!utf8) return lora_fail(p->ctx, LORA_E_INVALID_ARG, "%s: value is NULL", d->name);
    size_t n = strlen(utf8);
    if (n > PARAM_STRING_MAX) return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: %zu bytes exceed %d", d->name, n, PARAM_STRING_MAX);
    size_t bad = 0;
    if (!utf8_valid((const uint8_t *)utf8, n, &bad))
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: value is not valid UTF-8 (byte %zu)", d->name, bad);
    if (d->choices && !choice_ok(d->choices, utf8))
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: \"%s\" is not one of %s", d->name, utf8, d->choices);
    if (d->resolution && !resolution_ok(utf8))
        return lora_fail(p->ctx, LORA_E_CONFIG_RANGE,
                         "%s: \"%s\" must be W or W,H with each side a multiple of 64 in 64..8192", d->name, utf8);
    char *copy = lora_strdup(p->ctx, utf8);
    if (!copy) return LORA_E_NOMEM;
    lora_free(p->ctx, p->v[i].s);
    p->v[i].s = copy;
    return LORA_OK;
}

LORA_API lora_status lora_params_set_string(lora_params *p, lora_param key, const char *utf8) {
    int i;
    LORA_TRY(param_begin(p, key, LORA_PARAM_STRING, &i));
    lora_status s = set_string(p, i, utf8);
    lora_leave(p->ctx);
    return s;
}

/* Locale-independent strict number parsing: the whole text must be a number. */
static int parse_double(const char *text, double *out) {
    if (!*text || strchr(text, ',')) return 0;
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c == (locale_t)0) return 0;
    char *end = NULL;
    double v = strtod_l(text, &end, c);
    freelocale(c);
    if (end == text || *end != '\0') return 0;
    *out = v;
    return 1;
}

static int parse_int(const char *text, int64_t *out) {
    const char *c = text;
    int neg = 0;
    if (*c == '-' || *c == '+') neg = *c++ == '-';
    if (*c < '0' || *c > '9') return 0;
    uint64_t v = 0;
    for (; *c >= '0' && *c <= '9'; c++) {
        if (v > (UINT64_C(1) << 62)) return 0;
        v = v * 10 + (uint64_t)(*c - '0');
    }
    if (*c != '\0' || v > (uint64_t)INT64_MAX) return 0;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 1;
}

LORA_API lora_status lora_params_parse(lora_params *p, const char *name, const char *text) {
    if (!params_valid(p)) return LORA_E_INVALID_ARG;
    lora_param key;
    lora_param_type type;
    lora_status s = lora_param_lookup(name, &key, &type);
    if (s != LORA_OK) {
        LORA_TRY(lora_enter(p->ctx));
        s = lora_fail(p->ctx, s, "parameter \"%s\" is not known", name ? name : "(null)");
        lora_leave(p->ctx);
        return s;
    }
    int i;
    LORA_TRY(param_begin(p, key, type, &i));
    const struct param_def *d = &defs[i];
    if (!text) {
        s = lora_fail(p->ctx, LORA_E_INVALID_ARG, "%s: value is NULL", d->name);
    } else if (type == LORA_PARAM_STRING) {
        s = set_string(p, i, text);
    } else if (type == LORA_PARAM_INT) {
        int64_t v;
        if (d->max == 1 && d->min == 0 && (strcasecmp(text, "true") == 0 || strcasecmp(text, "false") == 0))
            s = set_number(p, i, 0, text[0] == 't' || text[0] == 'T', 1);
        else if (parse_int(text, &v))
            s = set_number(p, i, 0, v, 1);
        else
            s = lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: \"%s\" is not an integer", d->name, text);
    } else {
        double v;
        if (parse_double(text, &v))
            s = set_number(p, i, v, 0, 0);
        else
            s = lora_fail(p->ctx, LORA_E_CONFIG_RANGE, "%s: \"%s\" is not a number (use a '.' decimal point)", d->name, text);
    }
    lora_leave(p->ctx);
    return s;
}

LORA_API lora_status lora_params_get_int(const lora_params *p, lora_param key, int64_t *out) {
    int i;
    LORA_TRY(param_begin(p, key, LORA_PARAM_INT, &i));
    lora_status s = LORA_OK;
    if (!out) s = lora_fail(p->ctx, LORA_E_INVALID_ARG, "get_int: out is NULL");
    else if (defs[i].type != LORA_PARAM_INT) s = lora_fail(p->ctx, LORA_E_INVALID_ARG, "parameter %s is a float", defs[i].name);
    else *out = p->v[i].i;
    lora_leave(p->ctx);
    return s;
}

LORA_API lora_status lora_params_get_float(const lora_params *p, lora_param key, double *out) {
    if (!params_valid(p)) return LORA_E_INVALID_ARG;
    int i = def_index(key);
    lora_param_type want = (i >= 0 && defs[i].type == LORA_PARAM_INT) ? LORA_PARAM_INT : LORA_PARAM_FLOAT;
    LORA_TRY(param_begin(p, key, want, &i));
    lora_status s = LORA_OK;
    if (!out) s = lora_fail(p->ctx, LORA_E_INVALID_ARG, "get_float: out is NULL");
    else *out = defs[i].type == LORA_PARAM_INT ? (double)p->v[i].i : p->v[i].f;
    lora_leave(p->ctx);
    return s;
}

LORA_API lora_status lora_params_get_string(const lora_params *p, lora_param key, char *buf, size_t cap, size_t *needed) {
    int i;
    LORA_TRY(param_begin(p, key, LORA_PARAM_STRING, &i));
    const char *v = p->v[i].s ? p->v[i].s : defs[i].sdef;
    size_t need = strlen(v) + 1;
    if (needed) *needed = need;
    if (buf && cap > 0) {
        size_t n = need <= cap ? need - 1 : cap - 1;
        memcpy(buf, v, n);
        buf[n] = '\0';
    }
    lora_leave(p->ctx);
    return LORA_OK;
}

LORA_API lora_status lora_param_lookup(const char *name, lora_param *key, lora_param_type *type) {
    if (!name) return LORA_E_INVALID_ARG;
    if (name[0] == '-' && name[1] == '-') name += 2;
    for (int i = 0; i < N_DEFS; i++) {
        if (strcmp(defs[i].name, name) == 0) {
            if (key) *key = defs[i].key;
            if (type) *type = defs[i].type;
            return LORA_OK;
        }
    }
    return LORA_E_UNKNOWN_KEY;
}

LORA_API const char *lora_param_name(lora_param key) {
    int i = def_index(key);
    return i < 0 ? NULL : defs[i].name;
}

LORA_API lora_status lora_param_bounds(lora_param key, double *min, double *max, double *default_value) {
    int i = def_index(key);
    if (i < 0) return LORA_E_UNKNOWN_KEY;
    if (defs[i].type == LORA_PARAM_STRING) return LORA_E_INVALID_ARG;
    if (min) *min = defs[i].min;
    if (max) *max = defs[i].max;
    if (default_value) *default_value = defs[i].def;
    return LORA_OK;
}

LORA_API lora_param lora_param_at(int32_t index) {
    return (index >= 0 && index < N_DEFS) ? defs[index].key : 0;
}

int64_t lora_params_int(const lora_params *p, lora_param key) {
    int i = def_index(key);
    if (i < 0) return 0;
    if (!params_valid(p)) return (int64_t)defs[i].def;
    return defs[i].type == LORA_PARAM_INT ? p->v[i].i : (int64_t)p->v[i].f;
}

double lora_params_float(const lora_params *p, lora_param key) {
    int i = def_index(key);
    if (i < 0) return 0;
    if (!params_valid(p)) return defs[i].def;
    return defs[i].type == LORA_PARAM_INT ? (double)p->v[i].i : p->v[i].f;
}

const char *lora_params_str(const lora_params *p, lora_param key) {
    int i = def_index(key);
    if (i < 0 || defs[i].type != LORA_PARAM_STRING) return "";
    if (!params_valid(p) || !p->v[i].s) return defs[i].sdef;
    return p->v[i].s;
}
