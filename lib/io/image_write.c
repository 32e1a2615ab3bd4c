/* PNG writing through libpng into memory, then an atomic file write (see image_write.h). */
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

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

lora_status img_write_png(lora_ctx *ctx, const char *path, const uint8_t *pixels, int64_t width, int64_t height,
                          int channels, const struct img_text *text, int64_t n_text) {
    uint8_t *buf = NULL;
    size_t len = 0;
    LORA_TRY(img_png_encode(ctx, pixels, width, height, channels, text, n_text, &buf, &len));
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
