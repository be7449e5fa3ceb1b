// SPDX-License-Identifier: GPL-2.0-or-later

// Matching a whole new table against the existing active rules: identical forwarding keeps
// a rule (whatever its owner), multiplicity counts, the lowest IDs are kept first.

import PestoModel
import Testing

@Suite("kept rules of a whole-table update")
struct KeptRulesTests {
    static func tcp(_ port: UInt16, owner: String = "") -> Rule { Rule(proto: .tcp, firstPort: port, owner: owner) }

    @Test("identical rules keep their IDs, new ones are inserted, the rest removed")
    func basic() {
        let existing = [(id: UInt32(1), rule: Self.tcp(80)), (2, Self.tcp(81)), (3, Self.tcp(82, owner: "podman"))]
        let kept = KeptRules(existing: existing, newRules: [Self.tcp(82), Self.tcp(83), Self.tcp(80)])
        #expect(kept.keptIDs == [3, nil, 1])
        #expect(kept.unmatched == [2])
    }

    @Test("multiplicity: two identical new rules keep at most two existing ones, lowest IDs first")
    func multiplicity() {
        let existing = [(id: UInt32(4), rule: Self.tcp(80)), (7, Self.tcp(80)), (9, Self.tcp(80))]
        let kept = KeptRules(existing: existing, newRules: [Self.tcp(80), Self.tcp(80)])
        #expect(kept.keptIDs == [4, 7])
        #expect(kept.unmatched == [9])
        let more = KeptRules(existing: Array(existing.prefix(1)), newRules: [Self.tcp(80), Self.tcp(80)])
        #expect(more.keptIDs == [4, nil])
        #expect(more.unmatched.isEmpty)
    }

    @Test("an empty new table removes everything; an empty old one inserts everything")
    func empty() {
        #expect(KeptRules(existing: [(id: 1, rule: Self.tcp(80))], newRules: []).unmatched == [1])
        #expect(KeptRules(existing: [], newRules: [Self.tcp(80)]).keptIDs == [nil])
    }
}
