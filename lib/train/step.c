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
    o->optimizer = TRAIN_OPT_ADAMW;
    o->unet_train = UNET_TRAIN_CHECKPOINT;
}

/* The optimizer options of one step: train_opts' betas/eps/weight decay/momentum. */
static void optim_opts(const struct train_opts *o, struct train_optim_opts *oo) {
    memset(oo, 0, sizeof *oo);
    oo->kind = o->optimizer;
    oo->beta1 = o->beta1;
    oo->beta2 = o->beta2;
    oo->eps = o->eps;
    oo->weight_decay = o->weight_decay;
    oo->momentum = o->momentum;
    oo->dampening = o->dampening;
    oo->nesterov = o->nesterov;
}

static int module_is_te(const struct train_state *s, int64_t i) {
    return strncmp(s->net->m[i].name, "lora_te_", 8) == 0;
}

static int64_t module_floats(const struct net_module *mm) {
    return mm->nn.rank * mm->nn.in + mm->nn.out * mm->nn.rank;
}

/* Plans and activation buffers for batches of batch x h x w (everything shape-dependent). */
static void shape_free(struct train_state *s) {
    lora_ctx *ctx = s->ctx;
    if (s->cp.m) clip_plan_free(&s->cp);
    if (s->up.m) unet_plan_free(&s->up);
    memset(&s->cp, 0, sizeof s->cp);
    memset(&s->up, 0, sizeof s->up);
    void *bufs[] = {s->noisy, s->pred, s->target, s->dpred, s->dctx, s->tf, s->ctxj, s->denc};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) lora_free(ctx, bufs[i]);
    s->noisy = s->pred = s->target = s->dpred = s->dctx = s->tf = s->ctxj = s->denc = NULL;
}

static lora_status shape_init(struct train_state *s, int64_t batch, int64_t h, int64_t w) {
    lora_ctx *ctx = s->ctx;
    int64_t per = 0, lat = 0, nctx = 0;
    const int64_t nk = s->n_chunks, hid = s->clip->hidden;
    if (batch < 1 || h < 1 || w < 1 || h > (1 << 20) || w > (1 << 20) || !ck_mul_i64(4 * h, w, &per) ||
        !ck_mul_i64(batch, per, &lat) || !ck_mul_i64(batch, s->ctx_tokens, &nctx) ||
        !ck_mul_i64(nctx, hid, &nctx) || batch > INT64_MAX / (nk * s->tokens * hid))
        return lora_fail(ctx, LORA_E_LIMIT, "train: batch %lld of %lldx%lld latents is too large",
                         (long long)batch, (long long)h, (long long)w);
    s->batch = batch;
    s->h = h;
    s->w = w;
    s->per = per;
    s->noisy = lora_calloc(ctx, (size_t)lat, sizeof(float));
    s->pred = lora_calloc(ctx, (size_t)lat, sizeof(float));
    s->target = lora_calloc(ctx, (size_t)lat, sizeof(float));
    s->dpred = lora_calloc(ctx, (size_t)lat, sizeof(float));
    s->dctx = lora_calloc(ctx, (size_t)nctx, sizeof(float));
    s->tf = lora_calloc(ctx, (size_t)batch, sizeof(float));
    if (nk > 1) {   /* the re-joined context and its gradient per chunk */
        s->ctxj = lora_calloc(ctx, (size_t)nctx, sizeof(float));
        s->denc = lora_calloc(ctx, (size_t)(batch * nk * s->tokens * hid), sizeof(float));
    }
    if (!s->noisy || !s->pred || !s->target || !s->dpred || !s->dctx || !s->tf || (nk > 1 && (!s->ctxj || !s->denc))) {
        shape_free(s);
        return LORA_E_NOMEM;
    }
    int64_t r = s->map.max_rank;
    lora_status st = clip_plan_init(&s->cp, s->clip, batch * nk, s->tokens, r, 1);
    int mode = s->o.unet_train == UNET_TRAIN_SAVE_ALL ? UNET_TRAIN_SAVE_ALL : UNET_TRAIN_CHECKPOINT;
    if (st == LORA_OK) st = unet_plan_init_ex(&s->up, s->unet, batch, h, w, s->ctx_tokens, mode, r);
    if (st == LORA_OK) st = unet_set_adapters(&s->up, s->map.ad);
    if (st != LORA_OK) shape_free(s);
    return st;
}

lora_status train_reshape(struct train_state *s, int64_t batch, int64_t h, int64_t w) {
    if (!s || !s->ctx) return LORA_E_INVALID_ARG;
    if (s->cp.m && s->batch == batch && s->h == h && s->w == w) return LORA_OK;
    shape_free(s);
    return shape_init(s, batch, h, w);
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
    s->tokens = tokens;
    s->n_chunks = o->n_chunks > 1 ? o->n_chunks : 1;
    s->ctx_tokens = s->n_chunks > 1 ? s->n_chunks * (tokens - 2) + 2 : tokens;
    if (s->n_chunks > 1 && (s->n_chunks > 3 || tokens < 3))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_init: %lld chunks of %lld tokens", (long long)s->n_chunks,
                         (long long)tokens);
    s->loss_mult = 1.0f;
    train_alphas_cumprod(s->acp);
    lora_status st = train_map_init(&s->map, ctx, net, clip, unet);
    if (st != LORA_OK) return st;
    int64_t n = net->n;
    struct train_optim_opts oo;
    optim_opts(o, &oo);
    s->off = lora_calloc(ctx, (size_t)(n ? n : 1), sizeof *s->off);
    s->used = lora_calloc(ctx, (size_t)(n ? n : 1), 1);
    s->soff = lora_calloc(ctx, (size_t)(2 * n + 1), sizeof *s->soff);
    s->tsteps = lora_calloc(ctx, (size_t)(2 * n + 1), sizeof *s->tsteps);
    if (!s->off || !s->used || !s->soff || !s->tsteps) { train_free(s); return LORA_E_NOMEM; }
    for (int64_t i = 0; i < n; i++) {
        const struct net_module *mm = &net->m[i];
        s->off[i] = s->n_floats;
        s->n_floats += module_floats(mm);
        s->soff[2 * i] = s->n_state;
        s->n_state += train_optim_state_floats(&oo, mm->nn.rank * mm->nn.in);
        s->soff[2 * i + 1] = s->n_state;
        s->n_state += train_optim_state_floats(&oo, mm->nn.out * mm->nn.rank);
    }
    s->soff[2 * n] = s->n_state;
    s->grad = lora_calloc(ctx, (size_t)(s->n_floats ? s->n_floats : 1), sizeof(float));
    s->ostate = lora_calloc(ctx, (size_t)(s->n_state ? s->n_state : 1), sizeof(float));
    if (!s->grad || !s->ostate) { train_free(s); return LORA_E_NOMEM; }
    for (int64_t i = 0; i < n; i++) {
        int te = module_is_te(s, i);
        if (te ? !o->train_text_encoder : !o->train_unet) continue;
        struct nn_lora *l = &s->map.lora[i];
        l->d_down = s->grad + s->off[i];
        l->d_up = l->d_down + l->rank * l->in;
    }
    st = shape_init(s, batch, h, w);
    if (st != LORA_OK) { train_free(s); return st; }
    return LORA_OK;
}

void train_free(struct train_state *s) {
    if (!s->ctx) return;
    lora_ctx *ctx = s->ctx;
    shape_free(s);
    train_map_free(&s->map, ctx);
    void *bufs[] = {s->off, s->used, s->grad, s->ostate, s->soff, s->tsteps};
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
    const float *cond = s->cp.out;
    const int64_t nk = s->n_chunks, hid = s->clip->hidden;
    if (nk > 1) {   /* kohya get_hidden_states: the chunks re-joined (host memory: CPU backend) */
        clip_rejoin_chunks(s->ctxj, s->cp.out, B, nk, s->tokens, hid);
        cond = s->ctxj;
    }
    LORA_TRY(unet_forward(&s->up, s->noisy, s->tf, cond, s->pred));
    if (s->o.v_parameterization) train_velocity(s->target, latents, noise, timesteps, s->acp, B, per);
    else memcpy(s->target, noise, (size_t)(B * per) * sizeof(float));
    /* loss = mean_b(w_b * mean(d^2)); dL/dpred = 2 d w_b / (per * B) */
    double total = 0;
    for (int64_t b = 0; b < B; b++) {
        double wb = loss_weights ? loss_weights[b] : 1.0, sq = 0;
        float g = (float)(2.0 * wb / ((double)per * (double)B)) * s->loss_mult;
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
        return lora_fail(s->ctx, LORA_E_NAN_LOSS, "train_accumulate: the loss is not finite (%g)", total);
    LORA_TRY(unet_backward(&s->up, s->dpred, NULL, train_te ? s->dctx : NULL));
    if (train_te && nk > 1) {
        clip_rejoin_chunks_backward(s->denc, s->dctx, B, nk, s->tokens, hid);
        LORA_TRY(clip_backward(&s->cp, s->denc, s->map.te));
    } else if (train_te) {
        LORA_TRY(clip_backward(&s->cp, s->dctx, s->map.te));
    }
    /* modules that took part: U-Net ones always; TE ones in the layers that ran */
    for (int64_t i = 0; i < s->net->n; i++) {
        int te = module_is_te(s, i);
        if (te ? !train_te : !s->o.train_unet) continue;
        if (te && s->map.where[i] / CLIP_N_SLOTS >= s->cp.layers_run) continue;
        s->used[i] = 1;
    }
    return LORA_OK;
}

int train_unscale_grads(struct train_state *s, float f) {
    int bad = 0;
    for (int64_t i = 0; i < s->net->n; i++) {
        if (!s->used[i]) continue;
        float *g = s->grad + s->off[i];
        for (int64_t j = 0, e = module_floats(&s->net->m[i]); j < e; j++) {
            g[j] *= f;
            bad |= !isfinite(g[j]);
        }
    }
    return bad;
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
    struct train_optim_opts oo;
    optim_opts(&s->o, &oo);
    for (int64_t i = 0; i < s->net->n; i++) {
        if (!s->used[i]) continue;   /* torch skips parameters without a gradient */
        struct net_module *mm = &s->net->m[i];
        double lr = module_is_te(s, i) ? s->o.text_encoder_lr : s->o.unet_lr;
        const struct nn_lora *l = &s->map.lora[i];
        int64_t nd = l->rank * l->in, nu = l->out * l->rank, o0 = s->off[i];
        /* each tensor counts its own steps, as torch's per-parameter state does */
        LORA_TRY(train_optim_step(s->ctx, &oo, mm->down, s->grad + o0, s->ostate + s->soff[2 * i], nd, lr,
                                  ++s->tsteps[2 * i]));
        LORA_TRY(train_optim_step(s->ctx, &oo, mm->up, s->grad + o0 + nd, s->ostate + s->soff[2 * i + 1], nu,
                                  lr, ++s->tsteps[2 * i + 1]));
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
