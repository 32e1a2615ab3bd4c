/* core/sha256 (libcrypto EVP) against independent values:
 *  - the FIPS 180-2 Appendix B examples ("abc", the 448-bit message, one million 'a') and the
 *    NIST 896-bit example, in one call and streamed in uneven pieces;
 *  - messages around the 55/56/64-byte padding boundaries and one spanning many 1 MiB reads,
 *    against Python's hashlib:
 *      python3 -c "import hashlib; m=lambda n: bytes((i*31+7)&255 for i in range(n));
 *                  print(hashlib.sha256(m(N)).hexdigest())"
 *  - the lifecycle rules (update/final after final or discard fail with a message, discard is
 *    idempotent), the host program's OpenSSL error queue left as it was, and an allocation
 *    failure inside libcrypto (injected through CRYPTO_set_mem_functions) reported as
 *    LORA_E_NOMEM with a message instead of a silent bad hash, and an OpenSSL configuration
 *    without SHA-256 (only the null provider) reported as LORA_E_UNSUPPORTED. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "core/sha256.h"
#include "train/metadata.h"
#include "../test.h"

/* ---- allocation failure injection (libcrypto's hooks: process-wide, set first in main) ---- */
static int g_fail_alloc;
static void *t_malloc(size_t n, const char *f, int l) { (void)f, (void)l; return g_fail_alloc ? NULL : malloc(n); }
static void *t_realloc(void *p, size_t n, const char *f, int l) {
    (void)f, (void)l;
    return g_fail_alloc ? NULL : realloc(p, n);
}
static void t_free(void *p, const char *f, int l) { (void)f, (void)l; free(p); }

static void hex32(const uint8_t d[32], char out[65]) { md_hex(d, 32, out); }

/* SHA-256 of msg fed in pieces of 1, 4, 13, ... bytes (wrapping at `wrap`). */
static void streamed(const uint8_t *msg, size_t n, size_t wrap, char out[65]) {
    struct lora_sha256 c;
    uint8_t d[32];
    CHECK_STATUS(lora_sha256_init(NULL, &c), LORA_OK);
    size_t pos = 0, step = 1;
    lora_status s = LORA_OK;
    while (pos < n && s == LORA_OK) {
        size_t k = step < n - pos ? step : n - pos;
        s = lora_sha256_update(&c, msg + pos, k);
        pos += k;
        step = step * 3 + 1;
        if (step > wrap) step = 1;
    }
    CHECK_STATUS(s, LORA_OK);
    CHECK_STATUS(lora_sha256_final(&c, d), LORA_OK);
    hex32(d, out);
}

static void check_both(const uint8_t *msg, size_t n, const char *want, const char *what) {
    uint8_t d[32];
    char h[65];
    CHECK_STATUS(lora_sha256(NULL, msg, n, d), LORA_OK);
    hex32(d, h);
    CHECK_MSG(strcmp(h, want) == 0, "%s one call: %s, want %s", what, h, want);
    streamed(msg, n, 70000, h);
    CHECK_MSG(strcmp(h, want) == 0, "%s streamed: %s, want %s", what, h, want);
    streamed(msg, n, 200, h);
    CHECK_MSG(strcmp(h, want) == 0, "%s small pieces: %s, want %s", what, h, want);
}

static void test_nist(void) {
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                       "mnopqrstnopqrstu";
    check_both((const uint8_t *)"abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "abc");
    check_both((const uint8_t *)"", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "empty");
    check_both((const uint8_t *)m448, strlen(m448), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
               "448-bit");
    check_both((const uint8_t *)m896, strlen(m896), "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
               "896-bit");
    uint8_t *a = malloc(1000000);
    memset(a, 'a', 1000000);
    check_both(a, 1000000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", "million a");
    free(a);
}

static void test_boundaries(void) {
    static const struct { size_t n; const char *want; } t[] = {
        {1, "ca358758f6d27e6cf45272937977a748fd88391db679ceda7dc7bf1f005ee879"},
        {55, "8aa994584139d128848eeebc4e815639ba5ab6e6e39574195a63ac4f14f7c43b"},
        {56, "ad574708f75c044c9b85de64cb568ee7711ff4f36448c6242f053ba8f6cc2b63"},
        {63, "280ed3e8ff1df845b2e7dfe6ac6cee817bef20e783cc65abc41b818b4d2fe076"},
        {64, "c6ab9724ade5b6a7a1edfffb12f3aa9181351355af8fd08c919952ad211339dd"},
        {65, "788367c73c7ddf4c53f65e68cc0d943e6227ab55b0e78ba63ace822b1c6301c0"},
        {119, "3d610547d68216dedf7435a4fb6260353911f6b3fd3f18805ddb8be285d726fe"},
        {120, "1f80156a804cb7862ad113e8200e9d74499723e7c7854d5f48776d3148e09656"},
        {127, "192409cd280e14b743642ad1343fbd3e82d9305de72c078117745a679210cc3d"},
        {128, "cc548ca2dec1f6fe4f58b2e27aa9c7521607df1130d140b55a4dad0665302356"},
        {129, "81e89a7b2911aaa7795f9e3d4910cb47d6cd2b00d83b8399481527261a1a7519"},
        {1000003, "98a99a78c43949f17251c669c6e3ff37064482fdc65e85ef1f21b70c2e48a81b"},
    };
    uint8_t *m = malloc(1000003);
    for (size_t i = 0; i < 1000003; i++) m[i] = (uint8_t)(i * 31 + 7);
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        char what[32];
        snprintf(what, sizeof what, "pattern[%zu]", t[i].n);
        check_both(m, t[i].n, t[i].want, what);
    }
    free(m);
}

static void test_lifecycle(lora_ctx *ctx) {
    struct lora_sha256 c;
    uint8_t d[32];
    CHECK_STATUS(lora_sha256_init(ctx, &c), LORA_OK);
    CHECK_STATUS(lora_sha256_update(&c, NULL, 0), LORA_OK);
    CHECK_STATUS(lora_sha256_update(&c, "abc", 3), LORA_OK);
    CHECK_STATUS(lora_sha256_final(&c, d), LORA_OK);
    CHECK(c.evp == NULL);
    CHECK_STATUS(lora_sha256_update(&c, "x", 1), LORA_E_INVALID_ARG);
    CHECK(strstr(lora_errmsg(ctx), "SHA-256") != NULL);
    memset(d, 0xAB, sizeof d);
    CHECK_STATUS(lora_sha256_final(&c, d), LORA_E_INVALID_ARG);
    int zero = 1;
    for (int i = 0; i < 32; i++) zero &= d[i] == 0;
    CHECK(zero);   /* no stale bytes that could pass for a digest */
    lora_sha256_discard(&c);
    lora_sha256_discard(&c);
    /* a discarded hash cannot be finished either */
    CHECK_STATUS(lora_sha256_init(ctx, &c), LORA_OK);
    lora_sha256_discard(&c);
    CHECK_STATUS(lora_sha256_final(&c, d), LORA_E_INVALID_ARG);
}

/* The host's pending OpenSSL error survives our calls: we pop only what we pushed. */
static void test_error_queue(void) {
    ERR_clear_error();
    ERR_raise(ERR_LIB_USER, 42);
    unsigned long host = ERR_peek_last_error();
    CHECK(host != 0);
    uint8_t d[32];
    CHECK_STATUS(lora_sha256(NULL, "abc", 3, d), LORA_OK);
    CHECK(ERR_peek_last_error() == host && ERR_peek_error() == host);
    ERR_clear_error();
    CHECK_STATUS(lora_sha256(NULL, "abc", 3, d), LORA_OK);
    CHECK(ERR_peek_error() == 0);
}

static void test_nomem(lora_ctx *ctx, int hooks) {
    if (!hooks) {
        /* libcrypto allocated before main: the injection cannot be installed in this process */
        fprintf(stderr, "test_sha256: CRYPTO_set_mem_functions refused; allocation failure NOT tested\n");
        CHECK(hooks);
        return;
    }
    struct lora_sha256 c;
    uint8_t d[32];
    g_fail_alloc = 1;
    lora_status s = lora_sha256_init(ctx, &c);
    g_fail_alloc = 0;
    CHECK_STATUS(s, LORA_E_NOMEM);
    CHECK(c.evp == NULL);
    CHECK_MSG(strstr(lora_errmsg(ctx), "EVP_MD_CTX_new") != NULL, "message: %s", lora_errmsg(ctx));
    lora_sha256_discard(&c);
    CHECK_STATUS(lora_sha256_final(&c, d), LORA_E_INVALID_ARG);
    g_fail_alloc = 1;
    s = lora_sha256(ctx, "abc", 3, d);
    g_fail_alloc = 0;
    CHECK_STATUS(s, LORA_E_NOMEM);
    /* the same through md_safetensors_hashes: empty strings, not a wrong hash */
    char mh[65] = "x", lh[9] = "x";
    uint8_t st[16] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
    g_fail_alloc = 1;
    s = md_safetensors_hashes(ctx, st, sizeof st, mh, lh);
    g_fail_alloc = 0;
    CHECK_STATUS(s, LORA_E_NOMEM);
    CHECK(mh[0] == 0 && lh[0] == 0);
    /* and it recovers */
    CHECK_STATUS(lora_sha256(ctx, "abc", 3, d), LORA_OK);
    char h[65];
    hex32(d, h);
    CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);
}

/* An OpenSSL configuration that activates only the "null" provider (no digests): init must
 * fail with LORA_E_UNSUPPORTED and a message, not hash with nothing. libcrypto reads its
 * configuration once per process, so this runs in a child forked before any OpenSSL use.
 * Exit code 0 = as expected. */
static int no_provider_child(void) {
    char cnf[] = "/tmp/liblora_sha256_cnf_XXXXXX";
    int fd = mkstemp(cnf);
    if (fd < 0) return 10;
    static const char text[] = "openssl_conf = init\n[init]\nproviders = prov\n[prov]\nnull = null_sect\n"
                               "[null_sect]\nactivate = 1\n";
    int ok = write(fd, text, sizeof text - 1) == (ssize_t)(sizeof text - 1);
    close(fd);
    if (!ok || setenv("OPENSSL_CONF", cnf, 1) != 0) return 11;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 12;
    struct lora_sha256 c;
    lora_status s = lora_sha256_init(ctx, &c);
    int rc = s != LORA_E_UNSUPPORTED ? 13 : c.evp != NULL ? 14 : !strstr(lora_errmsg(ctx), "EVP_DigestInit_ex") ? 15 : 0;
    if (rc) fprintf(stderr, "no-provider child: %s: %s\n", lora_status_name(s), lora_errmsg(ctx));
    lora_sha256_discard(&c);
    lora_ctx_free(ctx);
    unlink(cnf);
    return rc;
}

static void test_no_provider(void) {
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) _exit(no_provider_child());
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
}

int main(void) {
    test_no_provider();   /* first: the child must start with libcrypto untouched */
    int hooks = CRYPTO_set_mem_functions(t_malloc, t_realloc, t_free);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    test_nist();
    test_boundaries();
    test_lifecycle(ctx);
    test_error_queue();
    test_nomem(ctx, hooks);
    lora_ctx_free(ctx);
    return test_finish("test_sha256");
}
