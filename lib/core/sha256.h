/* SHA-256 (FIPS 180-4) for file and model hashes (spec/kohya-lora.md §9: A1111's model hash,
 * kohya's sshs_model_hash, lora_file_hash), through OpenSSL libcrypto 3's EVP digest API,
 * which picks SHA-NI / AVX2 code for the CPU at run time (5x+ the plain C rounds it replaced:
 * multi-GB checkpoints are hashed on every `lora generate`).
 *
 * Every step can fail (the EVP context is heap-allocated by libcrypto; a provider can refuse
 * the digest), so each returns a lora_status with a message recorded on the ctx given to
 * lora_sha256_init (NULL: status only). Not thread-safe per object; distinct objects may be
 * used from any threads. libcrypto loads its own configuration once per process on first
 * use, as in every program linking it; liblora never calls OPENSSL_init_* itself.
 *
 * Lifetime: lora_sha256_init, any number of lora_sha256_update, then lora_sha256_final, which
 * frees the EVP context whatever it returns. A caller that stops early calls
 * lora_sha256_discard (also safe after a failed init, after final, or twice). */
#ifndef LORA_CORE_SHA256_H
#define LORA_CORE_SHA256_H

#include "internal.h"

struct lora_sha256 {
    void *evp;        /* EVP_MD_CTX *: NULL before init and after final / discard */
    lora_ctx *ctx;    /* where failures are recorded (may be NULL) */
};

#define LORA_MUST_CHECK __attribute__((warn_unused_result))

/* LORA_E_NOMEM when libcrypto cannot allocate the context, LORA_E_UNSUPPORTED when no loaded
 * provider offers SHA-256 (an OpenSSL configuration that disables the default provider). */
LORA_MUST_CHECK lora_status lora_sha256_init(lora_ctx *ctx, struct lora_sha256 *c);
/* Hashes n more bytes (n == 0 is a no-op; data may be NULL then). LORA_E_INVALID_ARG when c
 * was not initialised or was finished; LORA_E_INTERNAL when libcrypto refuses. */
LORA_MUST_CHECK lora_status lora_sha256_update(struct lora_sha256 *c, const void *data, size_t n);
/* Writes the 32-byte digest and frees the context (also on failure, then `out` is zeroed). */
LORA_MUST_CHECK lora_status lora_sha256_final(struct lora_sha256 *c, uint8_t out[32]);
void lora_sha256_discard(struct lora_sha256 *c);
/* One call: the digest of data[0, n). */
LORA_MUST_CHECK lora_status lora_sha256(lora_ctx *ctx, const void *data, size_t n, uint8_t out[32]);

#endif
