/* PNG / JPEG / WebP / BMP -> RGB8 with header checks first (see image_read.h). */
#include <errno.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <png.h>
#include <jpeglib.h>
#include <jerror.h>
#include <webp/decode.h>

#include "io/image_read.h"

void img_limits_default(struct img_limits *l) {
    l->max_side = IMG_MAX_SIDE_DEFAULT;
    l->max_pixels = IMG_MAX_PIXELS_DEFAULT;
    l->apply_orientation = 1;
}

int32_t img_sniff(const uint8_t *b, size_t n) {
    if (n >= 8 && memcmp(b, "\x89PNG\r\n\x1a\n", 8) == 0) return IMG_FMT_PNG;
    if (n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return IMG_FMT_JPEG;
    if (n >= 12 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WEBP", 4) == 0) return IMG_FMT_WEBP;
    if (n >= 2 && b[0] == 'B' && b[1] == 'M') return IMG_FMT_BMP;
    return IMG_FMT_UNKNOWN;
}

static const char *fmt_name(int32_t f) {
    switch (f) {
    case IMG_FMT_PNG: return "PNG";
    case IMG_FMT_JPEG: return "JPEG";
    case IMG_FMT_WEBP: return "WebP";
    case IMG_FMT_BMP: return "BMP";
    default: return "unknown";
    }
}

static void limits_of(const struct img_limits *lim, int64_t *side, int64_t *pixels, int *orient) {
    *side = lim && lim->max_side > 0 ? lim->max_side : IMG_MAX_SIDE_DEFAULT;
    *pixels = lim && lim->max_pixels > 0 ? lim->max_pixels : IMG_MAX_PIXELS_DEFAULT;
    *orient = lim ? lim->apply_orientation : 1;
}

/* The header check every decoder runs before allocating. */
static lora_status check_dims(lora_ctx *ctx, const char *name, int32_t fmt, int64_t w, int64_t h,
                              const struct img_limits *lim) {
    int64_t side, pixels, p;
    int orient;
    limits_of(lim, &side, &pixels, &orient);
    if (w <= 0 || h <= 0)
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: %s header declares %lldx%lld pixels",
                         name, fmt_name(fmt), (long long)w, (long long)h);
    if (w > side || h > side || !ck_mul_i64(w, h, &p) || p > pixels)
        return lora_fail(ctx, LORA_E_IMG_TOO_LARGE,
                         "%s: %s image %lldx%lld exceeds the limits (side %lld, %lld pixels)",
                         name, fmt_name(fmt), (long long)w, (long long)h, (long long)side, (long long)pixels);
    return LORA_OK;
}

static lora_status alloc_rgb(lora_ctx *ctx, int32_t w, int32_t h, struct img_rgb8 *out) {
    size_t bytes;
    if (!ck_mul_size((size_t)w, (size_t)h, &bytes) || !ck_mul_size(bytes, 3, &bytes))
        return lora_fail(ctx, LORA_E_IMG_TOO_LARGE, "image %dx%d: size overflows", w, h);
    out->data = lora_malloc(ctx, bytes);
    if (!out->data) return LORA_E_NOMEM;
    out->width = w;
    out->height = h;
    return LORA_OK;
}

void img_free(lora_ctx *ctx, struct img_rgb8 *img) {
    if (!img) return;
    lora_free(ctx, img->data);
    img->data = NULL;
    img->width = img->height = 0;
}

/* ---- EXIF orientation ------------------------------------------------------------------- */

static uint32_t rd16(const uint8_t *p, int le) { return le ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : (uint32_t)p[1] | (uint32_t)p[0] << 8; }
static uint32_t rd32(const uint8_t *p, int le) {
    return le ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24
              : (uint32_t)p[3] | (uint32_t)p[2] << 8 | (uint32_t)p[1] << 16 | (uint32_t)p[0] << 24;
}

int32_t img_exif_orientation(const uint8_t *e, size_t n) {
    if (!e) return 1;
    if (n >= 6 && memcmp(e, "Exif\0\0", 6) == 0) { e += 6; n -= 6; }
    if (n < 8) return 1;
    int le;
    if (e[0] == 'I' && e[1] == 'I') le = 1;
    else if (e[0] == 'M' && e[1] == 'M') le = 0;
    else return 1;
    if (rd16(e + 2, le) != 42) return 1;
    uint64_t ifd = rd32(e + 4, le);
    if (ifd + 2 > n) return 1;
    uint32_t count = rd16(e + ifd, le);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t at = ifd + 2 + 12ull * i;
        if (at + 12 > n) return 1;
        if (rd16(e + at, le) == 0x0112) {
            uint32_t type = rd16(e + at + 2, le);
            uint32_t v = type == 3 ? rd16(e + at + 8, le) : type == 4 ? rd32(e + at + 8, le) : 1;
            return v >= 1 && v <= 8 ? (int32_t)v : 1;
        }
    }
    return 1;
}

/* Applies orientation o in place of img->data (new buffer), as PIL's exif_transpose:
 * 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270 (clockwise 90), 7 transverse,
 * 8 rotate 90. */
static lora_status apply_orientation(lora_ctx *ctx, struct img_rgb8 *img, int32_t o) {
    if (o <= 1 || o > 8) return LORA_OK;
    int32_t W = img->width, H = img->height;
    int swap = o >= 5;
    struct img_rgb8 t = {0};
    LORA_TRY(alloc_rgb(ctx, swap ? H : W, swap ? W : H, &t));
    for (int32_t y = 0; y < t.height; y++) {
        for (int32_t x = 0; x < t.width; x++) {
            int32_t sx, sy;
            switch (o) {
            case 2: sx = W - 1 - x; sy = y; break;
            case 3: sx = W - 1 - x; sy = H - 1 - y; break;
            case 4: sx = x; sy = H - 1 - y; break;
            case 5: sx = y; sy = x; break;
            case 6: sx = y; sy = H - 1 - x; break;
            case 7: sx = W - 1 - y; sy = H - 1 - x; break;
            default: sx = W - 1 - y; sy = x; break;  /* 8 */
            }
            const uint8_t *s = img->data + ((size_t)sy * (size_t)W + (size_t)sx) * 3;
            uint8_t *d = t.data + ((size_t)y * (size_t)t.width + (size_t)x) * 3;
            d[0] = s[0]; d[1] = s[1]; d[2] = s[2];
        }
    }
    img_free(ctx, img);
    *img = t;
    return LORA_OK;
}

/* ---- PNG --------------------------------------------------------------------------------- */

struct png_src {
    const uint8_t *buf;
    size_t n, pos;
    char msg[200];
};

static void png_read_mem(png_structp png, png_bytep dst, png_size_t len) {
    struct png_src *s = png_get_io_ptr(png);
    if (len > s->n - s->pos) png_error(png, "file is truncated");
    memcpy(dst, s->buf + s->pos, len);
    s->pos += len;
}

static void png_on_error(png_structp png, png_const_charp msg) {
    struct png_src *s = png_get_error_ptr(png);
    snprintf(s->msg, sizeof s->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

/* probe_only: stop after the header. All libpng calls stay between setjmp and the cleanup. */
static lora_status png_run(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                           const struct img_limits *lim, int probe_only, int32_t *pw, int32_t *ph,
                           struct img_rgb8 *out) {
    /* The IHDR fields first, straight from the bytes: a huge declared size is refused before
     * libpng reads further (it would otherwise report later chunk errors first). */
    if (n >= 24 && memcmp(buf + 12, "IHDR", 4) == 0)
        LORA_TRY(check_dims(ctx, name, IMG_FMT_PNG, rd32(buf + 16, 0), rd32(buf + 20, 0), lim));
    struct png_src src = { buf, n, 0, "" };
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, png_on_error, png_on_warning);
    if (!png) return lora_fail(ctx, LORA_E_NOMEM, "%s: libpng could not start", name);
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return lora_fail(ctx, LORA_E_NOMEM, "%s: libpng could not start", name);
    }
    /* Locals changed after setjmp that the error path reads must be volatile. */
    volatile lora_status st = LORA_OK;
    png_bytep *volatile rows = NULL;
    struct img_rgb8 img = {0};
    struct img_rgb8 *volatile imgp = &img;
    int64_t side, pixels;
    int orient;
    limits_of(lim, &side, &pixels, &orient);
    (void)side;

    if (setjmp(png_jmpbuf(png))) {
        lora_free(ctx, rows);
        img_free(ctx, imgp);
        png_destroy_read_struct(&png, &info, NULL);
        if (st != LORA_OK) return st;
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: corrupt PNG: %s", name, src.msg[0] ? src.msg : "libpng error");
    }
    png_set_read_fn(png, &src, png_read_mem);
    /* libpng's own side cap stays wide open so that check_dims reports LORA_E_IMG_TOO_LARGE
     * (libpng would only say "exceeds user limit" as a decode error). */
    png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
    png_set_chunk_malloc_max(png, 8000000);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int depth = png_get_bit_depth(png, info), ctype = png_get_color_type(png, info);
    (void)depth;
    int32_t o = 1;
#ifdef PNG_eXIf_SUPPORTED
    if (orient) {
        png_bytep exif = NULL;
        png_uint_32 exif_n = 0;
        if (png_get_eXIf_1(png, info, &exif_n, &exif) && exif) o = img_exif_orientation(exif, exif_n);
    }
#endif
    st = check_dims(ctx, name, IMG_FMT_PNG, w, h, lim);
    if (st != LORA_OK) png_longjmp(png, 1);
    if (probe_only) {
        *pw = (int32_t)(o >= 5 ? h : w);
        *ph = (int32_t)(o >= 5 ? w : h);
        png_destroy_read_struct(&png, &info, NULL);
        return LORA_OK;
    }
    /* To RGB8 as PIL's convert("RGB"): tRNS is not expanded, so transparency is ignored. */
    if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    png_set_strip_16(png);              /* keeps the high byte, as PIL's ";16B" raw modes */
    /* palette_to_rgb also expands tRNS to alpha: strip it again */
    if ((ctype & PNG_COLOR_MASK_ALPHA) || ctype == PNG_COLOR_TYPE_PALETTE) png_set_strip_alpha(png);
    if (ctype == PNG_COLOR_TYPE_GRAY || ctype == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_rowbytes(png, info) != (size_t)w * 3) {
        st = lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: PNG colour type %d depth %d did not convert to RGB8",
                       name, ctype, depth);
        png_longjmp(png, 1);
    }
    st = alloc_rgb(ctx, (int32_t)w, (int32_t)h, imgp);
    if (st != LORA_OK) png_longjmp(png, 1);
    rows = lora_malloc(ctx, sizeof(png_bytep) * h);
    if (!rows) { st = LORA_E_NOMEM; png_longjmp(png, 1); }
    for (png_uint_32 y = 0; y < h; y++) rows[y] = imgp->data + (size_t)y * w * 3;
    png_read_image(png, rows);
    png_read_end(png, NULL);
    lora_free(ctx, rows);
    png_destroy_read_struct(&png, &info, NULL);
    *out = img;
    if (o > 1) {
        lora_status s2 = apply_orientation(ctx, out, o);
        if (s2 != LORA_OK) { img_free(ctx, out); return s2; }
    }
    return LORA_OK;
}

/* ---- JPEG -------------------------------------------------------------------------------- */

struct jpeg_err {
    struct jpeg_error_mgr mgr;
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    int eof;              /* libjpeg hit the end of data early (it only warns) */
};

static void jpeg_on_error(j_common_ptr c) {
    struct jpeg_err *e = (struct jpeg_err *)c->err;
    e->mgr.format_message(c, e->msg);
    longjmp(e->jb, 1);
}
static void jpeg_on_message(j_common_ptr c) { (void)c; }
static void jpeg_on_emit(j_common_ptr c, int level) {
    struct jpeg_err *e = (struct jpeg_err *)c->err;
    if (level < 0) {
        e->mgr.num_warnings++;
        if (e->mgr.msg_code == JWRN_JPEG_EOF) e->eof = 1;
    }
}

static int32_t jpeg_orientation(j_decompress_ptr d) {
    for (jpeg_saved_marker_ptr m = d->marker_list; m; m = m->next)
        if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && memcmp(m->data, "Exif\0\0", 6) == 0)
            return img_exif_orientation(m->data, m->data_length);
    return 1;
}

static lora_status jpeg_run(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                            const struct img_limits *lim, int probe_only, int32_t *pw, int32_t *ph,
                            struct img_rgb8 *out) {
    struct jpeg_decompress_struct d;
    struct jpeg_err err;
    volatile lora_status st = LORA_OK;
    struct img_rgb8 img = {0};
    struct img_rgb8 *volatile imgp = &img;
    int64_t side, pixels;
    int orient;
    limits_of(lim, &side, &pixels, &orient);
    memset(&d, 0, sizeof d);
    err.msg[0] = 0;
    d.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = jpeg_on_error;     /* the default calls exit() */
    err.mgr.output_message = jpeg_on_message;
    err.mgr.emit_message = jpeg_on_emit;
    err.eof = 0;
    if (setjmp(err.jb)) {
        jpeg_destroy_decompress(&d);
        img_free(ctx, imgp);
        if (st != LORA_OK) return st;
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: corrupt JPEG: %s", name, err.msg);
    }
    jpeg_create_decompress(&d);
    jpeg_mem_src(&d, buf, (unsigned long)n);
    if (orient) jpeg_save_markers(&d, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&d, TRUE);
    int32_t o = orient ? jpeg_orientation(&d) : 1;
    st = check_dims(ctx, name, IMG_FMT_JPEG, d.image_width, d.image_height, lim);
    if (st != LORA_OK) longjmp(err.jb, 1);
    if (d.jpeg_color_space == JCS_CMYK || d.jpeg_color_space == JCS_YCCK) {
        st = lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: CMYK JPEG is not supported; save it as RGB", name);
        longjmp(err.jb, 1);
    }
    if (probe_only) {
        *pw = (int32_t)(o >= 5 ? d.image_height : d.image_width);
        *ph = (int32_t)(o >= 5 ? d.image_width : d.image_height);
        jpeg_destroy_decompress(&d);
        return LORA_OK;
    }
    d.out_color_space = JCS_RGB;            /* gray JPEGs are replicated, as PIL's L -> RGB */
    jpeg_start_decompress(&d);
    if (d.output_components != 3) {
        st = lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: JPEG with %d output components", name, d.output_components);
        longjmp(err.jb, 1);
    }
    st = alloc_rgb(ctx, (int32_t)d.output_width, (int32_t)d.output_height, imgp);
    if (st != LORA_OK) longjmp(err.jb, 1);
    while (d.output_scanline < d.output_height) {
        JSAMPROW row = imgp->data + (size_t)d.output_scanline * d.output_width * 3;
        jpeg_read_scanlines(&d, &row, 1);
    }
    /* libjpeg pads a truncated stream with an EOI and only warns: treat that as corrupt
     * (PIL raises "image file is truncated" there). */
    if (err.eof) {
        st = lora_fail(ctx, LORA_E_IMG_DECODE, "%s: JPEG data is truncated or corrupt", name);
        longjmp(err.jb, 1);
    }
    jpeg_finish_decompress(&d);
    jpeg_destroy_decompress(&d);
    *out = img;
    if (o > 1) {
        lora_status s2 = apply_orientation(ctx, out, o);
        if (s2 != LORA_OK) { img_free(ctx, out); return s2; }
    }
    return LORA_OK;
}

/* ---- WebP -------------------------------------------------------------------------------- */

static lora_status webp_run(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                            const struct img_limits *lim, int probe_only, int32_t *pw, int32_t *ph,
                            struct img_rgb8 *out) {
    WebPBitstreamFeatures f;
    if (WebPGetFeatures(buf, n, &f) != VP8_STATUS_OK)
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: corrupt WebP header", name);
    if (f.has_animation)
        return lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: animated WebP is not supported", name);
    LORA_TRY(check_dims(ctx, name, IMG_FMT_WEBP, f.width, f.height, lim));
    if (probe_only) {
        *pw = f.width;
        *ph = f.height;
        return LORA_OK;
    }
    struct img_rgb8 img = {0};
    LORA_TRY(alloc_rgb(ctx, f.width, f.height, &img));
    size_t stride = (size_t)f.width * 3, total = stride * (size_t)f.height;
    /* RGB output drops alpha without premultiplying, as PIL's RGBA -> RGB. */
    if (!WebPDecodeRGBInto(buf, n, img.data, total, (int)stride)) {
        img_free(ctx, &img);
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: corrupt or truncated WebP data", name);
    }
    *out = img;
    return LORA_OK;
}

/* ---- BMP (uncompressed 24/32-bit, as most tools write) ----------------------------------- */

static lora_status bmp_run(lora_ctx *ctx, const char *name, const uint8_t *b, size_t n,
                           const struct img_limits *lim, int probe_only, int32_t *pw, int32_t *ph,
                           struct img_rgb8 *out) {
    if (n < 54) return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: BMP header is truncated", name);
    uint32_t off = rd32(b + 10, 1), hdr = rd32(b + 14, 1);
    if (hdr < 40) return lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: old-style BMP header (%u bytes)", name, hdr);
    int32_t w = (int32_t)rd32(b + 18, 1), h = (int32_t)rd32(b + 22, 1);
    uint32_t bpp = rd16(b + 28, 1), comp = rd32(b + 30, 1);
    int top_down = h < 0;
    int64_t ah = top_down ? -(int64_t)h : h;
    if ((bpp != 24 && bpp != 32) || (comp != 0 && !(comp == 3 && bpp == 32)))
        return lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: BMP with %u bits per pixel, compression %u (only 24/32-bit uncompressed)",
                         name, bpp, comp);
    if (comp == 3) {
        /* BI_BITFIELDS: only the standard BGRX masks are read; PIL maps others, we refuse */
        if (n < 66 || rd32(b + 54, 1) != 0x00FF0000u || rd32(b + 58, 1) != 0x0000FF00u || rd32(b + 62, 1) != 0x000000FFu)
            return lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: BMP with non-standard colour masks", name);
    }
    LORA_TRY(check_dims(ctx, name, IMG_FMT_BMP, w, ah, lim));
    if (probe_only) {
        *pw = w;
        *ph = (int32_t)ah;
        return LORA_OK;
    }
    uint64_t rowb = (((uint64_t)w * bpp + 31) / 32) * 4, need;
    if (!ck_mul_u64(rowb, (uint64_t)ah, &need) || !ck_add_u64(need, off, &need) || need > n)
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: BMP pixel data is truncated", name);
    struct img_rgb8 img = {0};
    LORA_TRY(alloc_rgb(ctx, w, (int32_t)ah, &img));
    int step = (int)bpp / 8;
    for (int64_t y = 0; y < ah; y++) {
        const uint8_t *r = b + off + rowb * (uint64_t)(top_down ? y : ah - 1 - y);
        uint8_t *d = img.data + (size_t)y * (size_t)w * 3;
        for (int32_t x = 0; x < w; x++) {
            d[3 * x + 0] = r[step * x + 2];
            d[3 * x + 1] = r[step * x + 1];
            d[3 * x + 2] = r[step * x + 0];
        }
    }
    *out = img;
    return LORA_OK;
}

/* ---- dispatch ---------------------------------------------------------------------------- */

static lora_status img_run(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                           const struct img_limits *lim, int probe_only, int32_t *pw, int32_t *ph,
                           struct img_rgb8 *out) {
    if (!name) name = "(image)";
    if (!buf || n == 0) return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: empty file (0 bytes)", name);
    switch (img_sniff(buf, n)) {
    case IMG_FMT_PNG: return png_run(ctx, name, buf, n, lim, probe_only, pw, ph, out);
    case IMG_FMT_JPEG: return jpeg_run(ctx, name, buf, n, lim, probe_only, pw, ph, out);
    case IMG_FMT_WEBP: return webp_run(ctx, name, buf, n, lim, probe_only, pw, ph, out);
    case IMG_FMT_BMP: return bmp_run(ctx, name, buf, n, lim, probe_only, pw, ph, out);
    default:
        return lora_fail(ctx, LORA_E_IMG_UNSUPPORTED, "%s: not a PNG, JPEG, WebP or BMP file (first bytes %02x %02x %02x %02x)",
                         name, buf[0], n > 1 ? buf[1] : 0, n > 2 ? buf[2] : 0, n > 3 ? buf[3] : 0);
    }
}

lora_status img_decode_rgb8(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                            const struct img_limits *lim, struct img_rgb8 *out) {
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "img_decode_rgb8: out is NULL");
    memset(out, 0, sizeof *out);
    int32_t w, h;
    return img_run(ctx, name, buf, n, lim, 0, &w, &h, out);
}

lora_status img_probe_mem(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                          const struct img_limits *lim, int32_t *width, int32_t *height) {
    if (!width || !height) return lora_fail(ctx, LORA_E_INVALID_ARG, "img_probe_mem: NULL output");
    return img_run(ctx, name, buf, n, lim, 1, width, height, NULL);
}

lora_status img_read_file(lora_ctx *ctx, const char *path, uint8_t **buf, size_t *n) {
    *buf = NULL;
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return lora_fail(ctx, errno == ENOENT ? LORA_E_NOT_FOUND : LORA_E_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return lora_fail(ctx, LORA_E_IO, "%s: not a regular file", path);
    }
    if (sb.st_size == 0) {
        fclose(f);
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: empty file (0 bytes)", path);
    }
    if ((uint64_t)sb.st_size > IMG_MAX_FILE_BYTES) {
        fclose(f);
        return lora_fail(ctx, LORA_E_IMG_TOO_LARGE, "%s: file of %lld bytes is above the %llu-byte image cap", path,
                         (long long)sb.st_size, (unsigned long long)IMG_MAX_FILE_BYTES);
    }
    size_t len = (size_t)sb.st_size;
    uint8_t *b = lora_malloc(ctx, len);
    if (!b) {
        fclose(f);
        return LORA_E_NOMEM;
    }
    size_t got = fread(b, 1, len, f);
    fclose(f);
    if (got != len) {
        lora_free(ctx, b);
        return lora_fail(ctx, LORA_E_IO, "%s: short read (%zu of %zu bytes)", path, got, len);
    }
    *buf = b;
    *n = len;
    return LORA_OK;
}

lora_status img_load_rgb8(lora_ctx *ctx, const char *path, const struct img_limits *lim, struct img_rgb8 *out) {
    uint8_t *b;
    size_t n;
    memset(out, 0, sizeof *out);
    LORA_TRY(img_read_file(ctx, path, &b, &n));
    lora_status s = img_decode_rgb8(ctx, path, b, n, lim, out);
    lora_free(ctx, b);
    return s;
}

lora_status img_probe(lora_ctx *ctx, const char *path, const struct img_limits *lim, int32_t *width, int32_t *height) {
    uint8_t *b;
    size_t n;
    LORA_TRY(img_read_file(ctx, path, &b, &n));
    lora_status s = img_probe_mem(ctx, path, b, n, lim, width, height);
    lora_free(ctx, b);
    return s;
}
