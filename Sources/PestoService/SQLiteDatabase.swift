// SPDX-License-Identifier: GPL-2.0-or-later

// SQLiteDatabase: one connection to an SQLite database through the system's libsqlite3, with
// prepared statements and errors turned into `PestoError`s (the message SQLite gives, and
// the errno of the failed system call where there was one).
//
// A connection is used by one thread at a time (the store's writer thread, or the loop
// thread before that thread starts); it is opened in serialized mode anyway, so a misuse
// costs a mutex, not the database. SQLite makes its own system calls: like libdbus, it is a
// library pestod links, not code that goes through the `Sys` funnel.

import CSQLite
import PestoModel

/// One open SQLite connection.
final class SQLiteDatabase {
    /// The database file.
    let path: String
    private var handle: OpaquePointer?

    /// Opens `path` read-write (creating it if `create`), never following a symlink there.
    init(path: String, create: Bool) throws(PestoError) {
        self.path = path
        var db: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0) | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_FULLMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(rc))
            let errno = db.map { sqlite3_system_errno($0) } ?? 0
            sqlite3_close_v2(db)
            throw PestoError(
                .system, "Cannot open the state store \(path): \(message).", underlyingError: errno == 0 ? nil : Errno(rawValue: errno))
        }
        handle = db
        sqlite3_extended_result_codes(db, 1)
    }

    deinit { close() }

    /// Closes the connection (statements must be finalized first); idempotent.
    func close() {
        guard let handle else { return }
        sqlite3_close_v2(handle)
        self.handle = nil
    }

    /// The connection, which must be open.
    var db: OpaquePointer {
        guard let handle else { preconditionFailure("the state store \(path) is used after close()") }
        return handle
    }

    /// The error of the last call on this connection, as `what` failed.
    func error(_ what: String) -> PestoError {
        let message = String(cString: sqlite3_errmsg(db))
        let errno = sqlite3_system_errno(db)
        return PestoError(
            .system, "\(what) in the state store \(path): \(message).", underlyingError: errno == 0 ? nil : Errno(rawValue: errno))
    }

    /// Runs `sql` (one or more statements, no results wanted).
    func exec(_ sql: String) throws(PestoError) {
        guard sqlite3_exec(db, sql, nil, nil, nil) == SQLITE_OK else { throw error("Cannot run \"\(sql.prefix(60))\"") }
    }

    /// The single integer `sql` returns (a PRAGMA or a count); nil when it returns no row.
    func integer(_ sql: String) throws(PestoError) -> Int64? {
        let statement = try prepare(sql)
        defer { statement.finalize() }
        guard try statement.step() else { return nil }
        return statement.int64(0)
    }

    /// A prepared statement of `sql`.
    func prepare(_ sql: String) throws(PestoError) -> SQLiteStatement {
        var statement: OpaquePointer?
        guard sqlite3_prepare_v3(db, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil) == SQLITE_OK, let statement else {
            throw error("Cannot prepare \"\(sql.prefix(60))\"")
        }
        return SQLiteStatement(statement, database: self)
    }
}

/// A prepared statement: bind, step, read columns, reset.
final class SQLiteStatement {
    private var statement: OpaquePointer?
    private unowned let database: SQLiteDatabase

    init(_ statement: OpaquePointer, database: SQLiteDatabase) {
        self.statement = statement
        self.database = database
    }

    deinit { finalize() }

    /// Frees the statement; idempotent.
    func finalize() {
        sqlite3_finalize(statement)
        statement = nil
    }

    private var handle: OpaquePointer {
        guard let statement else { preconditionFailure("a statement is used after finalize()") }
        return statement
    }

    /// Binds `values` to the parameters 1, 2, ... after a reset.
    func bind(_ values: [SQLiteValue]) throws(PestoError) {
        sqlite3_reset(handle)
        for (i, value) in values.enumerated() {
            let rc: Int32
            switch value {
            case .integer(let v): rc = sqlite3_bind_int64(handle, Int32(i + 1), v)
            case .text(let v): rc = sqlite3_bind_text(handle, Int32(i + 1), v, -1, csqlite_transient())
            }
            guard rc == SQLITE_OK else { throw database.error("Cannot bind a value") }
        }
    }

    /// Runs the statement to its next row: true with a row to read, false when done.
    func step() throws(PestoError) -> Bool {
        switch sqlite3_step(handle) {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default:
            let e = database.error("Cannot run \"\(String(cString: sqlite3_sql(handle)).prefix(60))\"")
            sqlite3_reset(handle)
            throw e
        }
    }

    /// Binds `values` and runs a statement that returns no rows.
    func run(_ values: [SQLiteValue]) throws(PestoError) {
        try bind(values)
        _ = try step()
        sqlite3_reset(handle)
    }

    /// Column `i` of the current row as an integer.
    func int64(_ i: Int32) -> Int64 { sqlite3_column_int64(handle, i) }

    /// Column `i` of the current row as text ("" for NULL).
    func text(_ i: Int32) -> String {
        guard let bytes = sqlite3_column_text(handle, i) else { return "" }
        return String(cString: bytes)
    }
}

/// A value bound to a statement's parameter.
enum SQLiteValue {
    case integer(Int64)
    case text(String)
}
