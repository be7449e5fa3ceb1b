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
// What a caller may have held back is bounded by the same SenderLimits as what it may have
// waiting for authorisation (SenderLimits.swift): 64 changes and 16 MiB of arguments (a
// single larger change alone is let in); beyond that `holdBackRefusal` says why, and the server answers LimitsExceeded
// with nothing changed. A large update takes seconds, and a caller sending changes all the
// while would otherwise grow this queue, and pestod's memory, without bound.

/// Changes waiting for the update in progress, oldest first.
final class ChangeQueue {
    private var entries: [(sender: String?, bytes: Int, work: () -> Void)] = []
    /// The first entry not yet run.
    private var head = 0
    /// Per caller: its changes waiting, and the bytes of their arguments.
    private var held = SenderTally(.standard)

    /// No change is waiting.
    var isEmpty: Bool { head == entries.count }

    /// How many changes are waiting.
    var count: Int { entries.count - head }

    /// Adds a change of `sender` (nil: not a caller's, never dropped) whose arguments are
    /// `bytes` long. The caller checked `holdBackRefusal` first.
    func append(sender: String?, bytes: Int = 0, _ work: @escaping () -> Void) {
        entries.append((sender, bytes, work))
        if let sender { held.add(sender: sender, bytes: bytes) }
    }

    /// Why one more change of `sender`, of `bytes` bytes of arguments, may not be held back
    /// (for the LimitsExceeded reply); nil when it may.
    func holdBackRefusal(sender: String, bytes: Int) -> String? {
        switch held.refusal(sender: sender, bytes: bytes) {
        case nil:
            return nil
        case .changes:
            return "You have \(held.count(of: sender)) changes held back behind a change in progress already; wait for their replies."
        case .bytes:
            return "Your changes held back behind a change in progress hold \(held.bytes(of: sender)) bytes of arguments; "
                + "this one (\(bytes) bytes) would exceed the \(held.limits.bytes) allowed; wait for their replies."
        }
    }

    /// Forgets `entry` in the per-caller counts (it ran or was dropped).
    private func release(_ entry: (sender: String?, bytes: Int, work: () -> Void)) {
        if let sender = entry.sender { held.remove(sender: sender, bytes: entry.bytes) }
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
        held.forget(sender)
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
