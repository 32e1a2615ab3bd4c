/* Seeded noise for generation: per image, the numbers torch.randn gives after
 * torch.manual_seed(seed) on the CPU (mt19937, lib/core/rng.c), or on a CUDA device (Philox, as
 * AUTOMATIC1111's modules/rng_philox.py re-implements it), one draw of an image latent at a
 * time, in kohya's order (see gen.h). */
#include <math.h>
#include <string.h>

#include "gen/gen.h"

/* Philox4x32-10 keyed by the seed with counter (offset, 0, i, 0); the first two output words
 * make one normal: u = x * 2^-32 + 2^-33, v = y * 2pi 2^-32 + pi 2^-32, sqrt(-2 ln u) sin v.
 * A1111 evaluates this in float64 with the float32-rounded constants, then rounds to float. */
void gen_philox_randn(uint64_t seed, uint32_t offset, float *out, int64_t n) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const double inv = (double)2.3283064e-10f;
    const double inv2pi = (double)(float)(2.3283064e-10 * 6.2831855);
    for (int64_t i = 0; i < n; i++) {
        uint32_t ctr[4] = {offset, 0, (uint32_t)i, 0}, w[4];
        lora_philox4x32_10(ctr, key, w);
        double u = (double)w[0] * inv + (double)(2.3283064e-10f / 2);
        double v = (double)w[1] * inv2pi + (double)((float)(2.3283064e-10 * 6.2831855) / 2);
        out[i] = (float)(sqrt(-2.0 * log(u)) * sin(v));
    }
}

lora_status gen_noise_init(lora_ctx *ctx, struct gen_noise *g, int rng, const uint64_t *seeds, int64_t batch,
                           int64_t per) {
    memset(g, 0, sizeof *g);
    if (batch < 1 || batch > 64)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "batch_size: %lld is outside 1..64", (long long)batch);
    g->rng = rng;
    g->batch = batch;
    g->per = per;
    for (int64_t b = 0; b < batch; b++) g->seed[b] = seeds[b];
    if (rng == GEN_RNG_CPU) {
        g->mt = lora_calloc(ctx, (size_t)batch, sizeof *g->mt);
        if (!g->mt) return LORA_E_NOMEM;
        for (int64_t b = 0; b < batch; b++) lora_mt_seed(&g->mt[b], seeds[b]);
    }
    return LORA_OK;
}

void gen_noise_free(lora_ctx *ctx, struct gen_noise *g) {
    lora_free(ctx, g->mt);
    g->mt = NULL;
}

void gen_noise_next(struct gen_noise *g, float *out) {
    for (int64_t b = 0; b < g->batch; b++) {
        float *o = out + b * g->per;
        if (g->rng == GEN_RNG_CPU) lora_torch_randn(&g->mt[b], o, g->per);
        else gen_philox_randn(g->seed[b], g->offset[b]++, o, g->per);
    }
}

lora_status gen_noise_cb(void *user, float *out, int64_t n) {
    struct gen_noise *g = user;
    if (n != g->batch * g->per) return LORA_E_INTERNAL;
    gen_noise_next(g, out);
    return LORA_OK;
}

lora_status gen_noise_clone(lora_ctx *ctx, const struct gen_noise *g, struct gen_noise *out) {
    *out = *g;
    out->mt = NULL;
    if (g->rng == GEN_RNG_CPU) {
        out->mt = lora_malloc(ctx, (size_t)g->batch * sizeof *out->mt);
        if (!out->mt) return LORA_E_NOMEM;
        memcpy(out->mt, g->mt, (size_t)g->batch * sizeof *out->mt);
    }
    return LORA_OK;
}

/* CPython's random.seed(int): init_genrand(19650218), then init_by_array with the 32-bit words
 * of |seed| (least significant first; one word 0 for seed 0). */
void gen_pyrandom_seed(struct gen_pyrandom *r, uint64_t seed) {
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    int klen = key[1] ? 2 : 1;
    uint32_t *mt = r->mt.state;
    lora_mt_seed(&r->mt, 19650218u);
    int i = 1, j = 0;
    for (int k = 624 > klen ? 624 : klen; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        i++;
        j++;
        if (i >= 624) {
            mt[0] = mt[623];
            i = 1;
        }
        if (j >= klen) j = 0;
    }
    for (int k = 623; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        i++;
        if (i >= 624) {
            mt[0] = mt[623];
            i = 1;
        }
    }
    mt[0] = 0x80000000u;
    r->mt.index = 624;
}

/* random.randint(0, 0x7fffffff) = _randbelow(2^31): getrandbits(32) until below 2^31. */
uint32_t gen_pyrandom_randint31(struct gen_pyrandom *r) {
    for (;;) {
        uint32_t v = lora_mt_next(&r->mt);
        if (v < 0x80000000u) return v;
    }
}
