/* The U-Net at latent sizes that are not multiples of 2^(levels - 1) (images whose sides are
 * multiples of 8 but not of 64), against diffusers 0.10.2 on the tiny SD v1 model
 * (tests/reference/make_unet_odd_fixtures.py, tests/data/sd/v1_unet_odd_reference.safetensors):
 *   - the nearest resize alone (F.interpolate(size=..., mode="nearest")): forward exact,
 *     backward relative L2 <= 1e-6;
 *   - the forward at 9x7, 5x11 and 3x3 (batch 2, t = [37, 781], 77 tokens): relative L2 <= 1e-5
 *     (test_unet's tolerance), through the plan and through lora_model_unet_predict;
 *   - the backward at 9x7 against torch autograd in float64: dL/d sample, dL/d context and three
 *     stored Linear / proj weight gradients (the dW path), relative L2 <= 1e-4 (test_unet_grad's
 *     tolerance), with checkpointing and with every intermediate saved;
 *   - generation at W = 72, H = 56 (latent 9x7): a 2-step DDIM StableDiffusionPipeline run with
 *     CFG 7.5 and a negative prompt from the same initial latents: the latents after every step
 *     (relative L2 <= 1e-4, test_generate's tolerance), the RGB8 image (max diff 1 on at most
 *     1% of values), and lora_generate giving the same image; a W that is not a multiple of 8
 *     is refused with a message naming it. */
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "gen/gen.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/unet.h"
#include "nn/nn.h"
#include "../test.h"
#include "../ref_file.h"
#include "../tiny_vocab.h"

#define OUT_TOL 1e-5
#define GRAD_TOL 1e-4
#define LAT_TOL 1e-4

static const int64_t sizes[3][2] = {{9, 7}, {5, 11}, {3, 3}};

static const char *const grad_params[3][3] = {
    {"down_blocks.0.attentions.0", "proj_in", "down_blocks.0.attentions.0.proj_in.weight"},
    {"up_blocks.1.attentions.0", "attn1.to_q", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"},
    {"up_blocks.3.attentions.2", "attn2.to_out.0",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight"},
};

static int64_t dims(const struct lora_file *f, const char *name, int64_t *d) {
    int64_t i = ref_find(f, name);
    if (i < 0) return 0;
    for (int k = 0; k < f->tensors[i].ndim; k++) d[k] = f->tensors[i].shape[k];
    return f->tensors[i].ndim;
}

static void test_resize(lora_ctx *ctx, const struct lora_file *f) {
    struct lora_backend_impl *be = ctx->backend;
    for (int k = 0;; k++) {
        char name[64];
        int64_t dx_[4], dy_[4];
        snprintf(name, sizeof name, "resize.%d.x", k);
        if (ref_find(f, name) < 0) {
            CHECK_MSG(k >= 7, "only %d resize cases", k);
            break;
        }
        CHECK(dims(f, name, dx_) == 4);
        snprintf(name, sizeof name, "resize.%d.y", k);
        CHECK(dims(f, name, dy_) == 4);
        int64_t planes = dx_[0] * dx_[1], h = dx_[2], w = dx_[3], oh = dy_[2], ow = dy_[3];
        const float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL;
        snprintf(name, sizeof name, "resize.%d.x", k);
        x = ref_f32(f, name, NULL);
        snprintf(name, sizeof name, "resize.%d.y", k);
        y = ref_f32(f, name, NULL);
        snprintf(name, sizeof name, "resize.%d.dy", k);
        dy = ref_f32(f, name, NULL);
        snprintf(name, sizeof name, "resize.%d.dx", k);
        dx = ref_f32(f, name, NULL);
        if (!x || !y || !dy || !dx) { CHECK(0); continue; }
        float *gy = malloc((size_t)(planes * oh * ow) * 4), *gdx = malloc((size_t)(planes * h * w) * 4);
        CHECK_STATUS(nn_upsample_nearest_forward(be, gy, x, planes, h, w, oh, ow), LORA_OK);
        CHECK_MSG(memcmp(gy, y, (size_t)(planes * oh * ow) * 4) == 0, "resize %lldx%lld -> %lldx%lld forward",
                  (long long)h, (long long)w, (long long)oh, (long long)ow);
        CHECK_STATUS(nn_upsample_nearest_backward(be, gdx, dy, planes, h, w, oh, ow), LORA_OK);
        double e = rel_l2(gdx, dx, planes * h * w);
        printf("resize %lldx%lld -> %lldx%lld: backward rel L2 %.2e\n", (long long)h, (long long)w, (long long)oh,
               (long long)ow, e);
        CHECK_MSG(e <= 1e-6, "resize backward %lldx%lld -> %lldx%lld: %.3e", (long long)h, (long long)w,
                  (long long)oh, (long long)ow, e);
        free(gy);
        free(gdx);
    }
    /* bad shapes */
    float v[4] = {0};
    CHECK_STATUS(nn_upsample_nearest_forward(be, v, v, 1, 1, 1, 0, 2), LORA_E_INVALID_ARG);
    CHECK_STATUS(nn_upsample_nearest_backward(be, v, v, 1, 0, 1, 2, 2), LORA_E_INVALID_ARG);
}

static int64_t xf_index(const struct unet_model *m, const char *name) {
    for (int64_t i = 0; i < m->n_xf; i++)
        if (strcmp(m->xf[i]->name, name) == 0) return i;
    return -1;
}

static int target_index(const char *name) {
    for (int t = 0; t < UNET_T_N; t++)
        if (strcmp(unet_target_names[t], name) == 0) return t;
    return -1;
}

static void test_unet(lora_ctx *ctx, lora_model *model, const struct lora_file *f) {
    struct unet_model m;
    CHECK_STATUS(unet_init(&m, ctx->backend, &model->sd.unet, &model->sd.cfg), LORA_OK);
    if (!m.weights) return;
    int64_t nc = 0, B = 2, X = model->sd.cfg.context_dim;
    const float *ctxt = ref_f32(f, "context", &nc);
    int64_t T = nc / (B * X);
    float t[2];
    CHECK(ctxt && T == 77 && ref_as_floats(f, "timesteps", t, 2) == 2);
    if (!ctxt || T != 77) { unet_free(&m); return; }
    for (int s = 0; s < 3; s++) {
        int64_t h = sizes[s][0], w = sizes[s][1], ns = 0;
        char name[64];
        snprintf(name, sizeof name, "%lldx%lld.sample_in", (long long)h, (long long)w);
        const float *x = ref_f32(f, name, &ns);
        snprintf(name, sizeof name, "%lldx%lld.out", (long long)h, (long long)w);
        const float *want = ref_f32(f, name, NULL);
        CHECK(x && want && ns == B * 4 * h * w);
        if (!x || !want) continue;
        struct unet_plan p;
        CHECK_STATUS(unet_plan_init(&p, &m, B, h, w, T), LORA_OK);
        float *out = malloc((size_t)ns * 4);
        CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
        snprintf(name, sizeof name, "out %lldx%lld", (long long)h, (long long)w);
        ref_compare(1, name, out, want, ns, OUT_TOL);
        unet_plan_free(&p);
        /* the public entry point takes the size too */
        memset(out, 0, (size_t)ns * 4);
        CHECK_STATUS(lora_model_unet_predict(model, x, B, h, w, t, ctxt, T, out, (uint64_t)ns), LORA_OK);
        snprintf(name, sizeof name, "unet_predict %lldx%lld", (long long)h, (long long)w);
        ref_compare(1, name, out, want, ns, OUT_TOL);
        free(out);
    }

    /* backward at 9x7 against float64 autograd */
    int64_t h = 9, w = 7, ns = 0, nw = 0;
    const float *x = ref_f32(f, "9x7.sample_in", &ns);
    const float *lw = ref_f32(f, "grad.loss_weights", &nw);
    CHECK(x && lw && nw == ns);
    for (int mode = UNET_TRAIN_CHECKPOINT; x && lw && nw == ns && mode <= UNET_TRAIN_SAVE_ALL; mode++) {
        struct unet_plan p;
        CHECK_STATUS(unet_plan_init_ex(&p, &m, B, h, w, T, mode, 4), LORA_OK);
        if (!p.mem) continue;
        struct unet_adapters *ad = calloc(1, sizeof *ad);
        float *dw[3];
        int64_t nd[3];
        for (int i = 0; i < 3; i++) {
            char name[200];
            snprintf(name, sizeof name, "grad.param.%s", grad_params[i][2]);
            nd[i] = 0;
            ref_f32(f, name, &nd[i]);
            dw[i] = calloc((size_t)(nd[i] ? nd[i] : 1), 4);
            int64_t xi = xf_index(&m, grad_params[i][0]);
            int tg = target_index(grad_params[i][1]);
            CHECK_MSG(xi >= 0 && tg >= 0 && nd[i] > 0, "%s", grad_params[i][2]);
            if (xi >= 0 && tg >= 0) ad->dw[xi][tg] = dw[i];
        }
        CHECK_STATUS(unet_set_adapters(&p, ad), LORA_OK);
        float *out = malloc((size_t)ns * 4), *dx = malloc((size_t)ns * 4), *dc = malloc((size_t)nc * 4);
        CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
        ref_compare(1, "train forward 9x7", out, ref_f32(f, "9x7.out", NULL), ns, OUT_TOL);
        CHECK_STATUS(unet_backward(&p, lw, dx, dc), LORA_OK);
        printf("mode %s:\n", mode == UNET_TRAIN_CHECKPOINT ? "checkpoint" : "save all");
        ref_compare(1, "grad.sample_in 9x7", dx, ref_f32(f, "grad.sample_in", NULL), ns, GRAD_TOL);
        ref_compare(1, "grad.context 9x7", dc, ref_f32(f, "grad.context", NULL), nc, GRAD_TOL);
        for (int i = 0; i < 3; i++) {
            char name[200];
            snprintf(name, sizeof name, "grad.param.%s", grad_params[i][2]);
            ref_compare(1, grad_params[i][2], dw[i], ref_f32(f, name, NULL), nd[i], GRAD_TOL);
            free(dw[i]);
        }
        free(out);
        free(dx);
        free(dc);
        free(ad);
        unet_plan_free(&p);
    }
    /* sizes still refused */
    struct unet_plan q;
    CHECK_STATUS(unet_plan_init(&q, &m, B, 0, 8, T), LORA_E_INVALID_ARG);
    CHECK_STATUS(unet_plan_init(&q, &m, B, 8, (1 << 14) + 1, T), LORA_E_INVALID_ARG);
    unet_free(&m);
}

struct capture {
    const struct lora_file *ref;
    int64_t steps_seen;
    double worst;
};

static lora_status on_call(void *user, int64_t call, int64_t n_calls, const float *lat, int64_t n) {
    struct capture *c = user;
    char key[64];
    snprintf(key, sizeof key, "pipeline.latents.%lld", (long long)call);
    int64_t nr = 0;
    const float *want = ref_f32(c->ref, key, &nr);
    CHECK_MSG(want && nr == n, "%s missing or %lld floats", key, (long long)nr);
    if (want && nr == n) {
        double e = rel_l2(lat, want, n);
        printf("72x56 latents after step %lld/%lld: rel L2 %.2e\n", (long long)call + 1, (long long)n_calls, e);
        if (!(e <= c->worst)) c->worst = e;
    }
    c->steps_seen++;
    return LORA_OK;
}

static void test_generate(lora_ctx *ctx, lora_model *model, const struct lora_file *f) {
    const int64_t W = 72, H = 56, per = 4 * (H / 8) * (W / 8);
    const char *prompt = "a photo of a cat, masterpiece", *negative = "blurry, lowres";
    tiny_widen_vocab(ctx, model);
    int64_t nr = 0;
    const float *lat0 = ref_f32(f, "pipeline.latents0", &nr);
    CHECK(lat0 && nr == per);
    /* our noise for seed 1234 is the fixture's initial latents */
    uint64_t seed = 1234;
    struct gen_noise g;
    CHECK_STATUS(gen_noise_init(ctx, &g, GEN_RNG_CPU, &seed, 1, per), LORA_OK);
    float *x0 = malloc((size_t)per * sizeof *x0);
    gen_noise_next(&g, x0);
    if (lat0 && nr == per) {
        double e = 0;
        for (int64_t j = 0; j < per; j++) e = fmax(e, fabs((double)x0[j] - lat0[j]));
        CHECK_MSG(e < 1e-5, "initial latents: max abs err %.2e", e);
    }
    free(x0);
    gen_noise_free(ctx, &g);

    struct capture cap = {f, 0, 0};
    struct gen_job job;
    memset(&job, 0, sizeof job);
    job.prompt = prompt;
    job.negative = negative;
    job.width = W;
    job.height = H;
    job.steps = 2;
    job.scale = 7.5;
    job.kind = GEN_DDIM;
    job.batch = 1;
    job.seeds = &seed;
    job.rng = GEN_RNG_CPU;
    job.clip_skip = 1;
    job.max_embeddings_multiples = 1;
    job.on_call = on_call;
    job.user = &cap;
    uint8_t *rgb = malloc((size_t)(W * H * 3));
    CHECK_STATUS(gen_run(model, &job, rgb, (uint64_t)(W * H * 3)), LORA_OK);
    CHECK(cap.steps_seen == 2);
    CHECK_MSG(cap.steps_seen == 2 && cap.worst <= LAT_TOL, "72x56 latents rel L2 %g", cap.worst);
    int64_t ii = ref_find(f, "pipeline.image_u8");
    const uint8_t *want = ii >= 0 ? st_data(f, ii) : NULL;
    int64_t ni = ii >= 0 ? (int64_t)(f->tensors[ii].end - f->tensors[ii].begin) : 0;
    CHECK(want && ni == W * H * 3);
    if (want && ni == W * H * 3) {
        int maxd = 0;
        int64_t off = 0;
        for (int64_t j = 0; j < ni; j++) {
            int d = abs((int)rgb[j] - (int)want[j]);
            if (d > maxd) maxd = d;
            off += d != 0;
        }
        printf("72x56 decoded RGB8: max diff %d, %lld of %lld values differ\n", maxd, (long long)off, (long long)ni);
        CHECK_MSG(maxd <= 1 && off * 100 <= ni, "72x56 image: max diff %d, %lld differ", maxd, (long long)off);
    }

    /* the public API at the same size gives the same picture */
    lora_params *p = NULL;
    CHECK_STATUS(lora_params_create(ctx, &p), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_PROMPT, prompt), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_NEGATIVE_PROMPT, negative), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_STEPS, 2), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_W, W), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_H, H), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_SEED, 1234), LORA_OK);
    CHECK_STATUS(lora_params_parse(p, "sampler", "ddim"), LORA_OK);
    lora_image *img = NULL;
    CHECK_STATUS(lora_generate(model, p, &img), LORA_OK);
    CHECK(img && lora_image_width(img) == (uint32_t)W && lora_image_height(img) == (uint32_t)H);
    if (img) CHECK(memcmp(lora_image_data(img), rgb, (size_t)(W * H * 3)) == 0);
    lora_image_free(img);
    /* not a multiple of 8: refused, naming the size */
    CHECK_STATUS(lora_params_set_int(p, LORA_P_W, 68), LORA_OK);
    img = NULL;
    CHECK_STATUS(lora_generate(model, p, &img), LORA_E_CONFIG_RANGE);
    CHECK(img == NULL && strstr(lora_errmsg(ctx), "68 x 56") && strstr(lora_errmsg(ctx), "multiples of 8"));
    lora_params_free(p);
    free(rgb);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_unet_odd");
    char path[1024];
    snprintf(path, sizeof path, "%s/sd/v1_unet_odd_reference.safetensors", dir);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", dir);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (f) test_resize(ctx, f);
    if (f && model) {
        test_unet(ctx, model, f);
        test_generate(ctx, model, f);
    }
    lora_model_free(model);
    st_close(f);
    lora_ctx_free(ctx);
    return test_finish("test_unet_odd");
}
