/* Elementwise activations of the CLIP MLPs with their derivatives. */
#include <math.h>

#include "backend/backend.h"
#include "nn/nn.h"

#define NN_PAR_MIN 32768
#define QG_K 1.702f
#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

lora_status nn_quick_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i];
        y[i] = xi * (1.0f / (1.0f + expf(-QG_K * xi)));
    }
    return LORA_OK;
}

lora_status nn_quick_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                                   const float *x, int64_t n) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i], s = 1.0f / (1.0f + expf(-QG_K * xi));
        dx[i] = dy[i] * (s + xi * QG_K * s * (1.0f - s));
    }
    return LORA_OK;
}

lora_status nn_gelu_forward(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * INV_SQRT2));
    return LORA_OK;
}

lora_status nn_gelu_backward(struct lora_backend_impl *be, float *dx, const float *dy,
                             const float *x, int64_t n) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i];
        float cdf = 0.5f * (1.0f + erff(xi * INV_SQRT2));
        float pdf = INV_SQRT_2PI * expf(-0.5f * xi * xi);
        dx[i] = dy[i] * (cdf + xi * pdf);
    }
    return LORA_OK;
}
