// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-large-bench: a table of 65,535 rules with and without the state store, side by side
// in one run (Benchmarks/run-large.sh runs it in a network namespace of its own).
//
// For each of `--state` and `--no-state`, on a private bus, a fresh release pestod
// (`--max-rules 65536`, `--authorize none`):
//   1. rule 1 relays 127.0.0.1:24500 to an echo server on 127.0.0.1:24600 (active);
//   2. an Apply inserts the bulk: RULES - 2 single-port rules (127.3.x.y:24001) on an
//      interface that does not exist (`pesto-bench0`: each bind fails at once with ENODEV and
//      keeps no descriptor; `max-failures` 1 lets them through) — timed, with pestod's log
//      line of the loop's longest turns since the Apply's decoding (TurnLog.swift);
//   3. COMMITS one-rule commits on rule 2 (127.0.0.1:24700), in turn Insert, Activate,
//      Deactivate, Delete, each timed from the call to its reply (with --state the reply
//      comes once the change is fsynced); meanwhile a Status prober (another process) and a
//      relayed echo prober (through rule 1) record their longest waits;
//   4. an Apply removes the bulk (timed, longest turns); pestod's RSS before the bulk, with
//      it, and after removing it (malloc_trim, MemoryTrim.swift) once it has settled.
// The table holds RULES rules during the commits: the bulk, rule 1, and rule 2 half the time.
// Nothing asserts a time; figures go to stdout and, with PESTO_BENCH_SUMMARY, summary lines
// (group `large`): each --state figure against the --no-state one of the same run.

import PestoDBus
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// The command line: `--rules N --commits N`, or the prober mode.
struct Settings {
    var rules = 65_535
    var commits = 100

    init(_ arguments: [String]) {
        var it = arguments.makeIterator()
        while let a = it.next() {
            switch a {
            case "--rules": rules = it.next().flatMap { Int($0) } ?? rules
            case "--commits": commits = it.next().flatMap { Int($0) } ?? commits
            default:
                print("usage: pesto-large-bench [--rules N] [--commits N]")
                exit(2)
            }
        }
    }
}

/// What one pestod configuration measured.
struct Figures {
    var commitMedianMs = 0.0
    var commitMaxMs = 0.0
    var statusMaxMs = 0.0
    var statusCalls = 0
    var echoMaxMs = 0.0
    var echoCount = 0
    var fillSeconds = 0.0
    var fillTurns = ""
    var removeSeconds = 0.0
    var removeTurns = ""
    var rssBeforeKiB = 0
    var rssFullKiB = 0
    var rssAfterKiB = 0
    /// From the fill's log line: the longest turn, the longest after the decoding turn, and
    /// the most CPU time the loop spent in one of those (without waits for a CPU).
    var fillLongestMs = Double.nan
    var fillLongestLaterMs = Double.nan
    var fillLongestLaterCPUMs = Double.nan
    var removeLongestLaterMs = Double.nan
    var removeLongestLaterCPUMs = Double.nan
}

/// The number after `key` in `line` ("longest 12.3 ms" → 12.3 for "longest").
func number(after key: String, in line: String) -> Double {
    let words = line.split(separator: " ").map(String.init)
    guard let i = words.firstIndex(of: key), i + 1 < words.count else { return .nan }
    return Double(words[i + 1]) ?? .nan
}

/// Runs one configuration (`storeArguments`: `--state FILE` or `--no-state`).
func measure(_ label: String, storeArguments: (TemporaryDirectory) -> [String], settings: Settings) throws -> Figures {
    let dir = try TemporaryDirectory(prefix: "pesto-large-bench.")
    let bus = try PrivateBus(directory: dir.path, stderr: .file(dir.file("bus.log")))
    defer { bus.stop() }
    guard let echo = EchoServer(port: 24600) else { throw HarnessError("cannot listen on 127.0.0.1:24600") }
    defer { echo.stop() }
    let log = dir.file("pestod.log")
    let pestod = try ChildProcess.startReady(
        executableDirectory() + "/pestod",
        ["--address", bus.address, "--authorize", "none", "--max-rules", "65536", "--log-level", "info"] + storeArguments(dir),
        notifyPath: dir.file("notify.sock"), stderr: .file(log), logPath: log, timeoutMilliseconds: 60_000)
    defer { pestod.kill() }
    let client = try DBusConnection(.address(bus.address))
    let call = { (member: String, args: [DBusValue]) throws -> [DBusValue] in
        try client.call(busName, tablePath, tableInterface, member, args, timeoutMilliseconds: 600_000)
    }
    func lastLine(_ text: String) -> String {
        let line = String((readTextFile(log) ?? "").split(separator: "\n").last { $0.contains(text) } ?? "")
        // From the message on: the words after "pestod: [PestoService] ".
        guard let at = line.firstRange(of: "] ") else { return line }
        return String(line[at.upperBound...])
    }
    func rule(_ address: String, _ port: UInt16, _ extra: [(String, DBusValue)] = []) -> DBusValue {
        .vardict([("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(port))] + extra)
    }
    var f = Figures()
    _ = try call("Insert", [.uint32(1), rule("127.0.0.1", 24500, [("target-port", .uint16(24600))])])
    _ = try call("Activate", [.uint32(1)])
    f.rssBeforeKiB = procStatusKiB(pestod.pid, "VmRSS") ?? 0

    // 2. The bulk.
    let bulk = settings.rules - 2
    let ids = (0..<bulk).map { UInt32(100 + $0) }
    let inserts = ids.map { id -> DBusValue in
        let n = Int(id)
        return .structure([.uint32(id), rule("127.3.\(n >> 8 & 0xFF).\(n & 0xFF)", 24001, [("interface", .string("pesto-bench0"))])])
    }
    var start = monotonicSeconds()
    _ = try call("Apply", [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([("max-failures", .uint32(1))])])
    f.fillSeconds = monotonicSeconds() - start
    f.fillTurns = lastLine("loop turns since")
    f.fillLongestMs = number(after: "longest", in: f.fillTurns)
    f.fillLongestLaterMs = number(after: "first", in: f.fillTurns)
    f.fillLongestLaterCPUMs = number(after: "those", in: f.fillTurns)
    f.rssFullKiB = procStatusKiB(pestod.pid, "VmRSS") ?? 0

    // 3. One-rule commits under probing.
    let prober = try StatusProber.start(address: bus.address, id: 1)
    guard let echoProber = EchoProber(port: 24500) else { throw HarnessError("cannot connect through rule 1") }
    var times: [Double] = []
    for i in 0..<settings.commits {
        let (member, args): (String, [DBusValue]) =
            switch i % 4 {
            case 0: ("Insert", [.uint32(2), rule("127.0.0.1", 24700)])
            case 1: ("Activate", [.uint32(2)])
            case 2: ("Deactivate", [.uint32(2)])
            default: ("Delete", [.uint32(2)])
            }
        let t = monotonicSeconds()
        _ = try call(member, args)
        times.append((monotonicSeconds() - t) * 1000)
    }
    let echoResult = echoProber.finish()
    let status = prober.finish()
    times.sort()
    f.commitMedianMs = times[times.count / 2]
    f.commitMaxMs = times.last ?? .nan
    (f.statusCalls, f.statusMaxMs) = status
    (f.echoCount, f.echoMaxMs) = (echoResult.count, echoResult.maxMilliseconds)
    if echoResult.errors > 0 { print("\(label): the echo prober failed (\(echoResult.errors))") }

    // 4. Shrink back; RSS once it has settled (the trim runs on a thread of its own).
    start = monotonicSeconds()
    _ = try call("Apply", [.array(element: "(ua{sv})", []), .array(element: "u", ids.map { .uint32($0) }), .vardict([])])
    f.removeSeconds = monotonicSeconds() - start
    f.removeTurns = lastLine("loop turns since")
    f.removeLongestLaterMs = number(after: "first", in: f.removeTurns)
    f.removeLongestLaterCPUMs = number(after: "those", in: f.removeTurns)
    var rss = procStatusKiB(pestod.pid, "VmRSS") ?? 0
    for _ in 0..<50 {
        usleep(100_000)
        let now = procStatusKiB(pestod.pid, "VmRSS") ?? 0
        if now == rss { break }
        rss = now
    }
    f.rssAfterKiB = rss
    print("\(label): pestod log of the bulk Apply: \(f.fillTurns)")
    print("\(label): pestod log of the removal:   \(f.removeTurns)")
    return f
}

let arguments = Array(CommandLine.arguments.dropFirst())
let settings = Settings(arguments)
print(
    "pesto-large-bench: \(settings.rules) rules, \(settings.commits) one-rule commits; load average \((readTextFile("/proc/loadavg") ?? "").prefix(14))"
)
do {
    let state = try measure("--state", storeArguments: { ["--state", $0.file("state")] }, settings: settings)
    let none = try measure("--no-state", storeArguments: { _ in ["--no-state"] }, settings: settings)
    func pad(_ s: String, _ n: Int) -> String { s + String(repeating: " ", count: max(0, n - s.count)) }
    func row(_ name: String, _ a: Double, _ b: Double, _ unit: String, target: String = "") {
        print(
            "  \(pad(name, 44)) \(fixed(a, 2, width: 10)) \(fixed(b, 2, width: 10)) \(pad(unit, 4)) \(b > 0 ? fixed(a / b, 2, width: 6) : "     -")  \(target)"
        )
    }
    print("  \(pad("figure", 44))    --state --no-state unit  ratio  target")
    row("one-rule commit, median", state.commitMedianMs, none.commitMedianMs, "ms", target: "≤ 5 ms; ratio ≤ 2")
    row("one-rule commit, worst", state.commitMaxMs, none.commitMaxMs, "ms", target: "≤ 20 ms")
    row("longest Status wait during the commits", state.statusMaxMs, none.statusMaxMs, "ms", target: "≤ 50 ms")
    row("longest relayed echo during the commits", state.echoMaxMs, none.echoMaxMs, "ms", target: "≤ 50 ms")
    row("Apply of the bulk: longest loop turn", state.fillLongestMs, none.fillLongestMs, "ms", target: "≤ 50 ms (with decoding)")
    row("Apply of the bulk: longest turn but decoding", state.fillLongestLaterMs, none.fillLongestLaterMs, "ms", target: "≤ 50 ms")
    row("Apply of the bulk: most CPU in one such turn", state.fillLongestLaterCPUMs, none.fillLongestLaterCPUMs, "ms", target: "≤ 50 ms")
    row("Apply removing it: longest turn", state.removeLongestLaterMs, none.removeLongestLaterMs, "ms", target: "≤ 50 ms")
    row("Apply removing it: most CPU in one turn", state.removeLongestLaterCPUMs, none.removeLongestLaterCPUMs, "ms", target: "≤ 50 ms")
    row("Apply of the bulk: call to reply", state.fillSeconds, none.fillSeconds, "s")
    row("Apply removing the bulk: call to reply", state.removeSeconds, none.removeSeconds, "s")
    row("pestod RSS before the bulk", Double(state.rssBeforeKiB) / 1024, Double(none.rssBeforeKiB) / 1024, "MiB")
    row("pestod RSS with the bulk", Double(state.rssFullKiB) / 1024, Double(none.rssFullKiB) / 1024, "MiB")
    row("pestod RSS after removing it", Double(state.rssAfterKiB) / 1024, Double(none.rssAfterKiB) / 1024, "MiB")
    print(
        "  (Status calls during the commits: \(state.statusCalls) and \(none.statusCalls); relayed echoes: \(state.echoCount) and \(none.echoCount))"
    )
    func summary(_ metric: String, _ a: Double, _ b: Double, _ unit: String, _ target: String) {
        SummaryLines.append(
            group: "large", metric: metric, value: a, unit: unit, baseline: "--no-state", baselineValue: b, ratio: b > 0 ? a / b : nil,
            target: target, better: "lower")
    }
    summary("one-rule commit median", state.commitMedianMs, none.commitMedianMs, "ms", "≤ 2")
    summary("one-rule commit worst", state.commitMaxMs, none.commitMaxMs, "ms", "-")
    summary("longest Status wait", state.statusMaxMs, none.statusMaxMs, "ms", "-")
    summary("longest relayed echo", state.echoMaxMs, none.echoMaxMs, "ms", "-")
    summary("Apply longest loop turn", state.fillLongestMs, none.fillLongestMs, "ms", "-")
    summary("Apply longest turn but decoding", state.fillLongestLaterMs, none.fillLongestLaterMs, "ms", "-")
    summary("Apply most CPU in one turn but decoding", state.fillLongestLaterCPUMs, none.fillLongestLaterCPUMs, "ms", "-")
    summary("RSS after shrinking", Double(state.rssAfterKiB) / 1024, Double(none.rssAfterKiB) / 1024, "MiB", "-")
} catch {
    print("pesto-large-bench: \(error)")
    exit(1)
}
