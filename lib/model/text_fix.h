/* Text normalisation of transformers 4.25.1's slow CLIPTokenizer with ftfy installed:
 * `whitespace_clean(ftfy.fix_text(text)).lower()`, reimplemented on code points.
 *
 * ftfy.fix_text (6.1.1, default configuration) is reproduced step for step: the text is fixed
 * per line; each line loops until nothing changes over: HTML entities ("auto": only while no
 * '<' has been seen), mojibake repair (the badness heuristic, re-encoding through latin-1 /
 * sloppy windows-125x / iso-8859-2 / macroman / cp437 and decoding as UTF-8 or CESU-8, with
 * restore_byte_a0, replace_lossy_sequences, decode_inconsistent_utf8, C1 controls), Latin
 * ligatures, full/half-width forms, curly quotes, line breaks, terminal escapes, control
 * characters and NFC. whitespace_clean collapses runs of the `regex` module's \s to one space
 * and strips str.isspace characters; lower() is Python's full lower-casing with Final_Sigma.
 *
 * Scratch buffers come from a pool that lives as long as its owner, so steady-state calls
 * allocate nothing. One pool is used by one thread at a time. */
#ifndef LORA_MODEL_TEXT_FIX_H
#define LORA_MODEL_TEXT_FIX_H

#include "internal.h"

struct cpbuf {
    uint32_t *p;
    size_t n, cap;
};

struct bytebuf {
    uint8_t *p;
    size_t n, cap;
};

#define TF_POOL 64

struct tf_pool {
    lora_ctx *ctx;
    struct cpbuf cp[TF_POOL];
    struct bytebuf by[TF_POOL];
    int cp_top, by_top;
};

void tf_pool_init(struct tf_pool *tp, lora_ctx *ctx);
void tf_pool_free(struct tf_pool *tp);

/* Capacity for at least n elements (contents kept). */
lora_status cpbuf_reserve(struct tf_pool *tp, struct cpbuf *b, size_t n);

/* out = whitespace_clean(ftfy.fix_text(in)).lower(). `out` must not be a pool buffer in use
 * by the callee (any caller-owned cpbuf is fine). Errors: LORA_E_NOMEM, LORA_E_LIMIT (the
 * scratch pool ran out: pathologically nested mojibake). */
lora_status tf_normalize(struct tf_pool *tp, const uint32_t *in, size_t n, struct cpbuf *out);

/* Pieces exposed for tests: ftfy.fix_text alone, and ftfy's badness test. */
lora_status tf_fix_text(struct tf_pool *tp, const uint32_t *in, size_t n, struct cpbuf *out);
int tf_is_bad(const uint32_t *s, size_t n);

#endif
