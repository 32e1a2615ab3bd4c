/* gen_prompt_line_parse / gen_prompt_list_parse against what kohya's main loop makes of the same
 * lines (tests/data/prompt/lines.json: tests/reference/make_prompt_fixtures.py runs the loop's
 * own statements from gen_img_diffusers.py). Where kohya prints "Exception in parsing" (a
 * ValueError it then ignores) we must return LORA_E_CONFIG_RANGE naming the option. */
#include <string.h>

#include <jansson.h>

#include "internal.h"
#include "gen/prompt.h"
#include "../test.h"

static lora_ctx *ctx;

static int str_eq(const char *a, json_t *j) {
    if (json_is_null(j) || !j) return a == NULL;
    return a && strcmp(a, json_string_value(j)) == 0;
}

static void check_line(json_t *c, int64_t n_networks) {
    const char *line = json_string_value(json_object_get(c, "line"));
    json_t *errors = json_object_get(c, "errors");
    struct gen_prompt_line l;
    lora_status s = gen_prompt_line_parse(ctx, line, &l);
    if (json_array_size(errors) > 0) {
        const char *opt = json_string_value(json_array_get(errors, 0));
        CHECK_MSG(s == LORA_E_CONFIG_RANGE, "\"%s\": %s, want LORA_E_CONFIG_RANGE", line, lora_status_name(s));
        CHECK_MSG(strstr(lora_errmsg(ctx), opt) != NULL, "\"%s\": message \"%s\" does not name \"%s\"", line,
                  lora_errmsg(ctx), opt);
        gen_prompt_line_free(ctx, &l);
        return;
    }
    CHECK_MSG(s == LORA_OK, "\"%s\": %s", line, lora_errmsg(ctx));
    CHECK_MSG(str_eq(l.prompt, json_object_get(c, "prompt")), "\"%s\": prompt \"%s\"", line, l.prompt);
    /* kohya's default negative is "" */
    json_t *neg = json_object_get(c, "negative");
    const char *want_neg = json_string_value(neg);
    CHECK_MSG((l.negative ? strcmp(l.negative, want_neg) == 0 : want_neg[0] == '\0'), "\"%s\": negative \"%s\"", line,
              l.negative ? l.negative : "(none)");
    CHECK_MSG(str_eq(l.clip_prompt, json_object_get(c, "clip_prompt")), "\"%s\": clip prompt", line);
    json_t *j;
    j = json_object_get(c, "width");
    CHECK_MSG(json_is_null(j) ? !l.has_width : (l.has_width && l.width == json_integer_value(j)), "\"%s\": width", line);
    j = json_object_get(c, "height");
    CHECK_MSG(json_is_null(j) ? !l.has_height : (l.has_height && l.height == json_integer_value(j)), "\"%s\": height",
              line);
    j = json_object_get(c, "steps");
    CHECK_MSG(json_is_null(j) ? !l.has_steps : (l.has_steps && l.steps == json_integer_value(j)), "\"%s\": steps", line);
    j = json_object_get(c, "scale");
    CHECK_MSG(json_is_null(j) ? !l.has_scale : (l.has_scale && l.scale == json_number_value(j)), "\"%s\": scale", line);
    j = json_object_get(c, "strength");
    CHECK_MSG(json_is_null(j) ? !l.has_strength : (l.has_strength && l.strength == json_number_value(j)),
              "\"%s\": strength", line);
    j = json_object_get(c, "negative_scale");
    if (json_is_null(j)) CHECK_MSG(!l.has_negative_scale, "\"%s\": negative scale", line);
    else if (json_is_string(j)) CHECK_MSG(l.has_negative_scale && l.negative_scale_none, "\"%s\": --nl none", line);
    else CHECK_MSG(l.has_negative_scale && !l.negative_scale_none && l.negative_scale == json_number_value(j),
                   "\"%s\": negative scale %g", line, l.negative_scale);
    j = json_object_get(c, "seeds");
    if (json_is_null(j)) {
        CHECK_MSG(l.seeds == NULL, "\"%s\": seeds", line);
    } else {
        /* decimal text in the fixture (seeds may exceed 2^63) */
        int ok = l.n_seeds == (int64_t)json_array_size(j);
        for (int64_t i = 0; ok && i < l.n_seeds; i++)
            ok = l.seeds[i] == strtoull(json_string_value(json_array_get(j, (size_t)i)), NULL, 10);
        CHECK_MSG(ok, "\"%s\": seeds", line);
    }
    j = json_object_get(c, "network_muls");
    if (json_is_null(j)) {
        CHECK_MSG(l.network_muls == NULL && gen_prompt_line_mul(&l, 0, 0.25) == 0.25, "\"%s\": --am", line);
    } else {
        /* kohya's list is already extended to the network count (repeat the last) */
        int64_t n = (int64_t)json_array_size(j);
        int ok = n >= n_networks;
        for (int64_t i = 0; ok && i < n; i++) ok = gen_prompt_line_mul(&l, i, -99) == json_number_value(json_array_get(j, (size_t)i));
        CHECK_MSG(ok, "\"%s\": --am", line);
    }
    gen_prompt_line_free(ctx, &l);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    char path[4096];
    snprintf(path, sizeof path, "%s/prompt/lines.json", data);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: %s", path, jerr.text);
    if (!root) return test_finish("test_prompt_line");
    int64_t n_networks = json_integer_value(json_object_get(root, "networks"));
    json_t *lines = json_object_get(root, "lines");
    CHECK(json_array_size(lines) >= 40);
    size_t k;
    json_t *c;
    json_array_foreach(lines, k, c) check_line(c, n_networks);

    /* a whole file: kohya's splitlines + blank-line filter */
    const char *text = json_string_value(json_object_get(root, "file_text"));
    json_t *want = json_object_get(root, "file_lines");
    struct gen_prompt_list list;
    CHECK_STATUS(gen_prompt_list_parse(ctx, text, strlen(text), &list), LORA_OK);
    CHECK_MSG(list.n == (int64_t)json_array_size(want), "%lld lines, kohya %zu", (long long)list.n,
              json_array_size(want));
    for (int64_t i = 0; i < list.n && i < (int64_t)json_array_size(want); i++) {
        struct gen_prompt_line one;
        const char *w = json_string_value(json_array_get(want, (size_t)i));
        CHECK_STATUS(gen_prompt_line_parse(ctx, w, &one), LORA_OK);
        CHECK_MSG(one.prompt && list.line[i].prompt && strcmp(one.prompt, list.line[i].prompt) == 0 &&
                  one.has_width == list.line[i].has_width && one.n_seeds == list.line[i].n_seeds &&
                  one.has_steps == list.line[i].has_steps && one.has_scale == list.line[i].has_scale &&
                  (one.negative != NULL) == (list.line[i].negative != NULL),
                  "file line %lld: \"%s\" vs kohya \"%s\"", (long long)i, list.line[i].prompt, w);
        gen_prompt_line_free(ctx, &one);
    }
    /* line numbers count every line break, blank lines included (hand-derived from file_text) */
    if (list.n == 8) {
        int64_t want_no[8] = {1, 4, 5, 6, 7, 8, 9, 12};
        for (int i = 0; i < 8; i++) CHECK_MSG(list.line[i].line_no == want_no[i], "line %d: number %lld", i,
                                              (long long)list.line[i].line_no);
    }
    gen_prompt_list_free(ctx, &list);
    /* an error names the line number */
    const char *bad = "ok\n\nx --l 1.2.3\n";
    CHECK_STATUS(gen_prompt_list_parse(ctx, bad, strlen(bad), &list), LORA_E_CONFIG_RANGE);
    CHECK_MSG(strstr(lora_errmsg(ctx), "line 3") && strstr(lora_errmsg(ctx), "--l 1.2.3"), "%s", lora_errmsg(ctx));
    CHECK(list.n == 0 && list.line == NULL);
    json_decref(root);

    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_prompt_line");
}
