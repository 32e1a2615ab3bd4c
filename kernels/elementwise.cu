// Elementwise kernels of the CUDA backend. Each matches the CPU backend's
// loop in lib/backend/cpu.c on the same inputs (tests/cuda/test_cuda_ops.c checks it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

namespace {

__global__ void axpby_kernel(int64_t n, float alpha, const float *x, float beta, float *y) {
    GRID_STRIDE(i, n) y[i] = alpha * x[i] + beta * y[i];
}

__global__ void mul_kernel(int64_t n, const float *a, const float *b, float *out) {
    GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}

__global__ void silu_kernel(int64_t n, const float *x, float *y) {
    GRID_STRIDE(i, n) y[i] = x[i] / (1.0f + expf(-x[i]));
}

__global__ void silu_backward_kernel(int64_t n, const float *x, const float *dy, float *dx) {
    GRID_STRIDE(i, n) {
        float s = 1.0f / (1.0f + expf(-x[i]));
        dx[i] = dy[i] * s * (1.0f + x[i] * (1.0f - s));
    }
}

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__global__ void gelu_kernel(int64_t n, const float *x, float *y) {
    GRID_STRIDE(i, n) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * kInvSqrt2));
}

__global__ void gelu_backward_kernel(int64_t n, const float *x, const float *dy, float *dx) {
    GRID_STRIDE(i, n) {
        float cdf = 0.5f * (1.0f + erff(x[i] * kInvSqrt2));
        float pdf = kInvSqrt2Pi * expf(-0.5f * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
}

constexpr float kQuickGeluK = 1.702f;

__global__ void quick_gelu_kernel(int64_t n, const float *x, float *y) {
    GRID_STRIDE(i, n) {
        float xi = x[i];
        y[i] = xi * (1.0f / (1.0f + expf(-kQuickGeluK * xi)));
    }
}

__global__ void quick_gelu_backward_kernel(int64_t n, const float *x, const float *dy, float *dx) {
    GRID_STRIDE(i, n) {
        float xi = x[i], s = 1.0f / (1.0f + expf(-kQuickGeluK * xi));
        dx[i] = dy[i] * (s + xi * kQuickGeluK * s * (1.0f - s));
    }
}

__global__ void fill_kernel(int64_t n, float value, float *x) {
    GRID_STRIDE(i, n) x[i] = value;
}

__global__ void scale_kernel(int64_t n, float alpha, float *x) {
    GRID_STRIDE(i, n) x[i] *= alpha;
}

// y[i, j] = row[j] + beta * y[i, j]; beta == 0 does not read y.
__global__ void add_rows_kernel(int64_t n, int64_t c, const float *row, float beta, float *y) {
    GRID_STRIDE(i, n * c) {
        float r = row[i % c];
        y[i] = beta == 0.0f ? r : r + beta * y[i];
    }
}

__global__ void f32_to_f16_kernel(int64_t n, const float *s, __half *d) {
    GRID_STRIDE(i, n) d[i] = __float2half_rn(s[i]);
}
__global__ void f32_to_bf16_kernel(int64_t n, const float *s, __nv_bfloat16 *d) {
    GRID_STRIDE(i, n) d[i] = __float2bfloat16_rn(s[i]);
}
__global__ void f16_to_f32_kernel(int64_t n, const __half *s, float *d) {
    GRID_STRIDE(i, n) d[i] = __half2float(s[i]);
}
__global__ void bf16_to_f32_kernel(int64_t n, const __nv_bfloat16 *s, float *d) {
    GRID_STRIDE(i, n) d[i] = __bfloat162float(s[i]);
}

__global__ void im2col_kernel(const float *x, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                              int64_t stride, int64_t pad, int64_t oh, int64_t ow, float *cols) {
    int64_t total = c * kh * kw * oh * ow;
    GRID_STRIDE(idx, total) {
        int64_t ox = idx % ow;
        int64_t oy = (idx / ow) % oh;
        int64_t r = idx / (ow * oh);
        int64_t ci = r / (kh * kw), ky = (r / kw) % kh, kx = r % kw;
        int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        cols[idx] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[(ci * h + iy) * w + ix] : 0.0f;
    }
}

}  // namespace

extern "C" {

int lk_axpby_f32(lora_cuda_stream s, int64_t n, float alpha, const float *x, float beta, float *y) {
    if (n <= 0) return 0;
    axpby_kernel<<<grid_for(n), kBlock, 0, s>>>(n, alpha, x, beta, y);
    return launched();
}

int lk_mul_f32(lora_cuda_stream s, int64_t n, const float *a, const float *b, float *out) {
    if (n <= 0) return 0;
    mul_kernel<<<grid_for(n), kBlock, 0, s>>>(n, a, b, out);
    return launched();
}

int lk_silu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y) {
    if (n <= 0) return 0;
    silu_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, y);
    return launched();
}

int lk_silu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx) {
    if (n <= 0) return 0;
    silu_backward_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, dy, dx);
    return launched();
}

int lk_gelu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y) {
    if (n <= 0) return 0;
    gelu_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, y);
    return launched();
}

int lk_gelu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx) {
    if (n <= 0) return 0;
    gelu_backward_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, dy, dx);
    return launched();
}

int lk_quick_gelu_f32(lora_cuda_stream s, int64_t n, const float *x, float *y) {
    if (n <= 0) return 0;
    quick_gelu_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, y);
    return launched();
}

int lk_quick_gelu_backward_f32(lora_cuda_stream s, int64_t n, const float *x, const float *dy, float *dx) {
    if (n <= 0) return 0;
    quick_gelu_backward_kernel<<<grid_for(n), kBlock, 0, s>>>(n, x, dy, dx);
    return launched();
}

int lk_fill_f32(lora_cuda_stream s, int64_t n, float value, float *x) {
    if (n <= 0) return 0;
    fill_kernel<<<grid_for(n), kBlock, 0, s>>>(n, value, x);
    return launched();
}

int lk_scale_f32(lora_cuda_stream s, int64_t n, float alpha, float *x) {
    if (n <= 0) return 0;
    scale_kernel<<<grid_for(n), kBlock, 0, s>>>(n, alpha, x);
    return launched();
}

int lk_add_rows_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *row, float beta, float *y) {
    if (n <= 0 || c <= 0) return 0;
    add_rows_kernel<<<grid_for(n * c), kBlock, 0, s>>>(n, c, row, beta, y);
    return launched();
}

int lk_convert(lora_cuda_stream s, int64_t n, int kind, const void *src, void *dst) {
    if (n <= 0) return 0;
    switch (kind) {
    case 0: f32_to_f16_kernel<<<grid_for(n), kBlock, 0, s>>>(n, static_cast<const float *>(src), static_cast<__half *>(dst)); break;
    case 1: f32_to_bf16_kernel<<<grid_for(n), kBlock, 0, s>>>(n, static_cast<const float *>(src), static_cast<__nv_bfloat16 *>(dst)); break;
    case 2: f16_to_f32_kernel<<<grid_for(n), kBlock, 0, s>>>(n, static_cast<const __half *>(src), static_cast<float *>(dst)); break;
    case 3: bf16_to_f32_kernel<<<grid_for(n), kBlock, 0, s>>>(n, static_cast<const __nv_bfloat16 *>(src), static_cast<float *>(dst)); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
    }
    return launched();
}

int lk_im2col_f32(lora_cuda_stream s, const float *x, int64_t c, int64_t h, int64_t w,
                         int64_t kh, int64_t kw, int64_t stride, int64_t pad, float *cols) {
    int64_t oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
    int64_t total = c * kh * kw * oh * ow;
    if (total <= 0) return 0;
    im2col_kernel<<<grid_for(total), kBlock, 0, s>>>(x, c, h, w, kh, kw, stride, pad, oh, ow, cols);
    return launched();
}

}  // extern "C"
