// SPDX-License-Identifier: GPL-2.0-or-later

// CommitBatch: the changes committed during one loop turn, saved together before the loop
// sleeps and acknowledged only once saved.
//
// Theory of operation
// -------------------
// A committed change (a call made without the lock, a Commit, an upload on the control
// socket) is performed on the engine at once, so later calls of the same turn see it, but
// its caller is not answered yet: the change's journal and a completion are added here.
// Just before the event loop sleeps (`EventLoop.endOfTurn`), `flush()` saves the committed
// state once for all of them:
//   - saved: every completion is called with nil, oldest first (the replies go out);
//   - not saved: every change of the batch is undone, newest first through its journal,
//     so the tables are back to what the file holds, and every completion gets the same
//     `SaveFailed` error.
// Undoing is valid because the batch's changes are always the newest ones on the tables:
// the server flushes before the lock holder journals anything on top of a non-empty batch
// (see `TablesEditorHost.saveCommitted`), and nothing else changes rules.
// This type knows nothing of D-Bus; it is tested in process.

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

    private var pending: [Pending] = []
    /// Writes the committed state (the tables as they now are, plus what is carried).
    private let save: () throws(PestoError) -> Void
    /// Performs one inverse operation on the tables.
    private let perform: (TableOperation) throws(PestoError) -> Void
    private let logger: Logger
    /// Saves done so far (for tests and logs).
    private(set) var saves = 0

    /// A batch that saves with `save` and undoes through `perform`.
    init(
        logger: Logger = Logger(label: "pestod"), save: @escaping () throws(PestoError) -> Void,
        perform: @escaping (TableOperation) throws(PestoError) -> Void
    ) {
        self.logger = logger
        self.save = save
        self.perform = perform
    }

    /// No change is waiting for the save.
    var isEmpty: Bool { pending.isEmpty }

    /// Adds a committed change; `completion` is called once by `flush()`: nil when saved,
    /// the `SaveFailed` error when the change was undone because it could not be saved.
    func add(_ journal: Journal, completion: @escaping (PestoError?) -> Void) {
        pending.append(Pending(journal: journal, completion: completion))
    }

    /// Saves every waiting change at once, or undoes them all; then calls the completions.
    func flush() {
        guard !pending.isEmpty else { return }
        let batch = pending
        pending = []
        saves += 1
        var failure: PestoError?
        do throws(PestoError) {
            try save()
        } catch {
            let reason = error.message + (error.underlyingError.map { " (\($0))" } ?? "")
            let count = batch.reduce(0) { $0 + $1.journal.operations.count }
            logger.error("cannot save the state: \(reason); undoing the \(count) operations of \(batch.count) unsaved changes")
            for item in batch.reversed() {
                var journal = item.journal
                journal.undo(logger: logger, perform: perform)
            }
            failure = PestoError(
                PestoError.Code.saveFailed, "The change could not be saved (\(reason)), so it was undone; nothing changed.",
                underlyingError: error.underlyingError)
        }
        if failure == nil { logger.debug("saved \(batch.count) committed changes in one write") }
        for item in batch { item.completion(failure) }
    }
}
