/* PNG output for generated images (libpng), with text chunks the way PIL's PngInfo.add_text
 * writes them (what A1111 and kohya's gen_img_diffusers.py use): a value whose characters all
 * fit Latin-1 goes into a tEXt chunk (Latin-1 bytes), any other value into an uncompressed
 * iTXt chunk (UTF-8). Keys are 1..79 printable Latin-1 characters (PNG's rule).
 *
 * libpng's errors are caught with setjmp inside image_write.c; nothing longjmps across these
 * functions. Files are written atomically (temp file, fsync, rename). */
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

#endif
