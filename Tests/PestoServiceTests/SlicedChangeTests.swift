// SPDX-License-Identifier: GPL-2.0-or-later

// A large Apply is carried out over many loop turns (SlicedUpdate.swift): pestod is started
// with `--slice-operations 1`, so an Apply of a few hundred rules spans thousands of slices
// while the test runs in a second. Every assertion is about order, seen by a bus monitor
// (which gets pestod's messages in the order it sent them) or by the caller's own connection,
// never about time.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// A connection that became a bus monitor: it receives a copy of every message the bus
/// routes, in the order the bus routes them (each sender's own messages in its order).
final class BusMonitor {
    let connection: DBusConnection
    private(set) var seen: [DBusMessage] = []

    init(address: String) throws {
        connection = try DBusConnection(.address(address))
        _ = try connection.call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.Monitoring", "BecomeMonitor",
            [.strings([]), .uint32(0)])
    }

    /// Reads messages until one satisfies `predicate` (10 s at most); returns its index in `seen`.
    func index(of description: String, _ predicate: (DBusMessage) -> Bool) -> Int? {
        if let i = seen.firstIndex(where: predicate) { return i }
        let deadline = MonotonicInstant.now.adding(milliseconds: 10_000)
        while MonotonicInstant.now < deadline {
            guard let m = connection.nextMessage(timeoutMilliseconds: 200) else { continue }
            seen.append(m)
            if predicate(m) { return seen.count - 1 }
        }
        Issue.record("the monitor never saw \(description)")
        return nil
    }

    /// A method return (or error) to `destination` answering its call `serial`.
    static func reply(to destination: String, serial: UInt32) -> (DBusMessage) -> Bool {
        { m in !m.isSignal && !m.isMethodCall && m.destination == destination && m.replySerial == serial }
    }
}

@Suite(.serialized)
struct SlicedChangeTests {
    /// rules on 127.4.0.x (one per address, all on `port`), forwarding to `target` on loopback.
    static func rules(_ ids: [UInt32], port: UInt16, target: UInt16) -> DBusValue {
        .array(
            element: "(ua{sv})",
            ids.enumerated().map { n, id in
                .structure([
                    .uint32(id),
                    PestodFixture.rule(
                        port, [("target-address", .string("127.0.0.1")), ("target-port", .uint16(target))],
                        address: "127.4.\(n / 250).\(n % 250 + 1)"),
                ])
            })
    }

    /// Sends an Apply on `connection` without waiting; returns the call's serial.
    static func sendApply(_ connection: DBusConnection, inserts: DBusValue, removes: [UInt32] = []) -> UInt32 {
        let m = DBusMessage.methodCall(
            destination: PestodFixture.dest, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Apply",
            arguments: [inserts, .array(element: "u", removes.map { .uint32($0) }), .vardict([])])
        connection.send(m)
        connection.flush()
        return m.serial
    }

    /// Calls Status(id) on `connection` until rule `id` is active (it is inserted and
    /// activated by an Apply in progress); returns how many calls it took.
    @discardableResult
    static func waitUntilActive(_ f: PestodFixture, _ id: UInt32, on connection: DBusConnection) throws -> Int {
        for calls in 1...100_000 {
            do {
                if try f.table("Status", [.uint32(id)], on: connection).first == .bool(true) { return calls }
            } catch {
                #expect(error.name == PestoBusNames.errorName(.noSuchRule), "\(error)")
            }
        }
        throw HarnessError("rule \(id) never became active")
    }

    @Test(
        "during a large Apply, another client's Status is answered and a relayed connection moves bytes before the Apply's reply; its signals come complete, in order, before the reply"
    )
    func othersServedDuringLargeApply() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1"])
        let ports = TestSockets.freePorts(2)
        let echo = try #require(EchoServer(port: ports.upperBound))
        defer { echo.stop() }
        let monitor = try BusMonitor(address: f.address)
        let caller = try SignalCollector(address: f.address)
        let other = try DBusConnection(.address(f.address))
        let ids = (1...400).map { UInt32(1000 + $0) }

        let applySerial = Self.sendApply(caller.connection, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        // The first rule is active while the Apply still has hundreds of rules to go.
        try Self.waitUntilActive(f, ids[0], on: other)
        // A connection through it is relayed now, both ways.
        #expect(TestTraffic.ping(.v4(0x7F04_0001), port: ports.lowerBound) == nil)
        // Then another Status: pestod answers it before the Apply's reply.
        let status = DBusMessage.methodCall(
            destination: PestodFixture.dest, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Status",
            arguments: [.uint32(ids[0])])
        _ = try other.call(status)
        let statusReply = monitor.index(of: "the Status reply", BusMonitor.reply(to: other.uniqueName, serial: status.serial))
        let applyReply = monitor.index(of: "the Apply reply", BusMonitor.reply(to: caller.connection.uniqueName, serial: applySerial))
        #expect(try #require(statusReply) < #require(applyReply), "the Status sent after the relayed bytes is answered first")
        #expect(monitor.seen[applyReply!].isError == false, "\(monitor.seen[applyReply!].errorName ?? "")")

        // The caller's connection: every signal of the Apply, in the order of its steps, then the reply.
        var signals: [DBusMessage] = []
        var reply: DBusMessage?
        while reply == nil, let m = caller.connection.nextMessage(timeoutMilliseconds: 10_000) {
            if m.isSignal, m.sender != "org.freedesktop.DBus" { signals.append(m) } else if m.replySerial == applySerial { reply = m }
        }
        #expect(reply?.arguments?.first?.arrayValue?.count == ids.count)
        let added = signals.filter { $0.member == "InterfacesAdded" }.map { $0.arguments?.first }
        let states = signals.filter { $0.member == "RuleStateChanged" }.map { $0.arguments?.first }
        #expect(added == ids.map { .objectPath(PestoBusNames.rulePath(.host, $0)) }, "one InterfacesAdded per rule, in order")
        #expect(states == ids.map { .uint32($0) }, "one RuleStateChanged per rule, in order")
        let lastAdded = signals.lastIndex { $0.member == "InterfacesAdded" } ?? .max
        let firstState = signals.firstIndex { $0.member == "RuleStateChanged" } ?? -1
        #expect(lastAdded < firstState, "every insert is announced before the first activation, as the steps ran")
        let counters = signals.filter { $0.member == "PropertiesChanged" && $0.path == PestodFixture.hostPath }
        #expect(counters.count == 1, "the table counters once, before the reply")
    }

    @Test(
        "changes sent during a large Apply by another client run after it, in their order; one from a client that leaves meanwhile is dropped"
    )
    func heldBackChangesRunAfterInOrder() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1"])
        let ports = TestSockets.freePorts(3)
        let monitor = try BusMonitor(address: f.address)
        let caller = try DBusConnection(.address(f.address))
        let other = try DBusConnection(.address(f.address))
        let ids = (1...400).map { UInt32(1000 + $0) }

        let applySerial = Self.sendApply(caller, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        try Self.waitUntilActive(f, ids[0], on: other)
        // Another client: Insert then Activate rule 7, without waiting.
        func send(_ c: DBusConnection, _ member: String, _ args: [DBusValue]) -> UInt32 {
            let m = DBusMessage.methodCall(
                destination: PestodFixture.dest, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: member,
                arguments: args)
            c.send(m)
            c.flush()
            return m.serial
        }
        let insert = send(other, "Insert", [.uint32(7), PestodFixture.rule(ports.upperBound)])
        let activate = send(other, "Activate", [.uint32(7)])
        // A third client sends an Insert of rule 8 and leaves before the Apply is done.
        do {
            let leaving = try DBusConnection(.address(f.address))
            _ = send(leaving, "Insert", [.uint32(8), PestodFixture.rule(ports.lowerBound + 1)])
            // Its departure is seen by pestod after its call (the bus keeps that order).
            _ = try f.table("Status", [.uint32(ids[0])], on: leaving)
        }
        let applyReply = try #require(monitor.index(of: "the Apply reply", BusMonitor.reply(to: caller.uniqueName, serial: applySerial)))
        let insertReply = try #require(monitor.index(of: "the Insert reply", BusMonitor.reply(to: other.uniqueName, serial: insert)))
        let activateReply = try #require(monitor.index(of: "the Activate reply", BusMonitor.reply(to: other.uniqueName, serial: activate)))
        #expect(applyReply < insertReply && insertReply < activateReply, "Apply, then the Insert, then the Activate")
        #expect(monitor.seen[insertReply].isError == false && monitor.seen[activateReply].isError == false)
        // Rule 7's InterfacesAdded comes after every signal of the Apply.
        let added7 = try #require(
            monitor.index(of: "InterfacesAdded of rule 7") {
                $0.isSignal && $0.member == "InterfacesAdded" && $0.arguments?.first == .objectPath(PestoBusNames.rulePath(.host, 7))
            })
        let lastOfApply = monitor.seen.lastIndex { m in
            m.isSignal && m.member == "RuleStateChanged" && m.arguments?.first == .uint32(ids.last!)
        }
        #expect(try #require(lastOfApply) < added7)
        #expect(try f.table("Status", [.uint32(7)]).first == .bool(true))
        let rule8 = f.errorName { () throws(DBusErrorReply) in _ = try f.table("Status", [.uint32(8)]) }
        #expect(rule8 == PestoBusNames.errorName(.noSuchRule), "the change of the client that left never ran")
        #expect(f.log.contains("with 1 changes held back behind a change in progress; they are dropped"), "\(f.log.suffix(2000))")
    }

    @Test("a large Apply that fails on its last rule is rolled back completely, with no signal, and the table is as before")
    func failingLargeApplyRollsBack() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1"])
        let ports = TestSockets.freePorts(3)  // the rules' port, their target, rule 1's port
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.upperBound)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()
        let caller = try SignalCollector(address: f.address)
        let ids = (1...300).map { UInt32(1000 + $0) }
        // The last rule's address and port are taken by the test: it cannot bind.
        let n = ids.count - 1
        let holder = try #require(
            TestSockets.bound(address: .v4(0x7F04_0000 | UInt32(n / 250) << 8 | UInt32(n % 250 + 1)), port: ports.lowerBound))
        defer { close(holder) }
        let serial = Self.sendApply(
            caller.connection, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.lowerBound + 1), removes: [1])
        var signals: [String] = []
        var reply: DBusMessage?
        while reply == nil, let m = caller.connection.nextMessage(timeoutMilliseconds: 10_000) {
            if m.isSignal, m.sender != "org.freedesktop.DBus" {
                signals.append("\(m.member ?? "") \(m.path ?? "")")
            } else if m.replySerial == serial {
                reply = m
            }
        }
        #expect(reply?.errorName == PestoBusNames.errorName(.bindFailed))
        #expect(signals.isEmpty, "\(signals.prefix(5))")
        let after = try f.snapshot()
        #expect(after.rules == before.rules && after.objects == before.objects)
        #expect(after.sockets == before.sockets, "rule 1 kept its very socket, nothing else listens")
    }

    @Test(
        "a control socket upload sent during a large Apply is applied after it (it replaces the whole HOST table, the Apply's rules included)"
    )
    func uploadWaitsBehindLargeApply() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1", "--control", "CONTROL"])
        let ports = TestSockets.freePorts(3)
        let monitor = try BusMonitor(address: f.address)
        let caller = try DBusConnection(.address(f.address))
        let ids = (1...400).map { UInt32(1000 + $0) }
        let applySerial = Self.sendApply(caller, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        try Self.waitUntilActive(f, ids[0], on: f.client)

        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        _ = try #require(client.readHelloAndDump())
        client.send([1] + WireClient.be32(1) + WireClient.rule(first: ports.lowerBound + 1, target: ports.upperBound) + [0])
        shutdown(client.fd, Int32(SHUT_WR))
        var byte: UInt8 = 0
        #expect(recv(client.fd, &byte, 1, 0) == 0, "pestod closes the session once the upload is applied")

        let applyReply = try #require(monitor.index(of: "the Apply reply", BusMonitor.reply(to: caller.uniqueName, serial: applySerial)))
        #expect(monitor.seen[applyReply].isError == false, "\(monitor.seen[applyReply].errorName ?? "")")
        let firstRemoved = try #require(
            monitor.index(of: "the upload's first InterfacesRemoved") { $0.isSignal && $0.member == "InterfacesRemoved" })
        #expect(applyReply < firstRemoved, "the upload ran after the Apply was complete and answered")
        let rules = try #require(try f.table("List").first?.arrayValue)
        #expect(rules.count == 1, "only the uploaded rule is left")
        #expect(f.log.contains("control socket: update applied (0 kept, 1 added, 400 removed)"), "\(f.log.suffix(2000))")
    }

    @Test(
        "a lock holder that leaves during its own large Apply: the Apply completes, then its transaction is rolled back and the lock released"
    )
    func holderLeavesDuringItsLargeApply() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1"])
        let ports = TestSockets.freePorts(2)
        let watcher = try SignalCollector(address: f.address)
        let ids = (1...300).map { UInt32(1000 + $0) }
        do {
            let holder = try DBusConnection(.address(f.address))
            try f.manager("Lock", on: holder)
            _ = Self.sendApply(holder, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.upperBound))
            try Self.waitUntilActive(f, ids[0], on: f.client)
        }  // the holder's connection closes here, its Apply still in progress
        f.waitForLockRelease(watcher)
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)
        #expect(f.listeningSockets().isEmpty, "every socket of the rolled-back Apply is closed")
        #expect(f.log.contains("rolling back its 600 uncommitted changes"), "the whole Apply, completed first: \(f.log.suffix(2000))")
    }

    @Test(
        "SIGTERM during a large Apply: the Apply is rolled back and its caller told so; pestod exits 0 and the state file keeps what was acknowledged"
    )
    func stopDuringLargeApply() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "1", "--state", "STATE"])
        let ports = TestSockets.freePorts(3)
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.upperBound)])
        try f.table("Activate", [.uint32(1)])
        let caller = try DBusConnection(.address(f.address))
        let ids = (1...400).map { UInt32(1000 + $0) }
        let serial = Self.sendApply(caller, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.lowerBound + 1))
        try Self.waitUntilActive(f, ids[0], on: f.client)
        kill(f.pestod.pid, SIGTERM)
        var reply: DBusMessage?
        while reply == nil, let m = caller.nextMessage(timeoutMilliseconds: 10_000) {
            if m.replySerial == serial { reply = m }
        }
        #expect(reply?.errorName == PestoBusNames.errorName(.locked), "\(reply?.errorName ?? "no reply")")
        #expect(reply?.arguments?.first?.stringValue?.contains("rolled back") == true)
        #expect(f.pestod.waitUntilExit() == 0)
        try f.startPestod(["--state", "STATE"])
        let rules = try #require(try f.table("List").first?.arrayValue)
        #expect(rules.count == 1, "rule 1, acknowledged before, is kept; nothing of the Apply")
        #expect(try f.table("Status", [.uint32(1)]).first == .bool(true))
    }

    @Test(
        "a takeover that starts during a large Apply waits for it: the Apply is answered by the old pestod, and the new one has all its rules"
    )
    func takeoverWaitsForLargeApply() throws {
        let arguments = ["--runtime-dir", "RUNTIME", "--state", "STATE", "--slice-operations", "1"]
        let f = try PestodFixture(pestodArguments: arguments)
        let ports = TestSockets.freePorts(2)
        let caller = try DBusConnection(.address(f.address))
        let ids = (1...400).map { UInt32(1000 + $0) }
        let serial = Self.sendApply(caller, inserts: Self.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        try Self.waitUntilActive(f, ids[0], on: f.client)
        let oldLog = f.logFile
        #expect(try f.takeOver(arguments) == 0)
        var reply: DBusMessage?
        while reply == nil, let m = caller.nextMessage(timeoutMilliseconds: 10_000) {
            if m.replySerial == serial { reply = m }
        }
        #expect(reply?.isError == false, "\(reply?.errorName ?? "no reply")")
        #expect(reply?.arguments?.first?.arrayValue?.count == ids.count)
        let rules = try #require(try f.table("List").first?.arrayValue)
        #expect(rules.count == ids.count, "the new pestod has every rule of the Apply")
        #expect(try f.table("Status", [.uint32(ids.last!)]).first == .bool(true))
        #expect((readTextFile(oldLog.path) ?? "").contains("takeover waits: a change in progress holds the lock"))
    }
}
