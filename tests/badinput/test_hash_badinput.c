/* lora_file_hash and the JPEG/WebP writers at the edges: missing files, folders, files that
 * are not safetensors (a zip checkpoint, a PNG, JSON without the length), truncated and tiny
 * headers, bad arguments; an over-long JPEG infotext, non-UTF-8 text, sizes and qualities out
 * of range, unknown extensions. Every case returns its status with a message naming the file,
 * and hex_out is "" after a failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "io/image_write.h"
#include "../test.h"

static char dir[] = "/tmp/lora_hash_bad_XXXXXX";

static char *put(const char *name, const void *b, size_t n) {
    char *p = test_path_join(dir, name);
    FILE *f = fopen(p, "wb");
    if (f) {
        if (n) fwrite(b, 1, n, f);
        fclose(f);
    }
    return p;
}

static void bad(lora_ctx *ctx, const char *path, int32_t kind, size_t cap, lora_status want, const char *in_msg) {
    char hex[80];
    strcpy(hex, "untouched");
    lora_status s = lora_file_hash(ctx, path, kind, cap ? hex : NULL, cap);
    CHECK_MSG(s == want, "%s kind %d: %s, want %s (%s)", path ? path : "(null)", (int)kind, lora_status_name(s),
              lora_status_name(want), lora_errmsg(ctx));
    if (cap) CHECK_MSG(hex[0] == '\0', "%s: hex_out not cleared", path ? path : "(null)");
    if (in_msg) CHECK_MSG(strstr(lora_errmsg(ctx), in_msg) != NULL, "message \"%s\" lacks \"%s\"", lora_errmsg(ctx),
                          in_msg);
}

int main(void) {
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    if (!mkdtemp(dir)) return 1;

    /* files */
    char *missing = test_path_join(dir, "nope.safetensors");
    bad(ctx, missing, LORA_HASH_SHA256, 65, LORA_E_NOT_FOUND, "nope.safetensors");
    bad(ctx, missing, LORA_HASH_ADDNET, 65, LORA_E_NOT_FOUND, "nope.safetensors");
    bad(ctx, missing, LORA_HASH_LEGACY, 9, LORA_E_NOT_FOUND, "nope.safetensors");
    bad(ctx, dir, LORA_HASH_SHA256, 65, LORA_E_IO, "not a regular file");

    /* not safetensors, for the addnet hash (the whole-file hash still works on them) */
    const uint8_t zip[] = {'P', 'K', 3, 4, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    char *zp = put("model.ckpt", zip, sizeof zip);
    bad(ctx, zp, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_LENGTH, "model.ckpt");
    char hex[65];
    CHECK_STATUS(lora_file_hash(ctx, zp, LORA_HASH_SHA256, hex, sizeof hex), LORA_OK);
    const uint8_t png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    char *pp = put("image.safetensors", png, sizeof png);
    bad(ctx, pp, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_LENGTH, "image.safetensors");
    /* a small length whose header is not JSON */
    const uint8_t notjson[] = {4, 0, 0, 0, 0, 0, 0, 0, 'a', 'b', 'c', 'd', 1, 2};
    char *np = put("notjson.safetensors", notjson, sizeof notjson);
    bad(ctx, np, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_JSON, "notjson.safetensors");
    /* truncated: the header length runs past the end */
    const char *hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    uint8_t trunc[80];
    uint64_t hl = strlen(hdr);
    for (int i = 0; i < 8; i++) trunc[i] = (uint8_t)(hl >> (8 * i));
    memcpy(trunc + 8, hdr, 20);   /* cut inside the header */
    char *tp = put("trunc.safetensors", trunc, 28);
    bad(ctx, tp, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_LENGTH, "runs past the end");
    /* shorter than the 8-byte length; empty */
    char *sp = put("short.safetensors", "\x05\0\0", 3);
    bad(ctx, sp, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_TOO_SMALL, "short.safetensors");
    char *ep = put("empty.safetensors", "", 0);
    bad(ctx, ep, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_TOO_SMALL, "empty.safetensors");
    /* an all-ones length (overflow of 8 + n must not wrap) */
    const uint8_t huge[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
    char *hp = put("huge.safetensors", huge, sizeof huge);
    bad(ctx, hp, LORA_HASH_ADDNET, 65, LORA_E_ST_HEADER_LENGTH, "huge.safetensors");

    /* arguments */
    bad(ctx, NULL, LORA_HASH_SHA256, 65, LORA_E_INVALID_ARG, NULL);
    bad(ctx, zp, LORA_HASH_SHA256, 0, LORA_E_INVALID_ARG, NULL);        /* hex_out NULL */
    bad(ctx, zp, 0, 65, LORA_E_INVALID_ARG, "kind");
    bad(ctx, zp, 4, 65, LORA_E_INVALID_ARG, "kind");
    bad(ctx, zp, LORA_HASH_SHA256, 64, LORA_E_INVALID_ARG, "needs 65");
    bad(ctx, zp, LORA_HASH_LEGACY, 8, LORA_E_INVALID_ARG, "needs 9");
    CHECK_STATUS(lora_file_hash(NULL, zp, LORA_HASH_SHA256, hex, sizeof hex), LORA_E_INVALID_ARG);

    /* image output */
    static uint8_t rgb[16 * 16 * 3];
    uint8_t *out = NULL;
    size_t n = 0;
    size_t long_n = 40000;   /* 80,000 bytes of UTF-16: more than one APP1 segment */
    char *longtxt = malloc(long_n + 1);
    memset(longtxt, 'a', long_n);
    longtxt[long_n] = 0;
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 3, longtxt, 80, &out, &n), LORA_E_LIMIT);
    CHECK(out == NULL && strstr(lora_errmsg(ctx), "APP1"));
    CHECK_STATUS(img_webp_encode(ctx, rgb, 16, 16, 3, longtxt, 80, 0, &out, &n), LORA_OK);   /* WebP: no cap */
    lora_free(ctx, out);
    out = NULL;
    /* 32,000 characters still fit a JPEG (8 + 64,000 + 46 bytes) */
    longtxt[32000] = 0;
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 3, longtxt, 80, &out, &n), LORA_OK);
    lora_free(ctx, out);
    out = NULL;
    free(longtxt);
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 3, "bad \xff utf8", 80, &out, &n), LORA_E_CAPTION_ENCODING);
    CHECK_STATUS(img_webp_encode(ctx, rgb, 16, 16, 3, "bad \xc3", 80, 0, &out, &n), LORA_E_CAPTION_ENCODING);
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 3, NULL, 0, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 3, NULL, 101, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_webp_encode(ctx, rgb, 16, 16, 3, NULL, 101, 0, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 0, 16, 3, NULL, 80, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_jpeg_encode(ctx, rgb, 16, 16, 2, NULL, 80, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_jpeg_encode(ctx, NULL, 16, 16, 3, NULL, 80, &out, &n), LORA_E_INVALID_ARG);
    CHECK_STATUS(img_webp_encode(ctx, rgb, 16384, 1, 3, NULL, 80, 0, &out, &n), LORA_E_INVALID_ARG);
    CHECK(out == NULL);
    char *gif = test_path_join(dir, "out.gif");
    struct img_text t = {"parameters", "x"};
    CHECK_STATUS(img_write_image(ctx, gif, rgb, 16, 16, 3, &t, 1, 80, 0), LORA_E_INVALID_ARG);
    CHECK(strstr(lora_errmsg(ctx), "out.gif") != NULL);
    struct stat sb;
    CHECK(stat(gif, &sb) != 0);
    /* a folder that does not exist: an I/O status naming the path, nothing written */
    char *nodir = test_path_join(dir, "no/such/dir/x.jpg");
    lora_status s = img_write_image(ctx, nodir, rgb, 16, 16, 3, &t, 1, 80, 0);
    CHECK_MSG(s == LORA_E_NOT_FOUND || s == LORA_E_IO, "%s", lora_status_name(s));

    const char *files[] = {"model.ckpt", "image.safetensors", "notjson.safetensors", "trunc.safetensors",
                           "short.safetensors", "empty.safetensors", "huge.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char *p = test_path_join(dir, files[i]);
        unlink(p);
        free(p);
    }
    rmdir(dir);
    free(missing); free(zp); free(pp); free(np); free(tp); free(sp); free(ep); free(hp); free(gif); free(nodir);
    lora_ctx_free(ctx);
    return test_finish("test_hash_badinput");
}
