#!/bin/sh
# On a machine with an NVIDIA GPU: build with CUDA for the local architecture, run the cuda
# suite (kernels against the CPU backend) and the CPU unit suite.
# usage: scripts/gpu-suite.sh [gpu_arch, default 90]
set -eu
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
arch=${1:-90}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[ -f build-gpu/build.ninja ] || meson setup build-gpu -Dcuda=enabled -Dgpu_arch="$arch" -Dbuildtype=release
ninja -C build-gpu
meson test -C build-gpu --suite cuda --suite unit --print-errorlogs
# No GPU benchmark exists yet (the first CUDA kernels are elementwise; GEMM is cuBLAS):
# GPU benchmarks against PyTorch/cuBLAS arrive with the fused kernels of issue 6.
echo "gpu-suite: cuda suite done; no GPU benchmarks yet"
