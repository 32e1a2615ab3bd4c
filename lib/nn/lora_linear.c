/* LoRA adapter on a linear layer: y += scale * up(down(x)) (kohya networks/lora.py). */
#include "backend/backend.h"
#include "nn/nn.h"

float nn_lora_scale(double alpha, int64_t rank, double multiplier) {
    if (rank <= 0) return 0.0f;
    if (!(alpha > 0.0)) alpha = (double)rank;   /* absent / 0 / NaN: alpha = rank, scale 1 */
    return (float)(alpha / (double)rank * multiplier);
}

static lora_status check(struct lora_backend_impl *be, const char *op, const struct nn_lora *l,
                         int64_t n) {
    if (!l || !l->down || !l->up || l->in <= 0 || l->out <= 0 || l->rank <= 0 || n < 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: adapter or shape is invalid", op);
    return LORA_OK;
}

lora_status nn_lora_forward(struct lora_backend_impl *be, const struct nn_lora *l, float *y,
                            float *h, const float *x, int64_t n) {
    LORA_TRY(check(be, "lora forward", l, n));
    if (n == 0) return LORA_OK;
    int64_t in = l->in, out = l->out, r = l->rank;
    LORA_TRY(be->iface->gemm_f32(be, 0, 1, n, r, in, 1.0f, x, in, l->down, in, 0.0f, h, r));
    return be->iface->gemm_f32(be, 0, 1, n, out, r, l->scale, h, r, l->up, r, 1.0f, y, out);
}

lora_status nn_lora_backward(struct lora_backend_impl *be, const struct nn_lora *l, float *dx,
                             float *dh, const float *dy, const float *x, const float *h,
                             int64_t n) {
    LORA_TRY(check(be, "lora backward", l, n));
    if (n == 0) return LORA_OK;
    int64_t in = l->in, out = l->out, r = l->rank;
    if (l->d_up)
        LORA_TRY(be->iface->gemm_f32(be, 1, 0, out, r, n, l->scale, dy, out, h, r, 1.0f, l->d_up, r));
    if (!l->d_down && !dx) return LORA_OK;
    LORA_TRY(be->iface->gemm_f32(be, 0, 0, n, r, out, l->scale, dy, out, l->up, r, 0.0f, dh, r));
    if (l->d_down)
        LORA_TRY(be->iface->gemm_f32(be, 1, 0, r, in, n, 1.0f, dh, r, x, in, 1.0f, l->d_down, in));
    if (dx)
        LORA_TRY(be->iface->gemm_f32(be, 0, 0, n, in, r, 1.0f, dh, r, l->down, in, 1.0f, dx, in));
    return LORA_OK;
}
