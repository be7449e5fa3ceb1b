// SPDX-License-Identifier: GPL-2.0-or-later

// CommitBatch: the changes committed during a loop turn, saved together off the loop and
// acknowledged only once saved.
//
// Theory of operation
// -------------------
// A committed change (a call made without the lock, a Commit, an upload on the control
// socket) is performed on the engine at once, so later calls see it, but its caller is not
// answered yet: the change's journal and a completion are added here. Just before the event
// loop sleeps (`EventLoop.endOfTurn`), `submit()` hands the operations of every change
// waiting to the store (`TableStore.record`: the writer thread, StoreWriter.swift) and the
// loop goes on. When the store reports back (on the loop thread):
//   - saved: every completion is called with nil, oldest first (the replies go out);
//   - not saved: every change of the batch, and every change committed after it and not
//     yet submitted, is undone, newest first through its journal, so the tables are back to
//     what the store holds, and every completion gets the same `SaveFailed` error.
// One batch is with the store at a time: the changes committed meanwhile wait for the
// next, so a failed batch never has a saved one after it.
// Undoing is valid because the batch's changes are always the newest ones on the tables:
// the server waits for the store (`flush()`) before the lock holder journals anything on
// top of committed changes (see `TablesEditorHost.saveCommitted`) and before a large change
// starts, and nothing else changes rules.
// This type knows nothing of D-Bus or SQLite; it is tested in process.

import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Committed, not yet saved changes and whom to tell once they are (or are not) saved.
final class CommitBatch {
    /// One committed change waiting for the save.
    private struct Pending {
        let journal: Journal
        let completion: (PestoError?) -> Void
    }

    /// Committed, not yet handed to the store.
    private var pending: [Pending] = []
    /// Handed to the store, waiting for its outcome.
    private var saving: [Pending] = []
    /// Saves the committed changes.
    private let store: any TableStore
    /// Performs one inverse operation on the tables.
    private let perform: (TableOperation) throws(PestoError) -> Void
    private let logger: Logger
    /// Batches handed to the store so far (for tests and logs).
    private(set) var saves = 0
    /// Called once a batch of at least `largeBatch` operations is saved, with how many
    /// operations and the milliseconds from hand-over to outcome (the server logs it).
    var largeBatchSaved: (_ operations: Int, _ milliseconds: UInt64) -> Void = { _, _ in }
    /// The operations that make a batch large.
    static let largeBatch = 1000

    /// A batch that saves to `store` and undoes through `perform`.
    init(logger: Logger = Logger(label: "pestod"), store: any TableStore, perform: @escaping (TableOperation) throws(PestoError) -> Void) {
        self.logger = logger
        self.store = store
        self.perform = perform
    }

    /// No change is waiting for the save, nor being saved.
    var isEmpty: Bool { pending.isEmpty && saving.isEmpty }

    /// Adds a committed change; `completion` is called once: nil when saved, the `SaveFailed`
    /// error when the change was undone because it could not be saved.
    func add(_ journal: Journal, completion: @escaping (PestoError?) -> Void) {
        pending.append(Pending(journal: journal, completion: completion))
    }

    /// Hands every waiting change to the store, unless a batch is being saved (they go when
    /// it is done). Does not wait.
    func submit() {
        guard saving.isEmpty, !pending.isEmpty else { return }
        saving = pending
        pending = []
        saves += 1
        // The journals' arrays are shared, not copied: the loop's cost is one per change.
        let batch = StoreBatch(journals: saving.map(\.journal.operations))
        let started = MonotonicInstant.now
        let count = batch.count
        store.record(batch) { [unowned self] failure in
            if count >= Self.largeBatch { largeBatchSaved(count, (MonotonicInstant.now.nanoseconds - started.nanoseconds) / 1_000_000) }
            self.saved(failure)
        }
    }

    /// Saves every committed change (waiting for the store), or undoes them; then calls the
    /// completions. On return, nothing committed is unsaved.
    func flush() {
        // Each round saves (or fails) the batch with the store, which submits the next.
        while !isEmpty {
            submit()
            store.finishRecording()
        }
    }

    /// The store's outcome for the batch being saved.
    private func saved(_ error: PestoError?) {
        let batch = saving
        saving = []
        guard let error else {
            logger.debug("saved \(batch.count) committed changes in one transaction")
            for item in batch { item.completion(nil) }
            submit()
            return
        }
        // The changes committed since are on top of the batch: they are undone first, and
        // fail too (the store has none of them).
        let failed = batch + pending
        pending = []
        let reason = error.message + (error.underlyingError.map { " (\($0))" } ?? "")
        let count = failed.reduce(0) { $0 + $1.journal.operations.count }
        logger.error("cannot save the state: \(reason); undoing the \(count) operations of \(failed.count) unsaved changes")
        for item in failed.reversed() {
            var journal = item.journal
            journal.undo(logger: logger, perform: perform)
        }
        let failure = PestoError(
            PestoError.Code.saveFailed, "The change could not be saved (\(reason)), so it was undone; nothing changed.",
            underlyingError: error.underlyingError)
        for item in failed { item.completion(failure) }
    }
}
