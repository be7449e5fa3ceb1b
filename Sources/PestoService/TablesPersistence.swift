// SPDX-License-Identifier: GPL-2.0-or-later

// TablesPersistence: where the committed tables are kept between runs of pestod — the seam
// between the daemon (PestoDaemon.swift) and its store. The daemon restores once at start,
// before it answers any call, and saves through `save` once per loop turn in which something
// was committed (CommitBatch.swift); a store is swapped by passing another conforming type.

import Logging
import PestoEngine
import PestoModel

/// Keeps the committed tables across restarts.
public protocol TablesPersistence: AnyObject {
    /// Restores the saved tables into `engine` at start; returns the saved rules that could
    /// not be restored, which every later save must keep.
    func restore(into engine: ForwardingEngine, logger: Logger) -> [StateFile.Entry]
    /// Saves the committed tables of `engine` plus the `carried` rules that could not be
    /// restored; throws SaveFailed (nothing may be acknowledged then).
    func save(_ engine: ForwardingEngine, carried: [StateFile.Entry]) throws(PestoError)
}

/// The tables kept in one text file (StateFile.swift), pestod's `--state FILE`.
public final class StateFilePersistence: TablesPersistence {
    /// The file.
    public let file: StateFile

    /// Keeps the tables in the file at `path`.
    public init(path: String) { file = StateFile(path: path) }

    /// Restores the tables from the file; returns the saved rules that could not be
    /// restored, which every save writes back (so they are never lost, see StateFile.swift).
    public func restore(into engine: ForwardingEngine, logger: Logger) -> [StateFile.Entry] {
        let state = file.path
        switch file.load() {
        case .missing:
            logger.info("no state file at \(state) yet: starting with empty tables")
            return []
        case .loaded(let entries):
            let result = StateFile.restore(entries, into: engine)
            for (entry, reason) in result.carried {
                logger.warning("state file \(state): \(entry.table.name) rule \(entry.id) not restored, kept in the file: \(reason)")
            }
            logger.info("restored \(result.restored) of \(ClientText.counted(entries.count, "rule")) from \(state)")
            if !result.carried.isEmpty {
                logger.warning(
                    "state file \(state): \(ClientText.counted(result.carried.count, "rule")) could not be restored; they stay in the file and are tried again at the next start"
                )
            }
            return result.carried.map(\.entry)
        case .invalid(let reason, let movedTo):
            logger.critical(
                "state file \(state) is unusable (\(reason)); starting with empty tables; the file was \(movedTo.map { "moved to \($0)" } ?? "left in place (it could not be moved aside, and the first save replaces it)")"
            )
            return []
        }
    }

    /// Writes the committed tables and the carried rules atomically.
    public func save(_ engine: ForwardingEngine, carried: [StateFile.Entry]) throws(PestoError) {
        try file.save(StateFile.entries(of: engine) + carried)
    }
}
