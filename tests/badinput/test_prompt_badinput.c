/* Bad prompt text and --from_file lines: invalid UTF-8, weights kohya cannot read, absurd and
 * overflowing weights, deep nesting, over-long text, numbers that do not fit, bad encode
 * arguments, and random input (no crash, a known status, no leak). */
#include <string.h>
#include <time.h>

#include "internal.h"
#include "gen/prompt.h"
#include "model/sd_model.h"
#include "../test.h"

static lora_ctx *ctx;

static void parse_fails(const char *text, lora_status want, const char *needle) {
    struct gen_prompt_chunks c;
    lora_status s = gen_prompt_parse(ctx, text, &c);
    CHECK_MSG(s == want, "\"%.40s\": %s, want %s", text, lora_status_name(s), lora_status_name(want));
    if (needle) CHECK_MSG(strstr(lora_errmsg(ctx), needle) != NULL, "\"%.40s\": message \"%s\"", text, lora_errmsg(ctx));
    gen_prompt_chunks_free(&c);
}

static void line_fails(const char *text, lora_status want, const char *needle) {
    struct gen_prompt_line l;
    lora_status s = gen_prompt_line_parse(ctx, text, &l);
    CHECK_MSG(s == want, "\"%.40s\": %s, want %s", text, lora_status_name(s), lora_status_name(want));
    if (needle) CHECK_MSG(strstr(lora_errmsg(ctx), needle) != NULL, "\"%.40s\": message \"%s\"", text, lora_errmsg(ctx));
    gen_prompt_line_free(ctx, &l);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);

    /* NULLs */
    struct gen_prompt_chunks c;
    CHECK_STATUS(gen_prompt_parse(ctx, NULL, &c), LORA_E_INVALID_ARG);
    CHECK_STATUS(gen_prompt_parse(ctx, "x", NULL), LORA_E_INVALID_ARG);
    struct gen_prompt_line l;
    CHECK_STATUS(gen_prompt_line_parse(ctx, NULL, &l), LORA_E_INVALID_ARG);
    struct gen_prompt_list list;
    CHECK_STATUS(gen_prompt_list_parse(ctx, NULL, 3, &list), LORA_E_INVALID_ARG);
    CHECK_STATUS(gen_prompt_list_parse(ctx, "", 0, &list), LORA_OK);
    CHECK(list.n == 0);
    gen_prompt_list_free(ctx, &list);

    /* invalid UTF-8: the byte offset */
    parse_fails("caf\xc3", LORA_E_CAPTION_ENCODING, "offset 3");
    parse_fails("(a:1.2) \xff", LORA_E_CAPTION_ENCODING, "offset 8");
    parse_fails("\xed\xa0\x80 surrogate", LORA_E_CAPTION_ENCODING, "offset 0");
    parse_fails("\xc0\xaf overlong", LORA_E_CAPTION_ENCODING, NULL);
    line_fails("x --n bad\xfe", LORA_E_CAPTION_ENCODING, "offset 9");
    const char *file = "ok\r\nfine\n\x80oops\n";
    CHECK_STATUS(gen_prompt_list_parse(ctx, file, strlen(file), &list), LORA_E_CAPTION_ENCODING);
    CHECK_MSG(strstr(lora_errmsg(ctx), "line 3") != NULL, "%s", lora_errmsg(ctx));
    CHECK(list.n == 0 && list.line == NULL);

    /* weights kohya's float() rejects (kohya stops with ValueError) */
    parse_fails("(x:1.2.3)", LORA_E_CONFIG_RANGE, "1.2.3");
    parse_fails("(x:.)", LORA_E_CONFIG_RANGE, "byte 3");
    parse_fails("(x:-..)", LORA_E_CONFIG_RANGE, NULL);
    /* absurd weights: above 1000, overflow to inf, nesting that overflows */
    parse_fails("(x:1000.5)", LORA_E_CONFIG_RANGE, "1000.5");
    parse_fails("(x:-5000)", LORA_E_CONFIG_RANGE, NULL);
    char big[600] = "(x:";
    for (int i = 0; i < 400; i++) strcat(big, "9");
    strcat(big, ")");
    parse_fails(big, LORA_E_CONFIG_RANGE, "refused");
    char deep[2000] = "";
    for (int i = 0; i < 400; i++) strcat(deep, "(");
    strcat(deep, "x");
    parse_fails(deep, LORA_E_CONFIG_RANGE, NULL);   /* 1.1^400: unclosed, applied at the end */
    /* fine: 1000 exactly, weight 0, deep square brackets (weights shrink, never fail) */
    CHECK_STATUS(gen_prompt_parse(ctx, "(x:1000) (y:0) (z:-1)", &c), LORA_OK);
    gen_prompt_chunks_free(&c);
    for (int i = 0; i < 400; i++) deep[i] = '[';
    CHECK_STATUS(gen_prompt_parse(ctx, deep, &c), LORA_OK);
    CHECK(c.n == 1 && c.piece[0].weight > 0 && c.piece[0].weight < 1e-15);
    gen_prompt_chunks_free(&c);

    /* over-long text; the worst case for kohya's multiply_range (many pieces, many closings) in
     * the longest accepted text stays fast */
    size_t n = GEN_PROMPT_MAX_BYTES + 1;
    char *lng = malloc(n + 1);
    memset(lng, 'a', n);
    lng[n] = '\0';
    parse_fails(lng, LORA_E_CAPTION_TOO_LONG, NULL);
    size_t half = GEN_PROMPT_MAX_BYTES / 2;
    for (size_t i = 0; i < half; i += 2) lng[i] = '[', lng[i + 1] = 'a' + (char)(i / 2 % 2);
    for (size_t i = half; i < GEN_PROMPT_MAX_BYTES; i++) lng[i] = ']';
    lng[GEN_PROMPT_MAX_BYTES] = '\0';
    clock_t t0 = clock();
    CHECK_STATUS(gen_prompt_parse(ctx, lng, &c), LORA_OK);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    printf("worst-case bracket prompt (%d bytes, %lld pieces): %.2f s\n", GEN_PROMPT_MAX_BYTES, (long long)c.n, secs);
    CHECK_MSG(secs < 20, "%.1f s", secs);
    gen_prompt_chunks_free(&c);
    free(lng);

    /* --from_file lines: numbers that do not fit, kohya ValueErrors */
    line_fails("x --w 99999999999", LORA_E_CONFIG_RANGE, "--w 99999999999");
    line_fails("x --h 2147483648", LORA_E_CONFIG_RANGE, "--h");
    CHECK_STATUS(gen_prompt_line_parse(ctx, "x --h 2147483647 --s 99999999999999999999999", &l), LORA_OK);
    CHECK(l.height == 2147483647 && l.steps == 1000);
    gen_prompt_line_free(ctx, &l);
    line_fails("x --d 18446744073709551616", LORA_E_CONFIG_RANGE, "2^64");
    CHECK_STATUS(gen_prompt_line_parse(ctx, "x --d 18446744073709551615", &l), LORA_OK);
    CHECK(l.n_seeds == 1 && l.seeds[0] == UINT64_MAX);
    gen_prompt_line_free(ctx, &l);
    char bigl[600] = "x --l ";
    for (int i = 0; i < 400; i++) strcat(bigl, "9");
    line_fails(bigl, LORA_E_CONFIG_RANGE, "too large");
    line_fails("x --am 1,,2", LORA_E_CONFIG_RANGE, "--am");
    line_fails("x --t 1..", LORA_E_CONFIG_RANGE, "--t");
    /* a NUL inside a file's line ends nothing: the line is parsed with its bytes */
    const char nul[] = "a\0b --w 64\nc";
    CHECK_STATUS(gen_prompt_list_parse(ctx, nul, sizeof nul - 1, &list), LORA_OK);
    CHECK(list.n == 2 && list.line[0].has_width && list.line[0].width == 64);
    gen_prompt_list_free(ctx, &list);

    /* random input: printable soup from the syntax's alphabet + random bytes */
    const char alpha[] = "()[]\\:.0123456789-+, aBREAK\t\n--nwhsdlctam";
    char buf[300];
    int ok = 1;
    for (int it = 0; it < 3000; it++) {
        size_t len = rnd() % 250;
        for (size_t i = 0; i < len; i++) buf[i] = (it % 5 == 0) ? (char)(1 + rnd() % 255) : alpha[rnd() % (sizeof alpha - 1)];
        buf[len] = '\0';
        lora_status s = gen_prompt_parse(ctx, buf, &c);
        if (s != LORA_OK && s != LORA_E_CONFIG_RANGE && s != LORA_E_CAPTION_ENCODING) ok = 0;
        if (s == LORA_OK)
            for (int64_t i = 0; i < c.n; i++)
                if (!(fabs(c.piece[i].weight) <= GEN_PROMPT_MAX_WEIGHT) || !c.piece[i].text) ok = 0;
        gen_prompt_chunks_free(&c);
        s = gen_prompt_line_parse(ctx, buf, &l);
        if (s != LORA_OK && s != LORA_E_CONFIG_RANGE && s != LORA_E_CAPTION_ENCODING) ok = 0;
        if (s == LORA_OK && !l.prompt) ok = 0;
        gen_prompt_line_free(ctx, &l);
        s = gen_prompt_list_parse(ctx, buf, len, &list);
        if (s != LORA_OK && s != LORA_E_CONFIG_RANGE && s != LORA_E_CAPTION_ENCODING) ok = 0;
        gen_prompt_list_free(ctx, &list);
    }
    CHECK_MSG(ok, "random input gave an unexpected status or result");

    /* encode arguments (tiny v1 model) */
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    char path[4096];
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", data);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &m), LORA_OK);
    if (m) {
        float *cond = (float *)1, *uncond = (float *)1;
        int64_t T = 7;
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "", 0, 65, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        CHECK(cond == NULL && uncond == NULL && T == 0);
        CHECK(strstr(lora_errmsg(ctx), "max_embeddings_multiples") != NULL);
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "", 0, -1, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "", 99, 1, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        CHECK(strstr(lora_errmsg(ctx), "clip_skip") != NULL);
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "", -1, 1, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        CHECK_STATUS(gen_prompt_encode_pair(m, NULL, "", 0, 1, &cond, &uncond, &T), LORA_E_INVALID_ARG);
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "", 0, 1, &cond, NULL, &T), LORA_E_INVALID_ARG);
        CHECK_STATUS(gen_prompt_encode_pair(m, "caf\xc3", "", 0, 1, &cond, &uncond, &T), LORA_E_CAPTION_ENCODING);
        CHECK_STATUS(gen_prompt_encode_pair(m, "a", "(b:1.2.3)", 0, 1, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        CHECK_STATUS(gen_prompt_encode_pair(NULL, "a", "", 0, 1, &cond, &uncond, &T), LORA_E_INVALID_ARG);
        struct gen_prompt_encode_opts o = {0};
        o.max_embeddings_multiples = 2;
        o.min_chunks = 3;
        CHECK_STATUS(gen_prompt_encode_ex(m, "a", "", &o, &cond, &uncond, &T), LORA_E_CONFIG_RANGE);
        /* a prompt past max_embeddings_multiples is cut (kohya: warning), not refused: the tiny
         * encoder's 256-token vocabulary cannot embed real ids, so only the count is checked */
        int32_t chunks = 0;
        char *many = malloc(4000);
        many[0] = '\0';
        for (int i = 0; i < 300; i++) strcat(many, "a ");
        CHECK_STATUS(gen_prompt_count_chunks(m, many, 2, &chunks), LORA_OK);
        CHECK(chunks == 2);
        CHECK_STATUS(gen_prompt_count_chunks(m, many, 64, &chunks), LORA_OK);
        CHECK(chunks == 4);
        free(many);
        lora_model_free(m);
    }

    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_prompt_badinput");
}
