// SPDX-License-Identifier: GPL-2.0-or-later

// The data path end to end: real traffic through pestod to address targets and across a
// network namespace created by the test.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod data path", .serialized, .timeLimit(.minutes(10)))
struct RelayTests {
    static let isRoot = getuid() == 0

    func rule(_ port: UInt16, to target: UInt16, proto: String = "tcp", address: String = "127.0.0.1") -> DBusValue {
        .vardict([
            ("protocol", .string(proto)), ("address", .string(address)), ("first-port", .uint16(port)), ("target-port", .uint16(target)),
        ])
    }

    @Test("TCP to an address target: 64 MiB byte-identical both ways, with half-close")
    func bulkEcho() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(2)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-address", .string("127.0.0.1")), ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        guard case .success(let fd) = TestSockets.connect(port: ports.lowerBound) else {
            Issue.record("connect failed")
            return
        }
        defer { close(fd) }
        // The client half-closes after 64 MiB; the echo must still arrive whole, then EOF.
        #expect(TestTraffic.echoRoundTrip(fd: fd, count: 64 << 20, timeoutMilliseconds: 60_000) == nil)
        #expect(server.accepted == 1)
    }

    @Test("connect refused at the target resets the client (ECONNRESET); pestod keeps serving")
    func connectRefused() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(3)
        try f.table("Insert", [.uint32(1), rule(ports.lowerBound, to: ports.lowerBound + 1)])  // nothing listens there
        try f.table("Activate", [.uint32(1)])
        let end = TestSockets.firstRead(port: ports.lowerBound)
        #expect(
            end == .failure(Errno(rawValue: ECONNRESET)),
            "the refusal arrives as a reset, not an orderly end of file: \(String(describing: end))")
        let server = try #require(EchoServer(port: ports.lowerBound + 2))
        defer { server.stop() }
        try f.table("Insert", [.uint32(2), rule(ports.lowerBound + 1, to: ports.lowerBound + 2)])
        try f.table("Activate", [.uint32(2)])
        #expect(TestTraffic.ping(port: ports.lowerBound + 1) == nil)
        #expect(TestTraffic.ping(port: ports.lowerBound + 1) == nil)
        // Connections to a loopback target come from rotating 127.0.0.x sources (TIME_WAIT spread).
        let sources = server.peers
        #expect(sources.count == 2 && sources[0] != sources[1], "\(sources)")
        #expect(sources.allSatisfy { if case .v4(let a) = $0 { return a >> 24 == 127 && a != 0x7F00_0001 } else { return false } })
    }

    /// Makes rule 1 forward `ports.lowerBound` to the echo server on `ports.upperBound`,
    /// connects through it and checks a byte comes back; returns the client's socket.
    func echoingConnection(_ f: PestodFixture, _ ports: ClosedRange<UInt16>) throws -> Int32 {
        try f.table("Insert", [.uint32(1), rule(ports.lowerBound, to: ports.upperBound)])
        try f.table("Activate", [.uint32(1)])
        guard case .success(let fd) = TestSockets.connect(port: ports.lowerBound) else {
            throw HarnessError("connect through the forwarded port failed")
        }
        var byte: UInt8 = 42
        #expect(write(fd, &byte, 1) == 1)
        #expect(read(fd, &byte, 1) == 1 && byte == 42)
        return fd
    }

    @Test("a relayed connection survives its rule's deactivation and deletion")
    func survivesDeactivation() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(2)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        let fd = try echoingConnection(f, ports)
        defer { close(fd) }
        try f.table("Deactivate", [.uint32(1)])
        try f.table("Delete", [.uint32(1)])
        if case .success(let other) = TestSockets.connect(port: ports.lowerBound) {
            close(other)
            Issue.record("the deleted rule's port still accepts")
        }
        // The established connection still relays, in both directions, up to a clean end.
        #expect(TestTraffic.echoRoundTrip(fd: fd, count: 1 << 20) == nil)
    }

    @Test("pestod stopped (SIGTERM) while it relays a connection exits with status 0, and the client sees the end")
    func stopsWithConnectionOpen() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(2)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        let fd = try echoingConnection(f, ports)
        defer { close(fd) }
        var byte: UInt8 = 42
        kill(f.pestod.pid, SIGTERM)
        #expect(f.pestod.waitUntilExit() == 0, "\(f.log.suffix(2000))")
        TestSockets.setTimeouts(fd, milliseconds: 10_000)
        #expect(read(fd, &byte, 1) <= 0, "the relayed connection ended with pestod")
    }

    @Test("rule A keeps accepting with zero failures while rule B changes 100 times")
    func isolationUnderChurn() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(12)
        let server = try #require(EchoServer(port: ports.lowerBound + 1))
        defer { server.stop() }
        try f.table("Insert", [.uint32(10), rule(ports.lowerBound, to: ports.lowerBound + 1)])
        try f.table("Activate", [.uint32(10)])
        let before = try f.snapshot().sockets(onPort: ports.lowerBound)

        let done = Atomic<Bool>(false)
        let attempts = Atomic<Int>(0)
        let failures = Atomic<Int>(0)
        let finished = Atomic<Bool>(false)
        let portA = ports.lowerBound
        detachThread {
            while !done.load(ordering: .relaxed) {
                attempts.add(1, ordering: .relaxed)
                if TestTraffic.ping(port: portA) != nil { failures.add(1, ordering: .relaxed) }
            }
            finished.store(true, ordering: .relaxed)
        }
        let bFirst = ports.lowerBound + 2
        for round in 0..<100 {
            let id: UInt32 = round % 2 == 0 ? 5 : 15  // before and after A in ID order
            try f.table(
                "Insert",
                [
                    .uint32(id),
                    .vardict([
                        ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(bFirst)),
                        ("last-port", .uint16(bFirst + 9)), ("target-port", .uint16(ports.lowerBound + 1)),
                    ]),
                ])
            try f.table("Activate", [.uint32(id)])
            try f.table("Deactivate", [.uint32(id)])
            try f.table("Delete", [.uint32(id)])
        }
        done.store(true, ordering: .relaxed)
        while !finished.load(ordering: .relaxed) { sched_yield() }
        #expect(attempts.load(ordering: .relaxed) > 0)
        #expect(
            failures.load(ordering: .relaxed) == 0,
            "\(failures.load(ordering: .relaxed)) of \(attempts.load(ordering: .relaxed)) connections to A failed")
        #expect(try f.snapshot().sockets(onPort: ports.lowerBound) == before, "A's listener is the same socket")
    }

    @Test("into a network namespace (HOST) and out of it (SPLICE)", .enabled(if: isRoot, "needs root for ip netns"))
    func namespaces() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let ports = TestSockets.freePorts(4)
        // Inbound: a server only inside the namespace, reached from the host.
        let inside = try #require(ns.echoServer(port: ports.lowerBound + 1))
        defer { inside.stop() }
        try f.table("Insert", [.uint32(1), rule(ports.lowerBound, to: ports.lowerBound + 1)])
        try f.table("Activate", [.uint32(1)])
        guard case .success(let fd) = TestSockets.connect(port: ports.lowerBound) else {
            Issue.record("connect failed")
            return
        }
        #expect(TestTraffic.echoRoundTrip(fd: fd, count: 64 << 20, timeoutMilliseconds: 60_000) == nil)
        close(fd)
        #expect(inside.accepted == 1)

        // Outbound: the SPLICE table listens inside and connects to a host server.
        let tables = try f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestoInterfaces.manager.name), .string("Tables")])
        #expect(tables.first?.variantValue == .objectPaths([PestodFixture.hostPath, PestoBusNames.tablePath(.splice)]))
        let hostServer = try #require(EchoServer(port: ports.lowerBound + 3))
        defer { hostServer.stop() }
        _ = try f.client.call(
            PestodFixture.dest, PestoBusNames.tablePath(.splice), PestodFixture.tableInterface, "Insert",
            [.uint32(1), rule(ports.lowerBound + 2, to: ports.lowerBound + 3)])
        let counts = try f.client.call(
            PestodFixture.dest, PestoBusNames.tablePath(.splice), PestodFixture.tableInterface, "Activate", [.uint32(1)])
        #expect(counts == [.uint32(1), .uint32(0)])
        guard case .success(let out) = ns.connect(port: ports.lowerBound + 2) else {
            Issue.record("connect inside the namespace failed")
            return
        }
        #expect(TestTraffic.echoRoundTrip(fd: out, count: 8 << 20) == nil)
        close(out)
        #expect(hostServer.accepted == 1)
        // Nothing listens on the host at the SPLICE port: it is inside the namespace.
        if case .success(let stray) = TestSockets.connect(port: ports.lowerBound + 2) {
            close(stray)
            Issue.record("the SPLICE listener leaked into the host namespace")
        }
    }

    @Test("a scan rule follows a server that starts and stops inside the namespace", .enabled(if: isRoot, "needs root for ip netns"))
    func scanFollowsServer() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let signals = try SignalCollector(address: f.address)
        let ports = TestSockets.freePorts(10)
        let p = ports.lowerBound
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(p)),
                    ("last-port", .uint16(p + 9)), ("scan", .bool(true)),
                ]),
            ])
        #expect(try f.table("Activate", [.uint32(1)]) == [.uint32(0), .uint32(0)], "nothing is bound in the namespace yet")
        // The scan's period is a speed, measured by no test: the waits only need it to happen.
        let server = try #require(ns.echoServer(port: p + 3))
        signals.wait(
            for: "scan opened the port",
            SignalCollector.signal("RuleStateChanged", path: PestodFixture.hostPath, [.uint32(1), .bool(true), .uint32(1), .uint32(0)]))
        #expect(TestTraffic.ping(port: p + 3) == nil)
        #expect(f.listeningSockets().count == 1)
        signals.forget()  // the activation already announced (true, 0, 0)
        server.stop()
        signals.wait(
            for: "scan closed the port",
            SignalCollector.signal("RuleStateChanged", path: PestodFixture.hostPath, [.uint32(1), .bool(true), .uint32(0), .uint32(0)]))
        #expect(f.listeningSockets().isEmpty)
    }
}

@Suite("pestod UDP data path", .serialized, .timeLimit(.minutes(10)))
struct UDPRelayTests {
    /// Connected UDP sockets of `pid` (the flows; the rule's own sockets are unconnected).
    func flowSockets(_ pid: Int32) -> Int {
        let inodes = Set(
            ProcessDescriptors.list(pid: pid).map(\.target).filter { $0.hasPrefix("socket:[") }.map { String($0.dropFirst(8).dropLast()) })
        var n = 0
        for file in ["udp", "udp6"] {
            let text = String(decoding: readFile("/proc/\(pid)/net/\(file)", limit: 1 << 28) ?? [], as: UTF8.self)  // to end of file
            for line in text.split(separator: "\n").dropFirst() {
                let f = line.split(separator: " ")
                if f.count > 9 && f[3] == "01" && inodes.contains(String(f[9])) { n += 1 }
            }
        }
        return n
    }

    @Test("request/response per client flow, replies from the listening port, idle flows expire")
    func flows() throws {
        let f = try PestodFixture(pestodArguments: ["--udp-idle-timeout", "1"])
        let ports = TestSockets.freePorts(2)
        let server = try #require(UDPEchoServer(port: ports.upperBound))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("udp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-address", .string("127.0.0.1")), ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        #expect(try f.table("Activate", [.uint32(1)]) == [.uint32(1), .uint32(0)])
        let a = try #require(TestTraffic.udpClient())
        let b = try #require(TestTraffic.udpClient())
        defer {
            close(a)
            close(b)
        }
        let big = (0..<60_000).map { UInt8(truncatingIfNeeded: $0 % 251) }
        let r1 = TestTraffic.udpExchange(fd: a, port: ports.lowerBound, payload: Array("hello".utf8))
        #expect(r1?.reply == Array("hello".utf8))
        #expect(r1?.from == ports.lowerBound, "the reply comes from the port the client sent to")
        #expect(TestTraffic.udpExchange(fd: b, port: ports.lowerBound, payload: big)?.reply == big)
        #expect(TestTraffic.udpExchange(fd: a, port: ports.lowerBound, payload: [1, 2, 3])?.reply == [1, 2, 3])
        #expect(server.sourcePorts.count == 2, "one flow per client")
        #expect(flowSockets(f.pestod.pid) == 2)

        // Idle for longer than the timeout: both flows close; the next datagram opens a new one.
        let deadline = MonotonicInstant.now.adding(milliseconds: 5000)
        while flowSockets(f.pestod.pid) > 0 && MonotonicInstant.now < deadline { usleep(50_000) }
        #expect(flowSockets(f.pestod.pid) == 0, "flows expired")
        #expect(TestTraffic.udpExchange(fd: a, port: ports.lowerBound, payload: [9])?.reply == [9])
        #expect(server.sourcePorts.count == 3, "a new flow after expiry")

        // Deactivating the rule closes its listener and with it the flows.
        try f.table("Deactivate", [.uint32(1)])
        #expect(flowSockets(f.pestod.pid) == 0)
    }

    @Test("UDP into a network namespace", .enabled(if: RelayTests.isRoot, "needs root for ip netns"))
    func namespace() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let ports = TestSockets.freePorts(2)
        let fd = ns.namespace.perform {
            TestSockets.bound(Int32(SOCK_DGRAM.rawValue), address: .loopbackIPv4, port: ports.upperBound, listen: false)
        }
        let server = try #require(UDPEchoServer(port: ports.upperBound, boundFD: fd))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("udp")), ("first-port", .uint16(ports.lowerBound)), ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        let client = try #require(TestTraffic.udpClient())
        defer { close(client) }
        #expect(
            TestTraffic.udpExchange(fd: client, port: ports.lowerBound, payload: Array("into the namespace".utf8))?.reply
                == Array("into the namespace".utf8))
    }
}

@Suite("pestod out of descriptors", .serialized, .timeLimit(.minutes(10)))
struct ExhaustionTests {
    /// User + system CPU time of `pid`, in clock ticks.
    func cpuTicks(_ pid: Int32) -> Int {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return -1 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)  // utime, stime (fields 14 and 15)
    }

    func rule(_ port: UInt16, to target: UInt16, proto: String = "tcp") -> DBusValue {
        .vardict([
            ("protocol", .string(proto)), ("address", .string("127.0.0.1")), ("first-port", .uint16(port)),
            ("target-port", .uint16(target)),
        ])
    }

    /// The lowest descriptor number free in `pid`: the next one it opens gets it, so a soft
    /// limit of this makes its next open fail with EMFILE.
    func lowestFreeDescriptor(_ pid: Int32) -> Int {
        let used = Set(ProcessDescriptors.list(pid: pid).map { Int($0.number) })
        return (0...).first { !used.contains($0) }!
    }

    /// Sets the soft RLIMIT_NOFILE of the running process `pid` (the hard limit stays). The
    /// descriptor budget keeps pestod's relays from ever reaching EMFILE by themselves, so
    /// the tests of what happens at EMFILE lower the limit under pestod's feet.
    func setSoftOpenFileLimit(_ pid: Int32, _ soft: Int) throws {
        let r = try run("/usr/bin/prlimit", ["--pid", "\(pid)", "--nofile=\(soft):"])
        try #require(r.status == 0, "prlimit: \(r.err)")
    }

    /// Waits until pestod's log contains `text` (5 s at most); false if it never did.
    func waitForLog(_ f: PestodFixture, _ text: String) -> Bool {
        let deadline = MonotonicInstant.now.adding(milliseconds: 5000)
        while MonotonicInstant.now < deadline {
            if f.log.contains(text) { return true }
            usleep(10_000)
        }
        return f.log.contains(text)
    }

    @Test("at EMFILE the listener pauses: no crash, no busy loop, D-Bus answers, service resumes")
    func pausesAtExhaustion() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(2)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        // Eight descriptors left: 40 connections want 80. The kernel completes the handshakes
        // into the listener's backlog; pestod relays what it can and pauses.
        try setSoftOpenFileLimit(f.pestod.pid, ProcessDescriptors.count(pid: f.pestod.pid) + 8)
        var clients: [Int32] = []
        for _ in 0..<40 {
            if case .success(let fd) = TestSockets.connect(port: ports.lowerBound) { clients.append(fd) }
        }
        #expect(clients.count == 40)
        let before = cpuTicks(f.pestod.pid)
        usleep(1_000_000)  // measuring CPU use over a second needs the second to pass
        let spent = cpuTicks(f.pestod.pid) - before
        #expect(spent >= 0 && spent < 20, "pestod used \(spent) ticks in a second: it is spinning")
        #expect(f.pestod.isRunning)
        #expect(try f.table("Status", [.uint32(1)]) == [.bool(true), .uint32(1), .uint32(0), .string(""), .uint32(1)])
        let served = server.accepted
        #expect(served > 0 && served < 40, "some connections relayed, the rest waiting: \(served)")
        for fd in clients { close(fd) }
        // Capacity returns: new connections are relayed again.
        var ok = false
        for _ in 0..<50 where !ok { ok = TestTraffic.ping(port: ports.lowerBound) == nil }
        #expect(ok, "pestod relays again once descriptors are free")
        #expect(f.log.contains("critical") == false)
    }

    @Test("at EMFILE the control socket pauses instead of spinning; D-Bus answers; the waiting client is served after")
    func controlSocketAtExhaustion() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let pid = f.pestod.pid
        // A round trip: pestod is in its loop, done with the descriptors of its start (the
        // sd_notify socket is closed only after READY=1 is sent).
        _ = try f.table("List")
        try setSoftOpenFileLimit(pid, lowestFreeDescriptor(pid))  // not one descriptor to spare
        let client = try #require(WireClient(path: f.controlPath), "the connection completes in the backlog")
        defer { close(client.fd) }
        #expect(waitForLog(f, "control socket: cannot take a client now"), "accept4 failed with EMFILE: \(f.log)")
        let before = cpuTicks(pid)
        usleep(1_000_000)  // measuring CPU use over a second needs the second to pass
        let spent = cpuTicks(pid) - before
        #expect(spent >= 0 && spent < 20, "pestod used \(spent) ticks in a second: it is spinning")
        #expect(try f.table("List").first?.arrayValue?.count == 0, "D-Bus answers")
        try setSoftOpenFileLimit(pid, 4096)
        #expect(client.readHelloAndDump() != nil, "the waiting client is served once a descriptor is free")
        #expect(f.log.components(separatedBy: "control socket: cannot take a client now").count == 2, "logged once")
    }

    @Test(
        "relays stop at their shares of the descriptor budget: connections beyond TCP's are reset, new UDP clients beyond UDP's dropped (logged once); D-Bus answers, a change is saved, a reserve remains"
    )
    func relayBudget() throws {
        // L = 256: E = 192 for listeners and relays, relays up to R = 168, half of it for each
        // protocol (DescriptorPlan): 14 connections at 6 descriptors, 84 flows at 1.
        let limit = 256
        let plan = DescriptorPlan(openFileLimit: limit)
        let f = try PestodFixture(
            pestodArguments: ["--max-connections", "1000", "--max-udp-flows", "1000", "--state", "STATE"], openFileLimit: limit)
        let ports = TestSockets.freePorts(5)
        let server = try #require(EchoServer(port: ports.lowerBound + 1))
        defer { server.stop() }
        let udpServer = try #require(UDPEchoServer(port: ports.lowerBound + 3))
        defer { udpServer.stop() }
        try f.table("Insert", [.uint32(1), rule(ports.lowerBound, to: ports.lowerBound + 1)])
        try f.table("Insert", [.uint32(2), rule(ports.lowerBound + 2, to: ports.lowerBound + 3, proto: "udp")])
        #expect(try f.table("Activate", [.uint32(1)]) == [.uint32(1), .uint32(0)])
        #expect(try f.table("Activate", [.uint32(2)]) == [.uint32(1), .uint32(0)])

        // TCP: connections are relayed (6 descriptors each: sockets and pipes) until one is reset.
        let connections = plan.share / DescriptorPlan.perConnection
        var clients: [Int32] = []
        defer { for fd in clients { close(fd) } }
        var relayed = 0
        var refused = false
        for _ in 0..<(connections + 5) where !refused {
            guard case .success(let fd) = TestSockets.connect(port: ports.lowerBound) else { break }
            clients.append(fd)
            var byte: UInt8 = 5
            _ = write(fd, &byte, 1)
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 5000) == 1 else {
                Issue.record("connection \(clients.count) neither relayed nor refused: it hangs")
                break
            }
            if read(fd, &byte, 1) == 1 { relayed += 1 } else { refused = true }
        }
        #expect(refused, "a connection beyond the budget is reset")
        #expect(relayed == connections, "\(relayed) connections relayed")
        #expect(waitForLog(f, "new TCP connections are reset"))

        // UDP: its own share takes its flows; then a new client's datagram is dropped.
        var udpClients: [Int32] = []
        defer { for fd in udpClients { close(fd) } }
        var flows = 0
        var dropped = false
        for _ in 0..<(plan.share + 5) where !dropped {
            let fd = try #require(TestTraffic.udpClient())
            udpClients.append(fd)
            _ = SocketAddress(.loopbackIPv4, port: ports.lowerBound + 2).withSockaddr { sa, len in sendto(fd, "u", 1, 0, sa, len) }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let deadline = MonotonicInstant.now.adding(milliseconds: 5000)
            while MonotonicInstant.now < deadline {
                if poll(&pfd, 1, 20) == 1 {
                    flows += 1
                    break
                }
                if f.log.contains("datagrams from new UDP clients are dropped") {
                    dropped = true
                    break
                }
            }
        }
        #expect(dropped && flows == plan.share, "\(flows) flows, then a drop")
        // More refusals of both kinds are not logged again.
        for _ in 0..<3 {
            if case .success(let fd) = TestSockets.connect(port: ports.lowerBound) { clients.append(fd) }
            let fd = try #require(TestTraffic.udpClient())
            udpClients.append(fd)
            _ = SocketAddress(.loopbackIPv4, port: ports.lowerBound + 2).withSockaddr { sa, len in sendto(fd, "u", 1, 0, sa, len) }
        }

        // The relays hold all theirs; D-Bus answers, a rule is activated and the change saved.
        #expect(try f.table("Status", [.uint32(1)]) == [.bool(true), .uint32(1), .uint32(0), .string(""), .uint32(1)])
        try f.table("Insert", [.uint32(3), rule(ports.lowerBound + 4, to: ports.lowerBound + 1)])
        #expect(try f.table("Activate", [.uint32(3)]) == [.uint32(1), .uint32(0)])
        #expect(try StateStore.read(f.statePath).live.count == 3, "the change is saved")
        #expect(ProcessDescriptors.count(pid: f.pestod.pid) <= limit - DescriptorPlan.coreReserve / 2, "a reserve remains")
        #expect(f.log.components(separatedBy: "new TCP connections are reset").count == 2, "logged once")
        #expect(f.log.components(separatedBy: "datagrams from new UDP clients are dropped").count == 2, "logged once")
        #expect(f.pestod.isRunning)
    }
}
