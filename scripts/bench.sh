#!/bin/sh
# CPU benchmarks with their peer measured in the same run: liblora's CPU backend against
# numpy (OpenBLAS) on the same shapes, printed as ratios with the machine description.
# usage: scripts/bench.sh [reps]      GEMM / conv against numpy
#        scripts/bench.sh clip [reps] CLIP-L text encoder forward / LoRA step against transformers
#                                     on PyTorch CPU (needs tests/reference/.venv)
#        scripts/bench.sh load [reps] checkpoint load against safetensors/torch.load (needs
#                                     tests/reference/.venv, see tests/reference/README.md;
#                                     writes ~4.3 GB of SD 1.5-sized files under build-bench/)
#        scripts/bench.sh unet [reps] SD1.5-shaped U-Net forward / forward+backward against
#                                     diffusers on PyTorch CPU (needs tests/reference/.venv)
#        scripts/bench.sh tokenizer [reps] CLIP tokenizer prompts/s against transformers (+ ftfy)
#        scripts/bench.sh ops [all]   LoRA extraction of the 264 SD1.5 modules at dim 64 (exact and
#                                     randomized SVD) against torch.linalg.svd on PyTorch CPU
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
# scripts/bench.sh unet [reps]: SD1.5-shaped U-Net forward and forward+backward (input grads)
# against diffusers UNet2DConditionModel on PyTorch CPU (needs tests/reference/.venv)
if [ "${1:-}" = "unet" ]; then
    reps=${2:-1}
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench bench/bench_unet >/dev/null
    py=tests/reference/.venv/bin/python
    [ -f build-bench/sd15_random.safetensors ] || $py bench/load_peer.py write build-bench
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    ours=$(mktemp); peer=$(mktemp)
    trap 'rm -f "$ours" "$peer"' EXIT
    build-bench/bench/bench_unet "$reps" > "$ours"
    $py bench/unet_peer.py "$reps" "$(nproc)" > "$peer"
    grep '^#' "$ours"; grep '^#' "$peer"
    printf '%-14s %12s %12s %8s\n' case "liblora s" "pytorch s" ratio
    grep -v '^#' "$ours" | while read -r name v; do
        p=$(awk -v n="$name" '$1 == n {print $2}' "$peer")
        printf '%-14s %12s %12s %8s\n' "$name" "$v" "${p:--}" "$(awk -v a="$v" -v b="$p" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", b / a; else print "-" }')"
    done
    echo "(ratio = pytorch time / liblora time: > 1 means liblora is faster, this machine, this run)"
    exit 0
fi
# scripts/bench.sh tokenizer [reps]: CLIP tokenizer prompts/s against transformers' slow
# CLIPTokenizer with ftfy (the peer needs tests/reference/.venv, see tests/reference/README.md)
if [ "${1:-}" = "tokenizer" ]; then
    reps=${2:-200}
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench bench/bench_tokenizer >/dev/null
    fixture=tests/data/tokenizer/reference_ids.json
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    ours=$(mktemp); peer=$(mktemp)
    trap 'rm -f "$ours" "$peer"' EXIT
    build-bench/bench/bench_tokenizer "$reps" "$fixture" > "$ours"
    tests/reference/.venv/bin/python bench/tokenizer_peer.py "$(( reps / 40 + 1 ))" "$fixture" > "$peer"
    grep '^#' "$ours"; grep '^#' "$peer"
    printf '%-14s %16s %16s %8s\n' case "liblora prompt/s" "python prompt/s" ratio
    grep -v '^#' "$ours" | while read -r name v; do
        p=$(awk -v n="$name" '$1 == n {print $2}' "$peer")
        printf '%-14s %16s %16s %8s\n' "$name" "$v" "${p:--}" "$(awk -v a="$v" -v b="$p" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }')"
    done
    echo "(ratio > 1: liblora faster than the peer on this machine in this run; _cold has no peer)"
    exit 0
fi
# scripts/bench.sh ops [all|subset]: extraction of the 264 SD1.5-size LoRA modules at dim 64,
# exact and randomized SVD, against torch.linalg.svd (full matrices as kohya, and economy) on
# PyTorch CPU with the same threads (needs tests/reference/.venv). The peer always times one module
# per distinct shape and scales by the shape's count; ours too unless "all".
if [ "${1:-}" = "ops" ]; then
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench bench/bench_ops >/dev/null
    py=tests/reference/.venv/bin/python
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    ours=$(mktemp); peer=$(mktemp)
    trap 'rm -f "$ours" "$peer"' EXIT
    build-bench/bench/bench_ops "${2:-subset}" > "$ours"
    threads=$(sed -n 's/.*threads(openblas): \([0-9]*\).*/\1/p' "$ours")
    $py bench/ops_peer.py "${threads:-$(nproc)}" > "$peer"
    grep '^#' "$ours"; grep '^#' "$peer"
    printf '%-20s %12s\n' case seconds
    grep -v '^#' "$ours" | while read -r name v; do printf '%-20s %12s  (liblora)\n' "$name" "$v"; done
    grep -v '^#' "$peer" | while read -r name v; do printf '%-20s %12s  (torch)\n' "torch_$name" "$v"; done
    le=$(awk '$1 == "extract_exact" {print $2}' "$ours"); lr=$(awk '$1 == "extract_randomized" {print $2}' "$ours")
    pf=$(awk '$1 == "extract_exact" {print $2}' "$peer"); pe=$(awk '$1 == "extract_economy" {print $2}' "$peer")
    awk -v le="$le" -v lr="$lr" -v pf="$pf" -v pe="$pe" 'BEGIN {
        printf "ratios: torch full / ours exact %.2fx, torch economy / ours exact %.2fx, torch full / ours randomized %.2fx, ours exact / ours randomized %.2fx\n", pf / le, pe / le, pf / lr, le / lr }'
    echo "(ratio > 1: liblora faster, this machine, this run)"
    exit 0
fi
if [ "${1:-}" = "load" ]; then
    reps=${2:-3}
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench bench/bench_load >/dev/null
    py=tests/reference/.venv/bin/python
    [ -f build-bench/sd15_random.ckpt ] || $py bench/load_peer.py write build-bench
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
    ls -la build-bench/sd15_random.safetensors build-bench/sd15_random.ckpt | awk '{print $9, $5, "bytes"}'
    build-bench/bench/bench_load "$reps" build-bench/sd15_random.safetensors build-bench/sd15_random.ckpt
    $py bench/load_peer.py time build-bench "$reps"
    # the real SD shapes exercise the LDM -> diffusers path the tiny test models cannot
    ninja -C build-bench tools/lora >/dev/null
    rm -rf build-bench/sd15_diffusers build-bench/sd15_back.safetensors
    start=$(date +%s.%N)
    build-bench/tools/lora convert build-bench/sd15_random.safetensors build-bench/sd15_diffusers 2>/dev/null
    build-bench/tools/lora convert build-bench/sd15_diffusers build-bench/sd15_back.safetensors 2>/dev/null
    echo "convert LDM -> diffusers -> LDM: $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s"
    $py bench/load_peer.py check build-bench/sd15_random.safetensors build-bench/sd15_back.safetensors \
        build-bench/sd15_diffusers 2>/dev/null
    exit 0
fi
if [ "${1:-}" = "clip" ]; then
    reps=${2:-5}
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench bench/bench_clip >/dev/null
    py=tests/reference/.venv/bin/python
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    ours=$(mktemp); peer=$(mktemp)
    trap 'rm -f "$ours" "$peer"' EXIT
    build-bench/bench/bench_clip "$reps" > "$ours"
    threads=$(sed -n 's/^# threads(ctx): //p' "$ours")
    $py bench/clip_peer.py "$reps" "${threads:-$(nproc)}" > "$peer"
    grep '^#' "$ours"; grep '^#' "$peer"
    printf '%-22s %12s %12s %8s\n' case "liblora ms" "torch ms" ratio
    grep -v '^#' "$ours" | while read -r name ms; do
        pms=$(awk -v n="$name" '$1 == n {print $2}' "$peer")
        printf '%-22s %12s %12s %8s\n' "$name" "$ms" "$pms" "$(awk -v a="$ms" -v b="$pms" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", b / a; else print "-" }')"
    done
    echo "(ratio = torch time / liblora time: > 1 means liblora is faster on this machine in this run)"
    exit 0
fi
for p in python3-numpy python3-threadpoolctl; do   # the peer, and the report of its BLAS
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || \
        { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
reps=${1:-7}
[ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
ninja -C build-bench bench/bench_gemm >/dev/null

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-unset} OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
ours=$(mktemp); peer=$(mktemp)
trap 'rm -f "$ours" "$peer"' EXIT
build-bench/bench/bench_gemm "$reps" > "$ours"
/usr/bin/python3 bench/peer_numpy.py "$reps" > "$peer"
grep '^#' "$ours"; grep '^#' "$peer"
printf '%-30s %12s %12s %8s\n' case "liblora GF/s" "numpy GF/s" ratio
grep -v '^#' "$ours" | while read -r name gf ms; do
    pgf=$(awk -v n="$name" '$1 == n {print $2}' "$peer")
    printf '%-30s %12s %12s %8s\n' "$name" "$gf" "$pgf" "$(awk -v a="$gf" -v b="$pgf" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')"
done
echo "(ratio > 1: liblora faster than the peer on this machine in this run)"
