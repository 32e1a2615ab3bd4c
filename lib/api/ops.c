/* Public merge / extract / resize API (include/lora/lora.h, "Merge, extract, resize"):
 * argument checks and the context guard around lib/ops. */
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "model/clip.h"
#include "ops/ops.h"

static int net_valid(const lora_network *n) { return n && n->magic == LORA_NETWORK_MAGIC; }
static int model_ok(const lora_model *m) { return m && m->magic == LORA_MODEL_MAGIC; }


static lora_status check_nets(lora_ctx *ctx, const lora_network *const *nets, const double *ratios, int64_t n) {
    if (!nets || !ratios || n < 1)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "nets and ratios must be non-NULL arrays of n >= 1 entries");
    for (int64_t i = 0; i < n; i++)
        if (!net_valid(nets[i]) || nets[i]->ctx != ctx)
            return lora_fail(ctx, LORA_E_INVALID_ARG, "network %lld is NULL, freed or from another context", (long long)i);
    return LORA_OK;
}

LORA_API lora_status lora_model_cast(lora_model *model, lora_dtype dtype) {
    if (!model_ok(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = ops_cast_model(&model->sd, dtype);
    model_drop_runs(model);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_merge_into_model(lora_model *model, const lora_network *const *nets, const double *ratios,
                                           int64_t n) {
    if (!model_ok(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = check_nets(ctx, nets, ratios, n);
    if (!s) s = ops_merge_into_model(&model->sd, nets, ratios, n);
    model_drop_runs(model);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_merge_networks(lora_ctx *ctx, const lora_network *const *nets, const double *ratios,
                                         int64_t n, int32_t new_rank, int32_t new_conv_rank, lora_network **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s = out ? check_nets(ctx, nets, ratios, n)
                        : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_merge_networks: out must not be NULL");
    if (!s && (new_rank < 0 || new_conv_rank < 0))
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "new_rank and new_conv_rank must be >= 0 (got %d, %d)", (int)new_rank,
                      (int)new_conv_rank);
    if (!s) s = ops_merge_networks(ctx, nets, ratios, n, new_rank, new_conv_rank, out);
    if (!s) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_extract(const lora_model *base, const lora_model *tuned, int32_t dim, int32_t conv_dim,
                                  double clamp_quantile, double min_diff, lora_svd_method svd_method,
                                  lora_network **out) {
    if (out) *out = NULL;
    if (!model_ok(base) || !model_ok(tuned) || base->ctx != tuned->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = base->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = out ? LORA_OK : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_extract: out must not be NULL");
    if (!s && svd_method != LORA_SVD_EXACT && svd_method != LORA_SVD_RANDOMIZED && svd_method != LORA_SVD_GRAM)
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_extract: svd_method %d is not LORA_SVD_EXACT, LORA_SVD_RANDOMIZED "
                      "or LORA_SVD_GRAM", svd_method);
    int32_t method = svd_method == LORA_SVD_RANDOMIZED ? OPS_SVD_RANDOMIZED
                   : svd_method == LORA_SVD_GRAM ? OPS_SVD_GRAM : OPS_SVD_EXACT;
    if (!s) s = ops_extract(&base->sd, &tuned->sd, dim, conv_dim, clamp_quantile, min_diff, method, out);
    if (!s) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_network_resize(const lora_network *net, int32_t new_rank, int32_t dynamic_method,
                                         double dynamic_param, lora_network **out) {
    if (out) *out = NULL;
    if (!net_valid(net)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = net->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = out ? LORA_OK : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_network_resize: out must not be NULL");
    if (!s) s = ops_resize(net, new_rank, dynamic_method, dynamic_param, out);
    if (!s) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

/* ---- file-to-file merge and the params-bag forms (Since 0.2.0) ----------------------------- */

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

static lora_dtype prec_dtype(const char *p) {
    if (strcmp(p, "float") == 0) return LORA_DTYPE_F32;
    if (strcmp(p, "fp16") == 0) return LORA_DTYPE_F16;
    if (strcmp(p, "bf16") == 0) return LORA_DTYPE_BF16;
    return 0;
}

/* strtod in the C locale (a "," decimal mark must not swallow the separator). */
static double strtod_c(const char *p, char **end) {
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c == (locale_t)0) { *end = (char *)p; return 0; }
    double v = strtod_l(p, end, c);
    freelocale(c);
    return v;
}

/* "r1,r2,..." (the ratios key) -> exactly n finite numbers. */
static lora_status parse_ratios(lora_ctx *ctx, const char *text, double *out, int64_t n) {
    const char *p = text;
    int64_t k = 0;
    while (*p) {
        char *end;
        double v = strtod_c(p, &end);
        if (end == p || !isfinite(v) || k >= n)
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratios \"%s\": want %lld finite numbers separated by commas",
                             text, (long long)n);
        out[k++] = v;
        p = end;
        while (*p == ' ') p++;
        if (*p == ',') p++;
        else if (*p) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratios \"%s\": unexpected '%c'", text, *p);
    }
    if (k != n)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratios \"%s\": %lld values for %lld networks", text, (long long)k,
                         (long long)n);
    return LORA_OK;
}

LORA_API lora_status lora_merge_file(lora_ctx *ctx, const char *model_path, const lora_network *const *nets,
                                     const double *ratios, int64_t n, const char *out_path, const lora_params *opts) {
    if (!lora_ctx_valid(ctx)) return LORA_E_INVALID_ARG;
    if (!model_path || !out_path)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_merge_file: model_path and out_path must not be NULL");
    if (strcmp(model_path, out_path) == 0)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_merge_file: %s: the output must not be the input (it is read "
                         "while the output is written)", out_path);
    /* the model first: loading is a public call with its own progress (LORA_PHASE_LOAD) */
    lora_model *m = NULL;
    LORA_TRY(lora_model_load(ctx, model_path, opts, &m));
    lora_status s = lora_enter(ctx);
    if (s) { lora_model_free(m); return s; }
    double *r = NULL;
    s = nets && n >= 1 && (uint64_t)n <= SIZE_MAX / sizeof(double)
            ? LORA_OK : lora_fail(ctx, LORA_E_INVALID_ARG, "nets must be a non-NULL array of n >= 1 entries");
    if (!s && !ratios) {
        if (!(r = lora_malloc(ctx, (size_t)n * sizeof *r))) s = LORA_E_NOMEM;
        else s = parse_ratios(ctx, lora_params_str(opts, LORA_P_RATIOS), r, n);
    }
    if (!s) s = check_nets(ctx, nets, ratios ? ratios : r, n);
    const char *ps = lora_params_str(opts, LORA_P_SAVE_PRECISION);
    lora_dtype prec = prec_dtype(lora_params_str(opts, LORA_P_PRECISION)), save = *ps ? prec_dtype(ps) : 0;
    const char *as = lora_params_str(opts, LORA_P_SAVE_MODEL_AS);
    int ckpt = ends_with(out_path, ".ckpt") || ends_with(out_path, ".pt");
    if (!s && strncmp(as, "diffusers", 9) == 0)
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_merge_file: %s: save_model_as %s is not a single file; use "
                      "lora_merge_into_model + lora_model_save for a diffusers folder", out_path, as);
    /* the file mapping whose pages the merge may drop (never a buffer the file was read into) */
    int st_mapped = m->backing[0] && m->backing[0]->mapped;
    const void *map = st_mapped ? (const void *)m->backing[0]->base : m->backing[0] ? NULL : m->ckpt_map;
    uint64_t map_size = st_mapped ? m->backing[0]->size : m->backing[0] ? 0 : m->ckpt_map_size;
    /* a v2 diffusers folder lacks OpenCLIP's last block, text_projection and logit_scale: the
     * LDM writer makes them up from the (merged, cast) text encoder, so this one input is merged
     * in memory and saved (same bytes, not streamed) */
    int in_memory = m->sd.cfg.version == 2 &&
                    (m->format == LORA_FORMAT_DIFFUSERS || m->format == LORA_FORMAT_DIFFUSERS_SAFETENSORS);
    if (!s && in_memory) {
        s = ops_cast_model(&m->sd, prec);
        if (!s) s = ops_merge_into_model(&m->sd, nets, ratios ? ratios : r, n);
        model_drop_runs(m);
    } else if (!s) {
        s = ops_merge_file(&m->sd, nets, ratios ? ratios : r, n, out_path, prec, save, ckpt, map, map_size);
    }
    lora_free(ctx, r);
    lora_leave(ctx);
    if (!s && in_memory) {
        lora_params *so = NULL;
        s = lora_params_create(ctx, &so);
        if (!s) s = lora_params_set_string(so, LORA_P_SAVE_MODEL_AS, ckpt ? "ckpt" : "safetensors");
        if (!s) s = lora_params_set_string(so, LORA_P_SAVE_PRECISION, ps);
        if (!s) s = lora_model_save(m, out_path, so);
        lora_params_free(so);
    }
    lora_model_free(m);
    return s;
}

LORA_API lora_status lora_merge_networks_ex(lora_ctx *ctx, const lora_network *const *nets, const double *ratios,
                                            int64_t n, const lora_params *opts, lora_network **out) {
    if (out) *out = NULL;
    if (!lora_ctx_valid(ctx)) return LORA_E_INVALID_ARG;
    int64_t nr = lora_params_int(opts, LORA_P_NEW_RANK), nc = lora_params_int(opts, LORA_P_NEW_CONV_RANK);
    if (ratios) return lora_merge_networks(ctx, nets, ratios, n, (int32_t)nr, (int32_t)nc, out);
    if (n < 1 || (uint64_t)n > SIZE_MAX / sizeof(double)) return lora_fail(ctx, LORA_E_INVALID_ARG, "n must be >= 1");
    double *r = lora_malloc(ctx, (size_t)n * sizeof *r);
    if (!r) return LORA_E_NOMEM;
    lora_status s = parse_ratios(ctx, lora_params_str(opts, LORA_P_RATIOS), r, n);
    if (!s) s = lora_merge_networks(ctx, nets, r, n, (int32_t)nr, (int32_t)nc, out);
    lora_free(ctx, r);
    return s;
}

LORA_API lora_status lora_extract_ex(const lora_model *base, const lora_model *tuned, const lora_params *opts,
                                     lora_network **out) {
    if (out) *out = NULL;
    if (!model_ok(base) || !model_ok(tuned) || base->ctx != tuned->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = base->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = out ? LORA_OK : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_extract_ex: out must not be NULL");
    const char *dev = lora_params_str(opts, LORA_P_DEVICE);
    int gpu = strcmp(dev, "cuda") == 0 ? 1 : strcmp(dev, "cpu") == 0 ? 0 : -1;
    const char *sm = lora_params_str(opts, LORA_P_SVD);
    int32_t method = strcmp(sm, "randomized") == 0 ? OPS_SVD_RANDOMIZED : strcmp(sm, "gram") == 0 ? OPS_SVD_GRAM : OPS_SVD_EXACT;
    if (!s) s = ops_extract_on(&base->sd, &tuned->sd, lora_params_int(opts, LORA_P_DIM),
                               lora_params_int(opts, LORA_P_CONV_DIM), lora_params_float(opts, LORA_P_CLAMP_QUANTILE),
                               lora_params_float(opts, LORA_P_MIN_DIFF), method, gpu, out);
    if (!s) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_network_resize_ex(const lora_network *net, const lora_params *opts, lora_network **out) {
    if (out) *out = NULL;
    if (!net_valid(net)) return LORA_E_INVALID_ARG;
    const char *dm = lora_params_str(opts, LORA_P_DYNAMIC_METHOD);
    lora_resize_method m = strcmp(dm, "sv_ratio") == 0 ? LORA_RESIZE_SV_RATIO
                         : strcmp(dm, "sv_fro") == 0 ? LORA_RESIZE_SV_FRO
                         : strcmp(dm, "sv_cumulative") == 0 ? LORA_RESIZE_SV_CUMULATIVE : LORA_RESIZE_FIXED;
    return lora_network_resize(net, (int32_t)lora_params_int(opts, LORA_P_NEW_RANK), m,
                               lora_params_float(opts, LORA_P_DYNAMIC_PARAM), out);
}
