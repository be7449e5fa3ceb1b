// SPDX-License-Identifier: GPL-2.0-or-later

// UpstreamUpdate: an upload from upstream's `pesto` client applied as a difference.
//
// Upstream replaces whole tables and rebinds every socket. pestod compares instead:
//   - an uploaded rule equal in every field to an active rule of that table (the owner tag
//     aside, which upstream does not carry) keeps that rule: its ID, its active state, its
//     very sockets;
//   - active rules with no equal in the upload are deactivated and deleted;
//   - uploaded rules with no equal are inserted under fresh IDs, tagged with the owner
//     `pesto-control` (so D-Bus clients and pestoctl can tell them apart), and activated
//     with the proposals' ACTIVATE semantics: the activation completes whatever binds, the
//     failed ports are counted and retried every period like any other rule's (visible
//     in Status and signalled with BindFailuresChanged), so a port freed later starts
//     forwarding with no further call. Upstream's weak flag no longer decides whether an
//     upload succeeds; it is kept per rule (`weakRules`) and dumped again, so that
//     `pesto` shows "(best effort)" exactly where pasta would.
// Inactive rules are not part of upstream's model: they are neither dumped nor touched.
// Matching is by hash of the rule without its owner tag, and fresh IDs follow the rule every
// client follows (RuleIDProposer: the highest ID in use rounded down to a multiple of 10,
// plus 10, then steps of 10), so an upload of n rules costs O(n log n), not O(n²).
// Tables absent from the upload are left alone. Everything happens in one update across the
// tables (carried out over several loop turns when large, SlicedUpdate.swift), so what
// upstream itself would refuse — an invalid rule, a conflict — changes nothing (and is reported to nobody). The editor refuses an upload while a D-Bus
// client holds the lock; the control socket waits for the lock to be released instead of
// calling it (ControlSocket.swift). The caller (the server) saves what the update committed with the
// other changes of the loop turn; if it cannot be saved, it is undone again.
//
// `UpstreamUpdate` is the upload as the editor carries it out: the plan (its table updates,
// what it will keep, add and remove) made from the tables as they are, and, once the update
// succeeded, the weak flags it records. The editor owns the weak flags (`weakRules`) and
// drives the update (`TablesEditor.startUpstream`, one SlicedUpdate of `updates`).

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// The owner tag of the rules made through the control socket (upstream pesto).
let controlOwnerTag = "pesto-control"

/// An upload turned into one update, before it is carried out.
struct UpstreamUpdate {
    /// An upload: whole tables of rules, with upstream's weak flag.
    typealias Upload = [(kind: TableKind, rules: [(rule: Rule, bestEffort: Bool)])]

    /// What an upload changed.
    struct Summary: Sendable, CustomStringConvertible {
        var kept = 0
        var added = 0
        var removed = 0
        /// Sockets of the added rules that did not bind (counted and retried).
        var unbound = 0
        var description: String {
            "\(kept) kept, \(added) added, \(removed) removed"
                + (unbound > 0 ? "; \(unbound) sockets did not bind yet and are retried every period (see BindFailures)" : "")
        }
    }

    /// What the upload will keep, add and remove.
    private(set) var summary = Summary()
    /// The update of every table in the upload.
    private(set) var updates: [TableUpdate] = []
    /// The weak flag of every rule the upload keeps or inserts, set once it succeeded.
    private var weak: [(RuleRef, Bool)] = []

    /// The difference between `upload` and the active rules of the tables (`table` finds
    /// them): refuses it (and changes nothing) when `lockOwner` holds the lock or a rule is
    /// invalid.
    init(
        _ upload: Upload, lockOwner: String?, table: (TableKind) throws(PestoError) -> ForwardingTable
    ) throws(PestoError) {
        if let owner = lockOwner {
            throw PestoError(PestoError.Code.locked, "The tables are locked by \(owner); the upload was refused.")
        }
        for (kind, rules) in upload {
            let t = try table(kind)
            for (rule, _) in rules { try t.validate(rule) }
            // Identical active rules are kept with their sockets (KeptRules, one hash lookup
            // per rule); the rest are inserted, and unmatched active rules removed.
            let active = t.list().filter(\.status.active).map { (id: $0.id, rule: $0.rule) }
            let matching = KeptRules(existing: active, newRules: rules.map(\.rule))
            var update = TableUpdate(kind: kind, inserts: [], removes: matching.unmatched)
            // New IDs by the rule every client follows (RuleIDProposer, "Choosing rule IDs").
            var ids = RuleIDProposer(highestID: t.ids.last) { t.contains($0) }
            for ((rule, bestEffort), keptID) in zip(rules, matching.keptIDs) {
                if let keptID {
                    weak.append((RuleRef(kind: kind, id: keptID), bestEffort))
                    summary.kept += 1
                    continue
                }
                guard let nextID = ids.next() else {
                    throw PestoError(.noSpace, "The \(kind.name) table has no free rule ID left; the upload was refused.")
                }
                var tagged = rule
                tagged.owner = controlOwnerTag
                // The proposals' ACTIVATE: complete whatever binds; failures are retried.
                update.inserts.append((nextID, tagged, .any))
                weak.append((RuleRef(kind: kind, id: nextID), bestEffort))
            }
            summary.added += update.inserts.count
            summary.removed += update.removes.count
            updates.append(update)
        }
    }

    /// Records the weak flags of the upload, which succeeded with `results`, in `weakRules`;
    /// returns its summary.
    func applied(
        _ results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)], weakRules: inout Set<RuleRef>
    ) -> Summary {
        var summary = summary
        summary.unbound = results.reduce(0) { $0 + Int($1.counts.failed) }
        for (ref, isWeak) in weak {
            if isWeak { weakRules.insert(ref) } else { weakRules.remove(ref) }
        }
        return summary
    }

    /// The active rules of `tables`, as upstream's dump lists them, with upstream's weak
    /// flag where the rule was uploaded with it (`weakRules`).
    static func dump(
        _ tables: [ForwardingTable], weakRules: Set<RuleRef>
    ) -> [(kind: TableKind, capabilities: Capabilities, rules: [(rule: Rule, bestEffort: Bool)])] {
        tables.map { t in
            let kind = t.kind
            return (
                kind, t.capabilities, t.list().filter(\.status.active).map { ($0.rule, weakRules.contains(RuleRef(kind: kind, id: $0.id))) }
            )
        }
    }

    /// The most rules an upload may give one table of `tables`: their MaxRules, within the
    /// wire protocol's own limit.
    static func ruleLimit(_ tables: [ForwardingTable]) -> Int {
        min(PestoV2Wire.maxRulesPerTable, tables.map(\.limits.maxRules).min() ?? 0)
    }
}
