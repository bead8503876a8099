#!/usr/bin/env bash
# Prints the folder that holds qemu-system-arm, the emulator of the qemu
# port's MICROBIT board: the machine's own when it has one, otherwise the
# package of the machine's Debian release unpacked once into
# .build/qemu-emulator/ without installing it (installing it would remove a
# newer qemu-utils that some machines carry). Its libraries must be
# installed; ports/setup.sh lists them.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work="$repo/.build"
# shellcheck source=ports/debian.sh
source "$repo/ports/debian.sh"
unpacked="$work/qemu-emulator"

if command -v qemu-system-arm >/dev/null; then
    dirname "$(command -v qemu-system-arm)"
    exit 0
fi
if [[ ! -x "$unpacked/usr/bin/qemu-system-arm" ]]; then
    echo "Unpacking Debian's qemu-system-arm into $unpacked..." >&2
    rm -rf "$unpacked"
    mkdir -p "$unpacked/debs"
    release=$(. /etc/os-release && echo "$VERSION_CODENAME")
    (cd "$unpacked/debs" && suite_apt "$release" download qemu-system-arm)
    dpkg -x "$unpacked"/debs/qemu-system-arm_*.deb "$unpacked"
fi
"$unpacked/usr/bin/qemu-system-arm" --version >/dev/null
echo "$unpacked/usr/bin"
