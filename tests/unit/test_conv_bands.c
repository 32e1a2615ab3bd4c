/* conv2d in bands of output rows (nn_conv2d_forward_ex / nn_conv2d_backward_ex with a
 * scratch smaller than the whole im2col): outputs and input gradients against a float64
 * direct convolution (and its transpose), for stride 1 and 2, symmetric and (0,1,0,1)
 * padding, band sizes from one row to all rows; a scratch below one row is refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "nn/nn.h"
#include "../test.h"

static uint64_t rng = 0x243f6a8885a308d3ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

/* y[co, oy, ox] = sum x[ci, iy, ix] w[co, ci, ky, kx] (float64); dx = the transpose for dy */
static void direct(const struct nn_conv2d_shape *s, const float *x, const float *w, const float *dy, double *y,
                   double *dx) {
    int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), k = s->k;
    memset(y, 0, sizeof(double) * (size_t)(s->cout * oh * ow));
    memset(dx, 0, sizeof(double) * (size_t)(s->cin * s->h * s->w));
    for (int64_t co = 0; co < s->cout; co++)
        for (int64_t oy = 0; oy < oh; oy++)
            for (int64_t ox = 0; ox < ow; ox++)
                for (int64_t ci = 0; ci < s->cin; ci++)
                    for (int64_t ky = 0; ky < k; ky++)
                        for (int64_t kx = 0; kx < k; kx++) {
                            int64_t iy = oy * s->stride - s->pad_t + ky, ix = ox * s->stride - s->pad_l + kx;
                            if (iy < 0 || iy >= s->h || ix < 0 || ix >= s->w) continue;
                            double wv = w[((co * s->cin + ci) * k + ky) * k + kx];
                            y[(co * oh + oy) * ow + ox] += wv * x[(ci * s->h + iy) * s->w + ix];
                            dx[(ci * s->h + iy) * s->w + ix] += wv * dy[(co * oh + oy) * ow + ox];
                        }
}

static double rel(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / den);
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_conv_bands");
    struct lora_backend_impl *be = ctx->backend;
    const struct nn_conv2d_shape shapes[3] = {
        {1, 5, 11, 9, 7, 3, 1, 1, 1, 1, 1},
        {1, 4, 12, 10, 6, 3, 2, 1, 1, 1, 1},
        {1, 3, 10, 8, 5, 3, 2, 0, 0, 1, 1},
    };
    for (int si = 0; si < 3; si++) {
        const struct nn_conv2d_shape *s = &shapes[si];
        int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), nx = s->cin * s->h * s->w, ny = s->cout * oh * ow;
        int64_t nw = s->cout * s->cin * 9, row = nn_conv2d_cols_row_floats(s), full = nn_conv2d_cols_floats(s);
        CHECK(row * oh == full);
        float *x = malloc((size_t)nx * 4), *w = malloc((size_t)nw * 4), *dy = malloc((size_t)ny * 4);
        float *y = malloc((size_t)ny * 4), *dx = malloc((size_t)nx * 4), *cols = malloc((size_t)full * 4);
        double *ry = malloc(sizeof(double) * (size_t)ny), *rdx = malloc(sizeof(double) * (size_t)nx);
        for (int64_t i = 0; i < nx; i++) x[i] = frand();
        for (int64_t i = 0; i < nw; i++) w[i] = frand();
        for (int64_t i = 0; i < ny; i++) dy[i] = frand();
        direct(s, x, w, dy, ry, rdx);
        for (int64_t rows = 1; rows <= oh; rows++) {
            CHECK_STATUS(nn_conv2d_forward_ex(be, s, y, cols, rows * row, x, w, NULL), LORA_OK);
            CHECK_MSG(rel(y, ry, ny) < 1e-6, "shape %d, %lld rows: y rel %.2e", si, (long long)rows, rel(y, ry, ny));
            for (int64_t i = 0; i < nx; i++) dx[i] = 5.0f;   /* written, not added */
            CHECK_STATUS(nn_conv2d_backward_ex(be, s, dx, cols, rows * row, dy, w, 0), LORA_OK);
            CHECK_MSG(rel(dx, rdx, nx) < 1e-6, "shape %d, %lld rows: dx rel %.2e", si, (long long)rows, rel(dx, rdx, nx));
            /* accumulate: dx += the same again */
            CHECK_STATUS(nn_conv2d_backward_ex(be, s, dx, cols, rows * row, dy, w, 1), LORA_OK);
            for (int64_t i = 0; i < nx; i++) rdx[i] *= 2;
            CHECK_MSG(rel(dx, rdx, nx) < 1e-6, "shape %d, %lld rows: dx accumulate", si, (long long)rows);
            for (int64_t i = 0; i < nx; i++) rdx[i] /= 2;
        }
        CHECK_STATUS(nn_conv2d_forward_ex(be, s, y, cols, row - 1, x, w, NULL), LORA_E_INVALID_ARG);
        CHECK_STATUS(nn_conv2d_backward_ex(be, s, dx, cols, row - 1, dy, w, 0), LORA_E_INVALID_ARG);
        free(x); free(w); free(dy); free(y); free(dx); free(cols); free(ry); free(rdx);
    }
    lora_ctx_free(ctx);
    return test_finish("test_conv_bands");
}
