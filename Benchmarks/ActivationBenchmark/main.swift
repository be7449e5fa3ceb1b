// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-activation-bench: how fast rules are activated and deactivated, against the kernel's floor.
//
// Measures, in one run and side by side:
//   1. Activate/Deactivate of the `all` rules (1-65535 minus the ephemeral range) on one
//      address: wall time, sockets bound per second, failures by errno (the open-file limit
//      makes EMFILE failures expected here; activation must still complete quickly).
//   2. The same number of listeners as fits under the descriptor limit, through the engine
//      (its HOST table, so each listener is also registered with epoll, as in pestod)
//      and through a bare socket/setsockopt/bind/listen loop (the baseline: what the kernel
//      costs with no engine at all). The ratio engine/baseline is the engine's overhead.
//   3. One rule change (insert, activate, deactivate, delete of a single-port rule) while
//      those listeners stay active: the update cost that must not grow with table size.
//   4. Peak RSS of the process (getrusage).
// Each figure is the median of --runs runs. Run as root to bind ports below 1024.
// With PESTO_BENCH_SUMMARY set, the figures are also appended there as summary lines (groups
// activation and memory; PestoTestSupport's SummaryLines).

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Command-line settings.
struct Settings {
    var runs = 5
    var address = IPAddress.loopbackIPv4
    var listeners = 0  // 0: as many as fit under RLIMIT_NOFILE, less a reserve
    /// Which parts to run (1-4 of the header); callgrind runs want part 2 alone.
    var parts: Set<Int> = [1, 2, 3]

    static func parse(_ args: [String]) -> Settings {
        var s = Settings()
        var it = args.dropFirst().makeIterator()
        while let arg = it.next() {
            switch arg {
            case "--runs": s.runs = Int(it.next() ?? "") ?? s.runs
            case "--address": s.address = IPAddress(it.next() ?? "") ?? s.address
            case "--listeners": s.listeners = Int(it.next() ?? "") ?? s.listeners
            case "--parts": s.parts = Set((it.next() ?? "").split(separator: ",").compactMap { Int($0) })
            case "-h", "--help":
                print("usage: pesto-activation-bench [--runs N] [--address IP] [--listeners N] [--parts 1,2,3]")
                exit(0)
            default:
                print("unknown argument \(arg)")
                exit(2)
            }
        }
        return s
    }
}

/// A fresh engine's HOST table: what pestod uses, so every listener is also registered with
/// epoll and the engine's listener index, as in production. The engine is kept alive with it.
var engines: [ForwardingEngine] = []
@MainActor func engineTable(_ caps: Capabilities) -> ForwardingTable {
    var config = EngineConfiguration()
    config.capabilities = caps
    let engine = try! ForwardingEngine(loop: try! EventLoop(), configuration: config)
    engines.append(engine)
    return engine.host
}

/// Runs `body` `runs` times and returns the median of the seconds it returns.
func measure(_ runs: Int, _ body: () -> Double) -> Double { median((0..<runs).map { _ in body() }) }

extension String {
    /// The string padded with spaces on the right to `width` columns.
    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
}

/// The process's resident set now (VmRSS), in KiB; 0 if /proc cannot be read.
func currentRSSKiB() -> Int {
    guard let text = readFile("/proc/self/status", limit: 1 << 16).map({ String(decoding: $0, as: UTF8.self) }) else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }
    return 0
}

func peakRSSMiB() -> Double {
    var ru = rusage()
    getrusage(RUSAGE_SELF.rawValue, &ru)
    return Double(ru.ru_maxrss) / 1024
}

/// The baseline: a bare loop of the syscalls one TCP listener needs, no engine.
/// With `epoll`, each listener is also added to that epoll instance (what any event-driven
/// server must do, so the fairer floor for an engine that serves its listeners).
func bareListeners(address: IPAddress, ports: ClosedRange<UInt16>, epoll: Int32? = nil) -> (fds: [Int32], failed: Int) {
    var fds: [Int32] = []
    fds.reserveCapacity(ports.count)
    var failed = 0
    var sa = sockaddr_in()
    sa.sin_family = sa_family_t(AF_INET)
    sa.sin_addr = address.in4!
    for port in ports {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 {
            failed += 1
            continue
        }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        sa.sin_port = port.bigEndian
        let ok =
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            } == 0 && listen(fd, SOMAXCONN) == 0
        if ok, let epoll {
            var ev = epoll_event()
            ev.events = EPOLLIN.rawValue
            ev.data.u64 = UInt64(fd)
            epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev)
        }
        if ok {
            fds.append(fd)
        } else {
            close(fd)
            failed += 1
        }
    }
    return (fds, failed)
}

let settings = Settings.parse(CommandLine.arguments)
let ephemeral = EphemeralPortRange.current()
let limit = DescriptorPlan.current.openFileLimit
let caps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .ifname]
print("pesto activation benchmark: \(settings.runs) runs, address \(settings.address), RLIMIT_NOFILE \(limit), ephemeral \(ephemeral)")

// 1. The `all` rules.
if settings.parts.contains(1) {
    let allSpec = try PortSpec.parse("\(settings.address)/all", proto: .tcp, ephemeralPorts: ephemeral)
    let allPorts = allSpec.rules.reduce(0) { $0 + $1.portCount }
    var allBound: UInt32 = 0
    var allFailed: UInt32 = 0
    var failureNames = Set<String>()
    var activateAll: [Double] = []
    var deactivateAll: [Double] = []
    for _ in 0..<settings.runs {
        let table = engineTable(caps)
        for (i, rule) in allSpec.rules.enumerated() { try table.insert(id: UInt32(i + 1), rule: rule) }
        let t0 = monotonicSeconds()
        (allBound, allFailed) = (0, 0)
        for id in table.ids {
            let counts = try table.activate(id: id)
            allBound += counts.bound
            allFailed += counts.failed
            if let name = try table.status(id).lastError?.name { failureNames.insert(name) }
        }
        let t1 = monotonicSeconds()
        for id in table.ids { try table.deactivate(id: id) }
        let t2 = monotonicSeconds()
        activateAll.append(t1 - t0)
        deactivateAll.append(t2 - t1)
    }
    let actAll = median(activateAll)
    let deactAll = median(deactivateAll)
    print("")
    print("1. `all` = \(allSpec.rules.count) rules, \(allPorts) ports on \(settings.address)")
    print(
        "   activate   \(fixed(actAll * 1000, width: 8)) ms   bound \(allBound), failed \(allFailed) (\(failureNames.sorted().joined(separator: ", ")))"
    )
    print("   deactivate \(fixed(deactAll * 1000, width: 8)) ms")
    print("   sockets bound per second: \(fixed(Double(allBound) / actAll, 0))")
    SummaryLines.append(
        group: "activation", metric: "`all` rules: sockets bound per second (engine)", value: Double(allBound) / actAll, unit: "sockets/s",
        better: "higher")
}

// 2. Engine against the bare syscall loop, for as many listeners as fit.
let n = settings.listeners > 0 ? settings.listeners : min(19_000, limit - 500)
let first: UInt16 = 1024
let range = first...(first + UInt16(n) - 1)
let rule = Rule(proto: .tcp, address: settings.address, firstPort: range.lowerBound, lastPort: range.upperBound)
var engineTimes: [Double] = []
var bareTimes: [Double] = []
var epollTimes: [Double] = []
var engineBound: UInt32 = 0
var engineFailure: String? = nil
var bareBound = 0
var epollBound = 0
/// Growth of the process's RSS while the engine's listeners are open, per listener, in bytes
/// (user space only: the kernel's socket memory is not in RSS).
var rssPerListener = 0.0
if settings.parts.contains(2) {
    for _ in 0..<settings.runs {
        let t0 = monotonicSeconds()
        let (fds, _) = bareListeners(address: settings.address, ports: range)
        let t1 = monotonicSeconds()
        bareBound = fds.count
        for fd in fds { close(fd) }
        bareTimes.append(t1 - t0)

        let ep = epoll_create1(0)
        let t4 = monotonicSeconds()
        let (efds, _) = bareListeners(address: settings.address, ports: range, epoll: ep)
        epollTimes.append(monotonicSeconds() - t4)
        epollBound = efds.count
        for fd in efds { close(fd) }
        close(ep)

        let table = engineTable(caps)
        try table.insert(id: 1, rule: rule)
        let rssBefore = currentRSSKiB()
        let t2 = monotonicSeconds()
        engineBound = try table.activate(id: 1).bound
        let t3 = monotonicSeconds()
        engineTimes.append(t3 - t2)
        rssPerListener = Double(currentRSSKiB() - rssBefore) * 1024 / Double(max(engineBound, 1))
        engineFailure = try table.status(1).lastError?.name
        try table.deactivate(id: 1)
    }
    let engineMedian = median(engineTimes)
    let bareMedian = median(bareTimes)
    let epollMedian = median(epollTimes)
    /// Microseconds per port attempted: every port costs its system calls, bound or not.
    func perPort(_ t: Double) -> String { fixed(t * 1e6 / Double(n), 2, width: 8) }
    print("")
    print("2. \(n) listeners, ports \(range), one rule: the engine against bare loops run side by side")
    print("                            engine   bare loop   bare+epoll")
    print(
        "   activation (ms)       \(fixed(engineMedian * 1000, width: 8))    \(fixed(bareMedian * 1000, width: 8))     \(fixed(epollMedian * 1000, width: 8))"
    )
    print("   per port (µs)         \(perPort(engineMedian))    \(perPort(bareMedian))     \(perPort(epollMedian))")
    print(
        "   bound (of \(n))      \(String(engineBound).padding(8))    \(String(bareBound).padding(8))     \(String(epollBound).padding(8))")
    print(
        "   RATIO engine ÷ bare+epoll (socket, setsockopt, bind, listen, epoll_ctl): \(fixed(engineMedian / epollMedian, 2))   (engine ÷ bare: \(fixed(engineMedian / bareMedian, 2)))"
    )
    print("   RSS per listener (pestod's own memory, not the kernel's): \(fixed(rssPerListener, 0)) bytes (last run)")
    let what = "activate \(n) listeners (engine)"
    SummaryLines.append(
        group: "activation", metric: what, value: engineMedian * 1000, unit: "ms", baseline: "bare loop", baselineValue: bareMedian * 1000,
        ratio: engineMedian / bareMedian, better: "lower")
    SummaryLines.append(
        group: "activation", metric: what, value: engineMedian * 1000, unit: "ms", baseline: "bare loop+epoll",
        baselineValue: epollMedian * 1000, ratio: engineMedian / epollMedian, better: "lower")
    SummaryLines.append(
        group: "memory", metric: "RSS per listener (engine in process)", value: rssPerListener, unit: "bytes", better: "lower")
    if Int(engineBound) != n || bareBound != n || epollBound != n {
        print("   note: not every port was bound (engine's last error: \(engineFailure ?? "none")); ports of this range are")
        print("   taken by other processes, or RLIMIT_NOFILE is too low: use --address, --listeners, or a network namespace")
    }
}

// 3. One rule change with those listeners present.
if settings.parts.contains(3) {
    let table = engineTable(caps)
    try table.insert(id: 1000, rule: rule)
    try table.activate(id: 1000)
    let otherPort = UInt16(range.upperBound) + 1
    let one = Rule(proto: .tcp, address: settings.address, firstPort: otherPort)
    /// Median time of inserting, activating, deactivating and deleting `one` in `table`.
    @MainActor func ruleChangeCost(_ table: ForwardingTable) -> Double {
        measure(max(settings.runs, 5) * 20) {
            let t0 = monotonicSeconds()
            try! table.insert(id: 500, rule: one)
            try! table.activate(id: 500)
            try! table.deactivate(id: 500)
            try! table.delete(id: 500)
            return monotonicSeconds() - t0
        }
    }
    let change = ruleChangeCost(table)
    let changeEmpty = ruleChangeCost(engineTable(caps))
    try table.deactivate(id: 1000)
    print("")
    print("3. one rule insert+activate+deactivate+delete")
    print(
        "   with \(n) listeners active: \(fixed(change * 1e6)) µs; with none: \(fixed(changeEmpty * 1e6)) µs; ratio \(fixed(change / changeEmpty, 2))"
    )
    SummaryLines.append(
        group: "activation", metric: "one rule change, \(n) listeners active (engine)", value: change * 1e6, unit: "µs",
        baseline: "empty table", baselineValue: changeEmpty * 1e6, ratio: change / changeEmpty, target: "≤ 1.15", better: "lower")
}
print("")
print("4. peak RSS: \(fixed(peakRSSMiB())) MiB")
SummaryLines.append(
    group: "memory", metric: "peak RSS of the activation benchmark (engine in process)", value: peakRSSMiB(), unit: "MiB", better: "lower")
