// SPDX-License-Identifier: GPL-2.0-or-later

// ConflictIndex: answers "does any of these rules conflict with this one?" without comparing
// the rule with every other.
//
// Theory of operation
// -------------------
// `Rule.conflicts(with:)` (Conflict.swift) says two rules conflict when they share a protocol
// and a port, their interfaces collide, and their addresses match. The index counts, for
// every (protocol, port) an indexed rule listens on, the indexed rules by *selectors* of their
// interface and address, chosen so that each question the conflict relation asks is a sum of
// a few counters:
//
//   an indexed rule S adds 1 to            interface: S's own ("" or its name), and
//                                                     `anyNamed` when S names one
//                                          address:   `dual` (no address), or `family(f)`
//                                                     and `wildcard(f)` / `exact(a)`
//   a rule R asks, for each of its ports   interface: "" and `anyNamed` when R names none,
//                                                     "" and R's name when it names one
//                                          address:   no address: `dual`, `family(v4)`,
//                                                     `family(v6)`; a wildcard of f: `dual`,
//                                                     `family(f)`; an address a of f: `dual`,
//                                                     `wildcard(f)`, `exact(a)`
//
// R conflicts with some indexed rule exactly when one asked counter is non-zero. The counters
// of one (interface, address) selector pair, a *class*, are one `PortCounts` (PortCounts.swift)
// over the (protocol, port) pairs, which keeps them in pages of 32 ports: adding, removing or
// checking a rule costs one dictionary probe per class and at most 4 (adding) or 6 (checking)
// probes per page of ports it covers, plus a plain loop over its ports, whatever the number
// of indexed rules. A 19,000-port rule thus costs about 1,200 probes, not 38,000 hashed keys.
// Classes and pages whose counters drop to zero are removed, so the index holds what the
// indexed rules need, not what they once needed.
//
// The index says whether a conflict exists, not with which rule: callers that must name the
// rule find it by a scan, which only runs when the operation fails anyway.

/// Counts of indexed rules by protocol, port, interface and address (see the theory above).
public struct ConflictIndex {
    /// The interface part of a counter's key.
    enum InterfaceSelector: Hashable {
        /// Rules naming no interface.
        case none
        /// Rules naming this interface.
        case named(String)
        /// Rules naming any interface.
        case anyNamed
    }

    /// The address part of a counter's key.
    enum AddressSelector: Hashable {
        /// Dual-stack rules (no address).
        case dual
        /// Rules with an address of this family, wildcard or not.
        case family(AddressFamily)
        /// Rules on this family's wildcard address.
        case wildcard(AddressFamily)
        /// Rules on exactly this (non-wildcard) address.
        case exact(IPAddress)
    }

    /// A class of counters: one interface selector with one address selector.
    struct Class: Hashable {
        var interface: InterfaceSelector
        var address: AddressSelector
    }

    /// The counters of each class with a non-zero one, by (protocol, port).
    private var counts: [Class: PortCounts] = [:]
    /// Dictionary probes made so far (a class and a page of ports each), for tests that check
    /// the cost does not grow with the number of indexed rules.
    package private(set) var probes = 0

    /// Makes an empty index.
    public init() {}

    /// True when nothing is indexed.
    public var isEmpty: Bool { counts.isEmpty }

    /// The (protocol, port) keys of `rule`'s ports.
    private static func keys(of rule: Rule) -> ClosedRange<UInt32> {
        let base: UInt32 = rule.proto == .tcp ? 0 : 0x1_0000
        return (base | UInt32(rule.firstPort))...(base | UInt32(rule.lastPort))
    }

    /// The selectors a rule is counted under.
    private static func selectors(of rule: Rule) -> (interfaces: [InterfaceSelector], addresses: [AddressSelector]) {
        let interfaces: [InterfaceSelector] = rule.interface.isEmpty ? [.none] : [.named(rule.interface), .anyNamed]
        let addresses: [AddressSelector]
        if let a = rule.address {
            addresses = [.family(a.family), a.isUnspecified ? .wildcard(a.family) : .exact(a)]
        } else {
            addresses = [.dual]
        }
        return (interfaces, addresses)
    }

    /// The selectors whose counters say whether a rule conflicts with an indexed one.
    private static func questions(for rule: Rule) -> (interfaces: [InterfaceSelector], addresses: [AddressSelector]) {
        let interfaces: [InterfaceSelector] = rule.interface.isEmpty ? [.none, .anyNamed] : [.none, .named(rule.interface)]
        let addresses: [AddressSelector]
        if let a = rule.address {
            addresses = a.isUnspecified ? [.dual, .family(a.family)] : [.dual, .wildcard(a.family), .exact(a)]
        } else {
            addresses = [.dual, .family(.ipv4), .family(.ipv6)]
        }
        return (interfaces, addresses)
    }

    /// Counts `rule` on every port of its range.
    public mutating func add(_ rule: Rule) {
        guard rule.lastPort >= rule.firstPort else { return }
        let (interfaces, addresses) = Self.selectors(of: rule)
        let keys = Self.keys(of: rule)
        for i in interfaces {
            for a in addresses {
                probes += 1 + counts[Class(interface: i, address: a), default: PortCounts()].increment(keys)
            }
        }
    }

    /// Stops counting `rule`, which must have been added.
    public mutating func remove(_ rule: Rule) {
        guard rule.lastPort >= rule.firstPort else { return }
        let (interfaces, addresses) = Self.selectors(of: rule)
        let keys = Self.keys(of: rule)
        for i in interfaces {
            for a in addresses {
                let c = Class(interface: i, address: a)
                guard counts[c] != nil else { preconditionFailure("ConflictIndex.remove of a rule not added") }
                probes += 1 + counts[c]!.decrement(keys)
                if counts[c]!.isEmpty { counts[c] = nil }
            }
        }
    }

    /// True when `rule` conflicts with some indexed rule (`Rule.conflicts(with:)`).
    public mutating func conflicts(with rule: Rule) -> Bool {
        guard !counts.isEmpty, rule.lastPort >= rule.firstPort else { return false }
        let (interfaces, addresses) = Self.questions(for: rule)
        let keys = Self.keys(of: rule)
        for i in interfaces {
            for a in addresses {
                probes += 1
                guard let c = counts[Class(interface: i, address: a)] else { continue }
                let (found, probed) = c.anyNonZero(in: keys)
                probes += probed
                if found { return true }
            }
        }
        return false
    }
}
