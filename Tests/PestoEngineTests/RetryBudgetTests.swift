// SPDX-License-Identifier: GPL-2.0-or-later

// The retry pass's budget: one pass makes at most `retryBudget` socket attempts and the next
// continues where it stopped, round robin over the failed ports of all active rules.
// In process, with a factory that opens no sockets, so that tens of thousands of failing
// ports cost nothing but the table's own work.

import PestoSystem
import Testing

@testable import PestoEngine
@testable import PestoModel

/// A factory without sockets: each attempt is recorded and fails with the errno `failure`
/// gives for its port, or succeeds with a made-up descriptor (never a real one).
final class FakeListenerFactory: ListenerFactory {
    /// The ports tried, in order.
    var attempts: [UInt16] = []
    /// The errno of an attempt on a port, or nil for success.
    var failure: (UInt16) -> Errno? = { _ in .addressInUse }
    /// Made-up descriptors handed out so far, and closed.
    var opened = 0
    var closed = 0

    func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        attempts.append(port)
        if let e = failure(port) { return .failure(e) }
        opened += 1
        return .success(Int32(1_000_000 + opened))
    }

    func closeListener(_ fd: Int32) { closed += 1 }
}

@Suite("Retry budget", .timeLimit(.minutes(10)))
struct RetryBudgetTests {
    static let caps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname]

    func tcp(_ ports: ClosedRange<UInt16>, scan: Bool = false) -> Rule {
        Rule(proto: .tcp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.upperBound, scan: scan)
    }

    /// A table over `factory` with `rules` inserted and activated (all of them failing).
    func makeTable(_ factory: FakeListenerFactory, budget: Int? = nil, _ rules: [(UInt32, ClosedRange<UInt16>)]) throws -> ForwardingTable {
        let t = ForwardingTable(kind: .host, capabilities: Self.caps, factory: factory)
        if let budget { t.retryBudget = budget }
        for (id, ports) in rules {
            try t.insert(id: id, rule: tcp(ports))
            try t.activate(id: id)
        }
        factory.attempts = []
        return t
    }

    /// Runs one pass and returns the ports it tried.
    func pass(_ t: ForwardingTable, _ factory: FakeListenerFactory) -> [UInt16] {
        factory.attempts = []
        t.retryFailedBinds()
        return factory.attempts
    }

    @Test("an all-range rule of 65,535 failing ports: a pass makes 1,024 attempts, and 64 passes try each port once, in order")
    func budgetBoundsOnePass() throws {
        let factory = FakeListenerFactory()
        let t = try makeTable(factory, [(1, 1...65_535)])
        #expect(try t.status(1).failed == 65_535)

        let first = pass(t, factory)
        #expect(first.count == ForwardingTable.defaultRetryBudget, "one pass tried \(first.count) ports")
        let firstInOrder = first == Array(1...1_024)
        #expect(firstInOrder, "the first pass tries ports 1...1024")

        var tried = first
        for _ in 2...64 { tried += pass(t, factory) }
        #expect(tried.count == 64 * 1_024)
        let eachOnceInOrder = Array(tried.prefix(65_535)) == Array(1...65_535)
        #expect(eachOnceInOrder, "every port once, in port order")
        #expect(tried.last == 1, "then the cycle starts again at the first port")
        #expect(try t.status(1) == RuleStatus(active: true, bound: 0, failed: 65_535, lastError: .addressInUse))
        #expect(t.openSockets == 0)
    }

    @Test("several rules: passes walk one cycle over every failed port of the active rules, ID and port order")
    func roundRobinAcrossRules() throws {
        let factory = FakeListenerFactory()
        factory.failure = { port in (200...204).contains(port) && port % 2 == 0 ? nil : .noSuchDevice }
        let t = try makeTable(factory, budget: 7, [(30, 300...312), (10, 100...109), (20, 200...204), (50, 500...500)])
        try t.insert(id: 40, rule: tcp(400...420))  // inactive: never tried
        var reports: [RuleStateChange] = []
        t.onStateChange = { reports.append($0) }
        let cycle: [UInt16] = Array(100...109) + [201, 203] + Array(300...312) + [500]
        #expect(cycle.count == 26)

        var tried: [UInt16] = []
        for _ in 0..<11 {
            let ports = pass(t, factory)
            #expect(ports.count == 7)
            tried += ports
        }
        for (j, port) in tried.enumerated() {
            #expect(port == cycle[j % cycle.count], "attempt \(j)")
        }
        #expect(reports.isEmpty, "nothing changed, so nothing is reported")
        #expect(try t.status(20) == RuleStatus(active: true, bound: 3, failed: 2, lastError: .noSuchDevice))
    }

    @Test("failures clearing: the pass that started inside a rule and comes back to it reports each rule once")
    func clearingReportsOncePerPass() throws {
        let factory = FakeListenerFactory()
        let t = try makeTable(factory, budget: 7, [(10, 100...109), (20, 200...204), (30, 300...312)])
        var reports: [RuleStateChange] = []
        t.onStateChange = { reports.append($0) }
        for _ in 0..<4 { _ = pass(t, factory) }  // 28 of 28 attempts: the cursor is back at port 100
        _ = pass(t, factory)  // 100...106: the cursor is inside rule 10

        factory.failure = { _ in nil }
        t.retryBudget = 100
        factory.attempts = []
        let changed = t.retryFailedBinds()
        #expect(factory.attempts == Array(107...109) + Array(200...204) + Array(300...312) + Array(100...106))
        #expect(changed == [20, 30, 10], "rule 10 once, after the others")
        #expect(reports.map(\.id) == [20, 30, 10])
        for r in reports {
            #expect(r.cause == .retried && r.failuresChanged && r.status.failed == 0 && r.status.lastError == nil)
        }
        #expect(try t.status(10) == RuleStatus(active: true, bound: 10, failed: 0, lastError: nil))
        #expect(t.openSockets == 28)
        #expect(pass(t, factory).isEmpty && reports.count == 3, "nothing left to retry")
    }

    @Test("37,000 failing ports of one rule bind within ceil(37,000 / 1,024) = 37 passes once the failures clear")
    func clearsWithinExpectedPasses() throws {
        let factory = FakeListenerFactory()
        factory.failure = { _ in .noSuchDevice }
        let t = try makeTable(factory, [(1, 1...37_000)])
        for _ in 0..<5 { _ = pass(t, factory) }  // the cursor is somewhere inside the rule
        factory.failure = { _ in nil }
        var reports: [RuleStateChange] = []
        t.onStateChange = { reports.append($0) }

        var passes = 0
        while try t.status(1).failed > 0 && passes < 100 {
            _ = pass(t, factory)
            passes += 1
        }
        #expect(passes == 37)
        #expect(try t.status(1) == RuleStatus(active: true, bound: 37_000, failed: 0, lastError: nil))
        #expect(reports.count == 37 && reports.allSatisfy { $0.cause == .retried && $0.id == 1 })
        #expect(factory.opened == 37_000 && t.openSockets == 37_000)
    }

    @Test("rules inserted and deleted between passes: the cursor follows IDs, not positions")
    func cursorSurvivesInsertAndDelete() throws {
        let factory = FakeListenerFactory()
        let t = try makeTable(factory, budget: 4, [(10, 100...105), (20, 200...205), (30, 300...305)])
        #expect(pass(t, factory) == [100, 101, 102, 103])
        #expect(pass(t, factory) == [104, 105, 200, 201])

        // The cursor's rule goes away: the next pass starts at the next ID.
        try t.deactivate(id: 20)
        try t.delete(id: 20)
        #expect(pass(t, factory) == [300, 301, 302, 303])

        // A rule below the cursor is reached after the wrap, in ID order; deleting a rule
        // moves the last entry of the storage, which must not move the cursor.
        try t.insert(id: 5, rule: tcp(50...50))
        try t.activate(id: 5)
        try t.insert(id: 15, rule: tcp(150...152))
        try t.activate(id: 15)
        try t.deactivate(id: 5)
        try t.delete(id: 5)
        #expect(pass(t, factory) == [304, 305, 100, 101])
        #expect(pass(t, factory) == [102, 103, 104, 105])
        #expect(pass(t, factory) == [150, 151, 152, 300])

        // The cursor's rule replaced by a shorter one under the same ID: its slot is past the
        // end, so the pass goes on to the next rules and comes back to it last.
        #expect(pass(t, factory) == [301, 302, 303, 304])
        try t.deactivate(id: 30)
        try t.delete(id: 30)
        try t.insert(id: 30, rule: tcp(300...302))
        try t.activate(id: 30)
        t.retryBudget = 100
        #expect(pass(t, factory) == Array(100...105) + Array(150...152) + Array(300...302))
    }

    @Test("a pass still stops at the first EMFILE, and the next one continues after that port")
    func descriptorExhaustionStopsAPass() throws {
        let factory = FakeListenerFactory()
        let t = try makeTable(factory, budget: 100, [(1, 100...109)])
        factory.failure = { port in port == 103 ? .tooManyOpenFiles : .addressInUse }
        #expect(t.retryFailedBinds() == [1], "the last error changed to EMFILE")
        #expect(factory.attempts == [100, 101, 102, 103])
        #expect(try t.status(1).lastError == .tooManyOpenFiles)

        factory.failure = { _ in .addressInUse }
        #expect(pass(t, factory) == Array(104...109) + Array(100...103))
        #expect(try t.status(1) == RuleStatus(active: true, bound: 0, failed: 10, lastError: .addressInUse))
    }

    @Test("a scan rule's failed ports are retried by the same budgeted pass; its unwanted ports are not")
    func scanRuleFailuresAreRetried() throws {
        let factory = FakeListenerFactory()
        let t = try makeTable(factory, budget: 3, [(1, 100...103)])
        try t.insert(id: 2, rule: tcp(200...209, scan: true))
        try t.activate(id: 2)
        #expect(t.updateScan(id: 2, wanted: { $0 % 2 == 0 }))
        #expect(try t.status(2) == RuleStatus(active: true, bound: 0, failed: 5, lastError: .addressInUse))

        #expect(pass(t, factory) == [100, 101, 102])
        #expect(pass(t, factory) == [103, 200, 202])
        factory.failure = { _ in nil }
        var reports: [RuleStateChange] = []
        t.onStateChange = { reports.append($0) }
        #expect(pass(t, factory) == [204, 206, 208])
        #expect(pass(t, factory) == [100, 101, 102])
        #expect(pass(t, factory) == [103, 200, 202])
        #expect(try t.status(2) == RuleStatus(active: true, bound: 5, failed: 0, lastError: nil))
        #expect(reports.filter { $0.id == 2 }.count == 2 && reports.allSatisfy { $0.cause == .retried })
        #expect(try t.listeners(of: 2).map(\.port) == [200, 202, 204, 206, 208])
    }
}
