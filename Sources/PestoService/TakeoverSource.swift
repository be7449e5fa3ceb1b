// SPDX-License-Identifier: GPL-2.0-or-later

// TakeoverSource: the running pestod's side of a takeover (doc/takeover.md).
//
// Theory of operation
// -------------------
// The running instance listens on a root-only SOCK_SEQPACKET UNIX socket in its runtime
// directory. A new pestod (`--replace`, Takeover.swift) connects; the connection stays
// non-blocking and is driven from the event loop (kind `takeoverListener`, index 1), with
// one loop timer bounding each stage, so the loop never waits on the successor while the
// old instance still serves:
//
//   greeting      hello is awaited (at most a second); welcome answers it, in this
//                 instance's format version, or refused names the version it speaks.
//   lock          while a D-Bus client holds the lock, an upstream control socket session
//                 is under way or a change is in progress, `waiting` tells the successor who
//                 holds things up; looked at again every 20 ms.
//   sharing       what both instances may hold at once goes out as the socket takes it
//                 (EPOLLOUT): the tables' text, one descriptor per listening socket, the
//                 control socket, then `shared`. This instance keeps accepting on those
//                 listeners, relaying, answering everyone.
//   ready         the successor restores the tables on the handed-over listeners and says
//                 `ready`. Only now does this instance pause: if its tables or listeners
//                 changed since they were shared (or a change is under way) it refuses the
//                 takeover; else, in one call on the loop thread, it snapshots its relayed
//                 connections and flows and sends them (RelayHandover.swift), waits for
//                 `taken` (the successor installed them and owns the bus name), answers the
//                 calls routed here before the name moved, and says `bye`.
//
// A successor that stalls or dies before `ready` is abandoned after the takeover timeout
// (from the start of sharing) with a log line, and told so if it still listens: nothing was
// paused, so nothing resumes. One that fails between `ready` and `bye` holds this instance
// for at most the timeout, as before: the loop then resumes, having closed and changed
// nothing (it only sent duplicates), and the bus name, if the successor had taken it, comes
// back when the successor's bus connection ends.

import CPestoSys
import Logging
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// The running instance's side: accepts a takeover on the runtime directory's socket.
public final class TakeoverSource: EventHandler {
    /// The event kind of the takeover socket (index 0), of the connection to a successor
    /// (index 1) and of successors refused while a takeover is under way (index 2).
    static let kind = EngineEventKind.takeoverListener
    /// The event index of the listening socket.
    private static let listenerIndex: UInt32 = 0
    /// The event index of the connection to the successor.
    private static let channelIndex: UInt32 = 1
    /// The event index of a successor refused while a takeover is under way.
    private static let refusingIndex: UInt32 = 2

    /// The socket file's path.
    public let path: String
    private let listenFD: Int32
    private unowned let server: PestoServer
    private unowned let loop: EventLoop
    private let logger: Logger
    private let timeoutMilliseconds: Int
    /// The control socket, handed over with the rest.
    public weak var control: ControlSocket?
    /// The saved rules that could not be restored (written back with the tables).
    public var carried: [StateFile.Entry] = []
    /// Called once the new instance has taken over; pestod exits there.
    public var onHandedOver: (() -> Void)?
    /// Who holds a takeover up, as told to the new instance, while an upstream client's
    /// control socket session is under way.
    static let controlClient = "an upstream client of the control socket"
    /// Who holds a takeover up while a large change is carried out (SlicedUpdate.swift).
    static let changeInProgress = "a change in progress"

    /// Where a takeover under way stands.
    private enum Stage {
        /// Waiting for hello.
        case greeting
        /// Welcomed; waiting for the lock (the holder last told to the successor, if any).
        case lock(toldOwner: String?)
        /// Sending what is shared; `next` is the first message not sent yet.
        case sharing(next: Int)
        /// Everything shared; waiting for `ready`.
        case ready
    }

    /// The takeover under way: one at a time.
    private final class Attempt {
        let channel: TakeoverChannel
        var stage = Stage.greeting
        /// When it was welcomed (the lock wait's start).
        var since = MonotonicInstant.now
        /// The timer bounding the current stage.
        var timer: EventLoop.TimerID?
        /// What is sent while serving on, with descriptors.
        var outbox: [(TakeoverMessage, [Int32])] = []
        /// The tables' text and listeners shared, compared again at `ready`.
        var text: [UInt8] = []
        var listeners: [(ListenerRecord, Int32)] = []
        /// Whether EPOLLOUT is asked for.
        var wantsWritable = false

        init(channel: TakeoverChannel) { self.channel = channel }
    }

    private var attempt: Attempt?
    /// Successors refused while a takeover is under way, by descriptor, until their hello is
    /// read (closing a socket with unread data resets the connection, and the refusal would be
    /// lost), a second at most each.
    private var refusing: [Int32: TakeoverChannel] = [:]

    /// Listens on `path` (a stale socket file is replaced; mode 0600, so only root connects).
    public init(path: String, server: PestoServer, loop: EventLoop, logger: Logger, timeoutMilliseconds: Int) throws(PestoError) {
        self.path = path
        self.server = server
        self.loop = loop
        self.logger = logger
        self.timeoutMilliseconds = timeoutMilliseconds
        let fd = try UnixListener.open(path: path, type: Int32(SOCK_SEQPACKET.rawValue), backlog: 4, name: "takeover socket")
        listenFD = fd
        loop.setHandler(self, for: Self.kind)
        try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.kind, index: Self.listenerIndex)
        logger.info("takeover socket (handover format v\(TakeoverWire.version)) at \(path)")
    }

    deinit {
        if let attempt { drop(attempt) }
        for fd in refusing.keys { loop.remove(fd: fd) }
        loop.remove(fd: listenFD)
        Sys.close(listenFD)
    }

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        if index == Self.listenerIndex {
            accept()
        } else if index == Self.refusingIndex {
            refuse(fd)
        } else if let attempt, attempt.channel.fd == fd {
            if events & EventLoop.Events.writable != 0 { flush(attempt) }
            if self.attempt === attempt, events & ~EventLoop.Events.writable != 0 { receive(attempt) }
        }
    }

    /// Accepts a successor; a second one while a takeover is under way is refused at once.
    private func accept() {
        guard case .success(let fd) = Sys.accept(listenFD) else { return }
        let channel = TakeoverChannel(fd: fd)  // non-blocking (accept4)
        if attempt != nil {
            do throws(PestoError) {
                try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.kind, index: Self.refusingIndex)
            } catch {
                logger.warning("takeover refused: another takeover is under way")
                return
            }
            refusing[fd] = channel
            _ = loop.after(milliseconds: 1000) { [weak self, weak channel] in
                if let self, let channel, self.refusing[fd] === channel { self.refuse(fd) }
            }
            return
        }
        let a = Attempt(channel: channel)
        do throws(PestoError) {
            try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.kind, index: Self.channelIndex)
        } catch {
            logger.warning("takeover refused: \(error.message)")
            return
        }
        attempt = a
        // A new pestod says hello as soon as it is connected.
        arm(a, milliseconds: min(1000, timeoutMilliseconds), "the new pestod did not say hello")
    }

    /// Refuses the successor on `fd` (another takeover is under way), having read its hello
    /// if it came.
    private func refuse(_ fd: Int32) {
        guard let channel = refusing.removeValue(forKey: fd) else { return }
        loop.remove(fd: fd)
        if case .success(let (_, fds)) = Result(catching: { () throws(PestoError) in try channel.receive() }) {
            for fd in fds { Sys.close(fd) }
        }
        try? channel.send(.refused("Another takeover is under way."))
        logger.warning("takeover refused: another takeover is under way")
    }

    /// Bounds the current stage of `a`: when the timer fires first, the takeover is abandoned.
    private func arm(_ a: Attempt, milliseconds: Int, _ why: String) {
        if let timer = a.timer { loop.cancelTimer(timer) }
        a.timer = loop.after(milliseconds: milliseconds) { [weak self, weak a] in
            guard let self, let a, self.attempt === a else { return }
            a.timer = nil
            self.abandon(a, "\(why) within \(milliseconds) ms", tell: "The running pestod gave up waiting (\(milliseconds) ms).")
        }
    }

    /// Reads what the successor sent: hello, ready, or (anything else, its end) a failure.
    private func receive(_ a: Attempt) {
        let message: TakeoverMessage
        do throws(PestoError) {
            let (m, fds) = try a.channel.receive()
            for fd in fds { Sys.close(fd) }
            message = m
        } catch {
            if error.underlyingError == .wouldBlock { return }
            if case .greeting = a.stage {
                // No hello in a version this pestod speaks: refused before anything is shared.
                logger.warning("takeover refused: \(error.message)")
                try? a.channel.send(.refused(error.message))
                drop(a)
                return
            }
            abandon(a, error.message.hasSuffix("closed the handover connection.") ? "the new pestod has gone" : error.message)
            return
        }
        switch (a.stage, message) {
        case (.greeting, .hello):
            do throws(PestoError) { try a.channel.send(.welcome) } catch {
                abandon(a, error.message)
                return
            }
            logger.notice("a new pestod asks to take over")
            a.stage = .lock(toldOwner: nil)
            a.since = .now
            if let timer = a.timer { loop.cancelTimer(timer) }
            a.timer = nil
            proceed(a)
        case (.ready, .ready):
            if let timer = a.timer { loop.cancelTimer(timer) }
            a.timer = nil
            handOverRelays(a)
        default:
            abandon(a, "the new pestod sent \(message.type) out of turn", tell: "Unexpected message.")
        }
    }

    /// Starts sharing if the lock is free and no upstream client is in a control socket
    /// session (its upload would be cut); otherwise tells the new instance who holds things
    /// up and looks again in 20 ms. A session ends within --control-timeout.
    private func proceed(_ a: Attempt) {
        guard attempt === a, case .lock(let toldOwner) = a.stage else { return }
        if let owner = holder {
            if toldOwner != owner {
                a.stage = .lock(toldOwner: owner)
                logger.notice("takeover waits: \(owner) holds the lock")
                do throws(PestoError) { try a.channel.send(.waiting(owner: owner)) } catch {
                    abandon(a, error.message)
                    return
                }
            }
            if MonotonicInstant.now.nanoseconds - a.since.nanoseconds > UInt64(timeoutMilliseconds) * 2_000_000 {
                abandon(a, "the lock was held for longer than the new pestod waits")
                return
            }
            _ = loop.after(milliseconds: 20) { [weak self, weak a] in
                if let self, let a { self.proceed(a) }
            }
            return
        }
        share(a)
    }

    /// Who holds a takeover up now, if anyone.
    private var holder: String? {
        server.lockOwner ?? (control?.isServingClient == true ? Self.controlClient : nil)
            ?? (server.changesIdle ? nil : Self.changeInProgress)
    }

    /// The listening sockets of every active rule, with their (table, rule ID, port).
    private func currentListeners() -> [(ListenerRecord, Int32)] {
        var listeners: [(ListenerRecord, Int32)] = []
        for table in server.engine.tables {
            for rule in table.list() where rule.status.active {
                for (port, fd) in (try? table.listeners(of: rule.id)) ?? [] {
                    listeners.append((ListenerRecord(table: table.kind, ruleID: rule.id, port: port), fd))
                }
            }
        }
        return listeners
    }

    /// The committed tables in the state file's text, with the carried rules.
    private func currentText() -> [UInt8] {
        Array(StateFile.render(StateFile.entries(of: server.engine) + carried).utf8)
    }

    /// Saves what is committed and starts sending the tables, the listeners and the control
    /// socket, serving on meanwhile; the successor has the timeout to answer `ready`.
    private func share(_ a: Attempt) {
        server.flushCommitted()
        a.text = currentText()
        a.listeners = currentListeners()
        let controlFD = control.map { (path: $0.path, fd: $0.peekDescriptor) }
        a.outbox = TakeoverWire.shared(stateText: a.text, listeners: a.listeners, control: controlFD)
        a.stage = .sharing(next: 0)
        arm(a, milliseconds: timeoutMilliseconds, "the new pestod did not answer")
        logger.notice(
            "takeover: sharing \(a.text.count) bytes of tables and \(a.listeners.count) listeners while serving on; waiting for the new pestod to install them"
        )
        flush(a)
    }

    /// Sends what the socket takes of the outbox; asks for EPOLLOUT while some is left.
    private func flush(_ a: Attempt) {
        guard case .sharing(var next) = a.stage else { return }
        while next < a.outbox.count {
            do throws(PestoError) {
                try a.channel.send(a.outbox[next].0, descriptors: a.outbox[next].1)
            } catch {
                if error.underlyingError == .wouldBlock { break }
                abandon(a, error.message)
                return
            }
            next += 1
        }
        let done = next == a.outbox.count
        a.stage = done ? .ready : .sharing(next: next)
        if done { a.outbox = [] }
        if a.wantsWritable == done {
            a.wantsWritable = !done
            let events = EventLoop.Events.readable | (done ? 0 : EventLoop.Events.writable)
            do throws(PestoError) {
                try loop.modify(fd: a.channel.fd, events: events, kind: Self.kind, index: Self.channelIndex)
            } catch {
                abandon(a, error.message)
            }
        }
    }

    /// Gives the takeover up: this instance stays in charge (it paused nothing); the
    /// successor is told why if it still listens.
    private func abandon(_ a: Attempt, _ why: String, tell: String? = nil) {
        // Logged first: whoever reads the refusal finds the line in the log.
        let reason = why.hasSuffix(".") ? String(why.dropLast()) : why
        logger.warning("takeover abandoned: \(reason); this pestod stays in charge")
        if let tell { try? a.channel.send(.refused(tell)) }
        drop(a)
    }

    /// Forgets `a`: its timer, its epoll interest; its connection closes.
    private func drop(_ a: Attempt) {
        if let timer = a.timer { loop.cancelTimer(timer) }
        a.timer = nil
        loop.remove(fd: a.channel.fd)
        if attempt === a { attempt = nil }
    }

    /// The successor said `ready`: unless something changed since the sharing, pauses, sends
    /// the relayed connections and flows, and completes the takeover (see the header).
    private func handOverRelays(_ a: Attempt) {
        let paused = MonotonicInstant.now
        if let owner = holder {
            abandon(a, "\(owner) started while the new pestod installed the tables", tell: "The tables changed meanwhile; try again.")
            return
        }
        server.flushCommitted()
        let listeners = currentListeners()
        guard currentText() == a.text, listeners.count == a.listeners.count,
            zip(listeners, a.listeners).allSatisfy({ $0.0 == $1.0 && $0.1 == $1.1 })
        else {
            abandon(
                a, "the tables or their listeners changed while the new pestod installed them",
                tell: "The tables changed meanwhile; try again.")
            return
        }
        drop(a)
        let channel = a.channel
        do throws(PestoError) {
            if case .failure(let e) = Sys.setBlocking(channel.fd).flatMap({ Sys.setTimeouts(channel.fd, milliseconds: timeoutMilliseconds) }
            ) {
                throw PestoError(.system, "Cannot set up the takeover connection.", underlyingError: e)
            }
            try completeHandover(channel, text: a.text, listeners: a.listeners.count, paused: paused)
        } catch {
            logger.warning(
                "takeover failed, this pestod stays in charge: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
        }
    }

    /// Sends the relays and `end`, waits for `taken`; on success answers `bye` and calls
    /// `onHandedOver`. Throws, having changed nothing, when the new instance fails.
    private func completeHandover(
        _ channel: TakeoverChannel, text: [UInt8], listeners: Int, paused: MonotonicInstant
    ) throws(PestoError) {
        let engine = server.engine
        // From here on this instance's loop does not turn again unless the takeover fails:
        // nothing is read from these connections and flows after their snapshot.
        let connections = engine.tcp.handoverSnapshot()
        let flows = engine.udpFlowsForHandover()
        for (message, fds) in TakeoverWire.relays(
            connections: connections, flows: flows, stateBytes: text.count, listeners: listeners)
        {
            try channel.send(message, descriptors: fds)
        }
        let inFlight = connections.reduce(0) { $0 + $1.up.pending + $1.down.pending }
        logger.notice(
            "takeover: the new pestod is ready; sent \(connections.count) relayed connections (\(inFlight) bytes in flight in their pipes) and \(flows.count) UDP flows; waiting for it to take them"
        )
        let (answer, fds) = try channel.receive()
        for fd in fds { Sys.close(fd) }
        guard answer == .taken else { throw PestoError(.system, "The new pestod answered something other than taken.") }
        // The bus name is the new pestod's: no call comes here any more. Those that came
        // before are answered (reads) or refused (changes) rather than left without a reply.
        server.answerCallsBeforeExit(timeoutMilliseconds: timeoutMilliseconds)
        _ = control?.handOver()
        try channel.send(.bye)
        // The new instance tells systemd it is the main process now, then closes the
        // connection; only then may this one exit (else systemd would see its service's main
        // process end). Whatever ends the wait, the new instance owns everything by now.
        _ = try? channel.receive()
        let pause = (MonotonicInstant.now.nanoseconds - paused.nanoseconds) / 1_000_000
        logger.notice("takeover complete: the new pestod serves now; this one paused \(pause) ms for the relays and exits")
        onHandedOver?()
    }
}
