/* AutoencoderKL forward (diffusers 0.10.2 Encoder / Decoder / DiagonalGaussian mean and
 * logvar), and the shared image-model pieces of vae.h. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "backend/backend.h"
#include "model/vae.h"

/* ---- weights by name ----------------------------------------------------------------------- */

const float *img_w(struct img_weights *w, int64_t numel, const char *fmt, ...) {
    if (w->err != LORA_OK) return NULL;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    struct lora_backend_impl *be = w->be;
    int64_t i = tmap_find(w->tm, name);
    if (i < 0) {
        w->err = lora_fail(be->ctx, LORA_E_NOT_FOUND, "%s: tensor %s is missing", w->what, name);
        return NULL;
    }
    const struct lora_tensor *t = &w->tm->t[i];
    int64_t n = 1;
    for (int32_t d = 0; d < t->ndim; d++) n *= t->shape[d];
    if (n != numel) {
        w->err = lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: tensor %s has %lld elements, want %lld", w->what,
                           name, (long long)n, (long long)numel);
        return NULL;
    }
    if (t->dtype != LORA_DTYPE_F32 && t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16) {
        w->err = lora_fail(be->ctx, LORA_E_UNSUPPORTED, "%s: tensor %s has dtype %d, not F32/F16/BF16", w->what,
                           name, (int)t->dtype);
        return NULL;
    }
    uint64_t bytes = ((uint64_t)numel * 4 + 63) & ~(uint64_t)63;
    float *dst = w->pass ? (float *)(w->base + w->off) : NULL;
    w->off += bytes;
    if (!w->pass) return NULL;
    if (t->dtype == LORA_DTYPE_F32) {
        w->err = be->iface->upload(be, dst, t->data, (size_t)numel * 4);
    } else {
        size_t sb = (size_t)numel * 2;
        if (sb > w->stage_cap) {
            if (w->stage) be->iface->buf_free(be, w->stage);
            w->stage = NULL;
            w->stage_cap = 0;
            w->err = be->iface->buf_alloc(be, sb, &w->stage);
            if (w->err != LORA_OK) return NULL;
            w->stage_cap = sb;
        }
        w->err = be->iface->upload(be, w->stage, t->data, sb);
        if (w->err == LORA_OK) w->err = be->iface->convert(be, numel, t->dtype, w->stage, LORA_DTYPE_F32, dst);
    }
    return w->err == LORA_OK ? dst : NULL;
}

void img_resnet_load(struct img_weights *w, struct img_resnet *r, int64_t cin, int64_t cout,
                     int64_t temb, const char *prefix) {
    memset(r, 0, sizeof *r);
    r->cin = cin; r->cout = cout; r->temb = temb;
    r->n1g = img_w(w, cin, "%s.norm1.weight", prefix);
    r->n1b = img_w(w, cin, "%s.norm1.bias", prefix);
    r->c1w = img_w(w, cout * cin * 9, "%s.conv1.weight", prefix);
    r->c1b = img_w(w, cout, "%s.conv1.bias", prefix);
    if (temb) {
        r->tw = img_w(w, cout * temb, "%s.time_emb_proj.weight", prefix);
        r->tb = img_w(w, cout, "%s.time_emb_proj.bias", prefix);
    }
    r->n2g = img_w(w, cout, "%s.norm2.weight", prefix);
    r->n2b = img_w(w, cout, "%s.norm2.bias", prefix);
    r->c2w = img_w(w, cout * cout * 9, "%s.conv2.weight", prefix);
    r->c2b = img_w(w, cout, "%s.conv2.bias", prefix);
    if (cin != cout) {
        r->scw = img_w(w, cout * cin, "%s.conv_shortcut.weight", prefix);
        r->scb = img_w(w, cout, "%s.conv_shortcut.bias", prefix);
    }
}

/* ---- shared forward pieces -------------------------------------------------------------------- */

lora_status img_conv(struct img_ctx *c, float *y, const float *x, const float *wt, const float *b,
                     int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout, int64_t k,
                     int64_t stride, int64_t pad) {
    struct nn_conv2d_shape s = {batch, cin, h, w, cout, k, stride, pad, pad, pad, pad};
    if (nn_conv2d_cols_floats(&s) > c->ws->cols_floats)
        return lora_fail(c->be->ctx, LORA_E_LIMIT, "conv: the plan's column buffer is too small");
    return nn_conv2d_forward(c->be, &s, y, c->ws->cols, x, wt, b);
}

lora_status img_resnet_forward(struct img_ctx *c, const struct img_resnet *r, float *y,
                               const float *x, const float *temb_act, int64_t batch, int64_t h,
                               int64_t w, int t0) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    float *t1 = ws->buf[t0], *t2 = ws->buf[t0 + 1];
    int64_t hw = h * w;
    LORA_TRY(nn_groupnorm_forward(be, t1, ws->mean, ws->rstd, x, r->n1g, r->n1b, batch, r->cin, hw,
                                  c->groups, c->eps, 1));
    LORA_TRY(img_conv(c, t2, t1, r->c1w, r->c1b, batch, r->cin, h, w, r->cout, 3, 1, 1));
    if (r->temb && temb_act) {
        LORA_TRY(nn_linear_forward(be, ws->vec[3], temb_act, r->tw, r->tb, batch, r->temb, r->cout));
        LORA_TRY(nn_add_channel(be, t2, ws->vec[3], batch, r->cout, hw, 1));
    }
    LORA_TRY(nn_groupnorm_forward(be, t1, ws->mean, ws->rstd, t2, r->n2g, r->n2b, batch, r->cout, hw,
                                  c->groups, c->eps, 1));
    LORA_TRY(img_conv(c, t2, t1, r->c2w, r->c2b, batch, r->cout, h, w, r->cout, 3, 1, 1));
    if (r->scw) LORA_TRY(img_conv(c, y, x, r->scw, r->scb, batch, r->cin, h, w, r->cout, 1, 1, 0));
    else LORA_TRY(be->iface->copy(be, y, x, (size_t)(batch * r->cout * hw) * sizeof(float)));
    return be->iface->axpby_f32(be, batch * r->cout * hw, 1.0f, t2, 1.0f, y);
}

/* ---- VAE weights ------------------------------------------------------------------------------- */

static void attn_load(struct img_weights *w, struct vae_attn *a, int64_t c, const char *pre) {
    a->gn_g = img_w(w, c, "%s.group_norm.weight", pre);
    a->gn_b = img_w(w, c, "%s.group_norm.bias", pre);
    a->wq = img_w(w, c * c, "%s.query.weight", pre);
    a->bq = img_w(w, c, "%s.query.bias", pre);
    a->wk = img_w(w, c * c, "%s.key.weight", pre);
    a->bk = img_w(w, c, "%s.key.bias", pre);
    a->wv = img_w(w, c * c, "%s.value.weight", pre);
    a->bv = img_w(w, c, "%s.value.bias", pre);
    a->wo = img_w(w, c * c, "%s.proj_attn.weight", pre);
    a->bo = img_w(w, c, "%s.proj_attn.bias", pre);
}

static void mid_load(struct img_weights *w, struct vae_mid *mid, int64_t c, const char *side) {
    char pre[128];
    snprintf(pre, sizeof pre, "%s.mid_block.resnets.0", side);
    img_resnet_load(w, &mid->r0, c, c, 0, pre);
    snprintf(pre, sizeof pre, "%s.mid_block.attentions.0", side);
    attn_load(w, &mid->a, c, pre);
    snprintf(pre, sizeof pre, "%s.mid_block.resnets.1", side);
    img_resnet_load(w, &mid->r1, c, c, 0, pre);
}

static void vae_build(struct vae_model *m, struct img_weights *w) {
    int64_t L = m->levels, lat = m->latent, top = m->ch[L - 1];
    char pre[128];
    m->e_in_w = img_w(w, m->ch[0] * m->in_ch * 9, "encoder.conv_in.weight");
    m->e_in_b = img_w(w, m->ch[0], "encoder.conv_in.bias");
    for (int64_t i = 0; i < L; i++) {
        for (int64_t j = 0; j < m->layers; j++) {
            snprintf(pre, sizeof pre, "encoder.down_blocks.%lld.resnets.%lld", (long long)i, (long long)j);
            img_resnet_load(w, &m->e_res[i][j], j == 0 ? (i ? m->ch[i - 1] : m->ch[0]) : m->ch[i], m->ch[i], 0, pre);
        }
        if (i < L - 1) {
            m->e_down_w[i] = img_w(w, m->ch[i] * m->ch[i] * 9, "encoder.down_blocks.%lld.downsamplers.0.conv.weight", (long long)i);
            m->e_down_b[i] = img_w(w, m->ch[i], "encoder.down_blocks.%lld.downsamplers.0.conv.bias", (long long)i);
        }
    }
    mid_load(w, &m->e_mid, top, "encoder");
    m->e_no_g = img_w(w, top, "encoder.conv_norm_out.weight");
    m->e_no_b = img_w(w, top, "encoder.conv_norm_out.bias");
    m->e_out_w = img_w(w, 2 * lat * top * 9, "encoder.conv_out.weight");
    m->e_out_b = img_w(w, 2 * lat, "encoder.conv_out.bias");
    m->quant_w = img_w(w, 4 * lat * lat, "quant_conv.weight");
    m->quant_b = img_w(w, 2 * lat, "quant_conv.bias");
    m->pq_w = img_w(w, lat * lat, "post_quant_conv.weight");
    m->pq_b = img_w(w, lat, "post_quant_conv.bias");
    m->d_in_w = img_w(w, top * lat * 9, "decoder.conv_in.weight");
    m->d_in_b = img_w(w, top, "decoder.conv_in.bias");
    mid_load(w, &m->d_mid, top, "decoder");
    int64_t prev = top;
    for (int64_t i = 0; i < L; i++) {
        int64_t out = m->ch[L - 1 - i];
        for (int64_t j = 0; j <= m->layers; j++) {
            snprintf(pre, sizeof pre, "decoder.up_blocks.%lld.resnets.%lld", (long long)i, (long long)j);
            img_resnet_load(w, &m->d_res[i][j], j == 0 ? prev : out, out, 0, pre);
        }
        if (i < L - 1) {
            m->d_up_w[i] = img_w(w, out * out * 9, "decoder.up_blocks.%lld.upsamplers.0.conv.weight", (long long)i);
            m->d_up_b[i] = img_w(w, out, "decoder.up_blocks.%lld.upsamplers.0.conv.bias", (long long)i);
        }
        prev = out;
    }
    m->d_no_g = img_w(w, m->ch[0], "decoder.conv_norm_out.weight");
    m->d_no_b = img_w(w, m->ch[0], "decoder.conv_norm_out.bias");
    m->d_out_w = img_w(w, m->in_ch * m->ch[0] * 9, "decoder.conv_out.weight");
    m->d_out_b = img_w(w, m->in_ch, "decoder.conv_out.bias");
}

void vae_free(struct vae_model *m) {
    if (!m) return;
    if (m->weights && m->be) m->be->iface->buf_free(m->be, m->weights);
    memset(m, 0, sizeof *m);
}

lora_status vae_init(struct vae_model *m, struct lora_backend_impl *be,
                     const struct tensor_map *vae, const struct sd_config *cfg) {
    memset(m, 0, sizeof *m);
    if (!be || !vae || !cfg) return LORA_E_INVALID_ARG;
    if (cfg->vae_n_levels < 1 || cfg->vae_n_levels > SD_MAX_LEVELS || cfg->vae_layers_per_block < 1 ||
        cfg->vae_layers_per_block > IMG_MAX_LAYERS || cfg->vae_latent_channels < 1 || cfg->vae_norm_groups < 1)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "vae: unsupported config (%d levels, %d layers per block)",
                         (int)cfg->vae_n_levels, (int)cfg->vae_layers_per_block);
    m->be = be;
    m->levels = cfg->vae_n_levels;
    m->layers = cfg->vae_layers_per_block;
    m->groups = cfg->vae_norm_groups;
    m->latent = cfg->vae_latent_channels;
    m->in_ch = 3;
    for (int64_t i = 0; i < m->levels; i++) {
        m->ch[i] = cfg->vae_block_channels[i];
        if (m->ch[i] < 1 || m->ch[i] % m->groups)
            return lora_fail(be->ctx, LORA_E_INVALID_ARG, "vae: %lld channels at level %lld do not split in %lld groups",
                             (long long)m->ch[i], (long long)i, (long long)m->groups);
    }
    struct img_weights w = {be, vae, "vae", 0, NULL, 0, NULL, 0, LORA_OK};
    vae_build(m, &w);
    if (w.err != LORA_OK) { lora_status s = w.err; vae_free(m); return s; }
    void *buf = NULL;
    LORA_TRY(be->iface->buf_alloc(be, (size_t)w.off, &buf));
    m->weights = buf;
    w.pass = 1; w.base = buf; w.off = 0;
    vae_build(m, &w);
    if (w.stage) be->iface->buf_free(be, w.stage);
    if (w.err != LORA_OK) { lora_status s = w.err; vae_free(m); return s; }
    return LORA_OK;
}

/* ---- plan ---------------------------------------------------------------------------------------- */

void vae_plan_free(struct vae_plan *p) {
    if (!p) return;
    if (p->mem && p->m && p->m->be) p->m->be->iface->buf_free(p->m->be, p->mem);
    memset(p, 0, sizeof *p);
}

lora_status vae_plan_init(struct vae_plan *p, const struct vae_model *m, int64_t batch, int64_t h,
                          int64_t w) {
    memset(p, 0, sizeof *p);
    if (!m || !m->be) return LORA_E_INVALID_ARG;
    int64_t f = (int64_t)1 << (m->levels - 1);
    if (batch < 1 || h < f || w < f || h % f || w % f || batch > (1 << 16) || h > (1 << 16) || w > (1 << 16))
        return lora_fail(m->be->ctx, LORA_E_INVALID_ARG, "vae plan: batch %lld, %lldx%lld (a multiple of %lld) is invalid",
                         (long long)batch, (long long)h, (long long)w, (long long)f);
    int64_t maxc = m->in_ch > 2 * m->latent ? m->in_ch : 2 * m->latent;
    for (int64_t i = 0; i < m->levels; i++) if (m->ch[i] > maxc) maxc = m->ch[i];
    int64_t hw = h * w, thw = (h / f) * (w / f);
    struct img_ws *ws = &p->ws;
    ws->act_floats = batch * maxc * hw;
    ws->cols_floats = maxc * 9 * hw;
    int64_t block = thw < 256 ? thw : 256;
    ws->att_floats = nn_mha_scratch_floats(1, thw, block, 0);
    uint64_t total = 0;
    int64_t sizes[IMG_NBUF + 4];
    for (int k = 0; k < IMG_NBUF; k++) sizes[k] = ws->act_floats;
    sizes[IMG_NBUF] = ws->cols_floats;
    sizes[IMG_NBUF + 1] = batch * m->groups;
    sizes[IMG_NBUF + 2] = batch * m->groups;
    sizes[IMG_NBUF + 3] = ws->att_floats;
    for (int k = 0; k < IMG_NBUF + 4; k++) total += ((uint64_t)sizes[k] * 4 + 63) & ~(uint64_t)63;
    void *mem = NULL;
    LORA_TRY(m->be->iface->buf_alloc(m->be, (size_t)total, &mem));
    char *c = mem;
    float **dst[IMG_NBUF + 4];
    for (int k = 0; k < IMG_NBUF; k++) dst[k] = &ws->buf[k];
    dst[IMG_NBUF] = &ws->cols; dst[IMG_NBUF + 1] = &ws->mean; dst[IMG_NBUF + 2] = &ws->rstd;
    dst[IMG_NBUF + 3] = &ws->att;
    for (int k = 0; k < IMG_NBUF + 4; k++) {
        *dst[k] = (float *)c;
        c += ((uint64_t)sizes[k] * 4 + 63) & ~(uint64_t)63;
    }
    p->mem = mem;
    p->m = m;
    p->batch = batch; p->h = h; p->w = w;
    return LORA_OK;
}

/* ---- forward ------------------------------------------------------------------------------------- */

/* AttentionBlock (one head): y = x + proj_attn(attn(GN(x))); uses buf[4..7]. */
static lora_status vae_attn_forward(struct img_ctx *c, const struct vae_attn *a, float *y, const float *x,
                                    int64_t batch, int64_t ch, int64_t hw) {
    struct lora_backend_impl *be = c->be;
    struct img_ws *ws = c->ws;
    float *t = ws->buf[4], *q = ws->buf[5], *k = ws->buf[6], *v = ws->buf[7];
    LORA_TRY(nn_groupnorm_forward(be, t, ws->mean, ws->rstd, x, a->gn_g, a->gn_b, batch, ch, hw, c->groups, c->eps, 0));
    LORA_TRY(nn_proj_to_tokens_forward(be, q, t, a->wq, a->bq, batch, hw, ch, ch));
    LORA_TRY(nn_proj_to_tokens_forward(be, k, t, a->wk, a->bk, batch, hw, ch, ch));
    LORA_TRY(nn_proj_to_tokens_forward(be, v, t, a->wv, a->bv, batch, hw, ch, ch));
    LORA_TRY(nn_mha_forward(be, t, q, k, v, batch, hw, hw, 1, ch, 0.0f, ws->att, ws->att_floats));
    LORA_TRY(nn_proj_from_tokens_forward(be, y, t, a->wo, a->bo, batch, hw, ch, ch));
    return be->iface->axpby_f32(be, batch * ch * hw, 1.0f, x, 1.0f, y);
}

/* mid block on buf[0] -> buf[0] (buf[1] in between) */
static lora_status mid_forward(struct img_ctx *c, const struct vae_mid *mid, int64_t batch, int64_t ch,
                               int64_t h, int64_t w) {
    struct img_ws *ws = c->ws;
    LORA_TRY(img_resnet_forward(c, &mid->r0, ws->buf[1], ws->buf[0], NULL, batch, h, w, 2));
    LORA_TRY(vae_attn_forward(c, &mid->a, ws->buf[0], ws->buf[1], batch, ch, h * w));
    LORA_TRY(img_resnet_forward(c, &mid->r1, ws->buf[1], ws->buf[0], NULL, batch, h, w, 2));
    return c->be->iface->copy(c->be, ws->buf[0], ws->buf[1], (size_t)(batch * ch * h * w) * sizeof(float));
}

lora_status vae_encode(struct vae_plan *p, const float *image, float *mean, float *logvar) {
    if (!p || !p->m || !image || !mean || !logvar) return LORA_E_INVALID_ARG;
    const struct vae_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    struct img_ws *ws = &p->ws;
    struct img_ctx c = {be, ws, m->groups, 1e-6f};
    if (!be->iface->clamp_f32)
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "vae: the %s backend lacks clamp_f32", be->iface->name);
    int64_t B = p->batch, h = p->h, w = p->w, L = m->levels, lat = m->latent;
    LORA_TRY(img_conv(&c, ws->buf[0], image, m->e_in_w, m->e_in_b, B, m->in_ch, h, w, m->ch[0], 3, 1, 1));
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        for (int64_t j = 0; j < m->layers; j++) {
            const struct img_resnet *r = &m->e_res[i][j];
            LORA_TRY(img_resnet_forward(&c, r, ws->buf[1], ws->buf[0], NULL, B, h, w, 2));
            LORA_TRY(be->iface->copy(be, ws->buf[0], ws->buf[1], (size_t)(B * r->cout * h * w) * sizeof(float)));
        }
        if (i < L - 1) {   /* Downsample2D, padding 0: F.pad (0, 1, 0, 1), then stride 2 */
            struct nn_conv2d_shape s = {B, m->ch[i], h, w, m->ch[i], 3, 2, 0, 0, 1, 1};
            LORA_TRY(nn_conv2d_forward(be, &s, ws->buf[1], ws->cols, ws->buf[0], m->e_down_w[i], m->e_down_b[i]));
            h = nn_conv2d_oh(&s);
            w = nn_conv2d_ow(&s);
            LORA_TRY(be->iface->copy(be, ws->buf[0], ws->buf[1], (size_t)(B * m->ch[i] * h * w) * sizeof(float)));
        }
    }
    int64_t top = m->ch[L - 1], hw = h * w;
    LORA_TRY(mid_forward(&c, &m->e_mid, B, top, h, w));
    LORA_TRY(nn_groupnorm_forward(be, ws->buf[1], ws->mean, ws->rstd, ws->buf[0], m->e_no_g, m->e_no_b, B, top, hw,
                                  m->groups, 1e-6f, 1));
    LORA_TRY(img_conv(&c, ws->buf[2], ws->buf[1], m->e_out_w, m->e_out_b, B, top, h, w, 2 * lat, 3, 1, 1));
    LORA_TRY(img_conv(&c, ws->buf[3], ws->buf[2], m->quant_w, m->quant_b, B, 2 * lat, h, w, 2 * lat, 1, 1, 0));
    LORA_TRY(nn_concat_channels_backward(be, mean, logvar, ws->buf[3], B, lat, lat, hw, 0));
    return be->iface->clamp_f32(be, B * lat * hw, -30.0f, 20.0f, logvar);
}

lora_status vae_decode(struct vae_plan *p, const float *latent, float *image) {
    if (!p || !p->m || !latent || !image) return LORA_E_INVALID_ARG;
    const struct vae_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    struct img_ws *ws = &p->ws;
    struct img_ctx c = {be, ws, m->groups, 1e-6f};
    int64_t L = m->levels, lat = m->latent, f = (int64_t)1 << (L - 1), top = m->ch[L - 1];
    int64_t B = p->batch, h = p->h / f, w = p->w / f;
    LORA_TRY(img_conv(&c, ws->buf[1], latent, m->pq_w, m->pq_b, B, lat, h, w, lat, 1, 1, 0));
    LORA_TRY(img_conv(&c, ws->buf[0], ws->buf[1], m->d_in_w, m->d_in_b, B, lat, h, w, top, 3, 1, 1));
    LORA_TRY(mid_forward(&c, &m->d_mid, B, top, h, w));
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t out = m->ch[L - 1 - i];
        for (int64_t j = 0; j <= m->layers; j++) {
            LORA_TRY(img_resnet_forward(&c, &m->d_res[i][j], ws->buf[1], ws->buf[0], NULL, B, h, w, 2));
            LORA_TRY(be->iface->copy(be, ws->buf[0], ws->buf[1], (size_t)(B * out * h * w) * sizeof(float)));
        }
        if (i < L - 1) {
            LORA_TRY(nn_upsample2x_forward(be, ws->buf[1], ws->buf[0], B * out, h, w));
            h *= 2;
            w *= 2;
            LORA_TRY(img_conv(&c, ws->buf[0], ws->buf[1], m->d_up_w[i], m->d_up_b[i], B, out, h, w, out, 3, 1, 1));
        }
    }
    LORA_TRY(nn_groupnorm_forward(be, ws->buf[1], ws->mean, ws->rstd, ws->buf[0], m->d_no_g, m->d_no_b, B, m->ch[0],
                                  h * w, m->groups, 1e-6f, 1));
    return img_conv(&c, image, ws->buf[1], m->d_out_w, m->d_out_b, B, m->ch[0], h, w, m->in_ch, 3, 1, 1);
}
