#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# A table of 65,535 rules with and without the state store, side by side in one run
# (pesto-large-bench, Benchmarks/LargeTableBenchmark/main.swift says what it measures):
# one-rule commit times (durable with --state), the longest Status wait and relayed echo
# during them, the loop's longest turn during a 65,533-rule Apply (from pestod's log), and
# pestod's RSS before, with and after the bulk (memory returned after shrinking).
#
# Usage: Benchmarks/run-large.sh [--rules N] [--commits N]     (as root: a network namespace)
# Environment: NO_BUILD=1 (use .build/release as it is), PESTO_BENCH_SUMMARY=FILE (group large).
# It runs in a network namespace of its own (ports 24001, 24500, 24600, 24700 and 127.3.x.y
# stay out of the host's); the namespace is deleted on exit. Nothing here asserts on a time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/opt/swift/usr/bin"
if [[ -z ${NO_BUILD:-} ]]; then
    # One product per invocation: `swift build` takes a single --product.
    swift build -c release --product pestod >/dev/null
    swift build -c release --product pesto-large-bench >/dev/null
    swift build -c release --product pesto-dbus-bench >/dev/null  # its Status prober
fi
NS=
cleanup() { [[ -z $NS ]] || ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
inside=()
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null && ip netns add "pesto-large-$$" 2>/dev/null; then
    NS="pesto-large-$$"
    ip -n "$NS" link set lo up
    inside=(ip netns exec "$NS")
else
    echo "note: not root or no ip netns: running in the host's network namespace"
fi
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), open-file hard limit $(ulimit -Hn)"
"${inside[@]}" .build/release/pesto-large-bench "$@"
