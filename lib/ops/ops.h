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
/* merge_file.c: merge_lora.py --sd_model streamed from the model's mapped tensors to
 * `out_path` (.safetensors: tensor by tensor into an atomic temp file; as_ckpt: a torch zip,
 * changed tensors held until the end). Equals ops_cast_model(prec) + ops_merge_into_model +
 * lora_model_save(save_precision = save, 0 = keep) byte for byte. `map`/`map_size` (optional):
 * the input mapping, whose pages are released as tensors are written. Progress
 * LORA_PHASE_MERGE per tensor; cancel or failure leaves neither output nor temp file. */
lora_status ops_merge_file(struct sd_model *sd, const struct lora_network *const *nets, const double *ratios,
                           int64_t n, const char *out_path, lora_dtype prec, lora_dtype save, int as_ckpt,
                           const void *map, uint64_t map_size);
/* w[out * in*kh*kw] (float32) += ratio * alpha/rank * up @ down; tmp holds as many floats;
 * nt threads for the element loop (the result does not depend on it). */
lora_status ops_apply_module(const struct net_module *mm, double ratio, float *w, float *tmp, int nt);
/* The module's factors fit the target (a 4-D 1x1 LoRA fits a Linear). */
int ops_module_fits(const struct net_module *mm, const struct net_target *t);
int ops_is_float(lora_dtype t);
/* float32 -> F32/F16/BF16 (round to nearest even), on nt threads. */
void ops_from_f32(lora_dtype dt, const float *src, int64_t n, void *dst, int nt);
/* merge_lora.py merge_lora_models (FEB rule) when new_rank == 0, else svd_merge_lora.py. */
lora_status ops_merge_networks(lora_ctx *ctx, const struct lora_network *const *nets, const double *ratios,
                               int64_t n, int64_t new_rank, int64_t new_conv_rank, struct lora_network **out);
/* svd_method: OPS_SVD_EXACT (LAPACK sgesdd, economy), OPS_SVD_GRAM (top r eigenpairs of the
 * float64 Gram matrix; see ops_svd_factor) or OPS_SVD_RANDOMIZED (range finder). */
lora_status ops_extract(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                        double clamp_quantile, double min_diff, int32_t svd_method, struct lora_network **out);

/* gpu: 1 cuSOLVER (exact method), 0 CPU, -1 cuSOLVER when the context's backend is CUDA;
 * without a usable device the CPU, with a warning logged. */
lora_status ops_extract_on(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                           double clamp_quantile, double min_diff, int32_t svd_method, int gpu,
                           struct lora_network **out);

#define OPS_SVD_EXACT 0
#define OPS_SVD_RANDOMIZED 1
#define OPS_SVD_GRAM 2           /* exact through the float64 Gram matrix (dsyrk + dsyevr) */
#define OPS_RSVD_OVERSAMPLE 4    /* p: extra columns of the Gaussian test matrix (block l = r + p) */
#define OPS_RSVD_POWER 2         /* q: power iterations (Krylov blocks q + 1) */
/* Rank-r factors of a[m, n] (row-major; may be destroyed by the exact methods, kept by the
 * randomized one): up [m, r] = U_r S_r, down [r, n] = Vh_r. OPS_SVD_EXACT: sgesdd (economy),
 * whose singular-vector signs are LAPACK's, as kohya's torch.linalg.svd gets them (the quantile
 * clamp that follows is not sign-invariant). OPS_SVD_GRAM: the top r eigenpairs of the smaller
 * Gram matrix (A^T A or A A^T) in float64 (dsyrk + dsyevr): about 10x faster on SD shapes,
 * products within ~2e-5 of sgesdd's, other signs; sgesdd when r >= min(m, n) or s_r < 1e-5 s_0.
 * Randomized: block Krylov range finder with a Gaussian test matrix from Philox(seed), blocks of
 * l = r + OPS_RSVD_OVERSAMPLE columns, OPS_RSVD_POWER power steps, every block kept, QR
 * (sgeqrf/sorgqr) re-orthonormalisation, then the exact factors of K^T A [(q+1) l, n]; the
 * exact method when (q+1) l would reach min(m, n). */
lora_status ops_svd_factor(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, int64_t r,
                           int32_t method, uint64_t seed, float *up, float *down);
/* cuSOLVER SVD (lib/backend/cuda_svd.c) on the context's CUDA device: open answers
 * LORA_E_NO_GPU without CUDA or a usable device, with the reason in *why (static) and no
 * error recorded (the caller falls back to the CPU); other failures are recorded.
 * factor: as ops_svd_factor's exact method
 * (a is kept), via cusolverDnSgesvdj. */
struct ops_gpu_svd;
lora_status ops_gpu_svd_open(lora_ctx *ctx, struct ops_gpu_svd **out, const char **why);
lora_status ops_gpu_svd_factor(struct ops_gpu_svd *g, const char *what, const float *a, int64_t m, int64_t n,
                               int64_t r, float *up, float *down);
void ops_gpu_svd_close(struct ops_gpu_svd *g);
lora_status ops_resize(const struct lora_network *net, int64_t new_rank, int32_t method, double param,
                       struct lora_network **out);

#endif
