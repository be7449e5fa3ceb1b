// SPDX-License-Identifier: GPL-2.0-or-later

// The one rule every pesto client follows to choose new rules' IDs (doc/dbus-api.md,
// "Choosing rule IDs"), case by case as the document states it.

import PestoModel
import Testing

@Suite("Choosing rule IDs")
struct RuleIDProposerTests {
    /// The first `n` IDs proposed for a table holding `taken`.
    func proposals(_ taken: Set<UInt32>, _ n: Int) -> [UInt32?] {
        var proposer = RuleIDProposer(highestID: taken.max()) { taken.contains($0) }
        return (0..<n).map { _ in proposer.next() }
    }

    @Test("an empty table: 10, then steps of 10")
    func empty() { #expect(proposals([], 3) == [10, 20, 30]) }

    @Test("the highest ID rounded down to a multiple of 10, plus 10")
    func roundedDown() {
        #expect(proposals([37], 2) == [40, 50])
        #expect(proposals([40], 1) == [50])
        #expect(proposals([5, 9], 1) == [10])
    }

    @Test("an ID already taken is skipped upward one by one")
    func skipsTaken() {
        var proposer = RuleIDProposer(startingAt: 50) { [50, 51, 60].contains($0) }
        #expect(proposer.next() == 52)
        #expect(proposer.next() == 62, "steps of 10 from the previous proposal, 60 skipped")
    }

    @Test("at the top of the u32 range, the lowest free ID from 1 up")
    func wrapsToLowest() {
        #expect(proposals([UInt32.max - 3], 1) == [1])
        #expect(proposals([1, 2, 4_294_967_290], 3) == [3, 4, 5])
        var proposer = RuleIDProposer(startingAt: UInt32.max - 1) { $0 == 1 }
        #expect(proposer.next() == UInt32.max - 1)
        #expect(proposer.next() == 2, "max - 1 + 10 overflows")
    }
}
