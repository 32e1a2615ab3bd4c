/* PNG, JPEG and WebP writing into memory, then an atomic file write (see image_write.h). */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jpeglib.h>   /* needs stddef.h and stdio.h first */
#include <png.h>
#include <webp/encode.h>

#include "core/utf8.h"
#include "io/atomic_file.h"
#include "io/image_write.h"

struct png_sink {
    lora_ctx *ctx;
    uint8_t *buf;
    size_t len, cap;
    int oom;
    char err[256];
};

static void sink_write(png_structp png, png_bytep data, png_size_t n) {
    struct png_sink *s = png_get_io_ptr(png);
    if (s->oom) return;
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n) cap *= 2;
        uint8_t *b = lora_malloc(s->ctx, cap);
        if (!b) {
            s->oom = 1;
            return;
        }
        if (s->len) memcpy(b, s->buf, s->len);
        lora_free(s->ctx, s->buf);
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, data, n);
    s->len += n;
}

static void sink_flush(png_structp png) { (void)png; }

static void on_error(png_structp png, png_const_charp msg) {
    struct png_sink *s = png_get_error_ptr(png);
    snprintf(s->err, sizeof s->err, "%s", msg ? msg : "libpng error");
    png_longjmp(png, 1);
}

static void on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

/* UTF-8 -> Latin-1 when every code point is below 256 (PIL writes tEXt then); 0 otherwise. */
static int to_latin1(const char *s, char *out) {
    const uint8_t *p = (const uint8_t *)s;
    size_t k = 0;
    while (*p) {
        if (*p < 0x80) out[k++] = (char)*p++;
        else if ((*p == 0xC2 || *p == 0xC3) && (p[1] & 0xC0) == 0x80) {
            out[k++] = (char)(((p[0] & 0x03) << 6) | (p[1] & 0x3F));
            p += 2;
        } else return 0;
    }
    out[k] = '\0';
    return 1;
}

static int key_ok(const char *k) {
    size_t n = strlen(k);
    if (n < 1 || n > 79 || k[0] == ' ' || k[n - 1] == ' ') return 0;
    for (size_t i = 0; i < n; i++)
        if ((uint8_t)k[i] < 32 || (uint8_t)k[i] > 126) return 0;
    return 1;
}

/* Runs libpng; every libpng call sits between setjmp and the end of this function. */
static lora_status encode(struct png_sink *s, const uint8_t *pixels, int64_t w, int64_t h, int channels,
                          png_textp texts, int n_text) {
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, s, on_error, on_warning);
    if (!png) return LORA_E_NOMEM;
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_write_struct(&png, NULL);
        return LORA_E_NOMEM;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        return s->oom ? LORA_E_NOMEM : lora_fail(s->ctx, LORA_E_INTERNAL, "PNG encoder: %s", s->err);
    }
    png_set_write_fn(png, s, sink_write, sink_flush);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8,
                 channels == 4 ? PNG_COLOR_TYPE_RGB_ALPHA : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (n_text > 0) png_set_text(png, info, texts, n_text);
    png_write_info(png, info);
    for (int64_t y = 0; y < h; y++) png_write_row(png, (png_const_bytep)(pixels + (size_t)(y * w * channels)));
    png_write_end(png, info);
    png_destroy_write_struct(&png, &info);
    return s->oom ? LORA_E_NOMEM : LORA_OK;
}

lora_status img_png_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                           const struct img_text *text, int64_t n_text, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    if (!pixels || width < 1 || height < 1 || width > 65535 || height > 65535 || (channels != 3 && channels != 4) ||
        n_text < 0 || n_text > 64 || (n_text && !text))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "PNG: %lldx%lld with %d channels and %lld text chunks cannot be "
                         "written (sides 1..65535, 3 or 4 channels, at most 64 texts)",
                         (long long)width, (long long)height, channels, (long long)n_text);
    png_text texts[64];
    char *latin[64];
    memset(texts, 0, sizeof texts);
    memset(latin, 0, sizeof latin);
    lora_status st = LORA_OK;
    for (int64_t i = 0; i < n_text && st == LORA_OK; i++) {
        const char *k = text[i].key, *v = text[i].value ? text[i].value : "";
        size_t bad = 0;
        if (!k || !key_ok(k)) {
            st = lora_fail(ctx, LORA_E_INVALID_ARG, "PNG: text key \"%s\" is not 1..79 printable characters",
                           k ? k : "(null)");
        } else if (!utf8_valid((const uint8_t *)v, strlen(v), &bad)) {
            st = lora_fail(ctx, LORA_E_CAPTION_ENCODING, "PNG: the value of \"%s\" is not UTF-8 (byte %zu)", k, bad);
        } else if (!(latin[i] = lora_malloc(ctx, strlen(v) + 1))) {
            st = LORA_E_NOMEM;
        } else {
            texts[i].key = (png_charp)k;
            if (to_latin1(v, latin[i])) {
                texts[i].compression = PNG_TEXT_COMPRESSION_NONE;
                texts[i].text = latin[i];
                texts[i].text_length = strlen(latin[i]);
            } else {
                texts[i].compression = PNG_ITXT_COMPRESSION_NONE;
                texts[i].text = (png_charp)v;
                texts[i].itxt_length = strlen(v);
                texts[i].lang = (png_charp)"";
                texts[i].lang_key = (png_charp)"";
            }
        }
    }
    struct png_sink s;
    memset(&s, 0, sizeof s);
    s.ctx = ctx;
    if (st == LORA_OK) st = encode(&s, pixels, width, height, channels, texts, (int)n_text);
    for (int64_t i = 0; i < n_text; i++) lora_free(ctx, latin[i]);
    if (st != LORA_OK) {
        lora_free(ctx, s.buf);
        return st;
    }
    *out = s.buf;
    *out_len = s.len;
    return LORA_OK;
}

static lora_status write_whole(lora_ctx *ctx, const char *path, uint8_t *buf, size_t len) {
    struct atomic_file af;
    lora_status s = atomic_file_begin(ctx, path, &af);
    if (s == LORA_OK) {
        s = atomic_file_write(&af, buf, len);
        if (s == LORA_OK) s = atomic_file_commit(&af);
        else atomic_file_abort(&af);
    }
    lora_free(ctx, buf);
    return s;
}

lora_status img_write_png(lora_ctx *ctx, const char *path, const uint8_t *pixels, int64_t width, int64_t height,
                          int channels, const struct img_text *text, int64_t n_text) {
    uint8_t *buf = NULL;
    size_t len = 0;
    LORA_TRY(img_png_encode(ctx, pixels, width, height, channels, text, n_text, &buf, &len));
    return write_whole(ctx, path, buf, len);
}

/* ---- EXIF UserComment ---------------------------------------------------------------------- */

static void put_be16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Code points of well-formed UTF-8 (checked by the caller) as UTF-16BE, surrogate pairs above
 * U+FFFF (Python's "utf_16_be" codec). dst NULL: only counts. Returns the byte count. */
static size_t utf16be(const uint8_t *s, size_t n, uint8_t *dst) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c = s[i];
        int extra = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
        c = extra == 0 ? c : extra == 1 ? (c & 0x1F) : extra == 2 ? (c & 0x0F) : (c & 0x07);
        for (int j = 1; j <= extra; j++) c = (c << 6) | (s[i + (size_t)j] & 0x3F);
        i += (size_t)extra + 1;
        if (c >= 0x10000) {
            if (dst) {
                put_be16(dst + k, 0xD800 + ((c - 0x10000) >> 10));
                put_be16(dst + k + 2, 0xDC00 + ((c - 0x10000) & 0x3FF));
            }
            k += 4;
        } else {
            if (dst) put_be16(dst + k, c);
            k += 2;
        }
    }
    return k;
}

/* Layout (piexif.dump): "Exif\0\0"; TIFF "MM\0*" + IFD0 offset 8; IFD0 at 8: one entry
 * (0x8769 LONG 1 -> 26), next 0; Exif IFD at 26: one entry (0x9286 UNDEFINED n -> 40) and,
 * as piexif writes sub-IFDs, no next-IFD field; the comment at 40. */
lora_status img_exif_user_comment(lora_ctx *ctx, const char *text, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    size_t n = strlen(text), bad = 0;
    if (!utf8_valid((const uint8_t *)text, n, &bad))
        return lora_fail(ctx, LORA_E_CAPTION_ENCODING, "EXIF UserComment: the text is not UTF-8 (byte %zu)", bad);
    size_t body = utf16be((const uint8_t *)text, n, NULL);
    if (body > (1u << 30))
        return lora_fail(ctx, LORA_E_LIMIT, "EXIF UserComment: %zu bytes of text is too long", n);
    size_t count = 8 + body, total = 6 + 40 + count;
    uint8_t *b = lora_malloc(ctx, total);
    if (!b) return LORA_E_NOMEM;
    memset(b, 0, 6 + 40);
    memcpy(b, "Exif\0\0", 6);
    uint8_t *t = b + 6;
    memcpy(t, "MM\0*", 4);
    put_be32(t + 4, 8);
    put_be16(t + 8, 1);                      /* IFD0: 1 entry */
    put_be16(t + 10, 0x8769);                /* ExifIFD pointer */
    put_be16(t + 12, 4);                     /* LONG */
    put_be32(t + 14, 1);
    put_be32(t + 18, 26);
    put_be32(t + 22, 0);                     /* no IFD1 */
    put_be16(t + 26, 1);                     /* Exif IFD: 1 entry */
    put_be16(t + 28, 0x9286);                /* UserComment */
    put_be16(t + 30, 7);                     /* UNDEFINED */
    put_be32(t + 32, (uint32_t)count);
    put_be32(t + 36, 40);                    /* piexif writes no next-IFD link here */
    memcpy(t + 40, "UNICODE\0", 8);
    utf16be((const uint8_t *)text, n, t + 48);
    *out = b;
    *out_len = total;
    return LORA_OK;
}

/* RGB rows for the encoders (alpha dropped). *tmp is set when a copy was needed. */
static lora_status rgb_rows(lora_ctx *ctx, const uint8_t *pixels, int64_t w, int64_t h, int channels,
                            const uint8_t **rgb, uint8_t **tmp) {
    *tmp = NULL;
    *rgb = pixels;
    if (channels == 3) return LORA_OK;
    size_t n = (size_t)w * (size_t)h;
    uint8_t *c = lora_malloc(ctx, n * 3);
    if (!c) return LORA_E_NOMEM;
    for (size_t i = 0; i < n; i++) {
        c[i * 3] = pixels[i * 4];
        c[i * 3 + 1] = pixels[i * 4 + 1];
        c[i * 3 + 2] = pixels[i * 4 + 2];
    }
    *tmp = c;
    *rgb = c;
    return LORA_OK;
}

static lora_status check_image(lora_ctx *ctx, const char *fmt, const uint8_t *pixels, int64_t w, int64_t h,
                               int channels, int64_t max_side) {
    if (!pixels || w < 1 || h < 1 || w > max_side || h > max_side || (channels != 3 && channels != 4))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: %lldx%lld with %d channels cannot be written (sides "
                         "1..%lld, 3 or 4 channels)", fmt, (long long)w, (long long)h, channels, (long long)max_side);
    return LORA_OK;
}

/* ---- JPEG ----------------------------------------------------------------------------------- */

struct jpeg_werr {
    struct jpeg_error_mgr mgr;
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    unsigned char *out;     /* jpeg_mem_dest's buffer: stored through a pointer, so the error */
    unsigned long out_len;  /* path reads it from memory, not from a clobbered register */
};

static void jpeg_w_error(j_common_ptr c) {
    struct jpeg_werr *e = (struct jpeg_werr *)c->err;
    c->err->format_message(c, e->msg);
    longjmp(e->jb, 1);
}

static void jpeg_w_message(j_common_ptr c) { (void)c; }

/* All libjpeg calls stay between setjmp and the cleanup. jpeg_mem_dest's buffer comes from
 * libjpeg's malloc; it is copied into a lora_malloc buffer. */
static lora_status jpeg_run(lora_ctx *ctx, const uint8_t *rgb, int64_t w, int64_t h, const uint8_t *exif,
                            size_t exif_len, int quality, uint8_t **out, size_t *out_len) {
    struct jpeg_compress_struct c;
    struct jpeg_werr err;
    memset(&c, 0, sizeof c);
    memset(&err, 0, sizeof err);
    c.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = jpeg_w_error;     /* the default calls exit() */
    err.mgr.output_message = jpeg_w_message;
    if (setjmp(err.jb)) {
        jpeg_destroy_compress(&c);
        free(err.out);
        return lora_fail(ctx, LORA_E_INTERNAL, "JPEG encoder: %s", err.msg);
    }
    jpeg_create_compress(&c);
    jpeg_mem_dest(&c, &err.out, &err.out_len);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = 3;
    c.in_color_space = JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, quality, TRUE);
    if (exif) c.write_JFIF_header = FALSE;   /* piexif.insert replaces APP0 with the EXIF APP1 */
    jpeg_start_compress(&c, TRUE);
    if (exif) jpeg_write_marker(&c, JPEG_APP0 + 1, exif, (unsigned int)exif_len);
    for (int64_t y = 0; y < h; y++) {
        JSAMPROW row = (JSAMPROW)(rgb + (size_t)y * (size_t)w * 3);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    size_t len = (size_t)err.out_len;
    uint8_t *b = lora_malloc(ctx, len ? len : 1);
    if (b) memcpy(b, err.out, len);
    free(err.out);
    if (!b) return LORA_E_NOMEM;
    *out = b;
    *out_len = len;
    return LORA_OK;
}

lora_status img_jpeg_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                            const char *comment, int quality, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    LORA_TRY(check_image(ctx, "JPEG", pixels, width, height, channels, 65500));
    if (quality < 1 || quality > 100)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "JPEG: quality %d is not in 1..100", quality);
    uint8_t *exif = NULL;
    size_t exif_len = 0;
    if (comment) {
        LORA_TRY(img_exif_user_comment(ctx, comment, &exif, &exif_len));
        if (exif_len > 65533) {
            lora_free(ctx, exif);
            return lora_fail(ctx, LORA_E_LIMIT, "JPEG: the parameters text needs %zu bytes of EXIF, more than one "
                             "APP1 segment holds (65533); save as PNG or WebP", exif_len);
        }
    }
    const uint8_t *rgb;
    uint8_t *tmp;
    lora_status s = rgb_rows(ctx, pixels, width, height, channels, &rgb, &tmp);
    if (s == LORA_OK) s = jpeg_run(ctx, rgb, width, height, exif, exif_len, quality, out, out_len);
    lora_free(ctx, tmp);
    lora_free(ctx, exif);
    return s;
}

/* ---- WebP ----------------------------------------------------------------------------------- */

lora_status img_webp_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                            const char *comment, int quality, int lossless, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    LORA_TRY(check_image(ctx, "WebP", pixels, width, height, channels, WEBP_MAX_DIMENSION));
    if (quality < 0 || quality > 100)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "WebP: quality %d is not in 0..100", quality);
    uint8_t *exif = NULL;
    size_t exif_len = 0;
    if (comment) LORA_TRY(img_exif_user_comment(ctx, comment, &exif, &exif_len));
    const uint8_t *rgb;
    uint8_t *tmp;
    lora_status s = rgb_rows(ctx, pixels, width, height, channels, &rgb, &tmp);
    if (s != LORA_OK) {
        lora_free(ctx, exif);
        return s;
    }
    uint8_t *enc = NULL;
    int stride = (int)width * 3;
    size_t n = lossless ? WebPEncodeLosslessRGB(rgb, (int)width, (int)height, stride, &enc)
                        : WebPEncodeRGB(rgb, (int)width, (int)height, stride, (float)quality, &enc);
    lora_free(ctx, tmp);
    /* the simple API writes "RIFF" size "WEBP" and one "VP8 " / "VP8L" chunk */
    if (n < 20 || !enc || memcmp(enc, "RIFF", 4) != 0 || memcmp(enc + 8, "WEBP", 4) != 0) {
        WebPFree(enc);
        lora_free(ctx, exif);
        return lora_fail(ctx, LORA_E_INTERNAL, "WebP encoder failed for a %lldx%lld image", (long long)width,
                         (long long)height);
    }
    size_t img_chunks = n - 12, tiff_len = exif ? exif_len - 6 : 0;
    size_t total = exif ? 12 + 18 + img_chunks + 8 + tiff_len + (tiff_len & 1) : n;
    if (total - 8 > 0xFFFFFFF0u) {
        WebPFree(enc);
        lora_free(ctx, exif);
        return lora_fail(ctx, LORA_E_LIMIT, "WebP: %zu bytes do not fit a RIFF file", total);
    }
    uint8_t *b = lora_malloc(ctx, total);
    if (!b) {
        WebPFree(enc);
        lora_free(ctx, exif);
        return LORA_E_NOMEM;
    }
    if (!exif) {
        memcpy(b, enc, n);
    } else {
        uint8_t *p = b;
        memcpy(p, "RIFF", 4);
        put_le32(p + 4, (uint32_t)(total - 8));
        memcpy(p + 8, "WEBPVP8X", 8);
        put_le32(p + 16, 10);
        memset(p + 20, 0, 10);
        p[20] = 0x08;                                    /* EXIF flag */
        uint32_t wm1 = (uint32_t)width - 1, hm1 = (uint32_t)height - 1;
        p[24] = (uint8_t)wm1;
        p[25] = (uint8_t)(wm1 >> 8);
        p[26] = (uint8_t)(wm1 >> 16);
        p[27] = (uint8_t)hm1;
        p[28] = (uint8_t)(hm1 >> 8);
        p[29] = (uint8_t)(hm1 >> 16);
        p += 30;
        memcpy(p, enc + 12, img_chunks);
        p += img_chunks;
        memcpy(p, "EXIF", 4);
        put_le32(p + 4, (uint32_t)tiff_len);
        memcpy(p + 8, exif + 6, tiff_len);               /* piexif strips "Exif\0\0" for WebP */
        if (tiff_len & 1) p[8 + tiff_len] = 0;
    }
    WebPFree(enc);
    lora_free(ctx, exif);
    *out = b;
    *out_len = total;
    return LORA_OK;
}

/* ---- by extension --------------------------------------------------------------------------- */

int img_out_format(const char *path) {
    const char *dot = path ? strrchr(path, '.') : NULL;
    if (!dot || strchr(dot, '/')) return IMG_OUT_UNKNOWN;
    if (strcasecmp(dot, ".png") == 0) return IMG_OUT_PNG;
    if (strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0) return IMG_OUT_JPEG;
    if (strcasecmp(dot, ".webp") == 0) return IMG_OUT_WEBP;
    return IMG_OUT_UNKNOWN;
}

lora_status img_write_image(lora_ctx *ctx, const char *path, const uint8_t *pixels, int64_t width, int64_t height,
                            int channels, const struct img_text *text, int64_t n_text, int quality,
                            int webp_lossless) {
    int fmt = img_out_format(path);
    if (fmt == IMG_OUT_UNKNOWN)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: the extension is not .png, .jpg, .jpeg or .webp", path);
    if (fmt == IMG_OUT_PNG) return img_write_png(ctx, path, pixels, width, height, channels, text, n_text);
    const char *comment = NULL;
    for (int64_t i = 0; i < n_text; i++)
        if (text[i].key && strcmp(text[i].key, "parameters") == 0) comment = text[i].value ? text[i].value : "";
    uint8_t *buf = NULL;
    size_t len = 0;
    if (fmt == IMG_OUT_JPEG)
        LORA_TRY(img_jpeg_encode(ctx, pixels, width, height, channels, comment, quality, &buf, &len));
    else
        LORA_TRY(img_webp_encode(ctx, pixels, width, height, channels, comment, quality, webp_lossless, &buf, &len));
    return write_whole(ctx, path, buf, len);
}
