/* The reference outputs of the tiny SD v1/v2 models (tests/reference/make_sd_reference_outputs.py,
 * tests/data/sd/vN_reference_outputs.safetensors) are present and self-consistent: every tensor
 * the script's docstring lists is there with the dtype and shape the configs in
 * tests/data/sd/vN_diffusers/{unet,vae,text_encoder,scheduler}/ imply (hidden width, number of
 * hidden states = layers + 1, cross_attention_dim = text width, latent size = image size /
 * 2^(levels-1), ...), the parameter gradients have the shapes of the parameters in the diffusers
 * weight files, the token ids follow the bos/tokens/eos/padding layout, the metadata names the
 * versions, and the few values that follow from others by a formula (scaled latent, add_noise,
 * v target, alphas_cumprod in float64) agree. Nothing here runs a network: the forward and
 * backward tests that compare against these files come with the C implementations. */
#include <stdarg.h>

#include <jansson.h>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "../test.h"

#define MAX_FILE_BYTES (300 * 1024)

static lora_ctx *ctx;

static const char *data_dir(void) {
    const char *d = getenv("LORA_TEST_DATA");
    return d ? d : "tests/data";
}

static const char *sd_path(const char *fmt, const char *ver) {
    static char buf[4][4096];
    static int k;
    char rel[512];
    k = (k + 1) % 4;
    snprintf(rel, sizeof rel, fmt, ver);
    snprintf(buf[k], sizeof buf[k], "%s/sd/%s", data_dir(), rel);
    return buf[k];
}

static json_t *load_json(const char *path) {
    json_error_t e;
    json_t *j = json_load_file(path, 0, &e);
    if (!j) fprintf(stderr, "%s: %s\n", path, e.text);
    return j;
}

static int64_t jint(json_t *o, const char *k) { return json_integer_value(json_object_get(o, k)); }

/* o[k] is the string `v`. */
static int jstr_eq(json_t *o, const char *k, const char *v) {
    const char *s = json_string_value(json_object_get(o, k));
    return s && strcmp(s, v) == 0;
}

static int64_t find(const struct lora_file *f, const char *name) {
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return i;
    return -1;
}

/* The tensor `name` exists with dtype `dt` and the shape given (ndim values after it). */
static int64_t want(const struct lora_file *f, const char *name, lora_dtype dt, int ndim, ...) {
    int64_t i = find(f, name);
    CHECK_MSG(i >= 0, "%s: no tensor %s", f->path, name);
    if (i < 0) return -1;
    const struct st_tensor *t = &f->tensors[i];
    int ok = t->dtype == dt && t->ndim == ndim;
    va_list ap;
    va_start(ap, ndim);
    for (int d = 0; d < ndim; d++) {
        int64_t s = va_arg(ap, int64_t);
        if (ok && t->shape[d] != s) ok = 0;
    }
    va_end(ap);
    CHECK_MSG(ok, "%s: %s has dtype %s, rank %d (first dim %lld)", f->path, name, t->dtype_name, t->ndim,
              t->ndim ? (long long)t->shape[0] : -1LL);
    return ok ? i : -1;
}

static int same_shape(const struct st_tensor *a, const struct st_tensor *b) {
    return a->ndim == b->ndim && memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim) == 0;
}

/* `name` has the dtype and shape of tensor `like`. */
static int64_t want_like(const struct lora_file *f, const char *name, int64_t like) {
    int64_t i = find(f, name);
    CHECK_MSG(i >= 0, "%s: no tensor %s", f->path, name);
    if (i < 0 || like < 0) return -1;
    int ok = f->tensors[i].dtype == f->tensors[like].dtype && same_shape(&f->tensors[i], &f->tensors[like]);
    CHECK_MSG(ok, "%s: %s does not have the shape of %s", f->path, name, f->tensors[like].name);
    return ok ? i : -1;
}

static int64_t numel(const struct st_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

static float f32_at(const struct lora_file *f, int64_t i, int64_t k) {
    float v;
    memcpy(&v, st_data(f, i) + 4 * k, 4);
    return v;
}

static double f64_at(const struct lora_file *f, int64_t i, int64_t k) {
    double v;
    memcpy(&v, st_data(f, i) + 8 * k, 8);
    return v;
}

static int64_t i64_at(const struct lora_file *f, int64_t i, int64_t k) {
    int64_t v;
    memcpy(&v, st_data(f, i) + 8 * k, 8);
    return v;
}

static int same_bytes(const struct lora_file *f, int64_t a, int64_t b) {
    if (a < 0 || b < 0) return 0;
    const struct st_tensor *x = &f->tensors[a], *y = &f->tensors[b];
    return x->dtype == y->dtype && same_shape(x, y) && x->end - x->begin == y->end - y->begin &&
           memcmp(st_data(f, a), st_data(f, b), (size_t)(x->end - x->begin)) == 0;
}

/* Every parameter in `names` (metadata list) has a gradient "<prefix><name>" shaped like the
 * parameter in the diffusers weight file `weights`. */
static void check_grads(const struct lora_file *f, const char *prefix, json_t *names, const char *weights) {
    struct lora_file *w = NULL;
    CHECK_STATUS(st_open(ctx, weights, &w), LORA_OK);
    if (!w) return;
    CHECK(json_array_size(names) >= 3);
    size_t n_found = 0;
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (strncmp(f->tensors[i].name, prefix, strlen(prefix)) == 0) n_found++;
    CHECK_MSG(n_found == json_array_size(names), "%s: %zu %s* tensors, %zu listed", f->path, n_found, prefix,
              json_array_size(names));
    size_t k;
    json_t *e;
    json_array_foreach(names, k, e) {
        const char *p = json_string_value(e);
        char name[512];
        snprintf(name, sizeof name, "%s%s", prefix, p ? p : "");
        int64_t g = find(f, name), j = p ? find(w, p) : -1;
        CHECK_MSG(g >= 0 && j >= 0, "%s: %s (gradient %s, parameter %s)", f->path, name, g >= 0 ? "ok" : "missing",
                  j >= 0 ? "ok" : "missing");
        if (g < 0 || j < 0) continue;
        CHECK_MSG(f->tensors[g].dtype == LORA_DTYPE_F32 && w->tensors[j].dtype == LORA_DTYPE_F16 &&
                      same_shape(&f->tensors[g], &w->tensors[j]),
                  "%s: %s: not a float32 tensor shaped like the float16 parameter", f->path, name);
    }
    st_close(w);
}

static void check_all_finite(const struct lora_file *f) {
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const struct st_tensor *t = &f->tensors[i];
        int64_t n = numel(t), bad = 0;
        if (t->dtype == LORA_DTYPE_F32)
            for (int64_t k = 0; k < n; k++) bad += !isfinite(f32_at(f, i, k));
        else if (t->dtype == LORA_DTYPE_F64)
            for (int64_t k = 0; k < n; k++) bad += !isfinite(f64_at(f, i, k));
        else
            CHECK_MSG(t->dtype == LORA_DTYPE_I64, "%s: %s has dtype %s", f->path, t->name, t->dtype_name);
        CHECK_MSG(bad == 0, "%s: %s has %lld non-finite values", f->path, t->name, (long long)bad);
    }
}

static void check_version(const char *ver) {
    char path[4096];   /* sd_path's buffers are reused */
    snprintf(path, sizeof path, "%s", sd_path("%s_reference_outputs.safetensors", ver));
    size_t len = 0;
    uint8_t *bytes = test_slurp(path, &len);
    CHECK_MSG(bytes != NULL, "%s missing (run tests/reference/make_sd_reference_outputs.py)", path);
    free(bytes);
    CHECK_MSG(len > 0 && len < MAX_FILE_BYTES, "%s: %zu bytes", path, len);

    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    json_t *ucfg = load_json(sd_path("%s_diffusers/unet/config.json", ver));
    json_t *vcfg = load_json(sd_path("%s_diffusers/vae/config.json", ver));
    json_t *tcfg = load_json(sd_path("%s_diffusers/text_encoder/config.json", ver));
    json_t *scfg = load_json(sd_path("%s_diffusers/scheduler/scheduler_config.json", ver));
    CHECK(ucfg && vcfg && tcfg && scfg);
    if (!f || !ucfg || !vcfg || !tcfg || !scfg) goto done;

    /* metadata: one key holding a JSON object */
    json_t *meta = NULL;
    CHECK(f->n_meta == 1);
    if (f->n_meta == 1 && strcmp(f->meta_keys[0], "liblora_reference") == 0) {
        json_error_t e;
        meta = json_loads(f->meta_vals[0], 0, &e);
    }
    CHECK_MSG(meta != NULL, "%s: no liblora_reference metadata", path);
    if (!meta) goto done;
    json_t *vers = json_object_get(meta, "versions");
    CHECK(json_is_string(json_object_get(vers, "torch")));
    CHECK(jstr_eq(vers, "diffusers", "0.10.2"));
    CHECK(jstr_eq(vers, "transformers", "4.25.1"));
    CHECK(jstr_eq(meta, "compute_dtype", "float32"));
    CHECK(jstr_eq(meta, "weights_cast", "float16 -> float32"));
    CHECK(json_is_string(json_object_get(meta, "description")));
    const char *pred = json_string_value(json_object_get(scfg, "prediction_type"));
    CHECK(pred && jstr_eq(meta, "prediction_type", pred));

    check_all_finite(f);

    /* ---- text encoder ---- */
    const int64_t B = 2;
    int64_t L = jint(tcfg, "max_position_embeddings"), H = jint(tcfg, "hidden_size");
    int64_t layers = jint(tcfg, "num_hidden_layers"), vocab = jint(tcfg, "vocab_size");
    int64_t bos = jint(tcfg, "bos_token_id"), eos = jint(tcfg, "eos_token_id"), pad = jint(tcfg, "pad_token_id");
    CHECK(L == 77 && H > 0 && layers > 0);
    json_t *mte = json_object_get(meta, "te");
    int64_t pad_used = jint(mte, "padding_id_used");
    CHECK(jint(mte, "bos_token_id") == bos && jint(mte, "eos_token_id") == eos && jint(mte, "pad_token_id") == pad);
    /* SD v1's tokenizer pads with eos, SD2's with a separate pad token */
    CHECK(pad_used == (strcmp(ver, "v1") == 0 ? eos : pad));
    int64_t ids = want(f, "te.input_ids", LORA_DTYPE_I64, 2, B, L);
    if (ids >= 0) {
        int n_padded = 0, n_full = 0;
        for (int64_t b = 0; b < B; b++) {
            CHECK(i64_at(f, ids, b * L) == bos);
            int64_t e = 1;
            while (e < L && i64_at(f, ids, b * L + e) != eos) {
                int64_t v = i64_at(f, ids, b * L + e);
                CHECK_MSG(v >= 0 && v < vocab && v != bos && v != pad, "token %lld", (long long)v);
                e++;
            }
            CHECK_MSG(e < L, "%s: prompt %lld has no eos", path, (long long)b);
            for (int64_t k = e + 1; k < L; k++) CHECK(i64_at(f, ids, b * L + k) == pad_used);
            n_padded += e < L - 1;
            n_full += e == L - 1;
        }
        CHECK(n_padded == 1 && n_full == 1);   /* one short padded prompt, one of full length */
    }
    char name[256];
    int64_t last = want(f, "te.last_hidden_state", LORA_DTYPE_F32, 3, B, L, H);
    for (int64_t k = 0; k <= layers; k++) {
        snprintf(name, sizeof name, "te.hidden_states.%lld", (long long)k);
        want_like(f, name, last);
    }
    snprintf(name, sizeof name, "te.hidden_states.%lld", (long long)layers + 1);
    CHECK_MSG(find(f, name) < 0, "%s: more hidden states than layers + 1", path);
    want_like(f, "te.clip_skip2", last);
    check_grads(f, "te.grad.param.", json_object_get(json_object_get(meta, "te_grad"), "grad_params"),
                sd_path("%s_diffusers/text_encoder/model.safetensors", ver));

    /* ---- U-Net ---- */
    int64_t cin = jint(ucfg, "in_channels"), cout = jint(ucfg, "out_channels"), s = jint(ucfg, "sample_size");
    CHECK(jint(ucfg, "cross_attention_dim") == H);   /* the text encoder feeds cross-attention */
    CHECK(cin == cout);
    int64_t x = want(f, "unet.sample_in", LORA_DTYPE_F32, 4, B, cin, s, s);
    int64_t out = want(f, "unet.out", LORA_DTYPE_F32, 4, B, cout, s, s);
    CHECK(x >= 0 && out >= 0 && same_shape(&f->tensors[x], &f->tensors[out]));
    want_like(f, "unet.out_timestep_int", out);
    want_like(f, "unet.out_timestep_float", out);
    want_like(f, "unet.loss_weights", out);
    want_like(f, "unet.grad.sample_in", x);
    want_like(f, "unet.grad.encoder_hidden_states", last);
    want(f, "unet.loss", LORA_DTYPE_F32, 0);
    json_t *mu = json_object_get(meta, "unet");
    CHECK(jstr_eq(mu, "encoder_hidden_states", "te.last_hidden_state"));
    int64_t ts = want(f, "unet.timesteps", LORA_DTYPE_I64, 1, B);
    int64_t n_train = jint(scfg, "num_train_timesteps");
    if (ts >= 0)
        for (int64_t b = 0; b < B; b++) {
            int64_t t = i64_at(f, ts, b);
            CHECK(t >= 0 && t < n_train && t == json_integer_value(json_array_get(json_object_get(mu, "timesteps"), b)));
        }
    int64_t ti = want(f, "unet.timestep_int", LORA_DTYPE_I64, 0);
    if (ti >= 0) CHECK(i64_at(f, ti, 0) == jint(mu, "timestep_int"));
    int64_t tf = want(f, "unet.timestep_float", LORA_DTYPE_F64, 0);
    if (tf >= 0) CHECK(f64_at(f, tf, 0) == json_number_value(json_object_get(mu, "timestep_float")));
    check_grads(f, "unet.grad.param.", json_object_get(mu, "grad_params"),
                sd_path("%s_diffusers/unet/diffusion_pytorch_model.safetensors", ver));

    /* ---- VAE ---- */
    int64_t vin = jint(vcfg, "in_channels"), vout = jint(vcfg, "out_channels"), vs = jint(vcfg, "sample_size");
    int64_t lat = jint(vcfg, "latent_channels");
    int64_t ls = vs >> (json_array_size(json_object_get(vcfg, "block_out_channels")) - 1);
    CHECK(lat == cin);   /* the VAE latent is the U-Net input */
    want(f, "vae.image", LORA_DTYPE_F32, 4, (int64_t)1, vin, vs, vs);
    want(f, "vae.decoded", LORA_DTYPE_F32, 4, (int64_t)1, vout, vs, vs);
    int64_t mean = want(f, "vae.posterior_mean", LORA_DTYPE_F32, 4, (int64_t)1, lat, ls, ls);
    want_like(f, "vae.posterior_logvar", mean);
    int64_t scaled = want_like(f, "vae.latent_scaled", mean);
    double sf = json_number_value(json_object_get(json_object_get(meta, "vae"), "scale_factor"));
    CHECK(sf == 0.18215);
    if (mean >= 0 && scaled >= 0)
        for (int64_t k = 0; k < numel(&f->tensors[mean]); k++)
            CHECK_NEAR(f32_at(f, scaled, k), f32_at(f, mean, k) * (float)sf, 1e-7 * fabs(f32_at(f, mean, k)));
    int64_t img = find(f, "vae.image");
    if (img >= 0) {
        float lo = 1, hi = -1;
        for (int64_t k = 0; k < numel(&f->tensors[img]); k++) {
            float v = f32_at(f, img, k);
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        CHECK(lo >= -1.0f && hi <= 1.0f && lo < -0.9f && hi > 0.9f);
    }

    /* ---- DDPM scheduler ---- */
    CHECK(n_train == 1000 && jstr_eq(scfg, "beta_schedule", "scaled_linear"));
    int64_t ac = want(f, "sched.alphas_cumprod", LORA_DTYPE_F32, 1, n_train);
    int64_t ac64 = want(f, "sched.alphas_cumprod_f64", LORA_DTYPE_F64, 1, n_train);
    if (ac >= 0 && ac64 >= 0) {
        /* torch.linspace (float64): start + i*step for the first half, end - (n-1-i)*step after */
        double b0 = sqrt(json_number_value(json_object_get(scfg, "beta_start")));
        double b1 = sqrt(json_number_value(json_object_get(scfg, "beta_end")));
        double step = (b1 - b0) / (double)(n_train - 1), prod = 1.0, worst = 0, worst32 = 0;
        for (int64_t i = 0; i < n_train; i++) {
            double r = i < n_train / 2 ? b0 + step * (double)i : b1 - step * (double)(n_train - 1 - i);
            prod *= 1.0 - r * r;
            double d = fabs(f64_at(f, ac64, i) - prod) / prod, d32 = fabs(f32_at(f, ac, i) - prod) / prod;
            worst = d > worst ? d : worst;
            worst32 = d32 > worst32 ? d32 : worst32;
        }
        CHECK_MSG(worst < 1e-13, "alphas_cumprod_f64: relative error %g", worst);
        CHECK_MSG(worst32 < 1e-5, "alphas_cumprod (float32): relative error %g", worst32);
    }
    int64_t x0 = want_like(f, "sched.x0", x), noise = want_like(f, "sched.noise", x);
    int64_t noisy = want_like(f, "sched.noisy", x);
    int64_t sts = want(f, "sched.timesteps", LORA_DTYPE_I64, 1, B);
    CHECK(same_bytes(f, x0, x));       /* x0 is the U-Net input */
    CHECK(same_bytes(f, sts, ts));
    int vpred = pred && strcmp(pred, "v_prediction") == 0;
    int64_t vt = find(f, "sched.v_target");
    CHECK_MSG((vt >= 0) == vpred, "%s: sched.v_target %s for prediction_type %s", path, vt >= 0 ? "present" : "absent",
              pred ? pred : "?");
    if (vt >= 0) want_like(f, "sched.v_target", x);
    if (ac >= 0 && x0 >= 0 && noise >= 0 && noisy >= 0 && sts >= 0) {
        int64_t per = numel(&f->tensors[x0]) / B;
        double worst = 0, worst_v = 0;
        for (int64_t k = 0; k < numel(&f->tensors[x0]); k++) {
            double a = f32_at(f, ac, i64_at(f, sts, k / per));
            double xv = f32_at(f, x0, k), nv = f32_at(f, noise, k);
            double d = fabs(f32_at(f, noisy, k) - (sqrt(a) * xv + sqrt(1 - a) * nv));
            worst = d > worst ? d : worst;
            if (vt >= 0) {
                d = fabs(f32_at(f, vt, k) - (sqrt(a) * nv - sqrt(1 - a) * xv));
                worst_v = d > worst_v ? d : worst_v;
            }
        }
        CHECK_MSG(worst < 1e-5, "sched.noisy: max error %g", worst);
        CHECK_MSG(worst_v < 1e-5, "sched.v_target: max error %g", worst_v);
    }
    json_decref(meta);

done:
    json_decref(ucfg);
    json_decref(vcfg);
    json_decref(tcfg);
    json_decref(scfg);
    if (f) st_close(f);
}

int main(void) {
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    check_version("v1");
    check_version("v2");
    lora_ctx_free(ctx);
    return test_finish("test_reference_outputs");
}
