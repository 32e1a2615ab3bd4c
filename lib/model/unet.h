/* UNet2DConditionModel (diffusers 0.10.2) forward for SD v1/v2: time embedding MLP, conv_in,
 * Cross-attention down blocks (ResnetBlock2D + Transformer2DModel), downsamplers, the
 * cross-attention mid block, up blocks with skip concatenation and upsamplers, norm_out +
 * SiLU + conv_out. proj_in/proj_out as 1x1 conv or Linear (the same arithmetic).
 *
 *   unet_init(&m, be, &sd->unet, &sd->cfg)
 *   unet_plan_init(&p, &m, batch, h, w, tokens)     latent h x w (multiples of 2^(levels-1))
 *   unet_forward(&p, sample, timesteps, context, out)
 * sample/out [batch, in/out ch, h, w], context [batch, tokens, context_dim]: buffers of the
 * backend; timesteps: host floats [batch]. Forward only (no backward yet). */
#ifndef LORA_MODEL_UNET_H
#define LORA_MODEL_UNET_H

#include "model/vae.h"

struct unet_tblock {
    const float *ln1g, *ln1b, *q1, *k1, *v1, *o1w, *o1b;
    const float *ln2g, *ln2b, *q2, *k2, *v2, *o2w, *o2b;
    const float *ln3g, *ln3b, *f1w, *f1b, *f2w, *f2b;
};
struct unet_xf {
    int64_t c, heads;
    const float *gng, *gnb, *piw, *pib, *pow_, *pob;
    struct unet_tblock tb;
};

struct unet_model {
    struct lora_backend_impl *be;
    int64_t levels, layers, groups, ctx_dim, in_ch, out_ch, temb;
    int64_t ch[SD_MAX_LEVELS], attn[SD_MAX_LEVELS], heads[SD_MAX_LEVELS];
    float *weights;
    const float *t1w, *t1b, *t2w, *t2b, *cin_w, *cin_b;
    struct img_resnet dres[SD_MAX_LEVELS][IMG_MAX_LAYERS];
    struct unet_xf dxf[SD_MAX_LEVELS][IMG_MAX_LAYERS];
    const float *dconv_w[SD_MAX_LEVELS], *dconv_b[SD_MAX_LEVELS];
    struct img_resnet mr0, mr1;
    struct unet_xf mxf;
    struct img_resnet ures[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    struct unet_xf uxf[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    const float *uconv_w[SD_MAX_LEVELS], *uconv_b[SD_MAX_LEVELS];
    const float *no_g, *no_b, *cout_w, *cout_b;
};

lora_status unet_init(struct unet_model *m, struct lora_backend_impl *be,
                      const struct tensor_map *unet, const struct sd_config *cfg);
void unet_free(struct unet_model *m);

#define UNET_MAX_SKIPS (1 + SD_MAX_LEVELS * (IMG_MAX_LAYERS + 1))
struct unet_plan {
    const struct unet_model *m;
    int64_t batch, h, w, tokens;
    struct img_ws ws;
    float *ff1, *ff2, *ck, *cv, *lnm, *lnr, *tvec, *tvec_host;
    float *skip[UNET_MAX_SKIPS];
    void *mem;
    void *host;
};
lora_status unet_plan_init(struct unet_plan *p, const struct unet_model *m, int64_t batch,
                           int64_t h, int64_t w, int64_t tokens);
void unet_plan_free(struct unet_plan *p);
lora_status unet_forward(struct unet_plan *p, const float *sample, const float *timesteps,
                         const float *context, float *out);

#endif
