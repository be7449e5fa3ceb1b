// SPDX-License-Identifier: GPL-2.0-or-later

// TablesPersistence: where the committed tables are kept between runs of pestod — the seam
// between the daemon (PestoDaemon.swift) and its store. The daemon opens and restores once at
// start, before it answers any call (or, after a takeover, tells the store which handed-over
// rules it could not restore), then starts the store on the loop and gives it to the server,
// which hands it the changes committed in each loop turn (CommitBatch.swift); at exit the
// store saves what is pending and stops. `StateStorePersistence` is pestod's `--state FILE`
// (StateStore.swift, SQLite); a test or another store passes another conforming type.

import Logging
import PestoEngine
import PestoModel

/// Keeps the committed tables across restarts.
public protocol TablesPersistence: AnyObject {
    /// Opens the store and restores the saved tables into `engine` at start; returns the saved
    /// rules that could not be restored (kept by the store and tried again at the next start).
    /// Throws for a store pestod refuses to use (a symlink, another user's file).
    func restore(into engine: ForwardingEngine, logger: Logger) throws(PestoError) -> [StateFile.Entry]
    /// After a takeover: opens the store the running pestod saved everything to, and records
    /// the handed-over rules this pestod could not restore.
    func adopt(_ engine: ForwardingEngine, carried: [(entry: StateFile.Entry, reason: String)]) throws(PestoError)
    /// Starts saving on `loop`; returns the store the server hands committed changes to.
    func start(loop: EventLoop) throws(PestoError) -> any TableStore
    /// Saves every committed change still pending and stops (at exit).
    func close()
}

/// The tables kept in a state store at one path (StateStore.swift), pestod's `--state FILE`.
public final class StateStorePersistence: TablesPersistence {
    /// The store's path.
    public let path: String
    /// The open store, once `restore` or `adopt` opened it.
    private var store: StateStore?

    /// Keeps the tables in the store at `path`.
    public init(path: String) { self.path = path }

    /// Opens the store (or migrates the old state file there, or starts a new one beside an
    /// unusable file moved aside) and restores the tables from it. One summary line for the
    /// rules that could not be restored, not one per rule (those are debug lines).
    public func restore(into engine: ForwardingEngine, logger: Logger) throws(PestoError) -> [StateFile.Entry] {
        let (opened, found) = try StateStore.open(path: path)
        store = opened
        let entries: [StateFile.Entry]
        switch found {
        case .created:
            logger.info("no state at \(path) yet: created an empty store there, starting with empty tables")
            return []
        case .loaded(let saved):
            entries = saved
        case .migrated(let saved, let kept):
            logger.notice(
                "migrated the state file \(path) (\(ClientText.counted(saved.count, "rule"))) into a state store; the old file is kept at \(kept)"
            )
            entries = saved
        case .invalid(let reason, let movedTo):
            logger.critical(
                "state store \(path) is unusable (\(reason)); starting with empty tables in a new store; the old file was \(movedTo.map { "moved to \($0)" } ?? "removed (it could not be moved aside)")"
            )
            return []
        }
        let result = StateFile.restore(entries, into: engine)
        try opened.settle(live: StateFile.entries(of: engine), carried: result.carried)
        logger.info("restored \(result.restored) of \(ClientText.counted(entries.count, "rule")) from \(path)")
        Self.logCarried(result.carried, source: "state store \(path)", logger: logger)
        return result.carried.map(\.entry)
    }

    /// Opens the store the running pestod saved everything to before it handed over; the
    /// handed-over rules that could not be restored are this pestod's carried rules now.
    public func adopt(_ engine: ForwardingEngine, carried: [(entry: StateFile.Entry, reason: String)]) throws(PestoError) {
        let (opened, _) = try StateStore.open(path: path)
        try opened.settle(live: StateFile.entries(of: engine), carried: carried)
        store = opened
    }

    /// Starts the store's writer thread on `loop`.
    public func start(loop: EventLoop) throws(PestoError) -> any TableStore {
        guard let store else { preconditionFailure("StateStorePersistence.start before restore or adopt") }
        try store.start(loop: loop)
        return store
    }

    /// Saves what is pending; the writer thread stops.
    public func close() { store?.close() }

    /// One warning for the rules that could not be restored, with the first reason; each
    /// rule at debug level.
    static func logCarried(_ carried: [(entry: StateFile.Entry, reason: String)], source: String, logger: Logger) {
        guard let first = carried.first else { return }
        for (entry, reason) in carried { logger.debug("\(source): \(entry.table.name) rule \(entry.id) not restored: \(reason)") }
        logger.warning(
            "\(source): \(ClientText.counted(carried.count, "rule")) could not be restored (first: \(first.entry.table.name) rule \(first.entry.id): \(first.reason)); they stay in the store and are tried again at the next start"
        )
    }
}
