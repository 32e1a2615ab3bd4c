/* Status codes: pinned numbers, names, sentences, per-context messages. */
#include <string.h>

#include "internal.h"
#include "../test.h"

int main(void) {
    /* Pinned numbers (spec/safety.md 5.5 names; a renumbering must fail here). */
    CHECK(LORA_OK == 0);
    CHECK(LORA_E_INVALID_ARG == 1 && LORA_E_NOMEM == 2 && LORA_E_CANCELLED == 5);
    CHECK(LORA_E_IO == 100 && LORA_E_NOT_A_MODEL == 104);
    CHECK(LORA_E_ST_HEADER_TOO_SMALL == 200 && LORA_E_ST_SUBBYTE == 212);
    CHECK(LORA_E_CKPT_ZIP_CORRUPT == 300 && LORA_E_CONFIG_RANGE == 405);
    CHECK(LORA_E_NO_GPU == 700 && LORA_E_GPU_FATAL == 703);

    CHECK(strcmp(lora_status_name(LORA_E_ST_OFFSETS), "LORA_E_ST_OFFSETS") == 0);
    CHECK(strcmp(lora_status_name(LORA_OK), "LORA_OK") == 0);
    CHECK(strcmp(lora_status_name(12345), "LORA_E_UNKNOWN_STATUS") == 0);
    CHECK(strcmp(lora_status_string(12345), "unknown status code") == 0);

    /* Every known code has a distinct name and a sentence; the category is code / 100. */
    int known = 0;
    for (lora_status s = 0; s < 800; s++) {
        const char *n = lora_status_name(s);
        if (strcmp(n, "LORA_E_UNKNOWN_STATUS") == 0) continue;
        known++;
        CHECK_MSG(strncmp(n, "LORA_", 5) == 0, "%s", n);
        CHECK_MSG(strlen(lora_status_string(s)) > 5, "%d", s);
        for (lora_status t = 0; t < s; t++) CHECK_MSG(strcmp(n, lora_status_name(t)) != 0 || s == t, "%s twice", n);
    }
    CHECK(known == 55);   /* the number of LORA_OK/LORA_E_* defines in lora.h */

    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK(strcmp(lora_errmsg(ctx), "") == 0);
    CHECK(lora_errcode(ctx) == LORA_OK);
    /* A failing call leaves its status and a message naming the problem. */
    CHECK_STATUS(lora_ctx_set_threads(ctx, 5000), LORA_E_CONFIG_RANGE);
    CHECK(lora_errcode(ctx) == LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "5000") != NULL);
    char small[8];
    size_t need = lora_errmsg_copy(ctx, small, sizeof small);
    CHECK(need == strlen(lora_errmsg(ctx)) + 1);
    CHECK(strlen(small) == 7 && strncmp(small, lora_errmsg(ctx), 7) == 0);
    CHECK(lora_errmsg_copy(ctx, NULL, 0) == need);
    /* The next successful call clears it. */
    CHECK_STATUS(lora_ctx_set_threads(ctx, 2), LORA_OK);
    CHECK(lora_errcode(ctx) == LORA_OK && lora_errmsg(ctx)[0] == '\0');
    CHECK(strcmp(lora_errmsg(NULL), "no context") == 0);
    CHECK(lora_errcode(NULL) == LORA_E_INVALID_ARG);
    lora_ctx_free(ctx);
    return test_finish("test_status");
}
