// SPDX-License-Identifier: GPL-2.0-or-later

// RetryLogSummary: the log line for the bind retries of one loop turn.
//
// A retry pass may change the counts of thousands of rules at once (after an interface
// appears, say); one info line per rule would flood the journal and cost the loop as much as
// the retries. The server collects the changed rules of a turn here and logs, at its end,
// the rule itself when there was one, else one summary line per turn.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// The rules whose counts a bind retry changed since the last `take()`.
struct RetryLogSummary {
    private var count = 0
    private var first: (kind: TableKind, id: UInt32, status: RuleStatus)?
    private var bound = 0
    private var failed = 0

    /// Records one rule's new counts after a retry.
    mutating func add(_ kind: TableKind, _ id: UInt32, _ status: RuleStatus) {
        if count == 0 { first = (kind, id, status) }
        count += 1
        bound += Int(status.bound)
        failed += Int(status.failed)
    }

    /// The line to log for what was recorded (nil: nothing), and starts over.
    mutating func take() -> String? {
        defer { self = RetryLogSummary() }
        guard count > 0, let first else { return nil }
        if count == 1 {
            return "\(first.kind.name) rule \(first.id): retry now \(first.status.bound) bound, \(first.status.failed) failed"
        }
        return
            "bind retries changed \(ClientText.counted(count, "rule")): now \(ClientText.counted(bound, "socket")) bound, \(failed) failed in them"
    }
}
