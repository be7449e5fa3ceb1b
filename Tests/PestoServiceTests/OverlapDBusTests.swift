// SPDX-License-Identifier: GPL-2.0-or-later

// pestod --overlap first-match over D-Bus (doc/overlap.md): a carve-out toggled 100 times
// over an active range changes no listening socket and fails no connection, new connections
// to the carved port reach the carve-out exactly while it is active, and a transaction that
// changed which rule wins a port is rolled back.

import Foundation
import PestoDBus
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("pestod --overlap first-match over D-Bus", .serialized)
struct OverlapDBusTests {
    /// A TCP rule description: `first...last` on `address`, forwarded to 127.0.0.1 `target`.
    static func rule(_ first: UInt16, _ last: UInt16? = nil, to target: UInt16, address: String = "0.0.0.0") -> DBusValue {
        .vardict([
            ("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(first)),
            ("last-port", .uint16(last ?? first)), ("target-address", .string("127.0.0.1")), ("target-port", .uint16(target)),
        ])
    }

    /// A property of an object of pestod's.
    static func property(_ f: PestodFixture, _ path: String, _ interface: String, _ name: String) throws -> DBusValue? {
        try f.client.call(PestodFixture.dest, path, "org.freedesktop.DBus.Properties", "Get", [.string(interface), .string(name)])
            .first?.variantValue
    }

    /// Rule `id`'s PortsWon.
    static func portsWon(_ f: PestodFixture, _ id: UInt32) throws -> DBusValue? {
        try property(f, PestoBusNames.rulePath(.host, id), PestoInterfaces.rule.name, "PortsWon")
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

    @Test(
        "100 carve-out toggles over a range: same listener inodes, no failed connect, carved port reaches the carve-out exactly while active"
    )
    func carveOutToggles() throws {
        let f = try PestodFixture(pestodArguments: ["--overlap", "first-match"])
        #expect(
            try Self.property(f, PestodFixture.hostPath, PestoInterfaces.table.name, "OverlapPolicy") == .string("first-match"))
        let servers = try Servers(count: 8)
        defer { servers.stop() }
        let carved = servers.range.lowerBound + 3
        try f.table("Insert", [.uint32(100), Self.rule(servers.range.lowerBound, servers.range.upperBound, to: servers.targetBase)])
        try f.table("Insert", [.uint32(50), Self.rule(carved, to: servers.carveOut.port)])
        try f.table("Activate", [.uint32(100)])
        let sockets = f.listeningSockets()
        #expect(sockets.count == 8, "\(sockets)")
        #expect(try Self.portsWon(f, 100) == .uint32(8))

        // A client loop on every port of the range but the carved one, for the whole run.
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
            if let failure = TestTraffic.ping(port: carved) { carvedFailures.append("active \(round): \(failure)") }
            if servers.carveOut.accepted != round { carvedFailures.append("round \(round): not at the carve-out") }
            try f.table("Deactivate", [.uint32(50)])
            if let failure = TestTraffic.ping(port: carved) { carvedFailures.append("inactive \(round): \(failure)") }
            if carvedTarget.accepted != round { carvedFailures.append("round \(round): not at the range's target") }
        }
        stop.store(true, ordering: .relaxed)
        while !done.load(ordering: .relaxed) { usleep(1000) }  // the client loop's last ping has a 5 s bound
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

    @Test("a Rollback under the lock and a lock holder leaving undo a change of winner; sockets unchanged")
    func rollbackRestoresWinner() throws {
        let f = try PestodFixture(pestodArguments: ["--overlap", "first-match"])
        let servers = try Servers(count: 4)
        defer { servers.stop() }
        let carved = servers.range.lowerBound + 1
        let carvedTarget = servers.targets[1]
        try f.table("Insert", [.uint32(100), Self.rule(servers.range.lowerBound, servers.range.upperBound, to: servers.targetBase)])
        try f.table("Activate", [.uint32(100)])
        let sockets = f.listeningSockets()

        // Rollback by the holder.
        try f.manager("Lock")
        try f.table("Insert", [.uint32(5), Self.rule(carved, to: servers.carveOut.port, address: "127.0.0.1")])
        try f.table("Activate", [.uint32(5)])
        // 127.0.0.1 is the carve-out's; the range still wins the port for its other addresses.
        #expect(try Self.portsWon(f, 5) == .uint32(1) && Self.portsWon(f, 100) == .uint32(4))
        #expect(TestTraffic.ping(port: carved) == nil && servers.carveOut.accepted == 1)
        #expect(TestTraffic.ping(.v4(0x7F00_0002), port: carved) == nil && carvedTarget.accepted == 1)
        try f.manager("Rollback")
        #expect(try Self.portsWon(f, 100) == .uint32(4))
        #expect(TestTraffic.ping(port: carved) == nil && carvedTarget.accepted == 2 && servers.carveOut.accepted == 1)
        try f.manager("Unlock")

        // The holder leaves the bus (signals from now on: the lock's release comes last).
        let signals = try SignalCollector(address: f.address)
        var holder: DBusConnection? = try DBusConnection(.address(f.address))
        try f.manager("Lock", on: holder)
        try f.table("Insert", [.uint32(5), Self.rule(carved, to: servers.carveOut.port)], on: holder)
        try f.table("Activate", [.uint32(5)], on: holder)
        #expect(try Self.portsWon(f, 5) == .uint32(1) && Self.portsWon(f, 100) == .uint32(3), "0.0.0.0: the whole port is 5's")
        #expect(TestTraffic.ping(port: carved) == nil && servers.carveOut.accepted == 2)
        holder = nil
        f.waitForLockRelease(signals)
        #expect(f.errorName { () throws(DBusErrorReply) in _ = try f.table("Status", [.uint32(5)]) } == "top.passt.Pesto1.Error.NoSuchRule")
        #expect(try Self.portsWon(f, 100) == .uint32(4))
        #expect(TestTraffic.ping(port: carved) == nil && carvedTarget.accepted == 3 && servers.carveOut.accepted == 2)
        #expect(f.listeningSockets() == sockets, "the range's listeners kept their inodes through both rollbacks")
    }

    @Test("the default is refuse: OverlapPolicy says so and an overlap is a Conflict")
    func defaultRefuses() throws {
        let f = try PestodFixture()
        #expect(try Self.property(f, PestodFixture.hostPath, PestoInterfaces.table.name, "OverlapPolicy") == .string("refuse"))
        let ports = TestSockets.freePorts(3)
        try f.table("Insert", [.uint32(100), Self.rule(ports.lowerBound, ports.lowerBound + 1, to: ports.upperBound)])
        try f.table("Insert", [.uint32(50), Self.rule(ports.lowerBound, to: ports.upperBound)])
        try f.table("Activate", [.uint32(100)])
        #expect(
            f.errorName { () throws(DBusErrorReply) in _ = try f.table("Activate", [.uint32(50)]) } == "top.passt.Pesto1.Error.Conflict")
        #expect(try Self.portsWon(f, 100) == .uint32(2) && Self.portsWon(f, 50) == .uint32(0))
    }
}

@Suite("pestod --overlap first-match: control socket and --state", .serialized)
struct OverlapOtherPathsTests {
    @Test("an upstream upload of a range and a port inside it: refused under refuse, applied under first-match")
    func uploadOverlap() throws {
        for firstMatch in [false, true] {
            let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"] + (firstMatch ? ["--overlap", "first-match"] : []))
            let ports = TestSockets.freePorts(4)
            let p = ports.lowerBound
            let client = try #require(WireClient(path: f.controlPath))
            defer { close(client.fd) }
            #expect(client.readHelloAndDump() != nil)
            // The single port first (upstream's first rule wins), then the range around it.
            client.send(
                [1] + WireClient.be32(2) + WireClient.rule(first: p + 1, target: p + 3)
                    + WireClient.rule(first: p, last: p + 2, target: p) + [0])
            shutdown(client.fd, Int32(SHUT_WR))
            var byte: UInt8 = 0
            #expect(recv(client.fd, &byte, 1, 0) == 0)
            let list = try f.table("List").first?.arrayValue ?? []
            if firstMatch {
                #expect(list.count == 2, "\(list)")
                #expect(f.listeningSockets().count == 3, "one socket per port, the carved one shared")
                let won = list.compactMap { $0.structValue?[2].structValue?[4].uint32Value }
                #expect(won == [1, 2], "the single port (lower ID) wins its port; the range the other two")
                let server = try #require(EchoServer(port: p + 3))
                defer { server.stop() }
                #expect(TestTraffic.ping(port: p + 1) == nil && server.accepted == 1)
            } else {
                #expect(list.isEmpty && f.listeningSockets().isEmpty, "an overlapping upload changes nothing")
            }
        }
    }

    @Test("pestoctl replacing a range's target under first-match: the new rule takes the range's sockets over unclosed")
    func pestoctlReplaceKeepsSockets() throws {
        for firstMatch in [false, true] {
            let f = try PestodFixture(pestodArguments: firstMatch ? ["--overlap", "first-match"] : [])
            let p = TestSockets.freePorts(8)
            let (a, b) = (p.lowerBound, p.lowerBound + 3)
            var r = try f.pestoctl(["-t", "127.0.0.1/\(a)-\(b)"])
            #expect(r.status == 0, "\(r.err)")
            let before = f.listeningSockets()
            r = try f.pestoctl(["-t", "127.0.0.1/\(a)-\(b):\(b + 1)-\(b + 4)"])
            #expect(r.status == 0, "\(r.err)")
            let after = f.listeningSockets()
            #expect(before.count == 4 && after.count == 4)
            if firstMatch {
                #expect(after == before, "same inodes: the sockets were handed over, never closed")
            } else {
                #expect(Set(after).isDisjoint(with: before), "refuse: the old rule's sockets close before the new one binds")
            }
        }
    }

    @Test("--state restores overlapping active rules under first-match, each winning what it won before")
    func stateRestore() throws {
        let f = try PestodFixture(pestodArguments: ["--state", "STATE", "--overlap", "first-match"])
        let ports = TestSockets.freePorts(4)
        try f.table("Insert", [.uint32(10), OverlapDBusTests.rule(ports.lowerBound, ports.lowerBound + 3, to: 9)])
        try f.table("Insert", [.uint32(5), OverlapDBusTests.rule(ports.lowerBound + 1, to: 9, address: "127.0.0.1")])
        try f.table("Activate", [.uint32(10)])
        try f.table("Activate", [.uint32(5)])
        let listed = try f.table("List")
        #expect(f.listeningSockets().count == 4)
        f.pestod.kill()
        try f.startPestod(["--state", "STATE", "--overlap", "first-match"])
        #expect(try f.table("List") == listed, "both active again, with the same counts and ports won")
        #expect(f.listeningSockets().count == 4, "the carve-out (activated first, by ID) was widened into the range's socket")
        #expect(f.log.contains("restored 2 of 2 rules"))
    }
}

@Suite("pestod --overlap first-match: takeover", .serialized)
struct OverlapTakeoverTests {
    @Test("pestod --replace hands shared sockets over: a range and a carve-out on its binding keep every inode and their winners")
    func takeoverKeepsSharedSockets() throws {
        let arguments = ["--runtime-dir", "RUNTIME", "--state", "STATE", "--overlap", "first-match"]
        let f = try PestodFixture(pestodArguments: arguments)
        let ports = TestSockets.freePorts(5)
        let range = ports.lowerBound...(ports.lowerBound + 3)
        let carveOut = try #require(EchoServer(port: ports.upperBound))
        defer { carveOut.stop() }
        try f.table("Insert", [.uint32(100), OverlapDBusTests.rule(range.lowerBound, range.upperBound, to: 9)])
        try f.table("Insert", [.uint32(50), OverlapDBusTests.rule(range.lowerBound + 1, to: carveOut.port)])
        try f.table("Activate", [.uint32(100)])
        try f.table("Activate", [.uint32(50)])
        let sockets = f.listeningSockets()
        let listed = try f.table("List")
        #expect(sockets.count == 4)
        #expect(try f.takeOver(arguments) == 0)
        #expect(f.listeningSockets() == sockets, "every listener, the shared one included, kept its inode")
        #expect(try f.table("List") == listed)
        #expect(TestTraffic.ping(port: range.lowerBound + 1) == nil && carveOut.accepted == 1, "the carve-out still wins its port")
    }
}
