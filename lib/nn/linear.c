/* Linear layer: y = x W^T + b, and its backward. */
#include <string.h>

#include "backend/backend.h"
#include "nn/nn.h"

#define NN_PAR_MIN 32768   /* elements below which a parallel loop costs more than it saves */

static lora_status check_dims(struct lora_backend_impl *be, const char *op, int64_t n, int64_t in,
                              int64_t out) {
    if (n < 0 || in <= 0 || out <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "%s: bad shape n=%lld in=%lld out=%lld", op,
                         (long long)n, (long long)in, (long long)out);
    return LORA_OK;
}

lora_status nn_linear_forward(struct lora_backend_impl *be, float *y, const float *x,
                              const float *w, const float *b, int64_t n, int64_t in, int64_t out) {
    LORA_TRY(check_dims(be, "linear forward", n, in, out));
    if (n == 0) return LORA_OK;
    float beta = 0.0f;
    if (b) {   /* start from the bias, then one GEMM accumulates x W^T onto it */
        int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * out > NN_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) memcpy(y + i * out, b, (size_t)out * sizeof(float));
        beta = 1.0f;
    }
    return be->iface->gemm_f32(be, 0, 1, n, out, in, 1.0f, x, in, w, in, beta, y, out);
}

lora_status nn_linear_backward(struct lora_backend_impl *be, float *dx, float *dw, float *db,
                               const float *dy, const float *x, const float *w, int64_t n,
                               int64_t in, int64_t out, int accumulate) {
    LORA_TRY(check_dims(be, "linear backward", n, in, out));
    if (n == 0) {
        return LORA_OK;   /* nothing flows; dx has no rows */
    }
    if (dx)
        LORA_TRY(be->iface->gemm_f32(be, 0, 0, n, in, out, 1.0f, dy, out, w, in,
                                     accumulate ? 1.0f : 0.0f, dx, in));
    if (dw)
        LORA_TRY(be->iface->gemm_f32(be, 1, 0, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in));
    if (db) {
        int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * out > NN_PAR_MIN) schedule(static)
        for (int64_t j = 0; j < out; j++) {
            double s = 0.0;
            for (int64_t i = 0; i < n; i++) s += dy[i * out + j];
            db[j] += (float)s;
        }
    }
    return LORA_OK;
}

lora_status nn_residual_add(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
    return LORA_OK;
}

lora_status nn_embedding_forward(struct lora_backend_impl *be, float *y, const int32_t *ids,
                                 const float *table, const float *pos, int64_t n,
                                 int64_t positions, int64_t vocab, int64_t c) {
    if (n < 0 || c <= 0 || vocab <= 0 || (pos && positions <= 0))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "embedding: bad shape n=%lld c=%lld vocab=%lld",
                         (long long)n, (long long)c, (long long)vocab);
    for (int64_t i = 0; i < n; i++)   /* validate before touching any row */
        if (ids[i] < 0 || ids[i] >= vocab)
            return lora_fail(be->ctx, LORA_E_INVALID_ARG,
                             "embedding: token id %ld at position %lld is outside the vocabulary [0, %lld)",
                             (long)ids[i], (long long)i, (long long)vocab);
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * c > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *e = table + (int64_t)ids[i] * c;
        float *yi = y + i * c;
        if (pos) {
            const float *p = pos + (i % positions) * c;
            for (int64_t j = 0; j < c; j++) yi[j] = e[j] + p[j];
        } else {
            memcpy(yi, e, (size_t)c * sizeof(float));
        }
    }
    return LORA_OK;
}

lora_status nn_embedding_backward(struct lora_backend_impl *be, float *d_table, float *d_pos,
                                  const float *dy, const int32_t *ids, int64_t n,
                                  int64_t positions, int64_t c) {
    (void)be;
    /* serial: several rows may share an id (or a position) */
    for (int64_t i = 0; i < n; i++) {
        const float *g = dy + i * c;
        if (d_table) {
            float *d = d_table + (int64_t)ids[i] * c;
            for (int64_t j = 0; j < c; j++) d[j] += g[j];
        }
        if (d_pos) {
            float *d = d_pos + (i % positions) * c;
            for (int64_t j = 0; j < c; j++) d[j] += g[j];
        }
    }
    return LORA_OK;
}
