/* --from_file prompt lines and their " --" options, as kohya's gen_img_diffusers.py main loop
 * reads them; see prompt.h. */
#include <math.h>
#include <string.h>

#include "core/utf8.h"
#include "gen/prompt.h"

#define LINE_MAX_BYTES ((size_t)GEN_PROMPT_MAX_BYTES * 4)

/* Code point at s[i] (valid UTF-8) and its byte length. */
static uint32_t cp_at(const uint8_t *s, size_t i, size_t *k) {
    uint32_t c = s[i];
    size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (n > 1) c &= 0xFFu >> (n + 1);
    for (size_t q = 1; q < n; q++) c = (c << 6) | (s[i + q] & 0x3F);
    *k = n;
    return c;
}

/* Python's str.isspace. */
static int py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Python's str.splitlines boundaries (a \r\n pair is one). */
static int py_linebreak(uint32_t c) {
    return c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || (c >= 0x1c && c <= 0x1e) || c == 0x85 ||
           c == 0x2028 || c == 0x2029;
}

/* str.strip(): [*a, *b) of s[a..b) without white space at either end. */
static void py_strip(const uint8_t *s, size_t *a, size_t *b) {
    size_t i = *a, k;
    while (i < *b && py_space(cp_at(s, i, &k))) i += k;
    size_t e = *b;
    while (e > i) {
        size_t j = e - 1;
        while (j > i && (s[j] & 0xC0) == 0x80) j--;
        if (!py_space(cp_at(s, j, &k))) break;
        e = j;
    }
    *a = i;
    *b = e;
}

static char *dup_n(lora_ctx *ctx, const char *s, size_t n) {
    char *t = lora_malloc(ctx, n + 1);
    if (!t) return NULL;
    if (n) memcpy(t, s, n);
    t[n] = '\0';
    return t;
}

void gen_prompt_line_free(lora_ctx *ctx, struct gen_prompt_line *l) {
    if (!l) return;
    lora_free(ctx, l->prompt);
    lora_free(ctx, l->negative);
    lora_free(ctx, l->clip_prompt);
    lora_free(ctx, l->seeds);
    lora_free(ctx, l->network_muls);
    memset(l, 0, sizeof *l);
}

static int lower_eq(char a, char b) {
    if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
    return a == b;
}

/* re.match(r'<key> ', part, re.IGNORECASE): the part starts with the letters of key (any case)
 * and a space. */
static int key_at(const char *p, size_t n, const char *key) {
    size_t k = strlen(key);
    if (n < k + 1) return 0;
    for (size_t i = 0; i < k; i++)
        if (!lower_eq(p[i], key[i])) return 0;
    return p[k] == ' ';
}

static size_t span(const char *p, size_t n, const char *set) {
    size_t i = 0;
    while (i < n && p[i] && strchr(set, p[i])) i++;
    return i;
}

struct where {
    lora_ctx *ctx;
    int64_t line_no;
    const char *line;
};

static lora_status bad(const struct where *w, const char *part, size_t n, const char *why) {
    if (w->line_no > 0)
        return lora_fail(w->ctx, LORA_E_CONFIG_RANGE, "prompt line %lld: option \"--%.*s\": %s", (long long)w->line_no,
                         (int)(n > 80 ? 80 : n), part, why);
    return lora_fail(w->ctx, LORA_E_CONFIG_RANGE, "prompt line \"%.60s\": option \"--%.*s\": %s", w->line,
                     (int)(n > 80 ? 80 : n), part, why);
}

/* Decimal digits -> value, 0 when above `max`. */
static int parse_u64(const char *p, size_t n, uint64_t max, uint64_t *out) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t d = (uint64_t)(p[i] - '0');
        if (v > (max - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

static lora_status parse_float_opt(const struct where *w, const char *part, size_t n, const char *num, size_t k,
                                   double *out) {
    double v;
    if (!gen_parse_pyfloat(num, k, &v)) return bad(w, part, n, "not a number (kohya: ValueError)");
    if (!isfinite(v)) return bad(w, part, n, "the number is too large");
    *out = v;
    return LORA_OK;
}

/* One " --" part: kohya's patterns in its order; the first that matches wins. */
static lora_status parse_option(const struct where *w, struct gen_prompt_line *o, const char *p, size_t n) {
    lora_ctx *ctx = w->ctx;
    const char *digits = "0123456789";
    size_t k;
    if (key_at(p, n, "w") || key_at(p, n, "h")) {
        if ((k = span(p + 2, n - 2, digits)) > 0) {
            uint64_t v;
            if (!parse_u64(p + 2, k, INT32_MAX, &v)) return bad(w, p, n, "the size is too large");
            if (lower_eq(p[0], 'w')) o->width = (int32_t)v, o->has_width = 1;
            else o->height = (int32_t)v, o->has_height = 1;
            return LORA_OK;
        }
    }
    if (key_at(p, n, "s") && (k = span(p + 2, n - 2, digits)) > 0) {
        uint64_t v;
        if (!parse_u64(p + 2, k, UINT64_MAX, &v)) v = 1000;   /* clamped to 1..1000 anyway */
        o->steps = v < 1 ? 1 : v > 1000 ? 1000 : (int32_t)v;
        o->has_steps = 1;
        return LORA_OK;
    }
    if (key_at(p, n, "d") && (k = span(p + 2, n - 2, "0123456789,")) > 0) {
        const char *q = p + 2;
        int64_t cnt = 1;
        for (size_t i = 0; i < k; i++) cnt += q[i] == ',';
        uint64_t *seeds = lora_malloc(ctx, (size_t)cnt * sizeof *seeds);
        if (!seeds) return LORA_E_NOMEM;
        int64_t c = 0;
        for (size_t i = 0; i <= k;) {
            size_t j = i;
            while (j < k && q[j] != ',') j++;
            if (j == i || !parse_u64(q + i, j - i, UINT64_MAX, &seeds[c])) {
                lora_free(ctx, seeds);
                return bad(w, p, n, j == i ? "an empty seed (kohya: ValueError)" : "a seed above 2^64 - 1");
            }
            c++;
            i = j + 1;
        }
        lora_free(ctx, o->seeds);
        o->seeds = seeds;
        o->n_seeds = c;
        return LORA_OK;
    }
    if (key_at(p, n, "l") && (k = span(p + 2, n - 2, "0123456789.")) > 0) {
        LORA_TRY(parse_float_opt(w, p, n, p + 2, k, &o->scale));
        o->has_scale = 1;
        return LORA_OK;
    }
    if (key_at(p, n, "nl")) {
        if ((k = span(p + 3, n - 3, "0123456789.")) > 0) {
            LORA_TRY(parse_float_opt(w, p, n, p + 3, k, &o->negative_scale));
            o->has_negative_scale = 1;
            o->negative_scale_none = 0;
            return LORA_OK;
        }
        if (n >= 7 && lower_eq(p[3], 'n') && lower_eq(p[4], 'o') && lower_eq(p[5], 'n') && lower_eq(p[6], 'e')) {
            o->has_negative_scale = 1;
            o->negative_scale_none = 1;
            o->negative_scale = 0;
            return LORA_OK;
        }
    }
    if (key_at(p, n, "t") && (k = span(p + 2, n - 2, "0123456789.")) > 0) {
        LORA_TRY(parse_float_opt(w, p, n, p + 2, k, &o->strength));
        o->has_strength = 1;
        return LORA_OK;
    }
    if (key_at(p, n, "n") || key_at(p, n, "c")) {
        /* (.+): up to the first \n (Python's . excludes only \n) */
        k = 0;
        while (2 + k < n && p[2 + k] != '\n') k++;
        if (k > 0) {
            char *t = dup_n(ctx, p + 2, k);
            if (!t) return LORA_E_NOMEM;
            char **dst = lower_eq(p[0], 'n') ? &o->negative : &o->clip_prompt;
            lora_free(ctx, *dst);
            *dst = t;
            return LORA_OK;
        }
    }
    if (key_at(p, n, "am") && (k = span(p + 3, n - 3, "0123456789.-,")) > 0) {
        const char *q = p + 3;
        int64_t cnt = 1;
        for (size_t i = 0; i < k; i++) cnt += q[i] == ',';
        double *muls = lora_malloc(ctx, (size_t)cnt * sizeof *muls);
        if (!muls) return LORA_E_NOMEM;
        int64_t c = 0;
        for (size_t i = 0; i <= k;) {
            size_t j = i;
            while (j < k && q[j] != ',') j++;
            lora_status s = parse_float_opt(w, p, n, q + i, j - i, &muls[c]);
            if (s != LORA_OK) {
                lora_free(ctx, muls);
                return s;
            }
            c++;
            i = j + 1;
        }
        lora_free(ctx, o->network_muls);
        o->network_muls = muls;
        o->n_network_muls = c;
        return LORA_OK;
    }
    if (w->line_no > 0)
        lora_log(ctx, LORA_LOG_WARN, "prompt line %lld: option \"--%.*s\" is not known; ignored (as kohya does)",
                 (long long)w->line_no, (int)(n > 80 ? 80 : n), p);
    else
        lora_log(ctx, LORA_LOG_WARN, "prompt line \"%.60s\": option \"--%.*s\" is not known; ignored (as kohya does)",
                 w->line, (int)(n > 80 ? 80 : n), p);
    return LORA_OK;
}

static lora_status parse_line(lora_ctx *ctx, const char *line, size_t len, int64_t line_no,
                              struct gen_prompt_line *out) {
    const uint8_t *u = (const uint8_t *)line;
    struct where w = {ctx, line_no, line};
    size_t a = 0, b = len;
    py_strip(u, &a, &b);
    const char *s = line + a;
    size_t n = b - a;
    /* split(' --'): non-overlapping, left to right */
    size_t part = 0;
    int first = 1;
    lora_status st = LORA_OK;
    for (size_t i = 0; st == LORA_OK && i <= n;) {
        int cut = i + 3 <= n && s[i] == ' ' && s[i + 1] == '-' && s[i + 2] == '-';
        if (!cut && i < n) {
            i++;
            continue;
        }
        if (first) {
            out->prompt = dup_n(ctx, s + part, i - part);
            if (!out->prompt) st = LORA_E_NOMEM;
            first = 0;
        } else {
            st = parse_option(&w, out, s + part, i - part);
        }
        if (!cut) break;
        i += 3;
        part = i;
    }
    return st;
}

lora_status gen_prompt_line_parse(lora_ctx *ctx, const char *line, struct gen_prompt_line *out) {
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_line_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!line) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_line_parse: line is NULL");
    size_t len = strnlen(line, LINE_MAX_BYTES + 1);
    if (len > LINE_MAX_BYTES)
        return lora_fail(ctx, LORA_E_CAPTION_TOO_LONG, "prompt line: more than %zu bytes", LINE_MAX_BYTES);
    size_t bad_at;
    if (!utf8_valid((const uint8_t *)line, len, &bad_at))
        return lora_fail(ctx, LORA_E_CAPTION_ENCODING, "prompt line: not valid UTF-8 (byte offset %zu)", bad_at);
    return parse_line(ctx, line, len, 0, out);
}

double gen_prompt_line_mul(const struct gen_prompt_line *l, int64_t i, double dflt) {
    if (!l || !l->network_muls || l->n_network_muls < 1 || i < 0) return dflt;
    return l->network_muls[i < l->n_network_muls ? i : l->n_network_muls - 1];
}

void gen_prompt_list_free(lora_ctx *ctx, struct gen_prompt_list *l) {
    if (!l) return;
    for (int64_t i = 0; i < l->n; i++) gen_prompt_line_free(ctx, &l->line[i]);
    lora_free(ctx, l->line);
    l->line = NULL;
    l->n = 0;
}

lora_status gen_prompt_list_parse(lora_ctx *ctx, const char *text, size_t len, struct gen_prompt_list *out) {
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_list_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!text && len) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_list_parse: text is NULL");
    const uint8_t *u = (const uint8_t *)text;
    size_t bad_at;
    if (len && !utf8_valid(u, len, &bad_at)) {
        int64_t ln = 1;   /* the valid prefix, counted as splitlines does */
        for (size_t i = 0, k; i < bad_at; i += k) {
            uint32_t ch = cp_at(u, i, &k);
            if (py_linebreak(ch) && !(ch == '\r' && i + 1 < bad_at && u[i + 1] == '\n')) ln++;
        }
        return lora_fail(ctx, LORA_E_CAPTION_ENCODING, "prompt file: line %lld is not valid UTF-8 (byte offset %zu)",
                         (long long)ln, bad_at);
    }
    /* count lines first (an upper bound: every break ends one) */
    int64_t cap = 1;
    for (size_t i = 0; i < len;) {
        size_t k;
        if (py_linebreak(cp_at(u, i, &k))) cap++;
        i += k;
    }
    out->line = lora_calloc(ctx, (size_t)cap, sizeof *out->line);
    if (!out->line) return LORA_E_NOMEM;
    int64_t ln = 0;
    lora_status s = LORA_OK;
    for (size_t i = 0; i < len && s == LORA_OK;) {
        size_t j = i, k = 0, next = len;
        while (j < len) {
            uint32_t c = cp_at(u, j, &k);
            if (py_linebreak(c)) {
                next = j + k;
                if (c == '\r' && next < len && u[next] == '\n') next++;
                break;
            }
            j += k;
        }
        ln++;
        size_t a = i, b = j;
        py_strip(u, &a, &b);
        if (b > a) {
            if (j - i > LINE_MAX_BYTES) {
                s = lora_fail(ctx, LORA_E_CAPTION_TOO_LONG, "prompt file: line %lld is longer than %zu bytes",
                              (long long)ln, LINE_MAX_BYTES);
                break;
            }
            char *copy = dup_n(ctx, text + i, j - i);
            if (!copy) {
                s = LORA_E_NOMEM;
                break;
            }
            struct gen_prompt_line *l = &out->line[out->n++];
            s = parse_line(ctx, copy, j - i, ln, l);
            l->line_no = ln;
            lora_free(ctx, copy);
        }
        i = next;
    }
    if (s != LORA_OK) gen_prompt_list_free(ctx, out);
    return s;
}
