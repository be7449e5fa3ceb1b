#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# pesto-conformance.sh PESTO PASTA: checks the port spec table of doc/pesto-conformance.md
# against an upstream pesto and pasta build (passt's `make`), as root. For every row it starts a
# fresh `pasta -c SOCKET` (with no forwards), runs `PESTO OPTION SPEC SOCKET`, reads the table
# back with `PESTO SOCKET`, and compares the exit status and the rules (whitespace collapsed)
# with the row. Prints each mismatch; exits 1 if there is one. Not part of `swift test` (CI has
# no upstream build); the tests check pestoctl against the same table.
#
# The rows were recorded on a host whose ephemeral range is 32768-60999; on another range the
# `all`, `auto` and exclusion-only rows differ.

set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 PESTO PASTA" >&2; exit 2; }
PESTO=$(realpath -s "$1")
PASTA=$(realpath -s "$2")  # -s: pasta is a link to passt, and its name selects the mode
cd "$(dirname "$0")/.."
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
SOCK=$DIR/pasta.sock
mismatches=0 rows=0

# Rows: | `OPT` | `SPEC` | STATUS | RULES | PESTOCTL |
while IFS= read -r line; do
    [[ $line == '| `-'* ]] || continue
    opt=$(sed -E 's/^\| `([^`]*)`.*/\1/' <<<"$line")
    spec=$(sed -E 's/^\| `[^`]*` \| `([^`]*)`.*/\1/' <<<"$line")
    want_status=$(awk -F' \\| ' '{print $3}' <<<"$line")
    want_rules=$(awk -F' \\| ' '{print $4}' <<<"$line")
    rows=$((rows + 1))

    rm -f "$SOCK"
    "$PASTA" --runas 0 --config-net -c "$SOCK" -t none -u none -T none -U none -- sleep 600 >/dev/null 2>&1 &
    pasta_pid=$!
    for _ in $(seq 100); do
        [[ -S $SOCK ]] && timeout 2 "$PESTO" "$SOCK" >/dev/null 2>&1 && break
        sleep 0.1
    done
    set +e
    timeout 20 "$PESTO" "$opt" "$spec" "$SOCK" >/dev/null 2>"$DIR/err"
    status=$?
    set -e
    rules=""
    if [[ $status == 0 ]]; then
        [[ $opt == -t || $opt == -u ]] && section=HOST || section=SPLICE
        rules=$(timeout 20 "$PESTO" "$SOCK" | awk -v s="  $section" '$0==s{on=1;next} /^  [A-Z]/{on=0} on' |
            sed 's/^ *//; s/  */ /g; s/ *$//' | sed 's/.*/`&`/' | paste -sd';' | sed 's/;/; /g')
        [[ -n $rules ]] || rules="(none)"
    fi
    # The command pasta runs is PID 1 of a new PID namespace: only SIGKILL ends it from here.
    kids=$(pgrep -P "$pasta_pid" || true)
    [[ -z $kids ]] || kill -9 $kids 2>/dev/null || true
    kill "$pasta_pid" 2>/dev/null || true
    wait "$pasta_pid" 2>/dev/null || true

    if [[ $status != "$want_status" ]]; then
        echo "MISMATCH $opt '$spec': pesto exits $status, the table says $want_status ($(head -1 "$DIR/err"))"
        mismatches=$((mismatches + 1))
    elif [[ $status == 0 && $rules != "$want_rules" ]]; then
        echo "MISMATCH $opt '$spec': pesto makes $rules; the table says $want_rules"
        mismatches=$((mismatches + 1))
    fi
done <doc/pesto-conformance.md

echo "$rows rows, $mismatches mismatches"
[[ $mismatches == 0 ]]
