#!/usr/bin/env bash
# Builds the MicroPython unix firmware with the `mqtt` module (and `tls`).
#
#   ports/unix/build.sh [MICROPYTHON_DIR]
#
# MICROPYTHON_DIR (or the MICROPY_DIR environment variable) is a MicroPython
# source tree of your own. Without one, Debian's micropython 1.25 source
# package is fetched once into .build/ (needs apt-get and dpkg-dev).
# The firmware lands in .build/unix/micropython; its path is printed.
#
# MQTT_FREEZE_PACKAGE=DIR:NAME also freezes the Python package DIR/NAME into
# a second firmware, .build/unix-NAME/micropython (the benchmark uses it to
# measure umqtt.simple frozen).
#
# MQTT_SANITIZE=1 builds .build/unix-sanitize/micropython instead, with
# AddressSanitizer and UndefinedBehaviorSanitizer.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work="$repo/.build"
micropython=${1:-${MICROPY_DIR:-}}

fetch_micropython() {
    local cache="$work/micropython-source"
    local tree
    tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-1.25*' 2>/dev/null | head -n 1)
    if [[ -z "$tree" ]]; then
        echo "Fetching Debian's micropython 1.25 source package..." >&2
        mkdir -p "$cache/lists/partial"
        echo "deb-src http://deb.debian.org/debian trixie main" > "$cache/sources.list"
        local apt_options=(-o "Dir::State::Lists=$cache/lists" -o "Dir::Etc::SourceList=$cache/sources.list"
                           -o "Dir::Etc::SourceParts=/dev/null" -o "APT::Sandbox::User=root")
        apt-get -qq "${apt_options[@]}" update >&2
        (cd "$cache" && apt-get -qq "${apt_options[@]}" source micropython >&2)
        tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-1.25*' | head -n 1)
    fi
    echo "$tree"
}

if [[ -z "$micropython" ]]; then
    micropython=$(fetch_micropython)
fi
micropython=$(cd "$micropython" && pwd)

# USER_C_MODULES takes every */micropython.mk of the folder it names, so
# name a private folder that holds only a link to this repository.
mkdir -p "$work/usermod"
ln -sfn "$repo" "$work/usermod/mqtt"

build="$work/unix"
manifest="$repo/ports/unix/manifest.py"
if [[ -n "${MQTT_FREEZE_PACKAGE:-}" ]]; then
    package_dir=$(cd "${MQTT_FREEZE_PACKAGE%:*}" && pwd)
    package=${MQTT_FREEZE_PACKAGE##*:}
    build="$work/unix-$package"
    mkdir -p "$build"
    manifest="$build/manifest.py"
    printf 'include("%s")\npackage("%s", base_path="%s")\n' "$repo/ports/unix/manifest.py" "$package" "$package_dir" > "$manifest"
fi

sanitize=()
if [[ -n "${MQTT_SANITIZE:-}" ]]; then
    build="$work/unix-sanitize"
    flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    sanitize=(CFLAGS_EXTRA="$flags" LDFLAGS_EXTRA="$flags" STRIP=)
fi

jobs=$(nproc 2>/dev/null || echo 2)
make -s -C "$micropython/mpy-cross" -j"$jobs" >&2
make -s -C "$micropython/ports/unix" -j"$jobs" \
    BUILD="$build" \
    USER_C_MODULES="$work/usermod" \
    FROZEN_MANIFEST="$manifest" \
    MICROPY_SSL_AXTLS=0 MICROPY_SSL_MBEDTLS=1 MICROPY_PY_BTREE=0 "${sanitize[@]}" >&2
echo "$build/micropython"
