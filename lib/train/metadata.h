/* kohya-ss train_network.py's saved-LoRA metadata and hashes (spec/kohya-lora.md §9):
 * SHA-256, Python str() formatting of values, a key/value list, the LoRA save itself
 * (safetensors with ss_* metadata and sshs_model_hash / sshs_legacy_hash as
 * train_util.precalculate_safetensors_hashes computes them, or a torch pickle), and the
 * checkpoint hashes of ss_sd_model_hash / ss_new_sd_model_hash. */
#ifndef LORA_TRAIN_METADATA_H
#define LORA_TRAIN_METADATA_H

#include "internal.h"
#include "core/sha256.h"
#include "network/network.h"

/* ---- SHA-256: core/sha256.h (lora_sha256_*) ------------------------------------------------ */
/* Lower-case hex of n bytes into out (2n + 1 chars). */
void md_hex(const uint8_t *d, size_t n, char *out);

/* ---- Python str() ----------------------------------------------------------------------------
 * repr of a float: shortest digits that read back to the same double, fixed notation with at
 * least one decimal ("1.0", "0.0001") for decimal exponents -4..15, else "1e-05" / "1e+16";
 * "inf", "-inf", "nan". */
void md_py_float(double v, char out[32]);
static inline const char *md_py_bool(int v) { return v ? "True" : "False"; }

/* ---- a key/value list (insertion order; setting a key again replaces its value) ------------ */
struct md_list {
    lora_ctx *ctx;
    int64_t n, cap;
    char **k, **v;
};
void md_init(struct md_list *l, lora_ctx *ctx);
void md_free(struct md_list *l);
lora_status md_set(struct md_list *l, const char *key, const char *value);
lora_status md_setf(struct md_list *l, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
lora_status md_set_float(struct md_list *l, const char *key, double v);
const char *md_get(const struct md_list *l, const char *key);

/* ---- hashes --------------------------------------------------------------------------------- */
/* sshs_model_hash / sshs_legacy_hash of a safetensors image: SHA-256 of the bytes after the
 * header (64 hex), and the first 8 hex of SHA-256 of bytes [0x100000, 0x110000) (empty input
 * for short files). Fails only when SHA-256 does (core/sha256.h); the strings are empty then. */
LORA_MUST_CHECK lora_status md_safetensors_hashes(lora_ctx *ctx, const uint8_t *file, uint64_t size,
                                                  char model_hash[65], char legacy_hash[9]);
/* train_util.model_hash (8 hex of SHA-256 of [0x100000, 0x110000)) and calculate_sha256 (the
 * whole file) of a regular file. Anything else (a diffusers folder, a missing path) sets
 * *is_file = 0 and returns LORA_OK without hashes (kohya hashes only what it can read). */
lora_status md_file_hashes(lora_ctx *ctx, const char *path, int *is_file, char legacy[9], char full[65]);

/* ---- the LoRA save ---------------------------------------------------------------------------
 * Writes `net` as kohya's LoRANetwork.save_weights does, through net_save (tensor layout);
 * `dtype` (LORA_DTYPE_F32, F16, BF16; 0 = keep each tensor's) casts every tensor, alpha
 * included, as kohya's save_precision does. `.safetensors`: the metadata
 * is `meta` (may be NULL: none; the network's own metadata is not written) plus
 * sshs_model_hash / sshs_legacy_hash computed, as kohya does, on a serialisation holding only
 * the ss_* keys of `meta` (written to a temp file beside `path`, read back and removed).
 * Other extensions: a torch pickle, no metadata. Atomic. */
lora_status md_save_network(const struct lora_network *net, const char *path, const struct md_list *meta,
                            lora_dtype dtype);

#endif
