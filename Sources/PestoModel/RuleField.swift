// SPDX-License-Identifier: GPL-2.0-or-later

// RuleField: the one list of a rule's fields.
//
// Every encoding of a rule walks this list: the contract's rule description `a{sv}` and the
// rule objects' properties (PestoDBus's RuleCodec, used by pestod and pestoctl alike), the
// state file (PestoService's StateFile), and pestoctl's JSON. A field added to `Rule` is
// added here once, with its key, property name, kind and default, and every encoding
// follows. (The pesto v2 wire format is a fixed binary layout set by upstream; its codec,
// PestoV2Wire.swift, converts whole rules and is the one exception.)
//
// Building a rule from fields (`Rule(fields:)`) is where a description's required fields,
// defaults and address syntax are checked; `Rule.validate` then checks the rule itself.

/// One field of a rule, named as the contract's rule description names it.
public enum RuleField: String, CaseIterable, Hashable, Sendable {
    case proto = "protocol"
    case address
    case interface
    case firstPort = "first-port"
    case lastPort = "last-port"
    case targetAddress = "target-address"
    case targetPort = "target-port"
    case scan
    case owner
    case proxyProtocol = "proxy-protocol"
    case source

    /// What kind of value a field holds; each encoding has one representation per kind.
    public enum Kind: Hashable, Sendable {
        /// Text (`s` on D-Bus); addresses are text, "" for none.
        case text
        /// A port number (`q` on D-Bus).
        case port
        /// A flag (`b` on D-Bus).
        case flag
    }

    /// The key in a rule description, the state file and pestoctl's JSON (`first-port`).
    public var key: String { rawValue }

    /// The rule object's D-Bus property name (`FirstPort`).
    public var property: String {
        switch self {
        case .proto: return "Protocol"
        case .address: return "Address"
        case .interface: return "Interface"
        case .firstPort: return "FirstPort"
        case .lastPort: return "LastPort"
        case .targetAddress: return "TargetAddress"
        case .targetPort: return "TargetPort"
        case .scan: return "Scan"
        case .owner: return "Owner"
        case .proxyProtocol: return "ProxyProtocol"
        case .source: return "Source"
        }
    }

    /// The kind of the field's value.
    public var kind: Kind {
        switch self {
        case .proto, .address, .interface, .targetAddress, .owner, .proxyProtocol, .source: return .text
        case .firstPort, .lastPort, .targetPort: return .port
        case .scan: return .flag
        }
    }

    /// The field by its key; nil for an unknown key.
    public init?(key: String) { self.init(rawValue: key) }
}

/// The value of one field.
public enum RuleFieldValue: Hashable, Sendable {
    case text(String)
    case port(UInt16)
    case flag(Bool)

    /// The kind of field this value fits.
    public var kind: RuleField.Kind {
        switch self {
        case .text: return .text
        case .port: return .port
        case .flag: return .flag
        }
    }
}

extension Rule {
    /// The value of `field`, defaults filled in ("" for any address and for the table's
    /// default target).
    public subscript(field: RuleField) -> RuleFieldValue {
        switch field {
        case .proto: return .text(proto.rawValue)
        case .address: return .text(address?.description ?? "")
        case .interface: return .text(interface)
        case .firstPort: return .port(firstPort)
        case .lastPort: return .port(lastPort)
        case .targetAddress: return .text(targetAddress?.description ?? "")
        case .targetPort: return .port(targetPort)
        case .scan: return .flag(scan)
        case .owner: return .text(owner)
        case .proxyProtocol: return .text(proxyProtocol.rawValue)
        case .source: return .text(source.rawValue)
        }
    }

    /// Every field with its value, in the list's order.
    public var fieldValues: [(field: RuleField, value: RuleFieldValue)] {
        RuleField.allCases.map { ($0, self[$0]) }
    }

    /// Builds a rule from field values as a rule description gives them.
    ///
    /// `protocol` and `first-port` are required; `last-port` and `target-port` default to
    /// `first-port`, addresses to none, `interface`, `owner` and `proxy-protocol` to "",
    /// `source` to "pestod", `scan` to false.
    /// The caller has checked each value's kind against its field (a mismatched kind is
    /// treated as absent). The rule is not validated (`validate(capabilities:)` does that).
    /// - Throws: `PestoError` `.invalidRule` for a missing required field, an unknown
    ///   protocol, an address that does not parse, an unknown `proxy-protocol` or
    ///   `source`.
    public init(fields: [RuleField: RuleFieldValue]) throws(PestoError) {
        func text(_ f: RuleField) -> String? {
            if case .text(let v)? = fields[f] { return v }
            return nil
        }
        func port(_ f: RuleField) -> UInt16? {
            if case .port(let v)? = fields[f] { return v }
            return nil
        }
        func address(_ f: RuleField) throws(PestoError) -> IPAddress? {
            guard let text = text(f), !text.isEmpty else { return nil }
            guard let a = IPAddress(text) else {
                throw PestoError(.invalidRule, "\(f.key) \(ClientText.quote(text)) is not an IPv4 or IPv6 address.")
            }
            return a
        }
        guard let protoText = text(.proto) else {
            throw PestoError(.invalidRule, "protocol is required (\"tcp\" or \"udp\").")
        }
        let proto = try TransportProtocol(parsing: protoText)
        guard let first = port(.firstPort) else { throw PestoError(.invalidRule, "first-port is required.") }
        var scan = false
        if case .flag(let v)? = fields[.scan] { scan = v }
        self.init(
            proto: proto,
            address: try address(.address),
            interface: text(.interface) ?? "",
            firstPort: first,
            lastPort: port(.lastPort),
            targetAddress: try address(.targetAddress),
            targetPort: port(.targetPort),
            scan: scan,
            owner: text(.owner) ?? "",
            proxyProtocol: try ProxyProtocolVersion(parsing: text(.proxyProtocol) ?? ""),
            source: try ConnectionSource(parsing: text(.source) ?? ""))
    }

    /// The rule without its owner tag: what it forwards. Two rules with the same key listen
    /// on the same ports and forward them the same way; upstream uploads and pestoctl's
    /// `-D` match rules by it.
    public var forwardingKey: Rule {
        var key = self
        key.owner = ""
        return key
    }

    /// True when `self` and `other` differ at most in their owner tags.
    public func forwardsSame(as other: Rule) -> Bool { forwardingKey == other.forwardingKey }
}
