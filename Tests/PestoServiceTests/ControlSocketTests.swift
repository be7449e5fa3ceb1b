// SPDX-License-Identifier: GPL-2.0-or-later

// The upstream control socket, driven by a client written from doc/pesto-v2-wire.md alone
// (it does not use pestod's codec), against a real pestod.

import Foundation
import PestoEngine
import PestoTestSupport
import Testing

@testable import PestoService

/// A minimal pesto v2 client: raw bytes as the wire document describes them.
struct WireClient {
    let fd: Int32

    /// Connects to the control socket at `path`.
    init?(path: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let r = SocketAddress(unixPath: path)?.withSockaddr { connect(fd, $0, $1) } ?? -1
        if r != 0 { close(fd); return nil }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Reads exactly `n` bytes (nil on EOF, error or the 5 s timeout).
    func read(_ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, n - got, 0) }
            if r <= 0 { return nil }
            got += r
        }
        return out
    }

    func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL)) } }

    static func u32(_ b: ArraySlice<UInt8>) -> UInt32 { b.reduce(0) { $0 << 8 | UInt32($1) } }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }

    /// One 56-byte rule: IPv4 listening address (IPv4-mapped), automatic target, ports, TCP.
    static func rule(address: [UInt8] = [127, 0, 0, 1], first: UInt16, last: UInt16? = nil, target: UInt16? = nil,
                     proto: UInt8 = 6, flags: UInt8 = 0, ifname: [UInt8] = [UInt8](repeating: 0, count: 16)) -> [UInt8] {
        var r = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + address  // ::ffff:a.b.c.d
        r += [UInt8](repeating: 0, count: 16)  // target: automatic
        r += ifname
        r += be16(first) + be16(last ?? first) + be16(target ?? first) + [proto, flags]
        return r
    }

    /// Reads hello and dump; returns the tables: pif → (name, caps, raw rules).
    func readHelloAndDump() -> (version: UInt32, tables: [UInt8: (name: String, caps: UInt32, rules: [[UInt8]])])? {
        guard let hello = read(20), Array(hello[0..<8]) == Array("basil:s".utf8) + [0] else { return nil }
        let version = Self.u32(hello[8..<12])
        guard Self.u32(hello[12..<16]) == 128, Self.u32(hello[16..<20]) == 16 else { return nil }
        var tables: [UInt8: (String, UInt32, [[UInt8]])] = [:]
        while let pif = read(1)?.first, pif != 0 {
            guard let info = read(136) else { return nil }
            let name = String(decoding: info[0..<128].prefix { $0 != 0 }, as: UTF8.self)
            let count = Int(Self.u32(info[132..<136]))
            var rules: [[UInt8]] = []
            for _ in 0..<count { guard let r = read(56) else { return nil }; rules.append(r) }
            tables[pif] = (name, Self.u32(info[128..<132]), rules)
        }
        return (version, tables)
    }
}

@Suite("pestod upstream control socket", .serialized)
struct ControlSocketTests {
    @Test("hello, dump, and an upload that adds one rule without touching the others")
    func addOneRule() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let ports = TestSockets.freePorts(4)
        let p = ports.lowerBound
        let server = try #require(EchoServer(port: p + 3))
        defer { server.stop() }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p, [("target-port", .uint16(p + 3))])])
        try f.table("Activate", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1, [("target-port", .uint16(p + 3))])])
        try f.table("Activate", [.uint32(2)])
        let before = try f.snapshot()

        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        let dump = try #require(client.readHelloAndDump())
        #expect(dump.version == 2)
        let host = try #require(dump.tables[1])
        #expect(host.name == "HOST")
        #expect(host.caps & 0x0C == 0x0C, "tcp and udp")
        #expect(host.rules.count == 2)
        // Resend both rules as received, plus one new rule.
        client.send([1] + WireClient.be32(3) + host.rules[0] + host.rules[1] + WireClient.rule(first: p + 2, target: p + 3) + [0])
        shutdown(client.fd, Int32(SHUT_WR))
        var byte: UInt8 = 0
        #expect(recv(client.fd, &byte, 1, 0) == 0, "pestod closes the session after applying")

        let after = try f.snapshot()
        #expect(after.sockets(onPort: p) == before.sockets(onPort: p), "rule 1 keeps its socket")
        #expect(after.sockets(onPort: p + 1) == before.sockets(onPort: p + 1), "rule 2 keeps its socket")
        #expect(after.sockets(onPort: p + 2).count == 1)
        #expect(try f.table("List").first?.arrayValue?.count == 3)
        #expect(TestTraffic.ping(port: p + 2) == nil, "the new rule forwards")
        #expect(f.log.contains("update applied (2 kept, 1 added, 0 removed)"))
    }

    @Test("malformed uploads close the client with a log line and change nothing", arguments: [
        ("bad pif", [UInt8(2)] + WireClient.be32(0) + [0]),
        ("rule count over the limit", [UInt8(1)] + WireClient.be32(70_000)),
        ("unterminated ifname", [UInt8(1)] + WireClient.be32(1) + WireClient.rule(first: 9, ifname: [UInt8](repeating: 0x61, count: 16)) + [0]),
        ("short read", [UInt8(1)] + WireClient.be32(2) + WireClient.rule(first: 9)),
    ])
    func malformed(_ what: String, _ upload: [UInt8]) throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        #expect(client.readHelloAndDump() != nil)
        client.send(upload)
        shutdown(client.fd, Int32(SHUT_WR))
        var byte: UInt8 = 0
        #expect(recv(client.fd, &byte, 1, 0) == 0, "\(what): the session ends")
        #expect(try f.snapshot() == before, "\(what): nothing changed")
        #expect(f.log.contains("control socket:") && f.log.contains("nothing changed"), "\(what): logged")
        // The socket serves the next client.
        let next = try #require(WireClient(path: f.controlPath))
        defer { close(next.fd) }
        #expect(next.readHelloAndDump()?.tables[1]?.rules.count == 1)
    }

    @Test("a stalled client is cut off after the read timeout and the next one is served")
    func stalledClient() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL", "--control-timeout", "300"])
        let stalled = try #require(WireClient(path: f.controlPath))
        defer { close(stalled.fd) }
        #expect(stalled.readHelloAndDump() != nil)
        // Send nothing: pestod ends the session by itself (recv waits at most 5 s).
        var byte: UInt8 = 0
        #expect(recv(stalled.fd, &byte, 1, 0) == 0)
        #expect(f.log.contains("did not finish within 300 ms"))
        let next = try #require(WireClient(path: f.controlPath))
        defer { close(next.fd) }
        #expect(next.readHelloAndDump()?.version == 2)
    }
}
