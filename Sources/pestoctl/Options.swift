// SPDX-License-Identifier: GPL-2.0-or-later

// Options: pestoctl's command line, parsed by hand in argv order.
//
// pasta's -t/-u/-T/-U options are order-sensitive once -A (add), -D (delete) and -C TABLE
// (clear) are mixed in: `-A -t 2000 -C HOST -t 2001` must clear after the first add and
// before the second. ArgumentParser collects options into properties and loses that order,
// so the whole command line is read here, left to right, into a list of `Operation`s.
//
// Usage:
//   pestoctl [BUS] [-s] [--json]                       show the tables
//   pestoctl [BUS] [-s] [--id N] [-A|-D|-C TABLE] [-t|-u|-T|-U SPEC]...   update
//   pestoctl [BUS] [-s] [--json] status ID [--table HOST|SPLICE]
//   pestoctl [BUS] watch                               print changes as they happen
// BUS is --system (default when root), --session (default otherwise) or --address ADDRESS.

#if canImport(Glibc)
import Glibc
#endif
import PestoModel
import PestoSystem
import PestoDBus

/// A bad command line; exit status 2.
struct UsageError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// How the following -t/-u/-T/-U specs are applied.
enum SpecMode: Equatable {
    /// The first spec of each kind replaces that table's rules of that protocol; later ones add.
    case replace
    /// -A: add.
    case add
    /// -D: delete exactly matching rules.
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
    /// Print table changes as they happen, until killed.
    case watch
    /// Print the usage text.
    case help
}

/// The parsed command line.
struct Options {
    var bus: BusAddress = getuid() == 0 ? .system : .session
    /// -s: script mode. Success prints nothing; warnings are not printed; errors still go to
    /// stderr, and the exit status tells the outcome.
    var silent = false
    /// --json: the table listing (and `status`) as JSON.
    var json = false
    /// --id N: the first ID for new rules.
    var firstID: UInt32?
    var command: Command = .show

    static let usage = """
        Usage: pestoctl [--system|--session|--address ADDRESS] [-s] [--json]
               pestoctl [BUS] [-s] [--id N] [-A|-D|-C TABLE] [-t|-u|-T|-U SPEC]...
               pestoctl [BUS] [-s] [--json] status ID [--table HOST|SPLICE]
               pestoctl [BUS] watch

        Without update options, shows the HOST and SPLICE forwarding tables.
          -t, --tcp-ports SPEC   HOST table, TCP (pasta's -t syntax)
          -u, --udp-ports SPEC   HOST table, UDP
          -T, --tcp-ns SPEC      SPLICE table, TCP
          -U, --udp-ns SPEC      SPLICE table, UDP
          -A, --add              following specs add rules
          -D, --delete           following specs delete exactly matching rules
          -C, --clear TABLE      remove every rule of TABLE (HOST or SPLICE)
        Without -A/-D, the first spec of each kind replaces that table's rules of that
        protocol and later ones add. Options apply in order.
          --id N                 first ID for new rules (default: highest ID + 10)
          -s, --silent           script mode: print nothing on success, no warnings
          --json                 show the tables (or status) as JSON
          --system, --session, --address ADDRESS   the bus (default: system as root, else session)
        Exit status: 0 success, 1 update rejected (rolled back) or refused, 2 usage error,
        3 cannot reach the service.
        """

    /// Parses `arguments` (without the program name).
    static func parse(_ arguments: [String]) throws(UsageError) -> Options {
        var options = Options()
        var operations: [Operation] = []
        var mode = SpecMode.replace
        var statusWords: [String] = []
        var statusTable: TableKind?
        var sawStatus = false
        var sawWatch = false
        var index = 0

        func value(for option: String, attached: String?) throws(UsageError) -> String {
            if let attached { return attached }
            index += 1
            guard index < arguments.count else { throw UsageError("option \(option) needs a value.") }
            return arguments[index]
        }

        while index < arguments.count {
            let argument = arguments[index]
            // Split "--long=value" and "-tSPEC".
            var name = argument
            var attached: String?
            if argument.hasPrefix("--"), let eq = argument.firstIndex(of: "=") {
                name = String(argument[..<eq])
                attached = String(argument[argument.index(after: eq)...])
            } else if argument.hasPrefix("-"), !argument.hasPrefix("--"), argument.count > 2 {
                name = String(argument.prefix(2))
                attached = String(argument.dropFirst(2))
            }
            switch name {
            case "-h", "--help":
                options.command = .help
                return options
            case "--system": options.bus = .system
            case "--session": options.bus = .session
            case "--address": options.bus = .address(try value(for: name, attached: attached))
            case "-s", "--silent": options.silent = true
            case "--json": options.json = true
            case "--id":
                let text = try value(for: name, attached: attached)
                guard let id = UInt32(text), id > 0 else { throw UsageError("--id needs a rule ID 1-4294967295, not \"\(text)\".") }
                options.firstID = id
            case "-A", "--add":
                if attached != nil { throw UsageError("-A takes no value.") }
                mode = .add
            case "-D", "--delete":
                if attached != nil { throw UsageError("-D takes no value.") }
                mode = .delete
            case "-C", "--clear":
                operations.append(.clear(try parseTable(try value(for: name, attached: attached))))
            case "-t", "--tcp-ports", "-u", "--udp-ports", "-T", "--tcp-ns", "-U", "--udp-ns":
                let table: TableKind = ["-t", "--tcp-ports", "-u", "--udp-ports"].contains(name) ? .host : .splice
                let proto: TransportProtocol = ["-t", "--tcp-ports", "-T", "--tcp-ns"].contains(name) ? .tcp : .udp
                operations.append(.spec(table: table, proto: proto, text: try value(for: name, attached: attached), mode: mode))
            case "--table":
                guard sawStatus else { throw UsageError("--table is only for \"status\".") }
                statusTable = try parseTable(try value(for: name, attached: attached))
            default:
                if argument.hasPrefix("-") && argument != "-" {
                    throw UsageError("unknown option \"\(argument)\".")
                }
                if !sawStatus && !sawWatch && argument == "status" {
                    sawStatus = true
                } else if !sawStatus && !sawWatch && argument == "watch" {
                    sawWatch = true
                } else if sawStatus {
                    statusWords.append(argument)
                } else {
                    throw UsageError("unexpected argument \"\(argument)\"; the commands are \"status ID\" and \"watch\".")
                }
            }
            index += 1
        }

        if sawStatus {
            guard operations.isEmpty else { throw UsageError("\"status\" cannot be combined with update options.") }
            guard statusWords.count == 1 else { throw UsageError("\"status\" needs exactly one rule ID.") }
            guard let id = UInt32(statusWords[0]) else {
                throw UsageError("\"\(statusWords[0])\" is not a rule ID (0-4294967295).")
            }
            options.command = .status(id: id, table: statusTable ?? .host)
        } else if sawWatch {
            guard operations.isEmpty, statusWords.isEmpty else { throw UsageError("\"watch\" takes no update options or arguments.") }
            options.command = .watch
        } else if !operations.isEmpty {
            options.command = .update(operations)
        } else if mode != .replace {
            throw UsageError("-A and -D need at least one -t, -u, -T or -U spec after them.")
        }
        if options.firstID != nil, case .update = options.command {} else if options.firstID != nil {
            throw UsageError("--id is only for updates.")
        }
        return options
    }

    /// HOST or SPLICE, any case.
    static func parseTable(_ text: String) throws(UsageError) -> TableKind {
        switch text.lowercased() {
        case "host": return .host
        case "splice": return .splice
        default: throw UsageError("unknown table \"\(text)\"; tables are HOST and SPLICE.")
        }
    }
}
