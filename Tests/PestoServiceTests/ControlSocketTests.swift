// SPDX-License-Identifier: GPL-2.0-or-later

// The upstream control socket, driven by a client written from doc/pesto-v2-wire.md alone
// (it does not use pestod's codec), against a real pestod.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod upstream control socket", .serialized, .timeLimit(.minutes(10)))
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

    @Test(
        "malformed uploads close the client with a log line and change nothing",
        arguments: [
            ("bad pif", [UInt8(2)] + WireClient.be32(0) + [0]),
            ("rule count over the limit", [UInt8(1)] + WireClient.be32(70_000)),
            (
                "unterminated ifname",
                [UInt8(1)] + WireClient.be32(1) + WireClient.rule(first: 9, ifname: [UInt8](repeating: 0x61, count: 16)) + [0]
            ),
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

    // MARK: Sessions as podman and rootlesskit run them

    /// Waits (5 s at most) until pestod's log contains `text`: the log line is the readiness
    /// signal of a state with no D-Bus signal of its own (an upload waiting for the lock).
    static func waitForLog(_ f: PestodFixture, _ text: String) -> Bool {
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if f.log.contains(text) { return true }
            usleep(10_000)
        }
        return false
    }

    /// The HOST rules as `List` gives them: id → (address, first port, owner, active, bound, failed).
    static func rules(_ f: PestodFixture) throws -> [UInt32: (
        address: String, port: UInt16, owner: String, active: Bool, bound: UInt32, failed: UInt32
    )] {
        var out: [UInt32: (String, UInt16, String, Bool, UInt32, UInt32)] = [:]
        for entry in try f.table("List").first?.arrayValue ?? [] {
            guard let e = entry.structValue, let id = e[0].uint32Value, let d = e[1].vardictValue, let s = e[2].structValue else {
                continue
            }
            let fields = Dictionary(d, uniquingKeysWith: { a, _ in a })
            out[id] = (
                fields["address"]?.stringValue ?? "", fields["first-port"]?.uint16Value ?? 0, fields["owner"]?.stringValue ?? "",
                s[0].boolValue ?? false, s[1].uint32Value ?? 0, s[2].uint32Value ?? 0
            )
        }
        return out
    }

    @Test("podman: pesto --add -t IP/PORT:CIP/CPORT -t [::]/PORT:…, then --delete with the same specs; rules tagged pesto-control")
    func podmanSequence() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let ports = TestSockets.freePorts(2)
        let (p, t) = (ports.lowerBound, ports.upperBound)
        let v4 = try #require(EchoServer(port: t))
        defer { v4.stop() }
        let v6 = try #require(EchoServer(address: .loopbackIPv6, port: t))
        defer { v6.stop() }
        let specs = [
            WireClient.specRule(listen: "127.0.0.1", port: p, target: "127.0.0.1", targetPort: t),
            WireClient.specRule(listen: "::", port: p, target: "::1", targetPort: t),
        ]
        #expect(WireClient.pesto(path: f.controlPath, rules: specs) == .uploaded)
        let added = try Self.rules(f)
        #expect(added.count == 2)
        #expect(added.values.allSatisfy { $0.owner == controlOwnerTag && $0.active && $0.bound == 1 && $0.failed == 0 })
        #expect(TestTraffic.ping(port: p) == nil, "IPv4 forwards")
        #expect(TestTraffic.ping(.loopbackIPv6, port: p) == nil, "IPv6 forwards")
        // The dump gives back exactly the rules pesto sent.
        let client = try #require(WireClient(path: f.controlPath))
        let dumped = client.readHelloAndDump()?.tables[1]?.rules ?? []
        close(client.fd)
        #expect(dumped == specs, "byte for byte")

        #expect(WireClient.pesto(path: f.controlPath, delete: true, rules: specs) == .uploaded)
        #expect(try Self.rules(f).isEmpty)
        #expect(TestSockets.isFree(p))
    }

    @Test(
        "rootlesskit: -A --tcp-ports=IP/PORT:CHILDPORT and -D the same; a restart (delete, add) and an add repeated after a missed delete")
    func rootlesskitSequence() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let ports = TestSockets.freePorts(2)
        let (p, child) = (ports.lowerBound, ports.upperBound)
        let server = try #require(EchoServer(port: child))
        defer { server.stop() }
        let spec = WireClient.specRule(listen: "127.0.0.1", port: p, targetPort: child)

        #expect(WireClient.pesto(path: f.controlPath, rules: [spec]) == .uploaded)
        let first = try #require(try Self.rules(f).first)
        #expect(first.value.owner == controlOwnerTag && first.value.active)
        #expect(TestTraffic.ping(port: p) == nil)

        // Restart: delete, then add again; a new rule, forwarding again.
        #expect(WireClient.pesto(path: f.controlPath, delete: true, rules: [spec]) == .uploaded)
        #expect(try Self.rules(f).isEmpty)
        #expect(WireClient.pesto(path: f.controlPath, rules: [spec]) == .uploaded)
        let again = try Self.rules(f)
        #expect(again.count == 1 && again.first?.value.owner == controlOwnerTag)
        #expect(TestTraffic.ping(port: p) == nil)

        // The delete was missed and the add comes again: pesto sees the rule in the dump and
        // gives up (a read-only session, logged at debug level only); the rule stays, forwarding.
        let logBefore = f.log.count
        #expect(WireClient.pesto(path: f.controlPath, rules: [spec]) == .gaveUp("conflict"))
        let next = try #require(WireClient(path: f.controlPath))
        _ = next.readHelloAndDump()  // the next session is served: the read-only one has ended
        close(next.fd)
        #expect(try Self.rules(f).map(\.key) == again.map(\.key))
        #expect(TestTraffic.ping(port: p) == nil)
        let lines = String(f.log.dropFirst(logBefore)).split(separator: "\n").filter { $0.contains("control socket") }
        #expect(!lines.isEmpty && lines.allSatisfy { $0.contains(" debug ") }, "read-only sessions log nothing above debug: \(lines)")
    }

    @Test(
        "an upload whose port is busy is applied: the rule is active with its failure counted, and forwards as soon as the port is freed, with no further upload"
    )
    func busyPortStartsForwardingWhenFreed() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL", "--retry-interval", "50"])
        let signals = try SignalCollector(address: f.address)
        let ports = TestSockets.freePorts(2)
        let (p, t) = (ports.lowerBound, ports.upperBound)
        let server = try #require(EchoServer(port: t))
        defer { server.stop() }
        let holder = try #require(TestSockets.bound(port: p))

        #expect(
            WireClient.pesto(path: f.controlPath, rules: [WireClient.specRule(listen: "127.0.0.1", port: p, targetPort: t)]) == .uploaded)
        let rule = try #require(try Self.rules(f).first)
        #expect(rule.value.active && rule.value.bound == 0 && rule.value.failed == 1 && rule.value.owner == controlOwnerTag)
        #expect(try f.table("Status", [.uint32(rule.key)]) == [.bool(true), .uint32(0), .uint32(1), .string("EADDRINUSE"), .uint32(0)])
        #expect(f.log.contains("1 sockets did not bind yet and are retried"))

        close(holder)
        signals.wait(
            for: "BindFailuresChanged 0 after the retry",
            SignalCollector.signal("BindFailuresChanged", path: PestodFixture.hostPath, [.uint32(rule.key), .uint32(0), .string("")]))
        #expect(TestTraffic.ping(port: p) == nil, "forwarding with no further call")
    }

    @Test("while a D-Bus client holds the lock an upload waits, connected, and is applied once the lock is released")
    func uploadWaitsForTheLock() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL", "--control-timeout", "20000"])
        let p = TestSockets.freePorts(1).lowerBound
        try f.manager("Lock")
        let path = f.controlPath
        let outcome = Mutex<WireClient.PestoOutcome?>(nil)
        detachThread {
            let o = WireClient.pesto(path: path, rules: [WireClient.specRule(listen: "127.0.0.1", port: p)], waitSeconds: 30)
            outcome.withLock { $0 = o }
        }
        #expect(Self.waitForLog(f, "upload waits for the lock held by"))
        #expect(try Self.rules(f).isEmpty, "nothing applied while locked")
        #expect(outcome.withLock { $0 } == nil, "the client is still connected")
        // Reads stay open, and the loop goes on.
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)

        try f.manager("Unlock")
        let deadline = Date().addingTimeInterval(10)
        while outcome.withLock({ $0 }) == nil && Date() < deadline { usleep(10_000) }
        #expect(outcome.withLock { $0 } == .uploaded)
        #expect(try Self.rules(f).count == 1)
    }

    @Test(
        "an upload made while the lock is held outlives --control-timeout and is applied after Unlock, as upstream's pesto, which exits at once, was led to believe",
        .timeLimit(.minutes(2)))
    func uploadAppliedAfterTheLock() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL", "--control-timeout", "100"])
        let p = TestSockets.freePorts(1).lowerBound
        try f.manager("Lock")
        // Like upstream's pesto: read the tables, upload, and go without waiting for anything.
        do {
            let client = try #require(WireClient(path: f.controlPath))
            defer { close(client.fd) }
            let dump = try #require(client.readHelloAndDump())
            var upload: [UInt8] = []
            for pif in dump.tables.keys.sorted() {
                let rules = pif == 1 ? [WireClient.specRule(listen: "127.0.0.1", port: p)] : dump.tables[pif]!.rules
                upload += [pif] + WireClient.be32(UInt32(rules.count)) + rules.flatMap { $0 }
            }
            client.send(upload + [0])
        }
        #expect(Self.waitForLog(f, "upload waits for the lock held by"))
        // Five times --control-timeout, which used to drop the waiting upload: no readiness
        // signal exists for a drop that does not happen.
        usleep(500_000)
        #expect(!f.log.contains("update refused"), "\(f.log)")
        #expect(try Self.rules(f).isEmpty, "nothing applied while locked")
        let signals = try SignalCollector(address: f.address)
        try f.manager("Unlock")
        signals.wait(
            for: "the waiting upload's rule, active",
            { $0.member == "RuleStateChanged" && $0.arguments?.count == 4 && $0.arguments?[1] == .bool(true) })
        #expect(try Self.rules(f).map(\.value.port) == [p])
        #expect(try Self.rules(f).keys.sorted() == [10], "the first ID by the shared rule")
    }

    @Test(
        "a refused upload (a multicast listening address) is announced with UploadRefused: the socket, the reason and the rules",
        .timeLimit(.minutes(2)))
    func refusedUploadIsSignalled() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let signals = try SignalCollector(address: f.address)
        #expect(WireClient.pesto(path: f.controlPath, rules: [WireClient.specRule(listen: "224.0.0.1", port: 5000)]) == .uploaded)
        let m = signals.wait(
            for: "UploadRefused", SignalCollector.signal("UploadRefused", path: PestodFixture.managerPath, [.string(f.controlPath)]))
        let args = m?.arguments ?? []
        #expect(args.count == 3)
        #expect(args.count == 3 && args[1].stringValue?.contains("224.0.0.1") == true, "\(args)")
        let rules = args.count == 3 ? args[2].arrayValue ?? [] : []
        #expect(rules.count == 1)
        #expect(rules.first?.vardictValue?.first { $0.0 == "address" }?.1.stringValue == "224.0.0.1")
        #expect(f.log.contains("warning") && f.log.contains("control socket: update refused"))
        #expect(try Self.rules(f).isEmpty)
    }

    @Test("the dump carries upstream's flags (weak: best effort; dual stack) exactly as uploaded")
    func dumpKeepsFlags() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let ports = TestSockets.freePorts(3)
        let p = ports.lowerBound
        let rules = [
            WireClient.specRule(listen: "127.0.0.1", port: p, flags: 0x02),
            WireClient.specRule(listen: "::", port: p + 1, flags: 0x01 | 0x02),
            WireClient.specRule(listen: "127.0.0.1", port: p + 2, targetPort: p + 1),
        ]
        #expect(WireClient.pesto(path: f.controlPath, rules: rules) == .uploaded)
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        #expect(client.readHelloAndDump()?.tables[1]?.rules == rules)
    }
}
