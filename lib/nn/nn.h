/* Layer ops with explicit forward and backward (llm.c style), fp32, the CPU reference of every
 * layer the text encoder (and later the U-Net) is built from.
 *
 * Memory: every buffer (activations, weights, gradients, token ids, saved statistics) is an
 * fp32 (ids: int32) buffer of the backend `be`, C-contiguous, owned by the caller: host memory
 * on the CPU backend, device memory on the CUDA backend; no op allocates. Row counts `n` are
 * the flattened leading dimensions (batch * tokens). Every op is backend calls only (GEMMs,
 * batched GEMMs, and the layer-op primitives of lib/backend/backend.h), so one graph runs on
 * either backend; on CUDA the ops are queued on the backend's stream and results are read
 * with be->iface->download. Shapes are checked here, before anything is queued.
 *
 * Gradient convention (every *_backward here):
 *   - parameter gradients ACCUMULATE: dW, dB, d_gamma, d_beta, d_down, d_up, d_table get
 *     `+=`, so a caller zeroes them once per optimizer step and micro-batches add up;
 *   - activation gradients are WRITTEN: dX gets `=` ...
 *   - ... except where the op says otherwise: ops with an `accumulate` argument write (0) or
 *     add (1) into dX, and nn_lora_backward always adds into dX (the LoRA branch is a second
 *     path next to the base linear, whose backward has written dX first);
 *   - a NULL gradient pointer skips that gradient (frozen base weights: dW = dB = NULL);
 *   - dX may not alias the op's forward inputs unless the op says so.
 * Weights use torch layouts: Linear W [out, in], LayerNorm gamma/beta [c], Embedding [vocab, c].
 * Forward ops save what their backward needs into caller buffers named in each signature
 * (LayerNorm mean/rstd, attention probabilities, the LoRA down projection). */
#ifndef LORA_NN_NN_H
#define LORA_NN_NN_H

#include "internal.h"

struct lora_backend_impl;

/* ---- linear: y[n,out] = x[n,in] W^T + b ------------------------------------------------- */

/* b may be NULL (no bias). y must not alias x. */
lora_status nn_linear_forward(struct lora_backend_impl *be, float *y, const float *x,
                              const float *w, const float *b, int64_t n, int64_t in, int64_t out);
/* dx[n,in] (=, or += when accumulate) dy W; dw[out,in] += dy^T x; db[out] += sum_rows dy.
 * Any of dx, dw, db may be NULL; x is only read when dw is given. */
lora_status nn_linear_backward(struct lora_backend_impl *be, float *dx, float *dw, float *db,
                               const float *dy, const float *x, const float *w, int64_t n,
                               int64_t in, int64_t out, int accumulate);

/* ---- LoRA adapter on a linear layer (kohya networks/lora.py, spec §1.5) -------------------
 * y += scale * up(down(x)), scale = alpha / rank * multiplier; no bias on either factor.
 * The struct borrows its weights and gradient buffers (the network layer owns them). */
struct nn_lora {
    int64_t in, out, rank;
    float scale;            /* nn_lora_scale(alpha, rank, multiplier) */
    const float *down;      /* [rank, in]  (lora_down.weight) */
    const float *up;        /* [out, rank] (lora_up.weight) */
    float *d_down;          /* [rank, in]  gradient, accumulated; NULL = not trained */
    float *d_up;            /* [out, rank] gradient, accumulated; NULL = not trained */
};
/* alpha / rank * multiplier; alpha <= 0 (absent, 0, None in kohya) means alpha = rank. */
float nn_lora_scale(double alpha, int64_t rank, double multiplier);
/* h[n,rank] = x down^T (saved for backward); y[n,out] += scale * h up^T. */
lora_status nn_lora_forward(struct lora_backend_impl *be, const struct nn_lora *l, float *y,
                            float *h, const float *x, int64_t n);
/* d_up += scale * dy^T h; dh[n,rank] = scale * dy up (scratch, written); d_down += dh^T x;
 * dx[n,in] += dh down (dx may be NULL). */
lora_status nn_lora_backward(struct lora_backend_impl *be, const struct nn_lora *l, float *dx,
                             float *dh, const float *dy, const float *x, const float *h,
                             int64_t n);

/* ---- LayerNorm over the last dimension c (torch.nn.LayerNorm, biased variance) ----------- */

/* y[n,c] = (x - mean) * rstd * gamma + beta; mean[n], rstd[n] saved. gamma/beta may be NULL
 * (1 and 0). y may alias x. */
lora_status nn_layernorm_forward(struct lora_backend_impl *be, float *y, float *mean, float *rstd,
                                 const float *x, const float *gamma, const float *beta,
                                 int64_t n, int64_t c, float eps);
/* dx (=, or += when accumulate); d_gamma, d_beta += (either may be NULL). dx must not alias
 * dy or x. */
lora_status nn_layernorm_backward(struct lora_backend_impl *be, float *dx, float *d_gamma,
                                  float *d_beta, const float *dy, const float *x,
                                  const float *mean, const float *rstd, const float *gamma,
                                  int64_t n, int64_t c, int accumulate);

/* ---- multi-head self-attention core ----------------------------------------------------
 * q, k, v, out: [batch, t, heads * d] (head h owns columns h*d .. h*d+d-1, as a torch
 * view(b, t, heads, d) gives); probs: [batch, heads, t, t] softmax(q k^T / sqrt(d)) saved
 * for backward. causal: position i attends to j <= i only (CLIP's text mask; masked
 * probabilities are stored as exact zeros). */
lora_status nn_attention_forward(struct lora_backend_impl *be, float *out, float *probs,
                                 const float *q, const float *k, const float *v, int64_t batch,
                                 int64_t t, int64_t heads, int64_t d, int causal);
/* dq, dk, dv written [batch, t, heads*d]; scratch: t*t floats. */
lora_status nn_attention_backward(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                                  float *scratch, const float *dout, const float *probs,
                                  const float *q, const float *k, const float *v, int64_t batch,
                                  int64_t t, int64_t heads, int64_t d);
/* The same with the scratch size given: scratch_floats >= heads*t*t runs the heads of a
 * sequence as batched GEMMs (fewer, larger launches on CUDA); >= t*t (the minimum) goes one
 * head at a time. The same arithmetic either way. */
lora_status nn_attention_backward_ex(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                                     float *scratch, int64_t scratch_floats, const float *dout,
                                     const float *probs, const float *q, const float *k,
                                     const float *v, int64_t batch, int64_t t, int64_t heads,
                                     int64_t d);

/* ---- activations (elementwise; y may alias x, dx may alias dy) --------------------------- */

/* quick_gelu: x * sigmoid(1.702 x) (CLIP-L, transformers' QuickGELUActivation) */
lora_status nn_quick_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n);
lora_status nn_quick_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                   const float *x, int64_t n);
/* gelu: 0.5 x (1 + erf(x / sqrt 2)) (exact, torch's default; OpenCLIP-H) */
lora_status nn_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n);
lora_status nn_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                             const float *x, int64_t n);

/* ---- residual add: y += x (the backend's axpby). Its backward is the identity on both branches: the gradient of
 * the skip path is dy itself, so callers let the branch's backward accumulate into it. --- */
lora_status nn_residual_add(struct lora_backend_impl *be, float *y, const float *x, int64_t n);

/* ---- embedding lookup -------------------------------------------------------------------
 * y[n,c] = table[ids[i]] (+ pos[i % positions] when pos is given: the learned position
 * embedding of a [batch, positions] id layout). An id outside [0, vocab) ->
 * LORA_E_INVALID_ARG naming the row and id; y is then unspecified. ids is a backend buffer;
 * on CUDA the check reads back a device flag, so this call synchronises the stream. */
lora_status nn_embedding_forward(struct lora_backend_impl *be, float *y, const int32_t *ids,
                                 const float *table, const float *pos, int64_t n,
                                 int64_t positions, int64_t vocab, int64_t c);
/* d_table[ids[i]] += dy[i]; d_pos[i % positions] += dy[i] (either may be NULL). ids must
 * have passed the forward's range check. */
lora_status nn_embedding_backward(struct lora_backend_impl *be, float *d_table, float *d_pos,
                                  const float *dy, const int32_t *ids, int64_t n,
                                  int64_t positions, int64_t c);

/* ---- image ops (U-Net / VAE): NCHW fp32, frozen weights (no weight gradients) -----------
 * Every op below needs the backend's image-op primitives (backend.h); a backend without them
 * answers LORA_E_UNSUPPORTED. */

/* conv2d: x [batch, cin, h, w] -> y [batch, cout, oh, ow] with torch weight [cout, cin, k, k]
 * and optional bias [cout]; padding pad_t/pad_l/pad_b/pad_r (torch's symmetric padding p is
 * p,p,p,p; diffusers' VAE downsample pads (0,1,0,1) = pad_b = pad_r = 1);
 * oh = (h + pad_t + pad_b - k) / stride + 1. */
struct nn_conv2d_shape {
    int64_t batch, cin, h, w, cout, k, stride, pad_t, pad_l, pad_b, pad_r;
};
int64_t nn_conv2d_oh(const struct nn_conv2d_shape *s);
int64_t nn_conv2d_ow(const struct nn_conv2d_shape *s);
/* Scratch the forward and backward need (floats): cin*k*k*oh*ow for one image, 0 for a
 * 1x1 stride-1 unpadded conv (a plain GEMM). */
int64_t nn_conv2d_cols_floats(const struct nn_conv2d_shape *s);
/* y written; cols: nn_conv2d_cols_floats scratch (NULL allowed when that is 0). y must not
 * alias x. */
lora_status nn_conv2d_forward(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                              float *y, float *cols, const float *x, const float *w,
                              const float *b);
/* dx [batch, cin, h, w] (=, or += with accumulate) from dy via W^T and col2im. */
lora_status nn_conv2d_backward(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                               float *dx, float *cols, const float *dy, const float *w,
                               int accumulate);
/* The same with a smaller scratch: cols_floats >= nn_conv2d_cols_row_floats (one output
 * row's columns); the im2col / col2im then runs over bands of output rows (GEMMs of n*ow
 * columns), so the scratch need not grow with the image. Same arithmetic per output. */
int64_t nn_conv2d_cols_row_floats(const struct nn_conv2d_shape *s);
lora_status nn_conv2d_forward_ex(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                                 float *y, float *cols, int64_t cols_floats, const float *x,
                                 const float *w, const float *b);
lora_status nn_conv2d_backward_ex(struct lora_backend_impl *be, const struct nn_conv2d_shape *s,
                                  float *dx, float *cols, int64_t cols_floats, const float *dy,
                                  const float *w, int accumulate);

/* GroupNorm (torch.nn.GroupNorm) over x [batch, c, hw], then SiLU when silu != 0 (the
 * norm + act pairs of ResnetBlock2D). mean/rstd [batch*groups] saved; y must not alias x. */
lora_status nn_groupnorm_forward(struct lora_backend_impl *be, float *y, float *mean, float *rstd,
                                 const float *x, const float *gamma, const float *beta,
                                 int64_t batch, int64_t c, int64_t hw, int64_t groups, float eps,
                                 int silu);
/* dx (=, or += with accumulate); dx must not alias dy or x. */
lora_status nn_groupnorm_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                  const float *x, const float *mean, const float *rstd,
                                  const float *gamma, const float *beta, int64_t batch, int64_t c,
                                  int64_t hw, int64_t groups, int silu, int accumulate);

/* Nearest 2x upsample (F.interpolate(scale_factor=2, mode="nearest")) of `planes` = batch*c
 * planes h x w; the backward writes dx [planes, h, w]. */
lora_status nn_upsample2x_forward(struct lora_backend_impl *be, float *y, const float *x,
                                  int64_t planes, int64_t h, int64_t w);
lora_status nn_upsample2x_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                   int64_t planes, int64_t h, int64_t w);
/* Nearest resize to oh x ow (F.interpolate(size=(oh, ow), mode="nearest"), PyTorch 1.13
 * index rule: see backend.h upsample_nearest_f32): the U-Net's Upsample2D when a latent side
 * is not a multiple of 2^(levels-1) (diffusers' forward_upsample_size). Exactly 2x on both
 * sides runs nn_upsample2x_*. The backward writes dx [planes, h, w]. */
lora_status nn_upsample_nearest_forward(struct lora_backend_impl *be, float *y, const float *x,
                                        int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow);
lora_status nn_upsample_nearest_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                         int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow);

/* Channel concat (torch.cat(dim=1)): y [batch, ca+cb, hw] = [a | b]; the backward splits dy
 * into da [batch, ca, hw] and db [batch, cb, hw] (either NULL: skipped), written or, with
 * accumulate, added. */
lora_status nn_concat_channels(struct lora_backend_impl *be, float *y, const float *a,
                               const float *b, int64_t batch, int64_t ca, int64_t cb, int64_t hw);
lora_status nn_concat_channels_backward(struct lora_backend_impl *be, float *da, float *db,
                                        const float *dy, int64_t batch, int64_t ca, int64_t cb,
                                        int64_t hw, int accumulate);

/* Per-channel add: y[b, ch, :] += v[ch] (per_sample == 0: a bias [c]) or v[b, ch]
 * (per_sample: the time-embedding projection [batch, c]). The backward of the per-sample
 * form: dv[b, ch] (=, or += with accumulate) sum over hw of dy[b, ch, :]. */
lora_status nn_add_channel(struct lora_backend_impl *be, float *y, const float *v, int64_t batch,
                           int64_t c, int64_t hw, int per_sample);
lora_status nn_add_channel_backward(struct lora_backend_impl *be, float *dv, const float *dy,
                                    int64_t batch, int64_t c, int64_t hw, int accumulate);

/* GEGLU (diffusers attention.GEGLU after its proj): x [n, 2*inner] = [hidden | gate] ->
 * y [n, inner] = hidden * gelu(gate); backward writes dx [n, 2*inner]. */
lora_status nn_geglu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n,
                             int64_t inner);
lora_status nn_geglu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                              const float *x, int64_t n, int64_t inner);

/* Sinusoidal timestep embedding (diffusers get_timestep_embedding, max_period 10000):
 * t [batch] (a backend buffer) -> y [batch, dim]. */
lora_status nn_timestep_embedding(struct lora_backend_impl *be, float *y, const float *t,
                                  int64_t batch, int64_t dim, int flip_sin_to_cos,
                                  float freq_shift);

/* 1x1 projection between NCHW and token layout (Transformer2DModel proj_in / proj_out, both
 * the 1x1-conv and the Linear form: the same arithmetic), W [out, in] (a [out, in, 1, 1]
 * conv weight is the same data), b [out] or NULL.
 *   to_tokens:   x [batch, in, hw]  -> y [batch, hw, out]
 *   from_tokens: x [batch, hw, in]  -> y [batch, out, hw]
 * Backwards write (or add, with accumulate) dx in the input's layout. */
lora_status nn_proj_to_tokens_forward(struct lora_backend_impl *be, float *y, const float *x,
                                      const float *w, const float *b, int64_t batch, int64_t hw,
                                      int64_t in, int64_t out);
lora_status nn_proj_to_tokens_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                       const float *w, int64_t batch, int64_t hw, int64_t in,
                                       int64_t out, int accumulate);
lora_status nn_proj_from_tokens_forward(struct lora_backend_impl *be, float *y, const float *x,
                                        const float *w, const float *b, int64_t batch,
                                        int64_t hw, int64_t in, int64_t out);
lora_status nn_proj_from_tokens_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                         const float *w, int64_t batch, int64_t hw, int64_t in,
                                         int64_t out, int accumulate);

/* ---- blocked non-causal multi-head attention (self or cross) -----------------------------
 * q [batch, tq, heads*d], k and v [batch, tk, heads*d], out [batch, tq, heads*d];
 * out = softmax(q k^T * scale) v per head (scale: 1/sqrt(d) when <= 0). Queries run in blocks
 * of rows so that only a [heads, block, tk] score tile exists at a time; nothing is saved:
 * the backward recomputes each tile. Scratch: the forward needs heads*block*tk floats, the
 * backward twice that; block = scratch_floats / (heads*tk) (forward) or / (2*heads*tk)
 * (backward), capped at tq; at least 1 row must fit. */
int64_t nn_mha_scratch_floats(int64_t heads, int64_t tk, int64_t block, int backward);
lora_status nn_mha_forward(struct lora_backend_impl *be, float *out, const float *q,
                           const float *k, const float *v, int64_t batch, int64_t tq, int64_t tk,
                           int64_t heads, int64_t d, float scale, float *scratch,
                           int64_t scratch_floats);
/* dq, dk, dv written (each may be NULL: skipped). For self-attention the caller sums the
 * three through its own q/k/v projections. */
lora_status nn_mha_backward(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                            const float *dout, const float *q, const float *k, const float *v,
                            int64_t batch, int64_t tq, int64_t tk, int64_t heads, int64_t d,
                            float scale, float *scratch, int64_t scratch_floats);

#endif
