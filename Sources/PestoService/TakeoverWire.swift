// SPDX-License-Identifier: GPL-2.0-or-later

// TakeoverWire: the versioned handover format between a running pestod and the one taking
// over from it (`pestod --replace`), as doc/takeover.md specifies. D-Bus-free and I/O-free:
// messages are encoded to and decoded from bytes here; `TakeoverChannel` moves them over a
// SOCK_SEQPACKET UNIX socket with their descriptors in SCM_RIGHTS.
//
// Every message is one datagram: a 16-byte header (magic "PSTK", format version, type, a
// reserved zero byte, payload length, descriptor count, all big-endian) and the payload.
// A message never exceeds `maxMessage` bytes and `Sys.maxDescriptorsPerMessage`
// descriptors; the tables (in the state file's text, StateFile.swift) are sent in chunks
// and the listeners in batches of records (table, rule ID, port), one descriptor each;
// relayed TCP connections (two sockets and a pipe per direction holding bytes in flight) and
// UDP flows (one socket) follow in batches of their own records (RelayHandover.swift).

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// One message of the handover.
public enum TakeoverMessage: Equatable, Sendable {
    /// New → old: the first message; its header carries the new instance's format version.
    case hello
    /// Old → new: the answer to hello; its header carries the old instance's version.
    case welcome
    /// Old → new: the handover waits, because `owner` holds the lock of the tables.
    case waiting(owner: String)
    /// Old → new: the handover is refused (another takeover is under way, a version the old
    /// instance does not understand); the text says why.
    case refused(String)
    /// Old → new: a piece of the committed tables in the state file's text.
    case stateChunk([UInt8])
    /// Old → new: listeners, one descriptor each, in this order.
    case listeners([ListenerRecord])
    /// Old → new: the control socket's listening descriptor (one descriptor) and its path.
    case controlSocket(path: String)
    /// Old → new: relayed TCP connections, their descriptors in this order (each record's
    /// `descriptors` is empty on the wire).
    case connections([TCPConnectionHandover])
    /// Old → new: UDP flows, one descriptor (the flow's socket) each, in this order.
    case flows([UDPFlowHandover])
    /// Old → new: the tables, listeners and control socket are sent (the first phase, which
    /// the old instance sends while it serves on); the totals let the new instance check.
    case shared(stateBytes: UInt32, listeners: UInt32)
    /// New → old: the new instance has installed the tables on the handed-over listeners and
    /// waits for the relays; only now does the old instance pause.
    case ready
    /// Old → new: everything is sent; the totals let the new instance check it got it all.
    case end(stateBytes: UInt32, listeners: UInt32, connections: UInt32 = 0, flows: UInt32 = 0)
    /// New → old: the new instance has installed everything and owns the bus name.
    case taken
    /// Old → new: the old instance stops now; the new one may start serving.
    case bye

    /// The one-byte type code on the wire.
    var type: UInt8 {
        switch self {
        case .hello: 1
        case .welcome: 2
        case .waiting: 3
        case .refused: 4
        case .stateChunk: 5
        case .listeners: 6
        case .controlSocket: 7
        case .end: 8
        case .taken: 9
        case .bye: 10
        case .connections: 11
        case .flows: 12
        case .shared: 13
        case .ready: 14
        }
    }
}

/// One handed-over listener: which table, rule and port its descriptor belongs to.
public struct ListenerRecord: Equatable, Hashable, Sendable {
    public var table: TableKind
    public var ruleID: UInt32
    public var port: UInt16

    public init(table: TableKind, ruleID: UInt32, port: UInt16) {
        self.table = table
        self.ruleID = ruleID
        self.port = port
    }

    /// Bytes per record: table (1), rule ID (4), port (2).
    static let size = 7
}

/// The handover format's codec.
public enum TakeoverWire {
    /// "PSTK".
    static let magic: UInt32 = 0x5053_544B
    /// The format version this pestod speaks. A change to any message's layout or meaning
    /// gets a new version; an instance refuses any version but its own.
    /// Version 1 had no connections and flows; version 2 added them (messages 11 and 12, and
    /// their counts in `end`); version 3 hands over in two phases (messages 13 and 14: the
    /// tables and listeners while the old instance serves on, the relays only once the new
    /// one is ready).
    public static let version: UInt16 = 3
    /// Header bytes.
    static let headerSize = 16
    /// The largest message, header included.
    public static let maxMessage = 32 * 1024
    /// The largest state chunk.
    public static let maxChunk = maxMessage - headerSize
    /// The most listener records in one message (one descriptor each).
    public static let maxListenersPerMessage = Sys.maxDescriptorsPerMessage

    /// A decoded message with what its header said.
    public struct Frame: Equatable, Sendable {
        public var version: UInt16
        public var message: TakeoverMessage
        /// How many descriptors the header announced.
        public var descriptors: Int
    }

    /// How many descriptors `message` carries.
    public static func descriptorCount(_ message: TakeoverMessage) -> Int {
        switch message {
        case .listeners(let records): records.count
        case .controlSocket: 1
        case .connections(let records): records.reduce(0) { $0 + $1.descriptorCount }
        case .flows(let records): records.count
        default: 0
        }
    }

    /// Encodes `message` with the header of `version`.
    public static func encode(_ message: TakeoverMessage, version: UInt16 = version) -> [UInt8] {
        var payload: [UInt8] = []
        switch message {
        case .hello, .welcome, .taken, .bye, .ready: break
        case .waiting(let owner): payload = Array(owner.utf8.prefix(1024))
        case .refused(let why): payload = Array(why.utf8.prefix(1024))
        case .stateChunk(let bytes):
            precondition(bytes.count <= maxChunk, "programmer error: state chunk too large")
            payload = bytes
        case .listeners(let records):
            precondition(records.count <= maxListenersPerMessage, "programmer error: too many listeners in one message")
            payload.reserveCapacity(records.count * ListenerRecord.size)
            for r in records {
                payload.append(r.table == .host ? 0 : 1)
                put32(&payload, r.ruleID)
                put16(&payload, r.port)
            }
        case .controlSocket(let path): payload = Array(path.utf8.prefix(1024))
        case .shared(let stateBytes, let listeners):
            put32(&payload, stateBytes)
            put32(&payload, listeners)
        case .end(let stateBytes, let listeners, let connections, let flows):
            put32(&payload, stateBytes)
            put32(&payload, listeners)
            put32(&payload, connections)
            put32(&payload, flows)
        case .connections(let records):
            precondition(descriptorCount(message) <= Sys.maxDescriptorsPerMessage, "programmer error: too many descriptors in one message")
            for r in records { RelayRecords.append(r, to: &payload) }
            precondition(payload.count <= maxChunk, "programmer error: connection records too large")
        case .flows(let records):
            precondition(records.count <= Sys.maxDescriptorsPerMessage, "programmer error: too many flows in one message")
            for r in records { RelayRecords.append(r, to: &payload) }
            precondition(payload.count <= maxChunk, "programmer error: flow records too large")
        }
        var out: [UInt8] = []
        out.reserveCapacity(headerSize + payload.count)
        put32(&out, magic)
        put16(&out, version)
        out.append(message.type)
        out.append(0)
        put32(&out, UInt32(payload.count))
        put32(&out, UInt32(descriptorCount(message)))
        return out + payload
    }

    /// Decodes one datagram. Throws on a bad magic, a version other than `accepting` (the
    /// header is still read, so the error names it), an unknown type, a length that does not
    /// match, or a malformed payload. `descriptors` is how many arrived with the datagram: it
    /// must match the header.
    public static func decode(_ bytes: [UInt8], descriptors: Int, accepting: UInt16 = version) throws(PestoError) -> Frame {
        guard bytes.count >= headerSize, get32(bytes, 0) == magic else {
            throw PestoError(.system, "The peer does not speak the pestod handover format (no PSTK header).")
        }
        let v = get16(bytes, 4)
        guard v == accepting else {
            throw PestoError(.system, "The peer speaks handover format version \(v); this pestod understands only version \(accepting).")
        }
        let type = bytes[6]
        let length = Int(get32(bytes, 8))
        let announced = Int(get32(bytes, 12))
        guard bytes[7] == 0, length == bytes.count - headerSize else {
            throw PestoError(.system, "Malformed handover message (type \(type), length \(length) of \(bytes.count - headerSize)).")
        }
        guard announced == descriptors else {
            throw PestoError(.system, "Handover message type \(type) announced \(announced) descriptors; \(descriptors) arrived.")
        }
        let payload = Array(bytes[headerSize...])
        let message: TakeoverMessage
        func text() throws(PestoError) -> String {
            guard let s = String(validating: payload, as: UTF8.self) else {
                throw PestoError(.system, "Malformed handover message (type \(type): not UTF-8).")
            }
            return s
        }
        func empty(_ m: TakeoverMessage) throws(PestoError) -> TakeoverMessage {
            guard payload.isEmpty else { throw PestoError(.system, "Malformed handover message (type \(type) has a payload).") }
            return m
        }
        switch type {
        case 1: message = try empty(.hello)
        case 2: message = try empty(.welcome)
        case 3: message = .waiting(owner: try text())
        case 4: message = .refused(try text())
        case 5: message = .stateChunk(payload)
        case 6:
            guard payload.count % ListenerRecord.size == 0, payload.count / ListenerRecord.size <= maxListenersPerMessage else {
                throw PestoError(.system, "Malformed handover message (listener records of \(payload.count) bytes).")
            }
            var records: [ListenerRecord] = []
            records.reserveCapacity(payload.count / ListenerRecord.size)
            var i = 0
            while i < payload.count {
                guard payload[i] <= 1 else { throw PestoError(.system, "Malformed handover message (table \(payload[i])).") }
                records.append(
                    ListenerRecord(table: payload[i] == 0 ? .host : .splice, ruleID: get32(payload, i + 1), port: get16(payload, i + 5)))
                i += ListenerRecord.size
            }
            message = .listeners(records)
        case 7: message = .controlSocket(path: try text())
        case 8:
            guard payload.count == 16 else { throw PestoError(.system, "Malformed handover message (end of \(payload.count) bytes).") }
            message = .end(
                stateBytes: get32(payload, 0), listeners: get32(payload, 4), connections: get32(payload, 8), flows: get32(payload, 12))
        case 9: message = try empty(.taken)
        case 10: message = try empty(.bye)
        case 11:
            var reader = RelayRecords.Reader(payload)
            var records: [TCPConnectionHandover] = []
            while !reader.atEnd { records.append(try reader.connection()) }
            message = .connections(records)
        case 12:
            var reader = RelayRecords.Reader(payload)
            var records: [UDPFlowHandover] = []
            while !reader.atEnd { records.append(try reader.flow()) }
            message = .flows(records)
        case 13:
            guard payload.count == 8 else { throw PestoError(.system, "Malformed handover message (shared of \(payload.count) bytes).") }
            message = .shared(stateBytes: get32(payload, 0), listeners: get32(payload, 4))
        case 14: message = try empty(.ready)
        default: throw PestoError(.system, "Unknown handover message type \(type).")
        }
        guard descriptorCount(message) == descriptors else {
            throw PestoError(
                .system, "Handover message type \(type) needs \(descriptorCount(message)) descriptors; \(descriptors) arrived.")
        }
        return Frame(version: v, message: message, descriptors: descriptors)
    }

    /// The first phase: the messages that carry `stateText` and `listeners` (with their
    /// descriptors, in the same order), then the control socket and `shared`: what the old
    /// instance sends while it serves on.
    public static func shared(
        stateText: [UInt8], listeners: [(ListenerRecord, Int32)], control: (path: String, fd: Int32)?
    ) -> [(TakeoverMessage, [Int32])] {
        var out: [(TakeoverMessage, [Int32])] = []
        var offset = 0
        while offset < stateText.count {
            let end = min(offset + maxChunk, stateText.count)
            out.append((.stateChunk(Array(stateText[offset..<end])), []))
            offset = end
        }
        var start = 0
        while start < listeners.count {
            let batch = listeners[start..<min(start + maxListenersPerMessage, listeners.count)]
            out.append((.listeners(batch.map(\.0)), batch.map(\.1)))
            start += batch.count
        }
        if let control { out.append((.controlSocket(path: control.path), [control.fd])) }
        out.append((.shared(stateBytes: UInt32(stateText.count), listeners: UInt32(listeners.count)), []))
        return out
    }

    /// The second phase: the relayed connections and flows with their descriptors, then `end`
    /// with every total (`stateBytes` and `listeners` those of the first phase): what the old
    /// instance sends once the new one is ready, its relays paused.
    public static func relays(
        connections: [TCPConnectionHandover], flows: [UDPFlowHandover], stateBytes: Int, listeners: Int
    ) -> [(TakeoverMessage, [Int32])] {
        var out: [(TakeoverMessage, [Int32])] = []
        // Connections and flows: as many records as fit in one message's payload and
        // descriptors (a kernel limit: SCM_MAX_FD, 253 per message).
        var batch: [TCPConnectionHandover] = []
        var batchFDs: [Int32] = []
        var batchBytes = 0
        for c in connections {
            precondition(c.descriptors.count == c.descriptorCount, "programmer error: descriptors do not match the record")
            let size = RelayRecords.size(c)
            if batchFDs.count + c.descriptorCount > Sys.maxDescriptorsPerMessage || batchBytes + size > maxChunk {
                out.append((.connections(batch), batchFDs))
                (batch, batchFDs, batchBytes) = ([], [], 0)
            }
            var record = c
            record.descriptors = []
            batch.append(record)
            batchFDs += c.descriptors
            batchBytes += size
        }
        if !batch.isEmpty { out.append((.connections(batch), batchFDs)) }
        var flowBatch: [UDPFlowHandover] = []
        var flowFDs: [Int32] = []
        var flowBytes = 0
        for f in flows {
            let size = RelayRecords.size(f)
            if flowBatch.count == Sys.maxDescriptorsPerMessage || flowBytes + size > maxChunk {
                out.append((.flows(flowBatch), flowFDs))
                (flowBatch, flowFDs, flowBytes) = ([], [], 0)
            }
            var record = f
            record.socket = -1
            flowBatch.append(record)
            flowFDs.append(f.socket)
            flowBytes += size
        }
        if !flowBatch.isEmpty { out.append((.flows(flowBatch), flowFDs)) }
        out.append(
            (
                .end(
                    stateBytes: UInt32(stateBytes), listeners: UInt32(listeners), connections: UInt32(connections.count),
                    flows: UInt32(flows.count)), []
            ))
        return out
    }

    private static func put16(_ out: inout [UInt8], _ v: UInt16) {
        out.append(UInt8(v >> 8))
        out.append(UInt8(v & 0xFF))
    }

    private static func put32(_ out: inout [UInt8], _ v: UInt32) {
        for shift in [24, 16, 8, 0] { out.append(UInt8((v >> UInt32(shift)) & 0xFF)) }
    }

    private static func get16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) << 8 | UInt16(b[i + 1]) }

    private static func get32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }
}

/// A blocking SOCK_SEQPACKET connection carrying `TakeoverMessage`s; every read and write
/// gives up after the timeout set on the socket.
public final class TakeoverChannel {
    /// The connected socket.
    public let fd: Int32
    /// The version this side expects in every header after the first exchange.
    public var peerVersion = TakeoverWire.version

    /// Takes ownership of the connected `fd`.
    public init(fd: Int32) { self.fd = fd }

    deinit { Sys.close(fd) }

    /// Whether the peer has closed the connection (or it failed), without waiting or
    /// consuming a message.
    public var peerHasLeft: Bool {
        var byte: UInt8 = 0
        switch Sys.recv(fd, &byte, 1, flags: Int32(MSG_PEEK | MSG_DONTWAIT)) {
        case .success(let n): return n == 0
        case .failure(let e): return e != .wouldBlock
        }
    }

    /// Shuts the connection down: the peer reads end of file (the descriptor is closed later).
    public func finish() {
        _ = Sys.shutdown(fd, Int32(SHUT_RDWR))  // ENOTCONN: the peer is gone already
    }

    /// Sends one message with its descriptors (which stay open here).
    public func send(_ message: TakeoverMessage, descriptors: [Int32] = [], version: UInt16 = TakeoverWire.version) throws(PestoError) {
        let bytes = TakeoverWire.encode(message, version: version)
        let r = bytes.withUnsafeBytes { Sys.sendDescriptors(fd, $0, descriptors) }
        switch r {
        case .success(let n) where n == bytes.count: return
        case .success: throw PestoError(.system, "The handover message was cut short.")
        case .failure(let e): throw PestoError(.system, "Cannot send to the other pestod.", underlyingError: e)
        }
    }

    /// Receives one message; its descriptors are returned to the caller, who owns them.
    /// End of file, a timeout or a malformed message throw (leaving no descriptor open).
    public func receive(accepting version: UInt16 = TakeoverWire.version) throws(PestoError) -> (TakeoverMessage, [Int32]) {
        var buffer = [UInt8](repeating: 0, count: TakeoverWire.maxMessage)
        let r = buffer.withUnsafeMutableBytes { Sys.receiveDescriptors(fd, into: $0) }
        switch r {
        case .failure(let e) where e == .wouldBlock:
            throw PestoError(.system, "The other pestod did not answer in time.", underlyingError: e)
        case .failure(let e):
            throw PestoError(.system, "Cannot receive from the other pestod.", underlyingError: e)
        case .success(let (0, fds)):
            for fd in fds { Sys.close(fd) }
            throw PestoError(.system, "The other pestod closed the handover connection.")
        case .success(let (n, fds)):
            do {
                let frame = try TakeoverWire.decode(Array(buffer[..<n]), descriptors: fds.count, accepting: version)
                return (frame.message, fds)
            } catch {
                for fd in fds { Sys.close(fd) }
                throw error
            }
        }
    }

    /// Receives one message as `receive()` does; when that throws, `abandon` runs first (it
    /// closes what the caller received so far), then the error goes on.
    public func receive(orElse abandon: () -> Void) throws(PestoError) -> (TakeoverMessage, [Int32]) {
        do throws(PestoError) {
            return try receive()
        } catch {
            abandon()
            throw error
        }
    }
}
