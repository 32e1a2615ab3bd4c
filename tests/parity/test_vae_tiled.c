/* Tiled VAE decode / encode (vae_decode_tiled / vae_encode_tiled) on the tiny SD v1/v2 VAEs,
 * against diffusers 0.10.2's untiled outputs (tests/data/sd/vN_image_outputs.safetensors:
 * vae.big_latent [1,4,8,12] -> vae.big_decoded [1,3,64,96] -> vae.big_mean):
 *   - one tile covering everything equals the untiled vae_decode / vae_encode bit for bit and
 *     diffusers within rel L2 1e-5;
 *   - real tiling changes the pixels: every tile has its own GroupNorm statistics and
 *     mid-block attention. The max abs / rel L2 difference from diffusers is printed for
 *     several tile sizes; it must shrink as tiles grow (these tiny random VAEs, 2-6 channels in 2
 *     groups, are far more sensitive to it than SD's: 0.2-0.26 rel L2 with 8x8 tiles);
 *   - the host API tiles a latent wider than VAE_TILE_LATENT, and the memory a plan needs for
 *     SD's real VAE at 768x768 untiled vs one 512x512 tile (printed). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora/lora.h"
#include "internal.h"
#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/vae.h"
#include "../test.h"
#include "../ref_file.h"

static double max_abs(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m) m = d;
    }
    return m;
}

static void test_version(lora_ctx *ctx, int ver, const char *dir) {
    char path[1024];
    snprintf(path, sizeof path, "%s/sd/v%d_image_outputs.safetensors", dir, ver);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v%d_diffusers", dir, ver);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    struct vae_model m;
    memset(&m, 0, sizeof m);
    if (model) CHECK_STATUS(vae_init(&m, ctx->backend, &model->sd.vae, &model->sd.cfg), LORA_OK);
    int64_t nl = 0, ni = 0;
    const float *lat = f ? ref_f32(f, "vae.big_latent", &nl) : NULL;
    const float *rdec = f ? ref_f32(f, "vae.big_decoded", &ni) : NULL;
    const float *rmean = f ? ref_f32(f, "vae.big_mean", NULL) : NULL;
    CHECK(lat && rdec && rmean && nl == 4 * 8 * 12 && ni == 3 * 64 * 96);
    if (m.weights && lat && rdec && rmean && nl == 4 * 8 * 12 && ni == 3 * 64 * 96) {
        float *img = malloc((size_t)ni * 4), *img2 = malloc((size_t)ni * 4), *mean = malloc((size_t)nl * 4);
        float *mean2 = malloc((size_t)nl * 4), *lv = malloc((size_t)nl * 4), *tin = malloc((size_t)ni * 4);
        float *tout = malloc((size_t)(ni + 2 * nl) * 4);
        /* one tile = the whole image */
        struct vae_plan p;
        CHECK_STATUS(vae_plan_init(&p, &m, 1, 64, 96), LORA_OK);
        CHECK_STATUS(vae_decode(&p, lat, img2), LORA_OK);
        CHECK_STATUS(vae_decode_tiled(&p, lat, 8, 12, 2, tin, tout, img), LORA_OK);
        CHECK(memcmp(img, img2, (size_t)ni * 4) == 0);
        ref_compare(ver, "decode, one tile", img, rdec, ni, 1e-5);
        CHECK_STATUS(vae_encode(&p, rdec, mean2, lv), LORA_OK);
        CHECK_STATUS(vae_encode_tiled(&p, rdec, 64, 96, 2, tin, tout, mean, lv), LORA_OK);
        CHECK(memcmp(mean, mean2, (size_t)nl * 4) == 0);
        ref_compare(ver, "encode, one tile", mean, rmean, nl, 1e-5);
        vae_plan_free(&p);
        /* real tiles: 4x4 latents (32x32 pixels; 3 x 5 tiles with overlap 2, 3 x 4 with 1), 6x6
         * (overlap 3), 8x8 (1 x 2 tiles, overlap 4). The difference from diffusers shrinks as
         * the tiles grow; on these tiny random VAEs (2-6 channels, 2 groups) each tile's
         * GroupNorm statistics differ a lot, so the small tiles are far off. */
        static const int64_t tl[4][2] = {{4, 1}, {4, 2}, {6, 3}, {8, 4}};
        double peak = 0, rl[4];
        for (int64_t i = 0; i < ni; i++) if (fabs(rdec[i]) > peak) peak = fabs(rdec[i]);
        for (int k = 0; k < 4; k++) {
            int64_t t = tl[k][0], ov = tl[k][1];
            CHECK_STATUS(vae_plan_init(&p, &m, 1, 8 * t, 8 * t), LORA_OK);
            if (!p.mem) { rl[k] = 1; continue; }
            CHECK_STATUS(vae_decode_tiled(&p, lat, 8, 12, ov, tin, tout, img), LORA_OK);
            double d = max_abs(img, rdec, ni);
            rl[k] = rel_l2(img, rdec, ni);
            printf("v%d tiled decode %lldx%lld tiles, overlap %lld: max |tiled - diffusers| %.3e (max |diffusers| %.2f), "
                   "rel L2 %.3e\n", ver, (long long)t, (long long)t, (long long)ov, d, peak, rl[k]);
            CHECK_STATUS(vae_encode_tiled(&p, rdec, 64, 96, ov, tin, tout, mean, lv), LORA_OK);
            printf("v%d tiled encode %lldx%lld tiles, overlap %lld: max |tiled - diffusers| %.3e, rel L2 %.3e\n", ver,
                   (long long)t, (long long)t, (long long)ov, max_abs(mean, rmean, nl), rel_l2(mean, rmean, nl));
            CHECK(rel_l2(mean, rmean, nl) < 1.0);
            int lv_ok = 1;
            for (int64_t i = 0; i < nl; i++) lv_ok &= lv[i] >= -30.0f && lv[i] <= 20.0f;
            CHECK(lv_ok);
            if (k < 3) vae_plan_free(&p);
        }
        CHECK_MSG(rl[3] < 0.3 && rl[3] < rl[2] && rl[2] < rl[0], "v%d tiled decode: rel L2 %.3e / %.3e / %.3e (8x8 / "
                  "6x6 / 4x4 tiles)", ver, rl[3], rl[2], rl[0]);
        vae_plan_free(&p);
        CHECK_STATUS(vae_plan_init(&p, &m, 1, 32, 32), LORA_OK);
        /* bad tilings */
        CHECK_STATUS(vae_decode_tiled(&p, lat, 8, 12, 4, tin, tout, img), LORA_E_INVALID_ARG);
        CHECK_STATUS(vae_decode_tiled(&p, lat, 2, 12, 1, tin, tout, img), LORA_E_INVALID_ARG);
        CHECK_STATUS(vae_encode_tiled(&p, rdec, 60, 96, 1, tin, tout, mean, NULL), LORA_E_INVALID_ARG);
        vae_plan_free(&p);
        free(img); free(img2); free(mean); free(mean2); free(lv); free(tin); free(tout);

        /* the host API: a latent wider than VAE_TILE_LATENT goes through tiles */
        int64_t W = VAE_TILE_LATENT + 8, nb = 4 * 8 * W, nimg = 3 * 64 * (8 * W);
        float *big = malloc((size_t)nb * 4), *out = malloc((size_t)nimg * 4), *ref = malloc((size_t)nimg * 4);
        for (int64_t i = 0; i < nb; i++) big[i] = lat[i % nl];
        CHECK_STATUS(lora_model_vae_decode(model, big, 1, 8, W, out, (uint64_t)nimg), LORA_OK);
        CHECK_STATUS(vae_plan_init(&p, &m, 1, 64, 8 * W), LORA_OK);
        if (p.mem) {
            CHECK_STATUS(vae_decode(&p, big, ref), LORA_OK);
            double d = max_abs(out, ref, nimg);
            printf("v%d host decode of 8x%lld latents (tiled, 2 tiles): max |tiled - untiled| %.3e, rel L2 %.3e\n", ver,
                   (long long)W, d, rel_l2(out, ref, nimg));
            CHECK(d > 0 && rel_l2(out, ref, nimg) < 0.1);
            float *mh = malloc((size_t)nb * 4), *mu = malloc((size_t)nb * 4), *lu = malloc((size_t)nb * 4);
            CHECK_STATUS(lora_model_vae_encode(model, ref, 1, 64, 8 * W, mh, NULL, (uint64_t)nb), LORA_OK);
            CHECK_STATUS(vae_encode(&p, ref, mu, lu), LORA_OK);
            printf("v%d host encode of 64x%lld pixels (tiled): rel L2 vs untiled %.3e\n", ver, (long long)(8 * W),
                   rel_l2(mh, mu, nb));
            CHECK(rel_l2(mh, mu, nb) < 0.1);
            free(mh); free(mu); free(lu);
        }
        vae_plan_free(&p);
        free(big); free(out); free(ref);
    }
    vae_free(&m);
    lora_model_free(model);
    if (f) st_close(f);
}

/* SD's VAE (128/256/512/512, 2 layers, 32 groups): the plan a 768x768 decode needs untiled
 * and as 512x512 tiles (no weights needed to size a plan). */
static void test_plan_sizes(lora_ctx *ctx) {
    struct vae_model m;
    memset(&m, 0, sizeof m);
    m.be = ctx->backend;
    m.levels = 4; m.layers = 2; m.groups = 32; m.latent = 4; m.in_ch = 3;
    m.ch[0] = 128; m.ch[1] = 256; m.ch[2] = 512; m.ch[3] = 512;
    uint64_t full = vae_plan_bytes_for(&m, 1, 768, 768), tile = vae_plan_bytes_for(&m, 1, 512, 512);
    /* before banded im2col and per-level sizing: 8 x 512 x 768^2 floats + 512 x 9 x 768^2 floats */
    double old = (8.0 * 512 + 512.0 * 9) * 768 * 768 * 4;
    printf("SD VAE plan at 768x768: %.2f GiB untiled (%.2f GiB with the old sizing), %.2f GiB per 512x512 tile\n",
           full / 1073741824.0, old / 1073741824.0, tile / 1073741824.0);
    CHECK(full > tile && tile > 0 && tile < (uint64_t)3 << 29);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_vae_tiled");
    test_version(ctx, 1, dir);
    test_version(ctx, 2, dir);
    test_plan_sizes(ctx);
    lora_ctx_free(ctx);
    return test_finish("test_vae_tiled");
}
