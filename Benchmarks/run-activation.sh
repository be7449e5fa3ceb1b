#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds the activation benchmark in release mode and runs it; extra arguments are passed on.
# Prints figures and ratios against a bare socket/bind/listen loop run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product pesto-activation-bench >/dev/null
exec .build/release/pesto-activation-bench "$@"
