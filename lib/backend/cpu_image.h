/* CPU implementations of the image-op primitives of backend.h (cpu_image.c), wired into the
 * CPU vtable by cpu.c. */
#ifndef LORA_BACKEND_CPU_IMAGE_H
#define LORA_BACKEND_CPU_IMAGE_H

#include "backend/backend.h"

lora_status cpu_im2col_ex_f32(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h,
                              int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                              int64_t pad_l, int64_t oh, int64_t ow, float *cols);
lora_status cpu_col2im_f32(struct lora_backend_impl *be, const float *cols, int64_t c, int64_t h,
                           int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t pad_t,
                           int64_t pad_l, int64_t oh, int64_t ow, float *x, int accumulate);
lora_status cpu_add_row_scalar_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols,
                                   const float *v, int64_t period, float *y);
lora_status cpu_row_sum_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols, const float *x,
                            float beta, float *out);
lora_status cpu_groupnorm_f32(struct lora_backend_impl *be, int64_t batch, int64_t c, int64_t hw,
                              int64_t groups, float eps, int silu, const float *x, const float *gamma,
                              const float *beta, float *y, float *mean, float *rstd);
lora_status cpu_groupnorm_backward_f32(struct lora_backend_impl *be, int64_t batch, int64_t c,
                                       int64_t hw, int64_t groups, int silu, const float *dy,
                                       const float *x, const float *mean, const float *rstd,
                                       const float *gamma, const float *beta, float *dx,
                                       int accumulate);
lora_status cpu_upsample2x_f32(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                               const float *x, float *y);
lora_status cpu_upsample2x_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                        int64_t w, const float *dy, float *dx);
lora_status cpu_upsample_nearest_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                     int64_t w, int64_t oh, int64_t ow, const float *x, float *y);
lora_status cpu_upsample_nearest_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                              int64_t w, int64_t oh, int64_t ow, const float *dy,
                                              float *dx);
lora_status cpu_geglu_f32(struct lora_backend_impl *be, int64_t n, int64_t inner, const float *x,
                          float *y);
lora_status cpu_geglu_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t inner,
                                   const float *x, const float *dy, float *dx);
lora_status cpu_timestep_embedding_f32(struct lora_backend_impl *be, int64_t batch, int64_t dim,
                                       const float *t, int flip_sin_to_cos, float freq_shift,
                                       float max_period, float *y);
lora_status cpu_clamp_f32(struct lora_backend_impl *be, int64_t n, float lo, float hi, float *x);

#endif
