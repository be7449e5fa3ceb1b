// SPDX-License-Identifier: GPL-2.0-or-later

// RelayContext: what the TCP and UDP relays are given by the engine that owns them.
//
// Theory of operation: a relay decides nothing about rules or listeners. It is made with the
// `TargetSides` (where each table's targets are reached: values that outlive the engine's
// other state, so a relay closing its connections in its own deinit still releases their
// policy routing) and a weak `RelayContext`, which the engine implements, for the three
// questions only the engine can answer: would a destination loop through pestod, which rule
// of a shared listener wins a new connection or flow, and that a connection's slot is free
// again. One protocol instead of a closure per question: the relays' dependencies are named
// in one place, and a test harness implements them like any other conformer.

import PestoModel
import PestoSystem

/// The engine's side of the relays: asked per new connection or flow, and told when a TCP
/// connection closes. Loop thread only.
public protocol RelayContext: AnyObject {
    /// True when forwarding `target` to `destination` would reach one of pestod's own
    /// listeners there and so loop through pestod forever; the relay then refuses it (the
    /// context reports it).
    func refusesLoop(_ target: ForwardTarget, to destination: SocketAddress) -> Bool

    /// First match (doc/overlap.md): the target of a new connection or flow on the shared
    /// listener `listener`, or nil when no active rule matches it. `localAddress` gives the
    /// local address it arrived at, and is asked only when the winner depends on it.
    func firstMatchTarget(listener: Int32, localAddress: () -> IPAddress?) -> ForwardTarget?

    /// A TCP connection closed: its slot and descriptors are free, so paused listeners may
    /// resume.
    func relayCapacityAvailable()
}

/// Where the targets of each table are reached: HOST's on the target namespace's side (or
/// pestod's own without one), SPLICE's on pestod's own.
public struct TargetSides {
    /// The side of the HOST table's targets; the only one with transparent source.
    public let host: TargetSide
    /// The side of the SPLICE table's targets.
    public let splice: TargetSide

    /// Both sides.
    public init(host: TargetSide, splice: TargetSide) {
        self.host = host
        self.splice = splice
    }

    /// One side for every table (tests).
    public init(_ side: TargetSide) {
        self.init(host: side, splice: side)
    }

    /// The side of `table`'s targets.
    public subscript(_ table: TableKind) -> TargetSide { table == .host ? host : splice }
}
