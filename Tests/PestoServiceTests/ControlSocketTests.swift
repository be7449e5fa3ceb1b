// SPDX-License-Identifier: GPL-2.0-or-later

// The upstream control socket, driven by a client written from doc/pesto-v2-wire.md alone
// (it does not use pestod's codec), against a real pestod.

import Foundation
import PestoEngine
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

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
