/* libFuzzer target for the safetensors reader (spec/safety.md H1): any bytes in, st_parse must
 * return LORA_OK or a known status, never crash, leak or read outside the input; on LORA_OK
 * every tensor lies inside the input and every readable tensor converts to float32.
 * Build and run: see README.md in this folder. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lora_ctx *ctx;   /* created once, reused: the context must stay usable after any input */

#define REQUIRE(c) do { if (!(c)) __builtin_trap(); } while (0)

static int readable(lora_dtype t) {
    return t == LORA_DTYPE_F32 || t == LORA_DTYPE_F16 || t == LORA_DTYPE_BF16 || t == LORA_DTYPE_F64 ||
           t == LORA_DTYPE_I64 || t == LORA_DTYPE_I32 || t == LORA_DTYPE_I16 || t == LORA_DTYPE_I8 ||
           t == LORA_DTYPE_U8 || t == LORA_DTYPE_BOOL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) REQUIRE(lora_ctx_create(LORA_ABI_VERSION, &ctx) == LORA_OK);
    struct lora_file *f = NULL;
    lora_status s = st_parse(ctx, "fuzz-input", data, size, &f);
    REQUIRE(strcmp(lora_status_name(s), "LORA_E_UNKNOWN_STATUS") != 0);
    if (s != LORA_OK) {
        REQUIRE(f == NULL);
    } else {
        REQUIRE(f != NULL && f->data_start >= 8 && f->data_start <= size);
        uint64_t pos = 0;
        for (int64_t i = 0; i < f->n_tensors; i++) {
            const struct st_tensor *t = &f->tensors[i];
            REQUIRE(t->begin == pos && t->end >= t->begin && t->end <= size - f->data_start);
            pos = t->end;
            if (!readable(t->dtype)) continue;
            uint64_t n = (t->end - t->begin) * 8 / (uint64_t)t->bits;
            float *dst = malloc((size_t)(n ? n : 1) * sizeof *dst);
            REQUIRE(dst != NULL);
            REQUIRE(lora_file_read_f32(f, i, dst, n) == LORA_OK);
            free(dst);
        }
        REQUIRE(f->data_start + pos == size);
        st_close(f);
    }
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    REQUIRE(host == 0);   /* nothing kept after st_close / a failed parse */
    return 0;
}
