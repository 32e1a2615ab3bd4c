/* Prompt emphasis parsing and weighted conditioning; see prompt.h. */
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/utf8.h"
#include "gen/prompt.h"
#include "model/clip.h"
#include "model/sd_model.h"
#include "model/tokenizer.h"
#include "network/network.h"

/* ---- parse_prompt_attention ------------------------------------------------------------- */

static lora_status grow(lora_ctx *ctx, void **p, int64_t *cap, size_t elem, int64_t need) {
    if (need <= *cap) return LORA_OK;
    int64_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    size_t bytes;
    if (!ck_mul_size((size_t)nc, elem, &bytes)) return lora_fail(ctx, LORA_E_NOMEM, "prompt: list too long");
    void *q = lora_malloc(ctx, bytes);
    if (!q) return LORA_E_NOMEM;
    if (*p) memcpy(q, *p, (size_t)*cap * elem);
    lora_free(ctx, *p);
    *p = q;
    *cap = nc;
    return LORA_OK;
}

void gen_prompt_chunks_free(struct gen_prompt_chunks *c) {
    if (!c) return;
    for (int64_t i = 0; i < c->n; i++) lora_free(c->ctx, c->piece[i].text);
    lora_free(c->ctx, c->piece);
    c->piece = NULL;
    c->n = c->cap = 0;
}

static lora_status push_piece(struct gen_prompt_chunks *c, const char *s, size_t n, double w, int is_break) {
    LORA_TRY(grow(c->ctx, (void **)&c->piece, &c->cap, sizeof *c->piece, c->n + 1));
    char *t = lora_malloc(c->ctx, n + 1);
    if (!t) return LORA_E_NOMEM;
    if (n) memcpy(t, s, n);
    t[n] = '\0';
    c->piece[c->n++] = (struct gen_prompt_piece){t, n, w, is_break};
    return LORA_OK;
}

/* Python float() of a string matching [+-]?[.0-9]+: valid when it has a digit and at most
 * one dot. Locale-independent (strtod_l in "C"); correctly rounded like CPython's. */
int gen_parse_pyfloat(const char *s, size_t n, double *out) {
    size_t i = 0, digits = 0, dots = 0;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    for (size_t k = i; k < n; k++) {
        if (s[k] >= '0' && s[k] <= '9') digits++;
        else if (s[k] == '.') dots++;
        else return 0;
    }
    if (!digits || dots > 1 || n > 4096) return 0;
    char buf[4100];
    memcpy(buf, s, n);
    buf[n] = '\0';
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c == (locale_t)0) return 0;
    char *end = NULL;
    double v = strtod_l(buf, &end, c);
    freelocale(c);
    if (end != buf + n) return 0;
    *out = v;
    return 1;
}

static int is_ascii_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f); }
static int is_word_byte(unsigned char c) {
    return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* A text run of kohya's regex: split on A1111's \s*\bBREAK\b\s* (boundaries inside the run,
 * as re.split sees only the run). */
static lora_status push_text(struct gen_prompt_chunks *c, const char *s, size_t n) {
    size_t part = 0;          /* start of the current part */
    for (size_t i = 0; i + 5 <= n; i++) {
        if (memcmp(s + i, "BREAK", 5) != 0) continue;
        if (i > 0 && is_word_byte((unsigned char)s[i - 1])) continue;
        if (i + 5 < n && is_word_byte((unsigned char)s[i + 5])) continue;
        size_t a = i, b = i + 5;
        while (a > part && is_ascii_space((unsigned char)s[a - 1])) a--;
        while (b < n && is_ascii_space((unsigned char)s[b])) b++;
        LORA_TRY(push_piece(c, s + part, a - part, 1.0, 0));
        LORA_TRY(push_piece(c, "BREAK", 5, -1.0, 1));
        part = b;
        i = b - 1;
    }
    return push_piece(c, s + part, n - part, 1.0, 0);
}

static void multiply_range(struct gen_prompt_chunks *c, int64_t start, double m) {
    for (int64_t p = start; p < c->n; p++)
        if (!c->piece[p].is_break) c->piece[p].weight *= m;
}

static lora_status parse(struct gen_prompt_chunks *c, const char *text, size_t len, int64_t *round, int64_t *square) {
    lora_ctx *ctx = c->ctx;
    int64_t nr = 0, ns = 0;     /* bracket stacks (positions in the piece list) */
    const double round_mul = 1.1, square_mul = 1 / 1.1;
    size_t i = 0;
    while (i < len) {
        char ch = text[i];
        if (ch == '\\') {
            /* \( \) \[ \] \\ -> the character; a lone \ -> "" (kohya appends text[1:]) */
            size_t k = (i + 1 < len && strchr("()[]\\", text[i + 1])) ? 2 : 1;
            LORA_TRY(push_piece(c, text + i + 1, k - 1, 1.0, 0));
            i += k;
        } else if (ch == '(') {
            round[nr++] = c->n;
            i++;
        } else if (ch == '[') {
            square[ns++] = c->n;
            i++;
        } else if (ch == ':') {
            /* :([+-]?[.\d]+)\) */
            size_t j = i + 1, num = j;
            if (j < len && (text[j] == '+' || text[j] == '-')) j++;
            size_t run = j;
            while (j < len && (text[j] == '.' || (text[j] >= '0' && text[j] <= '9'))) j++;
            if (j > run && j < len && text[j] == ')') {
                if (nr > 0) {
                    double w;
                    if (!gen_parse_pyfloat(text + num, j - num, &w))
                        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "prompt: the weight \"%.*s\" at byte %zu is not a "
                                         "number (kohya stops with ValueError) or longer than 4096 characters",
                                         (int)(j - num > 40 ? 40 : j - num), text + num, num);
                    multiply_range(c, round[--nr], w);
                } else {
                    LORA_TRY(push_text(c, text + i, j + 1 - i));
                }
                i = j + 1;
            } else {
                LORA_TRY(push_text(c, ":", 1));
                i++;
            }
        } else if (ch == ')') {
            if (nr > 0) multiply_range(c, round[--nr], round_mul);
            else LORA_TRY(push_text(c, ")", 1));
            i++;
        } else if (ch == ']') {
            if (ns > 0) multiply_range(c, square[--ns], square_mul);
            else LORA_TRY(push_text(c, "]", 1));
            i++;
        } else {
            size_t j = i;
            while (j < len && !strchr("\\()[]:", text[j])) j++;
            LORA_TRY(push_text(c, text + i, j - i));
            i = j;
        }
    }
    for (int64_t k = 0; k < nr; k++) multiply_range(c, round[k], round_mul);
    for (int64_t k = 0; k < ns; k++) multiply_range(c, square[k], square_mul);
    if (c->n == 0) LORA_TRY(push_piece(c, "", 0, 1.0, 0));
    /* merge runs of identical weights (exact comparison, as kohya); never across a BREAK */
    int64_t w = 0;
    for (int64_t r = 1; r < c->n; r++) {
        struct gen_prompt_piece *a = &c->piece[w], *b = &c->piece[r];
        if (!a->is_break && !b->is_break && a->weight == b->weight) {
            char *t = lora_malloc(ctx, a->len + b->len + 1);
            if (!t) return LORA_E_NOMEM;
            memcpy(t, a->text, a->len);
            memcpy(t + a->len, b->text, b->len + 1);
            lora_free(ctx, a->text);
            lora_free(ctx, b->text);
            a->text = t;
            a->len += b->len;
            b->text = NULL;
        } else {
            c->piece[++w] = *b;
            if (w != r) c->piece[r].text = NULL;
        }
    }
    c->n = w + 1;
    for (int64_t k = 0; k < c->n; k++) {
        double v = c->piece[k].weight;
        if (!c->piece[k].is_break && !(fabs(v) <= GEN_PROMPT_MAX_WEIGHT))
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "prompt: the weight of \"%.40s\" is %g; more than %g in magnitude "
                             "is refused", c->piece[k].text, v, GEN_PROMPT_MAX_WEIGHT);
    }
    return LORA_OK;
}

lora_status gen_prompt_parse(lora_ctx *ctx, const char *text, struct gen_prompt_chunks *out) {
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_parse: out is NULL");
    memset(out, 0, sizeof *out);
    out->ctx = ctx;
    if (!text) return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_parse: text is NULL");
    size_t len = strnlen(text, (size_t)GEN_PROMPT_MAX_BYTES + 1);
    if (len > GEN_PROMPT_MAX_BYTES)
        return lora_fail(ctx, LORA_E_CAPTION_TOO_LONG, "prompt: more than %d bytes", GEN_PROMPT_MAX_BYTES);
    size_t bad;
    if (!utf8_valid((const uint8_t *)text, len, &bad))
        return lora_fail(ctx, LORA_E_CAPTION_ENCODING, "prompt: not valid UTF-8 (byte offset %zu)", bad);
    /* at most one stack entry per byte */
    int64_t *stacks = lora_malloc(ctx, 2 * (len + 1) * sizeof *stacks);
    if (!stacks) return LORA_E_NOMEM;
    lora_status s = parse(out, text, len, stacks, stacks + len + 1);
    lora_free(ctx, stacks);
    return s;
}

/* ---- tokens and weights (get_prompts_with_weights + BREAK) ----------------------------- */

struct tokbuf {
    int32_t *ids;
    float *w;
    int64_t n, cap;
};

static lora_status tb_push(lora_ctx *ctx, struct tokbuf *b, int32_t id, float w) {
    if (b->n == b->cap) {
        int64_t cap = b->cap, cap2 = b->cap;
        LORA_TRY(grow(ctx, (void **)&b->ids, &cap, sizeof *b->ids, b->n + 1));
        LORA_TRY(grow(ctx, (void **)&b->w, &cap2, sizeof *b->w, b->n + 1));
        b->cap = cap;
    }
    b->ids[b->n] = id;
    b->w[b->n++] = w;
    return LORA_OK;
}

lora_status gen_prompt_tokens(struct lora_model *model, const char *prompt, int64_t max_tokens,
                              int32_t **ids, float **weights, int64_t *n, int *truncated) {
    lora_ctx *ctx = model->ctx;
    *ids = NULL;
    *weights = NULL;
    *n = 0;
    *truncated = 0;
    LORA_TRY(model_tokenizer_ready(model));
    lora_tokenizer *tok = model->tokenizer;
    struct gen_prompt_chunks c;
    lora_status s = gen_prompt_parse(ctx, prompt, &c);
    struct tokbuf b = {0};
    int just_broke = 0;
    /* kohya stops adding pieces once past the limit, then cuts; a limit above the longest
     * possible list keeps the loop bounded */
    for (int64_t k = 0; s == LORA_OK && k < c.n && b.n <= max_tokens; k++) {
        const struct gen_prompt_piece *p = &c.piece[k];
        if (p->is_break) {
            int64_t fill = b.n % GEN_PROMPT_CHUNK;
            int64_t add = fill > 0 ? GEN_PROMPT_CHUNK - fill : (b.n == 0 || just_broke) ? GEN_PROMPT_CHUNK : 0;
            for (int64_t q = 0; s == LORA_OK && q < add; q++) s = tb_push(ctx, &b, q == 0 ? TOK_EOS : tok->pad_id, 1.0f);
            just_broke = 1;
            continue;
        }
        s = tok_tokenize(tok, p->text, p->len);
        for (size_t q = 0; s == LORA_OK && q < tok->n_ids; q++) s = tb_push(ctx, &b, tok->ids[q], (float)p->weight);
        if (tok->n_ids) just_broke = 0;
    }
    gen_prompt_chunks_free(&c);
    if (s != LORA_OK) {
        lora_free(ctx, b.ids);
        lora_free(ctx, b.w);
        return s;
    }
    if (b.n > max_tokens) {
        *truncated = 1;
        b.n = max_tokens;
    }
    *ids = b.ids;
    *weights = b.w;
    *n = b.n;
    return LORA_OK;
}

/* ---- pad_tokens_and_weights / get_unweighted_text_embeddings ---------------------------- */

void gen_prompt_pad(const int32_t *ids, const float *w, int64_t n, int64_t m, int32_t pad_id,
                    int32_t *ids_out, float *w_out) {
    int64_t L = GEN_PROMPT_CHUNK * m + 2, W = TOK_CHUNK * m;
    ids_out[0] = TOK_BOS;
    for (int64_t i = 0; i < n; i++) ids_out[1 + i] = ids[i];
    ids_out[1 + n] = TOK_EOS;
    for (int64_t i = n + 2; i < L; i++) ids_out[i] = pad_id;
    int64_t o = 0;
    if (n > 0) {
        for (int64_t j = 0; j < m; j++) {
            w_out[o++] = 1.0f;
            int64_t end = (j + 1) * GEN_PROMPT_CHUNK < n ? (j + 1) * GEN_PROMPT_CHUNK : n;
            for (int64_t i = j * GEN_PROMPT_CHUNK; i < end; i++) w_out[o++] = w[i];
            w_out[o++] = 1.0f;
        }
    }
    for (; o < W; o++) w_out[o] = 1.0f;
}

void gen_prompt_chunk_ids(const int32_t *ids, int64_t m, int32_t pad_id, int32_t *chunks) {
    if (m == 1) {   /* one sequence of 77, encoded as it is */
        memcpy(chunks, ids, TOK_CHUNK * sizeof *ids);
        return;
    }
    int64_t L = GEN_PROMPT_CHUNK * m + 2;
    for (int64_t k = 0; k < m; k++) {
        int32_t *c = chunks + k * TOK_CHUNK;
        memcpy(c, ids + k * GEN_PROMPT_CHUNK, TOK_CHUNK * sizeof *ids);
        c[0] = ids[0];
        if (pad_id == TOK_EOS) {
            c[TOK_CHUNK - 1] = ids[L - 1];
        } else {
            if (c[TOK_CHUNK - 1] != TOK_EOS && c[TOK_CHUNK - 1] != pad_id) c[TOK_CHUNK - 1] = TOK_EOS;
            if (c[1] == pad_id) c[1] = TOK_EOS;
        }
    }
}

static int64_t chunks_for(int64_t n_tokens) { return n_tokens <= 0 ? 1 : (n_tokens - 1) / GEN_PROMPT_CHUNK + 1; }

static lora_status check_multiples(lora_ctx *ctx, int32_t m) {
    if (m < 1 || m > GEN_PROMPT_MAX_MULTIPLES)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "max_embeddings_multiples: %d is outside 1..%d", (int)m,
                         GEN_PROMPT_MAX_MULTIPLES);
    return LORA_OK;
}

lora_status gen_prompt_count_chunks(struct lora_model *model, const char *prompt, int32_t max_embeddings_multiples,
                                    int32_t *chunks) {
    if (!model || !chunks) return LORA_E_INVALID_ARG;
    int32_t M = max_embeddings_multiples ? max_embeddings_multiples : 1;
    LORA_TRY(check_multiples(model->ctx, M));
    int32_t *ids;
    float *w;
    int64_t n;
    int trunc;
    LORA_TRY(gen_prompt_tokens(model, prompt, (int64_t)GEN_PROMPT_CHUNK * M, &ids, &w, &n, &trunc));
    lora_free(model->ctx, ids);
    lora_free(model->ctx, w);
    int64_t m = chunks_for(n);
    *chunks = (int32_t)(m < M ? m : M);
    return LORA_OK;
}

/* E *= w (per position), then E *= mean(E before) / mean(E after), over all values. */
static lora_status reweight(lora_ctx *ctx, const char *what, float *E, const float *w, int64_t T, int64_t D) {
    double s0 = 0, s1 = 0;
    int64_t N = T * D;
    for (int64_t i = 0; i < N; i++) s0 += E[i];
    for (int64_t t = 0; t < T; t++) {
        float *e = E + t * D;
        for (int64_t d = 0; d < D; d++) {
            e[d] = e[d] * w[t];
            s1 += e[d];
        }
    }
    float m0 = (float)(s0 / (double)N), m1 = (float)(s1 / (double)N);
    float r = m0 / m1;
    if (m1 == 0.0f || !isfinite(r))
        return lora_fail(ctx, LORA_E_NONFINITE_INPUT, "%s: the prompt weights make the mean of the conditioning %g "
                         "(before: %g); kohya's re-normalisation would divide by it", what, (double)m1, (double)m0);
    for (int64_t i = 0; i < N; i++) E[i] *= r;
    for (int64_t i = 0; i < N; i++)
        if (!isfinite(E[i]))
            return lora_fail(ctx, LORA_E_NONFINITE_INPUT, "%s: the weighted conditioning is not finite at %lld", what,
                             (long long)i);
    return LORA_OK;
}

lora_status gen_prompt_encode_ex(struct lora_model *model, const char *prompt, const char *negative,
                                 const struct gen_prompt_encode_opts *opts, float **cond, float **uncond,
                                 int64_t *n_tokens) {
    if (cond) *cond = NULL;
    if (uncond) *uncond = NULL;
    if (n_tokens) *n_tokens = 0;
    if (!model) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    if (!prompt || !cond || !n_tokens || (negative && !uncond))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "gen_prompt_encode: prompt, cond and n_tokens must not be NULL, "
                         "nor uncond when a negative prompt is given");
    struct gen_prompt_encode_opts o = {0};
    if (opts) o = *opts;
    int32_t M = o.max_embeddings_multiples ? o.max_embeddings_multiples : 1;
    LORA_TRY(check_multiples(ctx, M));
    const struct sd_config *cfg = &model->sd.cfg;
    if (o.clip_skip < 0 || o.clip_skip > cfg->te_layers)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "clip_skip: %d is outside 0..%d (the text encoder's layers)",
                         (int)o.clip_skip, cfg->te_layers);
    if (o.min_chunks < 0 || o.min_chunks > M)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "gen_prompt_encode: min_chunks %d is outside 0..%d", (int)o.min_chunks,
                         (int)M);
    LORA_TRY(model_text_encoder_ready(model, "gen_prompt_encode"));
    int32_t pad_id = model->tokenizer->pad_id;
    const char *text[2] = {prompt, negative};
    int n_text = negative ? 2 : 1;
    int32_t *ids[2] = {NULL, NULL};
    float *w[2] = {NULL, NULL};
    int64_t n[2] = {0, 0};
    int trunc[2] = {0, 0};
    int64_t max_tokens = (int64_t)GEN_PROMPT_CHUNK * M;
    lora_status s = LORA_OK;
    for (int k = 0; k < n_text && s == LORA_OK; k++) {
        s = gen_prompt_tokens(model, text[k], max_tokens, &ids[k], &w[k], &n[k], &trunc[k]);
        if (s == LORA_OK && trunc[k])
            lora_log(ctx, LORA_LOG_WARN, "%s was cut to %lld tokens: shorten it or raise max_embeddings_multiples "
                     "(now %d)", k ? "the negative prompt" : "the prompt", (long long)max_tokens, (int)M);
    }
    int64_t m = 1, D = cfg->te_hidden;
    if (s == LORA_OK) {
        m = chunks_for(n[0] > n[1] ? n[0] : n[1]);
        if (m > M) m = M;
        if (m < o.min_chunks) m = o.min_chunks;
    }
    int64_t T = TOK_CHUNK * m, L = GEN_PROMPT_CHUNK * m + 2;
    int32_t *padded = NULL, *chunk_ids = NULL;
    float *wpos = NULL, *enc = NULL;
    if (s == LORA_OK) {
        padded = lora_malloc(ctx, (size_t)L * sizeof *padded);
        chunk_ids = lora_malloc(ctx, (size_t)(n_text * T) * sizeof *chunk_ids);
        wpos = lora_malloc(ctx, (size_t)(n_text * T) * sizeof *wpos);
        enc = lora_malloc(ctx, (size_t)(n_text * T * D) * sizeof *enc);
        if (!padded || !chunk_ids || !wpos || !enc) s = LORA_E_NOMEM;
    }
    for (int k = 0; k < n_text && s == LORA_OK; k++) {
        gen_prompt_pad(ids[k], w[k], n[k], m, pad_id, padded, wpos + k * T);
        gen_prompt_chunk_ids(padded, m, pad_id, chunk_ids + k * T);
    }
    /* a test-size text encoder: ids folded as the trainer folds them, so a LoRA trained on such
     * a model sees the same conditioning here */
    if (s == LORA_OK && clip_fold_ids(model->te_run, chunk_ids, n_text * T))
        lora_log(ctx, LORA_LOG_WARN, "prompt: the text encoder has %lld tokens, fewer than CLIP's 49408; "
                 "token ids are taken modulo %lld (a test-size model)", (long long)model->te_run->vocab,
                 (long long)model->te_run->vocab);
    /* every chunk of both prompts is its own sequence: one batch of n_text * m */
    struct clip_plan plan;
    memset(&plan, 0, sizeof plan);
    int planned = 0;
    /* networks attached at run time act as low-rank branches (lib/network/attach.c) */
    const struct nn_lora **att = NULL;
    if (s == LORA_OK && !o.te_lora && attach_has_lowrank(model, 1)) {
        att = lora_malloc(ctx, (size_t)(model->te_run->layers * CLIP_N_SLOTS) * sizeof *att);
        s = att ? attach_te_adapters(model, model->te_run->layers, att, &o.te_lora_max_rank) : LORA_E_NOMEM;
        o.te_lora = att;
    }
    if (s == LORA_OK) s = clip_plan_init(&plan, model->te_run, n_text * m, TOK_CHUNK, o.te_lora ? o.te_lora_max_rank : 0, 0);
    planned = s == LORA_OK;
    if (s == LORA_OK) s = clip_forward(&plan, chunk_ids, o.te_lora, o.clip_skip);
    if (s == LORA_OK) s = clip_download_output(&plan, enc, NULL);
    if (planned) clip_plan_free(&plan);
    lora_free(ctx, (void *)att);
    for (int k = 0; k < n_text && s == LORA_OK; k++)
        s = reweight(ctx, k ? "negative prompt" : "prompt", enc + k * T * D, wpos + k * T, T, D);
    float *out[2] = {NULL, NULL};
    for (int k = 0; k < n_text && s == LORA_OK; k++) {
        out[k] = lora_malloc(ctx, (size_t)(T * D) * sizeof *out[k]);
        if (!out[k]) s = LORA_E_NOMEM;
        else memcpy(out[k], enc + k * T * D, (size_t)(T * D) * sizeof *out[k]);
    }
    if (s == LORA_OK) {
        *cond = out[0];
        if (uncond) *uncond = out[1];
        *n_tokens = T;
    } else {
        lora_free(ctx, out[0]);
        lora_free(ctx, out[1]);
    }
    for (int k = 0; k < 2; k++) {
        lora_free(ctx, ids[k]);
        lora_free(ctx, w[k]);
    }
    lora_free(ctx, padded);
    lora_free(ctx, chunk_ids);
    lora_free(ctx, wpos);
    lora_free(ctx, enc);
    return s;
}

lora_status gen_prompt_encode_pair(struct lora_model *model, const char *prompt, const char *negative,
                                   int32_t clip_skip, int32_t max_embeddings_multiples,
                                   float **cond, float **uncond, int64_t *n_tokens) {
    struct gen_prompt_encode_opts o = {0};
    o.clip_skip = clip_skip;
    o.max_embeddings_multiples = max_embeddings_multiples;
    return gen_prompt_encode_ex(model, prompt, negative, &o, cond, uncond, n_tokens);
}
