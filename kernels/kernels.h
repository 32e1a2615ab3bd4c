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

#ifdef __cplusplus
}
#endif
#endif
