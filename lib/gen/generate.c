/* txt2img / img2img as diffusers 0.10.2's StableDiffusion(Img2Img)Pipeline and kohya's
 * PipelineLike compute them: prompt conditioning (gen/prompt.c), initial latents from the
 * per-image seeds times the sampler's init_noise_sigma, the sampler loop with classifier-free
 * guidance (kohya's negative_scale as a third pass), VAE decode, RGB8 as numpy_to_pil rounds.
 * The U-Net and VAE run in float32 on the context's backend; their weights are converted once
 * per call (the model's own cached runs are dropped first so that two float32 copies never
 * coexist). */
#include <math.h>
#include <string.h>

#include "backend/backend.h"
#include "gen/gen.h"
#include "gen/prompt.h"
#include "model/sd_model.h"
#include "model/unet.h"
#include "model/vae.h"
#include "network/network.h"

#define LATENT_SCALE 0.18215

static int64_t align16(int64_t n) { return (n + 15) & ~(int64_t)15; }

int64_t gen_job_calls(const struct gen_job *job) {
    /* the same count gen_sched_init gives, without allocating: */
    int64_t N = job->steps;
    int64_t calls;
    switch (job->kind) {
    case GEN_PNDM: calls = N + 1; break;
    case GEN_HEUN: case GEN_DPM2: case GEN_DPM2_A: calls = 2 * N - 1; break;
    default: calls = N; break;
    }
    if (job->init_rgb) {
        /* gen_sched_img2img_start: the first call index for the strength */
        int64_t offset = (job->kind == GEN_DDIM || job->kind == GEN_PNDM) ? 1 : 0;
        int64_t init = (int64_t)((double)N * job->strength) + offset;
        if (init > N) init = N;
        int64_t start = N - init + offset;
        if (start < 0) start = 0;
        if (start >= calls) start = calls - 1;
        calls -= start;
    }
    return calls;
}

struct run {
    lora_ctx *ctx;
    struct lora_backend_impl *be;
    struct unet_model um;
    struct unet_plan up;
    int unet_ok, plan_ok;
    struct unet_adapters *ad;   /* runtime-attached networks' low-rank branches, or NULL */
    struct vae_model vm;
    struct vae_plan vp;
    int vae_ok, vplan_ok;
    void *io, *vio;
    float *d_x, *d_c, *d_o, *d_lat, *d_img, *d_mean, *d_logvar;
    const struct gen_vae *vae;
};

static void run_free(struct run *r) {
    struct lora_backend_impl *be = r->be;
    if (!be) return;
    if (r->io) be->iface->buf_free(be, r->io);
    if (r->vio) be->iface->buf_free(be, r->vio);
    if (r->plan_ok) unet_plan_free(&r->up);
    if (r->unet_ok) unet_free(&r->um);
    lora_free(r->ctx, r->ad);
    if (r->vplan_ok) vae_plan_free(&r->vp);
    if (r->vae_ok) vae_free(&r->vm);
    memset(r, 0, sizeof *r);
}

/* The VAE's weights and plan go while the U-Net runs (img2img encodes first). */
static void vae_release(struct run *r) {
    if (r->vio) r->be->iface->buf_free(r->be, r->vio);
    if (r->vplan_ok) vae_plan_free(&r->vp);
    if (r->vae_ok) vae_free(&r->vm);
    r->vio = NULL;
    r->vplan_ok = r->vae_ok = 0;
}

static lora_status vae_ready(struct run *r, struct lora_model *model, int64_t H, int64_t W) {
    if (!r->vae_ok) {
        LORA_TRY(vae_init(&r->vm, r->be, r->vae ? r->vae->vae : &model->sd.vae, r->vae ? r->vae->cfg : &model->sd.cfg));
        r->vae_ok = 1;
    }
    if (r->vplan_ok) return LORA_OK;
    LORA_TRY(vae_plan_init(&r->vp, &r->vm, 1, H, W));
    r->vplan_ok = 1;
    int64_t f = (int64_t)1 << (r->vm.levels - 1);
    int64_t ni = align16(3 * H * W), nl = align16(r->vm.latent * (H / f) * (W / f));
    lora_status s = r->be->iface->buf_alloc(r->be, (size_t)(ni + 2 * nl) * 4, &r->vio);
    if (s != LORA_OK) {
        r->vio = NULL;
        return s;
    }
    r->d_img = r->vio;
    r->d_mean = r->d_img + ni;
    r->d_logvar = r->d_mean + nl;
    return LORA_OK;
}

/* VAE decode of one latent (scaled, as the sampler leaves it) to RGB8 HWC. */
static lora_status decode_one(struct run *r, struct lora_model *model, const float *lat, int64_t H, int64_t W,
                              float *fimg, float *flat, uint8_t *rgb) {
    LORA_TRY(vae_ready(r, model, H, W));
    int64_t f = (int64_t)1 << (r->vm.levels - 1), nl = r->vm.latent * (H / f) * (W / f);
    const float inv = (float)(1.0 / LATENT_SCALE);
    for (int64_t j = 0; j < nl; j++) flat[j] = inv * lat[j];
    LORA_TRY(r->be->iface->upload(r->be, r->d_mean, flat, (size_t)nl * 4));
    LORA_TRY(vae_decode(&r->vp, r->d_mean, r->d_img));
    LORA_TRY(r->be->iface->download(r->be, fimg, r->d_img, (size_t)(3 * H * W) * 4));
    /* (x / 2 + 0.5).clamp(0, 1), * 255, numpy's round (half to even) */
    for (int64_t y = 0; y < H; y++)
        for (int64_t x = 0; x < W; x++)
            for (int64_t c = 0; c < 3; c++) {
                float v = fimg[(c * H + y) * W + x] / 2 + 0.5f;
                v = v < 0 ? 0 : v > 1 ? 1 : v;
                rgb[(y * W + x) * 3 + c] = (uint8_t)nearbyintf(v * 255.0f);
            }
    return LORA_OK;
}

/* img2img: VAE posterior sample of the init image times 0.18215 (noise from `vg`). */
static lora_status encode_init(struct run *r, struct lora_model *model, const struct gen_job *job,
                               struct gen_noise *vg, float *x0, float *fimg, float *eps) {
    int64_t H = job->height, W = job->width;
    LORA_TRY(vae_ready(r, model, H, W));
    int64_t f = (int64_t)1 << (r->vm.levels - 1), nl = r->vm.latent * (H / f) * (W / f);
    /* PIL -> np.float32 / 255 -> 2x - 1, CHW */
    for (int64_t y = 0; y < H; y++)
        for (int64_t x = 0; x < W; x++)
            for (int64_t c = 0; c < 3; c++) {
                float v = (float)job->init_rgb[(y * W + x) * 3 + c] / 255.0f;
                fimg[(c * H + y) * W + x] = 2.0f * v - 1.0f;
            }
    LORA_TRY(r->be->iface->upload(r->be, r->d_img, fimg, (size_t)(3 * H * W) * 4));
    LORA_TRY(vae_encode(&r->vp, r->d_img, r->d_mean, r->d_logvar));
    float *mean = fimg, *lv = fimg + nl;   /* the image is on the backend now: reuse its host copy */
    LORA_TRY(r->be->iface->download(r->be, mean, r->d_mean, (size_t)nl * 4));
    LORA_TRY(r->be->iface->download(r->be, lv, r->d_logvar, (size_t)nl * 4));
    gen_noise_next(vg, eps);
    for (int64_t b = 0; b < job->batch; b++) {
        float *o = x0 + b * nl;
        const float *e = eps + b * nl;
        for (int64_t j = 0; j < nl; j++) {
            float sample = mean[j] + expf(0.5f * lv[j]) * e[j];
            o[j] = (float)LATENT_SCALE * sample;
        }
    }
    return LORA_OK;
}

lora_status gen_run(struct lora_model *model, const struct gen_job *job, uint8_t *rgb, uint64_t cap) {
    lora_ctx *ctx = model->ctx;
    const struct sd_config *cfg = &model->sd.cfg;
    int64_t B = job->batch, H = job->height, W = job->width;
    /* the U-Net takes any latent size (odd levels round up, as diffusers): only the VAE's factor */
    int64_t vf = (int64_t)1 << (cfg->vae_n_levels > 0 ? cfg->vae_n_levels - 1 : 0);
    if (B < 1 || B > 64)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "batch_size: %lld is outside 1..64", (long long)B);
    if (W < vf || H < vf || W > 16384 || H > 16384 || W % vf || H % vf)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE,
                         "W x H: %lld x %lld: both must be multiples of %lld in %lld..16384 (the VAE divides by "
                         "%lld)", (long long)W, (long long)H, (long long)vf, (long long)vf, (long long)vf);
    if (job->steps < 1 || job->steps > 1000)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "steps: %d is outside 1..1000", job->steps);
    if (!isfinite(job->scale) || (job->has_negative_scale && !isfinite(job->negative_scale)))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "scale / negative_scale must be finite numbers");
    if (job->init_rgb && !(job->strength >= 0 && job->strength <= 1))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "strength: %g is outside 0..1", job->strength);
    if (!job->prompt) return lora_fail(ctx, LORA_E_INVALID_ARG, "generate: the prompt is NULL");
    if (cap < (uint64_t)(B * H * W * 3))
        return lora_fail(ctx, LORA_E_LIMIT, "generate: the output needs %lld bytes, the buffer holds %llu",
                         (long long)(B * H * W * 3), (unsigned long long)cap);
    int64_t h = H / vf, w = W / vf, C = cfg->vae_latent_channels > 0 ? cfg->vae_latent_channels : 4;
    int64_t per = cfg->unet_in_channels * h * w;
    if (cfg->unet_in_channels != C || cfg->unet_out_channels != C)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "generate: a U-Net with %d input channels (inpainting models) is not "
                         "supported", cfg->unet_in_channels);
    int cfg_on = job->scale > 1.0;
    int npass = cfg_on ? (job->has_negative_scale ? 3 : 2) : 1;
    int64_t nb = npass * B;

    /* ---- conditioning ---- */
    float *cond = NULL, *uncond = NULL, *real_uncond = NULL;
    int64_t T = 0, T2 = 0;
    struct gen_prompt_encode_opts po;
    memset(&po, 0, sizeof po);
    po.clip_skip = job->clip_skip;
    po.max_embeddings_multiples = job->max_embeddings_multiples > 0 ? job->max_embeddings_multiples : 1;
    LORA_TRY(gen_prompt_encode_ex(model, job->prompt, cfg_on ? (job->negative ? job->negative : "") : NULL, &po,
                                  &cond, &uncond, &T));
    lora_status s = LORA_OK;
    if (cfg_on && job->has_negative_scale) {
        float *unused = NULL;
        po.min_chunks = (int32_t)(T / 77);
        s = gen_prompt_encode_ex(model, job->prompt, "", &po, &unused, &real_uncond, &T2);
        lora_free(ctx, unused);
        if (s == LORA_OK && T2 != T)
            s = lora_fail(ctx, LORA_E_INTERNAL, "generate: %lld and %lld conditioning tokens", (long long)T,
                          (long long)T2);
    }
    int64_t D = cfg->context_dim;

    /* ---- buffers ---- */
    struct run r;
    memset(&r, 0, sizeof r);
    r.ctx = ctx;
    r.be = ctx->backend;
    r.vae = job->vae;
    struct gen_sched sc;
    memset(&sc, 0, sizeof sc);
    struct gen_noise g, vg;
    memset(&g, 0, sizeof g);
    memset(&vg, 0, sizeof vg);
    float *host = NULL;
    int64_t n = B * per;
    int64_t img_floats = 3 * H * W > per ? 3 * H * W : per;
    if (s == LORA_OK) {
        uint64_t floats = (uint64_t)(nb * T * D) + (uint64_t)(4 * nb * per) + (uint64_t)(2 * img_floats) + (uint64_t)nb;
        host = lora_malloc(ctx, (size_t)floats * sizeof *host);
        if (!host) s = LORA_E_NOMEM;
    }
    float *hctx = host, *x = hctx + nb * T * D, *xin = x + nb * per, *out = xin + nb * per, *eps = out + nb * per;
    float *fimg = eps + nb * per, *flat = fimg + img_floats, *tvec = flat + img_floats;
    if (s == LORA_OK) {
        /* context rows: [uncond (negative prompt) x B, cond x B, real uncond x B] */
        int64_t k = 0;
        for (int p = 0; p < npass; p++) {
            const float *src = npass == 1 ? cond : p == 0 ? uncond : p == 1 ? cond : real_uncond;
            for (int64_t b = 0; b < B; b++, k++) memcpy(hctx + k * T * D, src, (size_t)(T * D) * sizeof *src);
        }
    }
    lora_free(ctx, cond);
    lora_free(ctx, uncond);
    lora_free(ctx, real_uncond);

    /* ---- sampler, noise, initial latents ---- */
    if (s == LORA_OK) s = gen_sched_init(ctx, &sc, job->kind, job->steps, cfg->v_prediction, job->clip_sample, 0, n);
    if (s == LORA_OK) s = gen_noise_init(ctx, &g, job->rng, job->seeds, B, per);
    int64_t start = 0;
    if (s == LORA_OK) {
        gen_noise_next(&g, x);   /* draw 0: kohya's start code (drawn in img2img too) */
        if (!job->init_rgb) {
            for (int64_t j = 0; j < n; j++) x[j] = x[j] * sc.init_noise_sigma;
        } else {
            /* kohya pre-draws steps * k sampler noises, then the img2img noise; the VAE sample's
             * noise comes after that here (kohya takes it from the global generator). */
            s = gen_noise_clone(ctx, &g, &vg);
            int64_t skip = (int64_t)job->steps * gen_sampler_noises_per_step(job->kind);
            for (int64_t k = 0; s == LORA_OK && k < skip; k++) gen_noise_next(&vg, xin);
            if (s == LORA_OK) {
                gen_noise_next(&vg, out);    /* i2i noise */
                model_drop_image_runs(model);
                s = encode_init(&r, model, job, &vg, xin, fimg, eps);
            }
            vae_release(&r);
            if (s == LORA_OK) {
                start = gen_sched_img2img_start(&sc, job->strength);
                gen_sched_add_noise(&sc, start, xin, out, x, n);
            }
        }
    }

    /* ---- U-Net ---- */
    if (s == LORA_OK) {
        model_drop_image_runs(model);
        s = unet_init_ex(&r.um, r.be, &model->sd.unet, cfg, UNET_BORROW_16BIT);   /* 16-bit weights read in place */
        r.unet_ok = s == LORA_OK;
    }
    /* networks attached at run time (lib/network/attach.c): low-rank branches on the
     * transformer layers, the base weights stay borrowed 16-bit */
    int64_t max_rank = 0;
    if (s == LORA_OK && attach_has_lowrank(model, 0)) {
        r.ad = lora_malloc(ctx, sizeof *r.ad);
        s = r.ad ? attach_unet_adapters(model, &r.um, r.ad, &max_rank) : LORA_E_NOMEM;
    }
    if (s == LORA_OK) {
        s = unet_plan_init_ex(&r.up, &r.um, nb, h, w, T, UNET_FORWARD, max_rank);
        r.plan_ok = s == LORA_OK;
    }
    if (s == LORA_OK) s = unet_set_adapters(&r.up, r.ad);
    if (s == LORA_OK) {
        int64_t a = align16(nb * per), c = align16(nb * T * D);
        s = r.be->iface->buf_alloc(r.be, (size_t)(2 * a + c) * 4, &r.io);
        if (s == LORA_OK) {
            r.d_x = r.io;
            r.d_c = r.d_x + a;
            r.d_o = r.d_c + c;
            s = r.be->iface->upload(r.be, r.d_c, hctx, (size_t)(nb * T * D) * 4);
        } else {
            r.io = NULL;
        }
    }
    int64_t done = job->progress_done, total = job->progress_total > 0 ? job->progress_total : sc.n_calls - start;
    for (int64_t i = start; s == LORA_OK && i < sc.n_calls; i++) {
        float div = gen_sched_input_div(&sc, i);
        for (int64_t j = 0; j < n; j++) xin[j] = x[j] / div;
        for (int p = 1; p < npass; p++) memcpy(xin + p * n, xin, (size_t)n * sizeof *xin);
        float t = (float)gen_sched_timestep(&sc, i);
        for (int64_t k = 0; k < nb; k++) tvec[k] = t;
        s = r.be->iface->upload(r.be, r.d_x, xin, (size_t)(nb * per) * 4);
        if (s == LORA_OK) s = unet_forward(&r.up, r.d_x, tvec, r.d_c, r.d_o);
        if (s == LORA_OK) s = r.be->iface->download(r.be, out, r.d_o, (size_t)(nb * per) * 4);
        if (s != LORA_OK) break;
        const float gs = (float)job->scale, ns = (float)job->negative_scale;
        if (npass == 1) {
            memcpy(eps, out, (size_t)n * sizeof *eps);
        } else if (npass == 2) {
            const float *u = out, *c = out + n;
            for (int64_t j = 0; j < n; j++) eps[j] = u[j] + gs * (c[j] - u[j]);
        } else {
            const float *ng = out, *c = out + n, *u = out + 2 * n;
            for (int64_t j = 0; j < n; j++) eps[j] = u[j] + gs * (c[j] - u[j]) - ns * (ng[j] - u[j]);
        }
        s = gen_sched_step(&sc, i, eps, x, gen_noise_cb, &g);
        if (s == LORA_OK && job->on_call) s = job->on_call(job->user, i - start, sc.n_calls - start, x, n);
        if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_SAMPLE_STEP, ++done, total, NAN);
    }
    /* the U-Net's memory goes before the VAE's */
    if (r.io) r.be->iface->buf_free(r.be, r.io);
    r.io = NULL;
    if (r.plan_ok) unet_plan_free(&r.up);
    if (r.unet_ok) unet_free(&r.um);
    lora_free(ctx, r.ad);
    r.ad = NULL;
    r.plan_ok = r.unet_ok = 0;

    /* ---- decode ---- */
    for (int64_t b = 0; s == LORA_OK && b < B; b++) {
        s = decode_one(&r, model, x + b * per, H, W, fimg, flat, rgb + b * H * W * 3);
        if (s == LORA_OK) s = lora_progress(ctx, LORA_PHASE_DECODE, b + 1, B, NAN);
    }
    run_free(&r);
    gen_sched_free(&sc);
    gen_noise_free(ctx, &g);
    gen_noise_free(ctx, &vg);
    lora_free(ctx, host);
    return s;
}
