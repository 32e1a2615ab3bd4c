/* CLIP tokenizer against transformers 4.25.1's slow CLIPTokenizer with ftfy 6.1.1
 * (tests/data/tokenizer/reference_ids.json, from tests/reference/make_tokenizer_fixtures.py):
 * raw ids and kohya's get_input_ids for max_token_length 75/150/225, SD v1 and v2, every case.
 * Then the API contract: errors, size queries, truncated buffers, invalid UTF-8, and no
 * allocations once the tokenizer has seen its words. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "model/text_fix.h"
#include "model/tokenizer.h"
#include "../test.h"

static int ids_equal(const json_t *want, const int32_t *got, size_t n) {
    if (!json_is_array(want) || json_array_size(want) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (json_integer_value(json_array_get(want, i)) != got[i]) return 0;
    return 1;
}

static void print_ids(const char *what, const int32_t *ids, size_t n) {
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 80; i++) fprintf(stderr, " %d", (int)ids[i]);
    fprintf(stderr, "%s\n", n > 80 ? " ..." : "");
}

/* Every case of the fixture through `tok`; returns the number of comparisons made. */
static int run_cases(lora_tokenizer *tok, const json_t *cases, const char *flavour) {
    int compared = 0;
    int32_t buf[4096];
    for (size_t c = 0; c < json_array_size(cases); c++) {
        const json_t *cs = json_array_get(cases, c);
        const char *name = json_string_value(json_object_get(cs, "name"));
        const char *text = json_string_value(json_object_get(cs, "text"));
        const json_t *exp = json_object_get(cs, flavour);
        size_t n = 0;
        lora_status s = lora_tokenizer_tokenize(tok, text, buf, sizeof buf / sizeof *buf, &n);
        const json_t *raw = json_object_get(exp, "raw");
        CHECK_MSG(s == LORA_OK && ids_equal(raw, buf, n), "%s %s raw", flavour, name);
        if (s != LORA_OK || !ids_equal(raw, buf, n)) print_ids("ours", buf, n);
        compared++;
        static const int32_t lens[3] = {75, 150, 225};
        for (int k = 0; k < 3; k++) {
            char key[8];
            snprintf(key, sizeof key, "%d", (int)lens[k]);
            s = lora_tokenizer_encode(tok, text, lens[k], buf, sizeof buf / sizeof *buf, &n);
            int ok = s == LORA_OK && n == (size_t)(77 * (lens[k] / 75)) && ids_equal(json_object_get(exp, key), buf, n);
            CHECK_MSG(ok, "%s %s max_token_length %d", flavour, name, (int)lens[k]);
            if (!ok) print_ids("ours", buf, n);
            compared++;
        }
    }
    return compared;
}

/* Allocator that fails the n-th allocation (and every later one). */
struct failing { int64_t count, fail_at; };
static void *failing_alloc(void *user, size_t size, size_t alignment) {
    struct failing *f = user;
    if (f->count++ >= f->fail_at) return NULL;
    void *p = NULL;
    return posix_memalign(&p, alignment, size) == 0 ? p : NULL;
}
static void failing_free(void *user, void *ptr) { (void)user; free(ptr); }

/* Every allocation of create + encode failing in turn: LORA_E_NOMEM or success, never a
 * crash, and every byte given back (host_bytes 0 after the frees). */
static void allocation_failures(void) {
    const char *text = "caf\xc3\x83\xc2\xa9 &amp; \xe2\x80\x9cq\xe2\x80\x9d e\xcc\x81 "
                       "supercalifragilisticexpialidocioussupercalifragilisticexpialidocious !!";
    int failures = 0, bad = 0;
    for (int64_t k = 0; k < 400; k++) {
        struct failing f = {0, k};
        lora_ctx *ctx = NULL;
        if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) continue;
        lora_ctx_set_allocator(ctx, failing_alloc, failing_free, &f);
        lora_tokenizer *tok = NULL;
        lora_status s = lora_tokenizer_create(ctx, LORA_TOKENIZER_SD2, &tok);
        if (s == LORA_OK) {
            int32_t ids[231];
            size_t n;
            s = lora_tokenizer_encode(tok, text, 225, ids, 231, &n);
            if (s == LORA_OK) s = lora_tokenizer_encode(tok, text, 75, ids, 231, &n);
        }
        if (s != LORA_OK && s != LORA_E_NOMEM) bad++;
        failures += s == LORA_E_NOMEM;
        lora_tokenizer_free(tok);
        uint64_t host = 1;
        lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
        if (host != 0) bad++;
        lora_ctx_free(ctx);
        if (s == LORA_OK) break;   /* past the last allocation */
    }
    CHECK_MSG(bad == 0, "%d runs ended with another error or held memory", bad);
    CHECK(failures > 5);
}

int main(void) {
    const char *d = getenv("LORA_TEST_DATA");
    char *path = test_path_join(d ? d : "tests/data", "tokenizer/reference_ids.json");
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: %s", path, jerr.text);
    free(path);
    if (!root) return test_finish("test_tokenizer");
    const json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 40);

    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_tokenizer *v1 = NULL, *v2 = NULL;
    CHECK_STATUS(lora_tokenizer_create(ctx, LORA_TOKENIZER_SD1, &v1), LORA_OK);
    CHECK_STATUS(lora_tokenizer_create(ctx, LORA_TOKENIZER_SD2, &v2), LORA_OK);

    int n1 = run_cases(v1, cases, "v1");
    int n2 = run_cases(v2, cases, "v2");
    printf("compared %d (v1) + %d (v2) id sequences over %zu prompts\n", n1, n2, json_array_size(cases));

    /* second pass: the same answers from the word cache, and no allocation at all */
    int64_t allocs = ctx->n_allocs;
    run_cases(v1, cases, "v1");
    run_cases(v2, cases, "v2");
    CHECK_MSG(ctx->n_allocs == allocs, "%lld allocations on the warm pass", (long long)(ctx->n_allocs - allocs));

    /* more distinct words than the cache holds: it starts over, answers stay the same */
    {
        int32_t a[77], b[77];
        size_t na = 0, nb = 0;
        const char *t = "masterpiece, best quality, a very detailed illustration of a zyxwvut";
        CHECK_STATUS(lora_tokenizer_encode(v1, t, 75, a, 77, &na), LORA_OK);
        char word[8];
        int ok = 1;
        for (int i = 0; i < 20000 && ok; i++) {
            int x = i;
            for (int k = 0; k < 4; k++, x /= 26) word[k] = (char)('a' + x % 26);
            word[4] = 0;
            ok = lora_tokenizer_tokenize(v1, word, NULL, 0, &nb) == LORA_OK && nb > 0;
        }
        CHECK(ok);
        CHECK_STATUS(lora_tokenizer_encode(v1, t, 75, b, 77, &nb), LORA_OK);
        CHECK(na == 77 && nb == 77 && memcmp(a, b, sizeof a) == 0);
    }

    /* API contract */
    lora_tokenizer_free(v1);
    int32_t ids[231];
    size_t n = 99;
    CHECK_STATUS(lora_tokenizer_create(ctx, 3, &v1), LORA_E_INVALID_ARG);
    CHECK(v1 == NULL);
    CHECK_STATUS(lora_tokenizer_create(NULL, LORA_TOKENIZER_SD1, &v1), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_create(ctx, LORA_TOKENIZER_SD1, NULL), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_create(ctx, LORA_TOKENIZER_SD1, &v1), LORA_OK);
    CHECK_STATUS(lora_tokenizer_encode(NULL, "x", 75, ids, 77, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_encode(v1, NULL, 75, ids, 77, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_encode(v1, "x", 75, NULL, 77, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_encode(v1, "x", 76, ids, 231, &n), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_tokenizer_encode(v1, "x", 0, ids, 231, &n), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_tokenizer_encode(v1, "x", 225, ids, 230, &n), LORA_E_LIMIT);
    CHECK(n == 231);
    CHECK(strstr(lora_errmsg(ctx), "231") != NULL);
    CHECK_STATUS(lora_tokenizer_encode(v1, "a photo of a cat", 150, ids, 231, &n), LORA_OK);
    CHECK(n == 154 && ids[0] == LORA_TOKEN_BOS && ids[6] == LORA_TOKEN_EOS && ids[77] == LORA_TOKEN_BOS &&
          ids[78] == LORA_TOKEN_EOS && ids[153] == LORA_TOKEN_EOS);
    CHECK_STATUS(lora_tokenizer_encode(v1, "a photo of a cat", 150, ids, 231, NULL), LORA_OK);
    /* size query, then a buffer one short */
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "a photo of a cat", NULL, 0, &n), LORA_OK);
    CHECK(n == 5);
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "a photo of a cat", ids, 4, &n), LORA_E_LIMIT);
    CHECK(n == 5 && ids[0] == 320 && ids[3] == 320);
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "a photo of a cat", NULL, 3, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "", ids, 0, &n), LORA_OK);
    CHECK(n == 0);
    /* invalid UTF-8: refused with the offset, like kohya's caption reader */
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "ok \xff bad", ids, 231, &n), LORA_E_CAPTION_ENCODING);
    CHECK(strstr(lora_errmsg(ctx), "offset 3") != NULL);
    CHECK_STATUS(lora_tokenizer_encode(v1, "\xed\xa0\x80 surrogate", 75, ids, 77, &n), LORA_E_CAPTION_ENCODING);
    CHECK_STATUS(lora_tokenizer_encode(v1, "\xc0\x80 overlong", 75, ids, 77, &n), LORA_E_CAPTION_ENCODING);
    /* and the tokenizer still works afterwards */
    CHECK_STATUS(lora_tokenizer_tokenize(v1, "cat", ids, 231, &n), LORA_OK);
    CHECK(n == 1 && ids[0] == 2368);

    /* a long text of one repeated character: BPE and NFC scale, nothing overflows */
    size_t big = 200000;
    char *longtext = malloc(big + 1);
    if (longtext) {
        memset(longtext, 'a', big);
        longtext[big] = 0;
        CHECK_STATUS(lora_tokenizer_tokenize(v1, longtext, NULL, 0, &n), LORA_OK);
        CHECK(n > 0);
        for (size_t i = 0; i < big; i += 2) longtext[i] = ' ';
        CHECK_STATUS(lora_tokenizer_encode(v1, longtext, 225, ids, 231, &n), LORA_OK);
        CHECK(n == 231 && ids[1] == 320 && ids[75] == 320 && ids[76] == LORA_TOKEN_EOS);
        free(longtext);
    }

    allocation_failures();

    lora_tokenizer_free(NULL);
    lora_tokenizer_free(v1);
    lora_tokenizer_free(v2);
    lora_ctx_free(ctx);
    json_decref(root);
    return test_finish("test_tokenizer");
}
