# Shared by the build scripts (sourced, not run): Debian packages fetched
# into .build/ through a private apt configuration, so that nothing of the
# machine's own apt sources or package state changes. Expects $work, the
# repository's .build folder.

# The Debian archive the machine's own apt uses for its release (a local
# mirror or proxy included), as apt reads it from the machine's sources:
# deb822 files with URIs: lines, or a classic sources.list.
debian_mirror() {
    local release mirror
    release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    # shellcheck disable=SC2016 # apt's own placeholders
    mirror=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v release="$release" '$2 == release { print $1; exit }')
    if [[ -z "$mirror" ]]; then
        echo "No Debian archive for release '$release' in this machine's apt sources" \
             "(/etc/apt/sources.list, /etc/apt/sources.list.d/): the build fetches Debian's sources from it." >&2
        return 1
    fi
    echo "${mirror%/}"
}

# apt-get over the machine's Debian mirror for another suite of Debian
# (trixie, sid...), with package lists of its own under .build/debian-apt/.
# The lists are fetched on first use and again when the mirror changes.
# A download that fails is retried once with fresh lists: a package's
# version moves on in the archive and old lists then name a file that is
# gone.
suite_apt() {
    local suite=$1
    shift
    local cache="$work/debian-apt/$suite"
    local options=(-o "Dir::State::Lists=$cache/lists" -o "Dir::Etc::SourceList=$cache/sources.list"
                   -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::status=/dev/null"
                   -o "Dir::Cache=$cache" -o "APT::Sandbox::User=root")
    local mirror sources
    mirror=$(debian_mirror) || return 1
    sources=$(printf '%s\n' "deb $mirror $suite main" "deb-src $mirror $suite main")
    if [[ ! -f "$cache/updated" || $(cat "$cache/sources.list" 2>/dev/null) != "$sources" ]]; then
        mkdir -p "$cache/lists/partial" "$cache/archives/partial"
        echo "$sources" > "$cache/sources.list"
        apt-get -qq "${options[@]}" update >&2 || return 1
        touch "$cache/updated"
    elif ! apt-get -qq "${options[@]}" "$@" >&2; then
        echo "Fetching '$*' from Debian $suite failed: its package lists in $cache" \
             "may be stale; fetching them anew and retrying once." >&2
        rm -rf "$cache/lists"
        mkdir -p "$cache/lists/partial"
        apt-get -qq "${options[@]}" update >&2 || return 1
        touch "$cache/updated"
    else
        return 0
    fi
    apt-get -qq "${options[@]}" "$@" >&2
}

# Prints the folder of a Debian suite's micropython source package,
# fetching it once: trixie's (1.25, the default; Debian 12 has none) or
# sid's (whatever version unstable carries, 1.26.1 at the time of
# writing). Debian's tree ships MicroPython's lib/ submodules empty and
# makes the unix port use the system's mbedtls.
micropython_source() {
    local suite=${1:-trixie}
    local cache="$work/micropython-source"
    [[ $suite == trixie ]] || cache="$cache-$suite"
    local tree
    tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-[0-9]*' 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$tree" ]]; then
        echo "Fetching Debian $suite's micropython source package..." >&2
        mkdir -p "$cache"
        (cd "$cache" && suite_apt "$suite" source micropython) || return 1
        tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-[0-9]*' | sort -V | tail -n 1)
    fi
    if [[ -z "$tree" || ! -f "$tree/py/mpconfig.h" ]]; then
        echo "Debian $suite's micropython source tree is not under $cache" \
             "(delete that folder to fetch it again)." >&2
        return 1
    fi
    echo "$tree"
}

# Copies the MicroPython tree in folder $1 to folder $2, unless $2 is a
# copy of it already. Builds that link Debian's sources into the copy's
# empty lib/ submodules so leave the original tree untouched. Build
# products of the original (mpy-cross, unix builds) stay behind.
copy_micropython_tree() {
    local source=$1 copy=$2
    if [[ ! -f "$copy/.copied-from" || $(cat "$copy/.copied-from") != "$source" ]]; then
        echo "Copying $source to $copy..." >&2
        rm -rf "$copy"
        mkdir -p "$copy"
        tar -C "$source" --exclude=./mpy-cross/build --exclude='./ports/*/build*' -cf - . | tar -C "$copy" -xf -
        echo "$source" > "$copy/.copied-from"
    fi
}

# The version of the MicroPython source tree in folder $1 (1.25.0, say).
micropython_version() {
    awk '/#define MICROPY_VERSION_(MAJOR|MINOR|MICRO) / { v = v (v ? "." : "") $3 } END { print v }' \
        "$1/py/mpconfig.h"
}
