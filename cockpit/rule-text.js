// SPDX-License-Identifier: GPL-2.0-or-later

/* rule-text.js: pestod's rules in pasta's notation, for the Cockpit page.
 *
 * A port of Sources/pestoctl/RuleText.swift (option, spec) and of the one-rule subset of
 * Sources/PestoModel/PortSpec.swift (parse), so the page shows and accepts the same text
 * as pestoctl, with upstream pesto's decisions (doc/pesto-conformance.md):
 *
 *     [-t|-u|-T|-U] [listen "/"] ["auto,"] FIRST[-LAST] [":" target]
 *     listen := "*" ["%" IF] | "%" IF | ADDR ["%" IF] | "[" IPV6 "]" ["%" IF]   (-t/-u only)
 *     target := FIRST[-LAST] | TADDR ["/" FIRST[-LAST]]      (TADDR: IPv4, or IPv6 in brackets)
 *
 * As pesto: a target range has as many ports as the listening range; a target address needs
 * a listening address (0.0.0.0/8080:10.88.0.2/80, not 8080:10.88.0.2/80); -T/-U take no
 * listening address, their rules listen on the namespace's loopback (`lo`).
 * Lists, exclusions (`~`) and `all` expand to several rules; the page adds one rule at a time,
 * so it refuses them and points to pestoctl. pestod validates every rule again.
 *
 * A rule here is the object the page keeps for a Rule object's properties:
 * { protocol, address, interface, firstPort, lastPort, targetAddress, targetPort, scan, owner },
 * with "" for the defaults, as pestod returns them.
 */
"use strict";

const RuleText = (() => {
    /** Whether an address text is IPv6. */
    function isIPv6(address) { return address.includes(":"); }

    /** Whether an address text is a wildcard (0.0.0.0 or ::). */
    function isUnspecified(address) {
        if (address === "") return false;
        if (isIPv6(address)) return /^[0:]*$/.test(address) && address.includes("::") || /^(0+:){7}0+$/.test(address);
        return address === "0.0.0.0";
    }

    /** The pasta option for a rule of table `table` ("HOST" or "SPLICE"). */
    function option(rule, table) {
        const tcp = rule.protocol === "tcp";
        if (table === "SPLICE") return tcp ? "-T" : "-U";
        return tcp ? "-t" : "-u";
    }

    /** FIRST or FIRST-LAST. */
    function range(first, last) { return first === last ? String(first) : first + "-" + last; }

    /**
     * The rule as a pasta port spec that parses back to it (as RuleText.spec in pestoctl): a
     * SPLICE rule listening dual stack on `lo` is what -T/-U make, so its `%lo/` is left out.
     */
    function spec(rule, table) {
        let text = "";
        let listen = "";
        if (table === "SPLICE" && rule.address === "" && rule.interface === "lo") rule = { ...rule, interface: "" };
        // The address is always written, as pestoctl writes it: pesto's grammar refuses a
        // target address on a dual-stack rule (0.0.0.0/53:127.0.0.53/53, not 53:127.0.0.53/53).
        if (rule.address !== "")
            listen = isIPv6(rule.address) ? "[" + rule.address + "]" : rule.address;
        if (rule.interface !== "") listen += "%" + rule.interface;
        if (listen !== "") text = listen + "/";
        if (rule.scan) text += "auto,";
        text += range(rule.firstPort, rule.lastPort);
        const targetLast = Math.min(65535, rule.targetPort + rule.lastPort - rule.firstPort);
        if (rule.targetAddress !== "") {
            const target = isIPv6(rule.targetAddress) ? "[" + rule.targetAddress + "]" : rule.targetAddress;
            text += ":" + target + "/" + range(rule.targetPort, targetLast);
        } else if (rule.targetPort !== rule.firstPort) {
            text += ":" + range(rule.targetPort, targetLast);
        }
        return text;
    }

    /** Option and spec together, as pestoctl prints them: "-t 127.0.0.1/8080:80". */
    function notation(rule, table) { return option(rule, table) + " " + spec(rule, table); }

    /** A spec the page cannot take; `message` names the bad piece. */
    class SpecError extends Error {}

    /** Parses "FIRST" or "FIRST-LAST" into [first, last]. */
    function parseRange(text, what) {
        const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text);
        if (!m) throw new SpecError(`${what} "${text}" is not a port or a range of ports`);
        const first = Number(m[1]);
        const last = m[2] === undefined ? first : Number(m[2]);
        for (const port of [first, last])
            if (port < 1 || port > 65535) throw new SpecError(`port ${port} in "${text}" is not between 1 and 65535`);
        if (last < first) throw new SpecError(`range "${text}" ends before it starts`);
        return [first, last];
    }

    /** Index of the first `ch` outside brackets, or -1. */
    function indexOutsideBrackets(text, ch) {
        let depth = 0;
        for (let i = 0; i < text.length; i++) {
            if (text[i] === "[") depth++;
            else if (text[i] === "]") depth--;
            else if (text[i] === ch && depth === 0) return i;
        }
        return -1;
    }

    /** An address as written in a spec: IPv6 in brackets, brackets removed. */
    function parseAddress(text, what) {
        let address = text;
        if (text.startsWith("[")) {
            if (!text.endsWith("]")) throw new SpecError(`${what} "${text}" lacks its closing bracket`);
            address = text.slice(1, -1);
            if (!isIPv6(address)) throw new SpecError(`${what} "${text}" is not an IPv6 address`);
        } else if (isIPv6(text)) {
            throw new SpecError(`${what} "${text}": write IPv6 addresses in brackets, [${text}]`);
        }
        if (!/^[0-9A-Fa-f.:]+$/.test(address)) throw new SpecError(`${what} "${text}" is not an address`);
        return address;
    }

    /**
     * Parses one rule's spec, with or without its option. Returns { table, rule }: table is
     * "HOST", "SPLICE", or null when no option was given; rule.protocol is null then too.
     * Throws SpecError.
     */
    function parse(input) {
        let text = input.trim();
        let table = null;
        let protocol = null;
        const opt = /^(-[tuTU])\s+(.*)$/.exec(text);
        if (opt) {
            table = opt[1] === "-t" || opt[1] === "-u" ? "HOST" : "SPLICE";
            protocol = opt[1].toLowerCase() === "-t" ? "tcp" : "udp";
            text = opt[2].trim();
        }
        if (text === "") throw new SpecError("the spec is empty");
        if (text === "none") throw new SpecError("\"none\" forwards nothing: there is no rule to add");

        const rule = {
            protocol, address: "", interface: "", firstPort: 0, lastPort: 0,
            targetAddress: "", targetPort: 0, scan: false, owner: ""
        };
        // The listening prefix ends at the first "/", unless that "/" belongs to a target
        // address ("22:10.0.0.1/22"): a prefix never has a ":" outside brackets.
        const slash = text.indexOf("/");
        let items = text;
        if (slash >= 0 && indexOutsideBrackets(text.slice(0, slash), ":") < 0) {
            if (table === "SPLICE")
                throw new SpecError(`${opt[1]} takes no listening address: its rules listen on the namespace's loopback`);
            let listen = text.slice(0, slash);
            items = text.slice(slash + 1);
            const percent = indexOutsideBrackets(listen, "%");
            if (percent >= 0) {
                rule.interface = listen.slice(percent + 1);
                listen = listen.slice(0, percent);
                if (rule.interface === "") throw new SpecError("\"%\" needs an interface name");
            }
            if (listen !== "" && listen !== "*") rule.address = parseAddress(listen, "listening address");
        }
        if (table === "SPLICE") rule.interface = "lo";
        if (items.startsWith("auto,")) {
            rule.scan = true;
            items = items.slice(5);
        }
        if (items === "all" || items === "auto" || items.includes(",") || items.includes("~"))
            throw new SpecError(`"${items}" makes several rules; the page adds one at a time (pestoctl takes lists, exclusions and all)`);

        const colon = indexOutsideBrackets(items, ":");
        const listenRange = colon < 0 ? items : items.slice(0, colon);
        [rule.firstPort, rule.lastPort] = parseRange(listenRange, "listening ports");
        rule.targetPort = rule.firstPort;
        if (colon >= 0) {
            const target = items.slice(colon + 1);
            let targetRange = null;
            if (/^\d/.test(target) && !target.includes(".")) {
                targetRange = target;
            } else {
                const close = target.startsWith("[") ? target.indexOf("]") : -1;
                const cut = target.indexOf("/", close + 1);
                const addressText = cut < 0 ? target : target.slice(0, cut);
                rule.targetAddress = parseAddress(addressText, "target address");
                if (isUnspecified(rule.targetAddress))
                    throw new SpecError(`target address "${addressText}" is a wildcard; leave it out to use the default target`);
                if (cut >= 0) targetRange = target.slice(cut + 1);
            }
            if (targetRange !== null) {
                const [first, last] = parseRange(targetRange, "target ports");
                if (last - first !== rule.lastPort - rule.firstPort)
                    throw new SpecError(`target ports "${targetRange}" are not as many as listening ports "${listenRange}"`);
                rule.targetPort = first;
            }
            if (rule.targetAddress !== "") {
                if (rule.address === "") {
                    const wildcard = isIPv6(rule.targetAddress) ? "[::]" : "0.0.0.0";
                    throw new SpecError(`a target address needs a listening address, as in pesto: write ${wildcard}/${items}`);
                } else if (isIPv6(rule.address) !== isIPv6(rule.targetAddress)) {
                    throw new SpecError("listening and target addresses are of different families");
                }
            }
        }
        return { table, rule };
    }

    return { option, spec, notation, parse, range, isIPv6, SpecError };
})();

if (typeof module !== "undefined") module.exports = RuleText;
