/* SHA-256 through libcrypto's EVP interface: see sha256.h. */
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#include "core/sha256.h"

/* libcrypto reports why a call failed on its per-thread error queue. The queue belongs to the
 * whole process (the host program may use OpenSSL too), so every call sets a mark first and a
 * failure takes its reason text and then removes only what was queued after the mark. */
static lora_status evp_fail(lora_ctx *ctx, lora_status s, const char *call, const char *hint) {
    char why[256] = "no reason queued";
    unsigned long e = ERR_peek_last_error();
    if (e) ERR_error_string_n(e, why, sizeof why);
    ERR_pop_to_mark();
    return lora_fail(ctx, s, "SHA-256: libcrypto's %s failed%s (OpenSSL: %s)", call, hint, why);
}

lora_status lora_sha256_init(lora_ctx *ctx, struct lora_sha256 *c) {
    c->evp = NULL;
    c->ctx = ctx;
    ERR_set_mark();
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    if (!m) return evp_fail(ctx, LORA_E_NOMEM, "EVP_MD_CTX_new", ": out of memory");
    /* EVP_sha256() is a static method table; with a NULL engine libcrypto fetches the
     * provider's implementation for the CPU */
    if (EVP_DigestInit_ex(m, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(m);
        return evp_fail(ctx, LORA_E_UNSUPPORTED, "EVP_DigestInit_ex",
                        ": no OpenSSL provider offers SHA-256 (check OPENSSL_CONF / openssl.cnf)");
    }
    ERR_pop_to_mark();
    c->evp = m;
    return LORA_OK;
}

lora_status lora_sha256_update(struct lora_sha256 *c, const void *data, size_t n) {
    if (!c->evp)
        return lora_fail(c->ctx, LORA_E_INVALID_ARG, "SHA-256: update on a hash that was not started or "
                         "already finished");
    if (n == 0) return LORA_OK;
    ERR_set_mark();
    if (EVP_DigestUpdate((EVP_MD_CTX *)c->evp, data, n) != 1) {
        lora_sha256_discard(c);
        return evp_fail(c->ctx, LORA_E_INTERNAL, "EVP_DigestUpdate", "");
    }
    ERR_pop_to_mark();
    return LORA_OK;
}

lora_status lora_sha256_final(struct lora_sha256 *c, uint8_t out[32]) {
    memset(out, 0, 32);
    if (!c->evp)
        return lora_fail(c->ctx, LORA_E_INVALID_ARG, "SHA-256: final on a hash that was not started or "
                         "already finished");
    unsigned int len = 0;
    ERR_set_mark();
    int ok = EVP_DigestFinal_ex((EVP_MD_CTX *)c->evp, out, &len) == 1 && len == 32;
    lora_sha256_discard(c);
    if (!ok) {
        memset(out, 0, 32);
        return evp_fail(c->ctx, LORA_E_INTERNAL, "EVP_DigestFinal_ex", "");
    }
    ERR_pop_to_mark();
    return LORA_OK;
}

void lora_sha256_discard(struct lora_sha256 *c) {
    EVP_MD_CTX_free((EVP_MD_CTX *)c->evp);   /* NULL is a no-op */
    c->evp = NULL;
}

lora_status lora_sha256(lora_ctx *ctx, const void *data, size_t n, uint8_t out[32]) {
    struct lora_sha256 c;
    LORA_TRY(lora_sha256_init(ctx, &c));
    lora_status s = lora_sha256_update(&c, data, n);
    if (s != LORA_OK) {
        memset(out, 0, 32);
        lora_sha256_discard(&c);
        return s;
    }
    return lora_sha256_final(&c, out);
}
