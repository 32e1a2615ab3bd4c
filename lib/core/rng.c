#include <math.h>

#include "core/rng.h"

#define MT_N 624
#define MT_M 397

void lora_mt_seed(struct lora_mt19937 *g, uint64_t seed) {
    g->state[0] = (uint32_t)(seed & 0xffffffffu);
    for (int i = 1; i < MT_N; i++)
        g->state[i] = 1812433253u * (g->state[i - 1] ^ (g->state[i - 1] >> 30)) + (uint32_t)i;
    g->index = MT_N;
    g->has_normal = 0;
    g->next_normal = 0.0;
}

static void mt_twist(struct lora_mt19937 *g) {
    for (int i = 0; i < MT_N; i++) {
        uint32_t y = (g->state[i] & 0x80000000u) | (g->state[(i + 1) % MT_N] & 0x7fffffffu);
        uint32_t v = g->state[(i + MT_M) % MT_N] ^ (y >> 1);
        if (y & 1u) v ^= 0x9908b0dfu;
        g->state[i] = v;
    }
    g->index = 0;
}

uint32_t lora_mt_next(struct lora_mt19937 *g) {
    if (g->index >= MT_N) mt_twist(g);
    uint32_t y = g->state[g->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

static float uniform_f32(struct lora_mt19937 *g) {
    return (float)(lora_mt_next(g) & ((1u << 24) - 1)) * (1.0f / 16777216.0f);
}

static double uniform_f64(struct lora_mt19937 *g) {
    uint64_t hi = lora_mt_next(g), lo = lora_mt_next(g);
    uint64_t x = (hi << 32) | lo;
    return (double)(x & ((UINT64_C(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

void lora_torch_rand(struct lora_mt19937 *g, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = uniform_f32(g);
}

#define TWO_PI_F 6.283185307179586f

static void normal_fill_16(float *d) {
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - d[j];
        float u2 = d[j + 8];
        float r = sqrtf(-2.0f * logf(u1));
        float theta = TWO_PI_F * u2;
        d[j] = r * cosf(theta);
        d[j + 8] = r * sinf(theta);
    }
}

void lora_torch_randn(struct lora_mt19937 *g, float *out, int64_t n) {
    if (n >= 16) {
        /* torch's normal_fill: all uniforms first, Box-Muller per block of 16, and a fresh
         * block of 16 over the tail when n is not a multiple of 16. */
        for (int64_t i = 0; i < n; i++) out[i] = uniform_f32(g);
        for (int64_t i = 0; i + 16 <= n; i += 16) normal_fill_16(out + i);
        if (n % 16 != 0) {
            float *tail = out + n - 16;
            for (int i = 0; i < 16; i++) tail[i] = uniform_f32(g);
            normal_fill_16(tail);
        }
        return;
    }
    /* Small tensors: double-precision Box-Muller per element with the cached second value. */
    for (int64_t i = 0; i < n; i++) {
        if (g->has_normal) {
            g->has_normal = 0;
            out[i] = (float)g->next_normal;
            continue;
        }
        double u1 = uniform_f64(g);
        double u2 = uniform_f64(g);
        double r = sqrt(-2.0 * log(1.0 - u2));
        double theta = 2.0 * M_PI * u1;
        g->has_normal = 1;
        g->next_normal = r * sin(theta);
        out[i] = (float)(r * cos(theta));
    }
}

/* ---- Philox4x32-10 (Salmon et al., SC'11) --------------------------------------------- */
void lora_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Block b of the stream holds elements 4b..4b+3: two Box-Muller pairs from its 4 words. */
void lora_philox_normal(uint64_t seed, uint64_t offset, float *out, int64_t count) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    for (int64_t i = 0; i < count;) {
        uint64_t pos = offset + (uint64_t)i;
        uint64_t block = pos / 4;
        uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0, 0}, w[4];
        lora_philox4x32_10(ctr, key, w);
        float z[4];
        for (int p = 0; p < 2; p++) {
            /* uniforms in (0, 1]: never log(0) */
            float u1 = ((float)(w[2 * p] >> 8) + 1.0f) * (1.0f / 16777216.0f);
            float u2 = (float)(w[2 * p + 1] >> 8) * (1.0f / 16777216.0f);
            float r = sqrtf(-2.0f * logf(u1));
            z[2 * p] = r * cosf(TWO_PI_F * u2);
            z[2 * p + 1] = r * sinf(TWO_PI_F * u2);
        }
        for (uint64_t k = pos % 4; k < 4 && i < count; k++, i++) out[i] = z[k];
    }
}
