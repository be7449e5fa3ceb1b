// SPDX-License-Identifier: GPL-2.0-or-later

// RuleCodec: the contract's rule description `a{sv}` to and from the engine's `Rule`.
//
// Two kinds of failure, as doc/dbus-api.md separates them: an unknown key or a value of the
// wrong D-Bus type is `org.freedesktop.DBus.Error.InvalidArgs` (the caller built the message
// wrong); a well-typed value that makes no sense (an unparsable address, a missing required
// field, and everything `Rule.validate` rejects) is `top.passt.Pesto1.Error.InvalidRule`.

import PestoModel

extension DBusErrorReply {
    /// The D-Bus form of an engine error.
    public init(_ error: PestoError) {
        self.init(PestoBusNames.errorName(error.code), error.message)
    }

    /// The D-Bus form of any error a method body throws: a `DBusErrorReply` as it is, a
    /// `PestoError` by its code, anything else as `org.freedesktop.DBus.Error.Failed`.
    public init(replyingTo error: any Error) {
        switch error {
        case let e as DBusErrorReply: self = e
        case let e as PestoError: self.init(e)
        default: self.init(DBusErrorReply.failed, "\(error)")
        }
    }

    public static func invalidArgs(_ message: String) -> DBusErrorReply { DBusErrorReply(invalidArgs, message) }
    public static func invalidRule(_ message: String) -> DBusErrorReply { DBusErrorReply(PestoBusNames.errorName(.invalidRule), message) }
}

/// Converts rule descriptions (every key of `RuleField`, in its order).
public enum RuleCodec {
    /// The D-Bus signature of a field's values.
    public static func signature(_ field: RuleField) -> String {
        switch field.kind {
        case .text: return "s"
        case .port: return "q"
        case .flag: return "b"
        }
    }

    /// The keys of a rule description and their D-Bus types.
    public static let keys: [(String, String)] = RuleField.allCases.map { ($0.key, signature($0)) }

    /// What `decode` does with a key it does not know.
    public enum UnknownKeys: Sendable {
        /// Refuse the description (`InvalidArgs`): what the server does with requests.
        case refuse
        /// Skip the key: what a client does with replies, so a newer server's extra keys
        /// do not break it.
        case ignore
    }

    /// The D-Bus form of a field value.
    public static func encode(_ value: RuleFieldValue) -> DBusValue {
        switch value {
        case .text(let v): return .string(v)
        case .port(let v): return .uint16(v)
        case .flag(let v): return .bool(v)
        }
    }

    /// A D-Bus value as a field value of `field`'s kind; nil when the type does not fit.
    static func fieldValue(_ value: DBusValue, for field: RuleField) -> RuleFieldValue? {
        switch field.kind {
        case .text: return value.stringValue.map(RuleFieldValue.text)
        case .port: return value.uint16Value.map(RuleFieldValue.port)
        case .flag: return value.boolValue.map(RuleFieldValue.flag)
        }
    }

    /// Decodes an `a{sv}` rule description.
    ///
    /// An unknown key (unless `unknownKeys` is `.ignore`), a value of the wrong type or a key
    /// given twice is `InvalidArgs`; a missing required field, an unknown protocol or an
    /// address that does not parse is `InvalidRule` (`Rule(fields:)`).
    public static func decode(_ value: DBusValue, unknownKeys: UnknownKeys = .refuse) throws(DBusErrorReply) -> Rule {
        guard let entries = value.vardictValue else { throw .invalidArgs("The rule must be a{sv}.") }
        var fields: [RuleField: RuleFieldValue] = [:]
        for (key, v) in entries {
            guard let field = RuleField(key: key) else {
                if unknownKeys == .ignore { continue }
                throw .invalidArgs("Unknown rule key \(ClientText.quote(key)); known keys: \(keys.map(\.0).joined(separator: ", ")).")
            }
            guard let fieldValue = fieldValue(v, for: field) else {
                throw .invalidArgs(
                    "Rule key \(ClientText.quote(key)) must have type \(signature(field)), not \(ClientText.quote(v.signature)).")
            }
            if fields[field] != nil { throw .invalidArgs("Rule key \(ClientText.quote(key)) is given twice.") }
            fields[field] = fieldValue
        }
        do { return try Rule(fields: fields) } catch { throw DBusErrorReply(error) }
    }

    /// Every field of a rule: its key in the rule description, its Rule object property name,
    /// and its value with defaults filled in ("" for any address and for the table's default
    /// target). The one place that turns a stored rule into D-Bus values.
    public static func fields(_ rule: Rule) -> [(key: String, property: String, value: DBusValue)] {
        rule.fieldValues.map { ($0.field.key, $0.field.property, encode($0.value)) }
    }

    /// The stored rule as `a{sv}`, every key present.
    public static func encode(_ rule: Rule) -> DBusValue {
        .vardict(rule.fieldValues.map { ($0.field.key, encode($0.value)) })
    }

    /// A status and the rule's count of won ports as the `(buusu)` struct of `List`.
    public static func encode(_ status: RuleStatus, portsWon: UInt32) -> DBusValue {
        .structure([
            .bool(status.active), .uint32(status.bound), .uint32(status.failed), .string(status.lastErrorName), .uint32(portsWon),
        ])
    }
}
