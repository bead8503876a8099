#!/usr/bin/env bash
# Builds MicroPython rp2 firmware for a Raspberry Pi board twice, with the
# `mqtt` module and without it, and prints the sizes of both side by side.
#
#   ports/rp2/build.sh [BOARD] [MICROPYTHON_DIR]
#
# BOARD is a board of MicroPython's rp2 port: RPI_PICO (the default, RP2040,
# Rust target thumbv6m-none-eabi) or RPI_PICO2 (RP2350 Arm cores,
# thumbv8m.main-none-eabi), for example.
#
# MICROPYTHON_DIR (or the MICROPY_DIR environment variable) is a MicroPython
# source tree of your own; it is used as it is when its lib/pico-sdk,
# lib/tinyusb and lib/mbedtls submodules are checked out. Without one,
# Debian's micropython 1.25 source package is fetched once into .build/ as
# ports/unix/build.sh does. Debian's tree ships those submodules empty, so
# they are filled from Debian 13's pico-sdk-source, tinyusb-source and
# mbedtls source packages, in a private copy of the tree under .build/rp2-src/.
#
# Needs cmake, gcc-arm-none-eabi, libnewlib-arm-none-eabi, apt-get and
# dpkg-dev, and `rustup target add` for the board's Rust target.
#
# Firmware (firmware.elf, .bin, .uf2 and the linker map firmware.elf.map):
#   .build/rp2-BOARD/        with the mqtt module
#   .build/rp2-BOARD-plain/  without it
# With MQTT_V5=0 in the environment, the module speaks MQTT 3.1.1 only
# (micropython.cmake's option MQTT_V5), in .build/rp2-BOARD-mqtt311/.
# Both builds are incremental: run the script again after a change.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work="$repo/.build"
# shellcheck source=ports/debian.sh
source "$repo/ports/debian.sh"
board=${1:-RPI_PICO}
micropython=${2:-${MICROPY_DIR:-}}
jobs=2

# Prints the folder holding Debian 13's copy of a source tree, fetching it
# once: pico-sdk and tinyusb come as binary packages of sources, mbedtls as
# a source package.
debian_tree() {
    local name=$1
    local deps="$work/rp2-deps"
    local tree
    case $name in
        pico-sdk) tree="$deps/pico-sdk-source/usr/src/pico-sdk" ;;
        tinyusb) tree="$deps/tinyusb-source/usr/src/tinyusb" ;;
        mbedtls) tree=$(find "$deps" -maxdepth 1 -type d -name 'mbedtls-3*' 2>/dev/null | head -n 1) ;;
    esac
    if [[ -z "$tree" || ! -d "$tree" ]]; then
        echo "Fetching Debian 13's $name source..." >&2
        mkdir -p "$deps"
        if [[ $name == mbedtls ]]; then
            (cd "$deps" && suite_apt trixie source mbedtls)
            tree=$(find "$deps" -maxdepth 1 -type d -name 'mbedtls-3*' | head -n 1)
        else
            (cd "$deps" && suite_apt trixie download "$name-source")
            dpkg -x "$deps/$name-source"_*.deb "$deps/$name-source"
        fi
    fi
    if [[ ! -d "$tree" ]]; then
        echo "Debian 13's $name source was not found under $deps" >&2
        exit 1
    fi
    echo "$tree"
}

has_rp2_submodules() {
    local tree=$1
    [[ -f "$tree/lib/pico-sdk/pico_sdk_init.cmake" && -d "$tree/lib/tinyusb/src"
       && -d "$tree/lib/mbedtls/library" ]]
}

# A copy of the MicroPython tree whose empty lib/ submodules are links to
# Debian's sources. The rp2 port finds them relative to its own folder, so
# the original tree (which ports/unix/build.sh uses) stays untouched.
private_tree() {
    local copy="$work/rp2-src/micropython"
    copy_micropython_tree "$1" "$copy"
    local name tree
    for name in pico-sdk tinyusb mbedtls; do
        if [[ ! -L "$copy/lib/$name" ]]; then
            tree=$(debian_tree "$name")
            rm -rf "$copy/lib/$name"
            ln -s "$tree" "$copy/lib/$name"
        fi
    done
    echo "$copy"
}

if [[ -z "$micropython" ]]; then
    micropython=$(micropython_source)
fi
micropython=$(cd "$micropython" && pwd)
if ! has_rp2_submodules "$micropython"; then
    micropython=$(private_tree "$micropython")
fi
if [[ ! -d "$micropython/ports/rp2/boards/$board" ]]; then
    echo "No board $board in $micropython/ports/rp2/boards" >&2
    exit 1
fi

# The port's default frozen manifest requires micropython-lib packages, which
# Debian's tree lacks; freeze the port's own modules and asyncio only. The
# manifest machinery still insists on a micropython-lib folder with a
# README.md, so it gets an empty one.
extras="$work/rp2-src"
mkdir -p "$extras/micropython-lib"
[[ -f "$extras/micropython-lib/README.md" ]] || echo "Intentionally empty: the rp2 build freezes no micropython-lib package." > "$extras/micropython-lib/README.md"
manifest="$extras/manifest.py"
manifest_text='freeze("$(PORT_DIR)/modules")
include("$(MPY_DIR)/extmod/asyncio")'
# Rewritten only when it changes, so that frozen code is not rebuilt each time.
[[ -f "$manifest" && $(cat "$manifest") == "$manifest_text" ]] || echo "$manifest_text" > "$manifest"

# Configures (once) and builds one firmware in the folder $1; further
# arguments go to cmake.
build_firmware() {
    local build=$1
    shift
    if [[ ! -f "$build/Makefile" ]]; then
        # PICO_NO_PICOTOOL: the SDK would build or fetch picotool for the .uf2;
        # uf2conv.py below makes it instead. --cref adds the cross reference
        # table to the linker map, which ports/firmware_report.py reads.
        # The SDK adds one C++ file (operator new and delete), which needs
        # <cstdlib> and makes g++ link with -lstdc++: both come only with
        # Debian's libstdc++-arm-none-eabi-newlib (1.5 GB). MicroPython has no
        # C++ code, so that file is compiled empty and the C driver links,
        # with the -lm that g++ would add. (CMake adds LDFLAGS and CXXFLAGS to
        # the toolchain's own flags.)
        mkdir -p "$build"
        LDFLAGS="-Wl,--cref" CXXFLAGS="-DPICO_CXX_DISABLE_ALLOCATION_OVERRIDES=1" cmake -S "$micropython/ports/rp2" -B "$build" \
            -DMICROPY_BOARD="$board" -DMICROPY_BOARD_DIR="$micropython/ports/rp2/boards/$board" \
            -DMICROPY_FROZEN_MANIFEST="$manifest" -DMICROPY_LIB_DIR="$extras/micropython-lib" \
            -DPICO_BUILD_DOCS=0 -DPICO_NO_PICOTOOL=1 \
            -DCMAKE_CXX_LINK_EXECUTABLE="<CMAKE_C_COMPILER> <FLAGS> <CMAKE_CXX_LINK_FLAGS> <LINK_FLAGS> <OBJECTS> -o <TARGET> <LINK_LIBRARIES> -lm" \
            "$@" > "$build/cmake.log" 2>&1 || { cat "$build/cmake.log" >&2; exit 1; }
    fi
    # Frozen modules are compiled against the firmware's qstr table but not
    # rebuilt when a module's C source adds a qstr: regenerate them each time.
    rm -f "$build/frozen_content.c"
    # The qstrs are collected from modmqtt.c as preprocessed, but CMake
    # reruns that only when modmqtt.c itself changes, not the binding files
    # it includes: collect them again when one of those is newer.
    local collected="$build/genhdr/qstr.i.last"
    if [[ -f $collected && -n $(find "$repo" -maxdepth 1 -name 'mqtt_*' -newer "$collected") ]]; then
        rm -f "$collected"
    fi
    # The build's own progress lines go to a log, shown when it fails.
    if ! make -s -C "$build" -j"$jobs" > "$build/make.log" 2>&1; then
        tail -n 40 "$build/make.log" >&2
        echo "The build failed; its whole log: $build/make.log" >&2
        exit 1
    fi
    local family
    family=$(uf2_family "$build")
    if [[ ! "$build/firmware.uf2" -nt "$build/firmware.bin" ]]; then
        python3 "$micropython/tools/uf2conv.py" -b 0x10000000 -f "$family" -c \
            -o "$build/firmware.uf2" "$build/firmware.bin" >&2
    fi
}

# The UF2 family id the board's boot ROM accepts, from the platform CMake chose.
uf2_family() {
    local platform
    platform=$(sed -n 's/^PICO_PLATFORM:[A-Z]*=//p' "$1/CMakeCache.txt")
    case $platform in
        rp2040) echo RP2040 ;;
        rp2350-arm-s | rp2350) echo 0xe48bff59 ;;
        rp2350-riscv) echo 0xe48bff5a ;;
        *) echo "Unknown PICO_PLATFORM '$platform'" >&2; exit 1 ;;
    esac
}

with_module="$work/rp2-$board"
module_options=(-DUSER_C_MODULES="$repo/micropython.cmake")
if [[ "${MQTT_V5:-1}" == 0 ]]; then
    with_module="$with_module-mqtt311"
    module_options+=(-DMQTT_V5=OFF)
fi
plain="$work/rp2-$board-plain"

SECONDS=0
build_firmware "$plain"
echo "Built $plain/firmware.uf2 in ${SECONDS}s" >&2
SECONDS=0
build_firmware "$with_module" "${module_options[@]}"
echo "Built $with_module/firmware.uf2 in ${SECONDS}s" >&2

# text, data and bss of an ELF file, as arm-none-eabi-size prints them.
elf_sizes() {
    arm-none-eabi-size "$1" | awk 'NR == 2 { print $1, $2, $3 }'
}

read -r text data bss < <(elf_sizes "$with_module/firmware.elf")
read -r plain_text plain_data plain_bss < <(elf_sizes "$plain/firmware.elf")
row() {
    printf '%-14s %12s %12s %12s\n' "$1" "$2" "$3" "$(($2 - $3))"
}
printf '%-14s %12s %12s %12s\n' "$board" "with mqtt" "without" "difference"
row firmware.bin "$(stat -c %s "$with_module/firmware.bin")" "$(stat -c %s "$plain/firmware.bin")"
row firmware.uf2 "$(stat -c %s "$with_module/firmware.uf2")" "$(stat -c %s "$plain/firmware.uf2")"
row text "$text" "$plain_text"
row data "$data" "$plain_data"
row bss "$bss" "$plain_bss"
echo
# What the engine and the binding take of it, and the check that the engine
# lends the firmware no C-library or runtime function.
python3 "$repo/ports/firmware_report.py" "$board=$with_module/firmware.elf.map"
