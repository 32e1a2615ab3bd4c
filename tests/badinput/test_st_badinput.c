/* Bad-input cases for the safetensors reader: spec/safety.md section 6, rows 1-12, plus the
 * reference reader's own test vectors (safetensors/src/tensor.rs tests) as positive controls.
 *
 * Every input is crafted here in memory as `8-byte LE length + header bytes + data bytes` and
 * checked twice:
 *   - st_parse() on the buffer (label "mem:<case>"), and
 *   - lora_file_open() on a real file holding the same bytes, in a mkdtemp directory.
 * For each failure: the exact status, no handle returned, lora_errmsg() names the source (the
 * label or the file path) and, where the case has one, the offending tensor/key/offset; the
 * same context then opens a valid file; the context's host memory is back at its baseline. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/utf8.h"
#include "io/safetensors.h"
#include "../test.h"

/* ---- byte builders ----------------------------------------------------------------------- */
typedef struct {
    uint8_t *p;
    size_t n;
} blob;

/* `n_field` little-endian, then `hlen` header bytes, then `dlen` data bytes (`data`, or the
 * pattern i*7+1 when NULL). */
static blob st_raw(uint64_t n_field, const void *hdr, size_t hlen, const void *data, size_t dlen) {
    blob b;
    b.n = 8 + hlen + dlen;
    b.p = malloc(b.n ? b.n : 1);
    if (!b.p) { perror("malloc"); exit(2); }
    for (int i = 0; i < 8; i++) b.p[i] = (uint8_t)(n_field >> (8 * i));
    if (hlen) memcpy(b.p + 8, hdr, hlen);
    for (size_t i = 0; i < dlen; i++) b.p[8 + hlen + i] = data ? ((const uint8_t *)data)[i] : (uint8_t)(i * 7 + 1);
    return b;
}

/* N = strlen(json), followed by `dlen` pattern bytes. */
static blob st_json(const char *json, size_t dlen) { return st_raw(strlen(json), json, strlen(json), NULL, dlen); }

/* Arbitrary bytes (for non-safetensors files and short files). */
static blob raw_bytes(const void *p, size_t n) {
    blob b;
    b.n = n;
    b.p = malloc(n ? n : 1);
    if (!b.p) { perror("malloc"); exit(2); }
    if (n) memcpy(b.p, p, n);
    return b;
}

static void blob_free(blob *b) {
    free(b->p);
    b->p = NULL;
    b->n = 0;
}

/* ---- environment -------------------------------------------------------------------------- */
static lora_ctx *ctx;
static char tmpdir[512];
static char valid_path[600];
static uint64_t mem_baseline;

static void write_file(const char *path, const uint8_t *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (n && fwrite(p, 1, n, f) != n) { perror(path); exit(2); }
    if (fclose(f) != 0) { perror(path); exit(2); }
}

static uint64_t host_bytes(void) {
    uint64_t b = UINT64_MAX;
    lora_ctx_memory(ctx, &b, NULL, NULL, NULL);
    return b;
}

/* The reference reader's test_deserialization vector: one I32 [2,2] tensor, 16 data bytes. */
#define VALID_ENTRY "\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}"
#define VALID_HDR "{" VALID_ENTRY "}"

/* The context still works after a failure: open a valid file, check it, free it. */
static void check_ctx_usable(const char *after) {
    lora_file *f = NULL;
    lora_status s = lora_file_open(ctx, valid_path, &f);
    CHECK_MSG(s == LORA_OK, "after %s: valid file gives %s: %s", after, lora_status_name(s), lora_errmsg(ctx));
    if (f) {
        CHECK_MSG(lora_file_tensor_count(f) == 1, "after %s", after);
        CHECK_MSG(lora_errmsg(ctx)[0] == '\0', "after %s: message not cleared: %s", after, lora_errmsg(ctx));
    }
    lora_file_free(f);
    CHECK_MSG(host_bytes() == mem_baseline, "after %s: host_bytes %llu, baseline %llu", after,
              (unsigned long long)host_bytes(), (unsigned long long)mem_baseline);
}

static void check_needles(const char *where, const char *msg, const char *const *needles) {
    for (int i = 0; needles && needles[i]; i++)
        CHECK_MSG(strstr(msg, needles[i]) != NULL, "%s: message lacks \"%s\": %s", where, needles[i], msg);
}

/* Runs one failing case on both paths. `needles` is a NULL-terminated list of substrings the
 * message must contain besides the source name. Takes ownership of `b`. */
static void expect_fail(const char *name, blob b, lora_status want, const char *const *needles) {
    char label[256], where[320], path[800];
    snprintf(label, sizeof label, "mem:%s", name);

    /* 1. in memory */
    struct lora_file *mf = (struct lora_file *)0x1;
    lora_status s = st_parse(ctx, label, b.p, b.n, &mf);
    snprintf(where, sizeof where, "%s (st_parse)", name);
    CHECK_MSG(s == want, "%s: got %s (%d), want %s: %s", where, lora_status_name(s), s, lora_status_name(want),
              lora_errmsg(ctx));
    CHECK_MSG(mf == NULL, "%s: handle returned on failure", where);
    if (s == LORA_OK && mf) st_close(mf);
    CHECK_MSG(strstr(lora_errmsg(ctx), label) != NULL, "%s: message does not name the source: %s", where,
              lora_errmsg(ctx));
    check_needles(where, lora_errmsg(ctx), needles);
    CHECK_MSG(host_bytes() == mem_baseline, "%s: host_bytes %llu after failure", where,
              (unsigned long long)host_bytes());

    /* 2. as a file */
    snprintf(path, sizeof path, "%s/%s.safetensors", tmpdir, name);
    write_file(path, b.p, b.n);
    lora_file *f = (lora_file *)0x1;
    s = lora_file_open(ctx, path, &f);
    snprintf(where, sizeof where, "%s (lora_file_open)", name);
    CHECK_MSG(s == want, "%s: got %s (%d), want %s: %s", where, lora_status_name(s), s, lora_status_name(want),
              lora_errmsg(ctx));
    CHECK_MSG(f == NULL, "%s: handle returned on failure", where);
    if (s == LORA_OK && f) lora_file_free(f);
    CHECK_MSG(lora_errcode(ctx) == want, "%s: lora_errcode %d", where, lora_errcode(ctx));
    CHECK_MSG(strstr(lora_errmsg(ctx), path) != NULL, "%s: message does not name the file: %s", where,
              lora_errmsg(ctx));
    check_needles(where, lora_errmsg(ctx), needles);
    CHECK_MSG(host_bytes() == mem_baseline, "%s: host_bytes %llu after failure", where,
              (unsigned long long)host_bytes());
    unlink(path);
    blob_free(&b);
    check_ctx_usable(name);
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NO_NEEDLES ((const char *const *)NULL)

/* Runs one case that must load; calls `check` on the parsed handle from both paths. */
typedef void (*ok_check_fn)(const char *where, const struct lora_file *f);

static void expect_ok(const char *name, blob b, ok_check_fn check) {
    char label[256], where[320], path[800];
    snprintf(label, sizeof label, "mem:%s", name);
    struct lora_file *mf = NULL;
    lora_status s = st_parse(ctx, label, b.p, b.n, &mf);
    snprintf(where, sizeof where, "%s (st_parse)", name);
    CHECK_MSG(s == LORA_OK && mf, "%s: got %s: %s", where, lora_status_name(s), lora_errmsg(ctx));
    if (mf && check) check(where, mf);
    st_close(mf);
    CHECK_MSG(host_bytes() == mem_baseline, "%s: leak", where);

    snprintf(path, sizeof path, "%s/%s.safetensors", tmpdir, name);
    write_file(path, b.p, b.n);
    lora_file *f = NULL;
    s = lora_file_open(ctx, path, &f);
    snprintf(where, sizeof where, "%s (lora_file_open)", name);
    CHECK_MSG(s == LORA_OK && f, "%s: got %s: %s", where, lora_status_name(s), lora_errmsg(ctx));
    if (f && check) check(where, f);
    lora_file_free(f);
    CHECK_MSG(host_bytes() == mem_baseline, "%s: leak", where);
    unlink(path);
    blob_free(&b);
}

/* ---- positive-control checks ------------------------------------------------------------- */
static void check_zero_tensors(const char *where, const struct lora_file *f) {
    CHECK_MSG(lora_file_tensor_count(f) == 0, "%s: %lld tensors", where, (long long)lora_file_tensor_count(f));
    CHECK_MSG(lora_file_metadata_count(f) == 0, "%s", where);
}

static void check_one_tensor(const char *where, const struct lora_file *f) {
    CHECK_MSG(lora_file_tensor_count(f) == 1, "%s: %lld tensors", where, (long long)lora_file_tensor_count(f));
}

static void check_unicode_meta(const char *where, const struct lora_file *f) {
    const char *k = NULL, *v = NULL;
    CHECK_MSG(lora_file_metadata_count(f) == 1, "%s", where);
    CHECK_MSG(lora_file_metadata_at(f, 0, &k, &v) == LORA_OK, "%s", where);
    /* "\u00e9" escape decodes to the UTF-8 bytes C3 A9; raw multibyte text is kept as is. */
    CHECK_MSG(k && strcmp(k, "caf\xc3\xa9") == 0, "%s: key %s", where, k ? k : "(null)");
    CHECK_MSG(v && strcmp(v, "\xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf") == 0, "%s: value %s", where,
              v ? v : "(null)");
}

/* Reference test_zero_sized_tensor and test_empty_shapes_allowed. */
static void check_zero_and_scalar(const char *where, const struct lora_file *f) {
    CHECK_MSG(lora_file_tensor_count(f) == 2, "%s", where);
    int64_t z = lora_file_find(f, "zero"), sc = lora_file_find(f, "scalar");
    CHECK_MSG(z >= 0 && sc >= 0, "%s", where);
    if (z < 0 || sc < 0) return;
    int32_t nd = -1;
    int64_t shape[8] = {0};
    uint64_t nb = 99;
    CHECK(lora_file_tensor_info(f, z, NULL, NULL, NULL, &nd, shape, 8, &nb) == LORA_OK);
    CHECK_MSG(nd == 2 && shape[0] == 2 && shape[1] == 0 && nb == 0, "%s: zero tensor", where);
    CHECK(lora_file_tensor_info(f, sc, NULL, NULL, NULL, &nd, shape, 8, &nb) == LORA_OK);
    CHECK_MSG(nd == 0 && nb == 4, "%s: scalar tensor", where);
    float v = 0;
    CHECK(lora_file_read_f32(f, sc, &v, 1) == LORA_OK);
    CHECK_MSG(v == -7.0f, "%s: scalar value %g", where, (double)v);
}

/* Unaligned tensor: a 1-byte U8 tensor at [0,1] puts the F32 tensor at data offset 1, and
 * with a header length that is a multiple of 8 the F32 bytes sit at an odd file offset. The
 * JSON lists the F32 tensor first: the reader must sort by offsets, not trust JSON order. */
static const float unaligned_vals[3] = {1.5f, -2.25f, 1e-3f};

static void check_unaligned(const char *where, const struct lora_file *f) {
    CHECK_MSG(lora_file_tensor_count(f) == 2, "%s", where);
    int64_t u = lora_file_find(f, "byte"), w = lora_file_find(f, "weight");
    CHECK_MSG(u == 0 && w == 1, "%s: order by offsets: byte=%lld weight=%lld", where, (long long)u, (long long)w);
    if (u < 0 || w < 0) return;
    CHECK_MSG(((uintptr_t)st_data(f, w)) % 2 == 1, "%s: test setup: F32 data should be at an odd address", where);
    float b = 0, v[3] = {0, 0, 0};
    CHECK(lora_file_read_f32(f, u, &b, 1) == LORA_OK);
    CHECK_MSG(b == 200.0f, "%s: byte %g", where, (double)b);
    CHECK(lora_file_read_f32(f, w, v, 3) == LORA_OK);
    for (int i = 0; i < 3; i++) CHECK_MSG(v[i] == unaligned_vals[i], "%s: v[%d] = %g", where, i, (double)v[i]);
    /* cap too small: LORA_E_LIMIT, nothing else */
    CHECK(lora_file_read_f32(f, w, v, 2) == LORA_E_LIMIT);
}

static void check_rank8(const char *where, const struct lora_file *f) {
    int32_t nd = 0;
    CHECK(lora_file_tensor_info(f, 0, NULL, NULL, NULL, &nd, NULL, 0, NULL) == LORA_OK);
    CHECK_MSG(nd == 8, "%s: rank %d", where, nd);
}

/* ---- gzip bytes (stored deflate blocks, RFC 1951/1952), for a realistic gzip file ------- */
static uint32_t crc32_le(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

/* A gzip member with MTIME = 0 and FLG = 0 (as `gzip -n` from a pipe or Python's
 * gzip.compress(data, mtime=0) write it) holding `n` pseudo-random bytes in stored blocks. */
static blob gzip_file(size_t n) {
    uint8_t *payload = malloc(n);
    if (!payload) exit(2);
    uint32_t x = 12345;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        payload[i] = (uint8_t)(x >> 16);
    }
    size_t nblocks = (n + 65534) / 65535;
    size_t total = 10 + n + nblocks * 5 + 8;
    blob b;
    b.n = total;
    b.p = malloc(total);
    if (!b.p) exit(2);
    static const uint8_t hdr[10] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3};
    memcpy(b.p, hdr, 10);
    size_t o = 10;
    for (size_t done = 0; done < n;) {
        size_t len = n - done > 65535 ? 65535 : n - done;
        b.p[o++] = done + len == n ? 1 : 0;   /* BFINAL, BTYPE=00 */
        b.p[o++] = (uint8_t)len;
        b.p[o++] = (uint8_t)(len >> 8);
        b.p[o++] = (uint8_t)~len;
        b.p[o++] = (uint8_t)(~len >> 8);
        memcpy(b.p + o, payload + done, len);
        o += len;
        done += len;
    }
    uint32_t crc = crc32_le(payload, n);
    for (int i = 0; i < 4; i++) b.p[o++] = (uint8_t)(crc >> (8 * i));
    for (int i = 0; i < 4; i++) b.p[o++] = (uint8_t)((uint32_t)n >> (8 * i));
    free(payload);
    return b;
}

/* ---- cases ---------------------------------------------------------------------------------- */
static void rows_1_to_3(void) {
    /* Row 1: shorter than the 8-byte length (reference test_header_too_small). */
    expect_fail("empty", raw_bytes("", 0), LORA_E_ST_HEADER_TOO_SMALL, NEEDLES("empty"));
    expect_fail("one_byte", raw_bytes("{", 1), LORA_E_ST_HEADER_TOO_SMALL, NO_NEEDLES);
    expect_fail("seven_bytes", raw_bytes("<\0\0\0\0\0\0", 7), LORA_E_ST_HEADER_TOO_SMALL, NO_NEEDLES);

    /* Row 2: N above 100,000,000, tiny body; no allocation of N bytes (peak checked in main). */
    expect_fail("n_huge", st_raw(0xFFFFFF0000000000ull, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_TOO_LARGE, NEEDLES("18446742974197923840"));
    /* the reference's own vector: "<\0\0\0\0\xff\xff\xff" */
    expect_fail("n_huge_ref", st_raw(0xFFFFFF000000003Cull, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_TOO_LARGE, NO_NEEDLES);
    expect_fail("n_100000001", st_raw(100000001ull, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_TOO_LARGE, NEEDLES("100000001"));
    /* N = 100,000,000 is allowed by the cap but runs past this small file. */
    expect_fail("n_100000000", st_raw(100000000ull, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_LENGTH, NEEDLES("100000000"));
    expect_fail("n_max_u64", st_raw(UINT64_MAX, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_TOO_LARGE, NO_NEEDLES);

    /* Row 3: N past the end of the file (attacks/safetensors_abuse_attempt_1.py rewrites N). */
    expect_fail("n_1000", st_raw(1000, VALID_HDR, strlen(VALID_HDR), NULL, 16), LORA_E_ST_HEADER_LENGTH,
                NEEDLES("1000"));
    expect_fail("n_8_no_header", st_raw(8, "", 0, NULL, 0), LORA_E_ST_HEADER_LENGTH, NO_NEEDLES);
    /* reference test_invalid_header_length: "<\0\0\0\0\0\0\0" alone */
    expect_fail("n_60_no_header", st_raw(60, "", 0, NULL, 0), LORA_E_ST_HEADER_LENGTH, NEEDLES("60"));
    /* N one past the file: the checked 8+N must still be compared with the length */
    expect_fail("n_off_by_one", st_raw(strlen(VALID_HDR) + 17, VALID_HDR, strlen(VALID_HDR), NULL, 16),
                LORA_E_ST_HEADER_LENGTH, NO_NEEDLES);
}

static void row_4(void) {
    /* UTF-8 (reference test_invalid_header_non_utf8: header "\xff") */
    expect_fail("utf8_ff", st_raw(1, "\xff", 1, NULL, 0), LORA_E_ST_HEADER_UTF8, NO_NEEDLES);
    expect_fail("utf8_overlong", st_raw(2, "\xc0\x80", 2, NULL, 0), LORA_E_ST_HEADER_UTF8, NO_NEEDLES);
    expect_fail("utf8_surrogate", st_raw(3, "\xed\xa0\x80", 3, NULL, 0), LORA_E_ST_HEADER_UTF8, NO_NEEDLES);
    /* inside otherwise valid JSON, so the UTF-8 check (not the JSON parser) must catch it;
     * the bad byte is header byte 22 = file offset 30 */
    static const char sur[] = "{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"}}";
    expect_fail("utf8_surrogate_in_string", st_raw(strlen(sur), sur, strlen(sur), NULL, 0), LORA_E_ST_HEADER_UTF8,
                NEEDLES("30"));
    static const char ovl[] = "{\"__metadata__\":{\"k\":\"\xc0\xaf\"}}";
    expect_fail("utf8_overlong_slash", st_raw(strlen(ovl), ovl, strlen(ovl), NULL, 0), LORA_E_ST_HEADER_UTF8,
                NEEDLES("30"));
    static const char big[] = "{\"__metadata__\":{\"k\":\"\xf4\x90\x80\x80\"}}";   /* U+110000 */
    expect_fail("utf8_above_10ffff", st_raw(strlen(big), big, strlen(big), NULL, 0), LORA_E_ST_HEADER_UTF8,
                NO_NEEDLES);
    static const char cut[] = "{\"__metadata__\":{\"k\":\"\xe2\x82\"}}";   /* truncated sequence */
    expect_fail("utf8_truncated", st_raw(strlen(cut), cut, strlen(cut), NULL, 0), LORA_E_ST_HEADER_UTF8,
                NO_NEEDLES);
    /* valid multibyte text loads (U+00E9 escaped; U+20AC, U+1F600 and U+10FFFF raw) */
    expect_ok("utf8_valid", st_json("{\"__metadata__\":{\"caf\\u00e9\":\"\xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"}}", 0),
              check_unicode_meta);

    /* JSON (reference test_invalid_header_not_json: header "{") */
    expect_fail("json_open_brace", st_raw(1, "{", 1, NULL, 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    /* NUL padding is not JSON whitespace */
    expect_fail("json_nul_padding", st_raw(5, "{}\0\0\0", 5, NULL, 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("json_nul_padding_tensor",
                st_raw(strlen(VALID_HDR) + 3, VALID_HDR "\0\0\0", strlen(VALID_HDR) + 3, NULL, 16),
                LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("json_trailing_garbage", st_json("{} x", 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("json_two_objects", st_json("{}{}", 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("json_empty_header", st_raw(0, "", 0, NULL, 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    /* Whitespace padding loads (reference test_whitespace_leading_padded_header and
     * test_whitespace_padded_header). */
    expect_ok("json_ws_leading", st_json("\t\n{}\r ", 0), check_zero_tensors);
    expect_ok("json_ws_trailing", st_json("{}\r \t\n", 0), check_zero_tensors);
    expect_ok("json_ws_padded_tensor", st_json("  " VALID_HDR "        ", 16), check_one_tensor);
}

static void row_5(void) {
    /* reference issue #278: metadata values must be strings */
    expect_fail("meta_number", st_json("{\"__metadata__\":{\"ss_network_dim\":16}}", 0), LORA_E_ST_METADATA_TYPE,
                NEEDLES("ss_network_dim"));
    expect_fail("meta_object", st_json("{\"__metadata__\":{\"a\":{\"b\":\"c\"}}}", 0), LORA_E_ST_METADATA_TYPE,
                NEEDLES("\"a\""));
    expect_fail("meta_null", st_json("{\"__metadata__\":{\"nullkey\":null}}", 0), LORA_E_ST_METADATA_TYPE,
                NEEDLES("nullkey"));
    expect_fail("meta_array_value", st_json("{\"__metadata__\":{\"arrkey\":[\"x\"]}}", 0), LORA_E_ST_METADATA_TYPE,
                NEEDLES("arrkey"));
    expect_fail("meta_not_object", st_json("{\"__metadata__\":\"x\"}", 0), LORA_E_ST_METADATA_TYPE,
                NEEDLES("__metadata__"));
    /* the failure comes after a good entry: what was already copied must be freed */
    expect_fail("meta_second_bad",
                st_json("{\"__metadata__\":{\"format\":\"pt\",\"ss_epoch\":3}," VALID_ENTRY "}", 16),
                LORA_E_ST_METADATA_TYPE, NEEDLES("ss_epoch"));
}

static void row_6(void) {
    /* same tensor name twice with different offsets (reference: misleading InvalidOffset, #401) */
    expect_fail("dup_name_diff_offsets",
                st_json("{\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                        "\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2),
                LORA_E_ST_DUPLICATE_KEY, NEEDLES("dup.weight"));
    /* identical entries twice (reference accepts: the map collapses them) */
    expect_fail("dup_name_identical",
                st_json("{\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                        "\"dup.weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_DUPLICATE_KEY, NEEDLES("dup.weight"));
    expect_fail("dup_dtype_field",
                st_json("{\"t\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_DUPLICATE_KEY, NEEDLES("dtype"));
    /* S2: every level, metadata included */
    expect_fail("dup_meta_key", st_json("{\"__metadata__\":{\"ss_seed\":\"1\",\"ss_seed\":\"2\"}}", 0),
                LORA_E_ST_DUPLICATE_KEY, NEEDLES("ss_seed"));
    expect_fail("dup_metadata_object", st_json("{\"__metadata__\":{},\"__metadata__\":{}}", 0),
                LORA_E_ST_DUPLICATE_KEY, NEEDLES("__metadata__"));
}

static void row_7(void) {
    expect_fail("dtype_float16",
                st_json("{\"bad.tensor\":{\"dtype\":\"float16\",\"shape\":[1],\"data_offsets\":[0,2]}}", 2),
                LORA_E_ST_DTYPE, NEEDLES("bad.tensor", "float16"));
    expect_fail("dtype_F128",
                st_json("{\"bad.tensor\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16),
                LORA_E_ST_DTYPE, NEEDLES("bad.tensor", "F128"));
    expect_fail("dtype_empty", st_json("{\"bad.tensor\":{\"dtype\":\"\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_DTYPE, NEEDLES("bad.tensor"));
    expect_fail("dtype_number", st_json("{\"bad.tensor\":{\"dtype\":17,\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_DTYPE, NEEDLES("bad.tensor"));
    expect_fail("dtype_lowercase", st_json("{\"bad.tensor\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
                LORA_E_ST_DTYPE, NEEDLES("bad.tensor"));
    /* F4 [3] = 12 bits: MisalignedSlice */
    expect_fail("subbyte_f4_3", st_json("{\"packed\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2),
                LORA_E_ST_SUBBYTE, NEEDLES("packed"));
    expect_fail("subbyte_f6_3", st_json("{\"packed\":{\"dtype\":\"F6_E2M3\",\"shape\":[3],\"data_offsets\":[0,3]}}", 3),
                LORA_E_ST_SUBBYTE, NEEDLES("packed"));
    /* whole bytes load: F4 [4] = 2 bytes, F6_E3M2 [4] = 3 bytes */
    expect_ok("subbyte_f4_4", st_json("{\"packed\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2),
              check_one_tensor);
    expect_ok("subbyte_f6_4", st_json("{\"packed\":{\"dtype\":\"F6_E3M2\",\"shape\":[2,2],\"data_offsets\":[0,3]}}", 3),
              check_one_tensor);
}

static void row_8_9(void) {
    /* reference test_validation_overflow (both vectors) */
    expect_fail("shape_overflow_u64",
                st_json("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,18446744073709551614],\"data_offsets\":[0,16]}}", 16),
                LORA_E_ST_SHAPE_OVERFLOW, NO_NEEDLES);
    expect_fail("shape_overflow_bits",
                st_json("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,9223372036854775807],\"data_offsets\":[0,16]}}", 16),
                LORA_E_ST_SHAPE_OVERFLOW, NEEDLES("\"test\""));
    expect_fail("shape_overflow_many_dims",
                st_json("{\"big\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,16]}}", 16),
                LORA_E_ST_SHAPE_OVERFLOW, NEEDLES("big"));
    expect_fail("shape_negative", st_json("{\"neg\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("neg"));
    expect_fail("shape_float", st_json("{\"flt\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("flt"));
    expect_fail("shape_string", st_json("{\"str\":{\"dtype\":\"U8\",\"shape\":[\"1\"],\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("str"));
    expect_fail("shape_not_array", st_json("{\"obj\":{\"dtype\":\"U8\",\"shape\":1,\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("obj"));
    expect_fail("offsets_negative", st_json("{\"neg\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("neg"));

    /* Row 9: reference test_invalid_info (I32 [2,2] with [0, 4]), exactly as the reference
     * writes it (no data bytes), and with the 4 bytes the offsets claim. */
    expect_fail("size_mismatch_ref",
                st_json("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0, 4]}}", 0),
                LORA_E_ST_SIZE_MISMATCH, NEEDLES("\"test\""));
    expect_fail("size_mismatch",
                st_json("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,4]}}", 4),
                LORA_E_ST_SIZE_MISMATCH, NEEDLES("\"test\""));
    expect_fail("size_mismatch_zero_elems",
                st_json("{\"empty\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[0,4]}}", 4),
                LORA_E_ST_SIZE_MISMATCH, NEEDLES("empty"));
    /* zero-size tensors and 0-rank scalars are allowed (reference test_zero_sized_tensor,
     * test_empty_shapes_allowed) */
    static const uint8_t scalar[4] = {0x00, 0x00, 0xe0, 0xc0};   /* -7.0f little-endian */
    static const char zs[] = "{\"zero\":{\"dtype\":\"I32\",\"shape\":[2,0],\"data_offsets\":[0,0]},"
                             "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}";
    expect_ok("zero_and_scalar", st_raw(strlen(zs), zs, strlen(zs), scalar, 4), check_zero_and_scalar);
}

static void row_10(void) {
    /* reference test_json_attack: 10 F32 [2,2] tensors all at [0,16], 16 data bytes */
    char hdr[2048];
    size_t o = 0;
    o += (size_t)snprintf(hdr + o, sizeof hdr - o, "{");
    for (int i = 0; i < 10; i++)
        o += (size_t)snprintf(hdr + o, sizeof hdr - o, "%s\"weight_%d\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}",
                              i ? "," : "", i);
    snprintf(hdr + o, sizeof hdr - o, "}");
    expect_fail("offsets_json_attack", st_json(hdr, 16), LORA_E_ST_OFFSETS, NEEDLES("weight_"));

    expect_fail("offsets_backwards", st_json("{\"back\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[16,0]}}", 16),
                LORA_E_ST_OFFSETS, NEEDLES("back", "16"));
    expect_fail("offsets_gap",
                st_json("{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
                        "\"gapped\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[20,36]}}", 36),
                LORA_E_ST_OFFSETS, NEEDLES("gapped", "20"));
    expect_fail("offsets_start_8", st_json("{\"late\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[8,16]}}", 16),
                LORA_E_ST_OFFSETS, NEEDLES("late", "8"));
    expect_fail("offsets_overlap",
                st_json("{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
                        "\"over\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[8,24]}}", 24),
                LORA_E_ST_OFFSETS, NEEDLES("over"));
    /* offsets far past the file: rejected by the tiling rule, never dereferenced */
    expect_fail("offsets_past_file",
                st_json("{\"far\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[1099511627776,1099511627780]}}", 4),
                LORA_E_ST_OFFSETS, NEEDLES("far"));
}

static void row_11(void) {
    /* reference test_metadata_incomplete_buffer: polyglot tail, and 2 missing bytes */
    blob b = st_json(VALID_HDR, 16);
    size_t n0 = b.n;
    static const uint8_t eocd[22] = {'P', 'K', 5, 6};   /* empty zip end-of-central-directory */
    b.p = realloc(b.p, n0 + sizeof eocd);
    if (!b.p) exit(2);
    memcpy(b.p + n0, eocd, sizeof eocd);
    b.n = n0 + sizeof eocd;
    expect_fail("incomplete_zip_tail", b, LORA_E_ST_INCOMPLETE, NO_NEEDLES);
    static const char bogus[] = "extra_bogus_data_for_polyglot_file";
    blob c = st_json(VALID_HDR, 16);
    c.p = realloc(c.p, c.n + strlen(bogus));
    if (!c.p) exit(2);
    memcpy(c.p + c.n, bogus, strlen(bogus));
    c.n += strlen(bogus);
    expect_fail("incomplete_polyglot_ref", c, LORA_E_ST_INCOMPLETE, NO_NEEDLES);
    blob d = st_json(VALID_HDR, 16);
    d.n -= 2;
    expect_fail("incomplete_truncated", d, LORA_E_ST_INCOMPLETE, NEEDLES("16", "14"));
    expect_fail("incomplete_one_extra", st_json(VALID_HDR, 17), LORA_E_ST_INCOMPLETE, NO_NEEDLES);
    /* no tensors but data bytes */
    expect_fail("incomplete_no_tensors", st_json("{}", 1), LORA_E_ST_INCOMPLETE, NO_NEEDLES);
}

static void row_12(void) {
    static const char lfs[] = "version https://git-lfs.github.com/spec/v1\n"
                              "oid sha256:4d7e8d7bd5fbd2fbd9cd4a3e1a1ff1b1e5f2a0e3c9e5d0e6b2f1c3d4e5f60718\n"
                              "size 2132625894\n";
    expect_fail("lfs_pointer", raw_bytes(lfs, strlen(lfs)), LORA_E_NOT_A_MODEL, NEEDLES("Git LFS"));
    static const char html[] = "<!DOCTYPE html>\n<html lang=\"en\"><head><title>Sign in</title></head>"
                               "<body><form action=\"/login\"></form></body></html>\n";
    expect_fail("html_page", raw_bytes(html, strlen(html)), LORA_E_NOT_A_MODEL, NEEDLES("HTML"));
    static const char html2[] = "\n\n  <html><body>403 Forbidden</body></html>";
    expect_fail("html_page_ws", raw_bytes(html2, strlen(html2)), LORA_E_NOT_A_MODEL, NEEDLES("HTML"));
    /* 7z signature, version 0.4, then start-header CRC and fields */
    static const uint8_t sz[32] = {'7', 'z', 0xbc, 0xaf, 0x27, 0x1c, 0, 4, 0x8d, 0x9b, 0xd5, 0x0f};
    expect_fail("sevenzip", raw_bytes(sz, sizeof sz), LORA_E_NOT_A_MODEL, NEEDLES("7z"));
    blob g = gzip_file(100);
    expect_fail("gzip_small", g, LORA_E_NOT_A_MODEL, NEEDLES("gzip"));
    /* A gzip with MTIME=0 and FLG=0 reads as N = 0x088b1f = 559,903: once the file is larger
     * than 8+N that is a "plausible" header length, and the kind must still be reported. */
    blob g2 = gzip_file(600000);
    expect_fail("gzip_large", g2, LORA_E_NOT_A_MODEL, NEEDLES("gzip"));
    /* a PyTorch zip checkpoint renamed to .safetensors */
    static const uint8_t zip[64] = {'P', 'K', 3, 4, 20, 0, 0, 0, 0, 0};
    expect_fail("zip_ckpt", raw_bytes(zip, sizeof zip), LORA_E_NOT_A_MODEL, NEEDLES("zip"));
}

static void structure_cases(void) {
    /* S6 rank cap: 9 dims -> LORA_E_LIMIT, 8 dims load */
    expect_fail("rank_9",
                st_json("{\"deep\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1),
                LORA_E_LIMIT, NEEDLES("deep", "9"));
    expect_ok("rank_8", st_json("{\"deep\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,2],\"data_offsets\":[0,2]}}", 2),
              check_rank8);
    /* S6 name cap: 4096 bytes load, 4097 give LORA_E_LIMIT */
    {
        char *h = malloc(4200);
        for (int len = 4096; len <= 4097; len++) {
            size_t o = 0;
            h[o++] = '{';
            h[o++] = '"';
            memset(h + o, 'n', (size_t)len);
            o += (size_t)len;
            snprintf(h + o, 4200 - o, "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
            if (len == 4096) expect_ok("name_4096", st_json(h, 1), check_one_tensor);
            else expect_fail("name_4097", st_json(h, 1), LORA_E_LIMIT, NEEDLES("4097"));
        }
        free(h);
    }
    /* S4: exactly dtype, shape, data_offsets (two integers) */
    expect_fail("missing_offsets", st_json("{\"nooff\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1), LORA_E_ST_HEADER_JSON,
                NEEDLES("nooff", "data_offsets"));
    expect_fail("missing_dtype", st_json("{\"nodt\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1), LORA_E_ST_HEADER_JSON,
                NEEDLES("nodt", "dtype"));
    expect_fail("missing_shape", st_json("{\"nosh\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("nosh", "shape"));
    expect_fail("offsets_three", st_json("{\"three\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("three"));
    expect_fail("offsets_one", st_json("{\"one\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1]}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("one"));
    expect_fail("offsets_object",
                st_json("{\"obj\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":{\"a\":0,\"b\":1}}}", 1),
                LORA_E_ST_HEADER_JSON, NEEDLES("obj"));
    expect_fail("entry_not_object", st_json("{\"num\":5}", 0), LORA_E_ST_HEADER_JSON, NEEDLES("num"));
    expect_fail("top_level_array", st_json("[{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}]", 1),
                LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("top_level_string", st_json("\"{}\"", 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    expect_fail("top_level_number", st_json("0", 0), LORA_E_ST_HEADER_JSON, NO_NEEDLES);
    /* unknown fields inside an entry are ignored, like the reference reader (S4 policy) */
    expect_ok("unknown_field",
              st_json("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"extra\":[1,{\"x\":null}]}}", 1),
              check_one_tensor);

    /* Unaligned F32 data read through lora_file_read_f32 (memcpy, never a cast). Header padded
     * with spaces to a multiple of 8 so the F32 tensor starts at an odd file offset. */
    char hdr[256];
    snprintf(hdr, sizeof hdr,
             "{\"weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[1,13]},"
             "\"byte\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
    size_t hl = strlen(hdr);
    while (hl % 8) hdr[hl++] = ' ';
    hdr[hl] = '\0';
    uint8_t data[13];
    data[0] = 200;
    memcpy(data + 1, unaligned_vals, sizeof unaligned_vals);   /* test host is little-endian */
    expect_ok("unaligned_f32", st_raw(hl, hdr, hl, data, sizeof data), check_unaligned);
}

/* lora_file_open's own errors (lora.h): a missing file, and something that is not a file. */
static void open_errors(void) {
    char path[700];
    snprintf(path, sizeof path, "%s/does_not_exist.safetensors", tmpdir);
    lora_file *f = (lora_file *)0x1;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_E_NOT_FOUND);
    CHECK(f == NULL);
    CHECK_MSG(strstr(lora_errmsg(ctx), path) != NULL, "%s", lora_errmsg(ctx));
    check_ctx_usable("missing file");
    snprintf(path, sizeof path, "%s/a_directory.safetensors", tmpdir);
    CHECK(mkdir(path, 0755) == 0);
    f = (lora_file *)0x1;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_E_IO);
    CHECK(f == NULL);
    CHECK_MSG(strstr(lora_errmsg(ctx), path) != NULL, "%s", lora_errmsg(ctx));
    CHECK(rmdir(path) == 0);
    check_ctx_usable("directory");
    CHECK_STATUS(lora_file_open(ctx, NULL, &f), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_file_open(NULL, valid_path, &f), LORA_E_INVALID_ARG);
    check_ctx_usable("NULL arguments");
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_st_badinput");
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/lora_st_badinput_XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(valid_path, sizeof valid_path, "%s/valid.safetensors", tmpdir);
    blob v = st_json(VALID_HDR, 16);
    write_file(valid_path, v.p, v.n);
    blob_free(&v);
    mem_baseline = host_bytes();
    CHECK(mem_baseline == 0);

    check_ctx_usable("start");
    rows_1_to_3();
    row_4();
    row_5();
    row_6();
    row_7();
    row_8_9();
    row_10();
    row_11();
    row_12();
    structure_cases();
    open_errors();

    /* Peak host memory stays O(input): nothing was ever sized by a hostile N (the largest
     * input here is the 600 KB gzip, which is mapped, not copied). */
    uint64_t peak = 0;
    lora_ctx_memory(ctx, NULL, &peak, NULL, NULL);
    CHECK_MSG(peak < 4u << 20, "host peak %llu bytes", (unsigned long long)peak);

    unlink(valid_path);
    /* everything the test wrote was removed: the directory must now be empty */
    DIR *d = opendir(tmpdir);
    int left = 0;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                fprintf(stderr, "left behind: %s\n", e->d_name);
                left++;
            }
        closedir(d);
    }
    CHECK(left == 0);
    CHECK(rmdir(tmpdir) == 0);
    lora_ctx_free(ctx);
    return test_finish("test_st_badinput");
}
