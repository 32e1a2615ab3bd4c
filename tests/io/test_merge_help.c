/* lora_merge_file with the copier thread computing too (lib/ops/merge_file.c, struct hjob):
 * kohya's default case (fp16 model, one network, precision float, save_precision fp16), where
 * every changed tensor takes the fused path that either thread may run. On 1, 2 and 3 CPU
 * threads (the copier helps on <= 2), several runs each, the file must equal the in-memory
 * merge (lora_model_cast + lora_merge_into_model + lora_model_save) byte for byte: which thread
 * computed a tensor must not show. Cancelled at the first, a middle and the last tensor (the
 * copier may still be computing), the merge leaves an existing output file as it was and no
 * temp file; nothing leaks. */
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "network/network.h"
#include "../test.h"

static const char *data_dir;
static char tmp_dir[256];

struct cancel_at { int64_t at, seen, total; };
static int32_t cancel_cb(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)value;
    struct cancel_at *c = user;
    if (phase != LORA_PHASE_MERGE) return 0;
    c->seen = done;
    c->total = total;
    return done >= c->at;
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/lora_test_merge_help_%d", (int)getpid());
    mkdir(tmp_dir, 0700);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    char *mp = test_path_join(data_dir, "sd/v1_ldm.safetensors"), *np = test_path_join(data_dir, "network/v1_kohya.safetensors");
    char mem[400], out[400];
    snprintf(mem, sizeof mem, "%s/mem.safetensors", tmp_dir);
    snprintf(out, sizeof out, "%s/stream.safetensors", tmp_dir);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, np, &net), LORA_OK);
    const double ratio = 0.8;

    /* the in-memory merge */
    lora_params *lo = NULL, *so = NULL;
    CHECK_STATUS(lora_params_create(ctx, &lo), LORA_OK);
    CHECK_STATUS(lora_params_create(ctx, &so), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_PRECISION, "float"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(so, LORA_P_SAVE_PRECISION, "fp16"), LORA_OK);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, mp, NULL, &m), LORA_OK);
    CHECK_MSG(m && m->sd.unet.n > 0 && m->sd.unet.t[0].dtype == LORA_DTYPE_F16, "fixture %s is not fp16", mp);
    CHECK_STATUS(lora_model_cast(m, LORA_DTYPE_F32), LORA_OK);
    CHECK_STATUS(lora_merge_into_model(m, (const lora_network *const *)&net, &ratio, 1), LORA_OK);
    CHECK_STATUS(lora_model_save(m, mem, so), LORA_OK);
    lora_model_free(m);

    /* streamed, on 1-3 threads, 3 runs each */
    for (int th = 1; th <= 3; th++) {
        CHECK_STATUS(lora_ctx_set_threads(ctx, th), LORA_OK);
        int same = 0;
        for (int run = 0; run < 3; run++) {
            lora_status s = lora_merge_file(ctx, mp, (const lora_network *const *)&net, &ratio, 1, out, lo);
            CHECK_MSG(s == LORA_OK, "merge_file on %d threads: %s", th, lora_errmsg(ctx));
            int eq = test_same_file(mem, out);
            CHECK_MSG(eq, "%d threads, run %d: streamed file differs from the in-memory merge", th, run);
            same += eq;
            unlink(out);
        }
        printf("%d threads: %d of 3 streamed merges == in-memory merge\n", th, same);
    }

    /* cancelled at the first, a middle and the last tensor: the old output stays */
    CHECK_STATUS(lora_ctx_set_threads(ctx, 2), LORA_OK);
    static const char old[] = "an older file that a cancelled merge must leave alone";
    struct cancel_at probe = {1 << 30, 0, 0};
    lora_ctx_set_progress(ctx, cancel_cb, &probe);
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)&net, &ratio, 1, out, lo), LORA_OK);
    unlink(out);
    int64_t total = probe.total;
    CHECK_MSG(total > 2, "progress total %lld", (long long)total);
    int64_t ats[3] = {1, total / 2, total};
    for (int k = 0; k < 3 && total > 2; k++) {
        FILE *f = fopen(out, "wb");
        CHECK_MSG(f && fwrite(old, 1, sizeof old, f) == sizeof old, "cannot write %s", out);
        if (f) fclose(f);
        struct cancel_at c = {ats[k], 0, 0};
        lora_ctx_set_progress(ctx, cancel_cb, &c);
        CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)&net, &ratio, 1, out, lo), LORA_E_CANCELLED);
        size_t n = 0;
        uint8_t *b = test_slurp(out, &n);
        CHECK_MSG(b && n == sizeof old && memcmp(b, old, n) == 0, "cancel at %lld of %lld: %s changed", (long long)ats[k],
                  (long long)total, out);
        free(b);
        CHECK_MSG(test_temp_files(tmp_dir) == 0, "cancel at %lld: a temp file is left in %s", (long long)ats[k], tmp_dir);
        CHECK_MSG(c.seen == ats[k], "cancel at %lld: progress went on to %lld", (long long)ats[k], (long long)c.seen);
        unlink(out);
    }
    lora_ctx_set_progress(ctx, NULL, NULL);

    unlink(mem);
    lora_params_free(lo);
    lora_params_free(so);
    lora_network_free(net);
    free(mp);
    free(np);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    rmdir(tmp_dir);
    return test_finish("test_merge_help");
}
