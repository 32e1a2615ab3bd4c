/* Status names, sentences, and the per-context error message. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

struct status_entry {
    lora_status code;
    const char *name;
    const char *text;
};

#define S(code, text) { code, #code, text }
static const struct status_entry status_table[] = {
    S(LORA_OK, "success"),
    S(LORA_E_INVALID_ARG, "invalid argument"),
    S(LORA_E_NOMEM, "out of host memory"),
    S(LORA_E_LIMIT, "a size or count limit was exceeded"),
    S(LORA_E_BUSY, "the context is being used by another call"),
    S(LORA_E_CANCELLED, "the operation was cancelled"),
    S(LORA_E_INTERNAL, "internal error in liblora"),
    S(LORA_E_UNSUPPORTED, "not supported by this build or format"),
    S(LORA_E_ABI_MISMATCH, "the program was compiled against an incompatible liblora header"),
    S(LORA_E_UNKNOWN_KEY, "unknown parameter key"),
    S(LORA_E_IO, "input/output error"),
    S(LORA_E_NOSPACE, "no space left on the device"),
    S(LORA_E_DEST_BUSY, "the destination file is in use"),
    S(LORA_E_NOT_FOUND, "file or folder not found"),
    S(LORA_E_NOT_A_MODEL, "the file is not a model file"),
    S(LORA_E_ST_HEADER_TOO_SMALL, "safetensors file is shorter than its 8-byte header length"),
    S(LORA_E_ST_HEADER_TOO_LARGE, "safetensors header is larger than 100,000,000 bytes"),
    S(LORA_E_ST_HEADER_LENGTH, "safetensors header length runs past the end of the file"),
    S(LORA_E_ST_HEADER_UTF8, "safetensors header is not valid UTF-8"),
    S(LORA_E_ST_HEADER_JSON, "safetensors header is not valid JSON of the expected form"),
    S(LORA_E_ST_DUPLICATE_KEY, "safetensors header has a duplicate key"),
    S(LORA_E_ST_METADATA_TYPE, "safetensors __metadata__ must map strings to strings"),
    S(LORA_E_ST_DTYPE, "unknown safetensors dtype"),
    S(LORA_E_ST_SHAPE_OVERFLOW, "tensor shape or size overflows"),
    S(LORA_E_ST_SIZE_MISMATCH, "tensor data size does not match its shape and dtype"),
    S(LORA_E_ST_OFFSETS, "tensor data offsets overlap, leave a gap or go backwards"),
    S(LORA_E_ST_INCOMPLETE, "tensor data does not cover the file exactly"),
    S(LORA_E_ST_SUBBYTE, "sub-byte tensor does not fill whole bytes"),
    S(LORA_E_CKPT_ZIP_CORRUPT, "checkpoint zip container is corrupt"),
    S(LORA_E_CKPT_ZIP_ENTRY, "checkpoint zip entry name is invalid or missing"),
    S(LORA_E_CKPT_ZIP_COMPRESSED, "checkpoint zip entry is compressed"),
    S(LORA_E_CKPT_ZIP_OVERLAP, "checkpoint zip entries overlap"),
    S(LORA_E_CKPT_PICKLE_OPCODE, "checkpoint pickle uses a forbidden or unknown opcode"),
    S(LORA_E_CKPT_PICKLE_STRUCT, "checkpoint pickle is malformed"),
    S(LORA_E_CKPT_UNSAFE_GLOBAL, "checkpoint pickle references a forbidden global"),
    S(LORA_E_CKPT_STORAGE_SIZE, "checkpoint tensor does not fit its storage"),
    S(LORA_E_CKPT_NO_TENSORS, "checkpoint contains no tensors"),
    S(LORA_E_UNSUPPORTED_LAYOUT, "tensor layout is not supported"),
    S(LORA_E_IMG_DECODE, "image could not be decoded"),
    S(LORA_E_IMG_TOO_LARGE, "image is too large"),
    S(LORA_E_IMG_UNSUPPORTED, "image format is not supported"),
    S(LORA_E_CAPTION_ENCODING, "caption is not valid UTF-8"),
    S(LORA_E_CAPTION_TOO_LONG, "caption is too long"),
    S(LORA_E_CONFIG_RANGE, "parameter value is out of range or malformed"),
    S(LORA_E_NO_MATCHING_KEYS, "no key of the network matches the model"),
    S(LORA_E_SHAPE_MISMATCH, "tensor shapes do not match"),
    S(LORA_E_NONFINITE_INPUT, "input contains NaN or infinity"),
    S(LORA_E_NONFINITE_WEIGHTS, "weights contain NaN or infinity"),
    S(LORA_E_NONFINITE_LATENT, "latent contains NaN or infinity"),
    S(LORA_E_NAN_LOSS, "training loss became NaN or infinite"),
    S(LORA_E_RESUME_MISMATCH, "saved training state does not match the configuration"),
    S(LORA_E_NO_GPU, "no usable GPU"),
    S(LORA_E_DRIVER, "GPU driver is too old for this build"),
    S(LORA_E_GPU_OOM, "out of GPU memory"),
    S(LORA_E_GPU_FATAL, "unrecoverable GPU error: the process must be restarted to use the GPU"),
};
#undef S

static const struct status_entry *status_find(lora_status s) {
    for (size_t i = 0; i < sizeof status_table / sizeof status_table[0]; i++)
        if (status_table[i].code == s) return &status_table[i];
    return NULL;
}

LORA_API const char *lora_status_name(lora_status s) {
    const struct status_entry *e = status_find(s);
    return e ? e->name : "LORA_E_UNKNOWN_STATUS";
}

LORA_API const char *lora_status_string(lora_status s) {
    const struct status_entry *e = status_find(s);
    return e ? e->text : "unknown status code";
}

lora_status lora_fail(lora_ctx *ctx, lora_status s, const char *fmt, ...) {
    if (!ctx) return s;
    ctx->err = s;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(ctx->errmsg, sizeof ctx->errmsg, fmt, ap);
    va_end(ap);
    if (n < 0) snprintf(ctx->errmsg, sizeof ctx->errmsg, "%s", lora_status_string(s));
    lora_log(ctx, LORA_LOG_ERROR, "%s: %s", lora_status_name(s), ctx->errmsg);
    return s;
}

void lora_clear_error(lora_ctx *ctx) {
    if (!ctx) return;
    ctx->err = LORA_OK;
    ctx->errmsg[0] = '\0';
}

LORA_API lora_status lora_errcode(const lora_ctx *ctx) {
    if (!lora_ctx_valid(ctx)) return LORA_E_INVALID_ARG;
    return ctx->err;
}

LORA_API const char *lora_errmsg(const lora_ctx *ctx) {
    if (!lora_ctx_valid(ctx)) return "no context";
    return ctx->errmsg;
}

LORA_API size_t lora_errmsg_copy(const lora_ctx *ctx, char *buf, size_t cap) {
    const char *m = lora_errmsg(ctx);
    size_t need = strlen(m) + 1;
    if (buf && cap > 0) {
        size_t n = need <= cap ? need - 1 : cap - 1;
        memcpy(buf, m, n);
        buf[n] = '\0';
    }
    return need;
}
