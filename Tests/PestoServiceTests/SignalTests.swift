// SPDX-License-Identifier: GPL-2.0-or-later

// Every signal of the contract, in process (InProcessPestod.swift: the signals the server
// sends on its port, in order with its replies); gdbus monitor's view needs the bus.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod signals (in process)", .timeLimit(.minutes(10)))
struct SignalTests {
    @Test("InterfacesAdded/Removed, RuleStateChanged, BindFailuresChanged (with a retry), PropertiesChanged")
    func signals() throws {
        var configuration = EngineConfiguration()
        configuration.retryIntervalMilliseconds = 50
        let f = try InProcessPestod(configuration: configuration)
        let signals = f.watchSignals()
        let ports = TestSockets.freePorts(2)
        let p = ports.lowerBound
        let rulePath = PestoBusNames.rulePath(.host, 7)
        let host = PestodFixture.hostPath

        try f.table("Insert", [.uint32(7), PestodFixture.rule(p, [("last-port", .uint16(p + 1))])])
        signals.wait(
            for: "InterfacesAdded", SignalCollector.signal("InterfacesAdded", path: PestodFixture.managerPath, [.objectPath(rulePath)]))
        signals.wait(for: "RuleCount 1") { m in
            m.member == "PropertiesChanged" && m.path == host
                && m.arguments?[1].vardictValue?.contains { $0.0 == "RuleCount" && $0.1 == .uint32(1) } == true
        }

        // Hold one port: activation binds 1 of 2, then the retry binds the other once freed.
        let holder = try #require(TestSockets.bound(port: p + 1))
        #expect(try f.table("Activate", [.uint32(7)]) == [.uint32(1), .uint32(1)])
        signals.wait(
            for: "RuleStateChanged active",
            SignalCollector.signal("RuleStateChanged", path: host, [.uint32(7), .bool(true), .uint32(1), .uint32(1)]))
        signals.wait(
            for: "BindFailuresChanged 1",
            SignalCollector.signal("BindFailuresChanged", path: host, [.uint32(7), .uint32(1), .string("EADDRINUSE")]))
        signals.wait(for: "rule PropertiesChanged") { m in
            m.member == "PropertiesChanged" && m.path == rulePath
                && m.arguments?[1].vardictValue?.contains { $0.0 == "BindFailures" && $0.1 == .uint32(1) } == true
        }
        close(holder)
        signals.wait(
            for: "BindFailuresChanged 0 after retry",
            SignalCollector.signal("BindFailuresChanged", path: host, [.uint32(7), .uint32(0), .string("")]))
        signals.wait(
            for: "RuleStateChanged after retry",
            SignalCollector.signal("RuleStateChanged", path: host, [.uint32(7), .bool(true), .uint32(2), .uint32(0)]))
        // A rule's PropertiesChanged carries only what changed: the retry leaves Active alone
        // (PortsWon follows BoundSockets under the default overlap policy, refuse).
        signals.wait(for: "rule PropertiesChanged after retry, without Active") { m in
            m.member == "PropertiesChanged" && m.path == rulePath
                && m.arguments?[1].vardictValue?.map(\.0) == ["BoundSockets", "BindFailures", "LastError", "PortsWon"]
        }
        #expect(try f.table("Status", [.uint32(7)]) == [.bool(true), .uint32(2), .uint32(0), .string(""), .uint32(2)])

        try f.table("Deactivate", [.uint32(7)])
        signals.wait(
            for: "RuleStateChanged inactive",
            SignalCollector.signal("RuleStateChanged", path: host, [.uint32(7), .bool(false), .uint32(0), .uint32(0)]))
        signals.wait(for: "rule PropertiesChanged on deactivation: Active, BoundSockets and PortsWon only") { m in
            m.member == "PropertiesChanged" && m.path == rulePath
                && m.arguments?[1].vardictValue?.map(\.0) == ["Active", "BoundSockets", "PortsWon"]
        }
        try f.table("Delete", [.uint32(7)])
        signals.wait(
            for: "InterfacesRemoved", SignalCollector.signal("InterfacesRemoved", path: PestodFixture.managerPath, [.objectPath(rulePath)]))

        // The lock owner is announced too.
        try f.manager("Lock")
        signals.wait(for: "LockOwner") { m in
            m.member == "PropertiesChanged" && m.path == PestodFixture.managerPath
                && m.arguments?[1].vardictValue?.first?.1 == .string(f.client.uniqueName)
        }
        try f.manager("Unlock")
    }

    @Test("An Apply announces the table counters once, with their final values, before its reply; every per-rule signal stays")
    func countersCoalescedBeforeReply() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(3)
        let ids: [UInt32] = [21, 22, 23]
        let inserts = zip(ids, ports).map { DBusValue.structure([.uint32($0), PestodFixture.rule($1)]) }
        let serial = f.send(
            path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Apply",
            [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([])])
        let reply = try #require(f.waitForReply(serial))
        #expect(reply.arguments?.first?.arrayValue?.count == 3)
        // The signals sent before the reply, in the order they went out.
        let before = Array(f.port.sent.prefix { $0 !== reply }.filter(\.isSignal))

        let counters = before.filter { $0.member == "PropertiesChanged" && $0.path == PestodFixture.hostPath }
        #expect(counters.count == 1, "one counters' PropertiesChanged for the whole Apply, not one per insert and activation")
        let announced = Dictionary(counters.first?.arguments?[1].vardictValue ?? [], uniquingKeysWith: { a, _ in a })
        #expect(announced == ["RuleCount": .uint32(3), "ActiveCount": .uint32(3), "SocketCount": .uint32(3)])
        // The per-rule signals are all still there, one of each per rule.
        for id in ids {
            let path = PestoBusNames.rulePath(.host, id)
            #expect(
                before.filter(SignalCollector.signal("InterfacesAdded", path: PestodFixture.managerPath, [.objectPath(path)])).count == 1)
            #expect(
                before.filter(
                    SignalCollector.signal(
                        "RuleStateChanged", path: PestodFixture.hostPath, [.uint32(id), .bool(true), .uint32(1), .uint32(0)])
                ).count == 1)
            #expect(before.filter { $0.member == "PropertiesChanged" && $0.path == path }.count == 1)
        }
    }

    @Test("a rolled-back Apply emits no signal: watchers never see the rules it inserted and activated on the way")
    func rolledBackApplyIsSilent() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(2)
        let holder = try #require(TestSockets.bound(port: ports.upperBound))
        defer { close(holder) }
        let inserts = [
            DBusValue.structure([.uint32(31), PestodFixture.rule(ports.lowerBound)]),
            .structure([.uint32(32), PestodFixture.rule(ports.upperBound)]),
        ]
        do {
            _ = try f.table("Apply", [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([])])
            Issue.record("expected BindFailed")
        } catch {
            #expect(error.name == PestoBusNames.errorName(.bindFailed), "\(error)")
        }
        f.settle()  // and nothing at the end of the turn either
        let before = f.port.signals.map { "\($0.member ?? "") \($0.path ?? "")" }
        #expect(before.isEmpty, "no InterfacesAdded, RuleStateChanged or counters for a change that never happened: \(before)")
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)
    }
}

/// Signals as a bus monitor sees them.
@Suite("pestod signals over the bus", .serialized, .timeLimit(.minutes(10)))
struct SignalOverBusTests {
    @Test("gdbus monitor sees the signals too")
    func gdbusMonitor() throws {
        let f = try PestodFixture()
        let monitor = try ChildProcess("/usr/bin/gdbus", ["monitor", "--address", f.address, "--dest", PestoBusNames.busName])
        #expect(monitor.readLine()?.hasPrefix("Monitoring signals") == true)
        #expect(monitor.readLine()?.hasPrefix("The name top.passt.Pesto1 is owned by") == true)
        // gdbus filters signals by the owner's unique name, which it learns asynchronously, so
        // its first signals can be lost. Readiness handshake: insert and delete probe rules
        // until gdbus prints one of them.
        var probe: UInt32 = 1000
        var subscribed = false
        while !subscribed && probe < 1020 {
            try f.table("Insert", [.uint32(probe), PestodFixture.rule(1)])
            try f.table("Delete", [.uint32(probe)])
            while let line = monitor.readLine(timeoutMilliseconds: 500) {
                if line.contains("rules/\(probe)") { subscribed = true }
            }
            probe += 1
        }
        #expect(subscribed, "gdbus monitor never showed a probe signal")
        let port = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(3), PestodFixture.rule(port)])
        try f.table("Activate", [.uint32(3)])
        var lines: [String] = []
        while let line = monitor.readLine() {
            lines.append(line)
            if line.contains("RuleStateChanged") { break }
        }
        #expect(lines.contains { $0.contains("InterfacesAdded") })
        #expect(lines.last?.contains("top.passt.Pesto1.Table.RuleStateChanged (uint32 3, true, uint32 1, uint32 0)") == true)
        monitor.kill()
    }
}
