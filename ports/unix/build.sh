#!/usr/bin/env bash
# Builds the MicroPython unix firmware with the `mqtt` module (and `tls`).
#
#   ports/unix/build.sh [MICROPYTHON_DIR]
#
# MICROPYTHON_DIR (or the MICROPY_DIR environment variable) is a MicroPython
# source tree of your own (1.25 or 1.26); the firmware then lands in
# .build/unix-mpVERSION/. Without one, Debian's micropython 1.25 source
# package is fetched once into .build/ (needs apt-get and dpkg-dev) and the
# firmware lands in .build/unix/micropython. Its path is printed.
#
# The variants below combine: each adds its suffix to the build folder (for
# example MQTT_SANITIZE=1 MQTT_LWIP=1 builds .build/unix-sanitize-lwip).
#
# MQTT_FREEZE_PACKAGE=DIR:NAME also freezes the Python package DIR/NAME into
# a second firmware, .build/unix-NAME/micropython (the benchmark uses it to
# measure umqtt.simple frozen).
#
# MQTT_SANITIZE=1 builds .build/unix-sanitize/micropython instead, with
# AddressSanitizer and UndefinedBehaviorSanitizer.
#
# MQTT_THREAD=0 builds .build/unix-nothread/micropython instead, without
# threads (MICROPY_PY_THREAD=0), like ESP8266-class boards: the client's
# loop then runs as scheduled cycles on the interpreter's thread.
#
# MQTT_ESP32_PATH=1 builds .build/unix-esp32/micropython instead, which runs
# the module the way esp32 does: the interpreter lock on (the variant in
# ports/unix/gil), the loop on a thread, and no POSIX poll: the binding
# waits with the stream's poll and short sleeps that release the lock.
#
# MQTT_LWIP=1 builds .build/unix-lwip/micropython instead, whose `socket`
# module is MicroPython's own lwIP binding (extmod/modlwip.c) over Debian
# 13's lwIP 2.2.1, as on the Pico W and the other lwIP boards, and whose
# machine.Timer is MicroPython's soft timer. The variant in ports/unix/lwip/
# runs lwIP's Ethernet interface over a Linux TAP device, named by
# MQTT_LWIP_TAP when the firmware starts (tests/lwip_network.py).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work="$repo/.build"
# shellcheck source=ports/debian.sh
source "$repo/ports/debian.sh"
micropython=${1:-${MICROPY_DIR:-}}
own_tree=1
if [[ -z "$micropython" ]]; then
    micropython=$(micropython_source)
    own_tree=0
fi
micropython=$(cd "$micropython" && pwd)

# USER_C_MODULES takes every */micropython.mk of the folder it names, so
# name a private folder that holds only a link to this repository.
usermod="$work/usermod"
mkdir -p "$usermod"
ln -sfn "$repo" "$usermod/mqtt"

# A copy of the MicroPython tree whose empty lib/lwip is a link to
# Debian 13's lwIP source (extmod.mk expects lwIP there), so that the tree
# the other builds use stays untouched.
tree_with_lwip() {
    local source=$1
    local copy="$work/unix-lwip-src/micropython-$(micropython_version "$source")"
    local lwip
    lwip=$(find "$work/lwip-source" -maxdepth 1 -type d -name 'lwip-2*' 2>/dev/null | head -n 1)
    if [[ -z "$lwip" ]]; then
        echo "Fetching Debian 13's lwip source package..." >&2
        mkdir -p "$work/lwip-source"
        (cd "$work/lwip-source" && suite_apt trixie source lwip) || exit 1
        lwip=$(find "$work/lwip-source" -maxdepth 1 -type d -name 'lwip-2*' | head -n 1)
    fi
    copy_micropython_tree "$source" "$copy"
    # MicroPython 1.25's modlwip.c crashes when a reset arrives between a
    # socket's state check and its use (see the patch's header).
    local fix="$repo/ports/unix/lwip/modlwip-1.25-reset-race.patch"
    if [[ $(micropython_version "$copy") == 1.25.0 && ! -f "$copy/.modlwip-patched" ]]; then
        patch -s -p1 -d "$copy" < "$fix" || exit 1
        touch "$copy/.modlwip-patched"
    fi
    if [[ ! -L "$copy/lib/lwip" ]]; then
        rm -rf "$copy/lib/lwip"
        ln -s "$lwip" "$copy/lib/lwip"
    fi
    echo "$copy"
}

build="$work/unix"
# Another tree than Debian's 1.25 builds in a folder of its own, named by
# its version (.build/unix-mp1.26.1, say).
if (( own_tree )); then
    build="$build-mp$(micropython_version "$micropython")"
fi
manifest="$repo/ports/unix/manifest.py"
cflags=""
options=()
if [[ -n "${MQTT_FREEZE_PACKAGE:-}" ]]; then
    package_dir=$(cd "${MQTT_FREEZE_PACKAGE%:*}" && pwd)
    package=${MQTT_FREEZE_PACKAGE##*:}
    build="$build-$package"
    mkdir -p "$build"
    manifest="$build/manifest.py"
    printf 'include("%s")\npackage("%s", base_path="%s")\n' "$repo/ports/unix/manifest.py" "$package" "$package_dir" > "$manifest"
fi
if [[ -n "${MQTT_SANITIZE:-}" ]]; then
    build="$build-sanitize"
    sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    cflags="$cflags $sanitizers"
    options+=(LDFLAGS_EXTRA="$sanitizers" STRIP=)
fi
if [[ "${MQTT_THREAD:-1}" == 0 ]]; then
    build="$build-nothread"
    options+=(MICROPY_PY_THREAD=0)
fi
if [[ -n "${MQTT_ESP32_PATH:-}" ]]; then
    build="$build-esp32"
    options+=(VARIANT_DIR="$repo/ports/unix/gil")
    cflags="$cflags -DMQTT_ESP32_PATH=1"
fi
if [[ -n "${MQTT_LWIP:-}" ]]; then
    build="$build-lwip"
    micropython=$(tree_with_lwip "$micropython")
    options+=(VARIANT_DIR="$repo/ports/unix/lwip" MICROPY_PY_SOCKET=0 MICROPY_PY_LWIP=1)
fi
if [[ -n "$cflags" ]]; then
    options+=(CFLAGS_EXTRA="${cflags# }")
fi

# Frozen modules are compiled against the firmware's qstr table but not
# rebuilt when a module's C source adds a qstr: regenerate them each time.
rm -f "$build/frozen_content.c"

jobs=$(nproc 2>/dev/null || echo 2)
# The build's own progress lines go to a log, shown when it fails.
mkdir -p "$build"
log="$build/make.log"
if ! { make -s -C "$micropython/mpy-cross" -j"$jobs" &&
       make -s -C "$micropython/ports/unix" -j"$jobs" \
           BUILD="$build" \
           USER_C_MODULES="$usermod" \
           FROZEN_MANIFEST="$manifest" \
           MICROPY_SSL_AXTLS=0 MICROPY_SSL_MBEDTLS=1 MICROPY_PY_BTREE=0 "${options[@]}"; } > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "The build failed; its whole log: $log" >&2
    exit 1
fi
echo "Built $build/micropython" >&2
echo "$build/micropython"
