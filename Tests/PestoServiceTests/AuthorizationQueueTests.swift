// SPDX-License-Identifier: GPL-2.0-or-later

// AuthorizationQueue and RefusalLogLimiter in process, with a scripted authorizer and a
// hand-driven clock: per-sender order, independence of senders, the per-sender cap, what a
// departed sender leaves behind, and the bounded, rate-limited refusal log.

import PestoEngine
import PestoModel
import PestoSystem
import Testing

@testable import PestoDBus
@testable import PestoService

/// An authorizer whose answers the test gives, one query at a time.
final class ScriptedAuthorizer: Authorizer {
    /// One query in progress.
    struct Query {
        let sender: String
        let interactive: Bool
        let completion: (DBusErrorReply?) -> Void
    }
    private(set) var queries: [Query] = []
    /// Senders answered at once (synchronously) with this verdict.
    var immediate: [String: DBusErrorReply?] = [:]
    /// Senders whose check in progress was withdrawn, in order.
    private(set) var withdrawn: [String] = []
    /// Senders the queue said left the bus, in order.
    private(set) var departed: [String] = []

    func senderLeft(_ sender: String) { departed.append(sender) }

    func authorize(sender: String, action: String, interactive: Bool, completion: @escaping (DBusErrorReply?) -> Void)
        -> AuthorizationCancellation?
    {
        if let verdict = immediate[sender] {
            completion(verdict)
            return AuthorizationCancellation { Issue.record("a check answered at once was withdrawn") }
        }
        queries.append(Query(sender: sender, interactive: interactive, completion: completion))
        return AuthorizationCancellation { [unowned self] in self.withdrawn.append(sender) }
    }

    /// Queries in progress for `sender`.
    func inProgress(_ sender: String) -> Int { queries.filter { $0.sender == sender }.count }

    /// Answers the oldest query of `sender`.
    func answer(_ sender: String, _ refusal: DBusErrorReply? = nil) {
        guard let i = queries.firstIndex(where: { $0.sender == sender }) else {
            Issue.record("no query of \(sender) in progress")
            return
        }
        queries.remove(at: i).completion(refusal)
    }
}

@Suite("authorisation queue (in process)", .timeLimit(.minutes(10)))
struct AuthorizationQueueTests {
    static let denied = DBusErrorReply(DBusErrorReply.accessDenied, "no")

    @Test("one sender's slow answer does not hold up another sender; a sender's changes run in its order, one query at a time")
    func perSender() {
        let auth = ScriptedAuthorizer()
        let queue = AuthorizationQueue(authorizer: auth, action: PestoActions.modify)
        var ran: [String] = []
        func submit(_ sender: String, _ label: String, interactive: Bool = false) {
            #expect(
                queue.submit(sender: sender, interactive: interactive) { refusal in ran.append(label + (refusal == nil ? "" : " refused")) }
                    == nil)
        }
        submit(":1.1", "a1", interactive: true)
        submit(":1.1", "a2")
        submit(":1.2", "b1")
        #expect(auth.inProgress(":1.1") == 1, "a sender's changes are asked about one at a time")
        #expect(auth.queries.first?.interactive == true)
        #expect(auth.inProgress(":1.2") == 1, "another sender is asked about at once")
        auth.answer(":1.2")
        #expect(ran == ["b1"], "b1 runs while a1 still waits")
        auth.answer(":1.1", Self.denied)
        #expect(ran == ["b1", "a1 refused"])
        #expect(auth.inProgress(":1.1") == 1, "a2 is asked about after a1")
        #expect(auth.queries.last?.interactive == false)
        auth.answer(":1.1")
        #expect(ran == ["b1", "a1 refused", "a2"])
        #expect(queue.totalPending == 0)
    }

    @Test("at most limits.changes changes wait per sender; one more is refused with nothing queued or asked; others are unaffected")
    func cap() {
        let auth = ScriptedAuthorizer()
        let queue = AuthorizationQueue(
            authorizer: auth, action: PestoActions.modify, limits: SenderLimits(changes: 3, bytes: SenderLimits.standard.bytes))
        var ran = 0
        for _ in 0..<3 { #expect(queue.submit(sender: ":1.1", interactive: false) { _ in ran += 1 } == nil) }
        for _ in 0..<100 {
            #expect(queue.submit(sender: ":1.1", interactive: false) { _ in Issue.record("a refused change ran") } == .changes)
        }
        #expect(queue.pending(of: ":1.1") == 3)
        #expect(auth.queries.count == 1)
        #expect(queue.submit(sender: ":1.2", interactive: false) { _ in ran += 1 } == nil)
        auth.answer(":1.1")
        #expect(queue.submit(sender: ":1.1", interactive: false) { _ in ran += 1 } == nil, "room again once one is decided")
        #expect(queue.pending(of: ":1.1") == 3)
        #expect(SenderLimits.standard.changes == 64)
    }

    @Test(
        "at most limits.bytes bytes of changes wait per sender, whichever limit comes first; a larger change alone still waits; bytes return as changes are decided or the sender leaves"
    )
    func byteCap() {
        let auth = ScriptedAuthorizer()
        let queue = AuthorizationQueue(
            authorizer: auth, action: PestoActions.modify, limits: SenderLimits(changes: 10, bytes: 1_000))
        var ran = 0
        for _ in 0..<4 { #expect(queue.submit(sender: ":1.1", interactive: false, bytes: 250) { _ in ran += 1 } == nil) }
        #expect(queue.pendingBytes(of: ":1.1") == 1_000)
        #expect(queue.submit(sender: ":1.1", interactive: false, bytes: 1) { _ in Issue.record("a refused change ran") } == .bytes)
        #expect(queue.pending(of: ":1.1") == 4 && queue.pendingBytes(of: ":1.1") == 1_000, "nothing queued")
        #expect(
            queue.submit(sender: ":1.2", interactive: false, bytes: 1_000) { _ in ran += 1 } == nil, "another sender has its own budget")
        auth.answer(":1.1")
        #expect(ran == 1 && queue.pendingBytes(of: ":1.1") == 750)
        #expect(queue.submit(sender: ":1.1", interactive: false, bytes: 250) { _ in ran += 1 } == nil, "room again once one is decided")
        #expect(queue.submit(sender: ":1.1", interactive: false, bytes: 251) { _ in ran += 1 } != nil)
        #expect(queue.senderLeft(":1.1") == 4)
        #expect(queue.pendingBytes(of: ":1.1") == 0)

        // A change larger than the limit waits when it is the sender's only one.
        #expect(queue.submit(sender: ":1.3", interactive: false, bytes: 5_000) { _ in ran += 1 } == nil)
        #expect(queue.submit(sender: ":1.3", interactive: false, bytes: 0) { _ in ran += 1 } == .bytes)
        auth.answer(":1.3")
        #expect(queue.pendingBytes(of: ":1.3") == 0)
        #expect(SenderLimits.standard.bytes == 16 << 20)
    }

    @Test("a sender that leaves loses its waiting changes and its check is withdrawn: a late answer (even 'allowed') runs nothing")
    func senderLeaves() {
        let auth = ScriptedAuthorizer()
        let queue = AuthorizationQueue(authorizer: auth, action: PestoActions.modify)
        var ran: [String] = []
        #expect(queue.submit(sender: ":1.7", interactive: false) { _ in ran.append("lock") } == nil)
        #expect(queue.submit(sender: ":1.7", interactive: false) { _ in ran.append("insert") } == nil)
        #expect(queue.senderLeft(":1.7") == 2)
        #expect(auth.withdrawn == [":1.7"], "the check in progress is withdrawn")
        #expect(queue.senderLeft(":1.7") == 0)
        #expect(auth.withdrawn == [":1.7"], "once")
        auth.answer(":1.7")  // polkit's answer comes after the departure
        #expect(ran.isEmpty)
        #expect(auth.queries.isEmpty, "nothing more is asked for a departed sender")
        #expect(queue.totalPending == 0)
        // The authorizer hears of every departure, even of a sender with nothing waiting (it
        // may remember the sender's uid: CallerUIDs).
        #expect(queue.senderLeft(":1.8") == 0)
        #expect(auth.departed == [":1.7", ":1.7", ":1.8"])
    }

    @Test("refuseAll answers every waiting change of every sender with the refusal, in each sender's order, and withdraws the checks")
    func refuseAll() {
        let auth = ScriptedAuthorizer()
        let queue = AuthorizationQueue(authorizer: auth, action: PestoActions.modify)
        var answers: [String] = []
        for (sender, label) in [(":1.1", "a1"), (":1.2", "b1"), (":1.1", "a2")] {
            #expect(queue.submit(sender: sender, interactive: false) { answers.append("\(label) \($0?.name ?? "run")") } == nil)
        }
        #expect(queue.refuseAll(Self.denied) == 3)
        #expect(
            answers.sorted() == [
                "a1 \(DBusErrorReply.accessDenied)", "a2 \(DBusErrorReply.accessDenied)", "b1 \(DBusErrorReply.accessDenied)",
            ])
        #expect(answers.firstIndex(of: "a1 \(DBusErrorReply.accessDenied)")! < answers.firstIndex(of: "a2 \(DBusErrorReply.accessDenied)")!)
        #expect(Set(auth.withdrawn) == [":1.1", ":1.2"])
        #expect(queue.totalPending == 0)
        auth.answer(":1.1")  // polkit's late answer runs nothing
        #expect(answers.count == 3)
    }

    @Test("an authorizer that answers at once (synchronously) runs the change inside submit, in order")
    func synchronousAnswers() {
        let auth = ScriptedAuthorizer()
        auth.immediate[":1.3"] = .some(nil)
        let queue = AuthorizationQueue(authorizer: auth, action: PestoActions.modify)
        var ran: [Int] = []
        for i in 0..<5 { #expect(queue.submit(sender: ":1.3", interactive: false) { _ in ran.append(i) } == nil) }
        #expect(ran == [0, 1, 2, 3, 4])
        #expect(queue.totalPending == 0)
        #expect(queue.senderLeft(":1.3") == 0)  // nothing in progress to withdraw
    }

    @Test(
        "refusal log: one line per sender per interval with the count of those not logged; the rest reported when it leaves; bounded state")
    func refusalLog() {
        var limiter = RefusalLogLimiter(intervalMilliseconds: 1_000, capacity: 4)
        let t0 = MonotonicInstant.now
        #expect(limiter.admit(":1.1", now: t0) == 0)
        for _ in 0..<1_000 { #expect(limiter.admit(":1.1", now: t0.adding(milliseconds: 500)) == nil) }
        #expect(limiter.admit(":1.2", now: t0.adding(milliseconds: 500)) == 0, "another sender has its own allowance")
        #expect(limiter.admit(":1.1", now: t0.adding(milliseconds: 1_000)) == 1_000)
        #expect(limiter.admit(":1.1", now: t0.adding(milliseconds: 1_001)) == nil)
        #expect(limiter.forget(":1.1") == 1)
        #expect(limiter.forget(":1.1") == 0)

        // Many senders: at most `capacity` tracked one by one, plus one shared entry.
        for i in 0..<10_000 { _ = limiter.admit(":2.\(i)", now: t0.adding(milliseconds: 1_500)) }
        #expect(limiter.trackedCount <= 5)
        var lines = 0
        for i in 0..<10_000 where limiter.admit(":3.\(i)", now: t0.adding(milliseconds: 1_600)) != nil { lines += 1 }
        #expect(lines == 0, "within the interval, the crowd beyond capacity shares one line")
        // Once the intervals are over, idle entries make room for new senders again.
        #expect(limiter.admit(":4.1", now: t0.adding(milliseconds: 5_000)) == 0)
        #expect(limiter.trackedCount <= 5)
    }
}
