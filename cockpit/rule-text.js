// SPDX-License-Identifier: GPL-2.0-or-later

/* rule-text.js: pestod's rules in pasta's notation, for the Cockpit page.
 *
 * A port of Sources/pestoctl/RuleText.swift (option, spec), so the page writes every rule as
 * pestoctl writes it (`-t 127.0.0.1/8080:80`, `-u %eth0/5000-5010`, `-T 5432`). Reading specs
 * is port-spec.js's, which follows PestoModel's PortSpec.
 *
 * A rule here is the object the page keeps for a Rule object's properties:
 * { protocol, address, interface, firstPort, lastPort, targetAddress, targetPort, scan, owner },
 * with "" for the defaults, as pestod returns them.
 */
"use strict";

const RuleText = (() => {
    /** Whether an address text is IPv6. */
    function isIPv6(address) { return address.includes(":"); }

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

    return { option, spec, notation, range, isIPv6 };
})();

if (typeof module !== "undefined") module.exports = RuleText;
