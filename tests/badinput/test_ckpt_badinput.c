/* Bad-input cases for the PyTorch checkpoint reader: spec/safety.md §6 rows 13-20 and 25, and
 * the structural rules P1-P13 one by one.
 *
 * Every input is crafted here in memory: pickle bytes by hand (no Python), wrapped in a zip by a
 * tiny stored-zip builder. Each case runs twice, through ckpt_read_mem (label "mem:<case>") and
 * ckpt_read on a file in a mkdtemp directory, and checks: the exact status; that the message
 * names the source and holds the case's needles (global name, opcode, offset, entry, ...); that
 * the map is left empty; that the context's host memory is back to its baseline; that the
 * context then still reads a valid checkpoint; and that the canary file which the malicious
 * pickles would create does not exist. Cases about resource bounds run in a fresh context and
 * also check its peak memory and the time taken. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/ckpt.h"
#include "../test.h"

/* ---- byte buffers ------------------------------------------------------------------------------ */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

static void bput(buf *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) { perror("realloc"); exit(2); }
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void bbyte(buf *b, int c) { uint8_t x = (uint8_t)c; bput(b, &x, 1); }
static void ble(buf *b, uint64_t v, int k) { for (int i = 0; i < k; i++) bbyte(b, (int)((v >> (8 * i)) & 0xff)); }
static void bstr(buf *b, const char *s) { bput(b, s, strlen(s)); }
/* A string literal, NUL bytes included. */
#define BLIT(b, lit) bput((b), (lit), sizeof(lit) - 1)
static void bfree(buf *b) { free(b->p); memset(b, 0, sizeof *b); }

/* ---- pickle pieces ------------------------------------------------------------------------------ */
static void P_global(buf *b, const char *m, const char *n) {
    bbyte(b, 'c');
    bstr(b, m);
    bbyte(b, '\n');
    bstr(b, n);
    bbyte(b, '\n');
}
static void P_str(buf *b, const char *s) {
    bbyte(b, 'X');
    ble(b, strlen(s), 4);
    bstr(b, s);
}
static void P_int(buf *b, int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) {
        bbyte(b, 'J');
        ble(b, (uint64_t)(uint32_t)(int32_t)v, 4);
    } else {
        bbyte(b, 0x8a);
        bbyte(b, 8);
        ble(b, (uint64_t)v, 8);
    }
}
static void P_int_tuple(buf *b, const int64_t *v, int n) {
    bbyte(b, '(');
    for (int i = 0; i < n; i++) P_int(b, v[i]);
    bbyte(b, 't');
}

/* One tensor value, _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()). */
struct tdesc {
    const char *name;
    const char *ptype;          /* persistent id type, "storage" */
    const char *smod, *stype;   /* storage global */
    const char *key;
    int64_t numel, offset;
    int nsize, nstride;
    int64_t size[64], stride[64];
    int pid_len;                /* 5; other lengths drop or add fields */
};

static struct tdesc tdefault(void) {
    struct tdesc t;
    memset(&t, 0, sizeof t);
    t.name = "w";
    t.ptype = "storage";
    t.smod = "torch";
    t.stype = "FloatStorage";
    t.key = "0";
    t.numel = 4;
    t.nsize = t.nstride = 2;
    t.size[0] = t.size[1] = 2;
    t.stride[0] = 2;
    t.stride[1] = 1;
    t.pid_len = 5;
    return t;
}

static void P_tensor(buf *b, const struct tdesc *t) {
    P_global(b, "torch._utils", "_rebuild_tensor_v2");
    bbyte(b, '(');
    bbyte(b, '(');
    P_str(b, t->ptype);
    P_global(b, t->smod, t->stype);
    P_str(b, t->key);
    if (t->pid_len >= 4) P_str(b, "cpu");
    if (t->pid_len >= 5) P_int(b, t->numel);
    if (t->pid_len >= 6) P_str(b, "extra");
    bbyte(b, 't');
    bbyte(b, 'Q');
    P_int(b, t->offset);
    P_int_tuple(b, t->size, t->nsize);
    P_int_tuple(b, t->stride, t->nstride);
    bbyte(b, 0x89);
    P_global(b, "collections", "OrderedDict");
    bbyte(b, ')');
    bbyte(b, 'R');
    bbyte(b, 't');
    bbyte(b, 'R');
}

/* OrderedDict with the given tensors, as torch.save writes a state dict. */
static buf P_state_dict(const struct tdesc *t, int n) {
    buf b = {0};
    bbyte(&b, 0x80);
    bbyte(&b, 2);
    P_global(&b, "collections", "OrderedDict");
    bbyte(&b, ')');
    bbyte(&b, 'R');
    bbyte(&b, '(');
    for (int i = 0; i < n; i++) {
        P_str(&b, t[i].name);
        P_tensor(&b, &t[i]);
    }
    bbyte(&b, 'u');
    bbyte(&b, '.');
    return b;
}

static buf P_one(struct tdesc t) { return P_state_dict(&t, 1); }

/* ---- a stored-zip builder ------------------------------------------------------------------------ */
static uint32_t crc32_bytes(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

struct zent {
    const char *name;
    size_t name_len;            /* 0: strlen(name) (names with NUL give it explicitly) */
    const void *data;
    size_t len;
    uint16_t method;
    uint16_t flags;             /* 8: data descriptor (local CRC/sizes zero) */
    uint64_t zip64_usize;       /* != 0: 0xFFFFFFFF sentinels + ZIP64 extra with this usize */
    const char *local_name;     /* a different name in the local header */
};

static buf zip_build(const struct zent *e, int n) {
    buf b = {0};
    uint64_t *lho = calloc((size_t)n, sizeof *lho);
    for (int i = 0; i < n; i++) {
        size_t nl = e[i].name_len ? e[i].name_len : strlen(e[i].name);
        const char *lname = e[i].local_name ? e[i].local_name : e[i].name;
        uint32_t crc = crc32_bytes(e[i].data, e[i].len);
        int z64 = e[i].zip64_usize != 0, dd = (e[i].flags & 8) != 0;
        lho[i] = b.n;
        BLIT(&b, "PK\x03\x04");
        ble(&b, z64 ? 45 : 20, 2);
        ble(&b, e[i].flags, 2);
        ble(&b, e[i].method, 2);
        ble(&b, 0, 2);
        ble(&b, 0x21, 2);
        ble(&b, dd ? 0 : crc, 4);
        ble(&b, dd ? 0 : z64 ? 0xffffffffu : e[i].len, 4);
        ble(&b, dd ? 0 : z64 ? 0xffffffffu : e[i].len, 4);
        ble(&b, nl, 2);
        ble(&b, z64 ? 20 : 0, 2);
        bput(&b, lname, nl);
        if (z64) {
            ble(&b, 1, 2);
            ble(&b, 16, 2);
            ble(&b, e[i].zip64_usize, 8);
            ble(&b, e[i].len, 8);
        }
        bput(&b, e[i].data, e[i].len);
        if (dd) {
            BLIT(&b, "PK\x07\x08");
            ble(&b, crc, 4);
            ble(&b, e[i].len, 4);
            ble(&b, e[i].len, 4);
        }
    }
    uint64_t cd = b.n;
    for (int i = 0; i < n; i++) {
        size_t nl = e[i].name_len ? e[i].name_len : strlen(e[i].name);
        int z64 = e[i].zip64_usize != 0;
        BLIT(&b, "PK\x01\x02");
        ble(&b, 45, 2);
        ble(&b, z64 ? 45 : 20, 2);
        ble(&b, e[i].flags, 2);
        ble(&b, e[i].method, 2);
        ble(&b, 0, 2);
        ble(&b, 0x21, 2);
        ble(&b, crc32_bytes(e[i].data, e[i].len), 4);
        ble(&b, z64 ? 0xffffffffu : e[i].len, 4);
        ble(&b, z64 ? 0xffffffffu : e[i].len, 4);
        ble(&b, nl, 2);
        ble(&b, z64 ? 20 : 0, 2);
        ble(&b, 0, 2);
        ble(&b, 0, 2);
        ble(&b, 0, 2);
        ble(&b, 0, 4);
        ble(&b, lho[i], 4);
        bput(&b, e[i].name, nl);
        if (z64) {
            ble(&b, 1, 2);
            ble(&b, 16, 2);
            ble(&b, e[i].zip64_usize, 8);
            ble(&b, e[i].len, 8);
        }
    }
    uint64_t cd_size = b.n - cd;
    BLIT(&b, "PK\x05\x06");
    ble(&b, 0, 2);
    ble(&b, 0, 2);
    ble(&b, (uint64_t)n, 2);
    ble(&b, (uint64_t)n, 2);
    ble(&b, cd_size, 4);
    ble(&b, cd, 4);
    ble(&b, 0, 2);
    free(lho);
    return b;
}

static const float storage_vals[4] = {1.5f, -2.0f, 0.25f, 8.0f};

/* archive/data.pkl + archive/data/0 (the 4 floats above) + archive/version. Frees `pkl`. */
static buf zip_ckpt(buf pkl) {
    struct zent e[3] = {
        {.name = "archive/data.pkl", .data = pkl.p, .len = pkl.n},
        {.name = "archive/data/0", .data = storage_vals, .len = sizeof storage_vals},
        {.name = "archive/version", .data = "3\n", .len = 2},
    };
    buf z = zip_build(e, 3);
    bfree(&pkl);
    return z;
}

/* A raw pickle (given as bytes) in a valid archive. */
static buf zip_pickle(const void *p, size_t n) {
    buf pk = {0};
    bput(&pk, p, n);
    return zip_ckpt(pk);
}
#define ZIP_PICKLE_LIT(s) zip_pickle(s, sizeof(s) - 1)

/* ---- environment --------------------------------------------------------------------------------- */
static lora_ctx *ctx;
static char tmpdir[512];
static char canary[600];
static char valid_path[600];
static uint64_t mem_baseline;

static void write_file(const char *path, const uint8_t *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (n && fwrite(p, 1, n, f) != n) { perror(path); exit(2); }
    if (fclose(f) != 0) { perror(path); exit(2); }
}

static uint64_t host_bytes_of(lora_ctx *c) {
    uint64_t b = UINT64_MAX;
    lora_ctx_memory(c, &b, NULL, NULL, NULL);
    return b;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void check_canary(const char *where) {
    struct stat sb;
    CHECK_MSG(stat(canary, &sb) != 0 && errno == ENOENT, "%s: the canary file %s exists: something ran!", where, canary);
}

/* The valid crafted checkpoint: one F32 [2,2] tensor "w" = storage_vals. */
static void check_valid_map(const char *where, const struct tensor_map *m) {
    CHECK_MSG(m->n == 1, "%s: %lld tensors", where, (long long)m->n);
    if (m->n != 1) return;
    const struct lora_tensor *t = &m->t[0];
    CHECK_MSG(strcmp(t->name, "w") == 0 && t->dtype == LORA_DTYPE_F32 && t->ndim == 2 && t->shape[0] == 2 &&
                  t->shape[1] == 2 && t->nbytes == 16 && memcmp(t->data, storage_vals, 16) == 0,
              "%s: wrong tensor", where);
}

static void check_ctx_usable(const char *after) {
    struct tensor_map m;
    tmap_init(&m, ctx);
    lora_status s = ckpt_read(ctx, valid_path, &m);
    CHECK_MSG(s == LORA_OK, "after %s: the valid file gives %s: %s", after, lora_status_name(s), lora_errmsg(ctx));
    check_valid_map(after, &m);
    tmap_clear(&m);
    CHECK_MSG(host_bytes_of(ctx) == mem_baseline, "after %s: host bytes %llu, baseline %llu", after,
              (unsigned long long)host_bytes_of(ctx), (unsigned long long)mem_baseline);
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NO_NEEDLES ((const char *const *)NULL)

static void check_needles(const char *where, const char *msg, const char *const *needles) {
    for (int i = 0; needles && needles[i]; i++)
        CHECK_MSG(strstr(msg, needles[i]) != NULL, "%s: message lacks \"%s\": %s", where, needles[i], msg);
}

/* One failing case on both paths, with context `c`. */
static void run_fail(lora_ctx *c, const char *name, const buf *b, lora_status want, const char *const *needles) {
    char label[256], where[320], path[800];
    snprintf(label, sizeof label, "mem:%s", name);
    uint64_t base = host_bytes_of(c);
    struct tensor_map m;
    tmap_init(&m, c);
    lora_status s = ckpt_read_mem(c, label, b->p, b->n, &m);
    snprintf(where, sizeof where, "%s (ckpt_read_mem)", name);
    CHECK_MSG(s == want, "%s: got %s (%d), want %s: %s", where, lora_status_name(s), s, lora_status_name(want),
              lora_errmsg(c));
    CHECK_MSG(m.n == 0, "%s: %lld tensors returned on failure", where, (long long)m.n);
    CHECK_MSG(lora_errcode(c) == want, "%s: lora_errcode %d", where, lora_errcode(c));
    CHECK_MSG(strstr(lora_errmsg(c), label) != NULL, "%s: message does not name the source: %s", where, lora_errmsg(c));
    check_needles(where, lora_errmsg(c), needles);
    tmap_clear(&m);
    CHECK_MSG(host_bytes_of(c) == base, "%s: host bytes %llu after failure", where, (unsigned long long)host_bytes_of(c));

    snprintf(path, sizeof path, "%s/%s.ckpt", tmpdir, name);
    write_file(path, b->p, b->n);
    s = ckpt_read(c, path, &m);
    snprintf(where, sizeof where, "%s (ckpt_read)", name);
    CHECK_MSG(s == want, "%s: got %s (%d), want %s: %s", where, lora_status_name(s), s, lora_status_name(want),
              lora_errmsg(c));
    CHECK_MSG(m.n == 0, "%s: tensors returned on failure", where);
    CHECK_MSG(strstr(lora_errmsg(c), path) != NULL, "%s: message does not name the file: %s", where, lora_errmsg(c));
    check_needles(where, lora_errmsg(c), needles);
    if (getenv("LORA_TEST_VERBOSE")) printf("%-32s %s\n", name, lora_errmsg(c));
    tmap_clear(&m);
    CHECK_MSG(host_bytes_of(c) == base, "%s: host bytes %llu after failure", where, (unsigned long long)host_bytes_of(c));
    unlink(path);
    check_canary(name);
}

/* Takes ownership of `b`. */
static void expect_fail(const char *name, buf b, lora_status want, const char *const *needles) {
    run_fail(ctx, name, &b, want, needles);
    bfree(&b);
    check_ctx_usable(name);
}

/* Resource cases: a fresh context, whose peak host memory must stay under `max_peak`, and the
 * whole case (both paths) under `max_s` seconds. */
static void expect_fail_bounded(const char *name, buf b, lora_status want, const char *const *needles,
                                uint64_t max_peak, double max_s) {
    lora_ctx *c = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &c), LORA_OK);
    if (!c) return;
    double t0 = now_s();
    run_fail(c, name, &b, want, needles);
    double dt = now_s() - t0;
    uint64_t peak = 0;
    lora_ctx_memory(c, NULL, &peak, NULL, NULL);
    CHECK_MSG(peak <= max_peak, "%s: peak host memory %llu bytes > %llu", name, (unsigned long long)peak,
              (unsigned long long)max_peak);
    CHECK_MSG(dt <= max_s, "%s: took %.2f s (> %.1f s)", name, dt, max_s);
    lora_ctx_free(c);
    bfree(&b);
    check_ctx_usable(name);
}

static void expect_ok(const char *name, buf b, void (*check)(const char *, const struct tensor_map *)) {
    char label[256], path[800];
    snprintf(label, sizeof label, "mem:%s", name);
    struct tensor_map m;
    tmap_init(&m, ctx);
    lora_status s = ckpt_read_mem(ctx, label, b.p, b.n, &m);
    CHECK_MSG(s == LORA_OK, "%s (mem): %s: %s", name, lora_status_name(s), lora_errmsg(ctx));
    if (s == LORA_OK && check) check(name, &m);
    tmap_clear(&m);
    snprintf(path, sizeof path, "%s/%s.ckpt", tmpdir, name);
    write_file(path, b.p, b.n);
    s = ckpt_read(ctx, path, &m);
    CHECK_MSG(s == LORA_OK, "%s (file): %s: %s", name, lora_status_name(s), lora_errmsg(ctx));
    if (s == LORA_OK && check) check(name, &m);
    tmap_clear(&m);
    unlink(path);
    CHECK_MSG(host_bytes_of(ctx) == mem_baseline, "%s: leak", name);
    bfree(&b);
}

/* ---- row 13: torch_ace.pt equivalents ------------------------------------------------------------ */
/* GLOBAL mod.name; BINUNICODE "<cmd>"; TUPLE1; REDUCE; then a state dict as if nothing happened. */
static buf ace_pickle(const char *mod, const char *name) {
    char cmd[800];
    snprintf(cmd, sizeof cmd, "touch %s", canary);
    buf b = {0};
    bbyte(&b, 0x80);
    bbyte(&b, 2);
    P_global(&b, mod, name);
    P_str(&b, cmd);
    bbyte(&b, 0x85);
    bbyte(&b, 'R');
    bbyte(&b, '0');   /* POP the "result" */
    buf sd = P_one(tdefault());
    bput(&b, sd.p + 2, sd.n - 2);
    bfree(&sd);
    return zip_ckpt(b);
}

static void row_13(void) {
    static const char *const g[][2] = {
        {"os", "system"}, {"posix", "system"}, {"nt", "system"}, {"builtins", "eval"}, {"builtins", "exec"},
        {"__builtin__", "eval"}, {"subprocess", "Popen"}, {"subprocess", "check_output"}, {"builtins", "getattr"},
        {"builtins", "__import__"}, {"importlib", "import_module"}, {"runpy", "_run_code"}, {"pty", "spawn"},
    };
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) {
        char name[64], full[96];
        snprintf(name, sizeof name, "ace_%s_%s", g[i][0], g[i][1]);
        snprintf(full, sizeof full, "'%s.%s'", g[i][0], g[i][1]);
        expect_fail(name, ace_pickle(g[i][0], g[i][1]), LORA_E_CKPT_UNSAFE_GLOBAL,
                    NEEDLES(full, "offset 2:", "GLOBAL", "archive/data.pkl", "likely malicious"));
    }
    /* unknown but not obviously dangerous: refused too, without the "malicious" remark */
    expect_fail("ace_unknown_class", ace_pickle("mypackage.models", "Net"), LORA_E_CKPT_UNSAFE_GLOBAL,
                NEEDLES("'mypackage.models.Net'", "offset 2:", "allowlist"));
    /* inside the state dict, after valid tensors: still refused, nothing returned */
    struct tdesc t[2] = {tdefault(), tdefault()};
    t[1].name = "w2";
    buf sd = P_state_dict(t, 2);
    buf b = {0};
    bput(&b, sd.p, sd.n - 2);                /* drop SETITEMS + STOP */
    P_str(&b, "evil");
    P_global(&b, "os", "system");
    P_str(&b, "touch /nonexistent");
    bbyte(&b, 0x85);
    bbyte(&b, 'R');
    bbyte(&b, 'u');
    bbyte(&b, '.');
    bfree(&sd);
    expect_fail("ace_after_tensors", zip_ckpt(b), LORA_E_CKPT_UNSAFE_GLOBAL, NEEDLES("'os.system'"));
}

/* ---- row 14: obfuscation and forbidden opcodes ------------------------------------------------- */
static void row_14(void) {
    /* protocol 4: SHORT_BINUNICODE 'os', 'system', STACK_GLOBAL, REDUCE; the offset is the
     * STACK_GLOBAL's: 2 (PROTO) + 4 ('os') + 8 ('system') = 14 */
    expect_fail("stack_global_os_system",
                ZIP_PICKLE_LIT("\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x05touch\x85R."), LORA_E_CKPT_UNSAFE_GLOBAL,
                NEEDLES("'os.system'", "offset 14:", "STACK_GLOBAL"));
    /* the same through the memo: names stored with MEMOIZE, fetched with BINGET */
    expect_fail("stack_global_memo",
                ZIP_PICKLE_LIT("\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x08"
                               "builtins\x94\x8c\x04" "eval\x94h\x00h\x01\x93)R."),
                LORA_E_CKPT_UNSAFE_GLOBAL, NEEDLES("'builtins.eval'", "STACK_GLOBAL"));
    expect_fail("inst", ZIP_PICKLE_LIT("\x80\x02(X\x05\x00\x00\x00touchios\nsystem\n."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 13:", "0x69", "INST"));
    expect_fail("obj", ZIP_PICKLE_LIT("\x80\x02(ccollections\nOrderedDict\no."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 28:", "OBJ"));
    expect_fail("build_on_list", ZIP_PICKLE_LIT("\x80\x02]}b."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 4:", "BUILD", "list"));
    expect_fail("build_on_global", ZIP_PICKLE_LIT("\x80\x02" "ccollections\nOrderedDict\n}b."),
                LORA_E_CKPT_PICKLE_OPCODE, NEEDLES("BUILD", "global"));
    expect_fail("ext1", ZIP_PICKLE_LIT("\x80\x02\x82\x01R."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 2:", "0x82", "EXT1"));
    expect_fail("ext4", ZIP_PICKLE_LIT("\x80\x02\x84\x01\x00\x00\x00."), LORA_E_CKPT_PICKLE_OPCODE, NEEDLES("EXT4"));
    expect_fail("persid_text", ZIP_PICKLE_LIT("\x80\x02P0\n."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 2:", "PERSID"));
    expect_fail("opcode_ff", ZIP_PICKLE_LIT("\x80\x02}\xff."), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 3:", "0xff", "undefined opcode"));
    expect_fail("protocol0_int", ZIP_PICKLE_LIT("\x80\x02I1\n."), LORA_E_CKPT_PICKLE_OPCODE, NEEDLES("INT"));
    /* nullifAI: the malicious prefix comes first, garbage follows; refused at the prefix */
    buf b = {0};
    BLIT(&b, "\x80\x02" "cposix\nsystem\nX\x04\x00\x00\x00" "echo\x85R");
    for (int i = 0; i < 200; i++) bbyte(&b, (i * 73 + 11) & 0xff);
    expect_fail("broken_after_prefix", zip_ckpt(b), LORA_E_CKPT_UNSAFE_GLOBAL, NEEDLES("'posix.system'", "offset 2:"));
    /* benign prefix then garbage: the first bad opcode is reported */
    expect_fail("garbage_after_dict", ZIP_PICKLE_LIT("\x80\x02}q\x00\xfe\x13\x37"), LORA_E_CKPT_PICKLE_OPCODE,
                NEEDLES("offset 5:", "0xfe"));
}

/* ---- row 15: persistent ids ----------------------------------------------------------------------- */
static void row_15(void) {
    struct tdesc t = tdefault();
    t.pid_len = 4;
    expect_fail("pid_4_tuple", zip_ckpt(P_one(t)), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("BINPERSID", "persistent id"));
    t = tdefault();
    t.pid_len = 6;
    expect_fail("pid_6_tuple", zip_ckpt(P_one(t)), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("BINPERSID"));
    t = tdefault();
    t.ptype = "module";
    expect_fail("pid_type_module", zip_ckpt(P_one(t)), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("'module'", "BINPERSID"));
    t = tdefault();
    t.smod = "collections";
    t.stype = "OrderedDict";
    expect_fail("pid_storage_type_not_storage", zip_ckpt(P_one(t)), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("storage class"));
    t = tdefault();
    t.key = "../0";
    expect_fail("pid_key_dotdot", zip_ckpt(P_one(t)), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'../0'", "BINPERSID", "offset"));
    t.key = "0x1";
    expect_fail("pid_key_hex", zip_ckpt(P_one(t)), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'0x1'"));
    t.key = "7";
    expect_fail("pid_key_missing", zip_ckpt(P_one(t)), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("data/7"));
    t = tdefault();
    t.numel = 1000000;   /* CVE-2026-24747: declared elements far beyond the 16-byte record */
    expect_fail("pid_numel_1e6", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE,
                NEEDLES("1000000", "16 bytes", "data/0", "BINPERSID"));
    t.numel = INT64_C(1) << 62;   /* * 4 bytes overflows */
    expect_fail("pid_numel_2p62", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("overflows"));
    t.stype = "ByteStorage";
    expect_fail("pid_numel_2p62_bytes", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("4611686018427387904"));
    t.numel = -1;
    expect_fail("pid_numel_negative", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("negative"));
    /* a bare int persistent id */
    expect_fail("pid_int", ZIP_PICKLE_LIT("\x80\x02K\x01Q."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("persistent id"));
}

/* ---- row 16: tensor views --------------------------------------------------------------------------- */
static void row_16(void) {
    struct tdesc t = tdefault();
    t.offset = 100;
    expect_fail("view_offset_beyond", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE,
                NEEDLES("storage_offset 100", "REDUCE", "_rebuild_tensor_v2"));
    t.offset = 1;   /* one past: [2,2] from offset 1 reaches element 4 of 4 */
    expect_fail("view_offset_by_one", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("element 4"));
    t = tdefault();
    t.offset = -1;
    expect_fail("view_offset_negative", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("negative"));
    t = tdefault();
    t.size[0] = t.size[1] = 1000000;
    t.stride[0] = 1000000;
    expect_fail("view_1e6x1e6", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("holds 4 elements"));
    t = tdefault();
    t.size[1] = -2;
    expect_fail("view_size_negative", zip_ckpt(P_one(t)), LORA_E_UNSUPPORTED_LAYOUT, NEEDLES("size[1] = -2"));
    t = tdefault();
    t.stride[0] = -2;
    expect_fail("view_stride_negative", zip_ckpt(P_one(t)), LORA_E_UNSUPPORTED_LAYOUT, NEEDLES("stride[0] = -2"));
    t = tdefault();
    t.nstride = 1;
    expect_fail("view_stride_short", zip_ckpt(P_one(t)), LORA_E_UNSUPPORTED_LAYOUT, NEEDLES("1 strides for 2"));
    t = tdefault();
    t.nsize = t.nstride = 40;
    for (int d = 0; d < 40; d++) t.size[d] = 1, t.stride[d] = 1;
    expect_fail("view_rank_40", zip_ckpt(P_one(t)), LORA_E_LIMIT, NEEDLES("40 dimensions", "at most 8"));
    t = tdefault();
    t.stride[0] = t.stride[1] = INT64_C(1) << 62;
    expect_fail("view_stride_overflow", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("overflows"));
    t = tdefault();
    t.nsize = t.nstride = 1;
    t.size[0] = INT64_C(1) << 62;
    t.stride[0] = 0;   /* expanded over one element: 2^62 floats overflow the byte count */
    expect_fail("view_numel_2p62", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("overflow"));
    t = tdefault();
    t.nsize = t.nstride = 3;
    t.size[0] = t.size[1] = t.size[2] = INT64_C(1) << 22;
    t.stride[0] = t.stride[1] = t.stride[2] = 0;
    expect_fail("view_numel_product_overflow", zip_ckpt(P_one(t)), LORA_E_CKPT_STORAGE_SIZE, NEEDLES("overflows"));
    /* a legal expanded view (stride 0) of 2^30 floats = 4 GiB from 16 bytes: refused by the
     * output cap before any allocation */
    t = tdefault();
    t.size[0] = INT64_C(1) << 24;
    t.size[1] = 64;
    t.stride[0] = t.stride[1] = 0;
    expect_fail_bounded("view_expand_4gib", zip_ckpt(P_one(t)), LORA_E_LIMIT,
                        NEEDLES("'w'", "expand", "archive/data.pkl offset"), 4u << 20, 2.0);
    /* size and stride of the wrong types */
    buf b = {0};
    BLIT(&b, "\x80\x02" "ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_tensor_v2\n"
             "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK\x04tQ"
             "K\x00X\x01\x00\x00\x00xK\x01\x85\x89" "ccollections\nOrderedDict\n)RtRu.");
    expect_fail("view_size_is_str", zip_ckpt(b), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("size is a str"));
    /* wrong argument count */
    b = (buf){0};
    BLIT(&b, "\x80\x02}X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_tensor_v2\n)Rs.");
    expect_fail("rebuild_no_args", zip_ckpt(b), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("called with 0 arguments"));
}

/* ---- row 17: structure abuse and resource bounds ------------------------------------------------------ */
static void row_17(void) {
    expect_fail("reduce_empty_stack", ZIP_PICKLE_LIT("\x80\x02R."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("offset 2:", "REDUCE", "needs 2 values"));
    expect_fail("reduce_on_str", ZIP_PICKLE_LIT("\x80\x02X\x01\x00\x00\x00x)R."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("callable is a str"));
    expect_fail("reduce_storage_class", ZIP_PICKLE_LIT("\x80\x02" "ctorch\nFloatStorage\n)R."),
                LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("torch.FloatStorage cannot be called"));
    expect_fail("reduce_args_list", ZIP_PICKLE_LIT("\x80\x02" "ccollections\nOrderedDict\n]R."),
                LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("arguments are a list"));
    expect_fail("setitem_on_list", ZIP_PICKLE_LIT("\x80\x02]X\x01\x00\x00\x00" "aX\x01\x00\x00\x00" "bs."),
                LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("offset 15:", "SETITEM on a list"));
    expect_fail("setitem_on_tuple", ZIP_PICKLE_LIT("\x80\x02)K\x01K\x02s."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("SETITEM on a tuple"));
    expect_fail("setitems_on_list", ZIP_PICKLE_LIT("\x80\x02](K\x01K\x02u."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("SETITEMS on a list"));
    expect_fail("setitems_odd", ZIP_PICKLE_LIT("\x80\x02}(K\x01u."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("odd"));
    expect_fail("append_to_dict", ZIP_PICKLE_LIT("\x80\x02}K\x01" "a."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("offset 5:", "APPEND to a dict"));
    expect_fail("appends_to_dict", ZIP_PICKLE_LIT("\x80\x02}(K\x01" "e."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("APPENDS to a dict"));
    expect_fail("binget_unset", ZIP_PICKLE_LIT("\x80\x02h\x07."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("offset 2:", "BINGET", "memo entry 7"));
    expect_fail("long_binget_unset", ZIP_PICKLE_LIT("\x80\x02}q\x00j\xff\xff\xff\xff."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("memo entry 4294967295"));
    /* LONG_BINPUT 0xFFFFFFFF: a sparse memo, no 2^32-slot array; the file is a valid empty dict */
    expect_fail_bounded("long_binput_ffffffff", ZIP_PICKLE_LIT("\x80\x02}r\xff\xff\xff\xffj\xff\xff\xff\xff" "0."),
                        LORA_E_CKPT_NO_TENSORS, NEEDLES("no tensors"), 2u << 20, 1.0);
    expect_fail("missing_stop", ZIP_PICKLE_LIT("\x80\x02}"), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("offset 3:", "STOP"));
    expect_fail("empty_pickle", ZIP_PICKLE_LIT(""), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("offset 0:", "STOP"));
    expect_fail("bytes_after_stop", ZIP_PICKLE_LIT("\x80\x02}.junk"), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("4 bytes follow STOP"));
    expect_fail("stop_two_values", ZIP_PICKLE_LIT("\x80\x02}}."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("2 values"));
    expect_fail("stop_in_mark", ZIP_PICKLE_LIT("\x80\x02(}."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("1 MARKs"));
    expect_fail("stop_empty_stack", ZIP_PICKLE_LIT("\x80\x02."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("0 values"));
    expect_fail("tuple2_across_mark", ZIP_PICKLE_LIT("\x80\x02K\x01(K\x02\x86."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("TUPLE2", "above the last MARK"));
    expect_fail("tuple_no_mark", ZIP_PICKLE_LIT("\x80\x02K\x01t."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("no MARK"));
    expect_fail("proto_9", ZIP_PICKLE_LIT("\x80\x09}."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("protocol 9"));
    expect_fail("not_a_dict", ZIP_PICKLE_LIT("\x80\x02]."), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("holds a list"));
    expect_fail("utf8_invalid", ZIP_PICKLE_LIT("\x80\x02X\x02\x00\x00\x00\xc0\xaf."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("UTF-8"));
    expect_fail("frame_past_end", ZIP_PICKLE_LIT("\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00}."),
                LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("FRAME", "runs past"));
    expect_fail("long1_truncated", ZIP_PICKLE_LIT("\x80\x02\x8a\x09\x01\x02"), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("truncated", "LONG1"));
    /* a GLOBAL line longer than 512 bytes */
    buf b = {0};
    BLIT(&b, "\x80\x02" "c");
    for (int i = 0; i < 600; i++) bbyte(&b, 'a');
    BLIT(&b, "\nx\n.");
    expect_fail("global_name_too_long", zip_ckpt(b), LORA_E_LIMIT, NEEDLES("512"));
    /* BINUNICODE claiming 0xFFFFFFF0 bytes in a tiny pickle: no allocation, no read past the end */
    expect_fail_bounded("binunicode_fffffff0", ZIP_PICKLE_LIT("\x80\x02X\xf0\xff\xff\xff" "abc."),
                        LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("4294967280", "runs past the end", "offset 2:"), 2u << 20,
                        1.0);
    expect_fail("binunicode8_huge", ZIP_PICKLE_LIT("\x80\x04\x8d\xf0\xff\xff\xff\xff\xff\xff\xff" "abc."),
                LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("runs past the end"));
    expect_fail("binbytes_huge", ZIP_PICKLE_LIT("\x80\x03" "B\xf0\xff\xff\xff" "abc."), LORA_E_CKPT_PICKLE_STRUCT,
                NEEDLES("runs past the end"));
    /* 10^6 nested MARK / EMPTY_LIST: the MARK depth cap stops it */
    b = (buf){0};
    BLIT(&b, "\x80\x02");
    for (int i = 0; i < 1000000; i++) BLIT(&b, "(]");
    bbyte(&b, '.');
    expect_fail_bounded("nested_marks_1e6", zip_ckpt(b), LORA_E_LIMIT, NEEDLES("nested MARKs", "MARK"), 16u << 20, 5.0);
    /* 10^6 values pushed with no MARK: the memory cap (64 bytes per pickle byte) holds */
    b = (buf){0};
    BLIT(&b, "\x80\x02");
    for (int i = 0; i < 1000000; i++) bbyte(&b, ']');
    bbyte(&b, '.');
    expect_fail_bounded("pushes_1e6", zip_ckpt(b), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("1000000 values"), 80u << 20, 5.0);
    /* DUP/BINGET amplification: L_i = [L_{i-1}, L_{i-1}] for 40 levels (2^40 logical elements),
     * then 10^5 DUPs of L_40 appended to one list; values are shared, never copied, so memory
     * stays O(pickle). The file is a legal dict without tensors. */
    b = (buf){0};
    BLIT(&b, "\x80\x02]r");
    ble(&b, 0, 4);
    bbyte(&b, '0');
    for (uint32_t i = 1; i <= 40; i++) {
        BLIT(&b, "](j");
        ble(&b, i - 1, 4);
        bbyte(&b, 'j');
        ble(&b, i - 1, 4);
        BLIT(&b, "er");
        ble(&b, i, 4);
        bbyte(&b, '0');
    }
    BLIT(&b, "}X\x03\x00\x00\x00" "amp](j");
    ble(&b, 40, 4);
    for (int i = 0; i < 100000; i++) bbyte(&b, '2');
    BLIT(&b, "es.");
    expect_fail_bounded("dup_binget_amplification", zip_ckpt(b), LORA_E_CKPT_NO_TENSORS, NEEDLES("no tensors"),
                        32u << 20, 2.0);
}

/* ---- rows 18-20: the zip container ----------------------------------------------------------------- */
static void row_18_20(void) {
    buf pk = P_one(tdefault());
    /* row 18: torch_dos.pt: data/0 DEFLATE-compressed, claiming 40 GB (ZIP64) */
    static const uint8_t deflated[] = {0xed, 0xc1, 0x01, 0x0d, 0x00, 0x00, 0x00, 0xc2, 0xa0, 0xf7, 0x4f, 0x6d,
                                       0x0e, 0x37, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    struct zent dos[3] = {
        {.name = "archive/data.pkl", .data = pk.p, .len = pk.n},
        {.name = "archive/data/0", .data = deflated, .len = sizeof deflated, .method = 8,
         .zip64_usize = UINT64_C(40000000000)},
        {.name = "archive/version", .data = "3\n", .len = 2},
    };
    expect_fail_bounded("deflate_bomb_40gb", zip_build(dos, 3), LORA_E_CKPT_ZIP_COMPRESSED,
                        NEEDLES("'archive/data/0'", "method 8", "without inflating"), 2u << 20, 1.0);
    struct zent defl_pkl[3] = {
        {.name = "archive/data.pkl", .data = pk.p, .len = pk.n, .method = 8},
        {.name = "archive/data/0", .data = storage_vals, .len = 16},
        {.name = "archive/version", .data = "3\n", .len = 2},
    };
    expect_fail("deflated_data_pkl", zip_build(defl_pkl, 3), LORA_E_CKPT_ZIP_COMPRESSED,
                NEEDLES("'archive/data.pkl'"));

    /* row 19: names */
    struct zent e[4];
#define BASE3(pkl_name, d0_name)                                                                           \
    e[0] = (struct zent){.name = pkl_name, .data = pk.p, .len = pk.n};                                     \
    e[1] = (struct zent){.name = d0_name, .data = storage_vals, .len = 16};                                \
    e[2] = (struct zent){.name = "archive/version", .data = "3\n", .len = 2}
    BASE3("archive/data.pkl", "archive/data/0");
    e[3] = (struct zent){.name = "archive/../../etc/x", .data = "x", .len = 1};
    expect_fail("name_dotdot", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'archive/../../etc/x'", "'..'"));
    e[3] = (struct zent){.name = "/abs/data.pkl", .data = "x", .len = 1};
    expect_fail("name_absolute", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'/abs/data.pkl'", "absolute"));
    e[3] = (struct zent){.name = "archive\\data.pkl", .data = "x", .len = 1};
    expect_fail("name_backslash", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("backslash"));
    e[3] = (struct zent){.name = "archive/x\0y", .name_len = 11, .data = "x", .len = 1};
    expect_fail("name_nul", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("NUL", "archive/x\\x00y"));
    e[3] = (struct zent){.name = "other/data.pkl", .data = pk.p, .len = pk.n};
    expect_fail("two_roots", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("two root folders", "'archive'", "'other'"));
    e[3] = (struct zent){.name = "archive/data/0", .data = storage_vals, .len = 16};
    expect_fail("duplicate_entry", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'archive/data/0'", "twice"));
    e[3] = (struct zent){.name = "data.pkl", .data = pk.p, .len = pk.n};
    expect_fail("no_root", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'data.pkl'", "root folder"));
    e[3] = (struct zent){.name = "archive//data.pkl", .data = pk.p, .len = pk.n};
    expect_fail("empty_component", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("empty path component"));
    e[3] = (struct zent){.name = "C:/data.pkl", .data = pk.p, .len = pk.n};
    expect_fail("drive_letter", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("drive letter"));
    BASE3("archive/data.pkl.bak", "archive/data/0");
    expect_fail("data_pkl_bak_only", zip_build(e, 3), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'archive/data.pkl'", "no"));
    e[0].name = "archive/Data.pkl";
    expect_fail("data_pkl_case", zip_build(e, 3), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("data.pkl"));
    BASE3("archive/data.pkl", "archive/data/0");
    expect_fail("missing_data_pkl", zip_build(e + 1, 2), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("'archive/data.pkl'"));
    /* a storage record missing: the pickle names data/0, the archive has data/1 */
    BASE3("archive/data.pkl", "archive/data/1");
    expect_fail("missing_record", zip_build(e, 3), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("data/0", "BINPERSID"));
    /* nothing was written anywhere: no "etc/x" beside or above the temp dir */
    struct stat sb;
    char p[700];
    snprintf(p, sizeof p, "%s/../../etc/x", tmpdir);
    CHECK(stat(p, &sb) != 0);
    snprintf(p, sizeof p, "%s/archive", tmpdir);
    CHECK(stat(p, &sb) != 0);

    /* row 20: structure */
    BASE3("archive/data.pkl", "archive/data/0");
    buf good = zip_build(e, 3);
    /* truncated: every cut of the valid archive fails cleanly */
    for (size_t cut = 1; cut < good.n; cut += (cut < 64 ? 7 : 97)) {
        buf t = {0};
        bput(&t, good.p, cut);
        lora_status want = cut < 4 ? LORA_E_NOT_A_MODEL : LORA_E_CKPT_ZIP_CORRUPT;
        char nm[64];
        snprintf(nm, sizeof nm, "truncated_%zu", cut);
        struct tensor_map m;
        tmap_init(&m, ctx);
        lora_status s = ckpt_read_mem(ctx, nm, t.p, t.n, &m);
        CHECK_MSG(s == want, "%s: %s: %s", nm, lora_status_name(s), lora_errmsg(ctx));
        CHECK(m.n == 0 && host_bytes_of(ctx) == mem_baseline);
        bfree(&t);
    }
    buf t = {0};
    bput(&t, good.p, good.n / 2);
    expect_fail("truncated_half", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("end-of-central-directory"));
    /* EOCD comment length past EOF */
    t = (buf){0};
    bput(&t, good.p, good.n);
    t.p[t.n - 2] = 0x40;
    expect_fail("eocd_comment_past_eof", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("comment", "past the end"));
    /* bytes after the end record */
    t = (buf){0};
    bput(&t, good.p, good.n);
    BLIT(&t, "trailing");
    expect_fail("eocd_trailing", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("follow"));
    /* a flipped data byte: CRC-32 mismatch */
    t = (buf){0};
    bput(&t, good.p, good.n);
    size_t d0 = 30 + strlen("archive/data.pkl") + pk.n + 30 + strlen("archive/data/0");
    t.p[d0 + 3] ^= 0x40;
    expect_fail("crc_mismatch", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("CRC-32", "'archive/data/0'"));
    /* a flipped data.pkl byte */
    t = (buf){0};
    bput(&t, good.p, good.n);
    t.p[30 + strlen("archive/data.pkl") + 5] ^= 0x01;
    expect_fail("crc_mismatch_pkl", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("CRC-32", "'archive/data.pkl'"));
    /* local header name differs from the central one */
    BASE3("archive/data.pkl", "archive/data/0");
    e[1].local_name = "archive/data/9";
    expect_fail("local_name_differs", zip_build(e, 3), LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("local header's name"));
    /* the last entry's data runs into the central directory */
    BASE3("archive/data.pkl", "archive/data/0");
    t = zip_build(e, 3);
    {
        /* central entry 2 (archive/version): bump its sizes from 2 to 40 (and the local
         * header's, so only the range check fires) */
        size_t cd = t.n - 22 - (46 + 16) - (46 + 14) - (46 + 15);
        uint8_t *c2 = t.p + cd + (46 + 16) + (46 + 14);
        c2[20] = c2[24] = 40;
        size_t l2 = 30 + 16 + pk.n + 30 + 14 + 16;
        t.p[l2 + 18] = t.p[l2 + 22] = 40;
    }
    expect_fail("data_into_central_dir", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("'archive/version'", "central directory"));
    /* ZIP64 size pointing past the end of the file */
    BASE3("archive/data.pkl", "archive/data/0");
    {
        struct zent e2[3];
        memcpy(e2, e, sizeof e2);
        e2[1].zip64_usize = 16;   /* a valid ZIP64 entry first ... */
        buf z = zip_build(e2, 3);
        expect_ok("zip64_extra_valid", z, check_valid_map);
        z = zip_build(e2, 3);
        /* ... then its ZIP64 sizes rewritten to 2^40 in the central directory's extra field */
        size_t cd = z.n - 22 - (46 + 16) - (46 + 14 + 20) - (46 + 15);
        uint8_t *x = z.p + cd + (46 + 16) + 46 + 14 + 4;
        for (int i = 0; i < 8; i++) x[i] = x[8 + i] = (uint8_t)(i == 5);
        expect_fail("zip64_size_past_eof", z, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("'archive/data/0'", "central directory"));
    }
    /* overlapping entries (Fifield): entry B's local header sits inside entry A's data */
    {
        buf inner = {0};   /* B = local header + data of "archive/data/0", as A's payload */
        uint32_t crc = crc32_bytes((const uint8_t *)storage_vals, 16);
        BLIT(&inner, "PK\x03\x04");
        ble(&inner, 20, 2); ble(&inner, 0, 2); ble(&inner, 0, 2); ble(&inner, 0, 2); ble(&inner, 0x21, 2);
        ble(&inner, crc, 4); ble(&inner, 16, 4); ble(&inner, 16, 4); ble(&inner, 14, 2); ble(&inner, 0, 2);
        BLIT(&inner, "archive/data/0");
        bput(&inner, storage_vals, 16);
        struct zent o[3] = {
            {.name = "archive/data.pkl", .data = pk.p, .len = pk.n},
            {.name = "archive/data/1", .data = inner.p, .len = inner.n},
            {.name = "archive/version", .data = "3\n", .len = 2},
        };
        buf z = zip_build(o, 3);
        /* append a 4th central entry for data/0 pointing into data/1's payload */
        size_t eocd = z.n - 22;
        uint64_t cd_off = (uint64_t)z.p[eocd + 16] | (uint64_t)z.p[eocd + 17] << 8;
        uint64_t a_data = 30 + 16 + pk.n + 30 + 14;
        buf c = {0};
        bput(&c, z.p, eocd);
        BLIT(&c, "PK\x01\x02");
        ble(&c, 45, 2); ble(&c, 20, 2); ble(&c, 0, 2); ble(&c, 0, 2); ble(&c, 0, 2); ble(&c, 0x21, 2);
        ble(&c, crc, 4); ble(&c, 16, 4); ble(&c, 16, 4); ble(&c, 14, 2); ble(&c, 0, 2); ble(&c, 0, 2);
        ble(&c, 0, 2); ble(&c, 0, 2); ble(&c, 0, 4); ble(&c, a_data, 4);
        BLIT(&c, "archive/data/0");
        uint64_t cd_size = c.n - cd_off;
        BLIT(&c, "PK\x05\x06");
        ble(&c, 0, 4); ble(&c, 4, 2); ble(&c, 4, 2); ble(&c, cd_size, 4); ble(&c, cd_off, 4); ble(&c, 0, 2);
        bfree(&z);
        bfree(&inner);
        expect_fail("overlapping_entries", c, LORA_E_CKPT_ZIP_OVERLAP, NEEDLES("overlap", "'archive/data/"));
    }
    /* 10^6 entries announced (ZIP64 end record): refused before reading the directory */
    {
        buf z = {0};
        BLIT(&z, "PK\x03\x04");
        for (int i = 0; i < 26; i++) bbyte(&z, 0);
        uint64_t z64 = z.n;
        BLIT(&z, "PK\x06\x06");
        ble(&z, 44, 8); ble(&z, 45, 2); ble(&z, 45, 2); ble(&z, 0, 4); ble(&z, 0, 4);
        ble(&z, 1000000, 8); ble(&z, 1000000, 8); ble(&z, 46000000, 8); ble(&z, 0, 8);
        BLIT(&z, "PK\x06\x07");
        ble(&z, 0, 4); ble(&z, z64, 8); ble(&z, 1, 4);
        BLIT(&z, "PK\x05\x06");
        ble(&z, 0, 4); ble(&z, 0xffff, 2); ble(&z, 0xffff, 2); ble(&z, 0xffffffffu, 4); ble(&z, 0xffffffffu, 4);
        ble(&z, 0, 2);
        expect_fail_bounded("entries_1e6", z, LORA_E_LIMIT, NEEDLES("1000000 zip entries"), 1u << 20, 1.0);
    }
    /* the central directory claims more entries than it holds */
    t = (buf){0};
    bput(&t, good.p, good.n);
    t.p[t.n - 22 + 8] = t.p[t.n - 22 + 10] = 4;
    expect_fail("entry_count_mismatch", t, LORA_E_CKPT_ZIP_CORRUPT, NEEDLES("central directory"));
    /* garbage behind a zip signature */
    t = (buf){0};
    BLIT(&t, "PK\x03\x04");
    for (int i = 0; i < 300; i++) bbyte(&t, (i * 131 + 7) & 0xff);
    expect_fail("garbage_zip", t, LORA_E_CKPT_ZIP_CORRUPT, NO_NEEDLES);
    /* byteorder */
    BASE3("archive/data.pkl", "archive/data/0");
    e[3] = (struct zent){.name = "archive/byteorder", .data = "big", .len = 3};
    expect_fail("byteorder_big", zip_build(e, 4), LORA_E_UNSUPPORTED, NEEDLES("big-endian"));
    e[3] = (struct zent){.name = "archive/byteorder", .data = "middle", .len = 6};
    expect_fail("byteorder_bad", zip_build(e, 4), LORA_E_CKPT_ZIP_ENTRY, NEEDLES("byteorder"));
    e[3] = (struct zent){.name = "archive/byteorder", .data = "little", .len = 6};
    expect_ok("byteorder_little", zip_build(e, 4), check_valid_map);
    /* an unknown extra record and a root directory entry are ignored (A1111's strict list was not) */
    e[3] = (struct zent){.name = "archive/.data/serialization_id", .data = "1234", .len = 4};
    expect_ok("serialization_id", zip_build(e, 4), check_valid_map);
    e[3] = (struct zent){.name = "archive/extra_notes.txt", .data = "hello", .len = 5};
    expect_ok("unknown_record", zip_build(e, 4), check_valid_map);
    e[3] = (struct zent){.name = "archive/", .data = "", .len = 0};
    expect_ok("root_dir_entry", zip_build(e, 4), check_valid_map);
    /* a root of any name; data descriptors (torch sets bit 3 and zeroes the local sizes) */
    BASE3("my model v2/data.pkl", "my model v2/data/0");
    e[2].name = "my model v2/version";
    e[0].flags = e[1].flags = e[2].flags = 8;
    expect_ok("any_root_data_descriptor", zip_build(e, 3), check_valid_map);
#undef BASE3
    bfree(&good);
    bfree(&pk);
}

/* ---- P1 sniffing, P13 state dict, row 25 odds and ends ------------------------------------------------ */
static void sniff_and_state_dict(void) {
    expect_fail("empty_file", (buf){0}, LORA_E_NOT_A_MODEL, NEEDLES("empty"));
    buf b = {0};
    BLIT(&b, "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n");
    expect_fail("lfs_pointer", b, LORA_E_NOT_A_MODEL, NEEDLES("Git LFS"));
    b = (buf){0};
    bput(&b, "7z\xbc\xaf\x27\x1c\x00\x04", 8);
    for (int i = 0; i < 64; i++) bbyte(&b, i);
    expect_fail("7z", b, LORA_E_NOT_A_MODEL, NEEDLES("7z"));
    b = (buf){0};
    BLIT(&b, "<!DOCTYPE html><html><body>Sign in</body></html>");
    expect_fail("html", b, LORA_E_NOT_A_MODEL, NEEDLES("HTML"));
    b = (buf){0};
    ble(&b, 2, 8);
    BLIT(&b, "{}");
    expect_fail("safetensors", b, LORA_E_NOT_A_MODEL, NEEDLES("safetensors"));
    b = (buf){0};
    bput(&b, "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.", 20);
    expect_fail("legacy_magic", b, LORA_E_UNSUPPORTED, NEEDLES("legacy pre-1.6 torch format", "safetensors"));
    b = (buf){0};
    BLIT(&b, "\x80\x02}.");
    expect_fail("bare_pickle", b, LORA_E_NOT_A_MODEL, NEEDLES("bare pickle"));
    b = (buf){0};
    BLIT(&b, "\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" "PK\x03\x04 inside a gzip");
    expect_fail("gzip", b, LORA_E_NOT_A_MODEL, NEEDLES("gzip"));
    b = (buf){0};
    for (int i = 0; i < 1024; i++) bbyte(&b, 0);
    memcpy(b.p, "storages", 8);
    memcpy(b.p + 257, "ustar", 5);
    expect_fail("legacy_tar", b, LORA_E_UNSUPPORTED, NEEDLES("legacy tar"));
    b = (buf){0};
    for (int i = 0; i < 100; i++) bbyte(&b, (i * 37 + 3) & 0xff);
    b.p[0] = 0x17;
    expect_fail("random_bytes", b, LORA_E_NOT_A_MODEL, NEEDLES("no zip signature"));

    /* state dict rules */
    struct tdesc t[2] = {tdefault(), tdefault()};
    expect_fail("duplicate_key", zip_ckpt(P_state_dict(t, 2)), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("'w'", "twice"));
    b = (buf){0};
    BLIT(&b, "\x80\x02}K\x07");
    buf one = P_one(tdefault());   /* reuse its tensor bytes: from GLOBAL _rebuild_tensor_v2 to before 'u.' */
    const char *g = "ctorch._utils";
    uint8_t *at = memmem(one.p, one.n, g, strlen(g));
    bput(&b, at, (size_t)(one.p + one.n - 2 - at));
    BLIT(&b, "s.");
    bfree(&one);
    expect_fail("int_key_tensor", zip_ckpt(b), LORA_E_CKPT_PICKLE_STRUCT, NEEDLES("Python int key"));
    t[0].stype = "ComplexFloatStorage";
    t[0].numel = 2;
    t[0].nsize = t[0].nstride = 1;
    t[0].size[0] = 2;
    t[0].stride[0] = 1;
    expect_fail("complex_tensor", zip_ckpt(P_one(t[0])), LORA_E_UNSUPPORTED, NEEDLES("'w'", "ComplexFloatStorage"));
    b = (buf){0};
    BLIT(&b, "\x80\x02}X\x01\x00\x00\x00s" "ctorch._utils\n_rebuild_sparse_tensor\n)Rs.");
    expect_fail("sparse_tensor", zip_ckpt(b), LORA_E_UNSUPPORTED_LAYOUT, NEEDLES("'s'", "_rebuild_sparse_tensor"));
    b = (buf){0};
    BLIT(&b, "\x80\x02}X\x05\x00\x00\x00" "epochK\x01s.");
    expect_fail("no_tensors", zip_ckpt(b), LORA_E_CKPT_NO_TENSORS, NEEDLES("no tensors", "1 other"));
    b = (buf){0};
    BLIT(&b, "\x80\x02}X\x0a\x00\x00\x00state_dict}s.");
    expect_fail("empty_state_dict", zip_ckpt(b), LORA_E_CKPT_NO_TENSORS, NEEDLES("state_dict"));

    /* positive controls: the crafted file itself; {'state_dict': ...} plus inert values; a
     * protocol-4 file through STACK_GLOBAL/MEMOIZE; _rebuild_tensor_v3 over an UntypedStorage */
    expect_ok("valid", zip_ckpt(P_one(tdefault())), check_valid_map);
    buf sd = P_one(tdefault());
    b = (buf){0};
    BLIT(&b, "\x80\x02}(X\x05\x00\x00\x00" "epochK\x06X\x0a\x00\x00\x00state_dict");
    bput(&b, sd.p + 2, sd.n - 3);   /* the OrderedDict without PROTO and STOP */
    BLIT(&b, "X\x09\x00\x00\x00" "callbacks}cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n"
             "}X\x07\x00\x00\x00monitorNssX\x02\x00\x00\x00np" "cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n"
             "X\x02\x00\x00\x00" "f8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             "c_codecs\nencode\nX\x09\x00\x00\x00" "\x00\x00\x00\x00\x00\x00\xc3\xb8?X\x06\x00\x00\x00latin1\x86R\x86R"
             "X\x04\x00\x00\x00instcpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)\x81}b"
             "X\x01\x00\x00\x00" "fG?\xf8\x00\x00\x00\x00\x00\x00u.");
    bfree(&sd);
    expect_ok("lightning_inert", zip_ckpt(b), check_valid_map);
    expect_ok("proto4_stack_global",
              ZIP_PICKLE_LIT("\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94\x8c\x0ctorch._utils\x94"
                             "\x8c\x12_rebuild_tensor_v2\x94\x93\x94((\x8c\x07storage\x94\x8c\x05torch\x94"
                             "\x8c\x0c" "FloatStorage\x94\x93\x94\x8c\x01" "0\x94\x8c\x03" "cpu\x94K\x04t\x94Q"
                             "K\x00K\x02K\x02\x86\x94K\x02K\x01\x86\x94\x89}\x94t\x94R\x94s."),
              check_valid_map);
    expect_ok("rebuild_v3_untyped",
              ZIP_PICKLE_LIT("\x80\x02}X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_tensor_v3\n"
                             "((X\x07\x00\x00\x00storagectorch\nUntypedStorage\nX\x01\x00\x00\x00" "0"
                             "X\x03\x00\x00\x00" "cpuK\x10tQK\x00K\x02K\x02\x86K\x02K\x01\x86\x89}ctorch\nfloat32\ntRs."),
              check_valid_map);
    /* a Parameter via _rebuild_parameter, and torch.Size as the size */
    expect_ok("rebuild_parameter",
              ZIP_PICKLE_LIT("\x80\x02}X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_parameter\n"
                             "(ctorch._utils\n_rebuild_tensor_v2\n"
                             "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00" "0"
                             "X\x03\x00\x00\x00" "cpuK\x04tQK\x00" "ctorch\nSize\nK\x02K\x02\x86\x85R"
                             "K\x02K\x01\x86\x89}tR\x88}tRs."),
              check_valid_map);
}

/* ---- allocation failures (spec/safety.md F6) --------------------------------------------------------- */
struct fail_alloc {
    int64_t calls, fail_at;   /* the call index that fails; -1 = none */
};

static void *fa_alloc(void *user, size_t size, size_t align) {
    struct fail_alloc *fa = user;
    if (fa->calls++ == fa->fail_at) return NULL;
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
}

static void fa_free(void *user, void *p) {
    (void)user;
    free(p);
}

/* The N-th allocation of a read (real torch files: views and shared storages, the Lightning
 * layout) or of a write fails, for every N until the operation succeeds: LORA_E_NOMEM each
 * time, nothing kept, no temp file left, and the next call works. */
static void alloc_faults(void) {
    struct fail_alloc fa = {0, -1};
    lora_ctx *c = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &c), LORA_OK);
    if (!c) return;
    CHECK_STATUS(lora_ctx_set_allocator(c, fa_alloc, fa_free, &fa), LORA_OK);
    const char *dir = getenv("LORA_TEST_DATA");
    static const char *const files[] = {"views.pt", "sd_lightning.ckpt", "proto4.pt"};
    char path[4096], out[700];
    snprintf(out, sizeof out, "%s/alloc_fault_out.ckpt", tmpdir);
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        snprintf(path, sizeof path, "%s/ckpt/%s", dir ? dir : "tests/data", files[f]);
        int ok = 0, ok_write = 0;
        int64_t n, nomem = 0;
        for (n = 0; n < 100000 && !ok; n++) {
            fa.calls = 0;
            fa.fail_at = n;
            struct tensor_map m;
            tmap_init(&m, c);
            lora_status s = ckpt_read(c, path, &m);
            CHECK_MSG(s == LORA_OK || s == LORA_E_NOMEM, "%s, allocation %lld fails: %s: %s", files[f], (long long)n,
                      lora_status_name(s), lora_errmsg(c));
            if (s == LORA_E_NOMEM) {
                nomem++;
                CHECK_MSG(m.n == 0, "%s: tensors kept after NOMEM", files[f]);
            }
            ok = s == LORA_OK;
            tmap_clear(&m);
            CHECK_MSG(host_bytes_of(c) == 0, "%s, allocation %lld fails: %llu bytes kept", files[f], (long long)n,
                      (unsigned long long)host_bytes_of(c));
        }
        CHECK_MSG(ok && nomem > 10, "%s: read never succeeded or failed too few times (%lld)", files[f], (long long)nomem);
        /* the write, for every failing allocation after a successful read */
        for (n = 0; n < 100000 && !ok_write; n++) {
            struct tensor_map m;
            tmap_init(&m, c);
            fa.fail_at = -1;
            CHECK_STATUS(ckpt_read(c, path, &m), LORA_OK);
            fa.calls = 0;
            fa.fail_at = n;
            lora_status s = ckpt_write(c, out, &m, 1);
            CHECK_MSG(s == LORA_OK || s == LORA_E_NOMEM, "%s write, allocation %lld fails: %s", files[f], (long long)n,
                      lora_errmsg(c));
            ok_write = s == LORA_OK;
            struct stat sb;
            CHECK_MSG(ok_write || stat(out, &sb) != 0, "%s: a failed write left %s", files[f], out);
            tmap_clear(&m);
            CHECK(host_bytes_of(c) == 0);
        }
        CHECK(ok_write);
        unlink(out);
    }
    lora_ctx_free(c);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_ckpt_badinput");
    const char *tenv = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/lora_ckpt_badinput_XXXXXX", tenv && *tenv ? tenv : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(canary, sizeof canary, "%s/CANARY_pickle_code_ran", tmpdir);
    snprintf(valid_path, sizeof valid_path, "%s/valid.ckpt", tmpdir);
    buf v = zip_ckpt(P_one(tdefault()));
    write_file(valid_path, v.p, v.n);
    bfree(&v);
    mem_baseline = host_bytes_of(ctx);
    CHECK(mem_baseline == 0);

    check_ctx_usable("start");
    row_13();
    row_14();
    row_15();
    row_16();
    row_17();
    row_18_20();
    sniff_and_state_dict();
    alloc_faults();
    check_canary("end");

    uint64_t peak = 0;
    lora_ctx_memory(ctx, NULL, &peak, NULL, NULL);
    CHECK_MSG(peak < 8u << 20, "host peak %llu bytes", (unsigned long long)peak);

    unlink(valid_path);
    DIR *d = opendir(tmpdir);
    int left = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            fprintf(stderr, "left in %s: %s\n", tmpdir, e->d_name);
            left++;
        }
    if (d) closedir(d);
    CHECK(left == 0);
    rmdir(tmpdir);
    lora_ctx_free(ctx);
    return test_finish("test_ckpt_badinput");
}
