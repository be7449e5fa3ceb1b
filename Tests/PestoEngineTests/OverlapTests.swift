// SPDX-License-Identifier: GPL-2.0-or-later

// First-match tables (doc/overlap.md): overlapping rules share listening sockets, a carve-out
// comes and goes without any socket being opened or closed, and each connection goes to the
// lowest-ID active rule that matches where it arrived.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Overlapping rules, first match wins", .timeLimit(.minutes(10)))
struct OverlapTests {
    static let caps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .ifname]

    func table(_ factory: any ListenerFactory, _ policy: OverlapPolicy = .firstMatch) -> ForwardingTable {
        ForwardingTable(kind: .host, capabilities: Self.caps, overlapPolicy: policy, factory: factory)
    }

    @Test("a carve-out toggled 100 times over a range opens and closes no socket; ports won follow it")
    func carveOutSharesSockets() throws {
        let factory = ScriptedListenerFactory()
        let t = table(factory)
        let ports = TestSockets.freePorts(4)
        let carved = ports.lowerBound + 1
        var wonReports: [(UInt32, UInt32)] = []
        t.onPortsWonChange = { wonReports.append(($0, $1)) }
        try t.insert(id: 10, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.upperBound))
        try t.insert(id: 5, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: carved, targetPort: 9))
        #expect(try t.activate(id: 10) == .init(bound: 4, failed: 0))
        let sockets = t.listeningDescriptors
        let inodes = sockets.map(TestSockets.inode)
        #expect(sockets.count == 4 && factory.opens == 4)
        for _ in 0..<100 {
            #expect(
                try t.activate(id: 5) == .init(bound: 1, failed: 0), "the carve-out's port counts as bound: served by the range's socket")
            #expect(try t.portsWon(5) == 1 && t.portsWon(10) == 3)
            #expect(t.firstMatchTarget(listener: try t.listeners(of: 10)[1].fd) { nil }?.ruleID == 5)
            try t.deactivate(id: 5)
            #expect(try t.portsWon(5) == 0 && t.portsWon(10) == 4)
            #expect(t.firstMatchTarget(listener: try t.listeners(of: 10)[1].fd) { nil }?.ruleID == 10)
        }
        #expect(factory.opens == 4 && factory.closed.isEmpty, "no socket was opened or closed by the carve-out")
        #expect(t.listeningDescriptors == sockets && t.listeningDescriptors.map(TestSockets.inode) == inodes)
        #expect(t.openSockets == 4)
        #expect(wonReports.count == 200 && wonReports.allSatisfy { $0.0 == 10 }, "the range's count is reported at each change")
        #expect(wonReports.prefix(2).map(\.1) == [3, 4])
        try t.deactivate(id: 10)
        #expect(factory.closed.count == 4 && t.openSockets == 0)
    }

    @Test("a carve-out with a higher ID than the range wins nothing but shares its socket")
    func higherIDLoses() throws {
        let factory = ScriptedListenerFactory()
        let t = table(factory)
        let ports = TestSockets.freePorts(2)
        try t.insert(id: 1, rule: Rule(proto: .udp, firstPort: ports.lowerBound, lastPort: ports.upperBound))
        try t.insert(id: 2, rule: Rule(proto: .udp, firstPort: ports.upperBound))
        try t.activate(id: 1)
        #expect(try t.activate(id: 2) == .init(bound: 1, failed: 0))
        #expect(try t.portsWon(1) == 2 && t.portsWon(2) == 0)
        #expect(try t.status(2) == RuleStatus(active: true, bound: 1, failed: 0, lastError: nil))
        try t.deactivate(id: 1)
        #expect(try t.portsWon(2) == 1, "the range left: the carve-out wins its port, on the same socket")
        #expect(factory.opens == 2 && factory.closed.count == 1)
        try t.deactivate(id: 2)
        #expect(factory.closed.count == 2)
    }

    @Test("refuse (the default) still refuses the same overlap with Conflict")
    func refuseUnchanged() throws {
        let t = table(ScriptedListenerFactory(), .refuse)
        let ports = TestSockets.freePorts(2)
        try t.insert(id: 10, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.upperBound))
        try t.insert(id: 5, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.upperBound))
        try t.activate(id: 10)
        expectRejected(t, .conflict, "overlaps active rule 10") { () throws(PestoError) in try t.activate(id: 5) }
        #expect(try t.portsWon(10) == 2 && t.portsWon(5) == 0)
        try t.deactivate(id: 10)
    }

    @Test("a specific address under a wildcard: one socket, dispatch by local address, either order")
    func specificUnderWildcard() throws {
        let ip2 = IPAddress.v4(0x7F00_0002)
        for specificFirst in [false, true] {
            let factory = ScriptedListenerFactory()
            let t = table(factory)
            let port = TestSockets.freePorts(1).lowerBound
            try t.insert(id: 1, rule: Rule(proto: .tcp, address: ip2, firstPort: port, targetPort: 1))
            try t.insert(id: 2, rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: port, targetPort: 2))
            for id: UInt32 in specificFirst ? [1, 2] : [2, 1] {
                #expect(try t.activate(id: id) == .init(bound: 1, failed: 0), "\(id) after \(specificFirst)")
            }
            #expect(t.openSockets == 1, "the kernel refuses 127.0.0.2 beside 0.0.0.0: one socket serves both")
            let fd = t.listeningDescriptors[0]
            #expect(TestSockets.inode(fd) != nil)
            #expect(t.firstMatchTarget(listener: fd) { ip2 }?.port == 1)
            #expect(t.firstMatchTarget(listener: fd) { .loopbackIPv4 }?.port == 2)
            #expect(try t.portsWon(1) == 1 && t.portsWon(2) == 1)
            #expect(try t.listeners(of: 1).isEmpty && t.listeners(of: 2).map(\.fd) == [fd])
            // The wildcard rule leaves: the socket stays for the specific one, and what no
            // active rule matches is not dispatched.
            try t.deactivate(id: 2)
            #expect(t.listeningDescriptors == [fd])
            #expect(t.firstMatchTarget(listener: fd) { .loopbackIPv4 } == nil)
            #expect(t.firstMatchTarget(listener: fd) { ip2 }?.port == 1)
            try t.deactivate(id: 1)
            #expect(t.openSockets == 0 && factory.closed.count == factory.opens)
        }
    }

    @Test("a wider bind that fails leaves the narrower socket's rules served")
    func failedWideningReopens() throws {
        let factory = ScriptedListenerFactory()
        let t = table(factory)
        let port = TestSockets.freePorts(1).lowerBound
        try t.insert(id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port))
        try t.insert(id: 2, rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: port))
        try t.activate(id: 1)
        // Someone else holds 127.0.0.3 on the port: the wildcard cannot be bound, 127.0.0.1 can.
        let holder = try #require(TestSockets.bound(address: .v4(0x7F00_0003), port: port))
        #expect(try t.activate(id: 2) == .init(bound: 0, failed: 1))
        #expect(try t.status(1) == RuleStatus(active: true, bound: 1, failed: 0, lastError: nil))
        #expect(try t.portsWon(1) == 1 && t.portsWon(2) == 0 && t.openSockets == 1)
        #expect(factory.opens == 3, "the narrow socket was opened again after the wide bind failed")
        close(holder)
        #expect(t.retryFailedBinds() == [2])
        #expect(try t.status(2).bound == 1 && t.openSockets == 1)
        #expect(try t.portsWon(1) == 1 && t.portsWon(2) == 1)
        try t.deactivate(id: 1)
        try t.deactivate(id: 2)
        #expect(t.openSockets == 0)
    }

    @Test("scan rules share sockets like any other rule")
    func scanRulesShare() throws {
        let factory = ScriptedListenerFactory()
        let t = ForwardingTable(kind: .host, capabilities: Self.caps.union(.scan), overlapPolicy: .firstMatch, factory: factory)
        let ports = TestSockets.freePorts(3)
        try t.insert(
            id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.upperBound, scan: true))
        try t.insert(id: 2, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound))
        try t.activate(id: 2)
        try t.activate(id: 1)
        #expect(t.updateScan(id: 1) { _ in true })
        #expect(factory.opens == 3 && t.openSockets == 3)
        #expect(try t.portsWon(1) == 3 && t.portsWon(2) == 0, "the scan rule has the lower ID")
        #expect(t.updateScan(id: 1) { _ in false })
        #expect(try t.portsWon(1) == 0 && t.portsWon(2) == 1)
        #expect(factory.closed.count == 2 && t.openSockets == 1, "the port rule 2 still uses keeps its socket")
        try t.deactivate(id: 1)
        try t.deactivate(id: 2)
        #expect(t.openSockets == 0)
    }

    @Test("real relays: connections to the carved port go to the carve-out exactly while it is active; listeners keep their inodes")
    func relayFollowsWinner() throws {
        let loop = try EventLoop()
        var config = EngineConfiguration()
        config.overlap = .firstMatch
        let engine = try ForwardingEngine(loop: loop, configuration: config)
        let ports = TestSockets.freePorts(9)
        let range = ports.lowerBound...(ports.lowerBound + 3)
        let carved = range.lowerBound + 2
        // The range forwards port n to n + 4: echo servers on the targets of its first and
        // carved ports, and one for the carve-out.
        let a0 = try #require(EchoServer(port: range.lowerBound + 4))
        let a2 = try #require(EchoServer(port: carved + 4))
        let b = try #require(EchoServer(port: ports.upperBound))
        defer {
            a0.stop()
            a2.stop()
            b.stop()
        }
        let t = engine.host
        try t.insert(
            id: 100,
            rule: Rule(
                proto: .tcp, address: .anyIPv4, firstPort: range.lowerBound, lastPort: range.upperBound, targetAddress: .loopbackIPv4,
                targetPort: a0.port))
        try t.insert(
            id: 50, rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: carved, targetAddress: .loopbackIPv4, targetPort: b.port))
        try t.activate(id: 100)
        let listeners = t.listeningDescriptors
        let inodes = listeners.map(TestSockets.inode)
        /// Connects to `port` and waits until `server` has accepted `count` connections.
        func connect(_ port: UInt16, expecting server: EchoServer, _ count: Int) {
            guard case .success(let fd) = TestSockets.connect(port: port) else {
                Issue.record("connect to \(port) failed")
                return
            }
            defer { close(fd) }
            loop.turn(until: { server.accepted == count }, "connection to \(port) reaches \(server.port)")
        }
        for round in 1...100 {
            try t.activate(id: 50)
            connect(carved, expecting: b, round)
            connect(range.lowerBound, expecting: a0, round)
            try t.deactivate(id: 50)
            connect(carved, expecting: a2, round)
        }
        #expect(a0.accepted == 100 && a2.accepted == 100 && b.accepted == 100)
        #expect(t.listeningDescriptors == listeners && t.listeningDescriptors.map(TestSockets.inode) == inodes)
        #expect(engine.tcp.counters.unmatched == 0)
        try t.deactivate(id: 100)
    }

    @Test("real relays: UDP flows are dispatched by the datagram's destination (pktinfo) and keep their target")
    func udpDispatchByDestination() throws {
        let loop = try EventLoop()
        var config = EngineConfiguration()
        config.overlap = .firstMatch
        let engine = try ForwardingEngine(loop: loop, configuration: config)
        let ports = TestSockets.freePorts(3)
        let listen = ports.lowerBound
        let ip2 = IPAddress.v4(0x7F00_0002)
        let targetA = try #require(TestSockets.bound(Int32(SOCK_DGRAM.rawValue), port: ports.lowerBound + 1, listen: false))
        let targetB = try #require(TestSockets.bound(Int32(SOCK_DGRAM.rawValue), port: ports.upperBound, listen: false))
        defer {
            close(targetA)
            close(targetB)
        }
        let t = engine.host
        try t.insert(
            id: 2, rule: Rule(proto: .udp, address: .anyIPv4, firstPort: listen, targetAddress: .loopbackIPv4, targetPort: listen + 1))
        try t.insert(
            id: 1, rule: Rule(proto: .udp, address: ip2, firstPort: listen, targetAddress: .loopbackIPv4, targetPort: ports.upperBound))
        try t.activate(id: 2)
        try t.activate(id: 1)
        #expect(t.openSockets == 1)
        /// Sends one datagram to `address:listen` and returns where it arrived (A or B).
        func send(_ client: Int32, to address: IPAddress) -> String? {
            let payload: [UInt8] = [1, 2, 3]
            _ = TestSockets.withSocketAddress(address, listen) { sa, len in
                payload.withUnsafeBytes { sendto(client, $0.baseAddress, 3, 0, sa, len) } == 3
            }
            var buffer = [UInt8](repeating: 0, count: 16)
            var arrived: String? = nil
            loop.turn(
                until: {
                    if recv(targetA, &buffer, 16, Int32(MSG_DONTWAIT)) == 3 { arrived = "A" }
                    if recv(targetB, &buffer, 16, Int32(MSG_DONTWAIT)) == 3 { arrived = "B" }
                    return arrived != nil
                }, "datagram to \(address) relayed")
            return arrived
        }
        let client = try #require(TestTraffic.udpClient())
        defer { close(client) }
        #expect(send(client, to: ip2) == "B")
        #expect(send(client, to: .loopbackIPv4) == "A")
        // The carve-out leaves: its flow keeps its target; a new client to 127.0.0.2 goes to A.
        try t.deactivate(id: 1)
        #expect(send(client, to: ip2) == "B", "an existing flow keeps the target it started with")
        let client2 = try #require(TestTraffic.udpClient())
        defer { close(client2) }
        #expect(send(client2, to: ip2) == "A")
        try t.deactivate(id: 2)
    }
}
