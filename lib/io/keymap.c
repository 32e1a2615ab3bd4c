/* LDM <-> diffusers key maps (spec/kohya-lora.md §3).
 *
 * Both directions use one table of module-prefix pairs built from the layout (levels, resnets
 * per level, attention levels), e.g. "input_blocks.4.1." <-> "down_blocks.1.attentions.0.";
 * a key maps by its longest matching prefix, the rest of the name carried over. Resnet and
 * VAE-attention pairs also rename the child module (in_layers.0 <-> norm1, q <-> query, ...),
 * through a short fixed list, so only known children map. The v2 text encoder's packed
 * in_proj and the synthesised position_ids are the only tensors that are not a rename. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/dtype.h"
#include "io/keymap.h"

#define KM_NAME 512          /* longest name handled (longer LDM keys go to extra) */
#define KM_PFX 96            /* longest prefix in a table */
#define KM_MAX_BLOCKS 128    /* highest input/output block index followed */
#define KM_MAX_INDEX 100000  /* index numbers parsed from names */

static const char P_UNET[] = "model.diffusion_model.";
static const char P_VAE[] = "first_stage_model.";
static const char P_TE1[] = "cond_stage_model.transformer.";
static const char P_TE2[] = "cond_stage_model.model.";

enum { KM_PREFIX, KM_EXACT, KM_UNET_RES, KM_VAE_RES, KM_VAE_ATTN };
enum { C_UNET, C_VAE, C_TE, C_EXTRA };

/* Child renames inside one module: {LDM, diffusers}. */
static const char *const UNET_RES[][2] = {
    {"in_layers.0.", "norm1."},   {"in_layers.2.", "conv1."},  {"emb_layers.1.", "time_emb_proj."},
    {"out_layers.0.", "norm2."},  {"out_layers.3.", "conv2."}, {"skip_connection.", "conv_shortcut."},
};
static const char *const VAE_RES[][2] = {
    {"norm1.", "norm1."}, {"conv1.", "conv1."}, {"norm2.", "norm2."}, {"conv2.", "conv2."},
    {"nin_shortcut.", "conv_shortcut."},
};
/* index 0 (the GroupNorm) keeps its shape; the others are 1x1 convs in LDM, Linear in diffusers */
static const char *const VAE_ATTN[][2] = {
    {"norm.", "group_norm."}, {"q.", "query."}, {"k.", "key."}, {"v.", "value."}, {"proj_out.", "proj_attn."},
};
static const char *const V2_LAYER[][2] = {
    {"ln_1.", "layer_norm1."}, {"ln_2.", "layer_norm2."}, {"mlp.c_fc.", "mlp.fc1."},
    {"mlp.c_proj.", "mlp.fc2."}, {"attn.out_proj.", "self_attn.out_proj."},
};
#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* ---- pair tables ------------------------------------------------------------------------- */
struct km_pair {
    char ldm[KM_PFX], hf[KM_PFX];
    uint16_t ldm_len, hf_len;
    uint8_t kind, from_only;
};

struct km_table {
    lora_ctx *ctx;
    struct km_pair *p;
    int n, cap;
};

static void km_init(struct km_table *t, lora_ctx *ctx) {
    memset(t, 0, sizeof *t);
    t->ctx = ctx;
}

static void km_free(struct km_table *t) {
    lora_free(t->ctx, t->p);
    km_init(t, t->ctx);
}

static lora_status km_add(struct km_table *t, int kind, int from_only, const char *ldm, const char *hf) {
    size_t nl = strlen(ldm), nh = strlen(hf);
    if (nl >= KM_PFX || nh >= KM_PFX)
        return lora_fail(t->ctx, LORA_E_INTERNAL, "key map prefix \"%s\" too long", nl >= KM_PFX ? ldm : hf);
    if (t->n == t->cap) {
        int cap = t->cap ? t->cap * 2 : 128;
        struct km_pair *p = lora_malloc(t->ctx, (size_t)cap * sizeof *p);
        if (!p) return LORA_E_NOMEM;
        if (t->n) memcpy(p, t->p, (size_t)t->n * sizeof *p);
        lora_free(t->ctx, t->p);
        t->p = p;
        t->cap = cap;
    }
    struct km_pair *q = &t->p[t->n++];
    memcpy(q->ldm, ldm, nl + 1);
    memcpy(q->hf, hf, nh + 1);
    q->ldm_len = (uint16_t)nl;
    q->hf_len = (uint16_t)nh;
    q->kind = (uint8_t)kind;
    q->from_only = (uint8_t)from_only;
    return LORA_OK;
}

/* km_add with two printf formats: the LDM name, then the diffusers name, each with its own
 * arguments in `va` order (ldm args first). */
static lora_status km_addf(struct km_table *t, int kind, const char *ldm_fmt, int nl, const char *hf_fmt, ...) {
    char l[KM_PFX + 8], h[KM_PFX + 8];
    int a[4] = {0}, na = 0;
    va_list ap;
    va_start(ap, hf_fmt);
    for (const char *f = ldm_fmt; *f; f++) na += f[0] == '%' && f[1] == 'd';
    for (const char *f = hf_fmt; *f; f++) na += f[0] == '%' && f[1] == 'd';
    for (int i = 0; i < na && i < 4; i++) a[i] = va_arg(ap, int);
    va_end(ap);
    /* formats hold at most two %d each; nl says how many of a[] belong to the LDM one */
    snprintf(l, sizeof l, ldm_fmt, a[0], a[1]);
    snprintf(h, sizeof h, hf_fmt, a[nl], a[nl + 1]);
    return km_add(t, kind, 0, l, h);
}

/* Maps `key` (component prefix removed) through `t`. LORA_OK with the name in buf,
 * LORA_E_NO_MATCHING_KEYS when it has no counterpart, LORA_E_LIMIT when buf is too small.
 * *reshape is set when the tensor is a VAE attention weight (4-D in LDM, 2-D in diffusers). */
static lora_status km_map(const struct km_table *t, int to_ldm, const char *key, char *buf, size_t cap,
                          int *reshape) {
    int best = -1, best_len = -1;
    if (reshape) *reshape = 0;
    for (int i = 0; i < t->n; i++) {
        const struct km_pair *p = &t->p[i];
        if (to_ldm && p->from_only) continue;
        const char *src = to_ldm ? p->hf : p->ldm;
        int len = to_ldm ? p->hf_len : p->ldm_len;
        if (p->kind == KM_EXACT ? strcmp(key, src) == 0 : strncmp(key, src, (size_t)len) == 0) {
            if (len > best_len) {
                best = i;
                best_len = len;
            }
        }
    }
    if (best < 0) return LORA_E_NO_MATCHING_KEYS;
    const struct km_pair *p = &t->p[best];
    const char *dst = to_ldm ? p->ldm : p->hf;
    const char *tail = key + best_len;
    int n;
    if (p->kind == KM_EXACT) {
        n = snprintf(buf, cap, "%s", dst);
    } else if (p->kind == KM_PREFIX) {
        n = snprintf(buf, cap, "%s%s", dst, tail);
    } else {
        const char *const(*inner)[2] = p->kind == KM_UNET_RES ? UNET_RES : p->kind == KM_VAE_RES ? VAE_RES : VAE_ATTN;
        int n_inner = p->kind == KM_UNET_RES ? N_OF(UNET_RES) : p->kind == KM_VAE_RES ? N_OF(VAE_RES) : N_OF(VAE_ATTN);
        int k = 0;
        for (; k < n_inner; k++) {
            const char *s = inner[k][to_ldm ? 1 : 0];
            if (strncmp(tail, s, strlen(s)) == 0) break;
        }
        if (k == n_inner) return LORA_E_NO_MATCHING_KEYS;
        const char *rest = tail + strlen(inner[k][to_ldm ? 1 : 0]);
        n = snprintf(buf, cap, "%s%s%s", dst, inner[k][to_ldm ? 0 : 1], rest);
        if (reshape) *reshape = p->kind == KM_VAE_ATTN && k > 0 && strcmp(rest, "weight") == 0;
    }
    return n < 0 || (size_t)n >= cap ? LORA_E_LIMIT : LORA_OK;
}

/* ---- name parsing ------------------------------------------------------------------------- */
static int starts(const char *s, const char *pre) { return strncmp(s, pre, strlen(pre)) == 0; }

/* A decimal index without sign or leading zeros, below KM_MAX_INDEX. */
static int parse_index(const char *s, int *v, const char **end) {
    if (*s < '0' || *s > '9' || (s[0] == '0' && s[1] >= '0' && s[1] <= '9')) return 0;
    long x = 0;
    while (*s >= '0' && *s <= '9') {
        x = x * 10 + (*s++ - '0');
        if (x >= KM_MAX_INDEX) return 0;
    }
    *v = (int)x;
    *end = s;
    return 1;
}

/* "<pre><a><mid><b>.<rest>" (mid NULL: "<pre><a>.<rest>"). */
static int parse_idx(const char *key, const char *pre, const char *mid, int *a, int *b, const char **rest) {
    const char *s = key;
    if (!starts(s, pre)) return 0;
    s += strlen(pre);
    if (!parse_index(s, a, &s)) return 0;
    if (mid) {
        if (!starts(s, mid)) return 0;
        s += strlen(mid);
        if (!parse_index(s, b, &s)) return 0;
    }
    if (*s != '.') return 0;
    if (rest) *rest = s + 1;
    return 1;
}

/* ---- layouts ------------------------------------------------------------------------------ */
struct vae_layout {
    int32_t n_enc, l_enc, n_dec, l_dec;
};

void sd_unet_layout_sd(struct sd_unet_layout *l) {
    memset(l, 0, sizeof *l);
    l->n_levels = 4;
    l->layers = 2;
    for (int i = 0; i < 4; i++) {
        l->down_attn[i] = i < 3;
        l->up_attn[i] = i > 0;
        l->up_sub[i] = sd_ldm_upsampler_sub(l->up_attn[i]);
    }
    l->mid_attn = 1;
}

/* Keys of `m` starting with `pre`, prefix removed, through `fn`. */
typedef lora_status (*scan_fn)(void *st, const char *key);
static lora_status scan_keys(const struct tensor_map *m, const char *pre, scan_fn fn, void *st) {
    size_t np = pre ? strlen(pre) : 0;
    for (int64_t i = 0; i < m->n; i++)
        if (!pre || strncmp(m->t[i].name, pre, np) == 0) LORA_TRY(fn(st, m->t[i].name + np));
    return LORA_OK;
}

struct unet_scan {
    lora_ctx *ctx;
    int in_max, out_max, mid_attn;
    uint8_t in_op[KM_MAX_BLOCKS], in_attn[KM_MAX_BLOCKS], out_attn[KM_MAX_BLOCKS], out_conv_sub[KM_MAX_BLOCKS];
};

static lora_status unet_scan_ldm_key(void *vs, const char *k) {
    struct unet_scan *s = vs;
    int b, sub;
    const char *rest;
    if (parse_idx(k, "input_blocks.", ".", &b, &sub, &rest)) {
        if (b >= KM_MAX_BLOCKS)
            return lora_fail(s->ctx, LORA_E_UNSUPPORTED_LAYOUT, "%s%s: more U-Net input blocks than supported (%d)",
                             P_UNET, k, KM_MAX_BLOCKS);
        if (b > s->in_max) s->in_max = b;
        if (sub == 0 && starts(rest, "op.")) s->in_op[b] = 1;
        if (sub == 1) s->in_attn[b] = 1;
    } else if (parse_idx(k, "output_blocks.", ".", &b, &sub, &rest)) {
        if (b >= KM_MAX_BLOCKS)
            return lora_fail(s->ctx, LORA_E_UNSUPPORTED_LAYOUT, "%s%s: more U-Net output blocks than supported (%d)",
                             P_UNET, k, KM_MAX_BLOCKS);
        if (b > s->out_max) s->out_max = b;
        if (sub >= 1 && starts(rest, "conv.")) s->out_conv_sub[b] = (uint8_t)(sub < 255 ? sub : 255);
        else if (sub == 1) s->out_attn[b] = 1;
    } else if (starts(k, "middle_block.1.")) {
        s->mid_attn = 1;
    }
    return LORA_OK;
}

static lora_status unet_layout_from_ldm(lora_ctx *ctx, const struct tensor_map *ldm, struct sd_unet_layout *l) {
    struct unet_scan s;
    memset(&s, 0, sizeof s);
    s.ctx = ctx;
    s.in_max = s.out_max = -1;
    memset(l, 0, sizeof *l);
    LORA_TRY(scan_keys(ldm, P_UNET, unet_scan_ldm_key, &s));
    if (s.in_max < 1)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "no U-Net: %sinput_blocks.1.0.in_layers.0.weight (%s) is missing",
                         P_UNET, "down_blocks.0.resnets.0.norm1.weight");
    int L = -1;
    for (int b = 1; b <= s.in_max; b++)
        if (s.in_op[b]) {
            L = b - 1;
            break;
        }
    if (L < 0) L = s.in_max;   /* a single level: no downsampler */
    if (L < 1 || (s.in_max + 1) % (L + 1) != 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT,
                         "%sinput_blocks: %d blocks with the first downsampler at %d do not make whole levels", P_UNET,
                         s.in_max + 1, L + 1);
    int n = (s.in_max + 1) / (L + 1);
    if (n > SD_MAX_LEVELS)
        return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT, "%sinput_blocks: %d levels, at most %d supported", P_UNET, n,
                         SD_MAX_LEVELS);
    if (s.out_max != n * (L + 1) - 1)
        return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT,
                         "%soutput_blocks: %d blocks, want %d for %d levels of %d resnets", P_UNET, s.out_max + 1,
                         n * (L + 1), n, L + 1);
    l->n_levels = n;
    l->layers = L;
    for (int i = 0; i < n; i++) {
        l->down_attn[i] = s.in_attn[sd_ldm_input_block(i, 0, L)];
        l->up_attn[i] = s.out_attn[sd_ldm_output_block(i, 0, L)];
        int us = s.out_conv_sub[sd_ldm_upsampler_block(i, L)];
        l->up_sub[i] = us ? us : sd_ldm_upsampler_sub(l->up_attn[i]);
    }
    l->mid_attn = s.mid_attn;
    return LORA_OK;
}

struct unet_hf_scan {
    int n_down, n_up, layers, mid_attn;
    uint8_t down_attn[KM_MAX_BLOCKS], up_attn[KM_MAX_BLOCKS];
};

static lora_status unet_scan_hf_key(void *vs, const char *k) {
    struct unet_hf_scan *s = vs;
    int i, j;
    const char *rest;
    if (parse_idx(k, "down_blocks.", ".resnets.", &i, &j, &rest) && i < KM_MAX_BLOCKS) {
        if (i + 1 > s->n_down) s->n_down = i + 1;
        if (j + 1 > s->layers) s->layers = j + 1;
    } else if (parse_idx(k, "down_blocks.", ".attentions.", &i, &j, &rest) && i < KM_MAX_BLOCKS) {
        s->down_attn[i] = 1;
    } else if (parse_idx(k, "up_blocks.", NULL, &i, NULL, &rest) && i < KM_MAX_BLOCKS) {
        if (i + 1 > s->n_up) s->n_up = i + 1;
        if (starts(rest, "attentions.")) s->up_attn[i] = 1;
    } else if (starts(k, "mid_block.attentions.0.")) {
        s->mid_attn = 1;
    }
    return LORA_OK;
}

static lora_status unet_layout_from_hf(lora_ctx *ctx, const struct tensor_map *m, struct sd_unet_layout *l) {
    struct unet_hf_scan s;
    memset(&s, 0, sizeof s);
    memset(l, 0, sizeof *l);
    LORA_TRY(scan_keys(m, NULL, unet_scan_hf_key, &s));
    if (s.n_down == 0)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "U-Net: down_blocks.0.resnets.0.norm1.weight is missing");
    if (s.n_down > SD_MAX_LEVELS || s.n_up != s.n_down)
        return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT, "U-Net: %d down blocks and %d up blocks (at most %d)",
                         s.n_down, s.n_up, SD_MAX_LEVELS);
    l->n_levels = s.n_down;
    l->layers = s.layers;
    for (int i = 0; i < s.n_down; i++) {
        l->down_attn[i] = s.down_attn[i];
        l->up_attn[i] = s.up_attn[i];
        l->up_sub[i] = sd_ldm_upsampler_sub(s.up_attn[i]);
    }
    l->mid_attn = s.mid_attn;
    return LORA_OK;
}

static lora_status unet_table(struct km_table *t, const struct sd_unet_layout *l) {
    int n = l->n_levels, L = l->layers;
    LORA_TRY(km_add(t, KM_PREFIX, 0, "time_embed.0.", "time_embedding.linear_1."));
    LORA_TRY(km_add(t, KM_PREFIX, 0, "time_embed.2.", "time_embedding.linear_2."));
    LORA_TRY(km_add(t, KM_PREFIX, 0, "input_blocks.0.0.", "conv_in."));
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < L; j++) {
            int b = sd_ldm_input_block(i, j, L);
            LORA_TRY(km_addf(t, KM_UNET_RES, "input_blocks.%d.0.", 1, "down_blocks.%d.resnets.%d.", b, i, j));
            if (l->down_attn[i])
                LORA_TRY(km_addf(t, KM_PREFIX, "input_blocks.%d.1.", 1, "down_blocks.%d.attentions.%d.", b, i, j));
        }
        if (i < n - 1)
            LORA_TRY(km_addf(t, KM_PREFIX, "input_blocks.%d.0.op.", 1, "down_blocks.%d.downsamplers.0.conv.",
                             sd_ldm_downsampler_block(i, L), i));
    }
    LORA_TRY(km_add(t, KM_UNET_RES, 0, "middle_block.0.", "mid_block.resnets.0."));
    if (l->mid_attn) LORA_TRY(km_add(t, KM_PREFIX, 0, "middle_block.1.", "mid_block.attentions.0."));
    LORA_TRY(km_add(t, KM_UNET_RES, 0, "middle_block.2.", "mid_block.resnets.1."));
    for (int i = 0; i < n; i++) {
        for (int j = 0; j <= L; j++) {
            int b = sd_ldm_output_block(i, j, L);
            LORA_TRY(km_addf(t, KM_UNET_RES, "output_blocks.%d.0.", 1, "up_blocks.%d.resnets.%d.", b, i, j));
            if (l->up_attn[i])
                LORA_TRY(km_addf(t, KM_PREFIX, "output_blocks.%d.1.", 1, "up_blocks.%d.attentions.%d.", b, i, j));
        }
        if (i < n - 1)
            LORA_TRY(km_addf(t, KM_PREFIX, "output_blocks.%d.%d.conv.", 2, "up_blocks.%d.upsamplers.0.conv.",
                             sd_ldm_upsampler_block(i, L), l->up_sub[i], i));
    }
    LORA_TRY(km_add(t, KM_PREFIX, 0, "out.0.", "conv_norm_out."));
    return km_add(t, KM_PREFIX, 0, "out.2.", "conv_out.");
}

lora_status sd_unet_key_map(lora_ctx *ctx, const struct sd_unet_layout *l, int to_ldm, const char *key, char *buf,
                            size_t cap) {
    struct km_table t;
    km_init(&t, ctx);
    lora_status s = unet_table(&t, l);
    if (s == LORA_OK) s = km_map(&t, to_ldm, key, buf, cap, NULL);
    km_free(&t);
    return s;
}

struct vae_scan {
    int n_enc, l_enc, n_dec, l_dec;
    const char *enc, *dec;   /* "encoder.down." / "encoder.down_blocks." ... */
    const char *blk;         /* ".block." / ".resnets." */
};

static lora_status vae_scan_key(void *vs, const char *k) {
    struct vae_scan *s = vs;
    int i, j;
    if (parse_idx(k, s->enc, s->blk, &i, &j, NULL) && i < SD_MAX_LEVELS * 4) {
        if (i + 1 > s->n_enc) s->n_enc = i + 1;
        if (j + 1 > s->l_enc) s->l_enc = j + 1;
    } else if (parse_idx(k, s->dec, s->blk, &i, &j, NULL) && i < SD_MAX_LEVELS * 4) {
        if (i + 1 > s->n_dec) s->n_dec = i + 1;
        if (j + 1 > s->l_dec) s->l_dec = j + 1;
    }
    return LORA_OK;
}

static lora_status vae_layout(lora_ctx *ctx, const struct tensor_map *m, int ldm, struct vae_layout *l) {
    struct vae_scan s;
    memset(&s, 0, sizeof s);
    s.enc = ldm ? "encoder.down." : "encoder.down_blocks.";
    s.dec = ldm ? "decoder.up." : "decoder.up_blocks.";
    s.blk = ldm ? ".block." : ".resnets.";
    LORA_TRY(scan_keys(m, ldm ? P_VAE : NULL, vae_scan_key, &s));
    if (s.n_enc == 0 || s.n_dec == 0)
        return lora_fail(ctx, LORA_E_NOT_A_MODEL, "no VAE: %s%s0%s0.conv1.weight is missing", ldm ? P_VAE : "",
                         s.n_enc == 0 ? s.enc : s.dec, s.blk);
    if (s.n_enc > SD_MAX_LEVELS || s.n_dec > SD_MAX_LEVELS)
        return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT, "VAE: %d encoder / %d decoder levels, at most %d supported",
                         s.n_enc, s.n_dec, SD_MAX_LEVELS);
    l->n_enc = s.n_enc;
    l->l_enc = s.l_enc;
    l->n_dec = s.n_dec;
    l->l_dec = s.l_dec;
    return LORA_OK;
}

static lora_status vae_table(struct km_table *t, const struct vae_layout *l) {
    static const char *const same[] = {"encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                                       "decoder.conv_out.", "quant_conv.", "post_quant_conv."};
    for (int i = 0; i < N_OF(same); i++) LORA_TRY(km_add(t, KM_PREFIX, 0, same[i], same[i]));
    LORA_TRY(km_add(t, KM_PREFIX, 0, "encoder.norm_out.", "encoder.conv_norm_out."));
    LORA_TRY(km_add(t, KM_PREFIX, 0, "decoder.norm_out.", "decoder.conv_norm_out."));
    for (int i = 0; i < l->n_enc; i++) {
        for (int j = 0; j < l->l_enc; j++)
            LORA_TRY(km_addf(t, KM_VAE_RES, "encoder.down.%d.block.%d.", 2, "encoder.down_blocks.%d.resnets.%d.", i,
                             j, i, j));
        if (i < l->n_enc - 1)
            LORA_TRY(km_addf(t, KM_PREFIX, "encoder.down.%d.downsample.conv.", 1,
                             "encoder.down_blocks.%d.downsamplers.0.conv.", i, i));
    }
    for (int e = 0; e < 2; e++) {
        const char *w = e ? "decoder" : "encoder";
        char a[KM_PFX], b[KM_PFX];
        for (int r = 0; r < 2; r++) {
            snprintf(a, sizeof a, "%s.mid.block_%d.", w, r + 1);
            snprintf(b, sizeof b, "%s.mid_block.resnets.%d.", w, r);
            LORA_TRY(km_add(t, KM_VAE_RES, 0, a, b));
        }
        snprintf(a, sizeof a, "%s.mid.attn_1.", w);
        snprintf(b, sizeof b, "%s.mid_block.attentions.0.", w);
        LORA_TRY(km_add(t, KM_VAE_ATTN, 0, a, b));
    }
    /* LDM numbers decoder levels from the lowest resolution up, diffusers the other way */
    for (int i = 0; i < l->n_dec; i++) {
        int k = l->n_dec - 1 - i;
        for (int j = 0; j < l->l_dec; j++)
            LORA_TRY(km_addf(t, KM_VAE_RES, "decoder.up.%d.block.%d.", 2, "decoder.up_blocks.%d.resnets.%d.", k, j,
                             i, j));
        if (i < l->n_dec - 1)
            LORA_TRY(km_addf(t, KM_PREFIX, "decoder.up.%d.upsample.conv.", 1,
                             "decoder.up_blocks.%d.upsamplers.0.conv.", k, i));
    }
    return LORA_OK;
}

static lora_status te1_table(struct km_table *t) {
    LORA_TRY(km_add(t, KM_PREFIX, 0, "text_model.", "text_model."));
    /* old checkpoints without the text_model level: read only */
    LORA_TRY(km_add(t, KM_PREFIX, 1, "embeddings.", "text_model.embeddings."));
    LORA_TRY(km_add(t, KM_PREFIX, 1, "encoder.", "text_model.encoder."));
    return km_add(t, KM_PREFIX, 1, "final_layer_norm.", "text_model.final_layer_norm.");
}

static lora_status te2_table(struct km_table *t, int layers) {
    for (int n = 0; n < layers; n++)
        for (int c = 0; c < N_OF(V2_LAYER); c++) {
            char a[KM_PFX], b[KM_PFX];
            snprintf(a, sizeof a, "transformer.resblocks.%d.%s", n, V2_LAYER[c][0]);
            snprintf(b, sizeof b, "text_model.encoder.layers.%d.%s", n, V2_LAYER[c][1]);
            LORA_TRY(km_add(t, KM_PREFIX, 0, a, b));
        }
    LORA_TRY(km_add(t, KM_EXACT, 0, "positional_embedding", "text_model.embeddings.position_embedding.weight"));
    LORA_TRY(km_add(t, KM_EXACT, 0, "token_embedding.weight", "text_model.embeddings.token_embedding.weight"));
    return km_add(t, KM_PREFIX, 0, "ln_final.", "text_model.final_layer_norm.");
}

struct te2_scan {
    int n;
};
static lora_status te2_scan_ldm(void *vs, const char *k) {
    struct te2_scan *s = vs;
    int b;
    if (parse_idx(k, "transformer.resblocks.", NULL, &b, NULL, NULL) && b + 1 > s->n) s->n = b + 1;
    return LORA_OK;
}
static lora_status te2_scan_hf(void *vs, const char *k) {
    struct te2_scan *s = vs;
    int b;
    if (parse_idx(k, "text_model.encoder.layers.", NULL, &b, NULL, NULL) && b + 1 > s->n) s->n = b + 1;
    return LORA_OK;
}

/* ---- the three tables for one model -------------------------------------------------------- */
struct km_set {
    lora_ctx *ctx;
    int version;
    struct sd_unet_layout unet;
    struct vae_layout vae;
    int te_layers;
    struct km_table t[3];
};

static void set_free(struct km_set *s) {
    for (int c = 0; c < 3; c++) km_free(&s->t[c]);
}

static lora_status set_tables(struct km_set *s) {
    for (int c = 0; c < 3; c++) km_init(&s->t[c], s->ctx);
    LORA_TRY(unet_table(&s->t[C_UNET], &s->unet));
    LORA_TRY(vae_table(&s->t[C_VAE], &s->vae));
    return s->version == 2 ? te2_table(&s->t[C_TE], s->te_layers) : te1_table(&s->t[C_TE]);
}

static const char *comp_prefix(const struct km_set *s, int c) {
    return c == C_UNET ? P_UNET : c == C_VAE ? P_VAE : s->version == 2 ? P_TE2 : P_TE1;
}

/* "text_model.encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias}" -> N, 'q'/'k'/'v', weight? */
static int parse_qkv(const char *k, int *layer, char *which, int *is_weight) {
    const char *rest;
    int b;
    if (!parse_idx(k, "text_model.encoder.layers.", NULL, layer, &b, &rest)) return 0;
    if (!starts(rest, "self_attn.") || !rest[10] || strchr("qkv", rest[10]) == NULL) return 0;
    if (strcmp(rest + 11, "_proj.weight") == 0) *is_weight = 1;
    else if (strcmp(rest + 11, "_proj.bias") == 0) *is_weight = 0;
    else return 0;
    *which = rest[10];
    return 1;
}

/* The LDM name of diffusers tensor `hf` of component c, for messages ("?" when none). */
static void ldm_name(const struct km_set *s, int c, const char *hf, char *buf, size_t cap) {
    char tmp[KM_NAME];
    int layer, w;
    char q;
    if (c == C_TE && s->version == 2 && parse_qkv(hf, &layer, &q, &w)) {
        snprintf(buf, cap, "%stransformer.resblocks.%d.attn.in_proj_%s", P_TE2, layer, w ? "weight" : "bias");
        return;
    }
    if (km_map(&s->t[c], 1, hf, tmp, sizeof tmp, NULL) == LORA_OK) snprintf(buf, cap, "%s%s", comp_prefix(s, c), tmp);
    else snprintf(buf, cap, "?");
}

/* ---- essentials and config ------------------------------------------------------------------ */
struct chk {
    const struct km_set *s;
    const struct sd_model *m;
};

static const struct tensor_map *comp_map(const struct sd_model *m, int c) {
    return c == C_UNET ? &m->unet : c == C_VAE ? &m->vae : &m->te;
}

static const char *const COMP_NAME[] = {"U-Net", "VAE", "text encoder"};

/* The tensor named by the format, or an error naming it (LDM and diffusers names). With
 * ndim > 0 the rank must match (ndim 4 also accepts... nothing else: exact). */
static lora_status need(const struct chk *k, int c, int ndim, const struct lora_tensor **out, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static lora_status need(const struct chk *k, int c, int ndim, const struct lora_tensor **out, const char *fmt, ...) {
    char name[KM_NAME], ldm[KM_NAME + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const struct tensor_map *m = comp_map(k->m, c);
    int64_t i = tmap_find(m, name);
    if (i < 0) {
        ldm_name(k->s, c, name, ldm, sizeof ldm);
        return lora_fail(k->s->ctx, LORA_E_NOT_A_MODEL, "%s tensor %s (%s) is missing", COMP_NAME[c], ldm, name);
    }
    const struct lora_tensor *t = &m->t[i];
    if (ndim > 0 && t->ndim != ndim) {
        ldm_name(k->s, c, name, ldm, sizeof ldm);
        return lora_fail(k->s->ctx, LORA_E_SHAPE_MISMATCH, "%s tensor %s (%s) has rank %d, want %d", COMP_NAME[c], ldm,
                         name, t->ndim, ndim);
    }
    if (out) *out = t;
    return LORA_OK;
}

static lora_status shape_fail(const struct chk *k, int c, const struct lora_tensor *t, const char *what) {
    char ldm[KM_NAME + 64];
    ldm_name(k->s, c, t->name, ldm, sizeof ldm);
    return lora_fail(k->s->ctx, LORA_E_SHAPE_MISMATCH, "%s tensor %s (%s): %s", COMP_NAME[c], ldm, t->name, what);
}

/* A resnet "<pre>" ("down_blocks.0.resnets.1."); time_emb: U-Net resnets have time_emb_proj. */
static lora_status need_resnet(const struct chk *k, int c, const char *pre, int time_emb) {
    const struct lora_tensor *c1, *c2;
    LORA_TRY(need(k, c, 1, NULL, "%snorm1.weight", pre));
    LORA_TRY(need(k, c, 4, &c1, "%sconv1.weight", pre));
    LORA_TRY(need(k, c, 1, NULL, "%snorm2.weight", pre));
    LORA_TRY(need(k, c, 4, &c2, "%sconv2.weight", pre));
    if (time_emb) LORA_TRY(need(k, c, 2, NULL, "%stime_emb_proj.weight", pre));
    if (c1->shape[1] != c2->shape[0]) LORA_TRY(need(k, c, 4, NULL, "%sconv_shortcut.weight", pre));
    return LORA_OK;
}

static lora_status need_transformer(const struct chk *k, const char *pre) {
    static const char *const lin[] = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                      "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"};
    const struct lora_tensor *pi, *po;
    LORA_TRY(need(k, C_UNET, 1, NULL, "%snorm.weight", pre));
    LORA_TRY(need(k, C_UNET, 0, &pi, "%sproj_in.weight", pre));
    LORA_TRY(need(k, C_UNET, 0, &po, "%sproj_out.weight", pre));
    for (int i = 0; i < 2; i++) {
        const struct lora_tensor *t = i ? po : pi;
        if (!(t->ndim == 2 || (t->ndim == 4 && t->shape[2] == 1 && t->shape[3] == 1)))
            return shape_fail(k, C_UNET, t, "want [C,C] or [C,C,1,1]");
    }
    for (int i = 0; i < N_OF(lin); i++)
        LORA_TRY(need(k, C_UNET, 2, NULL, "%stransformer_blocks.0.%s.weight", pre, lin[i]));
    for (int i = 1; i <= 3; i++) LORA_TRY(need(k, C_UNET, 1, NULL, "%stransformer_blocks.0.norm%d.weight", pre, i));
    return LORA_OK;
}

static lora_status check_unet(const struct chk *k) {
    const struct sd_unet_layout *l = &k->s->unet;
    char pre[KM_PFX];
    LORA_TRY(need(k, C_UNET, 4, NULL, "conv_in.weight"));
    LORA_TRY(need(k, C_UNET, 1, NULL, "conv_in.bias"));
    LORA_TRY(need(k, C_UNET, 2, NULL, "time_embedding.linear_1.weight"));
    LORA_TRY(need(k, C_UNET, 2, NULL, "time_embedding.linear_2.weight"));
    for (int i = 0; i < l->n_levels; i++) {
        for (int j = 0; j < l->layers; j++) {
            snprintf(pre, sizeof pre, "down_blocks.%d.resnets.%d.", i, j);
            LORA_TRY(need_resnet(k, C_UNET, pre, 1));
            if (l->down_attn[i]) {
                snprintf(pre, sizeof pre, "down_blocks.%d.attentions.%d.", i, j);
                LORA_TRY(need_transformer(k, pre));
            }
        }
        if (i < l->n_levels - 1) LORA_TRY(need(k, C_UNET, 4, NULL, "down_blocks.%d.downsamplers.0.conv.weight", i));
    }
    LORA_TRY(need_resnet(k, C_UNET, "mid_block.resnets.0.", 1));
    if (l->mid_attn) LORA_TRY(need_transformer(k, "mid_block.attentions.0."));
    LORA_TRY(need_resnet(k, C_UNET, "mid_block.resnets.1.", 1));
    for (int i = 0; i < l->n_levels; i++) {
        for (int j = 0; j <= l->layers; j++) {
            snprintf(pre, sizeof pre, "up_blocks.%d.resnets.%d.", i, j);
            LORA_TRY(need_resnet(k, C_UNET, pre, 1));
            if (l->up_attn[i]) {
                snprintf(pre, sizeof pre, "up_blocks.%d.attentions.%d.", i, j);
                LORA_TRY(need_transformer(k, pre));
            }
        }
        if (i < l->n_levels - 1) LORA_TRY(need(k, C_UNET, 4, NULL, "up_blocks.%d.upsamplers.0.conv.weight", i));
    }
    LORA_TRY(need(k, C_UNET, 1, NULL, "conv_norm_out.weight"));
    return need(k, C_UNET, 4, NULL, "conv_out.weight");
}

static lora_status check_vae(const struct chk *k) {
    const struct vae_layout *l = &k->s->vae;
    static const char *const convs[] = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                        "quant_conv", "post_quant_conv"};
    char pre[KM_PFX];
    for (int i = 0; i < N_OF(convs); i++) LORA_TRY(need(k, C_VAE, 4, NULL, "%s.weight", convs[i]));
    LORA_TRY(need(k, C_VAE, 1, NULL, "encoder.conv_norm_out.weight"));
    LORA_TRY(need(k, C_VAE, 1, NULL, "decoder.conv_norm_out.weight"));
    for (int i = 0; i < l->n_enc; i++) {
        for (int j = 0; j < l->l_enc; j++) {
            snprintf(pre, sizeof pre, "encoder.down_blocks.%d.resnets.%d.", i, j);
            LORA_TRY(need_resnet(k, C_VAE, pre, 0));
        }
        if (i < l->n_enc - 1) LORA_TRY(need(k, C_VAE, 4, NULL, "encoder.down_blocks.%d.downsamplers.0.conv.weight", i));
    }
    for (int i = 0; i < l->n_dec; i++) {
        for (int j = 0; j < l->l_dec; j++) {
            snprintf(pre, sizeof pre, "decoder.up_blocks.%d.resnets.%d.", i, j);
            LORA_TRY(need_resnet(k, C_VAE, pre, 0));
        }
        if (i < l->n_dec - 1) LORA_TRY(need(k, C_VAE, 4, NULL, "decoder.up_blocks.%d.upsamplers.0.conv.weight", i));
    }
    for (int e = 0; e < 2; e++) {
        const char *w = e ? "decoder" : "encoder";
        for (int r = 0; r < 2; r++) {
            snprintf(pre, sizeof pre, "%s.mid_block.resnets.%d.", w, r);
            LORA_TRY(need_resnet(k, C_VAE, pre, 0));
        }
        LORA_TRY(need(k, C_VAE, 1, NULL, "%s.mid_block.attentions.0.group_norm.weight", w));
        for (int a = 1; a < N_OF(VAE_ATTN); a++) {
            char nm[KM_PFX];
            snprintf(nm, sizeof nm, "%s", VAE_ATTN[a][1]);
            nm[strlen(nm) - 1] = 0;   /* drop the '.' */
            LORA_TRY(need(k, C_VAE, 2, NULL, "%s.mid_block.attentions.0.%s.weight", w, nm));
        }
    }
    return LORA_OK;
}

static lora_status check_te(const struct chk *k) {
    static const char *const lin[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
    LORA_TRY(need(k, C_TE, 2, NULL, "text_model.embeddings.token_embedding.weight"));
    LORA_TRY(need(k, C_TE, 2, NULL, "text_model.embeddings.position_embedding.weight"));
    LORA_TRY(need(k, C_TE, 1, NULL, "text_model.final_layer_norm.weight"));
    for (int n = 0; n < k->s->te_layers; n++) {
        for (int i = 0; i < N_OF(lin); i++)
            LORA_TRY(need(k, C_TE, 2, NULL, "text_model.encoder.layers.%d.%s.weight", n, lin[i]));
        LORA_TRY(need(k, C_TE, 1, NULL, "text_model.encoder.layers.%d.layer_norm1.weight", n));
        LORA_TRY(need(k, C_TE, 1, NULL, "text_model.encoder.layers.%d.layer_norm2.weight", n));
    }
    return LORA_OK;
}

static int32_t dim32(int64_t v) { return v > INT32_MAX ? INT32_MAX : (int32_t)v; }

/* Shapes -> cfg; the essentials were checked, so every tensor read here exists. */
static lora_status read_config(const struct chk *k, struct sd_config *cfg) {
    const struct km_set *s = k->s;
    const struct sd_unet_layout *l = &s->unet;
    const struct lora_tensor *t;
    memset(cfg, 0, sizeof *cfg);
    cfg->version = s->version;
    LORA_TRY(need(k, C_UNET, 4, &t, "conv_in.weight"));
    cfg->unet_in_channels = dim32(t->shape[1]);
    LORA_TRY(need(k, C_UNET, 4, &t, "conv_out.weight"));
    cfg->unet_out_channels = dim32(t->shape[0]);
    cfg->n_levels = l->n_levels;
    cfg->layers_per_block = l->layers;
    int groups32 = 1, have_ctx = 0;
    for (int i = 0; i < l->n_levels; i++) {
        LORA_TRY(need(k, C_UNET, 4, &t, "down_blocks.%d.resnets.0.conv1.weight", i));
        int32_t ch = dim32(t->shape[0]);
        cfg->block_channels[i] = ch;
        cfg->attn_levels[i] = l->down_attn[i];
        groups32 &= ch % 32 == 0;
        if (ch % 64 == 0) cfg->heads[i] = s->version == 2 ? ch / 64 : 8;
        if (l->down_attn[i] && !have_ctx) {
            LORA_TRY(need(k, C_UNET, 2, &t, "down_blocks.%d.attentions.0.transformer_blocks.0.attn2.to_k.weight", i));
            cfg->context_dim = dim32(t->shape[1]);
            LORA_TRY(need(k, C_UNET, 0, &t, "down_blocks.%d.attentions.0.proj_in.weight", i));
            cfg->use_linear_projection = t->ndim == 2;
            have_ctx = 1;
        }
    }
    cfg->unet_norm_groups = groups32 ? 32 : 0;

    LORA_TRY(need(k, C_TE, 2, &t, "text_model.embeddings.token_embedding.weight"));
    cfg->te_vocab = dim32(t->shape[0]);
    cfg->te_hidden = dim32(t->shape[1]);
    LORA_TRY(need(k, C_TE, 2, &t, "text_model.embeddings.position_embedding.weight"));
    cfg->te_max_positions = dim32(t->shape[0]);
    if (t->shape[1] != cfg->te_hidden) return shape_fail(k, C_TE, t, "width differs from the token embedding's");
    cfg->te_layers = s->te_layers;
    LORA_TRY(need(k, C_TE, 2, &t, "text_model.encoder.layers.0.mlp.fc1.weight"));
    cfg->te_intermediate = dim32(t->shape[0]);
    cfg->te_heads = cfg->te_hidden % 64 == 0 ? cfg->te_hidden / 64 : 0;
    cfg->te_gelu = s->version == 2;

    LORA_TRY(need(k, C_VAE, 4, &t, "post_quant_conv.weight"));
    cfg->vae_latent_channels = dim32(t->shape[0]);
    cfg->vae_n_levels = s->vae.n_enc;
    cfg->vae_layers_per_block = s->vae.l_enc;
    groups32 = 1;
    for (int i = 0; i < s->vae.n_enc; i++) {
        LORA_TRY(need(k, C_VAE, 4, &t, "encoder.down_blocks.%d.resnets.0.conv1.weight", i));
        cfg->vae_block_channels[i] = dim32(t->shape[0]);
        groups32 &= cfg->vae_block_channels[i] % 32 == 0;
    }
    cfg->vae_norm_groups = groups32 ? 32 : 0;
    return LORA_OK;
}

/* ---- LDM -> diffusers -------------------------------------------------------------------- */
struct prov {
    int64_t src, dst;
    int comp;
};

static struct tensor_map *comp_map_rw(struct sd_model *m, int c) {
    return c == C_UNET ? &m->unet : c == C_VAE ? &m->vae : c == C_TE ? &m->te : &m->extra;
}

/* v2: attn.in_proj_{weight,bias} [3H(,H)] -> three owned copies. */
static lora_status split_in_proj(lora_ctx *ctx, const struct lora_tensor *t, int layer, int is_weight,
                                 struct tensor_map *te) {
    if (is_weight ? (t->ndim != 2 || t->shape[0] != 3 * t->shape[1]) : (t->ndim != 1 || t->shape[0] % 3 != 0))
        return lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "%s: want %s, got rank %d [%lld%s]", t->name,
                         is_weight ? "[3H,H]" : "[3H]", t->ndim, (long long)(t->ndim ? t->shape[0] : 0),
                         t->ndim > 1 ? ",..." : "");
    int64_t shape[2] = {t->shape[0] / 3, is_weight ? t->shape[1] : 0};
    uint64_t chunk = t->nbytes / 3;
    for (int c = 0; c < 3; c++) {
        char name[KM_NAME];
        snprintf(name, sizeof name, "text_model.encoder.layers.%d.self_attn.%c_proj.%s", layer, "qkv"[c],
                 is_weight ? "weight" : "bias");
        if (tmap_find(te, name) >= 0)
            return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT, "%s: %s is given twice", t->name, name);
        LORA_TRY(tmap_add(te, name, t->dtype, t->ndim, shape, (const uint8_t *)t->data + (uint64_t)c * chunk, chunk, 1,
                          1));
    }
    return LORA_OK;
}

static lora_status from_ldm(struct km_set *s, struct tensor_map *ldm, struct sd_model *out, struct prov *prov,
                            int64_t *n_prov) {
    lora_ctx *ctx = s->ctx;
    char buf[KM_NAME];
    for (int64_t i = 0; i < ldm->n; i++) {
        const struct lora_tensor *t = &ldm->t[i];
        int c = C_EXTRA;
        const char *key = t->name;
        if (starts(key, P_UNET)) c = C_UNET, key += sizeof P_UNET - 1;
        else if (starts(key, P_VAE)) c = C_VAE, key += sizeof P_VAE - 1;
        else if (s->version == 1 && starts(key, P_TE1)) c = C_TE, key += sizeof P_TE1 - 1;
        else if (s->version == 2 && starts(key, P_TE2)) c = C_TE, key += sizeof P_TE2 - 1;
        int reshape = 0;
        const char *dst_name = t->name;
        if (c == C_TE && s->version == 2) {
            int layer;
            const char *rest;
            if (parse_idx(key, "transformer.resblocks.", NULL, &layer, NULL, &rest) && layer < s->te_layers &&
                (strcmp(rest, "attn.in_proj_weight") == 0 || strcmp(rest, "attn.in_proj_bias") == 0)) {
                LORA_TRY(split_in_proj(ctx, t, layer, rest[13] == 'w', &out->te));
                continue;   /* the packed tensor stays in ldm and is freed with it */
            }
        }
        if (c != C_EXTRA) {
            lora_status r = km_map(&s->t[c], 0, key, buf, sizeof buf, &reshape);
            if (r == LORA_OK) dst_name = buf;
            else if (r == LORA_E_NO_MATCHING_KEYS || r == LORA_E_LIMIT) c = C_EXTRA;
            else return r;
        }
        int64_t shape[TM_MAX_RANK];
        int32_t ndim = t->ndim;
        memcpy(shape, t->shape, sizeof shape);
        if (reshape) {
            if (t->ndim == 4 && t->shape[0] == t->shape[1] && t->shape[2] == 1 && t->shape[3] == 1) ndim = 2;
            else if (!(t->ndim == 2 && t->shape[0] == t->shape[1]))
                return lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "%s: a VAE attention weight is [C,C,1,1], got rank %d",
                                 t->name, t->ndim);
        }
        struct tensor_map *dst = comp_map_rw(out, c);
        int64_t j = tmap_find(dst, dst_name);
        if (j >= 0) {
            const char *other = "?";
            for (int64_t p = 0; p < *n_prov; p++)
                if (prov[p].comp == c && prov[p].dst == j) other = ldm->t[prov[p].src].name;
            return lora_fail(ctx, LORA_E_UNSUPPORTED_LAYOUT, "%s and %s both map to %s %s", other, t->name,
                             c == C_EXTRA ? "extra" : COMP_NAME[c], dst_name);
        }
        LORA_TRY(tmap_add(dst, dst_name, t->dtype, ndim, shape, t->data, t->nbytes, 0, 0));
        prov[*n_prov].src = i;
        prov[*n_prov].dst = dst->n - 1;
        prov[*n_prov].comp = c;
        (*n_prov)++;
    }
    if (s->version == 2 && tmap_find(&out->te, "text_model.embeddings.position_ids") < 0) {
        int64_t e = tmap_find(&out->te, "text_model.embeddings.position_embedding.weight");
        if (e >= 0 && out->te.t[e].ndim == 2) {
            int64_t p = out->te.t[e].shape[0];
            int64_t shape[2] = {1, p};
            int64_t *ids = lora_malloc(ctx, p > 0 ? (size_t)p * sizeof *ids : 1);
            if (!ids) return LORA_E_NOMEM;
            for (int64_t q = 0; q < p; q++) ids[q] = q;
            lora_status r = tmap_add(&out->te, "text_model.embeddings.position_ids", LORA_DTYPE_I64, 2, shape, ids,
                                     (uint64_t)p * sizeof *ids, 0, 1);
            if (r != LORA_OK) {
                lora_free(ctx, ids);
                return r;
            }
        }
    }
    return LORA_OK;
}

static lora_status layouts_from_ldm(struct km_set *s, const struct tensor_map *ldm) {
    s->version = 1;
    for (int64_t i = 0; i < ldm->n; i++)
        if (starts(ldm->t[i].name, P_TE2)) {
            s->version = 2;
            break;
        }
    LORA_TRY(unet_layout_from_ldm(s->ctx, ldm, &s->unet));
    LORA_TRY(vae_layout(s->ctx, ldm, 1, &s->vae));
    if (s->version == 2) {
        struct te2_scan ts = {0};
        LORA_TRY(scan_keys(ldm, P_TE2, te2_scan_ldm, &ts));
        /* SD2 uses all OpenCLIP blocks but the last */
        if (ts.n < 2)
            return lora_fail(s->ctx, LORA_E_NOT_A_MODEL, "v2 text encoder: %stransformer.resblocks.%d.* is missing",
                             P_TE2, ts.n);
        s->te_layers = ts.n - 1;
    } else {
        /* count layers from either layout, after the v1 map */
        int n = 0;
        for (int64_t i = 0; i < ldm->n; i++) {
            const char *k = ldm->t[i].name;
            int b;
            if (!starts(k, P_TE1)) continue;
            k += sizeof P_TE1 - 1;
            if (starts(k, "text_model.")) k += 11;
            if (parse_idx(k, "encoder.layers.", NULL, &b, NULL, NULL) && b + 1 > n) n = b + 1;
        }
        if (n == 0)
            return lora_fail(s->ctx, LORA_E_NOT_A_MODEL,
                             "no text encoder: %stext_model.encoder.layers.0.* (or %smodel.*) is missing", P_TE1,
                             "cond_stage_model.");
        s->te_layers = n;
    }
    return LORA_OK;
}

lora_status sd_from_ldm(lora_ctx *ctx, struct tensor_map *ldm, struct sd_model *out) {
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "sd_from_ldm: out is NULL");
    sd_model_init(out, ctx);
    if (!ldm) return lora_fail(ctx, LORA_E_INVALID_ARG, "sd_from_ldm: ldm is NULL");
    struct km_set s;
    memset(&s, 0, sizeof s);
    s.ctx = ctx;
    struct prov *prov = NULL;
    int64_t n_prov = 0;
    lora_status st = layouts_from_ldm(&s, ldm);
    if (st == LORA_OK) st = set_tables(&s);
    if (st == LORA_OK && !(prov = lora_malloc(ctx, (size_t)(ldm->n ? ldm->n : 1) * sizeof *prov))) st = LORA_E_NOMEM;
    if (st == LORA_OK) st = from_ldm(&s, ldm, out, prov, &n_prov);
    struct chk k = {&s, out};
    if (st == LORA_OK) st = check_unet(&k);
    if (st == LORA_OK) st = check_vae(&k);
    if (st == LORA_OK) st = check_te(&k);
    if (st == LORA_OK) st = read_config(&k, &out->cfg);
    if (st == LORA_OK) {
        /* everything is in place: hand the data over, then empty ldm */
        for (int64_t p = 0; p < n_prov; p++) {
            struct lora_tensor *src = &ldm->t[prov[p].src];
            comp_map_rw(out, prov[p].comp)->t[prov[p].dst].owned = src->owned;
            src->owned = 0;
        }
        tmap_clear(ldm);
    } else {
        sd_model_clear(out);   /* frees only the split copies; the rest was borrowed */
    }
    lora_free(ctx, prov);
    set_free(&s);
    return st;
}

/* ---- diffusers -> LDM ---------------------------------------------------------------------- */
static lora_status add_borrowed(struct tensor_map *out, const char *name, const struct lora_tensor *t, int32_t ndim,
                                const int64_t *shape) {
    if (tmap_find(out, name) >= 0)
        return lora_fail(out->ctx, LORA_E_INVALID_ARG, "two tensors map to the LDM name %s (the second: %s)", name,
                         t->name);
    return tmap_add(out, name, t->dtype, ndim, shape, t->data, t->nbytes, 0, 0);
}

/* v2: q/k/v of text encoder layer `layer` -> the packed in_proj tensor of resblock
 * `out_layer` (owned). */
static lora_status pack_in_proj(const struct km_set *s, const struct tensor_map *te, int layer, int out_layer,
                                int is_weight, struct tensor_map *out) {
    const char *kind = is_weight ? "weight" : "bias";
    const struct lora_tensor *p[3];
    for (int c = 0; c < 3; c++) {
        char name[KM_NAME];
        snprintf(name, sizeof name, "text_model.encoder.layers.%d.self_attn.%c_proj.%s", layer, "qkv"[c], kind);
        int64_t i = tmap_find(te, name);
        if (i < 0)
            return lora_fail(s->ctx, LORA_E_NOT_A_MODEL, "text encoder tensor %s is missing (needed for %stransformer."
                             "resblocks.%d.attn.in_proj_%s)", name, P_TE2, layer, kind);
        p[c] = &te->t[i];
        if (p[c]->ndim != (is_weight ? 2 : 1) || p[c]->dtype != p[0]->dtype || p[c]->ndim != p[0]->ndim ||
            memcmp(p[c]->shape, p[0]->shape, (size_t)p[0]->ndim * sizeof p[0]->shape[0]) != 0)
            return lora_fail(s->ctx, LORA_E_SHAPE_MISMATCH, "text encoder tensor %s: q/k/v must have one shape and "
                             "dtype (%s)", name, is_weight ? "[H,H]" : "[H]");
    }
    char name[KM_NAME];
    snprintf(name, sizeof name, "%stransformer.resblocks.%d.attn.in_proj_%s", P_TE2, out_layer, kind);
    if (tmap_find(out, name) >= 0)
        return lora_fail(s->ctx, LORA_E_INVALID_ARG, "two tensors map to the LDM name %s", name);
    uint64_t nb = p[0]->nbytes;
    uint8_t *data = lora_malloc(s->ctx, nb ? (size_t)(3 * nb) : 1);
    if (!data) return LORA_E_NOMEM;
    for (int c = 0; c < 3; c++)
        if (nb) memcpy(data + (uint64_t)c * nb, p[c]->data, (size_t)nb);
    int64_t shape[2] = {3 * p[0]->shape[0], is_weight ? p[0]->shape[1] : 0};
    lora_status r = tmap_add(out, name, p[0]->dtype, p[0]->ndim, shape, data, 3 * nb, 0, 1);
    if (r != LORA_OK) lora_free(s->ctx, data);
    return r;
}

/* An owned tensor of ones. */
static lora_status add_ones(lora_ctx *ctx, struct tensor_map *out, const char *name, lora_dtype dt, int32_t ndim,
                            const int64_t *shape) {
    int64_t n = 1;
    for (int32_t d = 0; d < ndim; d++) n *= shape[d];
    int bytes = lora_dtype_bits(dt) / 8;
    if (dt != LORA_DTYPE_F32 && dt != LORA_DTYPE_F16 && dt != LORA_DTYPE_BF16 && dt != LORA_DTYPE_F64)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: cannot make a %s tensor of ones", name, lora_dtype_name(dt));
    uint8_t *p = lora_malloc(ctx, n ? (size_t)(n * bytes) : 1);
    if (!p) return LORA_E_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        if (dt == LORA_DTYPE_F32) {
            float v = 1.0f;
            memcpy(p + i * 4, &v, 4);
        } else if (dt == LORA_DTYPE_F64) {
            double v = 1.0;
            memcpy(p + i * 8, &v, 8);
        } else {
            uint16_t v = dt == LORA_DTYPE_F16 ? lora_f32_to_f16(1.0f) : lora_f32_to_bf16(1.0f);
            memcpy(p + i * 2, &v, 2);
        }
    }
    if (tmap_find(out, name) >= 0) {
        lora_free(ctx, p);
        return lora_fail(ctx, LORA_E_INVALID_ARG, "two tensors map to the LDM name %s", name);
    }
    lora_status r = tmap_add(out, name, dt, ndim, shape, p, (uint64_t)(n * bytes), 0, 1);
    if (r != LORA_OK) lora_free(ctx, p);
    return r;
}

/* A v2 text encoder that did not come from an LDM file (a diffusers folder) lacks what SD2's
 * OpenCLIP has beyond the layers SD uses. Made up as kohya's converter does: the unused last
 * resblock as a copy of the last used one, text_projection all ones [H,H], logit_scale 1
 * (kohya writes an int64 1; here it has the text encoder's dtype). */
static lora_status v2_dummies(const struct km_set *s, const struct sd_model *m, struct tensor_map *out) {
    int L = s->te_layers;
    char pre[KM_PFX], name[KM_NAME];
    if (L < 1) return lora_fail(s->ctx, LORA_E_NOT_A_MODEL, "text encoder: text_model.encoder.layers.0.* is missing");
    snprintf(pre, sizeof pre, "text_model.encoder.layers.%d.", L - 1);
    for (int64_t i = 0; i < m->te.n; i++) {
        const struct lora_tensor *t = &m->te.t[i];
        int layer, w;
        char q;
        if (!starts(t->name, pre)) continue;
        if (parse_qkv(t->name, &layer, &q, &w)) {
            if (q == 'q') LORA_TRY(pack_in_proj(s, &m->te, layer, L, w, out));
            continue;
        }
        const char *rest = t->name + strlen(pre);
        int c = 0;
        while (c < N_OF(V2_LAYER) && !starts(rest, V2_LAYER[c][1])) c++;
        if (c == N_OF(V2_LAYER))
            return lora_fail(s->ctx, LORA_E_UNSUPPORTED_LAYOUT, "text encoder tensor %s has no LDM name", t->name);
        snprintf(name, sizeof name, "%stransformer.resblocks.%d.%s%s", P_TE2, L, V2_LAYER[c][0],
                 rest + strlen(V2_LAYER[c][1]));
        LORA_TRY(add_borrowed(out, name, t, t->ndim, t->shape));
    }
    const struct lora_tensor *tok = &m->te.t[tmap_find(&m->te, "text_model.embeddings.token_embedding.weight")];
    int64_t hh[2] = {tok->shape[1], tok->shape[1]};
    snprintf(name, sizeof name, "%stext_projection", P_TE2);
    LORA_TRY(add_ones(s->ctx, out, name, tok->dtype, 2, hh));
    snprintf(name, sizeof name, "%slogit_scale", P_TE2);
    return add_ones(s->ctx, out, name, tok->dtype, 0, hh);
}

static lora_status to_ldm(struct km_set *s, const struct sd_model *m, struct tensor_map *out) {
    char buf[KM_NAME], full[KM_NAME + 64];
    for (int c = 0; c < 3; c++) {
        const struct tensor_map *map = comp_map(m, c);
        for (int64_t i = 0; i < map->n; i++) {
            const struct lora_tensor *t = &map->t[i];
            if (c == C_TE && s->version == 2) {
                int layer, w;
                char q;
                if (strcmp(t->name, "text_model.embeddings.position_ids") == 0) continue;
                if (parse_qkv(t->name, &layer, &q, &w)) {
                    if (q == 'q') LORA_TRY(pack_in_proj(s, map, layer, layer, w, out));
                    continue;   /* k and v: packed with q (pack_in_proj reports a missing q via k's check below) */
                }
            }
            int reshape = 0;
            lora_status r = km_map(&s->t[c], 1, t->name, buf, sizeof buf, &reshape);
            if (r == LORA_E_NO_MATCHING_KEYS || r == LORA_E_LIMIT)
                return lora_fail(s->ctx, LORA_E_UNSUPPORTED_LAYOUT, "%s tensor %s has no LDM name", COMP_NAME[c],
                                 t->name);
            if (r != LORA_OK) return r;
            snprintf(full, sizeof full, "%s%s", comp_prefix(s, c), buf);
            int64_t shape[TM_MAX_RANK];
            int32_t ndim = t->ndim;
            memcpy(shape, t->shape, sizeof shape);
            if (reshape && t->ndim == 2) {
                shape[2] = shape[3] = 1;
                ndim = 4;
            }
            LORA_TRY(add_borrowed(out, full, t, ndim, shape));
        }
    }
    if (s->version == 2) {
        /* a k/v without its q was skipped above: name it */
        for (int64_t i = 0; i < m->te.n; i++) {
            int layer, w;
            char q;
            if (parse_qkv(m->te.t[i].name, &layer, &q, &w) && q != 'q') {
                snprintf(buf, sizeof buf, "text_model.encoder.layers.%d.self_attn.q_proj.%s", layer, w ? "weight" : "bias");
                if (tmap_find(&m->te, buf) < 0)
                    return lora_fail(s->ctx, LORA_E_NOT_A_MODEL, "text encoder tensor %s is missing (%s has no q)", buf,
                                     m->te.t[i].name);
            }
        }
    }
    if (s->version == 2) {
        int from_ldm = 0;
        for (int64_t i = 0; i < m->extra.n && !from_ldm; i++) from_ldm = starts(m->extra.t[i].name, P_TE2);
        if (!from_ldm) LORA_TRY(v2_dummies(s, m, out));
    }
    for (int64_t i = 0; i < m->extra.n; i++) {
        const struct lora_tensor *t = &m->extra.t[i];
        LORA_TRY(add_borrowed(out, t->name, t, t->ndim, t->shape));
    }
    return LORA_OK;
}

lora_status sd_to_ldm(const struct sd_model *m, struct tensor_map *out) {
    if (!m || !out) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = m->ctx;
    tmap_init(out, ctx);
    struct km_set s;
    memset(&s, 0, sizeof s);
    s.ctx = ctx;
    s.version = m->cfg.version == 2 ? 2 : 1;
    for (int c = 0; c < 3; c++) km_init(&s.t[c], ctx);
    lora_status st = LORA_OK;
    if (tmap_find(&m->unet, "conv_in.weight") < 0)
        st = lora_fail(ctx, LORA_E_NOT_A_MODEL, "U-Net tensor conv_in.weight is missing");
    else if (tmap_find(&m->vae, "encoder.conv_in.weight") < 0)
        st = lora_fail(ctx, LORA_E_NOT_A_MODEL, "VAE tensor encoder.conv_in.weight is missing");
    else if (tmap_find(&m->te, "text_model.embeddings.token_embedding.weight") < 0)
        st = lora_fail(ctx, LORA_E_NOT_A_MODEL, "text encoder tensor text_model.embeddings.token_embedding.weight is "
                       "missing");
    if (st == LORA_OK) st = unet_layout_from_hf(ctx, &m->unet, &s.unet);
    if (st == LORA_OK) st = vae_layout(ctx, &m->vae, 0, &s.vae);
    if (st == LORA_OK && s.version == 2) {
        struct te2_scan ts = {0};
        st = scan_keys(&m->te, NULL, te2_scan_hf, &ts);
        s.te_layers = ts.n;
    }
    if (st == LORA_OK) st = set_tables(&s);
    if (st == LORA_OK) st = to_ldm(&s, m, out);
    if (st != LORA_OK) tmap_clear(out);
    set_free(&s);
    return st;
}
