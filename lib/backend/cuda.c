/* CUDA backend: cuBLAS for GEMM, liblora kernels (kernels/) for the rest, one non-blocking
 * stream and a private stream-ordered memory pool per backend. CUDA is probed at run time,
 * so the library loads and works on machines without a GPU or driver.
 *
 * Error policy (spec/safety.md H7): out-of-memory is recoverable (LORA_E_GPU_OOM); sticky
 * errors (illegal address, launch failure, ...) poison this backend: every later call
 * returns LORA_E_GPU_FATAL at once, while CPU work in the process stays usable. */
#include <pthread.h>
#include <string.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"   /* cublasLt.h declares f() */
#include <cublasLt.h>
#pragma GCC diagnostic pop
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "backend/backend.h"
#include "core/dtype.h"
#include "kernels.h"

struct cuda_state {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *lt_workspace;        /* cuBLASLt scratch, from the pool */
    uint64_t *flag;            /* device word kernels report through (embedding id check) */
    cudaMemPool_t pool;
    int poisoned;
};

/* ---- one-time probe ------------------------------------------------------------------- */
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static lora_status probe_status = LORA_E_NO_GPU;   /* written once inside pthread_once */
static const char *probe_why = "not probed";
static int32_t probe_count = 0;

static void probe_run(void) {
    int driver = 0, count = 0;
    cudaDriverGetVersion(&driver);
    cudaError_t e = cudaGetDeviceCount(&count);
    if (driver == 0) {
        probe_status = LORA_E_NO_GPU;
        probe_why = "no CUDA driver (libcuda.so) is installed";
    } else if (e == cudaErrorInsufficientDriver) {
        probe_status = LORA_E_DRIVER;
        probe_why = "the CUDA driver is older than the CUDA runtime liblora was built with";
    } else if (e != cudaSuccess || count <= 0) {
        probe_status = LORA_E_NO_GPU;
        probe_why = e == cudaSuccess ? "the driver reports no CUDA device" : cudaGetErrorString(e);
    } else {
        probe_status = LORA_OK;
        probe_why = "ok";
        probe_count = count;
    }
    cudaGetLastError();   /* clear the non-sticky probe error */
}

lora_status lora_cuda_probe(const char **why, int32_t *n_devices) {
    pthread_once(&probe_once, probe_run);
    if (why) *why = probe_why;
    if (n_devices) *n_devices = probe_count;
    return probe_status;
}

/* ---- error mapping -------------------------------------------------------------------- */
static int cuda_error_sticky(cudaError_t e) {
    switch (e) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchFailure: case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction: case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace: case cudaErrorInvalidPc: case cudaErrorECCUncorrectable:
    case cudaErrorAssert: case cudaErrorLaunchTimeout:
        return 1;
    default:
        return 0;
    }
}

static lora_status cuda_check(struct lora_backend_impl *be, cudaError_t e, const char *what) {
    struct cuda_state *st = be->impl;
    if (e == cudaSuccess) return LORA_OK;
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        size_t avail = 0, total = 0;
        cudaMemGetInfo(&avail, &total);
        return lora_fail(be->ctx, LORA_E_GPU_OOM, "cuda %s: out of device memory (%zu bytes free of %zu)",
                         what, avail, total);
    }
    if (cuda_error_sticky(e)) {
        st->poisoned = 1;
        return lora_fail(be->ctx, LORA_E_GPU_FATAL,
                         "cuda %s: %s; the GPU is unusable in this process until it restarts (CPU work still runs)",
                         what, cudaGetErrorString(e));
    }
    cudaGetLastError();
    return lora_fail(be->ctx, LORA_E_INTERNAL, "cuda %s: %s (%d)", what, cudaGetErrorString(e), (int)e);
}

static lora_status blas_check(struct lora_backend_impl *be, cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return LORA_OK;
    if (s == CUBLAS_STATUS_ALLOC_FAILED)
        return lora_fail(be->ctx, LORA_E_GPU_OOM, "cublas %s: workspace allocation failed", what);
    if (s == CUBLAS_STATUS_EXECUTION_FAILED) return cuda_check(be, cudaGetLastError(), what);
    return lora_fail(be->ctx, LORA_E_INTERNAL, "cublas %s: status %d", what, (int)s);
}

#define CUDA_ALIVE(be) do { if (((struct cuda_state *)(be)->impl)->poisoned) \
    return lora_fail((be)->ctx, LORA_E_GPU_FATAL, "cuda: an earlier sticky error poisoned this GPU context; restart the process"); } while (0)

static cudaStream_t stream_of(struct lora_backend_impl *be) {
    return ((struct cuda_state *)be->impl)->stream;
}

/* ---- buffers -------------------------------------------------------------------------- */
static lora_status cuda_buf_alloc(struct lora_backend_impl *be, size_t bytes, void **out) {
    CUDA_ALIVE(be);
    struct cuda_state *st = be->impl;
    *out = NULL;
    return cuda_check(be, cudaMallocFromPoolAsync(out, bytes ? bytes : 1, st->pool, st->stream), "alloc");
}

static void cuda_buf_free(struct lora_backend_impl *be, void *buf) {
    if (buf && !((struct cuda_state *)be->impl)->poisoned) cudaFreeAsync(buf, stream_of(be));
}

static lora_status cuda_upload(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes) {
    CUDA_ALIVE(be);
    return cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(be)), "upload");
}

static lora_status cuda_download(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes) {
    CUDA_ALIVE(be);
    LORA_TRY(cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_of(be)), "download"));
    /* The host buffer is readable when download returns. */
    return cuda_check(be, cudaStreamSynchronize(stream_of(be)), "download sync");
}

static lora_status cuda_sync(struct lora_backend_impl *be) {
    CUDA_ALIVE(be);
    return cuda_check(be, cudaStreamSynchronize(stream_of(be)), "sync");
}

/* ---- GEMM ----------------------------------------------------------------------------- */
/* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap operands. */
static lora_status cuda_gemm_f32(struct lora_backend_impl *be, int ta, int tb, int64_t m, int64_t n,
                                 int64_t k, float alpha, const float *a, int64_t lda, const float *b,
                                 int64_t ldb, float beta, float *c, int64_t ldc) {
    CUDA_ALIVE(be);
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX || ldc > INT32_MAX)
        return lora_fail(be->ctx, LORA_E_LIMIT, "cuda gemm: dimensions exceed the cuBLAS int range");
    if (m == 0 || n == 0) return LORA_OK;
    struct cuda_state *st = be->impl;
    return blas_check(be, cublasSgemm(st->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      (int)n, (int)m, (int)k, &alpha, b, (int)ldb, a, (int)lda, &beta, c, (int)ldc),
                      "sgemm");
}

#define LT_WORKSPACE_BYTES ((size_t)32 << 20)

static cudaDataType_t cuda_type_of(lora_dtype t) {
    return t == LORA_DTYPE_F16 ? CUDA_R_16F : t == LORA_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* cuBLASLt GEMM with fp16/bf16 (or fp32) inputs and fp32 accumulation and output. Row-major
 * operands are described as their column-major transposes, operands swapped. */
static lora_status cuda_gemm_ex(struct lora_backend_impl *be, int ta, int tb, int64_t m, int64_t n, int64_t k,
                                float alpha, lora_dtype ab_type, const void *a, int64_t lda, const void *b,
                                int64_t ldb, float beta, float *c, int64_t ldc) {
    CUDA_ALIVE(be);
    if (ab_type != LORA_DTYPE_F32 && ab_type != LORA_DTYPE_F16 && ab_type != LORA_DTYPE_BF16)
        return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "cuda gemm_ex: input type %d is not F32, F16 or BF16", ab_type);
    if (m == 0 || n == 0) return LORA_OK;
    struct cuda_state *st = be->impl;
    cudaDataType_t t = cuda_type_of(ab_type);
    cublasOperation_t op_x = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_y = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtMatmulDesc_t desc = NULL;
    cublasLtMatrixLayout_t lx = NULL, ly = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    lora_status s = blas_check(be, cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "lt desc");
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_x, sizeof op_x), "lt transa");
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_y, sizeof op_y), "lt transb");
    /* X = B^T (col-major view of row-major B), Y = A^T, C^T = X Y */
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatrixLayoutCreate(&lx, t, (uint64_t)(tb ? k : n), (uint64_t)(tb ? n : k), ldb), "lt layout B");
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatrixLayoutCreate(&ly, t, (uint64_t)(ta ? m : k), (uint64_t)(ta ? k : m), lda), "lt layout A");
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, (uint64_t)n, (uint64_t)m, ldc), "lt layout C");
    size_t ws = LT_WORKSPACE_BYTES;
    if (s == LORA_OK) s = blas_check(be, cublasLtMatmulPreferenceCreate(&pref), "lt preference");
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                                 sizeof ws), "lt workspace");
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatmulAlgoGetHeuristic(st->lt, desc, lx, ly, lc, lc, pref, 1, &heur, &found),
                       "lt heuristic");
    if (s == LORA_OK && found < 1)
        s = lora_fail(be->ctx, LORA_E_UNSUPPORTED, "cuda gemm_ex: cuBLASLt has no algorithm for m=%lld n=%lld k=%lld",
                      (long long)m, (long long)n, (long long)k);
    if (s == LORA_OK)
        s = blas_check(be, cublasLtMatmul(st->lt, desc, &alpha, b, lx, a, ly, &beta, c, lc, c, lc, &heur.algo,
                                          st->lt_workspace, ws, st->stream), "lt matmul");
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (ly) cublasLtMatrixLayoutDestroy(ly);
    if (lx) cublasLtMatrixLayoutDestroy(lx);
    if (desc) cublasLtMatmulDescDestroy(desc);
    return s;
}

static lora_status cuda_gemm_batched_f32(struct lora_backend_impl *be, int ta, int tb, int64_t m, int64_t n,
                                         int64_t k, float alpha, const float *a, int64_t lda, int64_t sa,
                                         const float *b, int64_t ldb, int64_t sb, float beta, float *c,
                                         int64_t ldc, int64_t sc, int64_t batch) {
    CUDA_ALIVE(be);
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || batch > INT32_MAX)
        return lora_fail(be->ctx, LORA_E_LIMIT, "cuda batched gemm: dimensions exceed the cuBLAS int range");
    if (m == 0 || n == 0 || batch == 0) return LORA_OK;
    struct cuda_state *st = be->impl;
    return blas_check(be, cublasSgemmStridedBatched(st->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                    ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k,
                                                    &alpha, b, (int)ldb, sb, a, (int)lda, sa, &beta, c,
                                                    (int)ldc, sc, (int)batch),
                      "sgemm strided batched");
}

/* ---- elementwise ---------------------------------------------------------------------- */
#define LAUNCH(be, call, what) do { CUDA_ALIVE(be); return cuda_check(be, (cudaError_t)(call), what); } while (0)

static lora_status cuda_axpby_f32(struct lora_backend_impl *be, int64_t n, float alpha, const float *x, float beta, float *y) {
    LAUNCH(be, lk_axpby_f32(stream_of(be), n, alpha, x, beta, y), "axpby");
}
static lora_status cuda_mul_f32(struct lora_backend_impl *be, int64_t n, const float *a, const float *b, float *out) {
    LAUNCH(be, lk_mul_f32(stream_of(be), n, a, b, out), "mul");
}
static lora_status cuda_silu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    LAUNCH(be, lk_silu_f32(stream_of(be), n, x, y), "silu");
}
static lora_status cuda_silu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x, const float *dy, float *dx) {
    LAUNCH(be, lk_silu_backward_f32(stream_of(be), n, x, dy, dx), "silu backward");
}
static lora_status cuda_gelu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    LAUNCH(be, lk_gelu_f32(stream_of(be), n, x, y), "gelu");
}
static lora_status cuda_gelu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x, const float *dy, float *dx) {
    LAUNCH(be, lk_gelu_backward_f32(stream_of(be), n, x, dy, dx), "gelu backward");
}

static lora_status cuda_convert(struct lora_backend_impl *be, int64_t n, lora_dtype st, const void *src,
                                lora_dtype dt, void *dst) {
    CUDA_ALIVE(be);
    int kind = -1;
    if (st == dt) {
        return cuda_check(be, cudaMemcpyAsync(dst, src, (size_t)n * (size_t)(lora_dtype_bits(st) / 8),
                                              cudaMemcpyDeviceToDevice, stream_of(be)), "convert copy");
    }
    if (st == LORA_DTYPE_F32 && dt == LORA_DTYPE_F16) kind = 0;
    else if (st == LORA_DTYPE_F32 && dt == LORA_DTYPE_BF16) kind = 1;
    else if (st == LORA_DTYPE_F16 && dt == LORA_DTYPE_F32) kind = 2;
    else if (st == LORA_DTYPE_BF16 && dt == LORA_DTYPE_F32) kind = 3;
    if (kind < 0) return lora_fail(be->ctx, LORA_E_UNSUPPORTED, "cuda convert: this dtype pair is not supported");
    return cuda_check(be, (cudaError_t)lk_convert(stream_of(be), n, kind, src, dst), "convert");
}

static lora_status cuda_im2col_f32(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h, int64_t w,
                                   int64_t kh, int64_t kw, int64_t stride, int64_t pad, float *cols) {
    if (stride < 1 || pad < 0 || kh < 1 || kw < 1 || h + 2 * pad < kh || w + 2 * pad < kw)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda im2col: kernel does not fit the input");
    LAUNCH(be, lk_im2col_f32(stream_of(be), x, c, h, w, kh, kw, stride, pad, cols), "im2col");
}

/* ---- layer-op primitives (lib/nn) ---------------------------------------------------- */
static lora_status cuda_copy(struct lora_backend_impl *be, void *dst, const void *src, size_t bytes) {
    CUDA_ALIVE(be);
    if (!bytes || dst == src) return LORA_OK;
    return cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_of(be)), "copy");
}
static lora_status cuda_fill_f32(struct lora_backend_impl *be, int64_t n, float value, float *x) {
    LAUNCH(be, lk_fill_f32(stream_of(be), n, value, x), "fill");
}
static lora_status cuda_scale_f32(struct lora_backend_impl *be, int64_t n, float alpha, float *x) {
    LAUNCH(be, lk_scale_f32(stream_of(be), n, alpha, x), "scale");
}
static lora_status cuda_add_rows_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const float *row,
                                     float beta, float *y) {
    LAUNCH(be, lk_add_rows_f32(stream_of(be), n, c, row, beta, y), "add rows");
}
static lora_status cuda_col_sum_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const float *x,
                                    float beta, float *out) {
    LAUNCH(be, lk_col_sum_f32(stream_of(be), n, c, x, beta, out), "column sum");
}
static lora_status cuda_quick_gelu_f32(struct lora_backend_impl *be, int64_t n, const float *x, float *y) {
    LAUNCH(be, lk_quick_gelu_f32(stream_of(be), n, x, y), "quick_gelu");
}
static lora_status cuda_quick_gelu_backward_f32(struct lora_backend_impl *be, int64_t n, const float *x,
                                                const float *dy, float *dx) {
    LAUNCH(be, lk_quick_gelu_backward_f32(stream_of(be), n, x, dy, dx), "quick_gelu backward");
}
static lora_status cuda_layernorm_f32(struct lora_backend_impl *be, int64_t n, int64_t c, float eps,
                                      const float *x, const float *gamma, const float *beta, float *y,
                                      float *mean, float *rstd) {
    LAUNCH(be, lk_layernorm_f32(stream_of(be), n, c, eps, x, gamma, beta, y, mean, rstd), "layernorm");
}
static lora_status cuda_layernorm_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t c,
                                               const float *dy, const float *x, const float *mean,
                                               const float *rstd, const float *gamma, float *dx,
                                               float *d_gamma, float *d_beta, int accumulate) {
    LAUNCH(be, lk_layernorm_backward_f32(stream_of(be), n, c, dy, x, mean, rstd, gamma, dx, d_gamma, d_beta,
                                         accumulate),
           "layernorm backward");
}
static lora_status cuda_softmax_f32(struct lora_backend_impl *be, int64_t rows, int64_t t, int causal, float *x) {
    LAUNCH(be, lk_softmax_f32(stream_of(be), rows, t, causal, x), "softmax");
}
static lora_status cuda_softmax_backward_f32(struct lora_backend_impl *be, int64_t rows, int64_t t,
                                             const float *p, const float *dy, float *dx) {
    LAUNCH(be, lk_softmax_backward_f32(stream_of(be), rows, t, p, dy, dx), "softmax backward");
}

/* The kernel min-reduces the first bad row into st->flag; reading it back synchronises. */
static lora_status cuda_embedding_f32(struct lora_backend_impl *be, int64_t n, int64_t c, const int32_t *ids,
                                      const float *table, const float *pos, int64_t positions,
                                      int64_t vocab, float *y, int64_t *bad_row, int32_t *bad_id) {
    CUDA_ALIVE(be);
    struct cuda_state *st = be->impl;
    *bad_row = -1;
    *bad_id = 0;
    if (n <= 0) return LORA_OK;
    LORA_TRY(cuda_check(be, (cudaError_t)lk_embedding_f32(st->stream, n, c, ids, table, pos, positions, vocab, y,
                                                          st->flag), "embedding"));
    uint64_t first = 0;
    LORA_TRY(cuda_check(be, cudaMemcpyAsync(&first, st->flag, sizeof first, cudaMemcpyDeviceToHost, st->stream),
                        "embedding check"));
    LORA_TRY(cuda_check(be, cudaStreamSynchronize(st->stream), "embedding check sync"));
    if (first == UINT64_MAX) return LORA_OK;
    if (first >= (uint64_t)n)
        return lora_fail(be->ctx, LORA_E_INTERNAL, "cuda embedding: check flag %llu is not a row",
                         (unsigned long long)first);
    int32_t id = 0;
    LORA_TRY(cuda_check(be, cudaMemcpyAsync(&id, ids + first, sizeof id, cudaMemcpyDeviceToHost, st->stream),
                        "embedding bad id"));
    LORA_TRY(cuda_check(be, cudaStreamSynchronize(st->stream), "embedding bad id sync"));
    *bad_row = (int64_t)first;
    *bad_id = id;
    return LORA_OK;
}

static lora_status cuda_embedding_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t c,
                                               const int32_t *ids, const float *dy, int64_t positions,
                                               float *d_table, float *d_pos) {
    LAUNCH(be, lk_embedding_backward_f32(stream_of(be), n, c, ids, dy, positions, d_table, d_pos),
           "embedding backward");
}

static void cuda_memory(struct lora_backend_impl *be, uint64_t *used, uint64_t *avail) {
    struct cuda_state *st = be->impl;
    uint64_t cur = 0;
    size_t f = 0, t = 0;
    cudaMemPoolGetAttribute(st->pool, cudaMemPoolAttrUsedMemCurrent, &cur);
    cudaMemGetInfo(&f, &t);
    cudaGetLastError();
    *used = cur;
    *avail = f;
}

static void cuda_free(struct lora_backend_impl *be) {
    struct cuda_state *st = be->impl;
    if (st) {
        if (!st->poisoned) cudaStreamSynchronize(st->stream);
        if (st->lt_workspace && !st->poisoned) cudaFreeAsync(st->lt_workspace, st->stream);
        if (st->flag && !st->poisoned) cudaFreeAsync(st->flag, st->stream);
        if ((st->lt_workspace || st->flag) && !st->poisoned) cudaStreamSynchronize(st->stream);
        if (st->lt) cublasLtDestroy(st->lt);
        if (st->blas) cublasDestroy(st->blas);
        if (st->pool) cudaMemPoolDestroy(st->pool);
        if (st->stream) cudaStreamDestroy(st->stream);
        cudaGetLastError();
        lora_free(NULL, st);
    }
    lora_free(NULL, be);
}

/* ---- image-op primitives (kernels/image.cu) ------------------------------------------- */
static lora_status cuda_im2col_ex_f32(struct lora_backend_impl *be, const float *x, int64_t c, int64_t h, int64_t w,
                                      int64_t kh, int64_t kw, int64_t stride, int64_t pad_t, int64_t pad_l,
                                      int64_t oh, int64_t ow, float *cols) {
    if (c < 0 || h < 1 || w < 1 || kh < 1 || kw < 1 || stride < 1 || oh < 0 || ow < 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda im2col_ex: bad shape");
    LAUNCH(be, lk_im2col_ex_f32(stream_of(be), x, c, h, w, kh, kw, stride, pad_t, pad_l, oh, ow, cols), "im2col_ex");
}
static lora_status cuda_col2im_f32(struct lora_backend_impl *be, const float *cols, int64_t c, int64_t h, int64_t w,
                                   int64_t kh, int64_t kw, int64_t stride, int64_t pad_t, int64_t pad_l, int64_t oh,
                                   int64_t ow, float *x, int accumulate) {
    if (c < 0 || h < 1 || w < 1 || kh < 1 || kw < 1 || stride < 1 || oh < 0 || ow < 0)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda col2im: bad shape");
    LAUNCH(be, lk_col2im_f32(stream_of(be), cols, c, h, w, kh, kw, stride, pad_t, pad_l, oh, ow, x, accumulate),
           "col2im");
}
static lora_status cuda_add_row_scalar_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols, const float *v,
                                           int64_t period, float *y) {
    if (rows < 0 || cols < 0 || period < 1) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda add_row_scalar: bad shape");
    LAUNCH(be, lk_add_row_scalar_f32(stream_of(be), rows, cols, v, period, y), "add_row_scalar");
}
static lora_status cuda_row_sum_f32(struct lora_backend_impl *be, int64_t rows, int64_t cols, const float *x,
                                    float beta, float *out) {
    if (rows < 0 || cols < 0) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda row_sum: bad shape");
    LAUNCH(be, lk_row_sum_f32(stream_of(be), rows, cols, x, beta, out), "row_sum");
}
static lora_status cuda_groupnorm_f32(struct lora_backend_impl *be, int64_t batch, int64_t c, int64_t hw,
                                      int64_t groups, float eps, int silu, const float *x, const float *gamma,
                                      const float *beta, float *y, float *mean, float *rstd) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda groupnorm: bad shape");
    LAUNCH(be, lk_groupnorm_f32(stream_of(be), batch, c, hw, groups, eps, silu, x, gamma, beta, y, mean, rstd),
           "groupnorm");
}
static lora_status cuda_groupnorm_backward_f32(struct lora_backend_impl *be, int64_t batch, int64_t c, int64_t hw,
                                               int64_t groups, int silu, const float *dy, const float *x,
                                               const float *mean, const float *rstd, const float *gamma,
                                               const float *beta, float *dx, int accumulate) {
    if (batch < 0 || c < 1 || hw < 1 || groups < 1 || c % groups)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda groupnorm backward: bad shape");
    LAUNCH(be, lk_groupnorm_backward_f32(stream_of(be), batch, c, hw, groups, silu, dy, x, mean, rstd, gamma, beta,
                                         dx, accumulate), "groupnorm backward");
}
static lora_status cuda_upsample2x_f32(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                                       const float *x, float *y) {
    if (planes < 0 || h < 1 || w < 1) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda upsample2x: bad shape");
    LAUNCH(be, lk_upsample2x_f32(stream_of(be), planes, h, w, x, y), "upsample2x");
}
static lora_status cuda_upsample2x_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                                                const float *dy, float *dx) {
    if (planes < 0 || h < 1 || w < 1) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda upsample2x backward: bad shape");
    LAUNCH(be, lk_upsample2x_backward_f32(stream_of(be), planes, h, w, dy, dx), "upsample2x backward");
}
static lora_status cuda_upsample_nearest_f32(struct lora_backend_impl *be, int64_t planes, int64_t h, int64_t w,
                                             int64_t oh, int64_t ow, const float *x, float *y) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda upsample nearest: bad shape");
    LAUNCH(be, lk_upsample_nearest_f32(stream_of(be), planes, h, w, oh, ow, x, y), "upsample nearest");
}
static lora_status cuda_upsample_nearest_backward_f32(struct lora_backend_impl *be, int64_t planes, int64_t h,
                                                      int64_t w, int64_t oh, int64_t ow, const float *dy,
                                                      float *dx) {
    if (planes < 0 || h < 1 || w < 1 || oh < 1 || ow < 1)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda upsample nearest backward: bad shape");
    LAUNCH(be, lk_upsample_nearest_backward_f32(stream_of(be), planes, h, w, oh, ow, dy, dx),
           "upsample nearest backward");
}
static lora_status cuda_geglu_f32(struct lora_backend_impl *be, int64_t n, int64_t inner, const float *x, float *y) {
    if (n < 0 || inner < 1) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda geglu: bad shape");
    LAUNCH(be, lk_geglu_f32(stream_of(be), n, inner, x, y), "geglu");
}
static lora_status cuda_geglu_backward_f32(struct lora_backend_impl *be, int64_t n, int64_t inner, const float *x,
                                           const float *dy, float *dx) {
    if (n < 0 || inner < 1) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda geglu backward: bad shape");
    LAUNCH(be, lk_geglu_backward_f32(stream_of(be), n, inner, x, dy, dx), "geglu backward");
}
static lora_status cuda_timestep_embedding_f32(struct lora_backend_impl *be, int64_t batch, int64_t dim,
                                               const float *t, int flip_sin_to_cos, float freq_shift,
                                               float max_period, float *y) {
    if (batch < 0 || dim < 2 || (float)(dim / 2) == freq_shift)
        return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda timestep embedding: bad shape");
    LAUNCH(be, lk_timestep_embedding_f32(stream_of(be), batch, dim, t, flip_sin_to_cos, freq_shift, max_period, y),
           "timestep embedding");
}
static lora_status cuda_clamp_f32(struct lora_backend_impl *be, int64_t n, float lo, float hi, float *x) {
    if (n < 0) return lora_fail(be->ctx, LORA_E_INVALID_ARG, "cuda clamp: bad shape");
    LAUNCH(be, lk_clamp_f32(stream_of(be), n, lo, hi, x), "clamp");
}

static const struct lora_backend_iface cuda_iface = {
    .version = LORA_BACKEND_IFACE_VERSION,
    .name = "cuda",
    .free = cuda_free,
    .buf_alloc = cuda_buf_alloc,
    .buf_free = cuda_buf_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .sync = cuda_sync,
    .gemm_f32 = cuda_gemm_f32,
    .gemm_ex = cuda_gemm_ex,
    .gemm_batched_f32 = cuda_gemm_batched_f32,
    .axpby_f32 = cuda_axpby_f32,
    .mul_f32 = cuda_mul_f32,
    .silu_f32 = cuda_silu_f32,
    .silu_backward_f32 = cuda_silu_backward_f32,
    .gelu_f32 = cuda_gelu_f32,
    .gelu_backward_f32 = cuda_gelu_backward_f32,
    .convert = cuda_convert,
    .im2col_f32 = cuda_im2col_f32,
    .memory = cuda_memory,
    .copy = cuda_copy,
    .fill_f32 = cuda_fill_f32,
    .scale_f32 = cuda_scale_f32,
    .add_rows_f32 = cuda_add_rows_f32,
    .col_sum_f32 = cuda_col_sum_f32,
    .quick_gelu_f32 = cuda_quick_gelu_f32,
    .quick_gelu_backward_f32 = cuda_quick_gelu_backward_f32,
    .layernorm_f32 = cuda_layernorm_f32,
    .layernorm_backward_f32 = cuda_layernorm_backward_f32,
    .softmax_f32 = cuda_softmax_f32,
    .softmax_backward_f32 = cuda_softmax_backward_f32,
    .embedding_f32 = cuda_embedding_f32,
    .embedding_backward_f32 = cuda_embedding_backward_f32,
    .im2col_ex_f32 = cuda_im2col_ex_f32,
    .col2im_f32 = cuda_col2im_f32,
    .add_row_scalar_f32 = cuda_add_row_scalar_f32,
    .row_sum_f32 = cuda_row_sum_f32,
    .groupnorm_f32 = cuda_groupnorm_f32,
    .groupnorm_backward_f32 = cuda_groupnorm_backward_f32,
    .upsample2x_f32 = cuda_upsample2x_f32,
    .upsample2x_backward_f32 = cuda_upsample2x_backward_f32,
    .upsample_nearest_f32 = cuda_upsample_nearest_f32,
    .upsample_nearest_backward_f32 = cuda_upsample_nearest_backward_f32,
    .geglu_f32 = cuda_geglu_f32,
    .geglu_backward_f32 = cuda_geglu_backward_f32,
    .timestep_embedding_f32 = cuda_timestep_embedding_f32,
    .clamp_f32 = cuda_clamp_f32,
};

lora_status lora_backend_cuda_create(lora_ctx *ctx, int32_t device, struct lora_backend_impl **out) {
    *out = NULL;
    const char *why = NULL;
    int32_t count = 0;
    lora_status s = lora_cuda_probe(&why, &count);
    if (s != LORA_OK) return lora_fail(ctx, s, "cuda backend: %s", why);
    if (device >= count)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "cuda backend: device %d requested, %d present", device, count);

    struct lora_backend_impl *be = lora_malloc(NULL, sizeof *be);
    struct cuda_state *st = lora_calloc(NULL, 1, sizeof *st);
    if (!be || !st) {
        lora_free(NULL, be);
        lora_free(NULL, st);
        return lora_fail(ctx, LORA_E_NOMEM, "cuda backend: out of host memory");
    }
    be->iface = &cuda_iface;
    be->ctx = ctx;
    be->impl = st;
    st->device = device;

    /* cudaSetDevice binds the calling thread to the device; documented in lora.h. */
    s = cuda_check(be, cudaSetDevice(device), "set device");
    if (s == LORA_OK) s = cuda_check(be, cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking), "stream");
    if (s == LORA_OK) {
        struct cudaMemPoolProps props;
        memset(&props, 0, sizeof props);
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = device;
        s = cuda_check(be, cudaMemPoolCreate(&st->pool, &props), "memory pool");
        if (s == LORA_OK) {
            uint64_t keep = UINT64_MAX;   /* keep freed blocks cached between steps */
            cudaMemPoolSetAttribute(st->pool, cudaMemPoolAttrReleaseThreshold, &keep);
        }
    }
    if (s == LORA_OK) s = blas_check(be, cublasCreate(&st->blas), "create");
    if (s == LORA_OK) s = blas_check(be, cublasLtCreate(&st->lt), "lt create");
    if (s == LORA_OK)
        s = cuda_check(be, cudaMallocFromPoolAsync(&st->lt_workspace, LT_WORKSPACE_BYTES, st->pool, st->stream),
                       "lt workspace");
    if (s == LORA_OK)
        s = cuda_check(be, cudaMallocFromPoolAsync((void **)&st->flag, sizeof *st->flag, st->pool, st->stream),
                       "flag word");
    if (s == LORA_OK) s = blas_check(be, cublasSetStream(st->blas, st->stream), "set stream");
    /* fp32 means fp32: no silent TF32 (parity with the CPU backend). */
    if (s == LORA_OK) s = blas_check(be, cublasSetMathMode(st->blas, CUBLAS_PEDANTIC_MATH), "math mode");
    if (s != LORA_OK) {
        cuda_free(be);
        return s;
    }
    *out = be;
    return LORA_OK;
}
