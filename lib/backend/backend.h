/* Backend vtable (ggml-backend style): a table of function pointers plus an impl pointer.
 * Entries marked OPTIONAL may be NULL; callers use the lora_be_* wrappers, which check.
 * Buffers are opaque device pointers owned by the backend that allocated them. Matrices are
 * row-major; trans flags are 0/1. Every entry returns a status and records a message on the
 * backend's context; none aborts. */
#ifndef LORA_BACKEND_H
#define LORA_BACKEND_H

#include "internal.h"

#define LORA_BACKEND_IFACE_VERSION 1

struct lora_backend_impl;

struct lora_backend_iface {
    uint32_t version;            /* LORA_BACKEND_IFACE_VERSION */
    const char *name;            /* "cpu", "cuda" */
    void (*free)(struct lora_backend_impl *be);

    lora_status (*buf_alloc)(struct lora_backend_impl *be, size_t bytes, void **out);
    void (*buf_free)(struct lora_backend_impl *be, void *buf);
    lora_status (*upload)(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes);
    lora_status (*download)(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes);
    lora_status (*sync)(struct lora_backend_impl *be);

    /* C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C, fp32 in and out. */
    lora_status (*gemm_f32)(struct lora_backend_impl *be, int trans_a, int trans_b,
                            int64_t m, int64_t n, int64_t k, float alpha,
                            const float *a, int64_t lda, const float *b, int64_t ldb,
                            float beta, float *c, int64_t ldc);
    /* C[m,n] (fp32) = alpha * op(A) op(B) + beta * C with A and B both of `ab_type` (F32, F16
     * or BF16) and fp32 accumulation: the mixed-precision GEMM of fp16/bf16 training. */
    lora_status (*gemm_ex)(struct lora_backend_impl *be, int trans_a, int trans_b, int64_t m,
                           int64_t n, int64_t k, float alpha, lora_dtype ab_type, const void *a,
                           int64_t lda, const void *b, int64_t ldb, float beta, float *c,
                           int64_t ldc);
    /* batch of gemms with fixed strides between matrices. OPTIONAL. */
    lora_status (*gemm_batched_f32)(struct lora_backend_impl *be, int trans_a, int trans_b,
                                    int64_t m, int64_t n, int64_t k, float alpha,
                                    const float *a, int64_t lda, int64_t stride_a,
                                    const float *b, int64_t ldb, int64_t stride_b, float beta,
                                    float *c, int64_t ldc, int64_t stride_c, int64_t batch);
    /* y = alpha * x + beta * y */
    lora_status (*axpby_f32)(struct lora_backend_impl *be, int64_t n, float alpha, const float *x,
                             float beta, float *y);
    /* out = a * b (elementwise) */
    lora_status (*mul_f32)(struct lora_backend_impl *be, int64_t n, const float *a, const float *b,
                           float *out);
    /* y = silu(x); dx = dy * silu'(x) */
    lora_status (*silu_f32)(struct lora_backend_impl *be, int64_t n, const float *x, float *y);
    lora_status (*silu_backward_f32)(struct lora_backend_impl *be, int64_t n, const float *x,
                                     const float *dy, float *dx);
    /* exact (erf) GELU, as torch.nn.functional.gelu default */
    lora_status (*gelu_f32)(struct lora_backend_impl *be, int64_t n, const float *x, float *y);
    lora_status (*gelu_backward_f32)(struct lora_backend_impl *be, int64_t n, const float *x,
                                     const float *dy, float *dx);
    /* dtype conversion between F32, F16 and BF16 (round to nearest even). */
    lora_status (*convert)(struct lora_backend_impl *be, int64_t n, lora_dtype src_type,
                           const void *src, lora_dtype dst_type, void *dst);
    /* im2col for conv2d as gemm: x [C,H,W] -> cols [C*kh*kw, oh*ow]. */
    lora_status (*im2col_f32)(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h,
                              int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad,
                              float *cols);
    /* Device memory held by this backend and free on its device. OPTIONAL. */
    void (*memory)(struct lora_backend_impl *be, uint64_t *used, uint64_t *avail);

    /* ---- layer-op primitives of lib/nn (all required). fp32, row-major [n, c] matrices,
     * C-contiguous; every pointer is a buffer of this backend. ------------------------------ */
    /* dst = src, `bytes` inside this backend's memory. The regions must not overlap unless
     * dst == src (a no-op). */
    lora_status (*copy)(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes);
    /* x[i] = value */
    lora_status (*fill_f32)(struct lora_backend_impl *be, int64_t n, float value, float *x);
    /* x[i] *= alpha */
    lora_status (*scale_f32)(struct lora_backend_impl *be, int64_t n, float alpha, float *x);
    /* Broadcast over rows (bias add): y[i,j] = row[j] + beta * y[i,j]; beta == 0 writes
     * row[j] without reading y (as BLAS treats beta = 0). */
    lora_status (*add_rows_f32)(struct lora_backend_impl *be, int64_t n, int64_t c, const float *row,
                                float beta, float *y);
    /* Column sums (bias gradient): out[j] = sum_i x[i,j] + beta * out[j]; beta == 0 writes. */
    lora_status (*col_sum_f32)(struct lora_backend_impl *be, int64_t n, int64_t c, const float *x,
                               float beta, float *out);
    /* quick_gelu x * sigmoid(1.702 x) and its backward (dx may alias dy, y may alias x). */
    lora_status (*quick_gelu_f32)(struct lora_backend_impl *be, int64_t n, const float *x, float *y);
    lora_status (*quick_gelu_backward_f32)(struct lora_backend_impl *be, int64_t n, const float *x,
                                           const float *dy, float *dx);
    /* LayerNorm over the c columns of each row (biased variance, eps inside the root):
     * y = (x - mean) * rstd * gamma + beta, mean[n] and rstd[n] saved. gamma/beta may be NULL
     * (1 and 0); y may alias x. */
    lora_status (*layernorm_f32)(struct lora_backend_impl *be, int64_t n, int64_t c, float eps,
                                 const float *x, const float *gamma, const float *beta, float *y,
                                 float *mean, float *rstd);
    /* dx (= or, with accumulate, +=); d_gamma, d_beta += (each may be NULL). dx must not alias
     * dy or x. */
    lora_status (*layernorm_backward_f32)(struct lora_backend_impl *be, int64_t n, int64_t c,
                                          const float *dy, const float *x, const float *mean,
                                          const float *rstd, const float *gamma, float *dx,
                                          float *d_gamma, float *d_beta, int accumulate);
    /* In-place softmax of `rows` rows of t. causal: row r keeps columns j <= r % t (the rows
     * are [.., t, t] score matrices) and the masked entries become exact zeros. */
    lora_status (*softmax_f32)(struct lora_backend_impl *be, int64_t rows, int64_t t, int causal,
                               float *x);
    /* dx = p * (dy - sum_j p * dy) per row; dx may alias dy. */
    lora_status (*softmax_backward_f32)(struct lora_backend_impl *be, int64_t rows, int64_t t,
                                        const float *p, const float *dy, float *dx);
    /* y[i] = table[ids[i]] (+ pos[i % positions] when pos is given), rows of c. ids are checked
     * against [0, vocab): *bad_row gets the first row whose id is outside (-1 when none) and
     * *bad_id that id; the call still returns LORA_OK then (the caller reports) and y is
     * unspecified. May synchronise (the device writes a flag the host reads). */
    lora_status (*embedding_f32)(struct lora_backend_impl *be, int64_t n, int64_t c, const int32_t *ids,
                                 const float *table, const float *pos, int64_t positions,
                                 int64_t vocab, float *y, int64_t *bad_row, int32_t *bad_id);
    /* d_table[ids[i]] += dy[i]; d_pos[i % positions] += dy[i] (either may be NULL). ids must
     * have passed embedding_f32's check. */
    lora_status (*embedding_backward_f32)(struct lora_backend_impl *be, int64_t n, int64_t c,
                                          const int32_t *ids, const float *dy, int64_t positions,
                                          float *d_table, float *d_pos);

    /* ---- image-op primitives (U-Net / VAE, NCHW fp32). OPTIONAL: lib/nn answers
     * LORA_E_UNSUPPORTED when a backend leaves one NULL. ------------------------------------ */
    /* im2col of one image x [c, h, w] with explicit padding: output position (oy, ox) reads
     * input (oy*stride - pad_t + ky, ox*stride - pad_l + kx), zero outside the image;
     * cols [c*kh*kw, oh*ow]. (Asymmetric padding: the caller picks oh, ow.) */
    lora_status (*im2col_ex_f32)(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h,
                                 int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                                 int64_t pad_l, int64_t oh, int64_t ow, float *cols);
    /* The adjoint: x (= or, with accumulate, +=) the sum of every column entry at the input
     * position it was read from (entries that read padding are dropped). */
    lora_status (*col2im_f32)(struct lora_backend_impl *be, const float *cols, int64_t c, int64_t h,
                              int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                              int64_t pad_l, int64_t oh, int64_t ow, float *x, int accumulate);
    /* y[r, j] += v[r % period] over `rows` rows of `cols` (per-channel bias of NCHW with
     * period = c, per-sample channel add with period = batch*c). */
    lora_status (*add_row_scalar_f32)(struct lora_backend_impl *be, int64_t rows, int64_t cols,
                                      const float *v, int64_t period, float *y);
    /* out[r] = sum_j x[r, j] + beta * out[r]; beta == 0 writes. */
    lora_status (*row_sum_f32)(struct lora_backend_impl *be, int64_t rows, int64_t cols, const float *x,
                               float beta, float *out);
    /* GroupNorm of x [batch, c, hw] in `groups` groups (biased variance, eps inside the root),
     * per-channel gamma/beta (NULL: 1 and 0), then SiLU when silu != 0. mean, rstd
     * [batch*groups] saved. y must not alias x. */
    lora_status (*groupnorm_f32)(struct lora_backend_impl *be, int64_t batch, int64_t c, int64_t hw,
                                 int64_t groups, float eps, int silu, const float *x,
                                 const float *gamma, const float *beta, float *y, float *mean,
                                 float *rstd);
    /* dx (= or += with accumulate) of the above; no gamma/beta gradients (frozen). */
    lora_status (*groupnorm_backward_f32)(struct lora_backend_impl *be, int64_t batch, int64_t c,
                                          int64_t hw, int64_t groups, int silu, const float *dy,
                                          const float *x, const float *mean, const float *rstd,
                                          const float *gamma, const float *beta, float *dx,
                                          int accumulate);
    /* nearest 2x upsample of `planes` planes h x w -> 2h x 2w; the backward sums 2x2 blocks
     * (dx written). */
    lora_status (*upsample2x_f32)(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                                  const float *x, float *y);
    lora_status (*upsample2x_backward_f32)(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                           int64_t w, const float *dy, float *dx);
    /* nearest resize of `planes` planes h x w -> oh x ow (F.interpolate(size=(oh, ow),
     * mode="nearest") of PyTorch 1.13: source row min(floor(r * (float)h / oh), h - 1) in
     * float32, exactly r when oh == h and r / 2 when oh == 2h; columns alike). The backward
     * sums into each dx element the dy elements that read it, in row-major order of dy (dx
     * written). NULL in a backend: callers fall back to upsample2x when the sizes are 2x. */
    lora_status (*upsample_nearest_f32)(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                        int64_t w, int64_t oh, int64_t ow, const float *x, float *y);
    lora_status (*upsample_nearest_backward_f32)(struct lora_backend_impl *be, int64_t planes,
                                                 int64_t h, int64_t w, int64_t oh, int64_t ow,
                                                 const float *dy, float *dx);
    /* GEGLU: x [n, 2*inner] = [hidden | gate] -> y [n, inner] = hidden * gelu(gate) (erf gelu);
     * backward writes dx [n, 2*inner]. */
    lora_status (*geglu_f32)(struct lora_backend_impl *be, int64_t n, int64_t inner, const float *x,
                             float *y);
    lora_status (*geglu_backward_f32)(struct lora_backend_impl *be, int64_t n, int64_t inner,
                                      const float *x, const float *dy, float *dx);
    /* Sinusoidal timestep embedding (diffusers get_timestep_embedding, fp32 arithmetic as
     * torch does it): t [batch] -> y [batch, dim]; [sin | cos], or [cos | sin] with flip. */
    lora_status (*timestep_embedding_f32)(struct lora_backend_impl *be, int64_t batch, int64_t dim,
                                          const float *t, int flip_sin_to_cos, float freq_shift,
                                          float max_period, float *y);
    /* x[i] = min(max(x[i], lo), hi) (the VAE's logvar clamp). */
    lora_status (*clamp_f32)(struct lora_backend_impl *be, int64_t n, float lo, float hi, float *x);
};

struct lora_backend_impl {
    const struct lora_backend_iface *iface;
    lora_ctx *ctx;      /* errors and host allocation */
    void *impl;         /* backend-private state */
};

lora_status lora_backend_cpu_create(lora_ctx *ctx, struct lora_backend_impl **out);
/* LORA_E_NO_GPU when CUDA is not compiled in or no device answers. */
lora_status lora_backend_cuda_create(lora_ctx *ctx, int32_t device, struct lora_backend_impl **out);
void lora_backend_free(struct lora_backend_impl *be);

/* Probes CUDA once per process. Returns LORA_OK when a device is usable, else the status
 * (LORA_E_NO_GPU / LORA_E_DRIVER); `why` (optional) gets a static explanation and
 * `n_devices` (optional) the device count. */
lora_status lora_cuda_probe(const char **why, int32_t *n_devices);

static inline lora_status lora_be_gemm_batched_f32(struct lora_backend_impl *be, int ta, int tb,
        int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda, int64_t sa,
        const float *b, int64_t ldb, int64_t sb, float beta, float *c, int64_t ldc, int64_t sc,
        int64_t batch) {
    if (be->iface->gemm_batched_f32)
        return be->iface->gemm_batched_f32(be, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb,
                                           beta, c, ldc, sc, batch);
    for (int64_t i = 0; i < batch; i++)
        LORA_TRY(be->iface->gemm_f32(be, ta, tb, m, n, k, alpha, a + i * sa, lda, b + i * sb,
                                     ldb, beta, c + i * sc, ldc));
    return LORA_OK;
}

#endif
