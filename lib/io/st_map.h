#ifndef LORA_IO_ST_MAP_H
#define LORA_IO_ST_MAP_H

#include "io/safetensors.h"
#include "io/tensor_map.h"

/* Loads every tensor of a .safetensors file into `out`. With `keep` NULL the tensors are
 * owned copies. With `keep` non-NULL, aligned tensors borrow the read-only mapping (zero
 * copy, pages read on first touch) and *keep receives the open file, which the caller must
 * close with st_close after clearing the map (NULL when nothing was borrowed). Dtypes liblora
 * does not compute with (F8_E8M0, C64, ...) -> LORA_E_UNSUPPORTED naming the tensor; on
 * failure `out` is cleared. */
lora_status st_read_map(lora_ctx *ctx, const char *path, struct tensor_map *out, struct lora_file **keep);
/* Writes the map (atomically, reference layout) with optional metadata. */
lora_status st_write_map(lora_ctx *ctx, const char *path, const struct tensor_map *m,
                         const char *const *meta_keys, const char *const *meta_vals, int64_t n_meta);

#endif
