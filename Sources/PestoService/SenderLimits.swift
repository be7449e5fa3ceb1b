// SPDX-License-Identifier: GPL-2.0-or-later

// SenderLimits: what one caller may have waiting in the service's queues — the changes
// waiting for authorisation (AuthorizationQueue) and those held back behind a large update
// (ChangeQueue) — declared once, so the one limit doc/dbus-api.md documents cannot drift
// apart between them.
//
// A caller may have at most `changes` changes waiting and at most `bytes` bytes of their
// arguments (the size as sent, which the decoded arguments follow), whichever comes first;
// one more is refused at once (LimitsExceeded, nothing changed). A single change larger than
// the byte limit is still let in when it is the caller's only one waiting (the bus's maximum
// message size bounds it), so every legal call can be made.

/// The most one caller may have waiting in one queue.
struct SenderLimits: Equatable {
    /// The most changes.
    var changes: Int
    /// The most bytes of arguments (a lone larger change is let in).
    var bytes: Int

    /// 64 changes: plenty for a client that pipelines a transaction, small enough that a
    /// flood costs little; 16 MiB: room for 64 ordinary changes many times over, a small
    /// fraction of what 64 messages of the bus's maximum size are.
    static let standard = SenderLimits(changes: 64, bytes: 16 << 20)

    /// Which limit refused a change.
    enum Exceeded: Equatable {
        /// The caller has `changes` changes waiting.
        case changes
        /// The change would take the caller's waiting bytes past `bytes`.
        case bytes
    }
}

/// The changes and bytes each caller has waiting in one queue, against its limits.
struct SenderTally {
    let limits: SenderLimits
    /// Per caller with anything waiting: its changes and their bytes.
    private var held: [String: (count: Int, bytes: Int)] = [:]

    /// An empty tally under `limits`.
    init(_ limits: SenderLimits) {
        precondition(limits.changes > 0 && limits.bytes > 0)
        self.limits = limits
    }

    /// Which limit refuses one more change of `sender` of `bytes` bytes; nil when it may wait.
    func refusal(sender: String, bytes: Int) -> SenderLimits.Exceeded? {
        let mine = held[sender] ?? (0, 0)
        if mine.count >= limits.changes { return .changes }
        if mine.count > 0, bytes > limits.bytes - mine.bytes { return .bytes }
        return nil
    }

    /// How many changes `sender` has waiting.
    func count(of sender: String) -> Int { held[sender]?.count ?? 0 }

    /// How many bytes of changes `sender` has waiting.
    func bytes(of sender: String) -> Int { held[sender]?.bytes ?? 0 }

    /// Counts a change of `sender` of `bytes` bytes as waiting.
    mutating func add(sender: String, bytes: Int) {
        held[sender, default: (0, 0)].count += 1
        held[sender, default: (0, 0)].bytes += bytes
    }

    /// Counts a change of `sender` of `bytes` bytes as no longer waiting (it ran or was dropped).
    mutating func remove(sender: String, bytes: Int) {
        guard var mine = held[sender] else { return }
        mine.count -= 1
        mine.bytes -= bytes
        held[sender] = mine.count > 0 ? mine : nil
    }

    /// Forgets everything `sender` had waiting.
    mutating func forget(_ sender: String) { held[sender] = nil }

    /// Forgets everything.
    mutating func removeAll() { held.removeAll() }
}
