/* Random numbers against independent references:
 *  - mt19937: the C++ standard's check values (seed 5489: first output 3499211612, 10000th
 *    output 4123659995, [rand.predef]);
 *  - lora_torch_randn / lora_torch_rand: outputs of torch 1.13 (CPU) for fixed seeds, stored
 *    by tests/reference/make_fixtures.py in tests/data/randn_ref.safetensors, including
 *    consecutive calls on one generator (the cached second Box-Muller value);
 *  - Philox4x32-10: the known-answer vectors of the Random123 distribution (kat_vectors);
 *  - lora_philox_normal: independent of how a range is split; mean 0 and variance 1. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "core/rng.h"
#include "../test.h"

static void test_mt19937(void) {
    struct lora_mt19937 g;
    lora_mt_seed(&g, 5489);
    CHECK(lora_mt_next(&g) == 3499211612u);
    lora_mt_seed(&g, 5489);
    uint32_t x = 0;
    for (int i = 0; i < 10000; i++) x = lora_mt_next(&g);
    CHECK_MSG(x == 4123659995u, "10000th output %u", x);
    /* Seeds keep their low 32 bits, as at::mt19937 does. */
    struct lora_mt19937 a, b;
    lora_mt_seed(&a, (UINT64_C(1) << 32) + 7);
    lora_mt_seed(&b, 7);
    int same = 1;
    for (int i = 0; i < 700; i++) same &= lora_mt_next(&a) == lora_mt_next(&b);
    CHECK(same);
}

/* Largest |ours - torch| seen, in absolute terms and in units of torch's float spacing. */
static double max_abs_err, max_ulp_err;

/* n >= 16: |a - b| <= 1e-6 + 8 ulp(b): torch's AVX2 path computes log/sin/cos with
 * vectorised float approximations (avx_mathfun), liblora with the C library's float
 * functions; a few ulp apart (3 at most on the reference machine).
 * n < 16: both compute Box-Muller in double with the C library and round once to float;
 * bit-identical on the reference machine, 1 ulp allowed for another libm. */
static int close_to_torch(float ours, float ref, int64_t n) {
    if (!isfinite(ours) || !isfinite(ref)) return 0;
    double d = fabs((double)ours - (double)ref);
    double ulp = nextafterf(fabsf(ref), INFINITY) - fabsf(ref);
    if (n < 16) return d <= ulp;
    if (d > max_abs_err) max_abs_err = d;
    if (d / ulp > max_ulp_err) max_ulp_err = d / ulp;
    return d <= 1e-6 + 8.0 * ulp;
}

static float *read_ref(lora_file *f, const char *name, int64_t *n) {
    int64_t idx = lora_file_find(f, name);
    CHECK_MSG(idx >= 0, "%s missing from randn_ref.safetensors", name);
    if (idx < 0) return NULL;
    int64_t shape[1] = {0};
    int32_t ndim = 0;
    lora_dtype dt = 0;
    CHECK_STATUS(lora_file_tensor_info(f, idx, NULL, &dt, NULL, &ndim, shape, 1, NULL), LORA_OK);
    CHECK(dt == LORA_DTYPE_F32 && ndim == 1);
    float *v = malloc((size_t)(shape[0] ? shape[0] : 1) * sizeof(float));
    CHECK_STATUS(lora_file_read_f32(f, idx, v, (uint64_t)shape[0]), LORA_OK);
    *n = shape[0];
    return v;
}

/* Draws n normals from `g` and compares them with the torch tensor `name`. */
static void compare_randn(struct lora_mt19937 *g, lora_file *f, const char *name, int64_t n) {
    int64_t rn = 0;
    float *ref = read_ref(f, name, &rn);
    if (!ref) return;
    CHECK_MSG(rn == n, "%s holds %lld values", name, (long long)rn);
    float *ours = malloc((size_t)n * sizeof(float));
    lora_torch_randn(g, ours, n);
    int64_t bad = -1;
    for (int64_t i = 0; i < n && i < rn; i++)
        if (!close_to_torch(ours[i], ref[i], n) && bad < 0) bad = i;
    CHECK_MSG(bad < 0, "%s[%lld]: ours %.9g, torch %.9g", name, (long long)bad, bad >= 0 ? ours[bad] : 0.0,
              bad >= 0 ? ref[bad] : 0.0);
    free(ours);
    free(ref);
}

static void test_torch_streams(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/randn_ref.safetensors", dir ? dir : "tests/data");
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, lora_errmsg(ctx));
        lora_ctx_free(ctx);
        return;
    }
    const uint64_t seeds[] = {0, 42, 12345, (UINT64_C(1) << 32) + 7};
    const int64_t sizes[] = {1, 3, 15, 16, 17, 100, 1000};
    struct lora_mt19937 g;
    for (size_t s = 0; s < sizeof seeds / sizeof seeds[0]; s++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            char name[64];
            snprintf(name, sizeof name, "randn_s%llu_n%lld", (unsigned long long)seeds[s], (long long)sizes[k]);
            lora_mt_seed(&g, seeds[s]);
            compare_randn(&g, f, name, sizes[k]);
        }
    /* consecutive calls: 3 then 5 (the 4th value was cached by the first call) */
    lora_mt_seed(&g, 42);
    compare_randn(&g, f, "randn_s42_seq_a_n3", 3);
    compare_randn(&g, f, "randn_s42_seq_b_n5", 5);
    /* 3, then 17 (vectorised, ignores the cache), then 1 (takes the cached value) */
    lora_mt_seed(&g, 7);
    compare_randn(&g, f, "randn_s7_seq_a_n3", 3);
    compare_randn(&g, f, "randn_s7_seq_b_n17", 17);
    compare_randn(&g, f, "randn_s7_seq_c_n1", 1);

    /* torch.rand: 24-bit uniforms, exact */
    int64_t rn = 0;
    float *ref = read_ref(f, "rand_s7_n20", &rn);
    if (ref) {
        CHECK(rn == 20);
        float ours[20];
        lora_mt_seed(&g, 7);
        lora_torch_rand(&g, ours, 20);
        CHECK(memcmp(ours, ref, sizeof ours) == 0);
        free(ref);
    }
    lora_file_free(f);
    lora_ctx_free(ctx);
    printf("torch randn (n >= 16): max |ours - torch| = %.3g (%.2f ulp)\n", max_abs_err, max_ulp_err);
}

/* Random123 kat_vectors, "philox4x32 10" lines: counter[4] key[2] -> output[4]. */
static void test_philox_kat(void) {
    static const struct {
        uint32_t ctr[4], key[2], out[4];
    } kat[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
        {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
         {0xffffffffu, 0xffffffffu},
         {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
        {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
         {0xa4093822u, 0x299f31d0u},
         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
    };
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        uint32_t out[4];
        lora_philox4x32_10(kat[i].ctr, kat[i].key, out);
        CHECK_MSG(memcmp(out, kat[i].out, sizeof out) == 0, "KAT %zu: %08x %08x %08x %08x", i, out[0], out[1],
                  out[2], out[3]);
    }
}

static void test_philox_normal(void) {
    enum { N = 1000 };
    const uint64_t seed = UINT64_C(0x0123456789abcdef);
    static float whole[N], parts[N];
    lora_philox_normal(seed, 0, whole, N);
    /* odd-sized pieces at odd offsets */
    const int64_t sizes[] = {1, 3, 5, 7, 2, 11, 13, 1, 17, 31, 64, 99, 6, 250};
    int64_t pos = 0;
    for (size_t k = 0; pos < N; k = (k + 1) % (sizeof sizes / sizeof sizes[0])) {
        int64_t c = sizes[k] < N - pos ? sizes[k] : N - pos;
        lora_philox_normal(seed, (uint64_t)pos, parts + pos, c);
        pos += c;
    }
    CHECK(memcmp(whole, parts, sizeof whole) == 0);
    /* element by element */
    int same = 1;
    for (int64_t i = 0; i < N; i += 37) {
        float one;
        lora_philox_normal(seed, (uint64_t)i, &one, 1);
        same &= memcmp(&one, &whole[i], 4) == 0;
    }
    CHECK(same);
    /* far offsets (counter above 2^32 blocks) split the same way too */
    const uint64_t far = (UINT64_C(5) << 34) + 3;
    static float far_whole[N], far_parts[N];
    lora_philox_normal(seed, far, far_whole, N);
    lora_philox_normal(seed, far, far_parts, 333);
    lora_philox_normal(seed, far + 333, far_parts + 333, N - 333);
    CHECK(memcmp(far_whole, far_parts, sizeof far_whole) == 0);
    CHECK(memcmp(far_whole, whole, sizeof whole) != 0);
    /* a different seed (high word only) gives a different stream */
    float other[8];
    lora_philox_normal(seed ^ (UINT64_C(1) << 40), 0, other, 8);
    CHECK(memcmp(other, whole, sizeof other) != 0);

    /* moments over 1e5 samples: standard errors are 0.0032 (mean), 0.0045 (variance) */
    enum { M = 100000 };
    float *x = malloc(M * sizeof(float));
    lora_philox_normal(42, 0, x, M);
    double s1 = 0, s2 = 0, s4 = 0;
    int finite = 1;
    for (int i = 0; i < M; i++) {
        finite &= isfinite(x[i]) != 0;
        s1 += x[i];
    }
    double mean = s1 / M;
    for (int i = 0; i < M; i++) {
        double d = x[i] - mean;
        s2 += d * d;
        s4 += d * d * d * d;
    }
    double var = s2 / (M - 1), kurt = (s4 / M) / (var * var);
    CHECK(finite);
    CHECK_NEAR(mean, 0.0, 0.02);
    CHECK_NEAR(var, 1.0, 0.03);
    CHECK_NEAR(kurt, 3.0, 0.15);
    free(x);
}

int main(void) {
    test_mt19937();
    test_torch_streams();
    test_philox_kat();
    test_philox_normal();
    return test_finish("test_rng");
}
