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
