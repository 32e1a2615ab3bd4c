/* Public lora_network API (include/lora/lora.h, "LoRA networks"): thin wrappers over
 * lib/network with argument checks and the context guard. */
#include <math.h>
#include <string.h>

#include "model/clip.h"
#include "network/network.h"

static int net_valid(const lora_network *n) { return n && n->magic == LORA_NETWORK_MAGIC; }
static int model_ok(const lora_model *m) { return m && m->magic == LORA_MODEL_MAGIC; }

LORA_API lora_status lora_network_create(lora_model *model, const lora_params *opts, lora_network **out) {
    if (out) *out = NULL;
    if (!model_ok(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!out) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_network_create: out must not be NULL");
    else s = net_create(&model->sd, opts, out);
    if (s == LORA_OK) {
        lora_ctx_retain(ctx);
        lora_log(ctx, LORA_LOG_INFO, "created LoRA network: %lld modules", (long long)(*out)->n);
    }
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_network_load(lora_ctx *ctx, const char *path, lora_network **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!path || !out) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_network_load: path and out must not be NULL");
    else s = net_load(ctx, path, out);
    if (s == LORA_OK) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_network_save(const lora_network *net, const char *path, const lora_params *opts) {
    if (!net_valid(net)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = net->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!path) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_network_save: path must not be NULL");
    else s = net_save(net, path, opts);
    if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_SAVE, 1, 1, NAN);
    lora_leave(ctx);
    return s;
}

LORA_API void lora_network_free(lora_network *net) {
    if (!net_valid(net)) return;
    if (net->attached > 0) {
        /* attached models still read its factors: the last detach (or model free) frees it */
        net->user_freed = 1;
        net->magic = 0;
        return;
    }
    lora_ctx *ctx = net->ctx;
    net_free(net);
    lora_ctx_release(ctx);
}

static lora_status info(const lora_network *net, lora_network_info key, double *v) {
    int64_t te = 0, unet = 0, kxk = 0, params = 0;
    const struct net_module *first = NULL, *first_kxk = NULL;
    for (int64_t i = 0; i < net->n; i++) {
        const struct net_module *m = &net->m[i];
        if (m->is_te) te++;
        else unet++;
        if (m->kind == NET_CONVKXK) {
            kxk++;
            if (!first_kxk) first_kxk = m;
        } else if (!first) {
            first = m;
        }
        params += m->rank * (m->in * m->kh * m->kw + m->out);
    }
    switch (key) {
    case LORA_NETWORK_RANK: *v = first ? (double)first->rank : 0; break;
    case LORA_NETWORK_ALPHA: *v = first ? first->alpha : 0; break;
    case LORA_NETWORK_CONV_RANK: *v = first_kxk ? (double)first_kxk->rank : 0; break;
    case LORA_NETWORK_CONV_ALPHA: *v = first_kxk ? first_kxk->alpha : 0; break;
    case LORA_NETWORK_MODULES: *v = (double)net->n; break;
    case LORA_NETWORK_TE_MODULES: *v = (double)te; break;
    case LORA_NETWORK_UNET_MODULES: *v = (double)unet; break;
    case LORA_NETWORK_CONV3X3_MODULES: *v = (double)kxk; break;
    case LORA_NETWORK_PARAMS: *v = (double)params; break;
    default: return LORA_E_UNKNOWN_KEY;
    }
    return LORA_OK;
}

LORA_API lora_status lora_network_get_int(const lora_network *net, lora_network_info key, int64_t *out) {
    if (!net_valid(net) || !out) return LORA_E_INVALID_ARG;
    double v;
    LORA_TRY(info(net, key, &v));
    *out = (int64_t)v;
    return LORA_OK;
}

LORA_API lora_status lora_network_get_float(const lora_network *net, lora_network_info key, double *out) {
    if (!net_valid(net) || !out) return LORA_E_INVALID_ARG;
    return info(net, key, out);
}

LORA_API lora_status lora_network_metadata_set(lora_network *net, const char *key, const char *value) {
    if (!net_valid(net)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = net->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!key || !value || !*key)
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_network_metadata_set: key and value must be non-NULL strings");
    else s = net_meta_set(net, key, value);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_network_metadata_get(const lora_network *net, const char *key, char *buf, size_t cap,
                                               size_t *needed) {
    if (!net_valid(net) || !key || (!buf && cap)) return LORA_E_INVALID_ARG;
    const char *v = net_meta_get(net, key);
    if (!v) return LORA_E_UNKNOWN_KEY;
    size_t n = strlen(v) + 1;
    if (needed) *needed = n;
    if (cap) {
        size_t c = n < cap ? n : cap;
        memcpy(buf, v, c - 1);
        buf[c - 1] = 0;
    }
    return LORA_OK;
}

LORA_API lora_status lora_network_coverage(const lora_network *net, const lora_model *model, int64_t *matched,
                                           int64_t *unused, int64_t *shape_mismatch) {
    if (!net_valid(net) || !model_ok(model) || net->ctx != model->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = net->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = net_coverage(net, &model->sd, matched, unused, shape_mismatch);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_model_merge_network(lora_model *model, const lora_network *net, double multiplier) {
    if (!net_valid(net) || !model_ok(model) || net->ctx != model->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = net->ctx;
    LORA_TRY(lora_enter(ctx));
    /* also into the float32 bases of weights replaced by runtime attachments; drops the
     * cached fp32 networks, which no longer match the weights */
    lora_status s = attach_merge(model, net, multiplier);
    if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_MERGE, 1, 1, NAN);
    lora_leave(ctx);
    return s;
}

/* ---- runtime attachment (lib/network/attach.c) ----------------------------------------------- */

LORA_API lora_status lora_model_attach(lora_model *model, lora_network *net, double multiplier,
                                       lora_apply_mode mode) {
    if (!net_valid(net) || !model_ok(model) || net->ctx != model->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = attach_add(model, net, multiplier, mode);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_model_set_multiplier(lora_model *model, const lora_network *net, double multiplier) {
    if (!net_valid(net) || !model_ok(model) || net->ctx != model->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = attach_set_multiplier(model, net, multiplier);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_model_detach(lora_model *model, const lora_network *net) {
    if (!net_valid(net) || !model_ok(model) || net->ctx != model->ctx) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = attach_remove(model, net);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_model_detach_all(lora_model *model) {
    if (!model_ok(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = attach_remove_all(model);
    lora_leave(ctx);
    return s;
}

LORA_API int64_t lora_model_attached_count(const lora_model *model) {
    if (!model_ok(model)) return -1;
    return model->attach ? model->attach->n_nets : 0;
}
