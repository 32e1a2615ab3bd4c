/* UNet2DConditionModel (diffusers 0.10.2) forward for SD v1/v2: time embedding MLP, conv_in,
 * Cross-attention down blocks (ResnetBlock2D + Transformer2DModel), downsamplers, the
 * cross-attention mid block, up blocks with skip concatenation and upsamplers, norm_out +
 * SiLU + conv_out. proj_in/proj_out as 1x1 conv or Linear (the same arithmetic).
 *
 *   unet_init(&m, be, &sd->unet, &sd->cfg)
 *   unet_plan_init(&p, &m, batch, h, w, tokens)     latent h x w (any size >= 1: a level is
 *                                                   ceil(previous / 2); with a side that is not
 *                                                   a multiple of 2^(levels-1) each upsampler
 *                                                   resizes to its skip's size, as diffusers'
 *                                                   forward_upsample_size does)
 *   unet_forward(&p, sample, timesteps, context, out)
 * sample/out [batch, in/out ch, h, w], context [batch, tokens, context_dim]: buffers of the
 * backend; timesteps: host floats [batch].
 *
 * Training (input gradients, LoRA gradients, optional base-weight gradients of the Linear and
 * proj layers of the transformers):
 *   unet_plan_init_ex(&p, &m, batch, h, w, tokens, 1, max_rank)   train plan (one allocation)
 *   unet_set_adapters(&p, &ad)        LoRA / dW per transformer target (NULL: none)
 *   unet_forward(&p, ...)             saves every block's input (context is borrowed: it must
 *                                     stay unchanged until the backward)
 *   unet_backward(&p, dout, d_sample, d_context)
 * The backward recomputes each block's internals from its saved input (per-block
 * checkpointing; with train = UNET_TRAIN_SAVE_ALL the transformers' internals are kept
 * instead, except the LayerNorm and GEGLU outputs, recomputed elementwise) and then runs the
 * block backward; base weights are frozen. d_sample and d_context are written (either may be
 * NULL); LoRA d_down/d_up and dW accumulate. One backward per forward.
 *
 * Memory (SD1.5, 64x64 latents, batch 1): the weights (F16/BF16 matrices kept 16-bit and
 * widened per GEMM into one scratch of the largest matrix; or borrowed from the checkpoint,
 * unet_init_ex), plus one plan: activation buffers sized by the widest level (concat of
 * neighbouring widths), im2col in bands of output rows (UNET_COLS_CAP), attention in query
 * blocks (no full score matrix), the saved block inputs and skips, and with SAVE_ALL the
 * transformers' intermediates (most of a save-all plan). */
#ifndef LORA_MODEL_UNET_H
#define LORA_MODEL_UNET_H

#include "model/vae.h"

/* Weight matrices are struct img_mat (vae.h): an F16/BF16 checkpoint's U-Net matrices stay
 * 16-bit in memory (half of the fp32 3.4 GB of SD1.5) and are widened, exactly, into the
 * plan's scratch right before each GEMM; vectors (biases, norms) are fp32. */
struct unet_tblock {
    const float *ln1g, *ln1b, *o1b, *ln2g, *ln2b, *o2b, *ln3g, *ln3b, *f1b, *f2b;
    struct img_mat q1, k1, v1, o1w, q2, k2, v2, o2w, f1w, f2w;
};
struct unet_xf {
    int64_t c, heads, index;    /* index: forward order (down, mid, up) */
    char name[48];              /* diffusers prefix, e.g. "down_blocks.0.attentions.1" */
    const float *gng, *gnb, *pib, *pob;
    struct img_mat piw, pow_;
    struct unet_tblock tb;
};

struct unet_model {
    struct lora_backend_impl *be;
    int64_t levels, layers, groups, ctx_dim, in_ch, out_ch, temb;
    int64_t ch[SD_MAX_LEVELS], attn[SD_MAX_LEVELS], heads[SD_MAX_LEVELS];
    float *weights;
    uint64_t weight_bytes;
    int64_t wmax;               /* largest 16-bit matrix (elements): the plan's widening buffer */
    const float *t1b, *t2b, *cin_b;
    struct img_mat t1w, t2w, cin_w;
    struct img_resnet dres[SD_MAX_LEVELS][IMG_MAX_LAYERS];
    struct unet_xf dxf[SD_MAX_LEVELS][IMG_MAX_LAYERS];
    struct img_mat dconv_w[SD_MAX_LEVELS];
    const float *dconv_b[SD_MAX_LEVELS];
    struct img_resnet mr0, mr1;
    struct unet_xf mxf;
    struct img_resnet ures[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    struct unet_xf uxf[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    struct img_mat uconv_w[SD_MAX_LEVELS], cout_w;
    const float *uconv_b[SD_MAX_LEVELS];
    const float *no_g, *no_b, *cout_b;
    int64_t n_xf;
    const struct unet_xf *xf[64];   /* every transformer in forward order */
};

/* LoRA targets of a transformer (kohya's U-Net targets: Transformer2DModel's Linear / 1x1
 * conv layers). */
enum unet_target {
    UNET_T_Q1, UNET_T_K1, UNET_T_V1, UNET_T_O1,     /* attn1.to_q/k/v, attn1.to_out.0 */
    UNET_T_Q2, UNET_T_K2, UNET_T_V2, UNET_T_O2,     /* attn2.* (k2/v2 read the context) */
    UNET_T_FF0, UNET_T_FF2,                         /* ff.net.0.proj, ff.net.2 */
    UNET_T_PROJ_IN, UNET_T_PROJ_OUT,
    UNET_T_N
};
extern const char *const unet_target_names[UNET_T_N];   /* "attn1.to_q", ..., "proj_in" */
/* Per transformer (unet_model.xf order) and target: a LoRA adapter (forward and backward;
 * its rank <= the plan's max_rank) and/or a base-weight gradient [out, in] (accumulated in
 * the backward). NULL: none. */
struct unet_adapters {
    const struct nn_lora *lora[64][UNET_T_N];
    float *dw[64][UNET_T_N];
};

lora_status unet_init(struct unet_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *unet, const struct sd_config *cfg);
/* unet_init with flags: UNET_BORROW_16BIT (CPU backend only; elsewhere ignored): the 16-bit
 * matrices point into `unet`'s tensor data (for a safetensors checkpoint, its read-only
 * mapping) instead of a copy: no weight memory of its own, but `unet` must then stay loaded
 * and unchanged until unet_free. */
#define UNET_BORROW_16BIT 1
lora_status unet_init_ex(struct unet_model *m, struct lora_backend_impl *be,
                         const struct tensor_map *unet, const struct sd_config *cfg, int flags);
/* The plan mode for kohya's gradient_checkpointing flag (LORA_P_GRADIENT_CHECKPOINTING):
 * on -> UNET_TRAIN_CHECKPOINT (per-block recompute), off -> UNET_TRAIN_SAVE_ALL (kohya's
 * default: every transformer intermediate kept, no recompute). Same gradients either way. */
#define unet_train_mode(gradient_checkpointing) \
    ((gradient_checkpointing) ? UNET_TRAIN_CHECKPOINT : UNET_TRAIN_SAVE_ALL)
void unet_free(struct unet_model *m);

#define UNET_MAX_SKIPS (1 + SD_MAX_LEVELS * (IMG_MAX_LAYERS + 1))
#define UNET_MAX_SLOTS (4 * SD_MAX_LEVELS * (IMG_MAX_LAYERS + 1) + 4)
#define UNET_NTOK 20
/* im2col scratch cap (floats): SD1.5 at 64x64 needs 35M (960 channels x 9 x 4096), unbanded;
 * narrower bands measured 20% slower (GEMMs of under ~2k columns) */
#define UNET_COLS_CAP ((int64_t)48 << 20)
#define UNET_NSAVED 14                 /* transformer intermediates kept for the backward */
/* A transformer's forward intermediates the backward reads: recomputed into shared buffers
 * (checkpointing) or kept per transformer from the forward (UNET_TRAIN_SAVE_ALL). */
struct unet_xsave {
    float *tok[UNET_NSAVED];
    float *ff1, *ff2, *ck, *cv, *sm[3], *sr[3], *gm, *gr;
};
/* unet_plan_init_ex's `train` */
#define UNET_FORWARD 0
#define UNET_TRAIN_CHECKPOINT 1        /* gradient_checkpointing: per-block recompute */
#define UNET_TRAIN_SAVE_ALL 2          /* the forward keeps every transformer's intermediates */
struct unet_plan {
    const struct unet_model *m;
    int64_t batch, h, w, tokens;
    int train;                         /* 0, or 1 (checkpointing) / 2 (save all): see UNET_TRAIN_* */
    int64_t max_rank, tok_floats;
    struct unet_xsave rec;             /* the recompute set (train 1) */
    struct unet_xsave xs[64];          /* per transformer (unet_model.xf order; train 2) */
    const struct unet_adapters *ad;
    const float *ctx;                  /* the forward's context (train) */
    float *lh, *ldh;                   /* LoRA down activations / their gradient */
    float *tok[UNET_NTOK];             /* transformer recompute + gradient buffers */
    float *dff1, *dff2, *dck, *dcv, *gm, *gr, *sm[3], *sr[3], *rm[2], *rr[2];
    float *slot[UNET_MAX_SLOTS];       /* saved block inputs */
    float *dskip[UNET_MAX_SKIPS];
    int64_t nslot;
    uint64_t bytes;
    struct img_ws ws;
    float *ff1, *ff2, *ck, *cv, *lnm, *lnr, *tvec, *tvec_host;
    float *skip[UNET_MAX_SKIPS];
    void *mem;
    void *host;
};
lora_status unet_plan_init(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                           int64_t h, int64_t w, int64_t tokens);
/* train: UNET_FORWARD, or also the backward buffers: UNET_TRAIN_CHECKPOINT (the backward
 * recomputes each transformer's internals from its saved input: gradient_checkpointing) or
 * UNET_TRAIN_SAVE_ALL (the forward keeps them: more memory, no recompute; same gradients).
 * Resnet blocks recompute their first conv in both modes. max_rank: the largest LoRA rank used
 * (0: none). */
lora_status unet_plan_init_ex(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                              int64_t h, int64_t w, int64_t tokens, int train, int64_t max_rank);
void unet_plan_free(struct unet_plan *p);
/* Adapters used by the next forward and backward (NULL: none); borrowed. */
lora_status unet_set_adapters(struct unet_plan *p, const struct unet_adapters *ad);
/* dout [batch, out_ch, h, w]: the loss gradient of the last forward's output. */
lora_status unet_backward(struct unet_plan *p, const float *dout, float *d_sample, float *d_context);
/* bytes of the plan's work allocation */
uint64_t unet_plan_bytes(const struct unet_plan *p);
lora_status unet_forward(struct unet_plan *p, const float *sample, const float *timesteps,
                         const float *context, float *out);

#endif
