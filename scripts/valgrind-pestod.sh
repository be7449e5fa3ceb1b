#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Runs a stripped release pestod under valgrind on a private bus, drives N D-Bus calls
# through it (Insert/Activate/Status-free cycles from pesto-test-peer: Insert, Activate,
# Deactivate, Delete), stops it with SIGTERM and prints valgrind's leak summary.
# Usage: scripts/valgrind-pestod.sh [CALLS]   (default 10000; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d /opt/swift/usr/bin ]] && export PATH="/opt/swift/usr/bin:$PATH"
CALLS=${1:-10000}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

swift build -c release --product pestod >/dev/null
swift build -c release --product pesto-test-peer >/dev/null
work=$(mktemp -d)
bus_pid=
trap 'kill -9 $(jobs -p) 2>/dev/null || true; [[ -n $bus_pid ]] && kill "$bus_pid" 2>/dev/null; rm -rf "$work"' EXIT
strip -o "$work/pestod" .build/release/pestod

cat >"$work/bus.conf" <<CONF
<busconfig><type>session</type><listen>unix:path=$work/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/></policy></busconfig>
CONF
dbus-daemon --config-file="$work/bus.conf" --fork --print-address=1 --print-pid=1 >"$work/bus.out"
address=$(sed -n 1p "$work/bus.out")
bus_pid=$(sed -n 2p "$work/bus.out")

valgrind --leak-check=full --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite \
    --log-file="$work/valgrind.log" "$work/pestod" --address "$address" --authorize none --log-level warning &
vg_pid=$!
timeout 120 gdbus wait --address "$address" --timeout 120 top.passt.Pesto1

port=$(( 30000 + RANDOM % 1000 ))
cycles=$(( CALLS / 4 ))
{
    for ((i = 0; i < cycles; i++)); do
        printf 'Insert %d %d\nActivate %d\nDeactivate %d\nDelete %d\n' "$i" "$port" "$i" "$i" "$i"
    done
} | .build/release/pesto-test-peer "$address" > "$work/peer.out"
ok=$(grep -c '^ok' "$work/peer.out" || true)
echo "calls answered ok: $ok of $(( cycles * 4 ))"

kill -TERM "$vg_pid"
wait "$vg_pid" || true
grep -E "ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|still reachable|in use at exit" "$work/valgrind.log"
