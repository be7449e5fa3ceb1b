// SPDX-License-Identifier: GPL-2.0-or-later

// PortCounts (the paged counters under ConflictIndex and the engine's own-port check) agrees
// with a plain dictionary of counters, across page boundaries and at the ends of the key
// space, and the conflict index built on it agrees with Rule.conflicts(with:) for rules
// whose ranges span several pages.

import PestoModel
import PestoTestSupport
import Testing

@Suite("Port counts", .timeLimit(.minutes(10)))
struct PortCountsTests {
    /// A random range of keys near a page boundary, the start or the end of the port space.
    static func randomRange(_ random: inout SeededRandom) -> ClosedRange<UInt32> {
        let anchors: [UInt32] = [0, 31, 32, 63, 64, 100, 0xFFFF - 40, 0x1_0000, 0x1_FFFF - 70]
        let low = random.pick(anchors) + UInt32(random.below(40))
        return low...(low + UInt32(random.below(random.oneIn(4) ? 150 : 5)))
    }

    @Test("counters agree with a dictionary of counters through increments, decrements and emptying")
    func agreesWithDictionary() {
        var random = SeededRandom(seed: 4_242)
        for _ in 0..<100 {
            var counts = PortCounts()
            var expected: [UInt32: UInt32] = [:]
            var added: [ClosedRange<UInt32>] = []
            for _ in 0..<(1 + random.below(12)) {
                if !added.isEmpty && random.oneIn(3) {
                    let r = added.remove(at: random.below(added.count))
                    counts.decrement(r)
                    for k in r { expected[k]! -= 1 }
                } else {
                    let r = Self.randomRange(&random)
                    counts.increment(r)
                    added.append(r)
                    for k in r { expected[k, default: 0] += 1 }
                }
                for _ in 0..<10 {
                    let q = Self.randomRange(&random)
                    #expect(counts.anyNonZero(in: q).found == q.contains { (expected[$0] ?? 0) > 0 }, "\(q) after \(added)")
                    let k = q.lowerBound
                    #expect(counts.count(k) == expected[k] ?? 0)
                }
            }
            for r in added { counts.decrement(r) }
            #expect(counts.isEmpty, "every page is gone once every range is taken back")
            #expect(!counts.anyNonZero(in: 0...0x1_FFFF).found)
        }
    }

    @Test("a range of many pages costs one probe per page, not one per key")
    func probesPerPage() {
        var counts = PortCounts()
        #expect(counts.increment(1024...20_023) == (20_023 / 32) - (1024 / 32) + 1)
        #expect(counts.anyNonZero(in: 0...1023).probed == 32)
        #expect(counts.decrement(1024...20_023) == (20_023 / 32) - (1024 / 32) + 1)
        #expect(counts.isEmpty)
    }

    /// A rule whose range may span pages, on a few addresses and interfaces.
    static func wideRule(_ random: inout SeededRandom) -> Rule {
        let addresses: [IPAddress?] = [nil, .anyIPv4, .anyIPv6, .loopbackIPv4, IPAddress("127.0.0.2")]
        let first = UInt16(random.pick([1, 30, 60, 65_400]) + random.below(40))
        let last = first + UInt16(random.below(random.oneIn(3) ? 90 : 3))
        return Rule(
            proto: random.oneIn(4) ? .udp : .tcp, address: random.pick(addresses),
            interface: random.pick(["", "", "eth0"]), firstPort: first, lastPort: last)
    }

    @Test("the conflict index agrees with the pairwise check for rules spanning several pages")
    func conflictIndexAcrossPages() {
        var random = SeededRandom(seed: 7_777)
        for _ in 0..<150 {
            var index = ConflictIndex()
            var indexed: [Rule] = []
            for _ in 0..<random.below(6) {
                let r = Self.wideRule(&random)
                index.add(r)
                indexed.append(r)
            }
            for _ in 0..<random.below(3) where !indexed.isEmpty {
                index.remove(indexed.remove(at: random.below(indexed.count)))
            }
            for _ in 0..<20 {
                let probe = Self.wideRule(&random)
                #expect(index.conflicts(with: probe) == indexed.contains { $0.conflicts(with: probe) }, "\(probe) against \(indexed)")
            }
            for r in indexed { index.remove(r) }
            #expect(index.isEmpty)
        }
    }
}
