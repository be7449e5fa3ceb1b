// SPDX-License-Identifier: GPL-2.0-or-later

// StoreDatabase: the state store's content in SQLite, a row per saved rule, so that saving
// a change costs the change: a one-rule commit is one row written in one transaction, the
// same at 10 rules as at 65,535.
//
// Schema (doc/architecture.md, "The state store"; `sqlite3 /var/lib/pesto/state .schema`):
//
//     PRAGMA application_id = 0x50455354 ("PEST"), user_version = 1;
//     CREATE TABLE rules (          -- the committed rules
//         target TEXT NOT NULL,     -- the network namespace the rules are for: '' is pestod's
//         tbl    TEXT NOT NULL,     -- host, splice (TableKind's raw value)
//         id     INTEGER NOT NULL,  -- the client-chosen rule ID
//         active INTEGER NOT NULL CHECK (active IN (0, 1)),
//         fields TEXT NOT NULL,     -- the rule's fields as the state file wrote them
//         PRIMARY KEY (target, tbl, id)) WITHOUT ROWID;
//     CREATE TABLE carried (        -- saved rules this start could not restore
//         seq INTEGER PRIMARY KEY, target TEXT NOT NULL, tbl TEXT NOT NULL, id INTEGER NOT NULL,
//         active INTEGER NOT NULL, fields TEXT NOT NULL, reason TEXT NOT NULL);
//
// `fields` keeps the text form of the state file (`protocol=tcp address=127.0.0.1 ...`,
// StateFile.swift) rather than a column per field: a field added later is read with its
// default from older rows, exactly as the text format already does, so no schema change is
// ever needed for one. Rules are keyed by (target, table, ID) from the start, so that rules
// for several network namespaces share the store without a migration.
//
// Carried rules are in a table of their own, not keyed by ID: a carried rule and a live
// rule may share a table and an ID (the live one won at the last start); the live one is
// tried first at the next start, as the state file did.
//
// Durability: WAL mode with synchronous=FULL, so a commit is on disk (the WAL fsynced)
// when `apply` returns; a crash at any instant leaves the last committed transaction.
// Automatic checkpoints are off (one would run inside a commit): a checkpoint thread with a
// connection of its own checkpoints once the WAL has grown past `checkpointFrames`
// (StoreWriter.swift), while commits go on.

import CSQLite
import PestoModel

/// The state store's tables in one SQLite database.
final class StoreDatabase {
    /// Identifies a pesto store among SQLite files ("PEST").
    static let applicationID: Int64 = 0x5045_5354
    /// The schema version (`PRAGMA user_version`).
    static let schemaVersion: Int64 = 1
    /// The target of pestod's own network namespace (the only one so far).
    static let ownTarget = ""
    /// WAL frames (pages) after which the idle writer checkpoints.
    static let checkpointFrames: Int32 = 1000

    let database: SQLiteDatabase
    private let insertRule: SQLiteStatement
    private let deleteRule: SQLiteStatement
    private let setActive: SQLiteStatement
    /// Pages in the WAL after the last commit (set by SQLite's WAL hook).
    private let walFrames = UnsafeMutablePointer<Int32>.allocate(capacity: 1)

    /// Opens the store at `path`, which must hold one (`StoreFile.open` checks that first).
    init(path: String) throws(PestoError) {
        database = try SQLiteDatabase(path: path, create: false)
        // Checked before anything is written: another application's database is left as it is.
        guard try database.integer("PRAGMA application_id") == Self.applicationID else {
            throw PestoError(.system, "it is an SQLite database but not a pesto state store (its application_id differs)")
        }
        guard let version = try database.integer("PRAGMA user_version"), version == Self.schemaVersion else {
            throw PestoError(.system, "it is a pesto state store of a schema this pestod does not know")
        }
        try Self.configure(database)
        insertRule = try database.prepare("INSERT OR REPLACE INTO rules (target, tbl, id, active, fields) VALUES (?, ?, ?, 0, ?)")
        deleteRule = try database.prepare("DELETE FROM rules WHERE target = ? AND tbl = ? AND id = ?")
        setActive = try database.prepare("UPDATE rules SET active = ? WHERE target = ? AND tbl = ? AND id = ?")
        walFrames.initialize(to: 0)
        sqlite3_wal_hook(
            database.db,
            { context, _, _, pages in
                context?.assumingMemoryBound(to: Int32.self).pointee = pages
                return SQLITE_OK
            }, walFrames)
    }

    deinit {
        insertRule.finalize()
        deleteRule.finalize()
        setActive.finalize()
        database.close()
        walFrames.deallocate()
    }

    /// The connection settings every opening needs: WAL, a durable commit, no automatic
    /// checkpoint, a WAL file kept small once checkpointed.
    static func configure(_ database: SQLiteDatabase) throws(PestoError) {
        try database.exec(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 4194304;"
        )
        // A lock held by another process (a pestod handing over) is waited for, on the writer thread.
        sqlite3_busy_timeout(database.db, 5000)
    }

    /// Creates the schema in a new, empty database.
    static func createSchema(_ database: SQLiteDatabase) throws(PestoError) {
        try database.exec(
            """
            PRAGMA journal_mode = WAL;
            BEGIN;
            PRAGMA application_id = \(applicationID);
            PRAGMA user_version = \(schemaVersion);
            CREATE TABLE rules (
                target TEXT NOT NULL, tbl TEXT NOT NULL, id INTEGER NOT NULL,
                active INTEGER NOT NULL CHECK (active IN (0, 1)), fields TEXT NOT NULL,
                PRIMARY KEY (target, tbl, id)) WITHOUT ROWID;
            CREATE TABLE carried (
                seq INTEGER PRIMARY KEY, target TEXT NOT NULL, tbl TEXT NOT NULL, id INTEGER NOT NULL,
                active INTEGER NOT NULL CHECK (active IN (0, 1)), fields TEXT NOT NULL, reason TEXT NOT NULL);
            COMMIT;
            """)
    }

    // MARK: Reading

    /// The saved rules of pestod's own target: the live ones in table and ID order, then the
    /// carried ones in the order they were carried. A row that does not parse makes the whole
    /// store unusable, as a bad line made the state file.
    func load() throws(PestoError) -> (live: [StateFile.Entry], carried: [StateFile.Entry]) {
        let tableOrder = Dictionary(uniqueKeysWithValues: TableKind.allCases.enumerated().map { ($1.rawValue, $0) })
        var live = try entries("SELECT tbl, id, active, fields FROM rules WHERE target = ? ORDER BY tbl, id", what: "rule")
        live.sort { (tableOrder[$0.table.rawValue] ?? 0, $0.id) < (tableOrder[$1.table.rawValue] ?? 0, $1.id) }
        let carried = try entries("SELECT tbl, id, active, fields FROM carried WHERE target = ? ORDER BY seq", what: "carried rule")
        return (live, carried)
    }

    /// The rows of `sql` (tbl, id, active, fields of the own target) as entries.
    private func entries(_ sql: String, what: String) throws(PestoError) -> [StateFile.Entry] {
        let statement = try database.prepare(sql)
        defer { statement.finalize() }
        try statement.bind([.text(Self.ownTarget)])
        var out: [StateFile.Entry] = []
        var row = 0
        while try statement.step() {
            row += 1
            let active = statement.int64(2)
            let line =
                "rule \(statement.text(0)) \(statement.int64(1)) \(active == 1 ? "active" : active == 0 ? "inactive" : "bad-state-\(active)") \(statement.text(3))"
            do {
                out.append(try StateFile.parseLine(line, number: row))
            } catch {
                throw PestoError(.system, "\(what) row \(row): \(error.message)")
            }
        }
        return out
    }

    // MARK: Writing

    /// Saves `changes` in one transaction, durably: all of them or, on an error, none.
    func apply(_ changes: [StoredChange]) throws(PestoError) {
        try apply(StoreBatch(changes))
    }

    /// Saves `batch` in one transaction, durably: all of it or, on an error, nothing.
    func apply(_ batch: StoreBatch) throws(PestoError) {
        try database.exec("BEGIN IMMEDIATE")
        do throws(PestoError) {
            let target = SQLiteValue.text(Self.ownTarget)
            for change in batch {
                switch change {
                case .insert(let kind, let id, let rule):
                    try insertRule.run([target, .text(kind.rawValue), .integer(Int64(id)), .text(StateFile.fields(of: rule))])
                case .delete(let kind, let id):
                    try deleteRule.run([target, .text(kind.rawValue), .integer(Int64(id))])
                case .setActive(let kind, let id, let active):
                    try setActive.run([.integer(active ? 1 : 0), target, .text(kind.rawValue), .integer(Int64(id))])
                }
            }
            try database.exec("COMMIT")
        } catch {
            _ = try? database.exec("ROLLBACK")
            throw error
        }
    }

    /// Replaces pestod's own rules with `live` and its carried rules with `carried`, in one
    /// transaction (at start, once the tables are restored or handed over).
    func replaceAll(live: [StateFile.Entry], carried: [(entry: StateFile.Entry, reason: String)]) throws(PestoError) {
        try database.exec("BEGIN IMMEDIATE")
        do throws(PestoError) {
            let target = SQLiteValue.text(Self.ownTarget)
            let clearRules = try database.prepare("DELETE FROM rules WHERE target = ?")
            defer { clearRules.finalize() }
            try clearRules.run([target])
            let clearCarried = try database.prepare("DELETE FROM carried WHERE target = ?")
            defer { clearCarried.finalize() }
            try clearCarried.run([target])
            let insertLive = try database.prepare("INSERT OR REPLACE INTO rules (target, tbl, id, active, fields) VALUES (?, ?, ?, ?, ?)")
            defer { insertLive.finalize() }
            for e in live {
                try insertLive.run([
                    target, .text(e.table.rawValue), .integer(Int64(e.id)), .integer(e.active ? 1 : 0), .text(StateFile.fields(of: e.rule)),
                ])
            }
            let insertCarried = try database.prepare(
                "INSERT INTO carried (target, tbl, id, active, fields, reason) VALUES (?, ?, ?, ?, ?, ?)")
            defer { insertCarried.finalize() }
            for (e, reason) in carried {
                try insertCarried.run([
                    target, .text(e.table.rawValue), .integer(Int64(e.id)), .integer(e.active ? 1 : 0),
                    .text(StateFile.fields(of: e.rule)), .text(reason),
                ])
            }
            try database.exec("COMMIT")
        } catch {
            _ = try? database.exec("ROLLBACK")
            throw error
        }
    }

    /// Whether the WAL had grown past `checkpointFrames` at the last commit.
    var wantsCheckpoint: Bool { walFrames.pointee >= Self.checkpointFrames }

    /// Copies the WAL's pages into the database file through `connection` (the checkpoint
    /// thread's own): a passive checkpoint, which takes no lock a commit needs, so commits go on
    /// meanwhile; the first commit after a complete one starts the WAL over. Failures are left
    /// for the next try.
    static func checkpoint(_ connection: SQLiteDatabase) {
        var log: Int32 = 0
        var done: Int32 = 0
        _ = sqlite3_wal_checkpoint_v2(connection.db, nil, SQLITE_CHECKPOINT_PASSIVE, &log, &done)
    }
}

/// The changes of one save, in order: the journals of the committed changes, handed over as
/// they are (no copy on the loop thread) and read as `StoredChange`s by the writer.
public struct StoreBatch: Sendable, Sequence {
    /// The journals' operations, oldest change first.
    let journals: [[TableOperation]]

    init(journals: [[TableOperation]]) { self.journals = journals }

    /// A batch of `changes` (tests, tools).
    init(_ changes: [StoredChange]) {
        journals = [
            changes.map { change in
                switch change {
                case .insert(let kind, let id, let rule): return .insert(kind, id, rule)
                case .delete(let kind, let id): return .delete(kind, id, Rule(proto: .tcp, firstPort: 1))  // the rule is not stored
                case .setActive(let kind, let id, let active): return active ? .activate(kind, id) : .deactivate(kind, id)
                }
            }
        ]
    }

    /// How many changes.
    public var count: Int { journals.reduce(0) { $0 + $1.count } }

    public func makeIterator() -> some IteratorProtocol<StoredChange> {
        journals.lazy.joined().map { op -> StoredChange in
            switch op {
            case .insert(let kind, let id, let rule): return .insert(kind, id, rule)
            case .delete(let kind, let id, _): return .delete(kind, id)
            case .activate(let kind, let id): return .setActive(kind, id, true)
            case .deactivate(let kind, let id): return .setActive(kind, id, false)
            }
        }.makeIterator()
    }
}

/// A change to one saved rule, as the store records it.
public enum StoredChange: Sendable, Equatable {
    /// A rule inserted (inactive, as every insert is).
    case insert(TableKind, UInt32, Rule)
    case delete(TableKind, UInt32)
    case setActive(TableKind, UInt32, Bool)
}
