/* Output for generated images: PNG (libpng), JPEG (libjpeg-turbo) and WebP (libwebp).
 *
 * PNG: text chunks the way PIL's PngInfo.add_text
 * writes them (what A1111 and kohya's gen_img_diffusers.py use): a value whose characters all
 * fit Latin-1 goes into a tEXt chunk (Latin-1 bytes), any other value into an uncompressed
 * iTXt chunk (UTF-8). Keys are 1..79 printable Latin-1 characters (PNG's rule).
 *
 * JPEG and WebP carry no text chunks; like A1111 (modules/images.py save_image_with_geninfo:
 * piexif.dump of an Exif IFD holding UserComment = piexif.helper.UserComment.dump(text,
 * encoding="unicode"), then piexif.insert) they store the "parameters" text only, as EXIF
 * UserComment: "UNICODE\0" + UTF-16 big-endian, in a big-endian TIFF whose IFD0 holds just
 * the Exif IFD pointer. JPEG: that EXIF as the APP1 segment right after SOI (piexif.insert
 * replaces the JFIF APP0 with it, so there is none). WebP: an extended file (VP8X with the
 * EXIF flag) with the TIFF bytes in an "EXIF" chunk after the image data, as piexif's WebP
 * insert writes it. A1111's PNG Info tab (read_info_from_image -> piexif.load ->
 * UserComment.load) reads the text back from both. RGBA is written as RGB (alpha dropped,
 * as A1111 converts RGBA before saving JPEG/WebP).
 *
 * libpng/libjpeg errors are caught with setjmp inside image_write.c; nothing longjmps across
 * these functions. Files are written atomically (temp file, fsync, rename). */
#ifndef LORA_IO_IMAGE_WRITE_H
#define LORA_IO_IMAGE_WRITE_H

#include "internal.h"

struct img_text {
    const char *key;     /* ASCII */
    const char *value;   /* UTF-8 */
};

/* Encodes 8-bit RGB (channels 3) or RGBA (4) pixels, row-major, into a PNG in memory
 * (*out from lora_malloc; free with lora_free). Errors: LORA_E_INVALID_ARG (sizes, channels,
 * a bad key), LORA_E_CAPTION_ENCODING (a value that is not UTF-8), LORA_E_NOMEM,
 * LORA_E_INTERNAL (libpng refused: its message). */
lora_status img_png_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                           const struct img_text *text, int64_t n_text, uint8_t **out, size_t *out_len);

/* img_png_encode, then an atomic write to `path`. Errors: as above plus LORA_E_IO,
 * LORA_E_NOSPACE, LORA_E_DEST_BUSY naming the file. */
lora_status img_write_png(lora_ctx *ctx, const char *path, const uint8_t *pixels, int64_t width, int64_t height,
                          int channels, const struct img_text *text, int64_t n_text);

/* ---- JPEG / WebP ---------------------------------------------------------------------------- */
#define IMG_OUT_UNKNOWN 0
#define IMG_OUT_PNG     1
#define IMG_OUT_JPEG    2
#define IMG_OUT_WEBP    3

/* Format from the file name's extension, case-insensitive: .png, .jpg/.jpeg, .webp;
 * IMG_OUT_UNKNOWN otherwise. */
int img_out_format(const char *path);

/* piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}}) byte for
 * byte: "Exif\0\0" + the big-endian TIFF (*out from lora_malloc). Errors: LORA_E_CAPTION_ENCODING
 * (text not UTF-8), LORA_E_LIMIT (over 1 GiB), LORA_E_NOMEM. */
lora_status img_exif_user_comment(lora_ctx *ctx, const char *text, uint8_t **out, size_t *out_len);

/* Baseline JPEG (4:2:0, libjpeg's defaults) at `quality` 1..100; `comment` (UTF-8, may be
 * NULL: no EXIF) as EXIF UserComment in APP1. Sides 1..65500. Errors: LORA_E_INVALID_ARG,
 * LORA_E_LIMIT (the EXIF does not fit one APP1 segment of 65533 bytes: about 32,000
 * characters), LORA_E_CAPTION_ENCODING, LORA_E_NOMEM, LORA_E_INTERNAL (libjpeg refused). */
lora_status img_jpeg_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                            const char *comment, int quality, uint8_t **out, size_t *out_len);

/* WebP, lossy at `quality` 0..100 or lossless (exact RGB); `comment` as EXIF UserComment in an
 * EXIF chunk (NULL: a plain simple-format file). Sides 1..16383. Errors as img_jpeg_encode. */
lora_status img_webp_encode(lora_ctx *ctx, const uint8_t *pixels, int64_t width, int64_t height, int channels,
                            const char *comment, int quality, int lossless, uint8_t **out, size_t *out_len);

/* Picks the format by `path`'s extension (LORA_E_INVALID_ARG naming the file for any other)
 * and writes atomically: PNG with every text chunk, JPEG/WebP with the text under
 * "parameters" (if any) as EXIF UserComment. quality: JPEG and lossy WebP (A1111 uses its
 * jpeg_quality for both). */
lora_status img_write_image(lora_ctx *ctx, const char *path, const uint8_t *pixels, int64_t width, int64_t height,
                            int channels, const struct img_text *text, int64_t n_text, int quality,
                            int webp_lossless);

#endif
