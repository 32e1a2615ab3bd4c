/* Element type table. */
#include "core/dtype.h"

struct dtype_entry {
    lora_dtype type;
    const char *name;
    int bits;
};

static const struct dtype_entry dtypes[] = {
    {LORA_DTYPE_F32, "F32", 32},   {LORA_DTYPE_F16, "F16", 16},   {LORA_DTYPE_BF16, "BF16", 16},
    {LORA_DTYPE_F64, "F64", 64},   {LORA_DTYPE_I64, "I64", 64},   {LORA_DTYPE_I32, "I32", 32},
    {LORA_DTYPE_U8, "U8", 8},      {LORA_DTYPE_I16, "I16", 16},   {LORA_DTYPE_I8, "I8", 8},
    {LORA_DTYPE_BOOL, "BOOL", 8},  {LORA_DTYPE_U16, "U16", 16},   {LORA_DTYPE_U32, "U32", 32},
    {LORA_DTYPE_U64, "U64", 64},   {LORA_DTYPE_F8_E4M3, "F8_E4M3", 8},
    {LORA_DTYPE_F8_E5M2, "F8_E5M2", 8},
};

int lora_dtype_bits(lora_dtype t) {
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].type == t) return dtypes[i].bits;
    return 0;
}

const char *lora_dtype_name(lora_dtype t) {
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].type == t) return dtypes[i].name;
    return NULL;
}

/* ---- row conversions ------------------------------------------------------------------------ */

/* GCC clones these per ISA level and picks one at load time (ifunc); not under sanitizers
 * (ifunc resolvers run before their runtime), as lib/backend/cpu.c. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define DT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DT_ISA_CLONES
#endif

/* Branch-free (vectorises): normals and inf/NaN by re-biasing the exponent, zeros and
 * subnormals by an exact float subtraction (m * 2^-24 = (2^-14 + m * 2^-24) - 2^-14). */
DT_ISA_CLONES static void f16_to_f32_clone(const uint16_t *s, float *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t m = (uint32_t)(s[i] & 0x7fffu) << 13, e = m & 0x0f800000u, r;
        uint32_t nrm = m + 0x38000000u + (e == 0x0f800000u ? 0x38000000u : 0u);
        uint32_t den = m + 0x38800000u, mag = 0x38800000u;
        float fd, fm;
        memcpy(&fd, &den, 4);
        memcpy(&fm, &mag, 4);
        fd -= fm;
        memcpy(&den, &fd, 4);
        r = (e == 0 ? den : nrm) | (uint32_t)(s[i] & 0x8000u) << 16;
        memcpy(d + i, &r, 4);
    }
}

/* (a public function with target_clones gets a public ".resolver" symbol: the clones are static) */
void lora_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n) { f16_to_f32_clone(src, dst, n); }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* vcvtps2ph rounds to nearest even as lora_f32_to_f16 does; a block holding a NaN goes through
 * the scalar function, which writes the canonical quiet NaN (the instruction keeps payloads). */
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) {
            for (int k = 0; k < 8; k++) dst[i + k] = lora_f32_to_f16(src[i + k]);
            continue;
        }
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) dst[i] = lora_f32_to_f16(src[i]);
}
#define DT_HAVE_F16C 1
#endif

void lora_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n) {
#ifdef DT_HAVE_F16C
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
        f32_to_f16_f16c(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = lora_f32_to_f16(src[i]);
}

/* One pass per 32K elements (vectorises: 16-bit compares), stopping at the first block with a NaN. */
DT_ISA_CLONES static int half_nan_block(const uint16_t *h, int64_t n, uint16_t inf) {
    int acc = 0;
    for (int64_t i = 0; i < n; i++) acc |= (uint16_t)(h[i] & 0x7fffu) > inf;
    return acc;
}

int lora_half_has_nan(lora_dtype dt, const uint16_t *h, int64_t n) {
    uint16_t inf = dt == LORA_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
    for (int64_t b = 0; b < n; b += 32768)
        if (half_nan_block(h + b, n - b < 32768 ? n - b : 32768, inf)) return 1;
    return 0;
}
