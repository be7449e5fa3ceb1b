// SPDX-License-Identifier: GPL-2.0-or-later

// Client: pestoctl's D-Bus side: listing the tables and the proposals' client workflow.
//
// The update runs under the Manager lock, so no other client interleaves and a pestoctl
// that dies half-way (its bus name disappears) has its changes rolled back by pestod:
//   Lock → Insert new (inactive) → Deactivate removed → Activate new → check bind failures
//   → Delete removed → Commit → Unlock.
// A Conflict, an intolerable bind failure or any other error does Rollback + Unlock and
// exits 1. Bind failures are judged per spec: an explicit port spec must bind every socket;
// a best-effort spec (`all`, `auto` alone, exclusions only) needs one bound socket. This is
// stricter than upstream pesto, which never learns about bind failures; --best-effort gives
// pesto's behaviour (failures become warnings, pestod keeps retrying). A plan refused before
// any change (bad spec, -D of a missing rule) only releases the lock.
//
// Test hook: PESTOCTL_TEST_PAUSE_AFTER=STEP (insert, deactivate, activate, delete) prints
// "paused" after that step and waits for a line (or end of file) on stdin.

import PestoDBus
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Exit statuses.
enum ExitCode {
    static let success: Int32 = 0
    static let rejected: Int32 = 1
    static let usage: Int32 = 2
    static let unreachable: Int32 = 3
}

/// A failure that ends pestoctl with `status` after printing `message` on stderr.
struct Failure: Error {
    let status: Int32
    let message: String
    /// Refused while planning, before any change: nothing to roll back.
    let planned: Bool
    init(_ status: Int32, _ message: String, planned: Bool = false) {
        self.status = status
        self.message = message
        self.planned = planned
    }
}

/// Error names that mean the service is not there.
private let unreachableErrors: Set<String> = [
    "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoServer", "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected", "org.freedesktop.DBus.Error.FileNotFound",
    "org.freedesktop.DBus.Error.TimedOut", "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
]

/// A connection to pestod.
final class PestoClient {
    let connection: DBusConnection
    let bus: BusAddress
    /// -d: where the update's steps are reported (nil: not at all).
    var debugSink: ((String) -> Void)?
    static let tableInterface = "top.passt.Pesto1.Table"
    static let managerInterface = "top.passt.Pesto1.Manager"

    init(_ bus: BusAddress) throws(Failure) {
        self.bus = bus
        do {
            connection = try DBusConnection(bus)
        } catch {
            throw Failure(ExitCode.unreachable, "cannot reach pestod: \(error.message)")
        }
    }

    /// Calls a method; errors become `Failure` (unreachable: 3, anything else: 1).
    func call(_ path: String, _ interface: String, _ member: String, _ args: [DBusValue] = []) throws(Failure) -> [DBusValue] {
        do {
            // Interactive: on the system bus polkit may ask for the administrator password.
            return try connection.call(
                PestoBusNames.busName, path, interface, member, args, timeoutMilliseconds: 120_000, interactive: true)
        } catch {
            if unreachableErrors.contains(error.name) {
                throw Failure(ExitCode.unreachable, "cannot reach pestod (\(PestoBusNames.busName)) on the \(bus): \(error.message)")
            }
            throw Failure(ExitCode.rejected, error.message.isEmpty ? error.name : error.message)
        }
    }

    func table(_ kind: TableKind, _ member: String, _ args: [DBusValue] = []) throws(Failure) -> [DBusValue] {
        try call(PestoBusNames.tablePath(kind), Self.tableInterface, member, args)
    }

    /// The table's `OverlapPolicy` ("refuse" from a pestod that has no such property).
    func overlapPolicy(_ kind: TableKind) -> String {
        let reply = try? call(
            PestoBusNames.tablePath(kind), "org.freedesktop.DBus.Properties", "Get",
            [.string(Self.tableInterface), .string("OverlapPolicy")])
        return reply?.first?.variantValue?.stringValue ?? "refuse"
    }

    func manager(_ member: String) throws(Failure) {
        _ = try call(PestoBusNames.managerPath, Self.managerInterface, member)
    }

    /// The tables the service has (HOST, and SPLICE with a target namespace).
    func tableKinds() throws(Failure) -> [TableKind] {
        let reply = try call(
            PestoBusNames.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(Self.managerInterface), .string("Tables")])
        guard let paths = reply.first?.variantValue?.arrayValue?.compactMap(\.objectPathValue) else {
            throw Failure(ExitCode.rejected, "pestod returned a Tables property of the wrong type.")
        }
        return TableKind.allCases.filter { paths.contains(PestoBusNames.tablePath($0)) }
    }

    /// Every table's rules.
    func list() throws(Failure) -> [(TableKind, [ListedRule])] {
        var result: [(TableKind, [ListedRule])] = []
        for kind in try tableKinds() {
            do {
                result.append((kind, try RuleText.decodeList(try table(kind, "List"))))
            } catch let error as ProtocolError {
                throw Failure(ExitCode.rejected, "pestod's List reply is malformed: \(error.message)")
            } catch let error as Failure {
                throw error
            } catch {
                throw Failure(ExitCode.rejected, "\(error)")
            }
        }
        return result
    }

    // MARK: Update

    /// Takes the lock, reads the tables, plans `operations` against them and runs the
    /// workflow. Returns the plan (for its warnings) and a summary, nil when nothing changed.
    /// `ephemeral` is the host's ephemeral port range, which `all` and `auto` leave out.
    func update(
        _ operations: [Operation], firstID: UInt32?, bestEffort: Bool = false, ephemeral: ClosedRange<UInt16>
    ) throws(Failure) -> (plan: Plan, summary: String?) {
        try manager("Lock")
        var plan = Plan()
        do throws(Failure) {
            let tables = try list()
            do {
                plan = try Plan.make(
                    operations, tables: Dictionary(uniqueKeysWithValues: tables.map { ($0.0, $0.1) }), ephemeral: ephemeral)
            } catch {
                // Refused before anything was touched: nothing to roll back.
                try? manager("Unlock")
                throw Failure(error.status, error.message, planned: true)
            }
            for (kind, r) in plan.removes {
                debug("remove \(kind.name) rule \(r.id): \(RuleText.option(r.rule, kind)) \(RuleText.spec(r.rule, kind))")
            }
            for n in plan.inserts {
                debug("add \(n.table.name) rule: \(RuleText.option(n.rule, n.table)) \(RuleText.spec(n.rule)) (from \(n.specText))")
            }
            if !plan.isEmpty {
                try runLocked(&plan, tables: tables, firstID: firstID, bestEffort: bestEffort)
                try manager("Commit")
            }
        } catch {
            if error.planned { throw error }
            // Undo everything done under the lock (releasing the lock would too).
            try? manager("Rollback")
            try? manager("Unlock")
            throw Failure(error.status, error.message + " The update was rolled back; nothing changed.")
        }
        try? manager("Unlock")
        if plan.isEmpty { return (plan, nil) }
        return (
            plan,
            "\(ClientText.counted(plan.inserts.count, "rule")) added, "
                + "\(plan.removes.count) removed."
        )
    }

    /// Reports a step when -d was given.
    func debug(_ text: String) { debugSink?(text) }

    private func pauseIfAsked(after step: String) {
        guard let wanted = getenv("PESTOCTL_TEST_PAUSE_AFTER").map({ String(cString: $0) }), wanted == step else { return }
        print("paused")
        fflush(nil)
        _ = readLine()
    }

    private func runLocked(
        _ plan: inout Plan, tables current: [(TableKind, [ListedRule])], firstID: UInt32?, bestEffort: Bool
    ) throws(Failure) {
        // Insert, inactive.
        var used: [TableKind: Set<UInt32>] = [:]
        for (kind, rules) in current { used[kind] = Set(rules.map(\.id)) }
        var next: [TableKind: UInt32] = [:]
        for index in plan.inserts.indices {
            let kind = plan.inserts[index].table
            let id = try nextID(&next, kind: kind, used: used[kind] ?? [], firstID: firstID)
            used[kind, default: []].insert(id)
            plan.inserts[index].id = id
            let new = plan.inserts[index]
            debug("Insert \(kind.name) \(id)")
            do {
                _ = try table(kind, "Insert", [.uint32(id), RuleText.encode(new.rule)])
            } catch {
                throw Failure(
                    error.status,
                    "cannot add \(new.specText) (\(RuleText.option(new.rule, kind)) \(RuleText.spec(new.rule, kind))): \(error.message)")
            }
        }
        pauseIfAsked(after: "insert")

        // Deactivate removed rules before activating new ones: no spurious conflicts. Under
        // --overlap first-match an overlap is no conflict: removed rules keep their sockets until
        // the new ones are active, so a new rule on the same ports takes them over unclosed.
        let firstMatch = Set(Set(plan.removes.map(\.0)).filter { overlapPolicy($0) == "first-match" })
        for (kind, r) in plan.removes where r.active && !firstMatch.contains(kind) {
            _ = try table(kind, "Deactivate", [.uint32(r.id)])
        }
        pauseIfAsked(after: "deactivate")

        // Activate.
        var results: [Int: (bound: UInt32, failed: UInt32)] = [:]
        for (index, new) in plan.inserts.enumerated() {
            let reply: [DBusValue]
            do {
                reply = try table(new.table, "Activate", [.uint32(new.id)])
            } catch {
                throw Failure(
                    error.status,
                    "cannot activate \(new.specText) (\(RuleText.option(new.rule, new.table)) \(RuleText.spec(new.rule, new.table))): \(error.message)"
                )
            }
            guard reply.count == 2, let bound = reply[0].uint32Value, let failed = reply[1].uint32Value else {
                throw Failure(ExitCode.rejected, "pestod's Activate reply is malformed.")
            }
            results[index] = (bound, failed)
        }
        pauseIfAsked(after: "activate")

        // Bind failures, judged per spec.
        var specs: [Int: [Int]] = [:]
        for (index, new) in plan.inserts.enumerated() { specs[new.specIndex, default: []].append(index) }
        for specIndex in specs.keys.sorted() {
            let members = specs[specIndex]!
            let first = plan.inserts[members[0]]
            let bound = members.reduce(UInt32(0)) { $0 + results[$1]!.bound }
            let failed = members.reduce(UInt32(0)) { $0 + results[$1]!.failed }
            let tolerable = first.bestEffort ? bound > 0 || failed == 0 : failed == 0
            if !tolerable && bestEffort {
                // --best-effort: pesto's behaviour (pasta does not report bind failures), but say so.
                plan.warnings.append(
                    "\(first.specText): \(failed) socket\(failed == 1 ? "" : "s") could not be bound "
                        + "(kept with --best-effort; pestod retries them).")
            } else if !tolerable {
                var reasons: [String] = []
                for m in members where results[m]!.failed > 0 {
                    let new = plan.inserts[m]
                    let status = try? table(new.table, "Status", [.uint32(new.id)])
                    let error = (status?.count ?? 0) >= 4 ? status?[3].stringValue ?? "" : ""
                    reasons.append(
                        "\(RuleText.spec(new.rule, new.table)): \(results[m]!.failed) socket\(results[m]!.failed == 1 ? "" : "s") failed"
                            + (error.isEmpty ? "" : " (\(error))"))
                }
                throw Failure(
                    ExitCode.rejected,
                    "\(first.specText): "
                        + (first.bestEffort ? "no socket could be bound" : "not every socket could be bound")
                        + (reasons.isEmpty ? "" : ": " + reasons.joined(separator: "; ")) + ".")
            }
        }

        // Delete removed rules (under first match, deactivated only now).
        for (kind, r) in plan.removes {
            if r.active && firstMatch.contains(kind) { _ = try table(kind, "Deactivate", [.uint32(r.id)]) }
            _ = try table(kind, "Delete", [.uint32(r.id)])
        }
        pauseIfAsked(after: "delete")
    }

    /// The next free ID for `kind`: `firstID`, else the highest ID + 10, then in steps of 10,
    /// leaving gaps for hand-placed rules. Falls back to the lowest free ID near the top.
    private func nextID(_ next: inout [TableKind: UInt32], kind: TableKind, used: Set<UInt32>, firstID: UInt32?) throws(Failure) -> UInt32 {
        var candidate: UInt32
        if let n = next[kind] {
            candidate = n
        } else if let firstID {
            if used.contains(firstID) {
                throw Failure(ExitCode.rejected, "rule ID \(firstID) is already taken in the \(kind.name) table (--id).")
            }
            candidate = firstID
        } else {
            let top = used.max() ?? 0
            let (sum, overflow) = (top / 10 * 10).addingReportingOverflow(10)
            candidate = overflow ? 1 : sum
        }
        while used.contains(candidate) {
            let (sum, overflow) = candidate.addingReportingOverflow(1)
            if overflow { throw Failure(ExitCode.rejected, "the \(kind.name) table has no free rule ID.") }
            candidate = sum
        }
        let (after, overflow) = candidate.addingReportingOverflow(10)
        next[kind] = overflow ? 1 : after
        return candidate
    }

    // MARK: Watch

    /// Prints a line per rule state change, bind failure change, rule added or removed, and
    /// lock change, until the service leaves or pestoctl is killed. Prints "watching" first
    /// (once the subscription is in place).
    func watch() throws(Failure) {
        do {
            try connection.addMatch("type='signal',sender='\(PestoBusNames.busName)'")
            try connection.addMatch("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='\(PestoBusNames.busName)'")
        } catch {
            throw Failure(ExitCode.unreachable, "cannot subscribe to pestod's signals: \(error.message)")
        }
        _ = try tableKinds()  // fails with exit 3 when pestod is not there
        print("watching")
        fflush(nil)
        while true {
            guard let m = connection.nextMessage(timeoutMilliseconds: 60_000) else { continue }
            guard m.isSignal, let line = Self.describe(m) else { continue }
            if line.isEmpty { return }
            print(line)
            fflush(nil)
        }
    }

    /// One line for a signal; nil to skip it; "" when the service left the bus.
    static func describe(_ m: DBusMessage) -> String? {
        let args = m.arguments ?? []
        func tableName(_ path: String?) -> String {
            TableKind.allCases.first { path?.hasPrefix(PestoBusNames.tablePath($0)) == true }?.name ?? (path ?? "?")
        }
        switch m.member {
        case "RuleStateChanged":
            guard args.count == 4, let id = args[0].uint32Value, let active = args[1].boolValue,
                let bound = args[2].uint32Value, let failed = args[3].uint32Value
            else { return nil }
            return "\(tableName(m.path)) rule \(id): \(active ? "active" : "inactive"), \(bound) bound, \(failed) failed"
        case "BindFailuresChanged":
            guard args.count == 3, let id = args[0].uint32Value, let failed = args[1].uint32Value, let error = args[2].stringValue
            else { return nil }
            return "\(tableName(m.path)) rule \(id): \(failed) bind failures" + (error.isEmpty ? "" : " (\(error))")
        case "InterfacesAdded", "InterfacesRemoved":
            guard let path = args.first?.objectPathValue, path.contains("/rules/") else { return nil }
            let id = path.split(separator: "/").last.map(String.init) ?? "?"
            return "\(tableName(path)) rule \(id) " + (m.member == "InterfacesAdded" ? "added" : "removed")
        case "PropertiesChanged":
            guard m.path == PestoBusNames.managerPath, args.count >= 2,
                let owner = args[1].vardictValue?.first(where: { $0.0 == "LockOwner" })?.1.stringValue
            else { return nil }
            return owner.isEmpty ? "unlocked" : "locked by \(owner)"
        case "NameOwnerChanged":
            guard args.count == 3, args[2].stringValue == "" else { return nil }
            return ""
        default:
            return nil
        }
    }
}
