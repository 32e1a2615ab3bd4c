/* Deterministic mutation fuzzing of the safetensors reader, small enough for every CI run
 * (spec/safety.md 1.9 and H1-H3: "always replay the checked-in corpus + crash reproducers as
 * plain unit tests"; the libFuzzer target is tests/fuzz/fuzz_safetensors.c).
 *
 * 1. Replays every file of tests/fuzz/corpus/. Names state what is expected:
 *      ok_*                 must load;
 *      err_<STATUS>_*       must fail with LORA_E_<STATUS> (e.g. err_ST_OFFSETS_json_attack);
 *      anything else        (libFuzzer finds, crash reproducers) must just behave.
 * 2. Mutates valid files built here (bit flips, byte insert/delete, JSON digit and token
 *    edits, truncation, length-field rewrites, appended bytes, chunk copies) and parses each
 *    result in memory from an exactly-sized heap buffer, so ASan sees any read past the end.
 *
 * Every result must be LORA_OK or a status lora_status_name() knows; a failure returns no
 * handle and a message naming the source; a success satisfies the format's invariants (every
 * tensor inside the buffer, tiling the data exactly, sizes matching shapes, UTF-8 strings) and
 * every readable tensor converts; host memory is back at its baseline after each st_close.
 *
 * Environment: LORA_FUZZ_SEED (default 20240611), LORA_FUZZ_ITERS (default 100000),
 * LORA_FUZZ_CORPUS (corpus folder; default found from LORA_TEST_DATA or the source path). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "core/utf8.h"
#include "io/safetensors.h"
#include "../test.h"

static lora_ctx *ctx;
static uint64_t mem_baseline;
static long n_status[1000];

/* ---- RNG: splitmix64 ------------------------------------------------------------------------ */
static uint64_t rng_state;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

/* ---- byte vectors ----------------------------------------------------------------------- */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} vec;

static void vec_reserve(vec *v, size_t need) {
    if (need <= v->cap) return;
    size_t c = v->cap ? v->cap : 64;
    while (c < need) c *= 2;
    v->p = realloc(v->p, c);
    if (!v->p) { perror("realloc"); exit(2); }
    v->cap = c;
}
static void vec_append(vec *v, const void *p, size_t n) {
    vec_reserve(v, v->n + n);
    if (n) memcpy(v->p + v->n, p, n);
    v->n += n;
}
static void vec_insert(vec *v, size_t at, const void *p, size_t n) {
    vec_reserve(v, v->n + n);
    memmove(v->p + at + n, v->p + at, v->n - at);
    memcpy(v->p + at, p, n);
    v->n += n;
}
static void vec_erase(vec *v, size_t at, size_t n) {
    memmove(v->p + at, v->p + at + n, v->n - at - n);
    v->n -= n;
}
static uint64_t get_n(const vec *v) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | v->p[i];
    return n;
}
static void set_n(vec *v, uint64_t n) {
    for (int i = 0; i < 8; i++) v->p[i] = (uint8_t)(n >> (8 * i));
}

/* `8-byte LE length + header + data` with data bytes given or a pattern. */
static vec st_file(const char *hdr, const void *data, size_t dlen) {
    vec v = {0};
    uint8_t n[8];
    uint64_t h = strlen(hdr);
    for (int i = 0; i < 8; i++) n[i] = (uint8_t)(h >> (8 * i));
    vec_append(&v, n, 8);
    vec_append(&v, hdr, h);
    vec_reserve(&v, v.n + dlen);
    for (size_t i = 0; i < dlen; i++) v.p[v.n + i] = data ? ((const uint8_t *)data)[i] : (uint8_t)(i * 37 + 11);
    v.n += dlen;
    return v;
}

/* ---- invariants --------------------------------------------------------------------------- */
static int readable(lora_dtype t) {
    switch (t) {
    case LORA_DTYPE_F32: case LORA_DTYPE_F16: case LORA_DTYPE_BF16: case LORA_DTYPE_F64: case LORA_DTYPE_I64:
    case LORA_DTYPE_I32: case LORA_DTYPE_I16: case LORA_DTYPE_I8: case LORA_DTYPE_U8: case LORA_DTYPE_BOOL:
        return 1;
    default:
        return 0;
    }
}

static int ok_invariants(const char *label, const struct lora_file *f, const uint8_t *buf, uint64_t len) {
    int bad = 0;
#define INV(c) do { if (!(c)) { bad++; fprintf(stderr, "%s: invariant failed: %s\n", label, #c); } } while (0)
    INV(f->base == buf && f->size == len);
    INV(f->data_start >= 8 && f->data_start <= len);
    INV(f->n_tensors >= 0 && f->n_meta >= 0);
    uint64_t pos = 0;
    for (int64_t i = 0; !bad && i < f->n_tensors; i++) {
        const struct st_tensor *t = &f->tensors[i];
        INV(t->name != NULL);
        if (!t->name) break;
        INV(strlen(t->name) <= ST_MAX_NAME);
        INV(utf8_valid((const uint8_t *)t->name, strlen(t->name), NULL));
        INV(strcmp(t->name, "__metadata__") != 0);
        INV(t->ndim >= 0 && t->ndim <= ST_MAX_RANK);
        INV(t->bits > 0 && t->dtype_name != NULL);
        INV(t->begin == pos && t->end >= t->begin);
        /* inside the buffer, checked without overflow */
        INV(t->end <= len - f->data_start);
        uint64_t nel = 1, nbits = 0;
        int ovf = 0;
        for (int d = 0; d < t->ndim && d < ST_MAX_RANK; d++) {
            INV(t->shape[d] >= 0);
            if (__builtin_mul_overflow(nel, (uint64_t)t->shape[d], &nel)) ovf = 1;
        }
        if (__builtin_mul_overflow(nel, (uint64_t)t->bits, &nbits)) ovf = 1;
        INV(!ovf && nbits % 8 == 0 && nbits / 8 == t->end - t->begin);
        INV(lora_file_find(f, t->name) == i);   /* names are unique */
        pos = t->end;
        if (bad) break;
        if (readable(t->dtype)) {
            uint64_t n = nel;
            float *dst = malloc((size_t)(n ? n : 1) * sizeof(float));
            if (!dst) { bad++; break; }
            lora_status s = lora_file_read_f32(f, i, dst, n);
            INV(s == LORA_OK);
            if (n) {
                lora_status s2 = lora_file_read_f32(f, i, dst, n - 1);
                INV(s2 == LORA_E_LIMIT);
            }
            free(dst);
        }
    }
    if (!bad) INV(f->data_start + pos == len);
    for (int64_t i = 0; !bad && i < f->n_meta; i++) {
        INV(f->meta_keys[i] && f->meta_vals[i]);
        if (bad) break;
        INV(utf8_valid((const uint8_t *)f->meta_keys[i], strlen(f->meta_keys[i]), NULL));
        INV(utf8_valid((const uint8_t *)f->meta_vals[i], strlen(f->meta_vals[i]), NULL));
    }
#undef INV
    return bad;
}

/* Parses `len` bytes from an exactly-sized copy; returns the status (after all checks). */
static lora_status parse_checked(const char *label, const uint8_t *src, size_t len, int recheck) {
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) { perror("malloc"); exit(2); }
    if (len) memcpy(buf, src, len);
    struct lora_file *f = (struct lora_file *)0x1;
    lora_status s = st_parse(ctx, label, buf, len, &f);
    CHECK_MSG(strcmp(lora_status_name(s), "LORA_E_UNKNOWN_STATUS") != 0, "%s: unknown status %d", label, s);
    if (s >= 0 && s < 1000) n_status[s]++;
    if (s == LORA_OK) {
        CHECK_MSG(f != NULL && f != (struct lora_file *)0x1, "%s: LORA_OK without a handle", label);
        if (f && f != (struct lora_file *)0x1) {
            int bad = ok_invariants(label, f, buf, len);
            CHECK_MSG(bad == 0, "%s: %d invariants failed", label, bad);
            st_close(f);
        }
    } else {
        CHECK_MSG(f == NULL, "%s: %s returned a handle", label, lora_status_name(s));
        CHECK_MSG(lora_errcode(ctx) == s, "%s: errcode %d, status %d", label, lora_errcode(ctx), s);
        CHECK_MSG(strstr(lora_errmsg(ctx), label) != NULL, "%s: message does not name the source: %s", label,
                  lora_errmsg(ctx));
    }
    uint64_t hb = UINT64_MAX;
    lora_ctx_memory(ctx, &hb, NULL, NULL, NULL);
    CHECK_MSG(hb == mem_baseline, "%s: host_bytes %llu after st_close (baseline %llu)", label, (unsigned long long)hb,
              (unsigned long long)mem_baseline);
    if (recheck) {   /* deterministic: same bytes, same answer */
        struct lora_file *g = NULL;
        lora_status s2 = st_parse(ctx, label, buf, len, &g);
        CHECK_MSG(s2 == s, "%s: second parse gave %d, first %d", label, s2, s);
        st_close(g);
    }
    free(buf);
    return s;
}

/* ---- corpus replay ------------------------------------------------------------------------ */
static int dir_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static const char *find_corpus(char *buf, size_t cap, const char *arg) {
    if (arg && dir_exists(arg)) return arg;
    const char *e = getenv("LORA_FUZZ_CORPUS");
    if (e && dir_exists(e)) return e;
    e = getenv("LORA_TEST_DATA");   /* <source>/tests/data */
    if (e) {
        snprintf(buf, cap, "%s/../fuzz/corpus", e);
        if (dir_exists(buf)) return buf;
    }
    /* relative to this source file (as the compiler saw it: absolute or build-dir relative) */
    snprintf(buf, cap, "%s", __FILE__);
    char *slash = strrchr(buf, '/');
    if (slash) {
        snprintf(slash, cap - (size_t)(slash - buf), "/../fuzz/corpus");
        if (dir_exists(buf)) return buf;
    }
    return NULL;
}

/* "err_ST_OFFSETS_x" -> LORA_E_ST_OFFSETS (longest status name that matches); -1 if none. */
static lora_status expected_from_name(const char *name) {
    if (strncmp(name, "ok_", 3) == 0) return LORA_OK;
    if (strncmp(name, "err_", 4) != 0) return -1;
    const char *rest = name + 4;
    lora_status best = -1;
    size_t best_len = 0;
    for (lora_status s = 1; s < 1000; s++) {
        const char *n = lora_status_name(s);
        if (strcmp(n, "LORA_E_UNKNOWN_STATUS") == 0 || strncmp(n, "LORA_E_", 7) != 0) continue;
        size_t l = strlen(n + 7);
        if (strncmp(rest, n + 7, l) == 0 && (rest[l] == '_' || rest[l] == '.' || rest[l] == '\0') && l > best_len) {
            best = s;
            best_len = l;
        }
    }
    return best;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void replay_corpus(const char *arg) {
    char buf[1024];
    const char *dir = find_corpus(buf, sizeof buf, arg);
    CHECK_MSG(dir != NULL, "corpus folder tests/fuzz/corpus not found (set LORA_FUZZ_CORPUS)");
    if (!dir) return;
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    if (!d) return;
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "README.md") == 0) continue;
        names = realloc(names, (n + 1) * sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_str);
    int checked = 0, named = 0;
    for (size_t i = 0; i < n; i++) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        struct stat sb;
        if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) { free(names[i]); continue; }
        FILE *fp = fopen(path, "rb");
        CHECK(fp != NULL);
        if (!fp) { free(names[i]); continue; }
        uint8_t *data = malloc((size_t)sb.st_size + 1);
        size_t got = fread(data, 1, (size_t)sb.st_size, fp);
        fclose(fp);
        CHECK(got == (size_t)sb.st_size);
        char label[600];
        snprintf(label, sizeof label, "corpus:%s", names[i]);
        lora_status s = parse_checked(label, data, got, 1);
        lora_status want = expected_from_name(names[i]);
        if (strncmp(names[i], "ok_", 3) == 0 || strncmp(names[i], "err_", 4) == 0) {
            named++;
            CHECK_MSG(want >= 0, "%s: cannot tell the expected status from the name", names[i]);
            CHECK_MSG(s == want, "%s: got %s, want %s: %s", names[i], lora_status_name(s), lora_status_name(want),
                      lora_errmsg(ctx));
        }
        checked++;
        free(data);
        free(names[i]);
    }
    free(names);
    printf("corpus %s: %d files replayed, %d with an expected status\n", dir, checked, named);
    CHECK_MSG(named >= 10, "only %d named corpus files", named);
}

/* ---- seeds -------------------------------------------------------------------------------- */
#define MAX_POOL 256
static vec pool[MAX_POOL];
static int n_pool, n_seeds;

static void add_seed(vec v) {
    if (n_pool < MAX_POOL) pool[n_pool++] = v;
    else free(v.p);
}

static void build_seeds(void) {
    /* reference test_deserialization */
    add_seed(st_file("{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", NULL, 16));
    /* kohya-like LoRA with metadata, several dtypes, JSON order != offset order */
    add_seed(st_file("{\"__metadata__\":{\"ss_network_dim\":\"4\",\"ss_network_alpha\":\"1.0\",\"format\":\"pt\"},"
                     "\"lora_unet_up.alpha\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[40,42]},"
                     "\"lora_unet_up.lora_down.weight\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,32]},"
                     "\"lora_unet_up.lora_up.weight\":{\"dtype\":\"BF16\",\"shape\":[4,1],\"data_offsets\":[32,40]},"
                     "\"flags\":{\"dtype\":\"BOOL\",\"shape\":[3],\"data_offsets\":[42,45]}}",
                     NULL, 45));
    /* whitespace padding, zero-size tensor, scalar, 64-bit dtypes */
    add_seed(st_file("\t\n{\"zero\":{\"dtype\":\"I32\",\"shape\":[2,0],\"data_offsets\":[0,0]},"
                     "\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8]},"
                     "\"i\":{\"dtype\":\"I64\",\"shape\":[1,2],\"data_offsets\":[8,24]}}\r   ",
                     NULL, 24));
    /* sub-byte and 8-bit float dtypes, rank 8 */
    add_seed(st_file("{\"p4\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]},"
                     "\"p6\":{\"dtype\":\"F6_E3M2\",\"shape\":[2,2],\"data_offsets\":[2,5]},"
                     "\"e4\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,1,1,1,1,1,1,3],\"data_offsets\":[5,8]},"
                     "\"u16\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[8,12]}}",
                     NULL, 12));
    /* unicode names and values, escapes, unknown field, unaligned F32 */
    add_seed(st_file("{\"__metadata__\":{\"caf\\u00e9\":\"\xe2\x82\xac \\\"q\\\" \\n\",\"\":\"\"},"
                     "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":{\"y\":[1,2]}},"
                     "\"\xf0\x9f\x98\x80\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]},"
                     "\"i16\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[9,13]},"
                     "\"i8\":{\"dtype\":\"I8\",\"shape\":[3],\"data_offsets\":[13,16]}}",
                     NULL, 16));
    /* empty header object */
    add_seed(st_file("{}", NULL, 0));
    /* written by liblora's own writer (padded, sorted by dtype then name) */
    {
        static const int64_t s1[2] = {2, 3}, s2[1] = {5}, s3[1] = {2};
        static const float a[6] = {1, 2, 3, 4, 5, 6};
        static const uint8_t b[5] = {1, 2, 3, 4, 5};
        static const uint16_t c[2] = {0x3c00, 0xc000};
        struct st_write_tensor t[3] = {{"a", LORA_DTYPE_F32, 2, s1, a},
                                       {"b", LORA_DTYPE_U8, 1, s2, b},
                                       {"c", LORA_DTYPE_F16, 1, s3, c}};
        const char *k[1] = {"ss_output_name"};
        const char *v[1] = {"seed"};
        char path[512];
        const char *tmp = getenv("TMPDIR");
        snprintf(path, sizeof path, "%s/lora_fuzz_seed_%ld.safetensors", tmp && *tmp ? tmp : "/tmp", (long)time(NULL));
        if (st_write(ctx, path, t, 3, k, v, 1) == LORA_OK) {
            FILE *fp = fopen(path, "rb");
            vec w = {0};
            uint8_t chunk[4096];
            size_t r;
            while (fp && (r = fread(chunk, 1, sizeof chunk, fp)) > 0) vec_append(&w, chunk, r);
            if (fp) fclose(fp);
            remove(path);
            add_seed(w);
        } else {
            CHECK_MSG(0, "writer seed: %s", lora_errmsg(ctx));
        }
    }
    n_seeds = n_pool;
}

/* ---- mutations ---------------------------------------------------------------------------- */
static const char *const dict[] = {
    "{", "}", "[", "]", ",", ":", "\"", "0", "1", "-1", "1.5", "1e400", "-0", "007",
    "18446744073709551615", "18446744073709551616", "9223372036854775807", "9223372036854775808",
    "4294967296", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"__metadata__\"", "\"F4\"", "\"F6_E2M3\"",
    "\"BOOL\"", "\"F32\"", "\"F64\"", "\"U8\"", "\"C64\"", "\"float16\"", "null", "true", "[]", "{}", "\\u0000",
    "\\ud800", "\\udc00\\ud800", "\xc0\x80", "\xed\xa0\x80", "\xff", "\xf4\x90\x80\x80", " ", "\t", "\n",
    "\"a\":\"b\",", "\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},", "[0,0]", "[[[[[[[[",
};
#define N_DICT (sizeof dict / sizeof dict[0])

/* header region [8, 8+N) clipped to the buffer */
static size_t hdr_end(const vec *v) {
    if (v->n < 8) return v->n;
    uint64_t n = get_n(v);
    return n > v->n - 8 ? v->n : (size_t)(8 + n);
}

/* Insert/delete inside the header shifts the data: half the time keep N consistent. */
static void fix_n(vec *v, size_t at, long delta) {
    if (v->n < 8 || at < 8 || at >= hdr_end(v) || (rnd() & 1)) return;
    uint64_t n = get_n(v);
    set_n(v, n + (uint64_t)(int64_t)delta);   /* modulo 2^64, like any rewritten field */
}

static void mutate_once(vec *v) {
    size_t he = hdr_end(v);
    /* positions: mostly in the header, where the logic is */
    size_t pos = v->n ? ((rnd() & 3) && he > 8 ? 8 + rnd_below(he - 8) : rnd_below(v->n)) : 0;
    switch (rnd_below(11)) {
    case 0:   /* bit flip */
        if (v->n) v->p[pos] ^= (uint8_t)(1u << rnd_below(8));
        break;
    case 1:   /* random byte */
        if (v->n) v->p[pos] = (uint8_t)rnd();
        break;
    case 2: { /* insert 1-4 random bytes */
        uint8_t b[4];
        size_t k = 1 + rnd_below(4);
        for (size_t i = 0; i < k; i++) b[i] = (uint8_t)rnd();
        size_t at = v->n ? pos : 0;
        vec_insert(v, at, b, k);
        fix_n(v, at, (long)k);
        break;
    }
    case 3: { /* delete 1-4 bytes */
        if (!v->n) break;
        size_t k = 1 + rnd_below(4);
        if (k > v->n - pos) k = v->n - pos;
        fix_n(v, pos, -(long)k);
        vec_erase(v, pos, k);
        break;
    }
    case 4: { /* JSON number edit: change, add or remove a digit */
        size_t cand[64], nc = 0;
        for (size_t i = 8; i < he && nc < 64; i++)
            if (v->p[i] >= '0' && v->p[i] <= '9' && (rnd() & 1)) cand[nc++] = i;
        if (!nc) break;
        size_t at = cand[rnd_below(nc)];
        switch (rnd_below(4)) {
        case 0: v->p[at] = (uint8_t)('0' + rnd_below(10)); break;
        case 1: v->p[at] = (uint8_t)(v->p[at] == '9' ? '0' : v->p[at] + 1); break;
        case 2: {
            uint8_t d = (uint8_t)('0' + rnd_below(10));
            vec_insert(v, at, &d, 1);
            fix_n(v, at, 1);
            break;
        }
        default:
            fix_n(v, at, -1);
            vec_erase(v, at, 1);
            break;
        }
        break;
    }
    case 5:   /* truncate */
        v->n = rnd_below(v->n + 1);
        break;
    case 6: { /* rewrite the length field */
        if (v->n < 8) break;
        uint64_t n = get_n(v), m;
        switch (rnd_below(8)) {
        case 0: m = n + 1 + rnd_below(8); break;
        case 1: m = n > 0 ? n - 1 - rnd_below(n < 8 ? n : 8) : 0; break;
        case 2: m = rnd(); break;
        case 3: m = 100000000; break;
        case 4: m = 100000001; break;
        case 5: m = v->n - 8; break;
        case 6: m = 0; break;
        default: m = UINT64_MAX - rnd_below(16); break;
        }
        set_n(v, m);
        break;
    }
    case 7: { /* dictionary token */
        const char *tok = dict[rnd_below(N_DICT)];
        size_t k = strlen(tok);
        if (!k) k = 1;   /* never: all tokens non-empty */
        size_t at = v->n ? pos : 0;
        if (rnd() & 1 && v->n >= at + k) {
            memcpy(v->p + at, tok, k);   /* overwrite */
        } else {
            vec_insert(v, at, tok, k);
            fix_n(v, at, (long)k);
        }
        break;
    }
    case 8: { /* append bytes (polyglot tail) */
        uint8_t b[32];
        size_t k = 1 + rnd_below(sizeof b);
        for (size_t i = 0; i < k; i++) b[i] = (uint8_t)rnd();
        vec_append(v, b, k);
        break;
    }
    case 9: { /* copy a chunk of the header elsewhere in it (duplicate keys, nesting) */
        if (he <= 9) break;
        size_t from = 8 + rnd_below(he - 8);
        size_t len = 1 + rnd_below(he - from < 48 ? he - from : 48);
        uint8_t tmp[48];
        memcpy(tmp, v->p + from, len);
        size_t at = 8 + rnd_below(he - 8);
        vec_insert(v, at, tmp, len);
        fix_n(v, at, (long)len);
        break;
    }
    default: { /* swap two bytes of the header */
        if (he <= 9) break;
        size_t a = 8 + rnd_below(he - 8), b = 8 + rnd_below(he - 8);
        uint8_t t = v->p[a];
        v->p[a] = v->p[b];
        v->p[b] = t;
        break;
    }
    }
}

static void run_mutations(long iters) {
    vec cur = {0};
    for (long it = 0; it < iters; it++) {
        /* start from a seed, or from an earlier mutant that still parsed */
        const vec *src = &pool[(rnd() & 3) || n_pool == n_seeds ? rnd_below((size_t)n_seeds) : rnd_below((size_t)n_pool)];
        cur.n = 0;
        vec_append(&cur, src->p, src->n);
        int k = 1 + (int)rnd_below(4);
        for (int m = 0; m < k; m++) mutate_once(&cur);
        char label[64];
        snprintf(label, sizeof label, "mutant#%ld", it);
        lora_status s = parse_checked(label, cur.p, cur.n, (it & 15) == 0);
        if (s == LORA_OK && cur.n > 0) {
            vec keep = {0};
            vec_append(&keep, cur.p, cur.n);
            if (n_pool < MAX_POOL) pool[n_pool++] = keep;
            else {
                size_t slot = (size_t)n_seeds + rnd_below((size_t)(MAX_POOL - n_seeds));
                free(pool[slot].p);
                pool[slot] = keep;
            }
        }
        if (test_failed_ > 50) {
            fprintf(stderr, "stopping after %ld mutants: too many failures\n", it + 1);
            break;
        }
    }
    free(cur.p);
}

int main(int argc, char **argv) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_st_fuzz_replay");
    const char *e = getenv("LORA_FUZZ_SEED");
    uint64_t seed = e ? strtoull(e, NULL, 0) : 20240611u;
    e = getenv("LORA_FUZZ_ITERS");
    long iters = e ? strtol(e, NULL, 0) : 100000;
    rng_state = seed;
    lora_ctx_memory(ctx, &mem_baseline, NULL, NULL, NULL);
    CHECK(mem_baseline == 0);

    replay_corpus(argc > 1 ? argv[1] : NULL);

    build_seeds();
    for (int i = 0; i < n_seeds; i++) {
        char label[32];
        snprintf(label, sizeof label, "seed#%d", i);
        CHECK_STATUS(parse_checked(label, pool[i].p, pool[i].n, 1), LORA_OK);
    }
    memset(n_status, 0, sizeof n_status);
    clock_t t0 = clock();
    run_mutations(iters);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;

    int distinct = 0;
    printf("seed %llu, %ld mutants in %.2f s CPU; results:\n", (unsigned long long)seed, iters, secs);
    for (int s = 0; s < 1000; s++)
        if (n_status[s]) {
            distinct++;
            printf("  %-28s %ld\n", lora_status_name(s), n_status[s]);
        }
    /* the mutator must reach past the length check into every layer of validation */
    if (iters >= 5000) {
        CHECK_MSG(n_status[LORA_OK] > 0, "no mutant parsed");
        CHECK_MSG(distinct >= 12, "only %d distinct results", distinct);
        CHECK(n_status[LORA_E_ST_OFFSETS] > 0 && n_status[LORA_E_ST_SIZE_MISMATCH] > 0 &&
              n_status[LORA_E_ST_DUPLICATE_KEY] > 0 && n_status[LORA_E_ST_HEADER_JSON] > 0);
    }
    for (int i = 0; i < n_pool; i++) free(pool[i].p);
    uint64_t hb = 1;
    lora_ctx_memory(ctx, &hb, NULL, NULL, NULL);
    CHECK(hb == mem_baseline);
    lora_ctx_free(ctx);
    return test_finish("test_st_fuzz_replay");
}
