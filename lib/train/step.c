/* One training step (spec/kohya-lora.md §1.8, §4.4, §5.5): see train.h. */
#include <math.h>
#include <string.h>

#include "backend/backend.h"
#include "train/train.h"

void train_opts_default(struct train_opts *o) {
    memset(o, 0, sizeof *o);
    o->unet_lr = o->text_encoder_lr = 1e-4;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->weight_decay = 0.01;
    o->max_grad_norm = 1.0;
    o->clip_skip = 1;
    o->train_unet = o->train_text_encoder = 1;
}

static int module_is_te(const struct train_state *s, int64_t i) {
    return strncmp(s->net->m[i].name, "lora_te_", 8) == 0;
}

static int64_t module_floats(const struct net_module *mm) {
    return mm->nn.rank * mm->nn.in + mm->nn.out * mm->nn.rank;
}

lora_status train_init(struct train_state *s, lora_ctx *ctx, struct lora_network *net,
                       const struct clip_model *clip, const struct unet_model *unet,
                       const struct train_opts *o, int64_t batch, int64_t h, int64_t w,
                       int64_t tokens) {
    memset(s, 0, sizeof *s);
    if (!ctx || !net || !clip || !unet || !o || batch < 1 || h < 1 || w < 1 || tokens < 1)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_init: missing argument or empty shape");
    if (strcmp(clip->be->iface->name, "cpu") != 0 || strcmp(unet->be->iface->name, "cpu") != 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "train_init: training runs on the CPU backend only (for now)");
    if (unet->ctx_dim != clip->hidden || unet->in_ch != 4 || unet->out_ch != 4)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_init: U-Net context %lld / channels %lld,%lld do not fit the text encoder width %lld",
                         (long long)unet->ctx_dim, (long long)unet->in_ch, (long long)unet->out_ch,
                         (long long)clip->hidden);
    if (o->clip_skip < 0 || o->clip_skip > clip->layers)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_init: clip_skip %d out of range", (int)o->clip_skip);
    s->ctx = ctx;
    s->net = net;
    s->clip = clip;
    s->unet = unet;
    s->o = *o;
    s->batch = batch;
    s->h = h;
    s->w = w;
    s->tokens = tokens;
    s->per = 4 * h * w;
    train_alphas_cumprod(s->acp);
    lora_status st = train_map_init(&s->map, ctx, net, clip, unet);
    if (st != LORA_OK) return st;
    int64_t n = net->n;
    s->off = lora_calloc(ctx, (size_t)(n ? n : 1), sizeof *s->off);
    s->used = lora_calloc(ctx, (size_t)(n ? n : 1), 1);
    if (!s->off || !s->used) { train_free(s); return LORA_E_NOMEM; }
    for (int64_t i = 0; i < n; i++) {
        s->off[i] = s->n_floats;
        s->n_floats += module_floats(&net->m[i]);
    }
    size_t nf = (size_t)(s->n_floats ? s->n_floats : 1);
    s->grad = lora_calloc(ctx, nf, sizeof(float));
    s->m = lora_calloc(ctx, nf, sizeof(float));
    s->v = lora_calloc(ctx, nf, sizeof(float));
    size_t lat = (size_t)(batch * s->per);
    s->noisy = lora_calloc(ctx, lat, sizeof(float));
    s->pred = lora_calloc(ctx, lat, sizeof(float));
    s->target = lora_calloc(ctx, lat, sizeof(float));
    s->dpred = lora_calloc(ctx, lat, sizeof(float));
    s->dctx = lora_calloc(ctx, (size_t)(batch * tokens * clip->hidden), sizeof(float));
    s->tf = lora_calloc(ctx, (size_t)batch, sizeof(float));
    if (!s->grad || !s->m || !s->v || !s->noisy || !s->pred || !s->target || !s->dpred ||
        !s->dctx || !s->tf) {
        train_free(s);
        return LORA_E_NOMEM;
    }
    for (int64_t i = 0; i < n; i++) {
        int te = module_is_te(s, i);
        if (te ? !o->train_text_encoder : !o->train_unet) continue;
        struct nn_lora *l = &s->map.lora[i];
        l->d_down = s->grad + s->off[i];
        l->d_up = l->d_down + l->rank * l->in;
    }
    int64_t r = s->map.max_rank;
    st = clip_plan_init(&s->cp, clip, batch, tokens, r, 1);
    if (st == LORA_OK) st = unet_plan_init_ex(&s->up, unet, batch, h, w, tokens, 1, r);
    if (st == LORA_OK) st = unet_set_adapters(&s->up, s->map.ad);
    if (st != LORA_OK) { train_free(s); return st; }
    return LORA_OK;
}

void train_free(struct train_state *s) {
    if (!s->ctx) return;
    lora_ctx *ctx = s->ctx;
    if (s->cp.m) clip_plan_free(&s->cp);
    if (s->up.m) unet_plan_free(&s->up);
    train_map_free(&s->map, ctx);
    void *bufs[] = {s->off, s->used, s->grad, s->m, s->v, s->noisy, s->pred, s->target, s->dpred, s->dctx, s->tf};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) lora_free(ctx, bufs[i]);
    memset(s, 0, sizeof *s);
}

void train_zero_grad(struct train_state *s) {
    if (s->grad) memset(s->grad, 0, (size_t)s->n_floats * sizeof(float));
    if (s->used) memset(s->used, 0, (size_t)s->net->n);
}

lora_status train_accumulate(struct train_state *s, const float *latents, const float *noise,
                             const int64_t *timesteps, const int32_t *ids,
                             const float *loss_weights, double *loss) {
    if (!s || !s->ctx || !latents || !noise || !timesteps || !ids)
        return s && s->ctx ? lora_fail(s->ctx, LORA_E_INVALID_ARG, "train_accumulate: missing input")
                           : LORA_E_INVALID_ARG;
    const int64_t B = s->batch, per = s->per;
    for (int64_t b = 0; b < B; b++) {
        if (timesteps[b] < 0 || timesteps[b] >= TRAIN_T)
            return lora_fail(s->ctx, LORA_E_INVALID_ARG, "train_accumulate: timestep %lld of sample %lld outside [0, 1000)",
                             (long long)timesteps[b], (long long)b);
        s->tf[b] = (float)timesteps[b];
    }
    int train_te = s->o.train_text_encoder;
    /* text encoder (kohya get_hidden_states: final_layer_norm(hidden_states[-clip_skip])) */
    LORA_TRY(clip_forward(&s->cp, ids, s->map.te, s->o.clip_skip));
    /* noisy latents and the U-Net */
    train_add_noise(s->noisy, latents, noise, timesteps, s->acp, B, per);
    LORA_TRY(unet_forward(&s->up, s->noisy, s->tf, s->cp.out, s->pred));
    if (s->o.v_parameterization) train_velocity(s->target, latents, noise, timesteps, s->acp, B, per);
    else memcpy(s->target, noise, (size_t)(B * per) * sizeof(float));
    /* loss = mean_b(w_b * mean(d^2)); dL/dpred = 2 d w_b / (per * B) */
    double total = 0;
    for (int64_t b = 0; b < B; b++) {
        double wb = loss_weights ? loss_weights[b] : 1.0, sq = 0;
        float g = (float)(2.0 * wb / ((double)per * (double)B));
        for (int64_t i = b * per; i < (b + 1) * per; i++) {
            float d = s->pred[i] - s->target[i];
            sq += (double)d * d;
            s->dpred[i] = g * d;
        }
        total += wb * sq / (double)per;
    }
    total /= (double)B;
    if (loss) *loss = total;
    if (!isfinite(total))
        return lora_fail(s->ctx, LORA_E_INVALID_ARG, "train_accumulate: the loss is not finite");
    LORA_TRY(unet_backward(&s->up, s->dpred, NULL, train_te ? s->dctx : NULL));
    if (train_te) LORA_TRY(clip_backward(&s->cp, s->dctx, s->map.te));
    /* modules that took part: U-Net ones always; TE ones in the layers that ran */
    for (int64_t i = 0; i < s->net->n; i++) {
        int te = module_is_te(s, i);
        if (te ? !train_te : !s->o.train_unet) continue;
        if (te && s->map.where[i] / CLIP_N_SLOTS >= s->cp.layers_run) continue;
        s->used[i] = 1;
    }
    return LORA_OK;
}

double train_grad_norm(const struct train_state *s) {
    /* torch.nn.utils.clip_grad_norm_: norm of the per-tensor norms */
    double sum = 0;
    for (int64_t i = 0; i < s->net->n; i++) {
        if (!s->used[i]) continue;
        const struct nn_lora *l = &s->map.lora[i];
        const float *g = s->grad + s->off[i];
        int64_t parts[2] = {l->rank * l->in, l->out * l->rank};
        for (int k = 0; k < 2; k++) {
            double t = 0;
            for (int64_t j = 0; j < parts[k]; j++) t += (double)g[j] * g[j];
            float nt = (float)sqrt(t);
            sum += (double)nt * nt;
            g += parts[k];
        }
    }
    return sqrt(sum);
}

static void adamw(float *p, const float *g, float *m, float *v, int64_t n, double lr,
                  const struct train_opts *o, int64_t step) {
    /* torch.optim.AdamW (_single_tensor_adamw) */
    const float decay = (float)(1.0 - lr * o->weight_decay);
    const float b1 = (float)o->beta1, b2 = (float)o->beta2;
    const float a1 = (float)(1.0 - o->beta1), a2 = (float)(1.0 - o->beta2);
    const double bc1 = 1.0 - pow(o->beta1, (double)step), bc2 = 1.0 - pow(o->beta2, (double)step);
    const float step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2), eps = (float)o->eps;
    for (int64_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] = m[i] * b1 + a1 * g[i];
        v[i] = v[i] * b2 + a2 * (g[i] * g[i]);
        float denom = sqrtf(v[i]) / bc2s + eps;
        p[i] = p[i] + -step_size * (m[i] / denom);
    }
}

lora_status train_optimizer_step(struct train_state *s, double *total_norm) {
    if (!s || !s->ctx) return LORA_E_INVALID_ARG;
    double norm = train_grad_norm(s);
    s->last_norm = norm;
    if (total_norm) *total_norm = norm;
    if (!isfinite(norm))
        return lora_fail(s->ctx, LORA_E_INVALID_ARG, "train_optimizer_step: gradient norm is not finite");
    if (s->o.max_grad_norm > 0) {
        float coef = (float)s->o.max_grad_norm / ((float)norm + 1e-6f);
        if (coef < 1.0f)
            for (int64_t i = 0; i < s->net->n; i++) {
                if (!s->used[i]) continue;
                float *g = s->grad + s->off[i];
                for (int64_t j = 0, e = module_floats(&s->net->m[i]); j < e; j++) g[j] *= coef;
            }
    }
    s->steps++;
    for (int64_t i = 0; i < s->net->n; i++) {
        if (!s->used[i]) continue;   /* torch skips parameters without a gradient */
        struct net_module *mm = &s->net->m[i];
        double lr = module_is_te(s, i) ? s->o.text_encoder_lr : s->o.unet_lr;
        const struct nn_lora *l = &s->map.lora[i];
        int64_t nd = l->rank * l->in, nu = l->out * l->rank, o0 = s->off[i];
        adamw(mm->down, s->grad + o0, s->m + o0, s->v + o0, nd, lr, &s->o, s->steps);
        adamw(mm->up, s->grad + o0 + nd, s->m + o0 + nd, s->v + o0 + nd, nu, lr, &s->o, s->steps);
    }
    train_zero_grad(s);
    return LORA_OK;
}

lora_status train_step(struct train_state *s, const float *latents, const float *noise,
                       const int64_t *timesteps, const int32_t *ids, const float *loss_weights,
                       double *loss) {
    if (!s || !s->ctx) return LORA_E_INVALID_ARG;
    train_zero_grad(s);
    LORA_TRY(train_accumulate(s, latents, noise, timesteps, ids, loss_weights, loss));
    return train_optimizer_step(s, NULL);
}
