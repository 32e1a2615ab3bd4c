/* The generation pipeline against diffusers 0.10.2's StableDiffusionPipeline with a kohya LoRA
 * (tests/reference/make_gen_fixtures.py): a 4-step DDIM run, CFG 7.5, a negative prompt and the
 * committed kohya network at multiplier 1 on the tiny v1 (epsilon, 64x64) and v2
 * (v-prediction, 64 wide x 128 high) models. Checked: the initial latents (torch.randn of the
 * seed), the latents after every step, the decoded RGB8 image; then the public API
 * (lora_generate) gives the same picture, its PNG decodes (libpng) to the same pixels and
 * carries the text chunks; Python's random seeds for several images; cancel and bad sizes.
 * The tiny text encoders get the 49408-row formula embedding the script used. */
#include <png.h>
#include <setjmp.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "gen/gen.h"
#include "io/image_read.h"
#include "io/safetensors.h"
#include "io/st_map.h"
#include "model/sd_model.h"
#include "../test.h"
#include "../ref_file.h"
#include "../tiny_vocab.h"

static lora_ctx *ctx;


struct capture {
    const struct lora_file *ref;
    const char *prefix;        /* key prefix in the fixture ("" or "ddim.") */
    int v;
    int64_t steps_seen;
    double worst;
};

static lora_status on_call(void *user, int64_t call, int64_t n_calls, const float *lat, int64_t n) {
    struct capture *c = user;
    char key[64];
    snprintf(key, sizeof key, "%slatents.%lld", c->prefix, (long long)call);
    int64_t nr = 0;
    const float *want = ref_f32(c->ref, key, &nr);
    CHECK_MSG(want && nr == n, "v%d %s missing or %lld floats", c->v, key, (long long)nr);
    if (want && nr == n) {
        double e = rel_l2(lat, want, n);
        printf("v%d latents after step %lld/%lld: rel L2 %.2e\n", c->v, (long long)call + 1, (long long)n_calls, e);
        if (!(e <= c->worst)) c->worst = e;
    }
    c->steps_seen++;
    return LORA_OK;
}

static const char *meta_get(const struct lora_file *f, const char *key) {
    for (int64_t i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

/* libpng read of an RGB8 file with its text chunks; returns the pixels (malloc) or NULL. */
static uint8_t *read_png(const char *path, uint32_t *w, uint32_t *h, char *params, size_t cap, char *kprompt,
                         size_t kcap) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    uint8_t *volatile px = NULL;
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        free(px);
        return NULL;
    }
    png_init_io(png, fp);
    png_read_info(png, info);
    *w = png_get_image_width(png, info);
    *h = png_get_image_height(png, info);
    CHECK(png_get_color_type(png, info) == PNG_COLOR_TYPE_RGB && png_get_bit_depth(png, info) == 8);
    px = malloc((size_t)*w * *h * 3);
    for (uint32_t y = 0; y < *h; y++) png_read_row(png, px + (size_t)y * *w * 3, NULL);
    png_read_end(png, info);
    png_textp text = NULL;
    int nt = png_get_text(png, info, &text, NULL);
    params[0] = kprompt[0] = '\0';
    for (int i = 0; i < nt; i++) {
        if (!strcmp(text[i].key, "parameters")) snprintf(params, cap, "%s", text[i].text);
        if (!strcmp(text[i].key, "prompt")) snprintf(kprompt, kcap, "%s", text[i].text);
    }
    png_destroy_read_struct(&png, &info, NULL);
    fclose(fp);
    return px;
}

static int cancel_cb(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)value;
    (void)total;
    int *seen = user;
    if (phase == LORA_PHASE_SAMPLE_STEP) (*seen)++;
    return phase == LORA_PHASE_SAMPLE_STEP && done >= 2;
}

static void run_version(const char *data, int v) {
    char path[4096];
    snprintf(path, sizeof path, "%s/gen/pipeline_v%d.safetensors", data, v);
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, path, &ref), LORA_OK);
    if (!ref) return;
    const char *mj = meta_get(ref, "liblora_reference");
    CHECK(mj != NULL);
    /* W, H, prompt and negative from the script's constants (mirrored in its metadata) */
    int64_t W = 64, H = v == 1 ? 64 : 128;
    const char *prompt = "a photo of a cat, masterpiece", *negative = "blurry, lowres";
    CHECK(mj && strstr(mj, "\"prompt\": \"a photo of a cat, masterpiece\"") && strstr(mj, "\"negative_prompt\": "
          "\"blurry, lowres\"") && strstr(mj, v == 1 ? "\"height\": 64" : "\"height\": 128"));

    snprintf(path, sizeof path, "%s/sd/v%d_diffusers", data, v);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (!model) {
        st_close(ref);
        return;
    }
    tiny_widen_vocab(ctx, model);
    snprintf(path, sizeof path, "%s/network/v%d_kohya.safetensors", data, v);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, path, &net), LORA_OK);
    CHECK_STATUS(lora_model_attach(model, net, 1.0, LORA_APPLY_RUNTIME), LORA_OK);

    /* initial latent: torch.randn([1, 4, H/8, W/8], generator=Generator().manual_seed(1234)) */
    int64_t per = 4 * (H / 8) * (W / 8), nr = 0;
    const float *lat0 = ref_f32(ref, "latents0", &nr);
    CHECK(lat0 && nr == per);
    uint64_t seed = 1234;
    struct gen_noise g;
    CHECK_STATUS(gen_noise_init(ctx, &g, GEN_RNG_CPU, &seed, 1, per), LORA_OK);
    float *x = malloc((size_t)per * sizeof *x);
    gen_noise_next(&g, x);
    if (lat0) {
        double e = 0;
        for (int64_t j = 0; j < per; j++) e = fmax(e, fabs((double)x[j] - lat0[j]));
        printf("v%d initial latents vs torch.randn: max abs err %.2e\n", v, e);
        CHECK(e < 1e-5);
    }
    free(x);
    gen_noise_free(ctx, &g);

    /* the pipeline */
    struct capture cap = {ref, "", v, 0, 0};
    struct gen_job job;
    memset(&job, 0, sizeof job);
    job.prompt = prompt;
    job.negative = negative;
    job.width = W;
    job.height = H;
    job.steps = 4;
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
    CHECK(cap.steps_seen == 4);
    CHECK_MSG(cap.worst < 1e-4, "v%d latents rel L2 %g", v, cap.worst);
    int64_t ni = 0;
    const uint8_t *want = NULL;
    int64_t ii = ref_find(ref, "image_u8");
    if (ii >= 0) {
        want = st_data(ref, ii);
        ni = (int64_t)(ref->tensors[ii].end - ref->tensors[ii].begin);
    }
    CHECK(want && ni == W * H * 3);
    if (want && ni == W * H * 3) {
        int maxd = 0;
        int64_t off = 0;
        for (int64_t j = 0; j < ni; j++) {
            int d = abs((int)rgb[j] - (int)want[j]);
            if (d > maxd) maxd = d;
            off += d != 0;
        }
        printf("v%d decoded RGB8: max diff %d, %lld of %lld values differ\n", v, maxd, (long long)off, (long long)ni);
        CHECK_MSG(maxd <= 1 && off * 100 <= ni, "v%d image: max diff %d, %lld differ", v, maxd, (long long)off);
    }

    /* the public API: the same picture, a PNG that decodes to it with its text */
    lora_params *p = NULL;
    CHECK_STATUS(lora_params_create(ctx, &p), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_PROMPT, prompt), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_NEGATIVE_PROMPT, negative), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_STEPS, 4), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_W, W), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_H, H), LORA_OK);
    CHECK_STATUS(lora_params_set_int(p, LORA_P_SEED, 1234), LORA_OK);
    CHECK_STATUS(lora_params_parse(p, "sampler", "ddim"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_MODEL_HASH, "0123456789"), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_LORA_HASHES, "v_kohya: abcdef012345"), LORA_OK);
    lora_image *img = NULL;
    CHECK_STATUS(lora_generate(model, p, &img), LORA_OK);
    CHECK(lora_image_width(img) == (uint32_t)W && lora_image_height(img) == (uint32_t)H &&
          lora_image_channels(img) == 3 && lora_image_seed(img) == 1234);
    if (img) CHECK(memcmp(lora_image_data(img), rgb, (size_t)(W * H * 3)) == 0);
    const char *pt = lora_image_text(img, "parameters");
    CHECK(pt && strstr(pt, "a photo of a cat, masterpiece\nNegative prompt: blurry, lowres\nSteps: 4, Sampler: DDIM, "
                           "CFG scale: 7.5, Seed: 1234, Size: ") && strstr(pt, "Model hash: 0123456789") &&
          strstr(pt, "Lora hashes: \"v_kohya: abcdef012345\""));
    char png_path[256];
    snprintf(png_path, sizeof png_path, "/tmp/liblora_test_generate_%d_v%d.png", (int)getpid(), v);
    CHECK_STATUS(lora_image_save_png(img, png_path, NULL), LORA_OK);
    uint32_t pw = 0, ph = 0;
    char params[2048], kp[256];
    uint8_t *back = read_png(png_path, &pw, &ph, params, sizeof params, kp, sizeof kp);
    CHECK(back && pw == (uint32_t)W && ph == (uint32_t)H);
    if (back && img) CHECK(memcmp(back, lora_image_data(img), (size_t)(W * H * 3)) == 0);
    CHECK(pt && strcmp(params, pt) == 0);
    CHECK(strcmp(kp, prompt) == 0);
    free(back);
    unlink(png_path);
    lora_image_free(img);

    /* several images: kohya's seeds random.seed(S) + randint(0, 2^31 - 1) */
    if (v == 1) {
        CHECK_STATUS(lora_params_set_int(p, LORA_P_IMAGES_PER_PROMPT, 3), LORA_OK);
        CHECK_STATUS(lora_params_set_int(p, LORA_P_BATCH_SIZE, 2), LORA_OK);
        CHECK_STATUS(lora_params_set_int(p, LORA_P_STEPS, 2), LORA_OK);
        lora_image *imgs[4] = {NULL, NULL, NULL, NULL};
        int64_t got = 0;
        CHECK_STATUS(lora_generate_batch(model, p, imgs, 4, &got), LORA_OK);
        CHECK(got == 3);
        float want_seeds[4] = {0};
        CHECK(ref_as_floats(ref, "pyrandom_seed_1234", want_seeds, 4) == 4);
        for (int i = 0; i < 3; i++) CHECK_MSG(imgs[i] && (float)lora_image_seed(imgs[i]) == want_seeds[i],
                                              "image %d seed %llu, want %.0f", i,
                                              (unsigned long long)lora_image_seed(imgs[i]), (double)want_seeds[i]);
        /* batch composition does not change an image: image 2 alone with its seed */
        lora_params *q = NULL;
        lora_params_create(ctx, &q);
        lora_params_set_string(q, LORA_P_PROMPT, prompt);
        lora_params_set_string(q, LORA_P_NEGATIVE_PROMPT, negative);
        lora_params_set_int(q, LORA_P_STEPS, 2);
        lora_params_set_int(q, LORA_P_W, W);
        lora_params_set_int(q, LORA_P_H, H);
        char sd[32];
        snprintf(sd, sizeof sd, "%llu", imgs[1] ? (unsigned long long)lora_image_seed(imgs[1]) : 0ULL);
        CHECK_STATUS(lora_params_set_string(q, LORA_P_SEEDS, sd), LORA_OK);
        lora_image *one = NULL;
        CHECK_STATUS(lora_generate(model, q, &one), LORA_OK);
        if (one && imgs[1]) {
            int maxd = 0;
            for (int64_t j = 0; j < W * H * 3; j++)
                maxd = abs((int)lora_image_data(one)[j] - (int)lora_image_data(imgs[1])[j]) > maxd
                     ? abs((int)lora_image_data(one)[j] - (int)lora_image_data(imgs[1])[j]) : maxd;
            CHECK_MSG(maxd <= 1, "batch vs single: max diff %d", maxd);
        }
        lora_image_free(one);
        for (int i = 0; i < 4; i++) lora_image_free(imgs[i]);
        lora_params_free(q);

        /* every sampler runs through the API (2 steps) */
        static const char *const samplers[] = {"pndm", "k_lms", "k_euler", "k_euler_a", "heun", "k_dpm_2",
                                               "k_dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle"};
        lora_params_set_int(p, LORA_P_IMAGES_PER_PROMPT, 1);
        for (size_t k = 0; k < sizeof samplers / sizeof samplers[0]; k++) {
            CHECK_STATUS(lora_params_parse(p, "sampler", samplers[k]), LORA_OK);
            lora_image *o = NULL;
            CHECK_STATUS(lora_generate(model, p, &o), LORA_OK);
            CHECK(o != NULL);
            lora_image_free(o);
        }
        /* negative_scale (three passes) and the cuda noise run */
        lora_params_parse(p, "sampler", "euler_a");
        CHECK_STATUS(lora_params_set_float(p, LORA_P_NEGATIVE_SCALE, 2.0), LORA_OK);
        CHECK_STATUS(lora_params_parse(p, "rng", "cuda"), LORA_OK);
        lora_image *o = NULL;
        CHECK_STATUS(lora_generate(model, p, &o), LORA_OK);
        CHECK(lora_image_text(o, "negative-scale") && !strcmp(lora_image_text(o, "negative-scale"), "2.0"));
        lora_image_free(o);
        lora_params_set_float(p, LORA_P_NEGATIVE_SCALE, 0);

        /* cancel from the progress callback after 2 U-Net calls */
        int seen = 0;
        lora_ctx_set_progress(ctx, cancel_cb, &seen);
        lora_params_set_int(p, LORA_P_STEPS, 5);
        o = NULL;
        CHECK_STATUS(lora_generate(model, p, &o), LORA_E_CANCELLED);
        CHECK(o == NULL && seen == 2);
        lora_ctx_set_progress(ctx, NULL, NULL);

        /* sizes the VAE cannot take (72 runs: test_unet_odd) */
        lora_params_set_int(p, LORA_P_W, 68);
        CHECK_STATUS(lora_generate(model, p, &o), LORA_E_CONFIG_RANGE);
        CHECK(strstr(lora_errmsg(ctx), "multiples of 8") != NULL);
        CHECK_STATUS(lora_params_parse(p, "sampler", "ddpm"), LORA_E_CONFIG_RANGE);
        CHECK_STATUS(lora_generate(NULL, p, &o), LORA_E_INVALID_ARG);
        CHECK_STATUS(lora_generate_batch(model, p, NULL, 0, NULL), LORA_E_INVALID_ARG);
    }
    lora_params_free(p);
    free(rgb);
    lora_network_free(net);
    lora_model_free(model);
    st_close(ref);
}

/* --vae: the VAE of tests/data/sd/v1_ldm.safetensors (the same tiny v1 model in LDM form), as
 * the whole checkpoint (first_stage_model.* keys) and as a bare VAE file (encoder.*, decoder.*
 * ...), must give the model's own picture; the bare file with post_quant_conv zeroed must not. */
static void run_vae_override(const char *data) {
    char path[4096], bare[256], zeroed[256];
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", data);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (!model) return;
    tiny_widen_vocab(ctx, model);
    struct tensor_map ldm, vae;
    tmap_init(&ldm, ctx);
    tmap_init(&vae, ctx);
    snprintf(path, sizeof path, "%s/sd/v1_ldm.safetensors", data);
    CHECK_STATUS(st_read_map(ctx, path, &ldm, NULL), LORA_OK);
    for (int64_t i = 0; i < ldm.n; i++) {
        const struct lora_tensor *t = &ldm.t[i];
        if (strncmp(t->name, "first_stage_model.", 18) != 0) continue;
        CHECK_STATUS(tmap_add(&vae, t->name + 18, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 1, 0), LORA_OK);
    }
    CHECK(vae.n > 10);
    snprintf(bare, sizeof bare, "/tmp/liblora_test_vae_%d.safetensors", (int)getpid());
    snprintf(zeroed, sizeof zeroed, "/tmp/liblora_test_vae0_%d.safetensors", (int)getpid());
    CHECK_STATUS(st_write_map(ctx, bare, &vae, NULL, NULL, 0), LORA_OK);
    int64_t k = tmap_find(&vae, "post_quant_conv.weight");
    CHECK(k >= 0);
    if (k >= 0) memset(vae.t[k].data, 0, (size_t)vae.t[k].nbytes);
    CHECK_STATUS(st_write_map(ctx, zeroed, &vae, NULL, NULL, 0), LORA_OK);
    tmap_clear(&vae);
    tmap_clear(&ldm);

    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_string(p, LORA_P_PROMPT, "a photo of a cat");
    lora_params_set_int(p, LORA_P_STEPS, 2);
    lora_params_set_int(p, LORA_P_W, 64);
    lora_params_set_int(p, LORA_P_H, 64);
    lora_params_set_int(p, LORA_P_SEED, 5);
    lora_image *base = NULL, *whole = NULL, *b = NULL, *z = NULL;
    CHECK_STATUS(lora_generate(model, p, &base), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_VAE, path), LORA_OK);
    CHECK_STATUS(lora_generate(model, p, &whole), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_VAE, bare), LORA_OK);
    CHECK_STATUS(lora_generate(model, p, &b), LORA_OK);
    CHECK_STATUS(lora_params_set_string(p, LORA_P_VAE, zeroed), LORA_OK);
    CHECK_STATUS(lora_generate(model, p, &z), LORA_OK);
    if (base && whole && b && z) {
        CHECK(memcmp(lora_image_data(base), lora_image_data(whole), 64 * 64 * 3) == 0);
        CHECK(memcmp(lora_image_data(base), lora_image_data(b), 64 * 64 * 3) == 0);
        CHECK(memcmp(lora_image_data(base), lora_image_data(z), 64 * 64 * 3) != 0);
    }
    /* not a VAE: the kohya LoRA file */
    snprintf(path, sizeof path, "%s/network/v1_kohya.safetensors", data);
    lora_params_set_string(p, LORA_P_VAE, path);
    lora_image *bad = NULL;
    CHECK_STATUS(lora_generate(model, p, &bad), LORA_E_NOT_A_MODEL);
    CHECK(bad == NULL && strstr(lora_errmsg(ctx), "v1_kohya") != NULL);
    lora_image_free(base);
    lora_image_free(whole);
    lora_image_free(b);
    lora_image_free(z);
    lora_params_free(p);
    unlink(bare);
    unlink(zeroed);
    lora_model_free(model);
}

/* img2img against diffusers' img2img steps (make_gen_fixtures.py img2img_fixture): through
 * gen_run (latents per call) and through the API with image_path (the PNG decoded by liblora). */
static void run_img2img(const char *data) {
    char path[4096];
    snprintf(path, sizeof path, "%s/gen/img2img_v1.safetensors", data);
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, path, &ref), LORA_OK);
    if (!ref) return;
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", data);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (!model) {
        st_close(ref);
        return;
    }
    tiny_widen_vocab(ctx, model);
    char img_path[4096];
    snprintf(img_path, sizeof img_path, "%s/gen/init_v1.png", data);
    struct img_rgb8 init;
    CHECK_STATUS(img_load_rgb8(ctx, img_path, NULL, &init), LORA_OK);
    static const struct { const char *sampler; double strength; int kind; } cases[] = {
        {"ddim", 0.6, GEN_DDIM}, {"euler_a", 0.5, GEN_EULER_A}};
    for (int c = 0; c < 2 && init.data; c++) {
        uint64_t seed = 1234;
        struct gen_job job;
        memset(&job, 0, sizeof job);
        job.prompt = "a photo of a cat, masterpiece";
        job.negative = "blurry, lowres";
        job.width = 64;
        job.height = 64;
        job.steps = 4;
        job.scale = 7.5;
        job.kind = cases[c].kind;
        job.batch = 1;
        job.seeds = &seed;
        job.clip_skip = 1;
        job.max_embeddings_multiples = 1;
        job.init_rgb = init.data;
        job.strength = cases[c].strength;
        char prefix[32];
        snprintf(prefix, sizeof prefix, "%s.", cases[c].sampler);
        struct capture cc = {ref, prefix, 1, 0, 0};
        uint8_t rgb[64 * 64 * 3];
        job.on_call = on_call;
        job.user = &cc;
        CHECK_STATUS(gen_run(model, &job, rgb, sizeof rgb), LORA_OK);
        printf("img2img %s strength %.1f: %lld U-Net calls, worst latent rel L2 %.2e\n", cases[c].sampler,
               cases[c].strength, (long long)cc.steps_seen, cc.worst);
        CHECK(cc.steps_seen == 2);   /* get_timesteps: DDIM 0.6 -> init 3 + offset 1 -> start 2; Euler 0.5 -> start 2 */
        CHECK_MSG(cc.worst < 1e-4, "img2img %s latents rel L2 %g", cases[c].sampler, cc.worst);
        char key[64];
        snprintf(key, sizeof key, "%simage_u8", prefix);
        int64_t ii = ref_find(ref, key);
        CHECK(ii >= 0);
        if (ii >= 0) {
            const uint8_t *want = st_data(ref, ii);
            int maxd = 0;
            for (int j = 0; j < 64 * 64 * 3; j++) maxd = abs(rgb[j] - want[j]) > maxd ? abs(rgb[j] - want[j]) : maxd;
            printf("img2img %s image max diff %d\n", cases[c].sampler, maxd);
            CHECK(maxd <= 1);
            /* the API with image_path gives the same picture */
            lora_params *p = NULL;
            lora_params_create(ctx, &p);
            lora_params_set_string(p, LORA_P_PROMPT, job.prompt);
            lora_params_set_string(p, LORA_P_NEGATIVE_PROMPT, job.negative);
            lora_params_set_int(p, LORA_P_STEPS, 4);
            lora_params_set_int(p, LORA_P_SEED, 1234);
            lora_params_parse(p, "sampler", cases[c].sampler);
            lora_params_set_string(p, LORA_P_IMAGE_PATH, img_path);
            lora_params_set_float(p, LORA_P_STRENGTH, cases[c].strength);
            lora_image *img = NULL;
            CHECK_STATUS(lora_generate(model, p, &img), LORA_OK);
            CHECK(img && lora_image_width(img) == 64 && memcmp(lora_image_data(img), rgb, sizeof rgb) == 0);
            const char *pt = lora_image_text(img, "parameters");
            CHECK(pt && strstr(pt, "Denoising strength: "));
            lora_image_free(img);
            lora_params_free(p);
        }
    }
    lora_free(ctx, init.data);
    lora_model_free(model);
    st_close(ref);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    const char *data = getenv("LORA_TEST_DATA") ? getenv("LORA_TEST_DATA") : "tests/data";
    run_version(data, 1);
    run_version(data, 2);
    run_img2img(data);
    run_vae_override(data);
    lora_image_free(NULL);
    CHECK(lora_image_width(NULL) == 0 && lora_image_data(NULL) == NULL && lora_image_text(NULL, "x") == NULL);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes left", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_generate");
}
