// SPDX-License-Identifier: GPL-2.0-or-later

// Options: pestoctl's command line, parsed by hand in argv order.
//
// pasta's -t/-u/-T/-U options are order-sensitive once -A (add), -D (delete) and -C TABLE
// (clear) are mixed in: `-A -t 2000 -C HOST -t 2001` must clear after the first add and
// before the second. ArgumentParser collects options into properties and loses that order,
// so the whole command line is read here, left to right, into a list of `Operation`s.
//
// The command line is upstream pesto's (pesto(1): -A -D -C -t -u -T -U, their long forms with
// a separate or "=" value, -s/--show, -d/--debug, -h/--help, --version, short flags bundled as
// getopt(3) allows, and the control socket PATH operand, accepted and ignored: the tables are
// reached over D-Bus), plus pestoctl's own options and the commands "status" and "watch".
// doc/pesto-conformance.md lists every option with pestoctl's behaviour.
//
// Usage:
//   pestoctl [BUS] [--json] [PATH]                     show the tables
//   pestoctl [BUS] [OPTIONS] [-A|-D|-C TABLE] [-t|-u|-T|-U SPEC]... [PATH]   update
//   pestoctl [BUS] [--json] status [ID [--table HOST|SPLICE]]
//   pestoctl [BUS] [--json] watch                      print changes as they happen
// BUS is --system (default when root), --session (default otherwise) or --address ADDRESS.

import PestoDBus
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A bad command line: exit status 2 for pestoctl's own syntax, 1 for what upstream pesto
/// refuses with 1 too (a bad port spec, an unknown table).
struct UsageError: Error {
    let message: String
    let status: Int32
    init(_ message: String, status: Int32 = 2) {
        self.message = message
        self.status = status
    }
}

/// How the following -t/-u/-T/-U specs are applied.
enum SpecMode: Equatable {
    /// No -A or -D yet: the first spec for a table replaces that whole table (every protocol),
    /// as upstream pesto does; later ones add.
    case replace
    /// -A: add.
    case add
    /// -D: delete exactly matching rules; a rule that does not exist fails the update.
    case delete
}

/// One step of an update, in command-line order.
enum Operation: Equatable {
    /// A -t/-u/-T/-U spec, applied in `mode`.
    case spec(table: TableKind, proto: TransportProtocol, text: String, mode: SpecMode)
    /// -C TABLE.
    case clear(TableKind)
}

/// What pestoctl was asked to do.
enum Command: Equatable {
    /// Show both tables.
    case show
    /// Update the tables.
    case update([Operation])
    /// Show one rule's status.
    case status(id: UInt32, table: TableKind)
    /// Show who holds the lock.
    case lockStatus
    /// Print table changes as they happen, until killed.
    case watch
    /// Print the usage text.
    case help
    /// Print the version.
    case version
}

/// The parsed command line.
struct Options {
    var bus: BusAddress = getuid() == 0 ? .system : .session
    /// -q: script mode. Success prints nothing; warnings are not printed; errors still go to
    /// stderr, and the exit status tells the outcome.
    var quiet = false
    /// -s: show the tables before and after the update (upstream pesto's --show).
    var showTables = false
    /// -d: print what the update does, step by step, on stderr.
    var debug = false
    /// --best-effort: bind failures do not fail the update (upstream pesto's behaviour).
    var bestEffort = false
    /// --json: the table listing (and `status`) as JSON.
    var json = false
    /// --id N: the first ID for new rules.
    var firstID: UInt32?
    /// --owner TAG: the owner tag of the rules the update adds.
    var owner = Options.defaultOwner
    /// The owner tag of pestoctl's rules unless --owner says otherwise.
    static let defaultOwner = "pestoctl"
    /// The PATH operand (upstream pesto's control socket), accepted and not used.
    var socketPath: String?
    var command: Command = .show

    static let usage = """
        Usage: pestoctl [OPTION]... [PATH]
               pestoctl [BUS] [--json] status [ID [--table HOST|SPLICE]]
               pestoctl [BUS] [--json] watch

        Without update options, shows the HOST and SPLICE forwarding tables. The options are
        upstream pesto's; PATH (pesto's control socket) is accepted and not used: pestoctl
        reaches pestod over D-Bus.
          -t, --tcp-ports SPEC   HOST table (inbound), TCP
          -u, --udp-ports SPEC   HOST table (inbound), UDP
          -T, --tcp-ns SPEC      SPLICE table (outbound, listening on the namespace's lo), TCP
          -U, --udp-ns SPEC      SPLICE table (outbound), UDP
            SPEC: none | [ADDR[%IFACE]/]PORTS, PORTS a comma-separated list of
            FIRST[-LAST][:[TADDR/]TOFIRST[-TOLAST]], ~FIRST[-LAST] (exclude), all, auto
          -A, --add              following specs add rules
          -D, --delete           following specs delete exactly matching rules; a rule that
                                 does not exist fails the update (exit 1, nothing changes)
          -C, --clear TABLE      remove every rule of TABLE (HOST or SPLICE)
        Without -A/-D, the first spec for a table replaces that whole table (TCP and UDP)
        and later ones add, as with pesto. Options apply in order, as one transaction.
          -s, --show             show the tables before and after the update
          -d, --debug            print the update's steps on stderr
          -h, --help             display this help and exit
              --version          show the version and exit
        pestoctl's own options:
              --best-effort      bind failures do not fail the update (pesto's behaviour);
                                 by default every socket of an explicit port must bind, else
                                 the update is rolled back and pestoctl exits 1
              --id N             first ID for new rules (default: the table's highest ID
                                 rounded down to a multiple of 10, plus 10; then steps of 10)
              --owner TAG        owner tag of the rules added (default: pestoctl)
          -q, --quiet            print nothing on success and no warnings (also --silent)
              --json             print JSON: the tables, status, an update's outcome, and
                                 with watch one object a line
              --system, --session, --address ADDRESS
                                 the bus (default: system as root, else session)
        Commands:
          status ID [--table T]  one rule's state;  status: who holds the lock
          watch                  print table, lock and refused-upload events as they happen,
                                 each line with its time
        Examples:
          pestoctl                                   show the tables
          pestoctl -t 8080 -u 53                     HOST table: TCP 8080 and UDP 53, nothing else
          pestoctl -A -t 127.0.0.1/8080:80           add: host 127.0.0.1:8080 to target port 80
          pestoctl -A -t 0.0.0.0/8080:10.88.0.2/80   add: to a container's address
          pestoctl -D -t 127.0.0.1/8080:80           delete that rule
          pestoctl -A -T 5432                        namespace's lo:5432 to the host's 5432
          pestoctl -t 1000-2000,~1500 -C SPLICE      ports 1000-1499 and 1501-2000; empty SPLICE
          pestoctl -t auto                           follow the ports bound in the namespace
        Exit status: 0 success; 1 update refused or rolled back (bad spec, missing rule,
        conflict, bind failure, lock held); 2 usage error; 3 cannot reach the service.
        """

    /// Options that take no value, by short letter; they may be bundled (`-As`).
    private static let flags: Set<Character> = ["A", "D", "s", "d", "h", "q"]
    /// Options that take a value, by short letter (`-tSPEC` or `-t SPEC`).
    private static let valued: Set<Character> = ["C", "t", "u", "T", "U"]
    /// Long options and their short letter (nil: long only).
    private static let longNames: [String: Character] = [
        "--add": "A", "--delete": "D", "--show": "s", "--debug": "d", "--help": "h", "--quiet": "q", "--silent": "q",
        "--clear": "C", "--tcp-ports": "t", "--udp-ports": "u", "--tcp-ns": "T", "--udp-ns": "U",
    ]

    /// Parses `arguments` (without the program name).
    static func parse(_ arguments: [String]) throws(UsageError) -> Options {
        var options = Options()
        var operations: [Operation] = []
        var mode = SpecMode.replace
        var words: [String] = []
        var statusTable: TableKind?
        var ownerGiven = false
        var index = 0
        var optionsEnded = false

        func value(for option: String, attached: String?) throws(UsageError) -> String {
            if let attached { return attached }
            index += 1
            guard index < arguments.count else { throw UsageError("option \(option) needs a value.") }
            return arguments[index]
        }

        /// Applies one option given by its short letter.
        func apply(_ letter: Character, _ option: String, attached: String?) throws(UsageError) {
            switch letter {
            case "h": options.command = .help
            case "A": mode = .add
            case "D": mode = .delete
            case "s": options.showTables = true
            case "d": options.debug = true
            case "q": options.quiet = true
            case "C":
                operations.append(.clear(try parseTable(try value(for: option, attached: attached))))
            default:
                let table: TableKind = letter == "t" || letter == "u" ? .host : .splice
                let proto: TransportProtocol = letter == "t" || letter == "T" ? .tcp : .udp
                operations.append(.spec(table: table, proto: proto, text: try value(for: option, attached: attached), mode: mode))
            }
        }

        while index < arguments.count {
            let argument = arguments[index]
            if optionsEnded || argument == "-" || !argument.hasPrefix("-") {
                words.append(argument)
            } else if argument == "--" {
                optionsEnded = true
            } else if argument.hasPrefix("--") {
                // "--long" or "--long=value".
                var name = argument
                var attached: String?
                if let eq = argument.firstIndex(of: "=") {
                    name = String(argument[..<eq])
                    attached = String(argument[argument.index(after: eq)...])
                }
                if let letter = longNames[name] {
                    if flags.contains(letter), attached != nil { throw UsageError("option \(name) takes no value.") }
                    try apply(letter, name, attached: attached)
                } else {
                    switch name {
                    case "--version": options.command = .version
                    case "--best-effort": options.bestEffort = true
                    case "--system": options.bus = .system
                    case "--session": options.bus = .session
                    case "--address": options.bus = .address(try value(for: name, attached: attached))
                    case "--json": options.json = true
                    case "--id":
                        let text = try value(for: name, attached: attached)
                        guard let id = UInt32(text), id > 0 else { throw UsageError("--id needs a rule ID 1-4294967295, not \"\(text)\".") }
                        options.firstID = id
                    case "--owner":
                        let text = try value(for: name, attached: attached)
                        guard text.utf8.count <= Rule.maxOwnerLength else {
                            throw UsageError(
                                "--owner \(ClientText.quote(text)) is \(text.utf8.count) bytes long; at most \(Rule.maxOwnerLength) are allowed."
                            )
                        }
                        options.owner = text
                        ownerGiven = true
                    case "--table":
                        statusTable = try parseTable(try value(for: name, attached: attached))
                    default:
                        throw UsageError("unknown option \"\(argument)\".")
                    }
                    if ["--version", "--best-effort", "--system", "--session", "--json"].contains(name), attached != nil {
                        throw UsageError("option \(name) takes no value.")
                    }
                }
            } else {
                // A bundle of short options: flags, then at most one valued option taking the rest.
                var rest = Substring(argument.dropFirst())
                while let letter = rest.first {
                    rest = rest.dropFirst()
                    if flags.contains(letter) {
                        try apply(letter, "-\(letter)", attached: nil)
                    } else if valued.contains(letter) {
                        try apply(letter, "-\(letter)", attached: rest.isEmpty ? nil : String(rest))
                        break
                    } else {
                        throw UsageError("unknown option \"-\(letter)\".")
                    }
                }
            }
            index += 1
        }
        if options.command == .help || options.command == .version { return options }

        // The words: a command ("status [ID]", "watch"), else pesto's PATH operand.
        if words.first == "status" {
            guard operations.isEmpty else { throw UsageError("\"status\" cannot be combined with update options.") }
            switch words.count {
            case 1:
                if statusTable != nil { throw UsageError("--table needs a rule ID: \"status ID --table TABLE\".") }
                options.command = .lockStatus
            case 2:
                guard let id = UInt32(words[1]) else { throw UsageError("\"\(words[1])\" is not a rule ID (0-4294967295).") }
                options.command = .status(id: id, table: statusTable ?? .host)
            default:
                throw UsageError("\"status\" takes at most one rule ID.")
            }
        } else if words.first == "watch" {
            guard operations.isEmpty, words.count == 1 else { throw UsageError("\"watch\" takes no update options or arguments.") }
            options.command = .watch
        } else {
            if statusTable != nil { throw UsageError("--table is only for \"status\".") }
            guard words.count <= 1 else {
                throw UsageError("unexpected argument \"\(words[1])\"; give at most one PATH (upstream pesto's control socket, not used).")
            }
            options.socketPath = words.first
            if !operations.isEmpty {
                options.command = .update(operations)
            } else if mode != .replace {
                throw UsageError("-A and -D need at least one -t, -u, -T or -U spec after them.")
            }
        }
        if options.firstID != nil, case .update = options.command {
        } else if options.firstID != nil {
            throw UsageError("--id is only for updates.")
        }
        if ownerGiven, case .update = options.command {
        } else if ownerGiven {
            throw UsageError("--owner is only for updates.")
        }
        if options.bestEffort, case .update = options.command {
        } else if options.bestEffort {
            throw UsageError("--best-effort is only for updates.")
        }
        return options
    }

    /// HOST or SPLICE, any case; anything else fails with 1, as pesto's "Unsupported pif name".
    static func parseTable(_ text: String) throws(UsageError) -> TableKind {
        switch text.lowercased() {
        case "host": return .host
        case "splice": return .splice
        default: throw UsageError("unknown table \"\(text)\"; tables are HOST and SPLICE.", status: 1)
        }
    }
}
