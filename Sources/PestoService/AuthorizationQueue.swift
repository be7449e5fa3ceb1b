// AuthorizationQueue: the changes waiting for their authorisation, kept per sender.
//
// Theory of operation
// -------------------
// Every change a client sends is checked with the `Authorizer` before it runs, and the check
// is asynchronous (polkit may wait up to 300 s for a person at a password prompt). One
// queue for everybody would let one slow check hold up every other client, root included,
// so, as systemd's bus-polkit does, every change gets its own query, started as soon as it
// arrives, and runs as soon as its own answer is in. The only order kept is a sender's own:
// its changes run in the order it sent them (a change whose answer came early waits for
// the answers to that sender's earlier changes).
//
// Limits: a sender may have at most `maxPendingPerSender` changes waiting; one more is
// refused at once (`submit` returns false, the server answers LimitsExceeded), nothing is
// queued and nothing is asked. The bus daemon bounds the number of connections, so the
// memory held here is bounded too.
//
// Leaving the bus: the bus daemon delivers a client's messages before the NameOwnerChanged
// that announces its departure, so every change of a departed client is in this queue (or
// has run) when `senderLeft` is called. `senderLeft` drops them; their answers, whenever
// they come, find nothing and are ignored. A change therefore runs only while its sender
// is on the bus, and a Lock granted this way is always released by that sender's
// NameOwnerChanged, which is still to come.
//
// This type knows nothing of D-Bus messages: the server hands it a closure per change and
// is told, through that closure, whether the change may run.

/// Changes waiting for their authorisation, one queue per sender, one query per change.
final class AuthorizationQueue {
    /// The default for `maxPendingPerSender`: plenty for a client that pipelines a
    /// transaction, small enough that a flood costs little.
    static let defaultMaxPendingPerSender = 64

    /// One change waiting for its answer (or for an earlier change of its sender).
    private struct Entry {
        let token: UInt64
        /// nil until the authorizer answers; then `.some(nil)` (allowed) or `.some(refusal)`.
        var verdict: DBusErrorReply??
        let decided: (DBusErrorReply?) -> Void
    }

    private let authorizer: any Authorizer
    private let action: String
    /// Most changes one sender may have waiting.
    let maxPendingPerSender: Int
    /// Waiting changes per sender, oldest first; a sender with none has no entry.
    private var queues: [String: [Entry]] = [:]
    private var nextToken: UInt64 = 0
    /// Senders whose queue is being run (an answer arriving meanwhile only records its verdict).
    private var draining: Set<String> = []

    /// A queue asking `authorizer` about `action` for each change.
    init(authorizer: any Authorizer, action: String, maxPendingPerSender: Int = AuthorizationQueue.defaultMaxPendingPerSender) {
        precondition(maxPendingPerSender > 0)
        self.authorizer = authorizer
        self.action = action
        self.maxPendingPerSender = maxPendingPerSender
    }

    /// Queues a change of `sender` and asks the authorizer about it. `decided` is called
    /// once, after the decisions on every earlier change of `sender`, with nil (run it) or
    /// the refusal to send — unless `sender` leaves the bus first, in which case it is never
    /// called. Returns false, calling nothing and queuing nothing, when `sender` already has
    /// `maxPendingPerSender` changes waiting.
    func submit(sender: String, interactive: Bool, _ decided: @escaping (DBusErrorReply?) -> Void) -> Bool {
        let waiting = queues[sender]?.count ?? 0
        guard waiting < maxPendingPerSender else { return false }
        nextToken += 1
        let token = nextToken
        queues[sender, default: []].append(Entry(token: token, verdict: nil, decided: decided))
        authorizer.authorize(sender: sender, action: action, interactive: interactive) { [weak self] refusal in
            self?.answered(sender: sender, token: token, refusal: refusal)
        }
        return true
    }

    /// Drops every waiting change of `sender`, which left the bus; returns how many.
    @discardableResult
    func senderLeft(_ sender: String) -> Int {
        queues.removeValue(forKey: sender)?.count ?? 0
    }

    /// How many changes `sender` has waiting.
    func pending(of sender: String) -> Int { queues[sender]?.count ?? 0 }

    /// How many changes wait altogether.
    var totalPending: Int { queues.values.reduce(0) { $0 + $1.count } }

    /// Records an answer and runs the sender's changes that are now first in line and decided.
    private func answered(sender: String, token: UInt64, refusal: DBusErrorReply?) {
        // A sender that left has no queue, or a new queue of a later connection of the same
        // name (names are never reused by the bus, but nothing here relies on it).
        guard let index = queues[sender]?.firstIndex(where: { $0.token == token }) else { return }
        queues[sender]![index].verdict = .some(refusal)
        guard !draining.contains(sender) else { return }  // the loop below will get to it
        draining.insert(sender)
        defer { draining.remove(sender) }
        while let first = queues[sender]?.first, let verdict = first.verdict {
            queues[sender]!.removeFirst()
            if queues[sender]!.isEmpty { queues[sender] = nil }
            first.decided(verdict)
        }
    }
}
