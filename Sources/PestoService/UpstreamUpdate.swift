// UpstreamUpdate: an upload from upstream's `pesto` client applied as a difference.
//
// Upstream replaces whole tables and rebinds every socket. pestod compares instead:
//   - an uploaded rule equal in every field to an active rule of that table (the owner tag
//     aside, which upstream does not carry) keeps that rule: its ID, its active state, its
//     very sockets;
//   - active rules with no equal in the upload are deactivated and deleted;
//   - uploaded rules with no equal are inserted under fresh IDs and activated; a weak
//     (best-effort) rule tolerates any bind failure, every other rule must bind completely.
// Inactive rules are not part of upstream's model: they are neither dumped nor touched.
// Tables absent from the upload are left alone. Everything happens in one `applyUpdate`
// across the tables, so a conflict, an invalid rule or a bind failure changes nothing; the
// update is refused while a D-Bus client holds the lock. With a state file, the update is
// saved with the other changes of the loop turn; if it cannot be, it is undone again and
// `saved` says so.

import PestoEngine

extension PestoServer {
    /// What an upload changed.
    public struct UpstreamSummary: Sendable, CustomStringConvertible {
        public var kept = 0
        public var added = 0
        public var removed = 0
        public var description: String { "\(kept) kept, \(added) added, \(removed) removed" }
    }

    /// The active rules of every table, as upstream's dump lists them.
    public func upstreamDump() -> [(kind: TableKind, capabilities: Capabilities, rules: [Rule])] {
        engine.tables.map { t in (t.kind, t.capabilities, t.list().filter(\.status.active).map(\.rule)) }
    }

    /// Applies an upload of whole tables (rules with their weak flag) as a difference.
    /// `saved` is called with what changed once the change is saved (nil; at once without a
    /// state file or when nothing changed) or was undone because it could not be (the
    /// SaveFailed error). A refused upload throws and changes nothing.
    public func applyUpstream(
        _ upload: [(kind: TableKind, rules: [(rule: Rule, bestEffort: Bool)])],
        saved: @escaping (UpstreamSummary, PestoError?) -> Void
    ) throws(PestoError) {
        if let owner = lockOwner {
            throw PestoError(PestoBusNames.locked, "The tables are locked by \(owner); the upload was refused.")
        }
        var summary = UpstreamSummary()
        var updates: [TableUpdate] = []
        for (kind, rules) in upload {
            let t = try table(kind)
            for (rule, _) in rules { try rule.validate(capabilities: t.capabilities) }
            var unmatched = t.list().filter(\.status.active).map { (id: $0.id, rule: $0.rule) }
            var update = TableUpdate(kind: kind, inserts: [], removes: [])
            var nextID = (t.ids.last ?? 0) &+ 1
            for (rule, bestEffort) in rules {
                if let k = unmatched.firstIndex(where: { Self.sameForwarding($0.rule, rule) }) {
                    unmatched.remove(at: k)
                    summary.kept += 1
                    continue
                }
                while t.contains(nextID) || update.inserts.contains(where: { $0.id == nextID }) { nextID &+= 1 }
                update.inserts.append((nextID, rule, bestEffort ? .any : .none))
                nextID &+= 1
            }
            update.removes = unmatched.map(\.id)
            summary.added += update.inserts.count
            summary.removed += update.removes.count
            updates.append(update)
        }
        let (_, journal) = try applyUpdate(updates)
        let result = summary
        commitUnanswered(journal) { failure in saved(result, failure) }
    }

    /// Equal in every field that forwarding depends on (the owner tag is only a label).
    static func sameForwarding(_ a: Rule, _ b: Rule) -> Bool {
        var x = a
        x.owner = b.owner
        return x == b
    }
}
