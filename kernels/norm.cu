// LayerNorm forward/backward and column sums (bias and LayerNorm parameter gradients). Match
// the CPU backend's loops in lib/backend/cpu.c to fp32 rounding (tests/cuda/test_cuda_nn.c).
// Row statistics: one warp per row, two passes (mean, then centred variance) in fp32 with
// tree reductions. Column sums: one 32-column tile per block, 8 row lanes per column, a
// fixed reduction order (deterministic, no atomics).
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

namespace {

constexpr int kColRows = 8;   // row lanes per column in the column-sum kernels

__global__ void layernorm_kernel(int64_t n, int64_t c, float eps, const float *x, const float *gamma,
                                 const float *beta, float *y, float *mean, float *rstd) {
    const int lane = threadIdx.x % kWarp;
    WARP_ROWS(r, n) {
        const float *xr = x + r * c;
        float s = 0.0f;
        for (int64_t j = lane; j < c; j += kWarp) s += xr[j];
        const float m = warp_sum(s) / (float)c;
        float v = 0.0f;
        for (int64_t j = lane; j < c; j += kWarp) {
            float d = xr[j] - m;
            v += d * d;
        }
        const float rs = 1.0f / sqrtf(warp_sum(v) / (float)c + eps);
        float *yr = y + r * c;   // may alias xr: each lane rewrites only the columns it read
        for (int64_t j = lane; j < c; j += kWarp) {
            float nrm = (xr[j] - m) * rs;
            yr[j] = nrm * (gamma ? gamma[j] : 1.0f) + (beta ? beta[j] : 0.0f);
        }
        if (lane == 0) {
            mean[r] = m;
            rstd[r] = rs;
        }
    }
}

// dx = rstd * (g - mean(g) - xh * mean(g * xh)), g = dy * gamma, xh = (x - mean) * rstd
__global__ void layernorm_dx_kernel(int64_t n, int64_t c, const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *gamma, float *dx, int accumulate) {
    const int lane = threadIdx.x % kWarp;
    WARP_ROWS(r, n) {
        const float *xr = x + r * c, *gr = dy + r * c;
        const float m = mean[r], rs = rstd[r];
        float sg = 0.0f, sgx = 0.0f;
        for (int64_t j = lane; j < c; j += kWarp) {
            float g = gr[j] * (gamma ? gamma[j] : 1.0f);
            sg += g;
            sgx += g * ((xr[j] - m) * rs);
        }
        const float mg = warp_sum(sg) / (float)c, mgx = warp_sum(sgx) / (float)c;
        float *dr = dx + r * c;
        for (int64_t j = lane; j < c; j += kWarp) {
            float g = gr[j] * (gamma ? gamma[j] : 1.0f);
            float v = rs * (g - mg - (xr[j] - m) * rs * mgx);
            dr[j] = accumulate ? dr[j] + v : v;
        }
    }
}

// d_gamma[j] += sum_i dy[i,j] * xh[i,j]; d_beta[j] += sum_i dy[i,j]. Block (32, kColRows).
__global__ void layernorm_param_kernel(int64_t n, int64_t c, const float *dy, const float *x, const float *mean,
                                       const float *rstd, float *d_gamma, float *d_beta) {
    __shared__ float sg[kColRows][kWarp + 1], sb[kColRows][kWarp + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t j0 = (int64_t)blockIdx.x * kWarp; j0 < c; j0 += (int64_t)gridDim.x * kWarp) {
        const int64_t j = j0 + tx;
        float ag = 0.0f, ab = 0.0f;
        if (j < c)
            for (int64_t i = ty; i < n; i += kColRows) {
                float g = dy[i * c + j];
                ag += g * ((x[i * c + j] - mean[i]) * rstd[i]);
                ab += g;
            }
        sg[ty][tx] = ag;
        sb[ty][tx] = ab;
        __syncthreads();
        if (ty == 0 && j < c) {
            float tg = 0.0f, tb = 0.0f;
            for (int k = 0; k < kColRows; k++) {
                tg += sg[k][tx];
                tb += sb[k][tx];
            }
            if (d_gamma) d_gamma[j] += tg;
            if (d_beta) d_beta[j] += tb;
        }
        __syncthreads();
    }
}

// out[j] = sum_i x[i,j] + beta * out[j] (beta == 0: written). Block (32, kColRows).
__global__ void col_sum_kernel(int64_t n, int64_t c, const float *x, float beta, float *out) {
    __shared__ float sh[kColRows][kWarp + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t j0 = (int64_t)blockIdx.x * kWarp; j0 < c; j0 += (int64_t)gridDim.x * kWarp) {
        const int64_t j = j0 + tx;
        float a = 0.0f;
        if (j < c)
            for (int64_t i = ty; i < n; i += kColRows) a += x[i * c + j];
        sh[ty][tx] = a;
        __syncthreads();
        if (ty == 0 && j < c) {
            float t = 0.0f;
            for (int k = 0; k < kColRows; k++) t += sh[k][tx];
            out[j] = beta == 0.0f ? t : beta * out[j] + t;
        }
        __syncthreads();
    }
}

inline unsigned col_tiles(int64_t c) {
    int64_t tiles = (c + kWarp - 1) / kWarp;
    if (tiles > 65535) tiles = 65535;
    return tiles < 1 ? 1u : static_cast<unsigned>(tiles);
}

}  // namespace

extern "C" {

int lk_layernorm_f32(lora_cuda_stream s, int64_t n, int64_t c, float eps, const float *x, const float *gamma,
                     const float *beta, float *y, float *mean, float *rstd) {
    if (n <= 0 || c <= 0) return 0;
    layernorm_kernel<<<grid_for_rows(n), kBlock, 0, s>>>(n, c, eps, x, gamma, beta, y, mean, rstd);
    return launched();
}

int lk_layernorm_backward_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *dy, const float *x,
                              const float *mean, const float *rstd, const float *gamma, float *dx,
                              float *d_gamma, float *d_beta, int accumulate) {
    if (n <= 0 || c <= 0) return 0;
    if (dx) {
        layernorm_dx_kernel<<<grid_for_rows(n), kBlock, 0, s>>>(n, c, dy, x, mean, rstd, gamma, dx, accumulate);
        int e = launched();
        if (e) return e;
    }
    if (d_gamma || d_beta) {
        layernorm_param_kernel<<<col_tiles(c), dim3(kWarp, kColRows), 0, s>>>(n, c, dy, x, mean, rstd, d_gamma,
                                                                            d_beta);
        return launched();
    }
    return 0;
}

int lk_col_sum_f32(lora_cuda_stream s, int64_t n, int64_t c, const float *x, float beta, float *out) {
    if (c <= 0) return 0;
    col_sum_kernel<<<col_tiles(c), dim3(kWarp, kColRows), 0, s>>>(n, c, x, beta, out);
    return launched();
}

}  // extern "C"
