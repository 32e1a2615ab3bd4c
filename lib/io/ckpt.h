/* PyTorch zip checkpoints (.ckpt/.pt/.bin): a reader that never executes anything and a writer
 * whose files torch.load (1.13 and later, weights_only=True included) reads.
 * Rules: spec/safety.md §2.6 (P1-P14).
 *
 * Layers:
 *   ckpt_zip.c   - sniffing, the zip container (central directory, local headers, ZIP64, names,
 *                  overlap and compression checks), reading records with pread, CRC-32, and
 *                  copying tensor views out of their storages (ckpt_read).
 *   unpickle.c   - a non-executing pickle interpreter: values are symbolic, GLOBALs resolve only
 *                  against an allowlist that mirrors torch.load(weights_only=True) plus a few
 *                  inert globals real SD checkpoints carry; every opcode is type-checked and all
 *                  memory is bounded by the pickle's size.
 *   ckpt_write.c - the writer (protocol-2 pickle, stored 64-byte-aligned records, ZIP64 when
 *                  needed), through atomic_file, streamed one record at a time. */
#ifndef LORA_IO_CKPT_H
#define LORA_IO_CKPT_H

#include "internal.h"
#include "io/tensor_map.h"

#define CKPT_MAX_ENTRIES   100000           /* zip entries */
#define CKPT_MAX_CD_BYTES  (64u << 20)       /* central directory */
#define CKPT_MAX_NAME      4096              /* entry name bytes */
#define CKPT_MAX_PKL       (256u << 20)      /* data.pkl bytes */
#define CKPT_MAX_RANK      TM_MAX_RANK

/* Reads every tensor of the checkpoint's state dict into `out` (C-contiguous, owned copies;
 * views with offsets, strides, and shared storages are copied out). The state dict is the
 * top-level dict's "state_dict" entry when that is a dict, else the top-level dict itself.
 * Non-tensor values are parsed as inert values and ignored. On failure `out` holds what it
 * held before and the message names the file, the zip entry, and for pickle errors the opcode
 * and its byte offset in data.pkl.
 * Errors: LORA_E_NOT_FOUND/LORA_E_IO, LORA_E_NOT_A_MODEL (not a zip), LORA_E_UNSUPPORTED (legacy
 * pre-1.6 format, big-endian, unsupported dtype), LORA_E_CKPT_*, LORA_E_UNSUPPORTED_LAYOUT,
 * LORA_E_LIMIT, LORA_E_NOMEM. */
lora_status ckpt_read(lora_ctx *ctx, const char *path, struct tensor_map *out);
/* Like ckpt_read, but maps the file read-only and lets contiguous, aligned tensors point into
 * the mapping instead of copying them (the records torch writes are 64-byte aligned, so
 * nearly every tensor of a checkpoint qualifies; their CRC-32 is not checked, as PyTorch's
 * reader does not check it). When anything was borrowed, *keep receives the mapping, which
 * the caller releases with ckpt_unmap after clearing `out`; else keep->base is NULL. */
struct ckpt_mapping {
    void *base;
    uint64_t size;
};
lora_status ckpt_read_mapped(lora_ctx *ctx, const char *path, struct tensor_map *out, struct ckpt_mapping *keep);
void ckpt_unmap(struct ckpt_mapping *m);

/* The same on `len` bytes held by the caller; `label` names the source in messages. */
lora_status ckpt_read_mem(lora_ctx *ctx, const char *label, const uint8_t *buf, uint64_t len,
                          struct tensor_map *out);

/* Writes `m` as a torch zip checkpoint, atomically. wrap_state_dict = 1 writes
 * {'state_dict': OrderedDict(...), 'epoch': 0, 'global_step': 0} (what kohya's
 * save_stable_diffusion_checkpoint writes); 0 writes the OrderedDict itself (kohya LoRA .pt).
 * Dtypes: F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL; others give LORA_E_UNSUPPORTED
 * (torch 1.13 has no storage type for them). Names must be UTF-8 (LORA_E_INVALID_ARG). */
lora_status ckpt_write(lora_ctx *ctx, const char *path, const struct tensor_map *m, int wrap_state_dict);

/* The same, streamed: records are written one at a time, so the memory in use is the pickle and
 * the one tensor the caller holds. ckpt_stream_begin validates `m` as ckpt_write does, but reads
 * only its names, dtypes, shapes and byte sizes (data may be NULL), begins the atomic temp file
 * and writes archive/data.pkl; then ckpt_stream_tensor is called once per tensor of `m`, in its
 * order, with exactly its nbytes (the CRC-32 is computed over `data` before its local header is
 * written); ckpt_stream_finish writes archive/version and the central directory and commits
 * (rename), and frees the stream on success and failure. ckpt_stream_abort (after any failure,
 * or to give up) removes the temp file and frees; NULL is fine. The output is byte for byte what
 * ckpt_write writes. `m` need not outlive ckpt_stream_begin. One thread at a time. */
struct ckpt_stream;
lora_status ckpt_stream_begin(lora_ctx *ctx, const char *path, const struct tensor_map *m, int wrap_state_dict,
                              struct ckpt_stream **out);
lora_status ckpt_stream_tensor(struct ckpt_stream *cs, const void *data, uint64_t nbytes);
lora_status ckpt_stream_finish(struct ckpt_stream *cs);
void ckpt_stream_abort(struct ckpt_stream *cs);

/* ---- the unpickler (unpickle.c) ---------------------------------------------------------- */

/* Resolves the storage key of a persistent id to a data record: returns the record index and
 * its size in bytes, or -1 when `<root>/data/<key>` does not exist. */
typedef int64_t (*pk_lookup_fn)(void *user, const char *key, size_t key_len, uint64_t *nbytes);

struct pk_env {
    const char *label;        /* the file, for messages */
    const char *entry;        /* the pickle's zip entry name, for messages */
    pk_lookup_fn lookup;
    void *user;
};

/* One tensor of the state dict: a validated view of a storage record. */
struct pk_tensor {
    const char *name;         /* points into the pickle bytes; not NUL-terminated */
    size_t name_len;
    uint64_t key_offset;      /* byte offset of the key's opcode, for messages */
    lora_dtype dtype;
    int elsize;
    int32_t ndim;
    int64_t size[CKPT_MAX_RANK];
    int64_t stride[CKPT_MAX_RANK];
    int64_t offset;           /* storage offset, elements of `dtype` */
    int64_t record;           /* from pk_env.lookup */
    const char *key;          /* storage key (into the pickle bytes) */
    size_t key_len;
    uint64_t record_bytes;
};

struct pk_result {
    struct pk_tensor *t;      /* state-dict tensors in pickle order */
    int64_t n;
    int64_t n_ignored;        /* non-tensor values of the state dict */
    int from_state_dict_key;  /* 1 when the tensors came from top["state_dict"] */
    void *vm;                 /* owns `t`; freed by pk_result_free */
};

/* Runs the pickle `pkl[0..n)` and collects the state dict. On failure nothing is kept. */
lora_status pk_load_state_dict(lora_ctx *ctx, const uint8_t *pkl, size_t n, const struct pk_env *env,
                               struct pk_result *res);
void pk_result_free(lora_ctx *ctx, struct pk_result *res);

/* ---- shared helpers ---------------------------------------------------------------------- */
uint32_t ckpt_crc32(uint32_t crc, const void *buf, size_t n);   /* zlib-compatible; start with 0 */
/* Writes `p[0..n)` into `dst` (cap bytes) with non-printable bytes as \xNN, truncated with
 * "..." past about cap/4 source bytes; returns dst. */
char *ckpt_escape(char *dst, size_t cap, const void *p, size_t n);

#endif
