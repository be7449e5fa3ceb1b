#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Changes of the forwarding table under load (issue 13), three benchmarks in one run:
#
#   (1) disruption: pestod holds one rule forwarding LISTENERS ports (10000 upwards; default
#       19,000, fewer under a small descriptor limit, see below) and one unrelated rule (port
#       30000, to an echo server). A client makes CONNECTS connects (default 2,000, one
#       every INTERVAL_MS ms: connect, one byte echoed, close) to the unrelated rule while
#       UPDATES changes (default 20) add and remove a third rule (port 30100); the failed
#       connects are counted. The changes are made four ways:
#       over D-Bus from one connection (Insert + Activate, Deactivate + Delete), by pestoctl
#       (its transactional workflow, one process per change), by an upstream pesto client on
#       pestod's control socket (pestod --control; PestoTestSupport's WireClient, in process),
#       and by the real upstream pesto binary when UPSTREAM_PESTO names one.
#   (2) one change at a time, the LISTENERS ports still active: the time of adding the third
#       rule and of removing it, CHANGE_RUNS times each (PASTA_CHANGE_RUNS for pasta, whose
#       changes take about a second each; medians), the same four ways.
#   Comparison for (1) and (2): upstream pasta's own update path, which closes and reopens
#       every listener on an update, when UPSTREAM_PASTA and UPSTREAM_PESTO name an upstream
#       build whose pasta has the control socket (pasta -c PATH): the same ports and echo
#       server (inside pasta's namespace), changed by the real pesto (each followed by a
#       read-only session on the socket, which pasta answers only once it has applied the
#       change: pesto itself exits as soon as it has sent) and by the in-process client.
#       Debian's pasta (2023) has no control socket. Unset: one line says pasta was skipped.
#   (3) churn: CHURN_CLIENTS clients (default 4, client k from 127.0.0.(10+k)) make short
#       connections (connect, one byte echoed, close) through one port for CHURN_SECONDS
#       (default 60); connections/s per CHURN_SLICE-second slice (default 5), straight to the
#       echo server (direct), through pestod, socat and Debian's pasta (/usr/bin/pasta, or
#       DEBIAN_PASTA), with last slice ÷ first slice and min slice ÷ first slice: a forwarder
#       whose outgoing ports run out (TIME_WAIT) collapses towards 0.
#
# Usage: Benchmarks/run-updates.sh            (as root: it makes network namespaces)
# Environment (defaults in brackets; the whole run takes 5 to 7 minutes, 4 of them churn):
#   LISTENERS [19000, less when the hard open-file limit is below about 20,200]
#   UPDATES [20]  CONNECTS [2000]  INTERVAL_MS [3]  CHANGE_RUNS [20]  PASTA_CHANGE_RUNS [5]
#   CHURN_SECONDS [60]  CHURN_SLICE [5]  CHURN_CLIENTS [4]  CHURN_SUBJECTS [direct pestod socat pasta]
#   PARTS [updates churn]   which parts to run
#   UPSTREAM_PASTA, UPSTREAM_PESTO   an upstream pasta with the control socket and its pesto
#   DEBIAN_PASTA [/usr/bin/pasta]   the pasta of the churn (any pasta; NO_PASTA=1 skips it)
#   SCRATCH [.build]  NO_BUILD=1  KEEP=1 (keep the temp dir: logs)
#   PESTO_BENCH_SUMMARY=FILE   append the summary lines (groups updates and churn)
# Each part runs in network namespaces of its own (ip netns): 19,000 listeners and a minute of
# TIME_WAIT sockets stay out of the host's ports, and each churn subject starts without the
# previous one's TIME_WAIT sockets. Every child is killed on exit (SIGTERM, then SIGKILL, by
# process group), the namespaces are deleted, the temp dir is removed, every wait is bounded.
# Nothing here asserts on a time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/opt/swift/usr/bin"
# 19,000 listeners unless the hard open-file limit leaves pestod no room to relay beside them:
# pestod keeps 64 descriptors for itself and min((limit - 64) / 8, 1024) for listeners only,
# and relays only while listeners + relay descriptors stay below the rest (DescriptorBudget.swift).
# With a hard limit of 20,000 that is 18,912: the default becomes 18,500 (a multiple of 500
# below, leaving 100 for relays), for pestod and pasta alike.
HARD=$(ulimit -Hn)
[[ $HARD == unlimited ]] && HARD=1048576
ROOM=$((HARD - 64 - ((HARD - 64) / 8 < 1024 ? (HARD - 64) / 8 : 1024) - 100))
LISTENERS_NOTE=
if [[ -z ${LISTENERS:-} ]]; then
    LISTENERS=19000
    if ((ROOM < 19000)); then
        LISTENERS=$((ROOM / 500 * 500))
        LISTENERS_NOTE="$LISTENERS listeners, not 19,000: the hard open-file limit is $HARD, and pestod relays only while listeners and relays stay below $((ROOM + 100))"
    fi
elif ((LISTENERS > ROOM)); then
    LISTENERS_NOTE="warning: with $LISTENERS listeners under a hard open-file limit of $HARD, pestod has no descriptors left to relay (it needs listeners + relays below $((ROOM + 100)))"
fi
UPDATES=${UPDATES:-20}
CONNECTS=${CONNECTS:-2000}
INTERVAL_MS=${INTERVAL_MS:-3}
CHANGE_RUNS=${CHANGE_RUNS:-20}
PASTA_CHANGE_RUNS=${PASTA_CHANGE_RUNS:-5}
CHURN_SECONDS=${CHURN_SECONDS:-60}
CHURN_SLICE=${CHURN_SLICE:-5}
CHURN_CLIENTS=${CHURN_CLIENTS:-4}
CHURN_SUBJECTS=${CHURN_SUBJECTS:-direct pestod socat pasta}
PARTS=${PARTS:-updates churn}
DEBIAN_PASTA=${DEBIAN_PASTA:-/usr/bin/pasta}
SCRATCH=${SCRATCH:-.build}
BASE=10000
ECHO_PORT=30001 UNRELATED=30000 EXTRA=30100 EXTRA_TARGET=30101
CHURN_ECHO=20000 CHURN_PORT=21000
number() { [[ ${!1} =~ ^[0-9]+$ && ${!1} -ge $2 && ${!1} -le $3 ]] || { echo "$1 must be $2..$3" >&2; exit 2; }; }
number LISTENERS 1 $((UNRELATED - BASE)); number UPDATES 1 10000; number CONNECTS 1 1000000; number INTERVAL_MS 0 1000
number CHANGE_RUNS 1 10000; number PASTA_CHANGE_RUNS 1 10000; number CHURN_SECONDS 1 3600; number CHURN_SLICE 1 3600; number CHURN_CLIENTS 1 200
[[ $(id -u) == 0 ]] || { echo "run-updates: run as root (network namespaces)" >&2; exit 1; }
for tool in ip ss socat dbus-daemon busctl gdbus timeout setsid; do
    command -v "$tool" >/dev/null || { echo "run-updates: needs $tool" >&2; exit 1; }
done

say() { echo "$@" >&2; }
work=$(mktemp -d /tmp/pesto-updates.XXXXXX)
pids=()
namespaces=()
# Every background child is started by bg(): its own process group (setsid), so that the group
# kill also reaches what it started (pasta's namespace processes, the servers inside).
bg() { setsid "$@" & pids+=($!); }
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done; }
stop() { # PID...: SIGTERM then SIGKILL to each one's group and descendants
    local all=() groups=() p
    for p in "$@"; do mapfile -t -O "${#all[@]}" all < <(descendants "$p"); all+=("$p"); groups+=("-$p"); done
    ((${#all[@]})) || return 0
    kill -TERM -- "${groups[@]}" "${all[@]}" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "${all[@]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "${groups[@]}" "${all[@]}" 2>/dev/null || true
}
cleanup() {
    set +e
    ((${#pids[@]})) && stop "${pids[@]}"
    local ns
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
    [[ -n ${KEEP:-} ]] && say "kept $work" || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
LIFE=$((1800 + CHURN_SECONDS * 5))   # the echo servers' own time bound

# ---- build -----------------------------------------------------------------------------------
BIN=$SCRATCH/release
if [[ -z ${NO_BUILD:-} ]]; then
    say "building pestod, pestoctl, pesto-loadgen and pesto-update-bench (release, scratch $SCRATCH)..."
    for product in pestod pestoctl pesto-loadgen pesto-update-bench; do
        timeout 1800 swift build -c release --scratch-path "$SCRATCH" --product "$product" >"$work/build.log" 2>&1 ||
            { tail -30 "$work/build.log" >&2; say "build of $product failed"; exit 1; }
    done
fi
PESTOD=$PWD/$BIN/pestod PESTOCTL=$PWD/$BIN/pestoctl LOADGEN=$PWD/$BIN/pesto-loadgen BENCH=$PWD/$BIN/pesto-update-bench
for b in "$PESTOD" "$PESTOCTL" "$LOADGEN" "$BENCH"; do [[ -x $b ]] || { say "missing $b"; exit 1; }; done
ulimit -n "$(ulimit -Hn)"   # 19,000 listeners (pestod raises its own limit; pasta needs ours)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- helpers ---------------------------------------------------------------------------------
# A namespace with lo up and a veth pair carrying default routes (Debian's pasta refuses to
# start without a routable interface to copy); nothing is reachable through it.
make_ns() { # NAME
    ip netns add "$1"; namespaces+=("$1")
    ip -n "$1" link set lo up
    ip -n "$1" link add ve0 type veth peer name ve1
    ip -n "$1" addr add 192.0.2.1/24 dev ve0
    ip -n "$1" -6 addr add 2001:db8::1/64 dev ve0 nodad
    ip -n "$1" link set ve0 up; ip -n "$1" link set ve1 up
    ip -n "$1" route add default via 192.0.2.2
    ip -n "$1" -6 route add default via 2001:db8::2
}
wait_for() { # FILE TEXT SECONDS: until FILE contains TEXT
    local i
    for ((i = 0; i < $3 * 20; i++)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    return 1
}
listening() { ip netns exec "$1" ss -Htln "( sport >= :$BASE and sport < :$((BASE + LISTENERS)) )" | wc -l; }
wait_listening() { # NS COUNT SECONDS: until COUNT listeners of the range are bound
    local i
    for ((i = 0; i < $3 * 10; i++)); do (($(listening "$1") >= $2)) && return 0; sleep 0.1; done
    return 1
}
# The echo server of (1) and (2): socat, on every address (upstream pasta splices to its
# namespace's own address, not to its loopback), the same for pestod and pasta.
start_socat_echo() { # NS PORT
    bg ip netns exec "$1" timeout $LIFE socat "TCP-LISTEN:$2,fork,reuseaddr" PIPE
    for _ in $(seq 1 100); do ip netns exec "$1" ss -Htln "( sport = :$2 )" | grep -q . && return 0; sleep 0.05; done
    say "socat did not listen on $1:$2"; exit 1
}
start_echo() { # NS PORT
    bg ip netns exec "$1" "$LOADGEN" serve-echo --tcp "$2" --lifetime $LIFE >"$work/echo.$1.$2" 2>&1
    wait_for "$work/echo.$1.$2" ready 10 || { say "echo server on $1:$2 did not start: $(cat "$work/echo.$1.$2")"; exit 1; }
}
echoes() { # NS PORT: one connection through PORT echoes
    ip netns exec "$1" timeout 10 "$LOADGEN" connrate --port "$2" --seconds 0.1 --clients 1 2>/dev/null | grep -q "failures 0$"
}
start_bus() {
    cat >"$work/bus.conf" <<CONF
<busconfig><type>session</type><listen>unix:path=$work/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/></policy></busconfig>
CONF
    timeout 20 dbus-daemon --config-file="$work/bus.conf" --fork --print-address=1 --print-pid=1 >"$work/bus.out"
    pids+=("$(sed -n 2p "$work/bus.out")")
    ADDR=$(sed -n 1p "$work/bus.out")
}
start_pestod() { # NS [pestod options]: one pestod at a time owns the bus name
    bg ip netns exec "$1" "$PESTOD" --address "$ADDR" --authorize none --no-state --log-level warning "${@:2}" 2>>"$work/pestod.log"
    PESTOD_PID=$!
    timeout 25 gdbus wait --address "$ADDR" --timeout 20 top.passt.Pesto1 || { say "pestod did not come up: $(tail -5 "$work/pestod.log")"; exit 1; }
}
# (busctl says "Failed to find cgroup2 mount" in a namespace of its own: it runs on the host.)
call() { timeout 120 busctl --address="$ADDR" --timeout=120 call top.passt.Pesto1 /top/passt/Pesto1/tables/host top.passt.Pesto1.Table "$@"; }
add_rule() { # ID FIRST LAST TARGET-FIRST: insert and activate, check every socket bound
    local reply
    call Insert 'ua{sv}' "$1" 5 protocol s tcp address s 127.0.0.1 first-port q "$2" last-port q "$3" target-port q "$4" >/dev/null
    reply=$(call Activate u "$1")
    [[ $reply == "uu $(($3 - $2 + 1)) 0" ]] || say "pestod: rule $1 ($2-$3 -> $4) Activate answered: $reply"
}
field() { # LINE NAME: the word after NAME
    awk -v k="$2" '{ for (i = 1; i < NF; i++) if ($i == k) { print $(i + 1); exit } }' <<<"$1"
}
summary() { # group metric subject value unit baseline baseline_value ratio target better
    [[ -n ${PESTO_BENCH_SUMMARY:-} ]] || return 0
    local IFS=$'\t'
    echo "$*" >>"$PESTO_BENCH_SUMMARY"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == "" || b + 0 == 0 || a == "") print "-"; else printf "%.3g\n", a / b }'; }
results=$work/results   # lines: KIND SUBJECT LINE
: >"$results"
measure() { # KIND SUBJECT NS pesto-update-bench arguments…: runs it in NS, keeps its line
    local line
    say "  $1 via $2..."
    if line=$(ip netns exec "$3" timeout 900 "$BENCH" "${@:4}" 2>"$work/bench.err"); then
        echo "$1 $2 $line" >>"$results"
    else
        say "  $1 via $2 failed: $(tail -3 "$work/bench.err")"
        echo "$1 $2 n/a" >>"$results"
        # A run that stopped half-way may have left the extra rule in: take it out.
        [[ -n ${RESET:-} ]] && { $RESET >/dev/null 2>&1 || true; }
    fi
}

start_bus
say "load average at start: $LOAD_START"

# ---- (1) and (2): pestod -----------------------------------------------------------------------
LAST=$((BASE + LISTENERS - 1))
if [[ " $PARTS " == *" updates "* ]]; then
    NS=pesto-upd-$$
    make_ns "$NS"
    start_socat_echo "$NS" $ECHO_PORT
    start_pestod "$NS" --control "$work/control.sock"
    say "pestod: activating $LISTENERS listeners..."
    add_rule 1 $BASE "$LAST" $BASE
    add_rule 2 $UNRELATED $UNRELATED $ECHO_PORT
    echoes "$NS" $UNRELATED || { say "pestod does not relay $UNRELATED to the echo server"; exit 1; }
    say "pestod: $(listening "$NS") listeners of $BASE-$LAST bound; fd limit $(ulimit -n)"
    [[ -n $LISTENERS_NOTE ]] && say "$LISTENERS_NOTE"
    declare -A VIA=(
        [pestod-dbus]="--via dbus --address $ADDR --update-port $EXTRA --target-port $EXTRA_TARGET"
        [pestoctl]="--via command --add $PESTOCTL|--address|$ADDR|-q|-A|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET --remove $PESTOCTL|--address|$ADDR|-q|-D|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET"
        [pesto-client]="--via wire --control $work/control.sock --update-port $EXTRA --target-port $EXTRA_TARGET"
    )
    RESET="$PESTOCTL --address $ADDR -q -D -t 127.0.0.1/$EXTRA:$EXTRA_TARGET"
    ways=(pestod-dbus pestoctl pesto-client)
    if [[ -n ${UPSTREAM_PESTO:-} && -x ${UPSTREAM_PESTO:-} ]]; then
        VIA[upstream-pesto]="--via command --add $UPSTREAM_PESTO|-A|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET|$work/control.sock --remove $UPSTREAM_PESTO|-D|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET|$work/control.sock --settle $work/control.sock"
        ways+=(upstream-pesto)
    fi
    via() { # WAY: its pesto-update-bench arguments, one per line ('|' joins a command's words)
        local a
        for a in ${VIA[$1]}; do echo "${a//|/ }"; done
    }
    measure disrupt pestod-none "$NS" disrupt --port $UNRELATED --connects "$CONNECTS" --interval-ms "$INTERVAL_MS" --updates 0 \
        --via wire --control "$work/control.sock" --update-port $EXTRA --target-port $EXTRA_TARGET
    for way in "${ways[@]}"; do
        mapfile -t args < <(via "$way")
        measure disrupt "$way" "$NS" disrupt --port $UNRELATED --connects "$CONNECTS" --interval-ms "$INTERVAL_MS" --updates "$UPDATES" "${args[@]}"
    done
    for way in "${ways[@]}"; do
        mapfile -t args < <(via "$way")
        measure change "$way" "$NS" change --runs "$CHANGE_RUNS" "${args[@]}"
    done
    PESTOD_RSS=$(awk '$1 == "VmHWM:" {print $2}' /proc/"$(pgrep -P "$PESTOD_PID" -x pestod || echo "$PESTOD_PID")"/status 2>/dev/null || true)
    RESET=
    stop "$PESTOD_PID"
    ip netns del "$NS"

    # ---- the same against upstream pasta ----------------------------------------------------
    PASTA_NOTE=
    if [[ -z ${UPSTREAM_PASTA:-} || -z ${UPSTREAM_PESTO:-} ]]; then
        PASTA_NOTE="pasta skipped: set UPSTREAM_PASTA and UPSTREAM_PESTO to an upstream build with the control socket (pasta -c)"
    elif ! "$UPSTREAM_PASTA" --help 2>&1 | grep -q -- "--conf-path"; then
        PASTA_NOTE="pasta skipped: $UPSTREAM_PASTA has no control socket (--conf-path)"
    else
        NSP=pesto-upd-pasta-$$
        make_ns "$NSP"
        # Host side (NSP): 127.0.0.1 ports BASE..LAST and UNRELATED; pasta's own namespace: the
        # echo server on UNRELATED. -u none: no UDP listeners (the default forwards UDP too).
        bg ip netns exec "$NSP" "$UPSTREAM_PASTA" --runas 0 --config-net -f -q -c "$work/pasta.sock" \
            -T none -U none -u none -t "127.0.0.1/$BASE-$LAST" -t "127.0.0.1/$UNRELATED" \
            -- timeout $LIFE socat "TCP-LISTEN:$UNRELATED,fork,reuseaddr" PIPE >"$work/pasta.log" 2>&1
        PASTA_PID=$!
        if wait_listening "$NSP" "$LISTENERS" 120 && for _ in $(seq 1 100); do echoes "$NSP" $UNRELATED && break; sleep 0.1; done &&
            echoes "$NSP" $UNRELATED; then
            say "pasta: $(listening "$NSP") listeners of $BASE-$LAST bound"
            ptarget="--update-port $EXTRA --target-port $EXTRA_TARGET"
            RESET="$UPSTREAM_PESTO -D -t 127.0.0.1/$EXTRA:$EXTRA_TARGET $work/pasta.sock"
            declare -A VIA=(
                [pasta-pesto]="--via command --add $UPSTREAM_PESTO|-A|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET|$work/pasta.sock --remove $UPSTREAM_PESTO|-D|-t|127.0.0.1/$EXTRA:$EXTRA_TARGET|$work/pasta.sock --settle $work/pasta.sock"
                [pasta-pesto-client]="--via wire --control $work/pasta.sock $ptarget"
            )
            measure disrupt pasta-none "$NSP" disrupt --port $UNRELATED --connects "$CONNECTS" --interval-ms "$INTERVAL_MS" --updates 0 \
                --via wire --control "$work/pasta.sock" $ptarget
            for way in pasta-pesto pasta-pesto-client; do
                mapfile -t args < <(via "$way")
                measure disrupt "$way" "$NSP" disrupt --port $UNRELATED --connects "$CONNECTS" --interval-ms "$INTERVAL_MS" --updates "$UPDATES" "${args[@]}"
            done
            for way in pasta-pesto pasta-pesto-client; do
                mapfile -t args < <(via "$way")
                measure change "$way" "$NSP" change --runs "$PASTA_CHANGE_RUNS" "${args[@]}"
            done
        else
            PASTA_NOTE="pasta did not come up with $LISTENERS listeners: $(tr '\n' ' ' <"$work/pasta.log" | cut -c1-300)"
        fi
        RESET=
        stop "$PASTA_PID"
        ip netns del "$NSP"
    fi
fi

# ---- (3) churn ---------------------------------------------------------------------------------
CHURN_NOTE=
if [[ " $PARTS " == *" churn "* ]]; then
    for subject in $CHURN_SUBJECTS; do
        NSC=pesto-churn-$subject-$$
        make_ns "$NSC"
        start_echo "$NSC" $CHURN_ECHO
        port=$CHURN_PORT
        owner=
        case $subject in
            direct) port=$CHURN_ECHO ;;
            pestod)
                start_pestod "$NSC"
                owner=$PESTOD_PID
                add_rule 1 $CHURN_PORT $CHURN_PORT $CHURN_ECHO
                ;;
            socat)
                bg ip netns exec "$NSC" timeout $LIFE socat "TCP-LISTEN:$CHURN_PORT,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$CHURN_ECHO"
                owner=$!
                ;;
            pasta)
                if [[ -n ${NO_PASTA:-} || ! -x $DEBIAN_PASTA ]]; then
                    CHURN_NOTE="pasta skipped (${NO_PASTA:+NO_PASTA set}${NO_PASTA:-$DEBIAN_PASTA not installed: apt-get install passt})"
                    ip netns del "$NSC"; continue
                fi
                # pasta splices host-side 127.0.0.1:PORT to the same port on loopback in its own
                # namespace, where a second echo server listens.
                bg ip netns exec "$NSC" "$DEBIAN_PASTA" --runas 0 --config-net -f -T none -U none -u none -t "127.0.0.1/$CHURN_PORT" \
                    -- "$LOADGEN" serve-echo --tcp $CHURN_PORT --lifetime $LIFE >"$work/debian-pasta.log" 2>&1
                owner=$!
                ;;
            *) say "unknown churn subject $subject"; exit 2 ;;
        esac
        for _ in $(seq 1 100); do echoes "$NSC" "$port" && break; sleep 0.1; done
        if echoes "$NSC" "$port"; then
            measure churn "$subject" "$NSC" churn --port "$port" --seconds "$CHURN_SECONDS" --slice "$CHURN_SLICE" --clients "$CHURN_CLIENTS"
        else
            say "churn: $subject does not relay"
            echo "churn $subject n/a" >>"$results"
        fi
        [[ -n $owner ]] && stop "$owner"
        ip netns del "$NSC"
    done
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ------------------------------------------------------------------------------------
echo
echo "pesto updates under load: $(date -u '+%Y-%m-%d %H:%M UTC'); kernel $(uname -r); $(nproc) CPUs; load average $LOAD_START at start, $LOAD_END at end"
get() { awk -v k="$1" -v s="$2" '$1 == k && $2 == s { $1 = ""; $2 = ""; sub(/^  /, ""); print; exit }' "$results"; }
if [[ " $PARTS " == *" updates "* ]]; then
    all_ways=(pestod-none pestod-dbus pestoctl pesto-client upstream-pesto pasta-none pasta-pesto pasta-pesto-client)
    describe() {
        case $1 in
            pestod-none) echo "pestod, no change (control)" ;;
            pasta-none) echo "pasta, no change (control)" ;;
            pestod-dbus) echo "pestod, D-Bus (one connection)" ;;
            pestoctl) echo "pestod, pestoctl (1 process/change)" ;;
            pesto-client) echo "pestod, pesto client (in process)" ;;
            upstream-pesto) echo "pestod, upstream pesto (process)" ;;
            pasta-pesto) echo "pasta, upstream pesto (process)" ;;
            pasta-pesto-client) echo "pasta, pesto client (in process)" ;;
        esac
    }
    echo
    echo "(1) failed connects to an unrelated rule during $UPDATES changes, $LISTENERS listeners active"
    echo "    ($CONNECTS connects, one every $INTERVAL_MS ms; each change adds or removes one rule)"
    printf '    %-38s %14s %10s %14s %14s\n' "" "failed" "changes" "change median" "change max"
    for way in "${all_ways[@]}"; do
        line=$(get disrupt "$way")
        [[ -n $line ]] || continue
        if [[ $line == n/a ]]; then printf '    %-38s %14s\n' "$(describe "$way")" n/a; continue; fi
        failed=$(field "$line" failed) of=$(field "$line" of) during=$(field "$line" during)
        cell="$failed of $of"
        first=$(field "$line" first)
        if [[ $way == *-none ]]; then
            printf '    %-38s %14s %10s %14s %14s%s\n' "$(describe "$way")" "$cell" - - - "${first:+  (first: $first)}"
            continue
        fi
        printf '    %-38s %14s %10s %11s ms %11s ms%s\n' "$(describe "$way")" "$cell" "$during/$UPDATES" \
            "$(field "$line" median-ms)" "$(field "$line" max-ms)" "${first:+  (first: $first)}"
        summary updates "failed connects, $UPDATES changes, $LISTENERS listeners" "$way" "$failed" "failed/$of" - - - \
            "$([[ $way == pasta* ]] && echo - || echo 0)" lower
    done
    echo "    changes: how many of them ended while the connects still ran"
    echo
    echo "(2) one change while $LISTENERS listeners stay active (median of $CHANGE_RUNS, pasta $PASTA_CHANGE_RUNS; the process start included where one per change)"
    printf '    %-38s %12s %12s %22s\n' "" "add" "remove" "÷ pasta's (pesto client)"
    base=$(get change pasta-pesto-client)
    base_add=$(field "$base" add-ms) base_remove=$(field "$base" remove-ms)
    for way in "${all_ways[@]}"; do
        line=$(get change "$way")
        [[ -n $line ]] || continue
        if [[ $line == n/a ]]; then printf '    %-38s %12s\n' "$(describe "$way")" n/a; continue; fi
        a=$(field "$line" add-ms) r=$(field "$line" remove-ms)
        printf '    %-38s %9s ms %9s ms %11s %10s\n' "$(describe "$way")" "$a" "$r" "$(ratio "$a" "$base_add")" "$(ratio "$r" "$base_remove")"
        for kind in add remove; do
            v=$([[ $kind == add ]] && echo "$a" || echo "$r")
            b=$([[ $kind == add ]] && echo "$base_add" || echo "$base_remove")
            if [[ -n $b && $way != pasta-pesto-client ]]; then
                summary updates "one-rule $kind, $LISTENERS listeners" "$way" "$v" ms "pasta, pesto client" "$b" "$(ratio "$v" "$b")" - lower
            else
                summary updates "one-rule $kind, $LISTENERS listeners" "$way" "$v" ms - - - - lower
            fi
        done
    done
    [[ -n ${PASTA_NOTE:-} ]] && echo "    $PASTA_NOTE"
    [[ -n $LISTENERS_NOTE ]] && echo "    $LISTENERS_NOTE"
    [[ -n ${PESTOD_RSS:-} ]] && echo "    pestod peak RSS with $LISTENERS listeners: $((PESTOD_RSS / 1024)) MiB"
fi
if [[ " $PARTS " == *" churn "* ]]; then
    echo
    echo "(3) churn: $CHURN_CLIENTS clients, short connections for $CHURN_SECONDS s, connections/s per $CHURN_SLICE-s slice"
    direct_first=$(get churn direct | awk '$1 == "churn" { print $2 }')
    for subject in $CHURN_SUBJECTS; do
        line=$(get churn "$subject")
        [[ -n $line ]] || continue
        if [[ $line == n/a ]]; then printf '    %-8s n/a\n' "$subject"; continue; fi
        read -r -a slices < <(awk '{ for (i = 2; i <= NF && $i != "failures"; i++) printf "%s ", $i; print "" }' <<<"$line")
        first=${slices[0]} last=${slices[-1]}
        min=$(printf '%s\n' "${slices[@]}" | sort -n | head -1)
        failures=$(field "$line" failures) errno=$(field "$line" first)
        printf '    %-8s %s\n' "$subject" "${slices[*]}"
        printf '    %-8s last/first %s, min/first %s, ÷ direct (first slice) %s, failed %s%s\n' "" "$(ratio "$last" "$first")" \
            "$(ratio "$min" "$first")" "$(ratio "$first" "$direct_first")" "$failures" "${errno:+ (first: $errno)}"
        summary churn "connections/s, first $CHURN_SLICE-s slice, $CHURN_CLIENTS clients" "$subject" "$first" conn/s \
            direct "${direct_first:--}" "$(ratio "$first" "$direct_first")" - higher
        summary churn "last slice ÷ first slice, $CHURN_SECONDS s" "$subject" "$last" conn/s "first slice" "$first" \
            "$(ratio "$last" "$first")" - higher
        summary churn "min slice ÷ first slice, $CHURN_SECONDS s" "$subject" "$min" conn/s "first slice" "$first" \
            "$(ratio "$min" "$first")" - higher
    done
    [[ -n $CHURN_NOTE ]] && echo "    $CHURN_NOTE"
fi
# (--authorize none is warned about at every start: expected here.)
if grep -v -- "--authorize none" "$work/pestod.log" >"$work/pestod.warnings" 2>/dev/null && [[ -s $work/pestod.warnings ]]; then
    echo "pestod logged $(wc -l <"$work/pestod.warnings") unexpected line(s) at warning or above; the first: $(head -1 "$work/pestod.warnings" | cut -c1-300)"
fi
