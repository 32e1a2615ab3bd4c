/* AutoencoderKL (diffusers 0.10.2) encoder and decoder forward, and the building blocks the
 * U-Net shares with it (img_*: fp32 weight loading by name, ResnetBlock2D, the work buffers
 * of a plan).
 *
 * Use:
 *   vae_init(&m, be, &sd->vae, &sd->cfg)       weights -> fp32, one backend buffer
 *   vae_plan_init(&p, &m, batch, h, w)         work buffers for images of h x w, once
 *   vae_encode(&p, image, mean, logvar)        image [batch, 3, h, w] -> [batch, latent, h/f, w/f]
 *   vae_decode(&p, latent, image)              the reverse (latent of the plan's h/f x w/f)
 * f = 2^(levels-1). Every pointer is a buffer of the model's backend. Forward only. */
#ifndef LORA_MODEL_VAE_H
#define LORA_MODEL_VAE_H

#include "model/sd_model.h"
#include "nn/nn.h"

#define IMG_MAX_LAYERS 4

/* ---- shared: weights by name ------------------------------------------------------------ */
struct img_weights {
    struct lora_backend_impl *be;
    const struct tensor_map *tm;
    const char *what;           /* "vae", "unet": error messages */
    int pass;                   /* 0: size and check, 1: carve and load */
    char *base;
    uint64_t off;
    void *stage;
    size_t stage_cap;
    lora_status err;            /* first error */
};
/* The fp32 copy of tensor `name` (printf format) with `numel` elements: NULL in pass 0 and on
 * error (recorded in w->err). */
const float *img_w(struct img_weights *w, int64_t numel, const char *fmt, ...);

/* ResnetBlock2D (pre-norm, GroupNorm+SiLU, 3x3 convs, optional time projection, 1x1
 * conv_shortcut when cin != cout, output scale 1). */
struct img_resnet {
    int64_t cin, cout, temb;    /* temb: time-embedding width, 0 = none */
    const float *n1g, *n1b, *c1w, *c1b, *tw, *tb, *n2g, *n2b, *c2w, *c2b, *scw, *scb;
};
void img_resnet_load(struct img_weights *w, struct img_resnet *r, int64_t cin, int64_t cout,
                     int64_t temb, const char *prefix);

/* Work buffers of a plan: `nbuf` activations of act_floats each, conv columns, GroupNorm
 * statistics, attention scratch, small per-sample vectors. */
#define IMG_NBUF 8
struct img_ws {
    float *buf[IMG_NBUF];
    int64_t act_floats;
    float *cols;
    int64_t cols_floats;
    float *mean, *rstd;         /* [batch * max groups] */
    float *att;
    int64_t att_floats;
    float *vec[4];              /* [batch * vec_floats] each (time embedding and projections) */
};
struct img_ctx {
    struct lora_backend_impl *be;
    struct img_ws *ws;
    int64_t groups;
    float eps;
};
/* y = resnet(x) on [batch, cin, h, w] -> [batch, cout, h, w]; temb_act: SiLU(temb) [batch,
 * temb] or NULL; uses ws->buf[t0], ws->buf[t0+1] and ws->vec[3]. y must not alias x. */
lora_status img_resnet_forward(struct img_ctx *c, const struct img_resnet *r, float *y,
                               const float *x, const float *temb_act, int64_t batch, int64_t h,
                               int64_t w, int t0);
/* conv with torch padding p on all sides */
lora_status img_conv(struct img_ctx *c, float *y, const float *x, const float *wt, const float *b,
                     int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout, int64_t k,
                     int64_t stride, int64_t pad);

/* ---- the VAE ------------------------------------------------------------------------------ */
struct vae_attn {
    const float *gn_g, *gn_b, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
};
struct vae_mid {
    struct img_resnet r0, r1;
    struct vae_attn a;
};

struct vae_model {
    struct lora_backend_impl *be;
    int64_t levels, layers, groups, latent, in_ch;
    int64_t ch[SD_MAX_LEVELS];
    float *weights;
    /* encoder */
    const float *e_in_w, *e_in_b;
    struct img_resnet e_res[SD_MAX_LEVELS][IMG_MAX_LAYERS];
    const float *e_down_w[SD_MAX_LEVELS], *e_down_b[SD_MAX_LEVELS];
    struct vae_mid e_mid;
    const float *e_no_g, *e_no_b, *e_out_w, *e_out_b, *quant_w, *quant_b;
    /* decoder */
    const float *pq_w, *pq_b, *d_in_w, *d_in_b;
    struct vae_mid d_mid;
    struct img_resnet d_res[SD_MAX_LEVELS][IMG_MAX_LAYERS + 1];
    const float *d_up_w[SD_MAX_LEVELS], *d_up_b[SD_MAX_LEVELS];
    const float *d_no_g, *d_no_b, *d_out_w, *d_out_b;
};

lora_status vae_init(struct vae_model *m, struct lora_backend_impl *be,
                     const struct tensor_map *vae, const struct sd_config *cfg);
void vae_free(struct vae_model *m);

struct vae_plan {
    const struct vae_model *m;
    int64_t batch, h, w;        /* image size; the latent is h/f x w/f */
    struct img_ws ws;
    void *mem;
};
lora_status vae_plan_init(struct vae_plan *p, const struct vae_model *m, int64_t batch, int64_t h,
                          int64_t w);
void vae_plan_free(struct vae_plan *p);
/* mean, logvar [batch, latent, h/f, w/f]; logvar clamped to [-30, 20]. */
lora_status vae_encode(struct vae_plan *p, const float *image, float *mean, float *logvar);
/* image [batch, out_ch(3), h, w] from latent [batch, latent, h/f, w/f] (unscaled). */
lora_status vae_decode(struct vae_plan *p, const float *latent, float *image);

#endif
