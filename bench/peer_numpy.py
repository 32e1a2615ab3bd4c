"""The peer for bench_gemm: the same shapes through numpy (OpenBLAS) in the same run.
Prints "name gflops ms" lines like bench_gemm, plus which BLAS numpy used."""
import sys
import time

import numpy as np

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
try:
    from threadpoolctl import threadpool_info
    for info in threadpool_info():
        print("# numpy blas: %s %s core=%s threads=%s" % (info.get("internal_api"), info.get("version"),
              info.get("architecture"), info.get("num_threads")))
except ImportError:
    print("# numpy blas: (threadpoolctl not installed) numpy %s" % np.__version__)

rng = np.random.default_rng(0)


def median_time(fn):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


for name, m, n, k in [("gemm_proj_4096x320x320", 4096, 320, 320), ("gemm_ff_1024x2560x640", 1024, 2560, 640),
                      ("gemm_attn_qk_1024x1024x40", 1024, 1024, 40), ("gemm_lora_down_4096x32x320", 4096, 32, 320)]:
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    t = median_time(lambda: np.matmul(a, b, out=c))
    print("%s %.2f %.3f" % (name, 2.0 * m * n * k / t * 1e-9, t * 1e3))


m, n, k = 4096, 320, 320
a = rng.standard_normal((m, k), dtype=np.float32)
b = rng.standard_normal((k, n), dtype=np.float32)
c = rng.standard_normal((m, n), dtype=np.float32)
y = np.empty_like(c)


def silu_then_gemm():
    np.multiply(c, 1.0 / (1.0 + np.exp(-c)), out=y)
    np.matmul(a, b, out=c)


t = median_time(silu_then_gemm)
print("silu_then_gemm_4096x320x320 %.2f %.3f" % (2.0 * m * n * k / t * 1e-9, t * 1e3))


def im2col(x, cols):
    C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    v = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # C,H,W,3,3
    cols.reshape(C, 3, 3, H, W)[...] = v.transpose(0, 3, 4, 1, 2)


for name, C, H, W, F in [("conv3x3_320to320_64x64", 320, 64, 64, 320), ("conv3x3_640to640_32x32", 640, 32, 32, 640),
                         ("conv3x3_4to320_64x64", 4, 64, 64, 320)]:
    x = rng.standard_normal((C, H, W), dtype=np.float32)
    w = rng.standard_normal((F, C * 9), dtype=np.float32)
    cols = np.empty((C * 9, H * W), dtype=np.float32)
    y = np.empty((F, H * W), dtype=np.float32)

    def run():
        im2col(x, cols)
        np.matmul(w, cols, out=y)
    t = median_time(run)
    print("%s %.2f %.3f" % (name, 2.0 * F * H * W * C * 9 / t * 1e-9, t * 1e3))
