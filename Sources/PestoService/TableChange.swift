// SPDX-License-Identifier: GPL-2.0-or-later

// TableChange: the values a change to the tables is made of, on its way through the editor
// (TablesEditor.swift): the change as a client asks for it, the update it becomes, and what
// it did.

import PestoEngine
import PestoModel
import PestoSystem

/// How many bind failures a newly activated rule may have.
struct BindTolerance: Equatable {
    /// Failures allowed outright.
    var maxFailures: UInt32
    /// Any number of failures, as long as one socket bound.
    var bestEffort: Bool

    /// Every failure is fine: the activation completes whatever binds (the proposals'
    /// ACTIVATE; upstream's uploads).
    static let any = BindTolerance(maxFailures: .max, bestEffort: true)
    /// Every socket must bind.
    static let none = BindTolerance(maxFailures: 0, bestEffort: false)

    func accepts(_ c: ForwardingTable.BindCounts) -> Bool {
        c.failed <= maxFailures || (bestEffort && c.bound >= 1)
    }
}

/// One table's part of an update.
struct TableUpdate {
    var kind: TableKind
    var inserts: [(id: UInt32, rule: Rule, tolerance: BindTolerance)]
    var removes: [UInt32]
}

/// A decoded Apply: the rules to insert and activate, the IDs to remove, the tolerance of
/// every new rule. Decoding guarantees distinct inserted IDs, distinct removed IDs, and no
/// ID in both lists.
struct ApplyRequest {
    var inserts: [(UInt32, Rule)] = []
    var removes: [UInt32] = []
    /// The options `max-failures` and `best-effort`, as the tolerance of every new rule.
    var tolerance = BindTolerance.none
    /// Its rules were validated already, in slices (SlicedApplyDecoder.swift): step 4 is done.
    var validated = false
}

/// A change to the tables as a client asks for it, decoded but not yet checked.
enum TableChange {
    case insert(TableKind, UInt32, Rule)
    case delete(TableKind, UInt32)
    case activate(TableKind, UInt32)
    case deactivate(TableKind, UInt32)
    case apply(TableKind, ApplyRequest)
    /// Manager.Lock: the only Manager method that is authorised.
    case lock
}

/// What a change did, for its reply.
enum ChangeResult: Equatable {
    /// Nothing to report (insert, delete, deactivate, lock).
    case done
    /// An activation's counts.
    case counts(ForwardingTable.BindCounts)
    /// An Apply's counts per inserted rule, in request order.
    case applied([(id: UInt32, counts: ForwardingTable.BindCounts)])

    static func == (a: ChangeResult, b: ChangeResult) -> Bool {
        switch (a, b) {
        case (.done, .done): return true
        case (.counts(let x), .counts(let y)): return x == y
        case (.applied(let x), .applied(let y)): return x.map(\.id) == y.map(\.id) && x.map(\.counts) == y.map(\.counts)
        default: return false
        }
    }
}

/// A rule of a table, as a key.
struct RuleRef: Hashable {
    var kind: TableKind
    var id: UInt32
}
