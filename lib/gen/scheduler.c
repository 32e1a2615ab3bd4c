/* The samplers of kohya's gen_img_diffusers.py as the diffusers 0.10.2 scheduler classes compute
 * them (see gen.h). Scalars are float32 where the reference holds them in float32 tensors and
 * double where it works in numpy float64, so that results agree to float rounding. */
#include <math.h>
#include <string.h>

#include "gen/gen.h"

static const struct { const char *name; int kind; } sampler_names[] = {
    {"ddim", GEN_DDIM}, {"pndm", GEN_PNDM}, {"lms", GEN_LMS}, {"euler", GEN_EULER}, {"euler_a", GEN_EULER_A},
    {"heun", GEN_HEUN}, {"dpm_2", GEN_DPM2}, {"dpm_2_a", GEN_DPM2_A}, {"dpmsolver", GEN_DPMSOLVER},
    {"dpmsolver++", GEN_DPMSOLVERPP}, {"dpmsingle", GEN_DPMSINGLE}, {"k_lms", GEN_LMS}, {"k_euler", GEN_EULER},
    {"k_euler_a", GEN_EULER_A}, {"k_dpm_2", GEN_DPM2}, {"k_dpm_2_a", GEN_DPM2_A},
};

int gen_sampler_kind(const char *name) {
    if (!name) return 0;
    for (size_t i = 0; i < sizeof sampler_names / sizeof sampler_names[0]; i++)
        if (strcmp(name, sampler_names[i].name) == 0) return sampler_names[i].kind;
    return 0;
}

const char *gen_sampler_name(int kind) {
    for (size_t i = 0; i < sizeof sampler_names / sizeof sampler_names[0]; i++)
        if (sampler_names[i].kind == kind) return sampler_names[i].name;
    return "?";
}

int gen_sampler_noises_per_step(int kind) { return kind == GEN_DPM2_A ? 2 : 1; }

static int sigma_based(int kind) {
    return kind == GEN_LMS || kind == GEN_EULER || kind == GEN_EULER_A || kind == GEN_HEUN || kind == GEN_DPM2 ||
           kind == GEN_DPM2_A;
}

/* torch.linspace(sqrt(0.00085), sqrt(0.012), 1000, float32) ** 2, 1 - betas, cumprod (torch
 * accumulates a float cumprod in double on the CPU). */
static void alphas_cumprod(float *ac) {
    const int64_t N = GEN_TRAIN_STEPS;
    float a = (float)sqrt(0.00085), b = (float)sqrt(0.012);
    float step = (b - a) / (float)(N - 1);
    double acc = 1.0;
    for (int64_t i = 0; i < N; i++) {
        float x = i < N / 2 ? a + step * (float)i : b - step * (float)(N - i - 1);
        float beta = x * x;
        acc *= (double)(1.0f - beta);
        ac[i] = (float)acc;
    }
}

/* numpy.linspace(0, stop, num) element i */
static double np_linspace(double stop, int64_t num, int64_t i) {
    if (num == 1) return 0.0;
    if (i == num - 1) return stop;
    return (double)i * (stop / (double)(num - 1));
}

/* numpy.interp(x, arange(len), fp) */
static double np_interp_index(double x, const float *fp, int64_t len) {
    if (x <= 0) return fp[0];
    if (x >= (double)(len - 1)) return fp[len - 1];
    int64_t j = (int64_t)floor(x);
    if ((double)j == x) return fp[j];
    double slope = ((double)fp[j + 1] - (double)fp[j]) / 1.0;
    return slope * (x - (double)j) + (double)fp[j];
}

/* torch.lerp(a, b, 0.5) on float */
static float lerp_half(float a, float b) { return b - (b - a) * 0.5f; }

/* KDPM2*'s sigma_to_t on the float32 log-sigma table. */
static float sigma_to_t(const float *log_sigmas, float sigma) {
    float ls = logf(sigma);
    int64_t low = 0;
    for (int64_t j = 0; j < GEN_TRAIN_STEPS; j++)
        if (ls - log_sigmas[j] >= 0) low = j;   /* monotone table: the last j with ls >= log_sigmas[j] */
    if (low > GEN_TRAIN_STEPS - 2) low = GEN_TRAIN_STEPS - 2;
    int64_t high = low + 1;
    float lo = log_sigmas[low], hi = log_sigmas[high];
    float w = (lo - ls) / (lo - hi);
    if (w < 0) w = 0;
    if (w > 1) w = 1;
    return (1 - w) * (float)low + w * (float)high;
}

/* cat([x[:1], x[1:].repeat_interleave(2), x[-1:]]) of n entries, or with skip_last the
 * repeat runs over x[1:-1] (Heun). */
static int64_t interleave2(float *out, const float *x, int64_t n, int skip_last) {
    int64_t k = 0;
    out[k++] = x[0];
    for (int64_t i = 1; i < (skip_last ? n - 1 : n); i++) {
        out[k++] = x[i];
        out[k++] = x[i];
    }
    out[k++] = x[n - 1];
    return k;
}

lora_status gen_sched_init(lora_ctx *ctx, struct gen_sched *s, int kind, int steps, int v_pred, int clip_sample,
                           int prk, int64_t n) {
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    if (kind < GEN_DDIM || kind > GEN_DPMSINGLE)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "sampler: kind %d is not known", kind);
    if (steps < 1 || steps > GEN_TRAIN_STEPS)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "steps: %d is outside 1..%d", steps, GEN_TRAIN_STEPS);
    if (kind == GEN_PNDM && prk && steps < 4)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "steps: PNDM with Runge-Kutta warm-up steps needs at least 4 steps, "
                         "got %d", steps);
    if (n < 1 || n > ((int64_t)1 << 40)) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "sampler: %lld floats per sample",
                                                         (long long)n);
    s->kind = kind;
    s->v_pred = v_pred;
    s->clip_sample = clip_sample;
    s->prk = kind == GEN_PNDM && prk;
    s->steps = steps;
    s->n = n;
    alphas_cumprod(s->ac);
    s->final_ac = s->ac[0];          /* set_alpha_to_one False */
    s->init_noise_sigma = 1.0f;
    const int64_t N = steps, T = GEN_TRAIN_STEPS;
    /* the largest arrays: 2N + 2 sigmas, 2N + 8 timesteps */
    size_t cap = (size_t)(2 * N + 16);
    s->t = lora_calloc(ctx, cap, sizeof *s->t);
    s->ti = lora_calloc(ctx, cap, sizeof *s->ti);
    s->sig = lora_calloc(ctx, cap * 4, sizeof *s->sig);
    size_t nbuf = 16;
    uint64_t bytes;
    if (!ck_mul_u64((uint64_t)n, nbuf * sizeof(float), &bytes) || bytes > SIZE_MAX)
        return lora_fail(ctx, LORA_E_LIMIT, "sampler: %lld floats per sample are too many", (long long)n);
    s->mem = lora_calloc(ctx, 1, (size_t)bytes);
    if (!s->t || !s->ti || !s->sig || !s->mem) {
        gen_sched_free(s);
        return LORA_E_NOMEM;
    }
    s->sig_i = s->sig + cap;
    s->sig_up = s->sig + 2 * cap;
    s->sig_down = s->sig + 3 * cap;
    float *b = s->mem;
    s->saved = b; b += n;
    s->deriv = b; b += n;
    s->cur_mo = b; b += n;
    s->tmp = b; b += n;
    for (int k = 0; k < 4; k++) { s->ets[k] = b; b += n; }
    for (int k = 0; k < 2; k++) { s->mo[k] = b; b += n; }
    for (int k = 0; k < 4; k++) { s->lms_d[k] = b; b += n; }

    if (kind == GEN_DDIM || (kind == GEN_PNDM && !s->prk)) {
        int64_t ratio = T / N;
        if (kind == GEN_DDIM) {
            s->n_calls = N;
            for (int64_t i = 0; i < N; i++) s->ti[i] = (N - 1 - i) * ratio + 1;
        } else {
            /* plms: _timesteps[:-1], _timesteps[-2], _timesteps[-1], reversed */
            int64_t k = 0, tt[GEN_TRAIN_STEPS + 1];
            for (int64_t i = 0; i < N - 1; i++) tt[k++] = i * ratio + 1;
            if (N >= 2) tt[k++] = (N - 2) * ratio + 1;
            tt[k++] = (N - 1) * ratio + 1;
            s->n_calls = k;
            for (int64_t i = 0; i < k; i++) s->ti[i] = tt[k - 1 - i];
        }
    } else if (kind == GEN_PNDM) {
        int64_t ratio = T / N, half = ratio / 2, tt[8], prk_t[16], k = 0;
        for (int64_t j = 0; j < 4; j++) {          /* _timesteps[-4:].repeat(2) + tile([0, half]) */
            int64_t v = (N - 4 + j) * ratio + 1;
            tt[2 * j] = v;
            tt[2 * j + 1] = v + half;
        }
        int64_t rep[14];
        for (int64_t j = 0; j < 7; j++) rep[2 * j] = rep[2 * j + 1] = tt[j];   /* [:-1].repeat(2) */
        for (int64_t j = 1; j < 13; j++) prk_t[k++] = rep[j];                  /* [1:-1] */
        s->n_prk = k;
        for (int64_t j = 0; j < k; j++) s->ti[j] = prk_t[k - 1 - j];
        int64_t m = 0;
        for (int64_t i = N - 4; i >= 0; i--) s->ti[k + m++] = i * ratio + 1;   /* _timesteps[:-3][::-1] */
        s->n_calls = k + m;
    } else if (kind == GEN_DPMSOLVER || kind == GEN_DPMSOLVERPP || kind == GEN_DPMSINGLE) {
        s->n_calls = N;
        for (int64_t i = 0; i < N; i++) {
            double v = np_linspace((double)(T - 1), N + 1, N - i);
            s->ti[i] = (int64_t)nearbyint(v);
        }
        for (int64_t i = 0; i < T; i++) {
            s->alpha_t[i] = sqrtf(s->ac[i]);
            s->sigma_t[i] = sqrtf(1.0f - s->ac[i]);
            s->lambda_t[i] = logf(s->alpha_t[i]) - logf(s->sigma_t[i]);
        }
    }
    if (!sigma_based(kind)) {
        for (int64_t i = 0; i < s->n_calls; i++) s->t[i] = (double)s->ti[i];
        return LORA_OK;
    }

    /* sigma-based: the full table, numpy interp at linspace timesteps, a final 0 */
    float full[GEN_TRAIN_STEPS], logs[GEN_TRAIN_STEPS];
    for (int64_t i = 0; i < T; i++) {
        full[i] = sqrtf((1.0f - s->ac[i]) / s->ac[i]);
        logs[i] = logf(full[i]);
    }
    double *ts = lora_malloc(ctx, (size_t)N * sizeof *ts);
    float *sg = lora_malloc(ctx, (size_t)(N + 1) * 5 * sizeof *sg);
    if (!ts || !sg) {
        lora_free(ctx, ts);
        lora_free(ctx, sg);
        gen_sched_free(s);
        return LORA_E_NOMEM;
    }
    float *si = sg + (N + 1), *up = si + (N + 1), *dn = up + (N + 1), *tint = dn + (N + 1);
    for (int64_t i = 0; i < N; i++) {
        ts[i] = np_linspace((double)(T - 1), N, N - 1 - i);
        sg[i] = (float)np_interp_index(ts[i], full, T);
    }
    sg[N] = 0.0f;
    if (kind == GEN_LMS || kind == GEN_EULER || kind == GEN_EULER_A) {
        s->n_calls = N;
        for (int64_t i = 0; i < N; i++) s->t[i] = ts[i];
        s->n_sig = N + 1;
        memcpy(s->sig, sg, (size_t)(N + 1) * sizeof *sg);
    } else if (kind == GEN_HEUN) {
        s->n_sig = interleave2(s->sig, sg, N + 1, 1);
        int64_t k = 0;
        s->t[k++] = ts[0];
        for (int64_t i = 1; i < N; i++) {
            s->t[k++] = ts[i];
            s->t[k++] = ts[i];
        }
        s->n_calls = k;
    } else if (kind == GEN_DPM2) {
        for (int64_t i = 0; i <= N; i++) {
            float prev = sg[(i + N) % (N + 1)];           /* roll(1) */
            si[i] = expf(lerp_half(logf(sg[i]), logf(prev)));
        }
        s->n_sig = interleave2(s->sig, sg, N + 1, 0);
        interleave2(s->sig_i, si, N + 1, 0);
        for (int64_t i = 0; i <= N; i++) tint[i] = sigma_to_t(logs, si[i]);
        int64_t k = 0;
        s->t[k++] = ts[0];
        for (int64_t i = 1; i < N; i++) {        /* (interpol[1:-1], timesteps[1:]) interleaved */
            s->t[k++] = (double)tint[i];
            s->t[k++] = ts[i];
        }
        s->n_calls = k;
    } else {   /* GEN_DPM2_A */
        for (int64_t i = 0; i <= N; i++) {
            float nx = i < N ? sg[i + 1] : 0.0f;
            up[i] = sqrtf(nx * nx * (sg[i] * sg[i] - nx * nx) / (sg[i] * sg[i]));
            dn[i] = sqrtf(nx * nx - up[i] * up[i]);
        }
        dn[N] = 0.0f;
        for (int64_t i = 0; i <= N; i++) si[i] = expf(lerp_half(logf(sg[i]), logf(dn[i])));
        si[N] = 0.0f;
        if (N >= 1) si[N - 1] = 0.0f;
        s->n_sig = interleave2(s->sig, sg, N + 1, 0);
        interleave2(s->sig_i, si, N + 1, 0);
        interleave2(s->sig_up, up, N + 1, 0);
        interleave2(s->sig_down, dn, N + 1, 0);
        for (int64_t i = 0; i <= N; i++) tint[i] = sigma_to_t(logs, si[i]);
        int64_t k = 0;
        s->t[k++] = ts[0];
        for (int64_t i = 0; i + 1 < N; i++) {    /* (interpol[:-2], timesteps[1:]) interleaved */
            s->t[k++] = (double)tint[i];
            s->t[k++] = ts[i + 1];
        }
        s->n_calls = k;
    }
    float mx = 0;
    for (int64_t i = 0; i < s->n_sig; i++)
        if (s->sig[i] > mx) mx = s->sig[i];
    s->init_noise_sigma = mx;
    lora_free(ctx, ts);
    lora_free(ctx, sg);
    return LORA_OK;
}

void gen_sched_free(struct gen_sched *s) {
    if (!s->ctx) return;
    lora_free(s->ctx, s->t);
    lora_free(s->ctx, s->ti);
    lora_free(s->ctx, s->sig);
    lora_free(s->ctx, s->mem);
    s->t = NULL;
    s->ti = NULL;
    s->sig = NULL;
    s->mem = NULL;
}

double gen_sched_timestep(const struct gen_sched *s, int64_t i) {
    return i >= 0 && i < s->n_calls ? s->t[i] : 0.0;
}

/* Heun / KDPM2*: index_for_timestep (last match in the first-order state, first otherwise). */
static int64_t index_for(const struct gen_sched *s, int64_t call, int first_order) {
    double t = s->t[call];
    int64_t found = call;
    if (first_order) {
        for (int64_t j = 0; j < s->n_calls; j++)
            if (s->t[j] == t) found = j;
    } else {
        for (int64_t j = s->n_calls - 1; j >= 0; j--)
            if (s->t[j] == t) found = j;
    }
    return found;
}

/* Euler / LMS: (timesteps == t).nonzero().item() */
static int64_t index_unique(const struct gen_sched *s, int64_t call) {
    for (int64_t j = 0; j < s->n_calls; j++)
        if (s->t[j] == s->t[call]) return j;
    return call;
}

float gen_sched_input_div(const struct gen_sched *s, int64_t i) {
    float sigma;
    switch (s->kind) {
    case GEN_LMS: case GEN_EULER: case GEN_EULER_A:
        sigma = s->sig[index_unique(s, i)];
        break;
    case GEN_HEUN:
        sigma = s->sig[index_for(s, i, !s->has_saved)];
        break;
    case GEN_DPM2: {
        int64_t k = index_for(s, i, !s->has_saved);
        sigma = s->has_saved ? s->sig_i[k] : s->sig[k];
        break;
    }
    case GEN_DPM2_A: {
        int64_t k = index_for(s, i, !s->has_saved);
        sigma = s->has_saved ? s->sig_i[k > 0 ? k - 1 : s->n_sig - 1] : s->sig[k];
        break;
    }
    default:
        return 1.0f;
    }
    return sqrtf(sigma * sigma + 1.0f);
}

/* x0 from the model output at noise level sigma (k-diffusion parameterisation). */
static void k_pred_x0(const struct gen_sched *s, float sigma, const float *mo, const float *x, float *x0) {
    int64_t n = s->n;
    if (!s->v_pred) {
        for (int64_t j = 0; j < n; j++) x0[j] = x[j] - sigma * mo[j];
    } else {
        float s2 = sigma * sigma + 1.0f;
        float c = -sigma / sqrtf(s2);
        for (int64_t j = 0; j < n; j++) x0[j] = mo[j] * c + x[j] / s2;
    }
}

static lora_status draw(struct gen_sched *s, gen_noise_fn noise, void *user, float *out) {
    s->noises_drawn++;
    if (!noise) return lora_fail(s->ctx, LORA_E_INTERNAL, "sampler %s needs noise", gen_sampler_name(s->kind));
    return noise(user, out, s->n);
}

/* PNDM's _get_prev_sample */
static void pndm_prev(const struct gen_sched *s, const float *x, int64_t t, int64_t tp, const float *mo, float *out) {
    float a = s->ac[t], ap = tp >= 0 ? s->ac[tp] : s->final_ac;
    float b = 1.0f - a, bp = 1.0f - ap;
    float sa = sqrtf(a), sb = sqrtf(b);
    float coef = sqrtf(ap / a);
    float denom = a * sqrtf(bp) + sqrtf(a * b * ap);
    float diff = ap - a;
    for (int64_t j = 0; j < s->n; j++) {
        float m = s->v_pred ? sa * mo[j] + sb * x[j] : mo[j];
        out[j] = coef * x[j] - diff * m / denom;
    }
}

/* LMS coefficient: integral over [sigmas[t], sigmas[t+1]] of the Lagrange basis polynomial
 * (degree < 4: 4-point Gauss-Legendre is exact; scipy's quad gets the same to 1e-14). */
static double lms_coeff(const struct gen_sched *s, int order, int64_t t, int cur) {
    static const double gx[4] = {-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526};
    static const double gw[4] = {0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538};
    double a = s->sig[t], b = s->sig[t + 1], sum = 0;
    for (int q = 0; q < 4; q++) {
        double tau = 0.5 * (b - a) * gx[q] + 0.5 * (a + b);
        double prod = 1.0;
        for (int k = 0; k < order; k++) {
            if (k == cur) continue;
            prod *= (tau - s->sig[t - k]) / ((double)s->sig[t - cur] - s->sig[t - k]);
        }
        sum += gw[q] * prod;
    }
    return sum * 0.5 * (b - a);
}

static void dpm_first(const struct gen_sched *s, const float *m, int64_t t, int64_t tp, const float *x, float *out) {
    float h = s->lambda_t[tp] - s->lambda_t[t];
    if (s->kind == GEN_DPMSOLVER) {
        float c1 = s->alpha_t[tp] / s->alpha_t[t], c2 = s->sigma_t[tp] * (expf(h) - 1.0f);
        for (int64_t j = 0; j < s->n; j++) out[j] = c1 * x[j] - c2 * m[j];
    } else {
        float c1 = s->sigma_t[tp] / s->sigma_t[t], c2 = s->alpha_t[tp] * (expf(-h) - 1.0f);
        for (int64_t j = 0; j < s->n; j++) out[j] = c1 * x[j] - c2 * m[j];
    }
}

/* Second-order midpoint update. Multistep: s0 = the current timestep, base s0; singlestep: base
 * s1 (the first of the pair) with D0 = m1. */
static void dpm_second(const struct gen_sched *s, const float *m0, const float *m1, int64_t t, int64_t s0, int64_t s1,
                       const float *x, float *out, int single) {
    float h = single ? s->lambda_t[t] - s->lambda_t[s1] : s->lambda_t[t] - s->lambda_t[s0];
    float h0 = s->lambda_t[s0] - s->lambda_t[s1];
    float r0 = h0 / h;
    float inv_r0 = 1.0f / r0;
    int64_t base = single ? s1 : s0;
    const float *d0 = single ? m1 : m0;
    if (s->kind == GEN_DPMSOLVER) {
        float c1 = s->alpha_t[t] / s->alpha_t[base], c2 = s->sigma_t[t] * (expf(h) - 1.0f), c3 = 0.5f * c2;
        for (int64_t j = 0; j < s->n; j++) {
            float d1 = inv_r0 * (m0[j] - m1[j]);
            out[j] = c1 * x[j] - c2 * d0[j] - c3 * d1;
        }
    } else {
        float c1 = s->sigma_t[t] / s->sigma_t[base], c2 = s->alpha_t[t] * (expf(-h) - 1.0f), c3 = 0.5f * c2;
        for (int64_t j = 0; j < s->n; j++) {
            float d1 = inv_r0 * (m0[j] - m1[j]);
            out[j] = c1 * x[j] - c2 * d0[j] - c3 * d1;
        }
    }
}

/* convert_model_output: x0 (dpmsolver++) or epsilon (dpmsolver) */
static void dpm_convert(const struct gen_sched *s, const float *mo, int64_t t, const float *x, float *out) {
    float a = s->alpha_t[t], sg = s->sigma_t[t];
    int64_t n = s->n;
    if (s->kind == GEN_DPMSOLVER) {
        if (!s->v_pred) memcpy(out, mo, (size_t)n * sizeof *out);
        else for (int64_t j = 0; j < n; j++) out[j] = a * mo[j] + sg * x[j];
    } else {
        if (!s->v_pred) for (int64_t j = 0; j < n; j++) out[j] = (x[j] - sg * mo[j]) / a;
        else for (int64_t j = 0; j < n; j++) out[j] = a * x[j] - sg * mo[j];
    }
}

lora_status gen_sched_step(struct gen_sched *s, int64_t i, const float *mo, float *x, gen_noise_fn noise, void *user) {
    if (i < 0 || i >= s->n_calls)
        return lora_fail(s->ctx, LORA_E_INTERNAL, "sampler: call %lld outside 0..%lld", (long long)i,
                         (long long)s->n_calls - 1);
    const int64_t n = s->n;
    float *tmp = s->tmp;
    switch (s->kind) {
    case GEN_DDIM: {
        int64_t t = s->ti[i], tp = t - GEN_TRAIN_STEPS / s->steps;
        float a = s->ac[t], ap = tp >= 0 ? s->ac[tp] : s->final_ac;
        float b = 1.0f - a;
        float sa = sqrtf(a), sb = sqrtf(b), sap = sqrtf(ap), dir = sqrtf(1.0f - ap - 0.0f);
        for (int64_t j = 0; j < n; j++) {
            float x0, e = mo[j];
            if (!s->v_pred) {
                x0 = (x[j] - sb * e) / sa;
            } else {
                x0 = sa * x[j] - sb * e;
                e = sa * e + sb * x[j];
            }
            if (s->clip_sample) x0 = x0 < -1.0f ? -1.0f : x0 > 1.0f ? 1.0f : x0;
            x[j] = sap * x0 + dir * e;
        }
        return LORA_OK;
    }
    case GEN_PNDM: {
        int64_t ratio = GEN_TRAIN_STEPS / s->steps;
        int64_t t = s->ti[i];
        if (s->prk && s->counter < s->n_prk) {
            int64_t diff = s->counter % 2 ? 0 : ratio / 2;
            int64_t tp = t - diff;
            int64_t tt = s->ti[s->counter / 4 * 4];
            int64_t phase = s->counter % 4;
            const float *m = mo;
            if (phase == 0) {
                for (int64_t j = 0; j < n; j++) s->cur_mo[j] = (s->has_cur_mo ? s->cur_mo[j] : 0.0f) + (float)(1.0 / 6) * mo[j];
                s->has_cur_mo = 1;
                if (s->n_ets == 4) {   /* keep the last 3 (plms uses ets[-3:]) */
                    float *f = s->ets[0];
                    memmove(s->ets, s->ets + 1, 3 * sizeof s->ets[0]);
                    s->ets[3] = f;
                    s->n_ets = 3;
                }
                memcpy(s->ets[s->n_ets++], mo, (size_t)n * sizeof *mo);
                memcpy(s->saved, x, (size_t)n * sizeof *x);
                s->has_saved = 1;
            } else if (phase == 1 || phase == 2) {
                for (int64_t j = 0; j < n; j++) s->cur_mo[j] += (float)(1.0 / 3) * mo[j];
            } else {
                for (int64_t j = 0; j < n; j++) tmp[j] = s->cur_mo[j] + (float)(1.0 / 6) * mo[j];
                for (int64_t j = 0; j < n; j++) s->cur_mo[j] = 0.0f;
                m = tmp;
            }
            const float *cs = s->has_saved ? s->saved : x;
            pndm_prev(s, cs, tt, tp, m, x);
            s->counter++;
            return LORA_OK;
        }
        int64_t tp = t - ratio;
        if (s->counter != 1) {
            if (s->n_ets == 4) {
                float *f = s->ets[0];
                memmove(s->ets, s->ets + 1, 3 * sizeof s->ets[0]);
                s->ets[3] = f;
                s->n_ets = 3;
            }
            memcpy(s->ets[s->n_ets++], mo, (size_t)n * sizeof *mo);
        } else {
            tp = t;
            t = t + ratio;
        }
        const float *sample = x;
        float *const *e = s->ets;
        int k = s->n_ets;
        if (k == 1 && s->counter == 0) {
            memcpy(tmp, mo, (size_t)n * sizeof *tmp);
            memcpy(s->saved, x, (size_t)n * sizeof *x);
            s->has_saved = 1;
        } else if (k == 1 && s->counter == 1) {
            for (int64_t j = 0; j < n; j++) tmp[j] = (mo[j] + e[0][j]) / 2;
            sample = s->saved;
            s->has_saved = 0;
        } else if (k == 2) {
            for (int64_t j = 0; j < n; j++) tmp[j] = (3 * e[1][j] - e[0][j]) / 2;
        } else if (k == 3) {
            for (int64_t j = 0; j < n; j++) tmp[j] = (23 * e[2][j] - 16 * e[1][j] + 5 * e[0][j]) / 12;
        } else {
            for (int64_t j = 0; j < n; j++)
                tmp[j] = (float)(1.0 / 24) * (55 * e[3][j] - 59 * e[2][j] + 37 * e[1][j] - 9 * e[0][j]);
        }
        pndm_prev(s, sample, t, tp, tmp, x);
        s->counter++;
        return LORA_OK;
    }
    case GEN_LMS: {
        int64_t si = index_unique(s, i);
        float sigma = s->sig[si];
        k_pred_x0(s, sigma, mo, x, tmp);
        /* derivatives, oldest first, at most 4 */
        if (s->n_lms == 4) {
            float *f = s->lms_d[0];
            memmove(s->lms_d, s->lms_d + 1, 3 * sizeof s->lms_d[0]);
            s->lms_d[3] = f;
            s->n_lms = 3;
        }
        float *d = s->lms_d[s->n_lms++];
        for (int64_t j = 0; j < n; j++) d[j] = (x[j] - tmp[j]) / sigma;
        int order = (int)(si + 1 < 4 ? si + 1 : 4);
        float c[4];
        for (int k = 0; k < order; k++) c[k] = (float)lms_coeff(s, order, si, k);
        /* sum(coeff * derivative for reversed(derivatives)): newest first */
        for (int64_t j = 0; j < n; j++) {
            float acc = c[0] * s->lms_d[s->n_lms - 1][j];
            for (int k = 1; k < order && k < s->n_lms; k++) acc += c[k] * s->lms_d[s->n_lms - 1 - k][j];
            x[j] = x[j] + acc;
        }
        return LORA_OK;
    }
    case GEN_EULER: {
        int64_t si = index_unique(s, i);
        LORA_TRY(draw(s, noise, user, tmp));   /* drawn and unused (s_churn 0), as the reference does */
        float sigma = s->sig[si];
        k_pred_x0(s, sigma, mo, x, tmp);
        float dt = s->sig[si + 1] - sigma;
        for (int64_t j = 0; j < n; j++) {
            float dv = (x[j] - tmp[j]) / sigma;
            x[j] = x[j] + dv * dt;
        }
        return LORA_OK;
    }
    case GEN_EULER_A: {
        int64_t si = index_unique(s, i);
        float sigma = s->sig[si], sto = s->sig[si + 1];
        k_pred_x0(s, sigma, mo, x, tmp);
        float up = sqrtf(sto * sto * (sigma * sigma - sto * sto) / (sigma * sigma));
        float down = sqrtf(sto * sto - up * up);
        float dt = down - sigma;
        for (int64_t j = 0; j < n; j++) {
            float dv = (x[j] - tmp[j]) / sigma;
            x[j] = x[j] + dv * dt;
        }
        LORA_TRY(draw(s, noise, user, tmp));
        for (int64_t j = 0; j < n; j++) x[j] = x[j] + tmp[j] * up;
        return LORA_OK;
    }
    case GEN_HEUN: {
        int first = !s->has_saved;
        int64_t k = index_for(s, i, first);
        float sigma = first ? s->sig[k] : s->sig[k - 1];
        float snext = first ? s->sig[k + 1] : s->sig[k];
        float shat = sigma;
        k_pred_x0(s, first ? shat : snext, mo, x, tmp);
        if (first) {
            float dt = snext - shat;
            for (int64_t j = 0; j < n; j++) {
                s->deriv[j] = (x[j] - tmp[j]) / shat;
                s->saved[j] = x[j];
                x[j] = x[j] + s->deriv[j] * dt;
            }
            s->dt = dt;
            s->has_saved = 1;
        } else {
            for (int64_t j = 0; j < n; j++) {
                float dv = (x[j] - tmp[j]) / snext;
                dv = (s->deriv[j] + dv) / 2;
                x[j] = s->saved[j] + dv * s->dt;
            }
            s->has_saved = 0;
        }
        return LORA_OK;
    }
    case GEN_DPM2: {
        int first = !s->has_saved;
        int64_t k = index_for(s, i, first);
        float sigma = first ? s->sig[k] : s->sig[k - 1];
        float sint = first ? s->sig_i[k + 1] : s->sig_i[k];
        float snext = first ? s->sig[k + 1] : s->sig[k];
        float shat = sigma;
        k_pred_x0(s, first ? shat : sint, mo, x, tmp);
        if (first) {
            float dt = sint - shat;
            for (int64_t j = 0; j < n; j++) {
                float dv = (x[j] - tmp[j]) / shat;
                s->saved[j] = x[j];
                x[j] = x[j] + dv * dt;
            }
            s->has_saved = 1;
        } else {
            float dt = snext - shat;
            for (int64_t j = 0; j < n; j++) {
                float dv = (x[j] - tmp[j]) / sint;
                x[j] = s->saved[j] + dv * dt;
            }
            s->has_saved = 0;
        }
        return LORA_OK;
    }
    case GEN_DPM2_A: {
        int first = !s->has_saved;
        int64_t k = index_for(s, i, first);
        int64_t km1 = k > 0 ? k - 1 : s->n_sig - 1;    /* Python's index -1 */
        float sigma = first ? s->sig[k] : s->sig[km1];
        float sint = first ? s->sig_i[k] : s->sig_i[km1];
        float up = first ? s->sig_up[k] : s->sig_up[km1];
        float down = s->sig_down[km1];
        float shat = sigma;
        float *nz = s->cur_mo;
        LORA_TRY(draw(s, noise, user, nz));
        k_pred_x0(s, first ? shat : sint, mo, x, tmp);
        if (first) {
            float dt = sint - shat;
            for (int64_t j = 0; j < n; j++) {
                float dv = (x[j] - tmp[j]) / shat;
                s->saved[j] = x[j];
                x[j] = x[j] + dv * dt;
            }
            s->has_saved = 1;
        } else {
            float dt = down - shat;
            for (int64_t j = 0; j < n; j++) {
                float dv = (x[j] - tmp[j]) / sint;
                float p = s->saved[j] + dv * dt;
                x[j] = p + nz[j] * up;
            }
            s->has_saved = 0;
        }
        return LORA_OK;
    }
    case GEN_DPMSOLVER: case GEN_DPMSOLVERPP: case GEN_DPMSINGLE: {
        int64_t N = s->n_calls, t = s->ti[i];
        int64_t tp = i == N - 1 ? 0 : s->ti[i + 1];
        /* model_outputs shift (order 2): mo[0] <- mo[1], mo[1] <- converted */
        float *f = s->mo[0];
        s->mo[0] = s->mo[1];
        s->mo[1] = f;
        dpm_convert(s, mo, t, x, s->mo[1]);
        if (s->kind == GEN_DPMSINGLE) {
            int order = i % 2 == 0 ? 1 : 2;   /* order_list of [1, 2] * 500 (diffusers 0.10.2 keys it by the index) */
            if (order == 1) {
                memcpy(s->saved, x, (size_t)n * sizeof *x);
                dpm_first(s, s->mo[1], t, tp, s->saved, x);
            } else {
                dpm_second(s, s->mo[1], s->mo[0], tp, t, s->ti[i - 1], s->saved, x, 1);
            }
            return LORA_OK;
        }
        int lower_final = i == N - 1 && N < 15;
        if (s->lower_order_nums < 1 || lower_final) {
            memcpy(tmp, x, (size_t)n * sizeof *x);
            dpm_first(s, s->mo[1], t, tp, tmp, x);
        } else {
            memcpy(tmp, x, (size_t)n * sizeof *x);
            dpm_second(s, s->mo[1], s->mo[0], tp, t, s->ti[i - 1], tmp, x, 0);
        }
        if (s->lower_order_nums < 2) s->lower_order_nums++;
        return LORA_OK;
    }
    default:
        return lora_fail(s->ctx, LORA_E_INTERNAL, "sampler kind %d", s->kind);
    }
}

int64_t gen_sched_img2img_start(const struct gen_sched *s, double strength) {
    int64_t N = s->steps;
    int64_t offset = (s->kind == GEN_DDIM || s->kind == GEN_PNDM) ? 1 : 0;   /* config steps_offset */
    int64_t init = (int64_t)((double)N * strength) + offset;
    if (init > N) init = N;
    int64_t start = N - init + offset;
    if (start < 0) start = 0;
    if (start >= s->n_calls) start = s->n_calls - 1;
    return start;
}

void gen_sched_add_noise(const struct gen_sched *s, int64_t call, const float *x0, const float *noise, float *x,
                         int64_t n) {
    double t = s->t[call];
    if (sigma_based(s->kind)) {
        int64_t k = 0;
        for (int64_t j = 0; j < s->n_calls; j++)
            if (s->t[j] == t) { k = j; break; }
        float sigma = s->sig[k];
        for (int64_t j = 0; j < n; j++) x[j] = x0[j] + noise[j] * sigma;
        return;
    }
    int64_t ti = (int64_t)t;
    float a = sqrtf(s->ac[ti]), b = sqrtf(1.0f - s->ac[ti]);
    for (int64_t j = 0; j < n; j++) x[j] = a * x0[j] + b * noise[j];
}
