#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds the activation benchmark in release mode and runs it; extra arguments are passed on.
# Prints figures and ratios against a bare socket/bind/listen loop run side by side.
# Then pestod's own memory per listener: a release pestod on a private bus (in a network
# namespace of its own when run as root), its VmRSS before and after Activate of one rule of
# PESTOD_LISTENERS ports (default min(19,000, RLIMIT_NOFILE - 500), from 1024 on 127.0.0.1),
# divided by the listeners bound (user-space memory only: the kernel's socket memory is not in
# RSS). NO_PESTOD_RSS=1 skips it; NO_BUILD=1 uses the binaries already in .build/release.
# With PESTO_BENCH_SUMMARY set, summary lines are appended there (groups activation, memory).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/opt/swift/usr/bin"
if [[ -z ${NO_BUILD:-} ]]; then
    # One product per invocation: `swift build` takes a single --product.
    swift build -c release --product pesto-activation-bench >/dev/null
    [[ -n ${NO_PESTOD_RSS:-} ]] || swift build -c release --product pestod >/dev/null
fi
.build/release/pesto-activation-bench "$@"
[[ -z ${NO_PESTOD_RSS:-} ]] || exit 0

# ---- pestod's RSS per listener -----------------------------------------------------------------
for tool in dbus-daemon busctl gdbus; do
    command -v "$tool" >/dev/null || { echo "pestod RSS per listener: skipped, needs $tool"; exit 0; }
done
N=${PESTOD_LISTENERS:-$(($(ulimit -n) - 500 < 19000 ? $(ulimit -n) - 500 : 19000))}
((N >= 100 && 1024 + N <= 32768)) || { echo "PESTOD_LISTENERS must be 100 to 31744" >&2; exit 2; }
dir=$(mktemp -d /tmp/pesto-activation.XXXXXX)
pids=()
NS=
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -z $NS ]] || ip netns del "$NS" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
cat >"$dir/bus.conf" <<XML
<busconfig><type>session</type><listen>unix:path=$dir/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
XML
dbus-daemon --config-file="$dir/bus.conf" --nofork --print-address=1 >"$dir/address" 2>"$dir/bus.log" &
pids+=($!)
for _ in $(seq 1 200); do [[ -s $dir/address ]] && break; sleep 0.05; done
ADDRESS=$(head -1 "$dir/address")
inside=()
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null && ip netns add "pesto-act-$$" 2>/dev/null; then
    NS=pesto-act-$$
    if ip -n "$NS" link set lo up 2>/dev/null; then inside=(ip netns exec "$NS"); fi
fi
# (ip netns exec execs pestod: $! is pestod's own PID.)
"${inside[@]}" .build/release/pestod --address "$ADDRESS" --authorize none --no-state --log-level warning 2>"$dir/pestod.log" &
PESTOD_PID=$!
pids+=("$PESTOD_PID")
timeout 25 gdbus wait --address "$ADDRESS" --timeout 20 top.passt.Pesto1 ||
    { echo "pestod RSS per listener: pestod did not come up: $(tail -3 "$dir/pestod.log")"; exit 1; }
call() { timeout 60 busctl --address="$ADDRESS" call top.passt.Pesto1 /top/passt/Pesto1/tables/host top.passt.Pesto1.Table "$@"; }
rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$PESTOD_PID/status"; } # KiB
call Insert 'ua{sv}' 1 4 protocol s tcp address s 127.0.0.1 first-port q 1024 last-port q $((1024 + N - 1)) >/dev/null
sleep 1
before=$(rss)
read -r _ bound failed <<<"$(call Activate u 1)"
sleep 1
after=$(rss)
call Deactivate u 1 >/dev/null
sleep 1
released=$(rss)
echo
echo "5. pestod (release, own process${inside[*]:+, own network namespace}): one rule of $N ports activated over D-Bus"
echo "   VmRSS before $before KiB, with $bound listeners $after KiB (failed $failed), after Deactivate $released KiB"
if ((bound > 0)); then
    per=$(((after - before) * 1024 / bound))
    echo "   RSS per listener (pestod's own memory, not the kernel's): $per bytes"
    if [[ -n ${PESTO_BENCH_SUMMARY:-} ]]; then
        printf 'memory\tRSS per listener (pestod, %s listeners)\tpestod\t%s\tbytes\t-\t-\t-\t-\tlower\n' "$N" "$per" >>"$PESTO_BENCH_SUMMARY"
    fi
fi
