/* Parameter bags: defaults from kohya's argparse, bounds, typed access, name lookup,
 * locale-independent parsing, and the bad-config cases of spec/safety.md §6 row 23. */
#include <locale.h>
#include <string.h>

#include "internal.h"
#include "../test.h"

#include <stdio.h>
#include <stdlib.h>

/* Counts the "#define LORA_P_" lines of include/lora/lora.h (found from LORA_TEST_DATA =
 * tests/data), an independent count of the keys the table must hold. -1 when unreadable. */
static int count_header_keys(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) return -1;
    char path[4096];
    snprintf(path, sizeof path, "%s/../../include/lora/lora.h", data);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "#define LORA_P_", 15) == 0) n++;
    fclose(f);
    return n;
}

int main(void) {
    lora_ctx *ctx = NULL;
    lora_params *p = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK_STATUS(lora_params_create(ctx, &p), LORA_OK);

    /* Defaults of train_network.py / lora.py (spec/kohya-lora.md §1.6, §5.5). */
    int64_t iv;
    double dv;
    char buf[64];
    CHECK_STATUS(lora_params_get_int(p, LORA_P_NETWORK_DIM, &iv), LORA_OK);
    CHECK(iv == 4);
    CHECK_STATUS(lora_params_get_float(p, LORA_P_NETWORK_ALPHA, &dv), LORA_OK);
    CHECK(dv == 1.0);
    CHECK_STATUS(lora_params_get_float(p, LORA_P_LEARNING_RATE, &dv), LORA_OK);
    CHECK(dv == 2e-6);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_MAX_TRAIN_STEPS, &iv), LORA_OK);
    CHECK(iv == 1600);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_MIN_BUCKET_RESO, &iv), LORA_OK);
    CHECK(iv == 256);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_BUCKET_RESO_STEPS, &iv), LORA_OK);
    CHECK(iv == 64);
    size_t need = 0;
    CHECK_STATUS(lora_params_get_string(p, LORA_P_CAPTION_EXTENSION, buf, sizeof buf, &need), LORA_OK);
    CHECK(strcmp(buf, ".caption") == 0 && need == 9);
    CHECK_STATUS(lora_params_get_string(p, LORA_P_LR_SCHEDULER, buf, sizeof buf, NULL), LORA_OK);
    CHECK(strcmp(buf, "constant") == 0);
    CHECK_STATUS(lora_params_get_string(p, LORA_P_OPTIMIZER_TYPE, buf, sizeof buf, NULL), LORA_OK);
    CHECK(strcmp(buf, "AdamW") == 0);

    /* Typed set/get, type mismatch, unknown key. */
    CHECK_STATUS(lora_params_set_int(p, LORA_P_NETWORK_DIM, 32), LORA_OK);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_NETWORK_DIM, &iv), LORA_OK);
    CHECK(iv == 32);
    CHECK_STATUS(lora_params_get_float(p, LORA_P_NETWORK_DIM, &dv), LORA_OK);
    CHECK(dv == 32.0);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_NETWORK_ALPHA, 16), LORA_OK);   /* int into float key */
    CHECK_STATUS(lora_params_get_float(p, LORA_P_NETWORK_ALPHA, &dv), LORA_OK);
    CHECK(dv == 16.0);
    CHECK_STATUS(lora_params_set_float(p, LORA_P_NETWORK_DIM, 3.5), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_NETWORK_DIM, "8"), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_LEARNING_RATE, &iv), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_params_set_int(p, 2999, 1), LORA_E_UNKNOWN_KEY);
    CHECK(strstr(lora_errmsg(ctx), "2999") != NULL);

    /* Row 23 of the bad-input table: each invalid value names the field and leaves the
     * stored value unchanged. */
    CHECK_STATUS(lora_params_set_int(p, LORA_P_NETWORK_DIM, 0), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "network_dim") != NULL);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_NETWORK_DIM, -4), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_NETWORK_DIM, &iv), LORA_OK);
    CHECK(iv == 32);
    CHECK_STATUS(lora_params_set_float(p, LORA_P_NETWORK_ALPHA, NAN), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "network_alpha") != NULL);
    CHECK_STATUS(lora_params_set_float(p, LORA_P_LEARNING_RATE, INFINITY), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_parse(p, "learning_rate", "1,5e-4"), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "learning_rate") != NULL);
    CHECK_STATUS(lora_params_parse(p, "learning_rate", "1e-4x"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_parse(p, "learning_rate", ""), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_RESOLUTION, "1000"), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "resolution") != NULL);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_RESOLUTION, "512,"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_RESOLUTION, "512,768,1"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_RESOLUTION, "512,768"), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_TRAIN_BATCH_SIZE, 0), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_parse(p, "no_such_flag", "1"), LORA_E_UNKNOWN_KEY);
    CHECK(strstr(lora_errmsg(ctx), "no_such_flag") != NULL);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_TRAIN_DATA_DIR, "/data/\xff\xfe"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_MIXED_PRECISION, "fp8"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_MIXED_PRECISION, "bf16"), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_MAX_TOKEN_LENGTH, 100), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_MAX_TOKEN_LENGTH, 150), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_SAVE_PRECISION, ""), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);

    /* Parsing as a command line would; "--" prefix accepted; booleans. */
    CHECK_STATUS(lora_params_parse(p, "--learning_rate", "1.5e-4"), LORA_OK);
    CHECK_STATUS(lora_params_get_float(p, LORA_P_LEARNING_RATE, &dv), LORA_OK);
    CHECK(dv == 1.5e-4);
    CHECK_STATUS(lora_params_parse(p, "cache_latents", "true"), LORA_OK);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_CACHE_LATENTS, &iv), LORA_OK);
    CHECK(iv == 1);
    CHECK_STATUS(lora_params_parse(p, "network_dim", "4.5"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_params_parse(p, "seed", "4294967295"), LORA_OK);
    CHECK_STATUS(lora_params_parse(p, "seed", "4294967296"), LORA_E_CONFIG_RANGE);

    /* Under a locale whose decimal mark is a comma, parsing does not change. */
    if (setlocale(LC_ALL, "de_DE.UTF-8") || setlocale(LC_ALL, "de_DE.utf8")) {
        CHECK_STATUS(lora_params_parse(p, "learning_rate", "2.5e-4"), LORA_OK);
        CHECK_STATUS(lora_params_get_float(p, LORA_P_LEARNING_RATE, &dv), LORA_OK);
        CHECK(dv == 2.5e-4);
        CHECK_STATUS(lora_params_parse(p, "learning_rate", "1,5e-4"), LORA_E_CONFIG_RANGE);
        setlocale(LC_ALL, "C");
    } else {
        printf("note: de_DE.UTF-8 locale not installed: German-locale parse not exercised\n");
    }

    /* Reset restores defaults. */
    CHECK_STATUS(lora_params_reset(p), LORA_OK);
    CHECK_STATUS(lora_params_get_int(p, LORA_P_NETWORK_DIM, &iv), LORA_OK);
    CHECK(iv == 4);
    CHECK_STATUS(lora_params_get_string(p, LORA_P_RESOLUTION, buf, sizeof buf, NULL), LORA_OK);
    CHECK(strcmp(buf, "512") == 0);

    /* Name <-> key, enumeration in ascending order, bounds. */
    lora_param key;
    lora_param_type type;
    CHECK_STATUS(lora_param_lookup("learning_rate", &key, &type), LORA_OK);
    CHECK(key == LORA_P_LEARNING_RATE && type == LORA_PARAM_FLOAT);
    CHECK_STATUS(lora_param_lookup("resolution", &key, &type), LORA_OK);
    CHECK(key == LORA_P_RESOLUTION && type == LORA_PARAM_STRING);
    CHECK_STATUS(lora_param_lookup("nope", &key, &type), LORA_E_UNKNOWN_KEY);
    CHECK(strcmp(lora_param_name(LORA_P_CLIP_SKIP), "clip_skip") == 0);
    CHECK(lora_param_name(12) == NULL);
    int n = 0;
    lora_param prev = 0;
    for (lora_param k; (k = lora_param_at(n)) != 0; n++) {
        CHECK_MSG(k > prev, "key %d after %d", k, prev);
        prev = k;
        lora_param back;
        CHECK(lora_param_lookup(lora_param_name(k), &back, NULL) == LORA_OK && back == k);
    }
    /* Every LORA_P_* define of the installed header is in the table (and nothing else). */
    CHECK(n > 0 && n == count_header_keys());
    double lo, hi, def;
    CHECK_STATUS(lora_param_bounds(LORA_P_NETWORK_DIM, &lo, &hi, &def), LORA_OK);
    CHECK(lo == 1 && hi == 4096 && def == 4);
    CHECK_STATUS(lora_param_bounds(LORA_P_RESOLUTION, &lo, &hi, &def), LORA_E_INVALID_ARG);

    lora_params_free(p);
    lora_params_free(NULL);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK(host == 0);
    lora_ctx_free(ctx);
    return test_finish("test_params");
}
