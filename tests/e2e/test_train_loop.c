/* The training loop end to end on the tiny SD v1 model (tests/data/sd/v1_ldm.safetensors) with
 * a small in-memory dataset of solid-colour images (the trainer_source hook; the folder
 * dataset is covered by the CLI test):
 *  - resume exactness: a run interrupted after k optimizer steps, saved with
 *    trainer_save_state, and resumed in a fresh trainer (fresh network) continues with the
 *    SAME losses, gradient norms and final parameters bit for bit as an uninterrupted run
 *    (gradient accumulation 2, cosine schedule with warmup, noise_offset, AdamW8bit-free and
 *    AdamW8bit runs); a state loaded into a differently configured run is refused with
 *    LORA_E_RESUME_MISMATCH naming the option;
 *  - learning: after training on red images the denoising loss on held-out noise/timesteps
 *    (another generator) is lower than the base model's by a margin, and the VAE-decoded x0
 *    prediction is closer to red;
 *  - saving: kohya's epoch file names, save_last_n_epochs deletion, the final name, ss_*
 *    metadata values as kohya's str() writes them for this configuration (hand-derived), and
 *    sshs_model_hash = SHA-256 of the data region of the written file (the algorithm itself is
 *    checked against kohya's function in test_train_hashes). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "io/tensor_map.h"
#include "model/sd_model.h"
#include "network/network.h"
#include "train/trainer.h"
#include "../test.h"

#define W 64
#define H 64

struct mem_src {
    int n_img;
    float rgb[4][3];
    const char *caption[4];
    float pixels[3 * W * H];
    const char *caps[1];
    float lw[1];
    int32_t reg[1];
};

static lora_status mem_batch(void *user, int64_t epoch, int64_t index, struct ds_batch *b) {
    struct mem_src *m = user;
    int k = (int)((index + epoch) % m->n_img);   /* order depends on (epoch, index) only */
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < W * H; i++) m->pixels[c * W * H + i] = m->rgb[k][c];
    m->caps[0] = m->caption[k];
    m->lw[0] = 1.0f;
    m->reg[0] = 0;
    memset(b, 0, sizeof *b);
    b->n = 1;
    b->width = W;
    b->height = H;
    b->pixels = m->pixels;
    b->captions = m->caps;
    b->loss_weights = m->lw;
    b->is_reg = m->reg;
    return LORA_OK;
}

static struct trainer_source make_src(struct mem_src *m) {
    struct trainer_source s;
    memset(&s, 0, sizeof s);
    s.user = m;
    s.n_train_images = m->n_img;
    s.n_reg_images = 0;
    s.batches_per_epoch = m->n_img;
    s.batch = mem_batch;
    return s;
}

static const char *g_data;
static char g_tmp[512];

static lora_model *load_model(lora_ctx *ctx) {
    char path[1024];
    /* the diffusers folder: an LDM file does not record the text encoder's head count */
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", g_data);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &m), LORA_OK);
    return m;
}

static lora_network *make_net(lora_model *model, lora_params *p) {
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_create(model, p, &net), LORA_OK);
    return net;
}

static void base_opts(lora_params *p, const char *optimizer) {
    lora_params_set_float(p, LORA_P_LEARNING_RATE, 2e-3);
    lora_params_set_float(p, LORA_P_TEXT_ENCODER_LR, 1e-3);
    lora_params_set_int(p, LORA_P_MAX_TRAIN_STEPS, 7);
    lora_params_set_int(p, LORA_P_SEED, 42);
    lora_params_set_string(p, LORA_P_RESOLUTION, "64");
    lora_params_set_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS, 2);
    lora_params_set_string(p, LORA_P_LR_SCHEDULER, "cosine");
    lora_params_set_int(p, LORA_P_LR_WARMUP_STEPS, 2);
    lora_params_set_float(p, LORA_P_NOISE_OFFSET, 0.05);
    lora_params_set_string(p, LORA_P_OPTIMIZER_TYPE, optimizer);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, 4);
}

static int same_bits(double a, double b) { return memcmp(&a, &b, sizeof a) == 0; }

static int g_expect_8bit;

/* Runs `steps` steps on a fresh trainer (optionally from `state`), recording losses/norms. */
static int run(lora_ctx *ctx, lora_model *model, lora_params *p, struct mem_src *m, const char *state_in,
               const char *state_out, int64_t steps, double *loss, double *norm, float **params_out,
               int64_t *n_params, lora_status *load_status) {
    lora_network *net = make_net(model, p);
    if (!net) return 0;
    struct trainer_source src = make_src(m);
    struct lora_trainer *tr = NULL;
    lora_status s = trainer_create(model, net, p, &src, &tr);
    CHECK_STATUS(s, LORA_OK);
    if (s != LORA_OK) fprintf(stderr, "trainer_create: %s\n", lora_errmsg(ctx));
    if (!tr) {
        lora_network_free(net);
        return 0;
    }
    if (g_expect_8bit) {
        /* 8-bit tensors take 2 absmax floats per 2048 + 2 bytes per element instead of 8 bytes */
        CHECK_MSG(tr->st.n_state < 2 * tr->st.n_floats, "AdamW8bit: %lld state floats for %lld parameters (no 8-bit tensor)",
                  (long long)tr->st.n_state, (long long)tr->st.n_floats);
    }
    if (state_in) {
        s = trainer_load_state(tr, state_in);
        if (load_status) *load_status = s;
        if (s != LORA_OK) {
            trainer_free(tr);
            lora_network_free(net);
            return 0;
        }
    }
    for (int64_t i = 0; i < steps; i++) {
        int64_t done = 0;
        CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
        loss[i] = tr->last_loss;
        norm[i] = tr->last_norm;
    }
    if (state_out) CHECK_STATUS(trainer_save_state(tr, state_out), LORA_OK);
    if (params_out) {
        *n_params = tr->st.n_floats;
        *params_out = malloc((size_t)tr->st.n_floats * sizeof(float));
        for (int64_t i = 0; i < net->n; i++) {
            const struct net_module *mm = &net->m[i];
            int64_t nd = mm->nn.rank * mm->nn.in, nu = mm->nn.out * mm->nn.rank;
            memcpy(*params_out + tr->st.off[i], mm->down, (size_t)nd * 4);
            memcpy(*params_out + tr->st.off[i] + nd, mm->up, (size_t)nu * 4);
        }
    }
    trainer_free(tr);
    lora_network_free(net);
    return 1;
}

static void test_resume(lora_ctx *ctx, lora_model *model, const char *optimizer, const char *precision) {
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    base_opts(p, optimizer);
    lora_params_set_string(p, LORA_P_MIXED_PRECISION, precision);
    /* rank 64: the ff.net.0.proj ups (96 x 64) reach bitsandbytes' 4096-element threshold, so
     * part of the state is blockwise 8-bit (checked in run()) */
    g_expect_8bit = strcmp(optimizer, "AdamW8bit") == 0;
    if (g_expect_8bit) lora_params_set_int(p, LORA_P_NETWORK_DIM, 64);
    static struct mem_src m = {.n_img = 3,
                               .rgb = {{0.9f, -0.8f, -0.7f}, {-0.6f, 0.7f, -0.5f}, {-0.4f, -0.3f, 0.8f}},
                               .caption = {"red", "green", "blue"}};
    enum { N = 7, K = 3 };
    double la[N], na[N], lb[N], nb[N];
    float *pa = NULL, *pb = NULL;
    int64_t npa = 0, npb = 0;
    char st[600];
    snprintf(st, sizeof st, "%s/resume-%s-%s.safetensors", g_tmp, optimizer, precision);
    if (!run(ctx, model, p, &m, NULL, NULL, N, la, na, &pa, &npa, NULL)) goto out;
    if (!run(ctx, model, p, &m, NULL, st, K, lb, nb, NULL, NULL, NULL)) goto out;
    if (!run(ctx, model, p, &m, st, NULL, N - K, lb + K, nb + K, &pb, &npb, NULL)) goto out;
    int same = npa == npb && pa && pb && memcmp(pa, pb, (size_t)npa * 4) == 0;
    for (int i = 0; i < N; i++) {
        CHECK_MSG(same_bits(la[i], lb[i]) && same_bits(na[i], nb[i]), "%s step %d: loss %.17g vs %.17g, norm %.17g vs %.17g",
                  optimizer, i + 1, la[i], lb[i], na[i], nb[i]);
    }
    CHECK_MSG(same, "%s: parameters after the resumed run differ", optimizer);
    printf("%s (%s) resume after %d of %d steps: losses", optimizer, precision, K, N);
    for (int i = 0; i < N; i++) printf(" %.6f", la[i]);
    printf(" -> identical bits: %s\n", same ? "yes" : "NO");
    /* a run with another learning rate refuses the state */
    lora_params_set_float(p, LORA_P_LEARNING_RATE, 3e-3);
    lora_status ls = LORA_OK;
    double d1[N], d2[N];
    run(ctx, model, p, &m, st, NULL, 1, d1, d2, NULL, NULL, &ls);
    CHECK_STATUS(ls, LORA_E_RESUME_MISMATCH);
    CHECK_MSG(strstr(lora_errmsg(ctx), "unet_lr") != NULL, "mismatch message: %s", lora_errmsg(ctx));
out:
    free(pa);
    free(pb);
    unlink(st);
    lora_params_free(p);
}

/* Held-out denoising loss and x0 colour error of the trainer's current network. */
static void evaluate(struct lora_trainer *tr, lora_model *model, const float *lat, const int32_t *ids, double *loss,
                     double *colour_err, const float *ref, double *lat_err) {
    struct lora_mt19937 g;
    lora_mt_seed(&g, 777);
    const int64_t per = 4 * (H / 8) * (W / 8);
    float noise[4 * (H / 8) * (W / 8)], x0[4 * (H / 8) * (W / 8)], img[3 * W * H];
    static const int64_t ts[] = {150, 350, 550, 750, 950, 250, 450, 650};
    double tl = 0, te = 0, tz = 0;
    int n = (int)(sizeof ts / sizeof ts[0]), ne = 0;
    lora_status s = train_reshape(&tr->st, 1, H / 8, W / 8);
    CHECK_STATUS(s, LORA_OK);
    for (int k = 0; k < n; k++) {
        lora_torch_randn(&g, noise, per);
        double l = 0;
        train_zero_grad(&tr->st);
        tr->st.loss_mult = 1.0f;
        lora_status as = train_accumulate(&tr->st, lat, noise, &ts[k], ids, NULL, &l);
        CHECK_STATUS(as, LORA_OK);
        if (as != LORA_OK) fprintf(stderr, "evaluate: %s\n", lora_errmsg(tr->ctx));
        train_zero_grad(&tr->st);
        tl += l;
        /* x0 = (noisy - sqrt(1 - a) eps) / sqrt(a), decoded; up to t = 450 (later the 1/sqrt(a)
         * amplification of the prediction error swamps the image) */
        if (ts[k] > 450) continue;
        ne++;
        float a = tr->st.acp[ts[k]];
        for (int64_t i = 0; i < per; i++)
            x0[i] = (tr->st.noisy[i] - sqrtf(1 - a) * tr->st.pred[i]) / sqrtf(a);
        for (int64_t i = 0; i < per; i++) {
            tz += fabs((double)x0[i] - lat[i]) / (double)per;
            x0[i] /= 0.18215f;
        }
        CHECK_STATUS(lora_model_vae_decode(model, x0, 1, H / 8, W / 8, img, 3 * W * H), LORA_OK);
        double e = 0;
        for (int i = 0; i < 3 * W * H; i++) e += fabs((double)img[i] - ref[i]);
        te += e / (3.0 * W * H);
    }
    *loss = tl / n;
    *colour_err = te / ne;
    *lat_err = tz / ne;
}

static void test_learns(lora_ctx *ctx, lora_model *model) {
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    base_opts(p, "AdamW");
    lora_params_set_float(p, LORA_P_LEARNING_RATE, 1e-2);
    lora_params_set_float(p, LORA_P_TEXT_ENCODER_LR, 5e-3);
    lora_params_set_int(p, LORA_P_MAX_TRAIN_STEPS, 120);
    lora_params_set_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS, 1);
    lora_params_set_string(p, LORA_P_LR_SCHEDULER, "constant");
    lora_params_set_float(p, LORA_P_NOISE_OFFSET, 0);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, 8);
    lora_params_set_string(p, LORA_P_OPTIMIZER_ARGS, "weight_decay=0.1");
    lora_params_set_string(p, LORA_P_TRAINING_COMMENT, "red squares");
    char model_path[1024], out_dir[600];
    /* the metadata names (and hashes) this path, the LDM file of the same weights */
    snprintf(model_path, sizeof model_path, "%s/sd/v1_ldm.safetensors", g_data);
    lora_params_set_string(p, LORA_P_PRETRAINED_MODEL_NAME_OR_PATH, model_path);
    snprintf(out_dir, sizeof out_dir, "%s/out", g_tmp);
    lora_params_set_string(p, LORA_P_OUTPUT_DIR, out_dir);
    lora_params_set_string(p, LORA_P_OUTPUT_NAME, "tl");
    lora_params_set_int(p, LORA_P_SAVE_EVERY_N_EPOCHS, 20);
    lora_params_set_int(p, LORA_P_SAVE_LAST_N_EPOCHS, 2);
    static struct mem_src m = {.n_img = 2, .rgb = {{0.9f, -0.8f, -0.7f}, {0.9f, -0.8f, -0.7f}}, .caption = {"red", "red"}};
    lora_network *net = make_net(model, p);
    struct trainer_source src = make_src(&m);
    struct lora_trainer *tr = NULL;
    if (net) CHECK_STATUS(trainer_create(model, net, p, &src, &tr), LORA_OK);
    if (!tr) goto out;
    /* held-out inputs: the red image's VAE mean, the caption's ids */
    float lat[4 * (H / 8) * (W / 8)];
    mem_batch(&m, 1, 0, &(struct ds_batch){0});
    CHECK_STATUS(lora_model_vae_encode(model, m.pixels, 1, H, W, lat, NULL, sizeof lat / 4), LORA_OK);
    for (size_t i = 0; i < sizeof lat / 4; i++) lat[i] *= 0.18215f;
    int32_t ids[77];
    size_t got = 0;
    CHECK_STATUS(tok_encode(tr->tok, "red", 3, 75, ids, 77, &got), LORA_OK);
    for (int i = 0; i < 77; i++) ids[i] %= (int32_t)tr->clip.vocab;   /* as the trainer feeds the tiny model */
    /* the red image as this (random, test-size) VAE renders it: the decoded latent mean */
    static float ref[3 * W * H];
    float un[4 * (H / 8) * (W / 8)];
    for (size_t i = 0; i < sizeof un / 4; i++) un[i] = lat[i] / 0.18215f;
    CHECK_STATUS(lora_model_vae_decode(model, un, 1, H / 8, W / 8, ref, 3 * W * H), LORA_OK);
    double l0 = 0, e0 = 0, l1 = 0, e1 = 0, z0 = 0, z1 = 0;
    evaluate(tr, model, lat, ids, &l0, &e0, ref, &z0);
    CHECK_STATUS(trainer_run(tr), LORA_OK);
    evaluate(tr, model, lat, ids, &l1, &e1, ref, &z1);
    printf("x0 prediction |error| to the red latent %.4f -> %.4f (%.1f%%)\n", z0, z1, 100.0 * (z1 - z0) / z0);
    CHECK_MSG(z1 < 0.9 * z0, "x0 latent error %.5f not 10%% below the base model's %.5f", z1, z0);
    printf("held-out denoising loss %.5f -> %.5f (%.1f%%), decoded x0 prediction |error| to the decoded red image "
           "%.4f -> %.4f (%.1f%%) after %lld steps\n", l0, l1, 100.0 * (l1 - l0) / l0, e0, e1, 100.0 * (e1 - e0) / e0,
           (long long)tr->global_step);
    CHECK_MSG(l1 < 0.8 * l0, "held-out loss %.5f not 20%% below the base model's %.5f", l1, l0);
    CHECK_MSG(e1 < e0, "decoded x0 error %.5f not below the base model's %.5f", e1, e0);
    CHECK(tr->global_step == 120);
    /* files: 60 epochs of 2 batches; saves at 20, 40 (not 60 = the last); save_last_n_epochs 2
     * removes epoch e - 40 -> none; then the final file */
    char path[1200];
    struct stat sb;
    snprintf(path, sizeof path, "%s/tl-000020.safetensors", out_dir);
    CHECK_MSG(stat(path, &sb) == 0, "%s missing", path);
    snprintf(path, sizeof path, "%s/tl-000040.safetensors", out_dir);
    CHECK_MSG(stat(path, &sb) == 0, "%s missing", path);
    snprintf(path, sizeof path, "%s/tl-000060.safetensors", out_dir);
    CHECK_MSG(stat(path, &sb) != 0, "%s should not exist (the last epoch saves as tl)", path);
    snprintf(path, sizeof path, "%s/tl.safetensors", out_dir);
    CHECK_MSG(stat(path, &sb) == 0, "%s missing", path);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    if (f) {
        /* hand-derived from the options above (kohya writes str() of each value) */
        static const char *const want[][2] = {
            {"ss_output_name", "tl"}, {"ss_learning_rate", "0.01"}, {"ss_text_encoder_lr", "0.005"},
            {"ss_unet_lr", "None"}, {"ss_num_train_images", "2"}, {"ss_num_reg_images", "0"},
            {"ss_num_batches_per_epoch", "2"}, {"ss_num_epochs", "60"}, {"ss_batch_size_per_device", "1"},
            {"ss_total_batch_size", "1"}, {"ss_gradient_checkpointing", "False"},
            {"ss_gradient_accumulation_steps", "1"}, {"ss_max_train_steps", "120"}, {"ss_lr_warmup_steps", "2"},
            {"ss_lr_scheduler", "constant"}, {"ss_network_module", "networks.lora"}, {"ss_network_dim", "8"},
            {"ss_network_alpha", "1.0"}, {"ss_mixed_precision", "no"}, {"ss_full_fp16", "False"}, {"ss_v2", "False"},
            {"ss_resolution", "(64, 64)"}, {"ss_clip_skip", "None"}, {"ss_max_token_length", "None"},
            {"ss_color_aug", "False"}, {"ss_flip_aug", "False"}, {"ss_random_crop", "False"},
            {"ss_shuffle_caption", "False"}, {"ss_cache_latents", "False"}, {"ss_enable_bucket", "False"},
            {"ss_min_bucket_reso", "256"}, {"ss_max_bucket_reso", "1024"}, {"ss_seed", "42"}, {"ss_keep_tokens", "0"},
            {"ss_noise_offset", "None"}, {"ss_training_comment", "red squares"},
            {"ss_optimizer", "torch.optim.adamw.AdamW(weight_decay=0.1)"}, {"ss_max_grad_norm", "1.0"},
            {"ss_caption_dropout_rate", "0.0"}, {"ss_caption_dropout_every_n_epochs", "None"},
            {"ss_caption_tag_dropout_rate", "0.0"}, {"ss_prior_loss_weight", "1.0"}, {"ss_epoch", "60"},
            {"ss_steps", "120"}, {"ss_sd_model_name", "v1_ldm.safetensors"}, {"ss_sd_model_hash", "e3b0c442"},
            {"ss_dataset_dirs", "{}"}, {"ss_face_crop_aug_range", "None"},
        };
        const char *need[] = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at",
                              "ss_new_sd_model_hash", "sshs_model_hash", "sshs_legacy_hash", "ss_tag_frequency",
                              "ss_bucket_info", "ss_reg_dataset_dirs"};
        for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
            const char *v = NULL;
            for (int64_t j = 0; j < f->n_meta; j++)
                if (strcmp(f->meta_keys[j], want[i][0]) == 0) v = f->meta_vals[j];
            CHECK_MSG(v && strcmp(v, want[i][1]) == 0, "%s = '%s', want '%s'", want[i][0], v ? v : "(absent)", want[i][1]);
        }
        const char *mh = NULL, *lh = NULL, *nh = NULL;
        for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
            const char *v = NULL;
            for (int64_t j = 0; j < f->n_meta; j++)
                if (strcmp(f->meta_keys[j], need[i]) == 0) v = f->meta_vals[j];
            CHECK_MSG(v != NULL, "%s absent", need[i]);
            if (i == 3) nh = v;
            if (i == 4) mh = v;
            if (i == 5) lh = v;
        }
        /* sshs_model_hash covers the data region, the same bytes as in this file */
        uint8_t d[32];
        char hx[65];
        CHECK(lora_sha256(NULL, f->base + f->data_start, (size_t)(f->size - f->data_start), d) == LORA_OK);
        md_hex(d, 32, hx);
        CHECK_MSG(mh && strcmp(mh, hx) == 0, "sshs_model_hash %s, data region %s", mh ? mh : "-", hx);
        CHECK(lh && strlen(lh) == 8);
        /* tests/data/trainer/hashes.json holds Python's hashlib of the model file */
        char jp[1024];
        snprintf(jp, sizeof jp, "%s/trainer/hashes.json", g_data);
        size_t jl = 0;
        char *js = (char *)test_slurp(jp, &jl);
        CHECK_MSG(js && nh && strstr(js, nh), "ss_new_sd_model_hash %s not the Python sha256 of the model", nh ? nh : "-");
        free(js);
        CHECK(f->n_tensors == 3 * net->n);
        st_close(f);
    }
    /* the sd-scripts default names */
    trainer_free(tr);
    tr = NULL;
out:
    lora_network_free(net);
    lora_params_free(p);
}

/* min_snr_gamma: the first step's loss (same seed, same weights, same noise and timestep) is
 * the plain loss times min(snr, gamma) / snr, snr = acp / (1 - acp) at the step's timestep. */
static void test_min_snr(lora_ctx *ctx, lora_model *model) {
    static struct mem_src m = {.n_img = 1, .rgb = {{0.2f, 0.4f, -0.6f}}, .caption = {"x"}};
    double loss[2] = {0, 0};
    int64_t t = -1;
    for (int k = 0; k < 2; k++) {
        lora_params *p = NULL;
        lora_params_create(ctx, &p);
        base_opts(p, "AdamW");
        lora_params_set_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS, 1);
        lora_params_set_float(p, LORA_P_NOISE_OFFSET, 0);
        if (k) lora_params_set_float(p, LORA_P_MIN_SNR_GAMMA, 0.5);
        lora_network *net = make_net(model, p);
        struct trainer_source src = make_src(&m);
        struct lora_trainer *tr = NULL;
        if (net) CHECK_STATUS(trainer_create(model, net, p, &src, &tr), LORA_OK);
        if (tr) {
            int64_t done = 0;
            CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
            loss[k] = tr->last_loss;
            CHECK(t < 0 || t == tr->ts[0]);
            t = tr->ts[0];
            trainer_free(tr);
        }
        lora_network_free(net);
        lora_params_free(p);
    }
    float acp[TRAIN_T];
    train_alphas_cumprod(acp);
    double snr = t >= 0 ? (double)acp[t] / (1.0 - (double)acp[t]) : 1, want = (snr < 0.5 ? snr : 0.5) / snr;
    printf("min_snr_gamma 0.5 at t=%lld: loss %.6f / %.6f = %.6f, min(snr, gamma)/snr = %.6f\n", (long long)t, loss[1],
           loss[0], loss[1] / loss[0], want);
    CHECK_MSG(fabs(loss[1] / loss[0] - want) <= 1e-5 * want, "min_snr_gamma weight %.8f, want %.8f", loss[1] / loss[0], want);
}

/* mixed_precision fp16/bf16 = kohya's frozen U-Net in the weight dtype: the first step's loss
 * and gradient norm equal, bit for bit, those of a float32 run on a model whose U-Net tensors
 * this test rounded itself (lora_f32_to_f16 / _bf16); the text encoder stays float32. Cached
 * latents, so the VAE (also cast by the trainer) is not involved. */
static float g_lat[4 * 8 * 8];
static lora_status lat_batch(void *user, int64_t epoch, int64_t index, struct ds_batch *b) {
    (void)user, (void)epoch, (void)index;
    static const char *caps[1] = {"a photo"};
    static float lw[1] = {1};
    static int32_t reg[1];
    memset(b, 0, sizeof *b);
    b->n = 1, b->width = 64, b->height = 64, b->latents = g_lat, b->captions = caps, b->loss_weights = lw, b->is_reg = reg;
    return LORA_OK;
}

static void round_unet(lora_model *m, lora_dtype dt) {
    /* every floating tensor -> float32 holding the value rounded to dt */
    struct tensor_map *u = &m->sd.unet;
    for (int64_t i = 0; i < u->n; i++) {
        struct lora_tensor *t = &u->t[i];
        if (t->dtype != LORA_DTYPE_F32 && t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16) continue;
        int64_t n = tmap_numel(t);
        float *f = lora_malloc(m->ctx, (size_t)(n ? n : 1) * 4);
        for (int64_t j = 0; j < n; j++) {
            float v;
            if (t->dtype == LORA_DTYPE_F32) memcpy(&v, (uint8_t *)t->data + 4 * j, 4);
            else {
                uint16_t h;
                memcpy(&h, (uint8_t *)t->data + 2 * j, 2);
                v = t->dtype == LORA_DTYPE_F16 ? lora_f16_to_f32(h) : lora_bf16_to_f32(h);
            }
            f[j] = dt == LORA_DTYPE_F16 ? lora_f16_to_f32(lora_f32_to_f16(v)) : lora_bf16_to_f32(lora_f32_to_bf16(v));
        }
        if (t->owned) lora_free(m->ctx, t->data);
        t->data = f;
        t->owned = 1;
        t->dtype = LORA_DTYPE_F32;
        t->nbytes = (uint64_t)n * 4;
    }
}

static void test_mixed_precision(lora_ctx *ctx, lora_model *model) {
    struct lora_mt19937 g;
    lora_mt_seed(&g, 99);
    lora_torch_randn(&g, g_lat, 4 * 8 * 8);
    const char *prec[2] = {"fp16", "bf16"};
    for (int k = 0; k < 2; k++) {
        double loss[2] = {0, 0}, norm[2] = {0, 0};
        char path[1024];
        snprintf(path, sizeof path, "%s/sd/v1_diffusers", g_data);
        lora_model *m2 = NULL;
        CHECK_STATUS(lora_model_load(ctx, path, NULL, &m2), LORA_OK);
        if (!m2) return;
        round_unet(m2, k == 0 ? LORA_DTYPE_F16 : LORA_DTYPE_BF16);
        for (int run = 0; run < 2; run++) {
            lora_params *p = NULL;
            lora_params_create(ctx, &p);
            base_opts(p, "AdamW");
            lora_params_set_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS, 1);
            lora_params_set_string(p, LORA_P_MIXED_PRECISION, run == 0 ? prec[k] : "no");
            lora_model *mm = run == 0 ? model : m2;
            lora_network *net = make_net(mm, p);
            struct trainer_source src = {NULL, 1, 0, 1, lat_batch};
            struct lora_trainer *tr = NULL;
            if (net) CHECK_STATUS(trainer_create(mm, net, p, &src, &tr), LORA_OK);
            if (tr) {
                int64_t done = 0;
                CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
                loss[run] = tr->last_loss;
                norm[run] = tr->last_norm;
                if (run == 0 && k == 0) CHECK(tr->scaler.enabled && tr->scaler.scale == 65536.0f);
                trainer_free(tr);
            }
            lora_network_free(net);
            lora_params_free(p);
        }
        printf("mixed_precision %s: loss %.9f norm %.9f; float32 run on a U-Net rounded by the test: loss %.9f norm %.9f\n",
               prec[k], loss[0], norm[0], loss[1], norm[1]);
        CHECK_MSG(same_bits(loss[0], loss[1]) && same_bits(norm[0], norm[1]), "%s: loss/norm differ", prec[k]);
        lora_model_free(m2);
    }
}

/* max_token_length 150: the text encoder runs on 2 chunks of 77 and the U-Net sees the re-joined
 * 152-token context; the TE LoRA gradient through the chunks (clip_rejoin_chunks_backward)
 * against float64-accumulated central differences of the loss. */
static void test_long_tokens(lora_ctx *ctx, lora_model *model) {
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    base_opts(p, "AdamW");
    lora_params_set_int(p, LORA_P_MAX_TOKEN_LENGTH, 150);
    lora_params_set_int(p, LORA_P_GRADIENT_ACCUMULATION_STEPS, 1);
    lora_network *net = make_net(model, p);
    struct trainer_source src = {NULL, 1, 0, 1, lat_batch};
    struct lora_trainer *tr = NULL;
    if (net) CHECK_STATUS(trainer_create(model, net, p, &src, &tr), LORA_OK);
    if (!tr) goto out;
    CHECK(tr->st.n_chunks == 2 && tr->st.ctx_tokens == 152);
    /* a trained-looking network: small random ups everywhere */
    struct lora_mt19937 g;
    lora_mt_seed(&g, 5);
    for (int64_t i = 0; i < net->n; i++) {
        struct net_module *mm = &net->m[i];
        lora_torch_randn(&g, mm->up, mm->out * mm->rank);
        for (int64_t j = 0; j < mm->out * mm->rank; j++) mm->up[j] *= 0.3f;
    }
    int64_t done = 0;
    CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);   /* the chunked step runs end to end */
    /* a caption of ~100 tokens fills both chunks */
    char cap[2048] = "";
    for (int i = 0; i < 50; i++) strcat(cap, i % 2 ? "red square, " : "blue circle ");
    int32_t ids[154];
    size_t got = 0;
    CHECK_STATUS(tok_encode(tr->tok, cap, strlen(cap), 150, ids, 154, &got), LORA_OK);
    CHECK(got == 154);
    for (int i = 0; i < 154; i++) ids[i] %= (int32_t)tr->clip.vocab;
    float noise[4 * 8 * 8];
    lora_mt_seed(&g, 6);
    lora_torch_randn(&g, noise, 4 * 8 * 8);
    int64_t t[1] = {400};
    CHECK_STATUS(train_reshape(&tr->st, 1, 8, 8), LORA_OK);
    tr->st.loss_mult = 1.0f;
    train_zero_grad(&tr->st);
    double l0 = 0;
    CHECK_STATUS(train_accumulate(&tr->st, g_lat, noise, t, ids, NULL, &l0), LORA_OK);
    /* the text-encoder LoRA element with the largest gradient (layer 0: both chunks feed it) */
    int64_t best_m = -1, best_j = 0;
    float best = 0;
    for (int64_t i = 0; i < net->n; i++) {
        if (strncmp(net->m[i].name, "lora_te_", 8) != 0) continue;
        const float *gd = tr->st.grad + tr->st.off[i];
        for (int64_t j = 0; j < net->m[i].rank * net->m[i].in; j++)
            if (fabsf(gd[j]) > best) best = fabsf(gd[j]), best_m = i, best_j = j;
    }
    CHECK(best_m >= 0 && best > 0);
    if (best_m >= 0) {
        double an = tr->st.grad[tr->st.off[best_m] + best_j];
        float *w = &net->m[best_m].down[best_j], w0 = *w;
        const float hstep = 2e-2f;
        double lp = 0, lm = 0;
        *w = w0 + hstep;
        train_zero_grad(&tr->st);
        CHECK_STATUS(train_accumulate(&tr->st, g_lat, noise, t, ids, NULL, &lp), LORA_OK);
        *w = w0 - hstep;
        train_zero_grad(&tr->st);
        CHECK_STATUS(train_accumulate(&tr->st, g_lat, noise, t, ids, NULL, &lm), LORA_OK);
        *w = w0;
        train_zero_grad(&tr->st);
        double fd = (lp - lm) / (2.0 * ((double)(w0 + hstep) - (double)w0));
        printf("max_token_length 150: %s down[%lld] gradient %.6e, central difference %.6e (rel %.2e)\n",
               net->m[best_m].name, (long long)best_j, an, fd, fabs(an - fd) / fabs(fd));
        CHECK_MSG(fabs(an - fd) <= 0.02 * fabs(fd), "chunked TE gradient %.6e vs finite difference %.6e", an, fd);
    }
    trainer_free(tr);
out:
    lora_network_free(net);
    lora_params_free(p);
}

/* accelerate 0.15 accumulation, hand-derived: 3 batches per epoch, G = 2 -> syncs at micro-steps
 * 1, 2 (the epoch's last) | 4, 5; 2 updates per epoch, 4 steps = 2 epochs; the linear scheduler
 * (total = 4 x 2 = 8 micro-steps) steps every micro-step, so update k uses lr (8 - m) / 8 with
 * m the sync micro-step's index. */
static void test_accumulation(lora_ctx *ctx, lora_model *model) {
    static struct mem_src m = {.n_img = 3, .rgb = {{0.5f, 0, 0}, {0, 0.5f, 0}, {0, 0, 0.5f}}, .caption = {"a", "b", "c"}};
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    base_opts(p, "AdamW");
    lora_params_set_int(p, LORA_P_MAX_TRAIN_STEPS, 4);
    lora_params_set_string(p, LORA_P_LR_SCHEDULER, "linear");
    lora_params_set_int(p, LORA_P_LR_WARMUP_STEPS, 0);
    lora_params_set_float(p, LORA_P_UNET_LR, 8e-3);
    lora_network *net = make_net(model, p);
    struct trainer_source src = make_src(&m);
    struct lora_trainer *tr = NULL;
    if (net) CHECK_STATUS(trainer_create(model, net, p, &src, &tr), LORA_OK);
    if (tr) {
        CHECK(tr->num_epochs == 2 && tr->max_train_steps == 4 && tr->sched.total == 8);
        static const int64_t sync_m[4] = {1, 2, 4, 5}, sched_after[4] = {2, 3, 5, 6}, epoch_after[4] = {0, 1, 1, 2};
        for (int k = 0; k < 4; k++) {
            int64_t done = 0;
            CHECK_STATUS(trainer_step(tr, 1, &done), LORA_OK);
            double want = 8e-3 * (double)(8 - sync_m[k]) / 8.0;
            CHECK_MSG(fabs(tr->lr_unet - want) <= 1e-15, "update %d: lr %.17g, want %.17g", k + 1, tr->lr_unet, want);
            CHECK_MSG(tr->sched_steps == sched_after[k], "update %d: %lld scheduler steps, want %lld", k + 1,
                      (long long)tr->sched_steps, (long long)sched_after[k]);
            CHECK_MSG(tr->epoch == epoch_after[k] || k == 3, "update %d: epoch %lld", k + 1, (long long)tr->epoch);
        }
        CHECK(tr->global_step == 4);
        trainer_free(tr);
    }
    lora_network_free(net);
    lora_params_free(p);
}

static int rm_tree(const char *dir) {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd);
}

int main(void) {
    g_data = getenv("LORA_TEST_DATA");
    if (!g_data) g_data = "tests/data";
    snprintf(g_tmp, sizeof g_tmp, "/tmp/lora-train-loop-%d", (int)getpid());
    mkdir(g_tmp, 0700);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_ctx_set_threads(ctx, 2);
    lora_model *model = load_model(ctx);
    if (model) {
        test_resume(ctx, model, "AdamW", "no");
        test_resume(ctx, model, "AdamW8bit", "no");
        g_expect_8bit = 0;
        test_resume(ctx, model, "Lion", "fp16");
        test_resume(ctx, model, "SGDNesterov", "bf16");
        test_learns(ctx, model);
        test_min_snr(ctx, model);
        test_mixed_precision(ctx, model);
        test_long_tokens(ctx, model);
        test_accumulation(ctx, model);
    }
    lora_model_free(model);
    lora_ctx_free(ctx);
    if (rm_tree(g_tmp) != 0) fprintf(stderr, "could not remove %s\n", g_tmp);
    return test_finish("test_train_loop");
}
