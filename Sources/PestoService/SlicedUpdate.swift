// SPDX-License-Identifier: GPL-2.0-or-later

// SlicedUpdate: an atomic update (Apply, a control socket upload) carried out in slices over
// several loop turns, so that no single call holds the event loop for long.
//
// Theory of operation
// -------------------
// An update is a list of operations on the tables (insert, deactivate, activate, delete)
// followed by the reports of what it did (the server's signals). A 65,535-rule Apply is some
// 131,000 operations, each a few system calls, and 300,000 signals: seconds of work. Done in
// one loop turn, every other client and the relayed traffic would wait for all of it. So it
// is carried out by a small state machine of its own, `SlicedUpdate`, one slice per loop turn:
//
//   insert → deactivate overlapping removed rules → activate → remove   (the change)
//        any failure ──► undo, newest first                              (the rollback)
//   announce: the held reports, delivered to the observer               (the signals)
//   done: the completion (the reply), then the changes held back meanwhile
//
// The update owns its state: where it is, the journal of what it performed (for the undo),
// the reports held back while it changes the tables, the state before it of the rules it
// deactivated, and the reports it announces. It changes the tables only through the editor,
// its `SlicedUpdateTarget` (one engine operation at a time, `TablesEditor.perform`), and
// hands its reports back to it for delivery. The editor owns the update (`running`) and
// drives it: `step(budget)` performs operations, or delivers reports, until its `SliceBudget`
// is spent (a number of operations, and a few milliseconds) and says whether the update is
// done; if not, the editor asks its host for the next turn (`EventLoop.nextTurn`, which
// makes the loop look at its ready sources without sleeping). Announcing also waits while
// the bus connection holds more than `mayAnnounce` allows unsent (the server: 1 MiB): the
// next slice then comes a millisecond later, so signals are never produced faster than the
// bus daemon takes them.
// Between two slices the loop serves everything else: D-Bus reads are answered (they show
// the tables as they are, which is what the sockets do: a change in progress is partly
// visible), relayed connections move their bytes, and libdbus writes out the signals
// delivered so far, so neither the bus socket nor the loop is flooded.
//
// What may not run between slices, because it would change the tables under the update, is
// held back: every other change (any D-Bus client's, Lock, Unlock, Commit, Rollback, a lock
// holder's departure, a control socket upload) waits in the editor's ChangeQueue, in arrival
// order, and runs once the update is done; a waiting change whose caller leaves the bus is
// dropped. The retry and scan passes are skipped meanwhile (`TablesEditorHost.updateInProgress`). Before an update
// starts, the committed changes not yet saved are saved (`TablesEditorHost.saveCommitted`), and nothing is
// committed while it runs, so the state file never holds part of an update.
//
// Semantics are those of the update done at once (an update that fits in one slice): the same
// operations in the same order, all or nothing, signals only for a final outcome and in the
// order of its steps (a rolled-back update announces only the rules it changed for good), and
// the completion (the caller's reply) only after every signal of the update was handed to the
// observer. Announcing is part of the update: the next held-back change starts only after it,
// so every signal, the table counters included, describes a state the tables were really in.
// An update that fits in one slice finishes inside the call that starts it, exactly as before.

import Logging
import PestoEngine
import PestoModel
import PestoSystem

/// How much of an update one loop turn carries out.
struct SliceBudget: Sendable {
    /// Operations (or reports delivered) per slice.
    var operations: Int
    /// Milliseconds per slice, at most (checked after every operation).
    var milliseconds: Int

    /// A slice of at most 4 ms (and 4,096 operations): a 65,535-rule Apply takes a few
    /// thousand turns, and another client's call waits for one slice at most.
    static let standard = SliceBudget(operations: 4096, milliseconds: 4)
    /// Everything in one slice.
    static let unlimited = SliceBudget(operations: .max, milliseconds: .max)
}

/// What a sliced update changes the tables through, and delivers its reports to: the editor
/// that drives it (TablesEditor.swift).
protocol SlicedUpdateTarget: AnyObject {
    /// The tables, HOST first.
    var tables: [ForwardingTable] { get }
    /// The table of `kind`.
    func table(_ kind: TableKind) throws(PestoError) -> ForwardingTable
    /// Carries out one operation on the engine and reports it (`TablesEditor.report`, which
    /// hands the report back to the update while it runs).
    @discardableResult
    func perform(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts?
    /// Tells the observer about one final change.
    func deliver(_ r: TablesEditor.Report)
    var logger: Logger { get }
}

/// An update in progress, and where it is: its own state machine, advanced by `step`.
final class SlicedUpdate {
    /// What an update did: each inserted rule's counts, and the journal of its operations.
    typealias Outcome = Result<
        (results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)], journal: Journal), PestoError
    >

    /// The steps, in order.
    enum Step {
        case insert, deactivateOverlapping, activate, remove
        /// Undoing `performed` after `failure`.
        case undo
        /// Delivering `reports`.
        case announce
        case done
    }

    /// What one slice left to do.
    enum Progress {
        /// The update is done: its completion may be called.
        case done
        /// More to do on the next loop turn.
        case more
        /// More reports to deliver once the bus has taken those sent (about a millisecond).
        case waitsForBus
    }

    let updates: [TableUpdate]
    /// Called by the editor once the update is done, with `outcome`.
    let completion: (Outcome) -> Void
    /// What the update changes the tables through.
    private unowned let target: any SlicedUpdateTarget
    private(set) var step = Step.insert
    /// The table update and the element within its list the current step is at.
    private var table = 0
    private var index = 0
    /// The new rules of the current table update, for the overlap step.
    private var inserted: ConflictIndex?
    private var performed = Journal()
    private var results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)] = []
    /// Why the update is being undone.
    private var failure: PestoError?
    /// The reports that happened while the update changes the tables, held back until it is
    /// final (and dropped if it is rolled back).
    private var held: [TablesEditor.Report] = []
    /// The state, before the update touched them, of the rules it deactivated.
    private var statusBefore: [RuleRef: RuleStatus] = [:]
    /// The reports to deliver, in order, and how many were.
    private var reports: [TablesEditor.Report] = []
    private var announced = 0
    /// Slices so far (`step` calls).
    private(set) var slices = 0

    /// An update of `updates` on `target`'s tables, not started yet.
    init(_ updates: [TableUpdate], target: any SlicedUpdateTarget, completion: @escaping (Outcome) -> Void) {
        self.updates = updates
        self.target = target
        self.completion = completion
    }

    /// Table operations the update takes at most, without its undo: two per rule.
    var operations: Int { updates.reduce(0) { $0 + 2 * ($1.inserts.count + $1.removes.count) } }

    /// Rules the update inserts or removes, for the log.
    var ruleCount: Int { updates.reduce(0) { $0 + $1.inserts.count + $1.removes.count } }

    /// What the update did, or why it was rolled back; final once `step` returned `.done`.
    var outcome: Outcome {
        if let failure { return .failure(failure) }
        return .success((results, performed))
    }

    /// Takes a report that happened while the update runs: held back while it changes the
    /// tables, queued behind its reports while it announces them. False once it is done:
    /// the editor delivers the report itself.
    func take(_ r: TablesEditor.Report) -> Bool {
        switch step {
        case .insert, .deactivateOverlapping, .activate, .remove, .undo:
            held.append(r)
            return true
        case .announce:
            reports.append(r)
            return true
        case .done:
            return false
        }
    }

    /// pestod stops: unless its change is final already, the update is rolled back with
    /// `error`; then the rest of it is carried out at once.
    func abandon(_ error: PestoError) {
        if step != .announce && step != .done && step != .undo {
            fail(error)
        }
        _ = step(.unlimited, mayAnnounce: { true })
    }

    /// Goes on with `step`, from the first table update and element.
    private func enter(_ next: Step) {
        step = next
        table = 0
        index = 0
        inserted = nil
    }

    /// Starts undoing what was performed, because of `error`.
    private func fail(_ error: PestoError) {
        failure = error
        enter(.undo)
    }

    /// Where a step that walks the table updates' elements is: the current table update and
    /// its next element's index, of `count(update)` elements. Nil when the step moved on
    /// instead: to the next table update when this one's elements are done, or, after the
    /// last table update, by calling `atEnd` (which enters the next step).
    private func position<E: Error>(
        of count: (TableUpdate) throws(E) -> Int, atEnd: () -> Void
    ) throws(E) -> (update: TableUpdate, index: Int)? {
        guard table < updates.count else {
            atEnd()
            return nil
        }
        let u = updates[table]
        guard index < (try count(u)) else {
            table += 1
            index = 0
            inserted = nil
            return nil
        }
        return (u, index)
    }

    /// Performs `op` on the target, first noting the state of a rule it deactivates (for the
    /// reports after a rollback).
    private func perform(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
        if case .deactivate(let kind, let id) = op, statusBefore[RuleRef(kind: kind, id: id)] == nil,
            let s = try? target.table(kind).status(id)
        {
            statusBefore[RuleRef(kind: kind, id: id)] = s
        }
        return try target.perform(op)
    }

    /// Carries the update on until `budget` is spent; `mayAnnounce` says whether reports may
    /// be delivered now (not asked in an unlimited slice, which delivers them all).
    func step(_ budget: SliceBudget, mayAnnounce: () -> Bool) -> Progress {
        slices += 1
        let deadline = budget.milliseconds == .max ? nil : MonotonicInstant.now.adding(milliseconds: budget.milliseconds)
        var spent = 0
        func more() -> Bool {
            spent < budget.operations && (deadline.map { MonotonicInstant.now < $0 } ?? true)
        }
        /// Performs `op` as part of the update, recording it for the undo.
        func run(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
            spent += 1
            let r = try perform(op)
            performed.record(op)
            return r
        }
        while more() {
            do throws(PestoError) {
                switch step {
                case .insert:
                    // 1. insert every new rule (inactive)
                    guard let (u, i) = position(of: { $0.inserts.count }, atEnd: { enter(.deactivateOverlapping) }) else {
                        continue
                    }
                    let insert = u.inserts[i]
                    _ = try run(.insert(u.kind, insert.id, insert.rule))
                    index += 1
                case .deactivateOverlapping:
                    // 2. deactivate the removed rules that overlap a new rule (not under first
                    // match: none to walk there); an index of the new rules is probed per port.
                    let walked = { [target] (u: TableUpdate) throws(PestoError) -> Int in
                        try target.table(u.kind).overlapPolicy == .refuse ? u.removes.count : 0
                    }
                    guard let (u, i) = try position(of: walked, atEnd: { enter(.activate) }) else { continue }
                    let t = try target.table(u.kind)
                    if inserted == nil {
                        var conflicts = ConflictIndex()
                        for insert in u.inserts { conflicts.add(insert.rule) }
                        inserted = conflicts
                        spent += u.inserts.count / 16
                    }
                    let id = u.removes[i]
                    let removed = try t.read(id)
                    if try t.status(id).active, inserted!.conflicts(with: removed) {
                        _ = try run(.deactivate(u.kind, id))
                    }
                    index += 1
                case .activate:
                    // 3. activate every new rule and check its failures against its tolerance
                    guard let (u, i) = position(of: { $0.inserts.count }, atEnd: { enter(.remove) }) else { continue }
                    let insert = u.inserts[i]
                    let c = try run(.activate(u.kind, insert.id))!
                    if !insert.tolerance.accepts(c) {
                        let last = (try? target.table(u.kind).status(insert.id).lastErrorName) ?? ""
                        throw PestoError(
                            .bindFailed,
                            "Rule \(insert.id) of the \(u.kind.name) table bound \(c.bound) of \(c.bound + c.failed) sockets "
                                + "(last error \(last)); more failures than allowed, so nothing was changed.")
                    }
                    results.append((u.kind, insert.id, c))
                    index += 1
                case .remove:
                    // 4. deactivate the other removed rules and delete all removed rules
                    guard let (u, i) = position(of: { $0.removes.count }, atEnd: { announceHeld() }) else { continue }
                    let t = try target.table(u.kind)
                    let id = u.removes[i]
                    if try t.status(id).active { _ = try run(.deactivate(u.kind, id)) }
                    _ = try run(.delete(u.kind, id, try t.read(id)))
                    index += 1
                case .undo:
                    let operations = performed.operations
                    guard index < operations.count else {
                        finishUndo()
                        continue
                    }
                    let operation = operations[operations.count - 1 - index]
                    do {
                        spent += 1
                        _ = try perform(operation.inverse)
                    } catch {
                        // Reverse order makes every inverse valid; reaching here is a bug in pestod.
                        target.logger.critical("rollback step \(operation.inverse) failed: \(error)")
                        assertionFailure("rollback step \(operation.inverse) failed: \(error)")
                    }
                    index += 1
                case .announce:
                    if budget.operations != .max && !mayAnnounce() {
                        // The bus has not taken the signals so far: wait for it, not in a loop.
                        return .waitsForBus
                    }
                    guard announced < reports.count else {
                        enter(.done)
                        return .done
                    }
                    spent += 1
                    announced += 1
                    target.deliver(reports[announced - 1])
                case .done:
                    return .done
                }
            } catch {
                fail(error)
            }
        }
        return .more
    }

    /// The change is final: its held reports are announced, in the order they happened.
    private func announceHeld() {
        startAnnouncing(held)
    }

    /// The rollback is complete: nothing of the update is reported, except for the rules
    /// that existed before it and are not as they were (see the theory of operation in
    /// TablesEditor.swift), which are announced next.
    private func finishUndo() {
        performed = Journal()
        var reports: [TablesEditor.Report] = []
        // Rules that existed before and were deactivated are active again, on new sockets:
        // report those whose counts differ from before the update.
        for (ref, old) in statusBefore.sorted(by: { ($0.key.kind.rawValue, $0.key.id) < ($1.key.kind.rawValue, $1.key.id) }) {
            guard let now = try? target.table(ref.kind).status(ref.id), now != old else { continue }
            reports.append(.state(ref.kind, ref.id, now, failuresChanged: now.failed != old.failed, retried: false))
        }
        // Under first match a rule it never touched may win other ports now (a socket it
        // shared was bound anew): the observer compares each count with what it announced.
        for t in target.tables where t.overlapPolicy == .firstMatch {
            for id in t.ids { reports.append(.portsWon(t.kind, id)) }
        }
        startAnnouncing(reports)
    }

    /// Starts announcing `all`; the held reports and the earlier states are let go.
    private func startAnnouncing(_ all: [TablesEditor.Report]) {
        held = []
        statusBefore = [:]
        reports = all
        announced = 0
        enter(.announce)
    }
}
