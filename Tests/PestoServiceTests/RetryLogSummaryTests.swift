// SPDX-License-Identifier: GPL-2.0-or-later

// RetryLogSummary: a turn's retried rules make one log line, not one per rule.

import PestoEngine
import PestoModel
import PestoSystem
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("retry log summary", .timeLimit(.minutes(10)))
struct RetryLogSummaryTests {
    static func status(bound: UInt32, failed: UInt32) -> RuleStatus {
        var s = RuleStatus.inactive
        s.active = true
        s.bound = bound
        s.failed = failed
        return s
    }

    @Test("one rule is named; many make one summary line; take() starts over")
    func summary() {
        var s = RetryLogSummary()
        #expect(s.take() == nil)
        s.add(.host, 7, Self.status(bound: 2, failed: 0))
        #expect(s.take() == "HOST rule 7: retry now 2 bound, 0 failed")
        #expect(s.take() == nil)
        for id in UInt32(1)...1000 { s.add(.splice, id, Self.status(bound: 1, failed: 1)) }
        #expect(s.take() == "bind retries changed 1000 rules: now 1000 sockets bound, 1000 failed in them")
        #expect(s.take() == nil)
    }
}
