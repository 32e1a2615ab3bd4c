/* LayerNorm over the last dimension (torch.nn.LayerNorm: biased variance, eps inside the
 * square root), forward saving mean and 1/std per row, and its backward; the loops are the
 * backend's layernorm entries. */
#include "backend/backend.h"
#include "nn/nn.h"

lora_status nn_layernorm_forward(struct lora_backend_impl *be, float *y, float *mean, float *rstd,
                                 const float *x, const float *gamma, const float *beta,
                                 int64_t n, int64_t c, float eps) {
    if (n < 0 || c <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "layernorm: bad shape n=%lld c=%lld",
                         (long long)n, (long long)c);
    if (n == 0) return LORA_OK;
    return be->iface->layernorm_f32(be, n, c, eps, x, gamma, beta, y, mean, rstd);
}

lora_status nn_layernorm_backward(struct lora_backend_impl *be, float *dx, float *d_gamma,
                                  float *d_beta, const float *dy, const float *x,
                                  const float *mean, const float *rstd, const float *gamma,
                                  int64_t n, int64_t c, int accumulate) {
    if (n < 0 || c <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "layernorm backward: bad shape n=%lld c=%lld",
                         (long long)n, (long long)c);
    if (n == 0 || (!dx && !d_gamma && !d_beta)) return LORA_OK;
    return be->iface->layernorm_backward_f32(be, n, c, dy, x, mean, rstd, gamma, dx, d_gamma, d_beta,
                                             accumulate != 0);
}
