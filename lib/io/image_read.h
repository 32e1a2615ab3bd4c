/* Image decoding for the training dataset: PNG (libpng), JPEG (libjpeg-turbo), WebP (libwebp)
 * and uncompressed BMP, always to 8-bit RGB, row-major, 3 bytes per pixel (HWC).
 *
 * Conversion follows what kohya gets from PIL's Image.open(p).convert("RGB"):
 *   gray -> R=G=B; gray+alpha, RGBA, palette+tRNS -> alpha dropped (not composited);
 *   palette -> looked up; 16-bit channels -> the high byte (PIL's "RGB;16B" raw mode; note
 *   PIL clips 16-bit *grayscale* to 255 instead, we take the high byte there too);
 *   gAMA/iCCP ignored (PIL ignores them too); CMYK/YCCK JPEG -> LORA_E_IMG_UNSUPPORTED.
 * Unlike kohya (which never calls exif_transpose), the EXIF orientation of JPEG (APP1) and
 * PNG (eXIf) files is applied when `apply_orientation` is set, the same way as PIL's
 * ImageOps.exif_transpose; img_probe reports the size after that rotation.
 *
 * Safety (spec/safety.md §4.1): the header is checked against the limits (sides, pixels) before
 * any pixel buffer is allocated; corrupt, truncated or empty files return a status whose message
 * names the file. libpng/libjpeg errors are caught with setjmp inside image_read.c; nothing
 * longjmps across these functions. Thread-safe for distinct outputs (no shared state).
 */
#ifndef LORA_IO_IMAGE_READ_H
#define LORA_IO_IMAGE_READ_H

#include "internal.h"

#define IMG_MAX_SIDE_DEFAULT   16384
#define IMG_MAX_PIXELS_DEFAULT 89478485   /* PIL's MAX_IMAGE_PIXELS */
#define IMG_MAX_FILE_BYTES     (1ull << 30)

#define IMG_FMT_UNKNOWN 0
#define IMG_FMT_PNG     1
#define IMG_FMT_JPEG    2
#define IMG_FMT_WEBP    3
#define IMG_FMT_BMP     4

struct img_limits {
    int64_t max_side;          /* <= 0: IMG_MAX_SIDE_DEFAULT */
    int64_t max_pixels;        /* <= 0: IMG_MAX_PIXELS_DEFAULT */
    int32_t apply_orientation; /* 1: apply EXIF orientation (JPEG APP1, PNG eXIf) */
};
void img_limits_default(struct img_limits *l);   /* defaults, orientation on */

struct img_rgb8 {
    int32_t width, height;
    uint8_t *data;             /* [height][width][3], lora_malloc'd; free with img_free */
};

/* Format from the first bytes (not the file name). */
int32_t img_sniff(const uint8_t *buf, size_t n);

/* Decodes buf[0..n) (named `name` in messages). On error *out is zeroed. Errors:
 * LORA_E_IMG_DECODE (corrupt, truncated, empty), LORA_E_IMG_TOO_LARGE (header over the limits,
 * nothing allocated), LORA_E_IMG_UNSUPPORTED (unknown format, CMYK JPEG, BMP variant),
 * LORA_E_NOMEM. */
lora_status img_decode_rgb8(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                            const struct img_limits *lim, struct img_rgb8 *out);

/* Width and height from the header only (after orientation when lim->apply_orientation);
 * same checks and errors as decoding except that pixel data is not examined. */
lora_status img_probe_mem(lora_ctx *ctx, const char *name, const uint8_t *buf, size_t n,
                          const struct img_limits *lim, int32_t *width, int32_t *height);

/* Whole file into a lora_malloc'd buffer (at most IMG_MAX_FILE_BYTES). Errors: LORA_E_NOT_FOUND,
 * LORA_E_IO, LORA_E_IMG_DECODE (zero-byte file), LORA_E_IMG_TOO_LARGE (file too big). */
lora_status img_read_file(lora_ctx *ctx, const char *path, uint8_t **buf, size_t *n);

/* img_read_file + img_decode_rgb8 / img_probe_mem. */
lora_status img_load_rgb8(lora_ctx *ctx, const char *path, const struct img_limits *lim,
                          struct img_rgb8 *out);
lora_status img_probe(lora_ctx *ctx, const char *path, const struct img_limits *lim,
                      int32_t *width, int32_t *height);

void img_free(lora_ctx *ctx, struct img_rgb8 *img);

/* EXIF orientation (1..8) from a TIFF/EXIF block ("Exif\0\0" prefix optional); 1 when absent
 * or malformed. Exposed for tests. */
int32_t img_exif_orientation(const uint8_t *exif, size_t n);

#endif
