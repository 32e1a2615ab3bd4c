/* Image resize with OpenCV's cv2.resize(..., interpolation=cv2.INTER_AREA) semantics on 8-bit
 * interleaved pixels, which is what kohya's dataset uses (spec/kohya-lora.md §5.3):
 *   - both factors >= 1 and integral (src = k * dst): box average (2x2: (sum + 2) >> 2 as
 *     OpenCV's SIMD path; other k: float sum * (1/k²) rounded half to even);
 *   - both factors >= 1, not integral: OpenCV's area weights (computeResizeAreaTab) with float
 *     accumulation in OpenCV's order;
 *   - any upscale: OpenCV's INTER_AREA fallback, bilinear with "area" coefficients in 11-bit
 *     fixed point (integer upscales become nearest neighbour).
 */
#ifndef LORA_TRAIN_IMAGE_RESIZE_H
#define LORA_TRAIN_IMAGE_RESIZE_H

#include "internal.h"

/* src [sh][sw][cn] -> dst [dh][dw][cn], cn in 1..4. Equal sizes copy. Errors:
 * LORA_E_INVALID_ARG (sizes <= 0, cn out of range), LORA_E_NOMEM (scratch tables). */
lora_status img_resize_area_u8(lora_ctx *ctx, const uint8_t *src, int32_t sw, int32_t sh,
                               uint8_t *dst, int32_t dw, int32_t dh, int32_t cn);

#endif
