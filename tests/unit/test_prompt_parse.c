/* gen_prompt_parse against kohya's parse_prompt_attention (tests/data/prompt/parse.json, written
 * by tests/reference/make_prompt_fixtures.py, which calls kohya's function): piece texts and
 * weights must be identical (same double operations in the same order). BREAK, which kohya at
 * this commit does not have, is checked against hand-derived lists and token layouts from
 * A1111's rule (lib/gen/prompt.h). */
#include <string.h>

#include <jansson.h>

#include "internal.h"
#include "gen/prompt.h"
#include "model/sd_model.h"
#include "model/tokenizer.h"
#include "../test.h"

static lora_ctx *ctx;

struct want {
    const char *text;
    double weight;
    int is_break;
};

static void check_pieces(const char *prompt, const struct want *w, int n) {
    struct gen_prompt_chunks c;
    CHECK_STATUS(gen_prompt_parse(ctx, prompt, &c), LORA_OK);
    CHECK_MSG(c.n == n, "\"%s\": %lld pieces, want %d", prompt, (long long)c.n, n);
    for (int i = 0; i < n && i < c.n; i++) {
        CHECK_MSG(strcmp(c.piece[i].text, w[i].text) == 0, "\"%s\" piece %d: \"%s\", want \"%s\"", prompt, i,
                  c.piece[i].text, w[i].text);
        CHECK_MSG(c.piece[i].weight == w[i].weight && c.piece[i].is_break == w[i].is_break,
                  "\"%s\" piece %d: weight %.17g break %d, want %.17g %d", prompt, i, c.piece[i].weight,
                  c.piece[i].is_break, w[i].weight, w[i].is_break);
    }
    gen_prompt_chunks_free(&c);
}

/* Token ids of gen_prompt_tokens vs a run-length description: pairs (id, count). */
static void check_tokens(struct lora_model *m, const char *prompt, int64_t max_tokens, const int32_t *runs, int n_runs,
                         int want_trunc) {
    int32_t *ids = NULL;
    float *w = NULL;
    int64_t n = 0;
    int trunc = 0;
    CHECK_STATUS(gen_prompt_tokens(m, prompt, max_tokens, &ids, &w, &n, &trunc), LORA_OK);
    int64_t k = 0;
    int ok = 1;
    for (int r = 0; r < n_runs; r++)
        for (int32_t q = 0; q < runs[2 * r + 1]; q++, k++)
            if (k >= n || ids[k] != runs[2 * r]) ok = 0;
    CHECK_MSG(ok && k == n, "\"%s\": token layout differs (%lld tokens, want %lld)", prompt, (long long)n,
              (long long)k);
    CHECK_MSG(trunc == want_trunc, "\"%s\": truncated %d", prompt, trunc);
    lora_free(m->ctx, ids);
    lora_free(m->ctx, w);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    char path[4096];
    snprintf(path, sizeof path, "%s/prompt/parse.json", data);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: %s", path, jerr.text);
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_is_array(cases) && json_array_size(cases) >= 40);
    size_t k;
    json_t *c;
    int compared = 0;
    json_array_foreach(cases, k, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        json_t *pieces = json_object_get(c, "pieces");
        struct gen_prompt_chunks got;
        lora_status s = gen_prompt_parse(ctx, text, &got);
        CHECK_MSG(s == LORA_OK, "\"%s\": %s", text, lora_errmsg(ctx));
        CHECK_MSG(got.n == (int64_t)json_array_size(pieces), "\"%s\": %lld pieces, kohya %zu", text,
                  (long long)got.n, json_array_size(pieces));
        int same = got.n == (int64_t)json_array_size(pieces);
        for (int64_t i = 0; same && i < got.n; i++) {
            json_t *p = json_array_get(pieces, (size_t)i);
            const char *t = json_string_value(json_array_get(p, 0));
            double w = json_number_value(json_array_get(p, 1));
            if (strcmp(t, got.piece[i].text) != 0 || w != got.piece[i].weight || got.piece[i].is_break) {
                fprintf(stderr, "\"%s\" piece %lld: (\"%s\", %.17g), kohya (\"%s\", %.17g)\n", text, (long long)i,
                        got.piece[i].text, got.piece[i].weight, t, w);
                same = 0;
            }
        }
        CHECK_MSG(same, "\"%s\" differs from kohya", text);
        compared += same;
        gen_prompt_chunks_free(&got);
    }
    printf("%d of %zu prompts identical to kohya's parse_prompt_attention\n", compared, json_array_size(cases));
    json_decref(root);

    /* hand-derived: weights are products in kohya's order */
    {
        struct want w[] = {{"a ", 1.0, 0}, {"b", 1.1 * 1.1, 0}, {" c", 1.0, 0}};
        check_pieces("a ((b)) c", w, 3);
        struct want w2[] = {{"x", 1.0 / 1.1, 0}};
        check_pieces("[x]", w2, 1);
        struct want w3[] = {{"x", 0.5 * 1.1, 0}};
        check_pieces("((x:0.5)", w3, 1);     /* the outer "(" is never closed: x1.1 at the end */
        struct want w4[] = {{"(a)", 1.0, 0}};
        check_pieces("\\(a\\)", w4, 1);
        struct want w5[] = {{"a:b", 1.1, 0}};
        check_pieces("(a:b)", w5, 1);
    }
    /* BREAK (A1111 rule) */
    {
        struct want w1[] = {{"a", 1.0, 0}, {"BREAK", -1.0, 1}, {"b", 1.0, 0}};
        check_pieces("a BREAK b", w1, 3);
        check_pieces("a  \t BREAK\n b", w1, 3);
        struct want w2[] = {{"", 1.0, 0}, {"BREAK", -1.0, 1}, {"", 1.0, 0}};
        check_pieces("BREAK", w2, 3);
        check_pieces("  BREAK  ", w2, 3);
        struct want w3[] = {{"aBREAK b", 1.0, 0}};
        check_pieces("aBREAK b", w3, 1);
        struct want w3b[] = {{"BREAK_x BREAKs break", 1.0, 0}};
        check_pieces("BREAK_x BREAKs break", w3b, 1);
        struct want w4[] = {{"", 1.0, 0}, {"BREAK", -1.0, 1}, {",x", 1.0, 0}};
        check_pieces("BREAK,x", w4, 3);
        /* inside brackets it still breaks (A1111 would tokenize "break" with weight -1.1) */
        struct want w5[] = {{"a", 1.1, 0}, {"BREAK", -1.0, 1}, {"b", 1.1, 0}};
        check_pieces("(a BREAK b)", w5, 3);
        struct want w6[] = {{"x", 1.0, 0}, {"BREAK", -1.0, 1}, {"", 1.0, 0}, {"BREAK", -1.0, 1}, {"y", 1.0, 0}};
        check_pieces("x BREAK BREAK y", w6, 5);
        /* "(x)" then the text run " BREAK y": the run's first part is "" (weight 1.0) */
        struct want w7[] = {{"x", 1.1, 0}, {"", 1.0, 0}, {"BREAK", -1.0, 1}, {"y", 1.0, 0}};
        check_pieces("(x) BREAK y", w7, 4);
    }

    /* BREAK token layouts with the real CLIP tokenizer: a = 320, cat = 2368 */
    for (int v = 1; v <= 2; v++) {
        struct lora_model m;
        memset(&m, 0, sizeof m);
        m.ctx = ctx;
        m.sd.cfg.version = v;
        int32_t E = TOK_EOS, P = v == 1 ? TOK_EOS : 0;
        int32_t r1[] = {320, 1, E, 1, P, 73, 2368, 1};
        check_tokens(&m, "a BREAK cat", 1000, r1, 4, 0);
        int32_t r2[] = {E, 1, P, 74, 2368, 1};
        check_tokens(&m, "BREAK cat", 1000, r2, 3, 0);
        int32_t r3[] = {320, 1, E, 1, P, 73, E, 1, P, 74, 2368, 1};
        check_tokens(&m, "a BREAK BREAK cat", 1000, r3, 6, 0);
        int32_t r4[] = {320, 1, E, 1, P, 73};
        check_tokens(&m, "(a:1.5) BREAK", 1000, r4, 3, 0);
        /* exactly 75 tokens, then BREAK: nothing added */
        char a75[200] = "";
        for (int i = 0; i < 75; i++) strcat(a75, "a ");
        char buf[300];
        snprintf(buf, sizeof buf, "%sBREAK cat", a75);
        int32_t r5[] = {320, 75, 2368, 1};
        check_tokens(&m, buf, 1000, r5, 2, 0);
        snprintf(buf, sizeof buf, "%sBREAK BREAK cat", a75);
        int32_t r6[] = {320, 75, E, 1, P, 74, 2368, 1};
        check_tokens(&m, buf, 1000, r6, 4, 0);
        /* truncation (kohya: cut to max_length, warning) */
        int32_t r7[] = {320, 10};
        check_tokens(&m, a75, 10, r7, 1, 1);
        check_tokens(&m, a75, 75, r5, 1, 0);
        /* weights follow their pieces; padding has 1.0 */
        int32_t *ids;
        float *w;
        int64_t n;
        int tr;
        CHECK_STATUS(gen_prompt_tokens(&m, "(a:1.5) [cat] BREAK a", 1000, &ids, &w, &n, &tr), LORA_OK);
        CHECK(n == 76 && w[0] == 1.5f && w[1] == (float)(1 / 1.1) && w[2] == 1.0f && w[74] == 1.0f && w[75] == 1.0f);
        lora_free(ctx, ids);
        lora_free(ctx, w);
        tok_free(m.tokenizer);
    }

    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_prompt_parse");
}
