// SPDX-License-Identifier: GPL-2.0-or-later

// CallerUIDs: the uid behind each caller's unique bus name, asked of the bus daemon once.
//
// Theory of operation. The uid-0 check (`RootOnlyAuthorizer`, and polkit's fallback when
// polkit cannot answer) needs the caller's uid, which the bus daemon tells with
// `GetConnectionUnixUser`: a round trip through the daemon for every change would double
// the cost of a change. Two facts make remembering the answer sound:
//   * a unique name (":1.42") names one connection for the bus daemon's whole life: the
//     daemon never gives it to another connection;
//   * a connection's credentials are taken when it connects and never change.
// So the uid is remembered per unique name until that name leaves the bus
// (NameOwnerChanged, `senderLeft`), which keeps the memory bounded by the callers that are
// connected. Questions about a name whose answer is on its way wait for that answer
// instead of asking again. An answer that arrives after its name left is handed to those
// waiting but not remembered. Failures are never remembered. A well-known name (a message's
// sender is always a unique name, but nothing here relies on it) is asked every time.

import PestoDBus
import PestoModel

/// Remembers the uid of each connected caller, asked of the bus daemon once per connection.
public final class CallerUIDs {
    /// The answer for a caller: its uid, or why it could not be found out.
    public typealias Answer = Result<UInt32, DBusErrorReply>

    private unowned let connection: DBusConnection
    /// The uids of the unique names asked about that are still on the bus.
    private var known: [String: UInt32] = [:]
    /// The questions waiting for the bus daemon's answer about each name.
    private var waiting: [String: [(Answer) -> Void]] = [:]

    /// How many callers' uids are remembered (for tests).
    public var rememberedCount: Int { known.count }

    public init(connection: DBusConnection) { self.connection = connection }

    /// Calls `completion` with the uid of `sender`: at once when it is known, else once the
    /// bus daemon has answered.
    public func uid(of sender: String, completion: @escaping (Answer) -> Void) {
        if let uid = known[sender] { return completion(.success(uid)) }
        if waiting[sender] != nil {
            waiting[sender]!.append(completion)
            return
        }
        waiting[sender] = [completion]
        let query = DBusMessage.methodCall(
            destination: "org.freedesktop.DBus", path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus",
            member: "GetConnectionUnixUser", arguments: [.string(sender)])
        connection.send(query, timeoutMilliseconds: 5_000) { [weak self] reply in
            let answer: Answer
            if let uid = reply.arguments?.first?.uint32Value, !reply.isError {
                answer = .success(uid)
            } else {
                answer = .failure(
                    reply.asError ?? DBusErrorReply(DBusErrorReply.failed, "no answer from the bus daemon"))
            }
            self?.answered(sender, answer)
        }
    }

    /// Hands the bus daemon's answer to everyone waiting, remembering a uid of a unique name
    /// that is still on the bus.
    private func answered(_ sender: String, _ answer: Answer) {
        // nil: the name left while the question was out (its waiters were dropped with it).
        guard let completions = waiting.removeValue(forKey: sender) else { return }
        if case .success(let uid) = answer, sender.hasPrefix(":") { known[sender] = uid }
        for completion in completions { completion(answer) }
    }

    /// Forgets `sender`, which left the bus; questions about it still waiting are dropped
    /// (their callers left with it).
    public func senderLeft(_ sender: String) {
        known[sender] = nil
        waiting[sender] = nil
    }
}
