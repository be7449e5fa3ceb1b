// SPDX-License-Identifier: GPL-2.0-or-later

// RuleText: rules to and from the contract's `a{sv}`, and as pasta-style spec text and JSON.

import PestoEngine
import PestoService

/// One rule of a table as `List` returns it.
struct ListedRule {
    var id: UInt32
    var rule: Rule
    var active: Bool
    var bound: UInt32
    var failed: UInt32
    var lastError: String
}

/// A reply that does not have the contract's shape.
struct ProtocolError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

enum RuleText {
    /// The rule description `a{sv}` for Insert; defaults are left out.
    static func encode(_ rule: Rule) -> DBusValue {
        var entries: [(String, DBusValue)] = [("protocol", .string(rule.proto.rawValue))]
        if let address = rule.address { entries.append(("address", .string(address.description))) }
        if !rule.interface.isEmpty { entries.append(("interface", .string(rule.interface))) }
        entries.append(("first-port", .uint16(rule.firstPort)))
        entries.append(("last-port", .uint16(rule.lastPort)))
        if let target = rule.targetAddress { entries.append(("target-address", .string(target.description))) }
        entries.append(("target-port", .uint16(rule.targetPort)))
        if rule.scan { entries.append(("scan", .bool(true))) }
        if !rule.owner.isEmpty { entries.append(("owner", .string(rule.owner))) }
        return .vardict(entries)
    }

    /// A rule description as Read/List return it.
    static func decode(_ value: DBusValue) throws(ProtocolError) -> Rule {
        guard let entries = value.vardictValue else { throw ProtocolError("a rule is not a{sv}") }
        var fields: [String: DBusValue] = [:]
        for (k, v) in entries { fields[k] = v }
        func address(_ key: String) throws(ProtocolError) -> IPAddress? {
            guard let text = fields[key]?.stringValue, !text.isEmpty else { return nil }
            guard let a = IPAddress(text) else { throw ProtocolError("\(key) \"\(text)\" is not an address") }
            return a
        }
        guard let protoText = fields["protocol"]?.stringValue, let proto = TransportProtocol(rawValue: protoText),
            let first = fields["first-port"]?.uint16Value
        else { throw ProtocolError("a rule lacks protocol or first-port") }
        return Rule(
            proto: proto, address: try address("address"), interface: fields["interface"]?.stringValue ?? "",
            firstPort: first, lastPort: fields["last-port"]?.uint16Value,
            targetAddress: try address("target-address"), targetPort: fields["target-port"]?.uint16Value,
            scan: fields["scan"]?.boolValue ?? false, owner: fields["owner"]?.stringValue ?? "")
    }

    /// `List`'s `a(ua{sv}(buus))`.
    static func decodeList(_ reply: [DBusValue]) throws(ProtocolError) -> [ListedRule] {
        guard reply.count == 1, let items = reply[0].arrayValue else { throw ProtocolError("List did not return an array") }
        var result: [ListedRule] = []
        for item in items {
            guard let f = item.structValue, f.count == 3, let id = f[0].uint32Value, let s = f[2].structValue, s.count == 4,
                let active = s[0].boolValue, let bound = s[1].uint32Value, let failed = s[2].uint32Value,
                let lastError = s[3].stringValue
            else { throw ProtocolError("List returned an entry of the wrong shape") }
            result.append(ListedRule(id: id, rule: try decode(f[1]), active: active, bound: bound, failed: failed, lastError: lastError))
        }
        return result
    }

    /// What makes two rules the same for -D: every field but the owner tag.
    static func sameForwarding(_ a: Rule, _ b: Rule) -> Bool {
        var a = a
        a.owner = b.owner
        return a == b
    }

    /// The pasta option for a rule of `table` (`-t`, `-u`, `-T`, `-U`).
    static func option(_ rule: Rule, _ table: TableKind) -> String {
        switch (table, rule.proto) {
        case (.host, .tcp): return "-t"
        case (.host, .udp): return "-u"
        case (.splice, .tcp): return "-T"
        case (.splice, .udp): return "-U"
        }
    }

    /// The rule as a pasta port spec that parses back to it (`127.0.0.1/8080:80`,
    /// `%eth0/22`, `[::1]/5000-5010`, `0.0.0.0/10-20:192.0.2.1/30-40`, `auto,1000-2000`).
    static func spec(_ rule: Rule) -> String { spec(rule, .host) }

    /// The rule as the port spec of its table's option: a SPLICE rule listening dual stack on
    /// `lo` is what -T/-U make, so its `%lo/` prefix is left out (-T/-U refuse a prefix).
    static func spec(_ rule: Rule, _ table: TableKind) -> String {
        var rule = rule
        if table == .splice && rule.address == nil && rule.interface == "lo" { rule.interface = "" }
        var text = ""
        var listen = ""
        // The address is always written: pesto's grammar refuses a target address on a
        // dual-stack rule, so `0.0.0.0/8080:10.88.0.2/80` needs its wildcard.
        if let address = rule.address {
            listen = address.family == .ipv6 ? "[\(address)]" : address.description
        }
        if !rule.interface.isEmpty { listen += "%" + rule.interface }
        if !listen.isEmpty { text = listen + "/" }
        if rule.scan { text += "auto," }
        text += range(rule.firstPort, rule.lastPort)
        let targetLast = UInt16(clamping: Int(rule.targetPort) + Int(rule.lastPort) - Int(rule.firstPort))
        if let target = rule.targetAddress {
            text += ":" + (target.family == .ipv6 ? "[\(target)]" : target.description) + "/" + range(rule.targetPort, targetLast)
        } else if rule.targetPort != rule.firstPort {
            text += ":" + range(rule.targetPort, targetLast)
        }
        return text
    }

    static func range(_ first: UInt16, _ last: UInt16) -> String { first == last ? "\(first)" : "\(first)-\(last)" }

    /// A JSON string literal.
    static func json(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// One listed rule as a JSON object.
    static func json(_ r: ListedRule, _ table: TableKind) -> String {
        let rule = r.rule
        let fields: [(String, String)] = [
            ("id", "\(r.id)"),
            ("protocol", json(rule.proto.rawValue)),
            ("address", json(rule.address?.description ?? "")),
            ("interface", json(rule.interface)),
            ("first-port", "\(rule.firstPort)"),
            ("last-port", "\(rule.lastPort)"),
            ("target-address", json(rule.targetAddress?.description ?? "")),
            ("target-port", "\(rule.targetPort)"),
            ("scan", rule.scan ? "true" : "false"),
            ("owner", json(rule.owner)),
            ("spec", json(option(rule, table) + " " + spec(rule, table))),
            ("active", r.active ? "true" : "false"),
            ("bound", "\(r.bound)"),
            ("failed", "\(r.failed)"),
            ("last-error", json(r.lastError)),
        ]
        return "{" + fields.map { "\(json($0.0)): \($0.1)" }.joined(separator: ", ") + "}"
    }

    /// One listed rule as a line of the table display.
    static func line(_ r: ListedRule, _ table: TableKind) -> String {
        var state = r.active ? "active, \(r.bound) bound" : "inactive"
        if r.failed > 0 || !r.lastError.isEmpty {
            state += ", \(r.failed) failed" + (r.lastError.isEmpty ? "" : " (\(r.lastError))")
        }
        var text = "\(r.id)".leftPadded(6) + "  " + (option(r.rule, table) + " " + spec(r.rule, table)).rightPadded(32) + " " + state
        if !r.rule.owner.isEmpty { text += "  owner \(r.rule.owner)" }
        return text
    }
}

extension String {
    func leftPadded(_ width: Int) -> String { String(repeating: " ", count: max(0, width - count)) + self }
    func rightPadded(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
}
