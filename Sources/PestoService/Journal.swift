// SPDX-License-Identifier: GPL-2.0-or-later

// Journal: the proposals' inverse operations, recorded so that a series of changes can be undone.
//
// Every successful mutating call made under the lock (and every step of Apply) appends one
// entry; undoing walks the entries newest first and applies each inverse:
//     insert ↔ delete (same ID, same rule)      activate ↔ deactivate
// Undoing in exact reverse order walks the table back through the states it passed, so
// every inverse is valid at the moment it runs: IDs, order, rules and active bits come back
// exactly. Re-activation binds sockets again, which is the one step the kernel may refuse
// (a port taken meanwhile); that is counted as a bind failure like any other and retried.

import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// A change to one rule of one table: what the service performs and the journal records.
enum TableOperation: Equatable, Sendable, CustomStringConvertible {
    case insert(TableKind, UInt32, Rule)
    case delete(TableKind, UInt32, Rule)
    case activate(TableKind, UInt32)
    case deactivate(TableKind, UInt32)

    /// For logs: `insert host/5`, `activate splice/7`.
    var description: String {
        switch self {
        case .insert(let kind, let id, _): return "insert \(kind.rawValue)/\(id)"
        case .delete(let kind, let id, _): return "delete \(kind.rawValue)/\(id)"
        case .activate(let kind, let id): return "activate \(kind.rawValue)/\(id)"
        case .deactivate(let kind, let id): return "deactivate \(kind.rawValue)/\(id)"
        }
    }

    /// The operation that undoes this one, valid right after it.
    var inverse: TableOperation {
        switch self {
        case .insert(let kind, let id, let rule): return .delete(kind, id, rule)
        case .delete(let kind, let id, let rule): return .insert(kind, id, rule)
        case .activate(let kind, let id): return .deactivate(kind, id)
        case .deactivate(let kind, let id): return .activate(kind, id)
        }
    }
}

/// A list of performed operations that can be undone newest first.
struct Journal {
    private(set) var operations: [TableOperation] = []

    var isEmpty: Bool { operations.isEmpty }

    mutating func record(_ operation: TableOperation) { operations.append(operation) }

    /// Appends another journal's operations (a completed Apply under the lock).
    mutating func append(contentsOf other: Journal) { operations.append(contentsOf: other.operations) }

    /// Undoes every operation, newest first, through `perform`, and empties the journal.
    mutating func undo(logger: Logger, perform: (TableOperation) throws(PestoError) -> Void) {
        for operation in operations.reversed() {
            do {
                try perform(operation.inverse)
            } catch {
                // Reverse order makes every inverse valid; reaching here is a bug in pestod.
                logger.critical("rollback step \(operation.inverse) failed: \(error)")
                assertionFailure("rollback step \(operation.inverse) failed: \(error)")
            }
        }
        operations.removeAll()
    }
}
