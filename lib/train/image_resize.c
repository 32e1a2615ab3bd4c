/* cv2.INTER_AREA resize of 8-bit images (see image_resize.h). The arithmetic mirrors OpenCV
 * 4.x imgproc/resize.cpp so that pixels agree with kohya's preprocessing (not copied code: the
 * formulas are re-derived and checked against cv2 outputs in tests/unit/test_dataset.c). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "train/image_resize.h"

struct area_tap {
    int32_t di, si;   /* destination / source index (in elements along one axis) */
    float alpha;
};

/* OpenCV's computeResizeAreaTab: the share of each source cell in each destination cell.
 * Returns the number of taps (at most 2 * ssize + dsize). */
static int32_t area_taps(int32_t ssize, int32_t dsize, double scale, struct area_tap *tab) {
    int32_t k = 0;
    for (int32_t dx = 0; dx < dsize; dx++) {
        double fsx1 = dx * scale, fsx2 = fsx1 + scale;
        double cell = fmin(scale, ssize - fsx1);
        int32_t sx1 = (int32_t)ceil(fsx1), sx2 = (int32_t)floor(fsx2);
        if (sx2 > ssize - 1) sx2 = ssize - 1;
        if (sx1 > sx2) sx1 = sx2;
        if (sx1 - fsx1 > 1e-3) tab[k++] = (struct area_tap){ dx, sx1 - 1, (float)((sx1 - fsx1) / cell) };
        for (int32_t sx = sx1; sx < sx2; sx++) tab[k++] = (struct area_tap){ dx, sx, (float)(1.0 / cell) };
        if (fsx2 - sx2 > 1e-3) tab[k++] = (struct area_tap){ dx, sx2, (float)(fmin(fmin(fsx2 - sx2, 1.), cell) / cell) };
    }
    return k;
}

static uint8_t sat_u8f(float v) {
    int i = (int)lrintf(v);          /* cvRound: nearest, ties to even */
    return (uint8_t)(i < 0 ? 0 : i > 255 ? 255 : i);
}

static lora_status resize_area_general(lora_ctx *ctx, const uint8_t *src, int32_t sw, int32_t sh,
                                       uint8_t *dst, int32_t dw, int32_t dh, int32_t cn,
                                       double scale_x, double scale_y) {
    size_t nx = 2 * (size_t)sw + (size_t)dw + 4, ny = 2 * (size_t)sh + (size_t)dh + 4;
    size_t row = (size_t)dw * (size_t)cn;
    struct area_tap *xt = lora_malloc(ctx, nx * sizeof *xt);
    struct area_tap *yt = lora_malloc(ctx, ny * sizeof *yt);
    float *buf = lora_malloc(ctx, 2 * row * sizeof *buf);
    if (!xt || !yt || !buf) {
        lora_free(ctx, xt); lora_free(ctx, yt); lora_free(ctx, buf);
        return LORA_E_NOMEM;
    }
    float *sum = buf + row;
    int32_t kx = area_taps(sw, dw, scale_x, xt), ky = area_taps(sh, dh, scale_y, yt);
    for (size_t i = 0; i < row; i++) sum[i] = 0.f;
    int32_t prev = ky > 0 ? yt[0].di : 0;
    for (int32_t j = 0; j < ky; j++) {
        float beta = yt[j].alpha;
        int32_t dy = yt[j].di;
        const uint8_t *S = src + (size_t)yt[j].si * (size_t)sw * (size_t)cn;
        for (size_t i = 0; i < row; i++) buf[i] = 0.f;
        for (int32_t k = 0; k < kx; k++) {
            size_t si = (size_t)xt[k].si * (size_t)cn, di = (size_t)xt[k].di * (size_t)cn;
            float a = xt[k].alpha;
            for (int32_t c = 0; c < cn; c++) buf[di + c] = buf[di + c] + (float)S[si + c] * a;
        }
        if (dy != prev) {
            uint8_t *D = dst + (size_t)prev * row;
            for (size_t i = 0; i < row; i++) {
                D[i] = sat_u8f(sum[i]);
                sum[i] = beta * buf[i];
            }
            prev = dy;
        } else {
            for (size_t i = 0; i < row; i++) sum[i] += beta * buf[i];
        }
    }
    uint8_t *D = dst + (size_t)prev * row;
    for (size_t i = 0; i < row; i++) D[i] = sat_u8f(sum[i]);
    lora_free(ctx, xt); lora_free(ctx, yt); lora_free(ctx, buf);
    return LORA_OK;
}

/* Integral factors kx, ky (src = k * dst exactly). */
static void resize_area_fast(const uint8_t *src, int32_t sw, uint8_t *dst, int32_t dw, int32_t dh,
                             int32_t cn, int32_t kx, int32_t ky) {
    int32_t area = kx * ky;
    float scale = 1.f / (float)area;
    for (int32_t dy = 0; dy < dh; dy++) {
        for (int32_t dx = 0; dx < dw; dx++) {
            for (int32_t c = 0; c < cn; c++) {
                int32_t s = 0;
                for (int32_t y = 0; y < ky; y++) {
                    const uint8_t *S = src + ((size_t)(dy * ky + y) * (size_t)sw + (size_t)dx * kx) * (size_t)cn + c;
                    for (int32_t x = 0; x < kx; x++) s += S[(size_t)x * (size_t)cn];
                }
                uint8_t v;
                if (kx == 2 && ky == 2) v = (uint8_t)((s + 2) >> 2);   /* OpenCV's 2x2 vector path */
                else v = sat_u8f((float)s * scale);
                dst[((size_t)dy * (size_t)dw + (size_t)dx) * (size_t)cn + c] = v;
            }
        }
    }
}

/* OpenCV's INTER_AREA fallback when a factor is < 1: bilinear with area coefficients. */
static void linear_coeffs(int32_t ssize, int32_t dsize, double scale, double inv_scale,
                          int32_t *ofs, int16_t *alpha, int32_t *vmax) {
    *vmax = dsize;
    for (int32_t d = 0; d < dsize; d++) {
        int32_t s = (int32_t)floor(d * scale);
        float f = (float)((d + 1) - (s + 1) * inv_scale);
        f = f <= 0 ? 0.f : f - floorf(f);
        if (s < 0) { f = 0; s = 0; }
        if (s + 1 >= ssize) {
            if (*vmax > d) *vmax = d;
            if (s >= ssize - 1) { f = 0; s = ssize - 1; }
        }
        ofs[d] = s;
        alpha[2 * d] = (int16_t)lrintf((1.f - f) * 2048.f);
        alpha[2 * d + 1] = (int16_t)lrintf(f * 2048.f);
    }
}

static int16_t mulhi16(int16_t a, int16_t b) { return (int16_t)(((int32_t)a * (int32_t)b) >> 16); }
static int16_t pack_s16(int32_t v) { return (int16_t)(v < -32768 ? -32768 : v > 32767 ? 32767 : v); }

static lora_status resize_linear_area(lora_ctx *ctx, const uint8_t *src, int32_t sw, int32_t sh,
                                      uint8_t *dst, int32_t dw, int32_t dh, int32_t cn,
                                      double scale_x, double scale_y, double inv_x, double inv_y) {
    size_t row = (size_t)dw * (size_t)cn;
    int32_t *xo = lora_malloc(ctx, (size_t)dw * sizeof *xo), *yo = lora_malloc(ctx, (size_t)dh * sizeof *yo);
    int16_t *xa = lora_malloc(ctx, 2 * (size_t)dw * sizeof *xa), *ya = lora_malloc(ctx, 2 * (size_t)dh * sizeof *ya);
    int32_t *h0 = lora_malloc(ctx, 2 * row * sizeof *h0);
    if (!xo || !yo || !xa || !ya || !h0) {
        lora_free(ctx, xo); lora_free(ctx, yo); lora_free(ctx, xa); lora_free(ctx, ya); lora_free(ctx, h0);
        return LORA_E_NOMEM;
    }
    int32_t *h1 = h0 + row, xmax, ymax;
    linear_coeffs(sw, dw, scale_x, inv_x, xo, xa, &xmax);
    linear_coeffs(sh, dh, scale_y, inv_y, yo, ya, &ymax);
    for (int32_t dy = 0; dy < dh; dy++) {
        int32_t sy0 = yo[dy], sy1 = sy0 + 1 < sh ? sy0 + 1 : sh - 1;
        /* horizontal pass: value * 2048 (exact integers) */
        for (int r = 0; r < 2; r++) {
            const uint8_t *S = src + (size_t)(r ? sy1 : sy0) * (size_t)sw * (size_t)cn;
            int32_t *H = r ? h1 : h0;
            for (int32_t dx = 0; dx < dw; dx++) {
                size_t s = (size_t)xo[dx] * (size_t)cn;
                for (int32_t c = 0; c < cn; c++) {
                    H[(size_t)dx * cn + c] = dx < xmax
                        ? S[s + c] * xa[2 * dx] + S[s + cn + c] * xa[2 * dx + 1]
                        : S[s + c] * 2048;
                }
            }
        }
        /* vertical pass as OpenCV's vector code: ((h >> 4) * beta >> 16) summed, (+2) >> 2 */
        int16_t b0 = ya[2 * dy], b1 = ya[2 * dy + 1];
        uint8_t *D = dst + (size_t)dy * row;
        for (size_t i = 0; i < row; i++) {
            int32_t v = (int32_t)mulhi16(pack_s16(h0[i] >> 4), b0) + (int32_t)mulhi16(pack_s16(h1[i] >> 4), b1);
            v = pack_s16(v);
            v = (v + 2) >> 2;
            D[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
    lora_free(ctx, xo); lora_free(ctx, yo); lora_free(ctx, xa); lora_free(ctx, ya); lora_free(ctx, h0);
    return LORA_OK;
}

lora_status img_resize_area_u8(lora_ctx *ctx, const uint8_t *src, int32_t sw, int32_t sh,
                               uint8_t *dst, int32_t dw, int32_t dh, int32_t cn) {
    if (!src || !dst || sw <= 0 || sh <= 0 || dw <= 0 || dh <= 0 || cn < 1 || cn > 4)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "img_resize_area_u8: bad sizes %dx%d -> %dx%d, %d channels",
                         sw, sh, dw, dh, cn);
    if (sw == dw && sh == dh) {
        memcpy(dst, src, (size_t)sw * (size_t)sh * (size_t)cn);
        return LORA_OK;
    }
    double inv_x = (double)dw / sw, inv_y = (double)dh / sh;
    double scale_x = 1. / inv_x, scale_y = 1. / inv_y;
    if (scale_x >= 1 && scale_y >= 1) {
        int32_t ix = (int32_t)lrint(scale_x), iy = (int32_t)lrint(scale_y);
        if (fabs(scale_x - ix) < DBL_EPSILON && fabs(scale_y - iy) < DBL_EPSILON) {
            resize_area_fast(src, sw, dst, dw, dh, cn, ix, iy);
            return LORA_OK;
        }
        return resize_area_general(ctx, src, sw, sh, dst, dw, dh, cn, scale_x, scale_y);
    }
    return resize_linear_area(ctx, src, sw, sh, dst, dw, dh, cn, scale_x, scale_y, inv_x, inv_y);
}
