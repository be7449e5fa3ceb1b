#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# pesto demo: the first command of the README. Run as root from a clone, on Debian 12.
#
#  1. installs the build, demo and test dependencies (apt-get; skipped when all are present;
#     --no-test-deps leaves out those only `swift test` needs),
#  2. builds pestod in release mode and installs it with its D-Bus policy and activation
#     files (and the systemd unit when systemd runs),
#  3. starts pestod on the system bus if one is running, otherwise on a private system-like
#     bus under /run/pesto-demo/ that uses the installed policy file,
#  4. shows it working with busctl: introspect, Insert, Activate, Status, List, a real TCP
#     connection to the forwarded port, and `ss` listing pestod's listener.
#
# pestod is left running with the demo rule active; the end of the output says how to talk
# to it and how to stop it. Re-running stops the previous demo's pestod and bus first.
#
# Usage: scripts/demo.sh [--no-test-deps]
#   --no-test-deps  install only what the build and the demo need, not what `swift test`
#                   needs besides (TEST_PACKAGES below: without them some tests are skipped)
#
# Environment:
#   DEMO_PORT  TCP port of the demo rule (default: the first free port from 18080)
#   DEMO_BUS   auto (default), system (fail if no system bus answers), or private
set -euo pipefail

cd "$(dirname "$0")/.."
# The toolchain lives in /opt/swift on these machines; make sure it is on PATH.
[[ -d /opt/swift/usr/bin ]] && export PATH="/opt/swift/usr/bin:$PATH"

DEMO_DIR=/run/pesto-demo
SYSTEM_SOCKET=/run/dbus/system_bus_socket
PRIVATE_SOCKET=$DEMO_DIR/bus.sock
PESTOD=/usr/local/sbin/pestod
BUS_NAME=top.passt.Pesto1
HOST_TABLE=/top/passt/Pesto1/tables/host
TABLE_IFACE=top.passt.Pesto1.Table
RULE_ID=100
DEMO_BUS=${DEMO_BUS:-auto}
# Build (libdbus-1-dev pkg-config), run and show (dbus: dbus-daemon; dbus-bin: dbus-send;
# iproute2: ss; libglib2.0-bin: gdbus; systemd: busctl, which works without systemd running),
# and what `swift test` uses besides (libxml2-utils: xmllint). .ci/run installs these too.
# The Cockpit page (cockpit/): cockpit-ws (the web server) and cockpit-bridge.
PACKAGES=(libdbus-1-dev pkg-config dbus dbus-bin iproute2 libglib2.0-bin systemd libxml2-utils socat
          cockpit-ws cockpit-bridge)
# What `swift test` needs besides, so that it runs every test after this script (unless
# --no-test-deps): polkit (polkitd, pkexec: the authorisation tests), the PROXY protocol
# test's real target (haproxy), the Cockpit page's browser test (chromium, chromium-driver,
# python3-selenium), the Gio example's test (python3-gi), the shell completion tests
# (zsh, fish). .ci/run installs the same.
TEST_PACKAGES=(polkitd pkexec haproxy
               chromium chromium-driver python3-selenium
               python3-gi
               zsh fish)

header() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

# Prints a command the way one would type it, then runs it; its output is kept in OUT.
OUT=
show() {
    local arg line='$'
    for arg in "$@"; do
        if [[ $arg =~ ^[][A-Za-z0-9_./:=,@+%-]+$ ]]; then line+=" $arg"; else line+=" '$arg'"; fi
    done
    printf '\n%s\n' "$line"
    OUT=$("$@")
    [[ -z $OUT ]] || printf '%s\n' "$OUT"
}

# Stops the process named in a pid file if it is still the expected program.
stop_pidfile() {
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]; then
        echo "stopping the previous demo's $comm (pid $pid)"
        kill "$pid" 2>/dev/null || true
        if ! timeout 10 tail --pid="$pid" -s 0.1 -f /dev/null; then
            echo "$comm (pid $pid) did not stop within 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

system_bus_answers() {
    [[ -S $SYSTEM_SOCKET ]] &&
        busctl --address="unix:path=$SYSTEM_SOCKET" --timeout=3 \
            call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetId >/dev/null 2>&1
}

port_free() { [[ -z $(ss -Hltn "sport = :$1") ]]; }

# ---------------------------------------------------------------------------------------
TEST_DEPS=1
for arg in "$@"; do
    case $arg in
    --no-test-deps) TEST_DEPS=0 ;;
    -h | --help)
        echo "usage: $0 [--no-test-deps]"
        exit 0
        ;;
    *) die "unknown argument '$arg' (usage: $0 [--no-test-deps])" ;;
    esac
done
((TEST_DEPS)) && PACKAGES+=("${TEST_PACKAGES[@]}")
[[ $EUID -eq 0 ]] || die "run me as root (I install files under /usr and bind a port)."
[[ $DEMO_BUS == auto || $DEMO_BUS == system || $DEMO_BUS == private ]] ||
    die "DEMO_BUS must be auto, system or private, not '$DEMO_BUS'."
command -v swift >/dev/null ||
    die "no 'swift' on PATH: install a Swift 6 toolchain for Debian 12 (https://swift.org/install) first."

header "Dependencies: ${PACKAGES[*]}"
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update && apt-get install -y "${PACKAGES[@]}"
else
    echo "all installed"
fi

header "Build: swift build -c release --product pestod --product pestoctl"
swift build -c release --product pestod
swift build -c release --product pestoctl
BIN_DIR=$(swift build -c release --show-bin-path)

header "Stop the previous demo, if any"
stop_pidfile "$DEMO_DIR/pestod.pid" pestod
stop_pidfile "$DEMO_DIR/bus.pid" dbus-daemon
stop_pidfile "$DEMO_DIR/target.pid" socat
mkdir -p "$DEMO_DIR"

header "Install"
install -v -D -m 0755 "$BIN_DIR/pestod" "$PESTOD"
install -v -D -m 0644 dbus/top.passt.Pesto1.conf /usr/share/dbus-1/system.d/top.passt.Pesto1.conf
install -v -D -m 0644 dbus/top.passt.Pesto1.service /usr/share/dbus-1/system-services/top.passt.Pesto1.service
install -v -D -m 0644 polkit/top.passt.Pesto1.policy /usr/share/polkit-1/actions/top.passt.Pesto1.policy
install -v -D -m 0755 "$BIN_DIR/pestoctl" /usr/local/bin/pestoctl
install -v -D -m 0644 dbus/top.passt.Pesto1.xml /usr/share/dbus-1/interfaces/top.passt.Pesto1.xml
install -v -D -m 0644 doc/pestod.8 /usr/local/share/man/man8/pestod.8
install -v -D -m 0644 doc/pestoctl.1 /usr/local/share/man/man1/pestoctl.1
install -v -D -m 0644 doc/dbus-api.md /usr/share/doc/pesto/dbus-api.md
install -v -D -m 0644 doc/pesto-conformance.md /usr/share/doc/pesto/pesto-conformance.md
# Shell completions: pestoctl's from completions/, pestod's generated from its command line.
install -v -D -m 0644 completions/pestoctl.bash /usr/share/bash-completion/completions/pestoctl
install -v -D -m 0644 completions/_pestoctl /usr/share/zsh/vendor-completions/_pestoctl
install -v -D -m 0644 completions/pestoctl.fish /usr/share/fish/vendor_completions.d/pestoctl.fish
for shell in bash zsh fish; do
    case $shell in
    bash) dest=/usr/share/bash-completion/completions/pestod ;;
    zsh) dest=/usr/share/zsh/vendor-completions/_pestod ;;
    fish) dest=/usr/share/fish/vendor_completions.d/pestod.fish ;;
    esac
    mkdir -p "$(dirname "$dest")"
    "$BIN_DIR/pestod" --generate-completion-script "$shell" >"$dest"
    echo "$dest (generated)"
done
install -v -D -m 0644 doc/data-path.md /usr/share/doc/pesto/data-path.md
install -v -D -m 0644 doc/overlap.md /usr/share/doc/pesto/overlap.md
install -v -D -m 0644 doc/takeover.md /usr/share/doc/pesto/takeover.md
# The Cockpit page: a package is a folder under /usr/share/cockpit/ (no build step).
install -v -D -m 0644 -t /usr/share/cockpit/pesto cockpit/manifest.json cockpit/index.html \
    cockpit/live-model.js cockpit/pesto.js cockpit/rule-text.js cockpit/pesto.css
SYSTEMD=no
if [[ -d /run/systemd/system ]]; then
    SYSTEMD=yes
    install -v -D -m 0644 systemd/pestod.service /etc/systemd/system/pestod.service
    systemctl daemon-reload
fi

# The demo rule's port, chosen before pestod starts so a busy port fails early.
if [[ -n ${DEMO_PORT:-} ]]; then
    PORT=$DEMO_PORT
    # shellcheck disable=SC2015  # die is meant to run when either test fails
    [[ $PORT =~ ^[0-9]+$ ]] && ((PORT >= 1 && PORT <= 65535)) || die "DEMO_PORT must be a port number, not '$PORT'."
    port_free "$PORT" || die "TCP port $PORT (DEMO_PORT) is in use: $(ss -Hltnp "sport = :$PORT")"
else
    PORT=18080
    until port_free "$PORT"; do
        ((PORT < 18180)) || die "no free TCP port in 18080-18180; set DEMO_PORT."
        PORT=$((PORT + 1))
    done
fi
# The demo's target: a small server behind pestod, on the next free port.
TARGET_PORT=$((PORT + 1))
until port_free "$TARGET_PORT"; do
    ((TARGET_PORT < PORT + 100)) || die "no free TCP port for the demo's target server."
    TARGET_PORT=$((TARGET_PORT + 1))
done

# ---------------------------------------------------------------------------------------
MODE=private
if [[ $DEMO_BUS != private ]]; then
    if system_bus_answers; then
        MODE=system
    elif [[ $DEMO_BUS == system ]]; then
        die "DEMO_BUS=system but no system bus answers on $SYSTEM_SOCKET."
    fi
fi

PESTOD_PID=
if [[ $MODE == system ]]; then
    ADDR=unix:path=$SYSTEM_SOCKET
    header "Start pestod on the system bus ($ADDR)"
    # Make the bus read the policy file just installed before pestod asks for the name.
    busctl --address="$ADDR" call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig
    if [[ $SYSTEMD == yes ]]; then
        echo "systemctl restart pestod"
        systemctl restart pestod
    else
        if owner=$(busctl --address="$ADDR" call org.freedesktop.DBus /org/freedesktop/DBus \
            org.freedesktop.DBus GetConnectionUnixProcessID s "$BUS_NAME" 2>/dev/null); then
            die "$BUS_NAME is already owned on the system bus by pid ${owner#u }, which this demo did not start; stop it and re-run."
        fi
        setsid "$PESTOD" --system </dev/null >"$DEMO_DIR/pestod.log" 2>&1 &
        PESTOD_PID=$!
        echo "$PESTOD_PID" >"$DEMO_DIR/pestod.pid"
    fi
else
    ADDR=unix:path=$PRIVATE_SOCKET
    header "Start a private system-like bus ($ADDR)"
    # The system bus's default-deny policy, plus the policy files of the system's services,
    # so pestod may own top.passt.Pesto1 only because our policy file lets root do it.
    sed -e "s|@SOCKET@|$PRIVATE_SOCKET|" -e "s|@INCLUDEDIR@|/etc/dbus-1/system.d|" \
        dbus/private-system-bus.conf.in >"$DEMO_DIR/bus.conf"
    rm -f "$PRIVATE_SOCKET"
    echo "dbus-daemon --config-file=$DEMO_DIR/bus.conf --fork --print-address=1 --print-pid=1"
    { read -r printed_addr && read -r bus_pid; } < <(
        dbus-daemon --config-file="$DEMO_DIR/bus.conf" --fork --print-address=1 --print-pid=1
    ) || die "dbus-daemon did not start (see the message above)."
    echo "$bus_pid" >"$DEMO_DIR/bus.pid"
    echo "bus at $printed_addr, pid $bus_pid"

    header "Start pestod on it (log: $DEMO_DIR/pestod.log)"
    echo "$PESTOD --address $ADDR --authorize root"
    setsid "$PESTOD" --address "$ADDR" --authorize root </dev/null >"$DEMO_DIR/pestod.log" 2>&1 &
    PESTOD_PID=$!
    echo "$PESTOD_PID" >"$DEMO_DIR/pestod.pid"
fi

echo "gdbus wait --address $ADDR --timeout 10 $BUS_NAME"
if [[ -n $PESTOD_PID ]]; then
    # Wait for the name, but stop waiting at once if pestod exits.
    gdbus wait --address "$ADDR" --timeout 10 "$BUS_NAME" &
    waiter=$!
    finished=
    rc=0
    wait -n -p finished "$waiter" "$PESTOD_PID" || rc=$?
    if [[ $finished != "$waiter" || $rc -ne 0 ]]; then
        kill "$waiter" 2>/dev/null || true
        echo "--- $DEMO_DIR/pestod.log (last lines)" >&2
        tail -n 20 "$DEMO_DIR/pestod.log" >&2 || true
        if [[ $finished == "$PESTOD_PID" ]]; then
            die "pestod exited (status $rc) before taking the name $BUS_NAME."
        fi
        die "pestod did not take the name $BUS_NAME within 10 s."
    fi
else
    gdbus wait --address "$ADDR" --timeout 10 "$BUS_NAME" ||
        die "pestod did not take the name $BUS_NAME within 10 s (journalctl -u pestod)."
fi
owner_pid=$(busctl --address="$ADDR" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus GetConnectionUnixProcessID s "$BUS_NAME")
owner_pid=${owner_pid#u }
if [[ -n $PESTOD_PID && $owner_pid != "$PESTOD_PID" ]]; then
    die "$BUS_NAME is owned by pid $owner_pid, not by the pestod just started (pid $PESTOD_PID)."
fi
echo "pestod (pid $owner_pid) owns $BUS_NAME"

# ---------------------------------------------------------------------------------------
BUSCTL=(busctl "--address=$ADDR")
CALL=("${BUSCTL[@]}" call "$BUS_NAME" "$HOST_TABLE" "$TABLE_IFACE")

# A rule with our ID can only be left over if pestod kept state; remove it quietly.
if "${CALL[@]}" Status u "$RULE_ID" >/dev/null 2>&1; then
    "${CALL[@]}" Deactivate u "$RULE_ID" >/dev/null 2>&1 || true
    "${CALL[@]}" Delete u "$RULE_ID" >/dev/null
fi

header "The host table's interface"
show busctl --no-pager "--address=$ADDR" introspect "$BUS_NAME" "$HOST_TABLE"

header "A target server on 127.0.0.1:$TARGET_PORT (socat, answers one line per connection)"
setsid socat "TCP-LISTEN:$TARGET_PORT,bind=127.0.0.1,fork,reuseaddr" \
    SYSTEM:'echo hello from the target server behind pestod' </dev/null >/dev/null 2>&1 &
echo "$!" >"$DEMO_DIR/target.pid"

header "Insert rule $RULE_ID (inactive): TCP 127.0.0.1:$PORT -> 127.0.0.1:$TARGET_PORT"
show "${CALL[@]}" Insert 'ua{sv}' "$RULE_ID" 4 protocol s tcp address s 127.0.0.1 first-port q "$PORT" target-port q "$TARGET_PORT"

header "Activate it: returns (bound, failed)"
show "${CALL[@]}" Activate u "$RULE_ID"
read -r _ bound failed <<<"$OUT"
show "${CALL[@]}" Status u "$RULE_ID"
[[ $bound == 1 && $failed == 0 ]] || die "rule $RULE_ID did not bind its socket (bound=$bound failed=$failed)."
show "${CALL[@]}" List

header "A real TCP connection to 127.0.0.1:$PORT, relayed by pestod to the target"
show ss -ltnp "sport = :$PORT"
grep -q '"pestod"' <<<"$OUT" || die "ss does not show pestod listening on port $PORT."
printf '\n$ exec 3<>/dev/tcp/127.0.0.1/%s; read -r line <&3\n' "$PORT"
line=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && read -r line <&3 && printf "%s" "$line"' _ "$PORT") ||
    die "no answer through 127.0.0.1:$PORT"
echo "$line"
[[ $line == "hello from the target server behind pestod" ]] || die "unexpected answer through pestod: $line"

header "The same table through pestoctl"
show pestoctl "--address=$ADDR"

# ---------------------------------------------------------------------------------------
header "Done: pestod is running with rule $RULE_ID active on 127.0.0.1:$PORT"
if [[ $MODE == system ]]; then
    cat <<EOF
Talk to it on the system bus:
  busctl --system call $BUS_NAME $HOST_TABLE $TABLE_IFACE List
  busctl --system introspect $BUS_NAME /top/passt/Pesto1
  busctl --system tree $BUS_NAME
EOF
    if [[ $SYSTEMD == yes ]]; then
        printf 'Logs: journalctl -u pestod\nStop it:\n  systemctl stop pestod\n'
    else
        # shellcheck disable=SC2016  # the $(...) is printed for the reader to run
        printf 'Logs: %s\nStop it:\n  kill $(cat %s)\n' "$DEMO_DIR/pestod.log" "$DEMO_DIR/pestod.pid"
    fi
else
    cat <<EOF
It runs on a private bus (no system bus is running here). Talk to it:
  export DBUS_SYSTEM_BUS_ADDRESS=$ADDR
  busctl --system call $BUS_NAME $HOST_TABLE $TABLE_IFACE List
  busctl --system introspect $BUS_NAME /top/passt/Pesto1
  busctl --system tree $BUS_NAME
Logs: $DEMO_DIR/pestod.log
Stop it, the bus and the demo's target server:
  kill \$(cat $DEMO_DIR/pestod.pid)
  kill \$(cat $DEMO_DIR/bus.pid)
  kill \$(cat $DEMO_DIR/target.pid)
EOF
fi

header "The Cockpit page: Port forwarding"
if [[ $MODE == system ]]; then
    cat <<EOF
Installed in /usr/share/cockpit/pesto/. Open Cockpit (https://$(hostname):9090/ where
cockpit.socket runs), log in, turn on administrative access to edit, and choose
"Port forwarding" in the menu.
EOF
else
    cat <<EOF
Installed in /usr/share/cockpit/pesto/. pestod is on a private bus here, so start a Cockpit
web server whose bridge talks to that bus (no TLS, no login, loopback only):
  DBUS_SYSTEM_BUS_ADDRESS=$ADDR /usr/lib/cockpit/cockpit-ws --no-tls -a 127.0.0.1 -p 9091 \\
      --local-session=cockpit-bridge
and open http://127.0.0.1:9091/cockpit/@localhost/pesto/index.html
(from another machine: ssh -L 9091:127.0.0.1:9091 to this one first).
EOF
fi
echo "Running ./scripts/demo.sh again stops the demo's pestod and bus first."
