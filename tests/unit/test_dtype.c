/* fp16/bf16 conversions against hand-derived IEEE 754 bit patterns and exhaustive round
 * trips. */
#include <string.h>

#include "internal.h"
#include "core/dtype.h"
#include "../test.h"

static float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

int main(void) {
    /* f32 -> f16: values derived from the binary16 layout (1 sign, 5 exponent, 10 mantissa). */
    CHECK(lora_f32_to_f16(1.0f) == 0x3c00);
    CHECK(lora_f32_to_f16(-2.0f) == 0xc000);
    CHECK(lora_f32_to_f16(65504.0f) == 0x7bff);             /* largest finite */
    CHECK(lora_f32_to_f16(65519.0f) == 0x7bff);             /* below the rounding midpoint */
    CHECK(lora_f32_to_f16(65520.0f) == 0x7c00);             /* midpoint rounds to even -> inf */
    CHECK(lora_f32_to_f16(1e9f) == 0x7c00);
    CHECK(lora_f32_to_f16(-INFINITY) == 0xfc00);
    CHECK((lora_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (lora_f32_to_f16(NAN) & 0x3ff) != 0);
    CHECK(lora_f32_to_f16(ldexpf(1.0f, -14)) == 0x0400);    /* smallest normal */
    CHECK(lora_f32_to_f16(ldexpf(1.0f, -24)) == 0x0001);    /* smallest subnormal */
    CHECK(lora_f32_to_f16(ldexpf(1.0f, -25)) == 0x0000);    /* tie -> even (0) */
    CHECK(lora_f32_to_f16(ldexpf(3.0f, -25)) == 0x0002);    /* 1.5 ulp: tie -> even (2) */
    CHECK(lora_f32_to_f16(ldexpf(1.0f, -25) * 1.0001f) == 0x0001);
    CHECK(lora_f32_to_f16(1.0f + ldexpf(1.0f, -11)) == 0x3c00);           /* tie -> even */
    CHECK(lora_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)) == 0x3c02);       /* tie -> even (up) */
    CHECK(lora_f32_to_f16(-0.0f) == 0x8000);
    CHECK(lora_f16_to_f32(0x3555) == from_bits(0x3eaaa000));              /* 0.333251953125 */
    CHECK(lora_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    CHECK(lora_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24));
    CHECK(isinf(lora_f16_to_f32(0x7c00)) && isnan(lora_f16_to_f32(0x7e00)));

    /* Exhaustive: every non-NaN half survives f16 -> f32 -> f16 exactly. */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
        if (lora_f32_to_f16(lora_f16_to_f32((uint16_t)h)) != h) bad++;
    }
    CHECK_MSG(bad == 0, "%d halves did not round-trip", bad);
    /* Every f32 between two adjacent halves rounds to the nearer (checked on a sweep). */
    bad = 0;
    for (uint32_t h = 0x0000; h < 0x7bff; h += 7) {
        float a = lora_f16_to_f32((uint16_t)h), b = lora_f16_to_f32((uint16_t)(h + 1));
        float lo = a + (b - a) * 0.25f, hi = a + (b - a) * 0.75f;
        if (lora_f32_to_f16(lo) != h || lora_f32_to_f16(hi) != h + 1) bad++;
    }
    CHECK_MSG(bad == 0, "%d nearest-rounding failures", bad);

    /* bf16: the top 16 bits of f32, rounded to nearest even. */
    CHECK(lora_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(lora_f32_to_bf16(from_bits(0x3f808000)) == 0x3f80);   /* tie, even stays */
    CHECK(lora_f32_to_bf16(from_bits(0x3f818000)) == 0x3f82);   /* tie, odd rounds up */
    CHECK(lora_f32_to_bf16(from_bits(0x3f808001)) == 0x3f81);
    CHECK(lora_f32_to_bf16(from_bits(0x7f7fffff)) == 0x7f80);   /* max float rounds to inf */
    CHECK((lora_f32_to_bf16(NAN) & 0x7f80) == 0x7f80 && (lora_f32_to_bf16(NAN) & 0x7f) != 0);
    CHECK(to_bits(lora_bf16_to_f32(0xc040)) == 0xc0400000);      /* -3.0 */

    CHECK(lora_dtype_bits(LORA_DTYPE_BF16) == 16 && lora_dtype_bits(LORA_DTYPE_I64) == 64);
    CHECK(strcmp(lora_dtype_name(LORA_DTYPE_F8_E4M3), "F8_E4M3") == 0);
    CHECK(lora_dtype_name(LORA_DTYPE_OTHER) == NULL);
    return test_finish("test_dtype");
}
