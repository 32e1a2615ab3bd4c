/* safetensors write -> read round trips through real files in a temporary directory:
 * every dtype liblora writes, bit-exact; layout (8-aligned data start, tensors aligned to
 * their element size, descending alignment); metadata with non-ASCII and empty strings;
 * refusal of duplicate names with no file left behind; replacement by rename, so a handle
 * opened before an overwrite keeps reading the old bytes (safetensors issue #762); no temp
 * files left; lora_file_read_f32 conversions against hand-computed values. */
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "io/safetensors.h"
#include "../test.h"

static char tmpdir[64];

static char *path_in_tmp(const char *name) { return test_path_join(tmpdir, name); }


/* Number of entries in tmpdir that look like the atomic writer's temp files. */
static int count_temp_files(void) {
    DIR *d = opendir(tmpdir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] == '.' && strstr(e->d_name, ".lora-tmp-")) n++;
    if (d) closedir(d);
    return n;
}

static void remove_tmpdir(void) {
    DIR *d = opendir(tmpdir);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = path_in_tmp(e->d_name);
        unlink(p);
        free(p);
    }
    if (d) closedir(d);
    CHECK(rmdir(tmpdir) == 0);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint8_t next_byte(void) {   /* xorshift64*: arbitrary test bytes */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint8_t)((rng_state * 0x2545f4914f6cdd1duLL) >> 56);
}

/* ---- round trip of every writable dtype ------------------------------------------------- */
struct rt_case {
    const char *name;
    lora_dtype dtype;
    const char *dtype_name;
    int esize;
    int32_t ndim;
    int64_t shape[4];
};

static const struct rt_case rt_cases[] = {
    {"t_f32", LORA_DTYPE_F32, "F32", 4, 2, {3, 5}},
    {"t_f16", LORA_DTYPE_F16, "F16", 2, 3, {2, 3, 3}},
    {"t_bf16", LORA_DTYPE_BF16, "BF16", 2, 1, {7}},
    {"t_f64", LORA_DTYPE_F64, "F64", 8, 0, {0}},
    {"t_i64", LORA_DTYPE_I64, "I64", 8, 1, {3}},
    {"t_i32", LORA_DTYPE_I32, "I32", 4, 4, {1, 2, 1, 3}},
    {"t_u8", LORA_DTYPE_U8, "U8", 1, 1, {13}},
    {"t_i16", LORA_DTYPE_I16, "I16", 2, 2, {5, 1}},
    {"t_i8", LORA_DTYPE_I8, "I8", 1, 1, {3}},
    {"t_bool", LORA_DTYPE_BOOL, "BOOL", 1, 2, {2, 3}},
    {"t_u16", LORA_DTYPE_U16, "U16", 2, 1, {5}},
    {"t_u32", LORA_DTYPE_U32, "U32", 4, 2, {4, 0}},
    {"t_u64", LORA_DTYPE_U64, "U64", 8, 1, {2}},
    {"t_f8_e4m3", LORA_DTYPE_F8_E4M3, "F8_E4M3", 1, 1, {9}},
    {"t_f8_e5m2", LORA_DTYPE_F8_E5M2, "F8_E5M2", 1, 2, {3, 3}},
    {"a_second_f32", LORA_DTYPE_F32, "F32", 4, 1, {1}},
};
#define RT_N ((int)(sizeof rt_cases / sizeof rt_cases[0]))

static int64_t rt_numel(const struct rt_case *c) {
    int64_t n = 1;
    for (int d = 0; d < c->ndim; d++) n *= c->shape[d];
    return n;
}

static const char *const rt_mk[] = {"ss_network_dim", "ss_comment_\xd0\xba\xd0\xbb\xd1\x8e\xd1\x87", "ss_empty",
                                    "ss_emoji"};
static const char *const rt_mv[] = {"8", "v\xc3\xa4rde \xe6\x97\xa5\xe6\x9c\xac", "", "\xf0\x9f\x9a\x80 \"q\" \\ \n"};
#define RT_N_META 4

static void test_roundtrip(lora_ctx *ctx) {
    uint8_t *data[RT_N];
    struct st_write_tensor wt[RT_N];
    for (int k = 0; k < RT_N; k++) {
        const struct rt_case *c = &rt_cases[k];
        size_t nb = (size_t)rt_numel(c) * (size_t)c->esize;
        data[k] = malloc(nb ? nb : 1);
        for (size_t i = 0; i < nb; i++) data[k][i] = c->dtype == LORA_DTYPE_BOOL ? next_byte() & 1 : next_byte();
        wt[k] = (struct st_write_tensor){c->name, c->dtype, c->ndim, c->shape, data[k]};
    }
    char *path = path_in_tmp("roundtrip.safetensors");
    CHECK_STATUS(st_write(ctx, path, wt, RT_N, rt_mk, rt_mv, RT_N_META), LORA_OK);
    CHECK(count_temp_files() == 0);

    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    if (f) {
        CHECK(f->data_start % 8 == 0);
        /* the header JSON is followed by at most 7 spaces of padding up to the data */
        size_t flen = 0;
        uint8_t *raw = test_slurp(path, &flen);
        CHECK(raw && flen >= f->data_start);
        if (raw && flen >= f->data_start) {
            uint64_t end = f->data_start;
            while (end > 8 && raw[end - 1] == ' ') end--;
            CHECK(raw[8] == '{' && raw[end - 1] == '}' && f->data_start - end < 8);
        }
        free(raw);
        CHECK(lora_file_tensor_count(f) == RT_N);
        int prev_esize = 8;
        for (int64_t i = 0; i < lora_file_tensor_count(f); i++) {
            const struct st_tensor *t = &f->tensors[i];
            int k = 0;
            while (k < RT_N && strcmp(rt_cases[k].name, t->name) != 0) k++;
            CHECK_MSG(k < RT_N, "unexpected tensor %s", t->name);
            if (k == RT_N) continue;
            const struct rt_case *c = &rt_cases[k];
            CHECK_MSG((f->data_start + t->begin) % (uint64_t)c->esize == 0, "%s at file offset %llu", c->name,
                      (unsigned long long)(f->data_start + t->begin));
            CHECK_MSG(c->esize <= prev_esize, "%s (%d-byte elements) after %d-byte elements", c->name, c->esize,
                      prev_esize);
            prev_esize = c->esize;
            const char *dname = NULL;
            lora_dtype dt = 0;
            int32_t ndim = -1;
            int64_t shape[8] = {0};
            uint64_t nbytes = 0;
            CHECK_STATUS(lora_file_tensor_info(f, i, NULL, &dt, &dname, &ndim, shape, 8, &nbytes), LORA_OK);
            CHECK_MSG(dt == c->dtype && strcmp(dname, c->dtype_name) == 0, "%s: dtype %s", c->name, dname);
            CHECK(ndim == c->ndim);
            int shape_ok = 1;
            for (int d = 0; d < c->ndim; d++) shape_ok &= shape[d] == c->shape[d];
            CHECK_MSG(shape_ok, "%s: shape", c->name);
            CHECK(nbytes == (uint64_t)rt_numel(c) * (uint64_t)c->esize);
            CHECK_MSG(memcmp(st_data(f, i), data[k], (size_t)nbytes) == 0, "%s: bytes differ", c->name);
        }
        CHECK(lora_file_metadata_count(f) == RT_N_META);
        for (int m = 0; m < RT_N_META; m++) {
            int found = 0;
            for (int64_t j = 0; j < lora_file_metadata_count(f); j++) {
                const char *key, *val;
                if (lora_file_metadata_at(f, j, &key, &val) == LORA_OK && strcmp(key, rt_mk[m]) == 0) {
                    found = 1;
                    CHECK_MSG(strcmp(val, rt_mv[m]) == 0, "metadata %s = \"%s\"", key, val);
                }
            }
            CHECK_MSG(found, "metadata key %s missing", rt_mk[m]);
        }
        CHECK_STATUS(lora_file_metadata_at(f, RT_N_META, NULL, NULL), LORA_E_INVALID_ARG);
        lora_file_free(f);
    }
    unlink(path);
    free(path);
    for (int k = 0; k < RT_N; k++) free(data[k]);
}

/* ---- refusals ----------------------------------------------------------------------------- */
static void test_duplicates(lora_ctx *ctx) {
    const float a[2] = {1, 2}, b[2] = {3, 4};
    const int64_t shape[1] = {2};
    const struct st_write_tensor dup[2] = {{"w", LORA_DTYPE_F32, 1, shape, a}, {"w", LORA_DTYPE_F32, 1, shape, b}};
    const struct st_write_tensor one[2] = {{"w", LORA_DTYPE_F32, 1, shape, a}, {"v", LORA_DTYPE_F32, 1, shape, b}};
    char *path = path_in_tmp("dup.safetensors");
    CHECK_STATUS(st_write(ctx, path, dup, 2, NULL, NULL, 0), LORA_E_ST_DUPLICATE_KEY);
    CHECK(access(path, F_OK) != 0 && errno == ENOENT);
    const char *const mk[2] = {"k", "k"}, *const mv[2] = {"1", "2"};
    CHECK_STATUS(st_write(ctx, path, one, 2, mk, mv, 2), LORA_E_ST_DUPLICATE_KEY);
    CHECK(access(path, F_OK) != 0 && errno == ENOENT);
    CHECK(count_temp_files() == 0);

    /* A refused write over an existing file leaves it as it was. */
    CHECK_STATUS(st_write(ctx, path, one, 2, NULL, NULL, 0), LORA_OK);
    size_t n0 = 0, n1 = 0;
    uint8_t *before = test_slurp(path, &n0);
    CHECK_STATUS(st_write(ctx, path, dup, 2, NULL, NULL, 0), LORA_E_ST_DUPLICATE_KEY);
    uint8_t *after = test_slurp(path, &n1);
    CHECK(before && after && n0 == n1 && memcmp(before, after, n0) == 0);
    free(before);
    free(after);
    CHECK(count_temp_files() == 0);

    /* A missing directory fails cleanly. */
    char *nodir = path_in_tmp("no-such-dir/x.safetensors");
    CHECK(st_write(ctx, nodir, one, 2, NULL, NULL, 0) != LORA_OK);
    free(nodir);
    unlink(path);
    free(path);
}

/* ---- overwrite of a file that is open (safetensors issue #762) -------------------------- */
static void test_overwrite_open_file(lora_ctx *ctx) {
    char *path = path_in_tmp("overwrite.safetensors");
    const float v1[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    const float v2[6] = {-1.0f, -2.0f, -3.0f, -4.0f, -5.0f, -6.0f};
    const int64_t s1[1] = {4}, s2[2] = {2, 3};
    const struct st_write_tensor w1 = {"w", LORA_DTYPE_F32, 1, s1, v1};
    const struct st_write_tensor w2[2] = {{"w", LORA_DTYPE_F32, 2, s2, v2}, {"extra", LORA_DTYPE_F32, 1, s1, v1}};
    CHECK_STATUS(st_write(ctx, path, &w1, 1, NULL, NULL, 0), LORA_OK);
    struct stat st1, st2;
    CHECK(stat(path, &st1) == 0);

    lora_file *old = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &old), LORA_OK);
    CHECK_STATUS(st_write(ctx, path, w2, 2, NULL, NULL, 0), LORA_OK);
    CHECK(stat(path, &st2) == 0);
    CHECK_MSG(st1.st_ino != st2.st_ino, "the file was rewritten in place (inode %llu kept)",
              (unsigned long long)st1.st_ino);
    CHECK(count_temp_files() == 0);
    if (old) {
        /* The handle still reads the old content. */
        CHECK(lora_file_tensor_count(old) == 1);
        float got[4] = {0};
        int64_t idx = lora_file_find(old, "w");
        CHECK_STATUS(lora_file_read_f32(old, idx, got, 4), LORA_OK);
        CHECK(memcmp(got, v1, sizeof v1) == 0);
        CHECK(memcmp(st_data(old, idx), v1, sizeof v1) == 0);
        lora_file_free(old);
    }
    lora_file *now = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &now), LORA_OK);
    if (now) {
        CHECK(lora_file_tensor_count(now) == 2);
        float got[6] = {0};
        CHECK_STATUS(lora_file_read_f32(now, lora_file_find(now, "w"), got, 6), LORA_OK);
        CHECK(memcmp(got, v2, sizeof v2) == 0);
        lora_file_free(now);
    }
    unlink(path);
    free(path);
}

/* ---- float32 reads of every convertible dtype -------------------------------------------- */
static void test_read_f32(lora_ctx *ctx) {
    /* Bits and their values worked out by hand from the formats' definitions. */
    const uint16_t f16[] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000, 0x7c00, 0x3555, 0x0400, 0x7e00};
    const float f16_want[] = {1.0f, -2.0f, 65504.0f, 0x1p-24f, -0.0f, INFINITY, 0.333251953125f, 0x1p-14f, NAN};
    const uint16_t bf16[] = {0x3f80, 0xc0a0, 0x7f7f, 0x0001, 0xff80, 0x3eab};
    const float bf16_want[] = {1.0f, -5.0f, 0x1.fep127f, 0x1p-133f, -INFINITY, 0.333984375f};
    const double f64[] = {1.0 / 3.0, 123456789.0, -0.5, 1e-300};
    const float f64_want[] = {0x1.555556p-2f, 123456792.0f, -0.5f, 0.0f};
    const int64_t i64[] = {-5, (INT64_C(1) << 53) + 1, INT64_MIN, 16777217, INT64_MAX};
    const float i64_want[] = {-5.0f, 0x1p53f, -0x1p63f, 16777216.0f, 0x1p63f};
    const int32_t i32[] = {INT32_MIN, 16777217, -1, 16777219};
    const float i32_want[] = {-0x1p31f, 16777216.0f, -1.0f, 16777220.0f};
    const int16_t i16[] = {-32768, 32767, 0};
    const float i16_want[] = {-32768.0f, 32767.0f, 0.0f};
    const int8_t i8[] = {-128, 127, -1};
    const float i8_want[] = {-128.0f, 127.0f, -1.0f};
    const uint8_t u8[] = {0, 255, 128};
    const float u8_want[] = {0.0f, 255.0f, 128.0f};
    const uint8_t bl[] = {0, 1, 1, 0};
    const float bl_want[] = {0.0f, 1.0f, 1.0f, 0.0f};
    const uint16_t u16[] = {1, 2};
    const uint32_t u32[] = {1};
    const uint64_t u64[] = {1};
    const uint8_t f8[] = {0x38};
#define N_OF(a) ((int64_t)(sizeof a / sizeof a[0]))
    const int64_t sh[] = {N_OF(f16), N_OF(bf16), N_OF(f64), N_OF(i64), N_OF(i32), N_OF(i16), N_OF(i8), N_OF(u8),
                          N_OF(bl), N_OF(u16), N_OF(u32), N_OF(u64), N_OF(f8), N_OF(f8), 0};
    const struct st_write_tensor wt[] = {
        {"f16", LORA_DTYPE_F16, 1, &sh[0], f16},   {"bf16", LORA_DTYPE_BF16, 1, &sh[1], bf16},
        {"f64", LORA_DTYPE_F64, 1, &sh[2], f64},   {"i64", LORA_DTYPE_I64, 1, &sh[3], i64},
        {"i32", LORA_DTYPE_I32, 1, &sh[4], i32},   {"i16", LORA_DTYPE_I16, 1, &sh[5], i16},
        {"i8", LORA_DTYPE_I8, 1, &sh[6], i8},      {"u8", LORA_DTYPE_U8, 1, &sh[7], u8},
        {"bool", LORA_DTYPE_BOOL, 1, &sh[8], bl},  {"u16", LORA_DTYPE_U16, 1, &sh[9], u16},
        {"u32", LORA_DTYPE_U32, 1, &sh[10], u32},  {"u64", LORA_DTYPE_U64, 1, &sh[11], u64},
        {"e4m3", LORA_DTYPE_F8_E4M3, 1, &sh[12], f8}, {"e5m2", LORA_DTYPE_F8_E5M2, 1, &sh[13], f8},
        {"empty", LORA_DTYPE_F32, 1, &sh[14], NULL},
    };
    struct {
        const char *name;
        const float *want;
        int64_t n;
    } conv[] = {
        {"f16", f16_want, N_OF(f16)}, {"bf16", bf16_want, N_OF(bf16)}, {"f64", f64_want, N_OF(f64)},
        {"i64", i64_want, N_OF(i64)}, {"i32", i32_want, N_OF(i32)},    {"i16", i16_want, N_OF(i16)},
        {"i8", i8_want, N_OF(i8)},    {"u8", u8_want, N_OF(u8)},       {"bool", bl_want, N_OF(bl)},
    };
    char *path = path_in_tmp("convert.safetensors");
    CHECK_STATUS(st_write(ctx, path, wt, N_OF(wt), NULL, NULL, 0), LORA_OK);
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    if (f) {
        float got[16];
        for (size_t c = 0; c < sizeof conv / sizeof conv[0]; c++) {
            int64_t idx = lora_file_find(f, conv[c].name);
            CHECK(idx >= 0);
            CHECK_STATUS(lora_file_read_f32(f, idx, got, 16), LORA_OK);
            for (int64_t i = 0; i < conv[c].n; i++) {
                float w = conv[c].want[i];
                int ok = isnan(w) ? isnan(got[i]) : memcmp(&got[i], &w, 4) == 0;   /* bits: -0 != +0 */
                CHECK_MSG(ok, "%s[%lld] read as %a, want %a", conv[c].name, (long long)i, got[i], w);
            }
            /* a buffer one element short is refused */
            CHECK_STATUS(lora_file_read_f32(f, idx, got, (uint64_t)conv[c].n - 1), LORA_E_LIMIT);
        }
        const char *unsupported[] = {"u16", "u32", "u64", "e4m3", "e5m2"};
        for (int u = 0; u < 5; u++)
            CHECK_STATUS(lora_file_read_f32(f, lora_file_find(f, unsupported[u]), got, 16), LORA_E_UNSUPPORTED);
        CHECK_STATUS(lora_file_read_f32(f, lora_file_find(f, "empty"), NULL, 0), LORA_OK);
        CHECK_STATUS(lora_file_read_f32(f, lora_file_tensor_count(f), got, 16), LORA_E_INVALID_ARG);
        lora_file_free(f);
    }
#undef N_OF
    unlink(path);
    free(path);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora-test-strt-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_roundtrip(ctx);
    test_duplicates(ctx);
    test_overwrite_open_file(ctx);
    test_read_f32(ctx);
    CHECK(count_temp_files() == 0);
    remove_tmpdir();
    lora_ctx_free(ctx);
    return test_finish("test_safetensors_roundtrip");
}
