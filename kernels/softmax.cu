// Row softmax (attention probabilities) with the optional causal mask, and its backward.
// One warp per row; match the CPU backend's loops (lib/backend/cpu.c) to fp32 rounding.
#include <math.h>

#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

namespace {

// Row r of a stack of [t, t] score matrices; causal keeps columns j <= r % t, the rest
// become exact zeros.
__global__ void softmax_kernel(int64_t rows, int64_t t, int causal, float *x) {
    const int lane = threadIdx.x % kWarp;
    WARP_ROWS(r, rows) {
        float *s = x + r * t;
        const int64_t lim = causal ? r % t + 1 : t;
        float mx = -INFINITY;
        for (int64_t j = lane; j < lim; j += kWarp) mx = fmaxf(mx, s[j]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int64_t j = lane; j < lim; j += kWarp) {
            float e = expf(s[j] - mx);
            s[j] = e;
            sum += e;
        }
        const float inv = 1.0f / warp_sum(sum);
        for (int64_t j = lane; j < lim; j += kWarp) s[j] *= inv;
        for (int64_t j = lim + lane; j < t; j += kWarp) s[j] = 0.0f;
    }
}

// dx = p * (dy - sum_j p dy); dx may alias dy (every lane has read its dy before the
// reduction, and rewrites only its own columns).
__global__ void softmax_backward_kernel(int64_t rows, int64_t t, const float *p, const float *dy, float *dx) {
    const int lane = threadIdx.x % kWarp;
    WARP_ROWS(r, rows) {
        const float *pr = p + r * t, *gr = dy + r * t;
        float dot = 0.0f;
        for (int64_t j = lane; j < t; j += kWarp) dot += pr[j] * gr[j];
        dot = warp_sum(dot);
        float *dr = dx + r * t;
        for (int64_t j = lane; j < t; j += kWarp) dr[j] = pr[j] * (gr[j] - dot);
    }
}

}  // namespace

extern "C" {

int lk_softmax_f32(lora_cuda_stream s, int64_t rows, int64_t t, int causal, float *x) {
    if (rows <= 0 || t <= 0) return 0;
    softmax_kernel<<<grid_for_rows(rows), kBlock, 0, s>>>(rows, t, causal, x);
    return launched();
}

int lk_softmax_backward_f32(lora_cuda_stream s, int64_t rows, int64_t t, const float *p, const float *dy,
                            float *dx) {
    if (rows <= 0 || t <= 0) return 0;
    softmax_backward_kernel<<<grid_for_rows(rows), kBlock, 0, s>>>(rows, t, p, dy, dx);
    return launched();
}

}  // extern "C"
