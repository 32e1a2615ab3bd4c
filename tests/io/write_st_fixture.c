/* Writes, with liblora's st_write, the same tensors and metadata that
 * tests/reference/make_fixtures.py writes with the Python safetensors package into
 * tests/data/py_all_dtypes.safetensors. The formulas are repeated here independently (see
 * the table in make_fixtures.py).
 *
 *   build/tests/io/write_st_fixture OUT.safetensors
 *
 * test_safetensors_python.c includes this file with WRITE_ST_FIXTURE_NO_MAIN defined to reuse
 * the formulas as its expected values. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io/safetensors.h"

struct fx_spec {
    const char *name;
    lora_dtype dtype;
    const char *dtype_name;
    int32_t ndim;
    int64_t shape[4];
};

static const struct fx_spec fx_specs[] = {
    {"alpha", LORA_DTYPE_F32, "F32", 0, {0}},
    {"f32_2d", LORA_DTYPE_F32, "F32", 2, {3, 5}},
    {"f16_3d", LORA_DTYPE_F16, "F16", 3, {2, 3, 4}},
    {"bf16_1d", LORA_DTYPE_BF16, "BF16", 1, {11}},
    {"f64_4d", LORA_DTYPE_F64, "F64", 4, {2, 1, 3, 2}},
    {"i64_1d", LORA_DTYPE_I64, "I64", 1, {5}},
    {"i32_2d", LORA_DTYPE_I32, "I32", 2, {2, 3}},
    {"i16_1d", LORA_DTYPE_I16, "I16", 1, {7}},
    {"i8_2d", LORA_DTYPE_I8, "I8", 2, {4, 4}},
    {"u8_1d", LORA_DTYPE_U8, "U8", 1, {9}},
    {"bool_2d", LORA_DTYPE_BOOL, "BOOL", 2, {3, 3}},
    {"empty_0x3", LORA_DTYPE_F32, "F32", 2, {0, 3}},
};
#define FX_N ((int)(sizeof fx_specs / sizeof fx_specs[0]))

static const char *const fx_meta_keys[] = {"ss_network_dim"};
static const char *const fx_meta_vals[] = {"4"};
#define FX_N_META 1

static int64_t fx_numel(const struct fx_spec *s) {
    int64_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
    return n;
}

static size_t fx_elem_size(lora_dtype t) {
    switch (t) {
    case LORA_DTYPE_F64: case LORA_DTYPE_I64: return 8;
    case LORA_DTYPE_F32: case LORA_DTYPE_I32: return 4;
    case LORA_DTYPE_F16: case LORA_DTYPE_BF16: case LORA_DTYPE_I16: return 2;
    default: return 1;
    }
}

/* The exact value of element i (a double holds every one of them exactly). */
static double fx_value(const struct fx_spec *s, int64_t i) {
    if (strcmp(s->name, "alpha") == 0) return 4.0;
    switch (s->dtype) {
    case LORA_DTYPE_F32: return (double)(float)((double)i / 3.0 - 1.0);   /* f32_2d */
    case LORA_DTYPE_F64: return (double)i / 7.0 - 0.5;
    case LORA_DTYPE_F16:
    case LORA_DTYPE_BF16: return ((double)(i % 7) * 0.25 - 0.75) * (double)(1 << (i % 4));
    case LORA_DTYPE_I64: return (double)((3 * i - 5) * INT64_C(1000000007));
    case LORA_DTYPE_I32: case LORA_DTYPE_I16: case LORA_DTYPE_I8: return (double)(3 * i - 5);
    case LORA_DTYPE_U8: return (double)((37 * i + 5) % 256);
    case LORA_DTYPE_BOOL: return i % 3 == 0 ? 1.0 : 0.0;
    default: return NAN;
    }
}

/* IEEE binary16 bits of a value known to be zero or a normal half (true for the formula). */
static uint16_t fx_f16_bits(double v) {
    uint16_t sign = signbit(v) ? 0x8000u : 0;
    double a = fabs(v);
    if (a == 0.0) return sign;
    int e;
    double m = frexp(a, &e);                       /* a = m * 2^e, m in [0.5, 1) */
    unsigned exp = (unsigned)(e - 1 + 15);
    unsigned frac = (unsigned)((m * 2.0 - 1.0) * 1024.0);
    return (uint16_t)(sign | (exp << 10) | frac);
}

/* bfloat16 bits: the top half of the float32, exact for the formula's values. */
static uint16_t fx_bf16_bits(double v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* Little-endian bytes of tensor `s` (host is little-endian; checked in fx_host_le). */
static void fx_encode(const struct fx_spec *s, uint8_t *dst) {
    int64_t n = fx_numel(s);
    for (int64_t i = 0; i < n; i++) {
        double v = fx_value(s, i);
        switch (s->dtype) {
        case LORA_DTYPE_F32: { float f = (float)v; memcpy(dst + 4 * i, &f, 4); break; }
        case LORA_DTYPE_F64: memcpy(dst + 8 * i, &v, 8); break;
        case LORA_DTYPE_F16: { uint16_t h = fx_f16_bits(v); memcpy(dst + 2 * i, &h, 2); break; }
        case LORA_DTYPE_BF16: { uint16_t h = fx_bf16_bits(v); memcpy(dst + 2 * i, &h, 2); break; }
        case LORA_DTYPE_I64: { int64_t x = (3 * i - 5) * INT64_C(1000000007); memcpy(dst + 8 * i, &x, 8); break; }
        case LORA_DTYPE_I32: { int32_t x = (int32_t)v; memcpy(dst + 4 * i, &x, 4); break; }
        case LORA_DTYPE_I16: { int16_t x = (int16_t)v; memcpy(dst + 2 * i, &x, 2); break; }
        case LORA_DTYPE_I8: { int8_t x = (int8_t)v; memcpy(dst + i, &x, 1); break; }
        case LORA_DTYPE_U8: dst[i] = (uint8_t)v; break;
        case LORA_DTYPE_BOOL: dst[i] = v != 0.0; break;
        default: break;
        }
    }
}

static int fx_host_le(void) {
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* Buffers for the data of every tensor; free with fx_free_data. */
static uint8_t **fx_make_data(void) {
    uint8_t **bufs = calloc(FX_N, sizeof *bufs);
    if (!bufs) return NULL;
    for (int k = 0; k < FX_N; k++) {
        size_t nb = (size_t)fx_numel(&fx_specs[k]) * fx_elem_size(fx_specs[k].dtype);
        bufs[k] = calloc(nb ? nb : 1, 1);
        if (!bufs[k]) return NULL;   /* test helper: leak on OOM is fine */
        fx_encode(&fx_specs[k], bufs[k]);
    }
    return bufs;
}

static void fx_free_data(uint8_t **bufs) {
    if (!bufs) return;
    for (int k = 0; k < FX_N; k++) free(bufs[k]);
    free(bufs);
}

/* Writes the fixture with st_write. */
static lora_status fx_write(lora_ctx *ctx, const char *path) {
    uint8_t **bufs = fx_make_data();
    if (!bufs) return LORA_E_NOMEM;
    struct st_write_tensor wt[FX_N];
    for (int k = 0; k < FX_N; k++) {
        wt[k].name = fx_specs[k].name;
        wt[k].dtype = fx_specs[k].dtype;
        wt[k].ndim = fx_specs[k].ndim;
        wt[k].shape = fx_specs[k].shape;
        wt[k].data = bufs[k];
    }
    lora_status s = st_write(ctx, path, wt, FX_N, fx_meta_keys, fx_meta_vals, FX_N_META);
    fx_free_data(bufs);
    return s;
}

#ifndef WRITE_ST_FIXTURE_NO_MAIN
int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT.safetensors\n", argv[0]);
        return 2;
    }
    if (!fx_host_le()) {
        fprintf(stderr, "write_st_fixture: the fixture encoding assumes a little-endian host\n");
        return 1;
    }
    lora_ctx *ctx = NULL;
    lora_status s = lora_ctx_create(LORA_ABI_VERSION, &ctx);
    if (s == LORA_OK) s = fx_write(ctx, argv[1]);
    if (s != LORA_OK) {
        fprintf(stderr, "write_st_fixture: %s: %s\n", lora_status_name(s), ctx ? lora_errmsg(ctx) : "");
        lora_ctx_free(ctx);
        return 1;
    }
    lora_ctx_free(ctx);
    return 0;
}
#endif
