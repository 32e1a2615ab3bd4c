/* VAE parity with diffusers 0.10.2 AutoencoderKL on the tiny SD v1/v2 models: posterior mean,
 * logvar and the decode of the mean against tests/data/sd/vN_reference_outputs.safetensors
 * (make_sd_reference_outputs.py), relative L2 <= 1e-5. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/vae.h"
#include "../test.h"
#include "../ref_file.h"

#define OUT_TOL 1e-5

#define compare(ver, what, got, want, n) ref_compare(ver, what, got, want, n, OUT_TOL)

static void test_version(lora_ctx *ctx, int ver, const char *dir) {
    lora_model *model = NULL;
    struct lora_file *f = NULL;
    if (!ref_open_version(ctx, dir, ver, &model, &f)) {
        lora_model_free(model);
        st_close(f);
        return;
    }
    struct vae_model m;
    CHECK_STATUS(vae_init(&m, ctx->backend, &model->sd.vae, &model->sd.cfg), LORA_OK);
    if (f && m.weights) {
        int64_t n_img = 0, n_lat = 0;
        const float *img = ref_f32(f, "vae.image", &n_img);
        const float *rmean = ref_f32(f, "vae.posterior_mean", &n_lat);
        const float *rlogvar = ref_f32(f, "vae.posterior_logvar", NULL);
        const float *rdec = ref_f32(f, "vae.decoded", NULL);
        CHECK(img && rmean && n_img == 3 * 32 * 32);
        struct vae_plan p;
        CHECK_STATUS(vae_plan_init(&p, &m, 1, 32, 32), LORA_OK);
        if (img && rmean && p.mem) {
            float *mean = malloc((size_t)n_lat * 4), *logvar = malloc((size_t)n_lat * 4);
            float *dec = malloc((size_t)n_img * 4);
            CHECK_STATUS(vae_encode(&p, img, mean, logvar), LORA_OK);
            compare(ver, "posterior mean", mean, rmean, n_lat);
            compare(ver, "posterior logvar", logvar, rlogvar, n_lat);
            CHECK_STATUS(vae_decode(&p, rmean, dec), LORA_OK);
            compare(ver, "decoded", dec, rdec, n_img);
            /* the plan is reusable: a second encode gives the same bits */
            float *mean2 = malloc((size_t)n_lat * 4);
            CHECK_STATUS(vae_encode(&p, img, mean2, logvar), LORA_OK);
            CHECK(memcmp(mean, mean2, (size_t)n_lat * 4) == 0);
            free(mean); free(logvar); free(dec); free(mean2);
        }
        vae_plan_free(&p);
        /* a size that is not a multiple of the downsampling factor */
        CHECK_STATUS(vae_plan_init(&p, &m, 1, 30, 32), LORA_E_INVALID_ARG);
    }
    vae_free(&m);
    if (f) st_close(f);
    lora_model_free(model);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_vae");
    test_version(ctx, 1, dir);
    test_version(ctx, 2, dir);
    lora_ctx_free(ctx);
    return test_finish("test_vae");
}
