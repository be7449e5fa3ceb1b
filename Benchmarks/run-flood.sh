#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# The flood of refused large Applies (pesto-flood-bench, see its header): builds pestod and the
# benchmark in release mode and runs it in a network namespace of its own (unshare --net,
# loopback up). Extra arguments go to the benchmark: --pestod PATH (repeat it: the first is
# the baseline, e.g. a release pestod built from main; default this tree's), --seconds S,
# --flooders N, --rules N, --rounds R. Needs root (setpriv runs the flooders as uid 65534),
# dbus-daemon, setpriv and unshare.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product pestod >/dev/null
swift build -c release --product pesto-flood-bench >/dev/null
exec unshare --net -- bash -c 'ip link set lo up && exec "$0" "$@"' .build/release/pesto-flood-bench "$@"
