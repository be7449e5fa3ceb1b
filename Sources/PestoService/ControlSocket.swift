// SPDX-License-Identifier: GPL-2.0-or-later

// ControlSocket: upstream's pesto control protocol v2 on a UNIX socket (`pasta -c PATH`),
// so podman's and rootlesskit's `pesto` client can drive pestod unchanged.
//
// Theory of operation
// -------------------
// One client at a time, as upstream: while a client is served the listening socket is out
// of epoll, and the next clients wait in the backlog, to be served in the order they
// connected. A session:
//   1. accept; queue the hello and the dump of every table's active rules (PestoV2Wire),
//      with upstream's flags (weak, scan) as pasta would send them; write it as the socket
//      takes it (EPOLLOUT), so a large dump never blocks the loop;
//   2. read the upload into the incremental parser as it arrives;
//   3. on the terminator, stop reading the client and apply the upload as a difference
//      (UpstreamUpdate.swift); close once it is saved (with --state; an upload that cannot
//      be saved is undone and logged).
// While a D-Bus client holds the lock, a complete upload waits, parked, for as long as the
// lock is held (the lock lasts no longer than its holder's presence on the bus): upstream's
// protocol has no reply, so its client has already been told nothing and exited, and
// refusing the upload after a while would drop a change the client believes made. The loop
// goes on, and the clients behind it wait in the listening socket's backlog, in the order
// they connected, each to be shown the tables as the uploads before it left them (serving
// a later client's dump before an earlier upload is applied would let the later upload,
// a whole table, undo the earlier one). The wait is thus bounded per socket: one parked
// upload and `backlog` connections; a client beyond them is refused by the kernel (EAGAIN
// for a non-blocking connect) and learns at once that nothing was done. The editor calls
// back when the lock is released, and the upload is applied on the next loop turn (parked
// again should the lock have been taken meanwhile). `timeoutMilliseconds` bounds only how
// long a client may take to send its upload. A read-only session (hello, dump, the client
// closes without sending anything: `pesto` showing the tables) is normal and logged at
// debug level only. Every upload that is refused (malformed, invalid, conflicting, too
// slow, or undone because it could not be saved) is logged at warning and announced with
// the Manager's UploadRefused signal (the socket, the reason and the uploaded rules).
// A malformed upload (bad pif, short read, more rules than the table's MaxRules (refused at
// the count, before any rule is read), unterminated ifname, ...), a rejected update (what
// upstream refuses too: an invalid rule, a conflict), and a client that has not finished
// within `timeoutMilliseconds` (upstream's open FIXME: a stalled client must not block
// everyone) each end the session with one warning and no change. Bind failures do not
// refuse an upload: its rules are active with their failures counted and retried (the
// summary line says how many sockets are still to bind). Upstream's protocol has no
// reply, so the log and the D-Bus signals are where outcomes show.
//
// Out of descriptors (accept4 fails with EMFILE, ENFILE, ENOBUFS or ENOMEM) the listening
// socket leaves epoll for `pauseMilliseconds` and is watched again after that, so a client
// waiting in the backlog never makes the loop spin; the same retry applies when the listener
// cannot be watched again at the end of a session (epoll_ctl failing with ENOSPC or ENOMEM).

import CPestoSys
import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// pestod's upstream-compatible control socket.
public final class ControlSocket: EventHandler {
    /// Connections waiting in the listening socket's backlog, behind the client being served.
    public static let backlog: Int32 = 16
    /// The most rules one UploadRefused signal repeats.
    static let maxSignalledRules = 1024
    static let listenerKind = EngineEventKind.controlListener
    static let clientKind = EngineEventKind.controlClient

    /// The socket file's path.
    public let path: String
    private let listenFD: Int32
    /// Set once the listening socket was handed to a pestod taking over (TakeoverWire.swift):
    /// the socket file is then that pestod's, and is left in place.
    private var handedOver = false
    private unowned let server: PestoServer
    private unowned let loop: EventLoop
    private let logger: Logger
    private let timeoutMilliseconds: Int
    private var client: Int32 = -1
    private var output: [UInt8] = []
    private var written = 0
    private var parser = PestoV2Wire.UploadParser()
    private var deadline: EventLoop.TimerID?
    private var readBuffer = [UInt8](repeating: 0, count: 65_536)
    /// How long the listener stays out of epoll after running out of descriptors.
    let pauseMilliseconds = 100
    /// The timer that watches the listener again after a pause.
    private var resumeTimer: EventLoop.TimerID?
    /// The listener is in epoll (waiting for a client).
    private var listening = false
    /// A pause was logged since the last client was taken (one line per episode).
    private var pauseLogged = false
    /// Bytes of upload read from the current client (none: a read-only session).
    private var received = 0
    /// The client is in epoll (its upload is still being read or the dump written).
    private var clientWatched = false
    /// The current client's complete upload, waiting for the D-Bus lock to be released.
    private var parked: [(TableKind, [PestoV2Wire.WireRule])]?
    /// The current client's complete upload, from the moment it was read (for UploadRefused).
    private var upload: [(TableKind, [PestoV2Wire.WireRule])]?
    /// Counts sessions, so that a callback for an ended session finds nothing to do.
    private var session: UInt64 = 0

    /// Listens on `path` (a stale socket file there is replaced; the socket is mode 0600).
    public init(path: String, server: PestoServer, loop: EventLoop, logger: Logger, timeoutMilliseconds: Int = 5_000) throws(PestoError) {
        self.path = path
        self.server = server
        self.loop = loop
        self.logger = logger
        self.timeoutMilliseconds = timeoutMilliseconds
        let fd = try UnixListener.open(path: path, type: Int32(SOCK_STREAM.rawValue), backlog: Self.backlog, name: "control socket")
        listenFD = fd
        try watch()
    }

    /// Serves the control socket `fd`, already listening on `path`, handed over by the pestod
    /// this one takes over from (the socket file stays as it is).
    public init(adopting fd: Int32, path: String, server: PestoServer, loop: EventLoop, logger: Logger, timeoutMilliseconds: Int = 5_000)
        throws(PestoError)
    {
        self.path = path
        self.server = server
        self.loop = loop
        self.logger = logger
        self.timeoutMilliseconds = timeoutMilliseconds
        listenFD = fd
        try watch()
    }

    /// Whether a client's session is under way (its upload being read, parked for the lock,
    /// or its dump being written): a takeover waits for its end.
    public var isServingClient: Bool { client >= 0 }

    /// The listening descriptor, for a takeover: from now on this object leaves the socket
    /// file in place when it goes away.
    public func handOver() -> Int32 {
        handedOver = true
        return listenFD
    }

    /// The listening descriptor, still owned by this object.
    var peekDescriptor: Int32 { listenFD }

    /// Registers the listener with the loop.
    private func watch() throws(PestoError) {
        loop.setHandler(self, for: Self.listenerKind)
        loop.setHandler(self, for: Self.clientKind)
        try loop.add(fd: listenFD, events: EventLoop.Events.readable, kind: Self.listenerKind)
        listening = true
        logger.info("control socket (pesto protocol v\(PestoV2Wire.version)) at \(path)")
    }

    deinit {
        if parked != nil {
            // Stopping (a takeover waits for the session's end instead): the client is gone or
            // told nothing, so the log is where this shows.
            logger.warning("control socket: pestod stopped while an upload waited for the lock; it was not applied")
        }
        if let resumeTimer { loop.cancelTimer(resumeTimer) }
        if client >= 0 { Sys.close(client) }
        Sys.close(listenFD)
        if !handedOver { _ = Sys.unlink(path) }  // gone already (removed by hand): nothing to do
    }

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        if fd == listenFD {
            accept()
        } else if fd == client {
            serve(events)
        }
    }

    /// Takes the next client and queues the hello and the dump.
    private func accept() {
        guard client < 0 else { return }
        let c: Int32
        switch Sys.accept(listenFD) {
        case .success(let fd): c = fd
        case .failure(let e):
            if e.isDescriptorExhaustion || e == .noBufferSpace || e == .noMemory {
                // The client stays in the backlog; try again after a pause, never in a spin.
                unwatchListener()
                pauseThenWatchListener(because: e)
            }
            return  // EAGAIN, or ECONNABORTED: that client is gone
        }
        client = c
        session &+= 1
        received = 0
        parked = nil
        upload = nil
        pauseLogged = false
        unwatchListener()  // one client at a time; the others wait in the backlog
        let dump = server.upstreamDump().map { t in
            (t.kind, t.capabilities, t.rules.map { PestoV2Wire.WireRule(rule: $0.rule, bestEffort: $0.bestEffort) })
        }
        output = PestoV2Wire.hello() + PestoV2Wire.tableDump(dump)
        written = 0
        parser = PestoV2Wire.UploadParser(maxRulesPerTable: server.upstreamRuleLimit)
        deadline = loop.after(milliseconds: timeoutMilliseconds) { [unowned self] in
            self.deadline = nil
            self.end("client did not finish within \(self.timeoutMilliseconds) ms; nothing changed")
        }
        do {
            try loop.add(fd: c, events: EventLoop.Events.readable | EventLoop.Events.writable, kind: Self.clientKind)
            clientWatched = true
        } catch {
            end("cannot watch the client: \(error)")
        }
    }

    /// Writes what is queued, reads what arrived.
    private func serve(_ events: UInt32) {
        if written < output.count {
            switch output.withUnsafeBytes({
                Sys.send(client, $0.baseAddress! + written, output.count - written, flags: Int32(MSG_NOSIGNAL))
            }) {
            case .success(let n): written += n
            case .failure(.wouldBlock): break
            case .failure(let e): return end("write failed: \(e)")
            }
            if written == output.count {
                output = []
                written = 0
                do {
                    try loop.modify(fd: client, events: EventLoop.Events.readable, kind: Self.clientKind)
                } catch {
                    return end("cannot watch the client: \(error)")  // else EPOLLOUT would spin the loop
                }
            }
        }
        guard events & (EventLoop.Events.readable | EventLoop.Events.hangup | EventLoop.Events.error) != 0 else { return }
        let n: Int
        switch readBuffer.withUnsafeMutableBytes({ Sys.recv(client, $0.baseAddress!, $0.count, flags: 0) }) {
        case .success(let count): n = count
        case .failure(.wouldBlock): return
        case .failure(let e): return end("read failed: \(e); nothing changed")
        }
        if n == 0 {
            guard received > 0 else {
                logger.debug("control socket: read-only session (the client read the tables and closed)")
                return end(nil)
            }
            return end("client closed the connection before the end of its upload (short read); nothing changed")
        }
        received += n
        do {
            let upload = try readBuffer.withUnsafeBytes { try parser.feed(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
            guard let upload else { return }
            apply(upload)
        } catch let e as PestoV2Wire.WireError {
            end("malformed upload: \(e.message); nothing changed")
        } catch {
            end("malformed upload: \(error); nothing changed")
        }
    }

    /// Applies a complete upload; the session ends once it is saved (or undone, unsaved).
    /// While the D-Bus lock is held, the upload is parked until it is released (or the
    /// session times out).
    private func apply(_ upload: [(TableKind, [PestoV2Wire.WireRule])]) {
        self.upload = upload
        if clientWatched {
            loop.remove(fd: client)  // the upload is complete: nothing more is read
            clientWatched = false
        }
        // Behind a change in progress (and those held back before this upload), in order.
        let waiting = session
        server.editor.whenIdle(sender: nil) { [weak self] in
            guard let self, self.session == waiting else { return }
            self.applyNow(upload)
        }
    }

    /// Applies a complete upload now that no change is in progress, or parks it for the lock.
    private func applyNow(_ upload: [(TableKind, [PestoV2Wire.WireRule])]) {
        if let owner = server.lockOwner {
            if parked == nil {
                parked = upload
                // The upload is complete: no timeout any more, it waits as long as the lock is held.
                if let deadline { loop.cancelTimer(deadline) }
                deadline = nil
                logger.info("control socket: upload waits for the lock held by \(owner); it is applied once the lock is released")
            }
            let waiting = session
            server.editor.whenUnlocked { [weak self] in
                // On the next loop turn, so the Unlock (or departure) completes first.
                guard let self else { return }
                self.loop.after(milliseconds: 0) { [weak self] in
                    guard let self, self.session == waiting, let upload = self.parked else { return }
                    self.apply(upload)
                }
            }
            return
        }
        parked = nil
        if let deadline { loop.cancelTimer(deadline) }  // it cannot time out any more
        deadline = nil
        server.applyUpstream(
            upload.map { ($0.0, $0.1.map { ($0.rule, $0.bestEffort) }) },
            refused: { [weak self] error in self?.end("update refused: \(error.message); nothing changed") },
            saved: { [weak self] summary, failure in self?.applied(summary, failure) })
    }

    /// Logs the end of an applied upload and ends the session.
    private func applied(_ summary: TablesEditor.UpstreamSummary, _ failure: PestoError?) {
        if let failure {
            end("update (\(summary)) undone: \(failure.message)")
        } else {
            logger.notice("control socket: update applied (\(summary))")
            end(nil)
        }
    }

    /// Ends the session (logging `problem` if any) and takes the next client.
    private func end(_ problem: String?) {
        if let problem {
            logger.warning("control socket: \(problem)")
            // An upload (or the start of one) refused: tell D-Bus clients, as the client cannot be.
            if received > 0 { announceRefusal(problem) }
        }
        if let deadline { loop.cancelTimer(deadline) }
        deadline = nil
        if client >= 0 {
            Sys.close(client)  // leaves epoll too
            client = -1
        }
        clientWatched = false
        parked = nil
        upload = nil
        session &+= 1
        output = []
        watchListener()
    }

    /// Emits the Manager's UploadRefused for the current client's upload: the socket, the
    /// reason and the uploaded rules (at most `maxSignalledRules`; none before it was read).
    private func announceRefusal(_ reason: String) {
        var rules: [DBusValue] = []
        for (_, wireRules) in upload ?? [] {
            for r in wireRules.prefix(Self.maxSignalledRules - rules.count) { rules.append(RuleCodec.encode(r.rule)) }
        }
        server.announcer.emit(
            .signal(
                path: PestoBusNames.managerPath, interface: PestoInterfaces.manager.name, member: "UploadRefused",
                arguments: [.string(path), .string(reason), .array(element: "a{sv}", rules)]))
    }

    /// Takes the listener out of epoll.
    private func unwatchListener() {
        if listening { loop.remove(fd: listenFD) }
        listening = false
    }

    /// Watches the listener for the next client; when epoll refuses, tries again after a pause.
    private func watchListener() {
        guard !listening, client < 0, resumeTimer == nil else { return }
        do throws(PestoError) {
            try loop.add(fd: listenFD, events: EventLoop.Events.readable, kind: Self.listenerKind)
            listening = true
        } catch {
            pauseThenWatchListener(because: error.underlyingError ?? Errno(rawValue: ENOMEM))
        }
    }

    /// Watches the listener again `pauseMilliseconds` from now (logged once per episode).
    private func pauseThenWatchListener(because e: Errno) {
        guard resumeTimer == nil else { return }
        if !pauseLogged {
            pauseLogged = true
            logger.warning("control socket: cannot take a client now (\(e)); pausing \(pauseMilliseconds) ms at a time until it can")
        }
        resumeTimer = loop.after(milliseconds: pauseMilliseconds) { [unowned self] in
            self.resumeTimer = nil
            self.watchListener()
        }
    }
}
