#!/bin/sh
# The one test command: installs what is missing, builds (CUDA code compile-checked when
# nvcc exists), runs the default suites, then the parsers again under ASan+UBSan, and prints
# "N passed, N failed". Exit status is non-zero when any test failed.
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh

cuda_opt="-Dcuda=disabled"
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="$PATH:/usr/local/cuda/bin"
    cuda_opt="-Dcuda=enabled -Dgpu_arch=90"   # one architecture keeps CI compile time short
fi

run_suites() {   # build_dir log suites...
    dir=$1; log=$2; shift 2
    args=""
    for s in "$@"; do args="$args --suite $s"; done
    # shellcheck disable=SC2086
    meson test -C "$dir" $args --print-errorlogs --num-processes 2 > "$log" 2>&1 || true
    cat "$log"
}

count() {   # log field -> number from meson's summary ("Ok:                 12")
    sed -n "s/^$2: *\([0-9][0-9]*\).*/\1/p" "$1" | tail -n 1
}

total_ok=0; total_fail=0; total_skip=0
tally() {
    ok=$(count "$1" Ok); fail=$(count "$1" Fail); skip=$(count "$1" Skipped)
    timeout=$(count "$1" Timeout); experr=$(count "$1" "Unexpected Pass")
    total_ok=$((total_ok + ${ok:-0}))
    total_fail=$((total_fail + ${fail:-0} + ${timeout:-0} + ${experr:-0}))
    total_skip=$((total_skip + ${skip:-0}))
    if [ -z "$ok" ]; then total_fail=$((total_fail + 1)); echo "test.sh: no summary in $1" >&2; fi
}

# shellcheck disable=SC2086
[ -f build-test/build.ninja ] || meson setup build-test $cuda_opt
ninja -C build-test
run_suites build-test build-test/suites.log unit io parity badinput ops abi bindings e2e cuda
tally build-test/suites.log

# The parsers and the core once more under AddressSanitizer + UndefinedBehaviorSanitizer.
[ -f build-asan/build.ninja ] || meson setup build-asan -Dcuda=disabled -Db_sanitize=address,undefined \
    -Db_lundef=false -Dexamples=false
ninja -C build-asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suites build-asan build-asan/suites.log unit io parity badinput ops
tally build-asan/suites.log

echo "test.sh: $total_ok passed, $total_fail failed, $total_skip skipped"
[ "$total_fail" -eq 0 ]
