/* Several LoRA networks applied to one model at run time, swappable without reloading
 * (lora_model_attach / lora_model_set_multiplier / lora_model_detach), as kohya's LoRANetwork
 * applies them at run time: the base weights stay as loaded and each attached module adds
 * multiplier * alpha/rank * up(down(x)) to its layer's output.
 *  - Weights with an adapter slot in the model code (U-Net transformer Linear / 1x1
 *    projections: unet_adapters; CLIP linears: clip_forward's lora array) get a low-rank branch:
 *    the modules of all attached networks on one weight are stacked into one nn_lora of rank
 *    sum(r_i) (down rows stacked, up columns scaled by m_i alpha_i/r_i, scale 1), rebuilt
 *    (cheaply) on every change. The base weight is untouched: the U-Net keeps borrowing the
 *    checkpoint's 16-bit matrices, so attaching costs only the factors.
 *  - Every other weight a network touches (LoCon 3x3 / resnet convs, ...) is replaced in the
 *    model's map by a float32 buffer holding W = base + sum_i m_i * (alpha_i / r_i) * up_i @ down_i,
 *    rebuilt from the untouched original on every change (no accumulated rounding): the backup
 *    scheme of AUTOMATIC1111's Lora extension, made exact.
 * The cached fp32 runs are dropped on every change, so the next U-Net / VAE / text-encoder call
 * rebuilds from the maps and picks up the branches (attach_unet_adapters / attach_te_adapters).
 * Either way a float16 checkpoint gets kohya's runtime result (fp32 forward plus the LoRA
 * branch) instead of a sum rounded to float16; a save writes the merged weights
 * (attach_merged_map). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cblas.h>

#include "backend/backend.h"
#include "core/checked.h"
#include "core/dtype.h"
#include "model/clip.h"
#include "model/unet.h"
#include "network/network.h"

static void unref_net(struct lora_network *net) {
    if (--net->attached > 0 || !net->user_freed) return;
    lora_ctx *ctx = net->ctx;
    net_free(net);
    lora_ctx_release(ctx);
}

static struct tensor_map *map_of(struct lora_model *m, int32_t is_te) { return is_te ? &m->sd.te : &m->sd.unet; }

static int64_t find_weight(const struct model_attach *a, int32_t is_te, const char *name) {
    for (int64_t i = 0; i < a->n_w; i++)
        if (a->w[i].is_te == is_te && strcmp(a->w[i].weight, name) == 0) return i;
    return -1;
}

static const struct net_target *find_target(const struct net_target *t, int64_t nt, const char *name) {
    for (int64_t i = 0; i < nt; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    return NULL;
}

/* Same rule as net_coverage: a 4-D 1x1 factor pair fits a Linear (squeezed) and a 2-D pair a
 * 1x1 conv; the element layout of up @ down is [out, in*kh*kw] either way. */
static int fits(const struct net_module *mm, const struct net_target *t) {
    if (mm->out != t->out || mm->in != t->in) return 0;
    if (t->kind == NET_LINEAR) return mm->kh == 1 && mm->kw == 1;
    return mm->kh == t->kh && mm->kw == t->kw;
}

static lora_status ensure_state(struct lora_model *m) {
    if (m->attach) return LORA_OK;
    m->attach = lora_calloc(m->ctx, 1, sizeof *m->attach);
    return m->attach ? LORA_OK : LORA_E_NOMEM;
}

/* ---- low-rank branches ---------------------------------------------------------------------- */

/* Whether `tg` has an adapter slot in the model code: a CLIP linear
 * "text_model.encoder.layers.N.<slot>.weight", or a U-Net transformer target
 * "<down_blocks.N|up_blocks.N|mid_block>.attentions.M.(transformer_blocks.0.<t>|proj_in|proj_out).weight".
 * attach_unet_adapters / attach_te_adapters find the slots by the same names. */
static int has_slot(const struct net_target *tg) {
    if (tg->kind == NET_CONVKXK) return 0;
    const char *w = tg->weight;
    size_t n = strlen(w);
    if (n < 8 || strcmp(w + n - 7, ".weight") != 0) return 0;
    if (tg->is_te) {
        static const char pre[] = "text_model.encoder.layers.";
        if (strncmp(w, pre, sizeof pre - 1) != 0) return 0;
        const char *p = w + sizeof pre - 1;
        if (*p < '0' || *p > '9') return 0;
        while (*p >= '0' && *p <= '9') p++;
        if (*p++ != '.') return 0;
        for (int k = 0; k < CLIP_N_SLOTS; k++) {
            size_t ln = strlen(clip_slot_name(k));
            if ((size_t)(w + n - 7 - p) == ln && strncmp(p, clip_slot_name(k), ln) == 0) return 1;
        }
        return 0;
    }
    const char *a = strstr(w, ".attentions.");
    if (!a) return 0;
    size_t pl = (size_t)(a - w);
    int pre_ok = (pl == 9 && strncmp(w, "mid_block", 9) == 0);
    if (!pre_ok && (strncmp(w, "down_blocks.", 12) == 0 || strncmp(w, "up_blocks.", 10) == 0)) {
        const char *d = w + (w[0] == 'd' ? 12 : 10);
        if (d < a && *d >= '0' && *d <= '9') {
            while (d < a && *d >= '0' && *d <= '9') d++;
            pre_ok = d == a;
        }
    }
    if (!pre_ok) return 0;
    const char *p = a + 12;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') p++;
    if (*p++ != '.') return 0;
    size_t rl = (size_t)(w + n - 7 - p);
    for (int t = 0; t < UNET_T_N; t++) {
        char want[96];
        if (t == UNET_T_PROJ_IN || t == UNET_T_PROJ_OUT) snprintf(want, sizeof want, "%s", unet_target_names[t]);
        else snprintf(want, sizeof want, "transformer_blocks.0.%s", unet_target_names[t]);
        if (strlen(want) == rl && strncmp(p, want, rl) == 0) return 1;
    }
    return 0;
}

static void free_lowrank(lora_ctx *ctx, struct attach_lowrank *lr, int64_t n) {
    struct lora_backend_impl *be = ctx->backend;
    for (int64_t i = 0; lr && i < n; i++) {
        if (lr[i].dev && be) be->iface->buf_free(be, lr[i].dev);
        lora_free(ctx, lr[i].host);
        lora_free(ctx, lr[i].parts);
        lora_free(ctx, lr[i].weight);
    }
    lora_free(ctx, lr);
}

static struct attach_lowrank *find_lowrank(const struct model_attach *a, int32_t is_te, const char *name) {
    for (int64_t i = 0; a && i < a->n_lr; i++)
        if (a->lr[i].is_te == is_te && strcmp(a->lr[i].weight, name) == 0) return &a->lr[i];
    return NULL;
}

/* The branches of the attached networks, built from scratch (the model is not changed). A
 * module at scale 0 adds nothing and is left out. */
static lora_status build_lowrank(struct lora_model *m, const struct net_target *t, int64_t nt,
                                 struct attach_lowrank **out, int64_t *n_out, int64_t *max_rank) {
    const struct model_attach *a = m->attach;
    lora_ctx *ctx = m->ctx;
    struct lora_backend_impl *be = ctx->backend;
    struct attach_lowrank *lr = NULL;
    int64_t n = 0, cap = 0, maxr = 0;
    lora_status s = LORA_OK;
    *out = NULL;
    *n_out = 0;
    *max_rank = 0;
    /* 1: group the modules by weight, in attachment order */
    for (int64_t e = 0; e < a->n_nets && !s; e++) {
        const struct lora_network *net = a->nets[e].net;
        for (int64_t k = 0; k < net->n && !s; k++) {
            const struct net_module *mm = &net->m[k];
            const struct net_target *tg = find_target(t, nt, mm->name);
            if (!tg || !fits(mm, tg) || !has_slot(tg)) continue;
            float sc = nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, a->nets[e].multiplier);
            if (sc == 0.0f) continue;
            int64_t i = 0;
            while (i < n && !(lr[i].is_te == tg->is_te && strcmp(lr[i].weight, tg->weight) == 0)) i++;
            if (i == n) {
                const struct tensor_map *map = map_of(m, tg->is_te);
                int64_t ti = tmap_find(map, tg->weight);
                lora_dtype dt = ti >= 0 ? map->t[ti].dtype : 0;
                if (dt != LORA_DTYPE_F32 && dt != LORA_DTYPE_F16 && dt != LORA_DTYPE_BF16) {
                    s = lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot apply LoRA to '%s': dtype %s", tg->weight,
                                  lora_dtype_name(dt) ? lora_dtype_name(dt) : "?");
                    break;
                }
                if (n == cap) {
                    int64_t nc = cap ? 2 * cap : 64;
                    struct attach_lowrank *nl = lora_calloc(ctx, (size_t)nc, sizeof *nl);
                    if (!nl) { s = LORA_E_NOMEM; break; }
                    if (n) memcpy(nl, lr, (size_t)n * sizeof *nl);
                    lora_free(ctx, lr);
                    lr = nl;
                    cap = nc;
                }
                memset(&lr[n], 0, sizeof lr[n]);
                lr[n].is_te = tg->is_te;
                lr[n].weight = lora_strdup(ctx, tg->weight);
                lr[n].parts = lora_malloc(ctx, (size_t)a->n_nets * sizeof *lr[n].parts);
                lr[n].l.in = mm->in;
                lr[n].l.out = mm->out;
                n++;
                if (!lr[i].weight || !lr[i].parts) { s = LORA_E_NOMEM; break; }
            }
            if (lr[i].n_parts == a->n_nets) {   /* two modules of one network on one weight */
                s = lora_fail(ctx, LORA_E_INVALID_ARG, "attach: more than one module per network on '%s'", tg->weight);
                break;
            }
            lr[i].parts[lr[i].n_parts].mm = mm;
            lr[i].parts[lr[i].n_parts].sc = sc;
            lr[i].n_parts++;
            lr[i].l.rank += mm->rank;
        }
    }
    /* 2: the stacked factors */
    for (int64_t i = 0; i < n && !s; i++) {
        struct attach_lowrank *b = &lr[i];
        int64_t R = b->l.rank, in = b->l.in, o = b->l.out, nd = 0, nu = 0, tot = 0;
        if (!ck_mul_i64(R, in, &nd) || !ck_mul_i64(o, R, &nu) || nd > INT64_MAX - nu || (tot = nd + nu) > (INT64_MAX / 4)) {
            s = lora_fail(ctx, LORA_E_LIMIT, "attach: the low-rank branch of '%s' (rank %lld) is too large", b->weight,
                          (long long)R);
            break;
        }
        b->host = lora_malloc(ctx, (size_t)tot * 4);
        if (!b->host) { s = LORA_E_NOMEM; break; }
        float *down = b->host, *up = b->host + nd;
        int64_t off = 0;
        for (int64_t q = 0; q < b->n_parts; q++) {
            const struct net_module *mm = b->parts[q].mm;
            float sc = b->parts[q].sc;
            memcpy(down + off * in, mm->down, (size_t)(mm->rank * in) * 4);
            for (int64_t r = 0; r < o; r++)
                for (int64_t z = 0; z < mm->rank; z++) up[r * R + off + z] = sc * mm->up[r * mm->rank + z];
            off += mm->rank;
        }
        b->l.scale = 1.0f;
        b->l.down = down;
        b->l.up = up;
        if (be && strcmp(be->iface->name, "cpu") != 0) {   /* the forward reads backend memory */
            s = be->iface->buf_alloc(be, (size_t)tot * 4, &b->dev);
            if (s) { b->dev = NULL; break; }
            s = be->iface->upload(be, b->dev, b->host, (size_t)tot * 4);
            b->l.down = b->dev;
            b->l.up = (const float *)b->dev + nd;
        }
        if (R > maxr) maxr = R;
    }
    if (s) {
        free_lowrank(ctx, lr, n);
        return s;
    }
    *out = lr;
    *n_out = n;
    *max_rank = maxr;
    return LORA_OK;
}

int attach_has_lowrank(const struct lora_model *m, int32_t is_te) {
    for (int64_t i = 0; m && m->attach && i < m->attach->n_lr; i++)
        if (m->attach->lr[i].is_te == is_te) return 1;
    return 0;
}

lora_status attach_unet_adapters(const struct lora_model *m, const struct unet_model *u, struct unet_adapters *ad,
                                 int64_t *max_rank) {
    memset(ad, 0, sizeof *ad);
    *max_rank = 0;
    const struct model_attach *a = m->attach;
    int64_t want = 0, placed = 0;
    for (int64_t i = 0; a && i < a->n_lr; i++) want += a->lr[i].is_te == 0;
    if (want == 0) return LORA_OK;
    for (int64_t x = 0; x < u->n_xf && x < 64; x++)
        for (int t = 0; t < UNET_T_N; t++) {
            char name[256];
            if (t == UNET_T_PROJ_IN || t == UNET_T_PROJ_OUT)
                snprintf(name, sizeof name, "%s.%s.weight", u->xf[x]->name, unet_target_names[t]);
            else
                snprintf(name, sizeof name, "%s.transformer_blocks.0.%s.weight", u->xf[x]->name, unet_target_names[t]);
            const struct attach_lowrank *b = find_lowrank(a, 0, name);
            if (!b) continue;
            ad->lora[x][t] = &b->l;
            if (b->l.rank > *max_rank) *max_rank = b->l.rank;
            placed++;
        }
    if (placed != want)
        return lora_fail(m->ctx, LORA_E_INTERNAL, "attach: %lld of %lld U-Net LoRA branches have no transformer slot",
                         (long long)(want - placed), (long long)want);
    return LORA_OK;
}

lora_status attach_te_adapters(const struct lora_model *m, int64_t layers, const struct nn_lora **te,
                               int64_t *max_rank) {
    memset(te, 0, (size_t)(layers * CLIP_N_SLOTS) * sizeof *te);
    *max_rank = 0;
    const struct model_attach *a = m->attach;
    int64_t want = 0, placed = 0;
    for (int64_t i = 0; a && i < a->n_lr; i++) want += a->lr[i].is_te == 1;
    if (want == 0) return LORA_OK;
    for (int64_t l = 0; l < layers; l++)
        for (int k = 0; k < CLIP_N_SLOTS; k++) {
            char name[256];
            snprintf(name, sizeof name, "text_model.encoder.layers.%lld.%s.weight", (long long)l, clip_slot_name(k));
            const struct attach_lowrank *b = find_lowrank(a, 1, name);
            if (!b) continue;
            te[l * CLIP_N_SLOTS + k] = &b->l;
            if (b->l.rank > *max_rank) *max_rank = b->l.rank;
            placed++;
        }
    if (placed != want)
        return lora_fail(m->ctx, LORA_E_INTERNAL, "attach: %lld of %lld text-encoder LoRA branches have no slot",
                         (long long)(want - placed), (long long)want);
    return LORA_OK;
}

/* "....self_attn.q_proj.weight" (or k, v) of a v2 text encoder: the packed in_proj needs the
 * three in one dtype; *pre gets the layer prefix. */
static int qkv_of(const char *w, char *pre, size_t cap) {
    const char *qkv = strstr(w, ".self_attn.");
    if (!qkv || strlen(qkv) != strlen(".self_attn.q_proj.weight") || strcmp(qkv + 12, "_proj.weight") != 0 ||
        !strchr("qkv", qkv[11]))
        return 0;
    snprintf(pre, cap, "%.*s", (int)(qkv - w), w);
    return 1;
}

lora_status attach_merged_map(const struct lora_model *m, int32_t is_te, struct tensor_map *out) {
    lora_ctx *ctx = m->ctx;
    const struct tensor_map *in = is_te ? &m->sd.te : &m->sd.unet;
    const struct model_attach *a = m->attach;
    for (int64_t i = 0; i < in->n; i++) {
        const struct lora_tensor *t = &in->t[i];
        const struct attach_lowrank *b = find_lowrank(a, is_te, t->name);
        int sib = 0;
        char pre[256];
        if (!b && is_te && m->sd.cfg.version == 2 && qkv_of(t->name, pre, sizeof pre))
            for (int c = 0; c < 3 && !sib; c++) {
                char w[300];
                snprintf(w, sizeof w, "%s.self_attn.%c_proj.weight", pre, "qkv"[c]);
                sib = find_lowrank(a, 1, w) != NULL;
            }
        int is_fl = t->dtype == LORA_DTYPE_F32 || t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16;
        if ((!b && !sib) || !is_fl) {
            if (b) return lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot apply LoRA to '%s': dtype %s", t->name,
                                    lora_dtype_name(t->dtype) ? lora_dtype_name(t->dtype) : "?");
            LORA_TRY(tmap_add(out, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0, 0));
            continue;
        }
        int64_t numel = tmap_numel(t);
        float *w = lora_malloc(ctx, (size_t)numel * 4);
        if (!w) return LORA_E_NOMEM;
        lora_status s = net_to_f32(ctx, t->name, t->dtype, t->data, numel, w);
        /* the replaced-weight sum: one sgemm per module in attachment order */
        for (int64_t q = 0; b && q < b->n_parts && !s; q++) {
            const struct net_module *mm = b->parts[q].mm;
            int64_t kk = mm->in * mm->kh * mm->kw;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)kk, (int)mm->rank,
                        b->parts[q].sc, mm->up, (int)mm->rank, mm->down, (int)kk, 1.0f, w, (int)kk);
        }
        if (!s) s = tmap_add(out, t->name, LORA_DTYPE_F32, t->ndim, t->shape, w, (uint64_t)numel * 4, 0, 1);
        if (s) {
            lora_free(ctx, w);
            return s;
        }
    }
    return LORA_OK;
}

/* Puts weight i's original tensor back into the map (or, after merges or adopted changes, its
 * float32 base stored in the original dtype, as a merge without attachments stores it) and
 * forgets it. */
static lora_status restore_weight(struct lora_model *m, int64_t i) {
    struct model_attach *a = m->attach;
    struct attach_weight *w = &a->w[i];
    struct tensor_map *map = map_of(m, w->is_te);
    int64_t ti = tmap_find(map, w->weight);
    lora_status s = LORA_OK;
    if (ti >= 0 && map->t[ti].data == w->live) {
        struct lora_tensor *t = &map->t[ti];
        if (w->base) {
            /* merges stay: the merged float32 base, stored back in the original dtype */
            void *dst = lora_malloc(m->ctx, (size_t)w->orig.nbytes);
            if (!dst) return LORA_E_NOMEM;
            for (int64_t k = 0; k < w->numel; k++) {
                if (w->orig.dtype == LORA_DTYPE_F16) { uint16_t v = lora_f32_to_f16(w->base[k]); memcpy((char *)dst + 2 * k, &v, 2); }
                else if (w->orig.dtype == LORA_DTYPE_BF16) { uint16_t v = lora_f32_to_bf16(w->base[k]); memcpy((char *)dst + 2 * k, &v, 2); }
                else memcpy((char *)dst + 4 * k, &w->base[k], 4);
            }
            if (w->orig.owned) lora_free(m->ctx, w->orig.data);
            t->data = dst;
            t->owned = 1;
        } else {
            t->data = w->orig.data;
            t->owned = w->orig.owned;
        }
        t->dtype = w->orig.dtype;
        t->nbytes = w->orig.nbytes;
    } else {
        /* someone replaced the tensor (lora_model_cast, lora_merge_into_model): theirs stays */
        lora_log(m->ctx, LORA_LOG_WARN,
                 "weight '%s' was replaced while LoRA networks were attached: keeping the new tensor", w->weight);
        if (w->orig.owned) lora_free(m->ctx, w->orig.data);
        s = LORA_OK;
    }
    lora_free(m->ctx, w->live);
    lora_free(m->ctx, w->base);
    lora_free(m->ctx, w->weight);
    a->w[i] = a->w[--a->n_w];
    return s;
}

/* Registers weight `tg` (not yet replaced): records the original and allocates its float32
 * buffer. The map is not changed yet. */
static lora_status add_weight(struct lora_model *m, const struct net_target *tg, int64_t *idx) {
    struct model_attach *a = m->attach;
    lora_ctx *ctx = m->ctx;
    struct tensor_map *map = map_of(m, tg->is_te);
    int64_t ti = tmap_find(map, tg->weight);
    if (ti < 0) return lora_fail(ctx, LORA_E_INTERNAL, "attach: target weight '%s' vanished", tg->weight);
    const struct lora_tensor *t = &map->t[ti];
    if (t->dtype != LORA_DTYPE_F32 && t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot apply LoRA to '%s': dtype %s", tg->weight,
                         lora_dtype_name(t->dtype) ? lora_dtype_name(t->dtype) : "?");
    if (a->n_w == a->cap_w) {
        int64_t cap = a->cap_w ? 2 * a->cap_w : 64;
        struct attach_weight *nw = lora_malloc(ctx, (size_t)cap * sizeof *nw);
        if (!nw) return LORA_E_NOMEM;
        if (a->n_w) memcpy(nw, a->w, (size_t)a->n_w * sizeof *nw);
        lora_free(ctx, a->w);
        a->w = nw;
        a->cap_w = cap;
    }
    struct attach_weight w;
    memset(&w, 0, sizeof w);
    w.is_te = tg->is_te;
    w.numel = tmap_numel(t);
    w.orig = *t;
    w.orig.name = NULL;
    w.weight = lora_strdup(ctx, tg->weight);
    w.live = lora_malloc(ctx, (size_t)w.numel * 4);
    if (!w.weight || !w.live) {
        lora_free(ctx, w.weight);
        lora_free(ctx, w.live);
        return LORA_E_NOMEM;
    }
    *idx = a->n_w;
    a->w[a->n_w++] = w;
    return LORA_OK;
}

/* Whether weight i is installed in the map (its tensor points at the float32 buffer). */
static int installed(struct lora_model *m, const struct attach_weight *w) {
    struct tensor_map *map = map_of(m, w->is_te);
    int64_t ti = tmap_find(map, w->weight);
    return ti >= 0 && map->t[ti].data == w->live;
}

/* Rebuilds every replaced weight from the attachment list. On failure before any weight was
 * written (allocation, dtype) the weights are as before and newly registered ones are gone. */
static lora_status rebuild(struct lora_model *m) {
    struct model_attach *a = m->attach;
    lora_ctx *ctx = m->ctx;
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(&m->sd, 1, &t, &nt));
    int64_t n_before = a->n_w;
    lora_status s = LORA_OK;
    for (int64_t i = 0; i < a->n_w; i++) a->w[i].used = 0;
    /* 1: register every weight some attached module touches (may fail: undo) */
    for (int64_t e = 0; e < a->n_nets && !s; e++) {
        const struct lora_network *net = a->nets[e].net;
        for (int64_t k = 0; k < net->n && !s; k++) {
            const struct net_target *tg = find_target(t, nt, net->m[k].name);
            if (!tg || !fits(&net->m[k], tg) || has_slot(tg)) continue;   /* slots: low-rank branches */
            int64_t wi = find_weight(a, tg->is_te, tg->weight);
            if (wi < 0) s = add_weight(m, tg, &wi);
            if (!s) a->w[wi].used = 1;
        }
    }
    /* v2: q/k/v are saved packed into one in_proj_weight, which needs one dtype for the three:
     * a replaced q, k or v brings its siblings along (float32 copies, no delta) */
    for (int64_t i = 0; i < a->n_w && !s && m->sd.cfg.version == 2; i++) {
        const struct attach_weight *w = &a->w[i];
        const char *qkv = w->is_te && w->used ? strstr(w->weight, ".self_attn.") : NULL;
        if (!qkv || strlen(qkv) != strlen(".self_attn.q_proj.weight") || strcmp(qkv + 12, "_proj.weight") != 0) continue;
        char pre[256];
        snprintf(pre, sizeof pre, "%.*s", (int)(qkv - w->weight), w->weight);
        for (int c = 0; c < 3 && !s; c++) {   /* add_weight may move a->w: only `pre` is used */
            char sib[300];
            snprintf(sib, sizeof sib, "%s.self_attn.%c_proj.weight", pre, "qkv"[c]);
            int64_t wi = find_weight(a, 1, sib);
            if (wi < 0) {
                const struct net_target *tg = NULL;
                for (int64_t k = 0; k < nt && !tg; k++)
                    if (t[k].is_te && strcmp(t[k].weight, sib) == 0) tg = &t[k];
                if (!tg) continue;
                s = add_weight(m, tg, &wi);
            }
            if (!s) a->w[wi].used = 1;
        }
    }
    /* 1b: the low-rank branches (may fail: undo) */
    struct attach_lowrank *lr = NULL;
    int64_t n_lr = 0, max_rank = 0;
    if (!s) s = build_lowrank(m, t, nt, &lr, &n_lr, &max_rank);
    if (s) {
        while (a->n_w > n_before) {
            struct attach_weight *w = &a->w[--a->n_w];
            lora_free(ctx, w->weight);
            lora_free(ctx, w->live);
        }
        lora_free(ctx, t);
        return s;
    }
    int te_changed = attach_has_lowrank(m, 1);
    free_lowrank(ctx, a->lr, a->n_lr);
    a->lr = lr;
    a->n_lr = n_lr;
    a->max_rank = max_rank;
    te_changed |= attach_has_lowrank(m, 1);
    /* 2: base values (cannot fail: dtypes were checked when registered) */
    for (int64_t i = 0; i < a->n_w; i++) {
        struct attach_weight *w = &a->w[i];
        /* unused installed ones too: should giving them back fail, they hold their base */
        if (!w->used && !installed(m, w)) continue;
        if (w->base) memcpy(w->live, w->base, (size_t)w->numel * 4);
        else net_to_f32(ctx, w->weight, w->orig.dtype, w->orig.data, w->numel, w->live);
        te_changed |= w->is_te;
    }
    /* 3: the deltas, in attachment order */
    for (int64_t e = 0; e < a->n_nets; e++) {
        const struct lora_network *net = a->nets[e].net;
        for (int64_t k = 0; k < net->n; k++) {
            const struct net_module *mm = &net->m[k];
            const struct net_target *tg = find_target(t, nt, mm->name);
            if (!tg || !fits(mm, tg) || has_slot(tg)) continue;
            struct attach_weight *w = &a->w[find_weight(a, tg->is_te, tg->weight)];
            float sc = nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, a->nets[e].multiplier);
            int64_t kk = mm->in * mm->kh * mm->kw;
            if (sc != 0.0f)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)kk, (int)mm->rank, sc,
                            mm->up, (int)mm->rank, mm->down, (int)kk, 1.0f, w->live, (int)kk);
        }
    }
    lora_free(ctx, t);
    /* 4: install the used ones, then give back the ones no network touches any more (only
     * that can fail, for lack of memory; those left installed hold their base values) */
    for (int64_t i = 0; i < a->n_w; i++) {
        struct attach_weight *w = &a->w[i];
        if (!w->used) continue;
        struct tensor_map *map = map_of(m, w->is_te);
        struct lora_tensor *tt = &map->t[tmap_find(map, w->weight)];
        tt->data = w->live;
        tt->dtype = LORA_DTYPE_F32;
        tt->nbytes = (uint64_t)w->numel * 4;
        tt->owned = 0;   /* the attachment owns it; attach_release puts the original back */
    }
    for (int64_t i = 0; i < a->n_w && !s;) {
        struct attach_weight *w = &a->w[i];
        if (w->used) { i++; continue; }
        te_changed |= w->is_te;
        s = restore_weight(m, i);   /* moves the last entry to i */
    }
    if (te_changed) model_drop_runs(m);
    else model_drop_image_runs(m);
    return s;
}

/* Adopts changes others made to replaced weights since the last rebuild (lora_model_cast,
 * lora_merge_into_model write new tensors into the maps): the new tensor becomes the original,
 * and the float32 base is it minus the deltas of the attached networks (with the multipliers
 * they were applied with), so those calls act on the base as they would without attachments.
 * Called before the attachment list changes. */
static lora_status sync_foreign(struct lora_model *m) {
    struct model_attach *a = m->attach;
    if (!a || a->n_w == 0) return LORA_OK;
    lora_ctx *ctx = m->ctx;
    struct net_target *t = NULL;
    int64_t nt = 0;
    int any = 0;
    for (int64_t i = 0; i < a->n_w; i++) any |= !installed(m, &a->w[i]);
    if (!any) return LORA_OK;
    LORA_TRY(net_targets(&m->sd, 1, &t, &nt));
    lora_status s = LORA_OK;
    for (int64_t i = 0; i < a->n_w && !s;) {
        struct attach_weight *w = &a->w[i];
        if (installed(m, w)) { i++; continue; }
        struct tensor_map *map = map_of(m, w->is_te);
        int64_t ti = tmap_find(map, w->weight);
        struct lora_tensor *tt = ti >= 0 ? &map->t[ti] : NULL;
        if (!tt || tmap_numel(tt) != w->numel ||
            (tt->dtype != LORA_DTYPE_F32 && tt->dtype != LORA_DTYPE_F16 && tt->dtype != LORA_DTYPE_BF16)) {
            /* gone or unusable: forget it, the tensor stays as the caller left it */
            lora_log(ctx, LORA_LOG_WARN, "weight '%s' was replaced while LoRA networks were attached: keeping the "
                     "new tensor as it is", w->weight);
            if (w->orig.owned) lora_free(ctx, w->orig.data);
            lora_free(ctx, w->live);
            lora_free(ctx, w->base);
            lora_free(ctx, w->weight);
            a->w[i] = a->w[--a->n_w];
            continue;
        }
        if (!w->base) {
            w->base = lora_malloc(ctx, (size_t)w->numel * 4);
            if (!w->base) { s = LORA_E_NOMEM; break; }
        }
        net_to_f32(ctx, w->weight, tt->dtype, tt->data, w->numel, w->base);
        for (int64_t e = 0; e < a->n_nets; e++) {
            const struct lora_network *net = a->nets[e].net;
            for (int64_t k = 0; k < net->n; k++) {
                const struct net_module *mm = &net->m[k];
                const struct net_target *tg = find_target(t, nt, mm->name);
                if (!tg || tg->is_te != w->is_te || strcmp(tg->weight, w->weight) != 0 || !fits(mm, tg)) continue;
                float sc = nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, a->nets[e].multiplier);
                int64_t kk = mm->in * mm->kh * mm->kw;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)kk, (int)mm->rank, -sc,
                            mm->up, (int)mm->rank, mm->down, (int)kk, 1.0f, w->base, (int)kk);
            }
        }
        /* the new tensor is the original from now on (its data is ours when the map owned it);
         * a float32 result kept the dtype of our float32 buffer (a merge), not a choice of the
         * caller, so the weight goes back to its previous dtype when detached */
        lora_dtype keep = tt->dtype == LORA_DTYPE_F32 ? w->orig.dtype : tt->dtype;
        if (w->orig.owned) lora_free(ctx, w->orig.data);
        w->orig = *tt;
        w->orig.name = NULL;
        if (keep != w->orig.dtype) {   /* restore_weight writes `base` in orig.dtype */
            w->orig.dtype = keep;
            w->orig.nbytes = (uint64_t)w->numel * (keep == LORA_DTYPE_F32 ? 4u : 2u);
        }
        tt->data = w->live;   /* installed again; rebuild writes its values */
        tt->dtype = LORA_DTYPE_F32;
        tt->nbytes = (uint64_t)w->numel * 4;
        tt->owned = 0;
        lora_log(ctx, LORA_LOG_INFO, "weight '%s' changed while LoRA networks were attached: adopted as the new base",
                 w->weight);
        i++;
    }
    lora_free(ctx, t);
    /* the installed buffers still hold the old sums: recompute them now */
    return s ? s : rebuild(m);
}

static int64_t find_net(const struct model_attach *a, const struct lora_network *net) {
    for (int64_t i = 0; a && i < a->n_nets; i++)
        if (a->nets[i].net == net) return i;
    return -1;
}

/* LORA_APPLY_MERGE on a model some of whose weights are replaced: deltas for replaced weights go
 * into their float32 base (so they survive detaching), the others into the tensor as
 * net_merge does. */
static lora_status merge_with_backups(struct lora_model *m, const struct lora_network *net, double mult) {
    struct model_attach *a = m->attach;
    lora_ctx *ctx = m->ctx;
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(&m->sd, 1, &t, &nt));
    lora_status s = LORA_OK;
    for (int64_t k = 0; k < net->n && !s; k++) {
        const struct net_module *mm = &net->m[k];
        const struct net_target *tg = find_target(t, nt, mm->name);
        if (!tg || !fits(mm, tg)) continue;
        int64_t wi = find_weight(a, tg->is_te, tg->weight);
        float sc = nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, mult);
        int64_t kk = mm->in * mm->kh * mm->kw;
        float *dst;
        struct lora_tensor *tt = NULL;
        if (wi >= 0) {
            struct attach_weight *w = &a->w[wi];
            if (!w->base) {
                w->base = lora_malloc(ctx, (size_t)w->numel * 4);
                if (!w->base) { s = LORA_E_NOMEM; break; }
                net_to_f32(ctx, w->weight, w->orig.dtype, w->orig.data, w->numel, w->base);
            }
            dst = w->base;
        } else {
            struct tensor_map *map = map_of(m, tg->is_te);
            tt = &map->t[tmap_find(map, tg->weight)];
            if (tt->dtype != LORA_DTYPE_F32 && tt->dtype != LORA_DTYPE_F16 && tt->dtype != LORA_DTYPE_BF16) {
                s = lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot merge into '%s': dtype %s", tg->weight,
                              lora_dtype_name(tt->dtype));
                break;
            }
            dst = lora_malloc(ctx, (size_t)tmap_numel(tt) * 4);
            if (!dst) { s = LORA_E_NOMEM; break; }
            net_to_f32(ctx, tg->weight, tt->dtype, tt->data, tmap_numel(tt), dst);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)kk, (int)mm->rank, sc, mm->up,
                    (int)mm->rank, mm->down, (int)kk, 1.0f, dst, (int)kk);
        if (tt) {
            void *out = tt->owned ? tt->data : lora_malloc(ctx, (size_t)tt->nbytes);
            if (!out) { lora_free(ctx, dst); s = LORA_E_NOMEM; break; }
            int64_t n = tmap_numel(tt);
            for (int64_t e = 0; e < n; e++) {
                if (tt->dtype == LORA_DTYPE_F16) { uint16_t v = lora_f32_to_f16(dst[e]); memcpy((char *)out + 2 * e, &v, 2); }
                else if (tt->dtype == LORA_DTYPE_BF16) { uint16_t v = lora_f32_to_bf16(dst[e]); memcpy((char *)out + 2 * e, &v, 2); }
                else memcpy((char *)out + 4 * e, &dst[e], 4);
            }
            if (out != tt->data) sd_release_borrowed(&m->sd, tt->data, tt->nbytes);
            tt->data = out;
            tt->owned = 1;
            lora_free(ctx, dst);
        }
    }
    lora_free(ctx, t);
    if (s) return s;
    return rebuild(m);
}

lora_status attach_merge(struct lora_model *m, const struct lora_network *net, double multiplier) {
    if (!isfinite(multiplier))
        return lora_fail(m->ctx, LORA_E_CONFIG_RANGE, "merge multiplier is not finite");
    LORA_TRY(sync_foreign(m));
    if (m->attach && m->attach->n_w > 0) return merge_with_backups(m, net, multiplier);
    lora_status s = net_merge(net, &m->sd, multiplier);
    model_drop_runs(m);
    return s;
}

static void log_coverage(struct lora_model *m, const struct lora_network *net, int64_t matched, int64_t unused,
                         int64_t mismatch, double mult, const char *how) {
    const char *name = net_meta_get(net, "ss_output_name");
    lora_log(m->ctx, LORA_LOG_INFO,
             "%s LoRA network%s%s%s (%lld modules) at multiplier %g: %lld matched, %lld unused, %lld shape mismatches",
             how, name ? " '" : "", name ? name : "", name ? "'" : "", (long long)net->n, mult, (long long)matched,
             (long long)unused, (long long)mismatch);
    if (mult == 0.0)
        lora_log(m->ctx, LORA_LOG_INFO, "multiplier 0: the network has no effect until its multiplier changes");
}

lora_status attach_add(struct lora_model *m, struct lora_network *net, double multiplier, int32_t mode) {
    lora_ctx *ctx = m->ctx;
    if (!isfinite(multiplier))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_model_attach: multiplier is not finite");
    if (mode != LORA_APPLY_RUNTIME && mode != LORA_APPLY_MERGE)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_model_attach: mode %d is neither LORA_APPLY_RUNTIME (1) nor "
                         "LORA_APPLY_MERGE (2)", (int)mode);
    if (find_net(m->attach, net) >= 0)
        return lora_fail(ctx, LORA_E_INVALID_ARG,
                         "lora_model_attach: the network is already attached to this model (change its "
                         "multiplier with lora_model_set_multiplier)");
    int64_t matched = 0, unused = 0, mismatch = 0;
    LORA_TRY(net_coverage(net, &m->sd, &matched, &unused, &mismatch));
    LORA_TRY(sync_foreign(m));
    if (mode == LORA_APPLY_MERGE) {
        lora_status s = attach_merge(m, net, multiplier);
        if (s == LORA_OK) log_coverage(m, net, matched, unused, mismatch, multiplier, "merged");
        return s;
    }
    LORA_TRY(ensure_state(m));
    struct model_attach *a = m->attach;
    if (a->n_nets == a->cap_nets) {
        int64_t cap = a->cap_nets ? 2 * a->cap_nets : 4;
        struct attach_entry *ne = lora_malloc(ctx, (size_t)cap * sizeof *ne);
        if (!ne) return LORA_E_NOMEM;
        if (a->n_nets) memcpy(ne, a->nets, (size_t)a->n_nets * sizeof *ne);
        lora_free(ctx, a->nets);
        a->nets = ne;
        a->cap_nets = cap;
    }
    a->nets[a->n_nets].net = net;
    a->nets[a->n_nets].multiplier = multiplier;
    a->n_nets++;
    lora_status s = rebuild(m);
    if (s) {
        a->n_nets--;
        return s;
    }
    net->attached++;
    log_coverage(m, net, matched, unused, mismatch, multiplier, "attached");
    return LORA_OK;
}

lora_status attach_set_multiplier(struct lora_model *m, const struct lora_network *net, double multiplier) {
    lora_ctx *ctx = m->ctx;
    if (!isfinite(multiplier))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "lora_model_set_multiplier: multiplier is not finite");
    int64_t i = find_net(m->attach, net);
    if (i < 0)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_model_set_multiplier: the network is not attached to this "
                         "model at run time (networks attached with LORA_APPLY_MERGE are part of the weights)");
    LORA_TRY(sync_foreign(m));
    double old = m->attach->nets[i].multiplier;
    m->attach->nets[i].multiplier = multiplier;
    lora_status s = rebuild(m);
    if (s) m->attach->nets[i].multiplier = old;
    return s;
}

lora_status attach_remove(struct lora_model *m, const struct lora_network *net) {
    lora_ctx *ctx = m->ctx;
    int64_t i = find_net(m->attach, net);
    if (i < 0)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_model_detach: the network is not attached to this model at "
                         "run time (a LORA_APPLY_MERGE merge can only be undone by reloading the model)");
    LORA_TRY(sync_foreign(m));
    struct model_attach *a = m->attach;
    struct attach_entry e = a->nets[i];
    memmove(&a->nets[i], &a->nets[i + 1], (size_t)(a->n_nets - i - 1) * sizeof *a->nets);
    a->n_nets--;
    /* giving weights back only frees; registering none is needed, so this cannot fail for
     * lack of memory except in net_targets, which leaves the list as it was */
    lora_status s = rebuild(m);
    if (s) {
        memmove(&a->nets[i + 1], &a->nets[i], (size_t)(a->n_nets - i) * sizeof *a->nets);
        a->nets[i] = e;
        a->n_nets++;
        return s;
    }
    unref_net(e.net);
    return LORA_OK;
}

lora_status attach_remove_all(struct lora_model *m) {
    struct model_attach *a = m->attach;
    if (!a) return LORA_OK;
    LORA_TRY(sync_foreign(m));
    int64_t n = a->n_nets;
    a->n_nets = 0;
    lora_status s = rebuild(m);
    if (s) {
        a->n_nets = n;
        return s;
    }
    for (int64_t i = 0; i < n; i++) unref_net(a->nets[i].net);
    return LORA_OK;
}

void attach_release(struct lora_model *m) {
    struct model_attach *a = m->attach;
    if (!a) return;
    lora_ctx *ctx = m->ctx;
    while (a->n_w > 0) {
        if (restore_weight(m, a->n_w - 1) != LORA_OK) {
            /* no memory to store a float32 base back in its dtype (only then restore_weight
             * fails): the model is going away, so the map simply takes the float32 buffer */
            struct attach_weight *w = &a->w[a->n_w - 1];
            struct tensor_map *map = map_of(m, w->is_te);
            int64_t ti = tmap_find(map, w->weight);
            if (ti >= 0 && map->t[ti].data == w->live) {
                map->t[ti].owned = 1;
                w->live = NULL;
            }
            if (w->orig.owned) lora_free(ctx, w->orig.data);
            lora_free(ctx, w->live);
            lora_free(ctx, w->base);
            lora_free(ctx, w->weight);
            a->n_w--;
        }
    }
    free_lowrank(ctx, a->lr, a->n_lr);
    for (int64_t i = 0; i < a->n_nets; i++) unref_net(a->nets[i].net);
    lora_free(ctx, a->nets);
    lora_free(ctx, a->w);
    lora_free(ctx, a);
    m->attach = NULL;
}
