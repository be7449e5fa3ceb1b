// SPDX-License-Identifier: GPL-2.0-or-later

// The TablesEditor and the ChangeGate in process, without a bus: real sockets on loopback
// through a scripted listener factory, a scripted authorizer, and an observer that records
// what the D-Bus server would turn into signals. Apply's success and rollback (which reports
// nothing), the upload diff keeping identical rules' sockets, the rollback when the lock
// holder leaves, and the check order (doc/dbus-api.md, "Check order").

import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

/// Records the editor's reports as short lines, in order.
final class RecordingObserver: TablesObserver {
    var lines: [String] = []

    func ruleAdded(_ kind: TableKind, _ id: UInt32, _ rule: Rule) { lines.append("added \(id)") }
    func ruleRemoved(_ kind: TableKind, _ id: UInt32) { lines.append("removed \(id)") }
    func ruleStateChanged(_ kind: TableKind, _ id: UInt32, _ s: RuleStatus, failuresChanged: Bool, retried: Bool) {
        lines.append("state \(id) \(s.active ? "active" : "inactive") \(s.bound)/\(s.failed)\(failuresChanged ? " failures" : "")")
    }
    func lockOwnerChanged(_ owner: String?) { lines.append("lock \(owner ?? "-")") }
    func portsWonChanged(_ kind: TableKind, _ id: UInt32) { lines.append("won \(id)") }

    /// The lines so far, emptied.
    func take() -> [String] {
        defer { lines = [] }
        return lines
    }
}

extension TablesEditor {
    /// Submits `change` of `sender` through the one pipeline, as every caller does
    /// (`ChangeGate.submit`: nobody authorises, and without a host the editor carries the
    /// change out in this call); returns what it did, or throws what refused it.
    func submitted(_ change: TableChange, sender: String) throws(PestoError) -> (result: ChangeResult, committed: Journal) {
        var outcome: Result<(result: ChangeResult, committed: Journal), ChangeRefusal>?
        ChangeGate(editor: self).submit(change, sender: sender) { outcome = $0 }
        switch outcome {
        case .success(let done): return done
        case .failure(.refused(let error)): throw error
        case .failure(let other): preconditionFailure("refused without an authoriser or a large update: \(other)")
        case nil: preconditionFailure("without a host a change is done in the call")
        }
    }

    /// Applies an upload as the control socket does (`whenIdle`, then `startUpstream`: in this
    /// call without a host); returns what changed and what it committed, or throws what refused it.
    func uploaded(
        _ upload: [(kind: TableKind, rules: [(rule: Rule, bestEffort: Bool)])]
    ) throws(PestoError) -> (summary: UpstreamSummary, committed: Journal) {
        var outcome: Result<(summary: UpstreamSummary, committed: Journal), PestoError>?
        whenIdle(sender: nil) { self.startUpstream(upload) { outcome = $0 } }
        guard let outcome else { preconditionFailure("without a host an upload is done in the call") }
        return try outcome.get()
    }
}

/// An editor over one HOST table on a scripted factory, with a recording observer.
struct EditorRig {
    let factory = ScriptedListenerFactory()
    let table: ForwardingTable
    let editor: TablesEditor
    let observer = RecordingObserver()

    init(limits: TableLimits = .default, capabilities: Capabilities = [.ipv4, .ipv6, .tcp, .udp]) {
        table = ForwardingTable(kind: .host, capabilities: capabilities, limits: limits, factory: factory)
        editor = TablesEditor(tables: [table])
        editor.observer = observer
    }

    /// A TCP rule on 127.0.0.1.
    static func tcp(_ port: UInt16, last: UInt16? = nil) -> Rule {
        Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port, lastPort: last)
    }

    /// The listening descriptors and their inodes of rule `id` (its very sockets).
    func sockets(_ id: UInt32) -> [String] {
        ((try? table.listeners(of: id)) ?? []).map { "\($0.port)=\($0.fd)@\(TestSockets.inode($0.fd) ?? 0)" }
    }

    /// Every rule with its state, for "nothing changed" checks.
    func snapshot() -> [String] {
        table.list().map { "\($0.id) \($0.rule) \($0.status) \(sockets($0.id))" }
    }
}

@Suite("tables editor and check order (in process)", .timeLimit(.minutes(10)))
struct TablesEditorTests {
    @Test("Apply: inserts, activates and removes; the reports come in order once it succeeded, new rules added inactive first")
    func applySucceeds() throws {
        let rig = EditorRig()
        let p = TestSockets.freePorts(3).lowerBound
        _ = try rig.editor.submitted(.insert(.host, 1, EditorRig.tcp(p)), sender: "a")
        _ = try rig.editor.submitted(.activate(.host, 1), sender: "a")
        _ = rig.observer.take()

        var request = ApplyRequest()
        request.inserts = [(2, EditorRig.tcp(p + 1)), (3, EditorRig.tcp(p + 2))]
        request.removes = [1]
        let (result, committed) = try rig.editor.submitted(.apply(.host, request), sender: "a")
        guard case .applied(let counts) = result else {
            Issue.record("\(result)")
            return
        }
        #expect(counts.map { "\($0.id) \($0.counts.bound)/\($0.counts.failed)" } == ["2 1/0", "3 1/0"])
        #expect(committed.operations.count == 6, "insert ×2, activate ×2, deactivate, delete")
        #expect(
            rig.observer.take() == [
                "added 2", "added 3", "state 2 active 1/0", "state 3 active 1/0", "state 1 inactive 0/0", "removed 1",
            ])
        #expect(rig.table.ids == [2, 3])
    }

    @Test("a rolled-back Apply reports nothing, and a removed rule it did not have to move keeps its very sockets")
    func applyRollbackReportsNothing() throws {
        let rig = EditorRig()
        let ports = TestSockets.freePorts(3)
        let p = ports.lowerBound
        _ = try rig.editor.submitted(.insert(.host, 1, EditorRig.tcp(p)), sender: "a")
        _ = try rig.editor.submitted(.activate(.host, 1), sender: "a")
        _ = rig.observer.take()
        let before = rig.snapshot()

        let holder = try #require(TestSockets.bound(port: p + 2))
        defer { close(holder) }
        var request = ApplyRequest()
        request.inserts = [(2, EditorRig.tcp(p + 1)), (3, EditorRig.tcp(p + 2))]  // 3 cannot bind
        request.removes = [1]
        #expect(throws: PestoError.self) { try rig.editor.submitted(.apply(.host, request), sender: "a") }
        #expect(rig.observer.take().isEmpty, "watchers never learn of rules 2 and 3")
        #expect(rig.snapshot() == before, "rule 1 kept its sockets; rules 2 and 3 are gone")
    }

    @Test("a rolled-back Apply reports the one thing that did change: a removed rule it deactivated that could not bind again")
    func applyRollbackReportsNetChange() throws {
        let rig = EditorRig()
        let p = TestSockets.freePorts(2).lowerBound
        _ = try rig.editor.submitted(.insert(.host, 1, EditorRig.tcp(p)), sender: "a")
        _ = try rig.editor.submitted(.activate(.host, 1), sender: "a")
        _ = rig.observer.take()

        // Rule 2 overlaps rule 1, so rule 1 is deactivated first; rule 2 binds, rule 3's
        // bind fails, and so does rule 1's bind on the way back.
        rig.factory.succeedFirst = rig.factory.opens + 1
        rig.factory.failure = Errno(rawValue: EADDRINUSE)
        var request = ApplyRequest()
        request.inserts = [(2, EditorRig.tcp(p)), (3, EditorRig.tcp(p + 1))]
        request.removes = [1]
        #expect(throws: PestoError.self) { try rig.editor.submitted(.apply(.host, request), sender: "a") }
        #expect(rig.observer.take() == ["state 1 active 0/1 failures"])
        #expect(rig.table.ids == [1])
    }

    @Test("an upload keeps identical rules with their very sockets and reports only the difference")
    func uploadDiffKeepsSockets() throws {
        let rig = EditorRig()
        let p = TestSockets.freePorts(3).lowerBound
        _ = try rig.editor.uploaded([(.host, [(EditorRig.tcp(p), false), (EditorRig.tcp(p + 1), false)])])
        let ids = rig.table.ids
        #expect(ids.count == 2)
        let kept = rig.sockets(ids[0])
        _ = rig.observer.take()

        let (summary, committed) = try rig.editor.uploaded([(.host, [(EditorRig.tcp(p), false), (EditorRig.tcp(p + 2), false)])])
        #expect(summary.description == "1 kept, 1 added, 1 removed")
        #expect(!committed.isEmpty)
        #expect(rig.sockets(ids[0]) == kept, "the identical rule kept its sockets")
        let new = try #require(rig.table.ids.last)
        #expect(rig.observer.take() == ["added \(new)", "state \(new) active 1/0", "state \(ids[1]) inactive 0/0", "removed \(ids[1])"])

        // The same upload again changes nothing and reports nothing.
        let (again, none) = try rig.editor.uploaded([(.host, [(EditorRig.tcp(p), false), (EditorRig.tcp(p + 2), false)])])
        #expect(again.description == "2 kept, 0 added, 0 removed" && none.isEmpty)
        #expect(rig.observer.take().isEmpty)
    }

    @Test("the lock holder leaving rolls back its journal newest first and releases the lock")
    func holderLeftRollsBack() throws {
        let rig = EditorRig()
        let p = TestSockets.freePorts(3).lowerBound
        _ = try rig.editor.submitted(.insert(.host, 1, EditorRig.tcp(p)), sender: "b")
        _ = try rig.editor.submitted(.activate(.host, 1), sender: "b")
        let before = rig.snapshot().map { $0.components(separatedBy: " [").first! }

        _ = try rig.editor.submitted(.lock, sender: "a")
        _ = rig.observer.take()
        let (_, c1) = try rig.editor.submitted(.insert(.host, 2, EditorRig.tcp(p + 1)), sender: "a")
        #expect(c1.isEmpty, "under the lock nothing is committed")
        _ = try rig.editor.submitted(.activate(.host, 2), sender: "a")
        _ = try rig.editor.submitted(.deactivate(.host, 1), sender: "a")
        var request = ApplyRequest()
        request.inserts = [(3, EditorRig.tcp(p + 2))]
        _ = try rig.editor.submitted(.apply(.host, request), sender: "a")
        #expect(rig.editor.journal.operations.count == 5)
        #expect(throws: PestoError.self) { try rig.editor.submitted(.delete(.host, 3), sender: "b") }  // Locked
        _ = rig.observer.take()

        #expect(rig.editor.holderLeft("b") == nil, "b holds no lock")
        #expect(rig.editor.holderLeft("a") == 5)
        #expect(rig.editor.lockOwner == nil && rig.editor.journal.isEmpty)
        #expect(
            rig.observer.take() == [
                "state 3 inactive 0/0", "removed 3", "state 1 active 1/0", "state 2 inactive 0/0", "removed 2", "lock -",
            ])
        // Rule 1 is active again (on new sockets): IDs, rules and active bits are as before the Lock.
        #expect(rig.snapshot().map { $0.components(separatedBy: " [").first! } == before)
    }

    // MARK: Check order

    /// A gate over a fresh rig, asking `auth`.
    static func gate(_ rig: EditorRig, _ auth: ScriptedAuthorizer) -> ChangeGate {
        ChangeGate(editor: rig.editor, authorization: AuthorizationQueue(authorizer: auth, action: PestoActions.modify))
    }

    /// Submits and returns the outcome if it came at once.
    static func submit(_ gate: ChangeGate, _ change: TableChange, _ sender: String) -> Result<
        (result: ChangeResult, committed: Journal), ChangeRefusal
    >? {
        var outcome: Result<(result: ChangeResult, committed: Journal), ChangeRefusal>?
        gate.submit(change, sender: sender) { outcome = $0 }
        return outcome
    }

    /// The PestoError code of a refusal, or a description of anything else.
    static func code(_ outcome: Result<(result: ChangeResult, committed: Journal), ChangeRefusal>?) -> String {
        switch outcome {
        case nil: return "waiting"
        case .success: return "success"
        case .failure(.refused(let e)): return e.code.name
        case .failure(.unauthorized(let r)): return r.name
        case .failure(.tooManyWaiting), .failure(.tooManyHeldBack): return "LimitsExceeded"
        }
    }

    @Test("check order: an invalid rule is refused before the lock and before anyone is asked; a lock conflict before authorisation")
    func invalidAndLockedBeforeAuthorisation() throws {
        let rig = EditorRig()
        let auth = ScriptedAuthorizer()
        let gate = Self.gate(rig, auth)
        let p = TestSockets.freePorts(1).lowerBound
        let invalid = Rule(proto: .tcp, address: .loopbackIPv4, firstPort: 0)

        #expect(Self.code(Self.submit(gate, .insert(.host, 1, invalid), "b")) == "InvalidRule")
        var apply = ApplyRequest()
        apply.inserts = [(1, EditorRig.tcp(p)), (2, invalid)]
        #expect(Self.code(Self.submit(gate, .apply(.host, apply), "b")) == "InvalidRule")
        #expect(auth.queries.isEmpty)

        auth.immediate["a"] = .some(nil)
        #expect(Self.code(Self.submit(gate, .lock, "a")) == "success")
        _ = rig.observer.take()
        // Locked by a: b's valid changes, and its Lock, are refused without asking anyone;
        // an invalid rule is still InvalidRule (validation comes before the lock).
        for change in [TableChange.insert(.host, 1, EditorRig.tcp(p)), .delete(.host, 1), .activate(.host, 1), .lock] {
            #expect(Self.code(Self.submit(gate, change, "b")) == "Locked")
        }
        #expect(Self.code(Self.submit(gate, .insert(.host, 1, invalid), "b")) == "InvalidRule")
        #expect(auth.queries.isEmpty, "nobody was asked")
        #expect(rig.table.ruleCount == 0 && rig.observer.lines.isEmpty)
    }

    @Test("check order: authorisation before the change; the lock is checked again after it; a refusal changes nothing")
    func authorisationThenLockAgain() throws {
        let rig = EditorRig()
        let auth = ScriptedAuthorizer()
        let gate = Self.gate(rig, auth)
        let p = TestSockets.freePorts(1).lowerBound

        // A refused caller changes nothing.
        #expect(Self.code(Self.submit(gate, .insert(.host, 1, EditorRig.tcp(p)), "b")) == "waiting")
        #expect(rig.table.ruleCount == 0)
        auth.answer("b", AuthorizationQueueTests.denied)
        #expect(rig.table.ruleCount == 0 && rig.observer.lines.isEmpty)

        // b's change waits for its answer; meanwhile a takes the lock; once b is authorised,
        // the lock is checked again and refuses it.
        var late: Result<(result: ChangeResult, committed: Journal), ChangeRefusal>?
        gate.submit(.insert(.host, 1, EditorRig.tcp(p)), sender: "b") { late = $0 }
        #expect(Self.code(late) == "waiting" && auth.inProgress("b") == 1)
        auth.immediate["a"] = .some(nil)
        #expect(Self.code(Self.submit(gate, .lock, "a")) == "success")
        auth.answer("b")
        #expect(Self.code(late) == "Locked")
        #expect(rig.table.ruleCount == 0)

        // The holder's own change is authorised, then made and journaled (nothing committed).
        let made = Self.submit(gate, .insert(.host, 1, EditorRig.tcp(p)), "a")
        #expect(Self.code(made) == "success")
        if case .success(let done)? = made { #expect(done.committed.isEmpty) }
        #expect(rig.editor.journal.operations.count == 1)
        // Then the change's own checks (RuleExists) come after authorisation.
        #expect(Self.code(Self.submit(gate, .insert(.host, 1, EditorRig.tcp(p)), "a")) == "RuleExists")
    }

    // MARK: Uploads (the control socket)

    @Test(
        "an upload completes despite bind failures: its rules are active, failures counted, tagged pesto-control; only a conflict refuses it"
    )
    func uploadToleratesBindFailures() throws {
        let rig = EditorRig()
        let p = TestSockets.freePorts(2).lowerBound
        let holder = try #require(TestSockets.bound(port: p))
        defer { close(holder) }
        let (summary, _) = try rig.editor.uploaded([(.host, [(EditorRig.tcp(p), false), (EditorRig.tcp(p + 1), false)])])
        #expect(summary.unbound == 1 && summary.description.contains("1 sockets did not bind yet"))
        let rows = rig.table.list()
        #expect(rows.map(\.status.failed) == [1, 0] && rows.allSatisfy(\.status.active))
        #expect(rows.allSatisfy { $0.rule.owner == controlOwnerTag })
        _ = rig.observer.take()

        // A rule conflicting with one of the upload's own: refused, nothing changes or is reported.
        let before = rig.snapshot()
        #expect(throws: PestoError.self) {
            try rig.editor.uploaded([
                (.host, [(EditorRig.tcp(p), false), (EditorRig.tcp(p + 1), false), (EditorRig.tcp(p + 1), false)])
            ])
        }
        #expect(rig.snapshot() == before && rig.observer.take().isEmpty)
    }

    @Test("the dump gives back upstream's flags as uploaded: weak, scan, dual stack, byte for byte")
    func dumpFlagsRoundTrip() throws {
        let rig = EditorRig(capabilities: [.ipv4, .ipv6, .tcp, .udp, .scan])
        let p = TestSockets.freePorts(3).lowerBound
        let upload: [PestoV2Wire.WireRule] = [
            .init(rule: EditorRig.tcp(p), bestEffort: true),
            .init(rule: Rule(proto: .tcp, firstPort: p + 1, scan: true), bestEffort: false),
            .init(rule: Rule(proto: .udp, firstPort: p + 2), bestEffort: true),
        ]
        _ = try rig.editor.uploaded([(.host, upload.map { ($0.rule, $0.bestEffort) })])
        let dump = rig.editor.upstreamDump().map { t in
            (t.kind, t.capabilities, t.rules.map { PestoV2Wire.WireRule(rule: $0.rule, bestEffort: $0.bestEffort) })
        }
        let rules = upload.map { PestoV2Wire.encode($0) }
        #expect(Array(PestoV2Wire.tableDump(dump).dropFirst(1 + PestoV2Wire.tableInfoSize).dropLast()) == Array(rules.joined()))

        // Uploaded again without the weak flag, the rule is kept (same sockets) and dumped without it.
        let ids = rig.table.ids
        _ = try rig.editor.uploaded([(.host, upload.map { ($0.rule, false) })])
        #expect(rig.table.ids == ids)
        #expect(rig.editor.upstreamDump().first?.rules.map(\.bestEffort) == [false, false, false])
    }

    @Test("whenUnlocked runs once the lock is released, at once when it is free")
    func whenUnlocked() throws {
        let rig = EditorRig()
        var ran = 0
        rig.editor.whenUnlocked { ran += 1 }
        #expect(ran == 1)
        try rig.editor.lock("a")
        rig.editor.whenUnlocked { ran += 1 }
        #expect(ran == 1)
        try rig.editor.unlock("a")
        #expect(ran == 2)
        try rig.editor.lock("a")
        rig.editor.whenUnlocked { ran += 1 }
        rig.editor.holderLeft("a")
        #expect(ran == 3)
    }
}
