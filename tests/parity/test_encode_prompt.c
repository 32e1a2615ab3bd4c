/* lora_model_encode_prompt against transformers 4.25.1 + kohya's get_input_ids /
 * get_hidden_states (tests/reference/make_encode_prompt_reference.py): prompt text in,
 * conditioning out, for SD v1 and v2, clip_skip 1/2 and the 75/150/225-token modes. The tiny
 * encoders get a 49408-row token embedding from the formula the script used, so real CLIP ids
 * fit. */
#include <string.h>

#include <jansson.h>

#include "internal.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "../test.h"
#include "../ref_file.h"
#include "../tiny_vocab.h"

static lora_ctx *ctx;



int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    char path[4096];
    snprintf(path, sizeof path, "%s/sd/encode_prompt_reference.safetensors", data);
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, path, &ref), LORA_OK);
    if (!ref) return test_finish("test_encode_prompt");
    const char *cases_json = NULL;
    for (int64_t i = 0; i < ref->n_meta; i++)
        if (!strcmp(ref->meta_keys[i], "cases")) cases_json = ref->meta_vals[i];
    json_t *cases = cases_json ? json_loads(cases_json, 0, NULL) : NULL;
    CHECK(json_is_array(cases) && json_array_size(cases) >= 6);

    lora_model *models[3] = {NULL, NULL, NULL};
    for (int v = 1; v <= 2; v++) {
        snprintf(path, sizeof path, "%s/sd/v%d_diffusers", data, v);
        CHECK_STATUS(lora_model_load(ctx, path, NULL, &models[v]), LORA_OK);
        if (models[v]) tiny_widen_vocab(ctx, models[v]);
    }
    size_t k;
    json_t *c;
    int compared = 0;
    json_array_foreach(cases, k, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        int v = strcmp(json_string_value(json_object_get(c, "version")), "v2") == 0 ? 2 : 1;
        int64_t mtl = json_integer_value(json_object_get(c, "max_token_length"));
        int64_t skip = json_integer_value(json_object_get(c, "clip_skip"));
        const char *prompt = json_string_value(json_object_get(c, "prompt"));
        if (!models[v]) continue;
        char tn[256];
        snprintf(tn, sizeof tn, "%s.cond", name);
        int64_t ti = -1;
        for (int64_t i = 0; i < ref->n_tensors; i++)
            if (!strcmp(ref->tensors[i].name, tn)) ti = i;
        CHECK(ti >= 0);
        if (ti < 0) continue;
        lora_params *p = NULL;
        lora_params_create(ctx, &p);
        lora_params_set_int(p, LORA_P_MAX_TOKEN_LENGTH, mtl);
        lora_params_set_int(p, LORA_P_CLIP_SKIP, skip);
        int64_t T = 0, C = 0;
        CHECK_STATUS(lora_model_encode_prompt(models[v], prompt, p, NULL, 0, &T, &C), LORA_OK);   /* size query */
        CHECK(T == mtl + 2 && T == ref->tensors[ti].shape[0] && C == ref->tensors[ti].shape[1]);
        float *got = calloc((size_t)(T * C), sizeof *got), *want = calloc((size_t)(T * C), sizeof *want);
        CHECK_STATUS(lora_model_encode_prompt(models[v], prompt, p, got, (uint64_t)(T * C), NULL, NULL), LORA_OK);
        CHECK_STATUS(lora_file_read_f32(ref, ti, want, (uint64_t)(T * C)), LORA_OK);
        double e = rel_l2(got, want, T * C);
        printf("%-20s rel L2 %.2e\n", name, e);
        CHECK_MSG(e < 1e-5, "%s: relative L2 %g", name, e);
        compared++;
        CHECK_STATUS(lora_model_encode_prompt(models[v], prompt, p, got, (uint64_t)(T * C) - 1, NULL, NULL), LORA_E_LIMIT);
        free(got);
        free(want);
        lora_params_free(p);
    }
    CHECK(compared == (int)json_array_size(cases));

    /* bad input: clip_skip above the layer count, invalid UTF-8, NULL prompt */
    if (models[1]) {
        lora_params *p = NULL;
        lora_params_create(ctx, &p);
        lora_params_set_int(p, LORA_P_CLIP_SKIP, 12);
        float buf[77 * 32];
        CHECK_STATUS(lora_model_encode_prompt(models[1], "a cat", p, buf, 77 * 32, NULL, NULL), LORA_E_CONFIG_RANGE);
        CHECK(strstr(lora_errmsg(ctx), "clip_skip") != NULL);
        CHECK_STATUS(lora_model_encode_prompt(models[1], "caf\xc3", NULL, buf, 77 * 32, NULL, NULL), LORA_E_CAPTION_ENCODING);
        CHECK_STATUS(lora_model_encode_prompt(models[1], NULL, NULL, buf, 77 * 32, NULL, NULL), LORA_E_INVALID_ARG);
        lora_params_free(p);
    }
    /* a tiny LDM file: head count unknown -> refused with a reason */
    lora_model *ldm = NULL;
    snprintf(path, sizeof path, "%s/sd/v1_ldm.safetensors", data);
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &ldm), LORA_OK);
    if (ldm) {
        float buf[77 * 32];
        CHECK_STATUS(lora_model_encode_prompt(ldm, "a cat", NULL, buf, 77 * 32, NULL, NULL), LORA_E_UNSUPPORTED);
        lora_model_free(ldm);
    }
    json_decref(cases);
    st_close(ref);
    lora_model_free(models[1]);
    lora_model_free(models[2]);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_encode_prompt");
}
