/* DDPM noise schedule, add_noise, velocity, noise offset (spec/kohya-lora.md §4.4). */
#include <math.h>

#include "train/train.h"

void train_alphas_cumprod(float acp[TRAIN_T]) {
    /* torch.linspace(float32): step in float, first half from the start, second from the end */
    const float start = (float)sqrt(0.00085), end = (float)sqrt(0.012);
    const float step = (end - start) / (float)(TRAIN_T - 1);
    const int64_t half = TRAIN_T / 2;
    double cum = 1.0;
    for (int64_t i = 0; i < TRAIN_T; i++) {
        float s = i < half ? start + step * (float)i : end - step * (float)(TRAIN_T - i - 1);
        float beta = s * s;
        float alpha = 1.0f - beta;
        cum *= (double)alpha;
        acp[i] = (float)cum;
    }
}

static void coefs(const float *acp, int64_t t, float *a, float *b) {
    if (t < 0) t = 0;
    if (t >= TRAIN_T) t = TRAIN_T - 1;
    *a = sqrtf(acp[t]);
    *b = sqrtf(1.0f - acp[t]);
}

void train_add_noise(float *noisy, const float *x0, const float *noise, const int64_t *t,
                     const float *acp, int64_t batch, int64_t per) {
    for (int64_t bi = 0; bi < batch; bi++) {
        float a, b;
        coefs(acp, t[bi], &a, &b);
        for (int64_t i = bi * per; i < (bi + 1) * per; i++) {
            float u = a * x0[i], v = b * noise[i];
            noisy[i] = u + v;
        }
    }
}

void train_velocity(float *vel, const float *x0, const float *noise, const int64_t *t,
                    const float *acp, int64_t batch, int64_t per) {
    for (int64_t bi = 0; bi < batch; bi++) {
        float a, b;
        coefs(acp, t[bi], &a, &b);
        for (int64_t i = bi * per; i < (bi + 1) * per; i++) {
            float u = a * noise[i], v = b * x0[i];
            vel[i] = u - v;
        }
    }
}

void train_noise_offset(float *noise, const float *r, double offset, int64_t batch, int64_t ch,
                        int64_t hw) {
    for (int64_t k = 0; k < batch * ch; k++) {
        float add = (float)offset * r[k];
        for (int64_t i = 0; i < hw; i++) noise[k * hw + i] += add;
    }
}
