#!/usr/bin/env bash
# Prints the folder that holds qemu-system-arm, the emulator of the qemu
# port's MICROBIT board: the machine's own when it has one, otherwise
# Debian 12's package unpacked once into .build/qemu-emulator/ without
# installing it (installing it would remove a newer qemu-utils that some
# machines carry). Its libraries must be installed; .ci/run lists them.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
unpacked="$repo/.build/qemu-emulator"

if command -v qemu-system-arm >/dev/null; then
    dirname "$(command -v qemu-system-arm)"
    exit 0
fi
if [[ ! -x "$unpacked/usr/bin/qemu-system-arm" ]]; then
    echo "Unpacking Debian's qemu-system-arm into $unpacked..." >&2
    mkdir -p "$unpacked/debs"
    (cd "$unpacked/debs" && apt-get download -qq qemu-system-arm 2>/dev/null)
    dpkg -x "$unpacked"/debs/qemu-system-arm_*.deb "$unpacked"
fi
echo "$unpacked/usr/bin"
