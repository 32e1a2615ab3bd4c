/* The vectorised row conversions of core/dtype.c against the scalar definitions: every fp16 bit
 * pattern (f16 -> f32, NaN payloads kept), fp32 edge patterns and 4M random ones (f32 -> f16,
 * round to nearest even, NaN -> sign | 0x7e00), lengths that leave vector tails, and the NaN
 * scan of 16-bit floats against isnan() of the widened value, at positions across its blocks. */
#include <math.h>
#include <stdlib.h>

#include "core/dtype.h"
#include "../test.h"

static void test_f16_to_f32(void) {
    uint16_t *h = malloc(65536 * 2 + 64);
    float *f = malloc(65536 * 4 + 128);
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    int64_t bad = 0;
    for (int off = 0; off < 3; off++) {   /* misaligned starts and odd lengths: the scalar tails */
        lora_f16_to_f32_row(h + off, f, 65536 - 2 * off - (off == 2));
        for (int i = 0; i < 65536 - 2 * off - (off == 2); i++) {
            float want = lora_f16_to_f32(h[i + off]);
            bad += memcmp(&want, &f[i], 4) != 0;
        }
    }
    CHECK_MSG(bad == 0, "lora_f16_to_f32_row: %lld values differ from lora_f16_to_f32", (long long)bad);
    /* hand-derived anchors: 1.0, -2.0, the smallest subnormal 2^-24, inf, a NaN payload */
    static const uint16_t in[5] = {0x3c00, 0xc000, 0x0001, 0x7c00, 0x7d01};
    static const uint32_t want[5] = {0x3f800000u, 0xc0000000u, 0x33800000u, 0x7f800000u, 0x7fa02000u};
    float out[5];
    lora_f16_to_f32_row(in, out, 5);
    for (int i = 0; i < 5; i++) CHECK_MSG(memcmp(&out[i], &want[i], 4) == 0, "anchor %d: %04x", i, in[i]);
    free(h);
    free(f);
}

static void test_f32_to_f16(void) {
    int64_t n = (1 << 22) + 7;
    uint32_t *bits = malloc((size_t)n * 4);
    uint16_t *h = malloc((size_t)n * 2);
    static const uint32_t edge[] = {0, 0x80000000u, 1, 0x00400000u, 0x33000000u, 0x33000001u, 0x337fffffu, 0x38800000u,
                                    0x387fffffu, 0x38801000u, 0x38803000u, 0x477fefffu, 0x477ff000u, 0x7f800000u,
                                    0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffbfffffu, 0x3f800000u, 0x3f801000u};
    uint64_t x = 0x243f6a8885a308d3ull;
    for (int64_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        bits[i] = i < (int64_t)(sizeof edge / sizeof *edge) ? edge[i] : (uint32_t)x;
    }
    lora_f32_to_f16_row((const float *)bits, h, n);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, &bits[i], 4);
        bad += h[i] != lora_f32_to_f16(f);
    }
    CHECK_MSG(bad == 0, "lora_f32_to_f16_row: %lld of %lld values differ from lora_f32_to_f16", (long long)bad,
              (long long)n);
    /* hand-derived: 1 + 2^-11 is a tie -> even (1.0); 1 + 3 * 2^-11 -> 1 + 2^-9; 65520 -> inf;
     * a NaN with a payload -> 0x7e00, its sign kept */
    static const uint32_t in[4] = {0x3f801000u, 0x3f803000u, 0x477ff000u, 0xffa00001u};
    static const uint16_t want[4] = {0x3c00, 0x3c02, 0x7c00, 0xfe00};
    for (int k = 0; k < 4; k++) {   /* alone (scalar tail) and inside a block of 8 (vector path) */
        float blk[9] = {0};
        uint16_t o[9];
        memcpy(&blk[k], &in[k], 4);
        lora_f32_to_f16_row(blk, o, 9);
        CHECK_MSG(o[k] == want[k], "anchor %08x -> %04x, want %04x", in[k], o[k], want[k]);
        lora_f32_to_f16_row(blk + k, o, 1);
        CHECK_MSG(o[0] == want[k], "anchor %08x alone -> %04x, want %04x", in[k], o[0], want[k]);
    }
    free(bits);
    free(h);
}

static void test_has_nan(void) {
    int64_t n = 70001;   /* three scan blocks of 32768, the last one partial */
    uint16_t *h = calloc((size_t)n, 2);
    int64_t bad = 0, nans = 0;
    for (int dt = 0; dt < 2; dt++) {
        lora_dtype t = dt ? LORA_DTYPE_BF16 : LORA_DTYPE_F16;
        for (uint32_t p = 0; p < 65536; p++) {
            float f = dt ? lora_bf16_to_f32((uint16_t)p) : lora_f16_to_f32((uint16_t)p);
            int want = isnan(f) != 0;
            nans += want;
            uint16_t one = (uint16_t)p;
            bad += lora_half_has_nan(t, &one, 1) != want;
            if (p % 97 == 0 || want) {   /* every NaN and a sample of the rest, at scattered positions */
                int64_t at = (int64_t)(p * 2654435761u % (uint32_t)n);
                h[at] = (uint16_t)p;
                bad += lora_half_has_nan(t, h, n) != want;
                h[at] = 0;
            }
        }
    }
    CHECK_MSG(bad == 0, "lora_half_has_nan: %lld wrong answers", (long long)bad);
    /* 2 * (2^10 - 1) f16 NaNs and 2 * (2^7 - 1) bf16 NaNs */
    CHECK_MSG(nans == 2 * 1023 + 2 * 127, "%lld NaN patterns", (long long)nans);
    CHECK(lora_half_has_nan(LORA_DTYPE_F16, h, 0) == 0);
    free(h);
}

int main(void) {
    test_f16_to_f32();
    test_f32_to_f16();
    test_has_nan();
    return test_finish("test_dtype_rows");
}
