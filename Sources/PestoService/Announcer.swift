// SPDX-License-Identifier: GPL-2.0-or-later

// Announcer: the editor's reports of final changes turned into D-Bus signals, and the state
// last announced, so that each signal carries only what changed.
//
// Theory of operation
// -------------------
// The TablesEditor reports every change once it is final (TablesEditor.swift, "Reporting");
// the announcer is its observer and sends on the bus port (BusPort.swift):
//
//   rule added          InterfacesAdded (inactive, as inserted)
//   rule removed        InterfacesRemoved
//   rule state changed  RuleStateChanged, BindFailuresChanged when the failures changed, and
//                       the rule's PropertiesChanged with only the properties that differ
//                       from what was last announced (`announcedRuleStatus`, `announcedPortsWon`)
//   ports won changed   the rule's PropertiesChanged of PortsWon (first match)
//   lock owner changed  the Manager's PropertiesChanged of LockOwner
//
// Table counters (RuleCount, ActiveCount, SocketCount) are not announced per change: a
// change marks its table's counters stale, and `announceStaleCounters` compares them with
// what was last announced and emits only real changes, once, before the next reply goes out
// (the server calls it before every reply, so a caller sees them before its reply) or at the
// end of the loop turn, whichever comes first — but never while a change is in progress (a
// large change announces its counters once, before its reply). A 65,535-rule Apply thus emits
// one counters' PropertiesChanged, not 131,070. The retries of a loop turn that changed a
// rule's counts are logged once at its end (`logRetries`).

import Logging
import PestoDBus
import PestoEngine
import PestoModel

/// Turns the editor's reports into signals on the bus port, and remembers what it announced.
final class Announcer: TablesObserver {
    let engine: ForwardingEngine
    let port: any BusPort
    let logger: Logger
    /// Whether a change is being carried out (its counters wait for its reply).
    let changeInProgress: () -> Bool

    /// Table counters as last announced with PropertiesChanged.
    private var announcedCounters: [TableKind: TableCounters] = [:]
    /// Each rule's state as last announced (InterfacesAdded or PropertiesChanged), so that a
    /// rule's PropertiesChanged carries only the properties that changed. A rule missing here
    /// (restored at start, before any watcher) gets all four.
    private var announcedRuleStatus: [RuleRef: RuleStatus] = [:]
    /// Each rule's `PortsWon` as last announced, likewise.
    private var announcedPortsWon: [RuleRef: UInt32] = [:]
    /// Tables whose counters may have changed since last announced (`announceStaleCounters`).
    private var staleCounters: [TableKind] = []
    /// The retries of this loop turn that changed a rule's counts, logged at its end.
    private var retriesToLog = RetryLogSummary()

    /// The counters of a table that emit PropertiesChanged.
    struct TableCounters: Equatable {
        var ruleCount: UInt32
        var activeCount: UInt32
        var socketCount: UInt32

        init(_ t: ForwardingTable) {
            ruleCount = UInt32(t.ruleCount)
            activeCount = UInt32(t.activeCount)
            socketCount = UInt32(t.openSockets)
        }
    }

    /// An announcer for the tables of `engine`, sending on `port`; the counters as they are
    /// now count as announced (they are what a client reads first).
    init(engine: ForwardingEngine, port: any BusPort, logger: Logger, changeInProgress: @escaping () -> Bool) {
        self.engine = engine
        self.port = port
        self.logger = logger
        self.changeInProgress = changeInProgress
        for table in engine.tables { announcedCounters[table.kind] = TableCounters(table) }
    }

    // MARK: The editor's reports (TablesObserver): the signals of final changes

    /// InterfacesAdded for a new rule, as it was inserted (inactive).
    func ruleAdded(_ kind: TableKind, _ id: UInt32, _ rule: Rule) {
        emit(
            .signal(
                path: PestoBusNames.managerPath, interface: PestoInterfaces.objectManager.name, member: "InterfacesAdded",
                arguments: [
                    .objectPath(PestoBusNames.rulePath(kind, id)), ObjectTree.ruleInterfacesAndProperties(kind, id, rule, .inactive),
                ]))
        announcedRuleStatus[RuleRef(kind: kind, id: id)] = .inactive
        announcedPortsWon[RuleRef(kind: kind, id: id)] = 0
        announceCounters(kind)
    }

    /// InterfacesRemoved for a deleted rule.
    func ruleRemoved(_ kind: TableKind, _ id: UInt32) {
        emit(
            .signal(
                path: PestoBusNames.managerPath, interface: PestoInterfaces.objectManager.name, member: "InterfacesRemoved",
                arguments: [.objectPath(PestoBusNames.rulePath(kind, id)), .strings(ObjectTree.ruleInterfaceNames)]))
        announcedRuleStatus[RuleRef(kind: kind, id: id)] = nil
        announcedPortsWon[RuleRef(kind: kind, id: id)] = nil
        announceCounters(kind)
    }

    /// PropertiesChanged of the Manager's LockOwner.
    func lockOwnerChanged(_ owner: String?) {
        emitPropertiesChanged(PestoBusNames.managerPath, PestoInterfaces.manager, [("LockOwner", .string(owner ?? ""))])
    }

    /// A rule's state changed (activate, deactivate, retry, scan, a rollback's net effect):
    /// RuleStateChanged, BindFailuresChanged when the failures changed, the rule's
    /// PropertiesChanged; the table's counters are marked stale.
    func ruleStateChanged(_ kind: TableKind, _ id: UInt32, _ s: RuleStatus, failuresChanged: Bool, retried: Bool) {
        let tablePath = PestoBusNames.tablePath(kind)
        emit(
            .signal(
                path: tablePath, interface: PestoInterfaces.table.name, member: "RuleStateChanged",
                arguments: [.uint32(id), .bool(s.active), .uint32(s.bound), .uint32(s.failed)]))
        if failuresChanged {
            emit(
                .signal(
                    path: tablePath, interface: PestoInterfaces.table.name, member: "BindFailuresChanged",
                    arguments: [.uint32(id), .uint32(s.failed), .string(s.lastErrorName)]))
        }
        let ref = RuleRef(kind: kind, id: id)
        let before = announcedRuleStatus.updateValue(s, forKey: ref)
        var changed: [(String, DBusValue)] = []
        if before?.active != s.active { changed.append(("Active", .bool(s.active))) }
        if before?.bound != s.bound { changed.append(("BoundSockets", .uint32(s.bound))) }
        if before?.failed != s.failed { changed.append(("BindFailures", .uint32(s.failed))) }
        if before?.lastErrorName != s.lastErrorName { changed.append(("LastError", .string(s.lastErrorName))) }
        if let won = portsWonToAnnounce(kind, id) { changed.append(("PortsWon", .uint32(won))) }
        if !changed.isEmpty { emitPropertiesChanged(PestoBusNames.rulePath(kind, id), PestoInterfaces.rule, changed) }
        announceCounters(kind)
        if retried {
            // One info line per loop turn (`logRetries`), not one per rule of a large retry pass.
            logger.debug("\(kind.name) rule \(id): retry now \(s.bound) bound, \(s.failed) failed")
            retriesToLog.add(kind, id, s)
        }
    }

    /// First match: another rule's change changed how many ports rule `id` wins.
    func portsWonChanged(_ kind: TableKind, _ id: UInt32) {
        guard let won = portsWonToAnnounce(kind, id) else { return }
        emitPropertiesChanged(PestoBusNames.rulePath(kind, id), PestoInterfaces.rule, [("PortsWon", .uint32(won))])
    }

    /// Rule `id`'s `PortsWon` now, if it differs from what was last announced (which it then
    /// becomes); nil when it does not, or the rule is gone.
    private func portsWonToAnnounce(_ kind: TableKind, _ id: UInt32) -> UInt32? {
        guard let t = engine.table(kind), let won = try? t.portsWon(id) else { return nil }
        let before = announcedPortsWon.updateValue(won, forKey: RuleRef(kind: kind, id: id))
        return before == won ? nil : won
    }

    // MARK: Signals

    func emit(_ message: DBusMessage) { port.send(message) }

    /// Emits PropertiesChanged for `changed` (in the contract's order) on the object at `path`.
    func emitPropertiesChanged(_ path: String, _ interface: DBusInterfaceSpec, _ changed: [(String, DBusValue)]) {
        emit(
            .signal(
                path: path, interface: PestoInterfaces.properties.name, member: "PropertiesChanged",
                arguments: [.string(interface.name), .vardict(changed), .strings([])]))
    }

    /// Marks the counters of a table as possibly changed; `announceStaleCounters` announces
    /// them before the next reply or at the end of the loop turn. Called on every change.
    func announceCounters(_ kind: TableKind) {
        if !staleCounters.contains(kind) { staleCounters.append(kind) }
    }

    /// Announces the counters of every table marked stale that changed since last announced:
    /// one PropertiesChanged per table with only the counters that differ, carrying their
    /// latest values.
    func announceStaleCounters() {
        // A change in progress announces its counters before its reply, once it is done.
        guard !staleCounters.isEmpty, !changeInProgress() else { return }
        for kind in staleCounters { announceChangedCounters(kind) }
        staleCounters.removeAll(keepingCapacity: true)
    }

    /// Announces the counters of one table that changed since last time.
    private func announceChangedCounters(_ kind: TableKind) {
        guard let t = engine.table(kind) else { return }
        let now = TableCounters(t)
        let before = announcedCounters[kind]
        guard now != before else { return }
        announcedCounters[kind] = now
        var changed: [(String, DBusValue)] = []
        if now.ruleCount != before?.ruleCount { changed.append(("RuleCount", .uint32(now.ruleCount))) }
        if now.activeCount != before?.activeCount { changed.append(("ActiveCount", .uint32(now.activeCount))) }
        if now.socketCount != before?.socketCount { changed.append(("SocketCount", .uint32(now.socketCount))) }
        emitPropertiesChanged(PestoBusNames.tablePath(kind), PestoInterfaces.table, changed)
    }

    /// Logs the rules whose counts a retry changed during this loop turn: the rule itself if
    /// there was one, else one summary line.
    func logRetries() {
        guard let line = retriesToLog.take() else { return }
        logger.info("\(line)")
    }
}
