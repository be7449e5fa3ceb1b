// SPDX-License-Identifier: GPL-2.0-or-later

// EventKinds: every kind of epoll source pestod has, in one place (as passt's epoll_type.h).
//
// The event loop packs a kind, a 24-bit index and the descriptor into each epoll event's
// data and dispatches on the kind with one array lookup (EventLoop.swift). A kind names the
// handler, so two sources must never share one by accident: they are all listed here, with
// what the index means for each, and a test checks that they are distinct. Kind 0 is the
// loop's own (its stop eventfd). Tests use kinds from `firstForTests` up, which pestod never
// registers.

import PestoModel
import PestoSystem

/// The event kinds of pestod's epoll sources (see EventLoop's theory of operation).
public enum EngineEventKind {
    /// libdbus watches (the service's bus connection); index unused.
    public static let dbus = EventLoop.Kind(1)
    /// A TCP listening socket of an active rule; index unused.
    public static let tcpListener = EventLoop.Kind(2)
    /// One end of a relayed TCP connection; the index is the connection's slot.
    public static let tcpConnection = EventLoop.Kind(3)
    /// A UDP socket of an active rule; index unused.
    public static let udpListener = EventLoop.Kind(4)
    /// The connected socket of a UDP flow towards the target; the index is the flow's slot.
    public static let udpFlow = EventLoop.Kind(5)
    /// The listening socket of the upstream control socket (`--control`); index unused.
    public static let controlListener = EventLoop.Kind(6)
    /// The connected client of the upstream control socket; index unused.
    public static let controlClient = EventLoop.Kind(7)
    /// The takeover socket (`pestod --replace`, TakeoverSource.swift): index 0 its listening
    /// socket, 1 the connection to a successor, 2 one refused while a takeover is under way.
    public static let takeoverListener = EventLoop.Kind(8)
    /// The eventfd SIGUSR2 writes to: a request to upgrade (UpgradeRequest.swift); index unused.
    public static let upgradeRequest = EventLoop.Kind(9)
    /// The eventfd the state store's writer thread signals when saves are done
    /// (PestoService/StoreWriter.swift); index unused.
    public static let stateStore = EventLoop.Kind(10)

    /// Every kind above.
    public static let all = [
        dbus, tcpListener, tcpConnection, udpListener, udpFlow, controlListener, controlClient, takeoverListener, upgradeRequest,
        stateStore,
    ]

    /// The first kind tests may use for sources of their own.
    public static let firstForTests: UInt8 = 16
}
