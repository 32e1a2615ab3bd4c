/* Multi-head scaled dot-product self-attention core (after the q/k/v projections, before
 * the output projection), optional causal mask, with saved probabilities for backward. */
#include <math.h>
#include <string.h>

#include "backend/backend.h"
#include "nn/nn.h"

static lora_status check(struct lora_backend_impl *be, const char *op, int64_t batch, int64_t t,
                         int64_t heads, int64_t d) {
    if (batch < 0 || t <= 0 || heads <= 0 || d <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: bad shape batch=%lld t=%lld heads=%lld d=%lld",
                         op, (long long)batch, (long long)t, (long long)heads, (long long)d);
    return LORA_OK;
}

lora_status nn_attention_forward(struct lora_backend_impl *be, float *out, float *probs,
                                 const float *q, const float *k, const float *v, int64_t batch,
                                 int64_t t, int64_t heads, int64_t d, int causal) {
    LORA_TRY(check(be, "attention forward", batch, t, heads, d));
    int64_t c = heads * d, tt = t * t;
    float scale = (float)(1.0 / sqrt((double)d));
    /* scores: S[b,h] = scale * Q_bh K_bh^T, one strided batch over the heads of a sequence */
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, t, t, d, scale, q + o, c, d, k + o, c, d, 0.0f,
                                          probs + b * heads * tt, t, tt, heads));
    }
    /* row softmax (masked entries are exact zeros) */
    int64_t rows = batch * heads * t;
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (rows * t > 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *s = probs + r * t;
        int64_t i = r % t, lim = causal ? i + 1 : t;
        float mx = s[0];
        for (int64_t j = 1; j < lim; j++) mx = s[j] > mx ? s[j] : mx;
        float sum = 0.0f;
        for (int64_t j = 0; j < lim; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        float inv = 1.0f / sum;
        for (int64_t j = 0; j < lim; j++) s[j] *= inv;
        for (int64_t j = lim; j < t; j++) s[j] = 0.0f;
    }
    /* O_bh = P_bh V_bh, written straight into the [batch, t, heads*d] layout */
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        LORA_TRY(lora_be_gemm_batched_f32(be, 0, 0, t, d, t, 1.0f, probs + b * heads * tt, t, tt,
                                          v + o, c, d, 0.0f, out + o, c, d, heads));
    }
    return LORA_OK;
}

lora_status nn_attention_backward(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                                  float *scratch, const float *dout, const float *probs,
                                  const float *q, const float *k, const float *v, int64_t batch,
                                  int64_t t, int64_t heads, int64_t d) {
    LORA_TRY(check(be, "attention backward", batch, t, heads, d));
    int64_t c = heads * d, tt = t * t;
    float scale = (float)(1.0 / sqrt((double)d));
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        /* dV_bh = P^T dO_bh */
        LORA_TRY(lora_be_gemm_batched_f32(be, 1, 0, t, d, t, 1.0f, probs + b * heads * tt, t, tt,
                                          dout + o, c, d, 0.0f, dv + o, c, d, heads));
        for (int64_t h = 0; h < heads; h++) {
            const float *p = probs + (b * heads + h) * tt;
            const int64_t oh = o + h * d;
            /* dP = dO_bh V_bh^T */
            LORA_TRY(be->iface->gemm_f32(be, 0, 1, t, t, d, 1.0f, dout + oh, c, v + oh, c, 0.0f,
                                         scratch, t));
            /* softmax backward: dS = P * (dP - rowsum(P * dP)); masked P are 0 so dS is too */
            for (int64_t i = 0; i < t; i++) {
                const float *pi = p + i * t;
                float *gi = scratch + i * t;
                float dot = 0.0f;
                for (int64_t j = 0; j < t; j++) dot += pi[j] * gi[j];
                for (int64_t j = 0; j < t; j++) gi[j] = pi[j] * (gi[j] - dot);
            }
            /* S = scale Q K^T: dQ = scale dS K, dK = scale dS^T Q */
            LORA_TRY(be->iface->gemm_f32(be, 0, 0, t, d, t, scale, scratch, t, k + oh, c, 0.0f,
                                         dq + oh, c));
            LORA_TRY(be->iface->gemm_f32(be, 1, 0, t, d, t, scale, scratch, t, q + oh, c, 0.0f,
                                         dk + oh, c));
        }
    }
    return LORA_OK;
}
