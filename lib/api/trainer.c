/* Public lora_trainer API (include/lora/lora.h, "Training"): argument checks, the context
 * guard, and the stats; the loop is lib/train/trainer.c. */
#include <math.h>
#include <string.h>

#include "train/trainer.h"

static int tr_valid(const lora_trainer *t) { return t && t->magic == LORA_TRAINER_MAGIC; }

LORA_API lora_status lora_trainer_create(lora_model *model, lora_network *net, const lora_params *opts,
                                         lora_trainer **out) {
    if (out) *out = NULL;
    if (!model || model->magic != LORA_MODEL_MAGIC || !net || net->magic != LORA_NETWORK_MAGIC)
        return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    if (!out) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_create: out must not be NULL");
    else if (net->ctx != ctx) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_create: the network belongs to another context");
    if (s == LORA_OK) s = trainer_create(model, net, opts, NULL, out);
    const char *resume = lora_params_str(opts, LORA_P_RESUME);
    if (s == LORA_OK && resume && resume[0]) {
        s = trainer_load_state(*out, resume);
        if (s != LORA_OK) {
            trainer_free(*out);
            *out = NULL;
        }
    }
    if (s == LORA_OK) {
        lora_ctx_retain(ctx);
        lora_log(ctx, LORA_LOG_INFO, "trainer: %lld images (%lld reg), %lld batches per epoch, %lld epochs, %lld steps",
                 (long long)(*out)->src.n_train_images, (long long)(*out)->src.n_reg_images,
                 (long long)(*out)->src.batches_per_epoch, (long long)(*out)->num_epochs,
                 (long long)(*out)->max_train_steps);
    }
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_trainer_step(lora_trainer *tr, int64_t n_steps, int64_t *steps_done) {
    if (steps_done) *steps_done = 0;
    if (!tr_valid(tr)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tr->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = n_steps < 0 ? lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_step: n_steps %lld < 0", (long long)n_steps)
                                : trainer_step(tr, n_steps, steps_done);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_trainer_run(lora_trainer *tr) {
    if (!tr_valid(tr)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tr->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = trainer_run(tr);
    lora_leave(ctx);
    return s;
}

static lora_status stat(const lora_trainer *tr, lora_train_stat key, double *v) {
    switch (key) {
    case LORA_STAT_STEP: *v = (double)tr->global_step; break;
    case LORA_STAT_EPOCH: *v = (double)(tr->epoch + 1 > tr->num_epochs ? tr->num_epochs : tr->epoch + 1); break;
    case LORA_STAT_LAST_LOSS: *v = tr->global_step ? tr->last_loss : NAN; break;
    case LORA_STAT_AVG_LOSS: *v = tr->loss_n ? tr->loss_total / (double)tr->loss_n : NAN; break;
    case LORA_STAT_LR: *v = tr->lr_unet; break;
    case LORA_STAT_GRAD_NORM: *v = tr->global_step ? tr->last_norm : NAN; break;
    case LORA_STAT_SKIPPED_STEPS: *v = (double)tr->scaler.skipped; break;
    case LORA_STAT_IMAGES_PER_S: *v = tr->images_per_s; break;
    case LORA_STAT_MAX_STEPS: *v = (double)tr->max_train_steps; break;
    case LORA_STAT_EPOCHS: *v = (double)tr->num_epochs; break;
    case LORA_STAT_BATCHES_PER_EPOCH: *v = (double)tr->src.batches_per_epoch; break;
    case LORA_STAT_LR_TEXT_ENCODER: *v = tr->lr_te; break;
    case LORA_STAT_LOSS_SCALE: *v = (double)tr->scaler.scale; break;
    default: return LORA_E_UNKNOWN_KEY;
    }
    return LORA_OK;
}

LORA_API lora_status lora_trainer_get_int(const lora_trainer *tr, lora_train_stat key, int64_t *out) {
    if (!tr_valid(tr) || !out) return LORA_E_INVALID_ARG;
    double v = 0;
    LORA_TRY(stat(tr, key, &v));
    *out = isfinite(v) ? (int64_t)v : 0;
    return LORA_OK;
}

LORA_API lora_status lora_trainer_get_float(const lora_trainer *tr, lora_train_stat key, double *out) {
    if (!tr_valid(tr) || !out) return LORA_E_INVALID_ARG;
    return stat(tr, key, out);
}

LORA_API lora_status lora_trainer_save_state(const lora_trainer *tr, const char *path) {
    if (!tr_valid(tr)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tr->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = path ? trainer_save_state(tr, path)
                         : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_save_state: path must not be NULL");
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_trainer_load_state(lora_trainer *tr, const char *path) {
    if (!tr_valid(tr)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tr->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = path ? trainer_load_state(tr, path)
                         : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_load_state: path must not be NULL");
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_trainer_save_network(lora_trainer *tr, const char *path) {
    if (!tr_valid(tr)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = tr->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = path ? trainer_save_network(tr, path)
                         : lora_fail(ctx, LORA_E_INVALID_ARG, "lora_trainer_save_network: path must not be NULL");
    lora_leave(ctx);
    return s;
}

LORA_API void lora_trainer_free(lora_trainer *tr) {
    if (!tr_valid(tr)) return;
    lora_ctx *ctx = tr->ctx;
    trainer_free(tr);
    lora_ctx_release(ctx);
}
