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
//
// What a caller may have held back is bounded as what it may have waiting for authorisation
// (AuthorizationQueue): at most `maxPerSender` changes and `maxBytesPerSender` bytes of
// arguments (a single larger change alone is let in); beyond that `holdBackRefusal` says why, and the server answers LimitsExceeded
// with nothing changed. A large update takes seconds, and a caller sending changes all the
// while would otherwise grow this queue, and pestod's memory, without bound.

/// Changes waiting for the update in progress, oldest first.
final class ChangeQueue {
    /// The most changes one caller may have held back: as many as may wait for
    /// authorisation (64), so the documented limits stay one.
    static let maxPerSender = AuthorizationQueue.defaultMaxPendingPerSender
    /// The most bytes of arguments one caller's held-back changes may have: as for
    /// authorisation (16 MiB).
    static let maxBytesPerSender = AuthorizationQueue.defaultMaxPendingBytesPerSender

    private var entries: [(sender: String?, bytes: Int, work: () -> Void)] = []
    /// The first entry not yet run.
    private var head = 0
    /// Per caller: its changes waiting, and the bytes of their arguments.
    private var held: [String: (count: Int, bytes: Int)] = [:]

    /// No change is waiting.
    var isEmpty: Bool { head == entries.count }

    /// How many changes are waiting.
    var count: Int { entries.count - head }

    /// Adds a change of `sender` (nil: not a caller's, never dropped) whose arguments are
    /// `bytes` long. The caller checked `holdBackRefusal` first.
    func append(sender: String?, bytes: Int = 0, _ work: @escaping () -> Void) {
        entries.append((sender, bytes, work))
        if let sender {
            held[sender, default: (0, 0)].count += 1
            held[sender, default: (0, 0)].bytes += bytes
        }
    }

    /// Why one more change of `sender`, of `bytes` bytes of arguments, may not be held back
    /// (for the LimitsExceeded reply); nil when it may.
    func holdBackRefusal(sender: String, bytes: Int) -> String? {
        let mine = held[sender] ?? (0, 0)
        if mine.count >= Self.maxPerSender {
            return "You have \(mine.count) changes held back behind a change in progress already; wait for their replies."
        }
        // A single change larger than the bound still waits when it is the caller's only one,
        // as in AuthorizationQueue: an Apply of many long rules stays possible.
        if mine.count > 0, mine.bytes + bytes > Self.maxBytesPerSender {
            return "Your changes held back behind a change in progress hold \(mine.bytes) bytes of arguments; "
                + "this one (\(bytes) bytes) would exceed the \(Self.maxBytesPerSender) allowed; wait for their replies."
        }
        return nil
    }

    /// Forgets `entry` in the per-caller counts (it ran or was dropped).
    private func release(_ entry: (sender: String?, bytes: Int, work: () -> Void)) {
        guard let sender = entry.sender, var mine = held[sender] else { return }
        mine.count -= 1
        mine.bytes -= entry.bytes
        held[sender] = mine.count > 0 ? mine : nil
    }

    /// Runs the waiting changes, oldest first, until `busy` says one of them started an
    /// update that goes on in later turns. Entries added meanwhile run after the older ones.
    func resume(until busy: () -> Bool) {
        while !busy(), head < entries.count {
            let entry = entries[head]
            entries[head].work = {}  // let go of what it holds
            head += 1
            release(entry)
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
        held[sender] = nil
        return before - count
    }

    /// Drops every waiting change (pestod stops); returns how many.
    func dropAll() -> Int {
        let dropped = count
        entries.removeAll()
        head = 0
        held.removeAll()
        return dropped
    }
}
