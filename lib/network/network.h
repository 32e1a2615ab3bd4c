/* LoRA networks as kohya-ss sd-scripts networks/lora.py builds them (spec/kohya-lora.md §1, §2):
 * the module list of a model (targets.c), and the lora_network object (lora.c): fp32 down/up
 * factors per module, alpha, create with kohya's init, load/save in kohya's file layout,
 * coverage against a model and merge into its weights. */
#ifndef LORA_NETWORK_NETWORK_H
#define LORA_NETWORK_NETWORK_H

#include "internal.h"
#include "model/sd_model.h"
#include "nn/nn.h"

#define NET_LINEAR  1   /* base weight [out, in] */
#define NET_CONV1X1 2   /* base weight [out, in, 1, 1] */
#define NET_CONVKXK 3   /* base weight [out, in, kh, kw], kh*kw > 1 (LoCon / conv_dim) */

/* One module kohya would wrap. */
struct net_target {
    char name[256];       /* "lora_unet_down_blocks_0_attentions_0_proj_in" */
    char weight[256];     /* base weight in the model map: "down_blocks.0.attentions.0.proj_in.weight" */
    int32_t is_te;        /* 1: sd.te, 0: sd.unet */
    int32_t kind;         /* NET_* */
    int64_t in, out, kh, kw;
};

/* Kohya's module list for `m`, in kohya's creation order (text encoder first, then the U-Net
 * as named_modules walks it: down_blocks, up_blocks, mid_block). with_conv adds the
 * ResnetBlock2D / Downsample2D / Upsample2D children (conv_dim, and loading). The array is
 * allocated through m->ctx (*out freed with lora_free). */
lora_status net_targets(const struct sd_model *m, int with_conv, struct net_target **out, int64_t *n_out);

struct net_module {
    char *name;
    int32_t is_te;
    int32_t kind;                /* NET_* from the factor shapes (conv kxk when down is kxk) */
    int64_t rank, in, out, kh, kw;
    int32_t down_ndim, up_ndim;  /* 2 or 4 */
    double alpha;                /* as stored; <= 0 means rank (kohya) */
    int32_t has_alpha;
    lora_dtype dtype;            /* dtype the factors were read in (F32 when created) */
    lora_dtype alpha_dtype;
    float *down;                 /* [rank, in*kh*kw] */
    float *up;                   /* [out, rank] */
    struct nn_lora nn;           /* adapter view: borrows down/up, scale at multiplier 1 */
};

#define LORA_NETWORK_MAGIC 0x4e45544bu /* "NETK" */
struct lora_network {
    uint32_t magic;
    lora_ctx *ctx;
    int64_t n;
    struct net_module *m;
    int64_t n_meta;
    char **meta_keys, **meta_vals;
    int32_t attached;     /* runtime attachments holding it (lib/network/attach.c) */
    int32_t user_freed;   /* lora_network_free ran while attached: freed at the last detach */
};

/* An empty network handle with room for `n` modules (the merge/extract/resize ops build
 * networks with it). */
lora_status net_alloc(lora_ctx *ctx, int64_t n, struct lora_network **out);
/* Points a module's nn_lora view at its down/up weights with scale alpha/rank (alpha <= 0 or
 * absent: scale 1). */
void net_module_bind(struct net_module *mm);

lora_status net_create(struct sd_model *m, const lora_params *opts, struct lora_network **out);
lora_status net_load(lora_ctx *ctx, const char *path, struct lora_network **out);
lora_status net_save(const struct lora_network *net, const char *path, const lora_params *opts);
void net_free(struct lora_network *net);
/* Index of the module called `name`, or -1. */
int64_t net_find(const struct lora_network *net, const char *name);
lora_status net_meta_set(struct lora_network *net, const char *key, const char *value);
const char *net_meta_get(const struct lora_network *net, const char *key);
/* Matches modules to the model's targets. Counts any may be NULL. Nothing matched (and the
 * network not empty) -> LORA_E_NO_MATCHING_KEYS naming the first keys. */
lora_status net_coverage(const struct lora_network *net, const struct sd_model *m, int64_t *matched,
                         int64_t *unused, int64_t *mismatch);
/* W += multiplier * alpha/rank * up @ down (fp32 math, written back in W's dtype) for every
 * matched module; unmatched ones are skipped (coverage reports them). */
lora_status net_merge(const struct lora_network *net, struct sd_model *m, double multiplier);

/* Element-wise conversions between a tensor's dtype and float32/double. */
lora_status net_to_f32(lora_ctx *ctx, const char *name, lora_dtype dt, const void *src, int64_t n, float *dst);

/* ---- runtime application (lib/network/attach.c) -------------------------------------------
 * Networks applied to a model's weights without losing the base: every base weight an attached
 * network touches is replaced by a float32 buffer rebuilt as base + sum_i m_i * alpha_i/r_i *
 * up_i @ down_i on every attach, detach and multiplier change (the base is the original tensor,
 * kept untouched, so there is no drift); the cached fp32 runs are dropped after each change. */

/* One base weight replaced while networks are attached. */
struct attach_weight {
    int32_t is_te;
    char *weight;              /* tensor name in sd.te / sd.unet */
    struct lora_tensor orig;   /* the tensor as it was (data owned when orig.owned) */
    float *base;               /* NULL, or the float32 base after LORA_APPLY_MERGE merges */
    float *live;               /* float32 weights installed in the map (borrowed by it) */
    int64_t numel;
    int32_t used;              /* scratch for a rebuild */
};

struct attach_entry {
    struct lora_network *net;
    double multiplier;
};

struct model_attach {
    int64_t n_nets, cap_nets;
    struct attach_entry *nets;
    int64_t n_w, cap_w;
    struct attach_weight *w;
};

lora_status attach_add(struct lora_model *m, struct lora_network *net, double multiplier, int32_t mode);
/* W += multiplier * alpha/r * up @ down for good (LORA_APPLY_MERGE, lora_model_merge_network):
 * into the float32 base of weights replaced by attachments, else as net_merge. */
lora_status attach_merge(struct lora_model *m, const struct lora_network *net, double multiplier);
lora_status attach_set_multiplier(struct lora_model *m, const struct lora_network *net, double multiplier);
lora_status attach_remove(struct lora_model *m, const struct lora_network *net);
lora_status attach_remove_all(struct lora_model *m);
/* (attach_release, for the model's free path, is declared in model/sd_model.h.) */

#endif
