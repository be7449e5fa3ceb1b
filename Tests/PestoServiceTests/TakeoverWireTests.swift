// SPDX-License-Identifier: GPL-2.0-or-later

// The handover format (doc/takeover.md): every message round-trips, every malformed or
// foreign-version message is refused, and descriptors cross a real socket pair intact.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("takeover handover format", .timeLimit(.minutes(10)))
struct TakeoverWireTests {
    static let messages: [TakeoverMessage] = [
        .hello, .welcome, .waiting(owner: ":1.42"), .refused("no"), .stateChunk(Array("pestod-state 1\n".utf8)),
        .listeners([ListenerRecord(table: .host, ruleID: 7, port: 80), ListenerRecord(table: .splice, ruleID: .max, port: 65535)]),
        .controlSocket(path: "/run/pesto/control"), .end(stateBytes: 123_456, listeners: 19_000, connections: 1000, flows: 7), .taken,
        .bye, .connections(connections), .flows(flows), .shared(stateBytes: 123_456, listeners: 19_000), .ready,
    ]

    /// Connections in every state a record can hold.
    static let connections: [TCPConnectionHandover] = [
        TCPConnectionHandover(
            table: .host, ruleID: 1, connecting: true, up: .init(), down: .init(), target: nil, preamble: Array("PROXY UNKNOWN\r\n".utf8)),
        TCPConnectionHandover(
            table: .splice, ruleID: .max, connecting: false, up: .init(pending: 1 << 20, sourceEnded: true),
            down: .init(pending: 0, sourceEnded: true, finished: true), target: SocketAddress(.loopbackIPv4, port: 8080), preamble: []),
        TCPConnectionHandover(
            table: .host, ruleID: 9, connecting: false, up: .init(), down: .init(pending: 5), target: SocketAddress(.loopbackIPv6, port: 1),
            preamble: [UInt8](repeating: 7, count: ProxyProtocolHeader.maxLength)),
    ]

    /// Flows with and without a local address.
    static let flows: [UDPFlowHandover] = [
        UDPFlowHandover(
            table: .host, ruleID: 3, port: 53, client: SocketAddress(IPAddress("192.0.2.1")!, port: 4000),
            local: PacketInfo(address: IPAddress("127.0.0.5")!, interface: 1), idleMilliseconds: 1234),
        UDPFlowHandover(
            table: .splice, ruleID: 4, port: 5353, client: SocketAddress(IPAddress("2001:db8::1")!, port: 4001),
            local: PacketInfo(address: IPAddress("fe80::1")!, interface: 7), idleMilliseconds: 0),
        UDPFlowHandover(
            table: .host, ruleID: 5, port: 1, client: SocketAddress(.loopbackIPv4, port: 9, mappedIPv6: true), local: PacketInfo(),
            idleMilliseconds: .max),
    ]

    @Test("every message round-trips with its header's version and descriptor count")
    func roundTrip() throws {
        for m in Self.messages {
            let bytes = TakeoverWire.encode(m)
            let frame = try TakeoverWire.decode(bytes, descriptors: TakeoverWire.descriptorCount(m))
            #expect(frame.message == m && frame.version == TakeoverWire.version)
        }
    }

    @Test("a foreign version, a bad magic, a wrong length, a descriptor count that does not match, an unknown type are refused")
    func refusals() {
        let hello = TakeoverWire.encode(.hello)
        var v1 = hello
        v1[5] = 1
        var v2 = hello
        v2[5] = 2
        var magic = hello
        magic[0] = 0
        var type = hello
        type[6] = 99
        var reserved = hello
        reserved[7] = 1
        let listeners = TakeoverWire.encode(.listeners([ListenerRecord(table: .host, ruleID: 1, port: 1)]))
        var badTable = listeners
        badTable[16] = 2
        var cases: [(String, [UInt8], Int, String)] = [
            ("version 1 (before connections and flows)", v1, 0, "version 1; this pestod understands only version \(TakeoverWire.version)"),
            ("version 2 (one phase, the old pestod paused throughout)", v2, 0, "version 2; this pestod understands only version 3"),
            ("bad magic", magic, 0, "PSTK"),
            ("short", Array(hello.prefix(10)), 0, "PSTK"),
            ("long", hello + [0], 0, "Malformed"),
            ("unknown type", type, 0, "Unknown handover message type 99"),
            ("reserved byte", reserved, 0, "Malformed"),
            ("descriptor count", hello, 1, "announced 0 descriptors; 1 arrived"),
            ("listeners without descriptors", listeners, 0, "announced 1 descriptors; 0 arrived"),
            ("bad table", badTable, 1, "table 2"),
        ]
        // Connection and flow records: cut short, impossible states, foreign address lengths.
        let connection = TakeoverWire.encode(.connections([Self.connections[1]]))
        var bothFinished = connection
        bothFinished[16 + 5] |= 4  // up finished too (the record's flags byte)
        var connectingWithBytes = connection
        connectingWithBytes[16 + 5] = 1
        var badFlags = connection
        badFlags[16 + 5] = 0x80
        var badAddressLength = connection
        badAddressLength[16 + 14] = 15
        let flow = TakeoverWire.encode(.flows([Self.flows[0]]))
        var badFamily = flow
        badFamily[16 + 12 + 16] = 5
        cases += [
            ("connection cut short", fixLength(Array(connection.dropLast())), 4, "runs past"),
            ("connection with both directions finished", bothFinished, 4, "impossible connection state"),
            ("connecting with bytes in a pipe", connectingWithBytes, 4, "impossible connection state"),
            ("unknown connection flags", badFlags, 4, "connection flags 128"),
            ("address of 15 bytes", badAddressLength, 4, "address"),
            ("connection with too few descriptors", connection, 2, "announced 4 descriptors; 2 arrived"),
            ("flow with a local address of family 5", badFamily, 1, "family 5"),
            ("flow cut short", fixLength(Array(flow.dropLast(3))), 1, "runs past"),
        ]
        for (name, bytes, fds, expected) in cases {
            do {
                _ = try TakeoverWire.decode(bytes, descriptors: fds)
                Issue.record("\(name) was accepted")
            } catch {
                #expect(error.message.contains(expected), "\(name): \(error.message)")
            }
        }
    }

    @Test("a handover splits the tables into chunks and the listeners into batches of at most 240 descriptors")
    func batching() {
        let text = [UInt8](repeating: 0x41, count: TakeoverWire.maxChunk * 2 + 5)
        let listeners = (0..<500).map { (ListenerRecord(table: .host, ruleID: UInt32($0), port: UInt16($0)), Int32($0)) }
        let messages = TakeoverWire.shared(stateText: text, listeners: listeners, control: ("/c", 999))
        #expect(messages.count == 3 + 3 + 1 + 1)
        var chunks: [UInt8] = []
        var records: [ListenerRecord] = []
        var fds: [Int32] = []
        for (m, d) in messages {
            #expect(TakeoverWire.encode(m).count <= TakeoverWire.maxMessage && d.count <= 240)
            switch m {
            case .stateChunk(let c): chunks += c
            case .listeners(let r):
                records += r
                fds += d
            default: break
            }
        }
        #expect(chunks == text && records == listeners.map(\.0) && fds == listeners.map(\.1))
        #expect(messages.last!.0 == .shared(stateBytes: UInt32(text.count), listeners: 500))
    }

    /// `bytes` with its header's payload length set to what follows the header.
    func fixLength(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        let n = UInt32(b.count - 16)
        b[8] = UInt8(n >> 24)
        b[9] = UInt8((n >> 16) & 0xFF)
        b[10] = UInt8((n >> 8) & 0xFF)
        b[11] = UInt8(n & 0xFF)
        return b
    }

    @Test("connections and flows go in batches within 240 descriptors and one message's bytes, their descriptors in record order")
    func relayBatching() throws {
        // 300 connections with both pipes (6 descriptors each) and a long PROXY header, 600 flows.
        var next: Int32 = 0
        let connections = (0..<300).map { i -> TCPConnectionHandover in
            var c = Self.connections[2]
            c.ruleID = UInt32(i)
            c.up.pending = 1
            c.descriptors = (0..<6).map { _ in
                next += 1
                return next
            }
            return c
        }
        let flows = (0..<600).map { i -> UDPFlowHandover in
            var f = Self.flows[1]
            f.ruleID = UInt32(i)
            next += 1
            f.socket = next
            return f
        }
        let messages = TakeoverWire.relays(connections: connections, flows: flows, stateBytes: 0, listeners: 0)
        var gotConnections: [TCPConnectionHandover] = []
        var gotFlows: [UDPFlowHandover] = []
        var fds: [Int32] = []
        for (m, d) in messages {
            let bytes = TakeoverWire.encode(m)
            #expect(bytes.count <= TakeoverWire.maxMessage && d.count <= 240)
            let frame = try TakeoverWire.decode(bytes, descriptors: d.count)
            fds += d
            switch frame.message {
            case .connections(let r): gotConnections += r
            case .flows(let r): gotFlows += r
            default: break
            }
        }
        #expect(messages.count >= 300 * 6 / 240 + 600 / 240 + 1)
        #expect(gotConnections.map(\.ruleID) == connections.map(\.ruleID))
        #expect(gotConnections.first.map { $0.preamble == Self.connections[2].preamble && $0.up.pending == 1 } == true)
        #expect(gotFlows.map(\.ruleID) == flows.map(\.ruleID) && gotFlows.allSatisfy { $0.socket == -1 })
        #expect(fds == connections.flatMap(\.descriptors) + flows.map(\.socket))
        #expect(messages.last!.0 == .end(stateBytes: 0, listeners: 0, connections: 300, flows: 600))
    }

    @Test("descriptors cross a socket pair with their messages: the receiver gets the same sockets (same inodes)")
    func descriptorsCross() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let a = TakeoverChannel(fd: pair[0])
        let b = TakeoverChannel(fd: pair[1])
        let ports = TestSockets.freePorts(3)
        let sockets = ports.map { TestSockets.bound(port: $0)! }
        defer { for fd in sockets { close(fd) } }
        let records = ports.map { ListenerRecord(table: .host, ruleID: 1, port: $0) }
        try a.send(.listeners(records), descriptors: sockets)
        let (message, received) = try b.receive()
        defer { for fd in received { close(fd) } }
        #expect(message == .listeners(records))
        #expect(received.map(TestSockets.inode) == sockets.map(TestSockets.inode))
        #expect(Set(received).isDisjoint(with: sockets))
        a.finish()
        #expect(throws: PestoError.self) { _ = try b.receive() }
    }
}
