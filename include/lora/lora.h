/*
 * liblora: train, merge, extract and apply LoRA networks for Stable Diffusion v1/v2.
 *
 * This header is the whole public interface and its documentation. Every function block
 * states its parameters, ownership, thread rules, errors and the version it was added in.
 *
 * ---------------------------------------------------------------------------------------
 * ABI RULES
 *   - Handles are opaque. Objects are created through an out-parameter (`T **out`), which is
 *     set to NULL on failure. Every fallible function returns an `lora_status` (int32_t);
 *     LORA_OK is 0. Status numbers are pinned: never renumbered, only appended.
 *   - No C enums, structs, bool or varargs appear in signatures; enumerations are int32_t
 *     with named constants of pinned value.
 *   - Pass LORA_ABI_VERSION to lora_ctx_create(); a library with a different ABI refuses with
 *     LORA_E_ABI_MISMATCH instead of misbehaving later.
 *
 * THREADS
 *   Distinct contexts may be used from different threads at once. A context and everything
 *   created from it must be used by one thread at a time; an overlapping call is detected and
 *   returns LORA_E_BUSY. The only exception is lora_ctx_cancel(), which any thread may call
 *   at any time. Callbacks run on the thread that made the call, never on worker threads.
 *   Functions that take no context (versions, status names, parameter key lookup) are
 *   thread-safe everywhere.
 *
 * OWNERSHIP
 *   Input strings and arrays are copied; the caller keeps ownership of what it passes in.
 *   Returned `const char *` values are borrowed: static strings live forever; per-context
 *   strings (lora_errmsg) stay valid until the next call on that context. Every `_free`
 *   function accepts NULL. Memory the library allocates is freed only by the library.
 *
 * ERRORS
 *   On failure the context records the status and a message naming the file, tensor, key or
 *   byte offset that is wrong; read it with lora_errmsg() or lora_errmsg_copy(). The library
 *   never calls exit() or abort(), never prints to stdout, and never longjmps across this
 *   interface.
 * ---------------------------------------------------------------------------------------
 */
#ifndef LORA_LORA_H
#define LORA_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "lora_version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && !defined(LORA_STATIC)
#  ifdef LORA_BUILDING
#    define LORA_API __declspec(dllexport)
#  else
#    define LORA_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__) || defined(__clang__)
#  define LORA_API __attribute__((visibility("default")))
#else
#  define LORA_API
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define LORA_DEPRECATED(msg) __attribute__((deprecated(msg)))
#elif defined(_MSC_VER)
#  define LORA_DEPRECATED(msg) __declspec(deprecated(msg))
#else
#  define LORA_DEPRECATED(msg)
#endif

/* ======================================================================================
 * Status codes. Grouped by hundreds: 1-99 generic, 100-199 I/O, 200-299 safetensors,
 * 300-399 pickle checkpoints, 400-499 data and configuration, 500-599 model semantics,
 * 600-699 training, 700-799 GPU. `code / 100` is the category. Pinned forever.
 * ====================================================================================== */
typedef int32_t lora_status;

#define LORA_OK                        0
/* generic */
#define LORA_E_INVALID_ARG             1   /* NULL handle, bad pointer, wrong key type */
#define LORA_E_NOMEM                   2   /* allocation failed */
#define LORA_E_LIMIT                   3   /* a resource cap was hit (rank, count, size) */
#define LORA_E_BUSY                    4   /* the context is in use by another call */
#define LORA_E_CANCELLED               5   /* cancelled by lora_ctx_cancel or a callback */
#define LORA_E_INTERNAL                6   /* a bug in liblora: please report it */
#define LORA_E_UNSUPPORTED             7   /* valid request this build cannot do */
#define LORA_E_ABI_MISMATCH            8   /* header and library ABI versions differ */
#define LORA_E_UNKNOWN_KEY             9   /* parameter name or number not known */
/* I/O */
#define LORA_E_IO                    100   /* read/write/open/fsync failed */
#define LORA_E_NOSPACE               101   /* disk full (ENOSPC, EDQUOT) */
#define LORA_E_DEST_BUSY             102   /* destination cannot be replaced now */
#define LORA_E_NOT_FOUND             103   /* file or folder does not exist */
#define LORA_E_NOT_A_MODEL           104   /* file is something else (LFS pointer, HTML, ...) */
/* safetensors (1:1 with the reference reader's errors, plus duplicates) */
#define LORA_E_ST_HEADER_TOO_SMALL   200   /* file shorter than the 8-byte length */
#define LORA_E_ST_HEADER_TOO_LARGE   201   /* header length above 100,000,000 bytes */
#define LORA_E_ST_HEADER_LENGTH      202   /* header length runs past the end of file */
#define LORA_E_ST_HEADER_UTF8        203   /* header is not valid UTF-8 */
#define LORA_E_ST_HEADER_JSON        204   /* header is not the expected JSON */
#define LORA_E_ST_DUPLICATE_KEY      205   /* a key appears twice at some level */
#define LORA_E_ST_METADATA_TYPE      206   /* __metadata__ is not a str->str map */
#define LORA_E_ST_DTYPE              207   /* unknown dtype string */
#define LORA_E_ST_SHAPE_OVERFLOW     208   /* shape product or byte size overflows */
#define LORA_E_ST_SIZE_MISMATCH      209   /* data_offsets span != shape * dtype size */
#define LORA_E_ST_OFFSETS            210   /* offsets overlap, leave a gap or go backwards */
#define LORA_E_ST_INCOMPLETE         211   /* data does not end exactly at end of file */
#define LORA_E_ST_SUBBYTE            212   /* sub-byte dtype does not fill whole bytes */
/* pickle checkpoints (.ckpt/.pt/.bin) */
#define LORA_E_CKPT_ZIP_CORRUPT      300
#define LORA_E_CKPT_ZIP_ENTRY        301
#define LORA_E_CKPT_ZIP_COMPRESSED   302
#define LORA_E_CKPT_ZIP_OVERLAP      303
#define LORA_E_CKPT_PICKLE_OPCODE    304
#define LORA_E_CKPT_PICKLE_STRUCT    305
#define LORA_E_CKPT_UNSAFE_GLOBAL    306
#define LORA_E_CKPT_STORAGE_SIZE     307
#define LORA_E_CKPT_NO_TENSORS       308
#define LORA_E_UNSUPPORTED_LAYOUT    309
/* data and configuration */
#define LORA_E_IMG_DECODE            400
#define LORA_E_IMG_TOO_LARGE         401
#define LORA_E_IMG_UNSUPPORTED       402
#define LORA_E_CAPTION_ENCODING      403
#define LORA_E_CAPTION_TOO_LONG      404
#define LORA_E_CONFIG_RANGE          405   /* a parameter value is out of range or malformed */
/* model semantics */
#define LORA_E_NO_MATCHING_KEYS      500
#define LORA_E_SHAPE_MISMATCH        501
#define LORA_E_NONFINITE_INPUT       502
#define LORA_E_NONFINITE_WEIGHTS     503
#define LORA_E_NONFINITE_LATENT      504
/* training */
#define LORA_E_NAN_LOSS              600
#define LORA_E_RESUME_MISMATCH       601
/* GPU */
#define LORA_E_NO_GPU                700   /* CUDA not compiled in, no device, or not usable */
#define LORA_E_DRIVER                701   /* driver too old for this build's CUDA runtime */
#define LORA_E_GPU_OOM               702   /* device allocation failed (recoverable) */
#define LORA_E_GPU_FATAL             703   /* sticky CUDA error: restart the process */

/* ======================================================================================
 * Versions and build facts. Thread-safe, no context needed.
 * ====================================================================================== */

/* Library version as MAJOR*10000 + MINOR*100 + PATCH (same form as LORA_VERSION_NUMBER).
 * Since 0.1.0. */
LORA_API uint32_t lora_version(void);

/* Library version as a static string such as "0.1.0". Never NULL. Since 0.1.0. */
LORA_API const char *lora_version_string(void);

/* ABI version of the library (the soname major, liblora.so.N). Compare with
 * LORA_ABI_VERSION from the header you compiled against. Since 0.1.0. */
LORA_API uint32_t lora_abi_version(void);

/* Static, space-separated description of what this build contains, for bug reports, e.g.
 * "cpu blas=openblas openmp cuda=13.0 sm_90". Never NULL. Since 0.1.0. */
LORA_API const char *lora_build_features(void);

/* Backends. */
typedef int32_t lora_backend;
#define LORA_BACKEND_AUTO 0   /* CUDA when usable, else CPU */
#define LORA_BACKEND_CPU  1   /* fp32 reference backend: BLAS + OpenMP */
#define LORA_BACKEND_CUDA 2   /* cuBLAS/cuBLASLt and liblora's kernels */

/* Returns 1 when `backend` is compiled in AND usable now (for CUDA: a device answers and the
 * driver is new enough), else 0. Probes CUDA once per process (thread-safe one-time init);
 * never fails, never prints. Since 0.1.0. */
LORA_API int32_t lora_backend_available(lora_backend backend);

/* ======================================================================================
 * Status names and messages.
 * ====================================================================================== */

/* Static name of a status, e.g. "LORA_E_ST_OFFSETS"; "LORA_E_UNKNOWN_STATUS" for numbers
 * this version does not know. Never NULL. Thread-safe. Since 0.1.0. */
LORA_API const char *lora_status_name(lora_status s);

/* Static one-sentence English description of a status. Never NULL. Thread-safe.
 * Since 0.1.0. */
LORA_API const char *lora_status_string(lora_status s);

typedef struct lora_ctx lora_ctx;

/* Status of the last failed call on `ctx` (LORA_OK when the last call succeeded).
 * Returns LORA_E_INVALID_ARG for a NULL context. Since 0.1.0. */
LORA_API lora_status lora_errcode(const lora_ctx *ctx);

/* Detailed message of the last failed call on `ctx`: names the file, tensor, key or byte
 * offset. Borrowed: valid until the next call on `ctx`. "" after a successful call;
 * "no context" for NULL. Since 0.1.0. */
LORA_API const char *lora_errmsg(const lora_ctx *ctx);

/* Copies the last message into `buf` (NUL-terminated, truncated to `cap`) and returns the
 * size needed including the NUL. `buf` may be NULL when `cap` is 0 (size query). May be
 * called from another thread than the one using `ctx` as long as no call on `ctx` runs at
 * that moment. Since 0.1.0. */
LORA_API size_t lora_errmsg_copy(const lora_ctx *ctx, char *buf, size_t cap);

/* ======================================================================================
 * Callbacks and hooks (per context).
 * ====================================================================================== */
typedef int32_t lora_log_level;
#define LORA_LOG_DEBUG 0
#define LORA_LOG_INFO  1
#define LORA_LOG_WARN  2
#define LORA_LOG_ERROR 3

typedef int32_t lora_phase;
#define LORA_PHASE_LOAD          1
#define LORA_PHASE_CACHE_LATENTS 2
#define LORA_PHASE_TRAIN_STEP    3
#define LORA_PHASE_SAVE          4
#define LORA_PHASE_SAMPLE_STEP   5
#define LORA_PHASE_DECODE        6
#define LORA_PHASE_MERGE         7
#define LORA_PHASE_EXTRACT       8

/* Log sink: `message` is a NUL-terminated UTF-8 line without trailing newline, borrowed for
 * the duration of the call. Called on the thread that made the library call. */
typedef void (*lora_log_fn)(void *user, lora_log_level level, const char *message);

/* Progress: `value` is the loss for LORA_PHASE_TRAIN_STEP, else NaN. Return non-zero to
 * cancel; the running call then returns LORA_E_CANCELLED at its next safe point.
 * Must not call back into the same context. */
typedef int32_t (*lora_progress_fn)(void *user, lora_phase phase, int64_t done, int64_t total,
                                    double value);

/* Allocator hooks: `alignment` is a power of two >= sizeof(void *). Return NULL on failure.
 * `free` receives exactly the pointers `alloc` returned (never NULL). */
typedef void *(*lora_alloc_fn)(void *user, size_t size, size_t alignment);
typedef void  (*lora_free_fn)(void *user, void *ptr);

/* ======================================================================================
 * Context.
 * ====================================================================================== */

/* Creates a context. Pass LORA_ABI_VERSION as `abi_version`: if it differs from the
 * library's, returns LORA_E_ABI_MISMATCH (and *out = NULL): the program was compiled against
 * an incompatible header. Defaults: backend AUTO resolved to CPU until lora_ctx_set_backend
 * is called, threads = number of online CPUs, no log, no progress, malloc-based allocator.
 * Errors: LORA_E_INVALID_ARG (out NULL), LORA_E_ABI_MISMATCH, LORA_E_NOMEM.
 * Ownership: free with lora_ctx_free. Since 0.1.0. */
LORA_API lora_status lora_ctx_create(uint32_t abi_version, lora_ctx **out);

/* Frees the context and its backend resources. NULL is a no-op. Objects created from the
 * context keep it alive until they are freed. Since 0.1.0. */
LORA_API void lora_ctx_free(lora_ctx *ctx);

/* Replaces the host allocator for all later allocations of this context. Only allowed
 * before any allocation through the context's hooks (right after create): otherwise
 * LORA_E_INVALID_ARG. Both `alloc_fn` and `free_fn` NULL restores the default. One NULL and
 * one non-NULL is LORA_E_INVALID_ARG. Since 0.1.0. */
LORA_API lora_status lora_ctx_set_allocator(lora_ctx *ctx, lora_alloc_fn alloc_fn,
                                            lora_free_fn free_fn, void *user);

/* Chooses the compute backend and device index (0-based; ignored for CPU).
 * LORA_BACKEND_AUTO picks CUDA device 0 when usable, else CPU, and succeeds.
 * LORA_BACKEND_CUDA when CUDA is not compiled in or no device answers: LORA_E_NO_GPU (the
 * message says which); a driver older than the runtime: LORA_E_DRIVER; a device index out of
 * range: LORA_E_INVALID_ARG. On failure the previous backend stays. Since 0.1.0. */
LORA_API lora_status lora_ctx_set_backend(lora_ctx *ctx, lora_backend backend, int32_t device);

/* The backend in use (LORA_BACKEND_CPU or LORA_BACKEND_CUDA), or -1 for NULL.
 * Since 0.1.0. */
LORA_API lora_backend lora_ctx_get_backend(const lora_ctx *ctx);

/* Sets the number of CPU threads used by this context's CPU work (1..1024; 0 = number of
 * online CPUs). Applied per call (OpenMP num_threads clauses; for BLAS built with OpenMP, the
 * calling thread's OpenMP thread count is set for the call and restored after it), so other
 * contexts and the host's own OpenMP use are not changed. With the pthread build of OpenBLAS
 * the BLAS thread count stays process-wide (OPENBLAS_NUM_THREADS) and liblora leaves it
 * alone. Errors: LORA_E_CONFIG_RANGE. Since 0.1.0. */
LORA_API lora_status lora_ctx_set_threads(lora_ctx *ctx, int32_t n_threads);

/* Registers the log sink; messages below `min_level` are not formatted. fn NULL turns
 * logging off (the default: the library is silent). Since 0.1.0. */
LORA_API void lora_ctx_set_log(lora_ctx *ctx, lora_log_fn fn, void *user,
                               lora_log_level min_level);

/* Registers the progress callback (NULL = none). Since 0.1.0. */
LORA_API void lora_ctx_set_progress(lora_ctx *ctx, lora_progress_fn fn, void *user);

/* Requests cancellation of the call running on `ctx`, from any thread, at any time
 * (async-signal-safe: one atomic store). The running call returns LORA_E_CANCELLED at its
 * next safe point; the request is cleared when the next call starts. NULL is a no-op.
 * Since 0.1.0. */
LORA_API void lora_ctx_cancel(lora_ctx *ctx);

/* Memory accounting of the context. Any out pointer may be NULL.
 * host_bytes: bytes currently allocated through the context's host allocator;
 * host_peak: the highest value host_bytes reached; device_bytes / device_free: bytes held by
 * the context on its CUDA device and free on the device (0 when the backend is CPU).
 * Since 0.1.0. */
LORA_API lora_status lora_ctx_memory(const lora_ctx *ctx, uint64_t *host_bytes,
                                     uint64_t *host_peak, uint64_t *device_bytes,
                                     uint64_t *device_free);

/* ======================================================================================
 * Parameter bags. Keys are pinned numbers whose names are kohya sd-scripts flag names
 * (without "--"). Ranges: 1000 load, 2000 network, 3000 training, 4000 generation,
 * 5000 merge/extract, 6000 save. Keys are never renumbered; new keys are a minor release.
 * A bag belongs to the context that created it (same thread rules).
 * ====================================================================================== */
typedef struct lora_params lora_params;
typedef int32_t lora_param;
typedef int32_t lora_param_type;
#define LORA_PARAM_INT    1
#define LORA_PARAM_FLOAT  2
#define LORA_PARAM_STRING 3

/* load */
#define LORA_P_PRETRAINED_MODEL_NAME_OR_PATH 1001 /* string, "" */
#define LORA_P_V2                            1002 /* int 0/1, 0 */
#define LORA_P_V_PARAMETERIZATION            1003 /* int 0/1, 0 */
/* network */
#define LORA_P_NETWORK_DIM                   2001 /* int 1..4096, 4 (kohya: None -> 4) */
#define LORA_P_NETWORK_ALPHA                 2002 /* float 0..65536, 1 (0 = same as dim) */
#define LORA_P_NETWORK_MODULE                2003 /* string "networks.lora" */
#define LORA_P_NETWORK_WEIGHTS               2004 /* string path, "" */
#define LORA_P_NETWORK_TRAIN_UNET_ONLY       2005 /* int 0/1, 0 */
#define LORA_P_NETWORK_TRAIN_TEXT_ENCODER_ONLY 2006 /* int 0/1, 0 */
#define LORA_P_CONV_DIM                      2007 /* int 0..4096, 0 = no conv 3x3 LoRA */
#define LORA_P_CONV_ALPHA                    2008 /* float 0..65536, 1 */
/* training */
#define LORA_P_LEARNING_RATE                 3001 /* float 0..10, 2e-6 (kohya's default) */
#define LORA_P_UNET_LR                       3002 /* float 0..10, 0 = use learning_rate */
#define LORA_P_TEXT_ENCODER_LR               3003 /* float 0..10, 0 = use learning_rate */
#define LORA_P_RESOLUTION                    3004 /* string "W" or "W,H", multiples of 64, "512" */
#define LORA_P_TRAIN_BATCH_SIZE              3005 /* int 1..1024, 1 */
#define LORA_P_MAX_TRAIN_STEPS               3006 /* int 1..2^31-1, 1600 */
#define LORA_P_MAX_TRAIN_EPOCHS              3007 /* int 0..1e6, 0 = not set */
#define LORA_P_SEED                          3008 /* int -1..2^32-1, -1 = not set */
#define LORA_P_MIXED_PRECISION               3009 /* string no|fp16|bf16, "no" */
#define LORA_P_GRADIENT_ACCUMULATION_STEPS   3010 /* int 1..4096, 1 */
#define LORA_P_GRADIENT_CHECKPOINTING        3011 /* int 0/1, 0 */
#define LORA_P_LR_SCHEDULER                  3012 /* string, "constant" */
#define LORA_P_LR_WARMUP_STEPS               3013 /* int 0.., 0 */
#define LORA_P_LR_SCHEDULER_NUM_CYCLES       3014 /* int 1..1e6, 1 */
#define LORA_P_LR_SCHEDULER_POWER            3015 /* float 0..100, 1 */
#define LORA_P_OPTIMIZER_TYPE                3016 /* string, "AdamW" */
#define LORA_P_MAX_GRAD_NORM                 3017 /* float 0..1e6, 1 (0 = no clipping) */
#define LORA_P_CLIP_SKIP                     3018 /* int 1..12, 1 */
#define LORA_P_MAX_TOKEN_LENGTH              3019 /* int 75|150|225, 75 */
#define LORA_P_NOISE_OFFSET                  3020 /* float 0..1, 0 */
#define LORA_P_MIN_SNR_GAMMA                 3021 /* float 0..1000, 0 = off */
#define LORA_P_TRAIN_DATA_DIR                3022 /* string path, "" */
#define LORA_P_REG_DATA_DIR                  3023 /* string path, "" */
#define LORA_P_CAPTION_EXTENSION             3024 /* string, ".caption" */
#define LORA_P_SHUFFLE_CAPTION               3025 /* int 0/1, 0 */
#define LORA_P_KEEP_TOKENS                   3026 /* int 0..1000, 0 */
#define LORA_P_ENABLE_BUCKET                 3027 /* int 0/1, 0 */
#define LORA_P_MIN_BUCKET_RESO               3028 /* int 64..8192, 256 */
#define LORA_P_MAX_BUCKET_RESO               3029 /* int 64..8192, 1024 */
#define LORA_P_BUCKET_RESO_STEPS             3030 /* int 8..1024, 64 */
#define LORA_P_BUCKET_NO_UPSCALE             3031 /* int 0/1, 0 */
#define LORA_P_CACHE_LATENTS                 3032 /* int 0/1, 0 */
#define LORA_P_FLIP_AUG                      3033 /* int 0/1, 0 */
#define LORA_P_COLOR_AUG                     3034 /* int 0/1, 0 */
#define LORA_P_RANDOM_CROP                   3035 /* int 0/1, 0 */
#define LORA_P_PRIOR_LOSS_WEIGHT             3036 /* float 0..1000, 1 */
#define LORA_P_CAPTION_DROPOUT_RATE          3037 /* float 0..1, 0 */
#define LORA_P_SAVE_EVERY_N_EPOCHS           3038 /* int 0..1e6, 0 = only at the end */
#define LORA_P_OUTPUT_DIR                    3039 /* string path, "" */
#define LORA_P_OUTPUT_NAME                   3040 /* string, "" (files "last", "epoch-N") */
#define LORA_P_SAVE_STATE                    3041 /* int 0/1, 0 */
#define LORA_P_RESUME                        3042 /* string path, "" */
/* generation: gen_img_diffusers.py's flags (seed is LORA_P_SEED: -1 = random; clip_skip is
 * LORA_P_CLIP_SKIP). Since 0.2.0. */
#define LORA_P_PROMPT                        4001 /* string, "" */
#define LORA_P_NEGATIVE_PROMPT               4002 /* string, "" (kohya's --n) */
#define LORA_P_STEPS                         4003 /* int 1..1000, 50 */
#define LORA_P_SCALE                         4004 /* float 0..1000, 7.5 (CFG; <= 1: no guidance) */
#define LORA_P_NEGATIVE_SCALE                4005 /* float -1000..1000, 0 = off (kohya's None) */
#define LORA_P_SAMPLER                       4006 /* string, "ddim" (kohya's 16 names) */
#define LORA_P_W                             4007 /* int 8..16384, 512 (multiple of 8 for SD) */
#define LORA_P_H                             4008 /* int 8..16384, 512 */
#define LORA_P_BATCH_SIZE                    4009 /* int 1..64, 1: images per U-Net batch */
#define LORA_P_IMAGES_PER_PROMPT             4010 /* int 1..100000, 1 */
#define LORA_P_ITER_SAME_SEED                4011 /* int 0/1, 0: one random seed for every image */
#define LORA_P_RNG                           4012 /* string cpu|cuda, "cpu": torch CPU / CUDA noise */
#define LORA_P_STRENGTH                      4013 /* float 0..1, 0.8: img2img */
#define LORA_P_IMAGE_PATH                    4014 /* string path, "": img2img init image */
#define LORA_P_VAE                           4015 /* string path, "": an LDM VAE file replacing the model's */
#define LORA_P_MAX_EMBEDDINGS_MULTIPLES      4016 /* int 1..64, 1: prompt chunks of 75 tokens */
#define LORA_P_CLIP_SAMPLE                   4017 /* int 0/1, 0: DDIM clamps x0 (kohya forces 1) */
#define LORA_P_MODEL_HASH                    4018 /* string, "": "Model hash" in the PNG parameters */
#define LORA_P_LORA_HASHES                   4019 /* string, "": "Lora hashes" ("name: hash, ...") */
#define LORA_P_SEEDS                         4020 /* string "s1,s2,...", "": per-image seeds (kohya's --d) */
#define LORA_P_JPEG_QUALITY                  4021 /* int 1..100, 80 (A1111's default): JPEG and lossy WebP */
#define LORA_P_WEBP_LOSSLESS                 4022 /* int 0/1, 0: lossless WebP (exact pixels) */
/* merge / extract / resize (conv_dim is LORA_P_CONV_DIM, save_precision LORA_P_SAVE_PRECISION).
 * Since 0.2.0. */
#define LORA_P_DIM                           5001 /* int 1..4096, 4: extract rank */
#define LORA_P_CLAMP_QUANTILE                5002 /* float 1e-6..1, 0.99: extract clamp */
#define LORA_P_MIN_DIFF                      5003 /* float 0..1e6, 0.01: extract, TE unchanged below */
#define LORA_P_SVD                           5004 /* string exact|randomized|gram, "exact" */
#define LORA_P_NEW_RANK                      5005 /* int 0..4096, 0: merge (0 = kohya's rule) / resize */
#define LORA_P_NEW_CONV_RANK                 5006 /* int 0..4096, 0 = new_rank */
#define LORA_P_DYNAMIC_METHOD                5007 /* string ""|sv_ratio|sv_fro|sv_cumulative, "" = fixed */
#define LORA_P_DYNAMIC_PARAM                 5008 /* float 0..1e6, 0 */
#define LORA_P_PRECISION                     5009 /* string float|fp16|bf16, "float": merge precision */
#define LORA_P_RATIOS                        5010 /* string "r1,r2,...", "" (merge ratios) */
#define LORA_P_DEVICE                        5011 /* string ""|cpu|cuda, "" = the context's backend */
/* dataset options (Since 0.2.0) */
#define LORA_P_CAPTION_DROPOUT_EVERY_N_EPOCHS 3100 /* int 0..1e6, 0 = off */
#define LORA_P_CAPTION_TAG_DROPOUT_RATE      3101 /* float 0..1, 0 */
#define LORA_P_CACHE_LATENTS_TO_DISK         3102 /* int 0/1, 0 (cache beside each image) */
#define LORA_P_BAD_IMAGE                     3103 /* string skip|refuse, "skip": unreadable image or caption */
#define LORA_P_FACE_CROP_AUG_RANGE           3104 /* string "a,b" (0 < a <= b) or "", "": off (no bucketing only) */
/* trainer options (Since 0.2.0) */
#define LORA_P_OPTIMIZER_ARGS                3150 /* string "k=v k=v" (weight_decay, betas=a,b, eps, momentum, dampening), "" */
#define LORA_P_SAVE_LAST_N_EPOCHS            3151 /* int 0..1e6, 0 = keep every epoch file */
#define LORA_P_SAVE_N_EPOCH_RATIO            3152 /* int 0..1e6, 0 = off (else save_every_n_epochs = epochs / ratio or 1) */
#define LORA_P_SAVE_EVERY_N_STEPS            3153 /* int 0..2^31-1, 0 = off ("{name}-step{s:08d}") */
#define LORA_P_TRAINING_COMMENT              3154 /* string, "" (ss_training_comment) */
/* save */
#define LORA_P_SAVE_MODEL_AS                 6001 /* string ckpt|pt|safetensors|diffusers|diffusers_safetensors, "safetensors" */
#define LORA_P_SAVE_PRECISION                6002 /* string ""|float|fp16|bf16, "" = keep */
#define LORA_P_NO_METADATA                   6003 /* int 0/1, 0 */

/* Creates a bag holding every key at its default. Errors: LORA_E_INVALID_ARG,
 * LORA_E_NOMEM. Free with lora_params_free. Since 0.1.0. */
LORA_API lora_status lora_params_create(lora_ctx *ctx, lora_params **out);

/* Frees a bag. NULL is a no-op. Since 0.1.0. */
LORA_API void lora_params_free(lora_params *p);

/* Returns every key to its default. Since 0.1.0. */
LORA_API lora_status lora_params_reset(lora_params *p);

/* Typed setters. The key's type must match (LORA_E_INVALID_ARG otherwise; FLOAT keys also
 * accept set_int). Values outside the documented bounds, NaN/Inf, or strings outside the
 * key's allowed set give LORA_E_CONFIG_RANGE naming the key; the stored value is then
 * unchanged. Strings are copied (UTF-8, at most 4095 bytes). Unknown key:
 * LORA_E_UNKNOWN_KEY. Since 0.1.0. */
LORA_API lora_status lora_params_set_int(lora_params *p, lora_param key, int64_t value);
LORA_API lora_status lora_params_set_float(lora_params *p, lora_param key, double value);
LORA_API lora_status lora_params_set_string(lora_params *p, lora_param key, const char *utf8);

/* Sets a key by its kohya name from text, as a command line would: "1e-4", "512,768",
 * "true"/"false" for 0/1 keys. Numbers are parsed independently of the process locale
 * ("1,5e-4" is rejected even under a locale whose decimal mark is a comma). Errors:
 * LORA_E_UNKNOWN_KEY (name), LORA_E_CONFIG_RANGE (value). Since 0.1.0. */
LORA_API lora_status lora_params_parse(lora_params *p, const char *name, const char *text);

/* Typed getters. get_float also reads INT keys. get_string copies into `buf` (truncated,
 * NUL-terminated when cap > 0) and stores the size needed including the NUL in `*needed`
 * (may be NULL). Since 0.1.0. */
LORA_API lora_status lora_params_get_int(const lora_params *p, lora_param key, int64_t *out);
LORA_API lora_status lora_params_get_float(const lora_params *p, lora_param key, double *out);
LORA_API lora_status lora_params_get_string(const lora_params *p, lora_param key, char *buf,
                                            size_t cap, size_t *needed);

/* Name -> key and type ("learning_rate" -> LORA_P_LEARNING_RATE, LORA_PARAM_FLOAT). A
 * leading "--" is accepted. Thread-safe, no context. Errors: LORA_E_INVALID_ARG,
 * LORA_E_UNKNOWN_KEY. Since 0.1.0. */
LORA_API lora_status lora_param_lookup(const char *name, lora_param *key,
                                       lora_param_type *type);

/* Key -> static name, or NULL for an unknown key. Thread-safe. Since 0.1.0. */
LORA_API const char *lora_param_name(lora_param key);

/* Bounds and default of a numeric key (any out pointer may be NULL). STRING keys give
 * LORA_E_INVALID_ARG. Thread-safe. Since 0.1.0. */
LORA_API lora_status lora_param_bounds(lora_param key, double *min, double *max,
                                       double *default_value);

/* Enumerates keys: the key at `index` (0-based) in ascending order, or 0 past the end.
 * Lets bindings build their keyword tables. Thread-safe. Since 0.1.0. */
LORA_API lora_param lora_param_at(int32_t index);

/* ======================================================================================
 * Tensor files (safetensors): inspect what a file holds, without loading it.
 * ====================================================================================== */
typedef struct lora_file lora_file;

typedef int32_t lora_dtype;   /* pinned numbers; names as in safetensors headers */
#define LORA_DTYPE_F32   1
#define LORA_DTYPE_F16   2
#define LORA_DTYPE_BF16  3
#define LORA_DTYPE_F64   4
#define LORA_DTYPE_I64   5
#define LORA_DTYPE_I32   6
#define LORA_DTYPE_U8    7
#define LORA_DTYPE_I16   8
#define LORA_DTYPE_I8    9
#define LORA_DTYPE_BOOL  10
#define LORA_DTYPE_U16   11
#define LORA_DTYPE_U32   12
#define LORA_DTYPE_U64   13
#define LORA_DTYPE_F8_E4M3 14
#define LORA_DTYPE_F8_E5M2 15
#define LORA_DTYPE_OTHER 99   /* a valid safetensors dtype liblora does not compute with */

/* Opens and validates a .safetensors file (every rule of the format: header size, UTF-8,
 * strict JSON without duplicate keys, dtypes, overflow-checked offsets that cover the data
 * exactly). The file is memory-mapped read-only: it must not be truncated or rewritten in
 * place while the handle is open (replacing it by rename, as liblora's writers do, is safe).
 * Errors: LORA_E_NOT_FOUND, LORA_E_IO, LORA_E_NOT_A_MODEL, LORA_E_ST_*, LORA_E_NOMEM,
 * LORA_E_LIMIT; the message names the file, tensor and offset. Free with lora_file_free.
 * Since 0.1.0. */
LORA_API lora_status lora_file_open(lora_ctx *ctx, const char *path, lora_file **out);

/* Closes the file. NULL is a no-op. Since 0.1.0. */
LORA_API void lora_file_free(lora_file *f);

/* Number of tensors, in the order of their data offsets. */
LORA_API int64_t lora_file_tensor_count(const lora_file *f);

/* Describes tensor `index`: `*name` is borrowed until lora_file_free; `shape` receives up to
 * `shape_cap` dimensions; `*ndim` the real rank. Any out pointer may be NULL.
 * `*dtype_name` is the header's dtype string (static). Errors: LORA_E_INVALID_ARG (index out
 * of range). Since 0.1.0. */
LORA_API lora_status lora_file_tensor_info(const lora_file *f, int64_t index, const char **name,
                                           lora_dtype *dtype, const char **dtype_name,
                                           int32_t *ndim, int64_t *shape, int32_t shape_cap,
                                           uint64_t *nbytes);

/* Index of the tensor called `name`, or -1. */
LORA_API int64_t lora_file_find(const lora_file *f, const char *name);

/* Metadata (the header's __metadata__ map) in header order: entry `index` or
 * LORA_E_INVALID_ARG past the end; strings borrowed until lora_file_free. Since 0.1.0. */
LORA_API int64_t lora_file_metadata_count(const lora_file *f);
LORA_API lora_status lora_file_metadata_at(const lora_file *f, int64_t index, const char **key,
                                           const char **value);

/* Reads tensor `index` converted to float32 into `dst` (`cap` floats). F32, F16, BF16, F64,
 * I64, I32, I16, I8, U8 and BOOL convert; others give LORA_E_UNSUPPORTED. Errors:
 * LORA_E_LIMIT when `cap` is smaller than the element count. Since 0.1.0. */
LORA_API lora_status lora_file_read_f32(const lora_file *f, int64_t index, float *dst,
                                        uint64_t cap);

/* File hashes (spec/kohya-lora.md §9.2), as lower-case hex into hex_out (`cap` bytes, NUL
 * included):
 *   LORA_HASH_SHA256  SHA-256 of the whole file, 64 hex: A1111's "Model hash" is its first 10
 *                     digits (kohya's calculate_sha256, ss_new_sd_model_hash); A1111's Lora
 *                     extension uses it for non-safetensors networks.
 *   LORA_HASH_ADDNET  SHA-256 of a .safetensors file's data region (the bytes after the 8-byte
 *                     length and the JSON header), 64 hex: kohya's sshs_model_hash /
 *                     addnet_hash_safetensors; A1111's "Lora hashes" show its first 12 digits.
 *                     Editing the metadata does not change it.
 *   LORA_HASH_LEGACY  the first 8 hex of SHA-256 of the 64 KiB at offset 1 MiB (the part of
 *                     that window the file has; SHA-256 of nothing for files under 1 MiB):
 *                     A1111's old model hash, kohya's model_hash / ss_sd_model_hash.
 * cap must be at least 65 (9 for LORA_HASH_LEGACY). The file is read in 1 MiB chunks (a 4 GB
 * checkpoint takes seconds); progress: LORA_PHASE_LOAD with done/total in bytes, and a callback
 * returning non-zero or lora_ctx_cancel stops with LORA_E_CANCELLED. On failure hex_out is "".
 * Thread rules as every ctx call. Errors: LORA_E_INVALID_ARG (NULL, unknown kind, small cap),
 * LORA_E_NOT_FOUND, LORA_E_IO (unreadable, not a regular file), for LORA_HASH_ADDNET
 * LORA_E_ST_HEADER_TOO_SMALL (under 8 bytes), LORA_E_ST_HEADER_LENGTH (the header length runs
 * past the end: truncated or not safetensors), LORA_E_ST_HEADER_JSON (the header does not start
 * with '{'), LORA_E_NOMEM, LORA_E_CANCELLED. Since 0.2.0. */
#define LORA_HASH_SHA256 1
#define LORA_HASH_ADDNET 2
#define LORA_HASH_LEGACY 3
LORA_API lora_status lora_file_hash(lora_ctx *ctx, const char *path, int32_t kind, char *hex_out, size_t cap);

/* ======================================================================================
 * Tokenizer: the CLIP BPE tokenizer kohya's sd-scripts encodes every caption and prompt
 * with (transformers 4.25.1's slow CLIPTokenizer with ftfy installed), built into the
 * library: no vocabulary file is read at run time.
 * ====================================================================================== */
typedef struct lora_tokenizer lora_tokenizer;

typedef int32_t lora_tokenizer_flavour;
#define LORA_TOKENIZER_SD1 1   /* openai/clip-vit-large-patch14: pads with EOS (49407) */
#define LORA_TOKENIZER_SD2 2   /* stable-diffusion-2 "tokenizer": pads with "!" (id 0), and a
                                  "!" in the text is that pad token too (id 0) */

#define LORA_TOKEN_BOS 49406   /* <|startoftext|> */
#define LORA_TOKEN_EOS 49407   /* <|endoftext|> */

/* Creates a tokenizer of `flavour` (LORA_TOKENIZER_SD1 or LORA_TOKENIZER_SD2). It holds the
 * 48894 merges (about 0.8 MB) and a cache of the words it has seen, so one tokenizer should
 * serve many prompts. It belongs to `ctx` (same thread rules) and keeps it alive until freed.
 * Errors: LORA_E_INVALID_ARG (NULL ctx/out, unknown flavour), LORA_E_NOMEM. Free with
 * lora_tokenizer_free. Since 0.1.0. */
LORA_API lora_status lora_tokenizer_create(lora_ctx *ctx, lora_tokenizer_flavour flavour,
                                           lora_tokenizer **out);

/* Frees a tokenizer. NULL is a no-op. Since 0.1.0. */
LORA_API void lora_tokenizer_free(lora_tokenizer *tok);

/* Token ids of `utf8_text` exactly as kohya's train_util.get_input_ids builds them:
 * the text is normalised as CLIPTokenizer does (ftfy.fix_text: mojibake, HTML entities,
 * curly quotes, ligatures, full-width forms, control characters, NFC; white space collapsed;
 * lower-cased), split and byte-pair encoded, then BOS + at most max_token_length ids + EOS,
 * padded to max_token_length + 2 with the flavour's pad id. `max_token_length` is 75 (one
 * sequence of 77), 150 or 225 (kohya's --max_token_length: 2 or 3 chunks of 77, each BOS +
 * 75 ids + EOS/pad, with kohya's SD2 fix-ups of the chunk ends). Writes 77 *
 * (max_token_length / 75) ids to `ids` and that count to `*n_ids` (n_ids may be NULL).
 * Errors: LORA_E_INVALID_ARG (NULL tok/text/ids), LORA_E_CONFIG_RANGE (max_token_length),
 * LORA_E_LIMIT (`cap` too small: *n_ids still says how many are needed),
 * LORA_E_CAPTION_ENCODING (not valid UTF-8; the message gives the byte offset).
 * Since 0.1.0. */
LORA_API lora_status lora_tokenizer_encode(lora_tokenizer *tok, const char *utf8_text,
                                           int32_t max_token_length, int32_t *ids, size_t cap,
                                           size_t *n_ids);

/* Every token id of `utf8_text`, without BOS/EOS, padding or truncation (what
 * CLIPTokenizer.tokenize + convert_tokens_to_ids give). `*n_ids` receives the count. With
 * ids NULL and cap 0 it only counts; otherwise `cap` smaller than the count gives
 * LORA_E_LIMIT (the first `cap` ids are written). Errors as lora_tokenizer_encode.
 * Since 0.1.0. */
LORA_API lora_status lora_tokenizer_tokenize(lora_tokenizer *tok, const char *utf8_text,
                                             int32_t *ids, size_t cap, size_t *n_ids);

/* ======================================================================================
 * Models: Stable Diffusion v1/v2 checkpoints (.safetensors / .ckpt / diffusers folders).
 * ====================================================================================== */
typedef struct lora_model lora_model;

typedef int32_t lora_model_info;
#define LORA_MODEL_SD_VERSION        1   /* 1 or 2 */
#define LORA_MODEL_PREDICTION        2   /* 0 epsilon, 1 v-prediction */
#define LORA_MODEL_CONTEXT_DIM       3   /* cross-attention width: 768 (v1), 1024 (v2) */
#define LORA_MODEL_UNET_PARAMS       4   /* parameter counts */
#define LORA_MODEL_TE_PARAMS         5
#define LORA_MODEL_VAE_PARAMS        6
#define LORA_MODEL_TENSORS           7   /* tensors held, including unmapped extras */
#define LORA_MODEL_DTYPE             8   /* lora_dtype of the U-Net weights */
#define LORA_MODEL_FORMAT            9   /* LORA_FORMAT_* the model was loaded from */
#define LORA_MODEL_LINEAR_PROJECTION 10  /* 1 when proj_in/proj_out are Linear */
#define LORA_MODEL_UNET_CHANNELS     11  /* first U-Net block width (320 in SD) */
#define LORA_MODEL_TE_LAYERS         12  /* text encoder layers used (12 v1, 23 v2) */
#define LORA_MODEL_TE_HIDDEN         13  /* text encoder width */
#define LORA_MODEL_EXTRA_TENSORS     14  /* tensors kept verbatim without a diffusers name */

typedef int32_t lora_format;
#define LORA_FORMAT_SAFETENSORS          1   /* single-file LDM (CompVis) names */
#define LORA_FORMAT_CKPT                 2   /* PyTorch zip pickle, LDM names */
#define LORA_FORMAT_DIFFUSERS            3   /* folder with .bin weights */
#define LORA_FORMAT_DIFFUSERS_SAFETENSORS 4  /* folder with .safetensors weights */

/* Loads an SD v1/v2 model from a .safetensors or .ckpt file (LDM key names) or a diffusers
 * folder; the format is found from the content. `.ckpt` pickles are parsed without executing
 * anything: only the globals torch.load(weights_only=True) allows (plus inert ones real SD
 * checkpoints carry) are accepted. Options (`opts` may be NULL): v2 (1 asserts the file is
 * SD 2.x: LORA_E_CONFIG_RANGE when it is not; the version is otherwise detected from the
 * keys), v_parameterization (1 sets v-prediction; diffusers folders also read it from the
 * scheduler config). A .safetensors file is memory-mapped and its tensors are used in place
 * (no copy; pages are read on first use): as with lora_file_open, the file must not be
 * truncated or rewritten in place while the model lives (replacing it by rename, as
 * liblora's own saves do, is safe). Errors: LORA_E_NOT_FOUND, LORA_E_NOT_A_MODEL, LORA_E_ST_*,
 * LORA_E_CKPT_*, LORA_E_SHAPE_MISMATCH, LORA_E_NOMEM; the message names the file and key.
 * Progress: LORA_PHASE_LOAD. Free with lora_model_free. Since 0.1.0. */
LORA_API lora_status lora_model_load(lora_ctx *ctx, const char *path, const lora_params *opts,
                                     lora_model **out);

/* Frees a model. NULL is a no-op. Since 0.1.0. */
LORA_API void lora_model_free(lora_model *model);

/* Reads a fact about the model (LORA_MODEL_*). Errors: LORA_E_UNKNOWN_KEY. Since 0.1.0. */
LORA_API lora_status lora_model_get_int(const lora_model *model, lora_model_info key, int64_t *out);

/* Saves the model. Options (`opts` may be NULL): save_model_as (ckpt|pt|safetensors|
 * diffusers|diffusers_safetensors, default safetensors), save_precision (float|fp16|bf16
 * casts every floating tensor; "" keeps each tensor's dtype). Single files use LDM key names
 * and keep every extra tensor of the source (EMA, DDPM buffers); a .ckpt holds
 * {'state_dict': ...} as SD and kohya write it. Files are written atomically; a diffusers
 * folder must not exist or be empty and appears complete or not at all. Errors:
 * LORA_E_IO, LORA_E_NOSPACE, LORA_E_DEST_BUSY, LORA_E_CONFIG_RANGE. Since 0.1.0. */
LORA_API lora_status lora_model_save(const lora_model *model, const char *path, const lora_params *opts);

/* Encodes a prompt with the model's text encoder as kohya's training and gen_img do: the
 * model's tokenizer flavour (SD1 or SD2), --max_token_length chunking (75, 150 or 225: each
 * 77-token chunk is encoded separately and the results re-joined), and clip_skip (hidden
 * state -clip_skip, then the final layer norm). Options (`opts` may be NULL): clip_skip,
 * max_token_length. Writes the conditioning, float32 row-major [tokens, width] with
 * tokens = max_token_length + 2 (77, 152, 227) and width = the text encoder width (768 for
 * SD1, 1024 for SD2), to `out` (`cap` floats). out = NULL with cap = 0 only sets *tokens and
 * *width (size query); either may be NULL. The first call builds the encoder (its weights in
 * float32 on the context's backend) and keeps it with the model. Errors: LORA_E_LIMIT (cap
 * too small), LORA_E_CONFIG_RANGE (clip_skip above the layer count), LORA_E_CAPTION_ENCODING
 * (prompt is not UTF-8), LORA_E_UNSUPPORTED (an LDM checkpoint whose head count SD's rules do
 * not give). Since 0.1.0. */
LORA_API lora_status lora_model_encode_prompt(lora_model *model, const char *prompt, const lora_params *opts,
                                              float *out, uint64_t cap, int64_t *tokens, int64_t *width);

/* ======================================================================================
 * LoRA networks: kohya-ss sd-scripts networks/lora.py modules (lora_te_* on the text
 * encoder's CLIPAttention/CLIPMLP Linears, lora_unet_* on the Linear and 1x1-conv children of
 * every Transformer2DModel, and with conv_dim the ResnetBlock2D/Downsample2D/Upsample2D
 * children). Each module holds lora_down [rank, in(, kh, kw)], lora_up [out, rank(, 1, 1)] and
 * alpha; its forward adds multiplier * alpha/rank * up(down(x)) to the base layer's output.
 * A network belongs to the context of the model or call that made it (same thread rules).
 * ====================================================================================== */
typedef struct lora_network lora_network;

typedef int32_t lora_network_info;
#define LORA_NETWORK_RANK           1   /* rank of the first Linear/1x1 module */
#define LORA_NETWORK_ALPHA          2   /* its alpha (float; get_int truncates) */
#define LORA_NETWORK_MODULES        3
#define LORA_NETWORK_TE_MODULES     4
#define LORA_NETWORK_UNET_MODULES   5
#define LORA_NETWORK_CONV3X3_MODULES 6  /* modules on k x k convs (kohya conv_dim, LoCon) */
#define LORA_NETWORK_CONV_RANK      7   /* rank of the first k x k module, 0 if none */
#define LORA_NETWORK_CONV_ALPHA     8
#define LORA_NETWORK_PARAMS         9   /* total elements of every down and up weight */

/* Creates a network on `model` with kohya's module list, names and init: lora_down
 * kaiming_uniform_(a=sqrt 5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from mt19937 so
 * that seed s gives the values torch.manual_seed(s) + kohya's create_network give; lora_up
 * zeros (a new network is an exact no-op). Options (`opts` may be NULL): network_dim (4),
 * network_alpha (1; 0 = dim), conv_dim (0 = none) / conv_alpha, network_train_unet_only,
 * network_train_text_encoder_only, seed (-1: 1234). Errors: LORA_E_INVALID_ARG,
 * LORA_E_CONFIG_RANGE (both "only" flags), LORA_E_NOMEM. Free with lora_network_free.
 * Since 0.2.0. */
LORA_API lora_status lora_network_create(lora_model *model, const lora_params *opts, lora_network **out);

/* Loads a kohya LoRA file: .safetensors (with its metadata) or a torch pickle (.pt/.ckpt, read
 * without executing anything). Accepts 2-D and 4-D factors (1x1 and k x k convs), ranks
 * and alphas per module, alpha as a 0-d tensor of any float or integer dtype, and files
 * without alpha (before 2023-01-21: alpha = rank). Errors: LORA_E_NOT_FOUND, LORA_E_ST_*,
 * LORA_E_CKPT_*, LORA_E_NO_MATCHING_KEYS (no lora_down tensor), LORA_E_NOT_A_MODEL (a down
 * without its up), LORA_E_SHAPE_MISMATCH (factors that do not chain), LORA_E_NONFINITE_INPUT
 * (NaN/Inf, negative alpha), LORA_E_UNSUPPORTED (a LyCORIS LoHa/LoKr/Tucker, DoRA, OFT or
 * PEFT-style tensor: the message names the first such key and the kind), each naming the key.
 * Since 0.2.0. */
LORA_API lora_status lora_network_load(lora_ctx *ctx, const char *path, lora_network **out);

/* Saves in kohya's layout: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha
 * (0-d). `.safetensors` gets metadata ss_network_module ("networks.lora"), ss_network_dim,
 * ss_network_alpha (unless set with lora_network_metadata_set) plus every key set or loaded;
 * any other extension is a torch pickle without metadata. Options: save_precision
 * (float|fp16|bf16 casts every tensor, alpha included, as kohya does; "" keeps each tensor's
 * dtype). Atomic. Errors: LORA_E_IO, LORA_E_NOSPACE, LORA_E_DEST_BUSY. Since 0.2.0. */
LORA_API lora_status lora_network_save(const lora_network *net, const char *path, const lora_params *opts);

/* Frees a network. NULL is a no-op. Since 0.2.0. */
LORA_API void lora_network_free(lora_network *net);

/* Facts (LORA_NETWORK_*). Errors: LORA_E_INVALID_ARG, LORA_E_UNKNOWN_KEY. Since 0.2.0. */
LORA_API lora_status lora_network_get_int(const lora_network *net, lora_network_info key, int64_t *out);
LORA_API lora_status lora_network_get_float(const lora_network *net, lora_network_info key, double *out);

/* Metadata written with the next .safetensors save (a key set twice keeps the last value).
 * get copies like lora_params_get_string; an absent key gives LORA_E_UNKNOWN_KEY.
 * Since 0.2.0. */
LORA_API lora_status lora_network_metadata_set(lora_network *net, const char *key, const char *value);
LORA_API lora_status lora_network_metadata_get(const lora_network *net, const char *key, char *buf,
                                               size_t cap, size_t *needed);

/* Which modules of `net` fit `model`: matched (a module of that name with the factors'
 * shapes; a 4-D 1x1 LoRA fits a Linear proj_in/proj_out), unused (no module of that name),
 * shape_mismatch. Any count pointer may be NULL. Offending keys are logged (warning), with the
 * likely reason when it is clear (SDXL names such as lora_te1_/lora_unet_input_blocks_; widths
 * of another model, e.g. SD v1 vs v2); a network whose matching modules all have all-zero
 * factors is logged as doing nothing. Nothing matched gives LORA_E_NO_MATCHING_KEYS naming
 * the first ones and the reason. Since 0.2.0. */
LORA_API lora_status lora_network_coverage(const lora_network *net, const lora_model *model,
                                           int64_t *matched, int64_t *unused,
                                           int64_t *shape_mismatch);

/* Merges the network into the model's weights as kohya's merge_lora.py does:
 * W += multiplier * alpha/rank * up @ down (1x1 and k x k convs too), computed in float32
 * and stored in each weight's dtype. Modules that do not fit are skipped (see coverage).
 * Errors: LORA_E_INVALID_ARG (different contexts), LORA_E_CONFIG_RANGE (non-finite
 * multiplier), LORA_E_NOMEM. Since 0.2.0. */
LORA_API lora_status lora_model_merge_network(lora_model *model, const lora_network *net, double multiplier);

/* ---- several networks applied at run time, swappable without reloading -------------------
 * lora_model_attach in LORA_APPLY_RUNTIME mode applies the attached networks i as kohya's
 * LoRANetwork does at run time: y = W x + sum_i m_i * alpha_i / rank_i * up_i(down_i(x)).
 * Layers the U-Net and text-encoder forwards take an adapter on (the transformers' attention,
 * feed-forward and proj_in/proj_out layers, 2-D or 4-D; the text encoder's q/k/v/out_proj and
 * fc1/fc2 -- every module of a network without conv_dim) keep their base weight untouched (a
 * float16 checkpoint's U-Net keeps reading the loaded 16-bit weights) and get one low-rank
 * branch of rank sum(rank_i), computed in float32. Every other weight a network touches (k x k
 * and resnet convs: conv_dim / LoCon) is replaced, in float32, by
 *     W = original + sum over attached networks i of m_i * alpha_i / rank_i * up_i @ down_i.
 * Branches and sums are rebuilt from the untouched originals on every attach, detach and
 * multiplier change, so any sequence of changes gives the same result as attaching the final
 * set once (no drift), and detaching everything restores the original tensors bit for bit.
 * The result is what kohya's gen_img computes with the LoRA branch in a float32 forward, up to
 * float32 rounding. The model's cached float32 runs (encode_prompt, unet_predict, vae_*) and
 * lora_generate pick up the changes on their next call. Memory: the networks' factors, plus
 * float32 copies of the replaced conv weights for as long as any network touches them.
 * lora_model_save writes the merged weights (attached networks included: touched weights in
 * float32 unless save_precision says otherwise; the v2 text encoder's q/k/v go into the packed
 * in_proj_weight, all three in float32 when one is touched).
 * LORA_APPLY_MERGE adds the network to the weights for good, as lora_model_merge_network
 * (stored in each weight's dtype; for the conv weights runtime networks have replaced, into
 * their float32 original, which goes back to its dtype when the last of them detaches): it is not
 * recorded as attached and can only be undone by reloading the model. lora_merge_into_model
 * and lora_model_cast on a model with runtime attachments act on the originals in the same way
 * (their result minus the attached deltas becomes the original at the next attach, detach or
 * set_multiplier call); cast first if touched weights should end up in float32.
 * Networks and their lifetime: an attached network must belong to the model's context; a
 * network may be attached to several models. lora_network_free on an attached network is
 * allowed: the handle becomes invalid for the caller at once, and the network itself is freed
 * at its last detach or when the last model holding it is freed. Changes to the network's
 * factors take effect at the next attach/detach/set_multiplier call.
 * Coverage: each attach logs (LORA_LOG_INFO) the matched / unused / shape-mismatched module
 * counts, and every module that does not fit (LORA_LOG_WARN), as lora_network_coverage does;
 * modules that do not fit are skipped. */
typedef int32_t lora_apply_mode;
#define LORA_APPLY_RUNTIME 1   /* exact and swappable: low-rank branches (convs: float32 copies) */
#define LORA_APPLY_MERGE   2   /* into the weights for good: no extra memory */

/* Attaches `net` to `model` with `multiplier` (kohya's --network_mul; any finite value,
 * negative too) in `mode` (LORA_APPLY_RUNTIME or LORA_APPLY_MERGE; see above). Errors:
 * LORA_E_INVALID_ARG (NULL or invalid handles, different contexts, net already attached at
 * run time to this model), LORA_E_CONFIG_RANGE (non-finite multiplier, unknown mode),
 * LORA_E_NO_MATCHING_KEYS (no module of the network fits the model: nothing changes; the
 * message names the first modules and why), LORA_E_UNSUPPORTED (a target weight that is not
 * F32/F16/BF16), LORA_E_NOMEM (the model is unchanged). Since 0.2.0. */
LORA_API lora_status lora_model_attach(lora_model *model, lora_network *net, double multiplier,
                                       lora_apply_mode mode);

/* Changes the multiplier of a network attached at run time (0 keeps it attached but without
 * effect). Errors: LORA_E_INVALID_ARG (not attached at run time to this model),
 * LORA_E_CONFIG_RANGE (non-finite), LORA_E_NOMEM (the previous multiplier stays).
 * Since 0.2.0. */
LORA_API lora_status lora_model_set_multiplier(lora_model *model, const lora_network *net,
                                               double multiplier);

/* Detaches a network attached at run time: the weights become those of the remaining
 * attachments (the originals when none is left). Errors: LORA_E_INVALID_ARG (not attached at
 * run time to this model; a LORA_APPLY_MERGE merge needs a reload), LORA_E_NOMEM.
 * Since 0.2.0. */
LORA_API lora_status lora_model_detach(lora_model *model, const lora_network *net);

/* Detaches every network attached at run time (a no-op when there is none). Merges made with
 * LORA_APPLY_MERGE stay. Errors: LORA_E_INVALID_ARG, LORA_E_NOMEM. Since 0.2.0. */
LORA_API lora_status lora_model_detach_all(lora_model *model);

/* Number of networks attached at run time to `model`; -1 for an invalid handle. Since 0.2.0. */
LORA_API int64_t lora_model_attached_count(const lora_model *model);

/* ======================================================================================
 * Merge, extract, resize: kohya sd-scripts' networks/merge_lora.py, svd_merge_lora.py,
 * extract_lora_from_models.py and resize_lora.py (spec/kohya-lora.md §6, §7). SVDs are LAPACK
 * sgesdd (economy) in float32 on the CPU (extraction: also LORA_SVD_RANDOMIZED, LORA_SVD_GRAM,
 * and cuSOLVER on the CUDA backend, see lora_extract_ex). Progress: LORA_PHASE_MERGE (merge, resize) and
 * LORA_PHASE_EXTRACT, one step per network or module; a progress callback returning non-zero
 * or lora_ctx_cancel() stops the call with LORA_E_CANCELLED.
 * ====================================================================================== */

/* Casts every floating tensor of the text encoder and U-Net (not the VAE or extra tensors)
 * to `dtype` (LORA_DTYPE_F32, F16 or BF16), as merge_lora.py's --precision does before
 * merging (its default "float": merges are then stored unrounded). Errors:
 * LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE (another dtype), LORA_E_NOMEM. Since 0.2.0. */
LORA_API lora_status lora_model_cast(lora_model *model, lora_dtype dtype);

/* merge_lora.py --sd_model: merges `nets[0..n)` into the model in order, each with
 * `ratios[i]`: W += ratio * alpha/rank * up @ down (1x1 and k x k convs too; v2 q/k/v land in
 * the packed in_proj_weight when saved), computed in float32 and stored in each weight's dtype
 * (call lora_model_cast first for kohya's float merge). Every other tensor is left untouched.
 * Modules that do not fit are skipped with a warning; a network none of whose modules fits
 * gives LORA_E_NO_MATCHING_KEYS. The networks must belong to the model's context. Errors:
 * LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE (non-finite ratio), LORA_E_NOMEM,
 * LORA_E_CANCELLED (networks merged so far stay merged). Since 0.2.0. */
LORA_API lora_status lora_merge_into_model(lora_model *model, const lora_network *const *nets,
                                           const double *ratios, int64_t n);

/* Merges LoRAs into one (no model). new_rank 0: merge_lora.py's rule (FEB 2023): per module,
 * base_alpha = alpha of the first network holding it, every down and up multiplied by
 * sqrt(alpha_k/base_alpha) * ratio_k and summed separately, alpha = base_alpha. The result is
 * (sum s_k U_k)(sum s_k D_k): ratios act squared and cross terms appear (kohya's documented
 * caveat); ranks and shapes must agree (else LORA_E_SHAPE_MISMATCH naming the module).
 * new_rank > 0: svd_merge_lora.py: the exact sum of ratio * alpha/rank * up @ down per module
 * is re-factored by SVD to min(new_rank, in, out) (k x k convs: new_conv_rank, 0 = new_rank),
 * both factors clamped to the 0.99 quantile of their values, alpha = the new rank. Errors:
 * LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE, LORA_E_SHAPE_MISMATCH, LORA_E_NOMEM,
 * LORA_E_CANCELLED. Free *out with lora_network_free. Since 0.2.0. */
LORA_API lora_status lora_merge_networks(lora_ctx *ctx, const lora_network *const *nets,
                                         const double *ratios, int64_t n, int32_t new_rank,
                                         int32_t new_conv_rank, lora_network **out);

/* extract_lora_from_models.py: for every LoRA target of `base` (with conv_dim > 0 also the
 * ResnetBlock2D/Downsample2D/Upsample2D convs) dW = tuned - base in float32, SVD, up = U_r S_r,
 * down = Vh_r with r = min(dim (conv_dim for k x k convs), in, out), both clamped to the
 * `clamp_quantile` quantile of their values (kohya: 0.99), alpha = r (int64 tensor),
 * metadata ss_network_module/dim/alpha. The text encoder is dropped when no TE weight moved
 * by more than `min_diff` (kohya 2023-03: 1e-6; later versions 0.01). Errors:
 * LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE, LORA_E_SHAPE_MISMATCH (different architectures),
 * LORA_E_NOMEM, LORA_E_CANCELLED. Free *out with lora_network_free. Since 0.2.0. */
typedef int32_t lora_svd_method;
#define LORA_SVD_EXACT      0   /* LAPACK sgesdd, economy: the factors kohya's script gets */
#define LORA_SVD_RANDOMIZED 1   /* randomized block Lanczos (block Krylov, full
                                 * reorthogonalisation; blocks of (rank + 4) / 2 columns, 5 power
                                 * steps, or rank + 4 and 2 on shapes with an aspect ratio >= 4;
                                 * seeded per module; exact when the Krylov span 3 (rank + 4)
                                 * reaches min(in, out)): about 10x faster than EXACT, the
                                 * reconstruction error within 1% of exact's (random deltas:
                                 * within 0.6%) */
#define LORA_SVD_GRAM       2   /* top-rank eigenpairs of the smaller Gram matrix in float64
                                 * (dsyrk + dsyevr; sgesdd when sigma_r < 1e-5 sigma_0): about 10x
                                 * faster than EXACT on SD shapes, products within ~2e-5 of it
                                 * before the clamp; singular-vector signs differ from LAPACK's,
                                 * so the quantile clamp (not sign-invariant) can differ from
                                 * kohya's by a few percent on skewed modules. Since 0.2.0. */
LORA_API lora_status lora_extract(const lora_model *base, const lora_model *tuned, int32_t dim,
                                  int32_t conv_dim, double clamp_quantile, double min_diff,
                                  lora_svd_method svd_method, lora_network **out);
typedef int32_t lora_resize_method;
#define LORA_RESIZE_FIXED         0   /* rank new_rank */
#define LORA_RESIZE_SV_RATIO      1   /* keep singular values > S0 / param */
#define LORA_RESIZE_SV_FRO        2   /* smallest rank keeping a param^2 share of sum S^2 */
#define LORA_RESIZE_SV_CUMULATIVE 3   /* smallest rank keeping a param share of sum S */

/* resize_lora.py: per module up @ down is re-factored by SVD to the new rank (dynamic methods:
 * capped at new_rank, 1 for a zero matrix), up = U_r S_r, down = Vh_r, no clamp; alpha =
 * scale * new rank per module with scale = (first alpha) / (first 2-D module's rank) as kohya
 * computes it. The Frobenius share kept per module is logged (LORA_LOG_INFO). Metadata is
 * copied with ss_network_dim/alpha updated ("Dynamic" for dynamic methods). Errors:
 * LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE, LORA_E_NOMEM, LORA_E_CANCELLED. Free *out with
 * lora_network_free. Since 0.2.0. */
LORA_API lora_status lora_network_resize(const lora_network *net, int32_t new_rank,
                                         lora_resize_method dynamic_method, double dynamic_param,
                                         lora_network **out);

/* merge_lora.py --sd_model, file to file and streamed: loads `model_path` (.safetensors or
 * .ckpt, memory-mapped; as lora_model_load with `opts`), then writes `out_path` tensor by
 * tensor: each tensor is read from the mapping, cast to the merge precision (text encoder and
 * U-Net), given the deltas of nets[0..n) in order (ratios[i] * alpha/rank * up @ down, float32,
 * stored in the precision after each network), cast to save_precision and written, so memory
 * stays near the input's mapping plus one tensor. The output equals lora_model_load +
 * lora_model_cast(precision) + lora_merge_into_model + lora_model_save(save_precision) byte for
 * byte (with OpenBLAS's Haswell kernels forced by OPENBLAS_CORETYPE, a few elements can differ
 * by one unit in the last place: those kernels round differently with the one sgemm thread used
 * here). `.ckpt`/`.pt` outputs are torch zips, streamed one record at a time (memory: one
 * tensor); any other name gets a .safetensors file (no metadata, as lora_model_save), written
 * by this thread and two helper threads it starts and joins (unchanged tensors copied in the
 * kernel, disk writeback started as it goes). A v2 diffusers folder input is merged in memory and saved
 * (the LDM writer makes up OpenCLIP's tensors the folder lacks from the merged text encoder).
 * `ratios` NULL: the `ratios` key ("r1,r2,...", n values).
 * Options (`opts` may be NULL): v2, v_parameterization (load), precision (float|fp16|bf16,
 * default float), save_precision ("" keeps each tensor's dtype after the precision cast).
 * Networks must belong to `ctx`; out_path must differ from model_path. Atomic: a failure or a
 * cancel (progress LORA_PHASE_LOAD, then LORA_PHASE_MERGE per output tensor) leaves no output
 * and no temp file. Errors: as lora_model_load and lora_merge_into_model, LORA_E_IO,
 * LORA_E_NOSPACE, LORA_E_DEST_BUSY, LORA_E_CONFIG_RANGE (ratios, a diffusers save_model_as),
 * LORA_E_CANCELLED. Not thread-safe on one context. Since 0.2.0. */
LORA_API lora_status lora_merge_file(lora_ctx *ctx, const char *model_path, const lora_network *const *nets,
                                     const double *ratios, int64_t n, const char *out_path,
                                     const lora_params *opts);

/* lora_merge_networks with new_rank / new_conv_rank read from `opts` (NULL: 0, kohya's rule)
 * and, when `ratios` is NULL, the ratios from the `ratios` key. Since 0.2.0. */
LORA_API lora_status lora_merge_networks_ex(lora_ctx *ctx, const lora_network *const *nets,
                                            const double *ratios, int64_t n, const lora_params *opts,
                                            lora_network **out);

/* lora_extract with its options from `opts` (NULL: defaults): dim (4), conv_dim (0),
 * clamp_quantile (0.99), min_diff (0.01), svd (exact|randomized), device ("" = the context's
 * backend, cpu, cuda). With device cuda, or a context on LORA_BACKEND_CUDA, the exact SVDs run
 * in cuSOLVER (gesvdj, float32) on the context's device; when none is usable (or CUDA is not
 * compiled in) a warning is logged and the CPU is used. Errors: as lora_extract. Since 0.2.0. */
LORA_API lora_status lora_extract_ex(const lora_model *base, const lora_model *tuned,
                                     const lora_params *opts, lora_network **out);

/* lora_network_resize with new_rank, dynamic_method ("" fixed, sv_ratio, sv_fro,
 * sv_cumulative) and dynamic_param from `opts` (new_rank must be set: >= 1). Since 0.2.0. */
LORA_API lora_status lora_network_resize_ex(const lora_network *net, const lora_params *opts,
                                            lora_network **out);

/* ======================================================================================
 * U-Net and VAE for hosts: noise prediction and latent encode/decode on caller buffers, so a
 * host (a WebUI extension, a sampler) can run its own sampling loop on the model. Each call
 * builds, on first use, a float32 copy of the network on the context's backend (the U-Net's
 * F16/BF16 weight matrices stay 16-bit and are widened per layer; on the CPU they are read in
 * place from the loaded checkpoint) and keeps it
 * with the model, together with work buffers planned for the call's shape; a call with a new
 * shape replans (the old plan is freed first), a call with the same shape allocates nothing.
 * lora_model_free releases them. All arrays are float32, row-major, host memory.
 * ====================================================================================== */

/* The U-Net's output for `batch` latents `latent` [batch, in_channels (4), height, width]
 * (height, width in latent pixels, image size / 8: any positive size up to 16384; sides
 * that are not multiples of 2^(levels - 1), 8 in SD, run as diffusers does: each level
 * ceil(n / 2), each upsampler resized to its skip's size), per-sample timesteps `timesteps` [batch] (any float: 0..999 for SD's 1000-step
 * schedules; fractional values are allowed) and the text conditioning `context` [batch,
 * context_tokens, context_dim] (context_dim: LORA_MODEL_CONTEXT_DIM; lora_model_encode_prompt
 * gives one sample's; any token count, 77, 154, 231, ... for kohya's long prompts). Writes
 * [batch, out_channels (4), height, width] to `out` (`out_cap` floats): the noise (epsilon)
 * or v, whichever the model predicts (LORA_MODEL_PREDICTION); the caller's sampler applies its
 * own scaling (e.g. the scheduler's scale_model_input) before the call. The input latent is
 * the scaled one (VAE mean or sample times 0.18215, plus noise). Errors: LORA_E_INVALID_ARG
 * (NULL array), LORA_E_CONFIG_RANGE (non-positive batch or tokens, sides outside
 * 1..16384), LORA_E_LIMIT (out_cap too small), LORA_E_NONFINITE_INPUT (a NaN
 * or infinity in latent, timesteps or context), LORA_E_NOMEM, LORA_E_CANCELLED. Since 0.2.0. */
LORA_API lora_status lora_model_unet_predict(lora_model *model, const float *latent, int64_t batch,
                                             int64_t height, int64_t width, const float *timesteps,
                                             const float *context, int64_t context_tokens, float *out,
                                             uint64_t out_cap);

/* Encodes `n` images `image` [n, 3, height, width] with values in [-1, 1] (pixel / 127.5 - 1;
 * height and width positive multiples of 8 in SD) into the VAE posterior: its mean to
 * `mean_out` and its log-variance, clamped to [-30, 20] as diffusers does, to `logvar_out`
 * (NULL: not wanted), each [n, latent_channels (4), height / 8, width / 8] and `cap` floats
 * long. The latents are unscaled: kohya's training (and diffusers' pipelines) use
 * 0.18215 * (mean + exp(logvar / 2) * noise) (a sample; mean alone for a deterministic
 * latent) as the U-Net's input. Images with a side above 512 pixels (64 latents) are encoded
 * in overlapping 512-pixel tiles blended over 16 latents (bounded memory; the result differs
 * slightly from an untiled encode, whose GroupNorm statistics span the whole image); up to
 * 512 the output is exactly diffusers'. Errors: LORA_E_INVALID_ARG (image or mean_out NULL),
 * LORA_E_CONFIG_RANGE (sizes), LORA_E_LIMIT (cap too small), LORA_E_NONFINITE_INPUT,
 * LORA_E_NOMEM, LORA_E_CANCELLED. Since 0.2.0. */
LORA_API lora_status lora_model_vae_encode(lora_model *model, const float *image, int64_t n,
                                           int64_t height, int64_t width, float *mean_out,
                                           float *logvar_out, uint64_t cap);

/* Decodes `n` unscaled latents `latent` [n, latent_channels (4), height, width] (height,
 * width in latent pixels; divide a sampler's latent by 0.18215 first) into images [n, 3,
 * 8 * height, 8 * width] (SD's factor 8) written to `image_out` (`cap` floats), values about
 * [-1, 1] (not clamped: (x + 1) * 127.5, clamped to 0..255, gives pixels). A latent side
 * above 64 is decoded in overlapping 64-latent tiles blended over 128 pixels, as later
 * diffusers' enable_tiling does (a 768x768 image needs about 1.2 GiB of work memory instead
 * of 2.5 GiB; pixels differ slightly from an untiled decode); up to 64 the output is exactly
 * diffusers'. Errors: LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE, LORA_E_LIMIT,
 * LORA_E_NONFINITE_INPUT, LORA_E_NOMEM, LORA_E_CANCELLED. Since 0.2.0. */
LORA_API lora_status lora_model_vae_decode(lora_model *model, const float *latent, int64_t n,
                                           int64_t height, int64_t width, float *image_out,
                                           uint64_t cap);

/* ======================================================================================
 * Generation: kohya-ss gen_img_diffusers.py's txt2img and img2img (spec/kohya-lora.md §8) on
 * the model as it stands (with the networks lora_model_attach attached or merged), computed
 * as diffusers 0.10.2's StableDiffusionPipeline / Img2ImgPipeline do in float32 on the
 * context's backend. Options (`opts` may be NULL: defaults):
 *   prompt, negative_prompt (A1111/kohya emphasis syntax, max_embeddings_multiples chunks of
 *   75 tokens), steps, scale (classifier-free guidance; <= 1 turns it off), negative_scale
 *   (kohya: e = e_empty + scale (e_cond - e_empty) - negative_scale (e_neg - e_empty); 0 =
 *   off), sampler (ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver,
 *   dpmsolver++, dpmsingle and the k_ aliases: the diffusers scheduler kohya maps each to,
 *   with SD's scheduler config: steps_offset 1, set_alpha_to_one off; clip_sample 1 clamps
 *   DDIM's x0 to [-1, 1], the setting kohya's script asks for and its pipeline resets), W, H (multiples of 8 for SD, the VAE's
 *   factor; since 0.2.0 not only multiples of 64: the U-Net runs other sizes as diffusers
 *   does), clip_skip, seed (-1: random), seeds ("s1,s2": per image, repeated as
 *   kohya's --d), iter_same_seed, rng (cpu: torch.randn of a torch.manual_seed(seed) CPU
 *   generator per image; cuda: torch's CUDA Philox noise as A1111 reproduces it),
 *   images_per_prompt and batch_size (lora_generate_batch), image_path and strength (img2img:
 *   the image's size is used, rounded down to multiples of 32 as kohya does and resized
 *   there when it is not one: an area filter where kohya uses PIL LANCZOS), model_hash
 *   and lora_hashes (written into the PNG text), vae (kohya's --vae: a .safetensors/.ckpt VAE
 *   with LDM names, e.g. vae-ft-mse-840000, for the img2img encode and the decode). Seeds:
 *   with seed S and one image, S; with n images, kohya's random.seed(S) + n x
 *   random.randint(0, 2^31 - 1). Noise per image in kohya's order: the
 *   initial latent, then the sampler's per-step noises. The model's cached float32 U-Net/VAE
 *   runs (lora_model_unet_predict, lora_model_vae_*) are released by a generation call; its
 *   own float32 copies live for the call only.
 * Progress: LORA_PHASE_SAMPLE_STEP (one per U-Net call, over every batch) and
 * LORA_PHASE_DECODE (one per image); a callback returning non-zero or lora_ctx_cancel stops
 * the call with LORA_E_CANCELLED (no images are returned). Images belong to the model's
 * context (same thread rules) and keep it alive. Errors: LORA_E_INVALID_ARG,
 * LORA_E_CONFIG_RANGE (sizes, sampler, strength), LORA_E_CAPTION_ENCODING, LORA_E_UNSUPPORTED
 * (inpainting U-Nets), LORA_E_NOT_A_MODEL / LORA_E_SHAPE_MISMATCH (vae),
 * LORA_E_IMG_* (image_path), LORA_E_NOMEM, LORA_E_CANCELLED. Since 0.2.0.
 * ====================================================================================== */
typedef struct lora_image lora_image;

/* One image (images_per_prompt is ignored). *out is NULL on failure. Since 0.2.0. */
LORA_API lora_status lora_generate(lora_model *model, const lora_params *opts, lora_image **out);
/* images_per_prompt images, batch_size at a time, into out[0..cap) (*n_out set; on failure
 * none). Errors as lora_generate plus LORA_E_LIMIT (cap < images_per_prompt). Since 0.2.0. */
LORA_API lora_status lora_generate_batch(lora_model *model, const lora_params *opts, lora_image **out,
                                         int64_t cap, int64_t *n_out);
/* Width, height, channels (3: RGB), pixels (row-major RGB8, borrowed until lora_image_free),
 * the seed used. 0 / NULL for an invalid image. Since 0.2.0. */
LORA_API uint32_t lora_image_width(const lora_image *img);
LORA_API uint32_t lora_image_height(const lora_image *img);
LORA_API uint32_t lora_image_channels(const lora_image *img);
LORA_API const uint8_t *lora_image_data(const lora_image *img);
LORA_API uint64_t lora_image_seed(const lora_image *img);
/* The text the PNG will carry under `key` (borrowed; NULL if none): "parameters" (A1111's
 * infotext: prompt, "Negative prompt: ...", "Steps: N, Sampler: S, CFG scale: X, Seed: N,
 * Size: WxH, Model hash: H, ..., Lora hashes: \"...\"") and kohya's "prompt", "seed",
 * "sampler", "steps", "scale", "negative-prompt", "negative-scale". Since 0.2.0. */
LORA_API const char *lora_image_text(const lora_image *img, const char *key);
/* Writes a PNG (libpng, atomic) with those text chunks (tEXt, or iTXt for text beyond
 * Latin-1). `opts` is reserved (NULL). Errors: LORA_E_IO, LORA_E_NOSPACE, LORA_E_DEST_BUSY,
 * LORA_E_INVALID_ARG. Since 0.2.0. */
LORA_API lora_status lora_image_save_png(const lora_image *img, const char *path, const lora_params *opts);
/* Writes the image in the format its extension names (case-insensitive): .png as
 * lora_image_save_png; .jpg/.jpeg (libjpeg, 4:2:0, quality jpeg_quality) and .webp (libwebp,
 * lossy at jpeg_quality or lossless with webp_lossless) with the "parameters" text as EXIF
 * UserComment, written as A1111 writes it (piexif: "UNICODE\0" + UTF-16BE) so A1111's PNG Info
 * tab reads it back; kohya's other keys are PNG-only. opts may be NULL (defaults). Atomic.
 * Errors: LORA_E_INVALID_ARG (another extension, a WebP side above 16383), LORA_E_LIMIT (a
 * JPEG's parameters text over about 32,000 characters: one APP1 segment), LORA_E_IO,
 * LORA_E_NOSPACE, LORA_E_DEST_BUSY, LORA_E_NOMEM. Since 0.2.0. */
LORA_API lora_status lora_image_save(const lora_image *img, const char *path, const lora_params *opts);
/* Frees an image. NULL is a no-op. Since 0.2.0. */
LORA_API void lora_image_free(lora_image *img);

/* ======================================================================================
 * Training: kohya-ss train_network.py as a library call (spec/kohya-lora.md §1.7-1.8, §4.4,
 * §5, §9). A trainer trains `net` (made by lora_network_create on the same model; its
 * down/up weights are updated in place) on the DreamBooth dataset named by the options, on
 * the CPU backend, in float32. Per micro-step it draws, from one torch-compatible CPU
 * generator seeded with `seed` (as torch.manual_seed), the VAE posterior sample (without
 * cache_latents), the noise, the noise_offset noise and the timesteps, in kohya's order.
 * Gradient accumulation follows accelerate 0.15 (loss / G, a sync every G-th micro-step of
 * an epoch and at its end, the LR scheduler stepped every micro-step). noise_offset adds
 * offset x N(0,1) per sample and channel; min_snr_gamma weights each sample's loss by
 * min(snr, gamma) / snr (kohya's later apply_snr_weight; v-prediction: / (snr + 1)). The
 * optimizer step clips the global norm (max_grad_norm) and applies optimizer_type (AdamW,
 * AdamW8bit, SGDNesterov, Lion; optimizer_args) with text_encoder_lr / unet_lr (else
 * learning_rate) under lr_scheduler. mixed_precision fp16/bf16 rounds the frozen U-Net and
 * VAE weights to that dtype as kohya casts them (the text encoder stays float32; activations
 * and the arithmetic stay float32: autocast's half-precision activations are not emulated);
 * fp16 adds torch GradScaler's dynamic loss scale (65536, x2 per 2000 good steps, x0.5 and a
 * skipped step, counted in LORA_STAT_SKIPPED_STEPS, on an inf/NaN loss or gradient). Steps
 * and epochs as kohya (max_train_epochs overrides max_train_steps = epochs x batches per
 * epoch). With output_dir set, files are
 * named as kohya names them: "{output_name|epoch}-{e:06d}.{save_model_as}" every
 * save_every_n_epochs (or save_n_epoch_ratio) epochs before the last, older ones removed by
 * save_last_n_epochs, "{output_name|epoch}-step{s:08d}" every save_every_n_steps, and the
 * final "{output_name|last}.{ext}"; .safetensors files carry kohya's ss_* metadata (values as
 * Python str() writes them; no_metadata: the minimum set) and sshs_model_hash /
 * sshs_legacy_hash; save_precision casts every tensor. With save_state, a resumable state
 * "{name}-{e:06d}-state.safetensors" goes beside each epoch file and "{output_name|last}-
 * state.safetensors" at the end. Every save is atomic. Progress: LORA_PHASE_CACHE_LATENTS,
 * LORA_PHASE_TRAIN_STEP after each optimizer step (done = step, total = max steps, value =
 * the step's loss); cancelling stops between optimizer steps, so the trainer can then be
 * saved (lora_trainer_save_state) and resumed exactly. The model and the network must outlive
 * the trainer and must not be used by other calls while it runs; without mixed_precision the
 * trainer reads the model's 16-bit U-Net weights in place, so the model's weights must not be
 * changed (lora_model_cast, lora_model_merge_network, lora_merge_into_model) while it exists. gradient_checkpointing
 * picks the U-Net's per-block recompute (less memory, same gradients); max_token_length
 * 150/225 encodes 2/3 chunks of 77 and re-joins them as kohya's get_hidden_states. Not yet:
 * conv_dim LoRA training, DAdaptation/AdaFactor, full_fp16.
 * ====================================================================================== */
typedef struct lora_trainer lora_trainer;

typedef int32_t lora_train_stat;
#define LORA_STAT_STEP              1   /* optimizer steps taken */
#define LORA_STAT_EPOCH             2   /* current epoch, 1-based */
#define LORA_STAT_LAST_LOSS         3   /* loss of the last micro-step (NaN before the first) */
#define LORA_STAT_AVG_LOSS          4   /* kohya's running average over the epoch's positions */
#define LORA_STAT_LR                5   /* U-Net group learning rate of the last step */
#define LORA_STAT_GRAD_NORM         6   /* total gradient norm before clipping, last step */
#define LORA_STAT_SKIPPED_STEPS     7   /* fp16 steps skipped for inf/NaN gradients */
#define LORA_STAT_IMAGES_PER_S      8   /* images per second over the last optimizer step */
#define LORA_STAT_MAX_STEPS         9   /* max_train_steps after max_train_epochs */
#define LORA_STAT_EPOCHS            10  /* number of epochs the run takes */
#define LORA_STAT_BATCHES_PER_EPOCH 11  /* len(dataloader) */
#define LORA_STAT_LR_TEXT_ENCODER   12  /* text encoder group learning rate of the last step */
#define LORA_STAT_LOSS_SCALE        13  /* current fp16 loss scale (1 without fp16) */

/* Creates a trainer for `net` on `model` with the training options of `opts` (NULL:
 * defaults; the 3000 and 6000 keys, train_data_dir required): opens the dataset, caches
 * latents (cache_latents), loads network_weights into `net` (kohya's strict=False load; a
 * shape mismatch is LORA_E_SHAPE_MISMATCH), and with `resume` set loads that state file.
 * Errors: LORA_E_INVALID_ARG, LORA_E_CONFIG_RANGE (an option out of range or combination
 * kohya refuses), LORA_E_UNSUPPORTED (see above), dataset errors (LORA_E_IMG_*,
 * LORA_E_CAPTION_*, LORA_E_NOT_FOUND), LORA_E_RESUME_MISMATCH, LORA_E_NOMEM,
 * LORA_E_CANCELLED. Free with lora_trainer_free. Since 0.2.0. */
LORA_API lora_status lora_trainer_create(lora_model *model, lora_network *net, const lora_params *opts,
                                         lora_trainer **out);
/* Takes up to `n_steps` optimizer steps (fewer at max_train_steps; 0 does nothing), saving
 * epoch files on the way. *steps_done (may be NULL) gets the steps taken, also on failure or
 * cancel. Errors: LORA_E_NAN_LOSS (a non-finite loss without fp16 loss scaling),
 * LORA_E_CANCELLED, dataset and I/O errors, LORA_E_NOMEM. Since 0.2.0. */
LORA_API lora_status lora_trainer_step(lora_trainer *tr, int64_t n_steps, int64_t *steps_done);
/* Trains to max_train_steps, then writes the final file (and state with save_state) when
 * output_dir is set. Calling it again after completion only saves again. Since 0.2.0. */
LORA_API lora_status lora_trainer_run(lora_trainer *tr);
/* Stats (LORA_STAT_*); get_int truncates. Errors: LORA_E_INVALID_ARG, LORA_E_UNKNOWN_KEY.
 * Thread rules as every call on the context. Since 0.2.0. */
LORA_API lora_status lora_trainer_get_int(const lora_trainer *tr, lora_train_stat key, int64_t *out);
LORA_API lora_status lora_trainer_get_float(const lora_trainer *tr, lora_train_stat key, double *out);
/* Writes the resumable state (network, optimizer state incl. 8-bit state, scheduler position,
 * loss scaler, generator, step/epoch/batch, the run's configuration) to `path`
 * (.safetensors, atomic). Since 0.2.0. */
LORA_API lora_status lora_trainer_save_state(const lora_trainer *tr, const char *path);
/* Loads a state saved by a run with the same configuration: the run then continues exactly
 * as the saved one would have (same batches, noise, timesteps, losses on the CPU). Errors:
 * LORA_E_RESUME_MISMATCH (another configuration: the message names the first difference),
 * LORA_E_NOT_A_MODEL (not a state file), LORA_E_ST_*, LORA_E_NOT_FOUND. Since 0.2.0. */
LORA_API lora_status lora_trainer_load_state(lora_trainer *tr, const char *path);
/* Saves the network now with the run's metadata, as the epoch saves do (the extension picks
 * safetensors or a torch pickle). Since 0.2.0. */
LORA_API lora_status lora_trainer_save_network(lora_trainer *tr, const char *path);
/* Frees the trainer (not the model or network). NULL is a no-op. Since 0.2.0. */
LORA_API void lora_trainer_free(lora_trainer *tr);

#ifdef __cplusplus
}
#endif
#endif /* LORA_LORA_H */
