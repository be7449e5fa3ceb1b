// SPDX-License-Identifier: GPL-2.0-or-later

// StateStore: the committed tables on disk (an SQLite database at the state path), so a
// restarted pestod comes back as it was; what the server records every committed change in.
//
// Theory of operation
// -------------------
// Opening (`open`, at start, before the loop runs):
//   1. Trust. The state path and its SQLite companions (PATH-wal, PATH-shm) must each be
//      absent or a regular file owned by pestod's user and not writable by group or others.
//      A symlink, or anything else, is refused with a message naming the path: pestod does
//      not start (a demanding administrator wants to know, not a file silently replaced).
//   2. What is there. Nothing: a new, empty store is created. An SQLite database: it is
//      opened and must be a pesto store of this schema (StoreDatabase.swift). A state file
//      of the old text format (`pestod-state 1`, StateFile.swift): it is migrated — its
//      rules are written to a new store, the text file is kept at PATH.v1, and the store
//      takes its place. Anything else, or a store that cannot be read, is moved aside
//      (PATH.bad-<time>, as the state file was) and pestod starts with empty tables.
//   A new store is always built under PATH.new and renamed over PATH once complete and
//   synced, so a crash at any instant leaves PATH as it was (old file or none) or the whole
//   new store, never a half-made one.
//
// Restoring is the caller's (StateFile.restore): the store returns the saved rules (live,
// then carried) and, once restored, is told the outcome with `settle`, which rewrites the
// carried rules (only when some are carried, before or now).
//
// Saving (`record`, through CommitBatch.swift) goes to the writer thread (StoreWriter.swift):
// one durable transaction per batch of committed changes, costing the changes only.

import Logging
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Where the server records committed changes (the SQLite store; tests may fake it).
public protocol TableStore: AnyObject {
    /// Saves `changes` durably, in order, all or none; `completion` runs on the loop thread
    /// once they are saved (nil) or are not (the error).
    func record(_ batch: StoreBatch, completion: @escaping (PestoError?) -> Void)
    /// Blocks until every change recorded so far is saved or failed and its completion has run.
    func finishRecording()
}

/// pestod's state store at one path.
public final class StateStore: TableStore {
    /// The state path.
    public let path: String
    private var database: StoreDatabase?
    private var writer: StoreWriter?
    /// Whether the store holds carried rules (so `settle` must rewrite them).
    private var hasCarried = false

    private init(path: String, database: StoreDatabase) {
        self.path = path
        self.database = database
    }

    /// What `open` found at the path.
    public enum Found: Sendable {
        /// Nothing: a new, empty store was created.
        case created
        /// A store: its live rules, then its carried rules.
        case loaded([StateFile.Entry])
        /// A text state file, migrated into a new store; the old file is kept at `keptAt`.
        case migrated([StateFile.Entry], keptAt: String)
        /// Something unusable, moved to `movedTo` (nil if even that failed); a new, empty store was created.
        case invalid(reason: String, movedTo: String?)
    }

    /// Opens the store at `path` (see the theory of operation). Throws, naming the path, for
    /// a path pestod does not trust or cannot create a store at.
    public static func open(path: String) throws(PestoError) -> (StateStore, Found) {
        for p in [path, path + "-wal", path + "-shm"] { try checkTrust(p) }
        var invalid: (reason: String, movedTo: String?)?
        switch detectFormat(path) {
        case .missing:
            break
        case .sqlite:
            do throws(PestoError) {
                let database = try StoreDatabase(path: path)
                let (live, carried) = try database.load()
                let store = StateStore(path: path, database: database)
                store.hasCarried = !carried.isEmpty
                return (store, .loaded(live + carried))
            } catch {
                invalid = (error.message, moveAside(path))
            }
        case .text:
            switch StateFile(path: path).load() {
            case .missing: break
            case .loaded(let entries):
                let kept = path + ".v1"
                let store = try create(path, with: entries, keeping: kept)
                store.hasCarried = true  // duplicates of the text file are carried until settled
                return (store, .migrated(entries, keptAt: kept))
            case .invalid(let reason, let movedTo): invalid = (reason, movedTo)
            }
        case .unknown(let what):
            invalid = (what, moveAside(path))
        }
        let store = try create(path, with: [], keeping: nil)
        if let invalid { return (store, .invalid(reason: invalid.reason, movedTo: invalid.movedTo)) }
        return (store, .created)
    }

    /// Refuses `p` unless it is absent or a regular file of pestod's user that only it may write.
    static func checkTrust(_ p: String) throws(PestoError) {
        let st: stat
        switch Sys.lstat(p) {
        case .success(let s): st = s
        case .failure(.noSuchFile): return
        case .failure(let e): throw PestoError(.system, "Cannot examine the state store path \(p).", underlyingError: e)
        }
        let kind = st.st_mode & S_IFMT
        if kind == S_IFLNK {
            throw PestoError(
                .system,
                "The state store path \(p) is a symbolic link; pestod never follows one there. Remove it, or give --state the real file's path."
            )
        }
        guard kind == S_IFREG else { throw PestoError(.system, "The state store path \(p) is not a regular file.") }
        guard st.st_uid == geteuid() else {
            throw PestoError(.system, "The state store path \(p) belongs to uid \(st.st_uid), not to pestod's user (uid \(geteuid())).")
        }
        guard st.st_mode & 0o022 == 0 else {
            throw PestoError(
                .system, "The state store path \(p) may be written by other users (mode \(String(st.st_mode & 0o777, radix: 8))).")
        }
    }

    /// What the first bytes of a file say it is.
    enum Format: Equatable {
        case missing, sqlite, text
        case unknown(String)
    }

    /// Reads the first bytes of `path` (never following a symlink).
    static func detectFormat(_ path: String) -> Format {
        let fd: Int32
        switch Sys.open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) {
        case .success(let opened): fd = opened
        case .failure(.noSuchFile): return .missing
        case .failure(let e): return .unknown("cannot be opened: \(e)")
        }
        defer { Sys.close(fd) }
        var head = [UInt8](repeating: 0, count: 16)
        var got = 0
        while got < head.count {
            switch head.withUnsafeMutableBytes({ Sys.read(fd, $0.baseAddress! + got, 16 - got) }) {
            case .success(0): break
            case .success(let n):
                got += n
                continue
            case .failure(.interrupted): continue
            case .failure(let e): return .unknown("cannot be read: \(e)")
            }
            break
        }
        if got == 16 && head == Array("SQLite format 3\0".utf8) { return .sqlite }
        if head.prefix(got).starts(with: "pestod-state".utf8) { return .text }
        return .unknown(got == 0 ? "the file is empty" : "it is neither a pesto store nor a state file")
    }

    /// Moves an unusable store (and its WAL) aside; the shared-memory index is removed.
    static func moveAside(_ path: String) -> String? {
        guard case .invalid(_, let movedTo) = StateFile(path: path).moveAside("") else { return nil }
        if let movedTo {
            if case .success = Sys.lstat(path + "-wal") { _ = Sys.rename(path + "-wal", to: movedTo + "-wal") }
            _ = Sys.unlink(path + "-shm")
        }
        return movedTo
    }

    /// Builds a new store holding `entries` under PATH.new and renames it over `path`
    /// (keeping what was there at `keeping`, a hard link, when given); then opens it.
    static func create(_ path: String, with entries: [StateFile.Entry], keeping: String?) throws(PestoError) -> StateStore {
        let temp = path + ".new"
        for p in [temp, temp + "-wal", temp + "-shm", temp + "-journal"] {
            if case .failure(let e) = Sys.unlink(p), e != .noSuchFile {
                throw PestoError(.system, "Cannot remove the stale \(p).", underlyingError: e)
            }
        }
        do {
            let database = try SQLiteDatabase(path: temp, create: true)
            defer { database.close() }
            try StoreDatabase.createSchema(database)
            try database.exec("PRAGMA synchronous = FULL")
            if !entries.isEmpty {
                // The text file may hold a live and a carried rule with one table and ID: the
                // first is the rule, the later ones are carried.
                var seen = Set<String>()
                var live: [StateFile.Entry] = []
                var carried: [(entry: StateFile.Entry, reason: String)] = []
                for e in entries {
                    if seen.insert("\(e.table.rawValue) \(e.id)").inserted {
                        live.append(e)
                    } else {
                        carried.append((e, "an earlier rule of the state file has the same table and ID"))
                    }
                }
                let store = try StoreDatabase(path: temp)
                try store.replaceAll(live: live, carried: carried)
            }
            // Everything into the database file itself, synced: the WAL is empty and goes at close.
            try database.exec("PRAGMA wal_checkpoint(TRUNCATE)")
        }
        if let keeping {
            _ = Sys.unlink(keeping)
            if case .failure(let e) = Sys.link(path, to: keeping) {
                throw PestoError(.system, "Cannot keep the old state file at \(keeping).", underlyingError: e)
            }
        }
        // A WAL left from an earlier store must not be replayed into the new one.
        for p in [path + "-wal", path + "-shm"] { _ = Sys.unlink(p) }
        if case .failure(let e) = Sys.rename(temp, to: path) {
            throw PestoError(.system, "Cannot put the new state store at \(path).", underlyingError: e)
        }
        syncDirectory(of: path)
        return StateStore(path: path, database: try StoreDatabase(path: path))
    }

    /// fsyncs the directory holding `path` (a rename in it is durable then); failures are
    /// left to the next save, which syncs what it writes.
    static func syncDirectory(of path: String) {
        let dir = StateFile(path: path).directory
        guard case .success(let fd) = Sys.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) else { return }
        _ = Sys.fsync(fd)
        Sys.close(fd)
    }

    /// Records the outcome of the restore (or of a takeover's handed-over tables): `live` is
    /// now in the tables, `carried` could not be restored. Rewrites the store where it holds
    /// carried rules or some are carried now; otherwise the store already matches.
    public func settle(live: [StateFile.Entry], carried: [(entry: StateFile.Entry, reason: String)], force: Bool = false)
        throws(PestoError)
    {
        guard let database else { preconditionFailure("settle() after start()") }
        guard force || hasCarried || !carried.isEmpty else { return }
        try database.replaceAll(live: live, carried: carried)
        hasCarried = !carried.isEmpty
    }

    /// Starts the writer thread, which saves what `record` is given from now on.
    public func start(loop: EventLoop) throws(PestoError) {
        guard let database else { preconditionFailure("start() twice") }
        writer = try StoreWriter(database: database, loop: loop)
        self.database = nil
    }

    public func record(_ batch: StoreBatch, completion: @escaping (PestoError?) -> Void) {
        guard let writer else { preconditionFailure("record() before start()") }
        writer.record(batch, completion: completion)
    }

    public func finishRecording() { writer?.finishRecording() }

    /// Saves what is recorded, stops the writer and closes the database (at exit).
    public func close() {
        writer?.close()
        writer = nil
        database = nil
    }

    /// The saved rules at `path`, live then carried, without opening it for pestod (tests, tools).
    static func read(_ path: String) throws(PestoError) -> (live: [StateFile.Entry], carried: [StateFile.Entry]) {
        try StoreDatabase(path: path).load()
    }
}
