/* Image ops of the U-Net and the VAE on NCHW fp32 (see nn.h): conv2d as im2col + GEMM with a
 * col2im backward, GroupNorm (+ SiLU), nearest upsample, channel concat, per-channel
 * adds, GEGLU, the sinusoidal timestep embedding and the 1x1 projections between NCHW and
 * token layouts. Weights are frozen: only input gradients. */
#include "backend/backend.h"
#include "nn/nn.h"

#define NEED(be, entry, op)                                                                  \
    do {                                                                                      \
        if (!(be)->iface->entry)                                                              \
            return lora_fail((be)->ctx, LORA_E_UNSUPPORTED, "%s: the %s backend lacks %s", op, \
                             (be)->iface->name, #entry);                                      \
    } while (0)

static lora_status bad_shape(struct lora_backend_impl *be, const char *op) {
    return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: bad shape", op);
}

/* ---- conv2d --------------------------------------------------------------------------------- */

int64_t nn_conv2d_oh(const struct nn_conv2d_shape *s) {
    int64_t n = s->h + s->pad_t + s->pad_b - s->k;
    return s->stride > 0 && n >= 0 ? n / s->stride + 1 : 0;
}

int64_t nn_conv2d_ow(const struct nn_conv2d_shape *s) {
    int64_t n = s->w + s->pad_l + s->pad_r - s->k;
    return s->stride > 0 && n >= 0 ? n / s->stride + 1 : 0;
}

static int conv_is_gemm(const struct nn_conv2d_shape *s) {
    return s->k == 1 && s->stride == 1 && !s->pad_t && !s->pad_l && !s->pad_b && !s->pad_r;
}

int64_t nn_conv2d_cols_floats(const struct nn_conv2d_shape *s) {
    if (conv_is_gemm(s)) return 0;
    return s->cin * s->k * s->k * nn_conv2d_oh(s) * nn_conv2d_ow(s);
}

static lora_status conv_check(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                              const float *cols, const char *op) {
    if (!s || s->batch < 0 || s->cin < 1 || s->cout < 1 || s->h < 1 || s->w < 1 || s->k < 1 ||
        s->stride < 1 || s->pad_t < 0 || s->pad_l < 0 || s->pad_b < 0 || s->pad_r < 0 ||
        nn_conv2d_oh(s) < 1 || nn_conv2d_ow(s) < 1)
        return bad_shape(be, op);
    if (!conv_is_gemm(s)) {
        if (!cols) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: a %lldx%lld conv needs cols scratch", op,
                                    (long long)s->k, (long long)s->k);
    }
    return LORA_OK;
}

int64_t nn_conv2d_cols_row_floats(const struct nn_conv2d_shape *s) {
    if (conv_is_gemm(s)) return 0;
    return s->cin * s->k * s->k * nn_conv2d_ow(s);
}

/* output rows per im2col chunk for a scratch of cols_floats */
static lora_status conv_rows(struct lora_backend_impl *be, const struct nn_conv2d_shape *s, int64_t cols_floats,
                             const char *op, int64_t *rows) {
    int64_t oh = nn_conv2d_oh(s), per = nn_conv2d_cols_row_floats(s);
    *rows = oh;
    if (!per) return LORA_OK;
    if (cols_floats < per)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: cols scratch of %lld floats, one output row needs %lld", op,
                         (long long)cols_floats, (long long)per);
    if (cols_floats / per < oh) *rows = cols_floats / per;
    return LORA_OK;
}

lora_status nn_conv2d_forward_ex(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                                 float *y, float *cols, int64_t cols_floats, const float *x,
                                 const float *w, const float *b) {
    LORA_TRY(conv_check(be, s, cols, "conv2d"));
    NEED(be, im2col_ex_f32, "conv2d");
    NEED(be, add_row_scalar_f32, "conv2d");
    int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), ohw = oh * ow, hw = s->h * s->w, rows;
    int64_t K = s->cin * s->k * s->k;
    LORA_TRY(conv_rows(be, s, cols_floats, "conv2d", &rows));
    for (int64_t i = 0; i < s->batch; i++) {
        const float *xi = x + i * s->cin * hw;
        float *yi = y + i * s->cout * ohw;
        if (conv_is_gemm(s)) {
            LORA_TRY(be->iface->gemm_f32(be, 0, 0, s->cout, hw, s->cin, 1.0f, w, s->cin, xi, hw, 0.0f, yi, hw));
            continue;
        }
        /* output rows r0 .. r0+n-1: im2col of that band (pad_t shifted), GEMM into y's columns */
        for (int64_t r0 = 0; r0 < oh; r0 += rows) {
            int64_t n = oh - r0 < rows ? oh - r0 : rows;
            LORA_TRY(be->iface->im2col_ex_f32(be, xi, s->cin, s->h, s->w, s->k, s->k, s->stride,
                                              s->pad_t - r0 * s->stride, s->pad_l, n, ow, cols));
            LORA_TRY(be->iface->gemm_f32(be, 0, 0, s->cout, n * ow, K, 1.0f, w, K, cols, n * ow, 0.0f, yi + r0 * ow,
                                         ohw));
        }
    }
    if (b && s->batch) LORA_TRY(be->iface->add_row_scalar_f32(be, s->batch * s->cout, ohw, b, s->cout, y));
    return LORA_OK;
}

lora_status nn_conv2d_forward(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                              float *y, float *cols, const float *x, const float *w,
                              const float *b) {
    return nn_conv2d_forward_ex(be, s, y, cols, s ? nn_conv2d_cols_floats(s) : 0, x, w, b);
}

lora_status nn_conv2d_backward_ex(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                                  float *dx, float *cols, int64_t cols_floats, const float *dy,
                                  const float *w, int accumulate) {
    LORA_TRY(conv_check(be, s, cols, "conv2d backward"));
    NEED(be, col2im_f32, "conv2d backward");
    if (!dx) return LORA_OK;
    int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), ohw = oh * ow, hw = s->h * s->w, rows;
    int64_t K = s->cin * s->k * s->k;
    LORA_TRY(conv_rows(be, s, cols_floats, "conv2d backward", &rows));
    for (int64_t i = 0; i < s->batch; i++) {
        float *dxi = dx + i * s->cin * hw;
        const float *dyi = dy + i * s->cout * ohw;
        if (conv_is_gemm(s)) {
            LORA_TRY(be->iface->gemm_f32(be, 1, 0, s->cin, hw, s->cout, 1.0f, w, s->cin, dyi, hw,
                                         accumulate ? 1.0f : 0.0f, dxi, hw));
            continue;
        }
        /* bands of output rows; bands overlap in input rows, so all but the first add */
        for (int64_t r0 = 0; r0 < oh; r0 += rows) {
            int64_t n = oh - r0 < rows ? oh - r0 : rows;
            LORA_TRY(be->iface->gemm_f32(be, 1, 0, K, n * ow, s->cout, 1.0f, w, K, dyi + r0 * ow, ohw, 0.0f, cols,
                                         n * ow));
            LORA_TRY(be->iface->col2im_f32(be, cols, s->cin, s->h, s->w, s->k, s->k, s->stride,
                                           s->pad_t - r0 * s->stride, s->pad_l, n, ow, dxi,
                                           r0 > 0 || accumulate != 0));
        }
    }
    return LORA_OK;
}

lora_status nn_conv2d_backward(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                               float *dx, float *cols, const float *dy, const float *w,
                               int accumulate) {
    return nn_conv2d_backward_ex(be, s, dx, cols, s ? nn_conv2d_cols_floats(s) : 0, dy, w, accumulate);
}

/* ---- GroupNorm -------------------------------------------------------------------------------- */

lora_status nn_groupnorm_forward(struct lora_backend_impl *be, float *y, float *mean, float *rstd,
                                 const float *x, const float *gamma, const float *beta,
                                 int64_t batch, int64_t c, int64_t hw, int64_t groups, float eps,
                                 int silu) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups) return bad_shape(be, "groupnorm");
    NEED(be, groupnorm_f32, "groupnorm");
    if (!batch) return LORA_OK;
    return be->iface->groupnorm_f32(be, batch, c, hw, groups, eps, silu != 0, x, gamma, beta, y, mean, rstd);
}

lora_status nn_groupnorm_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                  const float *x, const float *mean, const float *rstd,
                                  const float *gamma, const float *beta, int64_t batch, int64_t c,
                                  int64_t hw, int64_t groups, int silu, int accumulate) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups) return bad_shape(be, "groupnorm backward");
    NEED(be, groupnorm_backward_f32, "groupnorm backward");
    if (!batch || !dx) return LORA_OK;
    return be->iface->groupnorm_backward_f32(be, batch, c, hw, groups, silu != 0, dy, x, mean, rstd, gamma,
                                             beta, dx, accumulate != 0);
}

/* ---- upsample, concat, channel add ----------------------------------------------------------- */

lora_status nn_upsample2x_forward(struct lora_backend_impl *be, float *y, const float *x,
                                  int64_t planes, int64_t h, int64_t w) {
    if (planes < 0 || h < 1 || w < 1) return bad_shape(be, "upsample2x");
    NEED(be, upsample2x_f32, "upsample2x");
    return planes ? be->iface->upsample2x_f32(be, planes, h, w, x, y) : LORA_OK;
}

lora_status nn_upsample2x_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                   int64_t planes, int64_t h, int64_t w) {
    if (planes < 0 || h < 1 || w < 1) return bad_shape(be, "upsample2x backward");
    NEED(be, upsample2x_backward_f32, "upsample2x backward");
    return planes ? be->iface->upsample2x_backward_f32(be, planes, h, w, dy, dx) : LORA_OK;
}

lora_status nn_upsample_nearest_forward(struct lora_backend_impl *be, float *y, const float *x,
                                        int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1) return bad_shape(be, "upsample nearest");
    /* exact 2x (every 64-multiple image): the 2x kernel, the same values, the hot path */
    if (oh == 2 * h && ow == 2 * w) return nn_upsample2x_forward(be, y, x, planes, h, w);
    NEED(be, upsample_nearest_f32, "upsample nearest");
    return planes ? be->iface->upsample_nearest_f32(be, planes, h, w, oh, ow, x, y) : LORA_OK;
}

lora_status nn_upsample_nearest_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                         int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1) return bad_shape(be, "upsample nearest backward");
    if (oh == 2 * h && ow == 2 * w) return nn_upsample2x_backward(be, dx, dy, planes, h, w);
    NEED(be, upsample_nearest_backward_f32, "upsample nearest backward");
    return planes ? be->iface->upsample_nearest_backward_f32(be, planes, h, w, oh, ow, dy, dx) : LORA_OK;
}

lora_status nn_concat_channels(struct lora_backend_impl *be, float *y, const float *a,
                               const float *b, int64_t batch, int64_t ca, int64_t cb, int64_t hw) {
    if (batch < 0 || ca < 0 || cb < 0 || hw < 1) return bad_shape(be, "concat");
    size_t na = (size_t)(ca * hw) * sizeof(float), nb = (size_t)(cb * hw) * sizeof(float);
    for (int64_t i = 0; i < batch; i++) {
        float *yi = y + i * (ca + cb) * hw;
        LORA_TRY(be->iface->copy(be, yi, a + i * ca * hw, na));
        LORA_TRY(be->iface->copy(be, yi + ca * hw, b + i * cb * hw, nb));
    }
    return LORA_OK;
}

lora_status nn_concat_channels_backward(struct lora_backend_impl *be, float *da, float *db,
                                        const float *dy, int64_t batch, int64_t ca, int64_t cb,
                                        int64_t hw, int accumulate) {
    if (batch < 0 || ca < 0 || cb < 0 || hw < 1) return bad_shape(be, "concat backward");
    for (int64_t i = 0; i < batch; i++) {
        const float *dyi = dy + i * (ca + cb) * hw;
        if (da) {
            if (accumulate) LORA_TRY(be->iface->axpby_f32(be, ca * hw, 1.0f, dyi, 1.0f, da + i * ca * hw));
            else LORA_TRY(be->iface->copy(be, da + i * ca * hw, dyi, (size_t)(ca * hw) * sizeof(float)));
        }
        if (db) {
            if (accumulate) LORA_TRY(be->iface->axpby_f32(be, cb * hw, 1.0f, dyi + ca * hw, 1.0f, db + i * cb * hw));
            else LORA_TRY(be->iface->copy(be, db + i * cb * hw, dyi + ca * hw, (size_t)(cb * hw) * sizeof(float)));
        }
    }
    return LORA_OK;
}

lora_status nn_add_channel(struct lora_backend_impl *be, float *y, const float *v, int64_t batch,
                           int64_t c, int64_t hw, int per_sample) {
    if (batch < 0 || c < 1 || hw < 1) return bad_shape(be, "add_channel");
    NEED(be, add_row_scalar_f32, "add_channel");
    if (!batch) return LORA_OK;
    return be->iface->add_row_scalar_f32(be, batch * c, hw, v, per_sample ? batch * c : c, y);
}

lora_status nn_add_channel_backward(struct lora_backend_impl *be, float *dv, const float *dy,
                                    int64_t batch, int64_t c, int64_t hw, int accumulate) {
    if (batch < 0 || c < 1 || hw < 1) return bad_shape(be, "add_channel backward");
    NEED(be, row_sum_f32, "add_channel backward");
    if (!batch) return LORA_OK;
    return be->iface->row_sum_f32(be, batch * c, hw, dy, accumulate ? 1.0f : 0.0f, dv);
}

/* ---- GEGLU, timestep embedding ---------------------------------------------------------------- */

lora_status nn_geglu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n,
                             int64_t inner) {
    if (n < 0 || inner < 1) return bad_shape(be, "geglu");
    NEED(be, geglu_f32, "geglu");
    return n ? be->iface->geglu_f32(be, n, inner, x, y) : LORA_OK;
}

lora_status nn_geglu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                              const float *x, int64_t n, int64_t inner) {
    if (n < 0 || inner < 1) return bad_shape(be, "geglu backward");
    NEED(be, geglu_backward_f32, "geglu backward");
    return n ? be->iface->geglu_backward_f32(be, n, inner, x, dy, dx) : LORA_OK;
}

lora_status nn_timestep_embedding(struct lora_backend_impl *be, float *y, const float *t,
                                  int64_t batch, int64_t dim, int flip_sin_to_cos,
                                  float freq_shift) {
    if (batch < 0 || dim < 2) return bad_shape(be, "timestep embedding");
    NEED(be, timestep_embedding_f32, "timestep embedding");
    return batch ? be->iface->timestep_embedding_f32(be, batch, dim, t, flip_sin_to_cos != 0, freq_shift,
                                                     10000.0f, y)
                 : LORA_OK;
}

/* ---- 1x1 projections between NCHW and tokens --------------------------------------------------- */

static lora_status proj_check(struct lora_backend_impl *be, int64_t batch, int64_t hw, int64_t in,
                              int64_t out, const char *op) {
    if (batch < 0 || hw < 1 || in < 1 || out < 1) return bad_shape(be, op);
    NEED(be, add_row_scalar_f32, op);
    return LORA_OK;
}

lora_status nn_proj_to_tokens_forward(struct lora_backend_impl *be, float *y, const float *x,
                                      const float *w, const float *b, int64_t batch, int64_t hw,
                                      int64_t in, int64_t out) {
    LORA_TRY(proj_check(be, batch, hw, in, out, "proj to tokens"));
    for (int64_t i = 0; i < batch; i++)   /* y_i [hw, out] = x_i^T W^T */
        LORA_TRY(be->iface->gemm_f32(be, 1, 1, hw, out, in, 1.0f, x + i * in * hw, hw, w, in, 0.0f,
                                     y + i * hw * out, out));
    if (b && batch) LORA_TRY(be->iface->add_rows_f32(be, batch * hw, out, b, 1.0f, y));
    return LORA_OK;
}

lora_status nn_proj_to_tokens_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                       const float *w, int64_t batch, int64_t hw, int64_t in,
                                       int64_t out, int accumulate) {
    LORA_TRY(proj_check(be, batch, hw, in, out, "proj to tokens backward"));
    for (int64_t i = 0; i < batch; i++)   /* dx_i [in, hw] = W^T dy_i^T */
        LORA_TRY(be->iface->gemm_f32(be, 1, 1, in, hw, out, 1.0f, w, in, dy + i * hw * out, out,
                                     accumulate ? 1.0f : 0.0f, dx + i * in * hw, hw));
    return LORA_OK;
}

lora_status nn_proj_from_tokens_forward(struct lora_backend_impl *be, float *y, const float *x,
                                        const float *w, const float *b, int64_t batch,
                                        int64_t hw, int64_t in, int64_t out) {
    LORA_TRY(proj_check(be, batch, hw, in, out, "proj from tokens"));
    for (int64_t i = 0; i < batch; i++)   /* y_i [out, hw] = W x_i^T */
        LORA_TRY(be->iface->gemm_f32(be, 0, 1, out, hw, in, 1.0f, w, in, x + i * hw * in, in, 0.0f,
                                     y + i * out * hw, hw));
    if (b && batch) LORA_TRY(be->iface->add_row_scalar_f32(be, batch * out, hw, b, out, y));
    return LORA_OK;
}

lora_status nn_proj_from_tokens_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                         const float *w, int64_t batch, int64_t hw, int64_t in,
                                         int64_t out, int accumulate) {
    LORA_TRY(proj_check(be, batch, hw, in, out, "proj from tokens backward"));
    for (int64_t i = 0; i < batch; i++)   /* dx_i [hw, in] = dy_i^T W */
        LORA_TRY(be->iface->gemm_f32(be, 1, 0, hw, in, out, 1.0f, dy + i * out * hw, hw, w, in,
                                     accumulate ? 1.0f : 0.0f, dx + i * hw * in, in));
    return LORA_OK;
}
