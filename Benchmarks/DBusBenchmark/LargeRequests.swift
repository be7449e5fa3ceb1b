// SPDX-License-Identifier: GPL-2.0-or-later

// The `--large` mode: how long pestod takes for the largest requests the contract allows,
// and how long another client's `Status` waits meanwhile.
//
// Phases, each timed from the request to its answer (D-Bus reply, or the control socket
// being closed after the update was applied), on a fresh private bus and pestod started
// with `--control` (its session timeout raised to --large-timeout) and `--max-rules 65536`
// (65,535 for the rules below, one for the rule the prober reads):
//   1. Apply inserting 65,535 single-port TCP rules, each on its own address of 127.0.0.0/8
//      (127.3.x.y) and one port below the ephemeral range (--large-port, default 24001), so
//      no two conflict but all share the port. Activation binds for real: under a ~20,000
//      descriptor limit the binds past it fail with EMFILE (counted; the rest of a rule's
//      ports then fail without a syscall), so the option `max-failures` 1 lets every
//      single-port rule through. The reply's bound/failed totals are printed.
//   2. Apply removing the 65,535 rules.
//   3. An upload of 65,535 such rules, weak, on the control socket (upstream's wire
//      protocol): inserted under fresh IDs and activated. These rules name an interface that
//      does not exist (`pesto-bench0`), so each bind fails at once with ENODEV and keeps no
//      descriptor: at the descriptor limit pestod could not accept the next control client.
//   4. The same upload again: every rule matches an active one and is kept (the diff alone).
// During each phase a prober — this binary run as `--status-prober ADDRESS ID`, a separate
// process with its own bus connection — calls `Status` back to back (each call given up to
// --large-timeout seconds) and, once its stdin is
// closed, prints the count, median and maximum round trip. A request that takes longer than
// --large-timeout seconds (default 300) is reported as such (old pestods needed minutes).

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Runs as the prober: `Status(id)` back to back until stdin reports EOF, then one line
/// `calls N median_ms X max_ms Y errors E` on stdout.
func runStatusProber(address: String, id: UInt32, timeoutSeconds: Int) -> Never {
    guard let connection = try? DBusConnection(.address(address)) else {
        print("prober: cannot connect")
        exit(1)
    }
    var latencies: [Double] = []
    var errors = 0
    while true {
        var pfd = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, 0) > 0 { break }  // EOF (or anything) on stdin: the phase is over
        let start = monotonicSeconds()
        do {
            _ = try connection.call(
                busName, tablePath, tableInterface, "Status", [.uint32(id)], timeoutMilliseconds: Int32(timeoutSeconds * 1000))
        } catch {
            errors += 1
        }
        latencies.append(monotonicSeconds() - start)
    }
    let sorted = latencies.sorted()
    let med = sorted.isEmpty ? 0 : sorted[sorted.count / 2]
    print("calls \(latencies.count) median_ms \(fixed(med * 1000, 2)) max_ms \(fixed((sorted.last ?? 0) * 1000, 1)) errors \(errors)")
    exit(0)
}

/// A running prober process: closing its stdin stops it, its stdout gives its verdict.
struct StatusProber {
    let child: ChildProcess

    /// Starts this binary as a prober on `address` for rule `id`.
    static func start(address: String, id: UInt32, timeoutSeconds: Int) throws -> StatusProber {
        let me = executableDirectory() + "/pesto-dbus-bench"
        let child = try ChildProcess(me, ["--status-prober", address, String(id), String(timeoutSeconds)], stderr: .inherit)
        cleanup.add(child: child.pid)
        return StatusProber(child: child)
    }

    /// Ends the probing and returns the prober's summary line.
    func finish(timeoutSeconds: Int) -> String {
        child.closeStdin()
        let line = child.readLine(timeoutMilliseconds: Int32((timeoutSeconds + 10) * 1000)) ?? "no answer"
        child.waitUntilExit()
        cleanup.remove(child: child.pid)
        return line
    }
}

/// Connects to the control socket, reads the hello and the dump (to EOF of the dump is not
/// needed: the server writes while it reads), sends `upload`, and waits for pestod to close.
func uploadOnControlSocket(_ path: String, _ upload: [UInt8], timeoutSeconds: Int) throws -> Double {
    guard let client = WireClient(path: path) else {
        throw HarnessError("cannot connect to the control socket \(path): \(Errno.current)")
    }
    let fd = client.fd
    defer { close(fd) }
    TestSockets.setTimeouts(fd, milliseconds: timeoutSeconds * 1000)
    let start = monotonicSeconds()
    var sent = 0
    var buffer = [UInt8](repeating: 0, count: 65_536)
    // Send everything, reading (and dropping) the hello and dump as they come, so neither
    // side's buffer fills up.
    while sent < upload.count {
        var pfds = [pollfd(fd: fd, events: Int16(POLLIN | POLLOUT), revents: 0)]
        guard poll(&pfds, 1, Int32(timeoutSeconds * 1000)) > 0 else { throw HarnessError("control socket stalled") }
        if pfds[0].revents & Int16(POLLIN) != 0 { _ = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT)) }
        if pfds[0].revents & Int16(POLLOUT) != 0 {
            let n = upload.withUnsafeBytes { send(fd, $0.baseAddress! + sent, upload.count - sent, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if n > 0 { sent += n }
        }
    }
    shutdown(fd, Int32(SHUT_WR))
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n == 0 { break }
        if n < 0 {
            if errno == EINTR { continue }
            throw HarnessError("no end of session within \(timeoutSeconds) s (errno \(errno))")
        }
    }
    return monotonicSeconds() - start
}

/// The `--large` benchmark (see the top of the file).
func runLargeRequestBenchmark(_ settings: Settings) throws {
    let pestod = executableDirectory() + "/pestod"
    guard access(pestod, X_OK) == 0 else { throw HarnessError("no pestod next to this binary (\(pestod)); build it in release mode") }
    let fixture = try Fixture.start(
        pestod: pestod,
        pestodArguments: [
            "--control", Fixture.controlPlaceholder, "--control-timeout", String(min(settings.largeTimeoutSeconds * 1000, 600_000)),
            "--max-rules", "65536",
        ] + (settings.pestodLogLevel.map { ["--log-level", $0] } ?? []))
    defer { fixture.stop() }
    let address = fixture.address
    let n = 65_535
    let port = settings.largePort
    let timeout = settings.largeTimeoutSeconds
    print("pesto D-Bus benchmark, large requests: \(n) rules on 127.3.x.y:\(port), request timeout \(timeout) s")
    print("bus \(address)   pestod pid \(fixture.pestodPID)   load average at start: \(loadAverage())")

    let client = try DBusConnection(.address(address))
    let statusID: UInt32 = 1
    _ = try client.call(
        busName, tablePath, tableInterface, "Insert", [.uint32(statusID), tcpRule(port: TestSockets.freePorts(1).lowerBound)])
    _ = try client.call(busName, tablePath, tableInterface, "Activate", [.uint32(statusID)])
    let addresses = (0..<n).map { IPAddress.v4(0x7F03_0000 + UInt32($0)) }
    let ids = (0..<n).map { UInt32(1000 + $0) }

    func phase(_ name: String, _ body: () throws -> String) {
        do {
            let prober = try StatusProber.start(address: address, id: statusID, timeoutSeconds: timeout)
            let start = monotonicSeconds()
            let outcome: String
            do { outcome = try body() } catch { outcome = "failed: \(error)" }
            let elapsed = monotonicSeconds() - start
            let probe = prober.finish(timeoutSeconds: timeout)
            print("\(pad(name, 36)) \(fixed(elapsed, 2, width: 8)) s   \(outcome)")
            print("\(pad("", 36)) concurrent Status: \(probe)")
        } catch {
            print("\(name): cannot start the prober: \(error)")
        }
    }

    // What pestod did in one loop turn before carrying the change out in slices.
    let decodingLine = { fixture.lastLogLine(containing: "decoded in") }
    let call = { (member: String, args: [DBusValue]) throws -> [DBusValue] in
        try client.call(busName, tablePath, tableInterface, member, args, timeoutMilliseconds: Int32(timeout * 1000))
    }
    phase("Apply: insert+activate \(n)") {
        let rules = zip(ids, addresses).map {
            DBusValue.structure([
                .uint32($0),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string($1.description)), ("first-port", .uint16(port)),
                ]),
            ])
        }
        let reply = try call(
            "Apply", [.array(element: "(ua{sv})", rules), .array(element: "u", []), .vardict([("max-failures", .uint32(1))])])
        let results = reply.first?.arrayValue ?? []
        let bound = results.reduce(0) { $0 + Int($1.structValue?[1].uint32Value ?? 0) }
        let failed = results.reduce(0) { $0 + Int($1.structValue?[2].uint32Value ?? 0) }
        return "\(results.count) rules, \(bound) sockets bound, \(failed) failed (EMFILE past the descriptor limit); "
            + decodingLine()
    }
    phase("Apply: remove \(n)") {
        _ = try call("Apply", [.array(element: "(ua{sv})", []), .array(element: "u", ids.map { .uint32($0) }), .vardict([])])
        return "done; " + decodingLine()
    }
    var upload: [UInt8] = [1, UInt8(n >> 24 & 0xFF), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)]
    upload.reserveCapacity(5 + 56 * n + 1)
    // Weak (flag 0x02), on an interface that does not exist.
    let ifname = Array("pesto-bench0".utf8) + [UInt8](repeating: 0, count: 4)
    for case .v4(let a) in addresses {
        let bytes = [UInt8(a >> 24), UInt8(a >> 16 & 0xFF), UInt8(a >> 8 & 0xFF), UInt8(a & 0xFF)]
        upload += WireClient.rule(address: bytes, first: port, flags: 0x02, ifname: ifname)
    }
    upload.append(0)
    phase("control socket: upload \(n) (new)") {
        _ = try uploadOnControlSocket(fixture.controlPath, upload, timeoutSeconds: timeout)
        return fixture.lastLogLine(containing: "control socket: update") + "; " + fixture.lastLogLine(containing: "compared with")
    }
    // The Status rule is not in the upload, so the first upload removes it: from then on the
    // prober's calls are answered NoSuchRule (counted as errors), still a full round trip.
    phase("control socket: upload \(n) (same)") {
        _ = try uploadOnControlSocket(fixture.controlPath, upload, timeoutSeconds: timeout)
        return fixture.lastLogLine(containing: "control socket: update")
    }
    let memory = fixture.memory()
    let kib = { (k: Int?) in k.map { "\(fixed(Double($0) / 1024, 1)) MiB" } ?? "?" }
    print("load average at end: \(loadAverage())   pestod peak RSS \(kib(memory.pestodPeak)); dbus-daemon peak RSS \(kib(memory.busPeak))")
}
