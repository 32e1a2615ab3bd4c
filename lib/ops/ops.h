/* Merge, extract and resize (kohya sd-scripts networks/merge_lora.py, svd_merge_lora.py,
 * extract_lora_from_models.py, resize_lora.py @ 75d1883d; spec/kohya-lora.md §6, §7). */
#ifndef LORA_OPS_OPS_H
#define LORA_OPS_OPS_H

#include "network/network.h"

/* Casts every F16/BF16 tensor of the text encoder and U-Net to `dt` (F32, F16 or BF16), as
 * kohya's text_encoder.to(merge_dtype) / unet.to(merge_dtype). */
lora_status ops_cast_model(struct sd_model *m, lora_dtype dt);
/* merge_lora.py merge_to_sd_model: each network in order with its ratio. */
lora_status ops_merge_into_model(struct sd_model *m, const struct lora_network *const *nets, const double *ratios,
                                 int64_t n);
/* merge_lora.py merge_lora_models (FEB rule) when new_rank == 0, else svd_merge_lora.py. */
lora_status ops_merge_networks(lora_ctx *ctx, const struct lora_network *const *nets, const double *ratios,
                               int64_t n, int64_t new_rank, int64_t new_conv_rank, struct lora_network **out);
/* svd_method: OPS_SVD_EXACT (LAPACK sgesdd, economy) or OPS_SVD_RANDOMIZED (range finder). */
lora_status ops_extract(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                        double clamp_quantile, double min_diff, int32_t svd_method, struct lora_network **out);

#define OPS_SVD_EXACT 0
#define OPS_SVD_RANDOMIZED 1
#define OPS_RSVD_OVERSAMPLE 10   /* p: extra columns of the Gaussian test matrix */
#define OPS_RSVD_POWER 2         /* q: power iterations */
/* Rank-r factors of a[m, n] (row-major; destroyed by the exact method, kept by the randomized
 * one): up [m, r] = U_r S_r, down [r, n] = Vh_r. Randomized: Halko-Martinsson-Tropp with a
 * Gaussian test matrix from Philox(seed), l = r + OPS_RSVD_OVERSAMPLE, OPS_RSVD_POWER power
 * iterations with QR (sgeqrf/sorgqr) re-orthonormalisation, then sgesdd of Q^T A [l, n];
 * exact when l would reach min(m, n). */
lora_status ops_svd_factor(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, int64_t r,
                           int32_t method, uint64_t seed, float *up, float *down);
lora_status ops_resize(const struct lora_network *net, int64_t new_rank, int32_t method, double param,
                       struct lora_network **out);

#endif
