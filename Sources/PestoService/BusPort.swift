// SPDX-License-Identifier: GPL-2.0-or-later

// BusPort: what the service needs of its bus connection once it is on the bus — send a
// message, know how many bytes wait unsent, take the next incoming message — so that
// `PestoServer.handle(_:)` can be driven in process by a test, without a dbus-daemon,
// against a port that records what is sent. pestod's port is its `DBusConnection`, attached
// to the event loop (DBusLoopBinding.swift); taking the bus name and the match rules stay
// with the connection (`PestoServer.start(on:)`).

import PestoDBus

/// The service's side of a bus: where replies and signals go.
public protocol BusPort: AnyObject {
    /// Queues `message` to be sent (replies, errors, signals); never blocks.
    func send(_ message: DBusMessage)
    /// How many bytes are queued and not yet taken by the bus daemon.
    var outgoingBytes: Int { get }
    /// The next incoming message, waiting at most `timeoutMilliseconds`; nil when none came
    /// (used only when handing over to a successor, outside the event loop).
    func nextMessage(timeoutMilliseconds: Int32) -> DBusMessage?
    /// Writes out everything queued (blocking).
    func flush()
}

extension DBusConnection: BusPort {}
