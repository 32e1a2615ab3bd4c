/* Diffusers folders: model_index.json, unet/, vae/, text_encoder/ (+ scheduler/) with
 * config.json and weights as .safetensors or .bin. Configs are read and written in the form
 * diffusers 0.10.2 / transformers 4.25.1 use. A save builds the folder under a temp name
 * beside the target and renames it into place, so a failed save leaves nothing half-written. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "io/atomic_file.h"
#include "io/ckpt.h"
#include "io/diffusers.h"
#include "io/st_map.h"

#define PATH_CAP 4096

/* out = a/b; 0 when it does not fit PATH_CAP (callers reject long roots up front) */
static int pjoin(char *out, const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na + 1 + nb + 1 > PATH_CAP) return 0;
    memmove(out, a, na);
    out[na] = '/';
    memcpy(out + na + 1, b, nb + 1);
    return 1;
}

static int is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int diffusers_is_folder(const char *path) {
    char p[PATH_CAP];
    pjoin(p, path, "model_index.json");
    return is_dir(path) && is_file(p);
}

static lora_status load_json(lora_ctx *ctx, const char *path, json_t **out) {
    json_error_t err;
    *out = json_load_file(path, JSON_REJECT_DUPLICATES, &err);
    if (!*out) {
        if (!is_file(path)) return lora_fail(ctx, LORA_E_NOT_FOUND, "%s: missing", path);
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: line %d: %s", path, err.line, err.text);
    }
    if (!json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a JSON object", path);
    }
    return LORA_OK;
}

/* Integer field; `required` fields missing or not integers -> error naming the file. */
static lora_status json_int(lora_ctx *ctx, const char *file, json_t *o, const char *key, int required, int32_t *out) {
    json_t *v = json_object_get(o, key);
    if (!v && !required) return LORA_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: \"%s\" is missing or not a non-negative integer", file, key);
    *out = (int32_t)json_integer_value(v);
    return LORA_OK;
}

static lora_status json_int_list(lora_ctx *ctx, const char *file, json_t *o, const char *key, int32_t *out,
                                 int32_t *n) {
    json_t *a = json_object_get(o, key);
    if (!json_is_array(a) || json_array_size(a) == 0 || json_array_size(a) > SD_MAX_LEVELS)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: \"%s\" must be a list of 1..%d integers", file, key, SD_MAX_LEVELS);
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > INT32_MAX)
            return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: \"%s\"[%zu] is not a positive integer", file, key, i);
        out[i] = (int32_t)json_integer_value(v);
    }
    *n = (int32_t)json_array_size(a);
    return LORA_OK;
}

/* Weights of one component: `<dir>/<stem>.safetensors`, else `<dir>/<bin_name>`. */
static lora_status load_weights(lora_ctx *ctx, const char *dir, const char *st_name, const char *bin_name,
                                struct tensor_map *out, struct lora_file **keep) {
    char p[PATH_CAP];
    pjoin(p, dir, st_name);
    if (is_file(p)) return st_read_map(ctx, p, out, keep);
    pjoin(p, dir, bin_name);
    if (is_file(p)) return ckpt_read(ctx, p, out);
    return lora_fail(ctx, LORA_E_NOT_FOUND, "%s: no weights (%s or %s)", dir, st_name, bin_name);
}

static lora_status read_unet_config(lora_ctx *ctx, const char *file, json_t *c, struct sd_config *cfg) {
    int32_t n = 0;
    LORA_TRY(json_int(ctx, file, c, "in_channels", 1, &cfg->unet_in_channels));
    LORA_TRY(json_int(ctx, file, c, "out_channels", 1, &cfg->unet_out_channels));
    LORA_TRY(json_int(ctx, file, c, "layers_per_block", 1, &cfg->layers_per_block));
    LORA_TRY(json_int(ctx, file, c, "cross_attention_dim", 1, &cfg->context_dim));
    LORA_TRY(json_int_list(ctx, file, c, "block_out_channels", cfg->block_channels, &cfg->n_levels));
    json_t *types = json_object_get(c, "down_block_types");
    if (!json_is_array(types) || (int32_t)json_array_size(types) != cfg->n_levels)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: down_block_types must list one block per level", file);
    for (int32_t i = 0; i < cfg->n_levels; i++) {
        const char *t = json_string_value(json_array_get(types, (size_t)i));
        cfg->attn_levels[i] = t && strncmp(t, "CrossAttn", 9) == 0;
    }
    /* attention_head_dim: in diffusers 0.10 the number of heads, one int or one per level */
    json_t *h = json_object_get(c, "attention_head_dim");
    if (json_is_integer(h)) {
        for (int32_t i = 0; i < cfg->n_levels; i++) cfg->heads[i] = (int32_t)json_integer_value(h);
    } else {
        LORA_TRY(json_int_list(ctx, file, c, "attention_head_dim", cfg->heads, &n));
        if (n != cfg->n_levels)
            return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: attention_head_dim lists %d levels, block_out_channels %d",
                             file, n, cfg->n_levels);
    }
    cfg->use_linear_projection = json_is_true(json_object_get(c, "use_linear_projection"));
    cfg->unet_norm_groups = 32;   /* diffusers' default when the config omits it */
    return json_int(ctx, file, c, "norm_num_groups", 0, &cfg->unet_norm_groups);
}

static lora_status read_te_config(lora_ctx *ctx, const char *file, json_t *c, struct sd_config *cfg) {
    LORA_TRY(json_int(ctx, file, c, "hidden_size", 1, &cfg->te_hidden));
    LORA_TRY(json_int(ctx, file, c, "num_hidden_layers", 1, &cfg->te_layers));
    LORA_TRY(json_int(ctx, file, c, "num_attention_heads", 1, &cfg->te_heads));
    LORA_TRY(json_int(ctx, file, c, "intermediate_size", 1, &cfg->te_intermediate));
    LORA_TRY(json_int(ctx, file, c, "max_position_embeddings", 1, &cfg->te_max_positions));
    LORA_TRY(json_int(ctx, file, c, "vocab_size", 1, &cfg->te_vocab));
    const char *act = json_string_value(json_object_get(c, "hidden_act"));
    if (!act || (strcmp(act, "gelu") != 0 && strcmp(act, "quick_gelu") != 0))
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: hidden_act \"%s\" is not gelu or quick_gelu", file, act ? act : "?");
    cfg->te_gelu = strcmp(act, "gelu") == 0;
    return LORA_OK;
}

static lora_status read_vae_config(lora_ctx *ctx, const char *file, json_t *c, struct sd_config *cfg) {
    LORA_TRY(json_int(ctx, file, c, "latent_channels", 1, &cfg->vae_latent_channels));
    LORA_TRY(json_int(ctx, file, c, "layers_per_block", 1, &cfg->vae_layers_per_block));
    cfg->vae_norm_groups = 32;
    LORA_TRY(json_int(ctx, file, c, "norm_num_groups", 0, &cfg->vae_norm_groups));
    return json_int_list(ctx, file, c, "block_out_channels", cfg->vae_block_channels, &cfg->vae_n_levels);
}

lora_status diffusers_load(lora_ctx *ctx, const char *dir, struct sd_model *m, struct lora_file *keep[3]) {
    char p[PATH_CAP], comp[PATH_CAP];
    if (strlen(dir) > PATH_CAP - 128) return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: path too long", dir);
    json_t *j = NULL;
    lora_status s;
    pjoin(p, dir, "model_index.json");
    LORA_TRY(load_json(ctx, p, &j));
    json_decref(j);

    static const char *const names[3] = {"unet", "vae", "text_encoder"};
    for (int c = 0; c < 3; c++) {
        pjoin(comp, dir, names[c]);
        if (!is_dir(comp))
            return lora_fail(ctx, LORA_E_NOT_FOUND, "%s: the diffusers folder has no %s/ component", dir, names[c]);
        pjoin(p, comp, "config.json");
        LORA_TRY(load_json(ctx, p, &j));
        s = c == 0 ? read_unet_config(ctx, p, j, &m->cfg) : c == 1 ? read_vae_config(ctx, p, j, &m->cfg)
                                                                   : read_te_config(ctx, p, j, &m->cfg);
        json_decref(j);
        if (s != LORA_OK) return s;
        struct tensor_map *dst = c == 0 ? &m->unet : c == 1 ? &m->vae : &m->te;
        if (c < 2) s = load_weights(ctx, comp, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", dst,
                                    &keep[c]);
        else s = load_weights(ctx, comp, "model.safetensors", "pytorch_model.bin", dst, &keep[c]);
        if (s != LORA_OK) return s;
    }
    m->cfg.version = m->cfg.te_gelu ? 2 : 1;   /* OpenCLIP (gelu) text encoder: SD 2.x */
    pjoin(p, dir, "scheduler/scheduler_config.json");
    if (is_file(p)) {
        LORA_TRY(load_json(ctx, p, &j));
        const char *pt = json_string_value(json_object_get(j, "prediction_type"));
        m->cfg.v_prediction = pt && strcmp(pt, "v_prediction") == 0;
        json_decref(j);
    }
    return LORA_OK;
}

/* ---- save ----------------------------------------------------------------------------- */
static json_t *int_list(const int32_t *v, int32_t n) {
    json_t *a = json_array();
    for (int32_t i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

static json_t *str_list_levels(int32_t n, const int32_t *flags, const char *yes, const char *no, int reverse) {
    json_t *a = json_array();
    for (int32_t i = 0; i < n; i++) {
        int32_t f = flags[reverse ? n - 1 - i : i];
        json_array_append_new(a, json_string(f ? yes : no));
    }
    return a;
}

static json_t *unet_config(const struct sd_config *c) {
    json_t *o = json_object();
    json_object_set_new(o, "_class_name", json_string("UNet2DConditionModel"));
    json_object_set_new(o, "_diffusers_version", json_string("0.10.2"));
    json_object_set_new(o, "act_fn", json_string("silu"));
    int same = 1;
    for (int32_t i = 1; i < c->n_levels; i++) same &= c->heads[i] == c->heads[0];
    json_object_set_new(o, "attention_head_dim", same && c->version == 1 ? json_integer(c->heads[0])
                                                                          : int_list(c->heads, c->n_levels));
    json_object_set_new(o, "block_out_channels", int_list(c->block_channels, c->n_levels));
    json_object_set_new(o, "center_input_sample", json_false());
    json_object_set_new(o, "cross_attention_dim", json_integer(c->context_dim));
    json_object_set_new(o, "down_block_types", str_list_levels(c->n_levels, c->attn_levels, "CrossAttnDownBlock2D",
                                                               "DownBlock2D", 0));
    json_object_set_new(o, "downsample_padding", json_integer(1));
    json_object_set_new(o, "dual_cross_attention", json_false());
    json_object_set_new(o, "flip_sin_to_cos", json_true());
    json_object_set_new(o, "freq_shift", json_integer(0));
    json_object_set_new(o, "in_channels", json_integer(c->unet_in_channels));
    json_object_set_new(o, "layers_per_block", json_integer(c->layers_per_block));
    json_object_set_new(o, "mid_block_scale_factor", json_integer(1));
    json_object_set_new(o, "norm_eps", json_real(1e-5));
    json_object_set_new(o, "norm_num_groups", json_integer(c->unet_norm_groups));
    json_object_set_new(o, "num_class_embeds", json_null());
    json_object_set_new(o, "only_cross_attention", json_false());
    json_object_set_new(o, "out_channels", json_integer(c->unet_out_channels));
    json_object_set_new(o, "sample_size", json_integer(c->version == 2 && c->v_prediction ? 96 : 64));
    json_object_set_new(o, "up_block_types", str_list_levels(c->n_levels, c->attn_levels, "CrossAttnUpBlock2D",
                                                             "UpBlock2D", 1));
    json_object_set_new(o, "upcast_attention", json_false());
    json_object_set_new(o, "use_linear_projection", json_boolean(c->use_linear_projection));
    return o;
}

static json_t *vae_config(const struct sd_config *c) {
    json_t *o = json_object();
    int32_t ones[SD_MAX_LEVELS] = {1, 1, 1, 1, 1, 1, 1, 1};
    json_object_set_new(o, "_class_name", json_string("AutoencoderKL"));
    json_object_set_new(o, "_diffusers_version", json_string("0.10.2"));
    json_object_set_new(o, "act_fn", json_string("silu"));
    json_object_set_new(o, "block_out_channels", int_list(c->vae_block_channels, c->vae_n_levels));
    json_object_set_new(o, "down_block_types", str_list_levels(c->vae_n_levels, ones, "DownEncoderBlock2D", "", 0));
    json_object_set_new(o, "in_channels", json_integer(3));
    json_object_set_new(o, "latent_channels", json_integer(c->vae_latent_channels));
    json_object_set_new(o, "layers_per_block", json_integer(c->vae_layers_per_block));
    json_object_set_new(o, "norm_num_groups", json_integer(c->vae_norm_groups));
    json_object_set_new(o, "out_channels", json_integer(3));
    json_object_set_new(o, "sample_size", json_integer(c->version == 2 && c->v_prediction ? 768 : 512));
    json_object_set_new(o, "up_block_types", str_list_levels(c->vae_n_levels, ones, "UpDecoderBlock2D", "", 0));
    return o;
}

static json_t *te_config(const struct sd_config *c) {
    json_t *o = json_object();
    json_object_set_new(o, "architectures", json_pack("[s]", "CLIPTextModel"));
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "bos_token_id", json_integer(0));
    json_object_set_new(o, "dropout", json_real(0.0));
    json_object_set_new(o, "eos_token_id", json_integer(2));
    json_object_set_new(o, "hidden_act", json_string(c->te_gelu ? "gelu" : "quick_gelu"));
    json_object_set_new(o, "hidden_size", json_integer(c->te_hidden));
    json_object_set_new(o, "initializer_factor", json_real(1.0));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "intermediate_size", json_integer(c->te_intermediate));
    json_object_set_new(o, "layer_norm_eps", json_real(1e-5));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->te_max_positions));
    json_object_set_new(o, "model_type", json_string("clip_text_model"));
    json_object_set_new(o, "num_attention_heads", json_integer(c->te_heads));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->te_layers));
    json_object_set_new(o, "pad_token_id", json_integer(1));
    json_object_set_new(o, "projection_dim", json_integer(c->te_gelu ? 512 : 768));
    json_object_set_new(o, "torch_dtype", json_string("float32"));
    json_object_set_new(o, "transformers_version", json_string("4.25.1"));
    json_object_set_new(o, "vocab_size", json_integer(c->te_vocab));
    return o;
}

static json_t *scheduler_config(const struct sd_config *c) {
    json_t *o = json_object();
    json_object_set_new(o, "_class_name", json_string("DDIMScheduler"));
    json_object_set_new(o, "_diffusers_version", json_string("0.10.2"));
    json_object_set_new(o, "beta_end", json_real(0.012));
    json_object_set_new(o, "beta_schedule", json_string("scaled_linear"));
    json_object_set_new(o, "beta_start", json_real(0.00085));
    json_object_set_new(o, "clip_sample", json_false());
    json_object_set_new(o, "num_train_timesteps", json_integer(1000));
    json_object_set_new(o, "prediction_type", json_string(c->v_prediction ? "v_prediction" : "epsilon"));
    json_object_set_new(o, "set_alpha_to_one", json_false());
    json_object_set_new(o, "steps_offset", json_integer(1));
    json_object_set_new(o, "trained_betas", json_null());
    return o;
}

static json_t *model_index(void) {
    json_t *o = json_object();
    json_object_set_new(o, "_class_name", json_string("StableDiffusionPipeline"));
    json_object_set_new(o, "_diffusers_version", json_string("0.10.2"));
    json_object_set_new(o, "requires_safety_checker", json_false());
    json_object_set_new(o, "scheduler", json_pack("[ss]", "diffusers", "DDIMScheduler"));
    json_object_set_new(o, "text_encoder", json_pack("[ss]", "transformers", "CLIPTextModel"));
    json_object_set_new(o, "unet", json_pack("[ss]", "diffusers", "UNet2DConditionModel"));
    json_object_set_new(o, "vae", json_pack("[ss]", "diffusers", "AutoencoderKL"));
    return o;
}

/* json -> file through the atomic writer (inside the temp folder: plain atomicity is enough) */
static lora_status write_json(lora_ctx *ctx, const char *path, json_t *o) {
    char *text = o ? json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    if (!text) return lora_fail(ctx, LORA_E_NOMEM, "%s: could not format JSON", path);
    struct atomic_file af;
    lora_status s = atomic_file_begin(ctx, path, &af);
    if (s == LORA_OK) s = atomic_file_write(&af, text, strlen(text));
    if (s == LORA_OK) s = atomic_file_write(&af, "\n", 1);
    if (s == LORA_OK) s = atomic_file_commit(&af);
    else atomic_file_abort(&af);
    free(text);
    return s;
}

static void remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        char p[PATH_CAP];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            pjoin(p, path, e->d_name);
            if (is_dir(p)) remove_tree(p);
            else unlink(p);
        }
        closedir(d);
    }
    rmdir(path);
}

static int dir_is_empty(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) empty = 0;
    closedir(d);
    return empty;
}

/* Config values a diffusers folder needs but LDM files do not store: the key map fills
 * them by SD's rules where those apply (8 heads in v1, width/64 in v2, 32 groups); for
 * other widths (tiny test models) they stay 0 and the save is refused rather than guessed. */
static lora_status check_config(lora_ctx *ctx, const char *dir, const struct sd_config *c) {
    for (int32_t i = 0; i < c->n_levels; i++)
        if (c->attn_levels[i] && c->heads[i] <= 0)
            return lora_fail(ctx, LORA_E_UNSUPPORTED,
                             "%s: the attention head count of U-Net level %d (width %d) is unknown: LDM files do not "
                             "store it and SD's rule does not fit this width; convert from a diffusers folder instead",
                             dir, i, c->block_channels[i]);
    if (c->unet_norm_groups <= 0 || c->vae_norm_groups <= 0 || c->te_heads <= 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED,
                         "%s: GroupNorm groups or text-encoder heads are unknown (not stored in LDM files, and SD's "
                         "values do not fit these widths); convert from a diffusers folder instead", dir);
    return LORA_OK;
}

lora_status diffusers_save(lora_ctx *ctx, const char *dir, const struct sd_model *m, int safetensors) {
    if (strlen(dir) > PATH_CAP - 128) return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: path too long", dir);
    LORA_TRY(check_config(ctx, dir, &m->cfg));
    if (is_dir(dir) && !dir_is_empty(dir))
        return lora_fail(ctx, LORA_E_DEST_BUSY, "%s: the folder exists and is not empty; choose a new folder", dir);
    if (!is_dir(dir) && is_file(dir))
        return lora_fail(ctx, LORA_E_DEST_BUSY, "%s: a file is in the way of the diffusers folder", dir);
    char tmp[PATH_CAP], p[PATH_CAP];
    if (snprintf(tmp, sizeof tmp, "%s.lora-tmp-%ld", dir, (long)getpid()) >= (int)sizeof tmp)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: path too long", dir);
    remove_tree(tmp);   /* a leftover of this process id from an earlier crash */
    if (mkdir(tmp, 0777) != 0) return io_fail(ctx, errno, "creating the temp folder beside it", dir);

    static const char *const comps[4] = {"unet", "vae", "text_encoder", "scheduler"};
    lora_status s = LORA_OK;
    for (int c = 0; c < 4 && s == LORA_OK; c++) {
        pjoin(p, tmp, comps[c]);
        if (mkdir(p, 0777) != 0) s = io_fail(ctx, errno, "mkdir", p);
    }
    const struct sd_config *cfg = &m->cfg;
    if (s == LORA_OK) { pjoin(p, tmp, "model_index.json"); s = write_json(ctx, p, model_index()); }
    if (s == LORA_OK) { pjoin(p, tmp, "unet/config.json"); s = write_json(ctx, p, unet_config(cfg)); }
    if (s == LORA_OK) { pjoin(p, tmp, "vae/config.json"); s = write_json(ctx, p, vae_config(cfg)); }
    if (s == LORA_OK) { pjoin(p, tmp, "text_encoder/config.json"); s = write_json(ctx, p, te_config(cfg)); }
    if (s == LORA_OK) {
        pjoin(p, tmp, "scheduler/scheduler_config.json");
        s = write_json(ctx, p, scheduler_config(cfg));
    }
    const struct tensor_map *maps[3] = {&m->unet, &m->vae, &m->te};
    for (int c = 0; c < 3 && s == LORA_OK; c++) {
        const char *stem = c < 2 ? "diffusion_pytorch_model" : (safetensors ? "model" : "pytorch_model");
        char file[64];
        snprintf(file, sizeof file, "%s/%s.%s", comps[c], stem, safetensors ? "safetensors" : "bin");
        pjoin(p, tmp, file);
        /* transformers refuses a model.safetensors without {"format": "pt"}, as save_pretrained writes */
        static const char *const fmt_key[1] = {"format"}, *const fmt_val[1] = {"pt"};
        s = safetensors ? st_write_map(ctx, p, maps[c], fmt_key, fmt_val, 1) : ckpt_write(ctx, p, maps[c], 0);
    }
    if (s == LORA_OK) {
        if (is_dir(dir)) rmdir(dir);   /* empty: checked above */
        if (rename(tmp, dir) != 0) s = io_fail(ctx, errno, "renaming the finished folder into place", dir);
    }
    if (s != LORA_OK) remove_tree(tmp);
    return s;
}
