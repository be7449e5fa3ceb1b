// SPDX-License-Identifier: GPL-2.0-or-later

// A large Apply over many loop turns (SlicedUpdate.swift) where only pestod as a process
// shows it: a control socket upload waiting behind it, SIGTERM during it (with the state file),
// and a takeover waiting for it. pestod is started with `--slice-operations 1`, so an Apply of
// a few hundred rules spans thousands of slices while the test runs in a second. Every
// assertion is about order, seen by a bus monitor or by the caller's own connection, never
// about time. The rest runs in process (SlicedChangeInProcessTests.swift).

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

@Suite(.serialized, .timeLimit(.minutes(10)))
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
        "a control socket upload sent during a large Apply is applied after it (it replaces the whole HOST table, the Apply's rules included)",
        .timeLimit(.minutes(3))
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
        "SIGTERM during a large Apply: the Apply is rolled back and its caller told so; pestod exits 0 and the state file keeps what was acknowledged",
        .timeLimit(.minutes(3))
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
        "a takeover that starts during a large Apply waits for it: the Apply is answered by the old pestod, and the new one has all its rules",
        .timeLimit(.minutes(3))
    )
    func takeoverWaitsForLargeApply() throws {
        let arguments = ["--runtime-dir", "RUNTIME", "--state", "STATE", "--slice-operations", "1"]
        let f = try PestodFixture(pestodArguments: arguments)
        let ports = TestSockets.freePorts(2)
        let caller = try DBusConnection(.address(f.address))
        // 2,500 rules, one operation a turn: once the first is active, 2,499 activations
        // (as many loop turns) remain, which outlasts starting the successor even on an idle
        // machine (400 did not always: the Apply could end before the takeover asked).
        let ids = (1...2500).map { UInt32(1000 + $0) }
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
