/* Private umbrella header: full definitions of the public handles and the helpers every
 * layer uses (errors, allocation, logging, cancellation). Never installed. */
#ifndef LORA_INTERNAL_H
#define LORA_INTERNAL_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "lora.h"
#include "config.h"
#include "core/checked.h"

#define LORA_ERRMSG_CAP 1024

struct lora_backend_impl;   /* lib/backend/backend.h */

#define LORA_CTX_MAGIC 0x4c4f5241u /* "LORA" */

struct lora_ctx {
    uint32_t magic;
    atomic_int busy;          /* guards against two threads using one context */
    atomic_int cancel;        /* set by lora_ctx_cancel from any thread */
    atomic_int refs;          /* 1 for the owner + 1 per live child object */
    int freed;                /* lora_ctx_free was called; last child release frees */

    lora_status err;
    char errmsg[LORA_ERRMSG_CAP];

    lora_alloc_fn alloc_fn;
    lora_free_fn free_fn;
    void *alloc_user;
    atomic_uint_least64_t host_bytes;
    atomic_uint_least64_t host_peak;
    int64_t n_allocs;         /* allocations made so far (hooks may only change at 0) */

    lora_log_fn log_fn;
    void *log_user;
    lora_log_level log_min;
    lora_progress_fn progress_fn;
    void *progress_user;

    int32_t n_threads;
    lora_backend backend_kind;
    int32_t device;
    struct lora_backend_impl *backend;   /* NULL for CPU (the CPU backend is stateless) */
};

/* Records `s` and a formatted message on ctx (ctx may be NULL) and returns `s`. */
lora_status lora_fail(lora_ctx *ctx, lora_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void lora_clear_error(lora_ctx *ctx);

/* Logging on the calling thread; no-op when no sink is set or below the level. */
void lora_log(lora_ctx *ctx, lora_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Progress report; returns LORA_E_CANCELLED (with message) when the callback or
 * lora_ctx_cancel asked to stop, else LORA_OK. */
lora_status lora_progress(lora_ctx *ctx, lora_phase phase, int64_t done, int64_t total, double value);
/* Cancellation check for safe points that do not report progress. */
lora_status lora_check_cancel(lora_ctx *ctx);

/* Host memory through the context's hooks. Alignment is 64 bytes. On failure returns NULL
 * and records LORA_E_NOMEM with the size on ctx. lora_free(ctx, NULL) is a no-op. */
void *lora_malloc(lora_ctx *ctx, size_t size);
void *lora_calloc(lora_ctx *ctx, size_t n, size_t size);
void lora_free(lora_ctx *ctx, void *ptr);
char *lora_strdup(lora_ctx *ctx, const char *s);

/* Entry/exit of a public call on a context: sets busy (LORA_E_BUSY if already set), clears
 * the previous error and the cancel flag. */
lora_status lora_enter(lora_ctx *ctx);
void lora_leave(lora_ctx *ctx);
int lora_ctx_valid(const lora_ctx *ctx);

/* Reference counting so child objects keep their context alive. */
void lora_ctx_retain(lora_ctx *ctx);
void lora_ctx_release(lora_ctx *ctx);

/* Threads to use for a CPU loop. */
static inline int lora_threads(const lora_ctx *ctx) { return ctx ? ctx->n_threads : 1; }

/* Parameter values for library code already inside a call (no busy-guard round trip).
 * A NULL bag reads the defaults. Keys must be known and of the matching type. */
int64_t lora_params_int(const lora_params *p, lora_param key);
double lora_params_float(const lora_params *p, lora_param key);
const char *lora_params_str(const lora_params *p, lora_param key);   /* borrowed */

#define LORA_TRY(expr) do { lora_status lora_try_s_ = (expr); if (lora_try_s_ != LORA_OK) return lora_try_s_; } while (0)

#endif
