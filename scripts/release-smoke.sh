#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Release smoke test (run by .ci/run after `swift build -c release`): the optimised pestod,
# which the README's first command installs, starts on a private bus, changes and reads its
# table, and stops on SIGTERM with exit status 0 and no fatal error. The test suite runs
# debug builds, where a value lives to the end of its scope; an optimised build may end a
# lifetime at its last use, and a teardown that relied on the debug order crashed here at
# every exit.
#
# Usage: scripts/release-smoke.sh [PESTOD]   (default .build/release/pestod)
set -euo pipefail
cd "$(dirname "$0")/.."
PESTOD=${1:-.build/release/pestod}
BUS_NAME=top.passt.Pesto1
HOST_TABLE=/top/passt/Pesto1/tables/host
TABLE_IFACE=top.passt.Pesto1.Table
PORT=${SMOKE_PORT:-24680}   # below the ephemeral range

dir=$(mktemp -d /tmp/pesto-release-smoke.XXXXXX)
bus_pid=
pestod_pid=
cleanup() {
    [[ -n $pestod_pid ]] && kill -KILL "$pestod_pid" 2>/dev/null || true
    if [[ -n $bus_pid ]]; then kill -KILL "$bus_pid" 2>/dev/null; wait "$bus_pid" 2>/dev/null; fi || true
    rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "release smoke: FAILED: $*" >&2; sed 's/^/  pestod: /' "$dir/pestod.err" >&2 || true; exit 1; }

cat > "$dir/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$dir/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  </policy>
</busconfig>
CONF
# dbus-daemon prints its address once it listens: that line is the readiness signal.
coproc BUS { exec dbus-daemon --config-file="$dir/bus.conf" --nofork --print-address 2>"$dir/bus.err"; }
bus_pid=$BUS_PID
read -r -t 20 -u "${BUS[0]}" address || { echo "release smoke: dbus-daemon did not start" >&2; exit 1; }

"$PESTOD" --address "$address" --authorize none --log-level notice 2>"$dir/pestod.err" &
pestod_pid=$!
gdbus wait --address "$address" --timeout 20 "$BUS_NAME" || fail "pestod never took $BUS_NAME"

call() { busctl --address="$address" call "$BUS_NAME" "$HOST_TABLE" "$TABLE_IFACE" "$@"; }
call Insert 'ua{sv}' 1 3 protocol s tcp address s 127.0.0.1 first-port q "$PORT" >/dev/null || fail "Insert"
call Activate u 1 >/dev/null || fail "Activate"
status=$(call Status u 1) || fail "Status"
[[ $status == "buus"*" true 1 0 "* ]] || fail "Status of the active rule: $status"
call Deactivate u 1 >/dev/null || fail "Deactivate"
call Delete u 1 >/dev/null || fail "Delete"

kill -TERM "$pestod_pid"
set +e
wait "$pestod_pid"
code=$?
set -e
pestod_pid=
[[ $code -eq 0 ]] || fail "pestod exited with status $code after SIGTERM"
if grep -q "Fatal error\|Program crashed" "$dir/pestod.err"; then fail "pestod crashed while stopping"; fi
echo "release smoke: OK (pestod started, changed and read its table, stopped with status 0)"
