// SPDX-License-Identifier: GPL-2.0-or-later

// pestoctl: pesto's command-line client. See Options.swift for the command line and
// Client.swift for the update workflow; doc/pestoctl.1 for the manual.

import PestoDBus
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Prints to stderr.
func printError(_ text: String) {
    writeError("pestoctl: \(text)\n")
}

/// Writes to fd 2 (stdio's `stderr` is a global var Swift 6 will not touch).
func writeError(_ text: String) {
    fflush(nil)
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        // A stderr that cannot be written to (closed, full disk) leaves nothing to report to.
        guard case .success(let n) = bytes.withUnsafeBytes({ Sys.write(2, $0.baseAddress, $0.count, mayBeClosed: true) }), n > 0 else {
            return
        }
        bytes = bytes.dropFirst(n)
    }
}

/// Runs pestoctl; returns the exit status.
func runPestoctl(_ arguments: [String]) -> Int32 {
    let options: Options
    do {
        options = try Options.parse(arguments)
    } catch {
        printError(error.message)
        if error.status == ExitCode.usage { writeError("Try \"pestoctl --help\".\n") }
        return error.status
    }
    do throws(Failure) {
        switch options.command {
        case .help:
            print(Options.usage)
        case .version:
            // The product's one version (ProductVersion), beside the D-Bus contract's.
            if options.json {
                print(
                    "{\"version\": \(RuleText.json(ProductVersion.current)), \"interface\": \(RuleText.json(PestoBusNames.busName)), "
                        + "\"interface-version\": \(RuleText.json(PestoBusNames.version))}")
            } else {
                print(
                    "pestoctl \(ProductVersion.current) (pesto; D-Bus interface \(PestoBusNames.busName) version \(PestoBusNames.version); "
                        + "command line of upstream pesto)")
            }
        case .lockStatus:
            let client = try PestoClient(options.bus)
            let reply = try client.call(
                PestoBusNames.managerPath, "org.freedesktop.DBus.Properties", "Get",
                [.string(PestoClient.managerInterface), .string("LockOwner")])
            guard let owner = reply.first?.variantValue?.stringValue else {
                throw Failure(ExitCode.rejected, "pestod's LockOwner property is malformed.")
            }
            if options.json {
                print("{\"locked\": \(!owner.isEmpty), \"lock-owner\": \(RuleText.json(owner))}")
            } else {
                print(owner.isEmpty ? "unlocked" : "locked by \(owner)")
            }
        case .watch:
            let client = try PestoClient(options.bus)
            try client.watch(json: options.json)
        case .show:
            let client = try PestoClient(options.bus)
            show(try client.list(), json: options.json)
        case .status(let id, let kind):
            let client = try PestoClient(options.bus)
            let reply = try client.table(kind, "Status", [.uint32(id)])
            guard reply.count >= 4, let active = reply[0].boolValue, let bound = reply[1].uint32Value,
                let failed = reply[2].uint32Value, let lastError = reply[3].stringValue
            else { throw Failure(ExitCode.rejected, "pestod's Status reply is malformed.") }
            if options.json {
                print(
                    "{\"id\": \(id), \"table\": \(RuleText.json(kind.name)), \"active\": \(active), \"bound\": \(bound), "
                        + "\"failed\": \(failed), \"last-error\": \(RuleText.json(lastError))}")
            } else {
                // The rule's pasta option, and what its last error means (read after Status: a
                // rule deleted meanwhile is shown by its ID alone).
                let rule = (try? client.table(kind, "Read", [.uint32(id)]))?.first.flatMap { try? RuleText.decode($0) }
                print(
                    "\(kind.name) rule \(id)" + (rule.map { " (\(RuleText.option($0, kind)) \(RuleText.spec($0, kind)))" } ?? "")
                        + ": \(active ? "active" : "inactive"), \(bound) bound, \(failed) failed"
                        + (lastError.isEmpty ? "" : ", last error \(lastError)")
                        + (rule.map { PestoClient.bindErrorHint(lastError, $0) } ?? ""))
            }
        case .update(let operations):
            // Bad specs are refused (exit 1, as pesto) whether or not the service is reachable.
            // The host's ephemeral range is read once, for this check and for the plan.
            let ephemeral = EphemeralPortRange.current()
            for case .spec(let kind, let proto, let text, _) in operations {
                do {
                    _ = try PortSpec.parse(text, proto: proto, table: kind, ephemeralPorts: ephemeral)
                } catch {
                    printError("\(RuleText.option(Rule(proto: proto, firstPort: 1), kind)): \(error.description)\(pathHint(text))")
                    return ExitCode.rejected
                }
            }
            let client = try PestoClient(options.bus)
            if options.debug { client.debugSink = { printError("debug: \($0)") } }
            let before = options.showTables ? try client.list() : []
            if options.showTables && !options.json {
                print("Previous configuration")
                show(before, json: false)
            }
            let (plan, summary) = try client.update(
                operations, firstID: options.firstID, owner: options.owner, bestEffort: options.bestEffort, ephemeral: ephemeral)
            let after = options.showTables ? try client.list() : []
            if options.json {
                print(updateJSON(plan, before: options.showTables ? before : nil, after: options.showTables ? after : nil))
            } else {
                if !options.quiet {
                    for w in plan.warnings { printError("warning: \(w)") }
                    print(summary ?? "Nothing to change.")
                }
                if options.showTables {
                    print("Updated configuration")
                    show(after, json: false)
                }
            }
        }
    } catch {
        printError(error.message)
        return error.status
    }
    return ExitCode.success
}

/// An update's outcome as one JSON object: the rules added (with their IDs) and removed, the
/// warnings, and with -s the tables before and after.
func updateJSON(_ plan: Plan, before: [(TableKind, [ListedRule])]?, after: [(TableKind, [ListedRule])]?) -> String {
    func rule(_ kind: TableKind, _ id: UInt32, _ rule: Rule) -> String {
        "{\"table\": \(RuleText.json(kind.name)), \"id\": \(id), \"rule\": \(RuleText.json(RuleText.option(rule, kind) + " " + RuleText.spec(rule, kind)))}"
    }
    var members = [
        "\"added\": [" + plan.inserts.map { rule($0.table, $0.id, $0.rule) }.joined(separator: ", ") + "]",
        "\"removed\": [" + plan.removes.map { rule($0.table, $0.rule.id, $0.rule.rule) }.joined(separator: ", ") + "]",
        "\"warnings\": [" + plan.warnings.map(RuleText.json).joined(separator: ", ") + "]",
    ]
    if let before { members.append("\"before\": " + tablesJSON(before)) }
    if let after { members.append("\"after\": " + tablesJSON(after)) }
    return "{" + members.joined(separator: ", ") + "}"
}

/// The tables as a JSON object: `{"tables": [{"name": …, "rules": […]}, …]}`.
func tablesJSON(_ tables: [(TableKind, [ListedRule])]) -> String {
    let parts = tables.map { kind, rules in
        "{\"name\": \(RuleText.json(kind.name)), \"rules\": [" + rules.map { RuleText.json($0, kind) }.joined(separator: ", ") + "]}"
    }
    return "{\"tables\": [" + parts.joined(separator: ", ") + "]}"
}

/// A hint for a spec that is an existing file, such as upstream pesto's control socket put
/// after -t: where PATH goes, and that pestoctl does not need it.
func pathHint(_ spec: String) -> String {
    guard spec.hasPrefix("/"), case .success = Sys.stat(spec) else { return "" }
    return " \(ClientText.quote(spec)) is a file, not a port spec: upstream pesto's control socket PATH goes after the options"
        + " (pestoctl accepts it there and does not need it)."
}

/// The tables, like upstream pesto shows them: a header per table, a line per rule.
func show(_ tables: [(TableKind, [ListedRule])], json: Bool) {
    if json {
        print(tablesJSON(tables))
        return
    }
    for (n, (kind, rules)) in tables.enumerated() {
        if n > 0 { print("") }
        let direction = kind == .host ? "inbound: listen on the host" : "outbound: listen in the target namespace"
        print("\(kind.name) (\(direction)), \(ClientText.counted(rules.count, "rule"))")
        if rules.isEmpty {
            print("    (no rules)")
        } else {
            print("    ID  RULE".rightPadded(40) + " STATE")
            for r in rules { print(RuleText.line(r, kind)) }
        }
    }
}

exit(runPestoctl(Array(CommandLine.arguments.dropFirst())))
