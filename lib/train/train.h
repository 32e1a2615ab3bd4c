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

/* ---- step.c ------------------------------------------------------------------------------- */
struct train_opts {
    double unet_lr, text_encoder_lr;  /* AdamW group learning rates */
    double beta1, beta2, eps, weight_decay;
    double max_grad_norm;             /* 0: no clipping */
    int32_t clip_skip;                /* 0/1: last layer */
    int32_t v_parameterization;       /* target v instead of eps */
    int32_t train_unet, train_text_encoder;
};
/* kohya/torch defaults: lr 1e-4 both, betas (0.9, 0.999), eps 1e-8, weight decay 0.01,
 * max_grad_norm 1, clip_skip 1, eps target, both trained. */
void train_opts_default(struct train_opts *o);

struct train_state {
    lora_ctx *ctx;
    struct lora_network *net;
    const struct clip_model *clip;
    const struct unet_model *unet;
    struct train_opts o;
    int64_t batch, h, w, tokens, per;  /* per = 4*h*w */
    struct train_map map;
    struct clip_plan cp;
    struct unet_plan up;
    float acp[TRAIN_T];
    float *grad, *m, *v;              /* every LoRA parameter, module order, down then up */
    int64_t n_floats;
    int64_t *off;                     /* [n] offset of module i's down in grad/m/v */
    uint8_t *used;                    /* [n] module received a gradient in this accumulation */
    float *noisy, *pred, *target, *dpred, *dctx, *tf;
    int64_t steps;                    /* optimizer steps taken (AdamW's step) */
    double last_norm;                 /* total gradient norm before clipping, last step */
};

lora_status train_init(struct train_state *s, lora_ctx *ctx, struct lora_network *net,
                       const struct clip_model *clip, const struct unet_model *unet,
                       const struct train_opts *o, int64_t batch, int64_t h, int64_t w,
                       int64_t tokens);
void train_free(struct train_state *s);
void train_zero_grad(struct train_state *s);
/* Forward + backward of one batch: latents [batch, 4, h, w] (already * 0.18215), noise the
 * same shape, timesteps [batch] in [0, 1000), ids [batch, tokens], loss_weights [batch] or
 * NULL (all 1). Gradients of loss = mean_b(w_b * mean_chw((pred - target)^2)) are ADDED to
 * the accumulated LoRA gradients; *loss (may be NULL) gets the loss. */
lora_status train_accumulate(struct train_state *s, const float *latents, const float *noise,
                             const int64_t *timesteps, const int32_t *ids,
                             const float *loss_weights, double *loss);
/* Total L2 norm of the accumulated gradients (modules that got one). */
double train_grad_norm(const struct train_state *s);
/* clip_grad_norm_(max_grad_norm) then one AdamW step on each group, then zero the gradients.
 * *total_norm (may be NULL): the norm before clipping. */
lora_status train_optimizer_step(struct train_state *s, double *total_norm);
/* zero_grad + accumulate + optimizer_step. */
lora_status train_step(struct train_state *s, const float *latents, const float *noise,
                       const int64_t *timesteps, const int32_t *ids, const float *loss_weights,
                       double *loss);

#endif
