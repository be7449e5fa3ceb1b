// SPDX-License-Identifier: GPL-2.0-or-later

// Listener: opening and closing one listening socket for one port of a rule.
//
// Theory of operation: a rule covering ports F...L owns one socket per port, opened by a
// `ListenerFactory`. The kernel factory picks the socket family from the rule's address:
//   - an IPv4 address (including 0.0.0.0): an AF_INET socket;
//   - an IPv6 address: AF_INET6 with IPV6_V6ONLY on, so `::` means IPv6 only;
//   - no address (dual stack): one AF_INET6 socket on `::` with IPV6_V6ONLY off when both
//     families are enabled, else a socket of the one enabled family on its wildcard.
// TCP listeners set SO_REUSEADDR (so TIME_WAIT leftovers do not block a rebind) and
// TCP_NODELAY (which the connections they accept inherit, for the relay) and listen
// with the configured backlog; UDP sockets do not, so that two UDP binds of one port still
// collide as they should. SO_BINDTODEVICE is set before bind() when the rule names an interface.
// Every socket is non-blocking and close-on-exec. A failure at any step closes what was
// opened and reports the errno: the caller counts it as a bind failure.

import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Opens and closes the listening sockets of rules. The table calls nothing else that touches
/// sockets, so tests (and the namespace-aware factory) can stand in for the kernel here.
public protocol ListenerFactory {
    /// Opens, binds and (for TCP) listens on one socket for `port` of `rule`.
    /// - Returns: the descriptor, or the errno of the step that failed (nothing is left open).
    func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno>

    /// Closes a descriptor returned by `openListener`.
    func closeListener(_ fd: Int32)
}

/// The real factory: sockets in the calling thread's network namespace.
public struct KernelListenerFactory: ListenerFactory {
    /// The families enabled for dual-stack rules.
    public var families: Capabilities
    /// The `listen(2)` backlog for TCP listeners.
    public var backlog: Int32

    /// Makes a factory; `families` should be the table's `.ipv4`/`.ipv6` capabilities.
    public init(families: Capabilities, backlog: Int32 = SOMAXCONN) {
        self.families = families.intersection([.ipv4, .ipv6])
        self.backlog = backlog
    }

    public func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        let domain: Int32
        let address: IPAddress
        var v6only: Int32? = nil
        switch rule.address {
        case .some(let a) where a.family == .ipv4:
            (domain, address) = (AF_INET, a)
        case .some(let a):
            (domain, address, v6only) = (AF_INET6, a, 1)
        case .none where families.contains(.ipv6):
            (domain, address, v6only) = (AF_INET6, .anyIPv6, families.contains(.ipv4) ? 0 : 1)
        case .none:
            (domain, address) = (AF_INET, .anyIPv4)
        }
        let type = rule.proto == .tcp ? Int32(SOCK_STREAM.rawValue) : Int32(SOCK_DGRAM.rawValue)

        let fd: Int32
        switch Sys.socket(domain: domain, type: type) {
        case .success(let s): fd = s
        case .failure(let e): return .failure(e)
        }
        func fail(_ e: Errno) -> Result<Int32, Errno> {
            Sys.close(fd)
            return .failure(e)
        }
        if let v6only, case .failure(let e) = Sys.setOption(fd, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, value: v6only) {
            return fail(e)
        }
        if rule.proto == .tcp, case .failure(let e) = Sys.setOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1) {
            return fail(e)
        }
        // Accepted connections inherit TCP_NODELAY from their listener, so the relay need not
        // set it on each (a system call per connection). Its failure (ENOMEM) only costs
        // latency, so it is not checked.
        if rule.proto == .tcp { Self.setNoDelay(fd) }
        // UDP replies must leave from the address each client wrote to (UDPRelay.swift).
        if rule.proto == .udp, case .failure(let e) = Sys.receivePacketInfo(fd, domain: domain) {
            return fail(e)
        }
        if !rule.interface.isEmpty, case .failure(let e) = Sys.bindToDevice(fd, interface: rule.interface) {
            return fail(e)
        }
        if case .failure(let e) = Sys.bind(fd, domain: domain, address: address, port: port) {
            return fail(e)
        }
        if rule.proto == .tcp, case .failure(let e) = Sys.listen(fd, backlog: backlog) {
            return fail(e)
        }
        return .success(fd)
    }

    public func closeListener(_ fd: Int32) { Sys.close(fd) }

    /// Sets TCP_NODELAY on a TCP listener, for the connections it accepts (they inherit it).
    static func setNoDelay(_ fd: Int32) {
        _ = Sys.setOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
    }
}
