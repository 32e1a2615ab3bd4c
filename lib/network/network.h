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
 * Networks applied to a model without losing the base. A weight with an adapter slot in the
 * model code (U-Net transformer Linear / projections, CLIP linears) stays untouched and gets a
 * low-rank branch (struct attach_lowrank); every other base weight an attached network touches
 * (convs, time embedding, ...) is replaced by a float32 buffer rebuilt as base + sum_i m_i *
 * alpha_i/r_i * up_i @ down_i. Both are rebuilt from the untouched originals on every attach,
 * detach and multiplier change (no drift); the cached fp32 runs are dropped after each change. */

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

/* One module's share of a low-rank branch: mm's factors at scale sc (m * alpha / rank). */
struct attach_part {
    const struct net_module *mm;
    float sc;
};

/* A base weight with an adapter slot in the U-Net / CLIP forward (a transformer Linear or 1x1
 * projection, a CLIP linear): left untouched, the attached networks act on it as one low-rank
 * branch y += up @ (down @ x), kohya's runtime forward. Several networks are one branch of
 * rank sum(r_i): down = [down_1; down_2; ...] [rank, in], up = [s_1 up_1 | s_2 up_2 ...]
 * [out, rank], scale 1. */
struct attach_lowrank {
    int32_t is_te;
    char *weight;              /* tensor name in sd.te / sd.unet */
    int64_t n_parts;
    struct attach_part *parts; /* in attachment order (the save-time merge replays them) */
    float *host;               /* down [rank, in] then up [out, rank], host memory */
    void *dev;                 /* a backend copy of `host` (NULL on the CPU backend) */
    struct nn_lora l;          /* the branch: down/up in backend memory, scale 1 */
};

struct model_attach {
    int64_t n_nets, cap_nets;
    struct attach_entry *nets;
    int64_t n_w, cap_w;
    struct attach_weight *w;
    int64_t n_lr;              /* low-rank branches (rebuilt on every change) */
    struct attach_lowrank *lr;
    int64_t max_rank;          /* largest branch rank (0: none) */
};

lora_status attach_add(struct lora_model *m, struct lora_network *net, double multiplier, int32_t mode);
/* W += multiplier * alpha/r * up @ down for good (LORA_APPLY_MERGE, lora_model_merge_network):
 * into the float32 base of weights replaced by attachments, else as net_merge. */
lora_status attach_merge(struct lora_model *m, const struct lora_network *net, double multiplier);
lora_status attach_set_multiplier(struct lora_model *m, const struct lora_network *net, double multiplier);
lora_status attach_remove(struct lora_model *m, const struct lora_network *net);
lora_status attach_remove_all(struct lora_model *m);
/* (attach_release, for the model's free path, is declared in model/sd_model.h.) */

/* ---- low-rank branches for the model code (consumers that run the U-Net or text encoder of a
 * model with attachments) ----------------------------------------------------------------- */
struct unet_model;
struct unet_adapters;
/* Fills `ad` (zeroed here) with the branches of the U-Net transformers of `u` (built from m's
 * weights); *max_rank: the rank to plan for (0: no branch). Every U-Net branch must find its
 * slot (LORA_E_INTERNAL otherwise). The pointers stay valid until the attachments change
 * (which drops the model's cached runs). */
lora_status attach_unet_adapters(const struct lora_model *m, const struct unet_model *u,
                                 struct unet_adapters *ad, int64_t *max_rank);
/* Text-encoder branches: te[layers * CLIP_N_SLOTS] (zeroed here), indexed as clip_forward
 * reads them; *max_rank as above. */
lora_status attach_te_adapters(const struct lora_model *m, int64_t layers, const struct nn_lora **te,
                               int64_t *max_rank);
/* Whether any branch acts on the U-Net (is_te 0) or the text encoder (is_te 1). */
int attach_has_lowrank(const struct lora_model *m, int32_t is_te);
/* `out` (an empty map) gets every tensor of m's U-Net (is_te 0) or text-encoder map: weights
 * with a low-rank branch as owned float32 copies of base + sum m_i alpha_i/r_i up_i @ down_i
 * (the merge of the replaced weights, bit for bit: what a save writes), the rest borrowed. v2
 * text encoders: q/k/v siblings of a merged one come along as float32 copies (one packed
 * in_proj_weight). */
lora_status attach_merged_map(const struct lora_model *m, int32_t is_te, struct tensor_map *out);

#endif
