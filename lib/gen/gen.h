/* Image generation (kohya-ss gen_img_diffusers.py, diffusers 0.10.2 pipelines): the samplers
 * (scheduler.c), seeded noise (noise.c) and the txt2img / img2img loop (generate.c).
 *
 * Samplers. Each of kohya's sampler names maps to the diffusers 0.10.2 scheduler class it
 * constructs (spec/kohya-lora.md §8.3), with 1000 training steps, scaled_linear betas
 * 0.00085..0.012 and the model's prediction type; DDIM and PNDM use SD's own scheduler config
 * (steps_offset 1, set_alpha_to_one off, DDIM clip_sample off unless asked for, PNDM
 * skip_prk_steps on unless asked for). A sampler runs `n_calls` U-Net calls (2 per step for the
 * second-order ones); per call i:
 *   t   = gen_sched_timestep(s, i)                   the U-Net's timestep
 *   in  = x / gen_sched_input_div(s, i)              scale_model_input
 *   out = U-Net(in, t) (after guidance)
 *   gen_sched_step(s, i, out, x, noise, user)        x <- prev_sample (in place)
 * The arithmetic follows the reference's float32 ops and their order, so results agree to
 * float rounding. Ancestral samplers ask `noise` for one standard-normal latent (the whole
 * batch) whenever the reference calls torch.randn, in the same order. */
#ifndef LORA_GEN_GEN_H
#define LORA_GEN_GEN_H

#include "internal.h"
#include "core/rng.h"

#define GEN_DDIM        1   /* DDIMScheduler */
#define GEN_PNDM        2   /* PNDMScheduler */
#define GEN_LMS         3   /* LMSDiscreteScheduler */
#define GEN_EULER       4   /* EulerDiscreteScheduler */
#define GEN_EULER_A     5   /* EulerAncestralDiscreteScheduler */
#define GEN_HEUN        6   /* HeunDiscreteScheduler */
#define GEN_DPM2        7   /* KDPM2DiscreteScheduler */
#define GEN_DPM2_A      8   /* KDPM2AncestralDiscreteScheduler */
#define GEN_DPMSOLVER   9   /* DPMSolverMultistepScheduler, algorithm_type "dpmsolver" */
#define GEN_DPMSOLVERPP 10  /* DPMSolverMultistepScheduler, algorithm_type "dpmsolver++" */
#define GEN_DPMSINGLE   11  /* DPMSolverSinglestepScheduler (dpmsolver++, order 2) */

#define GEN_TRAIN_STEPS 1000

/* kohya's sampler name (ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver,
 * dpmsolver++, dpmsingle, k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a) -> GEN_*, 0 if unknown. */
int gen_sampler_kind(const char *name);
/* The canonical name of a kind ("ddim", ...). */
const char *gen_sampler_name(int kind);
/* Noises a sampler draws per step in kohya's pre-draw (2 for dpm_2_a, else 1). */
int gen_sampler_noises_per_step(int kind);

/* Fills out[0..n) (the whole batch) with the next standard-normal noise; returns a status. */
typedef lora_status (*gen_noise_fn)(void *user, float *out, int64_t n);

struct gen_sched {
    lora_ctx *ctx;
    int kind, v_pred, clip_sample, prk, steps;
    int64_t n;                    /* floats per sample (the batch) */
    float ac[GEN_TRAIN_STEPS];    /* alphas_cumprod (float32, as torch computes it) */
    float final_ac;
    float init_noise_sigma;
    int64_t n_calls;
    double *t;                    /* [n_calls] U-Net timesteps */
    /* sigma-based samplers: the reference's arrays (repeat-interleaved for the 2nd-order ones) */
    int64_t n_sig;
    float *sig, *sig_i, *sig_up, *sig_down;
    /* DDIM / PNDM / DPM-Solver: integer timesteps, PNDM's PRK list */
    int64_t *ti;
    int64_t n_prk;
    /* DPM-Solver tables */
    float alpha_t[GEN_TRAIN_STEPS], sigma_t[GEN_TRAIN_STEPS], lambda_t[GEN_TRAIN_STEPS];
    /* state */
    float *mem;                   /* one allocation for the buffers below */
    float *saved, *deriv, *cur_mo, *tmp, *ets[4], *mo[2], *lms_d[4];
    int has_saved, n_ets, n_lms, lower_order_nums, has_cur_mo;
    int64_t counter;              /* PNDM */
    float dt;                     /* Heun */
    int64_t noises_drawn;
};

/* Builds the sampler for `steps` inference steps on samples of `n` floats. v_pred: the model
 * predicts v. clip_sample (DDIM): clamp x0 to [-1, 1] (kohya forces it). prk (PNDM): the
 * Runge-Kutta warm-up (skip_prk_steps False; needs steps >= 4). Errors: LORA_E_CONFIG_RANGE,
 * LORA_E_NOMEM. */
lora_status gen_sched_init(lora_ctx *ctx, struct gen_sched *s, int kind, int steps, int v_pred, int clip_sample,
                           int prk, int64_t n);
void gen_sched_free(struct gen_sched *s);
double gen_sched_timestep(const struct gen_sched *s, int64_t i);
/* The divisor of scale_model_input for call i in the sampler's present state (1 for DDIM,
 * PNDM and DPM-Solver). */
float gen_sched_input_div(const struct gen_sched *s, int64_t i);
lora_status gen_sched_step(struct gen_sched *s, int64_t i, const float *model_out, float *x, gen_noise_fn noise,
                           void *user);
/* img2img (diffusers 0.10.2 StableDiffusionImg2ImgPipeline.get_timesteps): the first call for
 * `strength`, and x = add_noise(x0, noise, timestep of that call). */
int64_t gen_sched_img2img_start(const struct gen_sched *s, double strength);
void gen_sched_add_noise(const struct gen_sched *s, int64_t call, const float *x0, const float *noise, float *x,
                         int64_t n);

/* ---- noise (noise.c) ---------------------------------------------------------------------- */
#define GEN_RNG_CPU  0   /* torch.randn on the CPU: mt19937 seeded per image */
#define GEN_RNG_CUDA 1   /* torch.randn on a CUDA device: Philox4x32-10 (A1111's rng_philox) */
/* A1111's re-implementation of torch's CUDA randn: element i of the call with `offset` is
 * Box-Muller of Philox4x32-10(counter (offset, 0, i, 0), key seed) in float64, as float. */
void gen_philox_randn(uint64_t seed, uint32_t offset, float *out, int64_t n);

/* Per-image noise streams in kohya's order: draw 0 the initial latent, draws 1.. the sampler's
 * per-step noises, then (img2img) the noise of the init latents and of the VAE sample. */
struct gen_noise {
    int rng;
    int64_t batch, per;              /* images, floats per image latent */
    uint64_t seed[64];
    uint32_t offset[64];             /* cuda: next Philox offset */
    struct lora_mt19937 *mt;         /* cpu: [batch] */
};
lora_status gen_noise_init(lora_ctx *ctx, struct gen_noise *g, int rng, const uint64_t *seeds, int64_t batch,
                           int64_t per);
void gen_noise_free(lora_ctx *ctx, struct gen_noise *g);
/* The next draw of every image into out [batch * per]. */
void gen_noise_next(struct gen_noise *g, float *out);
/* gen_noise_fn adaptor (user = struct gen_noise *). */
lora_status gen_noise_cb(void *user, float *out, int64_t n);

/* Python's random module as kohya seeds with it: random.seed(S) (init_by_array of |S|'s 32-bit
 * words) and then random.randint(0, 0x7fffffff) draws. */
struct gen_pyrandom {
    struct lora_mt19937 mt;
};
void gen_pyrandom_seed(struct gen_pyrandom *r, uint64_t seed);
uint32_t gen_pyrandom_randint31(struct gen_pyrandom *r);
/* The rest of `g` copied (its own generator states): draws continue independently. */
lora_status gen_noise_clone(lora_ctx *ctx, const struct gen_noise *g, struct gen_noise *out);

/* ---- the pipeline (generate.c) ------------------------------------------------------------ */
struct lora_model;
struct tensor_map;
struct sd_config;
struct sd_model;

/* kohya's --vae (vae_override.c): an LDM VAE file (.safetensors / .ckpt, keys with or without
 * "first_stage_model.") mapped to diffusers names through the model's own key map. vae and cfg
 * point into the result; free with gen_vae_free (also after a failure). Errors: file errors,
 * LORA_E_NOT_A_MODEL (no VAE tensor), LORA_E_SHAPE_MISMATCH (another latent size), key-map
 * errors naming the tensor. */
struct gen_vae {
    lora_ctx *ctx;
    struct tensor_map *file;
    struct sd_model *sd;
    const struct tensor_map *vae;
    const struct sd_config *cfg;
};
lora_status gen_vae_load(struct lora_model *model, const char *path, struct gen_vae *out);
void gen_vae_free(struct gen_vae *v);

/* One batch of images of one prompt (kohya's PipelineLike call / diffusers'
 * StableDiffusionPipeline): */
struct gen_job {
    const char *prompt;
    const char *negative;           /* NULL: "" (kohya's default) */
    int64_t width, height;          /* pixels, multiples of 8 (the VAE factor) */
    int32_t steps;
    double scale;                   /* classifier-free guidance; <= 1: none */
    double negative_scale;          /* kohya's --negative_scale; used when has_negative_scale */
    int has_negative_scale;
    int kind;                       /* GEN_* sampler */
    int clip_sample;                /* DDIM: clamp x0 (kohya forces it) */
    int64_t batch;                  /* images in this batch, 1..64 */
    const uint64_t *seeds;          /* [batch] */
    int rng;                        /* GEN_RNG_* */
    int32_t clip_skip;
    int32_t max_embeddings_multiples;
    const struct gen_vae *vae;      /* --vae override, or NULL: the model's VAE */
    const uint8_t *init_rgb;        /* img2img: [height][width][3] (already at the output size), or NULL */
    double strength;                /* img2img */
    /* optional: called after every sampler call of the run (call 0 = the first one made, img2img
     * included) with the batch's latents [batch, 4, h/8, w/8] */
    lora_status (*on_call)(void *user, int64_t call, int64_t n_calls, const float *latents, int64_t n);
    void *user;
    int64_t progress_done, progress_total;   /* LORA_PHASE_SAMPLE_STEP offsets for the caller's run */
};

/* U-Net calls the job makes (for progress totals). */
int64_t gen_job_calls(const struct gen_job *job);

/* Runs the job: writes RGB8 [batch][height][width][3] to rgb (cap bytes). Progress:
 * LORA_PHASE_SAMPLE_STEP per U-Net call, LORA_PHASE_DECODE per image; cancel returns
 * LORA_E_CANCELLED. Errors: LORA_E_CONFIG_RANGE (sizes, steps, sampler), LORA_E_LIMIT,
 * LORA_E_NOMEM, prompt errors (gen/prompt.h), backend errors. */
lora_status gen_run(struct lora_model *model, const struct gen_job *job, uint8_t *rgb, uint64_t cap);

#endif
