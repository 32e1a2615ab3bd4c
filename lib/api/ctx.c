/* lora_ctx: creation with the ABI check, hooks, callbacks, backend choice, busy guard. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "backend/backend.h"

int lora_ctx_valid(const lora_ctx *ctx) {
    return ctx != NULL && ctx->magic == LORA_CTX_MAGIC;
}

lora_status lora_enter(lora_ctx *ctx) {
    if (!lora_ctx_valid(ctx)) return LORA_E_INVALID_ARG;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&ctx->busy, &expected, 1))
        return LORA_E_BUSY;   /* no message: the other call owns errmsg right now */
    lora_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    return LORA_OK;
}

void lora_leave(lora_ctx *ctx) {
    if (ctx) atomic_store(&ctx->busy, 0);
}

static int32_t online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 1024 ? 1024 : (int32_t)n);
}

LORA_API lora_status lora_ctx_create(uint32_t abi_version, lora_ctx **out) {
    if (!out) return LORA_E_INVALID_ARG;
    *out = NULL;
    if (abi_version != LORA_ABI_VERSION) return LORA_E_ABI_MISMATCH;
    /* The context itself uses plain calloc: the hooks can only be set after it exists. */
    lora_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return LORA_E_NOMEM;
    ctx->magic = LORA_CTX_MAGIC;
    atomic_init(&ctx->busy, 0);
    atomic_init(&ctx->cancel, 0);
    atomic_init(&ctx->refs, 1);
    atomic_init(&ctx->host_bytes, 0);
    atomic_init(&ctx->host_peak, 0);
    ctx->log_min = LORA_LOG_INFO;
    ctx->n_threads = online_cpus();
    ctx->device = 0;
    ctx->backend_kind = LORA_BACKEND_CPU;
    lora_status s = lora_backend_cpu_create(ctx, &ctx->backend);
    if (s != LORA_OK) {
        free(ctx);
        return s;
    }
    *out = ctx;
    return LORA_OK;
}

static void ctx_destroy(lora_ctx *ctx) {
    lora_backend_free(ctx->backend);
    ctx->magic = 0;
    free(ctx);
}

void lora_ctx_retain(lora_ctx *ctx) {
    atomic_fetch_add(&ctx->refs, 1);
}

void lora_ctx_release(lora_ctx *ctx) {
    if (atomic_fetch_sub(&ctx->refs, 1) == 1) ctx_destroy(ctx);
}

LORA_API void lora_ctx_free(lora_ctx *ctx) {
    if (!lora_ctx_valid(ctx) || ctx->freed) return;
    ctx->freed = 1;
    lora_ctx_release(ctx);
}

LORA_API lora_status lora_ctx_set_allocator(lora_ctx *ctx, lora_alloc_fn alloc_fn,
                                            lora_free_fn free_fn, void *user) {
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    if ((alloc_fn == NULL) != (free_fn == NULL))
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "allocator: alloc and free hooks must both be set or both be NULL");
    else if (ctx->n_allocs > 0 || atomic_load(&ctx->host_bytes) > 0)
        s = lora_fail(ctx, LORA_E_INVALID_ARG,
                      "allocator: hooks can only be set before the context's first allocation (%lld made)",
                      (long long)ctx->n_allocs);
    else {
        ctx->alloc_fn = alloc_fn;
        ctx->free_fn = free_fn;
        ctx->alloc_user = user;
    }
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_ctx_set_backend(lora_ctx *ctx, lora_backend backend, int32_t device) {
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    struct lora_backend_impl *be = NULL;
    lora_backend kind = backend;
    if (backend == LORA_BACKEND_AUTO)
        kind = lora_backend_available(LORA_BACKEND_CUDA) ? LORA_BACKEND_CUDA : LORA_BACKEND_CPU;
    if (kind == LORA_BACKEND_CPU) {
        s = lora_backend_cpu_create(ctx, &be);
    } else if (kind == LORA_BACKEND_CUDA) {
        if (device < 0) s = lora_fail(ctx, LORA_E_INVALID_ARG, "set_backend: device index %d is negative", device);
        else s = lora_backend_cuda_create(ctx, device, &be);
    } else {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "set_backend: unknown backend %d", backend);
    }
    if (s == LORA_OK) {
        lora_backend_free(ctx->backend);
        ctx->backend = be;
        ctx->backend_kind = kind;
        ctx->device = kind == LORA_BACKEND_CUDA ? device : 0;
        lora_log(ctx, LORA_LOG_INFO, "backend: %s", be->iface->name);
    }
    lora_leave(ctx);
    return s;
}

LORA_API lora_backend lora_ctx_get_backend(const lora_ctx *ctx) {
    return lora_ctx_valid(ctx) ? ctx->backend_kind : -1;
}

LORA_API lora_status lora_ctx_set_threads(lora_ctx *ctx, int32_t n_threads) {
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    if (n_threads < 0 || n_threads > 1024)
        s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "threads: %d is outside 0..1024", n_threads);
    else
        ctx->n_threads = n_threads == 0 ? online_cpus() : n_threads;
    lora_leave(ctx);
    return s;
}

LORA_API void lora_ctx_set_log(lora_ctx *ctx, lora_log_fn fn, void *user, lora_log_level min_level) {
    if (!lora_ctx_valid(ctx)) return;
    ctx->log_fn = fn;
    ctx->log_user = user;
    ctx->log_min = min_level;
}

LORA_API void lora_ctx_set_progress(lora_ctx *ctx, lora_progress_fn fn, void *user) {
    if (!lora_ctx_valid(ctx)) return;
    ctx->progress_fn = fn;
    ctx->progress_user = user;
}

LORA_API void lora_ctx_cancel(lora_ctx *ctx) {
    if (ctx) atomic_store(&ctx->cancel, 1);
}

LORA_API lora_status lora_ctx_memory(const lora_ctx *ctx, uint64_t *host_bytes, uint64_t *host_peak,
                                     uint64_t *device_bytes, uint64_t *device_free) {
    if (!lora_ctx_valid(ctx)) return LORA_E_INVALID_ARG;
    if (host_bytes) *host_bytes = atomic_load(&((lora_ctx *)ctx)->host_bytes);
    if (host_peak) *host_peak = atomic_load(&((lora_ctx *)ctx)->host_peak);
    uint64_t used = 0, avail = 0;
    if (ctx->backend && ctx->backend->iface->memory)
        ctx->backend->iface->memory(ctx->backend, &used, &avail);
    if (device_bytes) *device_bytes = used;
    if (device_free) *device_free = avail;
    return LORA_OK;
}
