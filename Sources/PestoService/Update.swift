// SPDX-License-Identifier: GPL-2.0-or-later

// Update: the proposals' whole client workflow as one atomic step over one or more tables.
//
// Used by the D-Bus `Apply` method (one table) and by the upstream control socket (both
// tables at once). The steps, with one journal across every table:
//   1. insert every new rule (inactive);
//   2. deactivate the removed rules that overlap a new rule, so they cannot conflict;
//   3. activate every new rule and check its bind failures against its tolerance;
//   4. deactivate the other removed rules and delete all removed rules.
// Any error undoes every step already taken, newest first, and is thrown. Step 2 is
// narrower than the proposals' "deactivate all removed rules" on purpose: a removed rule that
// does not overlap a new one keeps its sockets until the update is known to succeed, so a
// rolled-back update never closes and reopens it. Every step costs O(ports involved) (plus a
// hash lookup per rule): step 2 asks an index of the new rules (ConflictIndex.swift) rather
// than comparing each removed rule with each new one.

import PestoDBus
import PestoEngine
import PestoModel

/// How many bind failures a newly activated rule may have.
struct BindTolerance {
    /// Failures allowed outright.
    var maxFailures: UInt32
    /// Any number of failures, as long as one socket bound.
    var bestEffort: Bool

    /// Every failure is fine (upstream's weak rules).
    static let any = BindTolerance(maxFailures: .max, bestEffort: true)
    /// Every socket must bind.
    static let none = BindTolerance(maxFailures: 0, bestEffort: false)

    /// Apply's options (`max-failures` u, default 0; `best-effort` b, default false).
    init(applyOptions value: DBusValue) throws(DBusErrorReply) {
        self = .none
        for (key, v) in value.vardictValue ?? [] {
            switch (key, v) {
            case ("max-failures", .uint32(let n)): maxFailures = n
            case ("best-effort", .bool(let b)): bestEffort = b
            case ("max-failures", _), ("best-effort", _):
                throw .invalidArgs("Apply option \(ClientText.quote(key)) must have type \(key == "best-effort" ? "b" : "u"), not \(ClientText.quote(v.signature)).")
            default:
                throw .invalidArgs("Unknown Apply option \(ClientText.quote(key)); known options: max-failures, best-effort.")
            }
        }
    }

    init(maxFailures: UInt32, bestEffort: Bool) {
        self.maxFailures = maxFailures
        self.bestEffort = bestEffort
    }

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

extension PestoServer {
    /// Applies `updates` atomically (see the theory of operation above).
    /// - Returns: the bind counts of every inserted rule, and the journal of what was done
    ///   (for the caller's transaction).
    func applyUpdate(_ updates: [TableUpdate]) throws(PestoError) -> (results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)], journal: Journal) {
        var performed = Journal()
        var results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)] = []
        do throws(PestoError) {
            func run(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
                let r = try perform(op)
                performed.record(op)
                return r
            }
            for u in updates {
                for insert in u.inserts { _ = try run(.insert(u.kind, insert.id, insert.rule)) }
            }
            for u in updates where !u.removes.isEmpty {
                let t = try table(u.kind)
                var inserted = ConflictIndex()  // probes per port instead of comparing every pair
                for insert in u.inserts { inserted.add(insert.rule) }
                for id in u.removes {
                    let removed = try t.read(id)
                    if try t.status(id).active, inserted.conflicts(with: removed) {
                        _ = try run(.deactivate(u.kind, id))
                    }
                }
            }
            for u in updates {
                let t = try table(u.kind)
                for insert in u.inserts {
                    let c = try run(.activate(u.kind, insert.id))!
                    if !insert.tolerance.accepts(c) {
                        let last = (try? t.status(insert.id).lastErrorName) ?? ""
                        throw PestoError(
                            .bindFailed,
                            "Rule \(insert.id) of the \(u.kind.name) table bound \(c.bound) of \(c.bound + c.failed) sockets "
                                + "(last error \(last)); more failures than allowed, so nothing was changed.")
                    }
                    results.append((u.kind, insert.id, c))
                }
            }
            for u in updates {
                let t = try table(u.kind)
                for id in u.removes {
                    if try t.status(id).active { _ = try run(.deactivate(u.kind, id)) }
                    _ = try run(.delete(u.kind, id, try t.read(id)))
                }
            }
        } catch {
            performed.undo(logger: logger) { (op) throws(PestoError) in _ = try perform(op) }
            throw error
        }
        return (results, performed)
    }
}
