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
#        scripts/bench.sh generate [steps] [size]  lora_generate (CFG step, VAE decode, peak memory,
#                                     LoRA runtime vs merged) against diffusers' pipeline on PyTorch CPU
#        scripts/bench.sh ops [all]   LoRA extraction of the 264 SD1.5 modules at dim 64 (exact and
#                                     randomized SVD) against torch.linalg.svd on PyTorch CPU
#        scripts/bench.sh train [reps] LoRA training step (SD1.5 shapes, 512x512, cached latents, TE LoRA)
#                                     with/without gradient checkpointing against PyTorch CPU
#        scripts/bench.sh merge [MODEL] [RANK] [REPS] streamed merge of a rank-128 LoRA into an
#                                     SD1.5-size fp16 model against cat / cp of the same bytes, peak
#                                     RSS; REPS runs and the best merge / cp ratio
#        scripts/bench.sh hash [reps] [FILE] lora_file_hash SHA-256 MB/s on a page-cached file (default: a
#                                     1 GiB safetensors-shaped file under build-bench/) against Python
#                                     hashlib and sha256sum
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh

py=tests/reference/.venv/bin/python
ours=$(mktemp); peer=$(mktemp)
trap 'rm -f "$ours" "$peer"' EXIT

# build_bench TARGET...: release build of the benchmark targets (no CUDA) in build-bench/
build_bench() {
    [ -f build-bench/build.ninja ] || meson setup build-bench -Dcuda=disabled -Dbuildtype=release >/dev/null
    ninja -C build-bench "$@" >/dev/null
}

machine() {
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores$*"
    # Which OpenBLAS kernels run: OPENBLAS_CORETYPE overrides the library's own CPU detection
    # (e.g. Haswell = AVX2 on an AVX-512 CPU, about half the sgemm rate), so say both.
    core='import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); l.openblas_get_corename.restype=ctypes.c_char_p; print(l.openblas_get_corename().decode())'
    lib=$(ls /usr/lib/*/openblas-openmp/libopenblas.so.0 2>/dev/null | head -n 1)
    if [ -n "$lib" ]; then
        echo "openblas kernels: $(python3 -c "$core" "$lib" 2>/dev/null || echo '?') (OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}; detected without it: $(env -u OPENBLAS_CORETYPE python3 -c "$core" "$lib" 2>/dev/null || echo '?'))"
    fi
}

# table WIDTH OURS_LABEL PEER_LABEL time|rate: both sides' "# ..." lines, then one row per case
# of $ours ("name value ...") with the peer's value for the same name and the ratio, always
# oriented so that > 1 means liblora is faster.
table() {
    w=$1 kind=$4
    grep '^#' "$ours" || true; grep '^#' "$peer" || true
    printf "%-${w}s %16s %16s %8s\n" case "$2" "$3" ratio
    grep -v '^#' "$ours" | while read -r name v rest; do
        p=$(awk -v n="$name" '$1 == n {print $2}' "$peer")
        r=$(awk -v a="$v" -v b="$p" -v k="$kind" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", k == "time" ? b / a : a / b; else print "-" }')
        printf "%-${w}s %16s %16s %8s\n" "$name" "$v" "${p:--}" "$r"
    done
    echo "(ratio > 1: liblora faster than the peer on this machine in this run)"
}
# hash [reps] [FILE]: lora_file_hash (SHA-256 of the whole file, as A1111's "Model hash"; the
# addnet data-region hash) in MB/s with the file in the page cache, against Python's hashlib
# (1 MiB reads) and coreutils sha256sum on the same file; the digests must agree
if [ "${1:-}" = "hash" ]; then
    reps=${2:-3}
    f=${3:-build-bench/hash_1g.safetensors}
    build_bench bench/bench_hash
    if [ ! -f "$f" ]; then
        # 8-byte header length, an 8-byte "{}" header, then random bytes to 1 GiB
        { printf '\010\000\000\000\000\000\000\000{}      '; head -c $((1073741824 - 16)) /dev/urandom; } > "$f"
    fi
    machine ", $(python3 -c 'import ssl; print(ssl.OPENSSL_VERSION)'), $(sha256sum --version | head -n 1)"
    build-bench/bench/bench_hash "$reps" "$f" > "$ours"
    python3 - "$reps" "$f" > "$peer" <<'PY'
import hashlib, os, statistics, subprocess, sys, time
reps, path = int(sys.argv[1]), sys.argv[2]
mb = os.path.getsize(path) / 1e6
def py():
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for b in iter(lambda: f.read(1 << 20), b''):
            h.update(b)
    return h.hexdigest()
def med(fn):
    fn()
    t = []
    for _ in range(reps):
        s = time.perf_counter(); out = fn(); t.append(time.perf_counter() - s)
    return statistics.median(t), out
t, hx = med(py)
ts, out = med(lambda: subprocess.run(['sha256sum', path], capture_output=True, check=True).stdout.split()[0].decode())
print(f'# hashlib sha256 {hx}')
print(f'# sha256sum: {mb / ts:.0f} MB/s ({out == hx and "same digest" or "DIGEST DIFFERS"})')
print(f'sha256 {mb / t:.0f}')
PY
    table 16 "liblora MB/s" "hashlib MB/s" rate
    a=$(sed -n 's/^# sha256 //p' "$ours"); b=$(sed -n 's/^# hashlib sha256 //p' "$peer")
    [ -n "$a" ] && [ "$a" = "$b" ] && echo "digests agree: $a" || { echo "DIGESTS DIFFER: liblora $a, hashlib $b"; exit 1; }
    exit 0
fi
# train [reps]: seconds per LoRA training step (SD1.5 shapes, 512x512, batch 1, cached latents,
# text-encoder LoRA on, AdamW) with and without gradient checkpointing, peak memory, against
# diffusers + transformers + kohya's LoRA math on PyTorch CPU with the same threads
if [ "${1:-}" = "train" ]; then
    reps=${2:-1}
    build_bench bench/bench_train
    [ -f build-bench/sd15_random.safetensors ] || $py bench/load_peer.py write build-bench
    machine
    OMP_NUM_THREADS=$(nproc) build-bench/bench/bench_train "$reps" > "$ours"
    $py bench/train_peer.py "$reps" "$(nproc)" > "$peer"
    table 18 "liblora s" "pytorch s" time
    exit 0
fi
# generate [steps] [size]: lora_generate seconds per CFG step, VAE decode, peak memory, LoRA
# runtime vs merged, against diffusers' StableDiffusionPipeline (SD1.5 shapes, random weights)
if [ "${1:-}" = "generate" ]; then
    steps=${2:-3} size=${3:-512}
    build_bench bench/bench_generate
    [ -f build-bench/sd15_random.safetensors ] || $py bench/load_peer.py write build-bench
    machine
    OMP_NUM_THREADS=$(nproc) build-bench/bench/bench_generate "$steps" "$size" > "$ours"
    $py bench/generate_peer.py "$steps" "$size" "$(nproc)" > "$peer"
    table 22 "liblora s" "pytorch s" time
    exit 0
fi
# unet [reps]: SD1.5-shaped U-Net forward and forward+backward (input grads) against diffusers
if [ "${1:-}" = "unet" ]; then
    reps=${2:-1}
    build_bench bench/bench_unet
    [ -f build-bench/sd15_random.safetensors ] || $py bench/load_peer.py write build-bench
    machine
    build-bench/bench/bench_unet "$reps" > "$ours"
    $py bench/unet_peer.py "$reps" "$(nproc)" > "$peer"
    table 14 "liblora s" "pytorch s" time
    exit 0
fi
# tokenizer [reps]: prompts/s against transformers' slow CLIPTokenizer with ftfy
if [ "${1:-}" = "tokenizer" ]; then
    reps=${2:-200}
    build_bench bench/bench_tokenizer
    fixture=tests/data/tokenizer/reference_ids.json
    machine
    build-bench/bench/bench_tokenizer "$reps" "$fixture" > "$ours"
    $py bench/tokenizer_peer.py "$(( reps / 40 + 1 ))" "$fixture" > "$peer"
    table 14 "liblora prompt/s" "python prompt/s" rate
    echo "(_cold has no peer)"
    exit 0
fi
# scripts/bench.sh ops [all|subset]: extraction of the 264 SD1.5-size LoRA modules at dim 64,
# exact and randomized SVD, against torch.linalg.svd (full matrices as kohya, and economy) on
# PyTorch CPU with the same threads (needs tests/reference/.venv). The peer always times one module
# per distinct shape and scales by the shape's count; ours too unless "all".
if [ "${1:-}" = "ops" ]; then
    build_bench bench/bench_ops
    machine
    # bench_ops exits 2 (a FAIL line on stderr) when a randomized module is over 1.01x the exact
    # error: set -e stops the script there
    build-bench/bench/bench_ops "${2:-subset}" > "$ours"
    threads=$(sed -n 's/.*threads(openblas): \([0-9]*\).*/\1/p' "$ours")
    $py bench/ops_peer.py "${threads:-$(nproc)}" > "$peer"
    grep '^#' "$ours"; grep '^#' "$peer"
    printf '%-20s %12s\n' case seconds
    grep -v '^#' "$ours" | while read -r name v; do printf '%-20s %12s  (liblora)\n' "$name" "$v"; done
    # the randomized method again on OpenBLAS's own kernel choice when OPENBLAS_CORETYPE forces one
    # (AVX2 kernels on an AVX-512 CPU: about half the sgemm rate)
    if [ -n "${OPENBLAS_CORETYPE:-}" ]; then
        env -u OPENBLAS_CORETYPE build-bench/bench/bench_ops "${2:-subset}" nogesdd |
            awk '$1 == "extract_randomized" {printf "%-20s %12s  (liblora, OPENBLAS_CORETYPE unset)\n", $1, $2}'
    fi
    grep -v '^#' "$peer" | while read -r name v; do printf '%-20s %12s  (torch)\n' "torch_$name" "$v"; done
    le=$(awk '$1 == "extract_exact" {print $2}' "$ours"); lr=$(awk '$1 == "extract_randomized" {print $2}' "$ours")
    pf=$(awk '$1 == "extract_exact" {print $2}' "$peer"); pe=$(awk '$1 == "extract_economy" {print $2}' "$peer")
    awk -v le="$le" -v lr="$lr" -v pf="$pf" -v pe="$pe" 'BEGIN {
        printf "ratios: torch full / ours exact %.2fx, torch economy / ours exact %.2fx, torch full / ours randomized %.2fx, ours exact / ours randomized %.2fx\n", pf / le, pe / le, pf / lr, le / lr }'
    echo "(ratio > 1: liblora faster, this machine, this run)"
    exit 0
fi
# merge [MODEL] [RANK] [REPS]: streamed merge (lora merge --sd_model) of a random rank-128 LoRA into
# an SD1.5-size fp16 model against cat / cp of the same file, measured by bench_merge in one run;
# REPS (default 1) runs, each with its own cp, then the best merge / cp ratio (a shared machine)
if [ "${1:-}" = "merge" ]; then
    build_bench bench/bench_merge
    model=${2:-build-bench/sd15_random.safetensors}
    [ -f "$model" ] || $py bench/load_peer.py write build-bench
    machine ", $(free -g | awk '/Mem:/ {print $2}') GiB"
    best=""
    for rep in $(seq "${4:-1}"); do
        build-bench/bench/bench_merge "$model" build-bench "${3:-128}" > "$ours"
        [ "$rep" -gt 1 ] || grep '^# model' "$ours"
        grep '^#' "$ours" | grep -v '^# model'
        grep -v '^#' "$ours" | while read -r name v; do printf '%-10s %10s s\n' "$name" "$v"; done
        r=$(awk '$1 == "merge" {m = $2} $1 == "cp" {c = $2} END {printf "%.2f", m / c}' "$ours")
        best=$(awk -v a="$r" -v b="$best" 'BEGIN {print (b == "" || a < b) ? a : b}')
    done
    [ "${4:-1}" -le 1 ] || echo "best merge / cp of ${4} runs: ${best}x (target <= 1.2x)"
    exit 0
fi
if [ "${1:-}" = "load" ]; then
    reps=${2:-3}
    build_bench bench/bench_load tools/lora
    [ -f build-bench/sd15_random.ckpt ] || $py bench/load_peer.py write build-bench
    machine ", $(free -g | awk '/Mem:/ {print $2}') GiB"
    ls -la build-bench/sd15_random.safetensors build-bench/sd15_random.ckpt | awk '{print $9, $5, "bytes"}'
    build-bench/bench/bench_load "$reps" build-bench/sd15_random.safetensors build-bench/sd15_random.ckpt
    $py bench/load_peer.py time build-bench "$reps"
    # the real SD shapes exercise the LDM -> diffusers path the tiny test models cannot
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
    build_bench bench/bench_clip
    machine
    build-bench/bench/bench_clip "$reps" > "$ours"
    threads=$(sed -n 's/^# threads(ctx): //p' "$ours")
    $py bench/clip_peer.py "$reps" "${threads:-$(nproc)}" > "$peer"
    table 22 "liblora ms" "torch ms" time
    exit 0
fi
for p in python3-numpy python3-threadpoolctl; do   # the peer, and the report of its BLAS
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || \
        { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
reps=${1:-7}
build_bench bench/bench_gemm
machine
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-unset} OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
build-bench/bench/bench_gemm "$reps" > "$ours"
/usr/bin/python3 bench/peer_numpy.py "$reps" > "$peer"
table 30 "liblora GF/s" "numpy GF/s" rate
