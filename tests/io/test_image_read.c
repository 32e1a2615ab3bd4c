/* Image decoding vs Pillow: every fixture in tests/data/dataset/img that Pillow reads is decoded
 * and compared with ImageOps.exif_transpose(Image.open(p)).convert("RGB") from
 * decoded.safetensors (written by tests/reference/make_dataset_fixtures.py). The header-only
 * probe must report the same (oriented) size. */
#include "../test.h"
#include "../ref_file.h"
#include "io/image_read.h"

static lora_ctx *ctx;

static void check_one(const char *dir, const struct lora_file *ref, int64_t t) {
    const char *name = ref->tensors[t].name;
    char *path = test_path_join(dir, name);
    struct img_limits lim;
    img_limits_default(&lim);
    struct img_rgb8 im;
    lora_status s = img_load_rgb8(ctx, path, &lim, &im);
    CHECK_MSG(s == LORA_OK, "%s: %s", name, lora_errmsg(ctx));
    if (s != LORA_OK) { free(path); return; }
    int64_t h = ref->tensors[t].shape[0], w = ref->tensors[t].shape[1];
    CHECK_MSG(im.width == w && im.height == h, "%s: %dx%d, Pillow %lldx%lld", name, im.width, im.height, (long long)w, (long long)h);
    if (im.width == w && im.height == h) {
        const uint8_t *want = st_data(ref, t);
        int64_t n = w * h * 3, diff = 0, maxd = 0;
        for (int64_t i = 0; i < n; i++) {
            int d = abs((int)im.data[i] - (int)want[i]);
            if (d) diff++;
            if (d > maxd) maxd = d;
        }
        CHECK_MSG(diff == 0, "%s: %lld of %lld bytes differ from Pillow (max %lld)", name, (long long)diff, (long long)n, (long long)maxd);
    }
    int32_t pw = 0, ph = 0;
    CHECK_STATUS(img_probe(ctx, path, &lim, &pw, &ph), LORA_OK);
    CHECK_MSG(pw == w && ph == h, "%s: probe %dx%d", name, pw, ph);
    img_free(ctx, &im);
    free(path);
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) { fprintf(stderr, "LORA_TEST_DATA not set\n"); return 1; }
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    char *dsdir = test_path_join(data, "dataset");
    char *imgdir = test_path_join(dsdir, "img");
    char *refp = test_path_join(dsdir, "decoded.safetensors");
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, refp, &ref), LORA_OK);
    int seen_orient = 0, seen_webp = 0, seen_16 = 0;
    for (int64_t t = 0; ref && t < ref->n_tensors; t++) {
        check_one(imgdir, ref, t);
        seen_orient += strncmp(ref->tensors[t].name, "orient", 6) == 0;
        seen_webp += strstr(ref->tensors[t].name, ".webp") != NULL;
        seen_16 += strstr(ref->tensors[t].name, "16") != NULL;
    }
    CHECK(seen_orient == 9);   /* JPEG orientations 1..8 and a PNG eXIf */
    CHECK(seen_webp == 3);
    CHECK(seen_16 == 2);

    /* Orientation off: the stored pixels, rotated sizes not applied. */
    {
        char *p = test_path_join(imgdir, "orient6.jpg");
        struct img_limits lim;
        img_limits_default(&lim);
        lim.apply_orientation = 0;
        int32_t w, h;
        CHECK_STATUS(img_probe(ctx, p, &lim, &w, &h), LORA_OK);
        CHECK(w == 12 && h == 7);
        lim.apply_orientation = 1;
        CHECK_STATUS(img_probe(ctx, p, &lim, &w, &h), LORA_OK);
        CHECK(w == 7 && h == 12);
        free(p);
    }
    /* EXIF parser on a hand-made big-endian block: orientation 3 as SHORT. */
    {
        const uint8_t mm[] = { 'E', 'x', 'i', 'f', 0, 0, 'M', 'M', 0, 42, 0, 0, 0, 8, 0, 1,
                               0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0 };
        CHECK(img_exif_orientation(mm, sizeof mm) == 3);
        CHECK(img_exif_orientation(mm, 20) == 1);          /* entry cut off: ignored */
        CHECK(img_exif_orientation(NULL, 0) == 1);
    }
    /* Limits: a valid 13x9 PNG refused under a 100-pixel cap, before decoding. */
    {
        char *p = test_path_join(imgdir, "rgb.png");
        struct img_limits lim;
        img_limits_default(&lim);
        lim.max_pixels = 100;
        struct img_rgb8 im;
        CHECK_STATUS(img_load_rgb8(ctx, p, &lim, &im), LORA_E_IMG_TOO_LARGE);
        CHECK(strstr(lora_errmsg(ctx), "rgb.png") != NULL);
        CHECK(im.data == NULL);
        lim.max_pixels = 0;
        lim.max_side = 12;
        CHECK_STATUS(img_load_rgb8(ctx, p, &lim, &im), LORA_E_IMG_TOO_LARGE);
        free(p);
    }
    st_close(ref);
    free(refp); free(imgdir); free(dsdir);
    lora_ctx_free(ctx);
    return test_finish("test_image_read");
}
