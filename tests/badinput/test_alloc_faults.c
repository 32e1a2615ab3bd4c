/* Allocation-failure injection (spec/safety.md H10, F6): the N-th allocation of an
 * operation fails, for every N until the operation succeeds. Each run must return
 * LORA_E_NOMEM (never crash), leak nothing (host bytes back to 0), and leave the context
 * usable. Covered: opening a safetensors file, writing one, parameter bags. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "io/safetensors.h"
#include "../test.h"

struct fail_alloc {
    int64_t calls;
    int64_t fail_at;   /* the call index that fails; -1 = none */
};

static void *fa_alloc(void *user, size_t size, size_t align) {
    struct fail_alloc *fa = user;
    if (fa->calls++ == fa->fail_at) return NULL;
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
}

static void fa_free(void *user, void *p) {
    (void)user;
    free(p);
}

static const char *data_file(const char *name, char *buf, size_t cap) {
    const char *dir = getenv("LORA_TEST_DATA");
    snprintf(buf, cap, "%s/%s", dir ? dir : "tests/data", name);
    return buf;
}

int main(void) {
    struct fail_alloc fa = {0, -1};
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK_STATUS(lora_ctx_set_allocator(ctx, fa_alloc, fa_free, &fa), LORA_OK);
    char path[4096];
    data_file("py_lora_kohya.safetensors", path, sizeof path);

    /* open */
    int64_t n;
    int nomem = 0, ok = 0;
    for (n = 0; n < 10000; n++) {
        fa.calls = 0;
        fa.fail_at = n;
        lora_file *f = NULL;
        lora_status s = lora_file_open(ctx, path, &f);
        uint64_t host = 1;
        if (s == LORA_OK) {
            ok = 1;
            CHECK(lora_file_tensor_count(f) == 18);
            lora_file_free(f);
            lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
            CHECK(host == 0);
            break;
        }
        nomem += s == LORA_E_NOMEM;
        CHECK_MSG(s == LORA_E_NOMEM, "open with allocation %lld failing: %s", (long long)n, lora_status_name(s));
        CHECK(f == NULL);
        lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
        CHECK_MSG(host == 0, "open with allocation %lld failing leaked %llu bytes", (long long)n, (unsigned long long)host);
    }
    CHECK(ok && nomem == n && n > 10);   /* every allocation of the open was exercised */
    printf("open: %lld allocation failure points, all LORA_E_NOMEM without leaks\n", (long long)n);

    /* write */
    char dir[] = "/tmp/lora-allocfault-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char out[4200];
    snprintf(out, sizeof out, "%s/out.safetensors", dir);
    float vals[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    struct st_write_tensor t[2] = {{"a", LORA_DTYPE_F32, 2, shape, vals}, {"b", LORA_DTYPE_F32, 1, shape + 1, vals}};
    const char *mk[1] = {"ss_network_dim"}, *mv[1] = {"4"};
    ok = 0;
    nomem = 0;
    for (n = 0; n < 10000; n++) {
        fa.calls = 0;
        fa.fail_at = n;
        lora_status s = st_write(ctx, out, t, 2, mk, mv, 1);
        uint64_t host = 1;
        lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
        CHECK_MSG(host == 0, "write with allocation %lld failing leaked %llu bytes", (long long)n, (unsigned long long)host);
        if (s == LORA_OK) {
            ok = 1;
            break;
        }
        nomem++;
        CHECK_MSG(s == LORA_E_NOMEM, "write with allocation %lld failing: %s", (long long)n, lora_status_name(s));
        CHECK_MSG(access(out, F_OK) != 0, "a failed write left %s", out);
    }
    CHECK(ok && n > 3);
    printf("write: %lld allocation failure points, all LORA_E_NOMEM without leaks or files\n", (long long)n);
    fa.fail_at = -1;
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, out, &f), LORA_OK);
    CHECK(lora_file_tensor_count(f) == 2);
    lora_file_free(f);
    unlink(out);
    rmdir(dir);

    /* params */
    for (n = 0; n < 100; n++) {
        fa.calls = 0;
        fa.fail_at = n;
        lora_params *p = NULL;
        lora_status s = lora_params_create(ctx, &p);
        if (s == LORA_OK) s = lora_params_set_string(p, LORA_P_OUTPUT_NAME, "my_lora");
        if (s == LORA_OK) s = lora_params_parse(p, "train_data_dir", "/data/train");
        lora_params_free(p);
        uint64_t host = 1;
        lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
        CHECK(host == 0);
        if (s == LORA_OK) break;
        CHECK_MSG(s == LORA_E_NOMEM, "params with allocation %lld failing: %s", (long long)n, lora_status_name(s));
    }
    CHECK(n == 3);   /* bag, two strings */
    lora_ctx_free(ctx);
    return test_finish("test_alloc_faults");
}
