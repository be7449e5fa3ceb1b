// SPDX-License-Identifier: GPL-2.0-or-later

// AuthorizationQueue: the changes waiting for their authorisation, kept per sender.
//
// Theory of operation
// -------------------
// Every change a client sends is checked with the `Authorizer` before it runs, and the check
// is asynchronous (polkit may wait up to 300 s for a person at a password prompt). One
// queue for everybody would let one slow check hold up every other client, root included,
// so each sender has its own queue: as in systemd's bus-polkit, every change gets its own
// query, and only that sender's later changes wait for it. A sender's changes are asked
// about one at a time and run in the order it sent them, so a client that pipelines a
// transaction (Lock, changes) sees it applied in order, and an interactive check that
// succeeds (polkit's auth_admin_keep) spares the prompts of the changes after it. It also
// keeps pestod's calls to polkit in progress at one per sender, so one client cannot use up
// the bus's limit on pestod's outstanding calls (max_replies_per_connection, 128 on the
// system bus; beyond it the bus refuses the query, which counts as polkit not answering:
// only uid 0 passes).
//
// Limits (SenderLimits.swift, shared with the ChangeQueue): a sender may have at most 64
// changes or 16 MiB of their arguments waiting; one more is refused at once (`submit` says
// which limit, the server answers LimitsExceeded), nothing is queued and nothing is asked;
// a lone larger change is still taken. A waiting change holds only its decoded
// arguments and a ReplyAddress, never its message. The bus daemon bounds the number of
// connections, so the memory held here is bounded too.
//
// Leaving the bus: the bus daemon delivers a client's messages before the NameOwnerChanged
// that announces its departure, so every change of a departed client is in this queue (or
// has run) when `senderLeft` is called. `senderLeft` drops them and withdraws the check in
// progress (polkit's CancelCheckAuthorization, which also closes an authentication dialog
// nobody is waiting for); an answer that comes anyway finds nothing and is ignored. A change therefore runs only while its sender
// is on the bus, and a Lock granted this way is always released by that sender's
// NameOwnerChanged, which is still to come.
//
// This type knows nothing of D-Bus messages: the server hands it a closure per change and
// is told, through that closure, whether the change may run.

import PestoDBus
import PestoModel

/// Changes waiting for their authorisation, one queue per sender, one query per change.
final class AuthorizationQueue {
    /// Which limit refused a change.
    typealias Limit = SenderLimits.Exceeded

    /// One change waiting for its answer; only the first of a sender's queue is being asked about.
    private struct Entry {
        let token: UInt64
        let interactive: Bool
        /// The size of the change's arguments, counted against the sender's byte limit.
        let bytes: Int
        let decided: (DBusErrorReply?) -> Void
    }

    private let authorizer: any Authorizer
    private let action: String
    /// Each sender's waiting changes and bytes, against the per-sender limits.
    private var tally: SenderTally
    /// The per-sender limits.
    var limits: SenderLimits { tally.limits }
    /// Waiting changes per sender, oldest first; a sender with none has no entry.
    private var queues: [String: [Entry]] = [:]
    /// What withdraws the check in progress of each sender (when the authorizer gave one).
    private var inProgress: [String: AuthorizationCancellation] = [:]
    private var nextToken: UInt64 = 0

    /// A queue asking `authorizer` about `action` for each change.
    init(authorizer: any Authorizer, action: String, limits: SenderLimits = .standard) {
        self.authorizer = authorizer
        self.action = action
        tally = SenderTally(limits)
    }

    /// Queues a change of `sender` whose arguments take `bytes`; it is asked about once the
    /// earlier changes of `sender` are decided. `decided` is called once, with nil (run it)
    /// or the refusal to send — unless `sender` leaves the bus first, in which case it is
    /// never called. Returns the limit that refuses it, calling nothing and queuing nothing,
    /// when `sender` already has `limits.changes` changes waiting, or has some waiting and
    /// `bytes` more would exceed `limits.bytes`; nil when queued.
    func submit(sender: String, interactive: Bool, bytes: Int = 0, _ decided: @escaping (DBusErrorReply?) -> Void) -> Limit? {
        precondition(bytes >= 0)
        if let limit = tally.refusal(sender: sender, bytes: bytes) { return limit }
        let waiting = queues[sender]?.count ?? 0
        nextToken += 1
        queues[sender, default: []].append(Entry(token: nextToken, interactive: interactive, bytes: bytes, decided: decided))
        tally.add(sender: sender, bytes: bytes)
        if waiting == 0 { askAboutFirst(of: sender) }
        return nil
    }

    /// Drops every waiting change of `sender`, which left the bus, and withdraws the check
    /// in progress (an answer that comes anyway is ignored); returns how many were dropped.
    @discardableResult
    func senderLeft(_ sender: String) -> Int {
        inProgress.removeValue(forKey: sender)?.cancel()
        authorizer.senderLeft(sender)
        tally.forget(sender)
        return queues.removeValue(forKey: sender)?.count ?? 0
    }

    /// Refuses every waiting change of every sender with `refusal` (pestod is being replaced:
    /// the new instance has the tables, so none of them may run here), withdrawing the checks
    /// in progress; returns how many were refused. Each sender's changes are answered in its
    /// order.
    @discardableResult
    func refuseAll(_ refusal: DBusErrorReply) -> Int {
        for (_, cancellation) in inProgress { cancellation.cancel() }
        inProgress.removeAll()
        let waiting = queues
        queues.removeAll()
        tally.removeAll()
        var refused = 0
        for (_, entries) in waiting {
            for entry in entries {
                entry.decided(refusal)
                refused += 1
            }
        }
        return refused
    }

    /// How many changes `sender` has waiting.
    func pending(of sender: String) -> Int { queues[sender]?.count ?? 0 }

    /// How many bytes of changes `sender` has waiting.
    func pendingBytes(of sender: String) -> Int { tally.bytes(of: sender) }

    /// How many changes wait altogether.
    var totalPending: Int { queues.values.reduce(0) { $0 + $1.count } }

    /// Starts the query about the oldest waiting change of `sender`, if any.
    private func askAboutFirst(of sender: String) {
        guard let first = queues[sender]?.first else { return }
        let token = first.token
        let cancellation = authorizer.authorize(sender: sender, action: action, interactive: first.interactive) { [weak self] refusal in
            self?.answered(sender: sender, token: token, refusal: refusal)
        }
        // Unless the authorizer answered at once (the sender's queue has moved on).
        if queues[sender]?.first?.token == token { inProgress[sender] = cancellation }
    }

    /// Hands an answer to its change, then asks about the sender's next one.
    private func answered(sender: String, token: UInt64, refusal: DBusErrorReply?) {
        // The sender left (its queue is gone, or belongs to a later connection of the same
        // name, which the bus never reuses, but nothing here relies on that).
        guard queues[sender]?.first?.token == token else { return }
        inProgress[sender] = nil
        let entry = queues[sender]!.removeFirst()
        tally.remove(sender: sender, bytes: entry.bytes)
        if queues[sender]!.isEmpty { queues[sender] = nil }
        entry.decided(refusal)
        askAboutFirst(of: sender)
    }
}
