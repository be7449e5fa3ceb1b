// SPDX-License-Identifier: GPL-2.0-or-later

// SlicedUpdate: an atomic update (Apply, a control socket upload) carried out in slices over
// several loop turns, so that no single call holds the event loop for long.
//
// Theory of operation
// -------------------
// An update is a list of operations on the tables (insert, deactivate, activate, delete)
// followed by the reports of what it did (the server's signals). A 65,535-rule Apply is some
// 131,000 operations, each a few system calls, and 300,000 signals: seconds of work. Done in
// one loop turn, every other client and the relayed traffic would wait for all of it. So the
// editor carries it out as a small state machine, `SlicedUpdate`, one slice per loop turn:
//
//   insert → deactivate overlapping removed rules → activate → remove   (the change)
//        any failure ──► undo, newest first                              (the rollback)
//   announce: the held reports, delivered to the observer               (the signals)
//   done: the completion (the reply), then the changes held back meanwhile
//
// Each slice performs operations, or delivers reports, until its `SliceBudget` is spent (a
// number of operations, and a few milliseconds), then asks for the next turn
// (`EventLoop.nextTurn`, which makes the loop look at its ready sources without sleeping).
// Announcing also waits while the bus connection holds more than `mayAnnounce` allows
// unsent (the server: 1 MiB): the next slice then comes a millisecond later, so signals
// are never produced faster than the bus daemon takes them.
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

/// An update in progress, and where it is.
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

    let updates: [TableUpdate]
    let completion: (Outcome) -> Void
    private(set) var step = Step.insert
    /// The table update and the element within its list the current step is at.
    var table = 0
    var index = 0
    /// The new rules of the current table update, for the overlap step.
    var inserted: ConflictIndex?
    var performed = Journal()
    var results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)] = []
    /// Why the update is being undone.
    var failure: PestoError?
    /// The reports to deliver, in order, and how many were.
    private(set) var reports: [TablesEditor.Report] = []
    private(set) var announced = 0
    /// Slices so far.
    var slices = 0
    /// The last slice stopped because the bus was behind (`TablesEditorHost.mayAnnounce`).
    var waitsForBus = false

    init(_ updates: [TableUpdate], completion: @escaping (Outcome) -> Void) {
        self.updates = updates
        self.completion = completion
    }

    /// The update's changes are final and its reports are being delivered.
    var isAnnouncing: Bool { step == .announce }

    /// Goes on with `step`, from the first table update and element.
    func enter(_ next: Step) {
        step = next
        table = 0
        index = 0
        inserted = nil
    }

    /// Starts announcing `reports`.
    func announce(all: [TablesEditor.Report]) {
        reports = all
        announced = 0
        enter(.announce)
    }

    /// Queues one more report behind those being announced.
    func announce(_ r: TablesEditor.Report) { reports.append(r) }

    /// Where a step that walks the table updates' elements is: the current table update and
    /// its next element's index, of `count(update)` elements. Nil when the step moved on
    /// instead: to the next table update when this one's elements are done, or, after the
    /// last table update, by calling `atEnd` (which enters the next step).
    func position<E: Error>(
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

    /// The next report to deliver, if any.
    func nextReport() -> TablesEditor.Report? {
        guard announced < reports.count else { return nil }
        defer { announced += 1 }
        return reports[announced]
    }
}

extension TablesEditor {
    /// Starts an update: it is carried out in slices of `budget`, the first one now. If it
    /// is not done within that slice, the committed changes are saved first (`TablesEditorHost.saveCommitted`),
    /// and every other change is held back until it is. `completion` is called once, when
    /// its reports have been delivered: with what it did, or with the error it was rolled
    /// back for (see the theory of operation). Updates do not nest.
    func startUpdate(_ updates: [TableUpdate], budget: SliceBudget? = nil, completion: @escaping (SlicedUpdate.Outcome) -> Void) {
        precondition(running == nil && held == nil, "updates do not nest")
        let budget = host == nil ? SliceBudget.unlimited : budget ?? sliceBudget
        let job = SlicedUpdate(updates, completion: completion)
        let work = updates.reduce(0) { $0 + 2 * ($1.inserts.count + $1.removes.count) }
        if work > budget.operations {
            // It will not fit in one slice: what was committed before it is saved before any
            // of it is done.
            host?.saveCommitted()
        }
        held = []
        statusBefore = [:]
        running = job
        // An update that fits in one slice's operations is done in this call, whatever the
        // clock says, so it never leaves part of itself visible across a save.
        continueUpdate(job, budget: work > budget.operations ? budget : .unlimited, then: budget)
    }

    /// One slice of `job` (of `budget`); schedules the next (of `next`), or finishes the update.
    private func continueUpdate(_ job: SlicedUpdate, budget: SliceBudget, then next: SliceBudget) {
        job.slices += 1
        if job.slices == 2 {
            logger.debug(
                "an update of \(job.updates.reduce(0) { $0 + $1.inserts.count + $1.removes.count }) rules is carried out in slices")
            host?.updateInProgress(true)
        }
        if runSlice(job, budget: budget) {
            running = nil
            if job.slices > 1 { host?.updateInProgress(false) }
            if let failure = job.failure {
                job.completion(.failure(failure))
            } else {
                job.completion(.success((job.results, job.performed)))
            }
            // An update of one slice ran from `whenIdle` or from the queue, which goes on by itself.
            if job.slices > 1 { waiting.resume(until: { [unowned self] in self.running != nil }) }
        } else if let host {
            let wait = job.waitsForBus
            job.waitsForBus = false
            let work = { [unowned self] in self.continueUpdate(job, budget: next, then: next) }
            if wait { host.shortly(work) } else { host.nextTurn(work) }
        } else {
            preconditionFailure("a sliced update needs a host to schedule its slices")
        }
    }

    /// Carries `job` on until `budget` is spent; true once it is done.
    private func runSlice(_ job: SlicedUpdate, budget: SliceBudget) -> Bool {
        let deadline = budget.milliseconds == .max ? nil : MonotonicInstant.now.adding(milliseconds: budget.milliseconds)
        var spent = 0
        func more() -> Bool {
            spent < budget.operations && (deadline.map { MonotonicInstant.now < $0 } ?? true)
        }
        /// Whether reports may be delivered now: always in an unlimited slice.
        func announcing() -> Bool { budget.operations == .max || host?.mayAnnounce ?? true }
        func fail(_ error: PestoError) {
            job.failure = error
            job.enter(.undo)
        }
        /// Performs `op` as part of the update, recording it for the undo.
        func run(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
            spent += 1
            let r = try perform(op)
            job.performed.record(op)
            return r
        }
        while more() {
            do throws(PestoError) {
                switch job.step {
                case .insert:
                    // 1. insert every new rule (inactive)
                    guard let (u, i) = job.position(of: { $0.inserts.count }, atEnd: { job.enter(.deactivateOverlapping) }) else {
                        continue
                    }
                    let insert = u.inserts[i]
                    _ = try run(.insert(u.kind, insert.id, insert.rule))
                    job.index += 1
                case .deactivateOverlapping:
                    // 2. deactivate the removed rules that overlap a new rule (not under first
                    // match: none to walk there); an index of the new rules is probed per port.
                    let walked = { (u: TableUpdate) throws(PestoError) -> Int in
                        try self.table(u.kind).overlapPolicy == .refuse ? u.removes.count : 0
                    }
                    guard let (u, i) = try job.position(of: walked, atEnd: { job.enter(.activate) }) else { continue }
                    let t = try table(u.kind)
                    if job.inserted == nil {
                        var index = ConflictIndex()
                        for insert in u.inserts { index.add(insert.rule) }
                        job.inserted = index
                        spent += u.inserts.count / 16
                    }
                    let id = u.removes[i]
                    let removed = try t.read(id)
                    if try t.status(id).active, job.inserted!.conflicts(with: removed) {
                        _ = try run(.deactivate(u.kind, id))
                    }
                    job.index += 1
                case .activate:
                    // 3. activate every new rule and check its failures against its tolerance
                    guard let (u, i) = job.position(of: { $0.inserts.count }, atEnd: { job.enter(.remove) }) else { continue }
                    let insert = u.inserts[i]
                    let c = try run(.activate(u.kind, insert.id))!
                    if !insert.tolerance.accepts(c) {
                        let last = (try? table(u.kind).status(insert.id).lastErrorName) ?? ""
                        throw PestoError(
                            .bindFailed,
                            "Rule \(insert.id) of the \(u.kind.name) table bound \(c.bound) of \(c.bound + c.failed) sockets "
                                + "(last error \(last)); more failures than allowed, so nothing was changed.")
                    }
                    job.results.append((u.kind, insert.id, c))
                    job.index += 1
                case .remove:
                    // 4. deactivate the other removed rules and delete all removed rules
                    guard let (u, i) = job.position(of: { $0.removes.count }, atEnd: { announceHeld(job) }) else { continue }
                    let t = try table(u.kind)
                    let id = u.removes[i]
                    if try t.status(id).active { _ = try run(.deactivate(u.kind, id)) }
                    _ = try run(.delete(u.kind, id, try t.read(id)))
                    job.index += 1
                case .undo:
                    let operations = job.performed.operations
                    guard job.index < operations.count else {
                        finishUndo(job)
                        continue
                    }
                    let operation = operations[operations.count - 1 - job.index]
                    do {
                        spent += 1
                        _ = try perform(operation.inverse)
                    } catch {
                        // Reverse order makes every inverse valid; reaching here is a bug in pestod.
                        logger.critical("rollback step \(operation.inverse) failed: \(error)")
                        assertionFailure("rollback step \(operation.inverse) failed: \(error)")
                    }
                    job.index += 1
                case .announce:
                    if announcing() == false {
                        // The bus has not taken the signals so far: wait for it, not in a loop.
                        job.waitsForBus = true
                        return false
                    }
                    guard let r = job.nextReport() else {
                        job.enter(.done)
                        return true
                    }
                    spent += 1
                    deliver(r)
                case .done:
                    return true
                }
            } catch {
                fail(error)
            }
        }
        return false
    }

    /// The change is final: its held reports are announced, in the order they happened.
    private func announceHeld(_ job: SlicedUpdate) {
        let reports = held ?? []
        held = nil
        statusBefore = [:]
        job.announce(all: reports)
    }

    /// The rollback is complete: nothing of the update is reported, except for the rules
    /// that existed before it and are not as they were (see the theory of operation in
    /// TablesEditor.swift), which are announced next.
    private func finishUndo(_ job: SlicedUpdate) {
        job.performed = Journal()
        let before = statusBefore
        held = nil
        statusBefore = [:]
        var reports: [Report] = []
        // Rules that existed before and were deactivated are active again, on new sockets:
        // report those whose counts differ from before the update.
        for (ref, old) in before.sorted(by: { ($0.key.kind.rawValue, $0.key.id) < ($1.key.kind.rawValue, $1.key.id) }) {
            guard let now = try? table(ref.kind).status(ref.id), now != old else { continue }
            reports.append(.state(ref.kind, ref.id, now, failuresChanged: now.failed != old.failed, retried: false))
        }
        // Under first match a rule it never touched may win other ports now (a socket it
        // shared was bound anew): the observer compares each count with what it announced.
        for t in tables where t.overlapPolicy == .firstMatch {
            for id in t.ids { reports.append(.portsWon(t.kind, id)) }
        }
        job.announce(all: reports)
    }

    /// pestod stops while an update is in progress: it is rolled back at once (its caller is
    /// told so), and the changes held back behind it are dropped unanswered.
    func abandonUpdate() {
        guard let job = running else { return }
        if job.step != .announce && job.step != .done && job.step != .undo {
            job.failure = PestoError(
                .locked, "pestod stopped before the change was complete; it was rolled back, nothing changed. Call again once pestod runs.")
            job.enter(.undo)
        }
        _ = runSlice(job, budget: .unlimited)  // the rest at once: pestod is stopping
        running = nil
        host?.updateInProgress(false)
        if let failure = job.failure {
            job.completion(.failure(failure))
        } else {
            job.completion(.success((job.results, job.performed)))
        }
        let dropped = waiting.dropAll()
        if dropped > 0 { logger.notice("stopping: \(dropped) changes held back behind it are dropped") }
    }
}
