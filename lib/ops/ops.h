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
lora_status ops_extract(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                        double clamp_quantile, double min_diff, struct lora_network **out);
lora_status ops_resize(const struct lora_network *net, int64_t new_rank, int32_t method, double param,
                       struct lora_network **out);

#endif
