/* U-Net forward parity with diffusers 0.10.2 UNet2DConditionModel on the tiny SD v1 (conv
 * proj_in/out, 2 heads) and v2 (linear proj, heads [2,2,4,4]) models: unet.out for timesteps
 * [1, 999], the Python-int and Python-float timestep cases, against
 * tests/data/sd/vN_reference_outputs.safetensors, relative L2 <= 1e-5. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/unet.h"
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
    struct unet_model m;
    CHECK_STATUS(unet_init(&m, ctx->backend, &model->sd.unet, &model->sd.cfg), LORA_OK);
    if (f && m.weights) {
        int64_t ns = 0, nc = 0;
        const float *x = ref_f32(f, "unet.sample_in", &ns);
        const float *ctxt = ref_f32(f, "te.last_hidden_state", &nc);
        int64_t B = 2, C = model->sd.cfg.unet_in_channels, h = 8, w = 8;
        int64_t T = nc / (B * model->sd.cfg.context_dim);
        CHECK(x && ctxt && ns == B * C * h * w && T == 77);
        struct unet_plan p;
        CHECK_STATUS(unet_plan_init(&p, &m, B, h, w, T), LORA_OK);
        if (x && ctxt && p.mem) {
            float *out = malloc((size_t)ns * 4), t[2];
            CHECK(ref_as_floats(f, "unet.timesteps", t, 2) == 2);
            CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
            compare(ver, "out (t = 1, 999)", out, ref_f32(f, "unet.out", NULL), ns);
            CHECK(ref_as_floats(f, "unet.timestep_int", t, 1) == 1);
            t[1] = t[0];
            CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
            compare(ver, "out (int timestep)", out, ref_f32(f, "unet.out_timestep_int", NULL), ns);
            CHECK(ref_as_floats(f, "unet.timestep_float", t, 1) == 1);
            t[1] = t[0];
            CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
            compare(ver, "out (float timestep)", out, ref_f32(f, "unet.out_timestep_float", NULL), ns);
            free(out);
        }
        unet_plan_free(&p);
        CHECK_STATUS(unet_plan_init(&p, &m, B, 0, 8, T), LORA_E_INVALID_ARG);   /* other sizes: test_unet_odd */
    }
    unet_free(&m);
    if (f) st_close(f);
    lora_model_free(model);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_unet");
    test_version(ctx, 1, dir);
    test_version(ctx, 2, dir);
    lora_ctx_free(ctx);
    return test_finish("test_unet");
}
