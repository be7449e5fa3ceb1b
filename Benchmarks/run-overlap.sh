#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Disruption of a carve-out (doc/overlap.md): a range of PORTS ports (default 1000) is
# forwarded by one rule, and a single port in its middle is carved out to another target and
# put back ROUNDS times (default 100), while a client connects in a loop to the carved port
# and its two neighbours. Run once per overlap policy (MODE: refuse, first-match or both, the
# default):
#   refuse       the carve-out cannot overlap the range, so each change is an Apply that
#                replaces the range by the two ranges around the port plus the carve-out
#                (and back): the range's listeners are closed and opened again;
#   first-match  each change is one Activate or Deactivate of the carve-out, whose port the
#                range's socket serves: nothing is closed or opened.
# Reports per mode: changes made and their mean time (the busctl call included), connects and
# failed connects, and listeners of the range (port, inode) that differ from the start.
#
#   Benchmarks/run-overlap.sh [MODE] [PORTS] [ROUNDS]
#   PESTOD=.build/debug/pestod Benchmarks/run-overlap.sh both 200 20     (skip the release build)
#
# Run as root (the ports are BASE, default 13000, upwards, below 32768), best in a network
# namespace of its own (`ip netns exec NS Benchmarks/run-overlap.sh`), so that no other
# process's ports spoil it. Needs dbus-daemon, busctl and ss. DEBUG_OVERLAP=1 prints the
# range's sockets when a call fails and copies pestod's logs to /tmp. With PESTO_BENCH_SUMMARY
# set, the figures are also appended there as summary lines (group overlap).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-both}
PORTS=${2:-1000}
ROUNDS=${3:-100}
BASE=${BASE:-13000}
case "$MODE" in refuse | first-match) MODES=("$MODE") ;; both) MODES=(refuse first-match) ;; *)
    echo "MODE is refuse, first-match or both" >&2
    exit 2
    ;;
esac
(( PORTS >= 3 && BASE + PORTS < 32768 )) || { echo "PORTS must be 3 to $((32767 - BASE))" >&2; exit 2; }
if [ -z "${PESTOD:-}" ]; then
    swift build -c release --product pestod >/dev/null
    PESTOD=.build/release/pestod
fi
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
LAST=$((BASE + PORTS - 1))
CARVED=$((BASE + PORTS / 2))
TARGET=$((LAST + 1))   # nothing listens there: relayed connections are reset, connects succeed

dir=$(mktemp -d /tmp/pesto-overlap.XXXXXX)
pids=()
cleanup() {
    touch "$dir/stop" 2>/dev/null || true
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/bus.conf" <<XML
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path=$dir/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
XML
dbus-daemon --config-file="$dir/bus.conf" --nofork --print-address=1 >"$dir/address" 2>"$dir/bus.log" &
pids+=($!)
while [ ! -s "$dir/address" ]; do sleep 0.01; done
ADDRESS=$(head -1 "$dir/address")
BUSCTL=(busctl --address="$ADDRESS")
DEST=top.passt.Pesto1
TABLE=/top/passt/Pesto1/tables/host
IFACE=top.passt.Pesto1.Table

# (busctl says "Failed to find cgroup2 mount" on every call in a namespace of its own.)
call() { "${BUSCTL[@]}" call "$DEST" $TABLE $IFACE "$@" >/dev/null 2> >(grep -v "cgroup2 mount" >&2) || { [ -n "${DEBUG_OVERLAP:-}" ] && ss -Htanp "( sport >= :$BASE and sport <= :$LAST )" | head -20; return 1; }; }
# The a{sv} of a TCP rule FIRST..LAST on 127.0.0.1 forwarded to TARGET-PORT: 6 entries.
rule() { echo "6 protocol s tcp address s 127.0.0.1 first-port q $1 last-port q $2 target-address s 127.0.0.1 target-port q $3"; }
# "port inode" of every listening socket of the range.
inodes() {
    ss -Htlne "( sport >= :$BASE and sport <= :$LAST )" \
        | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ino:/) { n = split($4, a, ":"); print a[n], substr($i, 5) } }' | sort
}

for mode in "${MODES[@]}"; do
    rm -f "$dir/stop" "$dir/connects" "$dir/failures"
    : >"$dir/connects"; : >"$dir/failures"
    "$PESTOD" --address "$ADDRESS" --authorize none --no-state --log-level notice --overlap "$mode" 2>>"$dir/pestod-$mode.log" &
    pestod=$!
    pids+=($pestod)
    # (NameHasOwner, not busctl status: that reads the owner's credentials, which fails in a
    # network namespace of its own.)
    until "${BUSCTL[@]}" call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus NameHasOwner s "$DEST" 2>/dev/null \
        | grep -q true; do sleep 0.01; done
    # shellcheck disable=SC2046
    call Insert 'ua{sv}' 100 $(rule $BASE $LAST $TARGET)
    call Activate u 100
    # shellcheck disable=SC2046
    [ "$mode" = first-match ] && call Insert 'ua{sv}' 50 $(rule $CARVED $CARVED $TARGET)
    before=$(inodes)

    ( ports=($((CARVED - 1)) $CARVED $((CARVED + 1))); k=0
      while [ ! -e "$dir/stop" ]; do
          port=${ports[$((k % 3))]}
          if ! { exec 3<>/dev/tcp/127.0.0.1/$port; } 2>/dev/null; then echo "$port" >>"$dir/failures"; fi
          exec 3>&- 3<&- || true
          echo >>"$dir/connects"
          k=$((k + 1))
      done ) 2>/dev/null &
    loop=$!
    pids+=($loop)

    t0=$(date +%s%N)
    for _ in $(seq 1 "$ROUNDS"); do
        if [ "$mode" = first-match ]; then
            call Activate u 50
            call Deactivate u 50
        else
            # shellcheck disable=SC2046
            call Apply 'a(ua{sv})aua{sv}' 3 101 $(rule $BASE $((CARVED - 1)) $TARGET) \
                102 $(rule $((CARVED + 1)) $LAST $((TARGET + CARVED + 1 - BASE))) 50 $(rule $CARVED $CARVED $TARGET) 1 100 0
            # shellcheck disable=SC2046
            call Apply 'a(ua{sv})aua{sv}' 1 100 $(rule $BASE $LAST $TARGET) 3 101 102 50 0
        fi
    done
    t1=$(date +%s%N)
    touch "$dir/stop"
    wait "$loop" 2>/dev/null || true
    after=$(inodes)
    changed=$(comm -23 <(echo "$before") <(echo "$after") | wc -l)
    changes=$((2 * ROUNDS))
    mean=$(( (t1 - t0) / changes / 1000 ))
    connects=$(wc -l <"$dir/connects")
    failed=$(wc -l <"$dir/failures")
    listeners=$(echo "$before" | wc -l)
    echo "$mode: $changes changes, mean $mean µs each (busctl included); " \
        "connects $connects, failed $failed" \
        "($(sort "$dir/failures" | uniq -c | awk '{printf "%s port %s, ", $1, $2}' | sed 's/, $//')); " \
        "range listeners (port, inode) differing from the start: $changed of $listeners"
    if [ -n "${PESTO_BENCH_SUMMARY:-}" ]; then
        # Under refuse, failures and replaced listeners are what the policy costs: no target.
        zero=-
        [ "$mode" = first-match ] && zero=0
        {
            printf 'overlap\tcarve-out: time per change, %s (busctl included)\tpestod\t%s\tµs\t-\t-\t-\t-\tlower\n' "$mode" "$mean"
            printf 'overlap\tcarve-out: failed connects, %s\tpestod\t%s\tfailed/%s\t-\t-\t-\t%s\tlower\n' "$mode" "$failed" "$connects" "$zero"
            printf 'overlap\tcarve-out: range listeners replaced, %s\tpestod\t%s\tof %s\t-\t-\t-\t%s\tlower\n' "$mode" "$changed" "$listeners" "$zero"
        } >>"$PESTO_BENCH_SUMMARY"
    fi
    kill "$pestod" 2>/dev/null || true
    wait "$pestod" 2>/dev/null || true
done
[ -n "${DEBUG_OVERLAP:-}" ] && cp "$dir"/pestod-*.log /tmp/
grep -E "critical|error" "$dir"/pestod-*.log || true
