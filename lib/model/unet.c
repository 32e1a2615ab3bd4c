/* UNet2DConditionModel forward (see unet.h). */
#include <stdio.h>
#include <string.h>

#include "backend/backend.h"
#include "model/unet.h"

/* ---- weights ---------------------------------------------------------------------------------- */

static void xf_load(struct img_weights *w, struct unet_xf *x, int64_t c, int64_t heads, int64_t ctx,
                    const char *pre) {
    x->c = c;
    x->heads = heads;
    snprintf(x->name, sizeof x->name, "%s", pre);
    x->gng = img_w(w, c, "%s.norm.weight", pre);
    x->gnb = img_w(w, c, "%s.norm.bias", pre);
    x->piw = img_m(w, c * c, "%s.proj_in.weight", pre);
    x->pib = img_w(w, c, "%s.proj_in.bias", pre);
    x->pow_ = img_m(w, c * c, "%s.proj_out.weight", pre);
    x->pob = img_w(w, c, "%s.proj_out.bias", pre);
    struct unet_tblock *t = &x->tb;
    const char *b = "transformer_blocks.0";
    t->ln1g = img_w(w, c, "%s.%s.norm1.weight", pre, b);
    t->ln1b = img_w(w, c, "%s.%s.norm1.bias", pre, b);
    t->q1 = img_m(w, c * c, "%s.%s.attn1.to_q.weight", pre, b);
    t->k1 = img_m(w, c * c, "%s.%s.attn1.to_k.weight", pre, b);
    t->v1 = img_m(w, c * c, "%s.%s.attn1.to_v.weight", pre, b);
    t->o1w = img_m(w, c * c, "%s.%s.attn1.to_out.0.weight", pre, b);
    t->o1b = img_w(w, c, "%s.%s.attn1.to_out.0.bias", pre, b);
    t->ln2g = img_w(w, c, "%s.%s.norm2.weight", pre, b);
    t->ln2b = img_w(w, c, "%s.%s.norm2.bias", pre, b);
    t->q2 = img_m(w, c * c, "%s.%s.attn2.to_q.weight", pre, b);
    t->k2 = img_m(w, c * ctx, "%s.%s.attn2.to_k.weight", pre, b);
    t->v2 = img_m(w, c * ctx, "%s.%s.attn2.to_v.weight", pre, b);
    t->o2w = img_m(w, c * c, "%s.%s.attn2.to_out.0.weight", pre, b);
    t->o2b = img_w(w, c, "%s.%s.attn2.to_out.0.bias", pre, b);
    t->ln3g = img_w(w, c, "%s.%s.norm3.weight", pre, b);
    t->ln3b = img_w(w, c, "%s.%s.norm3.bias", pre, b);
    t->f1w = img_m(w, 8 * c * c, "%s.%s.ff.net.0.proj.weight", pre, b);
    t->f1b = img_w(w, 8 * c, "%s.%s.ff.net.0.proj.bias", pre, b);
    t->f2w = img_m(w, 4 * c * c, "%s.%s.ff.net.2.weight", pre, b);
    t->f2b = img_w(w, c, "%s.%s.ff.net.2.bias", pre, b);
}

/* skip channels in push order (conv_in, each down resnet, each downsampler) */
static int64_t skip_channels(const struct unet_model *m, int64_t *chs) {
    int64_t n = 0;
    chs[n++] = m->ch[0];
    for (int64_t i = 0; i < m->levels; i++) {
        for (int64_t j = 0; j < m->layers; j++) chs[n++] = m->ch[i];
        if (i < m->levels - 1) chs[n++] = m->ch[i];
    }
    return n;
}

static void add_xf(struct unet_model *m, struct unet_xf *x) {
    x->index = m->n_xf;
    m->xf[m->n_xf++] = x;
}

static void unet_build(struct unet_model *m, struct img_weights *w) {
    int64_t L = m->levels, T = m->temb, c0 = m->ch[0], X = m->ctx_dim;
    char pre[160];
    m->n_xf = 0;
    m->t1w = img_m(w, T * c0, "time_embedding.linear_1.weight");
    m->t1b = img_w(w, T, "time_embedding.linear_1.bias");
    m->t2w = img_m(w, T * T, "time_embedding.linear_2.weight");
    m->t2b = img_w(w, T, "time_embedding.linear_2.bias");
    m->cin_w = img_m(w, c0 * m->in_ch * 9, "conv_in.weight");
    m->cin_b = img_w(w, c0, "conv_in.bias");
    for (int64_t i = 0; i < L; i++) {
        for (int64_t j = 0; j < m->layers; j++) {
            snprintf(pre, sizeof pre, "down_blocks.%lld.resnets.%lld", (long long)i, (long long)j);
            img_resnet_load(w, &m->dres[i][j], j == 0 ? (i ? m->ch[i - 1] : c0) : m->ch[i], m->ch[i], T, pre);
            if (m->attn[i]) {
                snprintf(pre, sizeof pre, "down_blocks.%lld.attentions.%lld", (long long)i, (long long)j);
                xf_load(w, &m->dxf[i][j], m->ch[i], m->heads[i], X, pre);
                add_xf(m, &m->dxf[i][j]);
            }
        }
        if (i < L - 1) {
            m->dconv_w[i] = img_m(w, m->ch[i] * m->ch[i] * 9, "down_blocks.%lld.downsamplers.0.conv.weight", (long long)i);
            m->dconv_b[i] = img_w(w, m->ch[i], "down_blocks.%lld.downsamplers.0.conv.bias", (long long)i);
        }
    }
    int64_t top = m->ch[L - 1];
    img_resnet_load(w, &m->mr0, top, top, T, "mid_block.resnets.0");
    xf_load(w, &m->mxf, top, m->heads[L - 1], X, "mid_block.attentions.0");
    add_xf(m, &m->mxf);
    img_resnet_load(w, &m->mr1, top, top, T, "mid_block.resnets.1");
    int64_t chs[UNET_MAX_SKIPS], ns = skip_channels(m, chs);
    int64_t prev = top;
    for (int64_t i = 0; i < L; i++) {
        int64_t lv = L - 1 - i, out = m->ch[lv];
        for (int64_t j = 0; j <= m->layers; j++) {
            int64_t sk = chs[--ns];
            snprintf(pre, sizeof pre, "up_blocks.%lld.resnets.%lld", (long long)i, (long long)j);
            img_resnet_load(w, &m->ures[i][j], (j == 0 ? prev : out) + sk, out, T, pre);
            if (m->attn[lv]) {
                snprintf(pre, sizeof pre, "up_blocks.%lld.attentions.%lld", (long long)i, (long long)j);
                xf_load(w, &m->uxf[i][j], out, m->heads[lv], X, pre);
                add_xf(m, &m->uxf[i][j]);
            }
        }
        if (i < L - 1) {
            m->uconv_w[i] = img_m(w, out * out * 9, "up_blocks.%lld.upsamplers.0.conv.weight", (long long)i);
            m->uconv_b[i] = img_w(w, out, "up_blocks.%lld.upsamplers.0.conv.bias", (long long)i);
        }
        prev = out;
    }
    m->no_g = img_w(w, c0, "conv_norm_out.weight");
    m->no_b = img_w(w, c0, "conv_norm_out.bias");
    m->cout_w = img_m(w, m->out_ch * c0 * 9, "conv_out.weight");
    m->cout_b = img_w(w, m->out_ch, "conv_out.bias");
}

void unet_free(struct unet_model *m) {
    if (!m) return;
    if (m->weights && m->be) m->be->iface->buf_free(m->be, m->weights);
    memset(m, 0, sizeof *m);
}

lora_status unet_init(struct unet_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *unet, const struct sd_config *cfg) {
    return unet_init_ex(m, be, unet, cfg, 0);
}

lora_status unet_init_ex(struct unet_model *m, struct lora_backend_impl *be,
                         const struct tensor_map *unet, const struct sd_config *cfg, int flags) {
    memset(m, 0, sizeof *m);
    if (!be || !unet || !cfg) return LORA_E_INVALID_ARG;
    if (cfg->n_levels < 1 || cfg->n_levels > SD_MAX_LEVELS || cfg->layers_per_block < 1 ||
        cfg->layers_per_block > IMG_MAX_LAYERS || cfg->unet_norm_groups < 1 || cfg->context_dim < 1 ||
        cfg->unet_in_channels < 1 || cfg->unet_out_channels < 1)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "unet: unsupported config");
    m->be = be;
    m->levels = cfg->n_levels;
    m->layers = cfg->layers_per_block;
    m->groups = cfg->unet_norm_groups;
    m->ctx_dim = cfg->context_dim;
    m->in_ch = cfg->unet_in_channels;
    m->out_ch = cfg->unet_out_channels;
    for (int64_t i = 0; i < m->levels; i++) {
        m->ch[i] = cfg->block_channels[i];
        m->attn[i] = cfg->attn_levels[i] != 0;
        m->heads[i] = cfg->heads[i];
        if (m->ch[i] < 1 || m->ch[i] % m->groups ||
            ((m->attn[i] || i == m->levels - 1) && (m->heads[i] < 1 || m->ch[i] % m->heads[i])))
            return lora_fail(be->ctx, LORA_E_INVALID_ARG, "unet: level %lld: %lld channels, %lld heads, %lld groups",
                             (long long)i, (long long)m->ch[i], (long long)m->heads[i], (long long)m->groups);
    }
    m->temb = 4 * m->ch[0];
    /* borrowing needs the backend to compute on host memory */
    int borrow = (flags & UNET_BORROW_16BIT) && be->iface->name && strcmp(be->iface->name, "cpu") == 0;
    struct img_weights w = {be, unet, "unet", 0, NULL, 0, NULL, 0, LORA_OK, 1, borrow, 0};
    unet_build(m, &w);
    if (w.err != LORA_OK) { lora_status s = w.err; unet_free(m); return s; }
    void *buf = NULL;
    LORA_TRY(be->iface->buf_alloc(be, (size_t)w.off, &buf));
    m->weights = buf;
    m->weight_bytes = w.off;
    m->wmax = w.wmax;
    w.pass = 1; w.base = buf; w.off = 0;
    unet_build(m, &w);
    if (w.stage) be->iface->buf_free(be, w.stage);
    if (w.err != LORA_OK) { lora_status s = w.err; unet_free(m); return s; }
    return LORA_OK;
}

/* ---- plan -------------------------------------------------------------------------------------- */

void unet_plan_free(struct unet_plan *p) {
    if (!p) return;
    if (p->m && p->m->be) {
        if (p->mem) p->m->be->iface->buf_free(p->m->be, p->mem);
        lora_free(p->m->be->ctx, p->host);
    }
    memset(p, 0, sizeof *p);
}

struct cursor { char *base; uint64_t off; };   /* base NULL: sizing only */

static float *take(struct cursor *c, int64_t n) {
    float *p = c->base ? (float *)(c->base + c->off) : NULL;
    c->off += ((uint64_t)n * 4 + 63) & ~(uint64_t)63;
    return p;
}

const char *const unet_target_names[UNET_T_N] = {
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
    "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"};

/* Latent size per level: Downsample2D (3x3, stride 2, padding 1) gives ceil(previous / 2), so
 * any size >= 1 works; a level's Upsample2D resizes to the size of the level above. */
static void level_sizes(const struct unet_model *m, int64_t h, int64_t w, int64_t *lh, int64_t *lw) {
    lh[0] = h;
    lw[0] = w;
    for (int64_t i = 1; i < m->levels; i++) {
        lh[i] = (lh[i - 1] + 1) / 2;
        lw[i] = (lw[i - 1] + 1) / 2;
    }
}

/* Saved block inputs of the train forward, in forward order: down (resnet in, xf in), mid
 * (r0 in, xf in, r1 in), up (resnet in before the concat, xf in), norm_out in. Calls f(ctx,
 * floats) per slot. */
static int64_t slot_sizes(const struct unet_model *m, int64_t B, int64_t h, int64_t w, int64_t *sz) {
    int64_t n = 0, L = m->levels, chs[UNET_MAX_SKIPS], ns = skip_channels(m, chs), cur = m->ch[0];
    int64_t lh[SD_MAX_LEVELS], lw[SD_MAX_LEVELS];
    level_sizes(m, h, w, lh, lw);
    for (int64_t i = 0; i < L; i++) {
        int64_t hw = lh[i] * lw[i];
        for (int64_t j = 0; j < m->layers; j++) {
            sz[n++] = B * cur * hw;
            cur = m->ch[i];
            if (m->attn[i]) sz[n++] = B * cur * hw;
        }
    }
    for (int k = 0; k < 3; k++) sz[n++] = B * cur * lh[L - 1] * lw[L - 1];
    for (int64_t i = 0; i < L; i++) {
        int64_t lv = L - 1 - i, C = m->ch[lv], hw = lh[lv] * lw[lv];
        for (int64_t j = 0; j <= m->layers; j++) {
            ns--;
            sz[n++] = B * cur * hw;
            cur = C;
            if (m->attn[lv]) sz[n++] = B * C * hw;
        }
    }
    sz[n++] = B * cur * h * w;
    return n;
}

/* the recompute / gradient token buffers p->tok[] (and a saved set's tok[]) */
enum { TG, TH0, TH1, TH2, TH3, TL1, TL2, TL3, TQ, TK, TV, TA1, TQ2, TA2, TD, TDA, TDQ, TDK, TDV, TDL };

/* A transformer's saved set (UNET_TRAIN_SAVE_ALL). The three LayerNorm outputs and the GEGLU
 * output are not kept: they share the plan's buffers and the backward recomputes them from
 * the kept LayerNorm inputs and GEGLU input (elementwise work, 7 of 26 token-widths saved). */
static void xsave_take(struct cursor *cur, struct unet_plan *p, struct unet_xsave *s, int64_t B, int64_t hw,
                       int64_t C, int64_t T, int64_t groups) {
    int64_t n = B * hw * C;
    for (int t = 0; t < UNET_NSAVED; t++) s->tok[t] = t == TL1 || t == TL2 || t == TL3 ? p->tok[TL1] : take(cur, n);
    s->ff1 = take(cur, 8 * n);
    s->ff2 = p->ff2;
    s->ck = take(cur, B * T * C);
    s->cv = take(cur, B * T * C);
    for (int t = 0; t < 3; t++) { s->sm[t] = take(cur, B * hw); s->sr[t] = take(cur, B * hw); }
    s->gm = take(cur, B * groups);
    s->gr = take(cur, B * groups);
}

/* pass with base NULL: returns the byte count */
static uint64_t plan_layout(struct unet_plan *p, const struct unet_model *m, int64_t B, int64_t h, int64_t w,
                            int64_t T, char *base) {
    int64_t maxc = m->in_ch > m->out_ch ? m->in_ch : m->out_ch, maxh = 1, tokf = 1;
    int64_t lh[SD_MAX_LEVELS], lw[SD_MAX_LEVELS];
    level_sizes(m, h, w, lh, lw);
    for (int64_t i = 0; i < m->levels; i++) {
        if (m->ch[i] > maxc) maxc = m->ch[i];
        if (m->heads[i] > maxh) maxh = m->heads[i];
        int64_t lhw = lh[i] * lw[i];
        if ((m->attn[i] || i == m->levels - 1) && B * lhw * m->ch[i] > tokf) tokf = B * lhw * m->ch[i];
    }
    int64_t hw = h * w, tk = hw > T ? hw : T;
    struct img_ws *ws = &p->ws;
    /* The widest activation at level i: an up resnet's concat of the level below (or this)
     * and a skip of this level (or the one above, after its downsampler). Convolutions read
     * at most that many input channels: im2col runs in bands of output rows within
     * UNET_COLS_CAP floats (or one row, if that is more). */
    int64_t act = B * hw * (m->in_ch > m->out_ch ? m->in_ch : m->out_ch), rowc = 0;
    for (int64_t i = 0; i < m->levels; i++) {
        int64_t a = i ? (m->ch[i - 1] > m->ch[i] ? m->ch[i - 1] : m->ch[i]) : m->ch[i];
        int64_t b = i + 1 < m->levels ? (m->ch[i + 1] > m->ch[i] ? m->ch[i + 1] : m->ch[i]) : m->ch[i];
        int64_t n = B * lh[i] * lw[i] * (a + b), r = 9 * (a + b) * lw[i];
        if (n > act) act = n;
        if (r > rowc) rowc = r;
    }
    ws->act_floats = act;
    ws->cols_floats = 9 * (act / B) < UNET_COLS_CAP ? 9 * (act / B) : UNET_COLS_CAP;
    if (ws->cols_floats < rowc) ws->cols_floats = rowc;
    ws->wbuf_floats = m->wmax;
    int64_t block = hw < 256 ? hw : 256;
    ws->att_floats = nn_mha_scratch_floats(maxh, tk, block, p->train);
    struct cursor cv = {base, 0}, *cur = &cv;
    for (int k = 0; k < IMG_NBUF; k++) ws->buf[k] = take(cur, ws->act_floats);
    ws->cols = take(cur, ws->cols_floats);
    ws->wbuf = ws->wbuf_floats ? take(cur, ws->wbuf_floats) : NULL;
    ws->mean = take(cur, B * m->groups);
    ws->rstd = take(cur, B * m->groups);
    ws->att = take(cur, ws->att_floats);
    for (int k = 0; k < 4; k++) ws->vec[k] = take(cur, B * (m->temb > maxc ? m->temb : maxc));
    /* GEGLU buffers: the largest transformer's tokens x width (tokf), not full size x maxc */
    p->ff1 = take(cur, 8 * tokf);
    p->ff2 = take(cur, 4 * tokf);
    p->ck = take(cur, B * T * maxc);
    p->cv = take(cur, B * T * maxc);
    p->lnm = take(cur, B * hw);
    p->lnr = take(cur, B * hw);
    p->tvec = take(cur, B);
    int64_t chs[UNET_MAX_SKIPS], ns = skip_channels(m, chs), k = 0;
    int64_t skf[UNET_MAX_SKIPS];
    skf[k] = B * chs[k] * h * w;
    p->skip[k] = take(cur, skf[k]);
    k++;
    for (int64_t i = 0; i < m->levels; i++) {
        for (int64_t j = 0; j < m->layers; j++, k++)
            p->skip[k] = take(cur, skf[k] = B * chs[k] * lh[i] * lw[i]);
        if (i < m->levels - 1) {
            p->skip[k] = take(cur, skf[k] = B * chs[k] * lh[i + 1] * lw[i + 1]);
            k++;
        }
    }
    int64_t rows = B * (hw > T ? hw : T);
    if (p->max_rank > 0) {
        p->lh = take(cur, rows * p->max_rank);
        p->ldh = take(cur, rows * p->max_rank);
    }
    if (p->train) {
        p->tok_floats = tokf;
        for (int t = 0; t < UNET_NTOK; t++) p->tok[t] = take(cur, tokf);
        struct unet_xsave *r = &p->rec;
        for (int t = 0; t < UNET_NSAVED; t++) r->tok[t] = p->tok[t];
        r->ff1 = p->ff1; r->ff2 = p->ff2; r->ck = p->ck; r->cv = p->cv;
        p->dff1 = take(cur, 8 * tokf);
        p->dff2 = take(cur, 4 * tokf);
        p->dck = take(cur, B * T * maxc);
        p->dcv = take(cur, B * T * maxc);
        p->gm = take(cur, B * m->groups);
        p->gr = take(cur, B * m->groups);
        for (int t = 0; t < 3; t++) { p->sm[t] = take(cur, B * hw); p->sr[t] = take(cur, B * hw); }
        for (int t = 0; t < 3; t++) { r->sm[t] = p->sm[t]; r->sr[t] = p->sr[t]; }
        r->gm = p->gm; r->gr = p->gr;
        if (p->train == UNET_TRAIN_SAVE_ALL) {
            /* every transformer's intermediates, sized for its level, in forward order */
            int64_t n = 0, L = m->levels;
            for (int64_t i = 0; i < L; i++)
                if (m->attn[i])
                    for (int64_t j = 0; j < m->layers; j++)
                        xsave_take(cur, p, &p->xs[n++], B, lh[i] * lw[i], m->ch[i], T, m->groups);
            xsave_take(cur, p, &p->xs[n++], B, lh[L - 1] * lw[L - 1], m->ch[L - 1], T, m->groups);
            for (int64_t i = 0; i < L; i++) {
                int64_t lv = L - 1 - i;
                if (m->attn[lv])
                    for (int64_t j = 0; j <= m->layers; j++)
                        xsave_take(cur, p, &p->xs[n++], B, lh[lv] * lw[lv], m->ch[lv], T, m->groups);
            }
        }
        for (int t = 0; t < 2; t++) { p->rm[t] = take(cur, B * m->groups); p->rr[t] = take(cur, B * m->groups); }
        int64_t sz[UNET_MAX_SLOTS];
        p->nslot = slot_sizes(m, B, h, w, sz);
        for (int64_t t = 0; t < p->nslot; t++) p->slot[t] = take(cur, sz[t]);
        for (int64_t t = 0; t < ns; t++) p->dskip[t] = take(cur, skf[t]);
    }
    return cv.off;
}

lora_status unet_plan_init_ex(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                              int64_t h, int64_t w, int64_t tokens, int train, int64_t max_rank) {
    memset(p, 0, sizeof *p);
    if (!m || !m->be) return LORA_E_INVALID_ARG;
    /* any latent size: odd levels take ceil(n / 2) and the upsamplers resize to the skip */
    if (batch < 1 || tokens < 1 || h < 1 || w < 1 || batch > (1 << 16) || h > (1 << 14) || w > (1 << 14) ||
        tokens > (1 << 16) || max_rank < 0 || max_rank > (1 << 16))
        return lora_fail(m->be->ctx, LORA_E_INVALID_ARG,
                         "unet plan: batch %lld, latent %lldx%lld, %lld tokens is invalid", (long long)batch,
                         (long long)h, (long long)w, (long long)tokens);
    if (train < 0 || train > UNET_TRAIN_SAVE_ALL || m->n_xf > 64)
        return lora_fail(m->be->ctx, LORA_E_INVALID_ARG, "unet plan: train mode %d is invalid", train);
    p->train = train;
    p->max_rank = max_rank;
    uint64_t bytes = plan_layout(p, m, batch, h, w, tokens, NULL);
    void *mem = NULL;
    LORA_TRY(m->be->iface->buf_alloc(m->be, (size_t)bytes, &mem));
    p->host = lora_malloc(m->be->ctx, (size_t)batch * sizeof(float));
    if (!p->host) { m->be->iface->buf_free(m->be, mem); return LORA_E_NOMEM; }
    void *host = p->host;
    plan_layout(p, m, batch, h, w, tokens, mem);
    p->host = host;
    p->tvec_host = host;
    p->mem = mem;
    p->bytes = bytes;
    p->m = m;
    p->batch = batch; p->h = h; p->w = w; p->tokens = tokens;
    return LORA_OK;
}

lora_status unet_plan_init(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                           int64_t h, int64_t w, int64_t tokens) {
    return unet_plan_init_ex(p, m, batch, h, w, tokens, 0, 0);
}

uint64_t unet_plan_bytes(const struct unet_plan *p) { return p ? p->bytes : 0; }

lora_status unet_set_adapters(struct unet_plan *p, const struct unet_adapters *ad) {
    if (!p || !p->m) return LORA_E_INVALID_ARG;
    if (ad)
        for (int64_t x = 0; x < p->m->n_xf; x++)
            for (int t = 0; t < UNET_T_N; t++) {
                const struct nn_lora *l = ad->lora[x][t];
                if (l && (l->rank < 1 || l->rank > p->max_rank))
                    return lora_fail(p->m->be->ctx, LORA_E_INVALID_ARG,
                                     "unet: LoRA %s.%s has rank %lld, the plan allows %lld", p->m->xf[x]->name,
                                     unet_target_names[t], (long long)l->rank, (long long)p->max_rank);
            }
    p->ad = ad;
    return LORA_OK;
}

/* ---- LoRA / dW helpers --------------------------------------------------------------------------- */

static const struct nn_lora *lora_of(const struct unet_plan *p, const struct unet_xf *x, int t) {
    return p->ad ? p->ad->lora[x->index][t] : NULL;
}
static float *dw_of(const struct unet_plan *p, const struct unet_xf *x, int t) {
    return p->ad ? p->ad->dw[x->index][t] : NULL;
}

/* y = x W^T (+ b) (+ LoRA), rows n */
static lora_status wf32(struct unet_plan *p, struct img_mat m, const float **out) {
    struct img_ctx c = {p->m->be, &p->ws, p->m->groups, 1e-5f};
    return img_f32(&c, m, out);
}

static lora_status lin_f(struct unet_plan *p, const struct unet_xf *xf, int t, float *y, const float *x,
                         struct img_mat wm, const float *b, int64_t n, int64_t in, int64_t out) {
    struct lora_backend_impl *be = p->m->be;
    const float *w = NULL;
    LORA_TRY(wf32(p, wm, &w));
    LORA_TRY(nn_linear_forward(be, y, x, w, b, n, in, out));
    const struct nn_lora *l = lora_of(p, xf, t);
    return l ? nn_lora_forward(be, l, y, p->lh, x, n) : LORA_OK;
}

/* dx (=, or += with acc) from dy through W and the LoRA; dW and LoRA gradients accumulate */
static lora_status lin_b(struct unet_plan *p, const struct unet_xf *xf, int t, float *dx, const float *dy,
                         const float *x, struct img_mat wm, int64_t n, int64_t in, int64_t out, int acc) {
    struct lora_backend_impl *be = p->m->be;
    const float *w = NULL;
    LORA_TRY(wf32(p, wm, &w));
    LORA_TRY(nn_linear_backward(be, dx, dw_of(p, xf, t), NULL, dy, x, w, n, in, out, acc));
    const struct nn_lora *l = lora_of(p, xf, t);
    if (!l) return LORA_OK;
    LORA_TRY(nn_linear_forward(be, p->lh, x, l->down, NULL, n, in, l->rank));
    return nn_lora_backward(be, l, dx, p->ldh, dy, x, p->lh, n);
}

/* proj_in: x NCHW [B, C, hw] -> y tokens [B*hw, C] */
static lora_status proj_in_f(struct unet_plan *p, const struct unet_xf *xf, float *y, const float *x, int64_t hw) {
    struct lora_backend_impl *be = p->m->be;
    int64_t B = p->batch, C = xf->c;
    const float *w = NULL;
    LORA_TRY(wf32(p, xf->piw, &w));
    LORA_TRY(nn_proj_to_tokens_forward(be, y, x, w, xf->pib, B, hw, C, C));
    const struct nn_lora *l = lora_of(p, xf, UNET_T_PROJ_IN);
    if (!l) return LORA_OK;
    int64_t r = l->rank;
    for (int64_t b = 0; b < B; b++)
        LORA_TRY(be->iface->gemm_f32(be, 1, 1, hw, r, C, 1.0f, x + b * C * hw, hw, l->down, C, 0.0f,
                                     p->lh + b * hw * r, r));
    return be->iface->gemm_f32(be, 0, 1, B * hw, C, r, l->scale, p->lh, r, l->up, r, 1.0f, y, C);
}

static lora_status proj_in_b(struct unet_plan *p, const struct unet_xf *xf, float *dx, const float *dy,
                             const float *x, int64_t hw) {
    struct lora_backend_impl *be = p->m->be;
    int64_t B = p->batch, C = xf->c;
    const float *w = NULL;
    LORA_TRY(wf32(p, xf->piw, &w));
    LORA_TRY(nn_proj_to_tokens_backward(be, dx, dy, w, B, hw, C, C, 0));
    float *dw = dw_of(p, xf, UNET_T_PROJ_IN);
    if (dw)
        for (int64_t b = 0; b < B; b++)
            LORA_TRY(be->iface->gemm_f32(be, 1, 1, C, C, hw, 1.0f, dy + b * hw * C, C, x + b * C * hw, hw, 1.0f,
                                         dw, C));
    const struct nn_lora *l = lora_of(p, xf, UNET_T_PROJ_IN);
    if (!l) return LORA_OK;
    int64_t r = l->rank;
    float *h = p->lh, *dh = p->ldh;
    for (int64_t b = 0; b < B; b++)
        LORA_TRY(be->iface->gemm_f32(be, 1, 1, hw, r, C, 1.0f, x + b * C * hw, hw, l->down, C, 0.0f,
                                     h + b * hw * r, r));
    if (l->d_up) LORA_TRY(be->iface->gemm_f32(be, 1, 0, C, r, B * hw, l->scale, dy, C, h, r, 1.0f, l->d_up, r));
    LORA_TRY(be->iface->gemm_f32(be, 0, 0, B * hw, r, C, l->scale, dy, C, l->up, r, 0.0f, dh, r));
    for (int64_t b = 0; b < B; b++) {
        if (l->d_down)
            LORA_TRY(be->iface->gemm_f32(be, 1, 1, r, C, hw, 1.0f, dh + b * hw * r, r, x + b * C * hw, hw, 1.0f,
                                         l->d_down, C));
        LORA_TRY(be->iface->gemm_f32(be, 1, 1, C, hw, r, 1.0f, l->down, C, dh + b * hw * r, r, 1.0f,
                                     dx + b * C * hw, hw));
    }
    return LORA_OK;
}

/* proj_out: x tokens [B*hw, C] -> y NCHW [B, C, hw] */
static lora_status proj_out_f(struct unet_plan *p, const struct unet_xf *xf, float *y, const float *x, int64_t hw) {
    struct lora_backend_impl *be = p->m->be;
    int64_t B = p->batch, C = xf->c;
    const float *w = NULL;
    LORA_TRY(wf32(p, xf->pow_, &w));
    LORA_TRY(nn_proj_from_tokens_forward(be, y, x, w, xf->pob, B, hw, C, C));
    const struct nn_lora *l = lora_of(p, xf, UNET_T_PROJ_OUT);
    if (!l) return LORA_OK;
    int64_t r = l->rank;
    LORA_TRY(nn_linear_forward(be, p->lh, x, l->down, NULL, B * hw, C, r));
    for (int64_t b = 0; b < B; b++)
        LORA_TRY(be->iface->gemm_f32(be, 0, 1, C, hw, r, l->scale, l->up, r, p->lh + b * hw * r, r, 1.0f,
                                     y + b * C * hw, hw));
    return LORA_OK;
}

/* dx tokens written */
static lora_status proj_out_b(struct unet_plan *p, const struct unet_xf *xf, float *dx, const float *dy,
                              const float *x, int64_t hw) {
    struct lora_backend_impl *be = p->m->be;
    int64_t B = p->batch, C = xf->c;
    const float *w = NULL;
    LORA_TRY(wf32(p, xf->pow_, &w));
    LORA_TRY(nn_proj_from_tokens_backward(be, dx, dy, w, B, hw, C, C, 0));
    float *dw = dw_of(p, xf, UNET_T_PROJ_OUT);
    if (dw)
        for (int64_t b = 0; b < B; b++)
            LORA_TRY(be->iface->gemm_f32(be, 0, 0, C, C, hw, 1.0f, dy + b * C * hw, hw, x + b * hw * C, C, 1.0f,
                                         dw, C));
    const struct nn_lora *l = lora_of(p, xf, UNET_T_PROJ_OUT);
    if (!l) return LORA_OK;
    int64_t r = l->rank;
    float *h = p->lh, *dh = p->ldh;
    LORA_TRY(nn_linear_forward(be, h, x, l->down, NULL, B * hw, C, r));
    for (int64_t b = 0; b < B; b++) {
        if (l->d_up)
            LORA_TRY(be->iface->gemm_f32(be, 0, 0, C, r, hw, l->scale, dy + b * C * hw, hw, h + b * hw * r, r, 1.0f,
                                         l->d_up, r));
        LORA_TRY(be->iface->gemm_f32(be, 1, 0, hw, r, C, l->scale, dy + b * C * hw, hw, l->up, r, 0.0f,
                                     dh + b * hw * r, r));
    }
    if (l->d_down) LORA_TRY(be->iface->gemm_f32(be, 1, 0, r, C, B * hw, 1.0f, dh, r, x, C, 1.0f, l->d_down, C));
    return be->iface->gemm_f32(be, 0, 0, B * hw, C, r, 1.0f, dh, r, l->down, C, 1.0f, dx, C);
}

/* ---- transformer ----------------------------------------------------------------------------------- */


/* the block's token-side forward: writes h (proj_in output, then the running residual) and,
 * with `save` (the backward's recompute), every intermediate into p->tok. */
static lora_status xf_tokens(struct unet_plan *p, struct img_ctx *c, const struct unet_xf *x, const float *in,
                             const float *context, int64_t hw, const struct unet_xsave *S, float **h_out) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    const struct unet_tblock *t = &x->tb;
    int64_t B = p->batch, C = x->c, H = x->heads, d = C / H, n = B * hw, T = p->tokens, X = p->m->ctx_dim;
    float *g, *h0, *h1, *h2, *h3, *l1, *l2, *l3, *q, *k, *v, *a1, *q2, *a2, *tmp;
    float *m1 = p->lnm, *r1 = p->lnr, *m2 = p->lnm, *r2 = p->lnr, *m3 = p->lnm, *r3 = p->lnr;
    float *gm = ws->mean, *gr = ws->rstd, *ff1 = p->ff1, *ff2 = p->ff2, *ck = p->ck, *cv = p->cv;
    if (S) {
        float *const *b = S->tok;
        g = b[TG]; h0 = b[TH0]; h1 = b[TH1]; h2 = b[TH2]; h3 = b[TH3]; l1 = b[TL1]; l2 = b[TL2]; l3 = b[TL3];
        q = b[TQ]; k = b[TK]; v = b[TV]; a1 = b[TA1]; q2 = b[TQ2]; a2 = b[TA2]; tmp = p->tok[TDA];
        m1 = S->sm[0]; r1 = S->sr[0]; m2 = S->sm[1]; r2 = S->sr[1]; m3 = S->sm[2]; r3 = S->sr[2];
        gm = S->gm; gr = S->gr;
        ff1 = S->ff1; ff2 = S->ff2; ck = S->ck; cv = S->cv;
    } else {
        g = ws->buf[2]; h0 = h1 = h2 = h3 = ws->buf[3]; l1 = l2 = l3 = a1 = a2 = ws->buf[4];
        q = q2 = tmp = ws->buf[5]; k = ws->buf[6]; v = ws->buf[7];
    }
    LORA_TRY(nn_groupnorm_forward(be, g, gm, gr, in, x->gng, x->gnb, B, C, hw, c->groups, 1e-6f, 0));
    LORA_TRY(proj_in_f(p, x, h0, g, hw));
    /* self-attention */
    LORA_TRY(nn_layernorm_forward(be, l1, m1, r1, h0, t->ln1g, t->ln1b, n, C, 1e-5f));
    LORA_TRY(lin_f(p, x, UNET_T_Q1, q, l1, t->q1, NULL, n, C, C));
    LORA_TRY(lin_f(p, x, UNET_T_K1, k, l1, t->k1, NULL, n, C, C));
    LORA_TRY(lin_f(p, x, UNET_T_V1, v, l1, t->v1, NULL, n, C, C));
    LORA_TRY(nn_mha_forward(be, a1, q, k, v, B, hw, hw, H, d, 0.0f, ws->att, ws->att_floats));
    LORA_TRY(lin_f(p, x, UNET_T_O1, tmp, a1, t->o1w, t->o1b, n, C, C));
    if (h1 != h0) LORA_TRY(be->iface->copy(be, h1, h0, (size_t)(n * C) * 4));
    LORA_TRY(nn_residual_add(be, h1, tmp, n * C));
    /* cross-attention */
    LORA_TRY(nn_layernorm_forward(be, l2, m2, r2, h1, t->ln2g, t->ln2b, n, C, 1e-5f));
    LORA_TRY(lin_f(p, x, UNET_T_Q2, q2, l2, t->q2, NULL, n, C, C));
    LORA_TRY(lin_f(p, x, UNET_T_K2, ck, context, t->k2, NULL, B * T, X, C));
    LORA_TRY(lin_f(p, x, UNET_T_V2, cv, context, t->v2, NULL, B * T, X, C));
    LORA_TRY(nn_mha_forward(be, a2, q2, ck, cv, B, hw, T, H, d, 0.0f, ws->att, ws->att_floats));
    LORA_TRY(lin_f(p, x, UNET_T_O2, tmp, a2, t->o2w, t->o2b, n, C, C));
    if (h2 != h1) LORA_TRY(be->iface->copy(be, h2, h1, (size_t)(n * C) * 4));
    LORA_TRY(nn_residual_add(be, h2, tmp, n * C));
    /* GEGLU feed-forward */
    LORA_TRY(nn_layernorm_forward(be, l3, m3, r3, h2, t->ln3g, t->ln3b, n, C, 1e-5f));
    LORA_TRY(lin_f(p, x, UNET_T_FF0, ff1, l3, t->f1w, t->f1b, n, C, 8 * C));
    LORA_TRY(nn_geglu_forward(be, ff2, ff1, n, 4 * C));
    LORA_TRY(lin_f(p, x, UNET_T_FF2, tmp, ff2, t->f2w, t->f2b, n, 4 * C, C));
    if (h3 != h2) LORA_TRY(be->iface->copy(be, h3, h2, (size_t)(n * C) * 4));
    LORA_TRY(nn_residual_add(be, h3, tmp, n * C));
    *h_out = h3;
    return LORA_OK;
}

/* Transformer2DModel: y = x + proj_out(block(proj_in(GN(x)))), x NCHW [B, c, hw]. */
static lora_status xf_forward(struct unet_plan *p, struct img_ctx *c, const struct unet_xf *x, float *y,
                              const float *in, const float *context, int64_t hw) {
    float *h = NULL;
    const struct unet_xsave *S = p->train == UNET_TRAIN_SAVE_ALL ? &p->xs[x->index] : NULL;
    LORA_TRY(xf_tokens(p, c, x, in, context, hw, S, &h));
    LORA_TRY(proj_out_f(p, x, y, h, hw));
    return c->be->iface->axpby_f32(c->be, p->batch * x->c * hw, 1.0f, in, 1.0f, y);
}

/* dx (NCHW, written) from dy; d_context accumulated (may be NULL) */
static lora_status xf_backward(struct unet_plan *p, struct img_ctx *c, const struct unet_xf *x, float *dx,
                               const float *dy, const float *in, const float *context, float *dctx, int64_t hw) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    const struct unet_tblock *t = &x->tb;
    int64_t B = p->batch, C = x->c, H = x->heads, d = C / H, n = B * hw, T = p->tokens, X = p->m->ctx_dim;
    float **b = p->tok, *h3 = NULL;
    const struct unet_xsave *S = &p->rec;
    if (p->train == UNET_TRAIN_SAVE_ALL) {
        S = &p->xs[x->index];
        h3 = S->tok[TH3];
    } else LORA_TRY(xf_tokens(p, c, x, in, context, hw, S, &h3));
    float *const *sv = S->tok;
    float *D = b[TD], *DA = b[TDA], *DQ = b[TDQ], *DK = b[TDK], *DV = b[TDV], *DL = b[TDL];
    /* save-all keeps neither the LayerNorm outputs nor the GEGLU output: recompute each
     * right before its use (the same bits as the forward's) */
    int re = p->train == UNET_TRAIN_SAVE_ALL;
    LORA_TRY(proj_out_b(p, x, D, dy, h3, hw));
    /* feed-forward */
    if (re) LORA_TRY(nn_geglu_forward(be, S->ff2, S->ff1, n, 4 * C));
    LORA_TRY(lin_b(p, x, UNET_T_FF2, p->dff2, D, S->ff2, t->f2w, n, 4 * C, C, 0));
    LORA_TRY(nn_geglu_backward(be, p->dff1, p->dff2, S->ff1, n, 4 * C));
    if (re) LORA_TRY(nn_layernorm_forward(be, sv[TL3], S->sm[2], S->sr[2], sv[TH2], t->ln3g, t->ln3b, n, C, 1e-5f));
    LORA_TRY(lin_b(p, x, UNET_T_FF0, DL, p->dff1, sv[TL3], t->f1w, n, C, 8 * C, 0));
    LORA_TRY(nn_layernorm_backward(be, D, NULL, NULL, DL, sv[TH2], S->sm[2], S->sr[2], t->ln3g, n, C, 1));
    /* cross-attention */
    LORA_TRY(lin_b(p, x, UNET_T_O2, DA, D, sv[TA2], t->o2w, n, C, C, 0));
    LORA_TRY(nn_mha_backward(be, DQ, p->dck, p->dcv, DA, sv[TQ2], S->ck, S->cv, B, hw, T, H, d, 0.0f, ws->att,
                             ws->att_floats));
    if (re) LORA_TRY(nn_layernorm_forward(be, sv[TL2], S->sm[1], S->sr[1], sv[TH1], t->ln2g, t->ln2b, n, C, 1e-5f));
    LORA_TRY(lin_b(p, x, UNET_T_Q2, DL, DQ, sv[TL2], t->q2, n, C, C, 0));
    if (dctx) {
        LORA_TRY(lin_b(p, x, UNET_T_K2, dctx, p->dck, context, t->k2, B * T, X, C, 1));
        LORA_TRY(lin_b(p, x, UNET_T_V2, dctx, p->dcv, context, t->v2, B * T, X, C, 1));
    } else {
        /* parameter gradients only: dx into scratch */
        if (dw_of(p, x, UNET_T_K2) || lora_of(p, x, UNET_T_K2))
            LORA_TRY(lin_b(p, x, UNET_T_K2, NULL, p->dck, context, t->k2, B * T, X, C, 0));
        if (dw_of(p, x, UNET_T_V2) || lora_of(p, x, UNET_T_V2))
            LORA_TRY(lin_b(p, x, UNET_T_V2, NULL, p->dcv, context, t->v2, B * T, X, C, 0));
    }
    LORA_TRY(nn_layernorm_backward(be, D, NULL, NULL, DL, sv[TH1], S->sm[1], S->sr[1], t->ln2g, n, C, 1));
    /* self-attention */
    LORA_TRY(lin_b(p, x, UNET_T_O1, DA, D, sv[TA1], t->o1w, n, C, C, 0));
    LORA_TRY(nn_mha_backward(be, DQ, DK, DV, DA, sv[TQ], sv[TK], sv[TV], B, hw, hw, H, d, 0.0f, ws->att,
                             ws->att_floats));
    if (re) LORA_TRY(nn_layernorm_forward(be, sv[TL1], S->sm[0], S->sr[0], sv[TH0], t->ln1g, t->ln1b, n, C, 1e-5f));
    LORA_TRY(lin_b(p, x, UNET_T_Q1, DL, DQ, sv[TL1], t->q1, n, C, C, 0));
    LORA_TRY(lin_b(p, x, UNET_T_K1, DL, DK, sv[TL1], t->k1, n, C, C, 1));
    LORA_TRY(lin_b(p, x, UNET_T_V1, DL, DV, sv[TL1], t->v1, n, C, C, 1));
    LORA_TRY(nn_layernorm_backward(be, D, NULL, NULL, DL, sv[TH0], S->sm[0], S->sr[0], t->ln1g, n, C, 1));
    /* proj_in, GroupNorm, residual */
    LORA_TRY(proj_in_b(p, x, DA, D, sv[TG], hw));
    LORA_TRY(be->iface->copy(be, dx, dy, (size_t)(B * C * hw) * 4));
    return nn_groupnorm_backward(be, dx, DA, in, S->gm, S->gr, x->gng, x->gnb, B, C, hw, c->groups, 0, 1);
}

/* ---- resnet backward (recompute from the saved input) ------------------------------------------- */

/* conv input gradient with a stored (maybe 16-bit) weight, im2col in bands of the plan's cols */
static lora_status conv_b(struct img_ctx *c, const struct nn_conv2d_shape *s, float *dx, const float *dy,
                          struct img_mat wm, int accumulate) {
    const float *w = NULL;
    LORA_TRY(img_f32(c, wm, &w));
    return nn_conv2d_backward_ex(c->be, s, dx, c->ws->cols, c->ws->cols_floats, dy, w, accumulate);
}

/* dx [B, cin, hw] written from dy [B, cout, hw]; uses ws->buf[1..3]. dx must not alias dy, x. */
static lora_status res_backward(struct unet_plan *p, struct img_ctx *c, const struct img_resnet *r, float *dx,
                                const float *dy, const float *x, const float *temb, int64_t h, int64_t w) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    int64_t B = p->batch, hw = h * w;
    float *t0 = ws->buf[1], *t1 = ws->buf[2], *t2 = ws->buf[3];
    LORA_TRY(nn_groupnorm_forward(be, t0, p->rm[0], p->rr[0], x, r->n1g, r->n1b, B, r->cin, hw, c->groups, c->eps, 1));
    LORA_TRY(img_convm(c, t1, t0, r->c1w, r->c1b, B, r->cin, h, w, r->cout, 3, 1, 1));
    if (r->temb && temb) {
        const float *tw = NULL;
        LORA_TRY(img_f32(c, r->tw, &tw));
        LORA_TRY(nn_linear_forward(be, ws->vec[3], temb, tw, r->tb, B, r->temb, r->cout));
        LORA_TRY(nn_add_channel(be, t1, ws->vec[3], B, r->cout, hw, 1));
    }
    LORA_TRY(nn_groupnorm_forward(be, t0, p->rm[1], p->rr[1], t1, r->n2g, r->n2b, B, r->cout, hw, c->groups,
                                  c->eps, 1));
    struct nn_conv2d_shape s2 = {B, r->cout, h, w, r->cout, 3, 1, 1, 1, 1, 1};
    LORA_TRY(conv_b(c, &s2, t0, dy, r->c2w, 0));
    LORA_TRY(nn_groupnorm_backward(be, t2, t0, t1, p->rm[1], p->rr[1], r->n2g, r->n2b, B, r->cout, hw, c->groups,
                                   1, 0));
    struct nn_conv2d_shape s1 = {B, r->cin, h, w, r->cout, 3, 1, 1, 1, 1, 1};
    LORA_TRY(conv_b(c, &s1, t0, t2, r->c1w, 0));
    LORA_TRY(nn_groupnorm_backward(be, dx, t0, x, p->rm[0], p->rr[0], r->n1g, r->n1b, B, r->cin, hw, c->groups,
                                   1, 0));
    if (r->scw.p) {
        struct nn_conv2d_shape ss = {B, r->cin, h, w, r->cout, 1, 1, 0, 0, 0, 0};
        return conv_b(c, &ss, dx, dy, r->scw, 1);
    }
    return be->iface->axpby_f32(be, B * r->cout * hw, 1.0f, dy, 1.0f, dx);
}

/* ---- forward ------------------------------------------------------------------------------------ */

static lora_status save(struct unet_plan *p, int64_t *slot, const float *x, int64_t n) {
    if (!p->train) return LORA_OK;
    if (*slot >= p->nslot) return lora_fail(p->m->be->ctx, LORA_E_INTERNAL, "unet: slot overflow");
    return p->m->be->iface->copy(p->m->be, p->slot[(*slot)++], x, (size_t)n * 4);
}

lora_status unet_forward(struct unet_plan *p, const float *sample, const float *timesteps,
                         const float *context, float *out) {
    if (!p || !p->m || !sample || !timesteps || !context || !out) return LORA_E_INVALID_ARG;
    const struct unet_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    struct img_ws *ws = &p->ws;
    struct img_ctx c = {be, ws, m->groups, 1e-5f};
    int64_t B = p->batch, h = p->h, w = p->w, L = m->levels, c0 = m->ch[0], sl = 0;
    int64_t lh[SD_MAX_LEVELS], lw[SD_MAX_LEVELS];
    level_sizes(m, h, w, lh, lw);
    float *x0 = ws->buf[0], *x1 = ws->buf[1];
    p->ctx = context;
    /* time embedding: sin/cos -> linear_1 -> SiLU -> linear_2; resnets take SiLU(temb) */
    memcpy(p->tvec_host, timesteps, (size_t)B * sizeof(float));
    LORA_TRY(be->iface->upload(be, p->tvec, p->tvec_host, (size_t)B * sizeof(float)));
    LORA_TRY(nn_timestep_embedding(be, ws->vec[0], p->tvec, B, c0, 1, 0.0f));
    const float *tw = NULL;
    LORA_TRY(img_f32(&c, m->t1w, &tw));
    LORA_TRY(nn_linear_forward(be, ws->vec[1], ws->vec[0], tw, m->t1b, B, c0, m->temb));
    LORA_TRY(be->iface->silu_f32(be, B * m->temb, ws->vec[1], ws->vec[1]));
    LORA_TRY(img_f32(&c, m->t2w, &tw));
    LORA_TRY(nn_linear_forward(be, ws->vec[2], ws->vec[1], tw, m->t2b, B, m->temb, m->temb));
    LORA_TRY(be->iface->silu_f32(be, B * m->temb, ws->vec[2], ws->vec[0]));
    const float *temb = ws->vec[0];

    int64_t ns = 0, chs[UNET_MAX_SKIPS], cur = c0;
    skip_channels(m, chs);
    LORA_TRY(img_convm(&c, x0, sample, m->cin_w, m->cin_b, B, m->in_ch, h, w, c0, 3, 1, 1));
    LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * c0 * h * w) * 4));
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t C = m->ch[i], hw = h * w;
        for (int64_t j = 0; j < m->layers; j++) {
            LORA_TRY(save(p, &sl, x0, B * cur * hw));
            LORA_TRY(img_resnet_forward(&c, &m->dres[i][j], x1, x0, temb, B, h, w, 2));
            cur = C;
            if (m->attn[i]) {
                LORA_TRY(save(p, &sl, x1, B * C * hw));
                LORA_TRY(xf_forward(p, &c, &m->dxf[i][j], x0, x1, context, hw));
            } else LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * hw) * 4));
            LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * C * hw) * 4));
        }
        if (i < L - 1) {
            LORA_TRY(img_convm(&c, x1, x0, m->dconv_w[i], m->dconv_b[i], B, C, h, w, C, 3, 2, 1));
            h = lh[i + 1]; w = lw[i + 1];
            LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * h * w) * 4));
            LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * C * h * w) * 4));
        }
    }
    int64_t top = m->ch[L - 1];
    LORA_TRY(save(p, &sl, x0, B * top * h * w));
    LORA_TRY(img_resnet_forward(&c, &m->mr0, x1, x0, temb, B, h, w, 2));
    LORA_TRY(save(p, &sl, x1, B * top * h * w));
    LORA_TRY(xf_forward(p, &c, &m->mxf, x0, x1, context, h * w));
    LORA_TRY(save(p, &sl, x0, B * top * h * w));
    LORA_TRY(img_resnet_forward(&c, &m->mr1, x1, x0, temb, B, h, w, 2));
    LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * top * h * w) * 4));
    cur = top;
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t lv = L - 1 - i, C = m->ch[lv], hw = h * w;
        for (int64_t j = 0; j <= m->layers; j++) {
            int64_t sk = chs[--ns];
            LORA_TRY(save(p, &sl, x0, B * cur * hw));
            LORA_TRY(nn_concat_channels(be, x1, x0, p->skip[ns], B, cur, sk, hw));
            LORA_TRY(img_resnet_forward(&c, &m->ures[i][j], x0, x1, temb, B, h, w, 2));
            if (m->attn[lv]) {
                LORA_TRY(save(p, &sl, x0, B * C * hw));
                LORA_TRY(xf_forward(p, &c, &m->uxf[i][j], x1, x0, context, hw));
                LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * hw) * 4));
            }
            cur = C;
        }
        if (i < L - 1) {
            /* diffusers passes the next skip's size when a side is not a multiple of 2^(L-1);
             * otherwise scale_factor 2: both are lh[lv - 1] x lw[lv - 1] */
            LORA_TRY(nn_upsample_nearest_forward(be, x1, x0, B * C, h, w, lh[lv - 1], lw[lv - 1]));
            h = lh[lv - 1]; w = lw[lv - 1];
            LORA_TRY(img_convm(&c, x0, x1, m->uconv_w[i], m->uconv_b[i], B, C, h, w, C, 3, 1, 1));
        }
    }
    LORA_TRY(save(p, &sl, x0, B * c0 * h * w));
    LORA_TRY(nn_groupnorm_forward(be, x1, ws->mean, ws->rstd, x0, m->no_g, m->no_b, B, c0, h * w, m->groups,
                                  1e-5f, 1));
    return img_convm(&c, out, x1, m->cout_w, m->cout_b, B, c0, h, w, m->out_ch, 3, 1, 1);
}

/* ---- backward ----------------------------------------------------------------------------------- */

lora_status unet_backward(struct unet_plan *p, const float *dout, float *d_sample, float *d_context) {
    if (!p || !p->m || !dout) return LORA_E_INVALID_ARG;
    const struct unet_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    if (!p->train || !p->ctx)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "unet backward: needs a train plan and a forward first");
    struct img_ws *ws = &p->ws;
    struct img_ctx c = {be, ws, m->groups, 1e-5f};
    int64_t B = p->batch, L = m->levels, c0 = m->ch[0], sl = p->nslot;
    int64_t lh[SD_MAX_LEVELS], lw[SD_MAX_LEVELS];
    level_sizes(m, p->h, p->w, lh, lw);
    int64_t h, w;
    const float *temb = ws->vec[0], *context = p->ctx;
    float *g = ws->buf[4], *gn = ws->buf[5], *xin = ws->buf[0];
#define SWAP() do { float *t_ = g; g = gn; gn = t_; } while (0)
    if (d_context) LORA_TRY(be->iface->fill_f32(be, B * p->tokens * m->ctx_dim, 0.0f, d_context));
    int64_t H = p->h, W = p->w;
    /* conv_out, norm_out */
    struct nn_conv2d_shape so = {B, c0, H, W, m->out_ch, 3, 1, 1, 1, 1, 1};
    LORA_TRY(conv_b(&c, &so, gn, dout, m->cout_w, 0));
    const float *xs = p->slot[--sl];
    LORA_TRY(nn_groupnorm_forward(be, ws->buf[1], ws->mean, ws->rstd, xs, m->no_g, m->no_b, B, c0, H * W, m->groups,
                                  1e-5f, 1));
    LORA_TRY(nn_groupnorm_backward(be, g, gn, xs, ws->mean, ws->rstd, m->no_g, m->no_b, B, c0, H * W, m->groups, 1,
                                   0));
    /* up blocks, in reverse */
    int64_t chs[UNET_MAX_SKIPS], nsk = skip_channels(m, chs), ns = 0;
    (void)nsk;
    /* the skip index each up resnet consumed: forward pops from the end */
    int64_t pop[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1], prevc[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    {
        int64_t q = nsk, cur = m->ch[L - 1];
        for (int64_t i = 0; i < L; i++)
            for (int64_t j = 0; j <= m->layers; j++) {
                pop[i][j] = --q;
                prevc[i][j] = cur;
                cur = m->ch[L - 1 - i];
            }
    }
    (void)ns;
    h = H; w = W;
    for (int64_t i = L - 1; i >= 0; i--) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t lv = L - 1 - i, C = m->ch[lv];
        if (i < L - 1) {
            struct nn_conv2d_shape su = {B, C, h, w, C, 3, 1, 1, 1, 1, 1};
            LORA_TRY(conv_b(&c, &su, gn, g, m->uconv_w[i], 0));
            h = lh[lv]; w = lw[lv];
            LORA_TRY(nn_upsample_nearest_backward(be, g, gn, B * C, h, w, lh[lv - 1], lw[lv - 1]));
        }
        int64_t hw = h * w;
        for (int64_t j = m->layers; j >= 0; j--) {
            if (m->attn[lv]) {
                const float *xi = p->slot[--sl];
                LORA_TRY(xf_backward(p, &c, &m->uxf[i][j], gn, g, xi, context, d_context, hw));
                SWAP();
            }
            int64_t k = pop[i][j], sk = chs[k], cp = prevc[i][j];
            const float *xp = p->slot[--sl];
            LORA_TRY(nn_concat_channels(be, xin, xp, p->skip[k], B, cp, sk, hw));
            LORA_TRY(res_backward(p, &c, &m->ures[i][j], gn, g, xin, temb, h, w));
            LORA_TRY(nn_concat_channels_backward(be, g, p->dskip[k], gn, B, cp, sk, hw, 0));
        }
    }
    /* mid */
    int64_t top = m->ch[L - 1];
    {
        const float *xr1 = p->slot[--sl], *xx = p->slot[--sl], *xr0 = p->slot[--sl];
        LORA_TRY(res_backward(p, &c, &m->mr1, gn, g, xr1, temb, h, w));
        SWAP();
        LORA_TRY(xf_backward(p, &c, &m->mxf, gn, g, xx, context, d_context, h * w));
        SWAP();
        LORA_TRY(res_backward(p, &c, &m->mr0, gn, g, xr0, temb, h, w));
        SWAP();
    }
    (void)top;
    /* down blocks, in reverse */
    int64_t k = nsk;
    for (int64_t i = L - 1; i >= 0; i--) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t C = m->ch[i];
        if (i < L - 1) {
            k--;
            LORA_TRY(be->iface->axpby_f32(be, B * C * h * w, 1.0f, p->dskip[k], 1.0f, g));
            struct nn_conv2d_shape sd = {B, C, lh[i], lw[i], C, 3, 2, 1, 1, 1, 1};
            LORA_TRY(conv_b(&c, &sd, gn, g, m->dconv_w[i], 0));
            SWAP();
            h = lh[i]; w = lw[i];
        }
        int64_t hw = h * w;
        for (int64_t j = m->layers - 1; j >= 0; j--) {
            k--;
            LORA_TRY(be->iface->axpby_f32(be, B * C * hw, 1.0f, p->dskip[k], 1.0f, g));
            if (m->attn[i]) {
                const float *xi = p->slot[--sl];
                LORA_TRY(xf_backward(p, &c, &m->dxf[i][j], gn, g, xi, context, d_context, hw));
                SWAP();
            }
            const float *xr = p->slot[--sl];
            LORA_TRY(res_backward(p, &c, &m->dres[i][j], gn, g, xr, temb, h, w));
            SWAP();
        }
    }
    k--;
    LORA_TRY(be->iface->axpby_f32(be, B * c0 * h * w, 1.0f, p->dskip[k], 1.0f, g));
    if (k != 0 || sl != 0) return lora_fail(be->ctx, LORA_E_INTERNAL, "unet backward: bookkeeping (%lld, %lld)",
                                            (long long)k, (long long)sl);
    if (!d_sample) return LORA_OK;
    struct nn_conv2d_shape si = {B, m->in_ch, h, w, c0, 3, 1, 1, 1, 1, 1};
    return conv_b(&c, &si, d_sample, g, m->cin_w, 0);
#undef SWAP
}
