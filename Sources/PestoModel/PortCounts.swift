// SPDX-License-Identifier: GPL-2.0-or-later

// PortCounts: a counter for each of a few hundred thousand small keys (a protocol and port,
// perhaps a side), stored sparsely in pages so that counting a range of keys costs a
// dictionary probe per page, not per key.
//
// Theory of operation
// -------------------
// Keys are grouped in pages of `pageSize` consecutive keys. A page that holds a non-zero
// counter lives in `slots` (its `pageSize` counters followed by how many of them are
// non-zero); `pages` maps a page number to the page's first slot. Adding a range of keys
// probes `pages` once per page the range touches and then increments counters in a plain
// loop: a 19,000-port rule costs about 600 probes, not 19,000. A page whose counters all
// drop to zero leaves `pages` and its slots are reused by the next new page; when no page
// is left, the storage is released, so memory follows what is counted now, not the peak.
// A single key costs one probe, as a dictionary of keys would, and a page of 32 counters
// (132 bytes) is about what two dictionary entries cost.

/// Counters for keys below 2^32, kept in pages of consecutive keys (see the theory above).
public struct PortCounts {
    /// Keys per page.
    static let pageSize = 32
    private static let pageShift: UInt32 = 5
    /// Slots per page: the counters, then the number of non-zero counters.
    private static let stride = pageSize + 1

    /// Page number → the index of the page's first slot in `slots`.
    private var pages: [UInt32: Int] = [:]
    /// The pages' counters (see `stride`).
    private var slots: [UInt32] = []
    /// Pages of `slots` no longer in use (all their counters are zero).
    private var freePages: [Int] = []

    /// No counters.
    public init() {}

    /// True when every counter is zero.
    public var isEmpty: Bool { pages.isEmpty }

    /// The pages `range` touches, each with the part of `range` inside it.
    @inline(__always)
    private static func forEachPage(_ range: ClosedRange<UInt32>, _ body: (UInt32, ClosedRange<UInt32>) -> Void) {
        var low = range.lowerBound
        while true {
            let page = low >> pageShift
            let pageLast = page << pageShift | UInt32(pageSize - 1)
            let high = min(range.upperBound, pageLast)
            body(page, low...high)
            if high == range.upperBound { return }
            low = high + 1
        }
    }

    /// Adds one to the counter of every key in `range`.
    /// - Returns: the number of pages probed.
    @discardableResult
    public mutating func increment(_ range: ClosedRange<UInt32>) -> Int {
        var probed = 0
        Self.forEachPage(range) { page, keys in
            probed += 1
            let base: Int
            if let b = pages[page] {
                base = b
            } else if let b = freePages.popLast() {
                base = b
                pages[page] = b
            } else {
                base = slots.count
                slots.append(contentsOf: repeatElement(0, count: Self.stride))
                pages[page] = base
            }
            slots.withUnsafeMutableBufferPointer { s in
                let header = base + Self.pageSize
                for key in keys {
                    let i = base + Int(key & UInt32(Self.pageSize - 1))
                    if s[i] == 0 { s[header] += 1 }
                    s[i] += 1
                }
            }
        }
        return probed
    }

    /// Takes one from the counter of every key in `range`; each must be above zero.
    /// - Returns: the number of pages probed.
    @discardableResult
    public mutating func decrement(_ range: ClosedRange<UInt32>) -> Int {
        var probed = 0
        Self.forEachPage(range) { page, keys in
            probed += 1
            guard let base = pages[page] else { preconditionFailure("PortCounts.decrement of a key never incremented") }
            let emptied = slots.withUnsafeMutableBufferPointer { s -> Bool in
                let header = base + Self.pageSize
                for key in keys {
                    let i = base + Int(key & UInt32(Self.pageSize - 1))
                    precondition(s[i] > 0, "PortCounts.decrement below zero")
                    s[i] -= 1
                    if s[i] == 0 { s[header] -= 1 }
                }
                return s[header] == 0
            }
            if emptied {
                pages[page] = nil
                freePages.append(base)
            }
        }
        if pages.isEmpty {
            slots = []
            freePages = []
        }
        return probed
    }

    /// The counter of `key`.
    public func count(_ key: UInt32) -> UInt32 {
        guard let base = pages[key >> Self.pageShift] else { return 0 }
        return slots[base + Int(key & UInt32(Self.pageSize - 1))]
    }

    /// True when some key in `range` has a non-zero counter.
    /// - Returns: that, and the number of pages probed.
    public func anyNonZero(in range: ClosedRange<UInt32>) -> (found: Bool, probed: Int) {
        var probed = 0
        var found = false
        var low = range.lowerBound
        while !found {
            let page = low >> Self.pageShift
            let high = min(range.upperBound, page << Self.pageShift | UInt32(Self.pageSize - 1))
            probed += 1
            if let base = pages[page] {
                if high - low == UInt32(Self.pageSize - 1) {
                    found = true  // the whole page: it is in `pages`, so some counter is non-zero
                } else {
                    found = slots.withUnsafeBufferPointer { s in
                        (low...high).contains { s[base + Int($0 & UInt32(Self.pageSize - 1))] != 0 }
                    }
                }
            }
            if high == range.upperBound { break }
            low = high + 1
        }
        return (found, probed)
    }
}
