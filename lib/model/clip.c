/* CLIP text encoder (transformers 4.25.1 CLIPTextModel) forward and backward with LoRA
 * adapters, and kohya's long-prompt chunking. See clip.h. */
#include <stdio.h>
#include <string.h>

#include "backend/backend.h"
#include "model/clip.h"

static const char *const slot_names[CLIP_N_SLOTS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
};

const char *clip_slot_name(int slot) {
    return slot >= 0 && slot < CLIP_N_SLOTS ? slot_names[slot] : NULL;
}

/* ---- one-allocation layout: pass 1 (base NULL) sizes, pass 2 hands out pointers ---------- */

struct carver {
    char *base;
    uint64_t off;
    int overflow;
};

static void *carve(struct carver *cv, int64_t count, uint64_t elem) {
    uint64_t bytes;
    if (count < 0 || !ck_mul_u64((uint64_t)count, elem, &bytes) || !ck_add_u64(bytes, 63, &bytes)) {
        cv->overflow = 1;
        return NULL;
    }
    bytes &= ~(uint64_t)63;   /* every buffer starts on 64 bytes */
    void *p = cv->base ? cv->base + cv->off : NULL;
    if (!ck_add_u64(cv->off, bytes, &cv->off)) cv->overflow = 1;
    return p;
}

static int64_t mul3(int64_t a, int64_t b, int64_t c) {
    int64_t r;
    if (!ck_mul_i64(a, b, &r) || !ck_mul_i64(r, c, &r)) return -1;   /* carve flags it */
    return r;
}

/* ---- weights ------------------------------------------------------------------------------ */

/* Device-side staging for fp16/bf16 tensors: uploaded as stored, widened by the backend. */
struct stage {
    void *buf;
    size_t cap;
};

static lora_status load_tensor(struct lora_backend_impl *be, struct stage *sg, const struct tensor_map *te,
                               const char *name, int32_t ndim, int64_t d0, int64_t d1, float *dst) {
    int64_t i = tmap_find(te, name);
    if (i < 0) return lora_fail(be->ctx, LORA_E_NOT_FOUND, "text encoder: tensor %s is missing", name);
    const struct lora_tensor *t = &te->t[i];
    if (t->dtype != LORA_DTYPE_F32 && t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16)
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "text encoder: tensor %s has dtype %d, not F32/F16/BF16",
                         name, (int)t->dtype);
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG,
                         "text encoder: tensor %s has shape [%lld%s%lld], want [%lld%s%lld]", name,
                         t->ndim > 0 ? (long long)t->shape[0] : -1LL, t->ndim > 1 ? ", " : "",
                         t->ndim > 1 ? (long long)t->shape[1] : 0LL, (long long)d0,
                         ndim == 2 ? ", " : "", ndim == 2 ? (long long)d1 : 0LL);
    int64_t count = ndim == 2 ? d0 * d1 : d0;   /* both bounded by clip_init's config limits */
    if (t->dtype == LORA_DTYPE_F32) return be->iface->upload(be, dst, t->data, (size_t)count * 4);
    size_t bytes = (size_t)count * 2;
    if (bytes > sg->cap) {
        if (sg->buf) be->iface->buf_free(be, sg->buf);
        sg->buf = NULL;
        sg->cap = 0;
        LORA_TRY(be->iface->buf_alloc(be, bytes, &sg->buf));
        sg->cap = bytes;
    }
    LORA_TRY(be->iface->upload(be, sg->buf, t->data, bytes));
    return be->iface->convert(be, count, t->dtype, sg->buf, LORA_DTYPE_F32, dst);
}

static lora_status load_pair(struct lora_backend_impl *be, struct stage *sg, const struct tensor_map *te,
                             const char *prefix, int64_t out, int64_t in, float *w, float *b) {
    char name[256];
    snprintf(name, sizeof name, "%s.weight", prefix);
    LORA_TRY(load_tensor(be, sg, te, name, in ? 2 : 1, out, in, w));
    snprintf(name, sizeof name, "%s.bias", prefix);
    return load_tensor(be, sg, te, name, 1, out, 0, b);
}

void clip_free(struct clip_model *m) {
    if (!m) return;
    lora_ctx *ctx = m->be ? m->be->ctx : NULL;
    if (m->weights && m->be) m->be->iface->buf_free(m->be, m->weights);
    lora_free(ctx, m->layer);
    memset(m, 0, sizeof *m);
}

lora_status clip_init(struct clip_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *te, const struct sd_config *cfg) {
    memset(m, 0, sizeof *m);
    if (!be || !te || !cfg) return LORA_E_INVALID_ARG;
    const struct lora_backend_iface *fi = be->iface;
    if (!fi->copy || !fi->add_rows_f32 || !fi->layernorm_f32 || !fi->layernorm_backward_f32 ||
        !fi->softmax_f32 || !fi->softmax_backward_f32 || !fi->quick_gelu_f32 ||
        !fi->quick_gelu_backward_f32 || !fi->embedding_f32 || !fi->col_sum_f32)
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED,
                         "text encoder: the %s backend lacks the layer ops the encoder needs", fi->name);
    int64_t L = cfg->te_layers, C = cfg->te_hidden, H = cfg->te_heads, I = cfg->te_intermediate;
    int64_t P = cfg->te_max_positions, V = cfg->te_vocab;
    if (L <= 0 || C <= 0 || H <= 0 || C % H != 0 || I <= 0 || P <= 0 || V <= 0 || L > 1024 ||
        C > (1 << 20) || I > (1 << 22) || P > (1 << 20) || V > (1 << 24))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG,
                         "text encoder: bad config layers=%lld hidden=%lld heads=%lld intermediate=%lld "
                         "positions=%lld vocab=%lld", (long long)L, (long long)C, (long long)H,
                         (long long)I, (long long)P, (long long)V);
    m->be = be;
    m->layers = L; m->hidden = C; m->heads = H; m->inter = I; m->positions = P; m->vocab = V;
    m->gelu = cfg->te_gelu != 0;
    m->eps = 1e-5f;
    m->layer = lora_calloc(be->ctx, (size_t)L, sizeof *m->layer);
    if (!m->layer) return LORA_E_NOMEM;

    /* pass 1 sizes the block, pass 2 carves it (a backend buffer) and uploads each tensor
     * into its place */
    lora_status s = LORA_OK;
    struct stage sg = {NULL, 0};
    for (int pass = 0; pass < 2 && s == LORA_OK; pass++) {
        struct carver cv = {pass ? (char *)m->weights : NULL, 0, 0};
        float *tok = carve(&cv, V * C, 4), *pos = carve(&cv, P * C, 4);
        float *fg = carve(&cv, C, 4), *fb = carve(&cv, C, 4);
        if (pass) {
            s = load_tensor(be, &sg, te, "text_model.embeddings.token_embedding.weight", 2, V, C, tok);
            if (s == LORA_OK)
                s = load_tensor(be, &sg, te, "text_model.embeddings.position_embedding.weight", 2, P, C, pos);
            if (s == LORA_OK) s = load_pair(be, &sg, te, "text_model.final_layer_norm", C, 0, fg, fb);
            m->tok_emb = tok; m->pos_emb = pos; m->fln_g = fg; m->fln_b = fb;
        }
        for (int64_t l = 0; l < L && s == LORA_OK; l++) {
            struct clip_layer *ly = &m->layer[l];
            float *g1 = carve(&cv, C, 4), *b1 = carve(&cv, C, 4);
            float *g2 = carve(&cv, C, 4), *b2 = carve(&cv, C, 4);
            float *w[CLIP_N_SLOTS], *b[CLIP_N_SLOTS];
            for (int k = 0; k < CLIP_N_SLOTS; k++) {
                int64_t out = k == CLIP_FC1 ? I : C, in = k == CLIP_FC2 ? I : C;
                w[k] = carve(&cv, out * in, 4);
                b[k] = carve(&cv, out, 4);
            }
            if (!pass) continue;
            char pre[160];
            snprintf(pre, sizeof pre, "text_model.encoder.layers.%lld.layer_norm1", (long long)l);
            s = load_pair(be, &sg, te, pre, C, 0, g1, b1);
            snprintf(pre, sizeof pre, "text_model.encoder.layers.%lld.layer_norm2", (long long)l);
            if (s == LORA_OK) s = load_pair(be, &sg, te, pre, C, 0, g2, b2);
            for (int k = 0; k < CLIP_N_SLOTS && s == LORA_OK; k++) {
                int64_t out = k == CLIP_FC1 ? I : C, in = k == CLIP_FC2 ? I : C;
                snprintf(pre, sizeof pre, "text_model.encoder.layers.%lld.%s", (long long)l, slot_names[k]);
                s = load_pair(be, &sg, te, pre, out, in, w[k], b[k]);
                ly->w[k] = w[k];
                ly->b[k] = b[k];
            }
            ly->ln1_g = g1; ly->ln1_b = b1; ly->ln2_g = g2; ly->ln2_b = b2;
        }
        if (!pass) {
            if (cv.overflow || cv.off > SIZE_MAX) {
                s = lora_fail(be->ctx, LORA_E_LIMIT, "text encoder: weight size overflows");
                break;
            }
            void *w = NULL;
            s = be->iface->buf_alloc(be, (size_t)cv.off, &w);
            m->weights = w;
        }
    }
    if (sg.buf) be->iface->buf_free(be, sg.buf);
    if (s != LORA_OK) clip_free(m);
    return s;
}

/* ---- activation plan -------------------------------------------------------------------------- */

/* Lays the plan out: backend buffers in `base`, the host part (the per-layer pointer table
 * and the host copy of the ids) in `host` (both NULL: sizing only). Returns the backend byte
 * count or 0 on overflow; *host_bytes gets the host byte count. */
static uint64_t plan_layout(struct clip_plan *p, const struct clip_model *m, int64_t B, int64_t T,
                            int64_t R, int train, char *base, char *host, uint64_t *host_bytes) {
    struct carver cv = {base, 0, 0}, hv = {host, 0, 0};
    int64_t n = B * T, C = m->hidden, I = m->inter, L = m->layers, H = m->heads;
    int64_t nc = mul3(B, T, C), ni = mul3(B, T, I), nr = mul3(B, T, R), nacts = train ? L : 1;
    p->ids = carve(&cv, n, 4);
    p->ids_host = carve(&hv, n, 4);
    p->hidden = carve(&cv, mul3(L + 1, n, C), 4);
    p->out = carve(&cv, nc, 4);
    p->out_mean = carve(&cv, n, 4);
    p->out_rstd = carve(&cv, n, 4);
    p->pooled = carve(&cv, mul3(B, C, 1), 4);
    p->tmp = carve(&cv, nc, 4);
    p->act = carve(&hv, nacts, sizeof(struct clip_act));
    for (int64_t l = 0; l < nacts; l++) {
        struct clip_act a;
        a.ln1 = carve(&cv, nc, 4);
        a.ln1_mean = carve(&cv, n, 4);
        a.ln1_rstd = carve(&cv, n, 4);
        for (int k = 0; k < 3; k++) a.qkv[k] = carve(&cv, nc, 4);
        a.probs = carve(&cv, mul3(mul3(B, H, 1), T, T), 4);
        a.att = carve(&cv, nc, 4);
        a.x2 = carve(&cv, nc, 4);
        a.ln2 = carve(&cv, nc, 4);
        a.ln2_mean = carve(&cv, n, 4);
        a.ln2_rstd = carve(&cv, n, 4);
        a.f = carve(&cv, ni, 4);
        a.g = carve(&cv, ni, 4);
        for (int k = 0; k < CLIP_N_SLOTS; k++) a.lora_h[k] = R ? carve(&cv, nr, 4) : NULL;
        if (host) p->act[l] = a;
    }
    if (train) {
        p->d_embed = carve(&cv, nc, 4);
        p->dln = carve(&cv, nc, 4);
        p->da = carve(&cv, nc, 4);
        for (int k = 0; k < 3; k++) p->dqkv[k] = carve(&cv, nc, 4);
        p->dg = carve(&cv, ni, 4);
        /* every head of a sequence at once: the backward's batched GEMMs */
        p->dscratch_floats = mul3(H, T, T);
        p->dscratch = carve(&cv, p->dscratch_floats, 4);
        p->dh = R ? carve(&cv, nr, 4) : NULL;
    } else {
        p->d_embed = p->dln = p->da = p->dg = p->dscratch = p->dh = NULL;
        p->dqkv[0] = p->dqkv[1] = p->dqkv[2] = NULL;
        p->dscratch_floats = 0;
    }
    *host_bytes = hv.off;
    return cv.overflow || hv.overflow ? 0 : cv.off;
}

static int plan_args_ok(const struct clip_model *m, int64_t B, int64_t T, int64_t R) {
    return m && m->layers > 0 && B > 0 && T > 0 && T <= m->positions && R >= 0 &&
           B <= (INT64_C(1) << 24) && R <= (INT64_C(1) << 16);
}

uint64_t clip_plan_bytes(const struct clip_model *m, int64_t batch, int64_t tokens,
                         int64_t max_rank, int train) {
    struct clip_plan p;
    uint64_t host = 0;
    if (!plan_args_ok(m, batch, tokens, max_rank)) return 0;
    return plan_layout(&p, m, batch, tokens, max_rank, train, NULL, NULL, &host);
}

void clip_plan_free(struct clip_plan *p) {
    if (!p) return;
    if (p->m && p->m->be) {
        if (p->mem) p->m->be->iface->buf_free(p->m->be, p->mem);
        lora_free(p->m->be->ctx, p->host_mem);
    }
    memset(p, 0, sizeof *p);
}

lora_status clip_plan_init(struct clip_plan *p, const struct clip_model *m, int64_t batch,
                           int64_t tokens, int64_t max_rank, int train) {
    memset(p, 0, sizeof *p);
    if (!m || !m->be) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = m->be->ctx;
    if (!plan_args_ok(m, batch, tokens, max_rank))
        return lora_fail(ctx, LORA_E_INVALID_ARG,
                         "text encoder plan: batch %lld, %lld tokens (at most %lld), rank %lld are invalid",
                         (long long)batch, (long long)tokens, (long long)m->positions, (long long)max_rank);
    uint64_t host_bytes = 0;
    uint64_t bytes = plan_layout(p, m, batch, tokens, max_rank, train != 0, NULL, NULL, &host_bytes);
    if (!bytes || bytes > SIZE_MAX || host_bytes > SIZE_MAX) {
        memset(p, 0, sizeof *p);
        return lora_fail(ctx, LORA_E_LIMIT, "text encoder plan: size overflows");
    }
    void *mem = NULL;
    lora_status s = m->be->iface->buf_alloc(m->be, (size_t)bytes, &mem);
    if (s != LORA_OK) {
        memset(p, 0, sizeof *p);
        return s;
    }
    void *host = lora_malloc(ctx, (size_t)host_bytes);
    if (!host) {
        m->be->iface->buf_free(m->be, mem);
        memset(p, 0, sizeof *p);
        return LORA_E_NOMEM;
    }
    plan_layout(p, m, batch, tokens, max_rank, train != 0, mem, host, &host_bytes);
    p->mem = mem;
    p->host_mem = host;
    p->m = m;
    p->batch = batch;
    p->tokens = tokens;
    p->n = batch * tokens;
    p->max_rank = max_rank;
    p->train = train != 0;
    p->layers_run = -1;
    return LORA_OK;
}

/* ---- forward / backward ---------------------------------------------------------------------- */

static lora_status check_adapters(const struct clip_plan *p, const struct nn_lora *const *lora) {
    if (!lora) return LORA_OK;
    const struct clip_model *m = p->m;
    for (int64_t l = 0; l < m->layers; l++)
        for (int k = 0; k < CLIP_N_SLOTS; k++) {
            const struct nn_lora *a = lora[l * CLIP_N_SLOTS + k];
            if (!a) continue;
            int64_t out = k == CLIP_FC1 ? m->inter : m->hidden, in = k == CLIP_FC2 ? m->inter : m->hidden;
            if (a->in != in || a->out != out || !a->down || !a->up)
                return lora_fail(m->be->ctx, LORA_E_INVALID_ARG,
                                 "text encoder: LoRA on layers.%lld.%s is [%lld -> %lld], the layer is [%lld -> %lld]",
                                 (long long)l, slot_names[k], (long long)a->in, (long long)a->out,
                                 (long long)in, (long long)out);
            if (a->rank < 1 || a->rank > p->max_rank)
                return lora_fail(m->be->ctx, LORA_E_LIMIT,
                                 "text encoder: LoRA on layers.%lld.%s has rank %lld; the plan takes up to %lld",
                                 (long long)l, slot_names[k], (long long)a->rank, (long long)p->max_rank);
        }
    return LORA_OK;
}

static const struct nn_lora *adapter(const struct nn_lora *const *lora, int64_t l, int k) {
    return lora ? lora[l * CLIP_N_SLOTS + k] : NULL;
}

/* base linear of slot k plus its adapter: y = x W^T + b (+ scale up(down(x))) */
static lora_status proj_forward(struct clip_plan *p, const struct clip_layer *ly, struct clip_act *a,
                                const struct nn_lora *ad, int k, float *y, const float *x) {
    const struct clip_model *m = p->m;
    int64_t out = k == CLIP_FC1 ? m->inter : m->hidden, in = k == CLIP_FC2 ? m->inter : m->hidden;
    LORA_TRY(nn_linear_forward(m->be, y, x, ly->w[k], ly->b[k], p->n, in, out));
    if (ad) LORA_TRY(nn_lora_forward(m->be, ad, y, a->lora_h[k], x, p->n));
    return LORA_OK;
}

/* dx (= or +=) from dy through slot k and its adapter (adapter gradients +=) */
static lora_status proj_backward(struct clip_plan *p, const struct clip_layer *ly, struct clip_act *a,
                                 const struct nn_lora *ad, int k, float *dx, const float *dy,
                                 const float *x, int accumulate) {
    const struct clip_model *m = p->m;
    int64_t out = k == CLIP_FC1 ? m->inter : m->hidden, in = k == CLIP_FC2 ? m->inter : m->hidden;
    LORA_TRY(nn_linear_backward(m->be, dx, NULL, NULL, dy, NULL, ly->w[k], p->n, in, out, accumulate));
    if (ad) LORA_TRY(nn_lora_backward(m->be, ad, dx, p->dh, dy, x, a->lora_h[k], p->n));
    return LORA_OK;
}

lora_status clip_forward(struct clip_plan *p, const int32_t *ids,
                         const struct nn_lora *const *lora, int32_t clip_skip) {
    if (!p || !p->m || !ids) return LORA_E_INVALID_ARG;
    const struct clip_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    int64_t n = p->n, C = m->hidden, I = m->inter, nc = n * C;
    p->layers_run = -1;
    if (clip_skip < 0 || clip_skip > m->layers + 1)
        return lora_fail(be->ctx, LORA_E_CONFIG_RANGE, "text encoder: clip_skip %d is outside 0..%lld",
                         (int)clip_skip, (long long)(m->layers + 1));
    LORA_TRY(check_adapters(p, lora));
    int64_t run = clip_skip <= 1 ? m->layers : m->layers + 1 - clip_skip;

    memcpy(p->ids_host, ids, (size_t)n * sizeof *ids);
    LORA_TRY(be->iface->upload(be, p->ids, ids, (size_t)n * sizeof *ids));
    LORA_TRY(nn_embedding_forward(be, p->hidden, p->ids, m->tok_emb, m->pos_emb, n, p->tokens,
                                  m->vocab, C));
    for (int64_t l = 0; l < run; l++) {
        const struct clip_layer *ly = &m->layer[l];
        struct clip_act *a = &p->act[p->train ? l : 0];
        const float *x = p->hidden + l * nc;
        float *y = p->hidden + (l + 1) * nc;
        LORA_TRY(lora_check_cancel(be->ctx));
        /* attention block */
        LORA_TRY(nn_layernorm_forward(be, a->ln1, a->ln1_mean, a->ln1_rstd, x, ly->ln1_g, ly->ln1_b,
                                      n, C, m->eps));
        for (int k = CLIP_Q; k <= CLIP_V; k++)
            LORA_TRY(proj_forward(p, ly, a, adapter(lora, l, k), k, a->qkv[k], a->ln1));
        LORA_TRY(nn_attention_forward(be, a->att, a->probs, a->qkv[0], a->qkv[1], a->qkv[2],
                                      p->batch, p->tokens, m->heads, C / m->heads, 1));
        LORA_TRY(proj_forward(p, ly, a, adapter(lora, l, CLIP_OUT), CLIP_OUT, p->tmp, a->att));
        LORA_TRY(be->iface->copy(be, a->x2, x, (size_t)nc * sizeof(float)));
        LORA_TRY(nn_residual_add(be, a->x2, p->tmp, nc));
        /* MLP block */
        LORA_TRY(nn_layernorm_forward(be, a->ln2, a->ln2_mean, a->ln2_rstd, a->x2, ly->ln2_g,
                                      ly->ln2_b, n, C, m->eps));
        LORA_TRY(proj_forward(p, ly, a, adapter(lora, l, CLIP_FC1), CLIP_FC1, a->f, a->ln2));
        if (m->gelu) LORA_TRY(nn_gelu_forward(be, a->g, a->f, n * I));
        else LORA_TRY(nn_quick_gelu_forward(be, a->g, a->f, n * I));
        LORA_TRY(proj_forward(p, ly, a, adapter(lora, l, CLIP_FC2), CLIP_FC2, p->tmp, a->g));
        LORA_TRY(be->iface->copy(be, y, a->x2, (size_t)nc * sizeof(float)));
        LORA_TRY(nn_residual_add(be, y, p->tmp, nc));
    }
    LORA_TRY(nn_layernorm_forward(be, p->out, p->out_mean, p->out_rstd, p->hidden + run * nc,
                                  m->fln_g, m->fln_b, n, C, m->eps));
    /* pooled: the first position holding the largest id (transformers' argmax, = EOS) */
    for (int64_t b = 0; b < p->batch; b++) {
        const int32_t *row = p->ids_host + b * p->tokens;
        int64_t best = 0;
        for (int64_t t = 1; t < p->tokens; t++)
            if (row[t] > row[best]) best = t;
        LORA_TRY(be->iface->copy(be, p->pooled + b * C, p->out + (b * p->tokens + best) * C,
                                 (size_t)C * sizeof(float)));
    }
    p->layers_run = run;
    return LORA_OK;
}

lora_status clip_backward(struct clip_plan *p, const float *dout,
                          const struct nn_lora *const *lora) {
    if (!p || !p->m || !dout) return LORA_E_INVALID_ARG;
    const struct clip_model *m = p->m;
    struct lora_backend_impl *be = m->be;
    if (!p->train)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "text encoder: backward needs a plan made with train = 1");
    if (p->layers_run < 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "text encoder: backward without a completed forward");
    LORA_TRY(check_adapters(p, lora));
    int64_t n = p->n, C = m->hidden, I = m->inter, nc = n * C, run = p->layers_run;
    float *dres = p->d_embed;   /* gradient of the residual stream, walked down to the embeddings */
    LORA_TRY(nn_layernorm_backward(be, dres, NULL, NULL, dout, p->hidden + run * nc, p->out_mean,
                                   p->out_rstd, m->fln_g, n, C, 0));
    for (int64_t l = run - 1; l >= 0; l--) {
        const struct clip_layer *ly = &m->layer[l];
        struct clip_act *a = &p->act[l];
        LORA_TRY(lora_check_cancel(be->ctx));
        /* MLP block: y = x2 + fc2(act(fc1(ln2(x2)))) */
        LORA_TRY(proj_backward(p, ly, a, adapter(lora, l, CLIP_FC2), CLIP_FC2, p->dg, dres, a->g, 0));
        if (m->gelu) LORA_TRY(nn_gelu_backward(be, p->dg, p->dg, a->f, n * I));
        else LORA_TRY(nn_quick_gelu_backward(be, p->dg, p->dg, a->f, n * I));
        LORA_TRY(proj_backward(p, ly, a, adapter(lora, l, CLIP_FC1), CLIP_FC1, p->dln, p->dg, a->ln2, 0));
        LORA_TRY(nn_layernorm_backward(be, dres, NULL, NULL, p->dln, a->x2, a->ln2_mean, a->ln2_rstd,
                                       ly->ln2_g, n, C, 1));
        /* attention block: x2 = x + out_proj(attn(q, k, v of ln1(x))) */
        LORA_TRY(proj_backward(p, ly, a, adapter(lora, l, CLIP_OUT), CLIP_OUT, p->da, dres, a->att, 0));
        LORA_TRY(nn_attention_backward_ex(be, p->dqkv[0], p->dqkv[1], p->dqkv[2], p->dscratch,
                                          p->dscratch_floats, p->da, a->probs, a->qkv[0], a->qkv[1],
                                          a->qkv[2], p->batch, p->tokens, m->heads, C / m->heads));
        for (int k = CLIP_Q; k <= CLIP_V; k++)
            LORA_TRY(proj_backward(p, ly, a, adapter(lora, l, k), k, p->dln, p->dqkv[k], a->ln1, k != CLIP_Q));
        LORA_TRY(nn_layernorm_backward(be, dres, NULL, NULL, p->dln, p->hidden + l * nc, a->ln1_mean,
                                       a->ln1_rstd, ly->ln1_g, n, C, 1));
    }
    return LORA_OK;
}

lora_status clip_download_output(const struct clip_plan *p, float *out, float *pooled) {
    if (!p || !p->m || !p->m->be) return LORA_E_INVALID_ARG;
    struct lora_backend_impl *be = p->m->be;
    if (p->layers_run < 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "text encoder: no completed forward to read");
    size_t row = (size_t)p->m->hidden * sizeof(float);
    if (out) LORA_TRY(be->iface->download(be, out, p->out, (size_t)p->n * row));
    if (pooled) LORA_TRY(be->iface->download(be, pooled, p->pooled, (size_t)p->batch * row));
    return LORA_OK;
}

/* ---- long prompts ---------------------------------------------------------------------------- */

lora_status clip_split_chunks(lora_ctx *ctx, int32_t *chunks, const int32_t *ids, int64_t batch,
                              int64_t n_chunks, int64_t chunk, int32_t eos_id, int32_t pad_id) {
    if (batch < 0 || n_chunks < 1 || chunk < 3)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "long prompt: %lld chunks of %lld tokens are invalid",
                         (long long)n_chunks, (long long)chunk);
    int64_t inner = chunk - 2, len = n_chunks * inner + 2;
    int v2 = pad_id != eos_id;
    for (int64_t b = 0; b < batch; b++) {
        const int32_t *src = ids + b * len;
        for (int64_t k = 0; k < n_chunks; k++) {
            int32_t *dst = chunks + (b * n_chunks + k) * chunk;
            dst[0] = src[0];
            memcpy(dst + 1, src + 1 + k * inner, (size_t)inner * sizeof *dst);
            dst[chunk - 1] = src[len - 1];
            if (v2) {
                if (dst[chunk - 2] != eos_id && dst[chunk - 2] != pad_id) dst[chunk - 1] = eos_id;
                if (dst[1] == pad_id) dst[1] = eos_id;
            }
        }
    }
    return LORA_OK;
}

void clip_rejoin_chunks(float *out, const float *enc, int64_t batch, int64_t n_chunks,
                        int64_t chunk, int64_t c) {
    int64_t inner = chunk - 2, len = n_chunks * inner + 2;
    size_t row = (size_t)c * sizeof(float);
    for (int64_t b = 0; b < batch; b++) {
        const float *e = enc + b * n_chunks * chunk * c;
        float *o = out + b * len * c;
        memcpy(o, e, row);                                            /* BOS of chunk 0 */
        for (int64_t k = 0; k < n_chunks; k++)
            memcpy(o + (1 + k * inner) * c, e + (k * chunk + 1) * c, row * (size_t)inner);
        memcpy(o + (len - 1) * c, e + (n_chunks * chunk - 1) * c, row);   /* last of the last */
    }
}

void clip_rejoin_chunks_backward(float *d_enc, const float *d_out, int64_t batch,
                                 int64_t n_chunks, int64_t chunk, int64_t c) {
    int64_t inner = chunk - 2, len = n_chunks * inner + 2;
    size_t row = (size_t)c * sizeof(float);
    memset(d_enc, 0, row * (size_t)(batch * n_chunks * chunk));
    for (int64_t b = 0; b < batch; b++) {
        float *e = d_enc + b * n_chunks * chunk * c;
        const float *o = d_out + b * len * c;
        memcpy(e, o, row);
        for (int64_t k = 0; k < n_chunks; k++)
            memcpy(e + (k * chunk + 1) * c, o + (1 + k * inner) * c, row * (size_t)inner);
        memcpy(e + (n_chunks * chunk - 1) * c, o + (len - 1) * c, row);
    }
}

int clip_fold_ids(const struct clip_model *m, int32_t *ids, int64_t n) {
    if (m->vocab <= 0 || m->vocab >= 49408) return 0;
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(ids[i] % m->vocab);
    return 1;
}
