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
    /// The D-Bus error's name when pestod refused a call (`top.passt.Pesto1.Error.Conflict`).
    let errorName: String?
    init(_ status: Int32, _ message: String, planned: Bool = false, errorName: String? = nil) {
        self.status = status
        self.message = message
        self.planned = planned
        self.errorName = errorName
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
            throw Failure(ExitCode.unreachable, Self.unreachable(bus, connecting: true, error.message))
        }
    }

    /// Why pestod cannot be reached on `bus` and what to try next: the bus pestoctl chose
    /// (and why), the cause in libdbus's words, and the other bus.
    static func unreachable(_ bus: BusAddress, connecting: Bool, _ cause: String) -> String {
        func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
        let sessionAddress = env("DBUS_SESSION_BUS_ADDRESS")
        switch bus {
        case .session:
            // Without DBUS_SESSION_BUS_ADDRESS libdbus tries X11 autolaunch, whose "$DISPLAY"
            // message says nothing about pesto: the cause is the missing session bus.
            let why =
                connecting
                ? (sessionAddress == nil
                    ? "there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
                    : "the session bus at \(sessionAddress!) cannot be reached (\(cause))")
                : "pestod (\(PestoBusNames.busName)) is not on the session bus (\(cause))"
            return "cannot reach pestod: \(why). pestoctl uses the session bus "
                + (getuid() == 0 ? "because --session was given" : "when not run as root")
                + "; pestod usually runs on the system bus: try \"pestoctl --system\""
                + (env("DBUS_SYSTEM_BUS_ADDRESS").map { " (DBUS_SYSTEM_BUS_ADDRESS is \($0))" } ?? "") + "."
        case .system:
            let why =
                connecting
                ? "the system bus cannot be reached (\(cause))" : "pestod (\(PestoBusNames.busName)) is not on the system bus (\(cause))"
            return "cannot reach pestod: \(why). Is it running (systemctl status pestod)? "
                + "A per-user pestod (pestod --session) is reached with \"pestoctl --session\"."
        case .address(let address):
            return "cannot reach pestod on the bus at \(address): \(cause). Check the address given with --address."
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
                throw Failure(ExitCode.unreachable, Self.unreachable(bus, connecting: false, error.message))
            }
            throw Failure(ExitCode.rejected, error.message.isEmpty ? error.name : error.message, errorName: error.name)
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
        _ operations: [Operation], firstID: UInt32?, owner: String = Options.defaultOwner, bestEffort: Bool = false,
        ephemeral: ClosedRange<UInt16>
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
                try runLocked(&plan, tables: tables, firstID: firstID, owner: owner, bestEffort: bestEffort)
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
        _ plan: inout Plan, tables current: [(TableKind, [ListedRule])], firstID: UInt32?, owner: String, bestEffort: Bool
    ) throws(Failure) {
        // Insert, inactive, under IDs chosen by the rule every client follows (RuleIDProposer).
        var proposers: [TableKind: RuleIDProposer] = [:]
        for (kind, rules) in current {
            let used = Set(rules.map(\.id))
            if let firstID, plan.inserts.contains(where: { $0.table == kind }), used.contains(firstID) {
                throw Failure(
                    ExitCode.rejected,
                    "--id \(firstID): the \(kind.name) table already has a rule \(firstID); choose a free ID, or leave out --id for the next free one."
                )
            }
            proposers[kind] =
                firstID.map { RuleIDProposer(startingAt: $0) { used.contains($0) } }
                ?? RuleIDProposer(highestID: rules.map(\.id).max()) { used.contains($0) }
        }
        for index in plan.inserts.indices {
            let kind = plan.inserts[index].table
            guard let id = proposers[kind]?.next() else {
                throw Failure(ExitCode.rejected, "the \(kind.name) table has no free rule ID left; delete rules first.")
            }
            plan.inserts[index].id = id
            plan.inserts[index].rule.owner = owner
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
                throw Failure(error.status, activationFailure(new, error, plan: plan, tables: current))
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
                            + (error.isEmpty ? "" : " (\(error)\(Self.bindErrorHint(error, new.rule)))"))
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

    /// What a bind error means for a rule, when the errno name alone does not say it.
    static func bindErrorHint(_ error: String, _ rule: Rule) -> String {
        switch error {
        case "EACCES" where rule.firstPort < 1024:
            return ": ports below 1024 are privileged; pestod must run as root or with CAP_NET_BIND_SERVICE, "
                + "or net.ipv4.ip_unprivileged_port_start must be lowered"
        case "EADDRINUSE":
            return ": another socket listens there (ss -ltnup shows which process)"
        case "EADDRNOTAVAIL":
            return ": no interface has this address"
        default:
            return ""
        }
    }

    /// Why a new rule could not be activated, in the user's terms: a Conflict names the
    /// rule it overlaps by its ID and its pasta option (pestod's message names the internal ID
    /// pestoctl gave the new rule), and says what to do.
    private func activationFailure(_ new: NewRule, _ error: Failure, plan: Plan, tables: [(TableKind, [ListedRule])]) -> String {
        let what = "\(new.specText) (\(RuleText.option(new.rule, new.table)) \(RuleText.spec(new.rule, new.table)))"
        guard error.errorName == PestoBusNames.errorName(.conflict) else { return "cannot activate \(what): \(error.message)" }
        let removed = Set(plan.removes.filter { $0.table == new.table }.map(\.rule.id))
        let existing = tables.first { $0.0 == new.table }?.1 ?? []
        if let other = existing.first(where: { $0.active && !removed.contains($0.id) && $0.rule.conflicts(with: new.rule) }) {
            let text = "\(RuleText.option(other.rule, new.table)) \(RuleText.spec(other.rule, new.table))"
            return "\(what) overlaps the \(new.table.name) table's active rule \(other.id), \(text) "
                + "(same protocol, shared ports and addresses). Delete that rule first (pestoctl -D \(text)) or choose other ports."
        }
        if let other = plan.inserts.first(where: { $0.id != new.id && $0.table == new.table && $0.rule.conflicts(with: new.rule) }) {
            return "\(what) overlaps \(other.specText), given earlier on this command line; give ports that do not overlap."
        }
        return "cannot activate \(what): \(error.message)"
    }
}
