/* The CUDA backend's image-op primitives (kernels/image.cu) against the CPU backend on the
 * same random inputs: im2col with explicit and shifted (band) padding, col2im (= and +=),
 * per-row scalar add, row sums, GroupNorm with and without SiLU and its backward, nearest 2x
 * upsample and its backward, GEGLU and its backward, the timestep embedding and the clamp;
 * then the nn-level banded conv2d forward/backward. Error: max|gpu - cpu| / max|cpu|. Exits
 * 77 (skipped) without a usable GPU. */
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "core/rng.h"
#include "nn/nn.h"
#include "../test.h"

static struct lora_backend_impl *cpu, *gpu;
static struct lora_mt19937 rng;

#define TOL_EW 2e-6     /* elementwise and gathers (a few ulp) */
#define TOL_RED 2e-5    /* reductions in a different order */
#define TOL_GEMM 1e-4   /* cuBLAS sgemm inside the op */

static float *host_randn(int64_t n, float scale, float shift) {
    float *h = malloc((size_t)n * 4);
    lora_torch_randn(&rng, h, n);
    for (int64_t i = 0; i < n; i++) h[i] = h[i] * scale + shift;
    return h;
}

static float *up(const float *h, int64_t n) {
    void *d = NULL;
    CHECK_STATUS(gpu->iface->buf_alloc(gpu, (size_t)n * 4, &d), LORA_OK);
    if (d) CHECK_STATUS(gpu->iface->upload(gpu, d, h, (size_t)n * 4), LORA_OK);
    return d;
}

static double max_err(const float *got, const float *want, int64_t n) {
    double m = 0, e = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!(fabs((double)want[i]) <= m)) m = fabs((double)want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= e)) e = d;
    }
    return e / (m > 0 ? m : 1);
}

static void same(const char *what, const float *d, const float *want, int64_t n, double tol) {
    float *h = malloc((size_t)n * 4);
    CHECK_STATUS(gpu->iface->download(gpu, h, d, (size_t)n * 4), LORA_OK);
    double e = max_err(h, want, n);
    CHECK_MSG(e <= tol, "%s: max err / max |cpu| = %.3e > %.1e", what, e, tol);
    printf("  %-34s %.2e\n", what, e);
    free(h);
}

static void test_primitives(void) {
    printf("image primitives (gpu vs cpu, max err / max |cpu|):\n");
    const int64_t B = 2, C = 12, H = 9, W = 7, G = 3, HW = H * W, N = B * C * HW;
    float *x = host_randn(N, 1.3f, 0.2f), *dy = host_randn(N, 1, 0), *g = host_randn(C, 0.5f, 1), *bt = host_randn(C, 0.3f, 0);
    float *dx_ = up(x, N), *ddy = up(dy, N), *dg = up(g, C), *db = up(bt, C);
    /* im2col / col2im: stride 1 pad 1, stride 2 pad (0,1), a band with pad_t shifted by 2 rows */
    const int64_t cfg[3][5] = {{1, 1, 1, 9, 7}, {2, 0, 0, 4, 3}, {1, -1, 1, 4, 7}};
    for (int k = 0; k < 3; k++) {
        int64_t st = cfg[k][0], pt = cfg[k][1], pl = cfg[k][2], oh = cfg[k][3], ow = cfg[k][4], nc = C * 9 * oh * ow;
        float *hc = malloc((size_t)nc * 4), *dc = up(hc, nc), *hx = malloc((size_t)C * HW * 4);
        CHECK_STATUS(cpu->iface->im2col_ex_f32(cpu, x, C, H, W, 3, 3, st, pt, pl, oh, ow, hc), LORA_OK);
        CHECK_STATUS(gpu->iface->im2col_ex_f32(gpu, dx_, C, H, W, 3, 3, st, pt, pl, oh, ow, dc), LORA_OK);
        same(k == 0 ? "im2col_ex s1 p1" : k == 1 ? "im2col_ex s2 p(0,1)" : "im2col_ex band", dc, hc, nc, TOL_EW);
        float *cc = host_randn(nc, 1, 0), *dcc = up(cc, nc), *dxo = up(x, C * HW);
        for (int acc = 0; acc < 2; acc++) {
            memcpy(hx, x, (size_t)C * HW * 4);
            CHECK_STATUS(gpu->iface->upload(gpu, dxo, x, (size_t)C * HW * 4), LORA_OK);
            CHECK_STATUS(cpu->iface->col2im_f32(cpu, cc, C, H, W, 3, 3, st, pt, pl, oh, ow, hx, acc), LORA_OK);
            CHECK_STATUS(gpu->iface->col2im_f32(gpu, dcc, C, H, W, 3, 3, st, pt, pl, oh, ow, dxo, acc), LORA_OK);
            same(acc ? "col2im +=" : "col2im =", dxo, hx, C * HW, TOL_RED);
        }
        free(hc); free(hx); free(cc);
        gpu->iface->buf_free(gpu, dc); gpu->iface->buf_free(gpu, dcc); gpu->iface->buf_free(gpu, dxo);
    }
    /* add_row_scalar, row_sum */
    float *hy = malloc((size_t)N * 4), *dyy = up(x, N), *rs = malloc((size_t)B * C * 4), *drs = up(g, B * C);
    memcpy(hy, x, (size_t)N * 4);
    CHECK_STATUS(cpu->iface->add_row_scalar_f32(cpu, B * C, HW, g, C, hy), LORA_OK);
    CHECK_STATUS(gpu->iface->add_row_scalar_f32(gpu, B * C, HW, dg, C, dyy), LORA_OK);
    same("add_row_scalar", dyy, hy, N, TOL_EW);
    CHECK_STATUS(cpu->iface->row_sum_f32(cpu, B * C, HW, x, 0.0f, rs), LORA_OK);
    CHECK_STATUS(gpu->iface->row_sum_f32(gpu, B * C, HW, dx_, 0.0f, drs), LORA_OK);
    same("row_sum", drs, rs, B * C, TOL_RED);
    /* GroupNorm (+ SiLU) and backward */
    float *hm = malloc((size_t)B * G * 4), *hr = malloc((size_t)B * G * 4), *dm = up(hm, B * G), *dr = up(hr, B * G);
    float *hd = malloc((size_t)N * 4), *dd = up(x, N);
    for (int silu = 0; silu < 2; silu++) {
        CHECK_STATUS(cpu->iface->groupnorm_f32(cpu, B, C, HW, G, 1e-5f, silu, x, g, bt, hy, hm, hr), LORA_OK);
        CHECK_STATUS(gpu->iface->groupnorm_f32(gpu, B, C, HW, G, 1e-5f, silu, dx_, dg, db, dyy, dm, dr), LORA_OK);
        same(silu ? "groupnorm + silu" : "groupnorm", dyy, hy, N, TOL_RED);
        same("groupnorm rstd", dr, hr, B * G, TOL_RED);
        for (int acc = 0; acc < 2; acc++) {
            memcpy(hd, dy, (size_t)N * 4);
            CHECK_STATUS(gpu->iface->upload(gpu, dd, dy, (size_t)N * 4), LORA_OK);
            CHECK_STATUS(cpu->iface->groupnorm_backward_f32(cpu, B, C, HW, G, silu, dy, x, hm, hr, g, bt, hd, acc),
                         LORA_OK);
            CHECK_STATUS(gpu->iface->groupnorm_backward_f32(gpu, B, C, HW, G, silu, ddy, dx_, dm, dr, dg, db, dd, acc),
                         LORA_OK);
            same(silu ? "groupnorm + silu backward" : "groupnorm backward", dd, hd, N, TOL_RED);
        }
    }
    /* upsample */
    float *hu = malloc((size_t)N * 4 * 4), *du = up(hu, N * 4);
    CHECK_STATUS(cpu->iface->upsample2x_f32(cpu, B * C, H, W, x, hu), LORA_OK);
    CHECK_STATUS(gpu->iface->upsample2x_f32(gpu, B * C, H, W, dx_, du), LORA_OK);
    same("upsample2x", du, hu, N * 4, 0);
    float *hub = host_randn(N * 4, 1, 0), *dub = up(hub, N * 4);
    CHECK_STATUS(cpu->iface->upsample2x_backward_f32(cpu, B * C, H, W, hub, hy), LORA_OK);
    CHECK_STATUS(gpu->iface->upsample2x_backward_f32(gpu, B * C, H, W, dub, dyy), LORA_OK);
    same("upsample2x backward", dyy, hy, N, TOL_EW);
    /* nearest resize to sizes that are not 2x (the U-Net at odd latent sizes) */
    const int64_t rs_hw[2][2] = {{2 * H - 1, 2 * W - 1}, {H, W + 1}};
    for (int k = 0; k < 2; k++) {
        int64_t oh = rs_hw[k][0], ow = rs_hw[k][1];
        CHECK_STATUS(cpu->iface->upsample_nearest_f32(cpu, B * C, H, W, oh, ow, x, hu), LORA_OK);
        CHECK_STATUS(gpu->iface->upsample_nearest_f32(gpu, B * C, H, W, oh, ow, dx_, du), LORA_OK);
        same("upsample nearest", du, hu, B * C * oh * ow, 0);
        CHECK_STATUS(cpu->iface->upsample_nearest_backward_f32(cpu, B * C, H, W, oh, ow, hub, hy), LORA_OK);
        CHECK_STATUS(gpu->iface->upsample_nearest_backward_f32(gpu, B * C, H, W, oh, ow, dub, dyy), LORA_OK);
        same("upsample nearest backward", dyy, hy, N, TOL_EW);
    }
    /* GEGLU: x as [N/2, 2 * inner] */
    int64_t inner = HW, rows = N / (2 * inner);
    CHECK_STATUS(cpu->iface->geglu_f32(cpu, rows, inner, x, hy), LORA_OK);
    CHECK_STATUS(gpu->iface->geglu_f32(gpu, rows, inner, dx_, dyy), LORA_OK);
    same("geglu", dyy, hy, rows * inner, TOL_EW);
    CHECK_STATUS(cpu->iface->geglu_backward_f32(cpu, rows, inner, x, dy, hd), LORA_OK);
    CHECK_STATUS(gpu->iface->geglu_backward_f32(gpu, rows, inner, dx_, ddy, dd), LORA_OK);
    same("geglu backward", dd, hd, N, TOL_EW);
    /* timestep embedding (t up to 999: sin/cos of large arguments) and clamp */
    float t[3] = {1.0f, 333.25f, 999.0f}, *dt = up(t, 3);
    CHECK_STATUS(cpu->iface->timestep_embedding_f32(cpu, 3, 320, t, 1, 0.0f, 10000.0f, hy), LORA_OK);
    CHECK_STATUS(gpu->iface->timestep_embedding_f32(gpu, 3, 320, dt, 1, 0.0f, 10000.0f, dyy), LORA_OK);
    same("timestep embedding", dyy, hy, 3 * 320, 1e-4);
    memcpy(hy, x, (size_t)N * 4);
    CHECK_STATUS(gpu->iface->upload(gpu, dyy, x, (size_t)N * 4), LORA_OK);
    CHECK_STATUS(cpu->iface->clamp_f32(cpu, N, -0.5f, 0.7f, hy), LORA_OK);
    CHECK_STATUS(gpu->iface->clamp_f32(gpu, N, -0.5f, 0.7f, dyy), LORA_OK);
    same("clamp", dyy, hy, N, 0);
    free(x); free(dy); free(g); free(bt); free(hy); free(rs); free(hm); free(hr); free(hd); free(hu); free(hub);
    void *bufs[] = {dx_, ddy, dg, db, dyy, drs, dm, dr, dd, du, dub, dt};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) gpu->iface->buf_free(gpu, bufs[i]);
}

/* nn_conv2d_forward_ex / backward_ex in 3-row bands on both backends */
static void test_conv(void) {
    printf("banded conv2d (gpu vs cpu):\n");
    const struct nn_conv2d_shape s = {2, 6, 10, 8, 5, 3, 1, 1, 1, 1, 1};
    int64_t nx = 2 * 6 * 80, ny = 2 * 5 * 80, nw = 5 * 6 * 9, cf = 3 * nn_conv2d_cols_row_floats(&s);
    float *x = host_randn(nx, 1, 0), *w = host_randn(nw, 0.3f, 0), *b = host_randn(5, 1, 0), *dy = host_randn(ny, 1, 0);
    float *y = malloc((size_t)ny * 4), *dx = malloc((size_t)nx * 4), *cols = malloc((size_t)cf * 4);
    float *gx = up(x, nx), *gw = up(w, nw), *gb = up(b, 5), *gdy = up(dy, ny), *gy = up(y, ny), *gdx = up(x, nx);
    float *gc = up(cols, cf);
    CHECK_STATUS(nn_conv2d_forward_ex(cpu, &s, y, cols, cf, x, w, b), LORA_OK);
    CHECK_STATUS(nn_conv2d_forward_ex(gpu, &s, gy, gc, cf, gx, gw, gb), LORA_OK);
    same("conv2d forward, 3-row bands", gy, y, ny, TOL_GEMM);
    CHECK_STATUS(nn_conv2d_backward_ex(cpu, &s, dx, cols, cf, dy, w, 0), LORA_OK);
    CHECK_STATUS(nn_conv2d_backward_ex(gpu, &s, gdx, gc, cf, gdy, gw, 0), LORA_OK);
    same("conv2d backward, 3-row bands", gdx, dx, nx, TOL_GEMM);
    free(x); free(w); free(b); free(dy); free(y); free(dx); free(cols);
    void *bufs[] = {gx, gw, gb, gdy, gy, gdx, gc};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) gpu->iface->buf_free(gpu, bufs[i]);
}

int main(void) {
    float a[4] = {1, -2, 3, 0.5f}, bb[4] = {1, -2, 3, 0.5f};
    bb[3] += 3e-3f;
    if (!(max_err(bb, a, 4) > TOL_GEMM) || !(max_err(a, a, 4) == 0)) {
        printf("test_cuda_image: the comparator does not detect a 1e-3 error\n");
        return 1;
    }
    const char *why = NULL;
    if (lora_cuda_probe(&why, NULL) != LORA_OK) {
        printf("test_cuda_image: skipped: %s\n", why);
        return 77;
    }
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_cuda_image");
    CHECK_STATUS(lora_backend_cpu_create(ctx, &cpu), LORA_OK);
    CHECK_STATUS(lora_backend_cuda_create(ctx, 0, &gpu), LORA_OK);
    if (!gpu || !cpu) {
        lora_backend_free(cpu);
        lora_ctx_free(ctx);
        return test_finish("test_cuda_image");
    }
    lora_mt_seed(&rng, 6006);
    test_primitives();
    test_conv();
    lora_backend_free(gpu);
    lora_backend_free(cpu);
    lora_ctx_free(ctx);
    return test_finish("test_cuda_image");
}
