/* AutoencoderKL (diffusers 0.10.2) encoder and decoder forward, and the building blocks the
 * U-Net shares with it (img_*: fp32 weight loading by name, ResnetBlock2D, the work buffers
 * of a plan).
 *
 * Use:
 *   vae_init(&m, be, &sd->vae, &sd->cfg)       weights -> fp32, one backend buffer
 *   vae_plan_init(&p, &m, batch, h, w)         work buffers for images of h x w, once
 *   vae_encode(&p, image, mean, logvar)        image [batch, 3, h, w] -> [batch, latent, h/f, w/f]
 *   vae_decode(&p, latent, image)              the reverse (latent of the plan's h/f x w/f)
 * f = 2^(levels-1). Every pointer is a buffer of the model's backend (the tiled variants at
 * the end take host buffers). Forward only: kohya never backpropagates through the VAE (it
 * encodes training images under no_grad), so there is no VAE backward. */
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
    int keep16;                 /* img_m keeps F16/BF16 tensors as they are ... */
    int borrow16;               /* ... pointing into the tensor map's memory (host backends) */
    int64_t wmax;               /* largest 16-bit matrix (elements): the plans' widening scratch */
};
/* The fp32 copy of tensor `name` (printf format) with `numel` elements: NULL in pass 0 and on
 * error (recorded in w->err). */
const float *img_w(struct img_weights *w, int64_t numel, const char *fmt, ...);

/* A frozen weight matrix (conv / linear) as the model stores it: fp32, or, for an F16/BF16
 * checkpoint tensor loaded with keep16, its 16-bit data unchanged (half the memory; widening
 * is exact). img_f32 gives the fp32 view an op needs right before the op. */
struct img_mat {
    const void *p;
    int32_t dtype;              /* LORA_DTYPE_F32 / F16 / BF16 */
    int64_t n;
};
struct img_mat img_m(struct img_weights *w, int64_t numel, const char *fmt, ...);

/* ResnetBlock2D (pre-norm, GroupNorm+SiLU, 3x3 convs, optional time projection, 1x1
 * conv_shortcut when cin != cout, output scale 1). */
struct img_resnet {
    int64_t cin, cout, temb;    /* temb: time-embedding width, 0 = none */
    const float *n1g, *n1b, *c1b, *tb, *n2g, *n2b, *c2b, *scb;
    struct img_mat c1w, tw, c2w, scw;   /* scw.p NULL: no conv_shortcut */
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
    float *wbuf;                /* fp32 view of the current 16-bit weight (img_f32) */
    int64_t wbuf_floats;
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
/* *out = the fp32 view of m: m itself, or m widened into ws->wbuf (valid until the next
 * img_f32 / img_convm of this workspace). */
lora_status img_f32(struct img_ctx *c, struct img_mat m, const float **out);
lora_status img_convm(struct img_ctx *c, float *y, const float *x, struct img_mat wt, const float *b,
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
    uint64_t bytes;             /* of mem */
    float *stage;               /* host staging of the tiled calls (first use; vae_plan_free) */
    int64_t stage_floats;
};
/* im2col scratch cap of a plan (floats): convolutions run over bands of output rows */
#define VAE_COLS_CAP ((int64_t)32 << 20)
lora_status vae_plan_init(struct vae_plan *p, const struct vae_model *m, int64_t batch, int64_t h,
                          int64_t w);
void vae_plan_free(struct vae_plan *p);
uint64_t vae_plan_bytes(const struct vae_plan *p);
/* What vae_plan_init would allocate for batch x h x w (bytes), without allocating. */
uint64_t vae_plan_bytes_for(const struct vae_model *m, int64_t batch, int64_t h, int64_t w);
/* mean, logvar [batch, latent, h/f, w/f]; logvar clamped to [-30, 20]. */
lora_status vae_encode(struct vae_plan *p, const float *image, float *mean, float *logvar);
/* image [batch, out_ch(3), h, w] from latent [batch, latent, h/f, w/f] (unscaled). */
lora_status vae_decode(struct vae_plan *p, const float *latent, float *image);

/* ---- tiled decode / encode (bounded memory for large images) -------------------------------
 * Not in diffusers 0.10.2 (later diffusers' enable_tiling and A1111's tiled-VAE extensions do
 * the same kind of thing): the latent (decode) or image (encode) is cut into overlapping
 * tiles, each tile runs through the plan `p` on its own (so GroupNorm statistics and the
 * mid-block attention see only that tile: the pixels differ slightly from an untiled run),
 * and the tile outputs are blended with linear ramps across the overlaps, normalised by the
 * sum of the weights. Memory is one tile's plan however large the image.
 *   p          a plan for one tile: p->h x p->w pixels, i.e. p->h/f x p->w/f latents, each
 *              <= the full size; p->batch = the batch
 *   overlap    latent rows/columns neighbouring tiles share (0 <= overlap < tile side; the
 *              last tile of a row/column is moved back to end at the border, overlapping more)
 *   tin, tout  backend buffers of one tile's input and output (tout: 2 * latent maps for
 *              encode: mean then logvar, each [batch, latent, th, tw])
 * latent / image / mean / logvar are HOST buffers of the full size: decode latent [batch,
 * latent, lh, lw] -> image [batch, 3, lh*f, lw*f]; encode image [batch, 3, H, W] -> mean and
 * logvar [batch, latent, H/f, W/f] (logvar may be NULL). With one tile covering everything
 * the result equals vae_decode / vae_encode. The first call allocates a host staging buffer
 * of about one tile's input and output, kept with the plan. */
/* The host API (lora_model_vae_decode / _encode) tiles when a latent side exceeds
 * VAE_TILE_LATENT (SD: 512 pixels; below that the output is exactly diffusers'), with tiles of
 * that side and VAE_TILE_OVERLAP latents of overlap (the sizes later diffusers uses). */
#define VAE_TILE_LATENT 64
#define VAE_TILE_OVERLAP 16
lora_status vae_decode_tiled(struct vae_plan *p, const float *latent, int64_t lh, int64_t lw,
                             int64_t overlap, float *tin, float *tout, float *image);
lora_status vae_encode_tiled(struct vae_plan *p, const float *image, int64_t h, int64_t w,
                             int64_t overlap, float *tin, float *tout, float *mean, float *logvar);

#endif
