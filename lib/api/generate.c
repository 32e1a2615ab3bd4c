/* lora_generate / lora_image: kohya gen_img_diffusers.py's txt2img and img2img for hosts
 * (parameters from the bag, per-image seeds as kohya draws them, images with their PNG text). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "gen/gen.h"
#include "io/image_read.h"
#include "io/image_write.h"
#include "train/image_resize.h"
#include "model/sd_model.h"

#define LORA_IMAGE_MAGIC 0x494d4147u /* "IMAG" */
#define TEXT_MAX 10

struct lora_image {
    uint32_t magic;
    lora_ctx *ctx;
    uint32_t width, height, channels;
    uint8_t *data;
    uint64_t seed;
    int n_text;
    char *key[TEXT_MAX];
    char *val[TEXT_MAX];
};

static int image_valid(const lora_image *img) { return img && img->magic == LORA_IMAGE_MAGIC; }
static int model_valid(const lora_model *m) { return m && m->magic == LORA_MODEL_MAGIC; }

static void image_destroy(lora_image *img) {
    lora_ctx *ctx = img->ctx;
    for (int i = 0; i < img->n_text; i++) {
        lora_free(ctx, img->key[i]);
        lora_free(ctx, img->val[i]);
    }
    lora_free(ctx, img->data);
    img->magic = 0;
    lora_free(ctx, img);
}

/* A1111's sampler names (modules/sd_samplers_kdiffusion.py / compvis) for kohya's. */
static const char *a1111_sampler(int kind) {
    switch (kind) {
    case GEN_DDIM: return "DDIM";
    case GEN_PNDM: return "PLMS";
    case GEN_LMS: return "LMS";
    case GEN_EULER: return "Euler";
    case GEN_EULER_A: return "Euler a";
    case GEN_HEUN: return "Heun";
    case GEN_DPM2: return "DPM2";
    case GEN_DPM2_A: return "DPM2 a";
    case GEN_DPMSOLVERPP: return "DPM++ 2M";
    case GEN_DPMSOLVER: return "DPM-Solver 2M";
    case GEN_DPMSINGLE: return "DPM++ 2S";
    default: return "?";
    }
}

/* Python's str(float) for the values users type (shortest round-trip repr). */
static void py_float(char *buf, size_t cap, double v) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (!strchr(buf, '.') && !strchr(buf, 'e') && !strchr(buf, 'n') && !strchr(buf, 'i') && strlen(buf) + 2 < cap)
        strcat(buf, ".0");
}

static lora_status add_text(lora_image *img, const char *k, const char *v) {
    if (img->n_text >= TEXT_MAX) return LORA_E_INTERNAL;
    img->key[img->n_text] = lora_strdup(img->ctx, k);
    img->val[img->n_text] = lora_strdup(img->ctx, v);
    img->n_text++;
    return img->key[img->n_text - 1] && img->val[img->n_text - 1] ? LORA_OK : LORA_E_NOMEM;
}

/* The "parameters" text (A1111's infotext) and kohya's keys. */
static lora_status image_texts(lora_image *img, const lora_params *opts, const struct gen_job *job,
                               const char *sampler_name, uint64_t seed) {
    const char *neg = lora_params_str(opts, LORA_P_NEGATIVE_PROMPT);
    const char *mh = lora_params_str(opts, LORA_P_MODEL_HASH), *lh = lora_params_str(opts, LORA_P_LORA_HASHES);
    size_t cap = strlen(job->prompt) + strlen(neg) + strlen(mh) + strlen(lh) + 512;
    char *p = lora_malloc(img->ctx, cap);
    if (!p) return LORA_E_NOMEM;
    char sc[40], ns[40], st[40];
    py_float(sc, sizeof sc, job->scale);
    py_float(ns, sizeof ns, job->negative_scale);
    py_float(st, sizeof st, job->strength);
    size_t k = (size_t)snprintf(p, cap, "%s\n", job->prompt);
    if (*neg) k += (size_t)snprintf(p + k, cap - k, "Negative prompt: %s\n", neg);
    k += (size_t)snprintf(p + k, cap - k, "Steps: %d, Sampler: %s, CFG scale: %s, Seed: %llu, Size: %lldx%lld",
                          job->steps, a1111_sampler(job->kind), sc, (unsigned long long)seed, (long long)job->width,
                          (long long)job->height);
    if (*mh) k += (size_t)snprintf(p + k, cap - k, ", Model hash: %s", mh);
    if (job->init_rgb) k += (size_t)snprintf(p + k, cap - k, ", Denoising strength: %s", st);
    if (job->clip_skip > 1) k += (size_t)snprintf(p + k, cap - k, ", Clip skip: %d", job->clip_skip);
    if (*lh) k += (size_t)snprintf(p + k, cap - k, ", Lora hashes: \"%s\"", lh);
    snprintf(p + k, cap - k, ", Version: liblora %s", lora_version_string());
    lora_status s = add_text(img, "parameters", p);
    lora_free(img->ctx, p);
    char num[32];
    snprintf(num, sizeof num, "%llu", (unsigned long long)seed);
    if (s == LORA_OK) s = add_text(img, "prompt", job->prompt);
    if (s == LORA_OK) s = add_text(img, "seed", num);
    if (s == LORA_OK) s = add_text(img, "sampler", sampler_name);
    snprintf(num, sizeof num, "%d", job->steps);
    if (s == LORA_OK) s = add_text(img, "steps", num);
    if (s == LORA_OK) s = add_text(img, "scale", sc);
    if (s == LORA_OK) s = add_text(img, "negative-prompt", neg);
    if (s == LORA_OK && job->has_negative_scale) s = add_text(img, "negative-scale", ns);
    return s;
}

/* "s1,s2,..." -> seeds (repeated to n as kohya repeats --d). */
static lora_status parse_seeds(lora_ctx *ctx, const char *text, uint64_t *seeds, int64_t n) {
    int64_t k = 0;
    const char *c = text;
    while (*c && k < n) {
        if (*c < '0' || *c > '9') return lora_fail(ctx, LORA_E_CONFIG_RANGE, "seeds: \"%s\" is not a list of "
                                                   "non-negative integers", text);
        uint64_t v = 0;
        while (*c >= '0' && *c <= '9') {
            if (v > (UINT64_MAX - 9) / 10) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "seeds: a value in \"%s\" is "
                                                            "too large", text);
            v = v * 10 + (uint64_t)(*c++ - '0');
        }
        seeds[k++] = v;
        if (*c == ',') c++;
        else if (*c) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "seeds: \"%s\" is not a list of integers", text);
    }
    if (k == 0) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "seeds: empty list");
    for (int64_t i = k; i < n; i++) seeds[i] = seeds[i % k];
    return LORA_OK;
}

static uint32_t random31(void) {
    uint32_t v = 0;
    if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v) v = (uint32_t)time(NULL) * 2654435761u;
    return v & 0x7fffffffu;
}

/* Per-image seeds as kohya's main loop picks them for one prompt (spec §8.3). */
static lora_status pick_seeds(lora_ctx *ctx, const lora_params *opts, uint64_t *seeds, int64_t n) {
    const char *list = lora_params_str(opts, LORA_P_SEEDS);
    if (*list) return parse_seeds(ctx, list, seeds, n);
    int64_t seed = lora_params_int(opts, LORA_P_SEED);
    if (seed >= 0) {
        if (n == 1) {
            seeds[0] = (uint64_t)seed;
            return LORA_OK;
        }
        struct gen_pyrandom r;
        gen_pyrandom_seed(&r, (uint64_t)seed);
        for (int64_t i = 0; i < n; i++) seeds[i] = gen_pyrandom_randint31(&r);
        return LORA_OK;
    }
    uint32_t same = random31();
    for (int64_t i = 0; i < n; i++) seeds[i] = lora_params_int(opts, LORA_P_ITER_SAME_SEED) ? same : random31();
    return LORA_OK;
}

/* img2img init image, decoded to RGB8 (EXIF orientation applied). */
static lora_status load_init(lora_ctx *ctx, const char *path, struct img_rgb8 *img) {
    uint8_t *buf = NULL;
    size_t n = 0;
    LORA_TRY(img_read_file(ctx, path, &buf, &n));
    struct img_limits lim;
    img_limits_default(&lim);
    lora_status s = img_decode_rgb8(ctx, path, buf, n, &lim, img);
    lora_free(ctx, buf);
    return s;
}

static lora_status generate(lora_model *model, const lora_params *opts, lora_image **out, int64_t cap,
                            int64_t *n_out, int force_one) {
    lora_ctx *ctx = model->ctx;
    if (!out) return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_generate: out is NULL");
    struct gen_job job;
    memset(&job, 0, sizeof job);
    const char *sampler = lora_params_str(opts, LORA_P_SAMPLER);
    job.prompt = lora_params_str(opts, LORA_P_PROMPT);
    job.negative = lora_params_str(opts, LORA_P_NEGATIVE_PROMPT);
    job.width = lora_params_int(opts, LORA_P_W);
    job.height = lora_params_int(opts, LORA_P_H);
    job.steps = (int32_t)lora_params_int(opts, LORA_P_STEPS);
    job.scale = lora_params_float(opts, LORA_P_SCALE);
    job.negative_scale = lora_params_float(opts, LORA_P_NEGATIVE_SCALE);
    job.has_negative_scale = job.negative_scale != 0;
    job.kind = gen_sampler_kind(sampler);
    job.clip_sample = (int)lora_params_int(opts, LORA_P_CLIP_SAMPLE);
    job.rng = strcmp(lora_params_str(opts, LORA_P_RNG), "cuda") == 0 ? GEN_RNG_CUDA : GEN_RNG_CPU;
    job.clip_skip = (int32_t)lora_params_int(opts, LORA_P_CLIP_SKIP);
    job.max_embeddings_multiples = (int32_t)lora_params_int(opts, LORA_P_MAX_EMBEDDINGS_MULTIPLES);
    job.strength = lora_params_float(opts, LORA_P_STRENGTH);
    if (!job.kind) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "sampler: \"%s\" is not known", sampler);
    int64_t total = force_one ? 1 : lora_params_int(opts, LORA_P_IMAGES_PER_PROMPT);
    if (total > cap)
        return lora_fail(ctx, LORA_E_LIMIT, "lora_generate_batch: images_per_prompt %lld is more than the %lld "
                         "slots of out", (long long)total, (long long)cap);
    int64_t bs = lora_params_int(opts, LORA_P_BATCH_SIZE);
    if (bs > total) bs = total;
    uint64_t *seeds = lora_malloc(ctx, (size_t)total * sizeof *seeds);
    if (!seeds) return LORA_E_NOMEM;
    lora_status s = pick_seeds(ctx, opts, seeds, total);
    struct img_rgb8 init;
    memset(&init, 0, sizeof init);
    const char *ipath = lora_params_str(opts, LORA_P_IMAGE_PATH);
    if (s == LORA_OK && *ipath) {
        s = load_init(ctx, ipath, &init);
        if (s == LORA_OK) {
            /* kohya (gen_img_diffusers): the image decides the size, rounded down to multiples of
             * 32 and resized there when it is not one; kohya's filter is PIL LANCZOS, ours the
             * area filter (OpenCV INTER_AREA), so such images differ slightly. */
            int32_t w64 = init.width - init.width % 32, h64 = init.height - init.height % 32;
            if (w64 < 32 || h64 < 32) {
                s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "image_path: %s is %dx%d; img2img needs at least 32x32",
                              ipath, init.width, init.height);
            } else if (w64 != init.width || h64 != init.height) {
                lora_log(ctx, LORA_LOG_WARN, "image_path: %s is %dx%d: resized to %dx%d, multiples of 32 (area "
                         "filter; kohya uses LANCZOS)", ipath, init.width, init.height, w64, h64);
                uint8_t *rs = lora_malloc(ctx, (size_t)w64 * (size_t)h64 * 3);
                if (!rs) s = LORA_E_NOMEM;
                else s = img_resize_area_u8(ctx, init.data, init.width, init.height, rs, w64, h64, 3);
                if (s == LORA_OK) {
                    lora_free(ctx, init.data);
                    init.data = rs;
                    init.width = w64;
                    init.height = h64;
                } else {
                    lora_free(ctx, rs);
                }
            }
            job.width = init.width;
            job.height = init.height;
            job.init_rgb = init.data;
        }
    }
    struct gen_vae vae;
    memset(&vae, 0, sizeof vae);
    const char *vpath = lora_params_str(opts, LORA_P_VAE);
    if (s == LORA_OK && *vpath) {
        s = gen_vae_load(model, vpath, &vae);
        if (s == LORA_OK) job.vae = &vae;
    }
    /* progress totals over every batch */
    int64_t calls_per_batch = gen_job_calls(&job), n_batches = (total + bs - 1) / bs;
    job.progress_total = calls_per_batch * n_batches;
    int64_t made = 0;
    uint8_t *rgb = NULL;
    uint64_t px = (uint64_t)job.width * (uint64_t)job.height * 3;
    if (s == LORA_OK && !(rgb = lora_malloc(ctx, (size_t)(px * (uint64_t)bs)))) s = LORA_E_NOMEM;
    for (int64_t b0 = 0; s == LORA_OK && b0 < total; b0 += bs) {
        job.batch = total - b0 < bs ? total - b0 : bs;
        job.seeds = seeds + b0;
        job.progress_done = calls_per_batch * (b0 / bs);
        s = gen_run(model, &job, rgb, px * (uint64_t)job.batch);
        for (int64_t i = 0; s == LORA_OK && i < job.batch; i++) {
            lora_image *img = lora_calloc(ctx, 1, sizeof *img);
            if (!img) {
                s = LORA_E_NOMEM;
                break;
            }
            img->magic = LORA_IMAGE_MAGIC;
            img->ctx = ctx;
            img->width = (uint32_t)job.width;
            img->height = (uint32_t)job.height;
            img->channels = 3;
            img->seed = seeds[b0 + i];
            img->data = lora_malloc(ctx, (size_t)px);
            if (!img->data) s = LORA_E_NOMEM;
            else memcpy(img->data, rgb + i * px, (size_t)px);
            if (s == LORA_OK) s = image_texts(img, opts, &job, sampler, img->seed);
            if (s != LORA_OK) {
                image_destroy(img);
                break;
            }
            lora_ctx_retain(ctx);
            out[made++] = img;
        }
    }
    lora_free(ctx, rgb);
    lora_free(ctx, seeds);
    lora_free(ctx, init.data);
    gen_vae_free(&vae);
    if (s != LORA_OK) {
        for (int64_t i = 0; i < made; i++) {
            image_destroy(out[i]);
            out[i] = NULL;
            lora_ctx_release(ctx);
        }
        made = 0;
    }
    if (n_out) *n_out = made;
    return s;
}

LORA_API lora_status lora_generate(lora_model *model, const lora_params *opts, lora_image **out) {
    if (out) *out = NULL;
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = generate(model, opts, out, 1, NULL, 1);
    lora_leave(ctx);
    return s;
}

LORA_API lora_status lora_generate_batch(lora_model *model, const lora_params *opts, lora_image **out, int64_t cap,
                                         int64_t *n_out) {
    if (n_out) *n_out = 0;
    if (!model_valid(model)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = model->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s = LORA_OK;
    if (!out || cap < 1) s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_generate_batch: out is NULL or cap < 1");
    else {
        for (int64_t i = 0; i < cap; i++) out[i] = NULL;
        s = generate(model, opts, out, cap, n_out, 0);
    }
    lora_leave(ctx);
    return s;
}

LORA_API uint32_t lora_image_width(const lora_image *img) { return image_valid(img) ? img->width : 0; }
LORA_API uint32_t lora_image_height(const lora_image *img) { return image_valid(img) ? img->height : 0; }
LORA_API uint32_t lora_image_channels(const lora_image *img) { return image_valid(img) ? img->channels : 0; }
LORA_API const uint8_t *lora_image_data(const lora_image *img) { return image_valid(img) ? img->data : NULL; }
LORA_API uint64_t lora_image_seed(const lora_image *img) { return image_valid(img) ? img->seed : 0; }

LORA_API const char *lora_image_text(const lora_image *img, const char *key) {
    if (!image_valid(img) || !key) return NULL;
    for (int i = 0; i < img->n_text; i++)
        if (strcmp(img->key[i], key) == 0) return img->val[i];
    return NULL;
}

LORA_API lora_status lora_image_save_png(const lora_image *img, const char *path, const lora_params *opts) {
    (void)opts;
    if (!image_valid(img)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = img->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!path) {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_image_save_png: path is NULL");
    } else {
        struct img_text t[TEXT_MAX];
        for (int i = 0; i < img->n_text; i++) {
            t[i].key = img->key[i];
            t[i].value = img->val[i];
        }
        s = img_write_png(ctx, path, img->data, img->width, img->height, (int)img->channels, t, img->n_text);
    }
    lora_leave(ctx);
    return s;
}

/* The format by extension (io/image_write.c); JPEG/WebP keep "parameters" as EXIF. */
LORA_API lora_status lora_image_save(const lora_image *img, const char *path, const lora_params *opts) {
    if (!image_valid(img)) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = img->ctx;
    LORA_TRY(lora_enter(ctx));
    lora_status s;
    if (!path) {
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "lora_image_save: path is NULL");
    } else {
        struct img_text t[TEXT_MAX];
        for (int i = 0; i < img->n_text; i++) {
            t[i].key = img->key[i];
            t[i].value = img->val[i];
        }
        s = img_write_image(ctx, path, img->data, img->width, img->height, (int)img->channels, t, img->n_text,
                            (int)lora_params_int(opts, LORA_P_JPEG_QUALITY),
                            (int)lora_params_int(opts, LORA_P_WEBP_LOSSLESS));
    }
    lora_leave(ctx);
    return s;
}

LORA_API void lora_image_free(lora_image *img) {
    if (!image_valid(img)) return;
    lora_ctx *ctx = img->ctx;
    image_destroy(img);
    lora_ctx_release(ctx);
}
