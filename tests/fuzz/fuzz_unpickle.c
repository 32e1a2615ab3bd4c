/* libFuzzer target for the PyTorch checkpoint reader (spec/safety.md P1-P13):
 *  - input starting with "PK": the whole reader, ckpt_read_mem (zip container + pickle + view
 *    copies);
 *  - any other input: the pickle interpreter alone, pk_load_state_dict, against a fake archive
 *    whose records "0".."15" hold 64*k bytes.
 * The run stops (__builtin_trap) when a status is unknown, when a failure returns tensors, when a
 * tensor the interpreter accepted reaches outside its storage record, or when memory is kept
 * after the result is freed. ASan/UBSan catch reads outside the input, leaks and overflow.
 * Seed corpus: tests/data/ckpt (real torch.save files). Build and run: README.md here. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/ckpt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lora_ctx *ctx;

#define REQUIRE(c) do { if (!(c)) __builtin_trap(); } while (0)

static int64_t fake_lookup(void *user, const char *key, size_t key_len, uint64_t *nbytes) {
    (void)user;
    int64_t k = 0;
    if (key_len == 0 || key_len > 2) return -1;
    for (size_t i = 0; i < key_len; i++) k = k * 10 + (key[i] - '0');
    if (k > 15) return -1;
    *nbytes = (uint64_t)k * 64;
    return k;
}

static void check_view(const struct pk_tensor *t) {
    REQUIRE(t->ndim >= 0 && t->ndim <= CKPT_MAX_RANK && t->elsize > 0 && t->offset >= 0);
    REQUIRE(t->record >= 0 && t->record <= 15 && t->record_bytes == (uint64_t)t->record * 64);
    REQUIRE(t->name_len <= CKPT_MAX_NAME && memchr(t->name, 0, t->name_len) == NULL);
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        REQUIRE(t->size[d] >= 0 && t->stride[d] >= 0);
        numel *= t->size[d];   /* cannot overflow: the interpreter checked the byte count */
    }
    if (numel == 0) return;
    __int128 last = t->offset;
    for (int d = 0; d < t->ndim; d++) last += (__int128)(t->size[d] - 1) * t->stride[d];
    REQUIRE((last + 1) * t->elsize <= (__int128)t->record_bytes);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) REQUIRE(lora_ctx_create(LORA_ABI_VERSION, &ctx) == LORA_OK);
    lora_status s;
    if (size >= 2 && data[0] == 'P' && data[1] == 'K') {
        struct tensor_map m;
        tmap_init(&m, ctx);
        s = ckpt_read_mem(ctx, "fuzz-input", data, size, &m);
        if (s != LORA_OK) REQUIRE(m.n == 0);
        for (int64_t i = 0; i < m.n; i++) {
            int64_t n = tmap_numel(&m.t[i]);
            REQUIRE(n >= 0 && (m.t[i].nbytes == 0 || m.t[i].data != NULL));
        }
        tmap_clear(&m);
    } else {
        struct pk_env env = {"fuzz-input", "archive/data.pkl", fake_lookup, NULL};
        struct pk_result res;
        s = pk_load_state_dict(ctx, data, size, &env, &res);
        if (s == LORA_OK) {
            REQUIRE(res.n >= 0 && res.t != NULL);
            for (int64_t i = 0; i < res.n; i++) check_view(&res.t[i]);
        } else {
            REQUIRE(res.n == 0 && res.vm == NULL);
        }
        pk_result_free(ctx, &res);
    }
    REQUIRE(strcmp(lora_status_name(s), "LORA_E_UNKNOWN_STATUS") != 0);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    REQUIRE(host == 0);
    return 0;
}
