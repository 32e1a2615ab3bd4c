// Embedding gather (token table + learned positions) with the id range check, and its
// scatter-add backward.
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

static_assert(sizeof(uint64_t) == sizeof(unsigned long long), "flag word");

namespace {

// y[i] = table[ids[i]] (+ pos[i % positions]). A row whose id is outside [0, vocab) is
// written as zeros and its index min-reduced into *flag (which starts at ~0).
__global__ void embedding_kernel(int64_t n, int64_t c, const int32_t *ids, const float *table, const float *pos,
                                 int64_t positions, int64_t vocab, float *y, unsigned long long *flag) {
    GRID_STRIDE(idx, n * c) {
        const int64_t i = idx / c, j = idx % c;
        const int32_t id = ids[i];
        if (id < 0 || id >= vocab) {
            if (j == 0) atomicMin(flag, static_cast<unsigned long long>(i));
            y[idx] = 0.0f;
            continue;
        }
        float v = table[(int64_t)id * c + j];
        if (pos) v += pos[(i % positions) * c + j];
        y[idx] = v;
    }
}

// d_table[ids[i]] += dy[i]; d_pos[i % positions] += dy[i]. Rows may share an id or a
// position, so the adds are atomic (their order, and the last bits, vary between runs).
__global__ void embedding_backward_kernel(int64_t n, int64_t c, const int32_t *ids, const float *dy,
                                          int64_t positions, float *d_table, float *d_pos) {
    GRID_STRIDE(idx, n * c) {
        const int64_t i = idx / c, j = idx % c;
        const float g = dy[idx];
        if (d_table) {
            const int32_t id = ids[i];
            if (id >= 0) atomicAdd(&d_table[(int64_t)id * c + j], g);
        }
        if (d_pos) atomicAdd(&d_pos[(i % positions) * c + j], g);
    }
}

}  // namespace

extern "C" {

int lk_embedding_f32(lora_cuda_stream s, int64_t n, int64_t c, const int32_t *ids, const float *table,
                     const float *pos, int64_t positions, int64_t vocab, float *y, uint64_t *flag) {
    if (n <= 0 || c <= 0) return 0;
    cudaError_t e = cudaMemsetAsync(flag, 0xff, sizeof *flag, s);
    if (e != cudaSuccess) return static_cast<int>(e);
    embedding_kernel<<<grid_for(n * c), kBlock, 0, s>>>(n, c, ids, table, pos, positions, vocab, y,
                                                        reinterpret_cast<unsigned long long *>(flag));
    return launched();
}

int lk_embedding_backward_f32(lora_cuda_stream s, int64_t n, int64_t c, const int32_t *ids, const float *dy,
                              int64_t positions, float *d_table, float *d_pos) {
    if (n <= 0 || c <= 0 || (!d_table && !d_pos)) return 0;
    embedding_backward_kernel<<<grid_for(n * c), kBlock, 0, s>>>(n, c, ids, dy, positions, d_table, d_pos);
    return launched();
}

}  // extern "C"
