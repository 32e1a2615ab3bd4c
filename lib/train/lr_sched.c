/* Learning-rate schedules of diffusers' get_scheduler (0.10.2 schedule functions; kohya FEB's
 * get_scheduler_fix passes num_cycles and power), computed as Python does: in double, the
 * LambdaLR multiplier times the group's base lr. See train.h. */
#include <math.h>
#include <string.h>

#include "train/train.h"

static const char *const kind_names[] = {
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))

void train_lr_schedule_default(struct train_lr_schedule *s) {
    memset(s, 0, sizeof *s);
    s->kind = TRAIN_LR_CONSTANT;
    s->total = 1;
    s->num_cycles = 1;
    s->power = 1;
    s->lr_end = 1e-7;
}

lora_status train_lr_kind_parse(lora_ctx *ctx, const char *name, enum train_lr_kind *kind) {
    if (!name || !kind) return lora_fail(ctx, LORA_E_INVALID_ARG, "train_lr_kind_parse: NULL argument");
    for (int i = 0; i < N_KINDS; i++)
        if (strcmp(name, kind_names[i]) == 0) {
            *kind = (enum train_lr_kind)i;
            return LORA_OK;
        }
    return lora_fail(ctx, LORA_E_INVALID_ARG,
                     "unknown lr_scheduler '%s' (constant, constant_with_warmup, linear, cosine, "
                     "cosine_with_restarts, polynomial)", name);
}

const char *train_lr_kind_name(enum train_lr_kind kind) {
    return (int)kind >= 0 && (int)kind < N_KINDS ? kind_names[kind] : "?";
}

static double max1(int64_t x) { return (double)(x > 1 ? x : 1); }

double train_lr_factor(const struct train_lr_schedule *s, double base_lr, int64_t step) {
    const int64_t w = s->warmup, total = s->total;
    if (s->kind == TRAIN_LR_CONSTANT) return 1.0;
    if (step < w) return (double)step / max1(w);
    switch (s->kind) {
    case TRAIN_LR_CONSTANT_WITH_WARMUP:
        return 1.0;
    case TRAIN_LR_LINEAR: {
        double f = (double)(total - step) / max1(total - w);
        return f > 0.0 ? f : 0.0;
    }
    case TRAIN_LR_COSINE: {
        double progress = (double)(step - w) / max1(total - w);
        double f = 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress));
        return f > 0.0 ? f : 0.0;
    }
    case TRAIN_LR_COSINE_WITH_RESTARTS: {
        double progress = (double)(step - w) / max1(total - w);
        if (progress >= 1.0) return 0.0;
        double f = 0.5 * (1.0 + cos(M_PI * fmod(s->num_cycles * progress, 1.0)));
        return f > 0.0 ? f : 0.0;
    }
    case TRAIN_LR_POLYNOMIAL: {
        double lr_init = s->lr_init > 0 ? s->lr_init : base_lr;
        if (step > total) return s->lr_end / lr_init;
        int64_t decay_steps = total - w;
        /* warmup == total: Python divides by zero at step == total; keep the end value */
        double pct = decay_steps > 0 ? 1.0 - (double)(step - w) / (double)decay_steps : 0.0;
        double decay = (lr_init - s->lr_end) * pow(pct, s->power) + s->lr_end;
        return decay / lr_init;
    }
    default:
        return 1.0;
    }
}

double train_lr_at(const struct train_lr_schedule *s, double base_lr, int64_t step) {
    return base_lr * train_lr_factor(s, base_lr, step);
}
