/* lora_file: public inspection of .safetensors files. */
#include <string.h>

#include "core/dtype.h"
#include "io/safetensors.h"

LORA_API lora_status lora_file_open(lora_ctx *ctx, const char *path, lora_file **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!path || !out) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_file_open: path and out must not be NULL");
    else s = st_open(ctx, path, out);
    if (s == LORA_OK) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API void lora_file_free(lora_file *f) {
    if (!f) return;
    lora_ctx *ctx = f->ctx;
    st_close(f);
    lora_ctx_release(ctx);
}

LORA_API int64_t lora_file_tensor_count(const lora_file *f) { return f ? f->n_tensors : 0; }

LORA_API lora_status lora_file_tensor_info(const lora_file *f, int64_t index, const char **name, lora_dtype *dtype,
                                           const char **dtype_name, int32_t *ndim, int64_t *shape,
                                           int32_t shape_cap, uint64_t *nbytes) {
    if (!f || index < 0 || index >= f->n_tensors) return LORA_E_INVALID_ARG;
    const struct st_tensor *t = &f->tensors[index];
    if (name) *name = t->name;
    if (dtype) *dtype = t->dtype;
    if (dtype_name) *dtype_name = t->dtype_name;
    if (ndim) *ndim = t->ndim;
    if (shape)
        for (int32_t d = 0; d < t->ndim && d < shape_cap; d++) shape[d] = t->shape[d];
    if (nbytes) *nbytes = t->end - t->begin;
    return LORA_OK;
}

LORA_API int64_t lora_file_find(const lora_file *f, const char *name) {
    if (!f || !name) return -1;
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return i;
    return -1;
}

LORA_API int64_t lora_file_metadata_count(const lora_file *f) { return f ? f->n_meta : 0; }

LORA_API lora_status lora_file_metadata_at(const lora_file *f, int64_t index, const char **key, const char **value) {
    if (!f || index < 0 || index >= f->n_meta) return LORA_E_INVALID_ARG;
    if (key) *key = f->meta_keys[index];
    if (value) *value = f->meta_vals[index];
    return LORA_OK;
}

/* Unaligned-safe element loads: the reader never casts mapped bytes to wider types. */
#define DEFINE_LOAD(name, type) \
    static inline type name(const uint8_t *p, uint64_t i) { type v; memcpy(&v, p + i * sizeof(type), sizeof v); return v; }
DEFINE_LOAD(ld_f32, float)
DEFINE_LOAD(ld_f64, double)
DEFINE_LOAD(ld_u16, uint16_t)
DEFINE_LOAD(ld_i64, int64_t)
DEFINE_LOAD(ld_i32, int32_t)
DEFINE_LOAD(ld_i16, int16_t)
#undef DEFINE_LOAD

LORA_API lora_status lora_file_read_f32(const lora_file *f, int64_t index, float *dst, uint64_t cap) {
    if (!f || index < 0 || index >= f->n_tensors || (!dst && cap > 0)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = f->ctx;
    LORA_TRY(lora_enter(ctx));
    const struct st_tensor *t = &f->tensors[index];
    lora_status s = LORA_OK;
    uint64_t n = t->bits ? (t->end - t->begin) * 8 / (uint64_t)t->bits : 0;
    const uint8_t *p = st_data(f, index);
    if (n > cap) {
        s = lora_fail(ctx, LORA_E_LIMIT, "%s: tensor \"%s\" has %llu elements, buffer holds %llu", f->path, t->name,
                      (unsigned long long)n, (unsigned long long)cap);
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) {
        switch (t->dtype) {
        case LORA_DTYPE_F32: dst[i] = ld_f32(p, i); break;
        case LORA_DTYPE_F16: dst[i] = lora_f16_to_f32(ld_u16(p, i)); break;
        case LORA_DTYPE_BF16: dst[i] = lora_bf16_to_f32(ld_u16(p, i)); break;
        case LORA_DTYPE_F64: dst[i] = (float)ld_f64(p, i); break;
        case LORA_DTYPE_I64: dst[i] = (float)ld_i64(p, i); break;
        case LORA_DTYPE_I32: dst[i] = (float)ld_i32(p, i); break;
        case LORA_DTYPE_I16: dst[i] = (float)ld_i16(p, i); break;
        case LORA_DTYPE_I8: dst[i] = (float)(int8_t)p[i]; break;
        case LORA_DTYPE_U8: dst[i] = (float)p[i]; break;
        case LORA_DTYPE_BOOL: dst[i] = p[i] ? 1.0f : 0.0f; break;
        default:
            s = lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: tensor \"%s\": dtype %s cannot be read as float32", f->path,
                          t->name, t->dtype_name);
            goto out;
        }
    }
out:
    lora_leave(ctx);
    return s;
}
