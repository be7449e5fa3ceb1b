// SPDX-License-Identifier: GPL-2.0-or-later

// ForwardTarget: where the traffic arriving on one listening socket goes, and the side of
// the namespace boundary where outgoing sockets are made.

import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Where traffic that arrives on one listening port goes.
///
/// Copied into each connection or flow when it starts, so a relay keeps working after its
/// rule is deactivated or deleted.
public struct ForwardTarget: Hashable, Sendable {
    /// The table and rule the listener belongs to (for logs and counters).
    public var table: TableKind
    public var ruleID: UInt32
    /// TCP or UDP.
    public var proto: TransportProtocol
    /// The destination address; nil means the loopback address of the peer's family on the
    /// target side.
    public var address: IPAddress?
    /// The destination port.
    public var port: UInt16
    /// The PROXY protocol header a TCP connection starts with at the target.
    public var proxyProtocol: ProxyProtocolVersion
    /// Whose address the connection or flow comes from at the target.
    public var source: ConnectionSource

    public init(
        table: TableKind, ruleID: UInt32, proto: TransportProtocol, address: IPAddress?, port: UInt16,
        proxyProtocol: ProxyProtocolVersion = .none, source: ConnectionSource = .pestod
    ) {
        self.table = table
        self.ruleID = ruleID
        self.proto = proto
        self.address = address
        self.port = port
        self.proxyProtocol = proxyProtocol
        self.source = source
    }

    /// The destination for a peer of `peerFamily` (the default is that family's loopback).
    public func destination(peerFamily: AddressFamily) -> SocketAddress {
        let ip = address ?? (peerFamily == .ipv4 ? .loopbackIPv4 : .loopbackIPv6)
        return SocketAddress(ip, port: port)
    }
}

/// The side where outgoing sockets are made: the host, or a target network namespace.
public final class TargetSide {
    /// The namespace, or nil for pestod's own.
    public let namespace: NetworkNamespace?
    /// The policy routing of `source` "client" connections in the namespace (nil without one).
    public let transparent: TransparentSource?

    /// Where a deleted namespace is reported (once), if anywhere.
    public var conditions: DataPathConditions?

    public init(namespace: NetworkNamespace?) {
        self.namespace = namespace
        transparent = namespace.map(TransparentSource.init(namespace:))
    }

    /// A non-blocking, close-on-exec socket on this side. In a namespace whose path is gone
    /// the socket is still made (the namespace lives on through pestod's descriptor), and
    /// the condition is reported once.
    public func socket(domain: Int32, type: Int32) -> Result<Int32, Errno> {
        if let namespace {
            if let conditions {
                if namespace.isStillAtPath() {
                    conditions.clear(.namespaceDeleted)
                } else {
                    conditions.occurred(
                        .namespaceDeleted,
                        detail: "the target network namespace \(namespace.path) is gone (deleted, or its process exited); "
                            + "connections and flows still go into it, kept alive only by pestod")
                }
            }
            return namespace.perform { Sys.socket(domain: domain, type: type) }
        }
        return Sys.socket(domain: domain, type: type)
    }
}
