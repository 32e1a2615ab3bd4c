#!/bin/sh
# Shows that check_symbols.sh fails when it should: against a list missing one symbol, a
# list with an extra symbol, and a library that leaks a non-lora_ symbol, it must exit 1.
set -u
check=$1
lib=$2
list=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
awk '/^#/ { print; next } !dropped { dropped = 1; next } { print }' "$list" > "$tmp/missing.txt"
if sh "$check" "$lib" "$tmp/missing.txt" > /dev/null; then echo "FAIL: a new export went unnoticed"; fails=$((fails+1)); fi
{ cat "$list"; echo lora_removed_function; } > "$tmp/extra.txt"
if sh "$check" "$lib" "$tmp/extra.txt" > /dev/null; then echo "FAIL: a removed export went unnoticed"; fails=$((fails+1)); fi
# A library exporting a symbol outside the namespace.
printf 'int leaked_helper(void) { return 1; }\nint lora_x(void) { return 2; }\n' > "$tmp/leak.c"
if cc -shared -fPIC -o "$tmp/libleak.so" "$tmp/leak.c" 2>/dev/null; then
    printf 'leaked_helper\nlora_x\n' > "$tmp/leak.txt"
    if sh "$check" "$tmp/libleak.so" "$tmp/leak.txt" > /dev/null; then echo "FAIL: a non-lora_ export went unnoticed"; fails=$((fails+1)); fi
fi
sh "$check" "$lib" "$list" > /dev/null || { echo "FAIL: the real list does not match"; fails=$((fails+1)); }
echo "check_symbols_detects: $((4 - fails)) passed, $fails failed"
[ $fails -eq 0 ]
