/* The public lora_trainer API (include/lora/lora.h only) on a DreamBooth folder this test writes
 * (uncompressed 24-bit BMP images, which kohya's glob and our reader take, with .caption
 * files): create, step, stats, the progress callback (one LORA_PHASE_TRAIN_STEP report per
 * optimizer step, value = LORA_STAT_LAST_LOSS, done = LORA_STAT_STEP), cancel from the
 * callback (LORA_E_CANCELLED, steps_done counts the finished steps), save_state / load_state
 * into a second trainer continuing with identical losses, save_network, and the stats'
 * hand-derived values (batches per epoch, epochs, max steps for max_train_epochs). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lora/lora.h>

#include "../test.h"

static void put32(FILE *f, uint32_t v) { for (int i = 0; i < 4; i++) fputc((int)(v >> (8 * i)) & 255, f); }
static void put16(FILE *f, uint16_t v) { fputc(v & 255, f); fputc(v >> 8, f); }

static int write_bmp(const char *path, int w, int h, uint8_t r, uint8_t g, uint8_t b) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    uint32_t row = (uint32_t)((w * 3 + 3) & ~3), size = 54 + row * (uint32_t)h;
    fputc('B', f), fputc('M', f), put32(f, size), put32(f, 0), put32(f, 54);
    put32(f, 40), put32(f, (uint32_t)w), put32(f, (uint32_t)h), put16(f, 1), put16(f, 24), put32(f, 0);
    put32(f, row * (uint32_t)h), put32(f, 2835), put32(f, 2835), put32(f, 0), put32(f, 0);
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) fputc(b, f), fputc(g, f), fputc(r, f);
        for (uint32_t k = (uint32_t)w * 3; k < row; k++) fputc(0, f);
    }
    return fclose(f);
}

struct rec {
    int64_t n, cancel_at;
    double value[64];
    int64_t done[64], total;
};

static int32_t on_progress(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    struct rec *r = user;
    if (phase != LORA_PHASE_TRAIN_STEP) return 0;
    if (r->n < 64) {
        r->value[r->n] = value;
        r->done[r->n] = done;
        r->n++;
    }
    r->total = total;
    return r->cancel_at > 0 && done == r->cancel_at;
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) data = "tests/data";
    char dir[256], sub[300], path[400], model_path[1024], state[400], out[400];
    snprintf(dir, sizeof dir, "/tmp/lora-train-api-%d", (int)getpid());
    snprintf(sub, sizeof sub, "%s/3_red thing", dir);
    mkdir(dir, 0700);
    mkdir(sub, 0700);
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/img%d.bmp", sub, i);
        CHECK(write_bmp(path, 64, 64, (uint8_t)(200 + 20 * i), 30, 40) == 0);
        snprintf(path, sizeof path, "%s/img%d.caption", sub, i);
        FILE *f = fopen(path, "w");
        if (f) fputs(i ? "a red thing, square\n" : "a red thing\n", f), fclose(f);
    }
    snprintf(model_path, sizeof model_path, "%s/sd/v1_diffusers", data);
    snprintf(state, sizeof state, "%s/state.safetensors", dir);
    snprintf(out, sizeof out, "%s/net.safetensors", dir);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, model_path, NULL, &model), LORA_OK);
    lora_params *p = NULL;
    CHECK_STATUS(lora_params_create(ctx, &p), LORA_OK);
    lora_params_parse(p, "train_data_dir", dir);
    lora_params_parse(p, "resolution", "64");
    lora_params_parse(p, "learning_rate", "1e-3");
    lora_params_parse(p, "seed", "11");
    lora_params_parse(p, "max_train_epochs", "4");   /* 6 batches per epoch -> 24 steps */
    lora_params_parse(p, "train_batch_size", "1");
    lora_params_parse(p, "network_dim", "2");
    lora_network *n1 = NULL, *n2 = NULL;
    lora_trainer *t1 = NULL, *t2 = NULL;
    if (model) {
        CHECK_STATUS(lora_network_create(model, p, &n1), LORA_OK);
        CHECK_STATUS(lora_network_create(model, p, &n2), LORA_OK);
    }
    if (n1) CHECK_STATUS(lora_trainer_create(model, n1, p, &t1), LORA_OK);
    if (!t1) {
        fprintf(stderr, "create: %s\n", lora_errmsg(ctx));
        return test_finish("test_train_api");
    }
    int64_t v = 0;
    double d = 0;
    CHECK(lora_trainer_get_int(t1, LORA_STAT_BATCHES_PER_EPOCH, &v) == LORA_OK && v == 6);   /* 2 images x 3 repeats */
    CHECK(lora_trainer_get_int(t1, LORA_STAT_MAX_STEPS, &v) == LORA_OK && v == 24);
    CHECK(lora_trainer_get_int(t1, LORA_STAT_EPOCHS, &v) == LORA_OK && v == 4);
    CHECK(lora_trainer_get_int(t1, LORA_STAT_STEP, &v) == LORA_OK && v == 0);
    CHECK(lora_trainer_get_float(t1, LORA_STAT_LAST_LOSS, &d) == LORA_OK && isnan(d));
    CHECK(lora_trainer_get_float(t1, LORA_STAT_LOSS_SCALE, &d) == LORA_OK && d == 1.0);
    CHECK_STATUS(lora_trainer_get_int(t1, 999, &v), LORA_E_UNKNOWN_KEY);
    struct rec r1 = {0};
    lora_ctx_set_progress(ctx, on_progress, &r1);
    int64_t done = 0;
    CHECK_STATUS(lora_trainer_step(t1, 5, &done), LORA_OK);
    CHECK(done == 5 && r1.n == 5 && r1.total == 24);
    for (int i = 0; i < r1.n; i++) CHECK(r1.done[i] == i + 1 && isfinite(r1.value[i]) && r1.value[i] > 0);
    CHECK(lora_trainer_get_float(t1, LORA_STAT_LAST_LOSS, &d) == LORA_OK && d == r1.value[4]);
    CHECK(lora_trainer_get_float(t1, LORA_STAT_GRAD_NORM, &d) == LORA_OK && d > 0 && isfinite(d));
    CHECK(lora_trainer_get_float(t1, LORA_STAT_LR, &d) == LORA_OK && d == 1e-3);
    CHECK(lora_trainer_get_float(t1, LORA_STAT_IMAGES_PER_S, &d) == LORA_OK && d > 0);
    /* average: kohya's running mean over the epoch's positions (5 so far) */
    double mean = (r1.value[0] + r1.value[1] + r1.value[2] + r1.value[3] + r1.value[4]) / 5;
    CHECK(lora_trainer_get_float(t1, LORA_STAT_AVG_LOSS, &d) == LORA_OK && fabs(d - mean) <= 1e-12 * mean);
    CHECK_STATUS(lora_trainer_save_state(t1, state), LORA_OK);
    /* cancel from the callback at step 8: steps 6..8 done */
    r1.cancel_at = 8;
    CHECK_STATUS(lora_trainer_step(t1, 100, &done), LORA_E_CANCELLED);
    CHECK(done == 3);
    CHECK(lora_trainer_get_int(t1, LORA_STAT_STEP, &v) == LORA_OK && v == 8);
    CHECK(lora_trainer_get_int(t1, LORA_STAT_EPOCH, &v) == LORA_OK && v == 2);
    r1.cancel_at = 0;
    CHECK_STATUS(lora_trainer_step(t1, 2, &done), LORA_OK);
    CHECK(done == 2);
    /* a second trainer resumes from step 5 and sees the same losses for steps 6..10 */
    struct rec r2 = {0};
    lora_ctx_set_progress(ctx, on_progress, &r2);
    if (n2) CHECK_STATUS(lora_trainer_create(model, n2, p, &t2), LORA_OK);
    if (t2) {
        CHECK_STATUS(lora_trainer_load_state(t2, state), LORA_OK);
        CHECK(lora_trainer_get_int(t2, LORA_STAT_STEP, &v) == LORA_OK && v == 5);
        CHECK_STATUS(lora_trainer_step(t2, 5, &done), LORA_OK);
        int same = r2.n == 5;
        for (int i = 0; same && i < 5; i++) same = memcmp(&r2.value[i], &r1.value[5 + i], sizeof(double)) == 0;
        CHECK_MSG(same, "resumed losses differ");
        /* run to the end: 24 steps, the final save needs output_dir (none here) */
        CHECK_STATUS(lora_trainer_run(t2), LORA_OK);
        CHECK(lora_trainer_get_int(t2, LORA_STAT_STEP, &v) == LORA_OK && v == 24);
        CHECK_STATUS(lora_trainer_step(t2, 3, &done), LORA_OK);
        CHECK(done == 0);
        CHECK_STATUS(lora_trainer_save_network(t2, out), LORA_OK);
        lora_network *back = NULL;
        CHECK_STATUS(lora_network_load(ctx, out, &back), LORA_OK);
        char buf[64];
        if (back) {
            CHECK(lora_network_metadata_get(back, "ss_steps", buf, sizeof buf, NULL) == LORA_OK && strcmp(buf, "24") == 0);
            CHECK(lora_network_metadata_get(back, "ss_num_epochs", buf, sizeof buf, NULL) == LORA_OK && strcmp(buf, "4") == 0);
            CHECK(lora_network_metadata_get(back, "ss_dataset_dirs", buf, sizeof buf, NULL) == LORA_OK &&
                  strcmp(buf, "{\"3_red thing\": {\"n_repeats\": 3, \"img_count\": 2}}") == 0);
        }
        lora_network_free(back);
    }
    lora_ctx_set_progress(ctx, NULL, NULL);
    lora_trainer_free(t1);
    lora_trainer_free(t2);
    lora_trainer_free(NULL);
    lora_network_free(n1);
    lora_network_free(n2);
    lora_params_free(p);
    lora_model_free(model);
    lora_ctx_free(ctx);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return test_finish("test_train_api");
}
