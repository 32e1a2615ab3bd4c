/* JPEG / WebP output (io/image_write.c):
 *  - the EXIF block equals, byte for byte, what A1111 inserts: piexif.dump of the UserComment
 *    (tests/data/imgout/exif.json from tests/reference/make_imgout_fixtures.py), for an
 *    infotext, non-Latin text with a character beyond U+FFFF, and one character;
 *  - the JPEG is SOI + that APP1 (piexif.insert's place), the WebP an extended RIFF with a
 *    VP8X (EXIF flag, canvas size) and an EXIF chunk holding the TIFF bytes, sizes consistent;
 *  - pixels round-trip through our decoder (io/image_read.c, libjpeg/libwebp): lossless WebP
 *    exact, JPEG q95 and lossy WebP q90 within the tolerances below; RGBA encodes as its RGB;
 *  - img_write_image picks the format by extension (PNG keeps text chunks).
 * With a directory argument it also leaves text<i>.jpg / .webp / .lossless.webp there for
 * `make_imgout_fixtures.py --check DIR`, whose result (A1111's reader) is committed as
 * tests/reference/a1111_reads_ours.json. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "io/image_read.h"
#include "io/image_write.h"
#include "../test.h"

#define W 67
#define H 45

static lora_ctx *ctx;

static uint8_t *unhex(const char *h, size_t *n) {
    size_t l = strlen(h) / 2;
    uint8_t *b = malloc(l ? l : 1);
    for (size_t i = 0; i < l; i++) {
        unsigned v = 0;
        sscanf(h + 2 * i, "%2x", &v);
        b[i] = (uint8_t)v;
    }
    *n = l;
    return b;
}

static uint32_t le32(const uint8_t *p) { return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* smooth gradients plus a soft texture: a photo-like image JPEG handles well */
static void make_image(uint8_t *rgb, uint8_t *rgba) {
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int r = x * 255 / (W - 1), g = y * 255 / (H - 1), b = 128 + ((x * 7 + y * 5) % 32) - 16;
            uint8_t *p = rgb + (y * W + x) * 3, *q = rgba + (y * W + x) * 4;
            p[0] = q[0] = (uint8_t)r;
            p[1] = q[1] = (uint8_t)g;
            p[2] = q[2] = (uint8_t)b;
            q[3] = (uint8_t)(x + y);
        }
}

/* decodes and compares with rgb: max and mean absolute error */
static void roundtrip(const char *what, const uint8_t *buf, size_t n, const uint8_t *rgb, int max_tol,
                      double mean_tol) {
    struct img_limits lim;
    img_limits_default(&lim);
    struct img_rgb8 im;
    memset(&im, 0, sizeof im);
    CHECK_STATUS(img_decode_rgb8(ctx, what, buf, n, &lim, &im), LORA_OK);
    CHECK_MSG(im.width == W && im.height == H, "%s: decoded %dx%d", what, im.width, im.height);
    if (!im.data || im.width != W || im.height != H) return;
    int maxd = 0;
    double sum = 0;
    for (size_t i = 0; i < (size_t)W * H * 3; i++) {
        int d = abs((int)im.data[i] - (int)rgb[i]);
        if (d > maxd) maxd = d;
        sum += d;
    }
    double mean = sum / (W * H * 3);
    printf("%s: max |diff| %d, mean %.3f\n", what, maxd, mean);
    CHECK_MSG(maxd <= max_tol && mean <= mean_tol, "%s: max %d (tol %d), mean %.3f (tol %.3f)", what, maxd, max_tol,
              mean, mean_tol);
    img_free(ctx, &im);
}

/* the WebP chunk list: VP8X first with the EXIF flag and canvas, then the image chunk, then
 * EXIF with `tiff`; the RIFF size covers the file */
static void check_webp(const char *what, const uint8_t *b, size_t n, const uint8_t *tiff, size_t tiff_len) {
    CHECK_MSG(n > 30 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WEBP", 4) == 0 && le32(b + 4) == n - 8,
              "%s: RIFF header", what);
    if (n <= 30) return;
    CHECK_MSG(memcmp(b + 12, "VP8X", 4) == 0 && le32(b + 16) == 10 && b[20] == 0x08, "%s: VP8X", what);
    uint32_t cw = 1 + (b[24] | (uint32_t)b[25] << 8 | (uint32_t)b[26] << 16);
    uint32_t ch = 1 + (b[27] | (uint32_t)b[28] << 8 | (uint32_t)b[29] << 16);
    CHECK_MSG(cw == W && ch == H, "%s: canvas %ux%u", what, cw, ch);
    size_t pos = 30;
    int seen_img = 0, seen_exif = 0;
    while (pos + 8 <= n) {
        uint32_t len = le32(b + pos + 4);
        if (pos + 8 + len > n) break;
        if (!memcmp(b + pos, "VP8 ", 4) || !memcmp(b + pos, "VP8L", 4)) seen_img++;
        if (!memcmp(b + pos, "EXIF", 4)) {
            seen_exif++;
            CHECK_MSG(seen_img == 1 && len == tiff_len && memcmp(b + pos + 8, tiff, tiff_len) == 0,
                      "%s: EXIF chunk differs from piexif's TIFF bytes", what);
        }
        pos += 8 + len + (len & 1);
    }
    CHECK_MSG(pos == n && seen_img == 1 && seen_exif == 1, "%s: chunks end at %zu of %zu (%d image, %d EXIF)",
              what, pos, n, seen_img, seen_exif);
}

int main(int argc, char **argv) {
    const char *data = getenv("LORA_TEST_DATA");
    const char *keep = argc > 1 ? argv[1] : NULL;
    if (!data) { fprintf(stderr, "LORA_TEST_DATA not set\n"); return 1; }
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    char *jp = test_path_join(data, "imgout/exif.json");
    json_error_t je;
    json_t *root = json_load_file(jp, 0, &je);
    CHECK_MSG(root != NULL, "%s: %s", jp, je.text);
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) == 3);
    static uint8_t rgb[W * H * 3], rgba[W * H * 4];
    make_image(rgb, rgba);

    size_t ci;
    json_t *c;
    json_array_foreach(cases, ci, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        size_t want_len = 0;
        uint8_t *want = unhex(json_string_value(json_object_get(c, "piexif_dump_hex")), &want_len);
        char what[64];

        /* the EXIF block */
        uint8_t *exif = NULL;
        size_t exif_len = 0;
        CHECK_STATUS(img_exif_user_comment(ctx, text, &exif, &exif_len), LORA_OK);
        CHECK_MSG(exif_len == want_len && exif && memcmp(exif, want, want_len) == 0,
                  "case %zu: EXIF (%zu bytes) differs from piexif.dump (%zu bytes)", ci, exif_len, want_len);
        lora_free(ctx, exif);

        /* JPEG: SOI, then the APP1 piexif.insert puts there */
        uint8_t *buf = NULL;
        size_t n = 0;
        snprintf(what, sizeof what, "case %zu JPEG q95", ci);
        CHECK_STATUS(img_jpeg_encode(ctx, rgb, W, H, 3, text, 95, &buf, &n), LORA_OK);
        CHECK_MSG(n > 4 + want_len && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF && buf[3] == 0xE1 &&
                      (size_t)(buf[4] << 8 | buf[5]) == want_len + 2 && memcmp(buf + 6, want, want_len) == 0,
                  "%s: no piexif APP1 right after SOI", what);
        if (buf) roundtrip(what, buf, n, rgb, 32, 4.0);   /* 4:2:0 on a sawtooth texture */
        /* RGBA is written as its RGB: the same file */
        uint8_t *buf4 = NULL;
        size_t n4 = 0;
        CHECK_STATUS(img_jpeg_encode(ctx, rgba, W, H, 4, text, 95, &buf4, &n4), LORA_OK);
        CHECK(buf4 && n4 == n && memcmp(buf4, buf, n) == 0);
        lora_free(ctx, buf4);
        lora_free(ctx, buf);

        /* WebP lossless: exact pixels; lossy q90: close */
        snprintf(what, sizeof what, "case %zu WebP lossless", ci);
        CHECK_STATUS(img_webp_encode(ctx, rgb, W, H, 3, text, 80, 1, &buf, &n), LORA_OK);
        if (buf) {
            check_webp(what, buf, n, want + 6, want_len - 6);
            roundtrip(what, buf, n, rgb, 0, 0.0);
        }
        lora_free(ctx, buf);
        snprintf(what, sizeof what, "case %zu WebP q90", ci);
        CHECK_STATUS(img_webp_encode(ctx, rgba, W, H, 4, text, 90, 0, &buf, &n), LORA_OK);
        if (buf) {
            check_webp(what, buf, n, want + 6, want_len - 6);
            roundtrip(what, buf, n, rgb, 40, 5.0);
        }
        lora_free(ctx, buf);

        /* files by extension, left for the A1111 reader check when asked */
        if (keep) {
            const char *ext[3] = {"jpg", "webp", "lossless.webp"};
            for (int e = 0; e < 3; e++) {
                char name[64];
                snprintf(name, sizeof name, "text%zu.%s", ci, ext[e]);
                char *p = test_path_join(keep, name);
                struct img_text t = {"parameters", text};
                CHECK_STATUS(img_write_image(ctx, p, rgb, W, H, 3, &t, 1, 95, e == 2), LORA_OK);
                free(p);
            }
        }
        free(want);
    }

    /* by extension: .PNG keeps its text chunks; .Jpeg and .webp carry the EXIF; no EXIF without
     * a "parameters" text */
    {
        char dir[] = "/tmp/lora_imgout_XXXXXX";
        CHECK(mkdtemp(dir) != NULL);
        struct img_text t[2] = {{"seed", "42"}, {"parameters", "p\u00e9"}};
        const char *names[4] = {"a.PNG", "b.Jpeg", "c.webp", "d.jpg"};
        for (int k = 0; k < 4; k++) {
            char *p = test_path_join(dir, names[k]);
            CHECK_STATUS(img_write_image(ctx, p, rgb, W, H, 3, k == 3 ? t : t, k == 3 ? 1 : 2, 80, 0), LORA_OK);
            size_t n = 0;
            uint8_t *b = test_slurp(p, &n);
            CHECK(b != NULL);
            if (b && k == 0) CHECK(img_sniff(b, n) == IMG_FMT_PNG && memmem(b, n, "tEXtparameters", 14) &&
                                   memmem(b, n, "tEXtseed", 8));
            if (b && k == 1) CHECK(img_sniff(b, n) == IMG_FMT_JPEG && b[3] == 0xE1 && memmem(b, n, "UNICODE", 7));
            if (b && k == 2) CHECK(img_sniff(b, n) == IMG_FMT_WEBP && memmem(b, n, "EXIF", 4));
            if (b && k == 3) CHECK(img_sniff(b, n) == IMG_FMT_JPEG && b[3] == 0xE0 && !memmem(b, n, "Exif", 4));
            free(b);
            unlink(p);
            free(p);
        }
        rmdir(dir);
        CHECK(img_out_format("x/y.JPG") == IMG_OUT_JPEG && img_out_format("y.jpeg") == IMG_OUT_JPEG &&
              img_out_format("a.b/c") == IMG_OUT_UNKNOWN && img_out_format("c.gif") == IMG_OUT_UNKNOWN &&
              img_out_format("noext") == IMG_OUT_UNKNOWN);
    }

    json_decref(root);
    free(jp);
    lora_ctx_free(ctx);
    return test_finish("test_image_write");
}
