// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-flood-bench: what a flood of refused large Applies costs everyone else.
//
// For each pestod given (`--pestod PATH`, the first is the baseline, e.g. main's), in rounds
// that alternate them: a private dbus-daemon, the pestod on it with `--authorize root`, one
// rule relaying a TCP port to an echo server, and one relayed connection kept open. Then,
// for `--seconds` each, two phases:
//   quiet   this process (root) calls Status back to back, each followed by the bus daemon's
//           own GetId (the baseline: what any client waits for the daemon alone) and a
//           one-byte echo through the relayed connection, and times all three;
//   flood   the same, while `--flooders` processes run as nobody (uid 65534, setpriv), each
//           with its own bus connection, sending Apply of `--rules` rules back to back (every
//           one refused: AccessDenied, after pestod decoded it).
// It prints, per pestod, phase and round, the Status count, median, p99 and longest round
// trip, the echo's median and longest, and the flooders' Applies answered. Run it in a
// network namespace of its own (run-flood.sh does) so the ports are private.
//
// `pesto-flood-bench --flooder ADDRESS RULES` is the flooder itself: Applies back to back
// until its stdin is closed, then `applies N refused R` on stdout.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

let busName = PestoBusNames.busName
let tablePath = PestoBusNames.tablePath(.host)
let tableInterface = PestoInterfaces.table.name

/// A TCP rule on 127.0.0.1.
func rule(port: UInt16, _ extra: [(String, DBusValue)] = []) -> DBusValue {
    .vardict([("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(port))] + extra)
}

/// The flooder: Applies of `rules` rules back to back until stdin says stop.
func runFlooder(address: String, rules: Int) -> Never {
    guard let connection = try? DBusConnection(.address(address)) else {
        print("flooder: cannot connect")
        exit(1)
    }
    let inserts = (0..<rules).map { k in
        DBusValue.structure([.uint32(UInt32(10_000 + k)), rule(port: UInt16(1024 + k % 20_000))])
    }
    let args: [DBusValue] = [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([])]
    var applies = 0
    var refused = 0
    while true {
        var pfd = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, 0) > 0 { break }
        do {
            _ = try connection.call(busName, tablePath, tableInterface, "Apply", args, timeoutMilliseconds: 600_000)
        } catch {
            refused += 1
        }
        applies += 1
    }
    print("applies \(applies) refused \(refused)")
    exit(0)
}

/// Percentile `p` (0...1) of `xs` in milliseconds.
func percentile(_ xs: [Double], _ p: Double) -> Double {
    guard !xs.isEmpty else { return .nan }
    let sorted = xs.sorted()
    return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] * 1000
}

/// One pestod on a private bus with the relayed echo in place.
final class Setup {
    let directory: TemporaryDirectory
    let bus: PrivateBus
    let pestod: ChildProcess
    let client: DBusConnection
    let echo: EchoServer
    let relayed: Int32

    init(pestodPath: String) throws {
        directory = try TemporaryDirectory(prefix: "pesto-flood-")
        bus = try PrivateBus(directory: directory.path)
        pestod = try ChildProcess.startReady(
            pestodPath,
            ["--address", bus.address, "--authorize", "root", "--max-rules", "65536", "--log-level", "notice"],
            notifyPath: directory.path + "/notify", stderr: .file(directory.path + "/pestod.log"))
        client = try DBusConnection(.address(bus.address))
        let ports = TestSockets.freePorts(2)
        guard let echo = EchoServer(port: ports.upperBound) else { throw HarnessError("no echo server") }
        self.echo = echo
        _ = try client.call(
            busName, tablePath, tableInterface, "Insert",
            [.uint32(1), rule(port: ports.lowerBound, [("target-port", .uint16(ports.upperBound))])])
        _ = try client.call(busName, tablePath, tableInterface, "Activate", [.uint32(1)])
        guard case .success(let fd) = TestSockets.connect(port: ports.lowerBound, noDelay: true) else {
            throw HarnessError("cannot connect through the relay")
        }
        relayed = fd
    }

    func stop() {
        close(relayed)
        echo.stop()
        pestod.kill()
        bus.stop()
    }

    /// One byte through the relay and back; its round trip in seconds.
    func echoOnce() -> Double {
        var byte: UInt8 = 42
        let start = monotonicSeconds()
        _ = send(relayed, &byte, 1, Int32(MSG_NOSIGNAL))
        var pfd = pollfd(fd: relayed, events: Int16(POLLIN), revents: 0)
        _ = poll(&pfd, 1, 30_000)
        _ = recv(relayed, &byte, 1, 0)
        return monotonicSeconds() - start
    }

    /// Status, the bus daemon's GetId and the echo back to back for `seconds`: their round
    /// trips in seconds.
    func probe(seconds: Double) -> (status: [Double], bus: [Double], echo: [Double], errors: Int) {
        var status: [Double] = []
        var bus: [Double] = []
        var echoes: [Double] = []
        var errors = 0
        let end = monotonicSeconds() + seconds
        while monotonicSeconds() < end {
            let start = monotonicSeconds()
            do {
                _ = try client.call(busName, tablePath, tableInterface, "Status", [.uint32(1)], timeoutMilliseconds: 60_000)
            } catch {
                errors += 1
            }
            status.append(monotonicSeconds() - start)
            let busStart = monotonicSeconds()
            do {
                _ = try client.call(
                    "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId", [], timeoutMilliseconds: 60_000)
            } catch {
                errors += 1
            }
            bus.append(monotonicSeconds() - busStart)
            echoes.append(echoOnce())
        }
        return (status, bus, echoes, errors)
    }
}

/// Runs one phase and prints its line.
func phase(_ label: String, _ setup: Setup, seconds: Double, flooders: Int, rules: Int) throws {
    var children: [ChildProcess] = []
    for _ in 0..<flooders {
        children.append(
            try ChildProcess(
                "/usr/bin/setpriv",
                [
                    "--reuid=65534", "--regid=65534", "--clear-groups", executableDirectory() + "/pesto-flood-bench", "--flooder",
                    setup.bus.address,
                    String(rules),
                ]))
    }
    let probe = setup.probe(seconds: seconds)
    var answered = 0
    for child in children {
        child.closeStdin()
        // A flooder may be waiting for its Apply; what it got so far is all that is counted.
        let line = child.readLine(timeoutMilliseconds: 5_000) ?? ""
        answered += Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        child.kill()
    }
    print(
        "\(label)  Status n \(probe.status.count) median \(fixed(percentile(probe.status, 0.5), 2)) ms p99 \(fixed(percentile(probe.status, 0.99), 1)) ms longest \(fixed(percentile(probe.status, 1), 1)) ms   bus GetId p99 \(fixed(percentile(probe.bus, 0.99), 1)) ms longest \(fixed(percentile(probe.bus, 1), 1)) ms   echo median \(fixed(percentile(probe.echo, 0.5), 2)) ms longest \(fixed(percentile(probe.echo, 1), 1)) ms   errors \(probe.errors)   flood Applies answered \(answered)"
    )
}

var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "--flooder", arguments.count == 3 {
    runFlooder(address: arguments[1], rules: Int(arguments[2]) ?? 65_535)
}
var pestods: [String] = []
var seconds = 10.0
var flooders = 3
var rules = 65_535
var rounds = 2
while !arguments.isEmpty {
    let flag = arguments.removeFirst()
    guard let value = arguments.first else { fatalError("\(flag) needs a value") }
    arguments.removeFirst()
    switch flag {
    case "--pestod": pestods.append(value)
    case "--seconds": seconds = Double(value) ?? seconds
    case "--flooders": flooders = Int(value) ?? flooders
    case "--rules": rules = Int(value) ?? rules
    case "--rounds": rounds = Int(value) ?? rounds
    default: fatalError("unknown option \(flag)")
    }
}
if pestods.isEmpty { pestods = [executableDirectory() + "/pestod"] }
print("pesto flood benchmark: \(flooders) flooders (uid 65534) of \(rules)-rule Applies, \(seconds) s a phase, \(rounds) rounds")
print("load average at start: \((readTextFile("/proc/loadavg") ?? "").split(separator: " ").prefix(3).joined(separator: " "))")
for (k, p) in pestods.enumerated() { print("pestod \(k == 0 ? "baseline " : "candidate")\(k): \(p)") }
for round in 1...rounds {
    for (k, path) in pestods.enumerated() {
        let setup = try Setup(pestodPath: path)
        defer { setup.stop() }
        let name = "round \(round) pestod \(k)"
        print("\(name): pid \(setup.pestod.pid)")
        fflush(nil)
        try phase("\(name) quiet", setup, seconds: seconds / 2, flooders: 0, rules: rules)
        try phase("\(name) flood", setup, seconds: seconds, flooders: flooders, rules: rules)
    }
}
