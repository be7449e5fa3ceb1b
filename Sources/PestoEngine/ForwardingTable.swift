// SPDX-License-Identifier: GPL-2.0-or-later

// ForwardingTable: the rules of one table (HOST or SPLICE) and their listening sockets.
//
// Theory of operation
// -------------------
// The table is the proposals' "persistent rule IDs" design: rules are found by their
// client-chosen u32 ID, and table order is ID order. The entries are kept in an array in no
// particular order, with a dictionary from ID to position: inserting appends, deleting moves
// the last entry into the hole, so neither costs more than O(1) whatever the IDs. The IDs in
// ascending order are kept alongside, extended in place while IDs arrive in ascending order
// (the usual case) and otherwise re-sorted once, at the next read that needs the order
// (`ids`, `list`, `read(atIndex:)`, the retry pass). Each rule is inserted inactive and must
// be deactivated before it is deleted.
//
//   Insert      checks (RuleExists, InvalidRule, NoSpace) and stores the rule inactive.
//   Activate    checks the rule against the *active* rules (Conflict), then opens one
//               listening socket per port. Binds that fail are counted, not fatal: the call
//               completes and returns (bound, failed). Once descriptors run out (EMFILE,
//               ENFILE) the remaining ports fail at once instead of each calling socket().
//   Deactivate  closes exactly the rule's sockets.
//   Delete      removes an inactive rule.
//   retryFailedBinds()  tries failed ports of active rules again (scan rules' too); the
//               event loop calls it every second (`--retry-interval`). So that one pass never
//               holds the loop for long, it makes at most `defaultRetryBudget` (1,024) socket
//               attempts and the next pass continues where it stopped: a cursor (rule ID and
//               port, not an array position, so it survives inserts and deletes) walks the
//               failed ports of all active rules round robin in ID and port order. Every
//               failed port is tried once before any is tried twice, and at least once every
//               ceil(failed / 1,024) passes. A pass also stops at the first EMFILE/ENFILE.
//
// Invariants, true between any two calls:
//   - `slots[id]` is the position in `entries` of the entry with that ID, for every entry;
//   - unless `sortedIDsStale`, `sortedIDs` is every ID in ascending order;
//   - an entry has `sockets` exactly when it is active;
//   - no operation on one rule opens, closes or moves a socket of another rule;
//   - an operation that throws has changed nothing;
//   - `reservedSockets` is the sum of the port counts of all rules, `openSockets` the number
//     of descriptors held, `activeCount` the number of active entries;
//   - `retryCursor` names any ID and slot; it need not exist (a pass starts at the first
//     ID not below it, and at slot 0 unless it is that very ID);
//   - `activeIndex` (ConflictIndex.swift) counts exactly the active rules, so the conflict
//     check of an activation costs a few probes per port of the rule, not a comparison with
//     every active rule; only a failing check scans, to name the lowest conflicting ID.
//
// Every state change of a rule (activation, deactivation, a retry that changes its counts)
// is reported once to `onStateChange`, which the service turns into D-Bus signals.
//
// With `OverlapPolicy.firstMatch` (doc/overlap.md) activation checks no conflict, and the
// sockets are not the rules' own: each is shared by every active rule it serves on its
// port (SharedListeners.swift), opened when the first of them needs it and closed when the
// last one leaves, so the invariant "no operation on one rule opens, closes or moves a
// socket of another rule" becomes "no operation closes a socket another active rule uses".
// A rule's slot then holds the descriptor of the socket serving that port, and `bound`
// counts the ports some socket serves. Each rule's count of ports it wins (`portsWon`) is
// kept as sockets gain and lose users; a change to another rule's count than the one
// operated on is reported to `onPortsWonChange`.
//
// The table is not thread-safe: it belongs to the event loop thread.

/// What happened to a rule, as reported to `ForwardingTable.onStateChange`.
import PestoModel
import PestoSystem

public struct RuleStateChange: Hashable, Sendable {
    /// Why the state changed.
    public enum Cause: Hashable, Sendable {
        case activated
        case deactivated
        /// A retry changed the bound or failed counts.
        case retried
        /// A scan of the target side changed which ports a scan rule listens on.
        case scanned
    }

    /// The rule's ID.
    public var id: UInt32
    /// The state after the change.
    public var status: RuleStatus
    /// Why.
    public var cause: Cause
    /// True when `status.failed` differs from before the change.
    public var failuresChanged: Bool
}

/// One table of forwarding rules with the listening sockets of its active rules.
public final class ForwardingTable {
    /// The result of a successful activation.
    public struct BindCounts: Hashable, Sendable {
        public var bound: UInt32
        public var failed: UInt32
    }

    /// Which table this is.
    public let kind: TableKind
    /// What the table supports; rules needing more are rejected at Insert.
    public let capabilities: Capabilities
    /// The limits checked at Insert.
    public let limits: TableLimits
    /// Called after every state change of a rule.
    public var onStateChange: ((RuleStateChange) -> Void)?
    /// How overlapping active rules are treated.
    public let overlapPolicy: OverlapPolicy
    /// First match: called with a rule's ID and its new count of won ports when an operation
    /// on another rule changed it (the operated rule's own change goes to `onStateChange`).
    public var onPortsWonChange: ((UInt32, UInt32) -> Void)?
    /// Told about every listening socket opened and closed (the engine polls them).
    public weak var listenerObserver: (any ListenerObserver)?

    private let factory: any ListenerFactory
    /// The rules, in no particular order (see the theory of operation).
    var entries: [Entry] = []
    /// The position in `entries` of each ID.
    var slots: [UInt32: Int] = [:]
    /// Every ID in ascending order, unless `sortedIDsStale`.
    private var sortedIDs: [UInt32] = []
    /// True when `sortedIDs` must be rebuilt before it is used.
    private var sortedIDsStale = false
    private(set) public var reservedSockets = 0
    public internal(set) var openSockets = 0
    private(set) public var activeCount = 0
    /// The active rules, indexed by protocol, port, interface and address.
    private var activeIndex = ConflictIndex()
    /// Rules compared one by one while naming a conflicting rule (for tests of the cost).
    private var conflictScanComparisons = 0
    /// First match: the shared listening sockets.
    var shared = SharedListeners()
    /// First match: the won-port counts before the current operation of the rules it changed.
    var wonBefore: [UInt32: UInt32] = [:]

    /// Work done by conflict checks so far: index probes plus rule comparisons. Tests use it
    /// to show that activating n rules costs O(n), not O(n²).
    var conflictCheckCost: Int { activeIndex.probes + conflictScanComparisons }

    /// Slot value of a port whose bind failed and is to be retried.
    static let failedSlot: Int32 = -1
    /// Slot value of a port a scan rule does not currently want.
    static let unwantedSlot: Int32 = -2

    /// One rule and, while active, its sockets.
    struct Entry {
        let id: UInt32
        let rule: Rule
        var sockets: RuleSockets?
        /// First match: how many of its ports the rule wins.
        var won: UInt32 = 0
    }

    /// The sockets of an active rule: one slot per port of its range.
    struct RuleSockets {
        /// Slot `k` is the descriptor for port `firstPort + k`, or `failedSlot`/`unwantedSlot`.
        var slots: [Int32]
        var bound: UInt32 = 0
        var failed: UInt32 = 0
        var lastError: Errno?

        var status: RuleStatus { RuleStatus(active: true, bound: bound, failed: failed, lastError: lastError) }
    }

    /// Whether its targets are inside the network namespace pestod was given, so that its
    /// rules may ask for `source` "client" (the HOST table of a pestod started with --netns).
    public let clientSource: Bool

    /// Makes an empty table.
    public init(
        kind: TableKind, capabilities: Capabilities, limits: TableLimits = .default, overlapPolicy: OverlapPolicy = .refuse,
        factory: any ListenerFactory, clientSource: Bool = false
    ) {
        self.kind = kind
        self.capabilities = capabilities
        self.clientSource = clientSource
        self.limits = limits
        self.overlapPolicy = overlapPolicy
        self.factory = factory
    }

    deinit {
        if overlapPolicy == .firstMatch {
            for fd in shared.sockets.keys { closeListener(fd) }
            return
        }
        for entry in entries {
            for fd in entry.sockets?.slots ?? [] where fd >= 0 { closeListener(fd) }
        }
    }

    /// Opens one listener through the factory and tells the observer. When the observer
    /// cannot take it (no epoll watch, no descriptor budget) the socket is closed and its
    /// errno is this port's bind failure, counted and retried like any other.
    func openListener(_ id: UInt32, _ rule: Rule, _ port: UInt16) -> Result<Int32, Errno> {
        let result = factory.openListener(for: rule, port: port)
        if case .success(let fd) = result, let observer = listenerObserver,
            case .failure(let e) = observer.listenerOpened(fd: fd, table: kind, ruleID: id, rule: rule, port: port)
        {
            factory.closeListener(fd)
            return .failure(e)
        }
        return result
    }

    /// Tells the observer, then closes one listener.
    func closeListener(_ fd: Int32) {
        listenerObserver?.listenerClosed(fd: fd)
        factory.closeListener(fd)
    }

    // MARK: Reading

    /// Number of rules.
    public var ruleCount: Int { entries.count }

    /// The IDs of all rules in table order.
    public var ids: [UInt32] { idsInOrder() }

    /// Every ID in ascending order; sorts once after out-of-order inserts or deletes.
    func idsInOrder() -> [UInt32] {
        if sortedIDsStale {
            sortedIDs = entries.map(\.id).sorted()
            sortedIDsStale = false
        }
        return sortedIDs
    }

    /// Position of `id` in `entries`.
    func index(of id: UInt32) throws(PestoError) -> Int {
        guard let i = slots[id] else { throw PestoError(.noSuchRule, "The \(kind.name) table has no rule \(id).") }
        return i
    }

    /// Whether a rule with this ID exists.
    public func contains(_ id: UInt32) -> Bool { slots[id] != nil }

    /// The rule stored under `id`.
    public func read(_ id: UInt32) throws(PestoError) -> Rule { entries[try index(of: id)].rule }

    /// The rule at `position` in ID order; `NoSuchRule` past the end.
    public func read(atIndex position: Int) throws(PestoError) -> (id: UInt32, rule: Rule) {
        guard position >= 0 && position < entries.count else {
            throw PestoError(
                .noSuchRule, "The \(kind.name) table has \(ClientText.counted(entries.count, "rule")); there is none at index \(position).")
        }
        let entry = entries[slots[idsInOrder()[position]]!]
        return (entry.id, entry.rule)
    }

    /// The state of rule `id`.
    public func status(_ id: UInt32) throws(PestoError) -> RuleStatus {
        entries[try index(of: id)].sockets?.status ?? .inactive
    }

    /// Every rule with its state, in ID order.
    public func list() -> [(id: UInt32, rule: Rule, status: RuleStatus)] {
        idsInOrder().map { id in
            let entry = entries[slots[id]!]
            return (id, entry.rule, entry.sockets?.status ?? .inactive)
        }
    }

    /// The listening descriptors of rule `id` with their ports (empty when inactive). Under
    /// first match, a shared socket is listed for each rule with exactly its binding (so that a
    /// takeover can hand it to whichever of them is activated first), not for the narrower
    /// rules it serves too.
    public func listeners(of id: UInt32) throws(PestoError) -> [(port: UInt16, fd: Int32)] {
        let entry = entries[try index(of: id)]
        guard let sockets = entry.sockets else { return [] }
        let binding = ListenBinding(entry.rule.address)
        return sockets.slots.enumerated().compactMap { k, fd in
            guard fd >= 0 else { return nil }
            if overlapPolicy == .firstMatch && shared.sockets[fd]?.binding != binding { return nil }
            return (entry.rule.firstPort + UInt16(k), fd)
        }
    }

    // MARK: Changing

    /// Checks `rule` against this table: its capabilities and whether it may ask for
    /// `source` "client" (`Rule.validate(capabilities:clientSource:)`).
    /// - Throws: `InvalidRule`.
    public func validate(_ rule: Rule) throws(PestoError) {
        try rule.validate(capabilities: capabilities, clientSource: clientSource)
    }

    /// Adds `rule` under `id`, inactive. Does not check conflicts.
    ///
    /// - Throws: `RuleExists`, `InvalidRule`, `NoSpace`; nothing changes on error.
    public func insert(id: UInt32, rule: Rule) throws(PestoError) {
        if slots[id] != nil {
            throw PestoError(.ruleExists, "The \(kind.name) table already has a rule \(id); delete it first or pick another ID.")
        }
        try validate(rule)
        if entries.count >= limits.maxRules {
            throw PestoError(.noSpace, "The \(kind.name) table is full: it holds at most \(limits.maxRules) rules.")
        }
        if reservedSockets + rule.portCount > limits.maxSockets {
            throw PestoError(
                .noSpace,
                "The \(kind.name) table's rules may use at most \(limits.maxSockets) sockets; "
                    + "\(reservedSockets) are taken and this rule needs \(rule.portCount).")
        }
        slots[id] = entries.count
        entries.append(Entry(id: id, rule: rule, sockets: nil))
        if !sortedIDsStale, sortedIDs.last.map({ $0 < id }) ?? true {
            sortedIDs.append(id)
        } else {
            sortedIDsStale = true
        }
        reservedSockets += rule.portCount
    }

    /// Removes the inactive rule `id`.
    ///
    /// - Throws: `NoSuchRule`, `RuleActive`; nothing changes on error.
    public func delete(id: UInt32) throws(PestoError) {
        let i = try index(of: id)
        if entries[i].sockets != nil {
            throw PestoError(.ruleActive, "Rule \(id) of the \(kind.name) table is active; deactivate it before deleting it.")
        }
        reservedSockets -= entries[i].rule.portCount
        // Move the last entry into the hole: O(1) wherever the rule was.
        let last = entries.removeLast()
        if i < entries.count {
            entries[i] = last
            slots[last.id] = i
        }
        slots[id] = nil
        if entries.isEmpty {
            sortedIDs = []
            sortedIDsStale = false
        } else if !sortedIDsStale && sortedIDs.last == id {
            sortedIDs.removeLast()
        } else {
            sortedIDsStale = true
        }
    }

    /// The first active rule that `rule` conflicts with, other than `id` itself.
    ///
    /// Asks the index first; only when it reports a conflict (or `id` itself is active and
    /// so indexed) are the active rules scanned in ID order, to name the lowest one.
    public func conflictingRule(for rule: Rule, excluding id: UInt32) -> UInt32? {
        if slots[id].map({ entries[$0].sockets == nil }) ?? true {
            guard activeIndex.conflicts(with: rule) else { return nil }
        }
        for other in idsInOrder() where other != id {
            let entry = entries[slots[other]!]
            guard entry.sockets != nil else { continue }
            conflictScanComparisons += 1
            if entry.rule.conflicts(with: rule) { return other }
        }
        return nil
    }

    /// Activates rule `id`: opens a listening socket for each of its ports.
    ///
    /// Completes even when some or all binds fail; the failures are counted and retried by
    /// `retryFailedBinds()`.
    /// - Returns: how many sockets were bound and how many failed.
    /// - Throws: `NoSuchRule`, `RuleActive`, `Conflict`; nothing changes on error.
    @discardableResult
    public func activate(id: UInt32) throws(PestoError) -> BindCounts {
        let i = try index(of: id)
        if entries[i].sockets != nil {
            throw PestoError(.ruleActive, "Rule \(id) of the \(kind.name) table is already active.")
        }
        let rule = entries[i].rule
        if overlapPolicy == .refuse, let other = conflictingRule(for: rule, excluding: id) {
            throw PestoError(
                .conflict,
                "Rule \(id) overlaps active rule \(other) of the \(kind.name) table "
                    + "(same protocol, overlapping ports and addresses); deactivate rule \(other) first.")
        }

        var sockets = RuleSockets(slots: [Int32](repeating: Self.failedSlot, count: rule.portCount))
        if rule.scan {
            // A scan rule wants nothing until the scanner finds ports bound on the target side.
            for k in sockets.slots.indices { sockets.slots[k] = Self.unwantedSlot }
        } else {
            var exhausted: Errno? = nil
            for k in sockets.slots.indices {
                if let exhausted {
                    sockets.failed += 1
                    sockets.lastError = exhausted
                    continue
                }
                switch serve(id, rule, rule.firstPort + UInt16(k)) {
                case .success(let fd):
                    sockets.slots[k] = fd
                    sockets.bound += 1
                case .failure(let e):
                    sockets.failed += 1
                    sockets.lastError = e
                    if e.isDescriptorExhaustion { exhausted = e }
                }
            }
        }
        entries[i].sockets = sockets
        activeCount += 1
        if overlapPolicy == .refuse {
            activeIndex.add(rule)
            openSockets += Int(sockets.bound)
        } else {
            openSockets = shared.count
        }
        onStateChange?(RuleStateChange(id: id, status: sockets.status, cause: .activated, failuresChanged: sockets.failed != 0))
        reportPortsWon(except: id)
        return BindCounts(bound: sockets.bound, failed: sockets.failed)
    }

    /// Deactivates rule `id`: closes its listening sockets and nothing else.
    ///
    /// - Throws: `NoSuchRule`, `RuleInactive`; nothing changes on error.
    public func deactivate(id: UInt32) throws(PestoError) {
        let i = try index(of: id)
        guard let sockets = entries[i].sockets else {
            throw PestoError(.ruleInactive, "Rule \(id) of the \(kind.name) table is not active.")
        }
        entries[i].sockets = nil
        activeCount -= 1
        if overlapPolicy == .refuse {
            for fd in sockets.slots where fd >= 0 { closeListener(fd) }
            activeIndex.remove(entries[i].rule)
            openSockets -= Int(sockets.bound)
        } else {
            let rule = entries[i].rule
            for (k, fd) in sockets.slots.enumerated() where fd >= 0 { leave(id, port: rule.firstPort + UInt16(k), fd) }
            openSockets = shared.count
        }
        onStateChange?(RuleStateChange(id: id, status: .inactive, cause: .deactivated, failuresChanged: sockets.failed != 0))
        reportPortsWon(except: id)
    }

    /// Tries again to bind failed sockets of active rules: at most `retryBudget` attempts,
    /// continuing in ID and port order from where the previous pass stopped.
    ///
    /// The failed ports of all active rules (scan rules included) form one cycle, in ID order
    /// and, within a rule, port order. A pass starts at `retryCursor` and walks the cycle once
    /// at most, stopping early when the budget is spent or at the first descriptor exhaustion
    /// (the remaining failures would fail the same way this pass); the cursor then names the
    /// port after the last one tried. Every failed port is thus tried once before any is tried
    /// twice, and within ceil(failed / budget) passes. The cursor is an ID and a slot, not a
    /// position, so inserts and deletes between passes move it to the next rule in ID order.
    ///
    /// Reports each rule whose counts changed to `onStateChange`, once per pass. When the pass
    /// starts inside a rule it may come back to that rule's first ports at the end: the rule
    /// is then reported once, last.
    /// - Returns: the IDs of the rules whose counts changed, in the order reported.
    @discardableResult
    public func retryFailedBinds() -> [UInt32] {
        let order = idsInOrder()
        guard !order.isEmpty else { return [] }
        var start = firstPosition(atLeast: retryCursor.id, in: order)
        var startSlot = 0
        if start == order.count {
            start = 0
        } else if order[start] == retryCursor.id {
            startSlot = retryCursor.slot
        }
        var changed: [UInt32] = []
        var attempts = 0
        // The first rule's counts before this pass, while its report waits for the end.
        var pending: (index: Int, before: RetryCounts)? = nil
        // Visit the first rule from `startSlot`, every other rule whole, and then, when the
        // pass started inside the first rule, that rule's slots before `startSlot`.
        let visits = startSlot > 0 ? order.count + 1 : order.count
        for step in 0..<visits {
            let id = order[(start + step) % order.count]
            let i = slots[id]!
            guard var sockets = entries[i].sockets, sockets.failed > 0 else { continue }
            // Taken out so that the slots below change in place, not in a copy; the factory and
            // the observer never read the table, so none sees the rule without its sockets.
            entries[i].sockets = nil
            let before = RetryCounts(sockets)
            let count = sockets.slots.count
            let segment =
                step == 0 ? min(startSlot, count)..<count : step == order.count ? 0..<min(startSlot, count) : 0..<count
            var stop = false
            let rule = entries[i].rule
            for k in segment where sockets.slots[k] == Self.failedSlot {
                if attempts == retryBudget {
                    retryCursor = (id, k)
                    stop = true
                    break
                }
                attempts += 1
                switch serve(id, rule, rule.firstPort + UInt16(k)) {
                case .success(let fd):
                    sockets.slots[k] = fd
                    sockets.bound += 1
                    sockets.failed -= 1
                case .failure(let e):
                    sockets.lastError = e
                    if e.isDescriptorExhaustion {
                        retryCursor = (id, k + 1)
                        stop = true
                    }
                }
                if stop { break }
            }
            if sockets.failed == 0 { sockets.lastError = nil }
            entries[i].sockets = sockets
            openSockets = overlapPolicy == .refuse ? openSockets + Int(sockets.bound) - Int(before.bound) : shared.count
            if step == 0 && startSlot > 0 {
                pending = (i, before)
            } else {
                reportRetry(i, before: step == order.count ? pending?.before ?? before : before, into: &changed)
                if step == order.count { pending = nil }
            }
            if stop { break }
        }
        if let pending { reportRetry(pending.index, before: pending.before, into: &changed) }
        reportPortsWon(except: nil)
        return changed
    }

    /// Most socket attempts of one `retryFailedBinds()` pass (positive); see
    /// `defaultRetryBudget`. Tests set smaller budgets.
    var retryBudget = ForwardingTable.defaultRetryBudget {
        didSet { precondition(retryBudget > 0, "a retry pass must be allowed an attempt") }
    }

    /// Most socket attempts of one retry pass, per table: 1,024. A failing attempt is a
    /// socket(), one or two setsockopt(), perhaps a bind(), and a close(): 10 to 50 µs on a
    /// busy 2-core host. Measured there (debug build), a pass over a 65,535-port rule on a
    /// missing interface takes 11 to 24 ms, where trying every port took 1.1 to 1.4 s, more
    /// than the default interval. Each of 65,535 failing ports is still retried within 64
    /// passes (about a minute at the default interval).
    public static let defaultRetryBudget = 1_024

    /// Where the next retry pass starts: a rule ID and a slot (port offset) in that rule. The
    /// rule need not exist any more; the pass then starts at the next ID.
    var retryCursor: (id: UInt32, slot: Int) = (0, 0)

    /// A rule's counts before a retry, to decide whether to report it.
    private struct RetryCounts {
        let bound: UInt32
        let failed: UInt32
        let lastError: Errno?

        init(_ sockets: RuleSockets) {
            (bound, failed, lastError) = (sockets.bound, sockets.failed, sockets.lastError)
        }
    }

    /// Reports the rule at `i` to `onStateChange` (and appends its ID to `changed`) when a
    /// retry changed its counts or last error since `before`.
    private func reportRetry(_ i: Int, before: RetryCounts, into changed: inout [UInt32]) {
        let sockets = entries[i].sockets!
        guard sockets.bound != before.bound || sockets.failed != before.failed || sockets.lastError != before.lastError else {
            return
        }
        changed.append(entries[i].id)
        onStateChange?(
            RuleStateChange(id: entries[i].id, status: sockets.status, cause: .retried, failuresChanged: sockets.failed != before.failed))
    }

    /// The position of the first ID not below `id` in the ascending `order` (`order.count`
    /// when every ID is below it).
    private func firstPosition(atLeast id: UInt32, in order: [UInt32]) -> Int {
        var (low, high) = (0, order.count)
        while low < high {
            let middle = (low + high) / 2
            if order[middle] < id { low = middle + 1 } else { high = middle }
        }
        return low
    }

    /// The IDs of the active scan rules with their ranges, for the scanner.
    public var activeScanRules: [(id: UInt32, rule: Rule)] {
        idsInOrder().compactMap { id in
            let entry = entries[slots[id]!]
            return entry.rule.scan && entry.sockets != nil ? (id, entry.rule) : nil
        }
    }

    /// Makes scan rule `id` listen on exactly the ports of its range for which `wanted` is
    /// true: opens the newly wanted ones (failures are counted and retried like any other)
    /// and closes the ones no longer wanted. Reports a change to `onStateChange`.
    /// - Returns: true when the rule's sockets changed.
    @discardableResult
    public func updateScan(id: UInt32, wanted: (UInt16) -> Bool) -> Bool {
        guard let i = slots[id], entries[i].rule.scan, let before = entries[i].sockets else { return false }
        let rule = entries[i].rule
        var sockets = before
        var changed = false
        for k in sockets.slots.indices {
            let port = rule.firstPort + UInt16(k)
            let slot = sockets.slots[k]
            if wanted(port) {
                guard slot == Self.unwantedSlot else { continue }
                changed = true
                switch serve(id, rule, port) {
                case .success(let fd):
                    sockets.slots[k] = fd
                    sockets.bound += 1
                case .failure(let e):
                    sockets.slots[k] = Self.failedSlot
                    sockets.failed += 1
                    sockets.lastError = e
                }
            } else if slot != Self.unwantedSlot {
                changed = true
                if slot >= 0 {
                    if overlapPolicy == .refuse { closeListener(slot) } else { leave(id, port: port, slot) }
                    sockets.bound -= 1
                } else {
                    sockets.failed -= 1
                }
                sockets.slots[k] = Self.unwantedSlot
            }
        }
        guard changed else { return false }
        if sockets.failed == 0 { sockets.lastError = nil }
        entries[i].sockets = sockets
        openSockets = overlapPolicy == .refuse ? openSockets + Int(sockets.bound) - Int(before.bound) : shared.count
        onStateChange?(RuleStateChange(id: id, status: sockets.status, cause: .scanned, failuresChanged: sockets.failed != before.failed))
        reportPortsWon(except: id)
        return true
    }
}

/// Learns about every listening socket a table opens or closes.
public protocol ListenerObserver: AnyObject {
    /// `fd` now listens on `port` for rule `ruleID` of table `table`.
    /// - Returns: a failure when the observer cannot take the socket (it has undone whatever it
    ///   did); the table then closes it, without `listenerClosed`, and counts the errno as
    ///   that port's bind failure.
    func listenerOpened(fd: Int32, table: TableKind, ruleID: UInt32, rule: Rule, port: UInt16) -> Result<Void, Errno>
    /// `fd` is about to be closed.
    func listenerClosed(fd: Int32)
}

// MARK: - First match

extension ForwardingTable {
    /// How many of rule `id`'s ports it wins: those where a new connection or flow can reach
    /// it. Under `refuse` that is every bound port of an active rule.
    /// - Throws: `NoSuchRule`.
    public func portsWon(_ id: UInt32) throws(PestoError) -> UInt32 {
        let i = try index(of: id)
        guard let sockets = entries[i].sockets else { return 0 }
        return overlapPolicy == .refuse ? sockets.bound : entries[i].won
    }

    /// First match: where a new connection or flow on listening socket `fd` goes: the lowest
    /// active rule the socket serves whose address matches the local address it arrived at.
    /// `localAddress` is asked only when the lowest rule does not take everything the socket
    /// receives. Nil when no rule matches (a socket kept open for a narrower rule) or `fd` is
    /// not one of the table's.
    public func firstMatchTarget(listener fd: Int32, localAddress: () -> IPAddress?) -> ForwardTarget? {
        guard let socket = shared.sockets[fd], let first = socket.users.first else { return nil }
        var local: IPAddress? = nil
        if !ListenBinding(entries[slots[first]!].rule.address).covers(socket.binding) { local = localAddress() }
        for u in socket.users {
            let rule = entries[slots[u]!].rule
            guard ListenBinding(rule.address).matches(local) else { continue }
            return ForwardTarget(
                table: kind, ruleID: u, proto: rule.proto, address: rule.targetAddress, port: rule.targetPort(for: socket.group.port),
                proxyProtocol: rule.proxyProtocol)
        }
        return nil
    }

    /// The descriptor of every listening socket (each once, shared or not).
    public var listeningDescriptors: [Int32] {
        if overlapPolicy == .firstMatch { return shared.sockets.keys.sorted() }
        return entries.flatMap { $0.sockets?.slots.filter { $0 >= 0 } ?? [] }
    }

    /// Makes a socket serve port `port` of rule `id` (being activated, retried or scanned):
    /// under `refuse` a socket of its own; under first match the open socket of its group
    /// that covers its binding, else a new one, bound in place of the narrower sockets it
    /// covers (the kernel refuses it beside them), whose users it then serves too. If that
    /// bind fails, the narrower sockets are opened again.
    func serve(_ id: UInt32, _ rule: Rule, _ port: UInt16) -> Result<Int32, Errno> {
        guard overlapPolicy == .firstMatch else { return openListener(id, rule, port) }
        let group = ListenGroup(rule, port: port)
        let binding = ListenBinding(rule.address)
        if let fd = shared.covering(group, binding) {
            var users = shared.sockets[fd]!.users
            users.insert(id, at: users.firstIndex { $0 > id } ?? users.count)
            setUsers(fd, users)
            return .success(fd)
        }
        var displaced: [SharedSocket] = []
        for fd in shared.covered(by: binding, in: group) {
            displaced.append(shared.sockets[fd]!)
            setUsers(fd, [])
            shared.remove(fd)
            closeListener(fd)
        }
        switch openListener(id, rule, port) {
        case .success(let fd):
            shared.insert(SharedSocket(fd: fd, group: group, binding: binding, opener: rule, openerID: id))
            var users = [id]
            for d in displaced {
                users += d.users
                for u in d.users { repoint(u, port: port, to: .success(fd)) }
            }
            setUsers(fd, users.sorted())
            return .success(fd)
        case .failure(let e):
            for d in displaced { reopen(d) }
            return .failure(e)
        }
    }

    /// Opens a displaced socket again for its users; if that fails, the port is their bind
    /// failure, retried like any other.
    private func reopen(_ d: SharedSocket) {
        let port = d.group.port
        let opened = openListener(d.openerID, d.opener, port)
        if case .success(let fd) = opened {
            shared.insert(SharedSocket(fd: fd, group: d.group, binding: d.binding, opener: d.opener, openerID: d.openerID))
            setUsers(fd, d.users)
        }
        for u in d.users { repoint(u, port: port, to: opened) }
    }

    /// Points port `port` of active rule `id` at a new socket, or counts it failed.
    private func repoint(_ id: UInt32, port: UInt16, to socket: Result<Int32, Errno>) {
        let i = slots[id]!
        let rule = entries[i].rule
        guard var sockets = entries[i].sockets else { preconditionFailure("a user of a shared socket is active") }
        let k = Int(port - rule.firstPort)
        switch socket {
        case .success(let fd):
            sockets.slots[k] = fd
            entries[i].sockets = sockets
        case .failure(let e):
            sockets.slots[k] = Self.failedSlot
            sockets.bound -= 1
            sockets.failed += 1
            sockets.lastError = e
            entries[i].sockets = sockets
            onStateChange?(RuleStateChange(id: id, status: sockets.status, cause: .retried, failuresChanged: true))
        }
    }

    /// First match: rule `id` no longer needs socket `fd` for `port`; the socket is closed
    /// when no other active rule uses it.
    func leave(_ id: UInt32, port: UInt16, _ fd: Int32) {
        var users = shared.sockets[fd]!.users
        users.removeAll { $0 == id }
        setUsers(fd, users)
        if users.isEmpty {
            shared.remove(fd)
            closeListener(fd)
        }
    }

    /// Replaces the users of shared socket `fd` and moves the won-port counts of the rules
    /// that gain or lose the port.
    private func setUsers(_ fd: Int32, _ users: [UInt32]) {
        let binding = { (u: UInt32) in ListenBinding(self.entries[self.slots[u]!].rule.address) }
        let old = SharedListeners.winners(shared.sockets[fd]!.users, binding: binding)
        let new = SharedListeners.winners(users, binding: binding)
        shared.setUsers(fd, users)
        for u in old where !new.contains(u) { adjustWon(u, by: -1) }
        for u in new where !old.contains(u) { adjustWon(u, by: 1) }
    }

    private func adjustWon(_ id: UInt32, by delta: Int) {
        let i = slots[id]!
        if wonBefore[id] == nil { wonBefore[id] = entries[i].won }
        entries[i].won = UInt32(Int(entries[i].won) + delta)
    }

    /// Reports to `onPortsWonChange` every rule but `id` whose won-port count the operation
    /// just done changed, in ID order.
    func reportPortsWon(except id: UInt32?) {
        guard !wonBefore.isEmpty else { return }
        let before = wonBefore
        wonBefore = [:]
        for (u, old) in before.sorted(by: { $0.key < $1.key }) where u != id {
            guard let i = slots[u], entries[i].won != old else { continue }
            onPortsWonChange?(u, entries[i].won)
        }
    }
}
