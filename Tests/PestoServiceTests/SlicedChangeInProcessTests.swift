// SPDX-License-Identifier: GPL-2.0-or-later

// A large Apply is carried out over many loop turns (SlicedUpdate.swift), in process
// (InProcessPestod.swift): the server runs with a slice of one operation, so an Apply of a few
// hundred rules spans thousands of slices while the test runs in a second. Every assertion is
// about order, read from the port's record of what the server sent (the order a bus monitor
// sees), never about time. What needs pestod as a process (a control socket upload, SIGTERM,
// a takeover) stays in SlicedChangeTests.swift.

import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

@Suite(.serialized, .timeLimit(.minutes(10)))
struct SlicedChangeInProcessTests {
    /// Sends an Apply of `caller` without waiting; returns the call's serial.
    static func sendApply(_ f: InProcessPestod, _ caller: Caller, inserts: DBusValue, removes: [UInt32] = []) -> UInt32 {
        f.send(
            caller, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Apply",
            [inserts, .array(element: "u", removes.map { .uint32($0) }), .vardict([])])
    }

    /// Sends a Table call of `caller` without waiting; returns its serial.
    static func send(_ f: InProcessPestod, _ caller: Caller, _ member: String, _ args: [DBusValue]) -> UInt32 {
        f.send(caller, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: member, args)
    }

    /// Turns the loop, asking Status(id) of `caller` each time, until rule `id` is active (it
    /// is inserted and activated by an Apply in progress).
    static func waitUntilActive(_ f: InProcessPestod, _ id: UInt32, on caller: Caller) {
        f.loop.turn(
            until: {
                do throws(DBusErrorReply) {
                    return try f.table("Status", [.uint32(id)], on: caller).first == .bool(true)
                } catch {
                    #expect(error.name == PestoBusNames.errorName(.noSuchRule), "\(error)")
                    return false
                }
            }, "rule \(id) active")
    }

    /// The index in the port's record of the reply to call `serial`, running the loop until it is sent.
    static func replyIndex(_ f: InProcessPestod, _ serial: UInt32) -> Int? {
        _ = f.waitForReply(serial)
        return f.port.sent.firstIndex { !$0.isSignal && $0.replySerial == serial }
    }

    @Test(
        "during a large Apply, another client's Status is answered and a relayed connection moves bytes before the Apply's reply; its signals come complete, in order, before the reply"
    )
    func othersServedDuringLargeApply() throws {
        let f = try InProcessPestod(sliceOperations: 1)
        let ports = TestSockets.freePorts(2)
        let echo = try #require(EchoServer(port: ports.upperBound))
        defer { echo.stop() }
        let caller = f.newCaller()
        let other = f.newCaller()
        let ids = (1...400).map { UInt32(1000 + $0) }

        let start = f.port.sent.count
        let applySerial = Self.sendApply(
            f, caller, inserts: SlicedChangeTests.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        // The first rule is active while the Apply still has hundreds of rules to go.
        Self.waitUntilActive(f, ids[0], on: other)
        // A connection through it is relayed now, both ways.
        #expect(f.ping(.v4(0x7F04_0001), port: ports.lowerBound) == nil)
        // Then another Status: pestod answers it before the Apply's reply.
        let status = Self.send(f, other, "Status", [.uint32(ids[0])])
        let statusReply = Self.replyIndex(f, status)
        let applyReply = Self.replyIndex(f, applySerial)
        #expect(try #require(statusReply) < #require(applyReply), "the Status sent after the relayed bytes is answered first")
        let reply = f.port.sent[applyReply!]
        #expect(reply.isError == false, "\(reply.errorName ?? "")")

        // Every signal of the Apply, in the order of its steps, then the reply.
        let signals = f.port.sent[start..<applyReply!].filter(\.isSignal)
        #expect(reply.arguments?.first?.arrayValue?.count == ids.count)
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
        let f = try InProcessPestod(sliceOperations: 1)
        let ports = TestSockets.freePorts(3)
        let caller = f.newCaller()
        let other = f.newCaller()
        let ids = (1...400).map { UInt32(1000 + $0) }

        let applySerial = Self.sendApply(
            f, caller, inserts: SlicedChangeTests.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        Self.waitUntilActive(f, ids[0], on: other)
        // Another client: Insert then Activate rule 7, without waiting.
        let insert = Self.send(f, other, "Insert", [.uint32(7), PestodFixture.rule(ports.upperBound)])
        let activate = Self.send(f, other, "Activate", [.uint32(7)])
        // A third client sends an Insert of rule 8 and leaves before the Apply is done.
        let leaving = f.newCaller()
        _ = Self.send(f, leaving, "Insert", [.uint32(8), PestodFixture.rule(ports.lowerBound + 1)])
        f.leave(leaving)
        let activateReply = try #require(Self.replyIndex(f, activate))
        let applyReply = try #require(Self.replyIndex(f, applySerial))
        let insertReply = try #require(Self.replyIndex(f, insert))
        #expect(applyReply < insertReply && insertReply < activateReply, "Apply, then the Insert, then the Activate")
        #expect(f.port.sent[insertReply].isError == false && f.port.sent[activateReply].isError == false)
        // Rule 7's InterfacesAdded comes after every signal of the Apply.
        let added7 = try #require(
            f.port.sent.firstIndex {
                $0.isSignal && $0.member == "InterfacesAdded" && $0.arguments?.first == .objectPath(PestoBusNames.rulePath(.host, 7))
            })
        let lastOfApply = f.port.sent.lastIndex { m in
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
        let f = try InProcessPestod(sliceOperations: 1)
        let ports = TestSockets.freePorts(3)  // the rules' port, their target, rule 1's port
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.upperBound)])
        try f.table("Activate", [.uint32(1)])
        f.settle()
        let before = try f.snapshot()
        let caller = f.newCaller()
        let ids = (1...300).map { UInt32(1000 + $0) }
        // The last rule's address and port are taken by the test: it cannot bind.
        let n = ids.count - 1
        let holder = try #require(
            TestSockets.bound(address: .v4(0x7F04_0000 | UInt32(n / 250) << 8 | UInt32(n % 250 + 1)), port: ports.lowerBound))
        defer { close(holder) }
        let start = f.port.sent.count
        let serial = Self.sendApply(
            f, caller, inserts: SlicedChangeTests.rules(ids, port: ports.lowerBound, target: ports.lowerBound + 1), removes: [1])
        let replyIndex = try #require(Self.replyIndex(f, serial))
        #expect(f.port.sent[replyIndex].errorName == PestoBusNames.errorName(.bindFailed))
        let signals = f.port.sent[start..<replyIndex].filter(\.isSignal).map { "\($0.member ?? "") \($0.path ?? "")" }
        #expect(signals.isEmpty, "\(signals.prefix(5))")
        let after = try f.snapshot()
        #expect(after.rules == before.rules && after.objects == before.objects)
        #expect(after.sockets == before.sockets, "rule 1 kept its very socket, nothing else listens")
    }

    @Test(
        "a lock holder that leaves during its own large Apply: the Apply completes, then its transaction is rolled back and the lock released"
    )
    func holderLeavesDuringItsLargeApply() throws {
        let f = try InProcessPestod(sliceOperations: 1)
        let ports = TestSockets.freePorts(2)
        let watcher = f.watchSignals()
        let ids = (1...300).map { UInt32(1000 + $0) }
        let holder = f.newCaller()
        try f.manager("Lock", on: holder)
        _ = Self.sendApply(f, holder, inserts: SlicedChangeTests.rules(ids, port: ports.lowerBound, target: ports.upperBound))
        Self.waitUntilActive(f, ids[0], on: f.client)
        f.leave(holder)  // its Apply still in progress
        watcher.wait(for: "lock released") { m in
            m.member == "PropertiesChanged" && m.path == PestodFixture.managerPath
                && m.arguments?[1].vardictValue?.first?.1 == .string("")
        }
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)
        #expect(f.listeningSockets().isEmpty, "every socket of the rolled-back Apply is closed")
        #expect(f.log.contains("rolling back its 600 uncommitted changes"), "the whole Apply, completed first: \(f.log.suffix(2000))")
    }
}
