// Image-op primitives of the U-Net / VAE (NCHW fp32), the CUDA side of lib/backend/cpu_image.c:
// im2col with explicit padding and its adjoint col2im (a gather per input element: no
// atomics, deterministic), per-row scalar add, row sums, GroupNorm (+ SiLU) forward and input
// backward (one block per (sample, group), two-pass statistics), nearest upsample (2x, and
// to any size) and its backward, GEGLU, the sinusoidal timestep embedding and a clamp. Compared with the CPU
// backend in tests/cuda/test_cuda_image.c.
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

namespace {

__global__ void im2col_ex_kernel(const float *x, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                                 int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow,
                                 float *cols) {
    const int64_t total = c * kh * kw * oh * ow;
    GRID_STRIDE(i, total) {
        int64_t ox = i % ow, oy = (i / ow) % oh, r = i / (ow * oh);
        int64_t kx = r % kw, ky = (r / kw) % kh, ci = r / (kw * kh);
        int64_t iy = oy * stride - pad_t + ky, ix = ox * stride - pad_l + kx;
        cols[i] = iy >= 0 && iy < h && ix >= 0 && ix < w ? x[(ci * h + iy) * w + ix] : 0.0f;
    }
}

// x[ci, iy, ix] (+)= sum over (ky, kx) with (iy + pad_t - ky) and (ix + pad_l - kx) on the
// stride grid and inside the output, of cols[(ci, ky, kx), (oy, ox)]; the (ky, kx) order is
// the CPU's.
__global__ void col2im_kernel(const float *cols, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                              int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow, float *x,
                              int accumulate) {
    const int64_t total = c * h * w;
    GRID_STRIDE(i, total) {
        int64_t ix = i % w, iy = (i / w) % h, ci = i / (w * h);
        float s = accumulate ? x[i] : 0.0f;
        for (int64_t ky = 0; ky < kh; ky++) {
            int64_t ty = iy + pad_t - ky;
            if (ty < 0 || ty % stride) continue;
            int64_t oy = ty / stride;
            if (oy >= oh) continue;
            for (int64_t kx = 0; kx < kw; kx++) {
                int64_t tx = ix + pad_l - kx;
                if (tx < 0 || tx % stride) continue;
                int64_t ox = tx / stride;
                if (ox >= ow) continue;
                s += cols[((ci * kh + ky) * kw + kx) * oh * ow + oy * ow + ox];
            }
        }
        x[i] = s;
    }
}

__global__ void add_row_scalar_kernel(int64_t rows, int64_t cols, const float *v, int64_t period, float *y) {
    GRID_STRIDE(i, rows * cols) y[i] += v[(i / cols) % period];
}

__global__ void row_sum_kernel(int64_t rows, int64_t cols, const float *x, float beta, float *out) {
    const int lane = threadIdx.x % kWarp;
    WARP_ROWS(r, rows) {
        float s = 0.0f;
        for (int64_t j = lane; j < cols; j += kWarp) s += x[r * cols + j];
        s = warp_sum(s);
        if (lane == 0) out[r] = beta == 0.0f ? s : beta * out[r] + s;
    }
}

// block-wide sum (kBlock threads) broadcast to every thread
__device__ float block_sum(float v, float *sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float t = threadIdx.x < kBlock / kWarp ? sh[threadIdx.x] : 0.0f;
    if (wid == 0) t = warp_sum(t);
    if (threadIdx.x == 0) sh[0] = t;
    __syncthreads();
    return sh[0];
}

__device__ __forceinline__ float sigm(float z) { return 1.0f / (1.0f + expf(-z)); }

// one block per (sample, group) row of len = (c / groups) * hw contiguous values
__global__ void groupnorm_kernel(int64_t n, int64_t groups, int64_t cg, int64_t hw, float eps, int silu,
                                 const float *x, const float *gamma, const float *beta, float *y, float *mean,
                                 float *rstd) {
    __shared__ float sh[kBlock / kWarp];
    const int64_t len = cg * hw;
    for (int64_t g = blockIdx.x; g < n; g += gridDim.x) {
        const float *xg = x + g * len;
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < len; j += kBlock) s += xg[j];
        const float mu = block_sum(s, sh) / (float)len;
        float v = 0.0f;
        for (int64_t j = threadIdx.x; j < len; j += kBlock) {
            float d = xg[j] - mu;
            v += d * d;
        }
        const float r = 1.0f / sqrtf(block_sum(v, sh) / (float)len + eps);
        const int64_t c0 = (g % groups) * cg;
        for (int64_t j = threadIdx.x; j < len; j += kBlock) {
            int64_t ch = c0 + j / hw;
            float z = (xg[j] - mu) * r * (gamma ? gamma[ch] : 1.0f) + (beta ? beta[ch] : 0.0f);
            y[g * len + j] = silu ? z * sigm(z) : z;
        }
        if (threadIdx.x == 0) {
            mean[g] = mu;
            rstd[g] = r;
        }
    }
}

__global__ void groupnorm_backward_kernel(int64_t n, int64_t groups, int64_t cg, int64_t hw, int silu,
                                          const float *dy, const float *x, const float *mean, const float *rstd,
                                          const float *gamma, const float *beta, float *dx, int accumulate) {
    __shared__ float sh[kBlock / kWarp];
    const int64_t len = cg * hw;
    for (int64_t g = blockIdx.x; g < n; g += gridDim.x) {
        const float *xg = x + g * len, *dyg = dy + g * len;
        const float mu = mean[g], r = rstd[g];
        const int64_t c0 = (g % groups) * cg;
        float s1 = 0.0f, s2 = 0.0f;
        for (int64_t j = threadIdx.x; j < len; j += kBlock) {
            int64_t ch = c0 + j / hw;
            float gm = gamma ? gamma[ch] : 1.0f, xh = (xg[j] - mu) * r, dz = dyg[j];
            if (silu) {
                float z = xh * gm + (beta ? beta[ch] : 0.0f), sg = sigm(z);
                dz *= sg * (1.0f + z * (1.0f - sg));
            }
            s1 += dz * gm;
            s2 += dz * gm * xh;
        }
        const float m1 = block_sum(s1, sh) / (float)len, m2 = block_sum(s2, sh) / (float)len;
        for (int64_t j = threadIdx.x; j < len; j += kBlock) {
            int64_t ch = c0 + j / hw;
            float gm = gamma ? gamma[ch] : 1.0f, xh = (xg[j] - mu) * r, dz = dyg[j];
            if (silu) {
                float z = xh * gm + (beta ? beta[ch] : 0.0f), sg = sigm(z);
                dz *= sg * (1.0f + z * (1.0f - sg));
            }
            float v = r * (dz * gm - m1 - xh * m2);
            dx[g * len + j] = accumulate ? dx[g * len + j] + v : v;
        }
    }
}

__global__ void upsample2x_kernel(int64_t planes, int64_t h, int64_t w, const float *x, float *y) {
    const int64_t w2 = 2 * w, h2 = 2 * h;
    GRID_STRIDE(i, planes * h2 * w2) {
        int64_t ox = i % w2, oy = (i / w2) % h2, p = i / (w2 * h2);
        y[i] = x[(p * h + oy / 2) * w + ox / 2];
    }
}

__global__ void upsample2x_backward_kernel(int64_t planes, int64_t h, int64_t w, const float *dy, float *dx) {
    GRID_STRIDE(i, planes * h * w) {
        int64_t x = i % w, yy = (i / w) % h, p = i / (w * h);
        const float *y0 = dy + (p * 2 * h + 2 * yy) * 2 * w, *y1 = y0 + 2 * w;
        dx[i] = (y0[2 * x] + y0[2 * x + 1]) + (y1[2 * x] + y1[2 * x + 1]);
    }
}

// PyTorch 1.13's nearest_idx (see cpu_image.c nearest_src): float32 product, no FMA involved
__device__ __forceinline__ int64_t nearest_src(int64_t o, int64_t in, int64_t out) {
    if (out == in) return o;
    if (out == 2 * in) return o >> 1;
    float scale = __fdiv_rn((float)in, (float)out);
    int64_t s = (int64_t)floorf(__fmul_rn((float)o, scale));
    return s < in - 1 ? s : in - 1;
}

__device__ __forceinline__ void nearest_range(int64_t s, int64_t in, int64_t out, int64_t *lo, int64_t *hi) {
    int64_t o = s * out / in;
    while (o > 0 && nearest_src(o - 1, in, out) >= s) o--;
    while (o < out && nearest_src(o, in, out) < s) o++;
    *lo = o;
    while (o < out && nearest_src(o, in, out) == s) o++;
    *hi = o;
}

__global__ void upsample_nearest_kernel(int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow,
                                        const float *x, float *y) {
    GRID_STRIDE(i, planes * oh * ow) {
        int64_t ox = i % ow, oy = (i / ow) % oh, p = i / (ow * oh);
        y[i] = x[(p * h + nearest_src(oy, h, oh)) * w + nearest_src(ox, w, ow)];
    }
}

// a gather per dx element, summed in dy's row-major order (the CPU backend's order)
__global__ void upsample_nearest_backward_kernel(int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow,
                                                 const float *dy, float *dx) {
    GRID_STRIDE(i, planes * h * w) {
        int64_t x = i % w, yy = (i / w) % h, p = i / (w * h), r0, r1, c0, c1;
        nearest_range(yy, h, oh, &r0, &r1);
        nearest_range(x, w, ow, &c0, &c1);
        float acc = 0.0f;
        for (int64_t r = r0; r < r1; r++)
            for (int64_t c = c0; c < c1; c++) acc = __fadd_rn(acc, dy[(p * oh + r) * ow + c]);
        dx[i] = acc;
    }
}

__global__ void geglu_kernel(int64_t n, int64_t inner, const float *x, float *y) {
    GRID_STRIDE(i, n * inner) {
        int64_t r = i / inner, j = i % inner;
        float hv = x[r * 2 * inner + j], g = x[r * 2 * inner + inner + j];
        y[i] = hv * (0.5f * g * (1.0f + erff(g * 0.70710678118654752f)));
    }
}

__global__ void geglu_backward_kernel(int64_t n, int64_t inner, const float *x, const float *dy, float *dx) {
    GRID_STRIDE(i, n * inner) {
        int64_t r = i / inner, j = i % inner;
        float hv = x[r * 2 * inner + j], g = x[r * 2 * inner + inner + j], d = dy[i];
        float cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * g * g);
        dx[r * 2 * inner + j] = d * g * cdf;
        dx[r * 2 * inner + inner + j] = d * hv * (cdf + g * pdf);
    }
}

__global__ void timestep_embedding_kernel(int64_t batch, int64_t dim, const float *t, int flip, float shift,
                                          float nl, float *y) {
    const int64_t half = dim / 2;
    GRID_STRIDE(i, batch * half) {
        int64_t b = i / half, k = i % half;
        float e = (nl * (float)k) / ((float)half - shift);
        float a = t[b] * expf(e);
        float sv = (float)sin((double)a), cv = (float)cos((double)a);
        y[b * dim + (flip ? half + k : k)] = sv;
        y[b * dim + (flip ? k : half + k)] = cv;
        if (k == 0 && (dim % 2)) y[b * dim + dim - 1] = 0.0f;
    }
}

__global__ void clamp_kernel(int64_t n, float lo, float hi, float *x) {
    GRID_STRIDE(i, n) x[i] = fminf(fmaxf(x[i], lo), hi);
}

inline unsigned grid_for_groups(int64_t n) { return n < 1 ? 1u : (n > 65535 ? 65535u : (unsigned)n); }

}  // namespace

extern "C" {

int lk_im2col_ex_f32(lora_cuda_stream s, const float *x, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                     int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow, float *cols) {
    int64_t total = c * kh * kw * oh * ow;
    if (total <= 0) return 0;
    im2col_ex_kernel<<<grid_for(total), kBlock, 0, s>>>(x, c, h, w, kh, kw, stride, pad_t, pad_l, oh, ow, cols);
    return launched();
}

int lk_col2im_f32(lora_cuda_stream s, const float *cols, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                  int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh, int64_t ow, float *x, int accumulate) {
    int64_t total = c * h * w;
    if (total <= 0) return 0;
    col2im_kernel<<<grid_for(total), kBlock, 0, s>>>(cols, c, h, w, kh, kw, stride, pad_t, pad_l, oh, ow, x,
                                                     accumulate);
    return launched();
}

int lk_add_row_scalar_f32(lora_cuda_stream s, int64_t rows, int64_t cols, const float *v, int64_t period, float *y) {
    if (rows * cols <= 0) return 0;
    add_row_scalar_kernel<<<grid_for(rows * cols), kBlock, 0, s>>>(rows, cols, v, period, y);
    return launched();
}

int lk_row_sum_f32(lora_cuda_stream s, int64_t rows, int64_t cols, const float *x, float beta, float *out) {
    if (rows <= 0) return 0;
    row_sum_kernel<<<grid_for_rows(rows), kBlock, 0, s>>>(rows, cols, x, beta, out);
    return launched();
}

int lk_groupnorm_f32(lora_cuda_stream s, int64_t batch, int64_t c, int64_t hw, int64_t groups, float eps, int silu,
                     const float *x, const float *gamma, const float *beta, float *y, float *mean, float *rstd) {
    int64_t n = batch * groups;
    if (n <= 0) return 0;
    groupnorm_kernel<<<grid_for_groups(n), kBlock, 0, s>>>(n, groups, c / groups, hw, eps, silu, x, gamma, beta, y,
                                                           mean, rstd);
    return launched();
}

int lk_groupnorm_backward_f32(lora_cuda_stream s, int64_t batch, int64_t c, int64_t hw, int64_t groups, int silu,
                              const float *dy, const float *x, const float *mean, const float *rstd,
                              const float *gamma, const float *beta, float *dx, int accumulate) {
    int64_t n = batch * groups;
    if (n <= 0) return 0;
    groupnorm_backward_kernel<<<grid_for_groups(n), kBlock, 0, s>>>(n, groups, c / groups, hw, silu, dy, x, mean,
                                                                    rstd, gamma, beta, dx, accumulate);
    return launched();
}

int lk_upsample2x_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, const float *x, float *y) {
    if (planes * h * w <= 0) return 0;
    upsample2x_kernel<<<grid_for(planes * h * w * 4), kBlock, 0, s>>>(planes, h, w, x, y);
    return launched();
}

int lk_upsample2x_backward_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, const float *dy,
                               float *dx) {
    if (planes * h * w <= 0) return 0;
    upsample2x_backward_kernel<<<grid_for(planes * h * w), kBlock, 0, s>>>(planes, h, w, dy, dx);
    return launched();
}

int lk_upsample_nearest_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, int64_t oh, int64_t ow,
                            const float *x, float *y) {
    if (planes * oh * ow <= 0 || h <= 0 || w <= 0) return 0;
    upsample_nearest_kernel<<<grid_for(planes * oh * ow), kBlock, 0, s>>>(planes, h, w, oh, ow, x, y);
    return launched();
}

int lk_upsample_nearest_backward_f32(lora_cuda_stream s, int64_t planes, int64_t h, int64_t w, int64_t oh,
                                     int64_t ow, const float *dy, float *dx) {
    if (planes * h * w <= 0 || oh <= 0 || ow <= 0) return 0;
    upsample_nearest_backward_kernel<<<grid_for(planes * h * w), kBlock, 0, s>>>(planes, h, w, oh, ow, dy, dx);
    return launched();
}

int lk_geglu_f32(lora_cuda_stream s, int64_t n, int64_t inner, const float *x, float *y) {
    if (n * inner <= 0) return 0;
    geglu_kernel<<<grid_for(n * inner), kBlock, 0, s>>>(n, inner, x, y);
    return launched();
}

int lk_geglu_backward_f32(lora_cuda_stream s, int64_t n, int64_t inner, const float *x, const float *dy, float *dx) {
    if (n * inner <= 0) return 0;
    geglu_backward_kernel<<<grid_for(n * inner), kBlock, 0, s>>>(n, inner, x, dy, dx);
    return launched();
}

int lk_timestep_embedding_f32(lora_cuda_stream s, int64_t batch, int64_t dim, const float *t, int flip,
                              float freq_shift, float max_period, float *y) {
    int64_t half = dim / 2;
    if (batch * half <= 0) return 0;
    float nl = (float)-log((double)max_period);
    timestep_embedding_kernel<<<grid_for(batch * half), kBlock, 0, s>>>(batch, dim, t, flip, freq_shift, nl, y);
    return launched();
}

int lk_clamp_f32(lora_cuda_stream s, int64_t n, float lo, float hi, float *x) {
    if (n <= 0) return 0;
    clamp_kernel<<<grid_for(n), kBlock, 0, s>>>(n, lo, hi, x);
    return launched();
}

}  // extern "C"
