// SPDX-License-Identifier: GPL-2.0-or-later

// The ledger of acknowledged changes, and what the threads share to coordinate.
//
// Every client (thread) owns a range of rule IDs and of ports, so no two clients' changes
// touch the same rule and their order does not matter: each client keeps its own ledger, the
// committed state of its IDs as pestod's replies have told it. A change counts only when it
// was acknowledged: a successful reply to a change made without the lock, or to Commit. A
// change whose reply never came because pestod was killed (NoReply, ServiceUnknown, …) may
// or may not have been saved: the ledger keeps that outcome as an alternative. After each
// restart, the rules pestod restored for a client's IDs must equal its committed state or the
// alternative; every ID that matches neither is a lost acknowledged change.

import PestoDBus
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What the ledger knows of one rule: its forwarding fields and whether it is active.
struct RuleState: Equatable, Sendable, CustomStringConvertible {
    var proto: String
    var address: String
    var first: UInt16
    var last: UInt16
    var targetPort: UInt16
    var active: Bool

    var description: String { "\(proto) \(address) \(first)-\(last)->\(targetPort)\(active ? " active" : "")" }

    /// The rule description to send for this rule (inactive: the state is separate).
    var dbusRule: DBusValue {
        .vardict([
            ("protocol", .string(proto)), ("address", .string(address)), ("first-port", .uint16(first)),
            ("last-port", .uint16(last)), ("target-port", .uint16(targetPort)),
        ])
    }

    /// Reads one entry of `List` (`(u id, a{sv} rule, (b active, u bound, u failed, s error))`).
    static func fromList(_ item: DBusValue) -> (UInt32, RuleState)? {
        guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let pairs = s[1].vardictValue,
            let active = s[2].structValue?.first?.boolValue
        else { return nil }
        let d = Dictionary(pairs, uniquingKeysWith: { a, _ in a })
        func port(_ k: String) -> UInt16 {
            if case .uint16(let p)? = d[k] { return p }
            return 0
        }
        return (
            id,
            RuleState(
                proto: d["protocol"]?.stringValue ?? "?", address: d["address"]?.stringValue ?? "?",
                first: port("first-port"), last: port("last-port"), targetPort: port("target-port"), active: active)
        )
    }
}

/// One client's committed state and the alternative left by a change in flight at a kill.
final class Ledger: Sendable {
    let name: String
    let ids: ClosedRange<UInt32>
    private let state = Mutex<(committed: [UInt32: RuleState], inFlight: [UInt32: RuleState]?)>(([:], nil))

    init(name: String, ids: ClosedRange<UInt32>) {
        self.name = name
        self.ids = ids
    }

    /// The committed state as the client knows it.
    var committed: [UInt32: RuleState] { state.withLock { $0.committed } }

    /// True while an outcome is unknown (until the next restart's check).
    var uncertain: Bool { state.withLock { $0.inFlight != nil } }

    /// An acknowledged change: `after` is now the committed state.
    func acknowledge(_ after: [UInt32: RuleState]) { state.withLock { $0.committed = after } }

    /// A change without a reply: `after` may or may not be the committed state.
    func inFlight(_ after: [UInt32: RuleState]) { state.withLock { $0.inFlight = after } }

    /// Compares what pestod restored for this client's IDs; returns the IDs that match neither
    /// the committed state nor the in-flight alternative, with a description, and then takes
    /// the restored state as the committed one.
    func check(restored: [UInt32: RuleState]) -> [String] {
        state.withLock { s in
            defer {
                s.committed = restored
                s.inFlight = nil
            }
            if restored == s.committed || restored == s.inFlight { return [] }
            var lost: [String] = []
            for id in Set(restored.keys).union(s.committed.keys).sorted() where restored[id] != s.committed[id] {
                if let alt = s.inFlight, alt[id] == restored[id] { continue }
                lost.append(
                    "\(name) rule \(id): acknowledged \(s.committed[id].map(\.description) ?? "absent"), restored \(restored[id].map(\.description) ?? "absent")"
                )
            }
            return lost
        }
    }
}

/// Counters every thread adds to.
final class Stats: Sendable {
    let calls = Atomic<Int>(0)
    let acknowledged = Atomic<Int>(0)
    let refused = Atomic<Int>(0)
    let unanswered = Atomic<Int>(0)
    let uploads = Atomic<Int>(0)
    let uploadsFailed = Atomic<Int>(0)
    let connections = Atomic<Int>(0)
    let connectionsFailed = Atomic<Int>(0)
    let connectionsFailedInRestart = Atomic<Int>(0)
    let datagrams = Atomic<Int>(0)
    let datagramsFailed = Atomic<Int>(0)
    let datagramsFailedInRestart = Atomic<Int>(0)
    let lockHoldersKilled = Atomic<Int>(0)
    let clientsKilled = Atomic<Int>(0)
    let transactionsCommitted = Atomic<Int>(0)
    let transactionsRolledBack = Atomic<Int>(0)
    let refusals = Mutex<[String: Int]>([:])

    func refusal(_ name: String) {
        refused.add(1, ordering: .relaxed)
        refusals.withLock { $0[String(name.split(separator: ".").last ?? ""), default: 0] += 1 }
    }
}

/// Stop and restart coordination: workers call `checkpoint()` between operations and park
/// there while the chaos loop restarts pestod.
final class Control: Sendable {
    let stop = Atomic<Bool>(false)
    let restarting = Atomic<Bool>(false)
    let parked = Atomic<Int>(0)
    let finished = Atomic<Int>(0)
    /// Restarts so far (traffic failures that span one are counted apart).
    let restarts = Atomic<Int>(0)

    /// Parks while a restart is under way.
    func checkpoint() {
        guard restarting.load(ordering: .acquiring) else { return }
        parked.add(1, ordering: .acquiringAndReleasing)
        while restarting.load(ordering: .acquiring) { usleep(2000) }
        parked.subtract(1, ordering: .acquiringAndReleasing)
    }

    /// Waits (bounded) until an outcome-unknown worker can park: the next restart resolves it.
    func waitForRestart() {
        while !restarting.load(ordering: .acquiring) && !stop.load(ordering: .relaxed) { usleep(5000) }
    }

    /// Sleeps about `milliseconds` unless stopping or restarting.
    func pause(_ milliseconds: Int) {
        var left = milliseconds
        while left > 0 && !stop.load(ordering: .relaxed) && !restarting.load(ordering: .relaxed) {
            usleep(UInt32(min(left, 20)) * 1000)
            left -= 20
        }
    }
}

/// Keeps uploads apart from D-Bus changes: an upload resends the active rules it was dumped, so
/// a D-Bus activation between its dump and its upload would be undone by it (upstream's model).
/// D-Bus changes hold the gate shared; an upload session holds it alone. A waiting upload goes first.
final class Gate: Sendable {
    private let state = Mutex<(readers: Int, writer: Bool, writerWaiting: Bool)>((0, false, false))

    func shared<T>(_ body: () -> T) -> T {
        while !state.withLock({ s -> Bool in
            if s.writer || s.writerWaiting { return false }
            s.readers += 1
            return true
        }) { usleep(500) }
        defer { state.withLock { $0.readers -= 1 } }
        return body()
    }

    func exclusive<T>(_ body: () -> T) -> T {
        state.withLock { $0.writerWaiting = true }
        while !state.withLock({ s -> Bool in
            if s.readers > 0 || s.writer { return false }
            s.writer = true
            s.writerWaiting = false
            return true
        }) { usleep(500) }
        defer { state.withLock { $0.writer = false } }
        return body()
    }
}

/// How a reply ended: acknowledged, refused by pestod (nothing changed), or unknown (no reply).
enum Outcome {
    case acknowledged
    case refused(String)
    case unknown(String)

    /// Classifies an error name: pestod's own errors and the bus's argument and limit errors are
    /// definite refusals; anything else (NoReply, ServiceUnknown, Disconnected, timeouts) leaves
    /// the outcome unknown.
    static func of(errorName name: String) -> Outcome {
        if name.hasPrefix("top.passt.Pesto1.Error.") || name == "org.freedesktop.DBus.Error.InvalidArgs"
            || name == "org.freedesktop.DBus.Error.LimitsExceeded" || name == "org.freedesktop.DBus.Error.AccessDenied"
        {
            return .refused(name)
        }
        return .unknown(name)
    }
}
