/* ftfy.fix_text + whitespace_clean + str.lower on code points; see text_fix.h. Behaviour was
 * learned from ftfy 6.1.1 and CPython 3.11 and is checked against them by
 * tests/reference/make_tokenizer_fixtures.py (fixtures) and fuzz_text_fix.py (random text). */
#include <string.h>

#include "model/text_fix.h"
#include "model/tokenizer_tables.h"

#define NONE_CP 0xFFFFFFFFu

/* ------------------------------------------------------------------------------------------
 * Scratch pool
 * ------------------------------------------------------------------------------------------ */

void tf_pool_init(struct tf_pool *tp, lora_ctx *ctx) {
    memset(tp, 0, sizeof *tp);
    tp->ctx = ctx;
}

void tf_pool_free(struct tf_pool *tp) {
    for (int i = 0; i < TF_POOL; i++) {
        lora_free(tp->ctx, tp->cp[i].p);
        lora_free(tp->ctx, tp->by[i].p);
    }
    memset(tp->cp, 0, sizeof tp->cp);
    memset(tp->by, 0, sizeof tp->by);
    tp->cp_top = tp->by_top = 0;
}

lora_status cpbuf_reserve(struct tf_pool *tp, struct cpbuf *b, size_t n) {
    if (n <= b->cap) return LORA_OK;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < n) {
        if (cap > SIZE_MAX / 8) return lora_fail(tp->ctx, LORA_E_NOMEM, "text of %zu characters is too long", n);
        cap *= 2;
    }
    uint32_t *p = lora_malloc(tp->ctx, cap * sizeof *p);
    if (!p) return LORA_E_NOMEM;
    if (b->n) memcpy(p, b->p, b->n * sizeof *p);
    lora_free(tp->ctx, b->p);
    b->p = p;
    b->cap = cap;
    return LORA_OK;
}

static lora_status bytebuf_reserve(struct tf_pool *tp, struct bytebuf *b, size_t n) {
    if (n <= b->cap) return LORA_OK;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < n) {
        if (cap > SIZE_MAX / 8) return lora_fail(tp->ctx, LORA_E_NOMEM, "text of %zu bytes is too long", n);
        cap *= 2;
    }
    uint8_t *p = lora_malloc(tp->ctx, cap);
    if (!p) return LORA_E_NOMEM;
    if (b->n) memcpy(p, b->p, b->n);
    lora_free(tp->ctx, b->p);
    b->p = p;
    b->cap = cap;
    return LORA_OK;
}

static struct cpbuf *cp_push(struct tf_pool *tp) {
    if (tp->cp_top >= TF_POOL) return NULL;
    struct cpbuf *b = &tp->cp[tp->cp_top++];
    b->n = 0;
    return b;
}

static void cp_pop(struct tf_pool *tp, int k) { tp->cp_top -= k; }

static struct bytebuf *by_push(struct tf_pool *tp) {
    if (tp->by_top >= TF_POOL) return NULL;
    struct bytebuf *b = &tp->by[tp->by_top++];
    b->n = 0;
    return b;
}

static void by_pop(struct tf_pool *tp, int k) { tp->by_top -= k; }

static lora_status pool_exhausted(struct tf_pool *tp) {
    return lora_fail(tp->ctx, LORA_E_LIMIT, "text repair nests too deeply (more than %d scratch buffers)", TF_POOL);
}

/* Appends without a capacity check: callers reserve first. */
static inline void put(struct cpbuf *b, uint32_t c) { b->p[b->n++] = c; }

static lora_status cp_copy(struct tf_pool *tp, struct cpbuf *dst, const uint32_t *s, size_t n) {
    dst->n = 0;
    LORA_TRY(cpbuf_reserve(tp, dst, n));
    if (n) memcpy(dst->p, s, n * sizeof *s);
    dst->n = n;
    return LORA_OK;
}

static int cp_equal(const uint32_t *a, size_t na, const uint32_t *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void cp_swap(struct cpbuf *a, struct cpbuf *b) {
    struct cpbuf t = *a;
    *a = *b;
    *b = t;
}

/* ------------------------------------------------------------------------------------------
 * Table lookups
 * ------------------------------------------------------------------------------------------ */

static uint32_t mj(uint32_t cp) {
    if (cp == NONE_CP) return 0;
    size_t lo = 0, hi = ftfy_class_count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ftfy_class_cp[mid] < cp) lo = mid + 1;
        else hi = mid;
    }
    return (lo < ftfy_class_count && ftfy_class_cp[lo] == cp) ? ftfy_class_mask[lo] : 0;
}

static const struct ftfy_map *map_find(const struct ftfy_map *m, size_t count, uint32_t cp) {
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (m[mid].cp < cp) lo = mid + 1;
        else hi = mid;
    }
    return (lo < count && m[lo].cp == cp) ? &m[lo] : NULL;
}

static ptrdiff_t u32_find(const uint32_t *keys, size_t count, uint32_t cp) {
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (keys[mid] < cp) lo = mid + 1;
        else hi = mid;
    }
    return (lo < count && keys[lo] == cp) ? (ptrdiff_t)lo : -1;
}

static int is_ascii_alpha(uint32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int is_ascii_lower(uint32_t c) { return c >= 'a' && c <= 'z'; }
static int py_space(uint32_t c) { return c != NONE_CP && (uni_props(c) & UP_PY_SPACE); }

static int in_set(uint32_t c, const uint32_t *set, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (set[i] == c) return 1;
    return 0;
}
#define IN(c, ...) in_set((c), (const uint32_t[]){__VA_ARGS__}, sizeof((const uint32_t[]){__VA_ARGS__}) / sizeof(uint32_t))

/* ------------------------------------------------------------------------------------------
 * badness.is_bad: does any alternative of ftfy's BADNESS_RE match somewhere?
 * ------------------------------------------------------------------------------------------ */

#define C1 MJ_C1
#define BAD MJ_BAD
#define CUR MJ_CURRENCY
#define SP MJ_START_PUNCTUATION
#define EP MJ_END_PUNCTUATION
#define NUM MJ_NUMERIC
#define KAO MJ_KAOMOJI
#define UA MJ_UPPER_ACCENTED
#define LA MJ_LOWER_ACCENTED
#define UC MJ_UPPER_COMMON
#define LC MJ_LOWER_COMMON
#define BOX MJ_BOX
#define COMMON MJ_COMMON

static int bad_at(const uint32_t *s, size_t n, size_t i) {
    uint32_t c[7];
    for (size_t k = 0; k < 7; k++) c[k] = i + k < n ? s[i + k] : NONE_CP;
    uint32_t m0 = mj(c[0]), m1 = mj(c[1]), m2 = mj(c[2]);

    if (m0 & C1) return 1;
    if ((m0 & (BAD | LA | UA | BOX | SP | EP | CUR | NUM)) && (m1 & BAD)) return 1;
    if (is_ascii_alpha(c[0]) && (m1 & (LC | UC)) && (m2 & BAD)) return 1;
    if ((m0 & BAD) && (m1 & (LA | UA | BOX | SP | EP | CUR | NUM))) return 1;
    if ((m0 & (LA | LC | BOX | EP | CUR | NUM)) && (m1 & UA)) return 1;
    if ((m0 & (BOX | EP | CUR | NUM)) && (m1 & LA)) return 1;
    if ((m0 & (LA | BOX | EP)) && (m1 & CUR)) return 1;
    if (py_space(c[0]) && (m1 & UA) && (m2 & CUR)) return 1;
    if ((m0 & (UA | BOX)) && (m1 & NUM)) return 1;
    if ((m0 & (LA | UA | BOX | CUR | EP)) && (m1 & SP) && (m2 & NUM)) return 1;
    if ((m0 & (LA | UA | CUR | NUM | BOX)) && (m1 & EP) && (m2 & SP)) return 1;
    if ((m0 & (CUR | NUM | BOX)) && (m1 & SP)) return 1;
    if (is_ascii_lower(c[0]) && (m1 & UA) && (m2 & (SP | CUR))) return 1;
    if ((m0 & BOX) && (m1 & KAO)) return 1;
    if ((m0 & (LA | UA | CUR | NUM | SP | EP)) && (m1 & BOX)) return 1;
    if ((m0 & BOX) && (m1 & EP)) return 1;
    if ((m0 & (LA | UA)) && (m1 & EP) && c[2] != NONE_CP && (uni_props(c[2]) & UP_RE_W)) return 1;
    /* the ligature oe not followed by an ASCII letter */
    if ((c[0] == 0x152 || c[0] == 0x153) && c[1] != NONE_CP && !is_ascii_alpha(c[1])) return 1;
    /* common windows-1252 two-character mojibake */
    if (IN(c[0], 0xC2, 0xC3, 0xCE, 0xD0) &&
        (IN(c[1], 0x20AC, 0x160, 0x161, 0xA2, 0xA3, 0x178, 0x17E, 0xA0, 0xAD, 0xAE, 0xA9, 0xB0, 0xB7, 0xBB,
            0x2013, 0x2014, 0xB4) ||
         (m1 & (SP | EP))))
        return 1;
    if (c[0] == 0xD7 && (c[1] == 0xB2 || c[1] == 0xB3)) return 1;
    /* windows-1252 mojibake of Arabic: four characters */
    if (IN(c[0], 0xD8, 0xD9) && IN(c[2], 0xD8, 0xD9)) {
        uint32_t x = COMMON | CUR | BAD | NUM | SP;
        int a1 = (m1 & x) || IN(c[1], 0x178, 0x160, 0xAE, 0xB0, 0xB5, 0xBB);
        int a3 = (mj(c[3]) & x) || IN(c[3], 0x178, 0x160, 0xAE, 0xB0, 0xB5, 0xBB);
        if (a1 && a3) return 1;
    }
    if (c[0] == 0xE0 && IN(c[1], 0xB2, 0xB5, 0xB9, 0xBC, 0xBD, 0xBE)) return 1;
    /* MacRoman */
    if (c[0] == 0x221A &&
        IN(c[1], 0xB1, 0x2202, 0x2020, 0x2260, 0xAE, 0x2122, 0xB4, 0x2264, 0x2265, 0xA5, 0xB5, 0xF8))
        return 1;
    if (c[0] == 0x2248 && (c[1] == 0xB0 || c[1] == 0xA2)) return 1;
    if (c[0] == 0x201A && c[1] == 0xC4 &&
        IN(c[2], 0xEC, 0xEE, 0xEF, 0xF2, 0xF4, 0xFA, 0xF9, 0xFB, 0x2020, 0xB0, 0xA2, 0x3C0))
        return 1;
    if (c[0] == 0x201A && (c[1] == 0xE2 || c[1] == 0xF3) && IN(c[2], 0xE0, 0xE4, 0xB0, 0xEA)) return 1;
    /* windows-1251 */
    if (c[0] == 0x432 && c[1] == 0x402) return 1;
    if (IN(c[0], 0x412, 0x413, 0x420, 0x421) && ((m1 & (C1 | BAD | SP | EP | CUR)) || c[1] == 0xB0 || c[1] == 0xB5) &&
        IN(c[2], 0x412, 0x413, 0x420, 0x421))
        return 1;
    if (c[0] == 0x413 && c[1] == 0x45E && c[2] == 0x412 && c[3] == 0x402 && c[4] == 0x412 && c[5] != NONE_CP &&
        c[5] != '\n' && c[6] != NONE_CP && (is_ascii_alpha(c[6]) || c[6] == ' '))
        return 1;
    /* windows-1252 encodings of a-grave, a-acute and no-break space */
    if (c[0] == 0xC3 && (c[1] == 0xA0 || c[1] == 0xA1)) return 1;
    if (is_ascii_lower(c[0])) {
        if (py_space(c[1]) && (c[2] == 0xC3 || c[2] == 0xC2) && c[3] == ' ') return 1;
        if ((c[1] == 0xC3 || c[1] == 0xC2) && c[2] == ' ') return 1;
    }
    if (i == 0 && (c[0] == 0xC3 || c[0] == 0xC2) && c[1] == ' ') return 1;
    if ((is_ascii_lower(c[0]) || IN(c[0], '.', ',', '?', '!') || (m0 & EP)) && c[1] == 0xC2 &&
        (c[2] == ' ' || (m2 & (SP | EP))))
        return 1;
    /* windows-1253 */
    if (c[0] == 0x3B2 && c[1] == 0x20AC && IN(c[2], 0x2122, 0xA0, 0x386, 0xAD, 0xAE, 0xB0)) return 1;
    if (IN(c[0], 0x392, 0x393, 0x39E, 0x39F) && ((m1 & (C1 | BAD | SP | EP | CUR)) || c[1] == 0xB0) &&
        IN(c[2], 0x392, 0x393, 0x39E, 0x39F))
        return 1;
    return 0;
}

int tf_is_bad(const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (bad_at(s, n, i)) return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Codecs
 * ------------------------------------------------------------------------------------------ */

static int codec_encode(int k, uint32_t cp) {
    if (cp < 0x80 && cp != 0x1A) return (int)cp;
    size_t lo = ftfy_codec_enc_off[k], hi = ftfy_codec_enc_off[k + 1];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ftfy_codec_enc_cp[mid] < cp) lo = mid + 1;
        else hi = mid;
    }
    return (lo < ftfy_codec_enc_off[k + 1] && ftfy_codec_enc_cp[lo] == cp) ? ftfy_codec_enc_byte[lo] : -1;
}

static int codec_possible(int k, const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (codec_encode(k, s[i]) < 0) return 0;
    return 1;
}

static int codec_is_sloppy(int k) { return k >= FTFY_SLOPPY_1252 && k <= FTFY_SLOPPY_1254; }

/* Python's strict UTF-8 decoder; `variants` adds ftfy's utf-8-variants: C0 80 is U+0000 and a
 * CESU-8 surrogate pair (ED A0-AF 80-BF ED B0-BF 80-BF) is one supplementary character.
 * Returns 0 on any error (the whole decode fails, as bytes.decode raises). */
static int utf8_decode(const uint8_t *b, size_t n, int variants, struct cpbuf *out) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = b[i];
        if (c < 0x80) {
            put(out, c);
            i++;
            continue;
        }
        if (variants && c == 0xC0 && i + 1 < n && b[i + 1] == 0x80) {
            put(out, 0);
            i += 2;
            continue;
        }
        if (variants && c == 0xED && n - i >= 6 && b[i + 1] >= 0xA0 && b[i + 1] <= 0xAF && (b[i + 2] & 0xC0) == 0x80 &&
            b[i + 3] == 0xED && b[i + 4] >= 0xB0 && b[i + 4] <= 0xBF && (b[i + 5] & 0xC0) == 0x80) {
            uint32_t cp = ((uint32_t)(b[i + 1] & 0x0F) << 16) + ((uint32_t)(b[i + 2] & 0x3F) << 10) +
                          ((uint32_t)(b[i + 4] & 0x0F) << 6) + (b[i + 5] & 0x3F) + 0x10000;
            put(out, cp);
            i += 6;
            continue;
        }
        size_t len;
        uint32_t cp;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) {
            len = 3; cp = c & 0x0F;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4; cp = c & 0x07;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else return 0;
        if (n - i < len) return 0;
        if (b[i + 1] < lo || b[i + 1] > hi) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((b[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (b[i + k] & 0x3F);
        }
        put(out, cp);
        i += len;
    }
    return 1;
}

/* ftfy ALTERED_UTF8_RE: UTF-8 that would be valid if a space were byte A0. Returns the match
 * length at i (0 = none), trying the alternatives in order. */
static int cont_not_85_a0(uint8_t x) { return x >= 0x80 && x <= 0xBF && x != 0x85 && x != 0xA0; }
static int is_cont(uint8_t x) { return x >= 0x80 && x <= 0xBF; }

static size_t altered_at(const uint8_t *b, size_t n, size_t i) {
    size_t r = n - i;
    uint8_t c = b[i];
    if (r >= 2 && (c == 0xC2 || c == 0xC3 || c == 0xC5 || c == 0xCE || c == 0xD0 || c == 0xD9) && b[i + 1] == ' ')
        return 2;
    if (r >= 3 && (c == 0xE2 || c == 0xE3) && b[i + 1] == ' ' && cont_not_85_a0(b[i + 2])) return 3;
    if (r >= 3 && c >= 0xE0 && c <= 0xE3 && cont_not_85_a0(b[i + 1]) && b[i + 2] == ' ') return 3;
    if (r >= 4 && c == 0xF0) {
        if (b[i + 1] == ' ' && is_cont(b[i + 2]) && is_cont(b[i + 3])) return 4;
        if (is_cont(b[i + 1]) && b[i + 2] == ' ' && is_cont(b[i + 3])) return 4;
        if (is_cont(b[i + 1]) && is_cont(b[i + 2]) && b[i + 3] == ' ') return 4;
    }
    return 0;
}

static int altered_search(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (altered_at(b, n, i)) return 1;
    return 0;
}

static int starts_with(const uint8_t *b, size_t n, size_t i, const char *lit) {
    size_t m = strlen(lit);
    return n - i >= m && memcmp(b + i, lit, m) == 0;
}

/* fixes.restore_byte_a0: "\xc3 " gets its A0 back (keeping the space) unless followed by a
 * space or a Portuguese contraction, then every ALTERED_UTF8_RE match has its spaces turned
 * into A0. */
static lora_status restore_byte_a0(struct tf_pool *tp, const struct bytebuf *in, struct bytebuf *out) {
    struct bytebuf *t = by_push(tp);
    if (!t) return pool_exhausted(tp);
    lora_status s = bytebuf_reserve(tp, t, in->n * 2);
    if (s != LORA_OK) goto done;
    for (size_t i = 0; i < in->n; i++) {
        t->p[t->n++] = in->p[i];
        if (in->p[i] == 0xC3 && i + 1 < in->n && in->p[i + 1] == ' ') {
            size_t j = i + 2;
            int keep = (j < in->n && in->p[j] == ' ') || starts_with(in->p, in->n, j, "quele") ||
                       starts_with(in->p, in->n, j, "quela") || starts_with(in->p, in->n, j, "quilo") ||
                       starts_with(in->p, in->n, j, "s ");
            if (!keep) {
                t->p[t->n++] = 0xA0;
                t->p[t->n++] = ' ';
                i++;
            }
        }
    }
    out->n = 0;
    s = bytebuf_reserve(tp, out, t->n);
    if (s != LORA_OK) goto done;
    for (size_t i = 0; i < t->n;) {
        size_t m = altered_at(t->p, t->n, i);
        if (!m) {
            out->p[out->n++] = t->p[i++];
            continue;
        }
        for (size_t k = 0; k < m; k++) out->p[out->n++] = t->p[i + k] == ' ' ? 0xA0 : t->p[i + k];
        i += m;
    }
done:
    by_pop(tp, 1);
    return s;
}

/* ftfy LOSSY_UTF8_RE: UTF-8 sequences with bytes lost to 0x1A (or '?'), match length at i. */
static int x1a_q(uint8_t x) { return x == 0x1A || x == '?'; }
static int x1a_cont(uint8_t x) { return x == 0x1A || is_cont(x); }
static int x1a_q_cont(uint8_t x) { return x == 0x1A || x == '?' || is_cont(x); }

static size_t lossy_at(const uint8_t *b, size_t n, size_t i) {
    size_t r = n - i;
    uint8_t c = b[i];
    if (r >= 2 && c >= 0xC2 && c <= 0xDF && b[i + 1] == 0x1A) return 2;
    if (r >= 2 && (c == 0xC2 || c == 0xC3) && b[i + 1] == '?') return 2;
    if (r >= 6 && c == 0xED && b[i + 1] >= 0xA0 && b[i + 1] <= 0xAF && b[i + 3] == 0xED && b[i + 4] >= 0xB0 &&
        b[i + 4] <= 0xBF) {
        if (x1a_q(b[i + 2]) && x1a_q_cont(b[i + 5])) return 6;
        if (x1a_q_cont(b[i + 2]) && x1a_q(b[i + 5])) return 6;
    }
    if (r >= 3 && c >= 0xE0 && c <= 0xEF) {
        if (x1a_q(b[i + 1]) && x1a_cont(b[i + 2])) return 3;
        if (x1a_cont(b[i + 1]) && x1a_q(b[i + 2])) return 3;
    }
    if (r >= 4 && c >= 0xF0 && c <= 0xF4) {
        if (x1a_q(b[i + 1]) && x1a_cont(b[i + 2]) && x1a_cont(b[i + 3])) return 4;
        if (x1a_cont(b[i + 1]) && x1a_q(b[i + 2]) && x1a_cont(b[i + 3])) return 4;
        if (x1a_cont(b[i + 1]) && x1a_cont(b[i + 2]) && x1a_q(b[i + 3])) return 4;
    }
    if (c == 0x1A) return 1;
    return 0;
}

static lora_status replace_lossy(struct tf_pool *tp, const struct bytebuf *in, struct bytebuf *out) {
    out->n = 0;
    LORA_TRY(bytebuf_reserve(tp, out, in->n * 3));
    for (size_t i = 0; i < in->n;) {
        size_t m = lossy_at(in->p, in->n, i);
        if (!m) {
            out->p[out->n++] = in->p[i++];
            continue;
        }
        out->p[out->n++] = 0xEF;
        out->p[out->n++] = 0xBF;
        out->p[out->n++] = 0xBD;
        i += m;
    }
    return LORA_OK;
}

static uint32_t sloppy1252(uint8_t b) { return ftfy_codec_decode[FTFY_SLOPPY_1252][b]; }

/* ------------------------------------------------------------------------------------------
 * fix_encoding
 * ------------------------------------------------------------------------------------------ */

static lora_status fix_encoding(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out);

/* ftfy UTF8_DETECTOR_RE at i (lookbehind on s[i-1]); returns the match end or i. */
static size_t utf8_detector_at(const uint32_t *s, size_t n, size_t i) {
    if (i > 0 && (mj(s[i - 1]) & MJ_UTF8_CONTINUATION_STRICT)) return i;
    size_t j = i;
    for (;;) {
        if (j >= n) break;
        uint32_t m = mj(s[j]);
        size_t need = (m & MJ_UTF8_FIRST_OF_2) ? 1 : (m & MJ_UTF8_FIRST_OF_3) ? 2 : (m & MJ_UTF8_FIRST_OF_4) ? 3 : 0;
        if (!need || n - j - 1 < need) break;
        size_t k;
        for (k = 1; k <= need; k++)
            if (!(mj(s[j + k]) & MJ_UTF8_CONTINUATION)) break;
        if (k <= need) break;
        j += need + 1;
    }
    return j;
}

/* fixes.decode_inconsistent_utf8 */
static lora_status decode_inconsistent_utf8(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n));
    struct cpbuf *fixed = cp_push(tp);
    if (!fixed) return pool_exhausted(tp);
    lora_status st = LORA_OK;
    for (size_t i = 0; i < n;) {
        size_t j = utf8_detector_at(s, n, i);
        if (j == i) {
            st = cpbuf_reserve(tp, out, out->n + 1);
            if (st != LORA_OK) break;
            put(out, s[i++]);
            continue;
        }
        const uint32_t *sub = s + i;
        size_t m = j - i;
        if (m < n && tf_is_bad(sub, m)) {
            st = fix_encoding(tp, sub, m, fixed);
            if (st != LORA_OK) break;
            sub = fixed->p;
            m = fixed->n;
        }
        st = cpbuf_reserve(tp, out, out->n + m);
        if (st != LORA_OK) break;
        memcpy(out->p + out->n, sub, m * sizeof *sub);
        out->n += m;
        i = j;
    }
    cp_pop(tp, 1);
    return st;
}

/* One step of ftfy._fix_encoding_one_step_and_explain: out = s when nothing applies. */
static lora_status fix_encoding_step(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    int ascii = 1;
    for (size_t i = 0; i < n && ascii; i++) ascii = s[i] < 0x80;
    if (n == 0 || ascii || !tf_is_bad(s, n)) return cp_copy(tp, out, s, n);

    int by0 = tp->by_top;
    struct bytebuf *enc = by_push(tp), *alt = by_push(tp);
    if (!enc || !alt) {
        tp->by_top = by0;
        return pool_exhausted(tp);
    }
    lora_status st = LORA_OK;
    int latin1_possible = 0;
    for (int k = 0; k < FTFY_N_CODECS; k++) {
        if (!codec_possible(k, s, n)) continue;
        if (k == FTFY_LATIN_1) latin1_possible = 1;
        enc->n = 0;
        st = bytebuf_reserve(tp, enc, n);
        if (st != LORA_OK) goto done;
        for (size_t i = 0; i < n; i++) enc->p[enc->n++] = (uint8_t)codec_encode(k, s[i]);
        if (altered_search(enc->p, enc->n)) {
            st = restore_byte_a0(tp, enc, alt);
            if (st != LORA_OK) goto done;
            struct bytebuf t = *enc;
            *enc = *alt;
            *alt = t;
        }
        if (codec_is_sloppy(k)) {
            st = replace_lossy(tp, enc, alt);
            if (st != LORA_OK) goto done;
            struct bytebuf t = *enc;
            *enc = *alt;
            *alt = t;
        }
        int variants = memchr(enc->p, 0xED, enc->n) || memchr(enc->p, 0xC0, enc->n);
        out->n = 0;
        st = cpbuf_reserve(tp, out, enc->n);
        if (st != LORA_OK) goto done;
        if (utf8_decode(enc->p, enc->n, variants, out)) goto done;
    }
    /* embedded UTF-8 mojibake, fixed piece by piece */
    for (size_t i = 0; i < n; i++) {
        if (utf8_detector_at(s, n, i) == i) continue;
        st = decode_inconsistent_utf8(tp, s, n, out);
        if (st != LORA_OK || !cp_equal(out->p, out->n, s, n)) goto done;
        break;
    }
    /* Latin-1 that was meant as windows-1252 (strict: five bytes are undefined) */
    if (latin1_possible) {
        int ok = 1, changed = 0;
        out->n = 0;
        st = cpbuf_reserve(tp, out, n);
        if (st != LORA_OK) goto done;
        for (size_t i = 0; i < n && ok; i++) {
            uint32_t c = s[i], d = c;
            if (c >= 0x80 && c <= 0x9F) {
                if (c == 0x81 || c == 0x8D || c == 0x8F || c == 0x90 || c == 0x9D) ok = 0;
                else d = sloppy1252((uint8_t)c);
            }
            changed |= d != c;
            put(out, d);
        }
        if (ok && changed) goto done;
    }
    /* remaining C1 controls as their windows-1252 characters */
    {
        int c1 = 0;
        for (size_t i = 0; i < n && !c1; i++) c1 = s[i] >= 0x80 && s[i] <= 0x9F;
        st = cp_copy(tp, out, s, n);
        if (st != LORA_OK || !c1) goto done;
        for (size_t i = 0; i < n; i++)
            if (s[i] >= 0x80 && s[i] <= 0x9F) out->p[i] = sloppy1252((uint8_t)s[i]);
    }
done:
    by_pop(tp, 2);
    return st;
}

/* ftfy.fix_encoding: steps until nothing changes. */
static lora_status fix_encoding(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    int cp0 = tp->cp_top;
    struct cpbuf *a = cp_push(tp), *b = cp_push(tp);
    if (!a || !b) {
        tp->cp_top = cp0;
        return pool_exhausted(tp);
    }
    lora_status st = cp_copy(tp, a, s, n);
    while (st == LORA_OK) {
        st = fix_encoding_step(tp, a->p, a->n, b);
        if (st != LORA_OK) break;
        int same = cp_equal(a->p, a->n, b->p, b->n);
        cp_swap(a, b);
        if (same) break;
    }
    if (st == LORA_OK) st = cp_copy(tp, out, a->p, a->n);
    cp_pop(tp, 2);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * The other fixers (each: in -> out)
 * ------------------------------------------------------------------------------------------ */

static int entity_cmp(const char *name, const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char a = (unsigned char)name[i];
        if (!a) return -1;
        if (a != s[i]) return a < s[i] ? -1 : 1;
    }
    return name[n] ? 1 : 0;
}

static int is_alnum_ascii(uint32_t c) { return (c >= '0' && c <= '9') || is_ascii_alpha(c); }
static int hexval(uint32_t c) {
    if (c >= '0' && c <= '9') return (int)(c - '0');
    if (c >= 'a' && c <= 'f') return (int)(c - 'a' + 10);
    if (c >= 'A' && c <= 'F') return (int)(c - 'A' + 10);
    return -1;
}

/* html.unescape of a whole "&#...;" reference: 1 and *len code points in v[] (possibly 0),
 * or 0 when html.unescape would leave a ';' (partial or no decoding, or U+003B itself). */
static int charref(const uint32_t *s, size_t n, uint32_t *v, int *len) {
    /* s = "#...", n >= 2, all ASCII alphanumerics after '#' */
    uint64_t num = 0;
    size_t i = 1;
    if (s[1] == 'x' || s[1] == 'X') {
        i = 2;
        if (i >= n) return 0;
        for (; i < n; i++) {
            int h = hexval(s[i]);
            if (h < 0) return 0;
            if (num < 0x110000) num = num * 16 + (uint64_t)h;
        }
    } else {
        for (; i < n; i++) {
            if (s[i] < '0' || s[i] > '9') return 0;
            if (num < 0x110000) num = num * 10 + (s[i] - '0');
        }
    }
    ptrdiff_t r = num <= 0xFFFFFFFFu ? u32_find(html_charref_num, html_charref_count, (uint32_t)num) : -1;
    uint32_t cp;
    if (r >= 0) cp = html_charref_val[r];
    else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) cp = 0xFFFD;
    else if ((num >= 0x1 && num <= 0x8) || (num >= 0xE && num <= 0x1F) || (num >= 0x7F && num <= 0x9F) ||
             (num >= 0xFDD0 && num <= 0xFDEF) || num == 0xB || (num & 0xFFFE) == 0xFFFE) {
        *len = 0;
        return 1;
    } else cp = (uint32_t)num;
    if (cp == ';') return 0;
    v[0] = cp;
    *len = 1;
    return 1;
}

/* fixes.unescape_html: every "&#?[0-9A-Za-z]{1,24};" that names an entity ftfy knows or is a
 * numeric reference html.unescape decodes completely. */
static lora_status unescape_html(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n));
    for (size_t i = 0; i < n;) {
        if (s[i] != '&') {
            put(out, s[i++]);
            continue;
        }
        size_t j = i + 1;
        int hash = j < n && s[j] == '#';
        if (hash) j++;
        size_t k = j;
        while (k < n && k - j < 25 && is_alnum_ascii(s[k])) k++;
        if (k == j || k - j > 24 || k >= n || s[k] != ';') {
            put(out, s[i++]);
            continue;
        }
        /* match is s[i .. k]; the name is s[i+1 .. k) */
        const uint32_t *name = s + i + 1;
        size_t nl = k - i - 1;
        uint32_t v[3] = {0, 0, 0};
        int len = -1;
        if (!hash) {
            size_t lo = 0, hi = ftfy_entity_count;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (entity_cmp(ftfy_entities[mid].name, name, nl) < 0) lo = mid + 1;
                else hi = mid;
            }
            if (lo < ftfy_entity_count && entity_cmp(ftfy_entities[lo].name, name, nl) == 0) {
                len = 0;
                while (len < 3 && ftfy_entities[lo].value[len]) {
                    v[len] = ftfy_entities[lo].value[len];
                    len++;
                }
            }
        } else if (!charref(name, nl, v, &len)) {
            len = -1;
        }
        if (len < 0) {
            for (size_t q = i; q <= k; q++) put(out, s[q]);
        } else {
            for (int q = 0; q < len; q++) put(out, v[q]);
        }
        i = k + 1;
    }
    return LORA_OK;
}

static lora_status fix_c1_controls(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    LORA_TRY(cp_copy(tp, out, s, n));
    for (size_t i = 0; i < n; i++)
        if (s[i] >= 0x80 && s[i] <= 0x9F) out->p[i] = sloppy1252((uint8_t)s[i]);
    return LORA_OK;
}

static lora_status translate(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out,
                             const struct ftfy_map *m, size_t count, uint32_t lo, uint32_t hi) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n * 3));
    for (size_t i = 0; i < n; i++) {
        const struct ftfy_map *e = (s[i] >= lo && s[i] <= hi) ? map_find(m, count, s[i]) : NULL;
        if (!e) {
            put(out, s[i]);
            continue;
        }
        for (int q = 0; q < 3 && e->value[q]; q++) put(out, e->value[q]);
    }
    return LORA_OK;
}

static lora_status uncurl_quotes(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    LORA_TRY(cp_copy(tp, out, s, n));
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) out->p[i] = '\'';
        else if (c >= 0x201C && c <= 0x201F) out->p[i] = '"';
    }
    return LORA_OK;
}

static lora_status fix_line_breaks(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n));
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c == '\r' && i + 1 < n && s[i + 1] == '\n') continue;
        if (c == '\r' || c == 0x2028 || c == 0x2029 || c == 0x85) c = '\n';
        put(out, c);
    }
    return LORA_OK;
}

/* fixes.remove_terminal_escapes: ESC [ (\d|;)* letter. */
static lora_status remove_terminal_escapes(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n));
    for (size_t i = 0; i < n;) {
        if (s[i] == 0x1B && i + 1 < n && s[i + 1] == '[') {
            size_t j = i + 2;
            while (j < n && (s[j] == ';' || (uni_props(s[j]) & UP_RE_D))) j++;
            if (j < n && is_ascii_alpha(s[j])) {
                i = j + 1;
                continue;
            }
        }
        put(out, s[i++]);
    }
    return LORA_OK;
}

static int is_removed_control(uint32_t c) {
    return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
           c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

static lora_status remove_control_chars(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    LORA_TRY(cpbuf_reserve(tp, out, n));
    for (size_t i = 0; i < n; i++)
        if (!is_removed_control(s[i])) put(out, s[i]);
    return LORA_OK;
}

/* ------------------------------------------------------------------------------------------
 * NFC as CPython's unicodedata.normalize computes it
 * ------------------------------------------------------------------------------------------ */

#define S_BASE 0xAC00u
#define L_BASE 0x1100u
#define V_BASE 0x1161u
#define T_BASE 0x11A7u
#define L_COUNT 19u
#define V_COUNT 21u
#define T_COUNT 28u
#define N_COUNT (V_COUNT * T_COUNT)
#define S_COUNT (L_COUNT * N_COUNT)

static uint32_t compose_pair(uint32_t a, uint32_t b) {
    uint64_t key = ((uint64_t)a << 21) | b;
    size_t lo = 0, hi = uni_comp_count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (uni_comp_key[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return (lo < uni_comp_count && uni_comp_key[lo] == key) ? uni_comp_val[lo] : 0;
}

static int composes_first(uint32_t a) {
    uint64_t key = (uint64_t)a << 21;
    size_t lo = 0, hi = uni_comp_count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (uni_comp_key[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo < uni_comp_count && (uni_comp_key[lo] >> 21) == a;
}

#define SKIPPED 0xFFFFFFFFu

static lora_status nfc(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    int stable = 1;
    for (size_t i = 0; i < n && stable; i++) stable = !(uni_props(s[i]) & UP_NFC_UNSTABLE);
    if (stable) return cp_copy(tp, out, s, n);

    struct cpbuf *d = cp_push(tp);
    if (!d) return pool_exhausted(tp);
    lora_status st = cpbuf_reserve(tp, d, n * 4);
    if (st != LORA_OK) goto done;
    /* canonical decomposition */
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c >= S_BASE && c < S_BASE + S_COUNT) {
            uint32_t si = c - S_BASE;
            put(d, L_BASE + si / N_COUNT);
            put(d, V_BASE + (si % N_COUNT) / T_COUNT);
            if (si % T_COUNT) put(d, T_BASE + si % T_COUNT);
            continue;
        }
        ptrdiff_t r = (uni_props(c) & UP_NFC_UNSTABLE) ? u32_find(uni_decomp_cp, uni_decomp_count, c) : -1;
        if (r < 0) {
            put(d, c);
            continue;
        }
        for (int q = 0; q < 4 && uni_decomp_map[r][q]; q++) put(d, uni_decomp_map[r][q]);
    }
    /* canonical order: each run of marks stably sorted by combining class (what CPython's
     * insertion does; long runs by counting so a hostile run stays linear) */
    for (size_t i = 0; i < d->n;) {
        if (uni_ccc(d->p[i]) == 0) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < d->n && uni_ccc(d->p[j]) != 0) j++;
        if (j - i <= 32) {
            for (size_t q = i + 1; q < j; q++) {
                uint32_t c = d->p[q];
                uint8_t cur = uni_ccc(c);
                size_t o = q;
                while (o > i && uni_ccc(d->p[o - 1]) > cur) {
                    d->p[o] = d->p[o - 1];
                    o--;
                }
                d->p[o] = c;
            }
        } else {
            struct cpbuf *tmp = cp_push(tp);
            if (!tmp) {
                st = pool_exhausted(tp);
                goto done;
            }
            st = cp_copy(tp, tmp, d->p + i, j - i);
            if (st == LORA_OK) {
                size_t count[257] = {0};
                for (size_t q = 0; q < tmp->n; q++) count[uni_ccc(tmp->p[q]) + 1]++;
                for (int c = 1; c <= 256; c++) count[c] += count[c - 1];
                for (size_t q = 0; q < tmp->n; q++) d->p[i + count[uni_ccc(tmp->p[q])]++] = tmp->p[q];
            }
            cp_pop(tp, 1);
            if (st != LORA_OK) goto done;
        }
        i = j;
    }
    /* canonical composition */
    out->n = 0;
    st = cpbuf_reserve(tp, out, d->n);
    if (st != LORA_OK) goto done;
    for (size_t i = 0; i < d->n;) {
        uint32_t c = d->p[i];
        if (c == SKIPPED) {
            i++;
            continue;
        }
        if (c >= L_BASE && c < L_BASE + L_COUNT && i + 1 < d->n && d->p[i + 1] >= V_BASE &&
            d->p[i + 1] < V_BASE + V_COUNT) {
            uint32_t code = S_BASE + ((c - L_BASE) * V_COUNT + (d->p[i + 1] - V_BASE)) * T_COUNT;
            i += 2;
            if (i < d->n && d->p[i] > T_BASE && d->p[i] < T_BASE + T_COUNT) code += d->p[i++] - T_BASE;
            put(out, code);
            continue;
        }
        put(out, c);
        i++;
        if (!composes_first(c)) continue;
        uint8_t comb = 0;
        for (size_t i1 = i; i1 < d->n; i1++) {
            uint32_t c1 = d->p[i1];
            if (c1 == SKIPPED) continue;
            uint8_t comb1 = uni_ccc(c1);
            if (comb) {
                if (comb1 == 0) break;
                if (comb >= comb1) continue;   /* blocked */
            }
            uint32_t k = compose_pair(out->p[out->n - 1], c1);
            if (!k) {
                if (comb1 == 0) break;
                comb = comb1;
                continue;
            }
            out->p[out->n - 1] = k;
            d->p[i1] = SKIPPED;
            if (!composes_first(k)) break;
        }
    }
done:
    cp_pop(tp, 1);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * fix_text
 * ------------------------------------------------------------------------------------------ */

/* ftfy.fix_and_explain on one segment: every fixer in ftfy's order, until a pass changes
 * nothing. */
static lora_status fix_segment(struct tf_pool *tp, const uint32_t *s, size_t n, int unescape, struct cpbuf *out) {
    int cp0 = tp->cp_top;
    struct cpbuf *a = cp_push(tp), *b = cp_push(tp), *orig = cp_push(tp);
    if (!a || !b || !orig) {
        tp->cp_top = cp0;
        return pool_exhausted(tp);
    }
    lora_status st = cp_copy(tp, a, s, n);
#define STEP(call) do { if (st == LORA_OK) { st = (call); cp_swap(a, b); } } while (0)
    while (st == LORA_OK) {
        st = cp_copy(tp, orig, a->p, a->n);
        if (unescape) STEP(unescape_html(tp, a->p, a->n, b));
        STEP(fix_encoding(tp, a->p, a->n, b));
        STEP(fix_c1_controls(tp, a->p, a->n, b));
        STEP(translate(tp, a->p, a->n, b, ftfy_ligatures, ftfy_ligature_count, 0x132, 0xFB06));
        STEP(translate(tp, a->p, a->n, b, ftfy_widths, ftfy_width_count, 0x3000, 0xFFEF));
        STEP(uncurl_quotes(tp, a->p, a->n, b));
        STEP(fix_line_breaks(tp, a->p, a->n, b));
        /* fix_surrogates: nothing here can hold a surrogate code point */
        STEP(remove_terminal_escapes(tp, a->p, a->n, b));
        STEP(remove_control_chars(tp, a->p, a->n, b));
        STEP(nfc(tp, a->p, a->n, b));
        if (st != LORA_OK || cp_equal(a->p, a->n, orig->p, orig->n)) break;
    }
#undef STEP
    if (st == LORA_OK) {
        st = cpbuf_reserve(tp, out, out->n + a->n);
        if (st == LORA_OK) {
            memcpy(out->p + out->n, a->p, a->n * sizeof *a->p);
            out->n += a->n;
        }
    }
    cp_pop(tp, 3);
    return st;
}

#define FTFY_MAX_DECODE_LENGTH 1000000u

lora_status tf_fix_text(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    out->n = 0;
    int unescape = 1;   /* "auto" until a segment holds '<' */
    for (size_t pos = 0; pos < n;) {
        size_t end = pos;
        while (end < n && s[end] != '\n') end++;
        end = end < n ? end + 1 : n;
        if (end - pos > FTFY_MAX_DECODE_LENGTH) end = pos + FTFY_MAX_DECODE_LENGTH;
        if (unescape)
            for (size_t i = pos; i < end; i++)
                if (s[i] == '<') {
                    unescape = 0;
                    break;
                }
        LORA_TRY(fix_segment(tp, s + pos, end - pos, unescape, out));
        pos = end;
    }
    return LORA_OK;
}

/* Printable ASCII without '&', plus tab and newline: every ftfy fixer leaves it alone. */
static int ftfy_identity(const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if ((c < 0x20 || c > 0x7E || c == '&') && c != '\t' && c != '\n') return 0;
    }
    return 1;
}

/* whitespace_clean (regex \s+ -> " ", then str.strip) and str.lower, in -> out. */
static lora_status clean_lower(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    struct cpbuf *w = cp_push(tp);
    if (!w) return pool_exhausted(tp);
    lora_status st = cpbuf_reserve(tp, w, n);
    if (st != LORA_OK) goto done;
    for (size_t i = 0; i < n;) {
        if (uni_props(s[i]) & UP_RX_S) {
            while (i < n && (uni_props(s[i]) & UP_RX_S)) i++;
            put(w, ' ');
        } else {
            put(w, s[i++]);
        }
    }
    size_t b = 0, e = w->n;
    while (b < e && (uni_props(w->p[b]) & UP_PY_SPACE)) b++;
    while (e > b && (uni_props(w->p[e - 1]) & UP_PY_SPACE)) e--;
    out->n = 0;
    st = cpbuf_reserve(tp, out, (e - b) * 3);
    if (st != LORA_OK) goto done;
    for (size_t i = b; i < e; i++) {
        uint32_t c = w->p[i];
        if (c < 0x80) {
            put(out, (c >= 'A' && c <= 'Z') ? c + 32 : c);
        } else if (c == 0x3A3) {
            /* Final_Sigma: cased (skipping case-ignorables) before, and no cased after */
            size_t j = i - b;
            const uint32_t *t = w->p + b;
            size_t tn = e - b;
            size_t k = j;
            uint16_t pk = 0;
            while (k > 0) {
                pk = uni_props(t[k - 1]);
                if (!(pk & UP_CASE_IGN)) break;
                k--;
            }
            int final = k > 0 && (pk & UP_CASED);
            if (final) {
                size_t q = j + 1;
                uint16_t pq = 0;
                while (q < tn) {
                    pq = uni_props(t[q]);
                    if (!(pq & UP_CASE_IGN)) break;
                    q++;
                }
                final = q == tn || !(pq & UP_CASED);
            }
            put(out, final ? 0x3C2 : 0x3C3);
        } else if (uni_props(c) & UP_HAS_LOWER) {
            ptrdiff_t r = u32_find(uni_lower_cp, uni_lower_count, c);
            if (r < 0) put(out, c);
            else
                for (int q = 0; q < 3 && uni_lower_map[r][q]; q++) put(out, uni_lower_map[r][q]);
        } else {
            put(out, c);
        }
    }
done:
    cp_pop(tp, 1);
    return st;
}

lora_status tf_normalize(struct tf_pool *tp, const uint32_t *s, size_t n, struct cpbuf *out) {
    tp->cp_top = tp->by_top = 0;   /* the entry point: nothing of the pool is in use */
    if (ftfy_identity(s, n)) return clean_lower(tp, s, n, out);
    struct cpbuf *f = cp_push(tp);
    if (!f) return pool_exhausted(tp);
    lora_status st = tf_fix_text(tp, s, n, f);
    if (st == LORA_OK) st = clean_lower(tp, f->p, f->n, out);
    cp_pop(tp, 1);
    return st;
}
