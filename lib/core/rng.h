/* Random numbers. Two generators, both seedable, resumable (plain structs) and free of
 * global state:
 *  - mt19937 with PyTorch's CPU transforms, so a seed yields the numbers of
 *    torch.randn(n, generator=torch.Generator().manual_seed(seed)) (spec/kohya-lora.md App. A);
 *  - Philox4x32-10, counter-based (key = seed, counter = stream position), for reproducible
 *    parallel noise: element i depends only on (seed, offset + i). */
#ifndef LORA_CORE_RNG_H
#define LORA_CORE_RNG_H

#include <stdint.h>

struct lora_mt19937 {
    uint32_t state[624];
    int32_t index;
    int32_t has_normal;        /* torch caches the second double Box-Muller value */
    double next_normal;
};

void lora_mt_seed(struct lora_mt19937 *g, uint64_t seed);
uint32_t lora_mt_next(struct lora_mt19937 *g);
/* torch.randn on CPU, float32, contiguous, standard normal. */
void lora_torch_randn(struct lora_mt19937 *g, float *out, int64_t n);
/* torch.rand on CPU, float32: 24-bit uniforms in [0, 1). */
void lora_torch_rand(struct lora_mt19937 *g, float *out, int64_t n);

/* One Philox4x32-10 block: 4 outputs for (counter, key). */
void lora_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);
/* Standard normals n[i] for i in [0, count): element i of the stream (seed, offset + i),
 * independent of how the range is split across calls or threads. */
void lora_philox_normal(uint64_t seed, uint64_t offset, float *out, int64_t count);

#endif
