#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Runs every benchmark once, collects their figures as summary lines in one file and turns them
# into a Markdown report and a chart of the ratios (Benchmarks/report.py).
#
#   Benchmarks/run-all.sh [OUTDIR]        (default Benchmarks/results/<UTC date and time>/)
#
# Builds release once, then runs, each with PESTO_BENCH_SUMMARY=OUTDIR/summary.tsv and its
# output saved as OUTDIR/<name>.txt: run-datapath.sh, run-activation.sh (in a network namespace
# of its own), run-dbus.sh, run-updates.sh (skipped with a note where it does not exist),
# run-overlap.sh (in a network namespace of its own) and the soak for memory growth
# (run-soak.sh --memory). A benchmark that fails is noted and the others still run. Then
# report.py writes OUTDIR/performance.md and OUTDIR/performance.png.
#
# Environment:
#   QUICK=1           a smoke run: every benchmark with its shortest settings (minutes)
#   NO_PASTA=1        skip pasta in the data path (do not try to install Debian's passt)
#   SOAK_SECONDS=N    the memory soak's length (default 60; 600 for the 10-minute soak)
#   ONLY="a b"        run only these: datapath activation dbus updates overlap soak
#   DATAPATH_SECONDS  seconds per data-path measurement (default 5; QUICK: 1)
#   REPEAT=N          data-path rounds, medians reported (default 3; QUICK: 1)
#   DOC=1             also regenerate doc/performance.md's generated part and doc/performance.png
#   NO_BUILD=1        use the binaries already in .build/release
#   PYTHON=PATH       the interpreter for report.py (default /usr/bin/python3, which has
#                     Debian's python3-matplotlib)
# Run as root (namespaces, ports below 1024), on a machine doing nothing else: ratios are
# taken against baselines measured in the same run, but absolute figures do not travel.
# Results stay out of git (Benchmarks/results/ is ignored) unless copied into doc/ by DOC=1.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PATH="$PATH:/opt/swift/usr/bin"
OUT=${1:-Benchmarks/results/$(date -u +%Y-%m-%dT%H%MZ)}
QUICK=${QUICK:-}
SOAK_SECONDS=${SOAK_SECONDS:-60}
ONLY=${ONLY:-datapath activation dbus updates overlap soak}
if [[ -n $QUICK ]]; then
    DATAPATH_SECONDS=${DATAPATH_SECONDS:-1}
    REPEAT=${REPEAT:-1}
else
    DATAPATH_SECONDS=${DATAPATH_SECONDS:-5}
    REPEAT=${REPEAT:-3}
fi
[[ $SOAK_SECONDS =~ ^[0-9]+$ && $SOAK_SECONDS -ge 10 ]] || { echo "SOAK_SECONDS must be 10 or more" >&2; exit 2; }
PYTHON=${PYTHON:-/usr/bin/python3}
[[ -x $PYTHON ]] || PYTHON=python3
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.tsv
: >"$SUMMARY"
export PESTO_BENCH_SUMMARY=$SUMMARY
NOTES=$OUT/notes.txt
: >"$NOTES"
note() { echo "run-all: $*" | tee -a "$NOTES" >&2; }

NS=
cleanup() { [[ -z $NS ]] || ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---- the machine ---------------------------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel: $(uname -r); CPUs: $(nproc); load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo "mode: ${QUICK:+quick }run; data path ${DATAPATH_SECONDS} s x ${REPEAT} round(s); soak ${SOAK_SECONDS} s${NO_PASTA:+; pasta skipped}"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# ---- build once ------------------------------------------------------------------------------------
if [[ -z ${NO_BUILD:-} ]]; then
    echo "run-all: building release (log in $OUT/build.log)..." >&2
    if ! swift build -c release >"$OUT/build.log" 2>&1; then
        tail -30 "$OUT/build.log" >&2
        echo "run-all: the release build failed" >&2
        exit 1
    fi
fi
export NO_BUILD=1

# A network namespace with loopback up, for the benchmarks that bind ranges of ports.
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null && ip netns add "pesto-all-$$" 2>/dev/null; then
    NS=pesto-all-$$
    ip -n "$NS" link set lo up
    in_ns=(ip netns exec "$NS")
else
    note "not root or no ip netns: activation and overlap run in this namespace (other processes' ports may spoil them)"
    in_ns=()
fi

# bench NAME COMMAND...: runs one benchmark, output to OUTDIR/NAME.txt, noting its time and status.
bench() {
    local name=$1 t0 rc
    shift
    [[ " $ONLY " == *" $name "* ]] || return 0
    echo "run-all: $name: $* (output in $OUT/$name.txt)" >&2
    t0=$(date +%s)
    "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    if ((rc == 0)); then
        echo "run-all: $name done in $(($(date +%s) - t0)) s" >&2
    else
        note "$name exited with status $rc after $(($(date +%s) - t0)) s; see $name.txt"
    fi
}

if [[ -n $QUICK ]]; then
    ACTIVATION_ARGS=(--runs 1)
    DBUS_ARGS=(--runs 1 --seconds 0.2 --iterations 5)
    OVERLAP_ARGS=(both 200 20)
else
    ACTIVATION_ARGS=()
    DBUS_ARGS=()
    OVERLAP_ARGS=(both 1000 100)
fi
bench datapath env REPEAT="$REPEAT" Benchmarks/run-datapath.sh "$DATAPATH_SECONDS"
bench activation "${in_ns[@]}" Benchmarks/run-activation.sh "${ACTIVATION_ARGS[@]}"
bench dbus Benchmarks/run-dbus.sh "${DBUS_ARGS[@]}"
if [[ -x Benchmarks/run-updates.sh ]]; then
    bench updates env QUICK="$QUICK" Benchmarks/run-updates.sh
elif [[ " $ONLY " == *" updates "* ]]; then
    note "updates skipped: Benchmarks/run-updates.sh does not exist in this tree"
fi
bench overlap "${in_ns[@]}" env PESTOD=.build/release/pestod Benchmarks/run-overlap.sh "${OVERLAP_ARGS[@]}"
# (busctl says "Failed to find cgroup2 mount" in a network namespace of its own, hundreds of times.)
[[ ! -f $OUT/overlap.txt ]] || sed -i '/^Failed to find cgroup2 mount$/d' "$OUT/overlap.txt"
bench soak Benchmarks/run-soak.sh --memory --seconds "$SOAK_SECONDS"

# ---- the report ------------------------------------------------------------------------------------
echo "run-all: $(wc -l <"$SUMMARY") summary lines in $SUMMARY" >&2
note_text="Measured $(sed -n 1p "$OUT/machine.txt" | cut -d' ' -f2-) on $(nproc) CPUs (kernel $(uname -r)), \
load average $(sed -n 2p "$OUT/machine.txt" | sed 's/.*before the run: //') before and $(cut -d' ' -f1-3 /proc/loadavg) at the end; $(sed -n 4p "$OUT/machine.txt" | cut -d' ' -f2-); \
commit $(sed -n 3p "$OUT/machine.txt" | cut -d' ' -f2-)."
if [[ -s $NOTES ]]; then
    note_text+=" Notes: $(sed 's/^run-all: //' "$NOTES" | paste -sd ';' | sed 's/;/; /g')."
fi
report=(--out "$OUT" --note "$note_text")
[[ -z ${DOC:-} ]] || report+=(--doc doc/performance.md)
"$PYTHON" Benchmarks/report.py "$SUMMARY" "${report[@]}"
