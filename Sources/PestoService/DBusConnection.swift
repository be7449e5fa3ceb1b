// SPDX-License-Identifier: GPL-2.0-or-later

// DBusConnection: a private libdbus bus connection, usable two ways:
//   - attached to an EventLoop (the service): libdbus watches become epoll sources of the
//     loop, libdbus timeouts become loop timers, and queued messages are dispatched before
//     the loop sleeps; incoming messages go to one handler;
//   - blocking (clients and tests): `call` waits for the reply, `nextMessage` for signals.
//
// Watch bookkeeping (see doc/platform-notes.md): libdbus may put separate read and write
// watches on one fd, so watches are grouped per fd and their enabled flags merged into one
// epoll interest; an fd with no enabled watch is removed from epoll (events 0 would still
// report HUP and spin); dbus_watch_handle() can remove watches, so each one is looked up
// again before it is handled.

import CDBus
import PestoEngine

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

/// A private connection to a message bus.
public final class DBusConnection {
    let raw: OpaquePointer
    /// Called for every incoming message when attached to a loop; returns true when handled.
    public var messageHandler: ((DBusMessage) -> Bool)?
    private var binding: DBusLoopBinding?
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
        detach()
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

    /// This connection's unique name (`:1.42`).
    public var uniqueName: String { dbus_bus_get_unique_name(raw).map { String(cString: $0) } ?? "" }

    /// Takes ownership of a well-known name; fails if someone else has it.
    public func requestName(_ name: String) throws(DBusErrorReply) {
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        let r = dbus_bus_request_name(raw, name, UInt32(DBUS_NAME_FLAG_DO_NOT_QUEUE), &error)
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
        let deadline = MonotonicInstant.now.adding(milliseconds: Int(timeoutMilliseconds))
        while true {
            if let m = dbus_connection_pop_message(raw) { return DBusMessage(owning: m) }
            let now = MonotonicInstant.now
            if now >= deadline { return nil }
            let left = Int32((deadline.nanoseconds - now.nanoseconds) / 1_000_000) + 1
            if dbus_connection_read_write(raw, left) == 0 { return nil }
        }
    }

    // MARK: Event-loop use (the service)

    /// Runs this connection's I/O and dispatch on `loop`, delivering messages to `messageHandler`.
    public func attach(to loop: EventLoop, kind: EventLoop.Kind) {
        precondition(binding == nil, "already attached")
        if !filterInstalled {
            dbus_connection_add_filter(raw, DBusConnection.filterFunction, Unmanaged.passUnretained(self).toOpaque(), nil)
            filterInstalled = true
        }
        let b = DBusLoopBinding(connection: raw, loop: loop, kind: kind)
        binding = b
        b.install()
        loop.beforeSleep = { [unowned self] in self.dispatchAll() }
    }

    /// Undoes `attach`.
    public func detach() {
        binding?.uninstall()
        binding = nil
    }

    /// Dispatches every message libdbus has queued.
    func dispatchAll() {
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

/// Connects libdbus's watch and timeout callbacks to an `EventLoop`.
final class DBusLoopBinding: EventHandler {
    private let connection: OpaquePointer
    private unowned let loop: EventLoop
    private let kind: EventLoop.Kind
    /// Watches per fd, and whether the fd is currently in epoll.
    private var watches: [Int32: [OpaquePointer]] = [:]
    private var registered: Set<Int32> = []
    private var timers: [OpaquePointer: EventLoop.TimerID] = [:]
    /// Descriptors epoll refused to watch, tried again by `rewatchTimer`.
    private var unwatched: Set<Int32> = []
    private var rewatchTimer: EventLoop.TimerID?
    /// How long to wait before trying again to watch a descriptor epoll refused.
    static let rewatchMilliseconds = 100

    init(connection: OpaquePointer, loop: EventLoop, kind: EventLoop.Kind) {
        self.connection = connection
        self.loop = loop
        self.kind = kind
    }

    static func me(_ data: UnsafeMutableRawPointer?) -> DBusLoopBinding {
        Unmanaged<DBusLoopBinding>.fromOpaque(data!).takeUnretainedValue()
    }

    func install() {
        loop.setHandler(self, for: kind)
        let ctx = Unmanaged.passUnretained(self).toOpaque()
        dbus_connection_set_watch_functions(
            connection,
            { w, d in DBusLoopBinding.me(d).addWatch(w!); return 1 },
            { w, d in DBusLoopBinding.me(d).removeWatch(w!) },
            { w, d in DBusLoopBinding.me(d).refresh(fd: dbus_watch_get_unix_fd(w!)) },
            ctx, nil)
        dbus_connection_set_timeout_functions(
            connection,
            { t, d in DBusLoopBinding.me(d).addTimeout(t!); return 1 },
            { t, d in DBusLoopBinding.me(d).removeTimeout(t!) },
            { t, d in DBusLoopBinding.me(d).toggleTimeout(t!) },
            ctx, nil)
    }

    func uninstall() {
        dbus_connection_set_watch_functions(connection, nil, nil, nil, nil, nil)
        dbus_connection_set_timeout_functions(connection, nil, nil, nil, nil, nil)
        for fd in registered { loop.remove(fd: fd) }
        registered.removeAll()
        watches.removeAll()
        for (_, id) in timers { loop.cancelTimer(id) }
        timers.removeAll()
        if let rewatchTimer { loop.cancelTimer(rewatchTimer) }
        rewatchTimer = nil
        unwatched.removeAll()
    }

    private func addWatch(_ w: OpaquePointer) {
        watches[dbus_watch_get_unix_fd(w), default: []].append(w)
        refresh(fd: dbus_watch_get_unix_fd(w))
    }

    private func removeWatch(_ w: OpaquePointer) {
        let fd = dbus_watch_get_unix_fd(w)
        watches[fd]?.removeAll { $0 == w }
        if watches[fd]?.isEmpty == true { watches[fd] = nil }
        refresh(fd: fd)
    }

    /// Recomputes the epoll interest of `fd` from its enabled watches.
    private func refresh(fd: Int32) {
        var events: UInt32 = 0
        for w in watches[fd] ?? [] where dbus_watch_get_enabled(w) != 0 {
            let flags = dbus_watch_get_flags(w)
            if flags & DBUS_WATCH_READABLE.rawValue != 0 { events |= EventLoop.Events.readable }
            if flags & DBUS_WATCH_WRITABLE.rawValue != 0 { events |= EventLoop.Events.writable }
        }
        do {
            if events == 0 {
                if registered.remove(fd) != nil { loop.remove(fd: fd) }
            } else if registered.contains(fd) {
                try loop.modify(fd: fd, events: events, kind: kind, index: 0)
            } else {
                try loop.add(fd: fd, events: events, kind: kind, index: 0)
                registered.insert(fd)
            }
        } catch {
            // epoll cannot take the bus socket now (ENOSPC at fs.epoll.max_user_watches,
            // ENOMEM): the bus waits in the kernel's buffers and the watch is tried again soon.
            unwatched.insert(fd)
            guard rewatchTimer == nil else { return }
            rewatchTimer = loop.after(milliseconds: Self.rewatchMilliseconds) { [unowned self] in
                self.rewatchTimer = nil
                let fds = self.unwatched
                self.unwatched.removeAll()
                for fd in fds { self.refresh(fd: fd) }
            }
        }
    }

    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        var flags: UInt32 = 0
        if events & EventLoop.Events.readable != 0 { flags |= DBUS_WATCH_READABLE.rawValue }
        if events & EventLoop.Events.writable != 0 { flags |= DBUS_WATCH_WRITABLE.rawValue }
        if events & EventLoop.Events.hangup != 0 { flags |= DBUS_WATCH_HANGUP.rawValue }
        if events & EventLoop.Events.error != 0 { flags |= DBUS_WATCH_ERROR.rawValue }
        for w in watches[fd] ?? [] {
            // A previous dbus_watch_handle may have removed this watch.
            guard watches[fd]?.contains(w) == true, dbus_watch_get_enabled(w) != 0 else { continue }
            let wanted = dbus_watch_get_flags(w) | DBUS_WATCH_HANGUP.rawValue | DBUS_WATCH_ERROR.rawValue
            if flags & wanted != 0 { dbus_watch_handle(w, flags & wanted) }
        }
    }

    private func addTimeout(_ t: OpaquePointer) {
        guard dbus_timeout_get_enabled(t) != 0 else { return }
        let interval = Int(dbus_timeout_get_interval(t))
        timers[t] = loop.every(milliseconds: interval) { [unowned self] in
            // Timeouts repeat until libdbus removes or disables them.
            if self.timers[t] != nil { dbus_timeout_handle(t) }
        }
    }

    private func removeTimeout(_ t: OpaquePointer) {
        if let id = timers.removeValue(forKey: t) { loop.cancelTimer(id) }
    }

    private func toggleTimeout(_ t: OpaquePointer) {
        removeTimeout(t)
        addTimeout(t)
    }
}
