// SPDX-License-Identifier: GPL-2.0-or-later

// RuleIDProposer: the one rule every pesto client follows to choose the IDs of new rules
// (pestoctl, the control socket's uploads and, in JavaScript, the Cockpit page;
// doc/dbus-api.md, "Choosing rule IDs"):
//   - the first new rule of a change gets the table's highest ID rounded down to a multiple
//     of 10, plus 10 (10 in an empty table);
//   - further new rules of the same change continue in steps of 10 from the previous one;
//   - an ID already taken is skipped upward one by one;
//   - once the top of the u32 range is reached, the lowest free ID from 1 up.
// The gaps of 10 leave room for rules placed by hand between others (a rule's ID decides
// who wins a port under --overlap first-match). Proposing n IDs costs O(n) lookups when the
// table is not crowded at its top.

/// Proposes IDs for the new rules of one change to one table.
public struct RuleIDProposer {
    /// The distance between the IDs proposed for one change.
    public static let step: UInt32 = 10

    /// The next ID to try while counting up; nil once the top of the range was reached.
    private var candidate: UInt32?
    /// Where the search for the lowest free ID continues.
    private var lowest: UInt32 = 1
    /// IDs proposed so far (not yet in the table).
    private var proposed: Set<UInt32> = []
    /// Whether the table holds an ID.
    private let isTaken: (UInt32) -> Bool

    /// Proposes IDs for a table whose highest ID is `highestID` (nil: empty) and which holds
    /// the IDs for which `isTaken` is true.
    public init(highestID: UInt32?, isTaken: @escaping (UInt32) -> Bool) {
        let (sum, overflow) = ((highestID ?? 0) / Self.step * Self.step).addingReportingOverflow(Self.step)
        candidate = overflow ? nil : sum
        self.isTaken = isTaken
    }

    /// Proposes IDs from `first` on (a client's explicit choice, such as pestoctl's --id),
    /// then on by the same rule.
    public init(startingAt first: UInt32, isTaken: @escaping (UInt32) -> Bool) {
        candidate = max(first, 1)
        self.isTaken = isTaken
    }

    /// Whether `id` may be proposed.
    private func isFree(_ id: UInt32) -> Bool {
        id != 0 && !isTaken(id) && !proposed.contains(id)
    }

    /// The next ID; nil when every ID from 1 to 4294967295 is taken.
    public mutating func next() -> UInt32? {
        while var id = candidate {
            if isFree(id) {
                proposed.insert(id)
                let (after, overflow) = id.addingReportingOverflow(Self.step)
                candidate = overflow ? nil : after
                return id
            }
            let (after, overflow) = id.addingReportingOverflow(1)
            id = after
            candidate = overflow ? nil : id
        }
        while !isFree(lowest) {
            if lowest == .max { return nil }
            lowest += 1
        }
        proposed.insert(lowest)
        return lowest
    }
}
