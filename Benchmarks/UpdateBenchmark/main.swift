// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-update-bench: the measuring side of Benchmarks/run-updates.sh (changes of the
// forwarding table under load). The script sets up pestod, pasta, the echo servers and the
// network namespaces; this program measures, one subcommand per figure, and prints one line.
//
//   pesto-update-bench disrupt --port P --connects N --interval-ms I --updates U VIA
//       Failed connects to P (one byte echoed) while U changes are made (Disruption.swift).
//       Prints "disrupt failed F of N updates U during D median-ms M max-ms X [first ERRNO]".
//   pesto-update-bench change --runs N VIA
//       The time of one change (add, remove), N times each. Prints
//       "change add-ms A remove-ms R add-range … remove-range … runs N".
//   pesto-update-bench churn --port P --seconds S --slice T --clients C
//       Short connections per second in slices of T seconds (Churn.swift). Prints
//       "churn R1 R2 … failures F [first ERRNO]".
//
// VIA, the way changes are made (Updaters.swift), adding and removing a TCP rule
// 127.0.0.1:Q → T:
//   --via dbus --address BUS --update-port Q --target-port T
//   --via wire --control PATH --update-port Q --target-port T [--wait SECONDS]
//   --via command --add 'PROGRAM ARG…' --remove 'PROGRAM ARG…' [--settle PATH]
//       (words split at spaces: no argument may contain one)
//
// Every wait is bounded; nothing here asserts on a time.

import PestoModel
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Writes a line to stdout, unbuffered (the script reads it through a pipe).
func say(_ text: String) { writeAll(1, Array((text + "\n").utf8)) }

/// Writes a line to stderr and exits with status 1 (2 for a bad command line).
func fail(_ text: String, status: Int32 = 1) -> Never {
    writeAll(2, Array(("pesto-update-bench: \(text)\n").utf8))
    exit(status)
}

/// `--name value` arguments after the subcommand.
struct Options {
    var values: [String: String] = [:]

    init(_ arguments: ArraySlice<String>) {
        var i = arguments.startIndex
        while i < arguments.endIndex {
            let a = arguments[i]
            guard a.hasPrefix("--"), i + 1 < arguments.endIndex else { fail("unexpected argument \(a)", status: 2) }
            values[String(a.dropFirst(2))] = arguments[i + 1]
            i += 2
        }
    }

    func required(_ name: String) -> String {
        guard let v = values[name] else { fail("--\(name) is required", status: 2) }
        return v
    }

    func port(_ name: String) -> UInt16 {
        guard let p = UInt16(required(name)), p > 0 else { fail("--\(name): bad port", status: 2) }
        return p
    }

    func number(_ name: String, default value: Double? = nil, range: ClosedRange<Double>) -> Double {
        guard let text = values[name] else {
            guard let value else { fail("--\(name) is required", status: 2) }
            return value
        }
        guard let v = Double(text), range.contains(v) else { fail("--\(name) must be a number in \(range)", status: 2) }
        return v
    }

    /// The way changes are made, from --via and its options.
    func updater() throws -> Updater {
        switch required("via") {
        case "dbus":
            return try .dbus(address: required("address"), port: port("update-port"), target: port("target-port"))
        case "wire":
            return .wire(
                path: required("control"), port: port("update-port"), target: port("target-port"),
                waitSeconds: Int(number("wait", default: 60, range: 1...3600)))
        case "command":
            let words = { (s: String) in s.split(separator: " ").map(String.init) }
            let add = words(required("add"))
            let remove = words(required("remove"))
            guard !add.isEmpty, !remove.isEmpty else { fail("--add and --remove need a program", status: 2) }
            return .command(add: add, remove: remove, settle: values["settle"])
        case let other:
            fail("--via \(other): dbus, wire or command", status: 2)
        }
    }
}

signal(SIGPIPE, SIG_IGN)
let arguments = CommandLine.arguments
let options = Options(arguments.dropFirst(2))
do {
    switch arguments.count > 1 ? arguments[1] : "" {
    case "disrupt":
        try disrupt(
            port: options.port("port"), connects: Int(options.number("connects", range: 1...1_000_000)),
            interval: options.number("interval-ms", range: 0...10_000) / 1000,
            updates: Int(options.number("updates", range: 0...100_000)), updater: options.updater())
    case "change":
        try change(runs: Int(options.number("runs", range: 1...100_000)), updater: options.updater())
    case "churn":
        churn(
            port: options.port("port"), seconds: options.number("seconds", range: 1...86_400),
            slice: options.number("slice", default: 5, range: 0.1...3600),
            clients: Int(options.number("clients", default: 4, range: 1...200)))
    default:
        fail("usage: pesto-update-bench disrupt|change|churn … (see Benchmarks/README.md)", status: 2)
    }
} catch {
    fail("\(error)")
}
exit(0)
