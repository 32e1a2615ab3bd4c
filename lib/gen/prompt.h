/* Prompts for generation as kohya's gen_img_diffusers.py (commit 75d1883) reads them
 * (spec §8.4):
 *
 *   gen_prompt_parse        A1111 emphasis syntax -> (text, weight) pieces, exactly as kohya's
 *                           parse_prompt_attention returns them, plus A1111's BREAK.
 *   gen_prompt_encode_pair  prompt + negative prompt -> weighted CLIP conditioning, as kohya's
 *                           get_weighted_text_embeddings (no_boseos_middle = False) computes it.
 *   gen_prompt_line_parse   one --from_file / --prompt line with its " --" options (--n, --w,
 *                           --h, --s, --d, --l, --nl, --t, --c, --am), as kohya's main loop.
 *   gen_prompt_list_parse   a whole --from_file text: kohya's splitlines + blank-line filter.
 *
 * Emphasis (parse_prompt_attention): "(x)" multiplies the weight of x by 1.1, "[x]" by 1/1.1,
 * "(x:w)" by w (w = [+-]?[.0-9]+); nesting multiplies, in kohya's order (every closing bracket
 * multiplies all pieces from its opening one to the end, as doubles). "\(", "\)", "\[", "\]",
 * "\\" are literal characters; a lone "\" is dropped. Unbalanced brackets are lenient as in
 * kohya: an unclosed "(" / "[" applies to the end of the prompt, an unmatched ")" / "]" / ":"
 * is literal text. Runs of pieces with equal weights are merged; an empty prompt is one
 * piece ("", 1.0). A weight kohya's float() cannot read ("(x:1.2.3)", "(x:.)") makes kohya stop
 * with ValueError: here it is LORA_E_CONFIG_RANGE naming the byte offset.
 *
 * BREAK: kohya at this commit has no BREAK (the word is ordinary text there). Implemented as
 * A1111 does it (modules/prompt_parser.py re_break "\s*\bBREAK\b\s*", sd_hijack_clip
 * next_chunk): in a text run, the word BREAK with the white space around it closes the current
 * 75-token chunk; the rest of that chunk is filled with EOS then padding (v1: EOS throughout;
 * v2: EOS then "!" id 0, which is what A1111's id_pad rewrite leaves), so the next text starts
 * a new chunk. BREAK on an empty chunk (at the start, or right after another BREAK) gives a
 * whole chunk of padding, as in A1111; BREAK right after exactly 75*k tokens adds nothing.
 * Differences from A1111, on purpose: BREAK inside brackets still breaks (A1111 multiplies its
 * -1 marker and then tokenizes the word "break" with a negative weight), and the word
 * boundary treats every non-ASCII character as a word character (A1111: Unicode \w) and only
 * ASCII white space as white space. A BREAK piece has is_break = 1, weight -1, text "BREAK".
 * Long prompts with BREAK count the padding as tokens (max_embeddings_multiples).
 *
 * Conditioning (get_weighted_text_embeddings, no_boseos_middle = False as the pipeline calls
 * it): each piece is tokenized alone (BOS/EOS dropped) and its tokens get its weight; the
 * token list is cut to 75 * max_embeddings_multiples (a warning is logged, kohya prints one);
 * the number of chunks m is the least that holds the longer of prompt and negative (at least
 * 1, at most max_embeddings_multiples); ids = BOS + tokens + EOS + padding to 75m + 2. With
 * m > 1, chunk k is ids[75k .. 75k + 76] with [0] = BOS and, v1, [76] = EOS; v2: [76] = EOS
 * unless it is EOS or padding, and [1] = EOS when it is padding. Every chunk is encoded alone
 * (clip_skip as in training: hidden_states[-n] + final LayerNorm) and all 77 positions of every
 * chunk are kept: the context is 77m tokens. Weights: 1.0 at BOS/EOS/padding positions, the
 * piece weight (rounded to float32) at token positions. Then, per prompt, with means over all
 * 77m x D values: mean0 = mean(E); E *= w; E *= mean0 / mean(E). The negative prompt gets the
 * same treatment separately. Means are accumulated in double (kohya: float32).
 *
 * Thread rules: everything here uses the context (or the model's context) of its arguments and
 * must be called by the thread that owns it; lists are plain host memory of that context. */
#ifndef LORA_GEN_PROMPT_H
#define LORA_GEN_PROMPT_H

#include "internal.h"

struct lora_model;
struct nn_lora;

#define GEN_PROMPT_CHUNK 75               /* content tokens per 77-position chunk */
#define GEN_PROMPT_MAX_MULTIPLES 64       /* max_embeddings_multiples accepted: 1..64 */
#define GEN_PROMPT_MAX_BYTES (64 * 1024)  /* longest prompt text accepted (bytes) */
#define GEN_PROMPT_MAX_WEIGHT 1000.0      /* |weight| above this is refused (kohya: anything) */

struct gen_prompt_piece {
    char *text;          /* NUL-terminated UTF-8, owned by the list */
    size_t len;          /* bytes of text */
    double weight;       /* kohya's Python float; -1 for a BREAK */
    int is_break;        /* 1: an A1111 BREAK (text "BREAK") */
};

struct gen_prompt_chunks {
    lora_ctx *ctx;
    struct gen_prompt_piece *piece;
    int64_t n, cap;
};

/* Parses `text` (NUL-terminated UTF-8, at most GEN_PROMPT_MAX_BYTES) into *out (overwritten;
 * free with gen_prompt_chunks_free, also after a failure). Errors: LORA_E_INVALID_ARG (NULL),
 * LORA_E_CAPTION_ENCODING (invalid UTF-8: the byte offset), LORA_E_CAPTION_TOO_LONG,
 * LORA_E_CONFIG_RANGE (a weight kohya cannot read, or a resulting weight that is not finite or
 * above GEN_PROMPT_MAX_WEIGHT in magnitude: the piece and offset), LORA_E_NOMEM. */
lora_status gen_prompt_parse(lora_ctx *ctx, const char *text, struct gen_prompt_chunks *out);
void gen_prompt_chunks_free(struct gen_prompt_chunks *c);

/* Python's float() of n bytes matching [+-]?[.0-9]+ (valid: a digit and at most one dot),
 * locale-independent and correctly rounded. 1 and *out on success, else 0. */
int gen_parse_pyfloat(const char *s, size_t n, double *out);

/* Tokens of a prompt as kohya's get_prompts_with_weights + BREAK: ids (no BOS/EOS) and their
 * weights (float32), cut to max_tokens (*truncated = 1 then). Arrays from lora_malloc(ctx of
 * the model); free with lora_free. The tokenizer is the model's (created on first use). */
lora_status gen_prompt_tokens(struct lora_model *model, const char *prompt, int64_t max_tokens,
                              int32_t **ids, float **weights, int64_t *n, int *truncated);

/* Options of gen_prompt_encode_ex. Zero-initialise; every field has a working zero. */
struct gen_prompt_encode_opts {
    int32_t clip_skip;                  /* 0/1: last layer; n: hidden_states[-n] + final LN */
    int32_t max_embeddings_multiples;   /* 1..GEN_PROMPT_MAX_MULTIPLES (0 means 1) */
    int32_t min_chunks;                 /* at least this many chunks (kohya batches prompts and
                                         * sizes all by the longest; pass the batch's largest
                                         * gen_prompt_count_chunks); 0 = no minimum */
    const struct nn_lora *const *te_lora;   /* NULL or [layers * CLIP_N_SLOTS] adapters for
                                             * clip_forward (backend buffers) */
    int64_t te_lora_max_rank;           /* largest rank among te_lora */
};

/* Chunks (m) kohya would use for this prompt alone: min(max_multiples, tokens needed), >= 1. */
lora_status gen_prompt_count_chunks(struct lora_model *model, const char *prompt,
                                    int32_t max_embeddings_multiples, int32_t *chunks);

/* prompt and negative -> cond and uncond [1, n_tokens, D] (n_tokens = 77m), each from
 * lora_malloc(model's ctx), freed by the caller with lora_free. negative NULL: no uncond
 * (*uncond = NULL; kohya without CFG), m from the prompt alone; kohya's default negative is ""
 * (pass ""). uncond may be NULL only when negative is NULL. On failure nothing is returned
 * (*cond = *uncond = NULL). Errors: as gen_prompt_parse; LORA_E_CONFIG_RANGE (clip_skip above
 * the text encoder's layers, max_embeddings_multiples out of 1..64), LORA_E_UNSUPPORTED (head
 * count unknown, LDM files), LORA_E_NONFINITE_INPUT (the re-normalisation divides by a zero
 * or the result is not finite: weights that cancel the mean), LORA_E_NOMEM, backend errors. */
lora_status gen_prompt_encode_pair(struct lora_model *model, const char *prompt, const char *negative,
                                   int32_t clip_skip, int32_t max_embeddings_multiples,
                                   float **cond, float **uncond, int64_t *n_tokens);
lora_status gen_prompt_encode_ex(struct lora_model *model, const char *prompt, const char *negative,
                                 const struct gen_prompt_encode_opts *opts, float **cond, float **uncond,
                                 int64_t *n_tokens);

/* Token ids and per-position weights kohya's pad_tokens_and_weights gives for one prompt of n
 * tokens in m chunks: ids_out [75m + 2] (BOS + tokens + EOS + pad), w_out [77m]. Exposed for
 * the tests. */
void gen_prompt_pad(const int32_t *ids, const float *w, int64_t n, int64_t m, int32_t pad_id,
                    int32_t *ids_out, float *w_out);
/* The m chunks of 77 ids that are encoded (kohya's get_unweighted_text_embeddings), from the
 * padded ids [75m + 2]: chunks [m * 77]. */
void gen_prompt_chunk_ids(const int32_t *ids, int64_t m, int32_t pad_id, int32_t *chunks);

/* ---- --from_file lines (prompt_line.c) ----------------------------------------------------
 * kohya's loop: line.strip() (Python's Unicode white space), split on the literal " --", the
 * first part is the prompt (not stripped again), each further part is tried against, in this
 * order and case-insensitively, "w (\d+)", "h (\d+)", "s (\d+)" (steps, clamped to 1..1000),
 * "d ([\d,]+)" (seeds), "l ([\d\.]+)" (scale), "nl ([\d\.]+|none)" (negative scale),
 * "t ([\d\.]+)" (img2img strength), "n (.+)" (negative prompt), "c (.+)" (CLIP-guidance
 * prompt), "am ([\d\.\-,]+)" (network multipliers); the first that matches at the start wins
 * and the rest of the part after the match is ignored (kohya: re.match). A part no pattern
 * matches is ignored (kohya: silently; here with a warning). A later option overrides an
 * earlier one. Where kohya's int()/float() raises ValueError (it prints and ignores the part)
 * this is an error (LORA_E_CONFIG_RANGE naming the option and the text), as is a number that
 * does not fit (w/h above INT32_MAX, a seed above UINT64_MAX, a non-finite float). \d is ASCII
 * here (Python: any Unicode decimal digit). */
struct gen_prompt_line {
    char *prompt;                        /* the prompt text (owned) */
    char *negative;                      /* --n, or NULL (kohya's default then: "") */
    char *clip_prompt;                   /* --c, or NULL */
    int has_width, has_height, has_steps, has_scale, has_negative_scale, has_strength;
    int32_t width, height, steps;
    double scale, negative_scale, strength;
    int negative_scale_none;             /* --nl none: negative scale switched off */
    uint64_t *seeds;                     /* --d, NULL if absent */
    int64_t n_seeds;
    double *network_muls;                /* --am, NULL if absent (as given, not yet extended) */
    int64_t n_network_muls;
    int64_t line_no;                     /* 1-based line of the file (gen_prompt_list_parse) or 0 */
};

/* Parses one line (NUL-terminated UTF-8) into *out (overwritten; free with
 * gen_prompt_line_free, also after a failure). Errors: LORA_E_INVALID_ARG, LORA_E_CAPTION_ENCODING,
 * LORA_E_CAPTION_TOO_LONG (more than GEN_PROMPT_MAX_BYTES * 4), LORA_E_CONFIG_RANGE, LORA_E_NOMEM;
 * messages quote the line (shortened) and the option. */
lora_status gen_prompt_line_parse(lora_ctx *ctx, const char *line, struct gen_prompt_line *out);
void gen_prompt_line_free(lora_ctx *ctx, struct gen_prompt_line *l);

/* The multiplier of network i of n_networks: kohya extends a short --am list by repeating its
 * last value. Returns `dflt` when the line has no --am. */
double gen_prompt_line_mul(const struct gen_prompt_line *l, int64_t i, double dflt);

struct gen_prompt_list {
    struct gen_prompt_line *line;
    int64_t n;
};

/* A --from_file text of len bytes: split as Python's str.splitlines (\n, \r\n, \r, \v, \f,
 * \x1c-\x1e, U+0085, U+2028, U+2029), lines that are only white space dropped, every other
 * line parsed by gen_prompt_line_parse with its 1-based line number (in the error messages
 * too). *out is overwritten; free with gen_prompt_list_free. */
lora_status gen_prompt_list_parse(lora_ctx *ctx, const char *text, size_t len, struct gen_prompt_list *out);
void gen_prompt_list_free(lora_ctx *ctx, struct gen_prompt_list *l);

#endif
