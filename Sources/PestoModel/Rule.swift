// SPDX-License-Identifier: GPL-2.0-or-later

// Rule: one forwarding rule as the contract describes it (doc/dbus-api.md, "Rule description").

/// The transport protocol a rule forwards.
public enum TransportProtocol: String, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    case tcp
    case udp

    /// Parses the contract's spelling (`tcp`, `udp`).
    public init(parsing text: String) throws(PestoError) {
        guard let value = TransportProtocol(rawValue: text) else {
            throw PestoError(.invalidRule, "protocol must be \"tcp\" or \"udp\", not \(ClientText.quote(text)).")
        }
        self = value
    }

    public var description: String { rawValue }
}

/// A forwarding rule: where to listen and where to send what arrives.
///
/// A rule listens on every port of `firstPort...lastPort` and forwards port `n` to
/// `targetPort + (n - firstPort)` on `targetAddress`. It carries no state: whether it is
/// active and how its binds went is kept by the `ForwardingTable` that holds it.
///
/// Construction does not validate; `validate(capabilities:)` is the one place that does.
public struct Rule: Hashable, Sendable {
    /// TCP or UDP.
    public var proto: TransportProtocol
    /// The listening address; nil means any address, dual stack where both families are enabled.
    public var address: IPAddress?
    /// The interface to bind to (SO_BINDTODEVICE); "" for none.
    public var interface: String
    /// First listening port.
    public var firstPort: UInt16
    /// Last listening port (inclusive).
    public var lastPort: UInt16
    /// Where to forward; nil means the table's default (the target side's loopback).
    public var targetAddress: IPAddress?
    /// The destination port of `firstPort`.
    public var targetPort: UInt16
    /// Listen only on the ports that are bound on the target side (pasta's `auto`).
    public var scan: Bool
    /// A free-form tag of the client that made the rule; kept, never interpreted.
    public var owner: String
    /// The PROXY protocol header its TCP connections start with at the target (none by
    /// default; ProxyProtocol.swift).
    public var proxyProtocol: ProxyProtocolVersion
    /// Whose address its connections and flows come from at the target (pestod's by
    /// default; ConnectionSource.swift).
    public var source: ConnectionSource

    /// Makes a rule; `lastPort` and `targetPort` default to `firstPort`.
    public init(
        proto: TransportProtocol,
        address: IPAddress? = nil,
        interface: String = "",
        firstPort: UInt16,
        lastPort: UInt16? = nil,
        targetAddress: IPAddress? = nil,
        targetPort: UInt16? = nil,
        scan: Bool = false,
        owner: String = "",
        proxyProtocol: ProxyProtocolVersion = .none,
        source: ConnectionSource = .pestod
    ) {
        self.proto = proto
        self.address = address
        self.interface = interface
        self.firstPort = firstPort
        self.lastPort = lastPort ?? firstPort
        self.targetAddress = targetAddress
        self.targetPort = targetPort ?? firstPort
        self.scan = scan
        self.owner = owner
        self.proxyProtocol = proxyProtocol
        self.source = source
    }

    /// True when the rule listens on any address of both families (no `address`).
    public var isDualStack: Bool { address == nil }

    /// How many listening ports the rule covers (0 only for a reversed, invalid range).
    public var portCount: Int { lastPort >= firstPort ? Int(lastPort) - Int(firstPort) + 1 : 0 }

    /// The target port for listening port `port` (which must be in the rule's range).
    public func targetPort(for port: UInt16) -> UInt16 {
        precondition(port >= firstPort && port <= lastPort, "port \(port) outside the rule")
        return targetPort &+ (port &- firstPort)
    }
}

/// What a table can do, as the contract's `Capabilities` property and upstream's caps bits.
public struct Capabilities: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let ipv4 = Capabilities(rawValue: 0x01)
    public static let ipv6 = Capabilities(rawValue: 0x02)
    public static let tcp = Capabilities(rawValue: 0x04)
    public static let udp = Capabilities(rawValue: 0x08)
    public static let scan = Capabilities(rawValue: 0x10)
    public static let ifname = Capabilities(rawValue: 0x20)

    /// Every capability, in the contract's order, with its name.
    public static let named: [(Capabilities, String)] = [
        (.ipv4, "ipv4"), (.ipv6, "ipv6"), (.tcp, "tcp"), (.udp, "udp"), (.scan, "scan"), (.ifname, "ifname"),
    ]

    /// The contract's names of the capabilities present (`ipv4 ipv6 tcp udp scan ifname`).
    public var names: [String] { Self.named.filter { contains($0.0) }.map(\.1) }

    public var description: String { names.joined(separator: " ") }
}
