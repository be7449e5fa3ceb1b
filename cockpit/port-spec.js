// SPDX-License-Identifier: GPL-2.0-or-later

/* port-spec.js: pasta's -t/-u/-T/-U port specs, read exactly as pestoctl reads them.
 *
 * Theory of operation
 * -------------------
 * A port of Sources/PestoModel/PortSpec.swift and PortSpecDiagnosis.swift, decision for
 * decision and message for message, so that the page and pestoctl accept the same text, make
 * the same rules from it, and refuse it with the same sentence. Tests/port-spec-cases.json
 * holds the cases both test suites check (the Swift test of PortSpec, and the browser test,
 * which runs this file in Chromium).
 *
 *     spec     := "none" | [listen "/"] chunk ("," chunk)*
 *     listen   := ADDR ["%" IFNAME] | ["*"] ["%" IFNAME]
 *     chunk    := "all" [":" ADDR] | "auto" | "~" range | range [":" target]
 *     range    := NUMBER ["-" NUMBER]
 *     target   := ADDR "/" range | ADDR | range
 *
 * The reading is greedy and never backtracks across the listening prefix (upstream pesto's
 * parser): an address is read first, then an optional "%IFNAME", then "/"; when that fails,
 * the whole text is the port list. Exclusions and "auto" apply to the whole list; includes are
 * never merged. `all`, `auto` alone and exclusion-only specs depend on the host's ephemeral
 * port range and are best effort (pestoctl tolerates bind failures for them): `parse` marks
 * them `bestEffort` and the page leaves them to pestoctl.
 *
 * Addresses are read as glibc's inet_pton(3) reads them and written as inet_ntop(3) writes
 * them (RFC 5952), which is how pestod returns them.
 */
"use strict";

const PortSpec = (() => {
    /** A refused spec: `piece` is the user's text it names; `message` one sentence. */
    class SpecError extends Error {
        constructor(spec, piece, message) {
            super(message);
            this.spec = spec;
            this.piece = piece;
        }
    }

    // ------------------------------------------------------------ addresses (inet_pton/ntop)

    /** IPv4 dotted quad as glibc reads it: four decimal octets, no leading zeros; or null. */
    function readIPv4(text) {
        const parts = text.split(".");
        if (parts.length !== 4) return null;
        let value = 0;
        for (const part of parts) {
            if (!/^(0|[1-9][0-9]{0,2})$/.test(part) || Number(part) > 255) return null;
            value = value * 256 + Number(part);
        }
        return value;
    }

    /** IPv6 as glibc reads it (hex groups, one "::", a dotted quad at the end): 8 numbers, or null. */
    function readIPv6(text) {
        if (text === "" || /[^0-9A-Fa-f:.]/.test(text)) return null;
        const halves = text.split("::");
        if (halves.length > 2) return null;
        const groups = (half) => {
            if (half === "") return [];
            const out = [];
            const items = half.split(":");
            for (let i = 0; i < items.length; i++) {
                const item = items[i];
                if (i === items.length - 1 && item.includes(".")) {
                    const v4 = readIPv4(item);
                    if (v4 === null) return null;
                    out.push(Math.floor(v4 / 65536), v4 % 65536);
                } else {
                    if (!/^[0-9A-Fa-f]{1,4}$/.test(item)) return null;
                    out.push(parseInt(item, 16));
                }
            }
            return out;
        };
        const head = groups(halves[0]);
        const tail = halves.length === 2 ? groups(halves[1]) : [];
        if (head === null || tail === null) return null;
        if (halves.length === 1) return head.length === 8 ? head : null;
        // A dotted quad may end only the last half; "::" stands for at least one group.
        if (halves[0].includes(".")) return null;
        if (head.length + tail.length > 7) return null;
        return [...head, ...new Array(8 - head.length - tail.length).fill(0), ...tail];
    }

    /** An address value: { v4: number } or { v6: [8 groups] }, IPv4-mapped IPv6 as v4 (as pestod). */
    function address(family, text) {
        if (family === 4) {
            const v4 = readIPv4(text);
            return v4 === null ? null : { v4 };
        }
        const g = readIPv6(text);
        if (g === null) return null;
        if (g.slice(0, 5).every((x) => x === 0) && g[5] === 0xffff) return { v4: g[6] * 65536 + g[7] };
        return { v6: g };
    }

    /** The address as inet_ntop(3) writes it. */
    function addressText(a) {
        if ("v4" in a) return [a.v4 >>> 24, (a.v4 >>> 16) & 255, (a.v4 >>> 8) & 255, a.v4 & 255].join(".");
        const g = a.v6;
        // The longest run of two or more zero groups becomes "::" (the first of equals).
        let best = -1;
        let bestLength = 1;
        for (let i = 0; i < 8;) {
            if (g[i] !== 0) { i++; continue }
            let j = i;
            while (j < 8 && g[j] === 0) j++;
            if (j - i > bestLength) { best = i; bestLength = j - i }
            i = j;
        }
        const hex = (list) => list.map((x) => x.toString(16)).join(":");
        // glibc writes ::ffff:0:0/96-style and ::a.b.c.d (compatible) addresses with a dotted tail.
        const dotted = (best === 0 && (bestLength === 6 || (bestLength === 5 && g[5] === 0xffff)));
        if (dotted) {
            const v4 = [g[6] >> 8, g[6] & 255, g[7] >> 8, g[7] & 255].join(".");
            return (bestLength === 5 ? "::ffff:" : "::") + v4;
        }
        if (best < 0) return hex(g);
        return hex(g.slice(0, best)) + "::" + hex(g.slice(best + bestLength));
    }

    const isUnspecified = (a) => ("v4" in a ? a.v4 === 0 : a.v6.every((x) => x === 0));
    const isMulticast = (a) => ("v4" in a ? a.v4 >>> 28 === 0xe : a.v6[0] >> 8 === 0xff);
    const isBroadcast = (a) => "v4" in a && a.v4 === 0xffffffff;
    const familyName = (a) => ("v4" in a ? "IPv4" : "IPv6");

    // ------------------------------------------------------------ the cursor

    const IPV6_CHARS = /[0-9A-Fa-f:.]/;
    const IPV4_CHARS = /[0-9.]/;
    const SPACE = " \t\n\v\f\r";

    /** A position in the text; each reader returns null and leaves `at` alone on a mismatch. */
    class Cursor {
        constructor(text, at) {
            this.text = text;
            this.at = at;
        }

        copy() { return new Cursor(this.text, this.at); }
        get atEnd() { return this.at === this.text.length; }
        get rest() { return this.text.slice(this.at); }

        literal(word) {
            if (!this.text.startsWith(word, this.at)) return false;
            this.at += word.length;
            return true;
        }

        /** A number as strtoul(3) reads it: white space, a sign, digits; "-N" wraps (huge). */
        unsigned() {
            let p = this.at;
            while (p < this.text.length && SPACE.includes(this.text[p])) p++;
            let negative = false;
            if (this.text[p] === "+" || this.text[p] === "-") {
                negative = this.text[p] === "-";
                p++;
            }
            const start = p;
            while (p < this.text.length && this.text[p] >= "0" && this.text[p] <= "9") p++;
            if (p === start) return null;
            const digits = this.text.slice(start, p);
            // Past 2^64 strtoul fails (ERANGE); any value past 65535 is refused alike below.
            if (digits.replace(/^0+/, "").length > 20) return null;
            const big = BigInt(digits);
            if (big >= 2n ** 64n) return null;
            this.at = p;
            const value = negative && big !== 0n ? 2n ** 64n - big : big;
            return value > 1000000n ? 1000000 : Number(value);
        }

        /** FIRST[-LAST] with FIRST <= LAST < 65536. */
        portRange() {
            const p = this.copy();
            const first = p.unsigned();
            if (first === null) return null;
            let last = first;
            if (p.literal("-")) {
                last = p.unsigned();
                if (last === null) return null;
            }
            if (last < first || last >= 65536) return null;
            this.at = p.at;
            return [first, last];
        }

        /** An address of `family` (4 or 6), optionally in brackets. */
        address(family) {
            const p = this.copy();
            const bracket = p.literal("[");
            let end = p.at;
            if (bracket) {
                while (end < p.text.length && p.text[end] !== "]") end++;
            } else {
                const allowed = family === 6 ? IPV6_CHARS : IPV4_CHARS;
                while (end < p.text.length && allowed.test(p.text[end])) end++;
            }
            if (end - p.at >= (family === 6 ? 46 : 16)) return null;
            const parsed = address(family, p.text.slice(p.at, end));
            if (parsed === null) return null;
            p.at = end;
            if (bracket && !p.literal("]")) return null;
            this.at = p.at;
            return parsed;
        }

        anyAddress() { return this.address(6) || this.address(4); }

        /** An optional "%IFNAME" (1-15 bytes, no "/" or white space): "" when absent, null when bad. */
        interfaceSpec() {
            const p = this.copy();
            if (!p.literal("%")) return "";
            let end = p.at;
            while (end < p.text.length && !("/" + SPACE).includes(p.text[end])) end++;
            const name = p.text.slice(p.at, end);
            if (name === "" || utf8Length(name) >= 16) return null;
            this.at = end;
            return name;
        }

        /** One chunk of the list; the target forms are tried longest first. */
        chunk() {
            const p = this.copy();
            if (p.literal("all")) {
                const t = p.copy();
                let target = null;
                if (t.literal(":") && (target = t.anyAddress())) {
                    this.at = t.at;
                    return { kind: "all", target };
                }
                this.at = p.at;
                return { kind: "all", target: null };
            }
            if (p.literal("auto")) {
                this.at = p.at;
                return { kind: "auto" };
            }
            if (p.literal("~")) {
                const range = p.portRange();
                if (!range) return null;
                this.at = p.at;
                return { kind: "exclude", first: range[0], last: range[1] };
            }
            const range = p.portRange();
            if (!range) return null;
            const include = (t, target, targets) => {
                this.at = t.at;
                return { kind: "include", first: range[0], last: range[1], target, targetFirst: targets[0], targetLast: targets[1] };
            };
            let t = p.copy();
            let a, targets;
            if (t.literal(":") && (a = t.anyAddress()) && t.literal("/") && (targets = t.portRange())) return include(t, a, targets);
            t = p.copy();
            if (t.literal(":") && (a = t.anyAddress())) return include(t, a, range);
            t = p.copy();
            if (t.literal(":") && (targets = t.portRange())) return include(t, null, targets);
            return include(p, null, range);
        }

        /** The listening prefix ADDR[%IF]/ or [*][%IF]/; address null means dual stack. */
        listenPrefix() {
            let p = this.copy();
            let a, name;
            if ((a = p.anyAddress()) && (name = p.interfaceSpec()) !== null && p.literal("/")) {
                this.at = p.at;
                return { address: a, interface: name };
            }
            p = this.copy();
            p.literal("*");
            if ((name = p.interfaceSpec()) !== null && p.literal("/")) {
                this.at = p.at;
                return { address: null, interface: name };
            }
            return null;
        }
    }

    function utf8Length(text) { return new TextEncoder().encode(text).length; }

    // ------------------------------------------------------------ diagnosis (PortSpecDiagnosis.swift)

    /** The end of the listening prefix the user meant: the first "/", when the text before it
     *  could be a prefix (no ":", or it starts with "[" or holds "%"); else -1. */
    function meantPrefixEnd(text) {
        const slash = text.indexOf("/");
        if (slash <= 0) return -1;
        const before = text.slice(0, slash);
        if (before.startsWith("[") || before.includes("%")) return slash;
        return before.includes(":") ? -1 : slash;
    }

    /** Why the listening prefix text.slice(0, end) cannot be read: [piece, message]. */
    function prefixProblem(text, end) {
        const prefix = text.slice(0, end);
        const ports = text.slice(end + 1);
        const example = ports === "" ? "8080" : ports;
        let addr = prefix;
        const percent = prefix.indexOf("%");
        if (percent >= 0) {
            addr = prefix.slice(0, percent);
            const name = prefix.slice(percent + 1);
            if (name === "")
                return [prefix, `"${prefix}" has "%" but no interface name after it; write e.g. ${addr}%eth0/${example}.`];
            if (utf8Length(name) > 15)
                return [name, `interface name "${name}" is ${utf8Length(name)} bytes long; Linux allows at most 15. ` +
                              "Write the interface's real name, as `ip link` shows it."];
            const c = new Cursor(addr, 0);
            if (addr === "" || addr === "*" || (c.anyAddress() && c.atEnd))
                return [prefix, `cannot read "${prefix}" as a listening address and interface; write ADDRESS%IFNAME/${example}.`];
        }
        if (addr.startsWith("[") && !addr.endsWith("]"))
            return [addr, `"${addr}" lacks its closing "]"; write ${addr}]/${example}.`];
        return [addr, `"${addr}" before "/" is not an IP address, so it cannot be the listening address; ` +
                      `write a whole IPv4 address (127.0.0.1/${example}), an IPv6 address ([::1]/${example}), ` +
                      `or no address to listen on all (${example}).`];
    }

    /** Digits at `at`: [value (capped), end], or null. */
    function digitsAt(text, at) {
        let end = at;
        let value = 0;
        while (end < text.length && text[end] >= "0" && text[end] <= "9") {
            value = Math.min(value * 10 + Number(text[end]), 1000000);
            end++;
        }
        return end > at ? [value, end] : null;
    }

    /** A port number past 65535 (`number`, text) in the user's `quoted` piece. */
    function pastTop(number, quoted, role) {
        if (number === quoted) return `"${quoted}" is past 65535, the highest port; give a port from 1 to 65535.`;
        return `${role} ${number} in "${quoted}" is past 65535, the highest port; give ports from 1 to 65535.`;
    }

    /** Why the range at the start of `piece` is wrong, or null. */
    function rangeProblem(piece, quoted, role) {
        const first = digitsAt(piece, 0);
        if (!first) return null;
        if (first[0] > 65535) return pastTop(piece.slice(0, first[1]), quoted, role);
        if (piece[first[1]] !== "-") return null;
        const last = digitsAt(piece, first[1] + 1);
        if (!last)
            return `"${quoted}" has a range without its last port; write ${first[0]}-LAST, e.g. ${first[0]}-${Math.min(first[0] + 9, 65535)}.`;
        if (last[0] > 65535) return pastTop(piece.slice(first[1] + 1, last[1]), quoted, role);
        if (last[0] < first[0])
            return `"${quoted}" is a reversed range: it ends (${last[0]}) before it starts (${first[0]}); write ${last[0]}-${first[0]}.`;
        return null;
    }

    /** Why the chunk at `at` cannot be read; `after` the kind of chunk just before, if any. */
    function chunkProblem(text, at, after) {
        let end = text.indexOf(",", at);
        if (end < 0) end = text.length;
        const piece = text.slice(at, end);
        if (piece.startsWith(":")) {
            if (after && after !== "include") {
                const what = after === "exclude" ? "an exclusion (~)" : `"${after}"`;
                return [piece, `"${piece}" follows ${what}, which takes no target; remove it.`];
            }
            const target = piece.slice(1);
            if (target === "")
                return [piece, `"${piece}" names no target; give a target port (:8080) or address (:10.0.0.2), or leave out ":".`];
            const why = rangeProblem(target, piece, "target port");
            if (why) return [piece, why];
            return [piece, `cannot read "${piece}" as a target; write :PORT, :FIRST-LAST, :ADDRESS or :ADDRESS/PORT (IPv6 in brackets).`];
        }
        if (after) return [piece, `"${piece}" follows the ports; separate ports with commas, as in 22,80, and give ranges as 8000-8010.`];
        if (piece === "" && at === 0) return [",", `the spec starts with ","; remove it, or put a port before it.`];
        if (piece === "") return [",,", `",," leaves a port out; remove one ",", or put a port between them.`];
        const why = rangeProblem(piece.startsWith("~") ? piece.slice(1) : piece, piece, "port");
        if (why) return [piece, why];
        return [piece, `cannot read "${piece}" as ports; give a port (8080), a range (8080-8089), a list (22,80), "all", "auto" or "none".`];
    }

    // ------------------------------------------------------------ the parser (PortSpec.swift)

    /** The option letter for a table ("HOST"/"SPLICE") and protocol. */
    function optionFor(table, protocol) {
        return (table === "SPLICE" ? "-" + (protocol === "tcp" ? "T" : "U") : "-" + (protocol === "tcp" ? "t" : "u"));
    }

    /**
     * Parses one -t/-u/-T/-U argument (without its option) as pestoctl does. Returns
     * { rules, bestEffort, isNone }; each rule is { protocol, address, interface, firstPort,
     * lastPort, targetAddress, targetPort, scan } with "" for no address. `ephemeral` is
     * [low, high], needed only for best-effort specs (defaults to RFC 6335's 49152-65535).
     * Throws SpecError.
     */
    function parse(spec, protocol, table, ephemeral) {
        const nul = spec.indexOf("\0");
        const text = nul >= 0 ? spec.slice(0, nul) : spec;
        const fail = (piece, message) => new SpecError(spec, piece, message);
        const option = optionFor(table, protocol);
        if (text === "none") return { rules: [], bestEffort: false, isNone: true };

        const start = new Cursor(text, 0);
        let addr = null;
        let iface = "";
        let prefixRead = false;
        const prefix = start.listenPrefix();
        if (prefix) {
            if (table === "SPLICE") throw fail(spec, `${option} takes no listening address: its rules listen on the namespace's loopback.`);
            if (prefix.interface === "." || prefix.interface === "..")
                throw fail(prefix.interface, `"${prefix.interface}" is not a valid interface name.`);
            addr = prefix.address;
            iface = prefix.interface;
            prefixRead = true;
        }
        if (table === "SPLICE") iface = "lo";

        const bad = (cursor, after) => {
            if (text === "") return fail("", `the port spec is empty; give "none", "all", "auto" or a list of ports.`);
            const end = meantPrefixEnd(text);
            if (!prefixRead && end >= 0 && cursor.at <= end) return fail(...prefixProblem(text, end));
            if (cursor.atEnd) return fail("", `the spec ends where a port was expected; add a port after the last "," or "-".`);
            return fail(...chunkProblem(text, cursor.at, after));
        };

        const excluded = new Uint8Array(65536);
        let scan = false;
        let p = start.copy();
        do {
            const chunk = p.chunk();
            if (!chunk) throw bad(p);
            if (chunk.kind === "auto") scan = true;
            else if (chunk.kind === "exclude") excluded.fill(1, chunk.first, chunk.last + 1);
        } while (p.literal(","));

        const rules = [];
        let includesSeen = false;
        let allTarget = null;
        let lastKind = "include";
        p = start.copy();
        do {
            const before = p.at;
            const chunk = p.chunk();
            if (!chunk) throw bad(p);
            lastKind = chunk.kind;
            if (chunk.kind === "all") allTarget = chunk.target;
            if (chunk.kind !== "include") continue;
            includesSeen = true;
            const piece = text.slice(before, p.at);
            const { first, last, targetFirst, targetLast } = chunk;
            if (targetLast - targetFirst !== last - first) {
                throw fail(piece, `"${piece}" maps ${last - first + 1} port${last === first ? "" : "s"} to ` +
                                  `${targetLast - targetFirst + 1}; the target range must be as long as the listening range.`);
            }
            addRuns(rules, first, last, excluded, chunk.target, targetFirst - first, piece);
        } while (p.literal(","));
        if (!p.atEnd) throw bad(p, lastKind);
        if (includesSeen) return { rules, bestEffort: false, isNone: false };
        const [low, high] = ephemeral || [49152, 65535];
        excluded.fill(1, low, high + 1);
        addRuns(rules, 1, 65535, excluded, allTarget, 0, spec);
        return { rules, bestEffort: true, isNone: false };

        /** A rule for every run of first..last not excluded, each checked as upstream checks it. */
        function addRuns(list, first, last, cut, target, delta, piece) {
            let base = first;
            while (base <= last) {
                if (cut[base]) { base++; continue }
                let end = base;
                while (end < last && !cut[end + 1]) end++;
                const rule = {
                    protocol, address: addr ? addressText(addr) : "", interface: iface, firstPort: base, lastPort: end,
                    targetAddress: target && !isUnspecified(target) ? addressText(target) : "",
                    targetPort: (base + delta) & 0xffff, scan,
                };
                check(rule, target && !isUnspecified(target) ? target : null, list, piece);
                list.push(rule);
                base = end + 1;
            }
        }

        /** Upstream's checks of one new rule: ports, target address, overlap with earlier ones. */
        function check(rule, target, earlier, piece) {
            if (rule.firstPort === 0) throw fail(piece, `"${piece}" forwards from port 0; ports are 1-65535.`);
            if (rule.targetPort === 0) throw fail(piece, `"${piece}" forwards to port 0; ports are 1-65535.`);
            if (target) {
                const t = addressText(target);
                if (isMulticast(target) || isBroadcast(target))
                    throw fail(piece, `"${piece}": target address ${t} is a multicast or broadcast address.`);
                if (!addr) {
                    const wildcard = "v4" in target ? "0.0.0.0" : "[::]";
                    throw fail(piece, `"${piece}" listens dual stack (no listening address) but forwards to ${familyName(target)} ` +
                                      `address ${t}; give ${wildcard}/... to listen on ${familyName(target)} only.`);
                }
                if (familyName(addr) !== familyName(target)) {
                    throw fail(piece, `"${piece}" forwards from ${familyName(addr)} address ${addressText(addr)} to ` +
                                      `${familyName(target)} address ${t}; use one family for both.`);
                }
            }
            for (const other of earlier) {
                if (other.firstPort <= rule.lastPort && rule.firstPort <= other.lastPort) {
                    const one = rule.lastPort === rule.firstPort;
                    throw fail(piece, `"${piece}" forwards port${one ? "" : "s"} ${rule.firstPort}${one ? "" : "-" + rule.lastPort} ` +
                                      "again; each port can be forwarded only once.");
                }
            }
        }
    }

    /**
     * Parses what a user types in the page: an optional option (-t, -u, -T, -U; the default is
     * -t) and the spec. Returns { option, table, protocol, spec, result } or throws SpecError
     * whose message starts with the option, as pestoctl prints it.
     */
    function parseArgument(input, ephemeral) {
        const m = /^\s*(-[tuTU])(?:\s+|$)(.*)$/s.exec(input);
        const option = m ? m[1] : null;
        const spec = m ? m[2].trim() : input.trim();
        const table = option === "-T" || option === "-U" ? "SPLICE" : "HOST";
        const protocol = option === "-u" || option === "-U" ? "udp" : "tcp";
        return { option, table, protocol, spec, result: parse(spec, protocol, table, ephemeral) };
    }

    return { SpecError, parse, parseArgument, optionFor, addressText, address };
})();

if (typeof module !== "undefined") module.exports = PortSpec;
