/* CLIP BPE tokenizer; see tokenizer.h. */
#include <string.h>

#include "core/utf8.h"
#include "model/tokenizer.h"
#include "model/tokenizer_tables.h"

/* lib/model/gen_bpe_table.py, generated at build time from the vendored merge list. */
extern const uint16_t clip_bpe_merges[TOK_N_MERGES][2];

#define MERGE_BITS 17
#define MERGE_EMPTY 0xFFFFFFFFu
#define CACHE_SLOTS 16384u        /* power of two; cleared when half full */
#define CACHE_ARENA_MAX (4u << 20) /* bytes of keys or ids before the cache is cleared */
#define NO_RANK 0xFFFFu

static uint32_t merge_hash(uint32_t key) { return (key * 0x9E3779B1u) >> (32 - MERGE_BITS); }

static uint32_t merge_lookup(const lora_tokenizer *t, uint32_t a, uint32_t b) {
    uint32_t key = (a << 16) | b;
    for (uint32_t h = merge_hash(key);; h = (h + 1) & t->merge_mask) {
        uint32_t k = t->merge_key[h];
        if (k == key) return t->merge_rank[h];
        if (k == MERGE_EMPTY) return NO_RANK;
    }
}

static void cache_clear(lora_tokenizer *t) {
    for (uint32_t i = 0; i < t->cache_slots; i++) t->cache[i].key_len = UINT32_MAX;
    t->cache_used = 0;
    t->keys_n = 0;
    t->cids_n = 0;
}

lora_status tok_create(lora_ctx *ctx, int32_t flavour, lora_tokenizer **out) {
    *out = NULL;
    if (flavour != LORA_TOKENIZER_SD1 && flavour != LORA_TOKENIZER_SD2)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "tokenizer flavour %d: expected LORA_TOKENIZER_SD1 (1) or "
                         "LORA_TOKENIZER_SD2 (2)", (int)flavour);
    lora_tokenizer *t = lora_calloc(ctx, 1, sizeof *t);
    if (!t) return LORA_E_NOMEM;
    t->magic = TOK_MAGIC;
    t->ctx = ctx;
    t->flavour = flavour;
    t->pad_id = flavour == LORA_TOKENIZER_SD1 ? TOK_EOS : 0;
    tf_pool_init(&t->pool, ctx);
    size_t slots = (size_t)1 << MERGE_BITS;
    t->merge_mask = (uint32_t)slots - 1;
    t->merge_key = lora_malloc(ctx, slots * sizeof *t->merge_key);
    t->merge_rank = lora_malloc(ctx, slots * sizeof *t->merge_rank);
    t->cache_slots = CACHE_SLOTS;
    t->cache = lora_malloc(ctx, CACHE_SLOTS * sizeof *t->cache);
    if (!t->merge_key || !t->merge_rank || !t->cache) {
        tok_free(t);
        return LORA_E_NOMEM;
    }
    memset(t->merge_key, 0xFF, slots * sizeof *t->merge_key);
    for (uint32_t r = 0; r < TOK_N_MERGES; r++) {
        uint32_t key = ((uint32_t)clip_bpe_merges[r][0] << 16) | clip_bpe_merges[r][1];
        uint32_t h = merge_hash(key);
        while (t->merge_key[h] != MERGE_EMPTY) h = (h + 1) & t->merge_mask;
        t->merge_key[h] = key;
        t->merge_rank[h] = (uint16_t)r;
    }
    /* bytes_to_unicode: printable Latin-1 bytes first, in byte order, then the others */
    uint16_t next = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int b = 0; b < 256; b++) {
            int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            if (printable == (pass == 0)) t->byte_id[b] = next++;
        }
    cache_clear(t);
    *out = t;
    return LORA_OK;
}

void tok_free(lora_tokenizer *t) {
    if (!t) return;
    lora_ctx *ctx = t->ctx;
    tf_pool_free(&t->pool);
    lora_free(ctx, t->merge_key);
    lora_free(ctx, t->merge_rank);
    lora_free(ctx, t->cache);
    lora_free(ctx, t->cache_keys);
    lora_free(ctx, t->cache_ids);
    lora_free(ctx, t->text.p);
    lora_free(ctx, t->norm.p);
    lora_free(ctx, t->word);
    lora_free(ctx, t->sym);
    lora_free(ctx, t->link);
    lora_free(ctx, t->heap);
    lora_free(ctx, t->ids);
    t->magic = 0;
    lora_free(ctx, t);
}

/* Grows a caller-owned array of `elem`-byte elements to hold at least n (contents kept). */
static lora_status grow(lora_ctx *ctx, void **p, size_t *cap, size_t n, size_t elem) {
    if (n <= *cap) return LORA_OK;
    size_t c = *cap ? *cap : 64;
    while (c < n) {
        if (c > SIZE_MAX / 4 / elem) return lora_fail(ctx, LORA_E_NOMEM, "tokenizer buffer of %zu items", n);
        c *= 2;
    }
    void *q = lora_malloc(ctx, c * elem);
    if (!q) return LORA_E_NOMEM;
    if (*p) memcpy(q, *p, *cap * elem);
    lora_free(ctx, *p);
    *p = q;
    *cap = c;
    return LORA_OK;
}

static lora_status emit_ids(lora_tokenizer *t, const int32_t *ids, size_t n) {
    LORA_TRY(grow(t->ctx, (void **)&t->ids, &t->ids_cap, t->n_ids + n, sizeof *t->ids));
    memcpy(t->ids + t->n_ids, ids, n * sizeof *ids);
    t->n_ids += n;
    return LORA_OK;
}

static uint64_t fnv1a(const uint8_t *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h;
}

/* transformers' bpe() repeats: take the lowest-ranked adjacent pair, merge its occurrences
 * left to right. For short words that loop is the fastest; for long ones it is quadratic, so
 * the same merges are made from a heap of (rank, position): the occurrences of one pair come
 * out left to right (an overlapped one finds its left symbol gone and is dropped), and a pair
 * a merge creates always ranks after the merge that made it (its new token did not exist
 * before), so the order of merges is the reference's. */
#define BPE_SHORT 48

struct bpe_node {
    uint64_t key;   /* rank << 32 | position */
    uint32_t left, right;
};

static void heap_push(struct bpe_node *h, size_t *n, struct bpe_node v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].key <= v.key) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static struct bpe_node heap_pop(struct bpe_node *h, size_t *n) {
    struct bpe_node top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1].key < h[c].key) c++;
        if (last.key <= h[c].key) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

static lora_status bpe_long(lora_tokenizer *t, size_t *m_io) {
    size_t m = *m_io;
    uint32_t *sym = t->sym;
    LORA_TRY(grow(t->ctx, (void **)&t->link, &t->link_cap, 2 * m, sizeof *t->link));
    LORA_TRY(grow(t->ctx, (void **)&t->heap, &t->heap_cap, 3 * m, sizeof(struct bpe_node)));
    uint32_t *next = t->link, *prev = t->link + m;   /* UINT32_MAX: none; prev of a dead symbol: dead */
    struct bpe_node *h = t->heap;
    size_t hn = 0;
    for (size_t i = 0; i < m; i++) {
        next[i] = i + 1 < m ? (uint32_t)(i + 1) : UINT32_MAX;
        prev[i] = i ? (uint32_t)(i - 1) : UINT32_MAX;
    }
    for (size_t i = 0; i + 1 < m; i++) {
        uint32_t r = merge_lookup(t, sym[i], sym[i + 1]);
        if (r != NO_RANK) heap_push(h, &hn, (struct bpe_node){(uint64_t)r << 32 | i, sym[i], sym[i + 1]});
    }
    const uint32_t dead = UINT32_MAX - 1;
    while (hn) {
        struct bpe_node e = heap_pop(h, &hn);
        uint32_t i = (uint32_t)e.key, r = (uint32_t)(e.key >> 32);
        if (prev[i] == dead || sym[i] != e.left) continue;
        uint32_t j = next[i];
        if (j == UINT32_MAX || sym[j] != e.right) continue;
        sym[i] = 512 + r;
        next[i] = next[j];
        if (next[j] != UINT32_MAX) prev[next[j]] = i;
        prev[j] = dead;
        if (prev[i] != UINT32_MAX) {
            uint32_t p = prev[i], rp = merge_lookup(t, sym[p], sym[i]);
            if (rp != NO_RANK) heap_push(h, &hn, (struct bpe_node){(uint64_t)rp << 32 | p, sym[p], sym[i]});
        }
        if (next[i] != UINT32_MAX) {
            uint32_t q = next[i], rq = merge_lookup(t, sym[i], sym[q]);
            if (rq != NO_RANK) heap_push(h, &hn, (struct bpe_node){(uint64_t)rq << 32 | i, sym[i], sym[q]});
        }
    }
    size_t o = 0;
    for (uint32_t i = 0; i != UINT32_MAX; i = next[i]) sym[o++] = sym[i];
    *m_io = o;
    return LORA_OK;
}

/* BPE of one word (its UTF-8 bytes), through the cache. */
static lora_status bpe_word(lora_tokenizer *t, const uint8_t *w, size_t n) {
    static const char sot[] = "<|startoftext|>", eot[] = "<|endoftext|>";
    if (n == sizeof sot - 1 && memcmp(w, sot, n) == 0) return emit_ids(t, &(int32_t){TOK_BOS}, 1);
    if (n == sizeof eot - 1 && memcmp(w, eot, n) == 0) return emit_ids(t, &(int32_t){TOK_EOS}, 1);

    uint64_t h = fnv1a(w, n);
    uint32_t slot = (uint32_t)h & (t->cache_slots - 1);
    for (;; slot = (slot + 1) & (t->cache_slots - 1)) {
        struct tok_cache_entry *e = &t->cache[slot];
        if (e->key_len == UINT32_MAX) break;
        if (e->hash == h && e->key_len == n && memcmp(t->cache_keys + e->key_off, w, n) == 0)
            return emit_ids(t, t->cache_ids + e->ids_off, e->n_ids);
    }

    LORA_TRY(grow(t->ctx, (void **)&t->sym, &t->sym_cap, n, sizeof *t->sym));
    uint32_t *sym = t->sym;
    size_t m = n;
    for (size_t i = 0; i < n; i++) sym[i] = t->byte_id[w[i]];
    sym[m - 1] += 256;   /* "</w>" */
    if (m > BPE_SHORT) LORA_TRY(bpe_long(t, &m));
    while (m > 1 && m <= BPE_SHORT) {
        uint32_t best = NO_RANK;
        for (size_t i = 0; i + 1 < m; i++) {
            uint32_t r = merge_lookup(t, sym[i], sym[i + 1]);
            if (r < best) best = r;
        }
        if (best == NO_RANK) break;
        uint32_t a = clip_bpe_merges[best][0], b = clip_bpe_merges[best][1], id = 512 + best;
        size_t o = 0;
        for (size_t i = 0; i < m;) {
            if (i + 1 < m && sym[i] == a && sym[i + 1] == b) {
                sym[o++] = id;
                i += 2;
            } else {
                sym[o++] = sym[i++];
            }
        }
        m = o;
    }
    size_t first = t->n_ids;
    LORA_TRY(grow(t->ctx, (void **)&t->ids, &t->ids_cap, t->n_ids + m, sizeof *t->ids));
    for (size_t i = 0; i < m; i++) t->ids[t->n_ids++] = (int32_t)sym[i];

    /* remember it (the cache starts over when full rather than growing without bound) */
    if (t->cache_used * 2 >= t->cache_slots || t->keys_n + n > CACHE_ARENA_MAX ||
        (t->cids_n + m) * sizeof(int32_t) > CACHE_ARENA_MAX) {
        cache_clear(t);
        slot = (uint32_t)h & (t->cache_slots - 1);
    }
    if (n > CACHE_ARENA_MAX || m * sizeof(int32_t) > CACHE_ARENA_MAX) return LORA_OK;
    if (grow(t->ctx, (void **)&t->cache_keys, &t->keys_cap, t->keys_n + n, 1) != LORA_OK ||
        grow(t->ctx, (void **)&t->cache_ids, &t->cids_cap, t->cids_n + m, sizeof(int32_t)) != LORA_OK) {
        lora_clear_error(t->ctx);   /* the cache is an optimisation: carry on without it */
        return LORA_OK;
    }
    while (t->cache[slot].key_len != UINT32_MAX) slot = (slot + 1) & (t->cache_slots - 1);
    struct tok_cache_entry *e = &t->cache[slot];
    e->hash = h;
    e->key_off = (uint32_t)t->keys_n;
    e->key_len = (uint32_t)n;
    e->ids_off = (uint32_t)t->cids_n;
    e->n_ids = (uint32_t)m;
    memcpy(t->cache_keys + t->keys_n, w, n);
    t->keys_n += n;
    memcpy(t->cache_ids + t->cids_n, t->ids + first, m * sizeof(int32_t));
    t->cids_n += m;
    t->cache_used++;
    return LORA_OK;
}

/* Does the split pattern's literal `lit` (ASCII, letters lower-case) match at s[i]? */
static size_t literal_at(const uint32_t *s, size_t n, size_t i, const char *lit) {
    size_t k = 0;
    for (; lit[k]; k++) {
        if (i + k >= n) return 0;
        uint32_t c = s[i + k], l = (unsigned char)lit[k];
        if (c == l) continue;
        if (l >= 'a' && l <= 'z') {
            const uint32_t *eq = tok_letter_equiv[l - 'a'];
            if (c != 0 && (c == eq[0] || c == eq[1] || c == eq[2])) continue;
        }
        return 0;
    }
    return k;
}

static size_t utf8_put(uint8_t *o, uint32_t c) {
    if (c >= 0xD800 && c <= 0xDFFF) c = 0xFFFD;   /* cannot happen after fix_text */
    if (c < 0x80) { o[0] = (uint8_t)c; return 1; }
    if (c < 0x800) { o[0] = (uint8_t)(0xC0 | c >> 6); o[1] = (uint8_t)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        o[0] = (uint8_t)(0xE0 | c >> 12); o[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3F)); o[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | c >> 18); o[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3F)); o[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

/* CLIPTokenizer._tokenize on one piece of raw text, ids appended to t->ids. */
static lora_status tokenize_piece(lora_tokenizer *t, const uint32_t *s, size_t n) {
    LORA_TRY(tf_normalize(&t->pool, s, n, &t->norm));
    const uint32_t *x = t->norm.p;
    size_t xn = t->norm.n;
    static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    for (size_t i = 0; i < xn;) {
        size_t len = 0;
        if (x[i] == '<') {
            len = literal_at(x, xn, i, "<|startoftext|>");
            if (!len) len = literal_at(x, xn, i, "<|endoftext|>");
        } else if (x[i] == '\'') {
            for (size_t k = 0; k < sizeof contractions / sizeof *contractions && !len; k++)
                len = literal_at(x, xn, i, contractions[k]);
        }
        if (!len) {
            uint16_t p = uni_props(x[i]);
            if (p & UP_RX_L) {
                len = 1;
                while (i + len < xn && (uni_props(x[i + len]) & UP_RX_L)) len++;
            } else if (p & UP_RX_N) {
                len = 1;
            } else if (p & UP_RX_P) {
                len = 1;
                while (i + len < xn && (uni_props(x[i + len]) & UP_RX_P)) len++;
            } else {
                i++;   /* white space (and the rare code point no branch accepts) */
                continue;
            }
        }
        LORA_TRY(grow(t->ctx, (void **)&t->word, &t->word_cap, len * 4, 1));
        size_t wn = 0;
        for (size_t k = 0; k < len; k++) wn += utf8_put(t->word + wn, x[i + k]);
        LORA_TRY(bpe_word(t, t->word, wn));
        i += len;
    }
    return LORA_OK;
}

static size_t special_at(const lora_tokenizer *t, const uint32_t *s, size_t n, size_t i, int32_t *id) {
    static const char sot[] = "<|startoftext|>", eot[] = "<|endoftext|>";
    if (s[i] == '!' && t->flavour == LORA_TOKENIZER_SD2) {
        *id = 0;
        return 1;
    }
    if (s[i] != '<') return 0;
    const char *lits[2] = {sot, eot};
    for (int k = 0; k < 2; k++) {
        size_t m = strlen(lits[k]);
        if (n - i < m) continue;
        size_t j = 0;
        while (j < m && s[i + j] == (unsigned char)lits[k][j]) j++;
        if (j == m) {
            *id = k == 0 ? TOK_BOS : TOK_EOS;
            return m;
        }
    }
    return 0;
}

static int is_py_space(uint32_t c) { return (uni_props(c) & UP_PY_SPACE) != 0; }

lora_status tok_tokenize(lora_tokenizer *t, const char *text, size_t len) {
    lora_ctx *ctx = t->ctx;
    t->n_ids = 0;
    size_t bad;
    if (!utf8_valid((const uint8_t *)text, len, &bad))
        return lora_fail(ctx, LORA_E_CAPTION_ENCODING, "text is not valid UTF-8 (byte offset %zu)", bad);
    struct cpbuf *in = &t->text;
    in->n = 0;
    LORA_TRY(cpbuf_reserve(&t->pool, in, len));
    const uint8_t *u = (const uint8_t *)text;
    for (size_t i = 0; i < len;) {
        uint32_t c = u[i];
        size_t k = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        if (k > 1) c &= 0xFFu >> (k + 1);
        for (size_t q = 1; q < k; q++) c = (c << 6) | (u[i + q] & 0x3F);
        in->p[in->n++] = c;
        i += k;
    }
    /* The no-split tokens cut the raw text; a special token given as a plain string ("!" of
     * v2) strips the white space of its neighbours, the AddedToken ones (BOS/EOS) do not. */
    const uint32_t *s = in->p;
    size_t n = in->n;
    size_t start = 0;          /* current text piece starts here */
    int lstrip = 0;            /* the piece follows a stripping special token */
    for (size_t i = 0; i <= n;) {
        int32_t id = -1;
        size_t m = i < n ? special_at(t, s, n, i, &id) : 0;
        if (i < n && !m) {
            i++;
            continue;
        }
        size_t b = start, e = i;
        if (lstrip)
            while (b < e && is_py_space(s[b])) b++;
        if (m && id == 0)
            while (e > b && is_py_space(s[e - 1])) e--;
        if (e > b) LORA_TRY(tokenize_piece(t, s + b, e - b));
        if (!m) break;
        LORA_TRY(emit_ids(t, &id, 1));
        lstrip = id == 0;
        i += m;
        start = i;
    }
    return LORA_OK;
}

lora_status tok_encode(lora_tokenizer *t, const char *text, size_t len, int32_t max_token_length,
                       int32_t *dst, size_t cap, size_t *n_out) {
    if (max_token_length != 75 && max_token_length != 150 && max_token_length != 225)
        return lora_fail(t->ctx, LORA_E_CONFIG_RANGE, "max_token_length %d: expected 75, 150 or 225",
                         (int)max_token_length);
    size_t n_chunks = (size_t)max_token_length / 75, total = n_chunks * TOK_CHUNK;
    if (n_out) *n_out = total;
    if (cap < total)
        return lora_fail(t->ctx, LORA_E_LIMIT, "max_token_length %d needs %zu ids, the buffer holds %zu",
                         (int)max_token_length, total, cap);
    LORA_TRY(tok_tokenize(t, text, len));
    /* tokenizer(..., padding="max_length", truncation=True, max_length=L) */
    size_t L = (size_t)max_token_length + 2, k = t->n_ids < L - 2 ? t->n_ids : L - 2;
    int32_t full[227];
    full[0] = TOK_BOS;
    if (k) memcpy(full + 1, t->ids, k * sizeof *full);   /* t->ids is NULL before the first word */
    full[1 + k] = TOK_EOS;
    for (size_t i = 2 + k; i < L; i++) full[i] = t->pad_id;
    if (n_chunks == 1) {
        memcpy(dst, full, TOK_CHUNK * sizeof *dst);
        return LORA_OK;
    }
    /* train_util.get_input_ids: chunk c = BOS, ids[1 + 75c .. 1 + 75(c+1)), ids[L-1] */
    for (size_t c = 0; c < n_chunks; c++) {
        int32_t *ch = dst + c * TOK_CHUNK;
        ch[0] = full[0];
        memcpy(ch + 1, full + 1 + 75 * c, 75 * sizeof *ch);
        ch[TOK_CHUNK - 1] = full[L - 1];
        if (t->pad_id != TOK_EOS) {
            if (ch[TOK_CHUNK - 2] != TOK_EOS && ch[TOK_CHUNK - 2] != t->pad_id) ch[TOK_CHUNK - 1] = TOK_EOS;
            if (ch[1] == t->pad_id) ch[1] = TOK_EOS;
        }
    }
    return LORA_OK;
}
