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
//   retryFailedBinds()  tries failed ports of active rules again (BindRetry.swift).
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
// With `OverlapPolicy.firstMatch` the sockets are shared among rules (FirstMatchSharing.swift).
//
// The table is not thread-safe: it belongs to the event loop thread.

import PestoModel
import PestoSystem

/// What happened to a rule, as reported to `ForwardingTable.onStateChange`.
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
    /// Most socket attempts of one `retryFailedBinds()` pass (positive; BindRetry.swift); see
    /// `defaultRetryBudget`. Tests set smaller budgets.
    var retryBudget = ForwardingTable.defaultRetryBudget {
        didSet { precondition(retryBudget > 0, "a retry pass must be allowed an attempt") }
    }
    /// Where the next retry pass starts: a rule ID and a slot (port offset) in that rule. The
    /// rule need not exist any more; the pass then starts at the next ID.
    var retryCursor: (id: UInt32, slot: Int) = (0, 0)

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
