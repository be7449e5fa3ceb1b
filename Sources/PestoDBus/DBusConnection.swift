// SPDX-License-Identifier: GPL-2.0-or-later

// DBusConnection: a private libdbus bus connection, usable two ways:
//   - attached to the service's event loop (PestoService's DBusLoopBinding.swift): libdbus
//     watches become epoll sources of the loop, libdbus timeouts become loop timers, and
//     queued messages are dispatched before the loop sleeps; incoming messages go to one
//     handler;
//   - blocking (clients and tests): `call` waits for the reply, `nextMessage` for signals.

import CDBus

#if canImport(Glibc)
    import Glibc
#endif

/// Which bus to connect to.
public enum BusAddress: Hashable, Sendable, CustomStringConvertible {
    case system
    case session
    /// Any bus by address (`unix:path=...`).
    case address(String)

    public var description: String {
        switch self {
        case .system: return "system bus"
        case .session: return "session bus"
        case .address(let a): return "bus at \(a)"
        }
    }
}

/// Something that drives a connection's I/O (the service's event-loop binding); the
/// connection uninstalls it before it closes.
package protocol DBusConnectionBinding: AnyObject {
    /// Removes the binding's watches, timeouts and loop registrations.
    func uninstall()
}

/// A private connection to a message bus.
public final class DBusConnection {
    package let raw: OpaquePointer
    /// Called for every incoming message when attached to a loop; returns true when handled.
    public var messageHandler: ((DBusMessage) -> Bool)?
    private var filterInstalled = false

    /// Connects and registers with the bus.
    public init(_ bus: BusAddress) throws(DBusErrorReply) {
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        let conn: OpaquePointer?
        switch bus {
        case .system: conn = dbus_bus_get_private(DBUS_BUS_SYSTEM, &error)
        case .session: conn = dbus_bus_get_private(DBUS_BUS_SESSION, &error)
        case .address(let a):
            conn = dbus_connection_open_private(a, &error)
            if let conn, dbus_error_is_set(&error) == 0, dbus_bus_register(conn, &error) == 0 {
                dbus_connection_close(conn)
                dbus_connection_unref(conn)
                throw Self.take(&error, "cannot register with the \(bus)")
            }
        }
        guard let conn, dbus_error_is_set(&error) == 0 else {
            throw Self.take(&error, "cannot connect to the \(bus)")
        }
        raw = conn
        dbus_connection_set_exit_on_disconnect(conn, 0)
    }

    deinit {
        loopBinding?.uninstall()
        if filterInstalled {
            dbus_connection_remove_filter(raw, DBusConnection.filterFunction, Unmanaged.passUnretained(self).toOpaque())
        }
        dbus_connection_close(raw)
        dbus_connection_unref(raw)
    }

    /// Turns a set libdbus error into a `DBusErrorReply`.
    static func take(_ error: inout DBusError, _ context: String) -> DBusErrorReply {
        if dbus_error_is_set(&error) != 0 {
            let name = error.name.map { String(cString: $0) } ?? DBusErrorReply.failed
            let message = error.message.map { String(cString: $0) } ?? ""
            return DBusErrorReply(name, "\(context): \(message)")
        }
        return DBusErrorReply(DBusErrorReply.failed, context)
    }

    /// Bytes of messages queued for sending that the socket has not taken yet.
    public var outgoingBytes: Int { Int(dbus_connection_get_outgoing_size(raw)) }

    /// This connection's unique name (`:1.42`).
    public var uniqueName: String { dbus_bus_get_unique_name(raw).map { String(cString: $0) } ?? "" }

    /// Takes ownership of a well-known name; fails if someone else has it.
    ///
    /// With `allowingReplacement`, a later owner asking with `replacing` takes the name, and
    /// this connection waits in the name's queue behind it (so it gets the name back should
    /// that owner leave the bus); otherwise the name is asked with DO_NOT_QUEUE.
    public func requestName(_ name: String, allowingReplacement: Bool = false, replacing: Bool = false) throws(DBusErrorReply) {
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        var flags = allowingReplacement ? UInt32(DBUS_NAME_FLAG_ALLOW_REPLACEMENT) : UInt32(DBUS_NAME_FLAG_DO_NOT_QUEUE)
        if replacing { flags |= UInt32(DBUS_NAME_FLAG_REPLACE_EXISTING) }
        let r = dbus_bus_request_name(raw, name, flags, &error)
        if dbus_error_is_set(&error) != 0 { throw Self.take(&error, "cannot own \(name)") }
        guard r == DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER || r == DBUS_REQUEST_NAME_REPLY_ALREADY_OWNER else {
            throw DBusErrorReply(DBusErrorReply.failed, "cannot own \(name): another process owns it")
        }
    }

    /// Adds a match rule (blocks for the bus's answer).
    public func addMatch(_ rule: String) throws(DBusErrorReply) {
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        dbus_bus_add_match(raw, rule, &error)
        if dbus_error_is_set(&error) != 0 { throw Self.take(&error, "cannot add match \(rule)") }
    }

    /// Queues a message for sending.
    public func send(_ message: DBusMessage) {
        if dbus_connection_send(raw, message.raw, nil) == 0 { fatalError("libdbus: out of memory") }
    }

    /// Sends a method call and calls `replyHandler` on the loop thread with its reply (an
    /// error message on failure, including libdbus's own NoReply after `timeoutMilliseconds`).
    public func send(_ message: DBusMessage, timeoutMilliseconds: Int32 = 25_000, replyHandler: @escaping (DBusMessage) -> Void) {
        var pending: OpaquePointer?
        guard dbus_connection_send_with_reply(raw, message.raw, &pending, timeoutMilliseconds) != 0 else {
            fatalError("libdbus: out of memory")
        }
        guard let pending else {
            // Disconnected: libdbus gives no pending call. Answer as the bus would.
            let m = DBusMessage(owning: dbus_message_new_error(message.raw, DBusErrorReply.failed, "not connected")!)
            replyHandler(m)
            return
        }
        let box = Unmanaged.passRetained(ReplyBox(replyHandler)).toOpaque()
        let set = dbus_pending_call_set_notify(
            pending,
            { call, data in
                guard let call, let data else { return }
                let box = Unmanaged<ReplyBox>.fromOpaque(data).takeUnretainedValue()
                if let reply = dbus_pending_call_steal_reply(call) { box.handler(DBusMessage(owning: reply)) }
                dbus_pending_call_unref(call)
            },
            box,
            { data in if let data { Unmanaged<ReplyBox>.fromOpaque(data).release() } })
        if set == 0 { fatalError("libdbus: out of memory") }
    }

    /// Holds a reply handler for libdbus's C callback.
    private final class ReplyBox {
        let handler: (DBusMessage) -> Void
        init(_ handler: @escaping (DBusMessage) -> Void) { self.handler = handler }
    }

    /// Writes everything queued (blocking).
    public func flush() { dbus_connection_flush(raw) }

    // MARK: Blocking use (clients, tests)

    /// Sends a method call and waits for its reply; an error reply is thrown.
    public func call(_ message: DBusMessage, timeoutMilliseconds: Int32 = 25_000) throws(DBusErrorReply) -> DBusMessage {
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        guard let reply = dbus_connection_send_with_reply_and_block(raw, message.raw, timeoutMilliseconds, &error) else {
            // An error reply (or libdbus's own NoReply/Disconnected): name and message as sent.
            if dbus_error_is_set(&error) != 0 {
                throw DBusErrorReply(
                    error.name.map { String(cString: $0) } ?? DBusErrorReply.failed,
                    error.message.map { String(cString: $0) } ?? "")
            }
            throw DBusErrorReply(DBusErrorReply.failed, "no reply")
        }
        return DBusMessage(owning: reply)
    }

    /// Calls a method and returns the reply's arguments; `interactive` lets the service's
    /// polkit ask the user to authenticate (through an agent) instead of refusing.
    public func call(
        _ destination: String, _ path: String, _ interface: String, _ member: String, _ arguments: [DBusValue] = [],
        timeoutMilliseconds: Int32 = 25_000, interactive: Bool = false
    ) throws(DBusErrorReply) -> [DBusValue] {
        let m = DBusMessage.methodCall(destination: destination, path: path, interface: interface, member: member, arguments: arguments)
        m.allowsInteractiveAuthorization = interactive
        return try call(m, timeoutMilliseconds: timeoutMilliseconds).arguments ?? []
    }

    /// The next incoming message, waiting at most `timeoutMilliseconds`; nil on timeout or disconnect.
    public func nextMessage(timeoutMilliseconds: Int32) -> DBusMessage? {
        let deadline = Self.monotonicNanoseconds() &+ UInt64(max(0, timeoutMilliseconds)) * 1_000_000
        while true {
            if let m = dbus_connection_pop_message(raw) { return DBusMessage(owning: m) }
            let now = Self.monotonicNanoseconds()
            if now >= deadline { return nil }
            let left = Int32((deadline - now) / 1_000_000) + 1
            if dbus_connection_read_write(raw, left) == 0 { return nil }
        }
    }

    /// CLOCK_MONOTONIC in nanoseconds (the D-Bus layer does not depend on the engine's clock).
    private static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    // MARK: Event-loop use (the service)

    /// The service's binding of this connection to its event loop (PestoService's
    /// `DBusLoopBinding`), kept alive as long as the connection; nil when not attached.
    package var loopBinding: (any DBusConnectionBinding)?

    /// Routes every incoming message to `messageHandler` from now on (installed once).
    package func installMessageFilter() {
        guard !filterInstalled else { return }
        dbus_connection_add_filter(raw, DBusConnection.filterFunction, Unmanaged.passUnretained(self).toOpaque(), nil)
        filterInstalled = true
    }

    /// Dispatches every message libdbus has queued.
    package func dispatchAll() {
        while dbus_connection_get_dispatch_status(raw) == DBUS_DISPATCH_DATA_REMAINS {
            dbus_connection_dispatch(raw)
        }
    }

    private static let filterFunction: DBusHandleMessageFunction = { _, message, data in
        let me = Unmanaged<DBusConnection>.fromOpaque(data!).takeUnretainedValue()
        guard let message, let handler = me.messageHandler else { return DBUS_HANDLER_RESULT_NOT_YET_HANDLED }
        return handler(DBusMessage(retaining: message)) ? DBUS_HANDLER_RESULT_HANDLED : DBUS_HANDLER_RESULT_NOT_YET_HANDLED
    }
}
