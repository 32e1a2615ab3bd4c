#!/bin/sh
# Installs the Debian packages liblora needs when any is missing (idempotent; root runs
# apt-get directly, others through sudo when available). Sourced by demo.sh and test.sh.
set -eu
need="meson ninja-build pkg-config gcc g++ binutils libopenblas-dev libopenblas-openmp-dev liblapacke-dev libpng-dev libjpeg62-turbo-dev libwebp-dev libzip-dev libjansson-dev libssl-dev python3 locales"
missing=""
for p in $need; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "deps: installing:$missing" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >&2
fi
# The parameter tests also parse under a comma-decimal locale when one is available.
if [ "$(id -u)" -eq 0 ] && ! locale -a 2>/dev/null | grep -qi '^de_DE.utf8$'; then
    if [ -f /etc/locale.gen ]; then
        sed -i 's/^# *de_DE.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' /etc/locale.gen
        grep -q '^de_DE.UTF-8 UTF-8' /etc/locale.gen || echo 'de_DE.UTF-8 UTF-8' >> /etc/locale.gen
        locale-gen >/dev/null 2>&1 || true
    fi
fi
