// SPDX-License-Identifier: GPL-2.0-or-later

// ChangeQueue: the changes held back while an update is carried out over several loop turns
// (SlicedUpdate.swift), in the order they arrived.
//
// An entry is the work that carries the change out and answers it (a D-Bus change past its
// authorisation, Lock, Unlock, Commit, Rollback, a lock holder's departure, a control socket
// upload), with the bus name of its caller when it has one. Once the update is done the
// entries run oldest first, until one of them starts another update that needs more turns;
// the rest wait for that one. An entry whose caller leaves the bus is dropped: nothing of a
// departed caller runs, as with a change still waiting for authorisation.

/// Changes waiting for the update in progress, oldest first.
final class ChangeQueue {
    private var entries: [(sender: String?, work: () -> Void)] = []
    /// The first entry not yet run.
    private var head = 0

    /// No change is waiting.
    var isEmpty: Bool { head == entries.count }

    /// How many changes are waiting.
    var count: Int { entries.count - head }

    /// Adds a change of `sender` (nil: not a caller's, never dropped).
    func append(sender: String?, _ work: @escaping () -> Void) {
        entries.append((sender, work))
    }

    /// Runs the waiting changes, oldest first, until `busy` says one of them started an
    /// update that goes on in later turns. Entries added meanwhile run after the older ones.
    func resume(until busy: () -> Bool) {
        while !busy(), head < entries.count {
            let entry = entries[head]
            entries[head].work = {}  // let go of what it holds
            head += 1
            entry.work()
        }
        if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        }
    }

    /// Drops the waiting changes of `sender`; returns how many.
    func drop(sender: String) -> Int {
        let before = count
        let rest = entries[head...].filter { $0.sender != sender }
        entries = Array(rest)
        head = 0
        return before - count
    }

    /// Drops every waiting change (pestod stops); returns how many.
    func dropAll() -> Int {
        let dropped = count
        entries.removeAll()
        head = 0
        return dropped
    }
}
