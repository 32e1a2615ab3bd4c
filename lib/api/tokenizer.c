/* lora_tokenizer: the public face of lib/model/tokenizer.c. */
#include <string.h>

#include "model/tokenizer.h"

static int tok_valid(const lora_tokenizer *t) { return t && t->magic == TOK_MAGIC && lora_ctx_valid(t->ctx); }

LORA_API lora_status lora_tokenizer_create(lora_ctx *ctx, lora_tokenizer_flavour flavour, lora_tokenizer **out) {
    if (out) *out = NULL;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!out) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_tokenizer_create: out must not be NULL");
    else s = tok_create(ctx, flavour, out);
    if (s == LORA_OK) lora_ctx_retain(ctx);
    lora_leave(ctx);
    return s;
}

LORA_API void lora_tokenizer_free(lora_tokenizer *tok) {
    if (!tok_valid(tok)) return;
    lora_ctx *ctx = tok->ctx;
    tok_free(tok);
    lora_ctx_release(ctx);
}

LORA_API lora_status lora_tokenizer_encode(lora_tokenizer *tok, const char *utf8_text, int32_t max_token_length,
                                           int32_t *ids, size_t cap, size_t *n_ids) {
    if (n_ids) *n_ids = 0;
    if (!tok_valid(tok)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tok->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!utf8_text || !ids)
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_tokenizer_encode: text and ids must not be NULL");
    else
        s = tok_encode(tok, utf8_text, strlen(utf8_text), max_token_length, ids, cap, n_ids);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_tokenizer_tokenize(lora_tokenizer *tok, const char *utf8_text, int32_t *ids, size_t cap,
                                             size_t *n_ids) {
    if (n_ids) *n_ids = 0;
    if (!tok_valid(tok)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tok->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!utf8_text || (!ids && cap > 0)) {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_tokenizer_tokenize: text must not be NULL, ids only when cap is 0");
    } else {
        s = tok_tokenize(tok, utf8_text, strlen(utf8_text));
        if (s == LORA_OK) {
            if (n_ids) *n_ids = tok->n_ids;
            size_t k = tok->n_ids < cap ? tok->n_ids : cap;
            if (k) memcpy(ids, tok->ids, k * sizeof *ids);
            if (ids && cap < tok->n_ids)
                s = lora_fail(ctx, LORA_E_LIMIT, "the text has %zu tokens, the buffer holds %zu", tok->n_ids, cap);
        }
    }
    lora_leave(ctx);
    return s;
}
