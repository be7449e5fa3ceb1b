// SPDX-License-Identifier: GPL-2.0-or-later

// Watch: `pestoctl watch`, pestod's signals as lines a person or a script can follow.
//
// Theory of operation
// -------------------
// pestoctl subscribes to every signal pestod sends and to pestod's departure from the bus,
// reads the tables once (so each line can name a rule by its pasta option, not only its ID),
// then prints one line per event until pestod leaves (exit 0) or pestoctl is killed. The
// rules' texts are kept up to date from InterfacesAdded, which carries a new rule's
// properties. Every line starts with the local time (as pestod's log lines do); with
// --json every line is one JSON object with a "time" and an "event" member instead:
//   watching        the subscription is in place (the first line)
//   rule-added      table, id, rule (pasta option and spec), owner
//   rule-removed    table, id, rule
//   rule-state      table, id, rule, active, bound, failed
//   bind-failures   table, id, rule, failed, last-error
//   lock            owner ("" once released)
//   upload-refused  socket, reason, rules (an upstream pesto client's upload pestod refused)

import PestoDBus
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// One thing `watch` reports: an event name, its members (already JSON values) and its text.
struct WatchEvent {
    var event: String
    var members: [(String, String)]
    var text: String

    /// The event as a line: `TIME TEXT`, or with `json` one JSON object.
    func line(json: Bool, time: String) -> String {
        if !json { return "\(time) \(text)" }
        let all = [("time", RuleText.json(time)), ("event", RuleText.json(event))] + members
        return "{" + all.map { "\(RuleText.json($0.0)): \($0.1)" }.joined(separator: ", ") + "}"
    }
}

/// Follows pestod's signals and turns them into `WatchEvent`s.
struct Watcher {
    /// The rules' texts (pasta option and spec) by table and ID.
    private(set) var ruleTexts: [TableKind: [UInt32: String]] = [:]

    /// Starts from the tables as listed.
    init(tables: [(TableKind, [ListedRule])]) {
        for (kind, rules) in tables {
            for r in rules { ruleTexts[kind, default: [:]][r.id] = RuleText.option(r.rule, kind) + " " + RuleText.spec(r.rule, kind) }
        }
    }

    /// The local time as pestod's log lines give it: `2026-12-08T01:02:03+0000`.
    static func now() -> String {
        var t = time(nil)
        var local = tm()
        guard localtime_r(&t, &local) != nil else { return "\(t)" }
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &local)
        return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The table an object path belongs to.
    private static func table(_ path: String?) -> TableKind? {
        TableKind.allCases.first { path == PestoBusNames.tablePath($0) || path?.hasPrefix(PestoBusNames.tablePath($0) + "/") == true }
    }

    /// The members and text naming rule `id` of `kind`.
    private func rule(_ kind: TableKind, _ id: UInt32) -> (members: [(String, String)], text: String) {
        let spec = ruleTexts[kind]?[id]
        return (
            [("table", RuleText.json(kind.name)), ("id", "\(id)"), ("rule", RuleText.json(spec ?? ""))],
            "\(kind.name) rule \(id)" + (spec.map { " (\($0))" } ?? "")
        )
    }

    /// The rule a rule object's interfaces-and-properties `a{sa{sv}}` describes.
    private static func rule(fromInterfaces value: DBusValue) -> Rule? {
        guard case .dictionary(_, _, let entries) = value,
            let properties = entries.first(where: { $0.key.stringValue == PestoInterfaces.rule.name })?.value.vardictValue
        else { return nil }
        let byProperty = Dictionary(properties, uniquingKeysWith: { a, _ in a })
        let fields = RuleField.allCases.compactMap { f in byProperty[f.property].map { (f.key, $0) } }
        return try? RuleText.decode(.vardict(fields))
    }

    /// The event a signal reports; nil for a signal `watch` does not show. `left` is set when
    /// pestod left the bus.
    mutating func event(_ m: DBusMessage, left: inout Bool) -> WatchEvent? {
        let args = m.arguments ?? []
        switch m.member {
        case "RuleStateChanged":
            guard let kind = Self.table(m.path), args.count == 4, let id = args[0].uint32Value, let active = args[1].boolValue,
                let bound = args[2].uint32Value, let failed = args[3].uint32Value
            else { return nil }
            let r = rule(kind, id)
            return WatchEvent(
                event: "rule-state",
                members: r.members + [("active", "\(active)"), ("bound", "\(bound)"), ("failed", "\(failed)")],
                text: "\(r.text): \(active ? "active" : "inactive"), \(bound) bound, \(failed) failed")
        case "BindFailuresChanged":
            guard let kind = Self.table(m.path), args.count == 3, let id = args[0].uint32Value, let failed = args[1].uint32Value,
                let error = args[2].stringValue
            else { return nil }
            let r = rule(kind, id)
            return WatchEvent(
                event: "bind-failures", members: r.members + [("failed", "\(failed)"), ("last-error", RuleText.json(error))],
                text: "\(r.text): \(ClientText.counted(failed, "bind failure"))" + (error.isEmpty ? "" : " (\(error))"))
        case "InterfacesAdded", "InterfacesRemoved":
            guard let path = args.first?.objectPathValue, path.contains("/rules/"), let kind = Self.table(path),
                let id = path.split(separator: "/").last.flatMap({ UInt32($0) })
            else { return nil }
            if m.member == "InterfacesAdded" {
                let added = args.count == 2 ? Self.rule(fromInterfaces: args[1]) : nil
                if let added { ruleTexts[kind, default: [:]][id] = RuleText.option(added, kind) + " " + RuleText.spec(added, kind) }
                let r = rule(kind, id)
                let owner = added?.owner ?? ""
                return WatchEvent(
                    event: "rule-added", members: r.members + [("owner", RuleText.json(owner))],
                    text: "\(kind.name) rule \(id) added" + (added == nil ? "" : ": \(ruleTexts[kind]?[id] ?? "")")
                        + (owner.isEmpty ? "" : ", owner \(owner)"))
            }
            let r = rule(kind, id)
            let spec = ruleTexts[kind]?.removeValue(forKey: id)
            return WatchEvent(
                event: "rule-removed", members: r.members, text: "\(kind.name) rule \(id) removed" + (spec.map { ": \($0)" } ?? ""))
        case "PropertiesChanged":
            guard m.path == PestoBusNames.managerPath, args.count >= 2,
                let owner = args[1].vardictValue?.first(where: { $0.0 == "LockOwner" })?.1.stringValue
            else { return nil }
            return WatchEvent(
                event: "lock", members: [("owner", RuleText.json(owner))], text: owner.isEmpty ? "unlocked" : "locked by \(owner)")
        case "UploadRefused":
            guard m.path == PestoBusNames.managerPath, args.count == 3, let socket = args[0].stringValue,
                let reason = args[1].stringValue, let items = args[2].arrayValue
            else { return nil }
            // Upstream's protocol has no TableKind per rule here: HOST's options name them.
            let specs = items.compactMap { try? RuleText.decode($0) }.map { RuleText.option($0, .host) + " " + RuleText.spec($0, .host) }
            return WatchEvent(
                event: "upload-refused",
                members: [
                    ("socket", RuleText.json(socket)), ("reason", RuleText.json(reason)),
                    ("rules", "[" + specs.map(RuleText.json).joined(separator: ", ") + "]"),
                ],
                text: "control socket \(socket): upload refused: \(reason)"
                    + (specs.isEmpty ? "" : " (\(ClientText.counted(specs.count, "rule")): \(specs.joined(separator: ", ")))"))
        case "NameOwnerChanged":
            guard args.count == 3, args[2].stringValue == "" else { return nil }
            left = true
            return nil
        default:
            return nil
        }
    }
}

extension PestoClient {
    /// Prints a line per rule added or removed, rule state change, bind failure change, lock
    /// change and refused upload, until the service leaves or pestoctl is killed. Prints
    /// "watching" first (once the subscription is in place).
    func watch(json: Bool) throws(Failure) {
        do {
            try connection.addMatch("type='signal',sender='\(PestoBusNames.busName)'")
            try connection.addMatch("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='\(PestoBusNames.busName)'")
        } catch {
            throw Failure(ExitCode.unreachable, "cannot subscribe to pestod's signals: \(error.message)")
        }
        var watcher = Watcher(tables: try list())  // fails with exit 3 when pestod is not there
        print(WatchEvent(event: "watching", members: [], text: "watching").line(json: json, time: Watcher.now()))
        fflush(nil)
        while true {
            guard let m = connection.nextMessage(timeoutMilliseconds: 60_000), m.isSignal else { continue }
            var left = false
            let event = watcher.event(m, left: &left)
            if left { return }
            guard let event else { continue }
            print(event.line(json: json, time: Watcher.now()))
            fflush(nil)
        }
    }
}
