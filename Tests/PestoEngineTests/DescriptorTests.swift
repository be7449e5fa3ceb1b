// SPDX-License-Identifier: GPL-2.0-or-later

// Descriptors and epoll watches running out, in process: the engine on its own loop, real
// loopback sockets, and epoll_ctl failures injected by a `SyscallScript` standing in for
// `fs.epoll.max_user_watches` (a global sysctl no test may lower).
//
// `turn(until:)` runs the loop until a condition holds, checked every 5 ms; its 5 s bound only
// records a failure.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// An engine on its own loop, with helpers to turn the loop and to talk to it over loopback.
private final class EngineHarness {
    let loop: EventLoop
    let engine: ForwardingEngine

    init(descriptors: DescriptorPlan? = nil, pipePoolSize: Int = 64, maxConnections: Int? = nil, maxFlows: Int? = nil) throws {
        loop = try EventLoop()
        var config = EngineConfiguration()
        config.descriptors = descriptors
        config.tcp.pipePoolSize = pipePoolSize
        if let maxConnections { config.tcp.maxConnections = maxConnections }
        if let maxFlows { config.udp.maxFlows = maxFlows }
        config.capabilities = [.tcp, .udp, .ipv4, .ipv6]
        engine = try ForwardingEngine(loop: loop, configuration: config)
    }

    /// Runs the loop until `condition` holds (false if it did not within 5 s).
    @discardableResult
    func turn(until condition: @escaping () -> Bool, _ what: String) -> Bool { loop.turn(until: condition, what) }

    /// Releases everything (the loop holds the engine's handlers).
    func shutdown() {
        for table in engine.tables {
            for (id, _, status) in table.list() where status.active { try? table.deactivate(id: id) }
        }
        engine.tcp.closeAll()
        engine.udp.closeAll()
        loop.removeAllHandlers()
    }
}

/// What a client socket sees next: data, end of file, a reset, or nothing yet.
private func peek(_ fd: Int32) -> String {
    var byte: UInt8 = 0
    let n = recv(fd, &byte, 1, Int32(MSG_DONTWAIT) | Int32(MSG_PEEK))
    if n == 1 { return "data" }
    if n == 0 { return "eof" }
    return errno == EAGAIN ? "nothing" : errno == ECONNRESET ? "reset" : "error \(errno)"
}

/// A TCP listener on loopback `port` whose connections are never accepted and whose receive
/// buffers are small: bytes relayed to it soon stop, and the rest wait in the relay's pipe.
private func sinkListener(port: UInt16) -> Int32? {
    guard let fd = TestSockets.bound(port: port, listen: false) else { return nil }
    TestSockets.setOption(fd, level: SOL_SOCKET, name: SO_RCVBUF, 2048)
    guard listen(fd, 128) == 0 else {
        close(fd)
        return nil
    }
    return fd
}

/// Writes up to 256 KiB to `fd` without blocking; the bytes written.
private func fill(_ fd: Int32) -> Int {
    let chunk = [UInt8](repeating: 0x5A, count: 256 * 1024)
    return chunk.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
}

@Suite("Descriptors and epoll watches running out", .serialized, .timeLimit(.minutes(10)))
struct DescriptorTests {
    static let enospc = Errno(rawValue: ENOSPC)

    @Test(
        "the plan: 64 kept for pestod, an eighth of the rest (at most 1024) for listeners, half of R for each protocol, 6 descriptors a connection"
    )
    func plan() {
        let small = DescriptorPlan(openFileLimit: 256)
        #expect((small.engineLimit, small.listenerHeadroom, small.relayLimit, small.share) == (192, 24, 168, 84))
        #expect((small.defaultMaxConnections, small.defaultMaxFlows) == (14, 84))
        let big = DescriptorPlan(openFileLimit: 1_048_576)
        #expect((big.engineLimit, big.listenerHeadroom, big.relayLimit, big.share) == (1_048_512, 1024, 1_047_488, 523_744))
        #expect((big.defaultMaxConnections, big.defaultMaxFlows) == (87_290, 523_744))
        let tiny = DescriptorPlan(openFileLimit: 10)
        #expect((tiny.engineLimit, tiny.relayLimit, tiny.defaultMaxConnections, tiny.defaultMaxFlows) == (0, 0, 1, 1))
    }

    @Test("an epoll_ctl failure (ENOSPC) at activation is each port's bind failure, retried later; nothing traps or leaks")
    func activationWatchFailure() throws {
        let script = SyscallScript()
        try script.run {
            let h = try EngineHarness()
            defer { h.shutdown() }
            let ports = TestSockets.freePorts(4)
            script.fail(.epollCtl, with: Self.enospc, times: nil) {
                $0.epollKind == EngineEventKind.tcpListener.rawValue || $0.epollKind == EngineEventKind.udpListener.rawValue
            }
            try h.engine.host.insert(
                id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.lowerBound + 2))
            try h.engine.host.insert(id: 2, rule: Rule(proto: .udp, address: .loopbackIPv4, firstPort: ports.upperBound))
            #expect(try h.engine.host.activate(id: 1) == .init(bound: 0, failed: 3))
            #expect(try h.engine.host.activate(id: 2) == .init(bound: 0, failed: 1))
            #expect(try h.engine.host.status(1) == RuleStatus(active: true, bound: 0, failed: 3, lastError: Self.enospc))
            #expect(try h.engine.host.status(2) == RuleStatus(active: true, bound: 0, failed: 1, lastError: Self.enospc))
            #expect(h.engine.budget.held == 0, "the failed listeners are not charged")
            #expect(h.engine.host.openSockets == 0)
            // The sockets were closed: nothing listens on those ports.
            if case .success(let fd) = TestSockets.connect(port: ports.lowerBound) {
                close(fd)
                Issue.record("a listener epoll could not watch was left open")
            }
            // Once epoll takes watches again, the retry binds them like any failed bind.
            script.stopFailing()
            #expect(Set(h.engine.host.retryFailedBinds()) == [1, 2])
            #expect(try h.engine.host.status(1) == RuleStatus(active: true, bound: 3, failed: 0, lastError: nil))
            #expect(h.engine.budget.held == 4)
        }
    }

    @Test("a TCP connection whose socket epoll cannot watch is reset alone; others keep relaying")
    func connectionWatchFailure() throws {
        let script = SyscallScript()
        try script.run {
            let h = try EngineHarness()
            defer { h.shutdown() }
            let ports = TestSockets.freePorts(2)
            let server = try #require(EchoServer(port: ports.upperBound))
            defer { server.stop() }
            try h.engine.host.insert(
                id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, targetPort: ports.upperBound))
            #expect(try h.engine.host.activate(id: 1).bound == 1)
            let a = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            defer { close(a) }
            var byte: UInt8 = 1
            #expect(write(a, &byte, 1) == 1)
            h.turn(until: { peek(a) == "data" }, "A's byte echoed")
            #expect(read(a, &byte, 1) == 1)

            script.fail(.epollCtl, with: Self.enospc, times: nil) { $0.epollKind == EngineEventKind.tcpConnection.rawValue }
            let b = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            defer { close(b) }
            h.turn(until: { h.engine.tcp.counters.watchFailures == 1 }, "B dropped")
            h.turn(until: { peek(b) == "reset" }, "B reset")
            #expect(h.engine.tcp.activeConnections == 1, "only B was dropped")
            script.stopFailing()

            // A still relays, and so does a new connection.
            #expect(write(a, &byte, 1) == 1)
            h.turn(until: { peek(a) == "data" }, "A's second byte echoed")
            let c = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            defer { close(c) }
            #expect(write(c, &byte, 1) == 1)
            h.turn(until: { peek(c) == "data" }, "C's byte echoed")
            #expect(h.engine.tcp.activeConnections == 2)
        }
    }

    @Test("a UDP flow whose socket epoll cannot watch loses its datagram; the next one makes the flow")
    func flowWatchFailure() throws {
        let script = SyscallScript()
        try script.run {
            let h = try EngineHarness()
            defer { h.shutdown() }
            let ports = TestSockets.freePorts(2)
            let server = try #require(UDPEchoServer(port: ports.upperBound))
            defer { server.stop() }
            try h.engine.host.insert(
                id: 1, rule: Rule(proto: .udp, address: .loopbackIPv4, firstPort: ports.lowerBound, targetPort: ports.upperBound))
            #expect(try h.engine.host.activate(id: 1).bound == 1)
            let client = try #require(TestTraffic.udpClient())
            defer { close(client) }
            let to = SocketAddress(.loopbackIPv4, port: ports.lowerBound)
            func send() { _ = to.withSockaddr { sa, len in sendto(client, "x", 1, 0, sa, len) } }

            script.fail(.epollCtl, with: Self.enospc, times: nil) { $0.epollKind == EngineEventKind.udpFlow.rawValue }
            send()
            h.turn(until: { h.engine.udp.counters.droppedErrors == 1 }, "the datagram dropped")
            #expect(h.engine.udp.flowCount == 0)
            #expect(h.engine.budget.held == 1, "only the listener is charged")
            script.stopFailing()
            send()
            h.turn(until: { peek(client) == "data" }, "the reply")
            #expect(h.engine.udp.flowCount == 1)
            #expect(h.engine.budget.held == 2)
        }
    }

    @Test(
        "at TCP's share a new connection is reset and reported once; listeners open up to the engine limit, and beyond the headroom they shrink both shares"
    )
    func relayBudget() throws {
        // L = 128: E = 64, H = 8, R = 56, a share of 28 for each protocol: four connections at
        // 6 each. No pipe is kept, so each exists only while a byte is relayed.
        let h = try EngineHarness(descriptors: DescriptorPlan(openFileLimit: 128), pipePoolSize: 0)
        defer { h.shutdown() }
        var reports: [TransportProtocol] = []
        h.engine.budget.onExhausted = { reports.append($0) }
        let ports = TestSockets.freePorts(44)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        try h.engine.host.insert(
            id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, targetPort: ports.upperBound))
        #expect(try h.engine.host.activate(id: 1).bound == 1)
        var clients: [Int32] = []
        defer { for fd in clients { close(fd) } }
        for _ in 0..<4 {
            let fd = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            clients.append(fd)
            var byte: UInt8 = 7
            #expect(write(fd, &byte, 1) == 1)
            h.turn(until: { peek(fd) == "data" }, "echo")
        }
        #expect(h.engine.budget.held == 25 && h.engine.budget.held(by: .tcp) == 24)
        for n in 1...3 {
            let fd = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            clients.append(fd)
            h.turn(until: { peek(fd) == "reset" }, "refused connection \(n) reset")
            #expect(h.engine.tcp.counters.refusedBudget == UInt64(n))
        }
        #expect(reports == [.tcp], "reported once")
        #expect(h.engine.tcp.activeConnections == 4 && h.engine.budget.held == 25)
        // Listeners may use everything up to E = 64: 39 more ports bind, the last fails with EMFILE.
        try h.engine.host.insert(
            id: 2, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound + 1, lastPort: ports.lowerBound + 40))
        #expect(try h.engine.host.activate(id: 2) == .init(bound: 39, failed: 1))
        #expect(try h.engine.host.status(2).lastError == .tooManyOpenFiles)
        // Listeners beyond the headroom take from both shares alike: (64 - 40) / 2 = 12 each.
        #expect(h.engine.budget.share == 12)
        // Deactivating rule 2 and closing a connection gives their descriptors back: the next
        // connection is relayed.
        try h.engine.host.deactivate(id: 2)
        #expect(h.engine.budget.held == 25 && h.engine.budget.share == 28)
        close(clients.removeFirst())
        h.turn(until: { h.engine.tcp.activeConnections == 3 }, "the closed connection released")
        let again = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
        clients.append(again)
        var byte: UInt8 = 9
        #expect(write(again, &byte, 1) == 1)
        h.turn(until: { peek(again) == "data" }, "relayed again")
    }

    @Test(
        "the descriptor shares under a UDP flood: with UDP flows at their cap, TCP gets every connection its share allows, and a connection on another rule is not reset",
        .timeLimit(.minutes(2)))
    func sharesUnderUDPFlood() throws {
        // L = 256 with the relay limits pestod derives from it (E = 192, H = 24, R = 168).
        let plan = DescriptorPlan(openFileLimit: 256)
        let h = try EngineHarness(descriptors: plan, maxConnections: plan.defaultMaxConnections, maxFlows: plan.defaultMaxFlows)
        defer { h.shutdown() }
        let ports = TestSockets.freePorts(6)
        let (udpPort, udpTarget) = (ports.lowerBound, ports.lowerBound + 1)
        let (stuckPort, sinkPort) = (ports.lowerBound + 2, ports.lowerBound + 3)
        let (otherPort, echoPort) = (ports.lowerBound + 4, ports.lowerBound + 5)
        let udpEcho = try #require(UDPEchoServer(port: udpTarget))
        defer { udpEcho.stop() }
        let sink = try #require(sinkListener(port: sinkPort))
        defer { close(sink) }
        let echo = try #require(EchoServer(port: echoPort))
        defer { echo.stop() }
        try h.engine.host.insert(id: 1, rule: Rule(proto: .udp, address: .loopbackIPv4, firstPort: udpPort, targetPort: udpTarget))
        try h.engine.host.insert(id: 2, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: stuckPort, targetPort: sinkPort))
        try h.engine.host.insert(id: 3, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: otherPort, targetPort: echoPort))
        for id: UInt32 in 1...3 { #expect(try h.engine.host.activate(id: id).bound == 1) }

        // The flood: one client more than the flow table holds, each its own flow.
        var udpClients: [Int32] = []
        defer { for fd in udpClients { close(fd) } }
        let to = SocketAddress(.loopbackIPv4, port: udpPort)
        for _ in 0...plan.defaultMaxFlows {
            let fd = try #require(TestTraffic.udpClient())
            udpClients.append(fd)
            _ = to.withSockaddr { sa, len in sendto(fd, "u", 1, 0, sa, len) }
        }
        h.turn(until: { h.engine.udp.counters.datagramsIn == UInt64(udpClients.count) }, "every datagram of the flood taken")
        #expect(h.engine.udp.flowCount == plan.defaultMaxFlows, "the flows are at their cap")
        #expect(h.engine.udp.counters.droppedFlowLimit == 1)

        // TCP: every connection its share allows but one, each sending bytes its target does not
        // read (through the pipes), then one on another rule, which relays.
        var clients: [Int32] = []
        defer { for fd in clients { close(fd) } }
        for n in 1..<plan.defaultMaxConnections {
            let fd = try #require(try? TestSockets.connect(port: stuckPort).get())
            clients.append(fd)
            #expect(fill(fd) > 0)
            h.turn(
                until: { h.engine.tcp.counters.relayed == UInt64(n) || h.engine.tcp.counters.refusedBudget > 0 },
                "connection \(n) relayed or refused")
            guard h.engine.tcp.counters.refusedBudget == 0 else { break }
        }
        #expect(h.engine.tcp.counters.refusedBudget == 0, "every connection of TCP's share is relayed")
        #expect(h.engine.tcp.activeConnections == plan.defaultMaxConnections - 1)
        let other = try #require(try? TestSockets.connect(port: otherPort).get())
        clients.append(other)
        var byte: UInt8 = 3
        #expect(write(other, &byte, 1) == 1)
        h.turn(until: { peek(other) != "nothing" }, "the connection on another rule answered")
        #expect(peek(other) == "data", "the connection on another rule is relayed, not reset")
        #expect(h.engine.tcp.counters.refusedBudget == 0)
        #expect(h.engine.udp.flowCount == plan.defaultMaxFlows, "the flows are untouched")
        #expect(h.engine.budget.held <= plan.engineLimit)
    }

    @Test("empty pipes kept for reuse count against TCP's share and give way to a new connection")
    func sparePipes() throws {
        // L = 77: E = 13, H = 1, R = 12, a share of 6: exactly one connection.
        let h = try EngineHarness(descriptors: DescriptorPlan(openFileLimit: 77))
        defer { h.shutdown() }
        let ports = TestSockets.freePorts(2)
        let server = try #require(EchoServer(port: ports.upperBound))
        defer { server.stop() }
        try h.engine.host.insert(
            id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, targetPort: ports.upperBound))
        #expect(try h.engine.host.activate(id: 1).bound == 1)
        func echo() throws -> Int32 {
            let fd = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
            var byte: UInt8 = 1
            #expect(write(fd, &byte, 1) == 1)
            h.turn(until: { peek(fd) != "nothing" }, "the connection answered")
            #expect(peek(fd) == "data")
            return fd
        }
        close(try echo())
        h.turn(until: { h.engine.tcp.activeConnections == 0 }, "the first connection closed")
        let spares = h.engine.budget.held(by: .tcp)
        #expect(spares > 0 && spares <= 2 * DescriptorPlan.perPipe, "its pipes stay pooled, charged as spares")
        let second = try echo()
        defer { close(second) }
        #expect(h.engine.tcp.counters.refusedBudget == 0, "the spares made way")
        #expect(h.engine.budget.held(by: .tcp) == DescriptorPlan.perConnection, "the pooled pipes are the connection's own now")
        let third = try #require(try? TestSockets.connect(port: ports.lowerBound).get())
        defer { close(third) }
        h.turn(until: { peek(third) == "reset" }, "a connection beyond the share reset")
        #expect(h.engine.budget.held(by: .tcp) <= h.engine.budget.share)
    }
}
