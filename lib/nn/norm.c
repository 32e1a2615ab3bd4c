/* LayerNorm over the last dimension (torch.nn.LayerNorm: biased variance, eps inside the
 * square root), forward saving mean and 1/std per row, and its backward. */
#include <math.h>

#include "backend/backend.h"
#include "nn/nn.h"

#define NN_PAR_MIN 32768
#define COL_BLOCK 64        /* columns per task of the parameter-gradient pass */

lora_status nn_layernorm_forward(struct lora_backend_impl *be, float *y, float *mean, float *rstd,
                                 const float *x, const float *gamma, const float *beta,
                                 int64_t n, int64_t c, float eps) {
    if (n < 0 || c <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "layernorm: bad shape n=%lld c=%lld",
                         (long long)n, (long long)c);
    int nt = lora_threads(be->ctx);
#pragma omp parallel for num_threads(nt) if (n * c > NN_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * c;
        double s = 0.0;
        for (int64_t j = 0; j < c; j++) s += xi[j];
        double m = s / (double)c, v = 0.0;
        for (int64_t j = 0; j < c; j++) {
            double dlt = xi[j] - m;
            v += dlt * dlt;
        }
        v /= (double)c;
        float mf = (float)m, rs = (float)(1.0 / sqrt(v + (double)eps));
        float *yi = y + i * c;
        for (int64_t j = 0; j < c; j++) {
            float nrm = (xi[j] - mf) * rs;
            yi[j] = nrm * (gamma ? gamma[j] : 1.0f) + (beta ? beta[j] : 0.0f);
        }
        mean[i] = mf;
        rstd[i] = rs;
    }
    return LORA_OK;
}

lora_status nn_layernorm_backward(struct lora_backend_impl *be, float *dx, float *d_gamma,
                                  float *d_beta, const float *dy, const float *x,
                                  const float *mean, const float *rstd, const float *gamma,
                                  int64_t n, int64_t c, int accumulate) {
    if (n < 0 || c <= 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "layernorm backward: bad shape n=%lld c=%lld",
                         (long long)n, (long long)c);
    int nt = lora_threads(be->ctx);
    if (dx) {
        /* with xh = (x - mean) rstd and g = dy * gamma:
         * dx = rstd * (g - mean(g) - xh * mean(g * xh)) */
#pragma omp parallel for num_threads(nt) if (n * c > NN_PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *xi = x + i * c, *gi = dy + i * c;
            float m = mean[i], rs = rstd[i];
            double sg = 0.0, sgx = 0.0;
            for (int64_t j = 0; j < c; j++) {
                float g = gi[j] * (gamma ? gamma[j] : 1.0f);
                sg += g;
                sgx += (double)g * ((xi[j] - m) * rs);
            }
            float mg = (float)(sg / (double)c), mgx = (float)(sgx / (double)c);
            float *di = dx + i * c;
            for (int64_t j = 0; j < c; j++) {
                float g = gi[j] * (gamma ? gamma[j] : 1.0f);
                float v = rs * (g - mg - (xi[j] - m) * rs * mgx);
                di[j] = accumulate ? di[j] + v : v;
            }
        }
    }
    if (d_gamma || d_beta) {
        int64_t nblk = (c + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for num_threads(nt) if (n * c > NN_PAR_MIN) schedule(static)
        for (int64_t bk = 0; bk < nblk; bk++) {
            int64_t j0 = bk * COL_BLOCK, j1 = j0 + COL_BLOCK < c ? j0 + COL_BLOCK : c;
            for (int64_t i = 0; i < n; i++) {
                const float *xi = x + i * c, *gi = dy + i * c;
                float m = mean[i], rs = rstd[i];
                for (int64_t j = j0; j < j1; j++) {
                    if (d_gamma) d_gamma[j] += gi[j] * ((xi[j] - m) * rs);
                    if (d_beta) d_beta[j] += gi[j];
                }
            }
        }
    }
    return LORA_OK;
}
