/* CLIP byte-level BPE tokenizer as kohya's sd-scripts uses it: transformers 4.25.1's slow
 * CLIPTokenizer with ftfy installed, loaded from openai/clip-vit-large-patch14 (SD v1: pad =
 * EOS) or stabilityai/stable-diffusion-2 "tokenizer" (SD v2: pad = "!", id 0).
 *
 * Pipeline of one call (PreTrainedTokenizer.tokenize, CLIPTokenizer._tokenize):
 *   1. the raw text is cut around the no-split tokens <|startoftext|>, <|endoftext|> (and "!"
 *      for v2, whose neighbours lose their adjacent white space, as for every special token
 *      given as a plain string); those pieces become their ids directly;
 *   2. every other piece: whitespace_clean(ftfy.fix_text(piece)).lower() (text_fix.h);
 *   3. the split pattern <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
 *      [^\s\p{L}\p{N}]+ (IGNORECASE) cuts it into words;
 *   4. each word's UTF-8 bytes map to the 256 byte symbols, the last one with "</w>", and the
 *      48894 merges apply lowest rank first (merge k creates id 512 + k).
 * kohya's get_input_ids then pads/truncates to max_token_length + 2 and, for 150/225, cuts
 * BOS + 75n + EOS into n chunks of 77 (spec §4.5).
 *
 * A tokenizer keeps a word -> ids cache and scratch buffers: after warm-up a call allocates
 * nothing. One thread at a time (it belongs to its context). */
#ifndef LORA_MODEL_TOKENIZER_H
#define LORA_MODEL_TOKENIZER_H

#include "internal.h"
#include "model/text_fix.h"

#define TOK_BOS 49406
#define TOK_EOS 49407
#define TOK_VOCAB 49408
#define TOK_N_MERGES 48894
#define TOK_CHUNK 77              /* CLIP positions: BOS + 75 + EOS */

struct tok_cache_entry {
    uint64_t hash;
    uint32_t key_off, key_len;    /* key_len == UINT32_MAX: empty slot */
    uint32_t ids_off, n_ids;
};

#define TOK_MAGIC 0x544f4b4eu   /* "TOKN" */

struct lora_tokenizer {
    uint32_t magic;
    lora_ctx *ctx;
    int32_t flavour;              /* LORA_TOKENIZER_SD1 / SD2 */
    int32_t pad_id;               /* 49407 (v1) or 0 (v2) */
    /* merges: open addressing on (left << 16 | right) */
    uint32_t *merge_key;
    uint16_t *merge_rank;
    uint32_t merge_mask;
    uint16_t byte_id[256];        /* byte -> byte-symbol id (bytes_to_unicode order) */
    /* word cache */
    struct tok_cache_entry *cache;
    uint32_t cache_slots, cache_used;
    uint8_t *cache_keys;
    size_t keys_n, keys_cap;
    int32_t *cache_ids;
    size_t cids_n, cids_cap;
    /* scratch */
    struct tf_pool pool;
    struct cpbuf text, norm;
    uint8_t *word;
    size_t word_cap;
    uint32_t *sym;
    size_t sym_cap;
    uint32_t *link;               /* next/prev lists of long words */
    size_t link_cap;
    void *heap;                   /* merge heap of long words */
    size_t heap_cap;
    int32_t *ids;                 /* raw ids of the last tok_tokenize */
    size_t n_ids, ids_cap;
};

lora_status tok_create(lora_ctx *ctx, int32_t flavour, lora_tokenizer **out);
void tok_free(lora_tokenizer *t);

/* Raw ids of `text` (len bytes of UTF-8; a NUL byte is U+0000) into t->ids / t->n_ids: no
 * BOS/EOS, no padding, no truncation. Errors: LORA_E_CAPTION_ENCODING (invalid UTF-8, the
 * message gives the byte offset), LORA_E_NOMEM, LORA_E_LIMIT. */
lora_status tok_tokenize(lora_tokenizer *t, const char *text, size_t len);

/* kohya's get_input_ids: 77 * (max_token_length / 75) ids into dst (cap >= that).
 * max_token_length: 75, 150 or 225 (else LORA_E_CONFIG_RANGE). */
lora_status tok_encode(lora_tokenizer *t, const char *text, size_t len, int32_t max_token_length,
                       int32_t *dst, size_t cap, size_t *n_out);

#endif
