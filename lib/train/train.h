/* One kohya-ss train_network.py training step (spec/kohya-lora.md §1.5-1.8, §4.4, §5.5) on the
 * CPU backend: DDPM schedule (schedule.c), LoRA network -> CLIP / U-Net adapters (adapters.c),
 * and the step itself (step.c): text encoder with TE LoRA (clip_skip), U-Net with U-Net LoRA,
 * eps or v target, kohya's weighted MSE, backward through the U-Net into the context and
 * through CLIP, clip_grad_norm_ over all LoRA parameters, torch.optim.AdamW with a text-encoder
 * and a U-Net learning rate.
 *
 *   train_init(&s, ctx, net, clip, unet, &opts, batch, h, w, tokens)   all memory, once
 *   train_step(&s, latents, noise, timesteps, ids, loss_weights, &loss)
 * or, for gradient accumulation and inspection:
 *   train_zero_grad(&s); train_accumulate(&s, ...) (x k); train_optimizer_step(&s, &norm)
 * Nothing below train_init allocates; nothing prints. The network's down/up weights are updated
 * in place (the network keeps owning them). */
#ifndef LORA_TRAIN_TRAIN_H
#define LORA_TRAIN_TRAIN_H

#include "internal.h"
#include "model/clip.h"
#include "model/unet.h"
#include "network/network.h"

/* ---- schedule.c: diffusers 0.10.2 DDPMScheduler(scaled_linear, 0.00085, 0.012, 1000) ---- */
#define TRAIN_T 1000
/* alphas_cumprod exactly as torch computes it: betas = linspace(sqrt(b0), sqrt(b1), 1000,
 * float32) ** 2, alphas = 1 - betas (float32), cumprod with a double accumulator rounded to
 * float32 per element (torch's CPU cumprod). */
void train_alphas_cumprod(float acp[TRAIN_T]);
/* noisy = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise per sample ([batch, per] each), float32
 * as scheduler.add_noise. Timesteps must lie in [0, 1000). */
void train_add_noise(float *noisy, const float *x0, const float *noise, const int64_t *t,
                     const float *acp, int64_t batch, int64_t per);
/* v = sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0 (scheduler.get_velocity). */
void train_velocity(float *v, const float *x0, const float *noise, const int64_t *t,
                    const float *acp, int64_t batch, int64_t per);
/* kohya --noise_offset: noise[b, c, :] += offset * r[b, c] (r: N(0,1) of shape [B, C, 1, 1]). */
void train_noise_offset(float *noise, const float *r, double offset, int64_t batch, int64_t ch,
                        int64_t hw);

/* ---- adapters.c: a lora_network's modules on the models' adapter slots --------------------- */
struct train_map {
    int64_t n;                        /* = net->n */
    struct nn_lora *lora;             /* [n] adapter copies (gradient pointers set by the caller) */
    int32_t *where;                   /* [n] CLIP: layer*CLIP_N_SLOTS+slot; U-Net: xf*UNET_T_N+target */
    const struct nn_lora **te;        /* [clip layers * CLIP_N_SLOTS], NULL entries: none */
    struct unet_adapters *ad;         /* U-Net adapters (dw all NULL) */
    int64_t max_rank;
};
/* Maps every module: "lora_te_text_model_encoder_layers_<L>_<slot>" onto CLIP slot
 * (L, slot) and "lora_unet_<xf prefix>_{proj_in,proj_out,transformer_blocks_0_<target>}" onto
 * the U-Net transformer target (dots of the diffusers names as underscores). A module that maps
 * nowhere (conv LoCon, another architecture) or has the wrong shape -> LORA_E_UNSUPPORTED /
 * LORA_E_INVALID_ARG naming it. clip or unet may be NULL (their modules are then refused). */
lora_status train_map_init(struct train_map *mp, lora_ctx *ctx, const struct lora_network *net,
                           const struct clip_model *clip, const struct unet_model *unet);
void train_map_free(struct train_map *mp, lora_ctx *ctx);

/* ---- optim.c: optimizers on flat float32 parameter / gradient arrays ------------------------
 * The caller owns parameters, gradients and a state array of train_optim_state_floats(kind, n)
 * floats, zeroed before the first step; `step` counts optimizer steps including this one (1 on
 * the first). Nothing allocates. float32 arithmetic as torch's single-tensor loops.
 *   AdamW  torch.optim.AdamW (state m, v)
 *   SGD    torch.optim.SGD: d = g + wd p; buf = d on step 1, else momentum buf + (1 - dampening)
 *          d; d = nesterov ? d + momentum buf : buf; p -= lr d (state buf; momentum 0: none).
 *          kohya SGDNesterov = momentum 0.9, nesterov.
 *   Lion   lion-pytorch: p *= 1 - lr wd; p -= lr sign(beta1 m + (1 - beta1) g);
 *          m = beta2 m + (1 - beta2) g (state m).
 *   AdamW8bit  bitsandbytes 0.35 AdamW8bit (block_wise, min_8bit_size 4096, no percentile
 *          clipping), a float32 CPU port of its CUDA kernels: the update is
 *          p += -lr sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps sqrt(1-b2^t)), THEN p *= 1 - lr wd.
 *          n < 4096: fp32 m, v (kOptimizer32bit2State). Otherwise the state is blockwise 8-bit
 *          (kOptimizerStatic8bit2StateBlockwise, blocks of 2048): m as codes of the signed
 *          dynamic map, v of the unsigned one, each block with its fp32 absmax; every step
 *          dequantises, updates, takes the new absmax and requantises to the nearest code
 *          (quantize_2D), keeping m's sign. State layout: absmax1[nb], absmax2[nb] floats,
 *          then the m codes [n] and v codes [n] as bytes (nb = ceil(n / 2048)). */
enum train_optim_kind { TRAIN_OPT_ADAMW, TRAIN_OPT_SGD, TRAIN_OPT_LION, TRAIN_OPT_ADAMW8BIT };
struct train_optim_opts {
    enum train_optim_kind kind;
    double beta1, beta2, eps, weight_decay;   /* AdamW, Lion (betas), SGD (weight_decay) */
    double momentum, dampening;               /* SGD */
    int32_t nesterov;                         /* SGD */
};
/* Per kind: AdamW betas (0.9, 0.999), eps 1e-8, wd 0.01; SGD momentum 0, dampening 0, wd 0,
 * no nesterov (torch); Lion betas (0.9, 0.99), wd 0. train_optim_sgd_nesterov: kohya's
 * SGDNesterov (momentum 0.9, nesterov). */
void train_optim_default(struct train_optim_opts *o, enum train_optim_kind kind);
void train_optim_sgd_nesterov(struct train_optim_opts *o);
/* "AdamW", "AdamW8bit", "SGDNesterov", "Lion" (case-insensitive; kohya's --optimizer_type) ->
 * opts with their defaults (AdamW8bit as AdamW); LORA_E_UNSUPPORTED for others (DAdaptation,
 * AdaFactor, SGDNesterov8bit, ...). */
lora_status train_optim_parse(lora_ctx *ctx, const char *name, struct train_optim_opts *o);
/* State floats per parameter tensor of n elements: AdamW 2n, SGD n (0 without momentum), Lion n,
 * AdamW8bit 2n for n < 4096 else 2 ceil(n/2048) + ceil(2n/4). */
int64_t train_optim_state_floats(const struct train_optim_opts *o, int64_t n);
/* One step of n parameters. Options are checked (finite lr >= 0, betas in [0, 1), momentum >= 0,
 * nesterov needs momentum > 0 and dampening 0, step >= 1): LORA_E_INVALID_ARG otherwise. */
/* bitsandbytes create_dynamic_map(signed, n=7): 256 sorted codes in [-1, 1] / [0, 1]. torch's
 * float32 linspace is reproduced with its scalar formula; a few codes may differ from torch's
 * vectorised linspace by an ulp. */
void train_bnb_dynamic_map(float code[256], int is_signed);
lora_status train_optim_step(lora_ctx *ctx, const struct train_optim_opts *o, float *p,
                             const float *g, float *state, int64_t n, double lr, int64_t step);

/* ---- step.c ------------------------------------------------------------------------------- */
struct train_opts {
    double unet_lr, text_encoder_lr;  /* AdamW group learning rates */
    double beta1, beta2, eps, weight_decay;
    double max_grad_norm;             /* 0: no clipping */
    int32_t clip_skip;                /* 0/1: last layer */
    int32_t v_parameterization;       /* target v instead of eps */
    int32_t train_unet, train_text_encoder;
    enum train_optim_kind optimizer;  /* TRAIN_OPT_* (optim.c); betas/eps/weight_decay above */
    double momentum, dampening;       /* SGD */
    int32_t nesterov;
    int32_t unet_train;               /* U-Net plan mode: UNET_TRAIN_CHECKPOINT (default) or
                                         UNET_TRAIN_SAVE_ALL (unet_train_mode()); same gradients */
    int32_t n_chunks;                 /* max_token_length / 75 (1..3): each sample's ids are
                                         n_chunks sequences of `tokens` (tok_encode's layout),
                                         encoded separately and re-joined (clip_rejoin_chunks) */
};
/* kohya/torch defaults: lr 1e-4 both, betas (0.9, 0.999), eps 1e-8, weight decay 0.01,
 * max_grad_norm 1, clip_skip 1, eps target, both trained, AdamW. */
void train_opts_default(struct train_opts *o);

struct train_state {
    lora_ctx *ctx;
    struct lora_network *net;
    const struct clip_model *clip;
    const struct unet_model *unet;
    struct train_opts o;
    int64_t batch, h, w, tokens, per;  /* per = 4*h*w; tokens: CLIP sequence length (77) */
    int64_t n_chunks, ctx_tokens;     /* U-Net context tokens: n_chunks * (tokens - 2) + 2, or tokens */
    struct train_map map;
    struct clip_plan cp;
    struct unet_plan up;
    float acp[TRAIN_T];
    float *grad;                      /* every LoRA parameter, module order, down then up */
    int64_t n_floats;
    int64_t *off;                     /* [n] offset of module i's down in grad */
    float *ostate;                    /* optimizer state (train_optim_state_floats per tensor) */
    int64_t n_state;
    int64_t *soff;                    /* [2n + 1] state offset of tensor 2i (down) / 2i+1 (up) */
    int64_t *tsteps;                  /* [2n] optimizer steps each tensor took (torch's state step) */
    uint8_t *used;                    /* [n] module received a gradient in this accumulation */
    float *noisy, *pred, *target, *dpred, *dctx, *tf;
    float *ctxj, *denc;               /* n_chunks > 1: re-joined context, per-chunk gradient */
    int64_t steps;                    /* optimizer steps taken (AdamW's step) */
    float loss_mult;                  /* dL/dpred multiplier: 1/G (accelerate's backward) x loss scale */
    double last_norm;                 /* total gradient norm before clipping, last step */
};

lora_status train_init(struct train_state *s, lora_ctx *ctx, struct lora_network *net,
                       const struct clip_model *clip, const struct unet_model *unet,
                       const struct train_opts *o, int64_t batch, int64_t h, int64_t w,
                       int64_t tokens);
void train_free(struct train_state *s);
/* Re-plans for batches of batch x h x w latents (buckets, a short last batch); parameters,
 * gradients and optimizer state stay. A no-op when the shape is the current one. */
lora_status train_reshape(struct train_state *s, int64_t batch, int64_t h, int64_t w);
void train_zero_grad(struct train_state *s);
/* Forward + backward of one batch: latents [batch, 4, h, w] (already * 0.18215), noise the
 * same shape, timesteps [batch] in [0, 1000), ids [batch, n_chunks * tokens], loss_weights [batch] or
 * NULL (all 1). Gradients of loss = mean_b(w_b * mean_chw((pred - target)^2)) are ADDED to
 * the accumulated LoRA gradients; *loss (may be NULL) gets the loss. */
lora_status train_accumulate(struct train_state *s, const float *latents, const float *noise,
                             const int64_t *timesteps, const int32_t *ids,
                             const float *loss_weights, double *loss);
/* Multiplies the accumulated gradients by f (GradScaler.unscale_); returns 1 when any of them
 * is inf or NaN afterwards. */
int train_unscale_grads(struct train_state *s, float f);
/* Total L2 norm of the accumulated gradients (modules that got one). */
double train_grad_norm(const struct train_state *s);
/* clip_grad_norm_(max_grad_norm) then one step of the optimizer (o.optimizer, optim.c) on each
 * group with the group's lr (o.text_encoder_lr / o.unet_lr), then zero the gradients.
 * *total_norm (may be NULL): the norm before clipping. */
lora_status train_optimizer_step(struct train_state *s, double *total_norm);
/* zero_grad + accumulate + optimizer_step. */
lora_status train_step(struct train_state *s, const float *latents, const float *noise,
                       const int64_t *timesteps, const int32_t *ids, const float *loss_weights,
                       double *loss);

/* ---- loss_scale.c: torch.cuda.amp.GradScaler (init 65536, growth 2 every 2000 good steps,
 * backoff 0.5) as accelerate uses it for mixed_precision fp16. The loss is multiplied by
 * `scale` before backward; the gradients by train_scaler_inv() before clipping; a step whose
 * gradients hold an inf/NaN is skipped (optimizer and LR scheduler both), the scale halves and
 * `skipped` counts it. Disabled: scale 1, nothing is ever skipped. */
struct train_scaler {
    int32_t enabled;
    float scale, growth_factor, backoff_factor;
    int64_t growth_interval, growth_tracker;
    int64_t skipped;
};
void train_scaler_init(struct train_scaler *s, int enabled);
float train_scaler_inv(const struct train_scaler *s);
/* After a step's gradients were checked: returns 1 when the step must be skipped. */
int train_scaler_update(struct train_scaler *s, int found_inf);

/* ---- lr_sched.c: diffusers get_scheduler (0.10.2 functions, kohya FEB's get_scheduler_fix) ----
 * lr(step) = base_lr * factor(step), step = scheduler.step() calls so far (accelerate 0.15 steps
 * the scheduler on every micro-step, so total = max_train_steps * gradient_accumulation_steps).
 *   constant                   1 (warmup ignored, as get_scheduler passes none)
 *   constant_with_warmup       step/max(1,warmup) during warmup, then 1
 *   linear                     then max(0, (total - step) / max(1, total - warmup))
 *   cosine                     then max(0, 0.5 (1 + cos(pi * 2 * 0.5 * progress))), progress =
 *                              (step - warmup) / max(1, total - warmup) (rises again past total,
 *                              as diffusers does)
 *   cosine_with_restarts       then 0 if progress >= 1, else 0.5 (1 + cos(pi * ((cycles *
 *                              progress) mod 1)))
 *   polynomial                 then (lr_range * (1 - (step - warmup)/(total - warmup))^power +
 *                              lr_end) / lr_init, and lr_end / lr_init past total, with
 *                              lr_range = lr_init - lr_end; lr_init is the optimizer's default lr
 *                              (kohya's --learning_rate), which may differ from a group's lr. */
enum train_lr_kind {
    TRAIN_LR_CONSTANT, TRAIN_LR_CONSTANT_WITH_WARMUP, TRAIN_LR_LINEAR, TRAIN_LR_COSINE,
    TRAIN_LR_COSINE_WITH_RESTARTS, TRAIN_LR_POLYNOMIAL
};
struct train_lr_schedule {
    enum train_lr_kind kind;
    int64_t warmup, total;    /* lr_warmup_steps, num_training_steps */
    double num_cycles;        /* cosine_with_restarts (kohya default 1) */
    double power, lr_end;     /* polynomial (kohya default power 1; lr_end 1e-7) */
    double lr_init;           /* polynomial: optimizer default lr; <= 0: the base lr itself */
};
/* kind constant, warmup 0, total 1, num_cycles 1, power 1, lr_end 1e-7, lr_init 0. */
void train_lr_schedule_default(struct train_lr_schedule *s);
/* "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
 * "polynomial" -> kind; LORA_E_INVALID_ARG for other names (NULL ctx allowed). */
lora_status train_lr_kind_parse(lora_ctx *ctx, const char *name, enum train_lr_kind *kind);
const char *train_lr_kind_name(enum train_lr_kind kind);
/* The multiplier of base_lr after `step` scheduler steps (double, as Python computes it). */
double train_lr_factor(const struct train_lr_schedule *s, double base_lr, int64_t step);
/* base_lr * train_lr_factor(s, base_lr, step). */
double train_lr_at(const struct train_lr_schedule *s, double base_lr, int64_t step);

#endif
