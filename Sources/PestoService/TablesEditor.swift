// SPDX-License-Identifier: GPL-2.0-or-later

// TablesEditor: every change to the forwarding tables, with the lock, the journal and the
// atomic updates (Apply, control socket uploads), reported to an observer once final.
//
// Theory of operation
// -------------------
// The editor owns the engine's tables as far as changes go; it knows nothing of D-Bus (no
// messages, no error names beyond `PestoError` codes) and is tested in process against a
// scripted listener factory (Tests/PestoServiceTests/TablesEditorTests.swift).
//
//   Lock         one name may hold it; its changes are journaled (Journal.swift) and undone,
//                newest first, by Unlock, Rollback or the holder leaving (`holderLeft`).
//                Without the lock, every change is committed at once and handed back to the
//                caller (the server saves it before answering, CommitBatch.swift).
//   Single ops   insert, delete, activate, deactivate: one engine call each, journaled.
//   Updates      `startUpdate` (the proposals' whole client workflow, atomically, over one
//                or more tables: Apply and uploads) and `startUpstream` (an upload of whole
//                tables as a difference against the active rules).
//                An update is a SlicedUpdate (SlicedUpdate.swift), a state machine with its
//                own state that the editor holds (`running`) and steps: at once, or when
//                large in slices over several loop turns, other changes waiting behind it
//                (ChangeQueue.swift). An upload is planned first as an UpstreamUpdate
//                (UpstreamUpdate.swift: the difference against the active rules).
//
// Reporting. Every change is reported to `observer` (rule added, rule removed, rule state
// changed, lock owner changed) — the server turns the reports into InterfacesAdded,
// InterfacesRemoved, RuleStateChanged, BindFailuresChanged and PropertiesChanged. An update
// is reported only once it is final: while it runs, the reports (and the engine's state
// changes, which arrive through the tables' `onStateChange`) are held back; when it succeeds
// they are delivered in the order they happened, and when it is rolled back they are
// dropped, so watchers never see rules that never existed. A rolled-back update can still
// change a rule that existed before: a removed rule it deactivated is activated again with
// new sockets, and a port taken meanwhile is a bind failure. For those rules alone, the
// state after the rollback is compared with the state before, and a difference is reported.
//
// The check order of a change (doc/dbus-api.md, "Check order"): the editor does step 4
// (`validate`), step 5 (`checkLock`, before anyone is asked to authorise) and step 7
// (`execute`: the lock again, since it may have been taken while authorisation was pending,
// then the change). ChangeGate.swift strings them together with step 6, authorisation.
//
// Where things are. The editor's own methods (reports, perform, the check order, execute and
// queueing, the updates, the lock) are all in this file; the values a change is made of in
// TableChange.swift, the observer and host protocols in TablesEditorHost.swift, the undo log
// in Journal.swift.
//
// One verb per layer: a change is *submitted* to the ChangeGate (every caller and test),
// which *executes* it on the editor once it passed steps 4–6 and the editor is idle; the
// editor *performs* its table operations (`perform`, one engine call each) — at once, or
// over several loop turns for an Apply or an upload (SlicedUpdate.swift).

import Logging
import PestoEngine
import PestoModel
import PestoSystem

/// Changes the tables, keeps the lock and its journal, reports final outcomes.
final class TablesEditor: SlicedUpdateTarget {
    /// The tables, HOST first.
    let tables: [ForwardingTable]
    /// Told about every final change.
    weak var observer: (any TablesObserver)?
    let logger: Logger

    /// The name holding the lock, if any.
    private(set) var lockOwner: String?
    /// Operations made under the lock since Lock or the last Commit.
    private(set) var journal = Journal()
    /// The service the editor runs in: the loop turns its slices are carried out on, the
    /// bus it announces on, the save of committed changes. Without one (tests), every update
    /// is carried out at once.
    weak var host: (any TablesEditorHost)?

    /// One report, held back while an update runs.
    enum Report {
        case added(TableKind, UInt32, Rule)
        case removed(TableKind, UInt32)
        case state(TableKind, UInt32, RuleStatus, failuresChanged: Bool, retried: Bool)
        case portsWon(TableKind, UInt32)
    }
    /// The update in progress, if any: the editor holds it, hands it the reports, and steps
    /// it once per loop turn until it is done (SlicedUpdate.swift).
    private(set) var running: SlicedUpdate?
    /// The changes held back while `running` is under way, in arrival order (ChangeQueue.swift).
    let waiting = ChangeQueue()
    /// How much of an update one loop turn carries out; `.unlimited` does it all at once.
    var sliceBudget = SliceBudget.unlimited
    /// The control socket's rules uploaded with upstream's weak flag (dumped with it). Kept
    /// in memory only: a rule restored from the state file, or put back by a rollback, is
    /// dumped without it.
    var weakRules = Set<RuleRef>()
    /// Called once the lock is released next (ControlSocket: an upload waiting for it).
    private var unlockWaiters: [() -> Void] = []

    /// An editor for `tables`; it takes their `onStateChange`.
    init(tables: [ForwardingTable], logger: Logger = Logger(label: "pestod")) {
        self.tables = tables
        self.logger = logger
        for t in tables {
            let kind = t.kind
            t.onStateChange = { [unowned self] change in
                self.report(
                    .state(kind, change.id, change.status, failuresChanged: change.failuresChanged, retried: change.cause == .retried))
            }
            t.onPortsWonChange = { [unowned self] id, _ in self.report(.portsWon(kind, id)) }
        }
    }

    /// The table of `kind`.
    func table(_ kind: TableKind) throws(PestoError) -> ForwardingTable {
        guard let t = tables.first(where: { $0.kind == kind }) else { throw PestoError(.noSuchRule, "There is no \(kind.name) table.") }
        return t
    }

    // MARK: Reports

    /// Hands `r` to the update in progress, which holds it back while it changes the tables
    /// or queues it behind the reports it is announcing; delivers it when no update runs.
    func report(_ r: Report) {
        if let job = running, job.take(r) { return }
        deliver(r)
    }

    /// Tells the observer about one final change.
    func deliver(_ r: Report) {
        guard let observer else { return }
        switch r {
        case .added(let kind, let id, let rule): observer.ruleAdded(kind, id, rule)
        case .removed(let kind, let id): observer.ruleRemoved(kind, id)
        case .state(let kind, let id, let s, let failuresChanged, let retried):
            observer.ruleStateChanged(kind, id, s, failuresChanged: failuresChanged, retried: retried)
        case .portsWon(let kind, let id): observer.portsWonChanged(kind, id)
        }
    }

    // MARK: Performing

    /// Carries out one operation on the engine and reports it.
    @discardableResult
    func perform(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
        switch op {
        case .insert(let kind, let id, let rule):
            try table(kind).insert(id: id, rule: rule)
            report(.added(kind, id, rule))
            return nil
        case .delete(let kind, let id, _):
            try table(kind).delete(id: id)
            weakRules.remove(RuleRef(kind: kind, id: id))
            report(.removed(kind, id))
            return nil
        case .activate(let kind, let id):
            return try table(kind).activate(id: id)
        case .deactivate(let kind, let id):
            try table(kind).deactivate(id: id)
            return nil
        }
    }

    // MARK: The check order (steps 4, 5 and 7 of doc/dbus-api.md)

    /// Step 4: the rules of `change` against their table's capabilities (InvalidRule), the
    /// first invalid rule in array order being the one reported. Pure.
    func validate(_ change: TableChange) throws(PestoError) {
        switch change {
        case .insert(let kind, _, let rule):
            try table(kind).validate(rule)
        case .apply(let kind, let request):
            let t = try table(kind)
            if request.validated { return }  // sliced validation hook (SlicedApplyDecoder.swift)
            for (_, rule) in request.inserts { try t.validate(rule) }
        case .delete, .activate, .deactivate, .lock:
            break
        }
    }

    /// Step 5 (and again in step 7): throws `Locked` when another name than `sender` holds
    /// the lock. Checked before authorisation so nobody is asked for a password for a change
    /// the lock refuses.
    func checkLock(_ sender: String) throws(PestoError) {
        if let owner = lockOwner, owner != sender {
            throw PestoError(
                PestoError.Code.locked, "The tables are locked by \(owner); wait until it unlocks or leaves the bus.")
        }
    }

    /// Step 7 for a change other than Apply, at once (`execute` calls it): the lock again (it may have been taken
    /// while authorisation was pending), then the operation. Returns what the change did and
    /// what it committed (empty under the lock, where it is journaled instead).
    func executeAtOnce(_ change: TableChange, sender: String) throws(PestoError) -> (result: ChangeResult, committed: Journal) {
        if case .lock = change {
            try lock(sender)
            return (.done, Journal())
        }
        try checkLock(sender)
        if lockOwner == sender { host?.saveCommitted() }
        switch change {
        case .insert(let kind, let id, let rule):
            return try performLogged(.insert(kind, id, rule), sender: sender)
        case .delete(let kind, let id):
            // The journal needs the stored rule to undo the delete; a rule that is not there
            // is refused as the delete itself would refuse it.
            let stored: Rule
            do { stored = try table(kind).read(id) } catch {
                logger.info("delete \(kind.rawValue)/\(id) by \(sender) refused: \(error.message)")
                throw error
            }
            return try performLogged(.delete(kind, id, stored), sender: sender)
        case .activate(let kind, let id):
            return try performLogged(.activate(kind, id), sender: sender)
        case .deactivate(let kind, let id):
            return try performLogged(.deactivate(kind, id), sender: sender)
        case .lock, .apply:
            preconditionFailure("\(change) is executed by `execute`")
        }
    }

    /// Performs one single-rule operation for `sender`, with its log line.
    private func performLogged(_ op: TableOperation, sender: String) throws(PestoError) -> (result: ChangeResult, committed: Journal) {
        let counts: ForwardingTable.BindCounts?
        do { counts = try perform(op) } catch {
            logger.info("\(op) by \(sender) refused: \(error.message)")
            throw error
        }
        var performed = Journal()
        performed.record(op)
        logger.info("\(op) by \(sender)\(counts.map { ": \($0.bound) bound, \($0.failed) failed" } ?? "")")
        return (counts.map { .counts($0) } ?? .done, finish(performed, sender: sender))
    }

    /// Ends a change's transaction: journaled under the lock (nothing committed), committed
    /// otherwise.
    func finish(_ performed: Journal, sender: String) -> Journal {
        if lockOwner == sender {
            journal.append(contentsOf: performed)
            return Journal()
        }
        return performed
    }

    // MARK: Queueing and executing

    /// Whether no update is in progress and no change is held back.
    var isIdle: Bool { running == nil && waiting.isEmpty }

    /// Runs `work` now if the editor is idle, else once the update in progress and every
    /// change held back before it are done (dropped if `sender` leaves first: `senderLeft`).
    func whenIdle(sender: String?, bytes: Int = 0, _ work: @escaping () -> Void) {
        if isIdle { work() } else { waiting.append(sender: sender, bytes: bytes, work) }
    }

    /// Why a change of `sender` with `bytes` bytes of arguments may not wait for the update
    /// in progress (`ChangeQueue.holdBackRefusal`); nil when it runs at once or may wait.
    func holdBackRefusal(sender: String, bytes: Int) -> String? {
        isIdle ? nil : waiting.holdBackRefusal(sender: sender, bytes: bytes)
    }

    /// Step 7: executes an authorised `change` for `sender`: a single operation or Lock at
    /// once, an Apply through `startUpdate`, so `completion` may be called on a later loop
    /// turn. Called once the editor is idle (`whenIdle`); `completion` gets what the change
    /// did and what it committed (empty under the lock, where it is journaled instead).
    func execute(
        _ change: TableChange, sender: String,
        completion: @escaping (Result<(result: ChangeResult, committed: Journal), PestoError>) -> Void
    ) {
        guard case .apply(let kind, let request) = change else {
            do { return completion(.success(try executeAtOnce(change, sender: sender))) } catch { return completion(.failure(error)) }
        }
        do throws(PestoError) {
            try checkLock(sender)
            _ = try table(kind)
        } catch {
            return completion(.failure(error))
        }
        if lockOwner == sender { host?.saveCommitted() }
        let update = TableUpdate(kind: kind, inserts: request.inserts.map { ($0.0, $0.1, request.tolerance) }, removes: request.removes)
        startUpdate([update]) { [unowned self] outcome in
            switch outcome {
            case .failure(let error):
                self.logger.info("Apply on \(kind.rawValue) by \(sender) rolled back: \(error.message)")
                completion(.failure(error))
            case .success(let done):
                self.logger.info(
                    "Apply on \(kind.rawValue) by \(sender): \(update.inserts.count) inserted and activated, \(update.removes.count) removed"
                )
                completion(.success((.applied(done.results.map { ($0.id, $0.counts) }), self.finish(done.journal, sender: sender))))
            }
        }
    }

    /// Drops the changes `sender` has held back; returns how many.
    func dropWaiting(of sender: String) -> Int { waiting.drop(sender: sender) }

    // MARK: Updates over several loop turns (SlicedUpdate.swift)

    /// Starts an update: it is carried out in slices of `budget`, the first one now. If it
    /// is not done within that slice, the committed changes are saved first (`TablesEditorHost.saveCommitted`),
    /// and every other change is held back until it is. `completion` is called once, when
    /// its reports have been delivered: with what it did, or with the error it was rolled
    /// back for (see the theory of operation). Updates do not nest.
    func startUpdate(_ updates: [TableUpdate], budget: SliceBudget? = nil, completion: @escaping (SlicedUpdate.Outcome) -> Void) {
        precondition(running == nil, "updates do not nest")
        let budget = host == nil ? SliceBudget.unlimited : budget ?? sliceBudget
        let job = SlicedUpdate(updates, target: self, completion: completion)
        let work = job.operations
        if work > budget.operations {
            // It will not fit in one slice: what was committed before it is saved before any
            // of it is done.
            host?.saveCommitted()
        }
        running = job
        // An update that fits in one slice's operations is done in this call, whatever the
        // clock says, so it never leaves part of itself visible across a save.
        continueUpdate(job, budget: work > budget.operations ? budget : .unlimited, then: budget)
    }

    /// One slice of `job` (of `budget`); schedules the next (of `next`), or finishes the update.
    private func continueUpdate(_ job: SlicedUpdate, budget: SliceBudget, then next: SliceBudget) {
        if job.slices == 1 {
            logger.debug("an update of \(job.ruleCount) rules is carried out in slices")
            host?.updateInProgress(true)
        }
        let progress = job.step(budget) { host?.mayAnnounce ?? true }
        switch progress {
        case .done:
            running = nil
            if job.slices > 1 { host?.updateInProgress(false) }
            job.completion(job.outcome)
            // An update of one slice ran from `whenIdle` or from the queue, which goes on by itself.
            if job.slices > 1 { waiting.resume(until: { [unowned self] in self.running != nil }) }
        case .more, .waitsForBus:
            guard let host else { preconditionFailure("a sliced update needs a host to schedule its slices") }
            let work = { [unowned self] in self.continueUpdate(job, budget: next, then: next) }
            if progress == .waitsForBus { host.shortly(work) } else { host.nextTurn(work) }
        }
    }

    /// pestod stops while an update is in progress: it is rolled back at once (its caller is
    /// told so), and the changes held back behind it are dropped unanswered.
    func abandonUpdate() {
        guard let job = running else { return }
        job.abandon(
            PestoError(
                .locked, "pestod stopped before the change was complete; it was rolled back, nothing changed. Call again once pestod runs."
            ))
        running = nil
        host?.updateInProgress(false)
        job.completion(job.outcome)
        let dropped = waiting.dropAll()
        if dropped > 0 { logger.notice("stopping: \(dropped) changes held back behind it are dropped") }
    }

    // MARK: Uploads of the control socket (UpstreamUpdate.swift)

    /// What an upload changed.
    typealias UpstreamSummary = UpstreamUpdate.Summary

    /// The active rules of every table, as upstream's dump lists them, with upstream's weak
    /// flag where the rule was uploaded with it.
    func upstreamDump() -> [(kind: TableKind, capabilities: Capabilities, rules: [(rule: Rule, bestEffort: Bool)])] {
        UpstreamUpdate.dump(tables, weakRules: weakRules)
    }

    /// The most rules an upload may give one table: the tables' MaxRules, within the wire
    /// protocol's own limit.
    var upstreamRuleLimit: Int { UpstreamUpdate.ruleLimit(tables) }

    /// Applies an upload of whole tables (rules with their weak flag) as a difference, over
    /// several loop turns if it is large (SlicedUpdate.swift; at once without a host);
    /// `completion` gets what changed and the committed journal (to be saved), or why nothing
    /// changed (a refused upload changes nothing). Called once the editor is idle (`whenIdle`).
    func startUpstream(
        _ upload: UpstreamUpdate.Upload,
        completion: @escaping (Result<(summary: UpstreamSummary, committed: Journal), PestoError>) -> Void
    ) {
        let started = MonotonicInstant.now
        let plan: UpstreamUpdate
        do { plan = try UpstreamUpdate(upload, lockOwner: lockOwner, table: table) } catch { return completion(.failure(error)) }
        let rules = upload.reduce(0) { $0 + $1.rules.count }
        if rules >= 1000 {
            let ms = (MonotonicInstant.now.nanoseconds - started.nanoseconds) / 1_000_000
            logger.info("control socket: upload of \(rules) rules compared with the tables in \(ms) ms (one loop turn)")
        }
        startUpdate(plan.updates) { [unowned self] outcome in
            switch outcome {
            case .failure(let error): completion(.failure(error))
            case .success(let done): completion(.success((plan.applied(done.results, weakRules: &self.weakRules), done.journal)))
            }
        }
    }

    // MARK: The lock

    /// Takes the lock for `sender` (a no-op when it holds it already).
    func lock(_ sender: String) throws(PestoError) {
        if lockOwner == sender { return }
        try checkLock(sender)
        host?.saveCommitted()
        journal = Journal()
        setLockOwner(sender)
        logger.info("lock taken by \(sender)")
    }

    /// Throws `NotLocked` unless `sender` holds the lock.
    private func requireHolder(_ sender: String) throws(PestoError) {
        guard lockOwner == sender else {
            let who = lockOwner.map { " (\($0) holds it)" } ?? ""
            throw PestoError(PestoError.Code.notLocked, "You do not hold the lock\(who).")
        }
    }

    /// Releases the lock of `sender`, rolling back its uncommitted changes.
    func unlock(_ sender: String) throws(PestoError) {
        try requireHolder(sender)
        let uncommitted = journal.operations.count
        undoJournal()
        setLockOwner(nil)
        logger.info("lock released by \(sender)\(uncommitted > 0 ? "; rolled back its \(uncommitted) uncommitted changes" : "")")
    }

    /// Commits the holder's changes; returns them (to be saved).
    func commit(_ sender: String) throws(PestoError) -> Journal {
        try requireHolder(sender)
        let operations = journal
        journal = Journal()
        logger.info("\(sender) committed \(operations.operations.count) changes")
        return operations
    }

    /// Undoes the holder's uncommitted changes; the lock stays held.
    func rollback(_ sender: String) throws(PestoError) {
        try requireHolder(sender)
        undoJournal()
    }

    /// `name` left: if it held the lock, its uncommitted changes are rolled back and the
    /// lock released. Returns how many changes were undone, or nil if it held no lock.
    @discardableResult
    func holderLeft(_ name: String) -> Int? {
        guard let owner = lockOwner, owner == name else { return nil }
        let count = journal.operations.count
        logger.notice("lock holder \(owner) left the bus; rolling back its \(count) uncommitted changes")
        undoJournal()
        setLockOwner(nil)
        return count
    }

    private func undoJournal() {
        var j = journal
        journal = Journal()
        j.undo(logger: logger) { (op) throws(PestoError) in _ = try perform(op) }
    }

    private func setLockOwner(_ owner: String?) {
        lockOwner = owner
        observer?.lockOwnerChanged(owner)
        if owner == nil && !unlockWaiters.isEmpty {
            let waiters = unlockWaiters
            unlockWaiters = []
            for w in waiters { w() }
        }
    }

    /// Calls `body` once, when the lock is released next (at once if it is free).
    func whenUnlocked(_ body: @escaping () -> Void) {
        if lockOwner == nil { return body() }
        unlockWaiters.append(body)
    }
}
