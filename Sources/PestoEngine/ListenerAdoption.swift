// SPDX-License-Identifier: GPL-2.0-or-later

// ListenerAdoption: listening sockets handed over by a running pestod (doc/takeover.md),
// installed by the tables instead of new ones.
//
// Theory of operation: a takeover gives the new pestod one descriptor per bound port of
// every active rule, keyed by (table, rule, port). The engine's tables are then restored
// from the committed rules as at any start; their factories are wrapped in an
// `AdoptingListenerFactory`, which answers a port's `openListener` with the handed-over
// descriptor when there is one (after checking it: a socket of the rule's protocol, bound
// to that port, listening for TCP) and opens a new socket otherwise (a port the old
// instance had failed to bind). Nothing is closed and reopened, so a listener keeps its
// inode and the connections waiting in its backlog. Scan rules listen on no port when
// activated: `adoptScanListeners` makes them listen on the handed-over ports before the first
// scan would open them anew. Within one table two active rules never
// conflict, so (rule, port) names at most one listener of an active rule. Descriptors no
// rule claimed are closed by `closeUnclaimed()` (the old instance still holds its copies
// until it exits).

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Handed-over listening descriptors waiting to be claimed by their rules' activation.
public final class ListenerAdoption {
    /// One listener's identity within a table.
    struct Key: Hashable {
        var rule: Rule
        var port: UInt16
    }

    private var waiting: [TableKind: [Key: Int32]] = [:]
    /// How many descriptors were claimed so far.
    public private(set) var adopted = 0
    /// Descriptors refused by the check (wrong kind of socket), closed.
    public private(set) var refused = 0

    /// Makes an empty set.
    public init() {}

    /// Adds `fd`, the listener of `port` of `rule` in `table`. A second descriptor for the same
    /// listener replaces nothing: it is closed and counted as refused.
    public func add(_ fd: Int32, table: TableKind, rule: Rule, port: UInt16) {
        let key = Key(rule: rule, port: port)
        if waiting[table]?[key] != nil {
            Sys.close(fd)
            refused += 1
            return
        }
        waiting[table, default: [:]][key] = fd
    }

    /// Whether a descriptor waits for `port` of `rule` in `table` (unchecked).
    public func isWaiting(table: TableKind, rule: Rule, port: UInt16) -> Bool {
        waiting[table]?[Key(rule: rule, port: port)] != nil
    }

    /// How many descriptors wait to be claimed.
    public var waitingCount: Int { waiting.values.reduce(0) { $0 + $1.count } }

    /// Takes the descriptor for `port` of `rule` in `table`, if there is one and it is a
    /// listener of the rule's protocol bound to that port; a descriptor that is not is closed.
    func take(table: TableKind, rule: Rule, port: UInt16) -> Int32? {
        guard let fd = waiting[table]?.removeValue(forKey: Key(rule: rule, port: port)) else { return nil }
        guard Self.isListener(fd, proto: rule.proto, port: port) else {
            Sys.close(fd)
            refused += 1
            return nil
        }
        adopted += 1
        // Its connections are to inherit TCP_NODELAY (Listener.swift), whoever made it.
        if rule.proto == .tcp { KernelListenerFactory.setNoDelay(fd) }
        return fd
    }

    /// Closes every descriptor no rule claimed.
    public func closeUnclaimed() {
        for (_, fds) in waiting { for (_, fd) in fds { Sys.close(fd) } }
        waiting = [:]
    }

    deinit { closeUnclaimed() }

    /// Whether `fd` is an IPv4 or IPv6 socket of `proto`, bound to `port`, and (TCP) listening.
    static func isListener(_ fd: Int32, proto: TransportProtocol, port: UInt16) -> Bool {
        let type = proto == .tcp ? Int32(SOCK_STREAM.rawValue) : Int32(SOCK_DGRAM.rawValue)
        guard case .success(type) = Sys.option(fd, level: SOL_SOCKET, name: SO_TYPE),
            case .success(let address) = Sys.localAddress(fd),
            address.family == AF_INET || address.family == AF_INET6,
            address.endpoint?.port == port
        else { return false }
        if proto == .tcp {
            guard case .success(let accepting) = Sys.option(fd, level: SOL_SOCKET, name: SO_ACCEPTCONN), accepting != 0 else {
                return false
            }
        }
        return true
    }
}

extension ForwardingEngine {
    /// Makes every active scan rule listen on the ports whose listeners were handed over, so
    /// that they are installed (same sockets) rather than closed and reopened by the first
    /// scan; that scan then brings the rule up to date as usual. Call after the tables'
    /// restore, before `closeUnclaimed()`.
    public func adoptScanListeners(_ adoption: ListenerAdoption) {
        for table in tables {
            for (id, rule) in table.activeScanRules {
                table.updateScan(id: id) { port in adoption.isWaiting(table: table.kind, rule: rule, port: port) }
            }
        }
    }
}

/// A factory that installs handed-over listeners (`ListenerAdoption`) and opens the rest
/// through another factory.
public struct AdoptingListenerFactory: ListenerFactory {
    /// The factory for ports without a handed-over descriptor.
    public var inner: any ListenerFactory
    /// Which table this factory serves.
    public var table: TableKind
    /// The handed-over descriptors.
    public var adoption: ListenerAdoption

    /// Wraps `inner` for `table`.
    public init(inner: any ListenerFactory, table: TableKind, adoption: ListenerAdoption) {
        self.inner = inner
        self.table = table
        self.adoption = adoption
    }

    public func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        if let fd = adoption.take(table: table, rule: rule, port: port) { return .success(fd) }
        return inner.openListener(for: rule, port: port)
    }

    public func closeListener(_ fd: Int32) { inner.closeListener(fd) }
}
