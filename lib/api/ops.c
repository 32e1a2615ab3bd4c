/* Public merge / extract / resize API (include/lora/lora.h, "Merge, extract, resize"):
 * argument checks and the context guard around lib/ops. */
#include <math.h>

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
    if (!s && svd_method != LORA_SVD_EXACT && svd_method != LORA_SVD_RANDOMIZED)
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_extract: svd_method %d is not LORA_SVD_EXACT or LORA_SVD_RANDOMIZED",
                      svd_method);
    int32_t method = svd_method == LORA_SVD_RANDOMIZED ? OPS_SVD_RANDOMIZED : OPS_SVD_EXACT;
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
