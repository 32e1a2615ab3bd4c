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
    x->gng = img_w(w, c, "%s.norm.weight", pre);
    x->gnb = img_w(w, c, "%s.norm.bias", pre);
    x->piw = img_w(w, c * c, "%s.proj_in.weight", pre);
    x->pib = img_w(w, c, "%s.proj_in.bias", pre);
    x->pow_ = img_w(w, c * c, "%s.proj_out.weight", pre);
    x->pob = img_w(w, c, "%s.proj_out.bias", pre);
    struct unet_tblock *t = &x->tb;
    const char *b = "transformer_blocks.0";
    t->ln1g = img_w(w, c, "%s.%s.norm1.weight", pre, b);
    t->ln1b = img_w(w, c, "%s.%s.norm1.bias", pre, b);
    t->q1 = img_w(w, c * c, "%s.%s.attn1.to_q.weight", pre, b);
    t->k1 = img_w(w, c * c, "%s.%s.attn1.to_k.weight", pre, b);
    t->v1 = img_w(w, c * c, "%s.%s.attn1.to_v.weight", pre, b);
    t->o1w = img_w(w, c * c, "%s.%s.attn1.to_out.0.weight", pre, b);
    t->o1b = img_w(w, c, "%s.%s.attn1.to_out.0.bias", pre, b);
    t->ln2g = img_w(w, c, "%s.%s.norm2.weight", pre, b);
    t->ln2b = img_w(w, c, "%s.%s.norm2.bias", pre, b);
    t->q2 = img_w(w, c * c, "%s.%s.attn2.to_q.weight", pre, b);
    t->k2 = img_w(w, c * ctx, "%s.%s.attn2.to_k.weight", pre, b);
    t->v2 = img_w(w, c * ctx, "%s.%s.attn2.to_v.weight", pre, b);
    t->o2w = img_w(w, c * c, "%s.%s.attn2.to_out.0.weight", pre, b);
    t->o2b = img_w(w, c, "%s.%s.attn2.to_out.0.bias", pre, b);
    t->ln3g = img_w(w, c, "%s.%s.norm3.weight", pre, b);
    t->ln3b = img_w(w, c, "%s.%s.norm3.bias", pre, b);
    t->f1w = img_w(w, 8 * c * c, "%s.%s.ff.net.0.proj.weight", pre, b);
    t->f1b = img_w(w, 8 * c, "%s.%s.ff.net.0.proj.bias", pre, b);
    t->f2w = img_w(w, 4 * c * c, "%s.%s.ff.net.2.weight", pre, b);
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

static void unet_build(struct unet_model *m, struct img_weights *w) {
    int64_t L = m->levels, T = m->temb, c0 = m->ch[0], X = m->ctx_dim;
    char pre[160];
    m->t1w = img_w(w, T * c0, "time_embedding.linear_1.weight");
    m->t1b = img_w(w, T, "time_embedding.linear_1.bias");
    m->t2w = img_w(w, T * T, "time_embedding.linear_2.weight");
    m->t2b = img_w(w, T, "time_embedding.linear_2.bias");
    m->cin_w = img_w(w, c0 * m->in_ch * 9, "conv_in.weight");
    m->cin_b = img_w(w, c0, "conv_in.bias");
    for (int64_t i = 0; i < L; i++) {
        for (int64_t j = 0; j < m->layers; j++) {
            snprintf(pre, sizeof pre, "down_blocks.%lld.resnets.%lld", (long long)i, (long long)j);
            img_resnet_load(w, &m->dres[i][j], j == 0 ? (i ? m->ch[i - 1] : c0) : m->ch[i], m->ch[i], T, pre);
            if (m->attn[i]) {
                snprintf(pre, sizeof pre, "down_blocks.%lld.attentions.%lld", (long long)i, (long long)j);
                xf_load(w, &m->dxf[i][j], m->ch[i], m->heads[i], X, pre);
            }
        }
        if (i < L - 1) {
            m->dconv_w[i] = img_w(w, m->ch[i] * m->ch[i] * 9, "down_blocks.%lld.downsamplers.0.conv.weight", (long long)i);
            m->dconv_b[i] = img_w(w, m->ch[i], "down_blocks.%lld.downsamplers.0.conv.bias", (long long)i);
        }
    }
    int64_t top = m->ch[L - 1];
    img_resnet_load(w, &m->mr0, top, top, T, "mid_block.resnets.0");
    xf_load(w, &m->mxf, top, m->heads[L - 1], X, "mid_block.attentions.0");
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
            }
        }
        if (i < L - 1) {
            m->uconv_w[i] = img_w(w, out * out * 9, "up_blocks.%lld.upsamplers.0.conv.weight", (long long)i);
            m->uconv_b[i] = img_w(w, out, "up_blocks.%lld.upsamplers.0.conv.bias", (long long)i);
        }
        prev = out;
    }
    m->no_g = img_w(w, c0, "conv_norm_out.weight");
    m->no_b = img_w(w, c0, "conv_norm_out.bias");
    m->cout_w = img_w(w, m->out_ch * c0 * 9, "conv_out.weight");
    m->cout_b = img_w(w, m->out_ch, "conv_out.bias");
}

void unet_free(struct unet_model *m) {
    if (!m) return;
    if (m->weights && m->be) m->be->iface->buf_free(m->be, m->weights);
    memset(m, 0, sizeof *m);
}

lora_status unet_init(struct unet_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *unet, const struct sd_config *cfg) {
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
    struct img_weights w = {be, unet, "unet", 0, NULL, 0, NULL, 0, LORA_OK};
    unet_build(m, &w);
    if (w.err != LORA_OK) { lora_status s = w.err; unet_free(m); return s; }
    void *buf = NULL;
    LORA_TRY(be->iface->buf_alloc(be, (size_t)w.off, &buf));
    m->weights = buf;
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

/* pass with base NULL: returns the byte count */
static uint64_t plan_layout(struct unet_plan *p, const struct unet_model *m, int64_t B, int64_t h, int64_t w,
                            int64_t T, char *base) {
    int64_t maxc = m->in_ch > m->out_ch ? m->in_ch : m->out_ch, maxh = 1;
    for (int64_t i = 0; i < m->levels; i++) {
        if (m->ch[i] > maxc) maxc = m->ch[i];
        if (m->heads[i] > maxh) maxh = m->heads[i];
    }
    int64_t hw = h * w, tk = hw > T ? hw : T;
    struct img_ws *ws = &p->ws;
    ws->act_floats = B * hw * 2 * maxc;
    ws->cols_floats = 2 * maxc * 9 * hw;
    int64_t block = hw < 256 ? hw : 256;
    ws->att_floats = nn_mha_scratch_floats(maxh, tk, block, 0);
    struct cursor cv = {base, 0}, *cur = &cv;
    for (int k = 0; k < IMG_NBUF; k++) ws->buf[k] = take(cur, ws->act_floats);
    ws->cols = take(cur, ws->cols_floats);
    ws->mean = take(cur, B * m->groups);
    ws->rstd = take(cur, B * m->groups);
    ws->att = take(cur, ws->att_floats);
    for (int k = 0; k < 4; k++) ws->vec[k] = take(cur, B * (m->temb > maxc ? m->temb : maxc));
    p->ff1 = take(cur, B * hw * 8 * maxc);
    p->ff2 = take(cur, B * hw * 4 * maxc);
    p->ck = take(cur, B * T * maxc);
    p->cv = take(cur, B * T * maxc);
    p->lnm = take(cur, B * hw);
    p->lnr = take(cur, B * hw);
    p->tvec = take(cur, B);
    int64_t chs[UNET_MAX_SKIPS], ns = skip_channels(m, chs), k = 0, lh = h, lw = w;
    p->skip[k] = take(cur, B * chs[k] * lh * lw);
    k++;
    for (int64_t i = 0; i < m->levels; i++) {
        for (int64_t j = 0; j < m->layers; j++, k++) p->skip[k] = take(cur, B * chs[k] * lh * lw);
        if (i < m->levels - 1) {
            lh /= 2; lw /= 2;
            p->skip[k] = take(cur, B * chs[k] * lh * lw);
            k++;
        }
    }
    (void)ns;
    return cv.off;
}

lora_status unet_plan_init(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                           int64_t h, int64_t w, int64_t tokens) {
    memset(p, 0, sizeof *p);
    if (!m || !m->be) return LORA_E_INVALID_ARG;
    int64_t f = (int64_t)1 << (m->levels - 1);
    if (batch < 1 || tokens < 1 || h < f || w < f || h % f || w % f || batch > (1 << 16) || h > (1 << 14) ||
        w > (1 << 14) || tokens > (1 << 16))
        return lora_fail(m->be->ctx, LORA_E_INVALID_ARG,
                         "unet plan: batch %lld, latent %lldx%lld (a multiple of %lld), %lld tokens is invalid",
                         (long long)batch, (long long)h, (long long)w, (long long)f, (long long)tokens);
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
    p->m = m;
    p->batch = batch; p->h = h; p->w = w; p->tokens = tokens;
    return LORA_OK;
}

/* ---- forward ------------------------------------------------------------------------------------ */

/* Transformer2DModel: y = x + proj_out(block(proj_in(GN(x)))), x NCHW [B, c, hw]. */
static lora_status xf_forward(struct unet_plan *p, struct img_ctx *c, const struct unet_xf *x, float *y,
                              const float *in, const float *context, int64_t hw) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    const struct unet_tblock *t = &x->tb;
    int64_t B = p->batch, C = x->c, H = x->heads, d = C / H, n = B * hw, T = p->tokens, X = p->m->ctx_dim;
    float *g = ws->buf[2], *h = ws->buf[3], *ln = ws->buf[4], *q = ws->buf[5], *k = ws->buf[6], *v = ws->buf[7];
    LORA_TRY(nn_groupnorm_forward(be, g, ws->mean, ws->rstd, in, x->gng, x->gnb, B, C, hw, c->groups, 1e-6f, 0));
    LORA_TRY(nn_proj_to_tokens_forward(be, h, g, x->piw, x->pib, B, hw, C, C));
    /* self-attention */
    LORA_TRY(nn_layernorm_forward(be, ln, p->lnm, p->lnr, h, t->ln1g, t->ln1b, n, C, 1e-5f));
    LORA_TRY(nn_linear_forward(be, q, ln, t->q1, NULL, n, C, C));
    LORA_TRY(nn_linear_forward(be, k, ln, t->k1, NULL, n, C, C));
    LORA_TRY(nn_linear_forward(be, v, ln, t->v1, NULL, n, C, C));
    LORA_TRY(nn_mha_forward(be, ln, q, k, v, B, hw, hw, H, d, 0.0f, ws->att, ws->att_floats));
    LORA_TRY(nn_linear_forward(be, q, ln, t->o1w, t->o1b, n, C, C));
    LORA_TRY(nn_residual_add(be, h, q, n * C));
    /* cross-attention */
    LORA_TRY(nn_layernorm_forward(be, ln, p->lnm, p->lnr, h, t->ln2g, t->ln2b, n, C, 1e-5f));
    LORA_TRY(nn_linear_forward(be, q, ln, t->q2, NULL, n, C, C));
    LORA_TRY(nn_linear_forward(be, p->ck, context, t->k2, NULL, B * T, X, C));
    LORA_TRY(nn_linear_forward(be, p->cv, context, t->v2, NULL, B * T, X, C));
    LORA_TRY(nn_mha_forward(be, ln, q, p->ck, p->cv, B, hw, T, H, d, 0.0f, ws->att, ws->att_floats));
    LORA_TRY(nn_linear_forward(be, q, ln, t->o2w, t->o2b, n, C, C));
    LORA_TRY(nn_residual_add(be, h, q, n * C));
    /* GEGLU feed-forward */
    LORA_TRY(nn_layernorm_forward(be, ln, p->lnm, p->lnr, h, t->ln3g, t->ln3b, n, C, 1e-5f));
    LORA_TRY(nn_linear_forward(be, p->ff1, ln, t->f1w, t->f1b, n, C, 8 * C));
    LORA_TRY(nn_geglu_forward(be, p->ff2, p->ff1, n, 4 * C));
    LORA_TRY(nn_linear_forward(be, q, p->ff2, t->f2w, t->f2b, n, 4 * C, C));
    LORA_TRY(nn_residual_add(be, h, q, n * C));
    LORA_TRY(nn_proj_from_tokens_forward(be, y, h, x->pow_, x->pob, B, hw, C, C));
    return be->iface->axpby_f32(be, B * C * hw, 1.0f, in, 1.0f, y);
}

lora_status unet_forward(struct unet_plan *p, const float *sample, const float *timesteps,
                         const float *context, float *out) {
    if (!p || !p->m || !sample || !timesteps || !context || !out) return LORA_E_INVALID_ARG;
    const struct unet_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    struct img_ws *ws = &p->ws;
    struct img_ctx c = {be, ws, m->groups, 1e-5f};
    int64_t B = p->batch, h = p->h, w = p->w, L = m->levels, c0 = m->ch[0];
    float *x0 = ws->buf[0], *x1 = ws->buf[1];
    /* time embedding: sin/cos -> linear_1 -> SiLU -> linear_2; resnets take SiLU(temb) */
    memcpy(p->tvec_host, timesteps, (size_t)B * sizeof(float));
    LORA_TRY(be->iface->upload(be, p->tvec, p->tvec_host, (size_t)B * sizeof(float)));
    LORA_TRY(nn_timestep_embedding(be, ws->vec[0], p->tvec, B, c0, 1, 0.0f));
    LORA_TRY(nn_linear_forward(be, ws->vec[1], ws->vec[0], m->t1w, m->t1b, B, c0, m->temb));
    LORA_TRY(be->iface->silu_f32(be, B * m->temb, ws->vec[1], ws->vec[1]));
    LORA_TRY(nn_linear_forward(be, ws->vec[2], ws->vec[1], m->t2w, m->t2b, B, m->temb, m->temb));
    LORA_TRY(be->iface->silu_f32(be, B * m->temb, ws->vec[2], ws->vec[0]));
    const float *temb = ws->vec[0];

    int64_t ns = 0, chs[UNET_MAX_SKIPS];
    skip_channels(m, chs);
    LORA_TRY(img_conv(&c, x0, sample, m->cin_w, m->cin_b, B, m->in_ch, h, w, c0, 3, 1, 1));
    LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * c0 * h * w) * 4));
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t C = m->ch[i], hw = h * w;
        for (int64_t j = 0; j < m->layers; j++) {
            LORA_TRY(img_resnet_forward(&c, &m->dres[i][j], x1, x0, temb, B, h, w, 2));
            if (m->attn[i]) LORA_TRY(xf_forward(p, &c, &m->dxf[i][j], x0, x1, context, hw));
            else LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * hw) * 4));
            LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * C * hw) * 4));
        }
        if (i < L - 1) {
            LORA_TRY(img_conv(&c, x1, x0, m->dconv_w[i], m->dconv_b[i], B, C, h, w, C, 3, 2, 1));
            h /= 2; w /= 2;
            LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * h * w) * 4));
            LORA_TRY(be->iface->copy(be, p->skip[ns++], x0, (size_t)(B * C * h * w) * 4));
        }
    }
    int64_t top = m->ch[L - 1];
    LORA_TRY(img_resnet_forward(&c, &m->mr0, x1, x0, temb, B, h, w, 2));
    LORA_TRY(xf_forward(p, &c, &m->mxf, x0, x1, context, h * w));
    LORA_TRY(img_resnet_forward(&c, &m->mr1, x1, x0, temb, B, h, w, 2));
    LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * top * h * w) * 4));
    int64_t cur = top;
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t lv = L - 1 - i, C = m->ch[lv], hw = h * w;
        for (int64_t j = 0; j <= m->layers; j++) {
            int64_t sk = chs[--ns];
            LORA_TRY(nn_concat_channels(be, x1, x0, p->skip[ns], B, cur, sk, hw));
            LORA_TRY(img_resnet_forward(&c, &m->ures[i][j], x0, x1, temb, B, h, w, 2));
            if (m->attn[lv]) {
                LORA_TRY(xf_forward(p, &c, &m->uxf[i][j], x1, x0, context, hw));
                LORA_TRY(be->iface->copy(be, x0, x1, (size_t)(B * C * hw) * 4));
            }
            cur = C;
        }
        if (i < L - 1) {
            LORA_TRY(nn_upsample2x_forward(be, x1, x0, B * C, h, w));
            h *= 2; w *= 2;
            LORA_TRY(img_conv(&c, x0, x1, m->uconv_w[i], m->uconv_b[i], B, C, h, w, C, 3, 1, 1));
        }
    }
    LORA_TRY(nn_groupnorm_forward(be, x1, ws->mean, ws->rstd, x0, m->no_g, m->no_b, B, c0, h * w, m->groups,
                                  1e-5f, 1));
    return img_conv(&c, out, x1, m->cout_w, m->cout_b, B, c0, h, w, m->out_ch, 3, 1, 1);
}
