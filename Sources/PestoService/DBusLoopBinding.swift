// SPDX-License-Identifier: GPL-2.0-or-later

// DBusLoopBinding: runs a DBusConnection (PestoDBus) on the engine's EventLoop.
//
// Watch bookkeeping (see doc/platform-notes.md): libdbus may put separate read and write
// watches on one fd, so watches are grouped per fd and their enabled flags merged into one
// epoll interest; an fd with no enabled watch is removed from epoll (events 0 would still
// report HUP and spin); dbus_watch_handle() can remove watches, so each one is looked up
// again before it is handled.

import CDBus
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

extension DBusConnection {

    /// Runs this connection's I/O and dispatch on `loop`, delivering messages to `messageHandler`.
    public func attach(to loop: EventLoop, kind: EventLoop.Kind) {
        precondition(loopBinding == nil, "already attached")
        installMessageFilter()
        let b = DBusLoopBinding(connection: raw, loop: loop, kind: kind)
        loopBinding = b
        b.install()
        loop.beforeSleep = { [unowned self] in self.dispatchAll() }
    }

    /// Undoes `attach`.
    public func detach() {
        loopBinding?.uninstall()
        loopBinding = nil
    }
}

/// Connects libdbus's watch and timeout callbacks to an `EventLoop`.
final class DBusLoopBinding: EventHandler, DBusConnectionBinding {
    private let connection: OpaquePointer
    /// Held strongly: libdbus calls back into the binding (removing watches) as late as the
    /// connection's own deinit, which in an optimised build may come after the last use of
    /// the loop elsewhere; an unowned reference then trapped on a freed loop at every exit.
    /// The loop ↔ handler cycle this closes is broken by `removeAllHandlers` or `uninstall`.
    private let loop: EventLoop
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
            { w, d in
                DBusLoopBinding.me(d).addWatch(w!)
                return 1
            },
            { w, d in DBusLoopBinding.me(d).removeWatch(w!) },
            { w, d in DBusLoopBinding.me(d).refresh(fd: dbus_watch_get_unix_fd(w!)) },
            ctx, nil)
        dbus_connection_set_timeout_functions(
            connection,
            { t, d in
                DBusLoopBinding.me(d).addTimeout(t!)
                return 1
            },
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
        if flags & DBUS_WATCH_READABLE.rawValue != 0 { readOn(fd) }
    }

    /// How many more times one readable event lets libdbus read (each read takes 2 to 4 KiB).
    static let readsPerEvent = 256

    /// libdbus reads at most about 2 KiB per dbus_watch_handle. While a large message arrives
    /// and another is decoded a slice per loop turn (SlicedApplyDecoder.swift), a 5.5 MiB
    /// Apply took thousands of turns to read, and every call behind it in the bus socket
    /// (another client's Status) waited as long (Benchmarks/README.md, run-flood.sh). So while
    /// no whole message has been read, the socket is read on, up to `readsPerEvent` times
    /// (0.5 to 1 MiB), as long as it has bytes (recv MSG_PEEK); a small message is whole after
    /// the first read and costs nothing more.
    private func readOn(_ fd: Int32) {
        var peek: UInt8 = 0
        for _ in 0..<Self.readsPerEvent {
            // The watch first: a disconnect in the last read may have closed the descriptor.
            guard dbus_connection_get_dispatch_status(connection) != DBUS_DISPATCH_DATA_REMAINS,
                let w = watches[fd]?.first(where: {
                    dbus_watch_get_enabled($0) != 0 && dbus_watch_get_flags($0) & DBUS_WATCH_READABLE.rawValue != 0
                }),
                case .success(let n) = Sys.recv(fd, &peek, 1, flags: Int32(MSG_PEEK | MSG_DONTWAIT)), n > 0
            else { return }
            dbus_watch_handle(w, DBUS_WATCH_READABLE.rawValue)
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
