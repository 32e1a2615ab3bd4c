#!/bin/sh
# Compares the dynamic symbols liblora exports with the committed list.
# usage: check_symbols.sh LIBRARY SYMBOL_LIST
# Adding a symbol means adding it to tests/abi/symbols.txt and to CHANGELOG.md's ABI line.
set -u
lib=$1
list=$2
actual=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' | sed 's/@.*//' | sort)
expected=$(grep -v '^#' "$list" | sed '/^$/d' | sort)
status=0
added=$(printf '%s\n' "$actual" | while read -r s; do printf '%s\n' "$expected" | grep -qxF "$s" || echo "$s"; done)
removed=$(printf '%s\n' "$expected" | while read -r s; do printf '%s\n' "$actual" | grep -qxF "$s" || echo "$s"; done)
if [ -n "$added" ]; then
    echo "exported but not in $list (add it there and to CHANGELOG's ABI line):"
    printf '  %s\n' $added
    status=1
fi
if [ -n "$removed" ]; then
    echo "listed in $list but no longer exported (an ABI break):"
    printf '  %s\n' $removed
    status=1
fi
notours=$(printf '%s\n' "$actual" | grep -v '^lora_' || true)
if [ -n "$notours" ]; then
    echo "exported symbols outside the lora_ namespace:"
    printf '  %s\n' $notours
    status=1
fi
count=$(printf '%s\n' "$actual" | grep -c .)
if [ $status -eq 0 ]; then echo "exported symbols match $list ($count symbols)"; fi
exit $status
