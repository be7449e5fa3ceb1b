// SPDX-License-Identifier: GPL-2.0-or-later

// RuleCodec: the contract's rule description `a{sv}` to and from the engine's `Rule`.
//
// Two kinds of failure, as doc/dbus-api.md separates them: an unknown key or a value of the
// wrong D-Bus type is `org.freedesktop.DBus.Error.InvalidArgs` (the caller built the message
// wrong); a well-typed value that makes no sense (an unparsable address, a missing required
// field, and everything `Rule.validate` rejects) is `top.passt.Pesto1.Error.InvalidRule`.

import PestoModel

/// A failure decoding a D-Bus request: the error to send back.
public typealias RequestError = DBusErrorReply

extension DBusErrorReply {
    /// The D-Bus form of an engine error.
    public init(_ error: PestoError) {
        self.init(PestoBusNames.errorName(error.code), error.message)
    }

    public static func invalidArgs(_ message: String) -> DBusErrorReply { DBusErrorReply(invalidArgs, message) }
    public static func invalidRule(_ message: String) -> DBusErrorReply { DBusErrorReply(PestoBusNames.errorName(.invalidRule), message) }
}

/// Converts rule descriptions.
public enum RuleCodec {
    /// The keys of a rule description and their D-Bus types.
    public static let keys: [(String, String)] = [
        ("protocol", "s"), ("address", "s"), ("interface", "s"), ("first-port", "q"), ("last-port", "q"),
        ("target-address", "s"), ("target-port", "q"), ("scan", "b"), ("owner", "s"),
    ]

    /// Decodes an `a{sv}` rule description (the caller has checked it is `a{sv}`).
    public static func decode(_ value: DBusValue) throws(DBusErrorReply) -> Rule {
        guard let entries = value.vardictValue else { throw .invalidArgs("The rule must be a{sv}.") }
        var fields: [String: DBusValue] = [:]
        for (key, v) in entries {
            guard let expected = keys.first(where: { $0.0 == key })?.1 else {
                throw .invalidArgs("Unknown rule key \(ClientText.quote(key)); known keys: \(keys.map(\.0).joined(separator: ", ")).")
            }
            guard v.signature == expected else {
                throw .invalidArgs("Rule key \(ClientText.quote(key)) must have type \(expected), not \(ClientText.quote(v.signature)).")
            }
            if fields[key] != nil { throw .invalidArgs("Rule key \(ClientText.quote(key)) is given twice.") }
            fields[key] = v
        }
        guard let protoText = fields["protocol"]?.stringValue else { throw .invalidRule("protocol is required (\"tcp\" or \"udp\").") }
        let proto: TransportProtocol
        do { proto = try TransportProtocol(parsing: protoText) } catch { throw DBusErrorReply(error) }
        guard let first = fields["first-port"]?.uint16Value else { throw .invalidRule("first-port is required.") }

        func address(_ key: String) throws(DBusErrorReply) -> IPAddress? {
            guard let text = fields[key]?.stringValue, !text.isEmpty else { return nil }
            guard let a = IPAddress(text) else {
                throw .invalidRule("\(key) \(ClientText.quote(text)) is not an IPv4 or IPv6 address.")
            }
            return a
        }
        return Rule(
            proto: proto,
            address: try address("address"),
            interface: fields["interface"]?.stringValue ?? "",
            firstPort: first,
            lastPort: fields["last-port"]?.uint16Value,
            targetAddress: try address("target-address"),
            targetPort: fields["target-port"]?.uint16Value,
            scan: fields["scan"]?.boolValue ?? false,
            owner: fields["owner"]?.stringValue ?? "")
    }

    /// Decodes a rule description and validates the rule for a table with `capabilities`:
    /// what Insert and Apply do before the caller is authorised.
    public static func decodeValid(_ value: DBusValue, capabilities: Capabilities) throws(DBusErrorReply) -> Rule {
        let rule = try decode(value)
        do { try rule.validate(capabilities: capabilities) } catch { throw DBusErrorReply(error) }
        return rule
    }

    /// Every field of a rule: its key in the rule description, its Rule object property name,
    /// and its value with defaults filled in ("" for any address and for the table's default
    /// target). The one place that turns a stored rule into D-Bus values.
    public static func fields(_ rule: Rule) -> [(key: String, property: String, value: DBusValue)] {
        [
            ("protocol", "Protocol", .string(rule.proto.rawValue)),
            ("address", "Address", .string(rule.address?.description ?? "")),
            ("interface", "Interface", .string(rule.interface)),
            ("first-port", "FirstPort", .uint16(rule.firstPort)),
            ("last-port", "LastPort", .uint16(rule.lastPort)),
            ("target-address", "TargetAddress", .string(rule.targetAddress?.description ?? "")),
            ("target-port", "TargetPort", .uint16(rule.targetPort)),
            ("scan", "Scan", .bool(rule.scan)),
            ("owner", "Owner", .string(rule.owner)),
        ]
    }

    /// The stored rule as `a{sv}`, every key present.
    public static func encode(_ rule: Rule) -> DBusValue {
        .vardict(fields(rule).map { ($0.key, $0.value) })
    }

    /// A status as the `(buus)` struct of `List`.
    public static func encode(_ status: RuleStatus) -> DBusValue {
        .structure([.bool(status.active), .uint32(status.bound), .uint32(status.failed), .string(status.lastErrorName)])
    }
}
