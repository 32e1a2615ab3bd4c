/* Faults while writing .safetensors (spec/safety.md S9, T1, section 6 row 5, section 7 F1):
 * every failed save returns an error status, leaves the destination exactly as it was
 * (absent, or byte-identical to before), and leaves no ".<name>.lora-tmp-*" file behind.
 *
 *   - metadata that would make the header exceed 100,000,000 bytes: refused before writing
 *   - destination directory missing; not writable (or, where permission checks are bypassed
 *     as for root, a parent that is a regular file); destination is a directory
 *   - disk full: ENOSPC on a tiny tmpfs (in a private mount namespace, when allowed) and
 *     EFBIG from RLIMIT_FSIZE at several byte positions
 *   - invalid UTF-8 in a metadata key/value or a tensor name, reserved/duplicate names */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/safetensors.h"
#include "../test.h"

static lora_ctx *ctx;
static char dir[512];
static uint64_t mem_baseline;

/* ---- helpers ------------------------------------------------------------------------------- */
typedef struct {
    int exists;
    uint8_t *p;
    size_t n;
} snapshot;

static snapshot snap(const char *path) {
    snapshot s = {0, NULL, 0};
    FILE *f = fopen(path, "rb");
    if (!f) return s;
    s.exists = 1;
    size_t cap = 1 << 16;
    s.p = malloc(cap);
    for (;;) {
        if (s.n == cap) s.p = realloc(s.p, cap *= 2);
        size_t r = fread(s.p + s.n, 1, cap - s.n, f);
        if (r == 0) break;
        s.n += r;
    }
    fclose(f);
    return s;
}

static int same(const snapshot *a, const snapshot *b) {
    if (a->exists != b->exists) return 0;
    return !a->exists || (a->n == b->n && memcmp(a->p, b->p, a->n) == 0);
}

static void snap_free(snapshot *s) {
    free(s->p);
    s->p = NULL;
}

/* Number of our temp files (".<name>.lora-tmp-<...>") in `d`. */
static int count_tmp(const char *d) {
    DIR *h = opendir(d);
    if (!h) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(h)) != NULL)
        if (e->d_name[0] == '.' && strstr(e->d_name, ".lora-tmp-")) n++;
    closedir(h);
    return n;
}

static int count_entries(const char *d) {
    DIR *h = opendir(d);
    if (!h) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(h)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(h);
    return n;
}

static uint64_t host_bytes(void) {
    uint64_t b = UINT64_MAX;
    lora_ctx_memory(ctx, &b, NULL, NULL, NULL);
    return b;
}

static void path_in(char *out, size_t cap, const char *d, const char *name) { snprintf(out, cap, "%s/%s", d, name); }

/* A small valid LoRA-like file; `scale` makes its bytes differ between versions. `big` adds
 * a 256 KiB tensor (for the disk-full cases). */
static float up_vals[6];
static uint8_t small_vals[3] = {1, 2, 3};
static float *big_vals;
#define BIG_N (64 * 1024)

static lora_status save(const char *path, float scale, int big, const char *const *mk, const char *const *mv,
                        int64_t n_meta) {
    for (int i = 0; i < 6; i++) up_vals[i] = scale * (float)(i + 1);
    static const int64_t s_up[2] = {2, 3}, s_small[1] = {3}, s_big[1] = {BIG_N};
    struct st_write_tensor t[3] = {
        {"lora_unet_down.lora_up.weight", LORA_DTYPE_F32, 2, s_up, up_vals},
        {"flags", LORA_DTYPE_U8, 1, s_small, small_vals},
        {"big.weight", LORA_DTYPE_F32, 1, s_big, big_vals},
    };
    return st_write(ctx, path, t, big ? 3 : 2, mk, mv, n_meta);
}

static lora_status save_plain(const char *path, float scale) { return save(path, scale, 0, NULL, NULL, 0); }

/* Opens `path` and checks it holds what save(path, scale, big) wrote. */
static void check_loadable(const char *where, const char *path, float scale, int big) {
    lora_file *f = NULL;
    lora_status s = lora_file_open(ctx, path, &f);
    CHECK_MSG(s == LORA_OK, "%s: %s: %s", where, lora_status_name(s), lora_errmsg(ctx));
    if (!f) return;
    CHECK_MSG(lora_file_tensor_count(f) == (big ? 3 : 2), "%s", where);
    int64_t i = lora_file_find(f, "lora_unet_down.lora_up.weight");
    float v[6] = {0};
    CHECK_MSG(i >= 0 && lora_file_read_f32(f, i, v, 6) == LORA_OK, "%s", where);
    for (int k = 0; k < 6; k++) CHECK_MSG(v[k] == scale * (float)(k + 1), "%s: v[%d] = %g", where, k, (double)v[k]);
    lora_file_free(f);
}

/* Common after-failure checks: status as wanted, destination unchanged, no temp file in
 * `d`, message names the destination, no leaked host memory. */
static void after_failure(const char *where, lora_status got, const lora_status *allowed, int n_allowed,
                          const char *path, const snapshot *before, const char *d, const char *needle) {
    int ok = 0;
    for (int i = 0; i < n_allowed; i++) ok |= got == allowed[i];
    CHECK_MSG(ok, "%s: got %s (%d), want %s%s", where, lora_status_name(got), got, lora_status_name(allowed[0]),
              n_allowed > 1 ? " or another listed status" : "");
    snapshot now = snap(path);
    CHECK_MSG(same(before, &now), "%s: destination changed (existed %d -> %d, %zu -> %zu bytes)", where,
              before->exists, now.exists, before->n, now.n);
    snap_free(&now);
    CHECK_MSG(count_tmp(d) == 0, "%s: temp file left in %s", where, d);
    CHECK_MSG(strstr(lora_errmsg(ctx), needle ? needle : path) != NULL, "%s: message does not name \"%s\": %s",
              where, needle ? needle : path, lora_errmsg(ctx));
    CHECK_MSG(host_bytes() == mem_baseline, "%s: host_bytes %llu, baseline %llu", where,
              (unsigned long long)host_bytes(), (unsigned long long)mem_baseline);
}

#define ONE(s) ((const lora_status[]){s}), 1

/* ---- 1. header too large (S9, sd-scripts #1380) ------------------------------------------ */
static void header_too_large(void) {
    char path[600];
    path_in(path, sizeof path, dir, "big_meta.safetensors");
    const size_t huge = 100000000;   /* the value alone is 1e8 bytes: the header is larger */
    char *val = malloc(huge + 1);
    if (!val) { perror("malloc"); exit(2); }
    memset(val, 'a', huge);
    val[huge] = '\0';
    const char *k1[1] = {"ss_tag_frequency"};
    const char *v1[1] = {val};

    /* a. destination absent: stays absent, directory unchanged */
    int entries = count_entries(dir);
    snapshot before = snap(path);
    lora_status s = save(path, 1.0f, 0, k1, v1, 1);
    after_failure("too_large/new", s, ONE(LORA_E_ST_HEADER_TOO_LARGE), path, &before, dir, NULL);
    CHECK(count_entries(dir) == entries);
    snap_free(&before);

    /* b. destination exists: byte-identical afterwards */
    CHECK_STATUS(save_plain(path, 2.0f), LORA_OK);
    before = snap(path);
    s = save(path, 1.0f, 0, k1, v1, 1);
    after_failure("too_large/existing", s, ONE(LORA_E_ST_HEADER_TOO_LARGE), path, &before, dir, NULL);
    check_loadable("too_large/existing kept", path, 2.0f, 0);
    snap_free(&before);

    /* c. the serialized (escaped) size counts: 50,000,001 quotes become 100,000,002 bytes */
    memset(val, '"', 50000001);
    val[50000001] = '\0';
    before = snap(path);
    s = save(path, 1.0f, 0, k1, v1, 1);
    after_failure("too_large/escaped", s, ONE(LORA_E_ST_HEADER_TOO_LARGE), path, &before, dir, NULL);
    snap_free(&before);

    /* d. many moderate entries add up (ss_tag_frequency-style bulk): 1001 x 100,000 bytes */
    memset(val, 'b', 100000);
    val[100000] = '\0';
    enum { NM = 1001 };
    const char **mk = malloc(NM * sizeof *mk), **mv = malloc(NM * sizeof *mv);
    char *keybuf = malloc(NM * 16);
    for (int i = 0; i < NM; i++) {
        snprintf(keybuf + 16 * i, 16, "tag_%d", i);
        mk[i] = keybuf + 16 * i;
        mv[i] = val;
    }
    before = snap(path);
    s = save(path, 1.0f, 0, mk, mv, NM);
    after_failure("too_large/many_entries", s, ONE(LORA_E_ST_HEADER_TOO_LARGE), path, &before, dir, NULL);
    snap_free(&before);
    /* ... while 999 of them fit and load */
    CHECK_STATUS(save(path, 3.0f, 0, mk, mv, 999), LORA_OK);
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    CHECK(f && lora_file_metadata_count(f) == 999);
    lora_file_free(f);
    free(mk);
    free(mv);
    free(keybuf);
    CHECK(unlink(path) == 0);

    /* e. boundary: the compact header {"__metadata__":{"k":"<v>"}} is 25 + len(v) bytes
     * (S9: compact JSON, padded with spaces to a multiple of 8). len(v) = 99,999,975 gives
     * exactly 100,000,000 (= the reader's limit, accepted); one more byte gives 100,000,001,
     * padded 100,000,008: refused. */
    const size_t fit = 100000000 - 25;
    memset(val, 'c', fit + 1);
    val[fit + 1] = '\0';
    const char *k2[1] = {"k"};
    before = snap(path);
    s = st_write(ctx, path, NULL, 0, k2, v1, 1);
    after_failure("too_large/boundary+1", s, ONE(LORA_E_ST_HEADER_TOO_LARGE), path, &before, dir, NULL);
    snap_free(&before);
    val[fit] = '\0';
    CHECK_STATUS(st_write(ctx, path, NULL, 0, k2, v1, 1), LORA_OK);
    snapshot w = snap(path);
    CHECK(w.exists && w.n == 8 + 100000000);
    uint64_t nfield = 0;
    for (int i = 7; w.exists && w.n >= 8 && i >= 0; i--) nfield = (nfield << 8) | w.p[i];
    CHECK_MSG(nfield == 100000000, "boundary header length %llu", (unsigned long long)nfield);
    snap_free(&w);
    f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    const char *mkey = NULL, *mval = NULL;
    CHECK(f && lora_file_metadata_at(f, 0, &mkey, &mval) == LORA_OK && strlen(mval) == fit);
    lora_file_free(f);
    CHECK(unlink(path) == 0);
    free(val);
    CHECK(host_bytes() == mem_baseline);
}

/* ---- 2. destination directory problems -------------------------------------------------- */
static void destination_faults(void) {
    char path[700], sub[600];
    snapshot absent = {0, NULL, 0};

    /* missing directory: LORA_E_NOT_FOUND, nothing created */
    path_in(sub, sizeof sub, dir, "no_such_dir");
    path_in(path, sizeof path, sub, "out.safetensors");
    int entries = count_entries(dir);
    lora_status s = save_plain(path, 1.0f);
    after_failure("missing_dir", s, ONE(LORA_E_NOT_FOUND), path, &absent, dir, "no_such_dir");
    struct stat sb;
    CHECK(stat(sub, &sb) != 0 && errno == ENOENT);
    CHECK(count_entries(dir) == entries);

    /* read-only directory, unless permission checks are bypassed (root, CAP_DAC_OVERRIDE) */
    path_in(sub, sizeof sub, dir, "readonly");
    CHECK(mkdir(sub, 0755) == 0);
    path_in(path, sizeof path, sub, "kept.safetensors");
    CHECK_STATUS(save_plain(path, 4.0f), LORA_OK);
    CHECK(chmod(sub, 0555) == 0);
    if (access(sub, W_OK) != 0) {
        snapshot before = snap(path);
        s = save_plain(path, 5.0f);
        /* the message names the temp file next to the destination: check the base name */
        after_failure("readonly/existing", s, ONE(LORA_E_IO), path, &before, sub, "kept.safetensors");
        snap_free(&before);
        check_loadable("readonly/kept", path, 4.0f, 0);
        char newp[800];
        path_in(newp, sizeof newp, sub, "new.safetensors");
        s = save_plain(newp, 5.0f);
        after_failure("readonly/new", s, ONE(LORA_E_IO), newp, &absent, sub, "new.safetensors");
        CHECK(count_entries(sub) == 1);
    } else {
        printf("note: permission checks are bypassed here (euid %d): using a parent that is a regular file\n",
               (int)geteuid());
        char plain[700], inner[800];
        path_in(plain, sizeof plain, dir, "plain_file");
        FILE *pf = fopen(plain, "wb");
        CHECK(pf != NULL);
        if (pf) {
            fputs("not a directory", pf);
            fclose(pf);
        }
        snapshot pbefore = snap(plain);
        path_in(inner, sizeof inner, plain, "out.safetensors");
        s = save_plain(inner, 5.0f);
        /* ENOTDIR: the library maps it with ENOENT to LORA_E_NOT_FOUND; LORA_E_IO is also an
         * acceptable errno mapping */
        after_failure("parent_is_file", s, ((const lora_status[]){LORA_E_NOT_FOUND, LORA_E_IO}), 2, inner, &absent,
                      dir, "plain_file");
        snapshot pafter = snap(plain);
        CHECK(same(&pbefore, &pafter));
        snap_free(&pbefore);
        snap_free(&pafter);
        CHECK(unlink(plain) == 0);
    }
    CHECK(chmod(sub, 0755) == 0);
    CHECK(unlink(path) == 0);
    CHECK(rmdir(sub) == 0);

    /* destination is a directory: the temp file is written, the rename fails (EISDIR), the
     * temp file must be removed and the directory left alone */
    path_in(sub, sizeof sub, dir, "is_a_dir.safetensors");
    CHECK(mkdir(sub, 0755) == 0);
    snapshot dbefore = snap(sub);
    s = save_plain(sub, 1.0f);
    after_failure("dest_is_dir", s, ONE(LORA_E_IO), sub, &dbefore, dir, "is_a_dir.safetensors");
    snap_free(&dbefore);
    CHECK(stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode));
    CHECK(count_entries(sub) == 0);
    CHECK(rmdir(sub) == 0);
}

/* ---- 3. disk full ------------------------------------------------------------------------- */
/* ENOSPC on a 64 KiB tmpfs. Runs in a child in its own mount namespace so the mount can never
 * outlive the test. Returns the child's failure count, or -1 when mounting is not possible. */
static int tmpfs_enospc(void) {
    char mnt[600];
    path_in(mnt, sizeof mnt, dir, "tmpfs");
    if (mkdir(mnt, 0755) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        rmdir(mnt);
        return -1;
    }
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0) _exit(77);
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) _exit(77);
        if (mount("lora_test", mnt, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755") != 0) _exit(77);
        test_failed_ = 0;
        char path[700], other[700];
        snapshot absent = {0, NULL, 0};
        path_in(path, sizeof path, mnt, "model.safetensors");
        CHECK_STATUS(save_plain(path, 6.0f), LORA_OK);
        snapshot before = snap(path);
        CHECK(before.exists);
        /* 256 KiB of tensor data cannot fit */
        lora_status s = save(path, 7.0f, 1, NULL, NULL, 0);
        after_failure("tmpfs/existing", s, ONE(LORA_E_NOSPACE), path, &before, mnt, NULL);
        check_loadable("tmpfs/kept", path, 6.0f, 0);
        path_in(other, sizeof other, mnt, "new.safetensors");
        s = save(other, 7.0f, 1, NULL, NULL, 0);
        after_failure("tmpfs/new", s, ONE(LORA_E_NOSPACE), other, &absent, mnt, NULL);
        /* the failed saves freed their space: a small save still fits */
        CHECK_STATUS(save_plain(other, 8.0f), LORA_OK);
        check_loadable("tmpfs/small after", other, 8.0f, 0);
        /* F1: a retry into another directory succeeds and loads */
        char retry[700];
        path_in(retry, sizeof retry, dir, "retry_after_enospc.safetensors");
        CHECK_STATUS(save(retry, 7.0f, 1, NULL, NULL, 0), LORA_OK);
        check_loadable("tmpfs/retry elsewhere", retry, 7.0f, 1);
        unlink(retry);
        snap_free(&before);
        umount2(mnt, MNT_DETACH);
        fflush(NULL);
        _exit(test_failed_ > 100 ? 100 : test_failed_);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    rmdir(mnt);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 77) return -1;
    if (!WIFEXITED(st)) return 1000;
    return WEXITSTATUS(st);
}

/* EFBIG from RLIMIT_FSIZE (SIGXFSZ ignored) with the limit at several byte positions: before
 * the length field, inside the header, inside the tensor data. */
static void fsize_limit(void) {
    void (*old)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_FSIZE, &saved) == 0);
    static const rlim_t limits[] = {0, 5, 8, 100, 4096, 200000};
    char path[600], fresh[600];
    snapshot absent = {0, NULL, 0};
    path_in(path, sizeof path, dir, "fsize.safetensors");
    path_in(fresh, sizeof fresh, dir, "fsize_new.safetensors");
    for (size_t i = 0; i < sizeof limits / sizeof limits[0]; i++) {
        char where[96];
        CHECK_STATUS(save_plain(path, 9.0f), LORA_OK);
        snapshot before = snap(path);
        struct rlimit lim = saved;
        lim.rlim_cur = limits[i];
        CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
        /* (the limit is lifted before checking: stderr may itself be a file) */
        lora_status s = save(path, 10.0f, 1, NULL, NULL, 0);
        CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);
        snprintf(where, sizeof where, "fsize %llu/existing", (unsigned long long)limits[i]);
        after_failure(where, s, ((const lora_status[]){LORA_E_IO, LORA_E_NOSPACE}), 2, path, &before, dir, NULL);
        CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
        s = save(fresh, 10.0f, 1, NULL, NULL, 0);
        CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);
        snprintf(where, sizeof where, "fsize %llu/new", (unsigned long long)limits[i]);
        after_failure(where, s, ((const lora_status[]){LORA_E_IO, LORA_E_NOSPACE}), 2, fresh, &absent, dir, NULL);
        check_loadable(where, path, 9.0f, 0);
        snap_free(&before);
    }
    /* with the limit lifted the same save works */
    CHECK_STATUS(save(path, 10.0f, 1, NULL, NULL, 0), LORA_OK);
    check_loadable("fsize/after", path, 10.0f, 1);
    CHECK(unlink(path) == 0);
    signal(SIGXFSZ, old);
}

/* ---- 4. invalid strings and names --------------------------------------------------------- */
static void bad_strings(void) {
    char path[600], fresh[600];
    snapshot absent = {0, NULL, 0};
    path_in(path, sizeof path, dir, "strings.safetensors");
    path_in(fresh, sizeof fresh, dir, "strings_new.safetensors");
    CHECK_STATUS(save_plain(path, 11.0f), LORA_OK);
    snapshot before = snap(path);

    static const char *const bad[] = {"\xff", "abc\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "trunc\xe2\x82",
                                      "\xc3\x28"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char where[96];
        const char *k[2] = {"ss_output_name", "ss_comment"};
        const char *v[2] = {"fine", bad[i]};
        snprintf(where, sizeof where, "utf8 value %zu/existing", i);
        after_failure(where, save(path, 12.0f, 0, k, v, 2), ONE(LORA_E_INVALID_ARG), path, &before, dir, NULL);
        snprintf(where, sizeof where, "utf8 value %zu/new", i);
        after_failure(where, save(fresh, 12.0f, 0, k, v, 2), ONE(LORA_E_INVALID_ARG), fresh, &absent, dir, NULL);
        const char *k2[1] = {bad[i]};
        const char *v2[1] = {"x"};
        snprintf(where, sizeof where, "utf8 key %zu", i);
        after_failure(where, save(fresh, 12.0f, 0, k2, v2, 1), ONE(LORA_E_INVALID_ARG), fresh, &absent, dir, NULL);
        static const int64_t sh[1] = {1};
        static const float one = 1.0f;
        struct st_write_tensor t[1] = {{bad[i], LORA_DTYPE_F32, 1, sh, &one}};
        snprintf(where, sizeof where, "utf8 tensor name %zu", i);
        after_failure(where, st_write(ctx, fresh, t, 1, NULL, NULL, 0), ONE(LORA_E_INVALID_ARG), fresh, &absent, dir,
                      NULL);
    }

    /* duplicate names (S2: the reader would reject the file) */
    {
        static const int64_t sh[1] = {1};
        static const float one = 1.0f;
        struct st_write_tensor t[2] = {{"same", LORA_DTYPE_F32, 1, sh, &one}, {"same", LORA_DTYPE_F32, 1, sh, &one}};
        after_failure("dup tensor", st_write(ctx, fresh, t, 2, NULL, NULL, 0), ONE(LORA_E_ST_DUPLICATE_KEY), fresh,
                      &absent, dir, NULL);
        const char *k[2] = {"ss_seed", "ss_seed"};
        const char *v[2] = {"1", "2"};
        after_failure("dup metadata", save(fresh, 1.0f, 0, k, v, 2), ONE(LORA_E_ST_DUPLICATE_KEY), fresh, &absent, dir,
                      NULL);
        /* "__metadata__" is not a tensor name (S4): the file would be unreadable */
        struct st_write_tensor m[1] = {{"__metadata__", LORA_DTYPE_F32, 1, sh, &one}};
        lora_status s = st_write(ctx, fresh, m, 1, NULL, NULL, 0);
        CHECK_MSG(s != LORA_OK, "tensor named __metadata__ was written");
        snapshot now = snap(fresh);
        CHECK(!now.exists);
        snap_free(&now);
        const char *k1[1] = {"format"};
        const char *v1[1] = {"pt"};
        s = st_write(ctx, fresh, m, 1, k1, v1, 1);
        CHECK_MSG(s != LORA_OK, "tensor named __metadata__ was written next to metadata");
        now = snap(fresh);
        CHECK(!now.exists);
        snap_free(&now);
        CHECK(count_tmp(dir) == 0);
    }

    snapshot after = snap(path);
    CHECK(same(&before, &after));
    snap_free(&after);
    snap_free(&before);
    check_loadable("strings/kept", path, 11.0f, 0);
    CHECK(unlink(path) == 0);
    CHECK(host_bytes() == mem_baseline);
}

/* ---- 5. a successful save: T1 mode, replaces atomically, no leftovers -------------------- */
static void good_save(void) {
    char path[600];
    path_in(path, sizeof path, dir, "good.safetensors");
    mode_t um = umask(022);
    umask(um);
    CHECK_STATUS(save_plain(path, 13.0f), LORA_OK);
    struct stat sb;
    CHECK(stat(path, &sb) == 0 && (sb.st_mode & 0777) == (0666 & ~um));
    /* overwrite an open (mapped) file: the old handle keeps its data (safetensors #762) */
    lora_file *old = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &old), LORA_OK);
    CHECK_STATUS(save_plain(path, 14.0f), LORA_OK);
    check_loadable("good/new", path, 14.0f, 0);
    if (old) {
        float v[6] = {0};
        CHECK(lora_file_read_f32(old, lora_file_find(old, "lora_unet_down.lora_up.weight"), v, 6) == LORA_OK);
        CHECK(v[5] == 13.0f * 6);
    }
    lora_file_free(old);
    CHECK(count_tmp(dir) == 0);
    CHECK(unlink(path) == 0);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_st_writer_faults");
    const char *t = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/lora_st_writer_XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    big_vals = calloc(BIG_N, sizeof *big_vals);
    mem_baseline = host_bytes();
    CHECK(mem_baseline == 0);

    good_save();
    header_too_large();
    destination_faults();
    int r = tmpfs_enospc();
    if (r < 0) printf("note: cannot mount a tmpfs in a private mount namespace here: ENOSPC case skipped\n");
    else {
        printf("tmpfs ENOSPC case ran in a private mount namespace\n");
        CHECK_MSG(r == 0, "tmpfs ENOSPC child reported %d failures", r);
    }
    fsize_limit();
    bad_strings();

    CHECK(host_bytes() == mem_baseline);
    int left = count_entries(dir);
    CHECK_MSG(left == 0, "%d entries left in %s", left, dir);
    CHECK(rmdir(dir) == 0);
    free(big_vals);
    lora_ctx_free(ctx);
    return test_finish("test_st_writer_faults");
}
