/* Element types: sizes, names, and the scalar fp16/bf16 conversions every backend matches
 * (round to nearest even; NaN stays NaN). */
#ifndef LORA_CORE_DTYPE_H
#define LORA_CORE_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "lora.h"

/* Bits per element (safetensors view, sub-byte types included), 0 for unknown. */
int lora_dtype_bits(lora_dtype t);
/* safetensors name ("F32") or NULL. */
const char *lora_dtype_name(lora_dtype t);

static inline float lora_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {                      /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t lora_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);            /* NaN */
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);           /* overflow -> inf */
    if (absx < 0x38800000u) {                                             /* subnormal or 0 */
        if (absx < 0x33000000u) return (uint16_t)sign;                    /* < half of min subnormal */
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;             /* value = m * 2^(e-150); half ulp = 2^-24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((absx >> 13) - (112u << 10));
    uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline float lora_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t lora_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Row conversions, bit-identical to the scalar functions above (fp16 -> f32 keeps NaN payloads;
 * f32 -> fp16 rounds to nearest even, NaN -> 0x7e00 with the sign), but vectorised: the library
 * is built for baseline x86-64, so they are cloned per ISA level (AVX-512 / AVX2 / baseline),
 * and f32 -> fp16 uses the F16C instruction where the CPU has it. Serial (memory-bound). */
void lora_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n);
void lora_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n);
/* 1 when one of the n F16 (or, for dt BF16, bfloat16) values is a NaN. */
int lora_half_has_nan(lora_dtype dt, const uint16_t *h, int64_t n);

#endif
