/* safetensors: strict validating reader (memory or mmap) and atomic writer.
 * Rules: spec/safety.md §1.10 (S1-S10). */
#ifndef LORA_IO_SAFETENSORS_H
#define LORA_IO_SAFETENSORS_H

#include "internal.h"

#define ST_MAX_HEADER   100000000u   /* reference MAX_HEADER_SIZE */
#define ST_MAX_RANK     8
#define ST_MAX_TENSORS  1000000
#define ST_MAX_NAME     4096

struct st_tensor {
    char *name;
    lora_dtype dtype;          /* LORA_DTYPE_OTHER for valid dtypes we do not compute with */
    const char *dtype_name;    /* static */
    int bits;
    int32_t ndim;
    int64_t shape[ST_MAX_RANK];
    uint64_t begin, end;       /* relative to the data start */
};

/* The public lora_file handle is the parsed, mapped file. */
struct lora_file {
    lora_ctx *ctx;
    char *path;                /* for messages */
    const uint8_t *base;       /* whole file (mapped or caller's buffer) */
    uint64_t size;
    int mapped;
    uint64_t data_start;       /* 8 + N */
    int64_t n_tensors;
    struct st_tensor *tensors; /* sorted by data offset */
    int64_t n_meta;
    char **meta_keys;
    char **meta_vals;
};

/* Parses and validates `len` bytes held by the caller (kept borrowed by the result).
 * `label` names the source in messages. On success *out must be freed with st_close. */
lora_status st_parse(lora_ctx *ctx, const char *label, const uint8_t *buf, uint64_t len,
                     struct lora_file **out);
/* Opens, maps and validates a file. */
lora_status st_open(lora_ctx *ctx, const char *path, struct lora_file **out);
void st_close(struct lora_file *f);
static inline const uint8_t *st_data(const struct lora_file *f, int64_t i) {
    return f->base + f->data_start + f->tensors[i].begin;
}

/* One tensor to write. `data` holds prod(shape) elements of `dtype`, C order. */
struct st_write_tensor {
    const char *name;
    lora_dtype dtype;
    int32_t ndim;
    const int64_t *shape;
    const void *data;
};

/* Writes a .safetensors file atomically (temp file, fsync, rename, directory fsync).
 * Tensors are laid out by descending dtype alignment, then name, as the reference writer
 * does; metadata (`n_meta` key/value pairs) goes first in the header; the header is padded
 * with spaces to a multiple of 8. Refuses (before writing) a header over 100,000,000 bytes,
 * duplicate names, non-UTF-8 strings and dtypes it cannot write. */
lora_status st_write(lora_ctx *ctx, const char *path, const struct st_write_tensor *tensors,
                     int64_t n, const char *const *meta_keys, const char *const *meta_vals,
                     int64_t n_meta);


#endif
