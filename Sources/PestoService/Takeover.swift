// SPDX-License-Identifier: GPL-2.0-or-later

// Takeover: a new pestod (`--replace`) takes the tables, the listening sockets, the bus
// name and the control socket over from the running one, without closing anything.
//
// Theory of operation (doc/takeover.md has the format and the failure cases)
// ----------------------------------------------------------------------------
// The running instance (`TakeoverSource`) listens on a root-only SOCK_SEQPACKET UNIX
// socket in its runtime directory. The new instance (`TakeoverClient`) connects and says
// hello with its format version; the old one answers welcome with its own, and either side
// refuses a version it does not speak before anything else is sent. While a D-Bus client
// holds the lock, the old instance answers `waiting` and tries again every 20 ms (on its
// loop, serving everyone meanwhile); the new one gives up after its timeout. Then, in one
// call on its loop thread, the old instance saves what is committed, sends the tables (the
// state file's text), one descriptor per listening socket with its (table, rule ID, port),
// and the control socket's descriptor, and waits, its loop held, for `taken`: the new
// instance has restored the tables installing those descriptors (ListenerAdoption.swift)
// and taken the bus name (the old one asked for it with ALLOW_REPLACEMENT, the new one
// asks with REPLACE_EXISTING). The old instance answers `bye` and exits at once, closing
// its copies of the descriptors: the sockets stay open in the new instance with the same
// inodes, and connections arriving meanwhile wait in the listeners' backlogs.
//
// Failure at any step leaves the old instance in charge: until `bye` it has closed and
// changed nothing (it only sent duplicates); if the new one dies or times out, the old
// one's loop resumes, and should the new one have taken the bus name already, the name
// comes back to the old one, queued behind it, when the new one's connection ends. A new
// instance that gets no `bye` exits without serving.
//
// Relayed TCP connections and UDP flows go with the rest, in the same held call, with
// their descriptors and state (RelayHandover.swift): the old instance reads nothing from
// them after its snapshot, the new one installs them while it restores the tables and
// starts moving their bytes only once the old one has said bye.

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
    /// The event kind of the takeover listener.
    static let kind = EngineEventKind.takeoverListener

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

    /// The takeover waiting for the lock, if any.
    private var pending: (channel: TakeoverChannel, since: MonotonicInstant, toldOwner: String?)?

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
        try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.kind)
        logger.info("takeover socket (handover format v\(TakeoverWire.version)) at \(path)")
    }

    deinit {
        loop.remove(fd: listenFD)
        Sys.close(listenFD)
    }

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        guard case .success(let client) = Sys.accept(listenFD) else { return }
        let channel = TakeoverChannel(fd: client)
        do throws(PestoError) {
            // A new pestod says hello as soon as it is connected: a client that does not holds
            // the loop for a second at most.
            if case .failure(let e) = Sys.setBlocking(client).flatMap({
                Sys.setTimeouts(client, milliseconds: min(1000, timeoutMilliseconds))
            }) {
                throw PestoError(.system, "Cannot set up the takeover connection.", underlyingError: e)
            }
            let hello: TakeoverMessage
            do throws(PestoError) {
                (hello, _) = try channel.receive()
            } catch {
                try? channel.send(.refused(error.message))
                throw error
            }
            guard hello == .hello else { throw PestoError(.system, "The new pestod did not start with hello.") }
            if let p = pending, p.channel.peerHasLeft {
                logger.notice("takeover abandoned: the new pestod has gone")
                pending = nil
            }
            if pending != nil {
                try channel.send(.refused("Another takeover is under way."))
                return
            }
            if case .failure(let e) = Sys.setTimeouts(client, milliseconds: timeoutMilliseconds) {
                throw PestoError(.system, "Cannot set up the takeover connection.", underlyingError: e)
            }
            try channel.send(.welcome)
            logger.notice("a new pestod asks to take over")
            pending = (channel, .now, nil)
            proceed()
        } catch {
            logger.warning("takeover refused: \(error.message)")
        }
    }

    /// Hands over now if the lock is free and no upstream client is in a control socket
    /// session (its upload would be cut); otherwise tells the new instance who holds things
    /// up and looks again in 20 ms. A session ends within --control-timeout.
    private func proceed() {
        guard let p = pending else { return }
        if p.channel.peerHasLeft {
            logger.notice("takeover abandoned: the new pestod has gone")
            pending = nil
            return
        }
        if let owner = server.lockOwner ?? (control?.isServingClient == true ? Self.controlClient : nil)
            ?? (server.changesIdle ? nil : Self.changeInProgress)
        {
            if p.toldOwner != owner {
                pending?.toldOwner = owner
                logger.notice("takeover waits: \(owner) holds the lock")
                do throws(PestoError) { try p.channel.send(.waiting(owner: owner)) } catch {
                    logger.warning("takeover abandoned: \(error.message)")
                    pending = nil
                    return
                }
            }
            if MonotonicInstant.now.nanoseconds - p.since.nanoseconds > UInt64(timeoutMilliseconds) * 2_000_000 {
                logger.warning("takeover abandoned: the lock was held for longer than the new pestod waits")
                pending = nil
                return
            }
            _ = loop.after(milliseconds: 20) { [weak self] in self?.proceed() }
            return
        }
        pending = nil
        do throws(PestoError) {
            try handOver(p.channel)
        } catch {
            logger.warning("takeover failed, this pestod stays in charge: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
        }
    }

    /// Sends everything and waits for `taken`; on success answers `bye` and calls
    /// `onHandedOver`. Throws, having changed nothing, when the new instance fails.
    private func handOver(_ channel: TakeoverChannel) throws(PestoError) {
        server.flushCommitted()
        let engine = server.engine
        let text = Array(StateFile.render(StateFile.entries(of: engine) + carried).utf8)
        var listeners: [(ListenerRecord, Int32)] = []
        for table in engine.tables {
            for rule in table.list() where rule.status.active {
                for (port, fd) in (try? table.listeners(of: rule.id)) ?? [] {
                    listeners.append((ListenerRecord(table: table.kind, ruleID: rule.id, port: port), fd))
                }
            }
        }
        let controlFD = control.map { (path: $0.path, fd: $0.peekDescriptor) }
        // From here on this instance's loop does not turn again unless the takeover fails:
        // nothing is read from these connections and flows after their snapshot.
        let connections = engine.tcp.handoverSnapshot()
        let flows = engine.udpFlowsForHandover()
        for (message, fds) in TakeoverWire.handover(
            stateText: text, listeners: listeners, connections: connections, flows: flows, control: controlFD)
        {
            try channel.send(message, descriptors: fds)
        }
        let inFlight = connections.reduce(0) { $0 + $1.up.pending + $1.down.pending }
        logger.notice(
            "takeover: sent \(text.count) bytes of tables, \(listeners.count) listeners, \(connections.count) relayed connections (\(inFlight) bytes in flight in their pipes) and \(flows.count) UDP flows; waiting for the new pestod"
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
        logger.notice("takeover complete: the new pestod serves now; this one exits")
        onHandedOver?()
    }
}

/// What the new instance received.
public struct TakeoverReceived {
    /// The committed tables (and the old instance's carried rules).
    public var entries: [StateFile.Entry]
    /// The handed-over listeners, to be installed by the tables' activation.
    public var adoption: ListenerAdoption
    /// The control socket's listening descriptor and path, if the old instance had one.
    public var control: (path: String, fd: Int32)?
    /// The relayed TCP connections, each with its descriptors, to be adopted by the engine
    /// (`adoptRelays(into:)`).
    public var connections: [TCPConnectionHandover]
    /// The UDP flows, each with its socket.
    public var flows: [UDPFlowHandover]
    /// The connection, kept open for `taken` and `bye`.
    public var channel: TakeoverChannel
}

extension TakeoverReceived {
    /// Installs the handed-over connections and flows in `engine`, whose tables were restored
    /// (the flows' listeners must be in place); they move no byte before
    /// `engine.tcp.startAdopted()`. Returns how many were adopted and how many refused (their
    /// descriptors closed). Empties `connections` and `flows`: the engine owns them now.
    public mutating func adoptRelays(into engine: ForwardingEngine) -> (connections: Int, flows: Int, refused: Int) {
        var adopted = (connections: 0, flows: 0, refused: 0)
        for c in connections {
            if engine.adopt(c) { adopted.connections += 1 } else { adopted.refused += 1 }
        }
        for f in flows {
            if engine.adopt(f) { adopted.flows += 1 } else { adopted.refused += 1 }
        }
        connections = []
        flows = []
        return adopted
    }
}

/// The new instance's side.
public enum TakeoverClient {
    /// Connects to the running instance at `path` and receives its tables, listeners and
    /// control socket. Waits while a D-Bus client holds the old instance's lock, at most
    /// `timeoutMilliseconds` in all.
    public static func receive(path: String, timeoutMilliseconds: Int, logger: Logger) throws(PestoError) -> TakeoverReceived {
        guard let address = SocketAddress(unixPath: path) else {
            throw PestoError(.system, "The takeover socket path \(path) is not a usable path (at most 107 bytes).")
        }
        // A pestod that has just taken over itself opens its takeover socket a moment after
        // its predecessor exits; until then the path refuses (the old socket file) or is
        // missing. Such a refusal is tried again for up to `retryMilliseconds`, so takeovers
        // back to back (or two reloads) do not fail for being early.
        let retryMilliseconds = min(timeoutMilliseconds, 3000)
        let retryUntil = MonotonicInstant.now.adding(milliseconds: retryMilliseconds)
        var channel: TakeoverChannel
        var toldRetry = false
        while true {
            let fd: Int32
            switch Sys.socket(domain: AF_UNIX, type: Int32(SOCK_SEQPACKET.rawValue), blocking: true) {
            case .success(let s): fd = s
            case .failure(let e): throw PestoError(.system, "Cannot create a socket.", underlyingError: e)
            }
            channel = TakeoverChannel(fd: fd)
            if case .failure(let e) = Sys.setTimeouts(fd, milliseconds: timeoutMilliseconds) {
                throw PestoError(.system, "Cannot set the takeover timeout.", underlyingError: e)
            }
            switch Sys.connect(fd, to: address) {
            case .connected: break
            case .inProgress: throw PestoError(.system, "No running pestod answers at \(path) in time.")
            case .failed(let e)
            where (e == Errno(rawValue: ECONNREFUSED) || e == Errno(rawValue: ENOENT)) && MonotonicInstant.now < retryUntil:
                if !toldRetry {
                    toldRetry = true
                    logger.notice("no pestod listens at \(path) yet (\(e)); trying again for up to \(retryMilliseconds) ms")
                }
                usleep(10_000)
                continue
            case .failed(let e):
                throw PestoError(
                    .system,
                    "Cannot reach a running pestod at \(path) (is one running, with the same runtime directory?); tried for \(retryMilliseconds) ms.",
                    underlyingError: e)
            }
            break
        }
        let fd = channel.fd
        try channel.send(.hello)
        let deadline = MonotonicInstant.now.adding(milliseconds: timeoutMilliseconds)
        var lockOwner: String?
        var text: [UInt8] = []
        var records: [(ListenerRecord, Int32)] = []
        var control: (path: String, fd: Int32)?
        var connections: [TCPConnectionHandover] = []
        var flows: [UDPFlowHandover] = []
        let adoption = ListenerAdoption()
        /// Closes every descriptor received so far (the old instance keeps its own).
        func abandon() {
            for (_, fd) in records { Sys.close(fd) }
            if let control { Sys.close(control.fd) }
            for c in connections { for fd in c.descriptors { Sys.close(fd) } }
            for f in flows { Sys.close(f.socket) }
        }
        var welcomed = false
        while true {
            let message: TakeoverMessage
            let fds: [Int32]
            do throws(PestoError) {
                (message, fds) = try channel.receive()
            } catch {
                abandon()
                if let lockOwner, error.underlyingError == .wouldBlock || MonotonicInstant.now.nanoseconds >= deadline.nanoseconds {
                    throw PestoError(
                        .system,
                        "Gave up after \(timeoutMilliseconds) ms: \(lockOwner) holds the running pestod's lock; it keeps running unchanged."
                    )
                }
                throw error
            }
            switch message {
            case .welcome where !welcomed:
                welcomed = true
            case .refused(let why):
                abandon()
                throw PestoError(.system, "The running pestod refused the takeover: \(why)")
            case .waiting(let owner) where welcomed:
                lockOwner = owner
                logger.notice("takeover waits: \(owner) holds the running pestod's lock")
                let left = Int((Int64(deadline.nanoseconds) - Int64(MonotonicInstant.now.nanoseconds)) / 1_000_000)
                if left <= 0 || Sys.setTimeouts(fd, milliseconds: left).isFailure {
                    abandon()
                    throw PestoError(
                        .system,
                        "Gave up after \(timeoutMilliseconds) ms: \(owner) holds the running pestod's lock; it keeps running unchanged.")
                }
            case .stateChunk(let chunk) where welcomed:
                text += chunk
                // The rest of the handover comes at once: the full timeout again.
                _ = Sys.setTimeouts(fd, milliseconds: timeoutMilliseconds)
            case .listeners(let batch) where welcomed:
                records += zip(batch, fds).map { ($0, $1) }
            case .controlSocket(let path) where welcomed && control == nil:
                control = (path, fds[0])
            case .connections(let batch) where welcomed:
                var next = 0
                for var c in batch {
                    c.descriptors = Array(fds[next..<next + c.descriptorCount])
                    next += c.descriptorCount
                    connections.append(c)
                }
            case .flows(let batch) where welcomed:
                for (var f, fd) in zip(batch, fds) {
                    f.socket = fd
                    flows.append(f)
                }
            case .end(let stateBytes, let listenerCount, let connectionCount, let flowCount) where welcomed:
                guard stateBytes == text.count, listenerCount == records.count, connectionCount == connections.count,
                    flowCount == flows.count
                else {
                    abandon()
                    throw PestoError(
                        .system,
                        "The handover was incomplete (\(text.count) of \(stateBytes) bytes, \(records.count) of \(listenerCount) listeners, \(connections.count) of \(connectionCount) connections, \(flows.count) of \(flowCount) flows)."
                    )
                }
                let entries: [StateFile.Entry]
                do throws(PestoError) {
                    entries = try StateFile.parse(String(decoding: text, as: UTF8.self))
                } catch {
                    abandon()
                    throw PestoError(.system, "The handed-over tables are invalid: \(error.message)")
                }
                var rules: [TableKind: [UInt32: Rule]] = [:]
                for e in entries { rules[e.table, default: [:]][e.id] = e.rule }
                for (record, fd) in records {
                    if let rule = rules[record.table]?[record.ruleID] {
                        adoption.add(fd, table: record.table, rule: rule, port: record.port)
                    } else {
                        Sys.close(fd)
                    }
                }
                return TakeoverReceived(
                    entries: entries, adoption: adoption, control: control, connections: connections, flows: flows, channel: channel)
            default:
                for fd in fds { Sys.close(fd) }
                abandon()
                throw PestoError(.system, "Unexpected handover message \(message.type) from the running pestod.")
            }
        }
    }

    /// Tells the old instance that this one has taken over, and waits for its `bye`; the
    /// caller then closes the channel, which lets the old instance exit.
    public static func confirm(_ channel: TakeoverChannel) throws(PestoError) {
        try channel.send(.taken)
        let (answer, fds) = try channel.receive()
        for fd in fds { Sys.close(fd) }
        guard answer == .bye else { throw PestoError(.system, "The running pestod did not say bye.") }
    }
}

extension Result {
    /// True for `.failure`.
    fileprivate var isFailure: Bool {
        if case .failure = self { return true }
        return false
    }
}
