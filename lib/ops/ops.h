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
 * streamed entry by entry, one tensor of extra memory). Equals ops_cast_model(prec) + ops_merge_into_model +
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
 * float64 Gram matrix; see ops_svd_factor) or OPS_SVD_RANDOMIZED (block Lanczos). */
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
#define OPS_RSVD_OVERSAMPLE 4    /* p: Krylov blocks of b = (r + p) / 2 columns (rounded up) */
/* ... rounded down to a multiple of OPS_RSVD_TILE when that drops at most p / 2 columns (r = 32,
 * 64, 128: b = 16, 32, 64): OpenBLAS's sgemm fills 16-wide tiles, and b = 34 at r = 64 left a
 * 2-column remainder that cost 13% more CPU for the 264 SD1.5 modules (L 192 instead of 204,
 * worst error ratio over them 1.0062 instead of 1.0061); small r keep their oversampling */
#define OPS_RSVD_TILE 16
#define OPS_RSVD_BLOCK0(r) (((r) + OPS_RSVD_OVERSAMPLE + 1) / 2)
#define OPS_RSVD_POWER 5         /* q: power steps (Krylov blocks q + 1, L = (q + 1) b ~ 3 (r + p)) */
/* max(m, n) >= OPS_RSVD_LONG_ASPECT min(m, n) and m n >= OPS_RSVD_LONG_NUMEL: blocks of 2b,
 * OPS_RSVD_POWER_LONG steps, the same L: half the passes over these large matrices save memory
 * traffic. Their spectra are less flat (within 0.65% of exact on random deltas); the smaller
 * long ones (2560 x 320, 320 x 1280, 640 x 2560) take the square plan, as cheap there and more
 * accurate (0.4% instead of 0.7%). */
#define OPS_RSVD_LONG_ASPECT 4
#define OPS_RSVD_LONG_NUMEL (2048 * 1024)
#define OPS_RSVD_POWER_LONG 2
#define OPS_RSVD_BLOCK(r)                                                                                    \
    (OPS_RSVD_BLOCK0(r) > OPS_RSVD_TILE && OPS_RSVD_BLOCK0(r) % OPS_RSVD_TILE <= OPS_RSVD_OVERSAMPLE / 2     \
         ? OPS_RSVD_BLOCK0(r) / OPS_RSVD_TILE * OPS_RSVD_TILE                                                \
         : OPS_RSVD_BLOCK0(r))
#define OPS_RSVD_SPAN(r) (OPS_RSVD_BLOCK(r) * (OPS_RSVD_POWER + 1))   /* L; exact SVD when >= min(m, n) */
/* Rank-r factors of a[m, n] (row-major; may be destroyed by the exact methods, kept by the
 * randomized one): up [m, r] = U_r S_r, down [r, n] = Vh_r. OPS_SVD_EXACT: sgesdd (economy),
 * whose singular-vector signs are LAPACK's, as kohya's torch.linalg.svd gets them (the quantile
 * clamp that follows is not sign-invariant). OPS_SVD_GRAM: the top r eigenpairs of the smaller
 * Gram matrix (A^T A or A A^T) in float64 (dsyrk + dsyevr): about 10x faster on SD shapes,
 * products within ~2e-5 of sgesdd's, other signs; sgesdd when r >= min(m, n) or s_r < 1e-5 s_0.
 * Randomized: block Lanczos (block Krylov with full reorthogonalisation) from a random-sign test
 * matrix from Philox(seed), deterministic for a seed: blocks of b columns, OPS_RSVD_POWER power
 * steps (long shapes: 2b and OPS_RSVD_POWER_LONG), CholeskyQR (float64 Gram) for the
 * tall-skinny orthonormalisations, the products A^T Q_i of the iteration reused as the rows of
 * B = K^T A, B's top r triplets from its float64 Gram (dsytrd + dstedc + dormtr for r vectors);
 * 2q + 2 passes of b columns over A. Householder QR (sgeqrf/sorgqr) and an explicit B when a
 * block is rank-deficient; the exact method (sgesdd) when L >= min(m, n). */
lora_status ops_svd_factor(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, int64_t r,
                           int32_t method, uint64_t seed, float *up, float *down);
/* One ops_svd_factor call of ops_svd_factor_many. */
struct ops_svd_job {
    const char *what;
    float *a;                /* [m, n], may be destroyed as in ops_svd_factor */
    int64_t m, n, r;
    uint64_t seed;
    float *up, *down;        /* [m, r], [r, n] */
};
/* ops_svd_factor on each job, on up to nt threads: with OPS_SVD_RANDOMIZED the jobs of at most
 * 4096 x 4096 elements run side by side (one per thread, single-threaded BLAS, largest first), the larger ones
 * and the fallbacks one after the other with nt-thread BLAS, all in one workspace allocation;
 * which path a job takes depends on its shape and nt only, so its factors on its seed and nt
 * (the BLAS thread count can change the last bits). Stops at the first failure. */
lora_status ops_svd_factor_many(lora_ctx *ctx, const struct ops_svd_job *jobs, int64_t n, int32_t method, int nt);
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
