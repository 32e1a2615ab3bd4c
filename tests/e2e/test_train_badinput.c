/* Bad input to the trainer (suite badinput): options kohya refuses or we cannot do yet, broken
 * or foreign state files, a network_weights file of another shape, a non-finite loss. Each is
 * a status with a message naming the option/file, never a crash, and a refused state leaves
 * the trainer usable. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "network/network.h"
#include "train/trainer.h"
#include "../test.h"

static float g_val = 0.5f;

static lora_status one_batch(void *user, int64_t epoch, int64_t index, struct ds_batch *b) {
    (void)epoch;
    (void)index;
    static float px[3 * 64 * 64], lw[1] = {1};
    static const char *caps[1] = {"x"};
    static int32_t reg[1];
    for (int i = 0; i < 3 * 64 * 64; i++) px[i] = *(float *)user;
    memset(b, 0, sizeof *b);
    b->n = 1, b->width = 64, b->height = 64, b->pixels = px, b->captions = caps, b->loss_weights = lw, b->is_reg = reg;
    return LORA_OK;
}

static struct lora_trainer *make(lora_ctx *ctx, lora_model *model, lora_network *net, lora_params *p, lora_status want,
                                 const char *needle) {
    struct trainer_source src = {&g_val, 1, 0, 1, one_batch};
    struct lora_trainer *tr = NULL;
    lora_status s = trainer_create(model, net, p, &src, &tr);
    CHECK_MSG(s == want, "trainer_create: %s (%s), want %s", lora_status_name(s), lora_errmsg(ctx), lora_status_name(want));
    if (needle) CHECK_MSG(strstr(lora_errmsg(ctx), needle) != NULL, "message '%s' lacks '%s'", lora_errmsg(ctx), needle);
    return tr;
}

static void base(lora_params *p) {
    lora_params_reset(p);
    lora_params_set_string(p, LORA_P_RESOLUTION, "64");
    lora_params_set_int(p, LORA_P_MAX_TRAIN_STEPS, 4);
    lora_params_set_int(p, LORA_P_SEED, 1);
    lora_params_set_float(p, LORA_P_LEARNING_RATE, 1e-3);
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) data = "tests/data";
    char path[1024], tmp[256], tmp2[256], lora_path[256];
    snprintf(tmp, sizeof tmp, "/tmp/lora-train-bad-%d.safetensors", (int)getpid());
    snprintf(tmp2, sizeof tmp2, "/tmp/lora-train-bad2-%d.safetensors", (int)getpid());
    snprintf(lora_path, sizeof lora_path, "/tmp/lora-train-bad-net-%d.safetensors", (int)getpid());
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", data);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_network *net = NULL;
    if (model) CHECK_STATUS(lora_network_create(model, NULL, &net), LORA_OK);
    if (!model || !net || !p) return test_finish("test_train_badinput");

    /* options */
    base(p);
    lora_params_set_string(p, LORA_P_OPTIMIZER_TYPE, "DAdaptation");
    make(ctx, model, net, p, LORA_E_UNSUPPORTED, "DAdaptation");
    base(p);
    lora_params_set_string(p, LORA_P_OPTIMIZER_ARGS, "weight_decay");
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "weight_decay");
    base(p);
    lora_params_set_string(p, LORA_P_OPTIMIZER_ARGS, "betas=0.9,abc");
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "betas");
    base(p);
    lora_params_set_string(p, LORA_P_OPTIMIZER_ARGS, "foo=1");
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "foo");
    base(p);
    if (lora_params_set_int(p, LORA_P_MAX_TOKEN_LENGTH, 100) == LORA_OK)
        make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "max_token_length");   /* 75, 150, 225 only */
    else
        CHECK(lora_errcode(ctx) == LORA_E_CONFIG_RANGE);
    base(p);
    lora_params_set_int(p, LORA_P_NETWORK_TRAIN_UNET_ONLY, 1);
    lora_params_set_int(p, LORA_P_NETWORK_TRAIN_TEXT_ENCODER_ONLY, 1);
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "exclude");
    base(p);
    lora_params_set_string(p, LORA_P_SAVE_MODEL_AS, "diffusers");
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "save_model_as");
    base(p);
    lora_params_set_int(p, LORA_P_CACHE_LATENTS, 1);
    lora_params_set_int(p, LORA_P_COLOR_AUG, 1);
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "cache_latents");
    /* the public API: no train_data_dir, a missing one */
    lora_trainer *pt = NULL;
    base(p);
    CHECK_STATUS(lora_trainer_create(model, net, p, &pt), LORA_E_CONFIG_RANGE);
    CHECK(pt == NULL && strstr(lora_errmsg(ctx), "train_data_dir"));
    lora_params_set_string(p, LORA_P_TRAIN_DATA_DIR, "/nonexistent/lora-train-data");
    lora_status s = lora_trainer_create(model, net, p, &pt);
    CHECK_MSG(s != LORA_OK && pt == NULL && strstr(lora_errmsg(ctx), "/nonexistent/lora-train-data"), "%s: %s",
              lora_status_name(s), lora_errmsg(ctx));
    CHECK_STATUS(lora_trainer_step(NULL, 1, NULL), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_trainer_create(model, net, NULL, NULL), LORA_E_INVALID_ARG);

    /* network_weights of another rank */
    lora_params *q = NULL;
    lora_params_create(ctx, &q);
    lora_params_set_int(q, LORA_P_NETWORK_DIM, 8);
    lora_network *n8 = NULL;
    CHECK_STATUS(lora_network_create(model, q, &n8), LORA_OK);
    if (n8) CHECK_STATUS(lora_network_save(n8, lora_path, NULL), LORA_OK);
    base(p);
    lora_params_set_string(p, LORA_P_NETWORK_WEIGHTS, lora_path);
    make(ctx, model, net, p, LORA_E_SHAPE_MISMATCH, "rank 8");
    /* a U-Net-only file while the text encoder is trained */
    lora_params_set_int(q, LORA_P_NETWORK_TRAIN_UNET_ONLY, 1);
    lora_params_set_int(q, LORA_P_NETWORK_DIM, 4);
    lora_network *nu = NULL;
    CHECK_STATUS(lora_network_create(model, q, &nu), LORA_OK);
    if (nu) CHECK_STATUS(lora_network_save(nu, lora_path, NULL), LORA_OK);
    make(ctx, model, net, p, LORA_E_CONFIG_RANGE, "network_weights");
    lora_network_free(n8);
    lora_network_free(nu);
    lora_params_free(q);

    /* state files */
    base(p);
    struct lora_trainer *tr = make(ctx, model, net, p, LORA_OK, NULL);
    if (tr) {
        int64_t done = 0;
        CHECK_STATUS(trainer_step(tr, 2, &done), LORA_OK);
        CHECK_STATUS(trainer_save_state(tr, tmp), LORA_OK);
        CHECK_STATUS(trainer_load_state(tr, "/nonexistent/state.safetensors"), LORA_E_NOT_FOUND);
        CHECK_STATUS(trainer_load_state(tr, lora_path), LORA_E_NOT_A_MODEL);
        CHECK(strstr(lora_errmsg(ctx), lora_path) != NULL);
        /* truncated */
        size_t n = 0;
        uint8_t *b = test_slurp(tmp, &n);
        FILE *f = fopen(tmp2, "wb");
        if (f && b) {
            fwrite(b, 1, n / 2, f);
            fclose(f);
            s = trainer_load_state(tr, tmp2);
            CHECK_MSG(s >= 200 && s < 300, "truncated state: %s", lora_status_name(s));
        }
        /* counters out of range: rewrite the state with global_step = 1000 */
        struct lora_file *sf = NULL;
        CHECK_STATUS(st_open(ctx, tmp, &sf), LORA_OK);
        if (sf) {
            struct st_write_tensor t[8];
            int64_t shp[8];
            const char *k[32], *v[32];
            for (int64_t i = 0; i < sf->n_tensors && i < 8; i++) {
                shp[i] = sf->tensors[i].shape[0];
                t[i] = (struct st_write_tensor){sf->tensors[i].name, sf->tensors[i].dtype, 1, &shp[i], st_data(sf, i)};
            }
            for (int64_t i = 0; i < sf->n_meta && i < 32; i++) {
                k[i] = sf->meta_keys[i];
                v[i] = strcmp(k[i], "global_step") == 0 ? "1000" : sf->meta_vals[i];
            }
            CHECK_STATUS(st_write(ctx, tmp2, t, sf->n_tensors, k, v, sf->n_meta), LORA_OK);
            st_close(sf);
            CHECK_STATUS(trainer_load_state(tr, tmp2), LORA_E_RESUME_MISMATCH);
            CHECK(strstr(lora_errmsg(ctx), "counters") != NULL);
        }
        /* after all the refusals the trainer still runs from where it was */
        CHECK(tr->global_step == 2);
        CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
        CHECK(tr->global_step == 3);
        free(b);
        trainer_free(tr);
    }
    /* a non-finite loss (NaN pixels): LORA_E_NAN_LOSS, nothing advanced */
    g_val = NAN;
    tr = make(ctx, model, net, p, LORA_OK, NULL);
    if (tr) {
        int64_t done = 7;
        s = trainer_step(tr, 1, &done);
        CHECK_MSG(s == LORA_E_NAN_LOSS || s == LORA_E_NONFINITE_INPUT || s == LORA_E_NONFINITE_LATENT, "NaN: %s",
                  lora_status_name(s));
        CHECK(done == 0 && tr->global_step == 0 && tr->batch_index == 0 && tr->sched_steps == 0);
        trainer_free(tr);
    }
    /* the same under mixed_precision fp16: GradScaler skips the step, halves the scale, counts it;
     * the parameters stay, the step and the scheduler position count as kohya's loop does */
    lora_params_set_string(p, LORA_P_MIXED_PRECISION, "fp16");
    tr = make(ctx, model, net, p, LORA_OK, NULL);
    if (tr) {
        int64_t done = 0;
        float up0 = net->m[0].up[0], down0 = net->m[0].down[0];
        CHECK_STATUS(trainer_step(tr, 2, &done), LORA_OK);
        CHECK(done == 2 && tr->global_step == 2 && tr->scaler.skipped == 2 && tr->scaler.scale == 16384.0f);
        CHECK(net->m[0].up[0] == up0 && net->m[0].down[0] == down0);
        CHECK(tr->sched_steps == 0);   /* accelerate does not step the scheduler on a skipped step */
        /* finite again: training goes on with the smaller scale */
        g_val = 0.3f;
        CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
        CHECK(tr->scaler.skipped == 2 && tr->scaler.scale == 16384.0f && tr->sched_steps == 1);
        trainer_free(tr);
    }
    unlink(tmp);
    unlink(tmp2);
    unlink(lora_path);
    lora_network_free(net);
    lora_params_free(p);
    lora_model_free(model);
    lora_ctx_free(ctx);
    return test_finish("test_train_badinput");
}
