/* Linear layer: y = x W^T + b, and its backward; residual add and embedding lookup. Every
 * loop is a backend entry, so the same code runs on host (CPU) and device (CUDA) buffers. */
#include "backend/backend.h"
#include "nn/nn.h"

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
        LORA_TRY(be->iface->add_rows_f32(be, n, out, b, 0.0f, y));
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
    if (db) LORA_TRY(be->iface->col_sum_f32(be, n, out, dy, 1.0f, db));
    return LORA_OK;
}

lora_status nn_residual_add(struct lora_backend_impl *be, float *y, const float *x, int64_t n) {
    if (n < 0) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "residual add: bad length %lld", (long long)n);
    /* 1 * x + 1 * y rounds exactly as y + x */
    return n ? be->iface->axpby_f32(be, n, 1.0f, x, 1.0f, y) : LORA_OK;
}

lora_status nn_embedding_forward(struct lora_backend_impl *be, float *y, const int32_t *ids,
                                 const float *table, const float *pos, int64_t n,
                                 int64_t positions, int64_t vocab, int64_t c) {
    if (n < 0 || c <= 0 || vocab <= 0 || (pos && positions <= 0))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "embedding: bad shape n=%lld c=%lld vocab=%lld",
                         (long long)n, (long long)c, (long long)vocab);
    if (n == 0) return LORA_OK;
    int64_t bad_row = -1;
    int32_t bad_id = 0;
    LORA_TRY(be->iface->embedding_f32(be, n, c, ids, table, pos, positions, vocab, y, &bad_row, &bad_id));
    if (bad_row >= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG,
                         "embedding: token id %ld at position %lld is outside the vocabulary [0, %lld)",
                         (long)bad_id, (long long)bad_row, (long long)vocab);
    return LORA_OK;
}

lora_status nn_embedding_backward(struct lora_backend_impl *be, float *d_table, float *d_pos,
                                  const float *dy, const int32_t *ids, int64_t n,
                                  int64_t positions, int64_t c) {
    if (n < 0 || c <= 0 || (d_pos && positions <= 0))
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "embedding backward: bad shape n=%lld c=%lld",
                         (long long)n, (long long)c);
    if (n == 0 || (!d_table && !d_pos)) return LORA_OK;
    return be->iface->embedding_backward_f32(be, n, c, ids, dy, positions, d_table, d_pos);
}
