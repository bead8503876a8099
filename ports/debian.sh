# Shared by the build scripts (sourced, not run): Debian packages fetched
# into .build/ through a private apt configuration, so that nothing of the
# machine's own apt sources or package state changes. Expects $work, the
# repository's .build folder.

# apt-get for Debian 13 ("trixie") sources and packages. Package lists are
# fetched on first use.
trixie_apt() {
    local cache="$work/debian-apt"
    local options=(-o "Dir::State::Lists=$cache/lists" -o "Dir::Etc::SourceList=$cache/sources.list"
                   -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::status=/dev/null"
                   -o "Dir::Cache=$cache" -o "APT::Sandbox::User=root")
    if [[ ! -f "$cache/updated" ]]; then
        mkdir -p "$cache/lists/partial" "$cache/archives/partial"
        printf '%s\n' "deb http://deb.debian.org/debian trixie main" \
                      "deb-src http://deb.debian.org/debian trixie main" > "$cache/sources.list"
        apt-get -qq "${options[@]}" update >&2
        touch "$cache/updated"
    fi
    apt-get -qq "${options[@]}" "$@"
}

# Prints the folder of Debian's micropython 1.25 source package (Debian 12
# has none), fetching it once. Debian's tree ships MicroPython's lib/
# submodules empty and makes the unix port use the system's mbedtls.
micropython_source() {
    local cache="$work/micropython-source"
    local tree
    tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-1.25*' 2>/dev/null | head -n 1)
    if [[ -z "$tree" ]]; then
        echo "Fetching Debian's micropython 1.25 source package..." >&2
        mkdir -p "$cache"
        (cd "$cache" && trixie_apt source micropython >&2)
        tree=$(find "$cache" -maxdepth 1 -type d -name 'micropython-1.25*' | head -n 1)
    fi
    echo "$tree"
}
