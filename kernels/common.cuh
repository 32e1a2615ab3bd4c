// Helpers shared by the .cu files (each includes this once; everything here is internal to
// its translation unit).
#ifndef LORA_KERNELS_COMMON_CUH
#define LORA_KERNELS_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kBlock = 256;
constexpr int kWarp = 32;

// Grid-stride loops so any n fits a bounded grid.
inline unsigned grid_for(int64_t n) {
    int64_t blocks = (n + kBlock - 1) / kBlock;
    if (blocks > 65535 * 8) blocks = 65535 * 8;
    return blocks < 1 ? 1u : static_cast<unsigned>(blocks);
}

// Blocks of kBlock threads for one warp per row, bounded (the kernels loop over rows).
inline unsigned grid_for_rows(int64_t rows) {
    const int64_t per = kBlock / kWarp;
    int64_t blocks = (rows + per - 1) / per;
    if (blocks > 65535 * 8) blocks = 65535 * 8;
    return blocks < 1 ? 1u : static_cast<unsigned>(blocks);
}

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

// One warp per row: row index and a stride over the grid's warps.
#define WARP_ROWS(r, rows) \
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / kWarp; r < (rows); \
         r += ((int64_t)blockDim.x * gridDim.x) / kWarp)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

inline int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

#endif
