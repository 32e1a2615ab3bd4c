/* Bad images and captions (spec/safety.md §4.1, §4.3, table rows 21-22): each gives the
 * documented status with the file named in the message, never a crash; in a dataset the
 * DS_BAD_SKIP policy skips exactly those files (reported by name) and DS_BAD_REFUSE fails. */
#include <sys/stat.h>
#include <unistd.h>

#include "../test.h"
#include "io/image_read.h"
#include "train/dataset.h"

static lora_ctx *ctx;
static const char *imgdir;

static void expect_image(const char *name, lora_status want) {
    char *p = test_path_join(imgdir, name);
    struct img_limits lim;
    img_limits_default(&lim);
    struct img_rgb8 im;
    lora_status s = img_load_rgb8(ctx, p, &lim, &im);
    CHECK_MSG(s == want, "%s: %s (%s), want %s", name, lora_status_name(s), lora_errmsg(ctx), lora_status_name(want));
    if (s != LORA_OK) {
        CHECK_MSG(strstr(lora_errmsg(ctx), name) != NULL, "%s: message does not name the file: %s", name, lora_errmsg(ctx));
        CHECK(im.data == NULL);
    }
    img_free(ctx, &im);
    free(p);
}

static void write_file(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (f) { if (n) fwrite(b, 1, n, f); fclose(f); }
}

static void copy_image(const char *from_name, const char *to) {
    char *p = test_path_join(imgdir, from_name);
    size_t n = 0;
    uint8_t *b = test_slurp(p, &n);
    write_file(to, b, n);
    free(b);
    free(p);
}

/* Allocation-failure injection: the N-th allocation fails, for every N until all succeeds. */
struct fail_alloc { int64_t calls, fail_at; };
static void *fa_alloc(void *user, size_t size, size_t align) {
    struct fail_alloc *fa = user;
    if (fa->calls++ == fa->fail_at) return NULL;
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
}
static void fa_free(void *user, void *p) { (void)user; free(p); }

static void test_alloc_faults(const char *dsdir) {
    struct fail_alloc fa = { 0, -1 };
    lora_ctx *c = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &c), LORA_OK);
    CHECK_STATUS(lora_ctx_set_allocator(c, fa_alloc, fa_free, &fa), LORA_OK);
    char *train = test_path_join(dsdir, "tree/train"), *reg = test_path_join(dsdir, "tree/reg");
    struct ds_opts o;
    ds_opts_default(&o);
    o.train_data_dir = train;
    o.reg_data_dir = reg;
    o.width = o.height = 64;
    o.enable_bucket = 1;
    o.min_bucket_reso = 32;
    o.max_bucket_reso = 128;
    o.bucket_reso_steps = 16;
    o.shuffle_caption = 1;
    o.flip_aug = 1;
    o.batch_size = 2;
    int done = 0, wrong = 0, leaks = 0;
    for (int64_t n = 0; n < 100000 && !done; n++) {
        fa.calls = 0;
        fa.fail_at = n;
        struct lora_dataset *d = NULL;
        lora_status s = ds_open(&d, c, &o);
        char *js = NULL;
        struct ds_batch bt;
        for (int64_t i = 0; s == LORA_OK && i < 3; i++) s = ds_batch(d, 1, i, &bt);
        if (s == LORA_OK) { s = ds_tag_frequency_json(d, &js); lora_free(c, js); js = NULL; }
        if (s == LORA_OK) { s = ds_dataset_dirs_json(d, "train", &js); lora_free(c, js); js = NULL; }
        if (s == LORA_OK) { s = ds_bucket_info_json(d, &js); lora_free(c, js); js = NULL; }
        ds_free(d);
        if (s == LORA_OK) { done = 1; fprintf(stderr, "alloc faults: all %lld allocation points fail cleanly\n", (long long)n); }
        else if (s != LORA_E_NOMEM) { if (!wrong) fprintf(stderr, "fail at %lld: %s %s\n", (long long)n, lora_status_name(s), lora_errmsg(c)); wrong++; }
        uint64_t host = 1;
        lora_ctx_memory(c, &host, NULL, NULL, NULL);
        if (host != 0) leaks++;
    }
    CHECK(done);
    CHECK_MSG(wrong == 0, "%d injected failures gave another status than LORA_E_NOMEM", wrong);
    CHECK_MSG(leaks == 0, "%d injected failures leaked host memory", leaks);
    free(train);
    free(reg);
    lora_ctx_free(c);
}

struct bad_caption { const char *stem; const char *bytes; size_t n; lora_status want; };

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) { fprintf(stderr, "LORA_TEST_DATA not set\n"); return 1; }
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    char *ds = test_path_join(data, "dataset");
    char *id = test_path_join(ds, "img");
    imgdir = id;

    /* images */
    expect_image("truncated.png", LORA_E_IMG_DECODE);
    expect_image("zero.png", LORA_E_IMG_DECODE);
    expect_image("huge.png", LORA_E_IMG_TOO_LARGE);   /* 100000x100000: refused from the header */
    expect_image("badcrc.png", LORA_E_IMG_DECODE);
    expect_image("notimage.png", LORA_E_IMG_UNSUPPORTED);
    expect_image("cmyk.jpg", LORA_E_IMG_UNSUPPORTED);
    expect_image("truncated.jpg", LORA_E_IMG_DECODE);
    expect_image("missing.png", LORA_E_NOT_FOUND);
    /* exotic but valid: decode to RGB8 (pixels checked against Pillow in io/test_image_read) */
    expect_image("gray16.png", LORA_OK);
    expect_image("rgb16.png", LORA_OK);
    expect_image("gray_alpha.png", LORA_OK);
    expect_image("palette_trns.png", LORA_OK);
    /* every prefix of a valid PNG and JPEG: an error status, never a crash */
    const char *prefix_files[] = { "rgb.png", "rgb.jpg", "lossy.webp", "rgb.bmp" };
    for (int k = 0; k < 4; k++) {
        char *p = test_path_join(imgdir, prefix_files[k]);
        size_t n = 0;
        uint8_t *b = test_slurp(p, &n);
        int ok_prefix = 0;
        struct img_limits lim;
        img_limits_default(&lim);
        for (size_t m = 0; b && m < n; m++) {
            struct img_rgb8 im;
            lora_status s = img_decode_rgb8(ctx, prefix_files[k], b, m, &lim, &im);
            if (s == LORA_OK) { ok_prefix++; img_free(ctx, &im); }
            else if (!strstr(lora_errmsg(ctx), prefix_files[k])) { CHECK_MSG(0, "%s prefix %zu: %s", prefix_files[k], m, lora_errmsg(ctx)); break; }
        }
        /* only JPEG may decode a prefix that lacks nothing but its EOI marker */
        CHECK_MSG(ok_prefix <= 2, "%s: %d truncated prefixes decoded", prefix_files[k], ok_prefix);
        free(b);
        free(p);
    }

    /* random byte corruption (fixed LCG): a status, never a crash; ASan builds check memory */
    const char *fuzz_files[] = { "rgb.png", "interlaced.png", "palette_trns.png", "rgb.jpg", "progressive.jpg",
                                 "orient6.jpg", "lossy.webp", "lossless.webp", "rgb.bmp" };
    uint64_t lcg = 12345;
    for (int k = 0; k < 9; k++) {
        char *p = test_path_join(imgdir, fuzz_files[k]);
        size_t n = 0;
        uint8_t *orig = test_slurp(p, &n);
        uint8_t *b = malloc(n ? n : 1);
        int bad_status = 0;
        for (int it = 0; orig && it < 300; it++) {
            memcpy(b, orig, n);
            int flips = 1 + it % 4;
            for (int q = 0; q < flips; q++) {
                lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
                size_t at = (size_t)(lcg >> 33) % n;
                b[at] ^= (uint8_t)(1u << ((lcg >> 20) & 7));
            }
            struct img_limits lim;
            img_limits_default(&lim);
            struct img_rgb8 im;
            lora_status st = img_decode_rgb8(ctx, fuzz_files[k], b, n, &lim, &im);
            if (st == LORA_OK) img_free(ctx, &im);
            else if (st != LORA_E_IMG_DECODE && st != LORA_E_IMG_TOO_LARGE && st != LORA_E_IMG_UNSUPPORTED) bad_status++;
        }
        CHECK_MSG(bad_status == 0, "%s: %d mutations gave an unexpected status", fuzz_files[k], bad_status);
        free(b);
        free(orig);
        free(p);
    }

    test_alloc_faults(ds);

    /* dataset with bad files */
    char tmpl[] = "/tmp/lora_ds_bad_XXXXXX";
    char *root = mkdtemp(tmpl);
    CHECK(root != NULL);
    if (!root) return test_finish("test_image_badinput");
    char *train = test_path_join(root, "train");
    mkdir(train, 0755);
    char *dir = test_path_join(train, "1_thing");
    mkdir(dir, 0755);
    char *src64 = test_path_join(ds, "tree/train/3_sks dog/a.png");
    size_t n64 = 0;
    uint8_t *png64 = test_slurp(src64, &n64);
    char mlong[64];
    static char big[(1 << 20) + 8];
    memset(big, 'x', sizeof big - 1);
    struct bad_caption caps[] = {
        { "cap_bom", "\xEF\xBB\xBF" "bom tag, other", 17, LORA_OK },
        { "cap_crlf", "first, line\r\nsecond", 19, LORA_OK },
        { "cap_blankline", "\n", 1, LORA_OK },
        { "cap_empty", "", 0, LORA_E_CAPTION_ENCODING },
        { "cap_badutf8", "ok \xC0\x80 overlong", 14, LORA_E_CAPTION_ENCODING },
        { "cap_surrogate", "\xED\xA0\x80", 3, LORA_E_CAPTION_ENCODING },
        { "cap_utf16", "\xFF\xFE" "a\0b\0", 6, LORA_E_CAPTION_ENCODING },
        { "cap_nul", "a\0b", 3, LORA_E_CAPTION_ENCODING },
        { "cap_long", big, sizeof big - 1, LORA_E_CAPTION_TOO_LONG },
    };
    int n_caps = (int)(sizeof caps / sizeof caps[0]);
    int n_bad_caps = 0;
    for (int i = 0; i < n_caps; i++) {
        char name[96];
        snprintf(name, sizeof name, "%s/%s.png", dir, caps[i].stem);
        write_file(name, png64, n64);
        snprintf(name, sizeof name, "%s/%s.caption", dir, caps[i].stem);
        write_file(name, caps[i].bytes, caps[i].n);
        n_bad_caps += caps[i].want != LORA_OK;
    }
    (void)mlong;
    char path[512];
    snprintf(path, sizeof path, "%s/good.png", dir);
    write_file(path, png64, n64);
    const char *bad_imgs[] = { "truncated.png", "zero.png", "huge.png", "cmyk.jpg", "notimage.png" };
    const char *bad_as[] = { "img_trunc.png", "img_zero.png", "img_huge.png", "img_cmyk.jpg", "img_html.png" };
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, bad_as[i]);
        copy_image(bad_imgs[i], path);
    }
    struct ds_opts o;
    ds_opts_default(&o);
    o.train_data_dir = train;
    o.width = o.height = 64;
    o.enable_bucket = 1;
    o.min_bucket_reso = 32;
    o.max_bucket_reso = 128;
    o.bucket_reso_steps = 16;
    struct lora_dataset *d = NULL;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_OK);
    if (d) {
        CHECK_MSG(ds_num_skipped(d) == n_bad_caps + 5, "%lld skipped, want %d", (long long)ds_num_skipped(d), n_bad_caps + 5);
        for (int i = 0; i < n_caps; i++) {
            if (caps[i].want == LORA_OK) continue;
            int named = 0;
            for (int64_t k = 0; k < ds_num_skipped(d); k++)
                named |= strstr(ds_skipped_message(d, k), caps[i].stem) != NULL && strstr(ds_skipped_message(d, k), ".caption") != NULL;
            CHECK_MSG(named, "%s: no skip message names its caption file", caps[i].stem);
        }
        for (int i = 0; i < 5; i++) {
            int named = 0;
            for (int64_t k = 0; k < ds_num_skipped(d); k++) named |= strstr(ds_skipped_message(d, k), bad_as[i]) != NULL;
            CHECK_MSG(named, "%s: no skip message names it", bad_as[i]);
        }
        CHECK(ds_num_images(d) == 1 + (n_caps - n_bad_caps));
        for (int64_t k = 0; k < ds_num_images(d); k++) {
            struct ds_image_info info;
            const char *p = ds_image_info(d, k, &info);
            if (strstr(p, "cap_bom")) CHECK(strcmp(info.caption, "bom tag, other") == 0);
            if (strstr(p, "cap_crlf")) CHECK(strcmp(info.caption, "first, line") == 0);
            if (strstr(p, "cap_blankline")) CHECK(strcmp(info.caption, "") == 0);
            if (strstr(p, "good")) CHECK(strcmp(info.caption, "thing") == 0);   /* folder caption */
        }
        ds_free(d);
    }
    /* refuse: the first bad file in scan order (sorted names, .png before .jpg) */
    o.bad_input = DS_BAD_REFUSE;
    d = NULL;
    lora_status s = ds_open(&d, ctx, &o);
    CHECK(s == LORA_E_CAPTION_ENCODING && d == NULL);
    CHECK_MSG(strstr(lora_errmsg(ctx), "cap_badutf8.caption") != NULL, "refuse message: %s", lora_errmsg(ctx));
    /* a truncated image alone under refuse */
    char *dir2 = test_path_join(root, "train2");
    mkdir(dir2, 0755);
    snprintf(path, sizeof path, "%s/2_x", dir2);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/2_x/t.png", dir2);
    copy_image("truncated.png", path);
    o.train_data_dir = dir2;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_IMG_DECODE);
    CHECK(strstr(lora_errmsg(ctx), "t.png") != NULL);
    /* skip: nothing usable is left -> no data, said plainly */
    o.bad_input = DS_BAD_SKIP;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_NOT_FOUND);
    CHECK(strstr(lora_errmsg(ctx), "skipped") != NULL);
    /* missing folder */
    snprintf(path, sizeof path, "%s/nope", root);
    o.train_data_dir = path;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_NOT_FOUND);
    CHECK(strstr(lora_errmsg(ctx), "nope") != NULL);
    /* pointing at the image folder itself: the message explains the layout */
    o.train_data_dir = dir;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_NOT_FOUND);
    CHECK_MSG(strstr(lora_errmsg(ctx), "<repeats>_<caption>") != NULL && strstr(lora_errmsg(ctx), "parent") != NULL,
              "%s", lora_errmsg(ctx));
    /* missing reg folder is an error too (kohya silently trains without it) */
    o.train_data_dir = train;
    snprintf(path, sizeof path, "%s/noreg", root);
    o.reg_data_dir = path;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_NOT_FOUND);
    CHECK(strstr(lora_errmsg(ctx), "reg_data_dir") != NULL);
    /* bad options */
    o.reg_data_dir = NULL;
    o.min_bucket_reso = 128;
    CHECK_STATUS(ds_open(&d, ctx, &o), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "min_bucket_reso") != NULL);

    snprintf(path, sizeof path, "rm -rf '%s'", root);
    if (system(path) != 0) fprintf(stderr, "could not remove %s\n", root);
    free(png64); free(src64); free(dir); free(dir2); free(train);
    free(id); free(ds);
    lora_ctx_free(ctx);
    return test_finish("test_image_badinput");
}
