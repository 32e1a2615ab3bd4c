/* Built against the installed-style public header and the shared library only: the
 * header's version macros agree with the library, and a mismatched ABI is refused. */
#include <string.h>

#include <lora/lora.h>

#include "../test.h"

int main(void) {
    CHECK(lora_abi_version() == LORA_ABI_VERSION);
    CHECK(lora_version() == LORA_VERSION_NUMBER);
    CHECK(strcmp(lora_version_string(), LORA_VERSION_STRING) == 0);
    lora_ctx *ctx = (lora_ctx *)&ctx;   /* must be reset to NULL on failure */
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION + 1, &ctx), LORA_E_ABI_MISMATCH);
    CHECK(ctx == NULL);
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION - 1, &ctx), LORA_E_ABI_MISMATCH);
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_ctx_free(ctx);
    return test_finish("test_abi_header");
}
