/* Kohya's LoRA module list (spec/kohya-lora.md §1.1, §2): which base weights get a LoRA module,
 * under which name, in which order. Derived from the model's tensor names: a module is
 * emitted when its base weight exists, so the tiny test models and SD-size ones, v1 and v2,
 * Linear and 1x1-conv proj_in/proj_out, all follow the same rules. */
#include <stdio.h>
#include <string.h>

#include "network/network.h"

/* Paths are diffusers module names (< 100 bytes in SD); the 256-byte buffers cannot truncate. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

struct tlist {
    lora_ctx *ctx;
    struct net_target *t;
    int64_t n, cap;
    lora_status err;
};

static void add(struct tlist *l, const struct tensor_map *map, int is_te, const char *prefix,
                const char *path, int with_kxk) {
    if (l->err) return;
    char w[256];
    snprintf(w, sizeof w, "%s.weight", path);
    int64_t i = tmap_find(map, w);
    if (i < 0) return;
    const struct lora_tensor *t = &map->t[i];
    int kind;
    if (t->ndim == 2) kind = NET_LINEAR;
    else if (t->ndim == 4 && t->shape[2] == 1 && t->shape[3] == 1) kind = NET_CONV1X1;
    else if (t->ndim == 4) kind = NET_CONVKXK;
    else return;
    if (kind == NET_CONVKXK && !with_kxk) return;
    if (l->n == l->cap) {
        int64_t cap = l->cap ? l->cap * 2 : 256;
        struct net_target *nt = lora_malloc(l->ctx, (size_t)cap * sizeof *nt);
        if (!nt) { l->err = LORA_E_NOMEM; return; }
        if (l->n) memcpy(nt, l->t, (size_t)l->n * sizeof *nt);
        lora_free(l->ctx, l->t);
        l->t = nt;
        l->cap = cap;
    }
    struct net_target *e = &l->t[l->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s.%s", prefix, path);
    for (char *c = e->name; *c; c++)
        if (*c == '.') *c = '_';
    snprintf(e->weight, sizeof e->weight, "%s", w);
    e->is_te = is_te;
    e->kind = kind;
    e->out = t->shape[0];
    e->in = t->shape[1];
    e->kh = t->ndim == 4 ? t->shape[2] : 1;
    e->kw = t->ndim == 4 ? t->shape[3] : 1;
}

static int has(const struct tensor_map *map, const char *fmt, const char *p, int j) {
    char b[256];
    snprintf(b, sizeof b, fmt, p, j);
    return tmap_find(map, b) >= 0;
}

/* One Transformer2DModel: proj_in, per block attn1 q k v out, ff proj, ff out, attn2 ..., proj_out. */
static void transformer(struct tlist *l, const struct tensor_map *u, const char *p) {
    static const char *const blk[] = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                      "ff.net.0.proj", "ff.net.2", "attn2.to_q", "attn2.to_k",
                                      "attn2.to_v", "attn2.to_out.0"};
    char b[256];
    snprintf(b, sizeof b, "%s.proj_in", p);
    add(l, u, 0, "lora_unet", b, 0);
    for (int k = 0; has(u, "%s.transformer_blocks.%d.attn1.to_q.weight", p, k); k++)
        for (size_t s = 0; s < sizeof blk / sizeof *blk; s++) {
            snprintf(b, sizeof b, "%s.transformer_blocks.%d.%s", p, k, blk[s]);
            add(l, u, 0, "lora_unet", b, 0);
        }
    snprintf(b, sizeof b, "%s.proj_out", p);
    add(l, u, 0, "lora_unet", b, 0);
}

/* ResnetBlock2D children in registration order: conv1, time_emb_proj, conv2, conv_shortcut. */
static void resnet(struct tlist *l, const struct tensor_map *u, const char *p) {
    static const char *const ch[] = {"conv1", "time_emb_proj", "conv2", "conv_shortcut"};
    char b[256];
    for (size_t s = 0; s < 4; s++) {
        snprintf(b, sizeof b, "%s.%s", p, ch[s]);
        add(l, u, 0, "lora_unet", b, 1);
    }
}

/* A down/up/mid block: attentions, resnets, then down/upsamplers (diffusers 0.10 order). */
static void block(struct tlist *l, const struct tensor_map *u, const char *p, int with_conv) {
    char b[256];
    for (int j = 0; has(u, "%s.attentions.%d.proj_in.weight", p, j); j++) {
        snprintf(b, sizeof b, "%s.attentions.%d", p, j);
        transformer(l, u, b);
    }
    if (!with_conv) return;
    for (int j = 0; has(u, "%s.resnets.%d.conv1.weight", p, j); j++) {
        snprintf(b, sizeof b, "%s.resnets.%d", p, j);
        resnet(l, u, b);
    }
    for (int j = 0; has(u, "%s.downsamplers.%d.conv.weight", p, j); j++) {
        snprintf(b, sizeof b, "%s.downsamplers.%d.conv", p, j);
        add(l, u, 0, "lora_unet", b, 1);
    }
    for (int j = 0; has(u, "%s.upsamplers.%d.conv.weight", p, j); j++) {
        snprintf(b, sizeof b, "%s.upsamplers.%d.conv", p, j);
        add(l, u, 0, "lora_unet", b, 1);
    }
}

lora_status net_targets(const struct sd_model *m, int with_conv, struct net_target **out, int64_t *n_out) {
    struct tlist l = {m->ctx, NULL, 0, 0, LORA_OK};
    char b[256];
    /* text encoder: CLIPAttention (k, v, q, out) then CLIPMLP (fc1, fc2) per layer */
    static const char *const te[] = {"self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
    for (int n = 0; has(&m->te, "%s.%d.self_attn.k_proj.weight", "text_model.encoder.layers", n); n++)
        for (size_t s = 0; s < 6; s++) {
            snprintf(b, sizeof b, "text_model.encoder.layers.%d.%s", n, te[s]);
            add(&l, &m->te, 1, "lora_te", b, 0);
        }
    for (int i = 0; has(&m->unet, "%s.%d.resnets.0.conv1.weight", "down_blocks", i); i++) {
        snprintf(b, sizeof b, "down_blocks.%d", i);
        block(&l, &m->unet, b, with_conv);
    }
    for (int i = 0; has(&m->unet, "%s.%d.resnets.0.conv1.weight", "up_blocks", i); i++) {
        snprintf(b, sizeof b, "up_blocks.%d", i);
        block(&l, &m->unet, b, with_conv);
    }
    block(&l, &m->unet, "mid_block", with_conv);
    if (l.err) {
        lora_free(m->ctx, l.t);
        return l.err;
    }
    *out = l.t;
    *n_out = l.n;
    return LORA_OK;
}
