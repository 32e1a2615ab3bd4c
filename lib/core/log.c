/* Logging, progress and cancellation: delivered on the calling thread only. */
#include <math.h>
#include <stdio.h>

#include "internal.h"

void lora_log(lora_ctx *ctx, lora_log_level level, const char *fmt, ...) {
    if (!ctx || !ctx->log_fn || level < ctx->log_min) return;
    char line[LORA_ERRMSG_CAP + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    ctx->log_fn(ctx->log_user, level, line);
}

lora_status lora_check_cancel(lora_ctx *ctx) {
    if (ctx && atomic_load(&ctx->cancel))
        return lora_fail(ctx, LORA_E_CANCELLED, "cancelled by lora_ctx_cancel");
    return LORA_OK;
}

lora_status lora_progress(lora_ctx *ctx, lora_phase phase, int64_t done, int64_t total, double value) {
    if (!ctx) return LORA_OK;
    if (ctx->progress_fn && ctx->progress_fn(ctx->progress_user, phase, done, total, value) != 0)
        return lora_fail(ctx, LORA_E_CANCELLED, "cancelled by the progress callback at %lld/%lld",
                         (long long)done, (long long)total);
    return lora_check_cancel(ctx);
}
