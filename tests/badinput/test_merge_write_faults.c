/* lora_merge_file when the output cannot be written (spec/safety.md: atomic output, the user's
 * files untouched): for .safetensors (writer thread, copy_file_range) and .ckpt (streamed zip)
 * outputs, EFBIG from RLIMIT_FSIZE (SIGXFSZ ignored; a disk that fills up) at several byte
 * positions (before the header, inside it, inside the copied and the computed tensors), a
 * directory that cannot hold files (/proc/self) and a missing directory. Each must fail with a
 * status and a message naming the output, leave an existing output file byte for byte as it
 * was, create no output where there was none, and leave no temp file; with the limit lifted
 * the same merge works and gives the same file as the unlimited run. */
#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "../test.h"

static char dir[256];

static lora_status merge(lora_ctx *ctx, const char *model, lora_network *net, const char *out) {
    lora_params *o = NULL;
    CHECK_STATUS(lora_params_create(ctx, &o), LORA_OK);
    CHECK_STATUS(lora_params_set_string(o, LORA_P_PRECISION, "float"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(o, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);
    const double ratio = 0.5;
    lora_status s = lora_merge_file(ctx, model, (const lora_network *const *)&net, &ratio, 1, out, o);
    lora_params_free(o);
    return s;
}

static int file_is(const char *path, const uint8_t *want, size_t n) {
    size_t got = 0;
    uint8_t *b = test_slurp(path, &got);
    int same = b && got == n && memcmp(b, want, n) == 0;
    free(b);
    return same;
}

static void faults(lora_ctx *ctx, const char *model, lora_network *net, const char *ext) {
    char out[400], fresh[400], good[400];
    snprintf(out, sizeof out, "%s/existing.%s", dir, ext);
    snprintf(fresh, sizeof fresh, "%s/fresh.%s", dir, ext);
    snprintf(good, sizeof good, "%s/good.%s", dir, ext);
    CHECK_STATUS(merge(ctx, model, net, good), LORA_OK);
    size_t full = 0;
    uint8_t *want = test_slurp(good, &full);
    CHECK(want != NULL && full > 300000);
    static const uint8_t previous[] = "the user's previous file";
    void (*old)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_FSIZE, &saved) == 0);
    const rlim_t limits[] = {0, 7, 1000, 70000, 200000, (rlim_t)full / 2, (rlim_t)full - 1};
    for (size_t i = 0; i < sizeof limits / sizeof limits[0]; i++) {
        FILE *f = fopen(out, "wb");
        CHECK(f && fwrite(previous, 1, sizeof previous, f) == sizeof previous && fclose(f) == 0);
        struct rlimit lim = saved;
        lim.rlim_cur = limits[i];
        for (int k = 0; k < 2; k++) {
            const char *p = k ? fresh : out;
            CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
            lora_status s = merge(ctx, model, net, p);
            CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);   /* lifted before checking: stderr may be a file */
            CHECK_MSG(s == LORA_E_IO || s == LORA_E_NOSPACE, ".%s limit %llu: status %d", ext,
                      (unsigned long long)limits[i], (int)s);
            CHECK_MSG(strstr(lora_errmsg(ctx), p) != NULL, ".%s limit %llu: message '%s' does not name %s", ext,
                      (unsigned long long)limits[i], lora_errmsg(ctx), p);
        }
        CHECK_MSG(file_is(out, previous, sizeof previous), ".%s limit %llu: the existing file changed", ext,
                  (unsigned long long)limits[i]);
        CHECK_MSG(access(fresh, F_OK) != 0, ".%s limit %llu: a partial output was left", ext, (unsigned long long)limits[i]);
        CHECK_MSG(test_temp_files(dir) == 0, ".%s limit %llu: temp file left", ext, (unsigned long long)limits[i]);
    }
    signal(SIGXFSZ, old);
    /* nowhere to create a file: /proc/self, a missing directory */
    char bad[400];
    CHECK(merge(ctx, model, net, "/proc/self/lora_out.safetensors") != LORA_OK);
    snprintf(bad, sizeof bad, "%s/no_such_dir/out.%s", dir, ext);
    CHECK_STATUS(merge(ctx, model, net, bad), LORA_E_NOT_FOUND);
    CHECK_MSG(strstr(lora_errmsg(ctx), bad) != NULL, "message '%s'", lora_errmsg(ctx));
    /* lifted: the same bytes as before */
    CHECK_STATUS(merge(ctx, model, net, out), LORA_OK);
    CHECK_MSG(want && file_is(out, want, full), ".%s: the merge after the failures differs", ext);
    printf(".%s output: %zu fault positions leave the old file, no partial file, no temp file\n", ext,
           sizeof limits / sizeof limits[0]);
    free(want);
    unlink(out);
    unlink(good);
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) data = "tests/data";
    snprintf(dir, sizeof dir, "/tmp/lora_test_merge_faults_%d", (int)getpid());
    mkdir(dir, 0700);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    char *model = test_path_join(data, "sd/v1_ldm.safetensors"), *np = test_path_join(data, "network/v1_kohya.safetensors");
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, np, &net), LORA_OK);
    if (net) {
        faults(ctx, model, net, "safetensors");
        faults(ctx, model, net, "ckpt");
    }
    lora_network_free(net);
    free(model);
    free(np);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    rmdir(dir);
    return test_finish("test_merge_write_faults");
}
