// SPDX-License-Identifier: GPL-2.0-or-later

// BindRetry: a table's failed binds, tried again in bounded passes.
//
// Theory of operation
// -------------------
// retryFailedBinds() tries failed ports of active rules again (scan rules' too); the event
// loop calls it every second (`--retry-interval`). So that one pass never holds the loop for
// long, it makes at most `defaultRetryBudget` (1,024) socket attempts and the next pass
// continues where it stopped: a cursor (rule ID and port, not an array position, so it
// survives inserts and deletes) walks the failed ports of all active rules round robin in ID
// and port order. Every failed port is tried once before any is tried twice, and at least
// once every ceil(failed / 1,024) passes. A pass also stops at the first EMFILE/ENFILE.

import PestoModel
import PestoSystem

extension ForwardingTable {
    /// Tries again to bind failed sockets of active rules: at most `retryBudget` attempts,
    /// continuing in ID and port order from where the previous pass stopped.
    ///
    /// The failed ports of all active rules (scan rules included) form one cycle, in ID order
    /// and, within a rule, port order. A pass starts at `retryCursor` and walks the cycle once
    /// at most, stopping early when the budget is spent or at the first descriptor exhaustion
    /// (the remaining failures would fail the same way this pass); the cursor then names the
    /// port after the last one tried. Every failed port is thus tried once before any is tried
    /// twice, and within ceil(failed / budget) passes. The cursor is an ID and a slot, not a
    /// position, so inserts and deletes between passes move it to the next rule in ID order.
    ///
    /// Reports each rule whose counts changed to `onStateChange`, once per pass. When the pass
    /// starts inside a rule it may come back to that rule's first ports at the end: the rule
    /// is then reported once, last.
    /// - Returns: the IDs of the rules whose counts changed, in the order reported.
    @discardableResult
    public func retryFailedBinds() -> [UInt32] {
        let order = idsInOrder()
        guard !order.isEmpty else { return [] }
        var start = firstPosition(atLeast: retryCursor.id, in: order)
        var startSlot = 0
        if start == order.count {
            start = 0
        } else if order[start] == retryCursor.id {
            startSlot = retryCursor.slot
        }
        var changed: [UInt32] = []
        var attempts = 0
        // The first rule's counts before this pass, while its report waits for the end.
        var pending: (index: Int, before: RetryCounts)? = nil
        // Visit the first rule from `startSlot`, every other rule whole, and then, when the
        // pass started inside the first rule, that rule's slots before `startSlot`.
        let visits = startSlot > 0 ? order.count + 1 : order.count
        for step in 0..<visits {
            let id = order[(start + step) % order.count]
            let i = slots[id]!
            guard var sockets = entries[i].sockets, sockets.failed > 0 else { continue }
            // Taken out so that the slots below change in place, not in a copy; the factory and
            // the observer never read the table, so none sees the rule without its sockets.
            entries[i].sockets = nil
            let before = RetryCounts(sockets)
            let count = sockets.slots.count
            let segment =
                step == 0 ? min(startSlot, count)..<count : step == order.count ? 0..<min(startSlot, count) : 0..<count
            var stop = false
            let rule = entries[i].rule
            for k in segment where sockets.slots[k] == Self.failedSlot {
                if attempts == retryBudget {
                    retryCursor = (id, k)
                    stop = true
                    break
                }
                attempts += 1
                switch serve(id, rule, rule.firstPort + UInt16(k)) {
                case .success(let fd):
                    sockets.slots[k] = fd
                    sockets.bound += 1
                    sockets.failed -= 1
                case .failure(let e):
                    sockets.lastError = e
                    if e.isDescriptorExhaustion {
                        retryCursor = (id, k + 1)
                        stop = true
                    }
                }
                if stop { break }
            }
            if sockets.failed == 0 { sockets.lastError = nil }
            entries[i].sockets = sockets
            openSockets = overlapPolicy == .refuse ? openSockets + Int(sockets.bound) - Int(before.bound) : shared.count
            if step == 0 && startSlot > 0 {
                pending = (i, before)
            } else {
                reportRetry(i, before: step == order.count ? pending?.before ?? before : before, into: &changed)
                if step == order.count { pending = nil }
            }
            if stop { break }
        }
        if let pending { reportRetry(pending.index, before: pending.before, into: &changed) }
        reportPortsWon(except: nil)
        return changed
    }

    /// Most socket attempts of one retry pass, per table: 1,024. A failing attempt is a
    /// socket(), one or two setsockopt(), perhaps a bind(), and a close(): 10 to 50 µs on a
    /// busy 2-core host. Measured there (debug build), a pass over a 65,535-port rule on a
    /// missing interface takes 11 to 24 ms, where trying every port took 1.1 to 1.4 s, more
    /// than the default interval. Each of 65,535 failing ports is still retried within 64
    /// passes (about a minute at the default interval).
    public static let defaultRetryBudget = 1_024

    /// A rule's counts before a retry, to decide whether to report it.
    private struct RetryCounts {
        let bound: UInt32
        let failed: UInt32
        let lastError: Errno?

        init(_ sockets: RuleSockets) {
            (bound, failed, lastError) = (sockets.bound, sockets.failed, sockets.lastError)
        }
    }

    /// Reports the rule at `i` to `onStateChange` (and appends its ID to `changed`) when a
    /// retry changed its counts or last error since `before`.
    private func reportRetry(_ i: Int, before: RetryCounts, into changed: inout [UInt32]) {
        let sockets = entries[i].sockets!
        guard sockets.bound != before.bound || sockets.failed != before.failed || sockets.lastError != before.lastError else {
            return
        }
        changed.append(entries[i].id)
        onStateChange?(
            RuleStateChange(id: entries[i].id, status: sockets.status, cause: .retried, failuresChanged: sockets.failed != before.failed))
    }

    /// The position of the first ID not below `id` in the ascending `order` (`order.count`
    /// when every ID is below it).
    private func firstPosition(atLeast id: UInt32, in order: [UInt32]) -> Int {
        var (low, high) = (0, order.count)
        while low < high {
            let middle = (low + high) / 2
            if order[middle] < id { low = middle + 1 } else { high = middle }
        }
        return low
    }
}
