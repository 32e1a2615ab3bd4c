/* Host allocation through the context's hooks, with byte accounting. Each block carries a
 * 64-byte prefix holding its size so frees can be counted without asking the hook. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define ALLOC_ALIGN 64
#define ALLOC_PREFIX 64

static void *default_alloc(void *user, size_t size, size_t alignment) {
    (void)user;
    void *p = NULL;
    if (posix_memalign(&p, alignment, size) != 0) return NULL;
    return p;
}

static void default_free(void *user, void *ptr) {
    (void)user;
    free(ptr);
}

void *lora_malloc(lora_ctx *ctx, size_t size) {
    size_t total;
    if (!ck_add_size(size, ALLOC_PREFIX, &total)) {
        lora_fail(ctx, LORA_E_NOMEM, "allocation of %zu bytes overflows", size);
        return NULL;
    }
    lora_alloc_fn fn = (ctx && ctx->alloc_fn) ? ctx->alloc_fn : default_alloc;
    void *user = ctx ? ctx->alloc_user : NULL;
    unsigned char *base = fn(user, total, ALLOC_ALIGN);
    if (!base) {
        lora_fail(ctx, LORA_E_NOMEM, "out of host memory allocating %zu bytes", size);
        return NULL;
    }
    memcpy(base, &size, sizeof size);
    if (ctx) {
        ctx->n_allocs++;
        uint64_t now = atomic_fetch_add(&ctx->host_bytes, (uint64_t)size) + size;
        uint64_t peak = atomic_load(&ctx->host_peak);
        while (now > peak && !atomic_compare_exchange_weak(&ctx->host_peak, &peak, now)) {}
    }
    return base + ALLOC_PREFIX;
}

void *lora_calloc(lora_ctx *ctx, size_t n, size_t size) {
    size_t bytes;
    if (!ck_mul_size(n, size, &bytes)) {
        lora_fail(ctx, LORA_E_NOMEM, "allocation of %zu x %zu bytes overflows", n, size);
        return NULL;
    }
    void *p = lora_malloc(ctx, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

void lora_free(lora_ctx *ctx, void *ptr) {
    if (!ptr) return;
    unsigned char *base = (unsigned char *)ptr - ALLOC_PREFIX;
    size_t size;
    memcpy(&size, base, sizeof size);
    lora_free_fn fn = (ctx && ctx->free_fn) ? ctx->free_fn : default_free;
    if (ctx) atomic_fetch_sub(&ctx->host_bytes, (uint64_t)size);
    fn(ctx ? ctx->alloc_user : NULL, base);
}

char *lora_strdup(lora_ctx *ctx, const char *s) {
    size_t n = strlen(s) + 1;
    char *d = lora_malloc(ctx, n);
    if (d) memcpy(d, s, n);
    return d;
}
