// SPDX-License-Identifier: GPL-2.0-or-later

// Takeover: a new pestod (`--replace`) takes the tables, the listening sockets, the bus
// name and the control socket over from the running one, without closing anything. This
// file is the new instance's side; TakeoverSource.swift is the running one's.
//
// Theory of operation (doc/takeover.md has the format and the failure cases)
// ----------------------------------------------------------------------------
// The new instance (`TakeoverClient`) connects to the running one's takeover socket and
// says hello with its format version; either side refuses a version it does not speak
// before anything else is sent. While a D-Bus client holds the lock it is told `waiting`,
// and gives up after its timeout. It then receives, in a first phase that the old instance
// sends while it serves on, the tables (the state file's text), one descriptor per
// listening socket with its (table, rule ID, port) and the control socket's descriptor
// (`receive`); it restores the tables installing those descriptors (ListenerAdoption.swift)
// and says `ready`. Only then does the old instance pause and send the relayed TCP
// connections and UDP flows with their descriptors and state (RelayHandover.swift,
// `receiveRelays`); the new instance installs them, takes the bus name (the old one asked
// for it with ALLOW_REPLACEMENT, the new one asks with REPLACE_EXISTING), says `taken`, and
// starts moving their bytes once the old one has said `bye` (`confirm`). A new instance that
// gets no `bye` exits without serving; the old one stays in charge.

import CPestoSys
import Logging
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

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
    /// The connection, kept open for `ready`, the relays, `taken` and `bye`.
    public var channel: TakeoverChannel
    /// The totals of the first phase (`shared`), which `end` repeats.
    public var shared: (stateBytes: UInt32, listeners: UInt32)
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
    /// control socket (the first phase, which the old instance sends while it serves on;
    /// `receiveRelays` then brings the second). Waits while a D-Bus client holds the old instance's lock, at most
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
        let adoption = ListenerAdoption()
        /// Closes every descriptor received so far (the old instance keeps its own).
        func abandon() {
            for (_, fd) in records { Sys.close(fd) }
            if let control { Sys.close(control.fd) }
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
            case .shared(let stateBytes, let listenerCount) where welcomed:
                guard stateBytes == text.count, listenerCount == records.count else {
                    abandon()
                    throw PestoError(
                        .system,
                        "The handover was incomplete (\(text.count) of \(stateBytes) bytes, \(records.count) of \(listenerCount) listeners)."
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
                    entries: entries, adoption: adoption, control: control, connections: [], flows: [], channel: channel,
                    shared: (stateBytes, listenerCount))
            default:
                for fd in fds { Sys.close(fd) }
                abandon()
                throw PestoError(.system, "Unexpected handover message \(message.type) from the running pestod.")
            }
        }
    }

    /// Tells the old instance that this one has installed the tables on the handed-over
    /// listeners (`ready`), and receives the relayed connections and flows into `received`;
    /// the old instance pauses its relays from now until `confirm`. At most
    /// `timeoutMilliseconds` for each message.
    public static func receiveRelays(_ received: inout TakeoverReceived, timeoutMilliseconds: Int) throws(PestoError) {
        let channel = received.channel
        if case .failure(let e) = Sys.setTimeouts(channel.fd, milliseconds: timeoutMilliseconds) {
            throw PestoError(.system, "Cannot set the takeover timeout.", underlyingError: e)
        }
        try channel.send(.ready)
        var connections: [TCPConnectionHandover] = []
        var flows: [UDPFlowHandover] = []
        /// Closes every relay descriptor received so far (the old instance keeps its own).
        func abandon() {
            for c in connections { for fd in c.descriptors { Sys.close(fd) } }
            for f in flows { Sys.close(f.socket) }
        }
        while true {
            let (message, fds) = try channel.receive(orElse: abandon)
            switch message {
            case .connections(let batch):
                var next = 0
                for var c in batch {
                    c.descriptors = Array(fds[next..<next + c.descriptorCount])
                    next += c.descriptorCount
                    connections.append(c)
                }
            case .flows(let batch):
                for (var f, fd) in zip(batch, fds) {
                    f.socket = fd
                    flows.append(f)
                }
            case .end(let stateBytes, let listenerCount, let connectionCount, let flowCount):
                guard stateBytes == received.shared.stateBytes, listenerCount == received.shared.listeners,
                    connectionCount == connections.count, flowCount == flows.count
                else {
                    abandon()
                    throw PestoError(
                        .system,
                        "The handover was incomplete (\(connections.count) of \(connectionCount) connections, \(flows.count) of \(flowCount) flows; \(stateBytes) bytes of tables and \(listenerCount) listeners announced, \(received.shared.stateBytes) and \(received.shared.listeners) shared)."
                    )
                }
                received.connections = connections
                received.flows = flows
                return
            case .refused(let why):
                abandon()
                throw PestoError(.system, "The running pestod refused the takeover: \(why)")
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
