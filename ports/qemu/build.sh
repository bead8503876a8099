#!/usr/bin/env bash
# Builds MicroPython's qemu port with the `mqtt` module, for running the
# client on an emulated board (tests/emulated/).
#
#   ports/qemu/build.sh [BOARD [MICROPYTHON_DIR]]
#
# BOARD is MICROBIT (nRF51, Cortex-M0, Rust target thumbv6m-none-eabi; the
# default) or VIRT_RV32 (RISC-V, Rust target riscv32imac-unknown-none-elf, as
# for ESP32-C6). MQTT_RUST_TARGET=... picks another Rust target, for example
# riscv32imc-unknown-none-elf (as for ESP32-C3) on VIRT_RV32.
# MICROPYTHON_DIR (or MICROPY_DIR) is a MicroPython 1.25 source tree; without
# one, Debian's micropython source package is fetched once into .build/.
#
# The firmware lands in .build/qemu-BOARD/firmware.elf (.build/qemu-BOARD-TARGET/
# when MQTT_RUST_TARGET is given), next to its link map firmware.map and
# qemu-command (how the port starts qemu for this board); the path of the
# .elf is printed.
#
# Needs Debian 12's gcc-arm-none-eabi and picolibc-arm-none-eabi (MICROBIT),
# or gcc-riscv64-unknown-elf and picolibc-riscv64-unknown-elf (VIRT_RV32),
# and the Rust target (`rustup target add ...`).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work="$repo/.build"
# shellcheck source=ports/debian.sh
source "$repo/ports/debian.sh"
board=${1:-MICROBIT}
micropython=${2:-${MICROPY_DIR:-}}

build="$work/qemu-$board"
if [[ -n "${MQTT_RUST_TARGET:-}" ]]; then
    build="$build-$MQTT_RUST_TARGET"
fi

board_options=()
case "$board" in
    MICROBIT)
        target=${MQTT_RUST_TARGET:-thumbv6m-none-eabi}
        ;;
    VIRT_RV32)
        target=${MQTT_RUST_TARGET:-riscv32imac-unknown-none-elf}
        # The engine is pre-linked with `ld -r`, whose default output for
        # this 64-bit toolchain is elf64: ask for the board's 32-bit format.
        # Debian 12's toolchain picks its rv32imac libraries only for
        # -march=rv32imac, which without the "_zicsr" that the port asks GCC 12
        # for needs the older ISA spec (where the CSR instructions are base).
        board_options=(LD="riscv64-unknown-elf-ld -m elf32lriscv" RV32_ARCH=rv32imac
                       CFLAGS_EXTRA=-misa-spec=2.2 AS="riscv64-unknown-elf-as -misa-spec=2.2")
        ;;
    *)
        echo "unknown board $board: MICROBIT or VIRT_RV32" >&2
        exit 2
        ;;
esac

if [[ -z "$micropython" ]]; then
    micropython=$(micropython_source)
fi
micropython=$(cd "$micropython" && pwd)

# USER_C_MODULES takes every */micropython.mk of the folder it names: a
# private folder holding the repository and the clock the qemu port lacks.
usermod="$work/usermod-qemu"
mkdir -p "$usermod"
ln -sfn "$repo" "$usermod/mqtt"
ln -sfn "$repo/ports/qemu/clock" "$usermod/clock"

jobs=$(nproc 2>/dev/null || echo 2)
make -s -C "$micropython/mpy-cross" -j"$jobs" >&2
# FROZEN_MANIFEST is empty: the port's default one needs micropython-lib.
# The port writes the link map next to the firmware (firmware.map).
make -s -C "$micropython/ports/qemu" -j"$jobs" \
    BOARD="$board" \
    BUILD="$build" \
    USER_C_MODULES="$usermod" \
    FROZEN_MANIFEST= \
    MQTT_RUST_TARGET="$target" \
    "${board_options[@]}" >&2
# How the port runs this board (its QEMU_MACHINE and QEMU_ARGS), for the
# tests that boot the firmware; they add the serial link and -kernel.
make -s -C "$micropython/ports/qemu" BOARD="$board" BUILD="$build" FROZEN_MANIFEST= \
    --eval='qemu-command: ; @echo $(QEMU_SYSTEM) $(QEMU_ARGS) > $(BUILD)/qemu-command' \
    qemu-command >&2
echo "$build/firmware.elf"
