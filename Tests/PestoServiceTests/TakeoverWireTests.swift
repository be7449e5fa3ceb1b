// SPDX-License-Identifier: GPL-2.0-or-later

// The handover format (doc/takeover.md): every message round-trips, every malformed or
// foreign-version message is refused, and descriptors cross a real socket pair intact.

import Foundation
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("takeover handover format")
struct TakeoverWireTests {
    static let messages: [TakeoverMessage] = [
        .hello, .welcome, .waiting(owner: ":1.42"), .refused("no"), .stateChunk(Array("pestod-state 1\n".utf8)),
        .listeners([ListenerRecord(table: .host, ruleID: 7, port: 80), ListenerRecord(table: .splice, ruleID: .max, port: 65535)]),
        .controlSocket(path: "/run/pesto/control"), .end(stateBytes: 123_456, listeners: 19_000), .taken, .bye,
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
        let cases: [(String, [UInt8], Int, String)] = [
            ("version 2", v2, 0, "version 2; this pestod understands only version \(TakeoverWire.version)"),
            ("bad magic", magic, 0, "PSTK"),
            ("short", Array(hello.prefix(10)), 0, "PSTK"),
            ("long", hello + [0], 0, "Malformed"),
            ("unknown type", type, 0, "Unknown handover message type 99"),
            ("reserved byte", reserved, 0, "Malformed"),
            ("descriptor count", hello, 1, "announced 0 descriptors; 1 arrived"),
            ("listeners without descriptors", listeners, 0, "announced 1 descriptors; 0 arrived"),
            ("bad table", badTable, 1, "table 2"),
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
        let messages = TakeoverWire.handover(stateText: text, listeners: listeners, control: ("/c", 999))
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
        #expect(messages.last!.0 == .end(stateBytes: UInt32(text.count), listeners: 500))
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
