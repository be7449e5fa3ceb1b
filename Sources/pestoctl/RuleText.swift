// SPDX-License-Identifier: GPL-2.0-or-later

// RuleText: rules to and from the contract's `a{sv}`, and as pasta-style spec text and JSON.

import PestoDBus
import PestoModel
import PestoSystem

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
    /// The rule description `a{sv}` for Insert (every field, as the server's codec writes it).
    static func encode(_ rule: Rule) -> DBusValue { RuleCodec.encode(rule) }

    /// A rule description as Read/List return it; keys this pestoctl does not know are skipped.
    static func decode(_ value: DBusValue) throws(ProtocolError) -> Rule {
        do { return try RuleCodec.decode(value, unknownKeys: .ignore) } catch {
            throw ProtocolError("a rule description is malformed: \(error.message)")
        }
    }

    /// `List`'s `a(ua{sv}(buusu))` (members after the fourth of the status are not read).
    static func decodeList(_ reply: [DBusValue]) throws(ProtocolError) -> [ListedRule] {
        guard reply.count == 1, let items = reply[0].arrayValue else { throw ProtocolError("List did not return an array") }
        var result: [ListedRule] = []
        for item in items {
            guard let f = item.structValue, f.count == 3, let id = f[0].uint32Value, let s = f[2].structValue, s.count >= 4,
                let active = s[0].boolValue, let bound = s[1].uint32Value, let failed = s[2].uint32Value,
                let lastError = s[3].stringValue
            else { throw ProtocolError("List returned an entry of the wrong shape") }
            result.append(ListedRule(id: id, rule: try decode(f[1]), active: active, bound: bound, failed: failed, lastError: lastError))
        }
        return result
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
        var fields: [(String, String)] = [("id", "\(r.id)")]
        for (field, value) in r.rule.fieldValues {
            switch value {
            case .text(let v): fields.append((field.key, json(v)))
            case .port(let v): fields.append((field.key, "\(v)"))
            case .flag(let v): fields.append((field.key, v ? "true" : "false"))
            }
        }
        fields += [
            ("spec", json(option(r.rule, table) + " " + spec(r.rule, table))),
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
