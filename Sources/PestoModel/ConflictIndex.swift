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
// R conflicts with some indexed rule exactly when one asked counter is non-zero. So adding,
// removing or checking a rule costs at most 4 (adding) or 6 (checking) dictionary probes per
// port, whatever the number of indexed rules. Counters that drop to zero are removed, so the
// index holds at most 4 entries per indexed (rule, port) pair, usually 1.
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

    /// One counter's key.
    struct Key: Hashable {
        var protoPort: UInt32
        var interface: InterfaceSelector
        var address: AddressSelector
    }

    private var counts: [Key: Int] = [:]
    /// Dictionary probes made so far, for tests that check the cost does not grow with the
    /// number of indexed rules.
    package private(set) var probes = 0

    /// Makes an empty index.
    public init() {}

    /// True when nothing is indexed.
    public var isEmpty: Bool { counts.isEmpty }

    /// The protocol and port as one number.
    private static func protoPort(_ proto: TransportProtocol, _ port: UInt16) -> UInt32 {
        (proto == .tcp ? 0 : 0x1_0000) | UInt32(port)
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
        forEachKey(of: rule) { counts, key in counts[key, default: 0] += 1 }
    }

    /// Stops counting `rule`, which must have been added.
    public mutating func remove(_ rule: Rule) {
        forEachKey(of: rule) { counts, key in
            guard let n = counts[key] else { preconditionFailure("ConflictIndex.remove of a rule not added") }
            counts[key] = n > 1 ? n - 1 : nil
        }
    }

    /// Calls `body` with the counts and each key `rule` is counted under: every port of its
    /// range, with each of its interface and address selectors.
    private mutating func forEachKey(of rule: Rule, _ body: (inout [Key: Int], Key) -> Void) {
        guard rule.lastPort >= rule.firstPort else { return }
        let (interfaces, addresses) = Self.selectors(of: rule)
        for port in rule.firstPort...rule.lastPort {
            let pp = Self.protoPort(rule.proto, port)
            for i in interfaces {
                for a in addresses {
                    probes += 1
                    body(&counts, Key(protoPort: pp, interface: i, address: a))
                }
            }
        }
    }

    /// True when `rule` conflicts with some indexed rule (`Rule.conflicts(with:)`).
    public mutating func conflicts(with rule: Rule) -> Bool {
        guard !counts.isEmpty, rule.lastPort >= rule.firstPort else { return false }
        let (interfaces, addresses) = Self.questions(for: rule)
        for port in rule.firstPort...rule.lastPort {
            let pp = Self.protoPort(rule.proto, port)
            for i in interfaces {
                for a in addresses {
                    probes += 1
                    if counts[Key(protoPort: pp, interface: i, address: a)] != nil { return true }
                }
            }
        }
        return false
    }
}
