/* The host API (lora_model_unet_predict, lora_model_vae_encode, lora_model_vae_decode) on the
 * tiny SD v1/v2 diffusers folders: outputs equal diffusers 0.10.2
 * (tests/data/sd/vN_reference_outputs.safetensors) within relative L2 1e-5, the per-shape plan
 * cache replans on a shape change, bad inputs give their statuses, and freeing the model
 * returns every byte. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora/lora.h"
#include "internal.h"
#include "io/safetensors.h"
#include "../test.h"
#include "../ref_file.h"

#define OUT_TOL 1e-5

#define compare(ver, what, got, want, n) ref_compare(ver, what, got, want, n, OUT_TOL)

static void test_unet(lora_model *model, const struct lora_file *f, int ver) {
    int64_t ns = 0, nc = 0, X = 0;
    CHECK_STATUS(lora_model_get_int(model, LORA_MODEL_CONTEXT_DIM, &X), LORA_OK);
    const float *x = ref_f32(f, "unet.sample_in", &ns), *ctxt = ref_f32(f, "te.last_hidden_state", &nc);
    const float *want = ref_f32(f, "unet.out", NULL);
    int64_t B = 2, h = 8, w = 8, T = X ? nc / (B * X) : 0;
    CHECK(x && ctxt && want && ns == B * 4 * h * w && T == 77);
    if (!x || !ctxt || !want || T != 77) return;
    float t[2], *out = calloc((size_t)ns, 4);
    CHECK(ref_as_floats(f, "unet.timesteps", t, 2) == 2);
    CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_OK);
    compare(ver, "unet_predict (t = 1, 999)", out, want, ns);
    /* a different shape (batch 1) replans; then the first shape again */
    float *one = calloc((size_t)ns / 2, 4);
    CHECK_STATUS(lora_model_unet_predict(model, x + ns / 2, 1, h, w, t + 1, ctxt + nc / 2, T, one, (uint64_t)ns / 2),
                 LORA_OK);
    compare(ver, "unet_predict (batch 1)", one, want + ns / 2, ns / 2);
    float ti[2];
    CHECK(ref_as_floats(f, "unet.timestep_float", ti, 1) == 1);
    ti[1] = ti[0];
    CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, ti, ctxt, T, out, (uint64_t)ns), LORA_OK);
    compare(ver, "unet_predict (float t)", out, ref_f32(f, "unet.out_timestep_float", NULL), ns);
    /* errors */
    CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, t, ctxt, T, out, (uint64_t)ns - 1), LORA_E_LIMIT);
    CHECK_STATUS(lora_model_unet_predict(model, x, 1, 0, 8, t, ctxt, T, out, (uint64_t)ns), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_unet_predict(model, x, 0, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_unet_predict(model, x, 1, h, w, t, ctxt, 0, out, (uint64_t)ns), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_unet_predict(model, NULL, 1, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_E_INVALID_ARG);
    float *bad = malloc((size_t)ns * 4);
    memcpy(bad, x, (size_t)ns * 4);
    bad[5] = NAN;
    CHECK_STATUS(lora_model_unet_predict(model, bad, B, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_E_NONFINITE_INPUT);
    float tn[2] = {1.0f, INFINITY};
    CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, tn, ctxt, T, out, (uint64_t)ns), LORA_E_NONFINITE_INPUT);
    /* still good after the errors */
    CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_OK);
    compare(ver, "unet_predict (again)", out, want, ns);
    free(bad);
    free(one);
    free(out);
}

static void test_vae(lora_model *model, const struct lora_file *f, int ver) {
    int64_t n_img = 0, n_lat = 0;
    const float *img = ref_f32(f, "vae.image", &n_img), *rmean = ref_f32(f, "vae.posterior_mean", &n_lat);
    const float *rlogvar = ref_f32(f, "vae.posterior_logvar", NULL), *rdec = ref_f32(f, "vae.decoded", NULL);
    CHECK(img && rmean && rlogvar && rdec && n_img == 3 * 32 * 32 && n_lat == 4 * 4 * 4);
    if (!img || !rmean || !rlogvar || !rdec || n_img != 3 * 32 * 32 || n_lat != 4 * 4 * 4) return;
    float *mean = calloc((size_t)n_lat, 4), *logvar = calloc((size_t)n_lat, 4), *dec = calloc((size_t)n_img, 4);
    CHECK_STATUS(lora_model_vae_encode(model, img, 1, 32, 32, mean, logvar, (uint64_t)n_lat), LORA_OK);
    compare(ver, "vae_encode mean", mean, rmean, n_lat);
    compare(ver, "vae_encode logvar", logvar, rlogvar, n_lat);
    CHECK_STATUS(lora_model_vae_encode(model, img, 1, 32, 32, mean, NULL, (uint64_t)n_lat), LORA_OK);
    compare(ver, "vae_encode mean (no logvar)", mean, rmean, n_lat);
    CHECK_STATUS(lora_model_vae_decode(model, rmean, 1, 4, 4, dec, (uint64_t)n_img), LORA_OK);
    compare(ver, "vae_decode", dec, rdec, n_img);
    /* errors */
    CHECK_STATUS(lora_model_vae_encode(model, img, 1, 32, 32, mean, logvar, (uint64_t)n_lat - 1), LORA_E_LIMIT);
    CHECK_STATUS(lora_model_vae_encode(model, img, 1, 30, 32, mean, logvar, (uint64_t)n_lat), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_vae_encode(model, NULL, 1, 32, 32, mean, logvar, (uint64_t)n_lat), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_vae_decode(model, rmean, 1, 4, 4, dec, (uint64_t)n_img - 1), LORA_E_LIMIT);
    CHECK_STATUS(lora_model_vae_decode(model, rmean, 0, 4, 4, dec, (uint64_t)n_img), LORA_E_CONFIG_RANGE);
    float *bad = malloc((size_t)n_img * 4);
    memcpy(bad, img, (size_t)n_img * 4);
    bad[17] = NAN;
    CHECK_STATUS(lora_model_vae_encode(model, bad, 1, 32, 32, mean, logvar, (uint64_t)n_lat), LORA_E_NONFINITE_INPUT);
    memcpy(bad, rmean, (size_t)n_lat * 4);
    bad[3] = -INFINITY;
    CHECK_STATUS(lora_model_vae_decode(model, bad, 1, 4, 4, dec, (uint64_t)n_img), LORA_E_NONFINITE_INPUT);
    free(bad);
    free(mean);
    free(logvar);
    free(dec);
}

static void test_version(lora_ctx *ctx, int ver, const char *dir) {
    char path[1024];
    uint64_t before = 0, after = 0, dev_before = 0, dev_after = 0;
    CHECK_STATUS(lora_ctx_memory(ctx, &before, NULL, &dev_before, NULL), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v%d_reference_outputs.safetensors", dir, ver);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v%d_diffusers", dir, ver);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (model && f) {
        test_unet(model, f, ver);
        test_vae(model, f, ver);
    }
    CHECK_STATUS(lora_model_unet_predict(NULL, NULL, 1, 8, 8, NULL, NULL, 77, NULL, 0), LORA_E_INVALID_ARG);
    lora_model_free(model);
    if (f) st_close(f);
    CHECK_STATUS(lora_ctx_memory(ctx, &after, NULL, &dev_after, NULL), LORA_OK);
    CHECK_MSG(after == before && dev_after == dev_before, "v%d: %llu host / %llu device bytes before, %llu / %llu after",
              ver, (unsigned long long)before, (unsigned long long)dev_before, (unsigned long long)after,
              (unsigned long long)dev_after);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_host_api");
    test_version(ctx, 1, dir);
    test_version(ctx, 2, dir);
    lora_ctx_free(ctx);
    return test_finish("test_host_api");
}
