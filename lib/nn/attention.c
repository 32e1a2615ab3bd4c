/* Multi-head scaled dot-product self-attention core (after the q/k/v projections, before
 * the output projection), optional causal mask, with saved probabilities for backward.
 * Per sequence the heads run as strided batched GEMMs (a head's columns are d apart in the
 * [t, heads*d] layout), the softmax is the backend's row softmax. */
#include <math.h>

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
    if (batch == 0) return LORA_OK;
    int64_t c = heads * d, tt = t * t;
    float scale = (float)(1.0 / sqrt((double)d));
    /* scores: S[b,h] = scale * Q_bh K_bh^T, one strided batch over the heads of a sequence */
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, t, t, d, scale, q + o, c, d, k + o, c, d, 0.0f,
                                          probs + b * heads * tt, t, tt, heads));
    }
    /* row softmax (masked entries are exact zeros) */
    LORA_TRY(be->iface->softmax_f32(be, batch * heads * t, t, causal != 0, probs));
    /* O_bh = P_bh V_bh, written straight into the [batch, t, heads*d] layout */
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        LORA_TRY(lora_be_gemm_batched_f32(be, 0, 0, t, d, t, 1.0f, probs + b * heads * tt, t, tt,
                                          v + o, c, d, 0.0f, out + o, c, d, heads));
    }
    return LORA_OK;
}

lora_status nn_attention_backward_ex(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                                     float *scratch, int64_t scratch_floats, const float *dout,
                                     const float *probs, const float *q, const float *k,
                                     const float *v, int64_t batch, int64_t t, int64_t heads,
                                     int64_t d) {
    LORA_TRY(check(be, "attention backward", batch, t, heads, d));
    int64_t c = heads * d, tt = t * t;
    if (scratch_floats < tt)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "attention backward: scratch of %lld floats, need %lld",
                         (long long)scratch_floats, (long long)tt);
    /* heads per group: all of them when the scratch holds heads * t * t floats */
    int64_t group = scratch_floats / tt < heads ? 1 : heads;
    float scale = (float)(1.0 / sqrt((double)d));
    for (int64_t b = 0; b < batch; b++) {
        const int64_t o = b * t * c;
        /* dV_bh = P^T dO_bh */
        LORA_TRY(lora_be_gemm_batched_f32(be, 1, 0, t, d, t, 1.0f, probs + b * heads * tt, t, tt,
                                          dout + o, c, d, 0.0f, dv + o, c, d, heads));
        for (int64_t h = 0; h < heads; h += group) {
            const float *p = probs + (b * heads + h) * tt;
            const int64_t oh = o + h * d;
            /* dP = dO_bh V_bh^T */
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, t, t, d, 1.0f, dout + oh, c, d, v + oh, c, d, 0.0f,
                                              scratch, t, tt, group));
            /* softmax backward: dS = P * (dP - rowsum(P * dP)); masked P are 0 so dS is too */
            LORA_TRY(be->iface->softmax_backward_f32(be, group * t, t, p, scratch, scratch));
            /* S = scale Q K^T: dQ = scale dS K, dK = scale dS^T Q */
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 0, t, d, t, scale, scratch, t, tt, k + oh, c, d, 0.0f,
                                              dq + oh, c, d, group));
            LORA_TRY(lora_be_gemm_batched_f32(be, 1, 0, t, d, t, scale, scratch, t, tt, q + oh, c, d, 0.0f,
                                              dk + oh, c, d, group));
        }
    }
    return LORA_OK;
}

lora_status nn_attention_backward(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                                  float *scratch, const float *dout, const float *probs,
                                  const float *q, const float *k, const float *v, int64_t batch,
                                  int64_t t, int64_t heads, int64_t d) {
    if (t <= 0) return check(be, "attention backward", batch, t, heads, d);
    return nn_attention_backward_ex(be, dq, dk, dv, scratch, t * t, dout, probs, q, k, v, batch, t,
                                    heads, d);
}
