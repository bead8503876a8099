#!/usr/bin/env bash
# Bounded fuzz run of every target: fuzz/run.sh [SECONDS_PER_TARGET]
# (default 60). Needs cargo-fuzz; RUSTC_BOOTSTRAP lets the stable
# toolchain take the sanitizer flags cargo-fuzz passes.
#
# Seeds (valid packets) are in fuzz/seeds/; anything a run ever found goes
# into fuzz/regressions/<target>/ and is replayed by every run. A crash
# leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
for target in decode session properties; do
    corpus=".corpus/$target"
    mkdir -p "$corpus" "regressions/$target"
    inputs=("$corpus" "regressions/$target")
    [[ -d "seeds/$target" ]] && inputs+=("seeds/$target")
    echo "== fuzz $target for $seconds s"
    log=".corpus/$target.log"
    if ! cargo fuzz run "$target" "${inputs[@]}" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz target $target failed; its input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "Done [0-9]+ runs" "$log"
done
