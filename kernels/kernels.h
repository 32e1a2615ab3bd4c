/* C launchers (prefix lk_, never exported) for liblora's CUDA kernels. Each enqueues on `stream` and returns the
 * cudaError_t of the launch as int (0 = success); none synchronises, none exits. Pointers are
 * device pointers. Shared by lib/backend/cuda.c (C) and the .cu files (C++). */
#ifndef LORA_KERNELS_H
#define LORA_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *lora_cuda_stream;

int lk_axpby_f32(lora_cuda_stream s, int64_t n, float alpha, const float *x, float beta, float *y);
int lk_mul_f32(lora_cuda_stream s, int64_t n, const float *a, const float *b, float *out);
int lk_silu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y);
int lk_silu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx);
int lk_gelu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y);
int lk_gelu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx);
/* kind: 0 f32->f16, 1 f32->bf16, 2 f16->f32, 3 bf16->f32 */
int lk_convert(lora_cuda_stream s, int64_t n, int kind, const void *src, void *dst);
int lk_im2col_f32(lora_cuda_stream s, const float *x, int64_t c, int64_t h, int64_t w,
                         int64_t kh, int64_t kw, int64_t stride, int64_t pad, float *cols);

/* elementwise.cu: quick_gelu x * sigmoid(1.702 x); fill; scale; row broadcast
 * y[i,j] = row[j] + beta * y[i,j] (beta == 0 writes row without reading y) */
int lk_quick_gelu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y);
int lk_quick_gelu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx);
int lk_fill_f32(lora_cuda_stream s, int64_t n, float value, float *x);
int lk_scale_f32(lora_cuda_stream s, int64_t n, float alpha, float *x);
int lk_add_rows_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *row, float beta, float *y);

/* norm.cu: LayerNorm over rows of c (mean/rstd saved), its backward (dx = or += with
 * accumulate; d_gamma/d_beta +=, each of dx/d_gamma/d_beta may be NULL), and column sums
 * out[j] = sum_i x[i,j] + beta * out[j] (beta == 0 writes). */
int lk_layernorm_f32(lora_cuda_stream s, int64_t n, int64_t c, float eps, const float *x, const float *gamma,
                     const float *beta, float *y, float *mean, float *rstd);
int lk_layernorm_backward_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *dy, const float *x,
                              const float *mean, const float *rstd, const float *gamma, float *dx,
                              float *d_gamma, float *d_beta, int accumulate);
int lk_col_sum_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *x, float beta, float *out);

/* softmax.cu: in-place row softmax (causal: row r keeps columns <= r % t, the rest 0) and
 * dx = p * (dy - rowsum(p * dy)) (dx may alias dy). */
int lk_softmax_f32(lora_cuda_stream s, int64_t rows, int64_t t, int causal, float *x);
int lk_softmax_backward_f32(lora_cuda_stream s, int64_t rows, int64_t t, const float *p, const float *dy,
                            float *dx);

/* embedding.cu: gather with range check. `flag` (device, 8 bytes) is set to ~0 and then
 * min-reduced with the rows whose id is outside [0, vocab) (those rows are zeroed); the
 * caller reads it back. Backward: atomic scatter-add into d_table / d_pos (either NULL). */
int lk_embedding_f32(lora_cuda_stream s, int64_t n, int64_t c, const int32_t *ids, const float *table,
                     const float *pos, int64_t positions, int64_t vocab, float *y, uint64_t *flag);
int lk_embedding_backward_f32(lora_cuda_stream s, int64_t n, int64_t c, const int32_t *ids, const float *dy,
                              int64_t positions, float *d_table, float *d_pos);

/* image.cu: the image-op primitives of lib/backend/backend.h (U-Net / VAE, NCHW fp32), the
 * same arguments and semantics as the CPU backend's (lib/backend/cpu_image.c). */
int lk_im2col_ex_f32(lora_cuda_stream s, const float *x, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                     int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow, float *cols);
int lk_col2im_f32(lora_cuda_stream s, const float *cols, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                  int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow, float *x, int accumulate);
int lk_add_row_scalar_f32(lora_cuda_stream s, int64_t rows, int64_t cols, const float *v, int64_t period, float *y);
int lk_row_sum_f32(lora_cuda_stream s, int64_t rows, int64_t cols, const float *x, float beta, float *out);
int lk_groupnorm_f32(lora_cuda_stream s, int64_t batch, int64_t c, int64_t hw, int64_t groups, float eps, int silu,
                     const float *x, const float *gamma, const float *beta, float *y, float *mean, float *rstd);
int lk_groupnorm_backward_f32(lora_cuda_stream s, int64_t batch, int64_t c, int64_t hw, int64_t groups, int silu,
                              const float *dy, const float *x, const float *mean, const float *rstd,
                              const float *gamma, const float *beta, float *dx, int accumulate);
int lk_upsample2x_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, const float *x, float *y);
int lk_upsample2x_backward_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, const float *dy,
                               float *dx);
int lk_upsample_nearest_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow,
                            const float *x, float *y);
int lk_upsample_nearest_backward_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, int64_t oh,
                                     int64_t ow, const float *dy, float *dx);
int lk_geglu_f32(lora_cuda_stream s, int64_t n, int64_t inner, const float *x, float *y);
int lk_geglu_backward_f32(lora_cuda_stream s, int64_t n, int64_t inner, const float *x, const float *dy, float *dx);
int lk_timestep_embedding_f32(lora_cuda_stream s, int64_t batch, int64_t dim, const float *t, int flip,
                              float freq_shift, float max_period, float *y);
int lk_clamp_f32(lora_cuda_stream s, int64_t n, float lo, float hi, float *x);

#ifdef __cplusplus
}
#endif
#endif
