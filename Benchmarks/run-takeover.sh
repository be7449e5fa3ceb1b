#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Takeover benchmark (doc/takeover.md): a pestod with LISTENERS listening sockets (default
# 19,000) on a private bus is replaced ROUNDS times (default 20) by `pestod --replace`, while
# a client connects in a loop to one forwarded port, CONNECTIONS long relayed connections
# (default 1) exchange counting streams both ways (pesto-loadgen streams: 256 bytes per end
# every 10 ms, every byte checked), and a D-Bus client calls GetManagedObjects in a loop.
# Reports per round the takeover time (start of the new pestod to exit of the old), and
# overall: failed connects, listeners whose inode changed, broken long connections and
# directions that lost a byte, whether the objects and properties are unchanged, and the
# longest D-Bus call during the run, and (handover format 3) how long each old pestod paused
# from its successor's ready to bye. The last line, "TAKEOVER listeners L connections C
# mean/min/max ms", is the takeover time as a function of listeners and connections.
#
#   Benchmarks/run-takeover.sh [LISTENERS] [ROUNDS] [CONNECTIONS]
#   PESTOD=.build/debug/pestod LOADGEN=.build/debug/pesto-loadgen Benchmarks/run-takeover.sh 1000 5 100
#                                                                   (skip the release build)
#
# Run as root (pestod raises its descriptor limit; the ports are 11996 upwards, below 32768).
# Needs dbus-daemon, busctl and socat. Relays need descriptors beyond the listeners: with a
# hard RLIMIT_NOFILE of L, E = L - 64 and R = E - min(E / 8, 1024), pestod relays TCP only while
# 6 per connection stay within min(R, E - listeners) / 2 (DescriptorBudget.swift); beyond, connections
# are reset at once (the connect loop, which only connects, does not notice; the long
# connections do). The script prints the limit it runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
LISTENERS=${1:-19000}
ROUNDS=${2:-20}
CONNECTIONS=${3:-1}
BASE=12000
if [ -z "${PESTOD:-}" ]; then
    swift build -c release --product pestod >/dev/null
    PESTOD=.build/release/pestod
fi
if [ -z "${LOADGEN:-}" ]; then
    swift build -c release --product pesto-loadgen >/dev/null
    LOADGEN=.build/release/pesto-loadgen
fi
(( BASE + LISTENERS < 32768 )) || { echo "too many listeners for ports $BASE..32767" >&2; exit 1; }
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "RLIMIT_NOFILE: $(ulimit -n)"

dir=$(mktemp -d /tmp/pesto-takeover.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${current:-}" ] && kill -9 "$current" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path=$dir/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/></policy></busconfig>
EOF
dbus-daemon --config-file="$dir/bus.conf" --nofork --print-address=1 >"$dir/address" 2>"$dir/bus.log" &
pids+=($!)
while [ ! -s "$dir/address" ]; do sleep 0.01; done
ADDRESS=$(head -1 "$dir/address")
BUSCTL=(busctl --address="$ADDRESS")
DEST=top.passt.Pesto1
TABLE=/top/passt/Pesto1/tables/host
ARGS=(--address "$ADDRESS" --authorize none --runtime-dir "$dir" --state "$dir/state" --control "$dir/control.sock" --log-level notice)

wait_for_name() { until "${BUSCTL[@]}" status "$DEST" >/dev/null 2>&1; do sleep 0.01; done; }
# "port inode" of every listening socket on the benchmark's ports (all pestod's).
inodes() {
    ss -Htlne "( sport >= :$BASE and sport < :$((BASE + LISTENERS)) )" \
        | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ino:/) { n = split($4, a, ":"); print a[n], substr($i, 5) } }' | sort
}
objects() { "${BUSCTL[@]}" call "$DEST" /top/passt/Pesto1 org.freedesktop.DBus.ObjectManager GetManagedObjects; }

"$PESTOD" "${ARGS[@]}" 2>>"$dir/pestod.log" &
current=$!
wait_for_name

# The echo target and the rules: port BASE forwarded to BASE-1, the rest listeners only.
socat TCP-LISTEN:$((BASE - 1)),bind=127.0.0.1,reuseaddr,fork EXEC:cat &
pids+=($!)
"${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Insert 'ua{sv}' 1 4 \
    protocol s tcp address s 127.0.0.1 first-port q $BASE target-port q $((BASE - 1)) >/dev/null
"${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Activate u 1 >/dev/null
# The long connections: port BASE-2 forwarded to BASE-3, where pesto-loadgen is the target.
"${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Insert 'ua{sv}' 3 4 \
    protocol s tcp address s 127.0.0.1 first-port q $((BASE - 2)) target-port q $((BASE - 3)) >/dev/null
"${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Activate u 3 >/dev/null
if (( LISTENERS > 1 )); then
    "${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Insert 'ua{sv}' 2 4 \
        protocol s tcp address s 127.0.0.1 first-port q $((BASE + 1)) last-port q $((BASE + LISTENERS - 1)) >/dev/null
    "${BUSCTL[@]}" call "$DEST" $TABLE top.passt.Pesto1.Table Activate u 2 >/dev/null
fi
before_objects=$(objects)
before_inodes=$(inodes)
echo "pestod $current: $(echo "$before_inodes" | wc -l) listening sockets (of $LISTENERS)"

# The long connections, until their stdin (a FIFO held open here as descriptor 4, which no
# other process may inherit) closes.
if (( CONNECTIONS > 0 )); then
    mkfifo "$dir/streams.in"
    "$LOADGEN" streams --port $((BASE - 2)) --target-port $((BASE - 3)) --count "$CONNECTIONS" \
        <"$dir/streams.in" >"$dir/streams.out" 2>&1 &
    streams=$!
    pids+=($streams)
    exec 4>"$dir/streams.in"
    until grep -q '^ready\|^failed\|pesto-loadgen:' "$dir/streams.out" 2>/dev/null; do sleep 0.05; done
    head -1 "$dir/streams.out" | sed 's/^/long connections: /'
fi

# The connect loop: one line per failed connect.
: >"$dir/failures"; : >"$dir/dbus-failures"
( while [ ! -e "$dir/stop" ]; do
      if ! { exec 3<>/dev/tcp/127.0.0.1/$BASE; } 2>>"$dir/failures"; then echo "at $(date +%s.%N)" >>"$dir/failures"; fi
      exec 3>&- 3<&- || true
      echo >>"$dir/connects"
  done ) 2>/dev/null 4>&- &
pids+=($!)
# The D-Bus loop: the duration of each call in microseconds.
( while [ ! -e "$dir/stop" ]; do
      t0=$(date +%s%N); objects >/dev/null 2>>"$dir/dbus-failures" || true
      echo $(( ($(date +%s%N) - t0) / 1000 )) >>"$dir/dbus-us"
  done ) 4>&- &
pids+=($!)

total=0
failed_rounds=0
min=
max=0
for round in $(seq 1 "$ROUNDS"); do
    old=$current
    t0=$(date +%s%N)
    "$PESTOD" "${ARGS[@]}" --replace 2>>"$dir/pestod.log" 4>&- &
    current=$!
    while kill -0 "$old" 2>/dev/null; do
        if ! kill -0 "$current" 2>/dev/null; then
            echo "round $round: the new pestod failed (see the log below); the old one stays in charge"
            current=$old
            break
        fi
        sleep 0.002
    done
    t1=$(date +%s%N)
    if [ "$current" = "$old" ]; then failed_rounds=$((failed_rounds + 1)); continue; fi
    wait "$old" 2>/dev/null || { echo "round $round: the old pestod exited with $?"; }
    ms=$(( (t1 - t0) / 1000000 ))
    total=$(( total + ms ))
    if (( ms > max )); then max=$ms; fi
    if [ -z "$min" ] || (( ms < min )); then min=$ms; fi
    now=$(inodes)
    # A listener of the start that is gone or has another inode would be a takeover's fault;
    # ports bound since (the start's failed binds, retried every second) are not.
    changed=$(comm -23 <(echo "$before_inodes") <(echo "$now") | wc -l)
    added=$(comm -13 <(echo "$before_inodes") <(echo "$now") | wc -l)
    echo "round $round: takeover ${ms} ms, listeners (port, inode) of the start changed or gone: $changed, bound since the start: $added"
done
touch "$dir/stop"
wait_for_name
if (( CONNECTIONS > 0 )); then
    exec 4>&-
    wait "$streams" || true
    sed 's/^/long connections: /' "$dir/streams.out" | tail -n +2
fi
after_objects=$(objects 2>&1) || echo "final GetManagedObjects failed: $after_objects"
sleep 0.2
done_rounds=$(( ROUNDS - failed_rounds ))
mean=$(( done_rounds > 0 ? total / done_rounds : 0 ))
echo "takeovers: $ROUNDS, failed $failed_rounds, mean $mean ms, listeners $LISTENERS"
echo "connects: $(wc -l <"$dir/connects" 2>/dev/null || echo 0), failed: $(grep -c '^at ' "$dir/failures")"
{ grep -v '^at ' "$dir/failures" || true; } | sed 's/^.*: //' | sort | uniq -c
echo "objects and properties unchanged: $([ "$before_objects" = "$after_objects" ] && echo yes || echo NO)"
echo "D-Bus calls: $(wc -l <"$dir/dbus-us"), failed: $(wc -l <"$dir/dbus-failures"), longest $(sort -n "$dir/dbus-us" | tail -1) µs, median $(sort -n "$dir/dbus-us" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') µs"
sort "$dir/dbus-failures" | uniq -c
grep -E "critical|takeover failed" "$dir/pestod.log" || true
grep -E "takeover: sent|takeover: the new pestod is ready; sent" "$dir/pestod.log" | tail -1 | sed 's/^.*takeover: /last handover: /'
# Handover format 3: how long each old pestod paused (from the new one's ready to bye).
pauses=$(grep -o "this one paused [0-9]* ms" "$dir/pestod.log" | awk '{print $4}' || true)
if [ -n "$pauses" ]; then
    echo "$pauses" | awk '{ s += $1; if (NR == 1 || $1 < lo) lo = $1; if ($1 > hi) hi = $1 } END { printf "old pestod paused: %d takeovers, mean %d ms, min %d ms, max %d ms\n", NR, s / NR, lo, hi }'
else
    echo "old pestod paused: not logged (handover format 2: paused from the first message sent to the exit)"
fi
echo "TAKEOVER listeners $LISTENERS connections $CONNECTIONS rounds $ROUNDS failed $failed_rounds mean $mean ms min $min ms max $max ms"
