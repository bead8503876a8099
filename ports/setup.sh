#!/usr/bin/env bash
# Installs what the project's scripts need and the machine lacks, and says
# in one line per kind (Debian, Python, Rust) what it installs and why. A
# machine that has everything hears nothing.
#
#   ports/setup.sh demo     what ports/unix/demo.sh needs
#   ports/setup.sh tests    what tests/run needs (everything)
#
# This file is the one list of the project's dependencies. Debian packages
# are installed with apt-get, as root or through sudo; without the rights to
# install, the script prints the command to run and exits with status 1
# before anything is built. Python packages go into a virtual environment,
# .build/venv (Debian's own python3 refuses a system-wide pip install,
# PEP 668); tests/run puts its bin/ first on PATH.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.build/venv"
profile=${1:-}

# Debian packages, by what needs them. Each array's first element is the
# reason printed when one of its packages is installed.
firmware_packages=("to build the unix firmware with TLS"
    build-essential binutils pkg-config dpkg-dev libffi-dev libmbedtls-dev)
broker_packages=("a real MQTT broker on loopback" mosquitto)
test_tool_packages=("the tests' certificates, independent peer, memory checks and system call counts, and the lwIP firmware's network namespace"
    mosquitto-clients openssl valgrind iproute2 strace)
board_packages=("to cross-build the rp2 and qemu board firmware"
    cmake gcc-arm-none-eabi libnewlib-arm-none-eabi picolibc-arm-none-eabi
    gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf)
# ports/qemu/emulator.sh unpacks qemu-system-arm without installing it (that
# would remove the newer qemu-utils some machines carry); its libraries
# (Debian 12's names) must be installed.
emulator_packages=("the libraries of the qemu-system-arm that ports/qemu/emulator.sh unpacks"
    libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30
    libibverbs1 libjpeg62-turbo libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1
    libsasl2-2 libseccomp2 libslirp0 liburing2 libvdeplug2 libzstd1)

python_packages=(paho-mqtt==2.1.0 pytest==8.3.4 mypy==1.13.0)
rust_components=(clippy rustfmt)
rust_targets=(thumbv6m-none-eabi thumbv8m.main-none-eabi
    riscv32imc-unknown-none-elf riscv32imac-unknown-none-elf)
cargo_fuzz_version=0.13.2
# The tests' second MQTT 5 broker (tests/rumqttd.py). Not --locked: the
# lock file it ships pins a crate today's compiler refuses.
rumqttd_version=0.20.0

case $profile in
    demo) debian_groups=(firmware_packages broker_packages) ;;
    tests) debian_groups=(firmware_packages broker_packages test_tool_packages board_packages emulator_packages) ;;
    *)
        echo "usage: ports/setup.sh demo|tests" >&2
        exit 2
        ;;
esac

say() {
    echo "setup: $*" >&2
}

# Runs a command with its output held back; shows it when the command fails.
quietly() {
    local output
    if ! output=$("$@" 2>&1); then
        echo "$output" >&2
        say "failed: $*"
        return 1
    fi
}

if ! command -v cargo >/dev/null || ! command -v rustup >/dev/null; then
    say "Rust (cargo and rustup) is needed and was not found: install it with rustup, then run this again."
    exit 1
fi

# --- Debian packages -------------------------------------------------------

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii "* ]]
}

missing=()
reasons=""
for group in "${debian_groups[@]}"; do
    declare -n packages=$group
    group_missing=()
    for package in "${packages[@]:1}"; do
        is_installed "$package" || group_missing+=("$package")
    done
    if ((${#group_missing[@]})); then
        missing+=("${group_missing[@]}")
        reasons+="${reasons:+; }${group_missing[*]} (${packages[0]})"
    fi
    unset -n packages
done
# The tests' virtual environment needs a python3 with venv and ensurepip;
# Debian's python3 has them only with python3-venv.
if [[ $profile == tests && ! -x "$venv/bin/pip" ]] && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3 python3-venv)
    reasons+="${reasons:+; }python3 python3-venv (a virtual environment for the tests' Python packages)"
fi

if ((${#missing[@]})); then
    install=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
    if ((EUID == 0)); then
        as_root=()
    elif command -v sudo >/dev/null && { sudo -n true 2>/dev/null || [[ -t 0 ]]; }; then
        as_root=(sudo)
    else
        say "missing Debian packages: $reasons."
        say "Install them as root, then run this again:"
        echo "    sudo apt-get update && sudo ${install[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: $reasons"
    quietly "${as_root[@]}" apt-get update -qq
    quietly "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive "${install[@]}"
fi

# --- Python packages, in .build/venv ----------------------------------------

# The lines of $1 that $2 lacks (one word a line).
lacking() {
    comm -23 <(sort <<< "$1") <(sort <<< "$2")
}

if [[ $profile == tests ]]; then
    # A venv made by a python3 without ensurepip has no pip: make it again.
    if [[ ! -x "$venv/bin/pip" ]]; then
        say "creating $venv for the tests' Python packages (${python_packages[*]})"
        quietly python3 -m venv --clear "$venv"
    fi
    installed=$("$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null | tr 'A-Z_' 'a-z-')
    mapfile -t absent < <(lacking "$(printf '%s\n' "${python_packages[@]}")" "$installed")
    if ((${#absent[@]})); then
        say "installing Python packages in .build/venv: ${absent[*]} (test runner, independent MQTT peer, type stub check)"
        quietly "$venv/bin/python" -m pip install -q --disable-pip-version-check "${absent[@]}"
    fi
fi

# --- Rust components, targets and cargo-fuzz --------------------------------

if [[ $profile == tests ]]; then
    # `rustup component list` names components with the host's triple.
    installed=$(rustup component list --installed | sed 's/-[a-z0-9_]*-unknown-linux-gnu$//')
    mapfile -t absent < <(lacking "$(printf '%s\n' "${rust_components[@]}")" "$installed")
    if ((${#absent[@]})); then
        say "adding Rust components ${absent[*]} (format and lint checks)"
        quietly rustup component add "${absent[@]}"
    fi
    mapfile -t absent < <(lacking "$(printf '%s\n' "${rust_targets[@]}")" "$(rustup target list --installed)")
    if ((${#absent[@]})); then
        say "adding Rust targets ${absent[*]} (the engine for RP2040, RP2350, ESP32-C3/C6 boards)"
        quietly rustup target add "${absent[@]}"
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        say "installing cargo-fuzz $cargo_fuzz_version (the engine's fuzz targets); this takes a minute"
        quietly cargo install --locked "cargo-fuzz@$cargo_fuzz_version"
    fi
    rumqttd="${CARGO_HOME:-$HOME/.cargo}/bin/rumqttd"
    if [[ $("$rumqttd" --version 2>/dev/null) != "rumqttd $rumqttd_version" ]]; then
        say "installing rumqttd $rumqttd_version (the tests' second MQTT 5 broker); this takes a few minutes"
        quietly cargo install --force "rumqttd@$rumqttd_version"
    fi
fi
