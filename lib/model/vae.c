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

struct img_mat img_m(struct img_weights *w, int64_t numel, const char *fmt, ...) {
    struct img_mat m = {NULL, LORA_DTYPE_F32, numel};
    if (w->err != LORA_OK) return m;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    int64_t i = w->keep16 ? tmap_find(w->tm, name) : -1;
    const struct lora_tensor *t = i >= 0 ? &w->tm->t[i] : NULL;
    if (!t || (t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16)) {
        m.p = img_w(w, numel, "%s", name);
        return m;
    }
    int64_t n = 1;
    for (int32_t d = 0; d < t->ndim; d++) n *= t->shape[d];
    if (n != numel) {
        w->err = lora_fail(w->be->ctx, LORA_E_INVALID_ARG, "%s: tensor %s has %lld elements, want %lld", w->what,
                           name, (long long)n, (long long)numel);
        return m;
    }
    m.dtype = t->dtype;
    if (numel > w->wmax) w->wmax = numel;
    if (w->borrow16 && ((uintptr_t)t->data & 1) == 0) {
        m.p = t->data;
        return m;
    }
    uint64_t bytes = ((uint64_t)numel * 2 + 63) & ~(uint64_t)63;
    char *dst = w->pass ? w->base + w->off : NULL;
    w->off += bytes;
    if (!w->pass) return m;
    w->err = w->be->iface->upload(w->be, dst, t->data, (size_t)numel * 2);
    if (w->err == LORA_OK) m.p = dst;
    return m;
}

lora_status img_f32(struct img_ctx *c, struct img_mat m, const float **out) {
    if (m.dtype == LORA_DTYPE_F32) {
        *out = m.p;
        return LORA_OK;
    }
    struct img_ws *ws = c->ws;
    if (!ws->wbuf || m.n > ws->wbuf_floats)
        return lora_fail(c->be->ctx, LORA_E_INTERNAL, "image weights: a %lld-element 16-bit matrix needs a widening "
                         "buffer of the plan (%lld)", (long long)m.n, (long long)ws->wbuf_floats);
    LORA_TRY(c->be->iface->convert(c->be, m.n, (lora_dtype)m.dtype, m.p, LORA_DTYPE_F32, ws->wbuf));
    *out = ws->wbuf;
    return LORA_OK;
}

void img_resnet_load(struct img_weights *w, struct img_resnet *r, int64_t cin, int64_t cout,
                     int64_t temb, const char *prefix) {
    memset(r, 0, sizeof *r);
    r->cin = cin; r->cout = cout; r->temb = temb;
    r->n1g = img_w(w, cin, "%s.norm1.weight", prefix);
    r->n1b = img_w(w, cin, "%s.norm1.bias", prefix);
    r->c1w = img_m(w, cout * cin * 9, "%s.conv1.weight", prefix);
    r->c1b = img_w(w, cout, "%s.conv1.bias", prefix);
    if (temb) {
        r->tw = img_m(w, cout * temb, "%s.time_emb_proj.weight", prefix);
        r->tb = img_w(w, cout, "%s.time_emb_proj.bias", prefix);
    }
    r->n2g = img_w(w, cout, "%s.norm2.weight", prefix);
    r->n2b = img_w(w, cout, "%s.norm2.bias", prefix);
    r->c2w = img_m(w, cout * cout * 9, "%s.conv2.weight", prefix);
    r->c2b = img_w(w, cout, "%s.conv2.bias", prefix);
    if (cin != cout) {
        r->scw = img_m(w, cout * cin, "%s.conv_shortcut.weight", prefix);
        r->scb = img_w(w, cout, "%s.conv_shortcut.bias", prefix);
    }
}

/* ---- shared forward pieces -------------------------------------------------------------------- */

lora_status img_conv(struct img_ctx *c, float *y, const float *x, const float *wt, const float *b,
                     int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout, int64_t k,
                     int64_t stride, int64_t pad) {
    struct nn_conv2d_shape s = {batch, cin, h, w, cout, k, stride, pad, pad, pad, pad};
    return nn_conv2d_forward_ex(c->be, &s, y, c->ws->cols, c->ws->cols_floats, x, wt, b);
}

lora_status img_convm(struct img_ctx *c, float *y, const float *x, struct img_mat wt, const float *b,
                      int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout, int64_t k,
                      int64_t stride, int64_t pad) {
    const float *wf = NULL;
    LORA_TRY(img_f32(c, wt, &wf));
    return img_conv(c, y, x, wf, b, batch, cin, h, w, cout, k, stride, pad);
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
    LORA_TRY(img_convm(c, t2, t1, r->c1w, r->c1b, batch, r->cin, h, w, r->cout, 3, 1, 1));
    if (r->temb && temb_act) {
        const float *tw = NULL;
        LORA_TRY(img_f32(c, r->tw, &tw));
        LORA_TRY(nn_linear_forward(be, ws->vec[3], temb_act, tw, r->tb, batch, r->temb, r->cout));
        LORA_TRY(nn_add_channel(be, t2, ws->vec[3], batch, r->cout, hw, 1));
    }
    LORA_TRY(nn_groupnorm_forward(be, t1, ws->mean, ws->rstd, t2, r->n2g, r->n2b, batch, r->cout, hw,
                                  c->groups, c->eps, 1));
    LORA_TRY(img_convm(c, t2, t1, r->c2w, r->c2b, batch, r->cout, h, w, r->cout, 3, 1, 1));
    if (r->scw.p) LORA_TRY(img_convm(c, y, x, r->scw, r->scb, batch, r->cin, h, w, r->cout, 1, 1, 0));
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
    struct img_weights w = {be, vae, "vae", 0, NULL, 0, NULL, 0, LORA_OK, 0, 0, 0};
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
    if (p->stage && p->m && p->m->be) lora_free(p->m->be->ctx, p->stage);
    memset(p, 0, sizeof *p);
}

/* Buffer sizes (floats) of a plan for batch x h x w into ws and sizes[IMG_NBUF + 4]; returns
 * the bytes of the one allocation. */
static uint64_t vae_layout(const struct vae_model *m, int64_t batch, int64_t h, int64_t w, struct img_ws *ws,
                           int64_t *sizes) {
    int64_t f = (int64_t)1 << (m->levels - 1);
    /* Activations at level r (h >> r) carry the widths of levels r-1, r, r+1 (an encoder
     * resnet reads the previous level's width after the downsampler, a decoder upsampler
     * writes its width at the next finer level); buf[0..3] hold the largest of those, buf[4..7]
     * only the mid-block attention at the bottom level. */
    int64_t L = m->levels, maxc = m->in_ch > 2 * m->latent ? m->in_ch : 2 * m->latent, act = 0;
    for (int64_t i = 0; i < L; i++) {
        int64_t c = m->ch[i];
        if (i > 0 && m->ch[i - 1] > c) c = m->ch[i - 1];
        if (i + 1 < L && m->ch[i + 1] > c) c = m->ch[i + 1];
        if (i == 0 && maxc > c) c = maxc;
        int64_t n = batch * c * (h >> i) * (w >> i);
        if (n > act) act = n;
    }
    for (int64_t i = 0; i < L; i++) if (m->ch[i] > maxc) maxc = m->ch[i];
    int64_t hw = h * w, thw = (h / f) * (w / f), top = m->ch[L - 1];
    if (2 * m->latent > top) top = 2 * m->latent;
    ws->act_floats = act;
    /* im2col in bands of output rows: at most VAE_COLS_CAP floats unless one row needs more */
    ws->cols_floats = maxc * 9 * hw < VAE_COLS_CAP ? maxc * 9 * hw : VAE_COLS_CAP;
    if (ws->cols_floats < maxc * 9 * w) ws->cols_floats = maxc * 9 * w;
    int64_t block = thw < 256 ? thw : 256;
    ws->att_floats = nn_mha_scratch_floats(1, thw, block, 0);
    uint64_t total = 0;
    for (int k = 0; k < IMG_NBUF; k++) sizes[k] = k < 4 ? act : batch * top * thw;
    sizes[IMG_NBUF] = ws->cols_floats;
    sizes[IMG_NBUF + 1] = batch * m->groups;
    sizes[IMG_NBUF + 2] = batch * m->groups;
    sizes[IMG_NBUF + 3] = ws->att_floats;
    for (int k = 0; k < IMG_NBUF + 4; k++) total += ((uint64_t)sizes[k] * 4 + 63) & ~(uint64_t)63;
    return total;
}

uint64_t vae_plan_bytes_for(const struct vae_model *m, int64_t batch, int64_t h, int64_t w) {
    struct img_ws ws;
    int64_t sizes[IMG_NBUF + 4];
    if (!m || m->levels < 1 || batch < 1 || h < 1 || w < 1) return 0;
    return vae_layout(m, batch, h, w, &ws, sizes);
}

lora_status vae_plan_init(struct vae_plan *p, const struct vae_model *m, int64_t batch, int64_t h,
                          int64_t w) {
    memset(p, 0, sizeof *p);
    if (!m || !m->be) return LORA_E_INVALID_ARG;
    int64_t f = (int64_t)1 << (m->levels - 1);
    if (batch < 1 || h < f || w < f || h % f || w % f || batch > (1 << 16) || h > (1 << 16) || w > (1 << 16))
        return lora_fail(m->be->ctx, LORA_E_INVALID_ARG, "vae plan: batch %lld, %lldx%lld (a multiple of %lld) is invalid",
                         (long long)batch, (long long)h, (long long)w, (long long)f);
    struct img_ws *ws = &p->ws;
    int64_t sizes[IMG_NBUF + 4];
    uint64_t total = vae_layout(m, batch, h, w, ws, sizes);
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
    p->bytes = total;
    p->m = m;
    p->batch = batch; p->h = h; p->w = w;
    return LORA_OK;
}

uint64_t vae_plan_bytes(const struct vae_plan *p) { return p ? p->bytes : 0; }

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
            LORA_TRY(nn_conv2d_forward_ex(be, &s, ws->buf[1], ws->cols, ws->cols_floats, ws->buf[0], m->e_down_w[i],
                                          m->e_down_b[i]));
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
    /* the activation ping-pongs between buf[0] and buf[1] (no copy back after each resnet:
     * ~0.7 GB of memcpy at 512x512) */
    float *cur = ws->buf[0], *nxt = ws->buf[1];
    for (int64_t i = 0; i < L; i++) {
        LORA_TRY(lora_check_cancel(be->ctx));
        int64_t out = m->ch[L - 1 - i];
        for (int64_t j = 0; j <= m->layers; j++) {
            LORA_TRY(img_resnet_forward(&c, &m->d_res[i][j], nxt, cur, NULL, B, h, w, 2));
            float *t = cur;
            cur = nxt;
            nxt = t;
        }
        if (i < L - 1) {
            LORA_TRY(nn_upsample2x_forward(be, nxt, cur, B * out, h, w));
            h *= 2;
            w *= 2;
            LORA_TRY(img_conv(&c, cur, nxt, m->d_up_w[i], m->d_up_b[i], B, out, h, w, out, 3, 1, 1));
        }
    }
    LORA_TRY(nn_groupnorm_forward(be, nxt, ws->mean, ws->rstd, cur, m->d_no_g, m->d_no_b, B, m->ch[0],
                                  h * w, m->groups, 1e-6f, 1));
    return img_conv(&c, image, nxt, m->d_out_w, m->d_out_b, B, m->ch[0], h, w, m->in_ch, 3, 1, 1);
}

/* ---- tiled decode / encode ---------------------------------------------------------------------- */

/* Tile origins along one axis of n latent units, tiles of t (<= n), overlap o: 0, s, 2s, ...
 * (s = t - o), the last one moved back to n - t. Returns the count, -1 when over cap. */
static int64_t tile_starts(int64_t n, int64_t t, int64_t o, int64_t *pos, int64_t cap) {
    int64_t k = 0, s = t - o;
    if (t >= n) { pos[0] = 0; return 1; }
    for (int64_t a = 0; k < cap; a += s) {
        if (a + t >= n) { pos[k++] = n - t; return k; }
        pos[k++] = a;
    }
    return -1;
}

/* Blend weight of position i (0 <= i < len) of a tile with a neighbour before (lo) and/or
 * after (hi): a linear ramp over `ramp` positions on each shared side, 1 inside. */
static float tile_weight(int64_t i, int64_t len, int64_t ramp, int lo, int hi) {
    float wgt = 1.0f;
    if (ramp > 0 && lo && (float)i + 0.5f < (float)ramp) wgt = ((float)i + 0.5f) / (float)ramp;
    if (ramp > 0 && hi && (float)(len - i) - 0.5f < (float)ramp) {
        float v = ((float)(len - i) - 0.5f) / (float)ramp;
        if (v < wgt) wgt = v;
    }
    return wgt;
}

#define VAE_MAX_TILES 1024

/* Shared driver. dir 0: decode (input latent, output image, scale f); 1: encode (input image,
 * outputs mean + logvar, scale 1/f). `in` [B, cin, IH, IW] host, outputs host [B, cout, OH, OW]. */
static lora_status tiled_run(struct vae_plan *p, int enc, const float *in, int64_t ih, int64_t iw, int64_t overlap,
                             float *tin, float *tout, float *out0, float *out1) {
    const struct vae_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    int64_t f = (int64_t)1 << (m->levels - 1), B = p->batch, lat = m->latent;
    /* latent-unit sizes: full (lh, lw), tile (th, tw) */
    int64_t lh = enc ? ih / f : ih, lw = enc ? iw / f : iw, th = p->h / f, tw = p->w / f;
    if (lh < th || lw < tw || overlap < 0 || (lh > th && overlap >= th) || (lw > tw && overlap >= tw) ||
        (enc && (ih % f || iw % f)))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG,
                         "vae tiled: %lldx%lld latents in %lldx%lld tiles with overlap %lld is invalid", (long long)lh,
                         (long long)lw, (long long)th, (long long)tw, (long long)overlap);
    int64_t ys[VAE_MAX_TILES], xs[VAE_MAX_TILES];
    int64_t ny = tile_starts(lh, th, overlap, ys, VAE_MAX_TILES), nx = tile_starts(lw, tw, overlap, xs, VAE_MAX_TILES);
    if (ny < 0 || nx < 0)
        return lora_fail(be->ctx, LORA_E_LIMIT, "vae tiled: %lldx%lld latents need more than %d tiles a side",
                         (long long)lh, (long long)lw, VAE_MAX_TILES);
    /* per-unit scale between input and output: decode writes f pixels per latent */
    int64_t sc = enc ? 1 : f, cin = enc ? m->in_ch : lat, cout = enc ? lat : m->in_ch;
    int64_t uin = enc ? f : 1;                          /* input units per latent */
    int64_t oh = lh * sc, ow = lw * sc, toh = th * sc, tow = tw * sc, tih = th * uin, tiw = tw * uin;
    int64_t IH = lh * uin, IW = lw * uin, nouts = enc && out1 ? 2 : 1;
    int64_t tin_n = B * cin * tih * tiw, tout_n = B * cout * toh * tow;
    int64_t need = tin_n + 2 * tout_n + oh + ow;
    if (p->stage_floats < need) {
        if (p->stage) lora_free(be->ctx, p->stage);
        p->stage_floats = 0;
        p->stage = lora_malloc(be->ctx, (size_t)need * sizeof(float));
        if (!p->stage) return LORA_E_NOMEM;
        p->stage_floats = need;
    }
    float *stage = p->stage;
    float *sin_ = stage, *sout = stage + tin_n, *sy = sout + 2 * tout_n, *sx = sy + oh;
    lora_status st = LORA_OK;
    /* normalisers: the sum of every tile's weight at each output row / column */
    memset(sy, 0, (size_t)(oh + ow) * sizeof(float));
    for (int64_t a = 0; a < ny; a++)
        for (int64_t i = 0; i < toh; i++) sy[ys[a] * sc + i] += tile_weight(i, toh, overlap * sc, a > 0, a < ny - 1);
    for (int64_t b = 0; b < nx; b++)
        for (int64_t j = 0; j < tow; j++) sx[xs[b] * sc + j] += tile_weight(j, tow, overlap * sc, b > 0, b < nx - 1);
    float *outs[2] = {out0, out1};
    for (int64_t o = 0; o < nouts; o++) memset(outs[o], 0, (size_t)(B * cout * oh * ow) * sizeof(float));
    for (int64_t a = 0; a < ny && st == LORA_OK; a++)
        for (int64_t b = 0; b < nx && st == LORA_OK; b++) {
            st = lora_check_cancel(be->ctx);
            if (st != LORA_OK) break;
            int64_t y0 = ys[a] * uin, x0 = xs[b] * uin;
            for (int64_t pl = 0; pl < B * cin; pl++)
                for (int64_t i = 0; i < tih; i++)
                    memcpy(sin_ + (pl * tih + i) * tiw, in + (pl * IH + y0 + i) * IW + x0, (size_t)tiw * sizeof(float));
            st = be->iface->upload(be, tin, sin_, (size_t)tin_n * sizeof(float));
            if (st == LORA_OK) st = enc ? vae_encode(p, tin, tout, tout + tout_n) : vae_decode(p, tin, tout);
            if (st == LORA_OK) st = be->iface->download(be, sout, tout, (size_t)(nouts * tout_n) * sizeof(float));
            if (st != LORA_OK) break;
            int64_t oy0 = ys[a] * sc, ox0 = xs[b] * sc;
            for (int64_t o = 0; o < nouts; o++)
                for (int64_t pl = 0; pl < B * cout; pl++)
                    for (int64_t i = 0; i < toh; i++) {
                        float wy = tile_weight(i, toh, overlap * sc, a > 0, a < ny - 1) / sy[oy0 + i];
                        const float *src = sout + o * tout_n + (pl * toh + i) * tow;
                        float *dst = outs[o] + (pl * oh + oy0 + i) * ow + ox0;
                        for (int64_t j = 0; j < tow; j++)
                            dst[j] += wy * tile_weight(j, tow, overlap * sc, b > 0, b < nx - 1) / sx[ox0 + j] * src[j];
                    }
        }
    return st;
}

lora_status vae_decode_tiled(struct vae_plan *p, const float *latent, int64_t lh, int64_t lw,
                             int64_t overlap, float *tin, float *tout, float *image) {
    if (!p || !p->m || !latent || !tin || !tout || !image) return LORA_E_INVALID_ARG;
    return tiled_run(p, 0, latent, lh, lw, overlap, tin, tout, image, NULL);
}

lora_status vae_encode_tiled(struct vae_plan *p, const float *image, int64_t h, int64_t w,
                             int64_t overlap, float *tin, float *tout, float *mean, float *logvar) {
    if (!p || !p->m || !image || !tin || !tout || !mean) return LORA_E_INVALID_ARG;
    return tiled_run(p, 1, image, h, w, overlap, tin, tout, mean, logvar);
}
