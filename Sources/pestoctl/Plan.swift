// SPDX-License-Identifier: GPL-2.0-or-later

// Plan: the operations of the command line applied to the current tables, giving the rules
// to insert and the rules to remove (step 1 of the proposals' client workflow: parse all rule
// modifications before touching anything).

import PestoModel

/// A rule the update adds, with what the bind check needs.
struct NewRule {
    var table: TableKind
    var rule: Rule
    /// Which spec (command-line position) it came from: best-effort specs are judged as a whole.
    var specIndex: Int
    /// The spec was `all`, `auto` alone or exclusions only: one bound socket is enough.
    var bestEffort: Bool
    /// The spec's text, for messages.
    var specText: String
    /// Set when inserted.
    var id: UInt32 = 0
}

/// What an update changes.
struct Plan {
    var inserts: [NewRule] = []
    /// Existing rules to deactivate (when active) and delete.
    var removes: [(table: TableKind, rule: ListedRule)] = []
    /// Notes for the user (bind failures kept with --best-effort).
    var warnings: [String] = []

    var isEmpty: Bool { inserts.isEmpty && removes.isEmpty }

    /// Applies `operations` to `tables` (the rules each table holds now), as upstream pesto
    /// applies its options to the tables it read: in order; without -A/-D the first spec for a
    /// table empties it first; -D needs an exactly matching rule; `none` needs no rule of its
    /// protocol. Throws (exit status 1) before anything is changed.
    static func make(
        _ operations: [Operation], tables: [TableKind: [ListedRule]],
        ephemeral: ClosedRange<UInt16>
    ) throws(UsageError) -> Plan {
        /// An entry of a table as the update goes: a rule that exists, or one to insert.
        enum Entry {
            case existing(ListedRule)
            case new(NewRule)
            var rule: Rule {
                switch self {
                case .existing(let r): return r.rule
                case .new(let n): return n.rule
                }
            }
        }
        var state: [TableKind: [Entry]] = [:]
        for (kind, rules) in tables { state[kind] = rules.map { .existing($0) } }
        // Tables already replaced (or cleared) by this command line: later specs add.
        var replaced: Set<TableKind> = []

        func requireTable(_ kind: TableKind, _ what: String) throws(UsageError) {
            if state[kind] == nil {
                throw UsageError(
                    "\(what): the service has no \(kind.name) table (pestod runs without a target namespace).",
                    status: 1)
            }
        }

        for (index, operation) in operations.enumerated() {
            switch operation {
            case .clear(let kind):
                try requireTable(kind, "-C \(kind.name)")
                state[kind] = []
                replaced.insert(kind)
            case .spec(let kind, let proto, let text, let mode):
                let option = RuleText.option(Rule(proto: proto, firstPort: 1), kind)
                try requireTable(kind, "\(option) \(text)")
                let spec: PortSpec
                do {
                    spec = try PortSpec.parse(text, proto: proto, table: kind, ephemeralPorts: ephemeral)
                } catch {
                    throw UsageError("\(option): \(error.description)", status: 1)
                }
                if mode == .replace && !replaced.contains(kind) {
                    replaced.insert(kind)
                    state[kind] = []
                }
                if spec.isNone {
                    // As pesto: "none" only says there is no rule of this protocol so far.
                    if state[kind]!.contains(where: { $0.rule.proto == proto }) {
                        throw UsageError(
                            "\(option) none conflicts with the \(proto) rules of the \(kind.name) table "
                                + "(\(mode == .replace ? "given earlier on this command line" : "clear them first, or leave out -A/-D")).",
                            status: 1)
                    }
                    continue
                }
                switch mode {
                case .replace, .add:
                    for rule in spec.rules {
                        // An identical rule would only conflict with the one there (or be
                        // shadowed by it): say so in the user's terms, before any change.
                        if let same = state[kind]!.first(where: { $0.rule.forwardsSame(as: rule) }) {
                            let ruleText = "\(option) \(RuleText.spec(rule, kind))"
                            switch same {
                            case .existing(let r):
                                throw UsageError(
                                    "\(mode == .add ? "-A " : "")\(option) \(text): the \(kind.name) table already has this rule "
                                        + "(ID \(r.id): \(ruleText), \(r.active ? "active" : "inactive")); nothing was changed. "
                                        + "To replace it, delete it first (pestoctl -D \(ruleText)).", status: 1)
                            case .new(let n):
                                throw UsageError(
                                    "\(option) \(text): its rule \(ruleText) is already given by \(n.specText) on this command line; "
                                        + "nothing was changed.", status: 1)
                            }
                        }
                        state[kind]!.append(
                            .new(
                                NewRule(
                                    table: kind, rule: rule, specIndex: index,
                                    bestEffort: spec.bestEffort, specText: "\(option) \(text)")))
                    }
                case .delete:
                    for rule in spec.rules {
                        guard let match = state[kind]!.firstIndex(where: { $0.rule.forwardsSame(as: rule) }) else {
                            let near = state[kind]!.first {
                                $0.rule.proto == rule.proto && $0.rule.firstPort <= rule.lastPort
                                    && rule.firstPort <= $0.rule.lastPort
                            }
                            throw UsageError(
                                "-D \(option) \(text): the \(kind.name) table has no rule \(option) \(RuleText.spec(rule, kind))"
                                    + (near.map { "; \(option) \(RuleText.spec($0.rule, kind)) overlaps it but is not the same rule" } ?? "")
                                    + ". Nothing was changed.", status: 1)
                        }
                        state[kind]!.remove(at: match)
                    }
                }
            }
        }

        var plan = Plan()
        for kind in TableKind.allCases {
            guard let old = tables[kind], let entries = state[kind] else { continue }
            var kept = Set<UInt32>()
            for entry in entries { if case .existing(let r) = entry { kept.insert(r.id) } }
            // Existing active rules the update would remove and re-insert unchanged are kept
            // instead (KeptRules, as the server does for uploads): their sockets and relayed
            // connections are not disturbed.
            let candidates = old.filter { !kept.contains($0.id) && $0.active }
            let newRules: [NewRule] = entries.compactMap { if case .new(let n) = $0 { return n } else { return nil } }
            let matching = KeptRules(existing: candidates.map { (id: $0.id, rule: $0.rule) }, newRules: newRules.map(\.rule))
            for (n, keptID) in zip(newRules, matching.keptIDs) {
                if let keptID { kept.insert(keptID) } else { plan.inserts.append(n) }
            }
            plan.removes += old.filter { !kept.contains($0.id) }.map { (kind, $0) }
        }
        return plan
    }
}
