#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds pestod and the D-Bus benchmark in release mode and runs the benchmark; extra arguments
# are passed on (--runs N, --seconds S, --iterations N, --pestod-log-level LEVEL, --only LIST,
# --pestod PATH, --no-logging-comparison; -h for help). With PESTO_BENCH_SUMMARY set, the
# figures are appended there as summary lines (groups dbus and logging).
# The benchmark starts its own private dbus-daemon and the release pestod next to it (nothing
# touches the system or session bus) and prints round trips per second of pestod's methods
# against two baselines run side by side: the bus daemon's own GetId and busctl/gdbus calls,
# and the cost of logging (a second pestod at --log-level warning, run interleaved).
# Needs dbus-daemon, busctl and gdbus on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
# One product per invocation: `swift build` takes a single --product.
swift build -c release --product pestod >/dev/null
swift build -c release --product pesto-dbus-bench >/dev/null
exec .build/release/pesto-dbus-bench "$@"
