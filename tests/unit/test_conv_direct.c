/* conv2d forward (nn_conv2d_forward_ex, the CPU backend's im2col with its stride-1 memcpy
 * rows and threaded row loop) against a float64 direct convolution: odd channel counts
 * (3, 5), 7x9 inputs, padding 1 and (0,1,0,1), stride 1 and 2, bias, batch 2, and one input
 * large enough to run the im2col loop on several threads; every element within 1e-5 of the
 * reference relative to the output's largest magnitude. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "nn/nn.h"
#include "../test.h"

static uint64_t rng = 0x13198a2e03707344ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

/* y[b, co, oy, ox] = bias[co] + sum x[b, ci, iy, ix] w[co, ci, ky, kx], in float64 */
static void direct(const struct nn_conv2d_shape *s, const float *x, const float *w, const float *bias, double *y) {
    int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), k = s->k;
    for (int64_t b = 0; b < s->batch; b++)
        for (int64_t co = 0; co < s->cout; co++)
            for (int64_t oy = 0; oy < oh; oy++)
                for (int64_t ox = 0; ox < ow; ox++) {
                    double acc = bias ? bias[co] : 0.0;
                    for (int64_t ci = 0; ci < s->cin; ci++)
                        for (int64_t ky = 0; ky < k; ky++)
                            for (int64_t kx = 0; kx < k; kx++) {
                                int64_t iy = oy * s->stride - s->pad_t + ky, ix = ox * s->stride - s->pad_l + kx;
                                if (iy < 0 || iy >= s->h || ix < 0 || ix >= s->w) continue;
                                acc += (double)w[((co * s->cin + ci) * k + ky) * k + kx] *
                                       x[((b * s->cin + ci) * s->h + iy) * s->w + ix];
                            }
                    y[((b * s->cout + co) * oh + oy) * ow + ox] = acc;
                }
}

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_conv_direct");
    struct lora_backend_impl *be = ctx->backend;
    /* batch, cin, h, w, cout, k, stride, pad_t, pad_l, pad_b, pad_r */
    const struct nn_conv2d_shape shapes[] = {
        {2, 3, 7, 9, 5, 3, 1, 1, 1, 1, 1},
        {2, 5, 7, 9, 3, 3, 1, 1, 1, 1, 1},
        {2, 3, 7, 9, 5, 3, 2, 1, 1, 1, 1},
        {2, 5, 7, 9, 3, 3, 2, 0, 0, 1, 1},
        {2, 5, 7, 9, 3, 3, 1, 0, 0, 1, 1},
        {2, 3, 7, 9, 5, 1, 1, 0, 0, 0, 0},
        {2, 5, 45, 67, 3, 3, 1, 1, 1, 1, 1},   /* 45 im2col rows of 3015: the threaded path */
    };
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const struct nn_conv2d_shape *s = &shapes[si];
        int64_t oh = nn_conv2d_oh(s), ow = nn_conv2d_ow(s), nx = s->batch * s->cin * s->h * s->w;
        int64_t ny = s->batch * s->cout * oh * ow, nw = s->cout * s->cin * s->k * s->k;
        int64_t full = nn_conv2d_cols_floats(s);
        float *x = malloc((size_t)nx * 4), *w = malloc((size_t)nw * 4), *bias = malloc((size_t)s->cout * 4);
        float *y = malloc((size_t)ny * 4), *cols = malloc((size_t)(full > 0 ? full : 1) * 4);
        double *ry = malloc(sizeof(double) * (size_t)ny);
        for (int64_t i = 0; i < nx; i++) x[i] = frand();
        for (int64_t i = 0; i < nw; i++) w[i] = frand();
        for (int64_t i = 0; i < s->cout; i++) bias[i] = frand();
        direct(s, x, w, bias, ry);
        for (int64_t i = 0; i < ny; i++) y[i] = NAN;   /* every output must be written */
        CHECK_STATUS(nn_conv2d_forward_ex(be, s, y, cols, full, x, w, bias), LORA_OK);
        double scale = 0, err = 0;
        for (int64_t i = 0; i < ny; i++) scale = fabs(ry[i]) > scale ? fabs(ry[i]) : scale;
        for (int64_t i = 0; i < ny; i++) {
            double e = isfinite(y[i]) ? fabs(y[i] - ry[i]) : INFINITY;
            if (e > err) err = e;
        }
        CHECK_MSG(err <= 1e-5 * scale, "shape %zu: max error %.3e of scale %.3e", si, err, scale);
        free(x); free(w); free(bias); free(y); free(cols); free(ry);
    }
    lora_ctx_free(ctx);
    return test_finish("test_conv_direct");
}
