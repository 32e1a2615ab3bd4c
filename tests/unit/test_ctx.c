/* Context: ABI check, allocator hooks and accounting, busy guard, cancel, callbacks,
 * backend choice without a GPU, threads. */
#include <pthread.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "../test.h"

struct counting_alloc {
    int64_t allocs, frees;
    int fail_after;   /* -1 = never */
};

static void *count_alloc(void *user, size_t size, size_t align) {
    struct counting_alloc *c = user;
    if (c->fail_after >= 0 && c->allocs >= c->fail_after) return NULL;
    c->allocs++;
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
}

static void count_free(void *user, void *p) {
    struct counting_alloc *c = user;
    c->frees++;
    free(p);
}

struct log_capture {
    int n;
    char last[512];
};

static void capture_log(void *user, lora_log_level level, const char *msg) {
    struct log_capture *lc = user;
    (void)level;
    lc->n++;
    snprintf(lc->last, sizeof lc->last, "%s", msg);
}

static int progress_calls;
static int32_t cancel_at_3(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)user; (void)phase; (void)total; (void)value;
    progress_calls++;
    return done >= 3;
}

static void *cancel_thread(void *arg) {
    lora_ctx_cancel(arg);
    return NULL;
}

int main(void) {
    lora_ctx *ctx = NULL;
    /* Header-vs-library ABI check: a program built against another ABI is refused. */
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION + 1, &ctx), LORA_E_ABI_MISMATCH);
    CHECK(ctx == NULL);
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, NULL), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK(lora_version() == LORA_VERSION_NUMBER);
    CHECK(strcmp(lora_version_string(), LORA_VERSION_STRING) == 0);
    CHECK(lora_abi_version() == LORA_ABI_VERSION);
    CHECK(strstr(lora_build_features(), "cpu") != NULL);
    lora_ctx_free(NULL);   /* no-op */

    /* Allocator hooks: every allocation goes through them and is accounted. */
    struct counting_alloc ca = {0, 0, -1};
    CHECK_STATUS(lora_ctx_set_allocator(ctx, count_alloc, NULL, &ca), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_ctx_set_allocator(ctx, count_alloc, count_free, &ca), LORA_OK);
    void *p = lora_malloc(ctx, 1000);
    CHECK(p != NULL && ((uintptr_t)p % 64) == 0);
    CHECK(ca.allocs == 1);
    uint64_t host = 0, peak = 0, dev = 1, dfree = 1;
    CHECK_STATUS(lora_ctx_memory(ctx, &host, &peak, &dev, &dfree), LORA_OK);
    CHECK(host == 1000 && peak == 1000 && dev == 0 && dfree == 0);
    /* Hooks cannot change once memory was handed out through them. */
    CHECK_STATUS(lora_ctx_set_allocator(ctx, NULL, NULL, NULL), LORA_E_INVALID_ARG);
    lora_free(ctx, p);
    CHECK(ca.frees == 1);
    CHECK_STATUS(lora_ctx_memory(ctx, &host, &peak, NULL, NULL), LORA_OK);
    CHECK(host == 0 && peak == 1000);
    /* A failing hook gives LORA_E_NOMEM with the size in the message. */
    ca.fail_after = ca.allocs;
    CHECK(lora_malloc(ctx, 12345) == NULL);
    CHECK(lora_errcode(ctx) == LORA_E_NOMEM && strstr(lora_errmsg(ctx), "12345") != NULL);
    CHECK(lora_calloc(ctx, SIZE_MAX / 2, 4) == NULL);   /* overflow caught before the hook */
    ca.fail_after = -1;

    /* Busy guard: a second entry while a call runs is refused, not corrupted. */
    CHECK_STATUS(lora_enter(ctx), LORA_OK);
    CHECK_STATUS(lora_ctx_set_threads(ctx, 1), LORA_E_BUSY);
    lora_leave(ctx);
    CHECK_STATUS(lora_ctx_set_threads(ctx, 1), LORA_OK);
    CHECK_STATUS(lora_ctx_set_threads(ctx, -1), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_ctx_set_threads(ctx, 0), LORA_OK);
    CHECK(ctx->n_threads >= 1);

    /* Log sink gets error messages on the calling thread; silent below min level. */
    struct log_capture lc = {0, ""};
    lora_ctx_set_log(ctx, capture_log, &lc, LORA_LOG_ERROR);
    lora_log(ctx, LORA_LOG_INFO, "not shown");
    CHECK(lc.n == 0);
    CHECK_STATUS(lora_ctx_set_threads(ctx, 4096), LORA_E_CONFIG_RANGE);
    CHECK(lc.n == 1 && strstr(lc.last, "LORA_E_CONFIG_RANGE") != NULL);
    lora_ctx_set_log(ctx, NULL, NULL, LORA_LOG_DEBUG);

    /* Progress callback cancels by returning non-zero. */
    lora_ctx_set_progress(ctx, cancel_at_3, NULL);
    lora_status s = LORA_OK;
    int64_t done = 0;
    for (done = 0; done < 10 && s == LORA_OK; done++) s = lora_progress(ctx, LORA_PHASE_TRAIN_STEP, done, 10, 0.5);
    CHECK(s == LORA_E_CANCELLED && done == 4 && progress_calls == 4);
    lora_ctx_set_progress(ctx, NULL, NULL);

    /* lora_ctx_cancel from another thread is seen at the next safe point and cleared by the
     * next call. */
    pthread_t th;
    pthread_create(&th, NULL, cancel_thread, ctx);
    pthread_join(th, NULL);
    CHECK_STATUS(lora_check_cancel(ctx), LORA_E_CANCELLED);
    CHECK_STATUS(lora_enter(ctx), LORA_OK);
    CHECK_STATUS(lora_check_cancel(ctx), LORA_OK);
    lora_leave(ctx);
    lora_ctx_cancel(NULL);

    /* Backends: CPU always; CUDA either works or says why (no GPU on CI machines). */
    CHECK(lora_backend_available(LORA_BACKEND_CPU) == 1);
    CHECK(lora_ctx_get_backend(ctx) == LORA_BACKEND_CPU);
    if (lora_backend_available(LORA_BACKEND_CUDA)) {
        CHECK_STATUS(lora_ctx_set_backend(ctx, LORA_BACKEND_CUDA, 0), LORA_OK);
        CHECK(lora_ctx_get_backend(ctx) == LORA_BACKEND_CUDA);
        CHECK_STATUS(lora_ctx_set_backend(ctx, LORA_BACKEND_CUDA, 999), LORA_E_INVALID_ARG);
        CHECK(lora_ctx_get_backend(ctx) == LORA_BACKEND_CUDA);
    } else {
        lora_status cs = lora_ctx_set_backend(ctx, LORA_BACKEND_CUDA, 0);
        CHECK_MSG(cs == LORA_E_NO_GPU || cs == LORA_E_DRIVER, "%s", lora_status_name(cs));
        CHECK(strstr(lora_errmsg(ctx), "cuda") != NULL);
        CHECK(lora_ctx_get_backend(ctx) == LORA_BACKEND_CPU);   /* unchanged */
        CHECK_STATUS(lora_ctx_set_backend(ctx, LORA_BACKEND_AUTO, 0), LORA_OK);
        CHECK(lora_ctx_get_backend(ctx) == LORA_BACKEND_CPU);
    }
    CHECK_STATUS(lora_ctx_set_backend(ctx, 17, 0), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_ctx_set_backend(ctx, LORA_BACKEND_CPU, 0), LORA_OK);

    /* Children keep the context alive: free order does not matter. */
    lora_params *params = NULL;
    CHECK_STATUS(lora_params_create(ctx, &params), LORA_OK);
    lora_ctx_free(ctx);
    CHECK_STATUS(lora_params_set_int(params, LORA_P_NETWORK_DIM, 8), LORA_OK);
    lora_params_free(params);   /* frees the context too */
    CHECK(ca.allocs == ca.frees);
    return test_finish("test_ctx");
}
