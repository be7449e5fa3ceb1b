// SPDX-License-Identifier: GPL-2.0-or-later

// FakePolkit: a scripted polkit authority on a test's private bus.
//
// It owns org.freedesktop.PolicyKit1 and answers CheckAuthorization (subject
// system-bus-name) as the test says, per subject: allow, deny, allow only once the subject
// has left the bus (the order that used to leave a lock with a departed client), or hold the
// answer until the test releases it (a slow or interactive check); a check withdrawn with
// CancelCheckAuthorization is answered with Cancelled and recorded. It runs on a thread of
// its own with its own connection, so the test can block in calls to pestod meanwhile; the
// test waits for what it has seen with `wait(_:until:)` (a condition, not a sleep).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

final class FakePolkit: @unchecked Sendable {
    /// How to answer a subject's checks.
    enum Policy: Sendable {
        case allow
        case deny
        /// Allow, but only after the subject's NameOwnerChanged (it left the bus).
        case allowAfterLeaving
        /// Keep the answer until `release(_:allow:)`.
        case hold
    }

    /// What the fake has seen and been told; guarded by `condition`.
    struct State {
        var policies: [String: Policy] = [:]
        /// Subjects of every CheckAuthorization received, in order.
        var checks: [String] = []
        var answered = 0
        /// Subjects whose checks pestod withdrew (CancelCheckAuthorization), in order.
        var withdrawn: [String] = []
        /// Subjects whose held checks are to be answered (allow or deny).
        var released: [String: Bool] = [:]
        var ready = false
        var stop = false
        var stopped = false
        var failure: String?

        /// How many checks `subject` has had.
        func checks(of subject: String) -> Int { checks.filter { $0 == subject }.count }
    }

    private let condition = NSCondition()
    private var state = State()

    /// Connects to the bus at `address`, takes org.freedesktop.PolicyKit1 and starts answering.
    init(address: String) throws {
        let thread = Thread { [self] in self.serve(address) }
        thread.start()
        guard wait("the fake polkit owns its name", until: { $0.ready || $0.failure != nil }), state.failure == nil else {
            throw HarnessError("fake polkit: \(state.failure ?? "did not start")")
        }
    }

    deinit { stop() }

    /// Stops the thread (its connection closes, so the name goes away).
    func stop() {
        condition.lock()
        state.stop = true
        condition.unlock()
        _ = wait("the fake polkit stopped", until: \.stopped)
    }

    /// Sets how `subject`'s checks are answered (unknown subjects: allow).
    func set(_ subject: String, _ policy: Policy) {
        condition.lock()
        state.policies[subject] = policy
        condition.unlock()
    }

    /// Answers `subject`'s held checks, and its later ones, with `allow`.
    func release(_ subject: String, allow: Bool) {
        condition.lock()
        state.released[subject] = allow
        state.policies[subject] = allow ? .allow : .deny
        condition.unlock()
    }

    /// A copy of the state.
    var snapshot: State {
        condition.lock()
        defer { condition.unlock() }
        return state
    }

    /// Waits (at most 20 s) until `predicate` holds; records an issue and returns false if it never does.
    @discardableResult
    func wait(_ what: String, until predicate: (State) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(20)
        condition.lock()
        defer { condition.unlock() }
        while !predicate(state) {
            if !condition.wait(until: deadline) {
                Issue.record("fake polkit: never saw \(what)")
                return false
            }
        }
        return true
    }

    private func update(_ change: (inout State) -> Void) {
        condition.lock()
        change(&state)
        condition.broadcast()
        condition.unlock()
    }

    // MARK: The thread

    private func serve(_ address: String) {
        let connection: DBusConnection
        do {
            connection = try DBusConnection(.address(address))
            try connection.requestName("org.freedesktop.PolicyKit1")
            try connection.addMatch(
                "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'")
        } catch {
            update {
                $0.failure = "\(error)"
                $0.stopped = true
            }
            return
        }
        update { $0.ready = true }
        var departed: Set<String> = []
        var waiting: [String: [DBusMessage]] = [:]  // checks to allow once the subject leaves
        var held: [String: [DBusMessage]] = [:]

        func reply(_ m: DBusMessage, _ allow: Bool) {
            connection.send(m.reply([.structure([.bool(allow), .bool(false), .dictionary(key: "s", value: "s", [])])]))
            connection.flush()
            update { $0.answered += 1 }
        }

        while !snapshot.stop {
            // Held checks the test has released.
            let released = snapshot.released
            for (subject, allow) in released {
                for m in held.removeValue(forKey: subject) ?? [] { reply(m, allow) }
            }
            guard let m = connection.nextMessage(timeoutMilliseconds: 20) else { continue }
            if m.isSignal, m.member == "NameOwnerChanged", let args = m.arguments, args.count == 3,
                let name = args[0].stringValue, args[2].stringValue == ""
            {
                departed.insert(name)
                for w in waiting.removeValue(forKey: name) ?? [] { reply(w, true) }
                continue
            }
            if m.isMethodCall, m.member == "CancelCheckAuthorization", let id = m.arguments?.first?.stringValue {
                // As polkit does: the withdrawn check is answered with Cancelled.
                for (subject, checks) in held.merging(waiting, uniquingKeysWith: +) {
                    for c in checks where c.arguments?.last?.stringValue == id {
                        held[subject]?.removeAll { $0 === c }
                        waiting[subject]?.removeAll { $0 === c }
                        connection.send(c.errorReply(DBusErrorReply("org.freedesktop.PolicyKit1.Error.Cancelled", "withdrawn")))
                        update { $0.withdrawn.append(subject) }
                    }
                }
                if !m.noReply { connection.send(m.reply()) }
                connection.flush()
                continue
            }
            guard m.isMethodCall, m.member == "CheckAuthorization",
                let subject = m.arguments?.first?.structValue?.last?.vardictValue?.first(where: { $0.0 == "name" })?.1.stringValue
            else {
                if m.isMethodCall { connection.send(m.errorReply(DBusErrorReply(DBusErrorReply.unknownMethod, "fake polkit"))) }
                continue
            }
            var policy = Policy.allow
            update { s in
                s.checks.append(subject)
                policy = s.policies[subject] ?? .allow
            }
            switch policy {
            case .allow: reply(m, true)
            case .deny: reply(m, false)
            case .allowAfterLeaving:
                if departed.contains(subject) { reply(m, true) } else { waiting[subject, default: []].append(m) }
            case .hold: held[subject, default: []].append(m)
            }
        }
        update { $0.stopped = true }
    }
}
