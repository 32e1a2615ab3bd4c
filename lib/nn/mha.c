/* Blocked non-causal multi-head attention (U-Net self- and cross-attention, VAE mid-block
 * attention): query blocks against all keys, one [heads, block, tk] score tile at a time, the
 * heads of a block as strided batched GEMMs. The backward recomputes each tile (nothing is
 * saved), so memory stays O(block * tk) however long the sequence. */
#include <math.h>

#include "backend/backend.h"
#include "nn/nn.h"

int64_t nn_mha_scratch_floats(int64_t heads, int64_t tk, int64_t block, int backward) {
    return (backward ? 2 : 1) * heads * tk * block;
}

static lora_status mha_check(struct lora_backend_impl *be, const char *op, int64_t batch, int64_t tq,
                             int64_t tk, int64_t heads, int64_t d, int64_t scratch_floats, int bwd,
                             int64_t *block) {
    if (batch < 0 || tq < 1 || tk < 1 || heads < 1 || d < 1)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: bad shape batch=%lld tq=%lld tk=%lld heads=%lld d=%lld",
                         op, (long long)batch, (long long)tq, (long long)tk, (long long)heads, (long long)d);
    int64_t per_row = (bwd ? 2 : 1) * heads * tk;
    if (scratch_floats < per_row)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: scratch of %lld floats, need at least %lld", op,
                         (long long)scratch_floats, (long long)per_row);
    *block = scratch_floats / per_row;
    if (*block > tq) *block = tq;
    return LORA_OK;
}

lora_status nn_mha_forward(struct lora_backend_impl *be, float *out, const float *q,
                           const float *k, const float *v, int64_t batch, int64_t tq, int64_t tk,
                           int64_t heads, int64_t d, float scale, float *scratch,
                           int64_t scratch_floats) {
    int64_t block = 1;
    LORA_TRY(mha_check(be, "attention", batch, tq, tk, heads, d, scratch_floats, 0, &block));
    if (scale <= 0.0f) scale = (float)(1.0 / sqrt((double)d));
    int64_t c = heads * d;
    for (int64_t b = 0; b < batch; b++) {
        const float *kb = k + b * tk * c, *vb = v + b * tk * c;
        for (int64_t q0 = 0; q0 < tq; q0 += block) {
            int64_t bq = tq - q0 < block ? tq - q0 : block, tile = bq * tk;
            const int64_t o = (b * tq + q0) * c;
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, bq, tk, d, scale, q + o, c, d, kb, c, d, 0.0f,
                                              scratch, tk, tile, heads));
            LORA_TRY(be->iface->softmax_f32(be, heads * bq, tk, 0, scratch));
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 0, bq, d, tk, 1.0f, scratch, tk, tile, vb, c, d, 0.0f,
                                              out + o, c, d, heads));
        }
    }
    return LORA_OK;
}

lora_status nn_mha_backward(struct lora_backend_impl *be, float *dq, float *dk, float *dv,
                            const float *dout, const float *q, const float *k, const float *v,
                            int64_t batch, int64_t tq, int64_t tk, int64_t heads, int64_t d,
                            float scale, float *scratch, int64_t scratch_floats) {
    int64_t block = 1;
    LORA_TRY(mha_check(be, "attention backward", batch, tq, tk, heads, d, scratch_floats, 1, &block));
    if (scale <= 0.0f) scale = (float)(1.0 / sqrt((double)d));
    int64_t c = heads * d;
    float *p = scratch, *dp = scratch + heads * block * tk;
    for (int64_t b = 0; b < batch; b++) {
        const float *kb = k + b * tk * c, *vb = v + b * tk * c;
        float *dkb = dk ? dk + b * tk * c : NULL, *dvb = dv ? dv + b * tk * c : NULL;
        for (int64_t q0 = 0; q0 < tq; q0 += block) {
            int64_t bq = tq - q0 < block ? tq - q0 : block, tile = bq * tk;
            const int64_t o = (b * tq + q0) * c;
            float beta = q0 == 0 ? 0.0f : 1.0f;
            /* recompute P */
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, bq, tk, d, scale, q + o, c, d, kb, c, d, 0.0f,
                                              p, tk, tile, heads));
            LORA_TRY(be->iface->softmax_f32(be, heads * bq, tk, 0, p));
            /* dV += P^T dO */
            if (dvb)
                LORA_TRY(lora_be_gemm_batched_f32(be, 1, 0, tk, d, bq, 1.0f, p, tk, tile, dout + o, c, d, beta,
                                                  dvb, c, d, heads));
            if (!dq && !dkb) continue;
            /* dP = dO V^T, dS = softmax backward */
            LORA_TRY(lora_be_gemm_batched_f32(be, 0, 1, bq, tk, d, 1.0f, dout + o, c, d, vb, c, d, 0.0f,
                                              dp, tk, tile, heads));
            LORA_TRY(be->iface->softmax_backward_f32(be, heads * bq, tk, p, dp, dp));
            /* dQ = scale dS K; dK += scale dS^T Q */
            if (dq)
                LORA_TRY(lora_be_gemm_batched_f32(be, 0, 0, bq, d, tk, scale, dp, tk, tile, kb, c, d, 0.0f,
                                                  dq + o, c, d, heads));
            if (dkb)
                LORA_TRY(lora_be_gemm_batched_f32(be, 1, 0, tk, d, bq, scale, dp, tk, tile, q + o, c, d, beta,
                                                  dkb, c, d, heads));
        }
    }
    return LORA_OK;
}
