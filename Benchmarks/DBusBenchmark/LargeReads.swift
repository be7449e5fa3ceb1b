// SPDX-License-Identifier: GPL-2.0-or-later

// The `--large-reads` mode: how long the reads that grow with a table hold pestod's loop.
//
// For the pestod measured (`--pestod`, default the one next to this binary) and, with
// `--baseline-pestod PATH`, a baseline pestod side by side in the same run, on a fresh private
// bus with `--max-rules 65536`: rule 1 is inserted for the prober; 65,535 rules are inserted
// with four Applies (single-port TCP rules on 127.1.x.y:24001 on an interface that does not
// exist, so each bind fails at once with ENODEV, `max-failures` 1, and no descriptor is
// kept). Then each read is timed from the call to its reply, while a prober (this binary as
// `--status-prober`, a separate process) calls `Status` back to back: the prober's longest
// round trip is how long another client waited, i.e. how long the read held the loop.
//   List of the HOST table; GetManagedObjects; Introspect of …/tables/host/rules.
// Each figure is printed per run; with a baseline, the ratio measured / baseline.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// One read's figures: the call's time and the prober's longest wait, in milliseconds.
struct ReadFigures {
    var callMs = Double.nan
    var probeMaxMs = Double.nan
    var outcome = ""
}

/// Measures the large reads on `pestod`; returns the figures by read name, in order.
func measureLargeReads(pestod: String, label: String, settings: Settings) throws -> [(String, ReadFigures)] {
    let fixture = try Fixture.start(pestod: pestod, pestodArguments: ["--max-rules", "65536"])
    // Not `fixture.stop()`: the clean-up list, once run, kills every later child at once.
    defer {
        fixture.pestod.kill()
        fixture.bus.stop()
        cleanup.remove(child: fixture.pestodPID)
        cleanup.remove(child: fixture.bus.process.pid)
    }
    let address = fixture.address
    let timeout = settings.largeTimeoutSeconds
    let client = try DBusConnection(.address(address))
    let call = { (path: String, interface: String, member: String, args: [DBusValue]) throws -> [DBusValue] in
        try client.call(busName, path, interface, member, args, timeoutMilliseconds: Int32(timeout * 1000))
    }
    _ = try call(
        tablePath, tableInterface, "Insert",
        [.uint32(1), .vardict([("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(24_000))])])
    let n = 65_535
    var next = 0
    while next < n {
        let chunk = min(16_384, n - next)
        let rules = (next..<next + chunk).map { k in
            DBusValue.structure([
                .uint32(UInt32(1000 + k)),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.1.\(k >> 8 & 0xFF).\(k & 0xFF)")),
                    ("first-port", .uint16(24_001)), ("interface", .string("pesto-bench0")),
                ]),
            ])
        }
        _ = try call(
            tablePath, tableInterface, "Apply",
            [.array(element: "(ua{sv})", rules), .array(element: "u", []), .vardict([("max-failures", .uint32(1))])])
        next += chunk
    }
    print("\(label): \(pestod), \(n + 1) rules, load average \(loadAverage())")

    let reads: [(String, String, String, String)] = [
        ("List", tablePath, tableInterface, "List"),
        ("GetManagedObjects", PestoBusNames.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
        ("Introspect rules", tablePath + "/rules", "org.freedesktop.DBus.Introspectable", "Introspect"),
    ]
    var figures: [(String, ReadFigures)] = []
    for (name, path, interface, member) in reads {
        var f = ReadFigures()
        let prober = try StatusProber.start(address: address, id: 1, timeoutSeconds: timeout)
        // The prober's first call (its connection made) before the read starts.
        let start = monotonicSeconds()
        do {
            let reply = try call(path, interface, member, [])
            f.outcome = "reply of \(reply.count) values"
        } catch {
            f.outcome = (error as? DBusErrorReply)?.name ?? "\(error)"
        }
        f.callMs = (monotonicSeconds() - start) * 1000
        let probe = prober.finish(timeoutSeconds: timeout)
        f.probeMaxMs = number(after: "max_ms", in: probe)
        let logged = fixture.lastLogLine(containing: "\(member) by")
        print("  \(pad(name, 20)) call \(fixed(f.callMs, 1, width: 9)) ms   \(f.outcome)   Status prober: \(probe)")
        if !logged.isEmpty { print("  \(pad("", 20)) pestod: \(logged)") }
        figures.append((name, f))
    }
    return figures
}

/// The number after `key` in a line of words ("max_ms 12.3" → 12.3).
func number(after key: String, in line: String) -> Double {
    let words = line.split(separator: " ").map(String.init)
    guard let i = words.firstIndex(of: key), i + 1 < words.count else { return .nan }
    return Double(words[i + 1]) ?? .nan
}

/// The `--large-reads` benchmark (see the top of the file).
func runLargeReadBenchmark(_ settings: Settings) throws {
    let pestod = settings.pestodPath ?? executableDirectory() + "/pestod"
    guard access(pestod, X_OK) == 0 else { throw HarnessError("no pestod at \(pestod); build it in release mode") }
    let measured = try measureLargeReads(pestod: pestod, label: "measured", settings: settings)
    guard let baselinePath = settings.baselinePestod else { return }
    let baseline = try measureLargeReads(pestod: baselinePath, label: "baseline", settings: settings)
    print("ratios, measured / baseline:")
    for ((name, m), (_, b)) in zip(measured, baseline) {
        print(
            "  \(pad(name, 20)) call \(fixed(m.callMs / b.callMs, 3))   longest Status wait \(fixed(m.probeMaxMs / b.probeMaxMs, 3))"
        )
    }
}
