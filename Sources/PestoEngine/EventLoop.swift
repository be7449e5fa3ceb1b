// SPDX-License-Identifier: GPL-2.0-or-later

// EventLoop: the one epoll thread that runs pestod.
//
// Theory of operation
// -------------------
// Everything pestod does happens on one thread, inside `run()`: D-Bus traffic (libdbus
// watches and timeouts are registered here by the service), listener and relay events, and
// the periodic work (retrying failed binds, scanning). Nothing is locked because nothing is
// shared: other threads may only call `EventLoopStopper.stop()` (an eventfd write).
//
// Readiness sources are typed the way passt types them: the 64-bit epoll data packs
//     bits 56-63  kind   — which `EventHandler` gets the event (an index into `handlers`)
//     bits 32-55  index  — the handler's own slot number (a connection, a watch, ...)
//     bits  0-31  fd     — the descriptor
// so dispatch is one array lookup and a protocol call: no dictionary and no allocation per
// event. Kind 0 is reserved for the loop's own eventfd.
//
// Each turn: `beforeSleep` (libdbus dispatch), the work deferred to this turn (`nextTurn`: a
// slice of a large change, see PestoService/SlicedUpdate.swift), the due timers, `endOfTurn`
// (work that collects what the turn produced: the service saves the changes committed during
// it, once), then `epoll_wait`, the handlers of the ready sources, and the `afterEvents`
// actions (work that completes what those handlers gathered: the UDP relay's replies, one
// sendmmsg). While work is deferred, `epoll_wait` does not sleep: it only collects what is
// ready, so the handlers run between two slices.
//
// Timers are few (retry, scan, a handful of D-Bus timeouts), so they live in a small array
// scanned once per iteration; `epoll_wait` sleeps until the earliest deadline.

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Receives the readiness events of the sources registered with its kind.
public protocol EventHandler: AnyObject {
    /// Called on the loop thread with the epoll event mask and the source's index and fd.
    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32)
}

/// A monotonic timestamp in nanoseconds.
public struct MonotonicInstant: Comparable, Hashable, Sendable {
    public var nanoseconds: UInt64

    /// Now, from CLOCK_MONOTONIC.
    public static var now: MonotonicInstant { MonotonicInstant(nanoseconds: Sys.monotonicNanoseconds()) }

    /// This instant plus `milliseconds`.
    public func adding(milliseconds: Int) -> MonotonicInstant {
        MonotonicInstant(nanoseconds: nanoseconds &+ UInt64(max(0, milliseconds)) * 1_000_000)
    }

    public static func < (a: Self, b: Self) -> Bool { a.nanoseconds < b.nanoseconds }
}

/// Stops an event loop from any thread or from a signal handler (it only writes an eventfd).
public final class EventLoopStopper: Sendable {
    let fd: Int32

    init(fd: Int32) { self.fd = fd }

    /// Asks the loop to return from `run()`.
    public func stop() {
        var one: UInt64 = 1
        // EAGAIN: the counter is at its maximum, so the loop is already being stopped.
        switch Sys.write(fd, &one, 8) {
        case .success, .failure(.wouldBlock): break
        case .failure(let e): preconditionFailure("cannot write the loop's eventfd: \(e)")
        }
    }
}

/// An epoll event loop with typed sources and millisecond timers.
public final class EventLoop {
    /// A handler kind: the top byte of a source's epoll data.
    public struct Kind: Hashable, Sendable {
        public let rawValue: UInt8
        public init(_ rawValue: UInt8) {
            precondition(rawValue != 0, "kind 0 is the loop's own")
            self.rawValue = rawValue
        }
    }

    /// epoll event bits, for code that does not import epoll itself.
    public enum Events {
        public static let readable = EPOLLIN.rawValue
        public static let writable = EPOLLOUT.rawValue
        public static let hangup = EPOLLHUP.rawValue
        public static let error = EPOLLERR.rawValue
    }

    /// A timer's identity, for `cancelTimer`.
    public struct TimerID: Hashable, Sendable {
        let value: UInt64
    }

    private struct Timer {
        let id: TimerID
        var deadline: MonotonicInstant
        /// Re-armed this many milliseconds after firing; nil for one-shot timers.
        let period: Int?
        let action: () -> Void
    }

    private let epfd: Int32
    private let wakeFD: Int32
    /// The stopper for this loop; `Sendable`, hand it to signal handlers and other threads.
    public let stopper: EventLoopStopper
    private var handlers = [(any EventHandler)?](repeating: nil, count: 256)
    private var timers: [Timer] = []
    private var nextTimerID: UInt64 = 1
    private var events = [epoll_event](repeating: epoll_event(), count: 256)
    private var stopping = false
    /// Work for the next turn (`nextTurn`), and the list being run this turn (kept to reuse
    /// its storage).
    private var deferred: [() -> Void] = []
    private var running: [() -> Void] = []
    /// Work to run before each sleep (libdbus dispatch, for example).
    public var beforeSleep: (() -> Void)?
    /// Work that collects what a whole turn produced (saving the changes committed during
    /// it): runs after `beforeSleep` and the due timers, just before the loop sleeps, and
    /// once more when `run()` returns.
    public var endOfTurn: (() -> Void)?
    /// Work that finishes what the handlers of one `epoll_wait` started (`afterEvents`).
    private var afterEventsActions: [() -> Void] = []
    /// How many sources the last `epoll_wait` returned: a handler that is the only one of
    /// its turn has nothing to gather its work with.
    public private(set) var readyThisTurn = 0

    /// Creates the epoll instance and its wake-up eventfd.
    public init() throws(PestoError) {
        let epfd: Int32
        switch Sys.epollCreate() {
        case .success(let fd): epfd = fd
        case .failure(let e): throw PestoError(.system, "Cannot create the epoll instance.", underlyingError: e)
        }
        let wakeFD: Int32
        switch Sys.eventFD() {
        case .success(let fd): wakeFD = fd
        case .failure(let e):
            Sys.close(epfd)
            throw PestoError(.system, "Cannot create the loop's eventfd.", underlyingError: e)
        }
        if case .failure(let e) = Sys.epollWatch(
            epfd, EPOLL_CTL_ADD, fd: wakeFD, events: EPOLLIN.rawValue, data: Self.pack(kind: 0, index: 0, fd: wakeFD))
        {
            Sys.close(wakeFD)
            Sys.close(epfd)
            throw PestoError(.system, "Cannot watch the loop's eventfd.", underlyingError: e)
        }
        self.epfd = epfd
        self.wakeFD = wakeFD
        stopper = EventLoopStopper(fd: wakeFD)
    }

    deinit {
        Sys.close(wakeFD)
        Sys.close(epfd)
    }

    static func pack(kind: UInt8, index: UInt32, fd: Int32) -> UInt64 {
        precondition(index < 1 << 24, "index \(index) does not fit in 24 bits")
        return UInt64(kind) << 56 | UInt64(index) << 32 | UInt64(UInt32(bitPattern: fd))
    }

    // MARK: Sources

    /// Makes `handler` receive the events of every source registered with `kind`.
    public func setHandler(_ handler: any EventHandler, for kind: Kind) {
        handlers[Int(kind.rawValue)] = handler
    }

    /// Forgets every handler and timer. The loop holds its handlers strongly and they hold the
    /// loop, so the owner calls this once `run()` has returned, to let everything go.
    public func removeAllHandlers() {
        for i in handlers.indices { handlers[i] = nil }
        timers.removeAll()
        deferred.removeAll()
        beforeSleep = nil
        endOfTurn = nil
        afterEventsActions.removeAll()
    }

    /// Runs `action` after the handlers of every `epoll_wait` that returned events, before
    /// the loop goes on (the UDP relay sends the replies its flows gathered during them in one
    /// `sendmmsg`). Actions run in the order added and stay for the loop's life: an owner
    /// that may go away captures itself weakly.
    public func afterEvents(_ action: @escaping () -> Void) {
        afterEventsActions.append(action)
    }

    /// Starts watching `fd` for `events` (EPOLLIN, EPOLLOUT, ...).
    public func add(fd: Int32, events: UInt32, kind: Kind, index: UInt32 = 0) throws(PestoError) {
        try control(EPOLL_CTL_ADD, fd: fd, events: events, kind: kind, index: index)
    }

    /// Changes the events watched on `fd`.
    public func modify(fd: Int32, events: UInt32, kind: Kind, index: UInt32 = 0) throws(PestoError) {
        try control(EPOLL_CTL_MOD, fd: fd, events: events, kind: kind, index: index)
    }

    /// Stops watching `fd` (closing the fd does this too).
    ///
    /// A descriptor that is not watched (ENOENT) or already closed (EBADF: libdbus may close a
    /// socket before it removes its watch) is left as it is, which is what the caller wants;
    /// EPOLL_CTL_DEL has no other failure.
    public func remove(fd: Int32) {
        switch Sys.epollUnwatch(epfd, fd: fd) {
        case .success, .failure(.noSuchFile), .failure(.badFileDescriptor): break
        case .failure(let e): preconditionFailure("epoll_ctl(DEL) of descriptor \(fd) gave \(e)")
        }
    }

    /// epoll_ctl ADD or MOD. Environmental failures (ENOSPC at `fs.epoll.max_user_watches`,
    /// ENOMEM) are thrown for the caller to count against that one socket; EBADF is a bug.
    /// Tests inject them with a `SyscallScript` (debug builds).
    private func control(_ op: Int32, fd: Int32, events: UInt32, kind: Kind, index: UInt32) throws(PestoError) {
        let data = Self.pack(kind: kind.rawValue, index: index, fd: fd)
        if case .failure(let e) = Sys.epollWatch(epfd, op, fd: fd, events: events, data: data) {
            throw PestoError(.system, "Cannot watch descriptor \(fd).", underlyingError: e)
        }
    }

    // MARK: Timers

    /// Runs `action` every `milliseconds`, first after one period.
    @discardableResult
    public func every(milliseconds: Int, _ action: @escaping () -> Void) -> TimerID {
        schedule(after: milliseconds, period: milliseconds, action)
    }

    /// Runs `action` once after `milliseconds`.
    @discardableResult
    public func after(milliseconds: Int, _ action: @escaping () -> Void) -> TimerID {
        schedule(after: milliseconds, period: nil, action)
    }

    private func schedule(after ms: Int, period: Int?, _ action: @escaping () -> Void) -> TimerID {
        let id = TimerID(value: nextTimerID)
        nextTimerID += 1
        timers.append(Timer(id: id, deadline: MonotonicInstant.now.adding(milliseconds: ms), period: period, action: action))
        return id
    }

    /// Cancels a timer; cancelling one that already fired (or was cancelled) does nothing.
    public func cancelTimer(_ id: TimerID) {
        timers.removeAll { $0.id == id }
    }

    /// Runs the timers that are due; returns the milliseconds until the next one (-1: none).
    private func runTimers() -> Int32 {
        var now = MonotonicInstant.now
        var i = 0
        while i < timers.count {
            if timers[i].deadline <= now {
                let timer = timers[i]
                if let period = timer.period {
                    timers[i].deadline = now.adding(milliseconds: period)
                    i += 1
                } else {
                    timers.remove(at: i)
                }
                timer.action()  // may add or cancel timers
                now = MonotonicInstant.now
            } else {
                i += 1
            }
        }
        guard let next = timers.min(by: { $0.deadline < $1.deadline })?.deadline else { return -1 }
        if next <= now { return 0 }
        return Int32(min(Int64(Int32.max), Int64((next.nanoseconds - now.nanoseconds + 999_999) / 1_000_000)))
    }

    /// Runs `action` once on the next loop turn, after libdbus dispatch and before the timers,
    /// and makes the loop not sleep until then: the sources that are ready meanwhile are
    /// handled first. Work deferred during a turn runs in the following one, in order.
    public func nextTurn(_ action: @escaping () -> Void) {
        deferred.append(action)
    }

    /// Runs the work deferred to this turn.
    private func runDeferred() {
        guard !deferred.isEmpty else { return }
        swap(&deferred, &running)
        for action in running { action() }  // may defer more, to the next turn
        running.removeAll(keepingCapacity: true)
    }

    // MARK: Running

    /// Runs until `stopper.stop()` (or `stop()` from the loop thread) is called.
    public func run() {
        stopping = false
        while !stopping {
            beforeSleep?()
            runDeferred()
            let untilTimer = runTimers()
            let timeout = deferred.isEmpty ? untilTimer : 0
            endOfTurn?()
            if stopping { break }
            let n: Int
            switch events.withUnsafeMutableBufferPointer({ Sys.epollWait(epfd, $0, timeout: timeout) }) {
            case .success(let count): n = count
            case .failure(.interrupted): continue  // a signal: timers and the stop flag first
            case .failure(let e): preconditionFailure("epoll_wait failed: \(e)")  // EINVAL: a bug
            }
            readyThisTurn = n
            for k in 0..<n {
                let data = events[k].data.u64
                let kind = Int(data >> 56)
                let fd = Int32(bitPattern: UInt32(truncatingIfNeeded: data))
                if kind == 0 {
                    var value: UInt64 = 0
                    // EAGAIN: another turn's event already drained it; either way the loop stops.
                    _ = Sys.read(wakeFD, &value, 8)
                    stopping = true
                    continue
                }
                handlers[kind]?.handleEvent(events[k].events, index: UInt32((data >> 32) & 0xFF_FFFF), fd: fd)
            }
            if n > 0 {
                for action in afterEventsActions { action() }
            }
        }
        endOfTurn?()
    }

    /// Makes SIGTERM, SIGINT and SIGHUP stop the loop (and ignores SIGPIPE). Call once, from main.
    public func stopOnSignals() throws(PestoError) {
        if case .failure(let e) = Sys.stopOnSignals(writingTo: wakeFD) {
            throw PestoError(.system, "Cannot install the signal handlers.", underlyingError: e)
        }
    }

    /// Makes `run()` return after the current iteration (loop thread only).
    public func stop() { stopping = true }
}
