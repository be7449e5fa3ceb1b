// SPDX-License-Identifier: GPL-2.0-or-later

// KeptRules: which existing rules an update of a whole table keeps.
//
// Upstream pesto (and pestoctl's `-t SPEC` without -A/-D) replaces a whole table. Doing that
// literally would close every listener and open it again, disturbing every peer. Instead the
// new table is matched against the existing *active* rules: a new rule that forwards exactly
// as an existing one (`Rule.forwardingKey`: every field but the owner tag) keeps that rule,
// its ID and its sockets; only the rest are inserted, and only the unmatched existing rules
// removed. Matching counts multiplicity (two identical new rules keep at most two existing
// ones) and takes existing rules in the order given (callers give ID order, so the lowest
// IDs are kept). One hash lookup per rule: O(n) for tables of any size.
//
// Both the server's upstream upload path and pestoctl's plan use this one function.

/// The result of matching a new table against the existing active rules.
public struct KeptRules: Sendable {
    /// For each new rule, in order, the ID of the existing rule it keeps, or nil when it must
    /// be inserted.
    public var keptIDs: [UInt32?]
    /// The existing rules no new rule keeps, in the order given.
    public var unmatched: [UInt32]

    /// Matches `newRules` against `existing` (active rules, in ID order).
    public init(existing: [(id: UInt32, rule: Rule)], newRules: [Rule]) {
        var byForwarding: [Rule: [UInt32]] = [:]
        for entry in existing { byForwarding[entry.rule.forwardingKey, default: []].append(entry.id) }
        var used: [Rule: Int] = [:]
        var kept = Set<UInt32>()
        keptIDs = newRules.map { rule in
            let key = rule.forwardingKey
            let n = used[key, default: 0]
            guard let ids = byForwarding[key], n < ids.count else { return nil }
            used[key] = n + 1
            kept.insert(ids[n])
            return ids[n]
        }
        unmatched = existing.lazy.map(\.id).filter { !kept.contains($0) }
    }
}
