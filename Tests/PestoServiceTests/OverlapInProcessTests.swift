// SPDX-License-Identifier: GPL-2.0-or-later

// pestod --overlap first-match in process (doc/overlap.md; InProcessPestod.swift): a
// carve-out toggled 100 times over an active range changes no listening socket and fails no
// connection, new connections to the carved port reach the carve-out exactly while it is
// active, and a transaction that changed which rule wins a port is rolled back. Real sockets
// and real connections through the engine; the clients run on helper threads while the
// test's thread turns the loop that serves them.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("pestod --overlap first-match (in process)", .serialized, .timeLimit(.minutes(10)))
struct OverlapInProcessTests {
    /// A TCP rule description: `first...last` on `address`, forwarded to 127.0.0.1 `target`.
    static func rule(_ first: UInt16, _ last: UInt16? = nil, to target: UInt16, address: String = "0.0.0.0") -> DBusValue {
        .vardict([
            ("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(first)),
            ("last-port", .uint16(last ?? first)), ("target-address", .string("127.0.0.1")), ("target-port", .uint16(target)),
        ])
    }

    /// A range of `count` ports forwarded to echo servers (port n to n + count), and the
    /// carve-out's echo server on the port after them.
    struct Servers {
        let range: ClosedRange<UInt16>
        let targets: [EchoServer]
        let carveOut: EchoServer

        init(count: Int) throws {
            let ports = TestSockets.freePorts(2 * count + 1)
            range = ports.lowerBound...(ports.lowerBound + UInt16(count) - 1)
            targets = try (0..<count).map { k in try #require(EchoServer(port: ports.lowerBound + UInt16(count + k))) }
            carveOut = try #require(EchoServer(port: ports.upperBound))
        }

        var targetBase: UInt16 { targets[0].port }

        func stop() {
            for s in targets { s.stop() }
            carveOut.stop()
        }
    }

    /// An in-process pestod with `--overlap first-match`.
    static func firstMatch() throws -> InProcessPestod {
        var configuration = EngineConfiguration()
        configuration.overlap = .firstMatch
        return try InProcessPestod(configuration: configuration)
    }

    /// Rule `id`'s PortsWon.
    static func portsWon(_ f: InProcessPestod, _ id: UInt32) throws -> DBusValue? {
        try f.property(PestoBusNames.rulePath(.host, id), PestoInterfaces.rule.name, "PortsWon")
    }

    /// The HOST table's OverlapPolicy.
    static func overlapPolicy(_ f: InProcessPestod) throws -> DBusValue? {
        try f.property(PestodFixture.hostPath, PestoInterfaces.table.name, "OverlapPolicy")
    }

    @Test(
        "100 carve-out toggles over a range: same listener inodes, no failed connect, carved port reaches the carve-out exactly while active",
        .timeLimit(.minutes(3))
    )
    func carveOutToggles() throws {
        let f = try Self.firstMatch()
        #expect(try Self.overlapPolicy(f) == .string("first-match"))
        let servers = try Servers(count: 8)
        defer { servers.stop() }
        let carved = servers.range.lowerBound + 3
        let rule = Self.rule
        try f.table("Insert", [.uint32(100), rule(servers.range.lowerBound, servers.range.upperBound, servers.targetBase, "0.0.0.0")])
        try f.table("Insert", [.uint32(50), rule(carved, nil, servers.carveOut.port, "0.0.0.0")])
        try f.table("Activate", [.uint32(100)])
        let sockets = f.listeningSockets()
        #expect(sockets.count == 8, "\(sockets)")
        #expect(try Self.portsWon(f, 100) == .uint32(8))

        // A client loop on every port of the range but the carved one, for the whole run; the
        // loop serves it whenever the test's thread turns it (each ping below, and the end).
        let stop = Atomic<Bool>(false)
        let done = Atomic<Bool>(false)
        let connects = Atomic<Int>(0)
        let failures = Mutex<[String]>([])
        let others = servers.range.filter { $0 != carved }
        detachThread {
            var k = 0
            while !stop.load(ordering: .relaxed) {
                let port = others[k % others.count]
                if let failure = TestTraffic.ping(port: port) { failures.withLock { $0.append("\(port): \(failure)") } }
                connects.add(1, ordering: .relaxed)
                k += 1
            }
            done.store(true, ordering: .relaxed)
        }
        let carvedTarget = servers.targets[Int(carved - servers.range.lowerBound)]
        var carvedFailures: [String] = []
        for round in 1...100 {
            #expect(try f.table("Activate", [.uint32(50)]) == [.uint32(1), .uint32(0)])
            if let failure = f.ping(port: carved) { carvedFailures.append("active \(round): \(failure)") }
            if servers.carveOut.accepted != round { carvedFailures.append("round \(round): not at the carve-out") }
            try f.table("Deactivate", [.uint32(50)])
            if let failure = f.ping(port: carved) { carvedFailures.append("inactive \(round): \(failure)") }
            if carvedTarget.accepted != round { carvedFailures.append("round \(round): not at the range's target") }
        }
        stop.store(true, ordering: .relaxed)
        f.loop.turn(forever: { done.load(ordering: .relaxed) })  // the client loop's last ping is bounded
        #expect(carvedFailures.isEmpty, "\(carvedFailures.prefix(5))")
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0.prefix(5) })")
        #expect(connects.load(ordering: .relaxed) > 0)
        #expect(f.listeningSockets() == sockets, "every listener kept its inode through the toggles")
        #expect(try Self.portsWon(f, 100) == .uint32(8) && Self.portsWon(f, 50) == .uint32(0))
        // Read by Status and List as before: the carve-out's port counted bound while active.
        #expect(try f.table("Activate", [.uint32(50)]) == [.uint32(1), .uint32(0)])
        #expect(try Self.portsWon(f, 100) == .uint32(7) && Self.portsWon(f, 50) == .uint32(1))
        #expect(try f.table("Status", [.uint32(50)]) == [.bool(true), .uint32(1), .uint32(0), .string(""), .uint32(1)])
    }

    @Test(
        "a Rollback under the lock and a lock holder leaving undo a change of winner; sockets unchanged", .timeLimit(.minutes(2)))
    func rollbackRestoresWinner() throws {
        let f = try Self.firstMatch()
        let servers = try Servers(count: 4)
        defer { servers.stop() }
        let carved = servers.range.lowerBound + 1
        let carvedTarget = servers.targets[1]
        let rule = Self.rule
        try f.table("Insert", [.uint32(100), rule(servers.range.lowerBound, servers.range.upperBound, servers.targetBase, "0.0.0.0")])
        try f.table("Activate", [.uint32(100)])
        let sockets = f.listeningSockets()

        // Rollback by the holder.
        try f.manager("Lock")
        try f.table("Insert", [.uint32(5), rule(carved, nil, servers.carveOut.port, "127.0.0.1")])
        try f.table("Activate", [.uint32(5)])
        // 127.0.0.1 is the carve-out's; the range still wins the port for its other addresses.
        #expect(try Self.portsWon(f, 5) == .uint32(1) && Self.portsWon(f, 100) == .uint32(4))
        #expect(f.ping(port: carved) == nil && servers.carveOut.accepted == 1)
        #expect(f.ping(.v4(0x7F00_0002), port: carved) == nil && carvedTarget.accepted == 1)
        try f.manager("Rollback")
        #expect(try Self.portsWon(f, 100) == .uint32(4))
        #expect(f.ping(port: carved) == nil && carvedTarget.accepted == 2 && servers.carveOut.accepted == 1)
        try f.manager("Unlock")

        // The holder leaves the bus (signals from now on: the lock's release comes last).
        let signals = f.watchSignals()
        let holder = f.newCaller()
        try f.manager("Lock", on: holder)
        try f.table("Insert", [.uint32(5), rule(carved, nil, servers.carveOut.port, "0.0.0.0")], on: holder)
        try f.table("Activate", [.uint32(5)], on: holder)
        #expect(try Self.portsWon(f, 5) == .uint32(1) && Self.portsWon(f, 100) == .uint32(3), "0.0.0.0: the whole port is 5's")
        #expect(f.ping(port: carved) == nil && servers.carveOut.accepted == 2)
        f.leave(holder)
        signals.wait(for: "lock released") { m in
            m.member == "PropertiesChanged" && m.path == PestodFixture.managerPath
                && m.arguments?[1].vardictValue?.first?.1 == .string("")
        }
        #expect(f.errorName { () throws(DBusErrorReply) in _ = try f.table("Status", [.uint32(5)]) } == "top.passt.Pesto1.Error.NoSuchRule")
        #expect(try Self.portsWon(f, 100) == .uint32(4))
        #expect(f.ping(port: carved) == nil && carvedTarget.accepted == 3 && servers.carveOut.accepted == 2)
        #expect(f.listeningSockets() == sockets, "the range's listeners kept their inodes through both rollbacks")
    }

    @Test("the default is refuse: OverlapPolicy says so and an overlap is a Conflict")
    func defaultRefuses() throws {
        let f = try InProcessPestod()
        #expect(try Self.overlapPolicy(f) == .string("refuse"))
        let ports = TestSockets.freePorts(3)
        let rule = Self.rule
        try f.table("Insert", [.uint32(100), rule(ports.lowerBound, ports.lowerBound + 1, ports.upperBound, "0.0.0.0")])
        try f.table("Insert", [.uint32(50), rule(ports.lowerBound, nil, ports.upperBound, "0.0.0.0")])
        try f.table("Activate", [.uint32(100)])
        #expect(
            f.errorName { () throws(DBusErrorReply) in _ = try f.table("Activate", [.uint32(50)]) } == "top.passt.Pesto1.Error.Conflict")
        #expect(try Self.portsWon(f, 100) == .uint32(2) && Self.portsWon(f, 50) == .uint32(0))
    }
}
