#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds pestod, pesto-test-peer and the soak in release mode and runs the soak; extra arguments
# are passed on (--seconds N, default 120; --kill-every S; --clients N; --lock-holders N;
# --seed N; --keep; -h for help). It starts its own private dbus-daemon and a release pestod
# with --state and --control in a temp dir, drives concurrent D-Bus changes, lock transactions,
# control-socket uploads and TCP/UDP traffic, SIGKILLs clients and pestod, and checks after
# every restart that no acknowledged change was lost. Loopback ports below 32768 only.
# `--memory` is the soak for memory growth: pestod is never killed, and its RSS is sampled
# each second under the same load (RSS at the warm-up's end and at the end, growth, slope).
# With PESTO_BENCH_SUMMARY set, the figures are also appended there (group soak). NO_BUILD=1
# uses the binaries already in .build/release. Needs dbus-daemon on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
# One product per invocation: `swift build` takes a single --product.
if [[ -z ${NO_BUILD:-} ]]; then
    for product in pestod pesto-test-peer pesto-soak; do
        swift build -c release --product "$product" >/dev/null
    done
fi
exec .build/release/pesto-soak "$@"
