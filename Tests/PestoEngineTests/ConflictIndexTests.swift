// SPDX-License-Identifier: GPL-2.0-or-later

// ConflictIndex agrees with Rule.conflicts(with:), and activation's conflict check costs a
// bounded amount of work per rule however many rules are active.

import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine

#if canImport(Glibc)
    import Glibc
#endif

/// A factory whose every bind fails at once with EADDRNOTAVAIL: activation without sockets.
final class RefusingListenerFactory: ListenerFactory {
    var opens = 0
    func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        opens += 1
        return .failure(Errno(rawValue: EADDRNOTAVAIL))
    }
    func closeListener(_ fd: Int32) { preconditionFailure("nothing was opened") }
}

@Suite("Conflict index", .timeLimit(.minutes(10)))
struct ConflictIndexTests {
    /// A random rule from a small universe, so that conflicts are frequent.
    static func randomRule(_ random: inout SeededRandom) -> Rule {
        let addresses: [IPAddress?] = [nil, .anyIPv4, .anyIPv6, .loopbackIPv4, .loopbackIPv6, IPAddress("127.0.0.2"), IPAddress("::2")]
        let first = UInt16(1 + random.below(12))
        let last = first + UInt16(random.below(3))
        return Rule(
            proto: random.oneIn(3) ? .udp : .tcp, address: random.pick(addresses),
            interface: random.pick(["", "", "eth0", "eth1"]), firstPort: first, lastPort: last)
    }

    @Test("the index says a rule conflicts exactly when some indexed rule conflicts with it")
    func agreesWithPairwise() {
        var random = SeededRandom(seed: 20_261_130)
        for _ in 0..<200 {
            var index = ConflictIndex()
            var indexed: [Rule] = []
            for _ in 0..<random.below(8) {
                let r = Self.randomRule(&random)
                index.add(r)
                indexed.append(r)
            }
            // Remove a few again, to check that counters go down exactly.
            for _ in 0..<random.below(3) where !indexed.isEmpty {
                index.remove(indexed.remove(at: random.below(indexed.count)))
            }
            for _ in 0..<20 {
                let probe = Self.randomRule(&random)
                let expected = indexed.contains { $0.conflicts(with: probe) }
                #expect(index.conflicts(with: probe) == expected, "\(probe) against \(indexed)")
            }
            for r in indexed { index.remove(r) }
            #expect(index.isEmpty, "every counter is gone once every rule is removed")
        }
    }

    @Test("activating 20,000 rules that share one port costs a bounded number of probes each, not one per active rule")
    func activationCostIsLinear() throws {
        let factory = RefusingListenerFactory()
        let n = 20_000
        let table = ForwardingTable(
            kind: .host, capabilities: [.ipv4, .ipv6, .tcp, .udp, .ifname], limits: .default, factory: factory)
        // Distinct addresses in 127.0.0.0/8 on one port: no two conflict, but every one
        // shares the port with all the others (the old check compared each with all).
        for k in 0..<n {
            try table.insert(id: UInt32(k + 1), rule: Rule(proto: .tcp, address: .v4(0x7F01_0000 + UInt32(k)), firstPort: 8080))
        }
        let before = table.conflictCheckCost
        for k in 0..<n { try table.activate(id: UInt32(k + 1)) }
        let cost = table.conflictCheckCost - before
        // Each activation: at most 6 probes to check its one port and 4 to index it.
        #expect(cost <= 10 * n, "\(cost) probes for \(n) activations (pairwise would be \(n * (n - 1) / 2))")
        #expect(table.activeCount == n && factory.opens == n)

        // A conflicting rule is still refused, naming the lowest conflicting active rule,
        // and the refusal changes nothing.
        try table.insert(id: 100_000, rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: 8080))
        do {
            try table.activate(id: 100_000)
            Issue.record("expected Conflict")
        } catch {
            #expect(error.code == .conflict)
            #expect(error.message.contains("active rule 1 "), "\(error.message)")
        }
        #expect(try table.status(100_000) == .inactive && table.activeCount == n)

        // Deactivating frees the ports in the index: the wildcard rule may now be activated.
        for k in 0..<n { try table.deactivate(id: UInt32(k + 1)) }
        try table.activate(id: 100_000)
        #expect(table.activeCount == 1)
    }
}
