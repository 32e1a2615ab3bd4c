/* torch.cuda.amp.GradScaler's dynamic loss scale (spec/kohya-lora.md §5.5, mixed_precision
 * fp16): see train.h. */
#include <math.h>
#include <string.h>

#include "train/train.h"

void train_scaler_init(struct train_scaler *s, int enabled) {
    memset(s, 0, sizeof *s);
    s->enabled = enabled;
    s->scale = enabled ? 65536.0f : 1.0f;
    s->growth_factor = 2.0f;
    s->backoff_factor = 0.5f;
    s->growth_interval = 2000;
}

float train_scaler_inv(const struct train_scaler *s) {
    /* GradScaler.unscale_: scale.double().reciprocal().float() */
    return (float)(1.0 / (double)s->scale);
}

int train_scaler_update(struct train_scaler *s, int found_inf) {
    if (!s->enabled) return 0;
    /* torch._amp_update_scale_ */
    if (found_inf) {
        s->scale = s->scale * s->backoff_factor;
        s->growth_tracker = 0;
        s->skipped++;
        return 1;
    }
    int64_t ok = s->growth_tracker + 1;
    if (ok == s->growth_interval) {
        float grown = s->scale * s->growth_factor;
        if (isfinite(grown)) s->scale = grown;   /* torch keeps the old scale if growth overflows */
        s->growth_tracker = 0;
    } else {
        s->growth_tracker = ok;
    }
    return 0;
}
