/* `lora info FILE [--json]`: what a .safetensors file holds; for LoRA files also the
 * network kind, rank, alpha and module counts (what users check before loading a LoRA). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include <jansson.h>

#include "cli.h"

struct lora_summary {
    int64_t modules, te_modules, unet_modules, conv3x3_modules;
    int64_t loha_modules, lokr_modules;
    int64_t rank_min, rank_max;
    double alpha_min, alpha_max;
    int64_t alpha_count;
};

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void summarize_lora(lora_file *f, struct lora_summary *ls) {
    memset(ls, 0, sizeof *ls);
    ls->rank_min = INT64_MAX;
    ls->alpha_min = INFINITY;
    ls->alpha_max = -INFINITY;
    int64_t n = lora_file_tensor_count(f);
    for (int64_t i = 0; i < n; i++) {
        const char *name;
        int32_t ndim;
        int64_t shape[8];
        lora_file_tensor_info(f, i, &name, NULL, NULL, &ndim, shape, 8, NULL);
        if (ends_with(name, ".lora_down.weight")) {
            ls->modules++;
            if (strncmp(name, "lora_te", 7) == 0) ls->te_modules++;
            else if (strncmp(name, "lora_unet_", 10) == 0) ls->unet_modules++;
            if (ndim == 4 && (shape[2] > 1 || shape[3] > 1)) ls->conv3x3_modules++;
            if (ndim >= 1) {
                if (shape[0] < ls->rank_min) ls->rank_min = shape[0];
                if (shape[0] > ls->rank_max) ls->rank_max = shape[0];
            }
        } else if (ends_with(name, ".hada_w1_a")) {
            ls->loha_modules++;
        } else if (ends_with(name, ".lokr_w1") || ends_with(name, ".lokr_w1_a")) {
            ls->lokr_modules++;
        } else if (ends_with(name, ".alpha") && ndim == 0) {
            float a;
            if (lora_file_read_f32(f, i, &a, 1) == LORA_OK) {
                ls->alpha_count++;
                if (a < ls->alpha_min) ls->alpha_min = a;
                if (a > ls->alpha_max) ls->alpha_max = a;
            }
        }
    }
}

static const char *network_kind(const struct lora_summary *ls) {
    if (ls->loha_modules) return "loha";
    if (ls->lokr_modules) return "lokr";
    if (ls->modules) return ls->conv3x3_modules ? "lora (with conv 3x3 modules)" : "lora";
    return NULL;
}

/* SD checkpoint facts through lora_model (LDM .safetensors, .ckpt, diffusers folders). */
static const char *format_name(int64_t f) {
    switch (f) {
    case LORA_FORMAT_SAFETENSORS: return "safetensors";
    case LORA_FORMAT_CKPT: return "ckpt (PyTorch zip)";
    case LORA_FORMAT_DIFFUSERS: return "diffusers folder (.bin weights)";
    case LORA_FORMAT_DIFFUSERS_SAFETENSORS: return "diffusers folder (.safetensors weights)";
    default: return "?";
    }
}

static json_t *model_facts(lora_model *m) {
    static const struct { lora_model_info key; const char *name; } keys[] = {
        {LORA_MODEL_SD_VERSION, "sd_version"}, {LORA_MODEL_PREDICTION, "v_prediction"},
        {LORA_MODEL_CONTEXT_DIM, "context_dim"}, {LORA_MODEL_UNET_CHANNELS, "unet_channels"},
        {LORA_MODEL_LINEAR_PROJECTION, "linear_projection"}, {LORA_MODEL_TE_LAYERS, "text_encoder_layers"},
        {LORA_MODEL_TE_HIDDEN, "text_encoder_width"}, {LORA_MODEL_UNET_PARAMS, "unet_params"},
        {LORA_MODEL_TE_PARAMS, "text_encoder_params"}, {LORA_MODEL_VAE_PARAMS, "vae_params"},
        {LORA_MODEL_TENSORS, "tensors"}, {LORA_MODEL_EXTRA_TENSORS, "extra_tensors"},
    };
    json_t *o = json_object();
    int64_t v = 0;
    lora_model_get_int(m, LORA_MODEL_FORMAT, &v);
    json_object_set_new(o, "format", json_string(format_name(v)));
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (lora_model_get_int(m, keys[i].key, &v) == LORA_OK) json_object_set_new(o, keys[i].name, json_integer(v));
    return o;
}

static void print_model_text(json_t *o) {
    printf("model:       SD %lld.x, %s\n", (long long)json_integer_value(json_object_get(o, "sd_version")),
           json_integer_value(json_object_get(o, "v_prediction")) ? "v-prediction" : "epsilon-prediction");
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        if (json_is_string(v)) printf("  %-20s %s\n", k, json_string_value(v));
        else printf("  %-20s %lld\n", k, (long long)json_integer_value(v));
    }
}

static int is_model_container(const char *path) {
    struct stat sb;
    if (stat(path, &sb) != 0) return 0;
    if (S_ISDIR(sb.st_mode)) return 1;
    FILE *fp = fopen(path, "rb");
    unsigned char b[4] = {0};
    size_t n = fp ? fread(b, 1, 4, fp) : 0;
    if (fp) fclose(fp);
    return n == 4 && memcmp(b, "PK\x03\x04", 4) == 0;
}

static int info_model_only(lora_ctx *ctx, const char *path, int json) {
    lora_model *m = NULL;
    lora_status s = lora_model_load(ctx, path, NULL, &m);
    if (s != LORA_OK) return cli_fail(ctx, s, "info");
    json_t *facts = model_facts(m);
    lora_model_free(m);
    if (json) {
        json_t *o = json_object();
        json_object_set_new(o, "file", json_string(path));
        json_object_set_new(o, "format", json_string(json_string_value(json_object_get(facts, "format"))));
        json_object_set_new(o, "model", facts);
        char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (text) printf("%s\n", text);
        free(text);
        json_decref(o);
    } else {
        printf("file:        %s\n", path);
        print_model_text(facts);
        json_decref(facts);
    }
    return 0;
}

struct dtype_count {
    const char *name;
    int64_t count;
};

int cmd_info(lora_ctx *ctx, int argc, char **argv) {
    const char *path = NULL;
    int json = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) json = 1;
        else if (strcmp(argv[i], "--verbose") == 0) continue;
        else if (argv[i][0] == '-' && argv[i][1] == '-') {
            fprintf(stderr, "lora info: unknown option '%s'\n", argv[i]);
            return 2;
        } else if (!path) path = argv[i];
        else {
            fprintf(stderr, "lora info: one FILE only\n");
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "usage: lora info FILE [--json]\n");
        return 2;
    }
    if (is_model_container(path)) return info_model_only(ctx, path, json);
    lora_file *f = NULL;
    lora_status s = lora_file_open(ctx, path, &f);
    if (s != LORA_OK) return cli_fail(ctx, s, "info");
    /* an LDM checkpoint in safetensors form: add the model facts */
    json_t *facts = NULL;
    if (lora_file_find(f, "model.diffusion_model.input_blocks.0.0.weight") >= 0) {
        lora_model *m = NULL;
        s = lora_model_load(ctx, path, NULL, &m);
        if (s != LORA_OK) {
            lora_file_free(f);
            return cli_fail(ctx, s, "info");
        }
        facts = model_facts(m);
        lora_model_free(m);
    }

    int64_t n = lora_file_tensor_count(f);
    uint64_t total = 0;
    struct dtype_count dtypes[32];
    int n_dtypes = 0;
    for (int64_t i = 0; i < n; i++) {
        const char *dn;
        uint64_t nb;
        lora_file_tensor_info(f, i, NULL, NULL, &dn, NULL, NULL, 0, &nb);
        total += nb;
        int k = 0;
        while (k < n_dtypes && strcmp(dtypes[k].name, dn) != 0) k++;
        if (k == n_dtypes && n_dtypes < 32) dtypes[n_dtypes++] = (struct dtype_count){dn, 0};
        if (k < n_dtypes) dtypes[k].count++;
    }
    struct lora_summary ls;
    summarize_lora(f, &ls);
    const char *kind = network_kind(&ls);
    int64_t n_meta = lora_file_metadata_count(f);

    if (json) {
        json_t *o = json_object();
        json_object_set_new(o, "file", json_string(path));
        json_object_set_new(o, "format", json_string("safetensors"));
        json_object_set_new(o, "tensors", json_integer(n));
        json_object_set_new(o, "total_bytes", json_integer((json_int_t)total));
        json_t *d = json_object();
        for (int k = 0; k < n_dtypes; k++) json_object_set_new(d, dtypes[k].name, json_integer(dtypes[k].count));
        json_object_set_new(o, "dtypes", d);
        json_t *m = json_object();
        for (int64_t i = 0; i < n_meta; i++) {
            const char *k, *v;
            lora_file_metadata_at(f, i, &k, &v);
            json_object_set_new(m, k, json_string(v));
        }
        json_object_set_new(o, "metadata", m);
        if (kind) {
            json_t *l = json_object();
            json_object_set_new(l, "kind", json_string(kind));
            json_object_set_new(l, "modules", json_integer(ls.modules + ls.loha_modules + ls.lokr_modules));
            json_object_set_new(l, "text_encoder_modules", json_integer(ls.te_modules));
            json_object_set_new(l, "unet_modules", json_integer(ls.unet_modules));
            json_object_set_new(l, "conv3x3_modules", json_integer(ls.conv3x3_modules));
            if (ls.modules) {
                json_object_set_new(l, "rank_min", json_integer(ls.rank_min));
                json_object_set_new(l, "rank_max", json_integer(ls.rank_max));
            }
            if (ls.alpha_count) {
                json_object_set_new(l, "alpha_min", json_real(ls.alpha_min));
                json_object_set_new(l, "alpha_max", json_real(ls.alpha_max));
            } else {
                json_object_set_new(l, "alpha_min", json_null());   /* old files: alpha = rank */
                json_object_set_new(l, "alpha_max", json_null());
            }
            json_object_set_new(o, "lora", l);
        }
        if (facts) json_object_set_new(o, "model", facts);
        facts = NULL;
        char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (text) {
            printf("%s\n", text);
            free(text);
        }
        json_decref(o);
    } else {
        printf("file:        %s\n", path);
        printf("format:      safetensors\n");
        printf("tensors:     %" PRId64 "\n", n);
        printf("total bytes: %" PRIu64 "\n", total);
        printf("dtypes:     ");
        for (int k = 0; k < n_dtypes; k++) printf(" %s=%" PRId64, dtypes[k].name, dtypes[k].count);
        printf("\n");
        if (kind) {
            printf("network:     %s\n", kind);
            printf("modules:     %" PRId64 " (text encoder %" PRId64 ", unet %" PRId64 ", conv 3x3 %" PRId64 ")\n",
                   ls.modules + ls.loha_modules + ls.lokr_modules, ls.te_modules, ls.unet_modules, ls.conv3x3_modules);
            if (ls.modules) {
                if (ls.rank_min == ls.rank_max) printf("rank:        %" PRId64 "\n", ls.rank_min);
                else printf("rank:        %" PRId64 "..%" PRId64 "\n", ls.rank_min, ls.rank_max);
            }
            if (!ls.alpha_count) printf("alpha:       (none stored: alpha = rank)\n");
            else if (ls.alpha_min == ls.alpha_max) printf("alpha:       %g\n", ls.alpha_min);
            else printf("alpha:       %g..%g\n", ls.alpha_min, ls.alpha_max);
        }
        if (facts) print_model_text(facts);
        printf("metadata:    %" PRId64 " entries\n", n_meta);
        for (int64_t i = 0; i < n_meta; i++) {
            const char *k, *v;
            lora_file_metadata_at(f, i, &k, &v);
            size_t len = strlen(v);
            if (len > 120) printf("  %s: %.100s... (%zu bytes)\n", k, v, len);
            else printf("  %s: %s\n", k, v);
        }
    }
    json_decref(facts);
    lora_file_free(f);
    return 0;
}
