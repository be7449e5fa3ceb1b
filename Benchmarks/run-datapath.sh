#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# The data-path benchmark: the same loads, side by side in one run, straight to the server
# ("direct"), through pestod, through socat and, when Debian's passt package can be installed,
# through upstream pasta (host port -> a namespace pasta creates):
#   (a) TCP bulk throughput, one stream (iperf3)      (b) short TCP connections/s, 1 and 4 clients
#   (c) UDP request/response rate, 64 bytes           (d) pestod's RSS with 500 and 1,500 idle
#   (c') UDP, 64 flows with 4 datagrams in flight each      relayed connections
#        (datagrams/s)
# Prints absolute figures, ratios to direct and to socat, and the project's targets (below).
# Then the cost of two per-rule options, each against the plain relay it changes:
#   PROXY protocol v2 (proxy-protocol): pestod -> a host echo server that reads the header,
#       against the plain pestod path (b);
#   transparent source (source=client): a second pestod with --netns relays into a namespace
#       of the run's own, from the clients' addresses (198.18.0.0/24, routed to lo on the host
#       for the run: addresses the namespace does not have, so its policy routing is used),
#       against the same pestod relaying from its own address; (a), (b) and (c).
#   These need root (ip netns); without it they are skipped (NO_OPTIONS=1 skips them too).
#
# Usage: Benchmarks/run-datapath.sh [SECONDS per measurement, default 5]
# Environment: REPEAT=N       rounds, medians reported (default 1; paths interleaved per round)
#              SCRATCH=DIR    swift build --scratch-path (default .build)
#              NO_BUILD=1     use the binaries already in $SCRATCH/release
#              NO_PASTA=1     skip pasta (and do not try to install it)
#              NO_OPTIONS=1   skip the PROXY protocol and transparent source measurements
#              KEEP=1         keep the temp dir (logs of pestod, pasta, the servers)
#              PESTO_BENCH_SUMMARY=FILE  also append every figure there as summary lines (groups
#                             datapath and memory; Benchmarks/README.md, "run-all.sh")
# Connection-rate clients each connect from their own 127.0.0.x (pesto-loadgen connrate --spread):
# from one address, 4 clients reach only ~14k/s direct here, as port allocation against tens of
# thousands of TIME_WAIT sockets becomes the bottleneck. The relays' own outgoing leg is theirs.
# Loopback only (127.0.0.0/8, pasta's own namespace, and for the options 198.18.0.0/24 and a namespace of its own). Every child is killed on exit
# (SIGTERM, then SIGKILL), every wait is bounded, the temp dir is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/opt/swift/usr/bin"
DUR=${1:-5}
REPEAT=${REPEAT:-1}
SCRATCH=${SCRATCH:-.build}
[[ $DUR =~ ^[0-9]+$ && $DUR -ge 1 && $DUR -le 120 ]] || { echo "SECONDS must be 1..120" >&2; exit 2; }
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -ge 1 && $REPEAT -le 9 ]] || { echo "REPEAT must be 1..9" >&2; exit 2; }
for tool in iperf3 socat dbus-daemon busctl gdbus python3 ss timeout; do
    command -v "$tool" >/dev/null || { echo "run-datapath: needs $tool" >&2; exit 1; }
done

say() { echo "$@" >&2; }
work=$(mktemp -d /tmp/pesto-datapath.XXXXXX)
pids=()
# Every background child is started by bg(): its own process group (setsid), so that the group
# kill also reaches what it started even if it died first (pasta's namespace processes).
bg() { setsid "$@" & pids+=($!); }
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done; }
cleanup() {
    set +e
    local all=() groups=() p
    for p in "${pids[@]}"; do  # collect the whole tree before killing anything
        mapfile -t -O "${#all[@]}" all < <(descendants "$p")
        all+=("$p"); groups+=("-$p")
    done
    if ((${#all[@]})); then
        kill -TERM -- "${groups[@]}" "${all[@]}" 2>/dev/null
        sleep 0.5
        kill -KILL -- "${groups[@]}" "${all[@]}" 2>/dev/null
    fi
    [[ -n ${NS:-} ]] && ip netns del "$NS" 2>/dev/null
    [[ -n ${ANYIP:-} ]] && ip route del local 198.18.0.0/24 dev lo 2>/dev/null
    [[ -n ${KEEP:-} ]] && say "kept $work" || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# The servers' own time bound: the whole run takes about 28 x (DUR + a few s) per round.
LIFE=$((REPEAT * 28 * (DUR + 10) + 900))

# ---- build -----------------------------------------------------------------------------------
BIN=$SCRATCH/release
if [[ -z ${NO_BUILD:-} ]]; then
    say "building pestod and pesto-loadgen (release, scratch $SCRATCH)..."
    for product in pestod pesto-loadgen; do
        timeout 1800 swift build -c release --scratch-path "$SCRATCH" --product "$product" >"$work/build.log" 2>&1 ||
            { tail -30 "$work/build.log" >&2; say "build of $product failed"; exit 1; }
    done
fi
LOADGEN=$PWD/$BIN/pesto-loadgen
PESTOD=$PWD/$BIN/pestod
[[ -x $LOADGEN && -x $PESTOD ]] || { say "missing $LOADGEN or $PESTOD"; exit 1; }

# Other work on this 2-CPU machine skews every figure: note how busy it is before we start.
cpu_busy() { # percent of all CPUs' time spent not idle over one second
    local a b c d e f g h t1 i1
    read -r _ a b c d e f g h _ </proc/stat; t1=$((a + b + c + d + e + f + g + h)); i1=$((d + e))
    sleep 1
    read -r _ a b c d e f g h _ </proc/stat
    echo $((100 * ((a + b + c + d + e + f + g + h - t1) - (d + e - i1)) / (a + b + c + d + e + f + g + h - t1 + 1)))
}
BUSY=$(cpu_busy)
((BUSY < 10)) || say "warning: the machine is ${BUSY}% busy before the run; figures will be skewed"

# ---- ports -----------------------------------------------------------------------------------
# Base B: echo servers (TCP and UDP on one number) at B+0 direct, B+10 pestod's target, B+20
# socat's; iperf3 servers at +1. The forwarders listen at +100 (pasta's namespace uses +130/131
# inside too).
offsets=(0 1 10 11 12 20 21 110 111 112 120 121 130 131 140 141 142 143)
port_busy() { ss -Htuan "( sport = :$1 )" | grep -q .; }
B=
for base in 23000 24000 25000 26000 27000 28000 29000 30000; do
    busy=0
    for o in "${offsets[@]}"; do port_busy $((base + o)) && { busy=1; break; }; done
    ((busy)) || { B=$base; break; }
done
[[ -n $B ]] || { say "no free port range below the ephemeral range"; exit 1; }
declare -A ECHO=([direct]=$B [pestod]=$((B + 110)) [socat]=$((B + 120)) [pasta]=$((B + 130)))
declare -A IPERF=([direct]=$((B + 1)) [pestod]=$((B + 111)) [socat]=$((B + 121)) [pasta]=$((B + 131)))

wait_for() { # FILE TEXT SECONDS: until FILE contains TEXT
    local i
    for ((i = 0; i < $3 * 20; i++)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    return 1
}
wait_listen() { # PORT
    local i
    for ((i = 0; i < 200; i++)); do ss -Hltn "( sport = :$1 )" | grep -q . && return 0; sleep 0.05; done
    say "nothing listens on $1"; exit 1
}
start_echo() { # PORT
    bg "$LOADGEN" serve-echo --tcp "$1" --udp "$1" --lifetime $LIFE >"$work/echo.$1" 2>&1
    wait_for "$work/echo.$1" ready 10 || { say "echo server on $1 did not start: $(cat "$work/echo.$1")"; exit 1; }
}
start_iperf() { # PORT
    bg timeout $LIFE iperf3 -s -B 127.0.0.1 -p "$1" >/dev/null 2>&1
    wait_listen "$1"
}
for o in 0 10 20; do start_echo $((B + o)); start_iperf $((B + o + 1)); done

# ---- pestod ----------------------------------------------------------------------------------
cat >"$work/bus.conf" <<CONF
<busconfig><type>session</type><listen>unix:path=$work/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/></policy></busconfig>
CONF
timeout 20 dbus-daemon --config-file="$work/bus.conf" --fork --print-address=1 --print-pid=1 >"$work/bus.out"
pids+=("$(sed -n 2p "$work/bus.out")")
ADDR=$(sed -n 1p "$work/bus.out")
# The idle-connection memory test holds IDLE_HIGH connections (1,500 by default): TCP's share of
# the relay budget is 6 descriptors per connection, pipes included (pestod(8) DESCRIPTORS), so
# under this host's RLIMIT_NOFILE of 20,000 pestod relays about 1,576 at once; more would be reset.
extra=()
help=$("$PESTOD" --help 2>&1 || true)
[[ $help == *--max-connections* ]] && extra+=(--max-connections "${IDLE_HIGH:-1500}")
bg "$PESTOD" --address "$ADDR" --authorize none --log-level warning "${extra[@]}" 2>"$work/pestod.log"
PESTOD_PID=$!
timeout 25 gdbus wait --address "$ADDR" --timeout 20 top.passt.Pesto1 || { say "pestod did not come up: $(tail -5 "$work/pestod.log")"; exit 1; }
call() { timeout 10 busctl --address="$ADDR" call top.passt.Pesto1 /top/passt/Pesto1/tables/host top.passt.Pesto1.Table "$@"; }
rule=1
for spec in "tcp $((B + 110)) $((B + 10))" "udp $((B + 110)) $((B + 10))" "tcp $((B + 111)) $((B + 11))"; do
    read -r proto port target <<<"$spec"
    call Insert 'ua{sv}' $rule 4 protocol s "$proto" address s 127.0.0.1 first-port q "$port" target-port q "$target" >/dev/null
    reply=$(call Activate u $rule)
    [[ $reply == "uu 1 0" ]] || say "pestod: rule $rule ($proto $port -> $target) Activate answered: $reply"
    rule=$((rule + 1))
done

# ---- socat -----------------------------------------------------------------------------------
start_socat() { # PROTO PORT TARGET
    bg timeout $LIFE socat "$1-LISTEN:$2,bind=127.0.0.1,fork,reuseaddr" "$1:127.0.0.1:$3" 2>/dev/null
}
start_socat TCP $((B + 120)) $((B + 20))
start_socat UDP $((B + 120)) $((B + 20))
start_socat TCP $((B + 121)) $((B + 21))
wait_listen $((B + 120)); wait_listen $((B + 121))

# ---- pasta -----------------------------------------------------------------------------------
# Upstream pasta forwards host ports 127.0.0.1:B+130/131 into a namespace of its own where an
# echo server and iperf3 listen on the same port numbers (on loopback there: pasta splices
# loopback to loopback). Same numbers because Debian 12's pasta (2023-03-09) echoes nothing
# back for a UDP forward with a different target port (-u P:Q). As root it needs --runas 0.
PASTA_NOTE=
paths=(direct pestod socat)
if [[ -n ${NO_PASTA:-} ]]; then
    PASTA_NOTE="skipped (NO_PASTA set)"
else
    if ! command -v pasta >/dev/null; then
        say "pasta missing: installing Debian's passt package..."
        timeout 300 apt-get install -y -qq passt >"$work/apt.log" 2>&1 ||
            { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq passt >"$work/apt.log" 2>&1; } || true
    fi
    if ! command -v pasta >/dev/null; then
        PASTA_NOTE="n/a: passt package not installable ($(tail -1 "$work/apt.log" 2>/dev/null))"
    else
        E=$((B + 130)) I=$((B + 131))
        inner="$LOADGEN serve-echo --tcp $E --udp $E --lifetime $LIFE & timeout $LIFE iperf3 -s -B 127.0.0.1 -p $I & wait"
        bg pasta --runas 0 --config-net -T none -U none -t 127.0.0.1/$E -t 127.0.0.1/$I -u 127.0.0.1/$E \
            -- sh -c "$inner" >"$work/pasta.log" 2>&1
        # pasta binds the host ports at once; the servers inside start a moment later.
        for _ in $(seq 1 100); do
            if timeout 5 "$LOADGEN" connrate --port $((B + 130)) --seconds 0.1 --clients 1 2>/dev/null | grep -q "failures 0$"; then
                paths+=(pasta); break
            fi
            sleep 0.1
        done
        [[ " ${paths[*]} " == *" pasta "* ]] || PASTA_NOTE="n/a: pasta did not relay ($(tr '\n' ' ' <"$work/pasta.log" | cut -c1-200))"
    fi
fi

# ---- PROXY protocol and transparent source ---------------------------------------------------
# proxy: host pestod's rule B+112 -> B+12 with proxy-protocol v2, to an echo server that reads
# the header. nsplain/nsclient: a second pestod (own bus) with --netns NS, rules B+140 -> E
# (source pestod) and B+141 -> E (source client), TCP and UDP, and B+142/B+143 -> E+1 (iperf3)
# likewise; E = B+40 inside NS. Their clients come from 198.18.0.x.
OPTIONS_NOTE=
extras=()
declare -A XPORT XIPERF
if [[ -n ${NO_OPTIONS:-} ]]; then
    OPTIONS_NOTE="skipped (NO_OPTIONS set)"
elif [[ $(id -u) != 0 ]]; then
    OPTIONS_NOTE="skipped: needs root for ip netns"
else
    bg "$LOADGEN" serve-echo --tcp $((B + 12)) --proxy --lifetime $LIFE >"$work/echo.proxy" 2>&1
    wait_for "$work/echo.proxy" ready 10 || { say "PROXY echo server did not start"; exit 1; }
    call Insert 'ua{sv}' 10 5 protocol s tcp address s 127.0.0.1 first-port q $((B + 112)) target-port q $((B + 12)) \
        proxy-protocol s v2 >/dev/null
    [[ $(call Activate u 10) == "uu 1 0" ]] && { extras+=(proxy); XPORT[proxy]=$((B + 112)); } || say "pestod: the PROXY rule did not activate"
    NS=pesto-bench-$$
    E=$((B + 40))
    ip netns add "$NS" && ip -n "$NS" link set lo up
    ip route add local 198.18.0.0/24 dev lo && ANYIP=1
    bg ip netns exec "$NS" "$LOADGEN" serve-echo --tcp $E --udp $E --lifetime $LIFE >"$work/echo.ns" 2>&1
    wait_for "$work/echo.ns" ready 10 || { say "the namespace's echo server did not start"; exit 1; }
    bg ip netns exec "$NS" timeout $LIFE iperf3 -s -B 127.0.0.1 -p $((E + 1)) >/dev/null 2>&1
    sed "s|$work/bus.sock|$work/bus2.sock|" "$work/bus.conf" >"$work/bus2.conf"
    timeout 20 dbus-daemon --config-file="$work/bus2.conf" --fork --print-address=1 --print-pid=1 >"$work/bus2.out"
    pids+=("$(sed -n 2p "$work/bus2.out")")
    ADDR2=$(sed -n 1p "$work/bus2.out")
    bg "$PESTOD" --address "$ADDR2" --authorize none --log-level warning --netns "/run/netns/$NS" "${extra[@]}" 2>"$work/pestod2.log"
    timeout 25 gdbus wait --address "$ADDR2" --timeout 20 top.passt.Pesto1 || { say "pestod --netns did not come up"; exit 1; }
    call2() { timeout 10 busctl --address="$ADDR2" call top.passt.Pesto1 /top/passt/Pesto1/tables/host top.passt.Pesto1.Table "$@"; }
    rule=1
    for spec in "tcp 140 $E pestod" "tcp 141 $E client" "udp 140 $E pestod" "udp 141 $E client" \
        "tcp 142 $((E + 1)) pestod" "tcp 143 $((E + 1)) client"; do
        read -r proto offset target source <<<"$spec"
        call2 Insert 'ua{sv}' $rule 5 protocol s "$proto" address s 127.0.0.1 first-port q $((B + offset)) \
            target-port q "$target" source s "$source" >/dev/null
        reply=$(call2 Activate u $rule)
        [[ $reply == "uu 1 0" ]] || say "pestod --netns: rule $rule ($spec) Activate answered: $reply"
        rule=$((rule + 1))
    done
    extras+=(nsplain nsclient)
    XPORT[nsplain]=$((B + 140)) XPORT[nsclient]=$((B + 141)) XIPERF[nsplain]=$((B + 142)) XIPERF[nsclient]=$((B + 143))
fi

# ---- measurements ----------------------------------------------------------------------------
results=$work/results   # lines: PATH METRIC VALUE [failures]
: >"$results"
bulk() { # PORT [iperf3 options] -> Gbit/s
    timeout $((DUR + 20)) iperf3 -c 127.0.0.1 -p "$1" "${@:2}" -t "$DUR" -J 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))' 2>/dev/null || echo n/a
}
connrate() { # PORT CLIENTS [SOURCE-NET] -> "rate failures"
    local from=(--spread)
    [[ -n ${3:-} ]] && from=(--source-net "$3")
    timeout $((DUR + 30)) "$LOADGEN" connrate --port "$1" --seconds "$DUR" --clients "$2" "${from[@]}" 2>/dev/null |
        awk '/^connrate/ {print $2, $4; ok=1} END {if (!ok) print "n/a 0"}'
}
udprr() { # PORT [udprr options] -> "rate lost"
    timeout $((DUR + 30)) "$LOADGEN" udprr --port "$1" "${@:2}" --seconds "$DUR" 2>/dev/null |
        awk '/^udprr/ {print $2, $4; ok=1} END {if (!ok) print "n/a 0"}'
}
udpflows() { # PORT -> "rate lost": 64 flows, 4 datagrams in flight each
    timeout $((DUR + 30)) "$LOADGEN" udpflows --port "$1" --flows 64 --window 4 --seconds "$DUR" 2>/dev/null |
        awk '/^udpflows/ {print $2, $4; ok=1} END {if (!ok) print "n/a 0"}'
}
# A path that does not relay at all (e.g. pestod before its data path) is shown as n/a.
declare -A WORKS
for p in "${paths[@]}"; do
    WORKS[$p,tcp]=no; WORKS[$p,udp]=no
    timeout 10 "$LOADGEN" connrate --port "${ECHO[$p]}" --seconds 0.2 --clients 1 2>/dev/null | grep -q "failures 0$" && WORKS[$p,tcp]=yes
    timeout 10 "$LOADGEN" udprr --port "${ECHO[$p]}" --seconds 0.2 2>/dev/null | grep -q "lost 0$" && WORKS[$p,udp]=yes
    [[ ${WORKS[$p,tcp]} == yes ]] || say "$p: a TCP connection through it was not echoed; its TCP figures are n/a"
    [[ ${WORKS[$p,udp]} == yes ]] || say "$p: a UDP datagram through it was not echoed; its UDP figure is n/a"
done

for ((round = 1; round <= REPEAT; round++)); do
    for metric in bulk conn1 conn4 udp udp64; do
        for p in "${paths[@]}"; do
            say "round $round/$REPEAT: $metric via $p..."
            case $metric in
                bulk) [[ ${WORKS[$p,tcp]} == yes ]] && v=$(bulk "${IPERF[$p]}") || v=n/a ;;
                conn1) [[ ${WORKS[$p,tcp]} == yes ]] && v=$(connrate "${ECHO[$p]}" 1) || v=n/a ;;
                conn4) [[ ${WORKS[$p,tcp]} == yes ]] && v=$(connrate "${ECHO[$p]}" 4) || v=n/a ;;
                udp) [[ ${WORKS[$p,udp]} == yes ]] && v=$(udprr "${ECHO[$p]}") || v=n/a ;;
                udp64) [[ ${WORKS[$p,udp]} == yes ]] && v=$(udpflows "${ECHO[$p]}") || v=n/a ;;
            esac
            echo "$p $metric $v" >>"$results"
        done
        for p in "${extras[@]}"; do
            net=
            [[ $p == ns* ]] && net=198.18.0
            say "round $round/$REPEAT: $metric via $p..."
            case $metric in
                bulk) [[ $p == ns* ]] && v=$(bulk "${XIPERF[$p]}" -B 198.18.0.9) || continue ;;
                conn1) v=$(connrate "${XPORT[$p]}" 1 $net) ;;
                conn4) v=$(connrate "${XPORT[$p]}" 4 $net) ;;
                udp) [[ $p == ns* ]] && v=$(udprr "${XPORT[$p]}" --source 198.18.0.9) || continue ;;
                udp64) continue ;;
            esac
            echo "$p $metric $v" >>"$results"
        done
    done
done

# ---- pestod memory with idle relayed connections ---------------------------------------------
status() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$PESTOD_PID/status"; }  # kB
MEM="base=$(status VmRSS)"
if [[ ${WORKS[pestod,tcp]} == yes ]]; then
    for n in 500 "${IDLE_HIGH:-1500}"; do
        say "pestod RSS with $n idle relayed connections..."
        coproc HOLD { timeout 600 "$LOADGEN" idle --port "${ECHO[pestod]}" --count "$n" --hold 300 2>&1; }
        hold_pid=$HOLD_PID
        pids+=("$hold_pid")
        line=
        read -r -t 120 line <&"${HOLD[0]}" || true
        if [[ $line == "ready $n" ]]; then
            sleep 0.5
            MEM+=" n$n=$(status VmRSS)"
        else
            say "idle $n: ${line:-no answer in 120 s}"
            MEM+=" n$n=n/a"
        fi
        eval "exec ${HOLD[1]}>&-"       # stdin closes: the holder closes its connections
        for _ in $(seq 1 100); do kill -0 "$hold_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$hold_pid" 2>/dev/null || true
        wait "$hold_pid" 2>/dev/null || true
        sleep 1
        MEM+=" after$n=$(status VmRSS)"
    done
fi
MEM+=" hwm=$(status VmHWM)"
kill -0 "$PESTOD_PID" 2>/dev/null || say "pestod died during the benchmark: $(tail -5 "$work/pestod.log")"

# ---- report ----------------------------------------------------------------------------------
python3 - "$results" "$DUR" "$REPEAT" "$MEM" "${paths[*]}" "$(ulimit -n)" "$PASTA_NOTE" "$BUSY" "$OPTIONS_NOTE" <<'PY'
import os, statistics, sys, time
results, dur, repeat, mem, paths, nofile, pasta_note, busy, options_note = sys.argv[1:10]
paths = paths.split()
columns = ["direct", "pestod", "socat", "pasta"]
values, failures = {}, {}
for line in open(results):
    f = line.split()
    p, m, v = f[0], f[1], f[2]
    if v != "n/a":
        values.setdefault((p, m), []).append(float(v))
    if len(f) > 3 and f[3] not in ("0", "n/a"):
        failures[(p, m)] = failures.get((p, m), 0) + int(f[3])

def med(p, m):
    v = values.get((p, m))
    return statistics.median(v) if v else None

def fmt(x, m):
    if x is None: return "n/a"
    return f"{x:.2f}" if m == "bulk" else f"{x:,.0f}"

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

metrics = [("bulk", "TCP bulk, 1 stream (Gbit/s)"), ("conn1", "short TCP conn/s, 1 client"),
           ("conn4", "short TCP conn/s, 4 clients"), ("udp", "UDP 64 B round trips/s"),
           ("udp64", "UDP 64 flows, datagrams/s")]
u = os.uname()
print()
print(f"pesto data path: {dur} s per measurement, {'median of ' + repeat + ' rounds' if repeat != '1' else '1 round'}; "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; kernel {u.release}; {os.cpu_count()} CPUs, {busy}% busy before the run")
print()
print(f"{'':30}" + "".join(f"{c:>12}" for c in columns))
for m, label in metrics:
    row = ""
    for c in columns:
        cell = fmt(med(c, m), m) if c in paths else "n/a"
        if failures.get((c, m)): cell += f" ({failures[(c, m)]} failed)" if not m.startswith("udp") else f" ({failures[(c, m)]} lost)"
        row += f"{cell:>12}"
    print(f"{label:30}{row}")
if repeat != "1":
    print(f"{'  range over the rounds':30}")
    for m, label in metrics:
        row = ""
        for c in columns:
            v = values.get((c, m))
            cell = "n/a" if not v else (f"{min(v):.1f}-{max(v):.1f}" if m == "bulk" else f"{min(v)/1000:.1f}k-{max(v)/1000:.1f}k")
            row += f"{cell:>12}"
        print(f"{'  ' + label:30}{row}")
print()
pairs = [("pestod", "direct"), ("pestod", "socat"), ("pestod", "pasta"), ("socat", "direct"), ("pasta", "direct")]
print(f"{'ratios':30}" + "".join(f"{a + '/' + b:>14}" for a, b in pairs))
for m, label in metrics:
    row = ""
    for a, b in pairs:
        r = ratio(med(a, m), med(b, m))
        row += f"{'n/a' if r is None else f'{r:.2f}':>14}"
    print(f"{label:30}{row}")
print()
print("targets (the project's: vs direct and vs socat)")
targets = [("bulk", "direct", 0.85), ("conn1", "direct", 0.55), ("conn4", "direct", 0.55),
           ("udp64", "direct", 0.80), ("bulk", "socat", 1.5), ("conn1", "socat", 0.9), ("conn4", "socat", 0.9)]
for m, base, goal in targets:
    r = ratio(med("pestod", m), med(base, m))
    verdict = "n/a" if r is None else ("met" if r >= goal else "NOT met")
    rs = "n/a" if r is None else f"{r:.2f}"
    print(f"  pestod {m:5} >= {goal:.2f} x {base:6}  {rs:>6}  {verdict}")
print()
kv = dict(x.split("=") for x in mem.split())
# the idle counts held, in order (n500=..., n1500=...)
idle_counts = [k[1:] for k in kv if k[0] == "n" and k[1:].isdigit()]
def mib(k):
    v = kv.get(k)
    return None if v in (None, "", "n/a") else int(v) / 1024
base = mib("base")
line = "pestod RSS: " + (f"{base:.1f} MiB before the idle test" if base is not None else "n/a")
for n in idle_counts:
    v = mib("n" + n)
    if v is not None and base is not None:
        line += f"; {v:.1f} MiB with {int(n):,} idle relayed connections ({(v - base) * 1024 / int(n):.2f} KiB each)"
    elif "n" + n in kv:
        line += f"; n/a with {int(n):,}"
a = mib("after" + idle_counts[-1])
if a is not None: line += f"; {a:.1f} MiB after they closed"
h = mib("hwm")
if h is not None: line += f"; peak {h:.1f} MiB"
print(line)
print(f"  ({int(idle_counts[-1]):,} at most: RLIMIT_NOFILE is {nofile} and cannot be raised; TCP's share of the relay budget"
      f" is charged 6 descriptors per connection, pipes included)")
if pasta_note:
    print(f"pasta: {pasta_note}")
print()
print("the per-rule options, each against the plain relay it changes (pestod: 127.0.0.x clients to a host server;")
print("ns: a second pestod with --netns, clients of 198.18.0.x to a server in its namespace)")
if options_note:
    print(f"  {options_note}")
else:
    ocols = [("pestod", "pestod"), ("proxy", "+PROXY v2"), ("nsplain", "ns, pestod"), ("nsclient", "ns, client")]
    print(f"{'':30}" + "".join(f"{label:>12}" for _, label in ocols) + f"{'PROXY/plain':>14}{'client/plain':>14}")
    for m, label in metrics:
        if m == "udp64": continue  # not measured for the options
        row = ""
        for c, _ in ocols:
            cell = fmt(med(c, m), m)
            if failures.get((c, m)): cell += f" ({failures[(c, m)]} {'lost' if m.startswith('udp') else 'failed'})"
            row += f"{cell:>12}"
        for a, b in (("proxy", "pestod"), ("nsclient", "nsplain")):
            r = ratio(med(a, m), med(b, m))
            row += f"{'n/a' if r is None else f'{r:.2f}':>14}"
        print(f"{label:30}{row}")

# Summary lines (Benchmarks/README.md, "run-all.sh"): every figure above, tab-separated.
summary = os.environ.get("PESTO_BENCH_SUMMARY")
if summary:
    units = {"bulk": "Gbit/s", "conn1": "conn/s", "conn4": "conn/s", "udp": "round trips/s", "udp64": "datagrams/s"}
    labels = {"bulk": "TCP bulk, 1 stream", "conn1": "short TCP connections, 1 client", "conn4": "short TCP connections, 4 clients",
              "udp": "UDP 64 B request/response", "udp64": "UDP, 64 flows x 4 in flight"}
    goals = {(m, base): goal for m, base, goal in targets}
    def num(x): return "-" if x is None else f"{x:.4f}"
    with open(summary, "a") as out:
        def line(group, metric, subject, value, unit, baseline="-", base_value=None, target=None, better="higher"):
            if value is None: return
            r = ratio(value, base_value)
            out.write("\t".join([group, metric, subject, num(value), unit, baseline, num(base_value), num(r),
                                 "-" if target is None else f"≥ {target:.2f}", better]) + "\n")
        for m, _ in metrics:
            for subject in ("pestod", "socat", "pasta"):
                if subject in paths:
                    line("datapath", labels[m], subject, med(subject, m), units[m], "direct", med("direct", m),
                         goals.get((m, "direct")) if subject == "pestod" else None)
            if "socat" in paths:
                line("datapath", labels[m], "pestod", med("pestod", m), units[m], "socat", med("socat", m), goals.get((m, "socat")))
        if not options_note:
            for m, _ in metrics:
                line("datapath", labels[m] + ", PROXY v2", "pestod", med("proxy", m), units[m], "plain relay", med("pestod", m))
                line("datapath", labels[m] + ", source=client (--netns)", "pestod", med("nsclient", m), units[m],
                     "source=pestod", med("nsplain", m))
        for n in idle_counts:
            v = mib("n" + n)
            if v is not None and base is not None:
                line("memory", f"RSS per idle relayed connection ({int(n):,} held)", "pestod", (v - base) * 1024 * 1024 / int(n),
                     "bytes", better="lower")
PY
for log in pestod pestod2; do
    if [[ -s $work/$log.log ]]; then
        echo "$log logged $(wc -l <"$work/$log.log") line(s) at warning or above; the first: $(head -c 300 "$work/$log.log" | head -1)"
    fi
done
