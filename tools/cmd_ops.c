/* `lora merge`, `lora extract`, `lora resize`: kohya's merge_lora.py / svd_merge_lora.py,
 * extract_lora_from_models.py and resize_lora.py flags. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lora/lora.h>

#include "cli.h"

#define MAX_NETS 64

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

static lora_dtype prec_dtype(const char *p) {
    if (!p || strcmp(p, "float") == 0) return LORA_DTYPE_F32;
    if (strcmp(p, "fp16") == 0) return LORA_DTYPE_F16;
    if (strcmp(p, "bf16") == 0) return LORA_DTYPE_BF16;
    return 0;
}

/* A params bag with save_precision (and save_model_as from the extension for models). */
static lora_params *save_opts(lora_ctx *ctx, const char *prec, const char *path, int model) {
    lora_params *p = NULL;
    if (lora_params_create(ctx, &p) != LORA_OK) return NULL;
    if (prec && lora_params_set_string(p, LORA_P_SAVE_PRECISION, prec) != LORA_OK) { lora_params_free(p); return NULL; }
    if (model) lora_params_set_string(p, LORA_P_SAVE_MODEL_AS, ends_with(path, ".ckpt") ? "ckpt" : "safetensors");
    return p;
}

int cmd_merge(lora_ctx *ctx, int argc, char **argv) {
    const char *sd_model = NULL, *save_to = NULL, *prec = "float", *save_prec = NULL;
    const char *models[MAX_NETS];
    double ratios[MAX_NETS];
    int nm = 0, nr = 0, v2 = 0, new_rank = 0, new_conv_rank = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--sd_model") == 0 && i + 1 < argc) sd_model = argv[++i];
        else if (strcmp(a, "--save_to") == 0 && i + 1 < argc) save_to = argv[++i];
        else if (strcmp(a, "--precision") == 0 && i + 1 < argc) prec = argv[++i];
        else if (strcmp(a, "--save_precision") == 0 && i + 1 < argc) save_prec = argv[++i];
        else if (strcmp(a, "--new_rank") == 0 && i + 1 < argc) new_rank = atoi(argv[++i]);
        else if (strcmp(a, "--new_conv_rank") == 0 && i + 1 < argc) new_conv_rank = atoi(argv[++i]);
        else if (strcmp(a, "--v2") == 0) v2 = 1;
        else if (strcmp(a, "--verbose") == 0) continue;
        else if (strcmp(a, "--models") == 0) {
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0 && nm < MAX_NETS) models[nm++] = argv[++i];
        } else if (strcmp(a, "--ratios") == 0) {
            while (i + 1 < argc && nr < MAX_NETS) {
                char *end;
                double r = strtod(argv[i + 1], &end);
                if (*end || end == argv[i + 1]) break;
                ratios[nr++] = r;
                i++;
            }
        } else {
            fprintf(stderr, "lora merge: unknown or incomplete option '%s'\n", a);
            return 2;
        }
    }
    if (!save_to || nm == 0 || nm != nr || !prec_dtype(prec) || (save_prec && !prec_dtype(save_prec))) {
        fprintf(stderr, "usage: lora merge [--sd_model M [--v2]] --models A B ... --ratios r1 r2 ... --save_to OUT\n"
                        "                  [--precision float|fp16|bf16] [--save_precision float|fp16|bf16]\n"
                        "                  [--new_rank R [--new_conv_rank C]]   (no --sd_model: LoRAs into one)\n");
        return 2;
    }
    if (!save_prec) save_prec = prec;   /* kohya: save precision defaults to the merge precision */
    lora_network *nets[MAX_NETS] = {0};
    int rc = 0;
    lora_status s = LORA_OK;
    for (int i = 0; i < nm && !s; i++)
        if ((s = lora_network_load(ctx, models[i], &nets[i])) != LORA_OK) rc = cli_fail(ctx, s, models[i]);
    lora_params *opts = rc ? NULL : save_opts(ctx, save_prec, save_to, sd_model != NULL);
    if (!rc && !opts) rc = cli_fail(ctx, LORA_E_NOMEM, "options");
    if (!rc && sd_model) {
        /* streamed file to file: memory stays near one tensor beyond the model's mapping */
        lora_params *lo = NULL;
        if (lora_params_create(ctx, &lo) != LORA_OK) rc = cli_fail(ctx, LORA_E_NOMEM, "options");
        else if ((v2 && (s = lora_params_set_int(lo, LORA_P_V2, 1)) != LORA_OK) ||
                 (s = lora_params_set_string(lo, LORA_P_PRECISION, prec)) != LORA_OK ||
                 (s = lora_params_set_string(lo, LORA_P_SAVE_PRECISION, save_prec)) != LORA_OK)
            rc = cli_fail(ctx, s, "options");
        else if ((s = lora_merge_file(ctx, sd_model, (const lora_network *const *)nets, ratios, nm, save_to, lo)) != LORA_OK)
            rc = cli_fail(ctx, s, "merge");
        lora_params_free(lo);
    } else if (!rc) {
        lora_network *o = NULL;
        if (lora_params_set_int(opts, LORA_P_NEW_RANK, new_rank) != LORA_OK ||
            lora_params_set_int(opts, LORA_P_NEW_CONV_RANK, new_conv_rank) != LORA_OK)
            rc = cli_fail(ctx, LORA_E_CONFIG_RANGE, "--new_rank / --new_conv_rank");
        else if ((s = lora_merge_networks_ex(ctx, (const lora_network *const *)nets, ratios, nm, opts, &o)) != LORA_OK)
            rc = cli_fail(ctx, s, "merge");
        else if ((s = lora_network_save(o, save_to, opts)) != LORA_OK) rc = cli_fail(ctx, s, "save");
        lora_network_free(o);
    }
    if (!rc) printf("saved %s\n", save_to);
    lora_params_free(opts);
    for (int i = 0; i < nm; i++) lora_network_free(nets[i]);
    return rc;
}

int cmd_extract(lora_ctx *ctx, int argc, char **argv) {
    const char *org = NULL, *tuned = NULL, *save_to = NULL, *save_prec = NULL, *device = NULL;
    int dim = 4, conv_dim = 0, v2 = 0, randomized = 0;
    double clamp = 0.99, min_diff = 0.01;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--model_org") == 0 && i + 1 < argc) org = argv[++i];
        else if (strcmp(a, "--model_tuned") == 0 && i + 1 < argc) tuned = argv[++i];
        else if (strcmp(a, "--save_to") == 0 && i + 1 < argc) save_to = argv[++i];
        else if (strcmp(a, "--save_precision") == 0 && i + 1 < argc) save_prec = argv[++i];
        else if (strcmp(a, "--dim") == 0 && i + 1 < argc) dim = atoi(argv[++i]);
        else if (strcmp(a, "--conv_dim") == 0 && i + 1 < argc) conv_dim = atoi(argv[++i]);
        else if (strcmp(a, "--clamp_quantile") == 0 && i + 1 < argc) clamp = strtod(argv[++i], NULL);
        else if (strcmp(a, "--min_diff") == 0 && i + 1 < argc) min_diff = strtod(argv[++i], NULL);
        else if (strcmp(a, "--device") == 0 && i + 1 < argc) {
            device = argv[++i];
            /* torch device names: cuda, cuda:0 -> cuSOLVER (CPU fallback with a warning) */
            device = strncmp(device, "cuda", 4) == 0 ? "cuda" : strcmp(device, "cpu") == 0 ? "cpu" : device;
        }
        else if (strcmp(a, "--v2") == 0) v2 = 1;
        else if (strcmp(a, "--svd") == 0 && i + 1 < argc) {
            const char *m = argv[++i];
            if (strcmp(m, "exact") == 0) randomized = 0;
            else if (strcmp(m, "randomized") == 0) randomized = 1;
            else if (strcmp(m, "gram") == 0) randomized = 2;
            else { fprintf(stderr, "lora extract: --svd %s: want exact, randomized or gram\n", m); return 2; }
        }
        else if (strcmp(a, "--verbose") == 0) continue;
        else { fprintf(stderr, "lora extract: unknown or incomplete option '%s'\n", a); return 2; }
    }
    if (!org || !tuned || !save_to || (save_prec && !prec_dtype(save_prec))) {
        fprintf(stderr, "usage: lora extract --model_org A --model_tuned B --save_to OUT [--dim 4] [--conv_dim N] [--v2]\n"
                        "                    [--save_precision float|fp16|bf16] [--clamp_quantile 0.99] [--min_diff 0.01]\n"
                        "                    [--svd exact|randomized|gram] [--device cpu|cuda]\n");
        return 2;
    }
    lora_params *lo = NULL;
    lora_model *a = NULL, *b = NULL;
    lora_network *o = NULL;
    lora_status s;
    int rc = 0;
    if (lora_params_create(ctx, &lo) == LORA_OK && v2) lora_params_set_int(lo, LORA_P_V2, 1);
    lora_params *opts = save_opts(ctx, save_prec, save_to, 0), *xo = NULL;
    if (lora_params_create(ctx, &xo) != LORA_OK) rc = cli_fail(ctx, LORA_E_NOMEM, "options");
    else if ((s = lora_params_set_int(xo, LORA_P_DIM, dim)) != LORA_OK ||
             (s = lora_params_set_int(xo, LORA_P_CONV_DIM, conv_dim)) != LORA_OK ||
             (s = lora_params_set_float(xo, LORA_P_CLAMP_QUANTILE, clamp)) != LORA_OK ||
             (s = lora_params_set_float(xo, LORA_P_MIN_DIFF, min_diff)) != LORA_OK ||
             (s = lora_params_set_string(xo, LORA_P_SVD, randomized == 2 ? "gram" : randomized ? "randomized" : "exact")) != LORA_OK ||
             (device && (s = lora_params_set_string(xo, LORA_P_DEVICE, device)) != LORA_OK))
        rc = cli_fail(ctx, s, "options");
    if (rc) {
    } else if ((s = lora_model_load(ctx, org, lo, &a)) != LORA_OK) rc = cli_fail(ctx, s, org);
    else if ((s = lora_model_load(ctx, tuned, lo, &b)) != LORA_OK) rc = cli_fail(ctx, s, tuned);
    else if ((s = lora_extract_ex(a, b, xo, &o)) != LORA_OK) rc = cli_fail(ctx, s, "extract");
    else if ((s = lora_network_save(o, save_to, opts)) != LORA_OK) rc = cli_fail(ctx, s, "save");
    if (!rc) {
        int64_t n = 0, te = 0;
        lora_network_get_int(o, LORA_NETWORK_MODULES, &n);
        lora_network_get_int(o, LORA_NETWORK_TE_MODULES, &te);
        printf("saved %s: %lld modules (%lld text encoder)\n", save_to, (long long)n, (long long)te);
    }
    lora_network_free(o);
    lora_model_free(a);
    lora_model_free(b);
    lora_params_free(lo);
    lora_params_free(xo);
    lora_params_free(opts);
    return rc;
}

int cmd_resize(lora_ctx *ctx, int argc, char **argv) {
    const char *in = NULL, *save_to = NULL, *save_prec = NULL, *method = NULL;
    int new_rank = 4;
    double param = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--model") == 0 && i + 1 < argc) in = argv[++i];
        else if (strcmp(a, "--save_to") == 0 && i + 1 < argc) save_to = argv[++i];
        else if (strcmp(a, "--save_precision") == 0 && i + 1 < argc) save_prec = argv[++i];
        else if (strcmp(a, "--new_rank") == 0 && i + 1 < argc) new_rank = atoi(argv[++i]);
        else if (strcmp(a, "--dynamic_method") == 0 && i + 1 < argc) method = argv[++i];
        else if (strcmp(a, "--dynamic_param") == 0 && i + 1 < argc) param = strtod(argv[++i], NULL);
        else if (strcmp(a, "--device") == 0 && i + 1 < argc) i++;
        else if (strcmp(a, "--verbose") == 0) continue;
        else { fprintf(stderr, "lora resize: unknown or incomplete option '%s'\n", a); return 2; }
    }
    lora_resize_method m = LORA_RESIZE_FIXED;
    if (method && strcmp(method, "sv_ratio") == 0) m = LORA_RESIZE_SV_RATIO;
    else if (method && strcmp(method, "sv_fro") == 0) m = LORA_RESIZE_SV_FRO;
    else if (method && strcmp(method, "sv_cumulative") == 0) m = LORA_RESIZE_SV_CUMULATIVE;
    else if (method) m = -1;
    if (!in || !save_to || m < 0 || (save_prec && !prec_dtype(save_prec))) {
        fprintf(stderr, "usage: lora resize --model IN --new_rank R --save_to OUT [--save_precision float|fp16|bf16]\n"
                        "                   [--dynamic_method sv_ratio|sv_fro|sv_cumulative --dynamic_param P] [--verbose]\n");
        return 2;
    }
    lora_network *n = NULL, *o = NULL;
    lora_params *opts = save_opts(ctx, save_prec, save_to, 0);
    lora_status s;
    int rc = 0;
    if ((s = lora_network_load(ctx, in, &n)) != LORA_OK) rc = cli_fail(ctx, s, in);
    else if ((s = lora_network_resize(n, new_rank, m, param, &o)) != LORA_OK) rc = cli_fail(ctx, s, "resize");
    else if ((s = lora_network_save(o, save_to, opts)) != LORA_OK) rc = cli_fail(ctx, s, "save");
    if (!rc) printf("saved %s\n", save_to);
    lora_network_free(n);
    lora_network_free(o);
    lora_params_free(opts);
    return rc;
}
