/* Optimizers on flat float32 arrays (see train.h): torch.optim.AdamW, torch.optim.SGD (momentum,
 * dampening, Nesterov, weight decay), and Lion as lion-pytorch. float32 element arithmetic in
 * the order of torch's _single_tensor_* loops; scalars rounded to float as torch does. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "train/train.h"

#define BNB_BLOCK 2048
#define BNB_MIN_8BIT 4096

void train_optim_default(struct train_optim_opts *o, enum train_optim_kind kind) {
    memset(o, 0, sizeof *o);
    o->kind = kind;
    switch (kind) {
    case TRAIN_OPT_ADAMW:
    case TRAIN_OPT_ADAMW8BIT:
        o->beta1 = 0.9, o->beta2 = 0.999, o->eps = 1e-8, o->weight_decay = 0.01;
        break;
    case TRAIN_OPT_LION:
        o->beta1 = 0.9, o->beta2 = 0.99;
        break;
    case TRAIN_OPT_SGD:
        break;
    }
}

void train_optim_sgd_nesterov(struct train_optim_opts *o) {
    train_optim_default(o, TRAIN_OPT_SGD);
    o->momentum = 0.9;
    o->nesterov = 1;
}

lora_status train_optim_parse(lora_ctx *ctx, const char *name, struct train_optim_opts *o) {
    if (!name || !o) return lora_fail(ctx, LORA_E_INVALID_ARG, "train_optim_parse: NULL argument");
    if (strcasecmp(name, "AdamW") == 0) train_optim_default(o, TRAIN_OPT_ADAMW);
    else if (strcasecmp(name, "AdamW8bit") == 0) train_optim_default(o, TRAIN_OPT_ADAMW8BIT);
    else if (strcasecmp(name, "SGDNesterov") == 0) train_optim_sgd_nesterov(o);
    else if (strcasecmp(name, "Lion") == 0) train_optim_default(o, TRAIN_OPT_LION);
    else
        return lora_fail(ctx, LORA_E_UNSUPPORTED,
                         "optimizer_type '%s' is not supported (AdamW, AdamW8bit, SGDNesterov, Lion)", name);
    return LORA_OK;
}

int64_t train_optim_state_floats(const struct train_optim_opts *o, int64_t n) {
    switch (o->kind) {
    case TRAIN_OPT_ADAMW: return 2 * n;
    case TRAIN_OPT_SGD: return o->momentum != 0 ? n : 0;
    case TRAIN_OPT_LION: return n;
    case TRAIN_OPT_ADAMW8BIT:
        return n < BNB_MIN_8BIT ? 2 * n : 2 * ((n + BNB_BLOCK - 1) / BNB_BLOCK) + (2 * n + 3) / 4;
    }
    return 0;
}

static void adamw(const struct train_optim_opts *o, float *p, const float *g, float *m, float *v,
                  int64_t n, double lr, int64_t step) {
    /* torch 1.13 _single_tensor_adamw */
    const float decay = (float)(1.0 - lr * o->weight_decay);
    const float b1 = (float)o->beta1, b2 = (float)o->beta2;
    const float a1 = (float)(1.0 - o->beta1), a2 = (float)(1.0 - o->beta2);
    const double bc1 = 1.0 - pow(o->beta1, (double)step), bc2 = 1.0 - pow(o->beta2, (double)step);
    const float step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2), eps = (float)o->eps;
    for (int64_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] = m[i] * b1 + a1 * g[i];
        v[i] = v[i] * b2 + a2 * (g[i] * g[i]);
        float denom = sqrtf(v[i]) / bc2s + eps;
        p[i] = p[i] + -step_size * (m[i] / denom);
    }
}

static void sgd(const struct train_optim_opts *o, float *p, const float *g, float *buf, int64_t n,
                double lr, int64_t step) {
    /* torch 1.13 _single_tensor_sgd */
    const float wd = (float)o->weight_decay, mom = (float)o->momentum;
    const float damp = (float)(1.0 - o->dampening), nlr = (float)-lr;
    for (int64_t i = 0; i < n; i++) {
        float d = g[i];
        if (wd != 0.0f) d = d + wd * p[i];
        if (mom != 0.0f) {
            buf[i] = step == 1 ? d : buf[i] * mom + damp * d;
            d = o->nesterov ? d + mom * buf[i] : buf[i];
        }
        p[i] = p[i] + nlr * d;
    }
}

static void lion(const struct train_optim_opts *o, float *p, const float *g, float *m, int64_t n,
                 double lr) {
    /* lion-pytorch update_fn */
    const float decay = (float)(1.0 - lr * o->weight_decay), nlr = (float)-lr;
    const float b1 = (float)o->beta1, a1 = (float)(1.0 - o->beta1);
    const float b2 = (float)o->beta2, a2 = (float)(1.0 - o->beta2);
    for (int64_t i = 0; i < n; i++) {
        p[i] *= decay;
        float c = m[i] * b1 + a1 * g[i];
        float s = c > 0.0f ? 1.0f : c < 0.0f ? -1.0f : 0.0f;
        p[i] = p[i] + nlr * s;
        m[i] = m[i] * b2 + a2 * g[i];
    }
}

/* ---- AdamW8bit: bitsandbytes 0.35 ---- */

static void linspace_f32(float *out, int n) {
    /* torch.linspace(0.1, 1, n) float32, scalar kernel: start + step*i below n/2, else
     * end - step*(n-1-i) */
    const float start = 0.1f, end = 1.0f, step = (end - start) / (float)(n - 1);
    for (int i = 0; i < n; i++)
        out[i] = i < n / 2 ? start + step * (float)i : end - step * (float)(n - 1 - i);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void train_bnb_dynamic_map(float code[256], int is_signed) {
    double data[256];
    float lin[130];
    int k = 0;
    for (int i = 0; i < 7; i++) {   /* n = 7: no additional items */
        int items = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
        linspace_f32(lin, items);
        double scale = pow(10.0, (double)(i - 6));
        for (int j = 0; j + 1 < items; j++) {
            float mean = (lin[j] + lin[j + 1]) / 2.0f;
            data[k++] = scale * (double)mean;
            if (is_signed) data[k++] = -scale * (double)mean;
        }
    }
    data[k++] = 0.0;
    data[k++] = 1.0;
    qsort(data, (size_t)k, sizeof data[0], cmp_double);
    for (int i = 0; i < 256; i++) code[i] = (float)data[i];
}

static unsigned quantize_2d(const float *code, int is_signed, float x) {
    /* kernels.cu quantize_2D: binary search from code[127] by 64, 32, ..., 1, then the nearer
     * neighbour by midpoint */
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = is_signed ? -1.0f : 0.0f, upper = 1.0f, val = code[127];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) lower_pivot = pivot, lower = val, pivot += i;
        else upper_pivot = pivot, upper = val, pivot -= i;
        val = code[pivot];
    }
    if (x > val) return (unsigned)(x > (upper + val) * 0.5f ? upper_pivot : pivot);
    return (unsigned)(x < (lower + val) * 0.5f ? lower_pivot : pivot);
}

struct bnb_scalars { float b1, b2, a1, a2, c2, step_size, eps, decay; int wd; };

static struct bnb_scalars bnb_scalars(const struct train_optim_opts *o, double lr, int64_t step) {
    struct bnb_scalars s;
    float lrf = (float)lr;
    s.b1 = (float)o->beta1, s.b2 = (float)o->beta2, s.eps = (float)o->eps;
    s.a1 = 1.0f - s.b1, s.a2 = 1.0f - s.b2;
    float c1 = 1.0f - (float)pow((double)s.b1, (double)step);
    s.c2 = sqrtf(1.0f - (float)pow((double)s.b2, (double)step));
    s.step_size = (-lrf * s.c2) / c1;
    s.wd = (float)o->weight_decay > 0.0f;
    s.decay = 1.0f - lrf * (float)o->weight_decay;
    return s;
}

static void adamw_bnb32(const struct train_optim_opts *o, float *p, const float *g, float *m,
                        float *v, int64_t n, double lr, int64_t step) {
    /* kOptimizer32bit2State<float, ADAM> (update_scale 1) */
    const struct bnb_scalars s = bnb_scalars(o, lr, step);
    for (int64_t i = 0; i < n; i++) {
        m[i] = m[i] * s.b1 + s.a1 * g[i];
        v[i] = v[i] * s.b2 + s.a2 * (g[i] * g[i]);
        p[i] = p[i] + (1.0f * s.step_size) * (m[i] / (sqrtf(v[i]) + s.eps * s.c2));
        if (s.wd) p[i] = p[i] * s.decay;
    }
}

static void adamw_bnb8(const struct train_optim_opts *o, float *p, const float *g, float *state,
                       int64_t n, double lr, int64_t step) {
    /* kOptimizerStatic8bit2StateBlockwise<float, ADAM, 2048, 8> */
    const struct bnb_scalars s = bnb_scalars(o, lr, step);
    const int64_t nb = (n + BNB_BLOCK - 1) / BNB_BLOCK;
    float *absmax1 = state, *absmax2 = state + nb;
    uint8_t *q1 = (uint8_t *)(state + 2 * nb), *q2 = q1 + n;
    float code1[256], code2[256];
    train_bnb_dynamic_map(code1, 1);
    train_bnb_dynamic_map(code2, 0);
    float m[BNB_BLOCK], v[BNB_BLOCK];
    for (int64_t b = 0; b < nb; b++) {
        const int64_t b0 = b * BNB_BLOCK, e = n - b0 < BNB_BLOCK ? n - b0 : BNB_BLOCK;
        float mx1 = -FLT_MAX, mx2 = -FLT_MAX;
        for (int64_t j = 0; j < e; j++) {
            float gv = g[b0 + j];
            m[j] = code1[q1[b0 + j]] * absmax1[b];
            m[j] = m[j] * s.b1 + s.a1 * gv;
            v[j] = code2[q2[b0 + j]] * absmax2[b];
            v[j] = v[j] * s.b2 + s.a2 * gv * gv;
            mx1 = fmaxf(mx1, fabsf(m[j]));
            mx2 = fmaxf(mx2, fabsf(v[j]));
        }
        if (e < BNB_BLOCK) {   /* the kernel's padding: g 0, m code 128, v code 0 */
            mx1 = fmaxf(mx1, fabsf(code1[128] * absmax1[b] * s.b1 + s.a1 * 0.0f));
            mx2 = fmaxf(mx2, fabsf(code2[0] * absmax2[b] * s.b2));
        }
        absmax1[b] = mx1, absmax2[b] = mx2;
        for (int64_t j = 0; j < e; j++) {
            float *pp = &p[b0 + j];
            *pp = *pp + s.step_size * (m[j] / (sqrtf(v[j]) + s.c2 * s.eps));
            if (s.wd) *pp = *pp * s.decay;
            unsigned c1 = quantize_2d(code1, 1, m[j] / mx1);
            if (signbit(code1[c1]) != signbit(m[j])) c1 = m[j] > 0.0f ? c1 + 1 : c1 - 1;
            q1[b0 + j] = (uint8_t)c1;
            q2[b0 + j] = (uint8_t)quantize_2d(code2, 0, v[j] / mx2);
        }
    }
}

static int beta_ok(double b) { return b >= 0.0 && b < 1.0; }

lora_status train_optim_step(lora_ctx *ctx, const struct train_optim_opts *o, float *p,
                             const float *g, float *state, int64_t n, double lr, int64_t step) {
    if (!o || n < 0 || (n > 0 && (!p || !g)))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_optim_step: NULL argument");
    if (!isfinite(lr) || lr < 0 || step < 1 || !isfinite(o->weight_decay))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_optim_step: lr %g / step %lld invalid", lr,
                         (long long)step);
    if (train_optim_state_floats(o, n) > 0 && !state)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "train_optim_step: no state array");
    switch (o->kind) {
    case TRAIN_OPT_ADAMW:
        if (!beta_ok(o->beta1) || !beta_ok(o->beta2) || !(o->eps >= 0))
            return lora_fail(ctx, LORA_E_INVALID_ARG, "AdamW: betas (%g, %g) / eps %g invalid",
                             o->beta1, o->beta2, o->eps);
        adamw(o, p, g, state, state + n, n, lr, step);
        return LORA_OK;
    case TRAIN_OPT_SGD:
        if (!(o->momentum >= 0) || !isfinite(o->momentum) || !isfinite(o->dampening) ||
            (o->nesterov && (o->momentum <= 0 || o->dampening != 0)))
            return lora_fail(ctx, LORA_E_INVALID_ARG,
                             "SGD: momentum %g / dampening %g invalid (Nesterov needs momentum > 0 and "
                             "dampening 0)", o->momentum, o->dampening);
        sgd(o, p, g, state, n, lr, step);
        return LORA_OK;
    case TRAIN_OPT_ADAMW8BIT:
        if (!beta_ok(o->beta1) || !beta_ok(o->beta2) || !(o->eps >= 0))
            return lora_fail(ctx, LORA_E_INVALID_ARG, "AdamW8bit: betas (%g, %g) / eps %g invalid",
                             o->beta1, o->beta2, o->eps);
        if (n < BNB_MIN_8BIT) adamw_bnb32(o, p, g, state, state + n, n, lr, step);
        else adamw_bnb8(o, p, g, state, n, lr, step);
        return LORA_OK;
    case TRAIN_OPT_LION:
        if (!beta_ok(o->beta1) || !beta_ok(o->beta2))
            return lora_fail(ctx, LORA_E_INVALID_ARG, "Lion: betas (%g, %g) invalid", o->beta1, o->beta2);
        lion(o, p, g, state, n, lr);
        return LORA_OK;
    }
    return lora_fail(ctx, LORA_E_INVALID_ARG, "train_optim_step: unknown optimizer %d", (int)o->kind);
}
