#!/usr/bin/env bash
# Installs what the demo needs (ports/setup.sh demo), builds the unix
# firmware, starts mosquitto on a free loopback port, and runs
# ports/unix/demo.py in the firmware against it.
#
#   ports/unix/demo.sh [MICROPYTHON_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../setup.sh" demo
firmware=$("$here/build.sh" "$@")

scratch=$(mktemp -d)
# A port outside the kernel's ephemeral range, so that no outgoing
# connection can hold it (see tests/broker.py).
port=$(python3 "$here/../../tests/broker.py" free-port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$scratch/mosquitto.conf"
mosquitto -c "$scratch/mosquitto.conf" > "$scratch/mosquitto.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$scratch"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
done

{ echo "BROKER_PORT = $port"; cat "$here/demo.py"; } > "$scratch/demo.py"
"$firmware" "$scratch/demo.py"
