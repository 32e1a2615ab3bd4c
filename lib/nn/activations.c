/* Elementwise activations of the CLIP MLPs with their derivatives, on the backend. */
#include "backend/backend.h"
#include "nn/nn.h"

static lora_status check_n(struct lora_backend_impl *be, const char *op, int64_t n) {
    if (n < 0) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: bad length %lld", op, (long long)n);
    return LORA_OK;
}

lora_status nn_quick_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    LORA_TRY(check_n(be, "quick_gelu", n));
    return n ? be->iface->quick_gelu_f32(be, n, x, y) : LORA_OK;
}

lora_status nn_quick_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                   const float *x, int64_t n) {
    LORA_TRY(check_n(be, "quick_gelu backward", n));
    return n ? be->iface->quick_gelu_backward_f32(be, n, x, dy, dx) : LORA_OK;
}

lora_status nn_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    LORA_TRY(check_n(be, "gelu", n));
    return n ? be->iface->gelu_f32(be, n, x, y) : LORA_OK;
}

lora_status nn_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                             const float *x, int64_t n) {
    LORA_TRY(check_n(be, "gelu backward", n));
    return n ? be->iface->gelu_backward_f32(be, n, x, dy, dx) : LORA_OK;
}
