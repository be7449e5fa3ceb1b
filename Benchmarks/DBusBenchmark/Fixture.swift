// SPDX-License-Identifier: GPL-2.0-or-later

// The benchmark's world: a private dbus-daemon listening on a unix path socket in a temp dir,
// and a release pestod on it, ready once it has sent READY=1 to a NOTIFY_SOCKET we bind
// (PestoTestSupport's PrivateBus and ChildProcess.startReady, as in the tests).

import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A private bus and a pestod on it; `stop()` SIGKILLs both and removes the temp dir.
struct Fixture {
    /// The temp dir holding the bus config, the bus socket, the notify socket and pestod's log.
    let directory: TemporaryDirectory
    let bus: PrivateBus
    let pestod: ChildProcess
    /// The bus address (`unix:path=…,guid=…`) dbus-daemon printed.
    var address: String { bus.address }
    var pestodPID: pid_t { pestod.pid }
    /// pestod's stderr (its log).
    var logPath: String { directory.file("pestod.log") }
    /// Where pestod's control socket is when `controlPlaceholder` is among its arguments.
    var controlPath: String { directory.file("control.sock") }
    /// Stands for `controlPath` in `start`'s pestod arguments (the directory is made there).
    static let controlPlaceholder = "@CONTROL"

    /// Longest wait for the bus address or for READY=1.
    static let startTimeoutMilliseconds = 60_000  // generous: pestod may run under valgrind

    /// Creates the temp dir, starts dbus-daemon, then pestod, and waits (bounded) until pestod
    /// owns its name. Everything started is on the clean-up list before anything can fail.
    static func start(pestod: String, pestodArguments: [String]) throws -> Fixture {
        let dir = try TemporaryDirectory(prefix: "pesto-dbus-bench.")
        cleanup.add(directory: dir.path)
        let bus = try PrivateBus(directory: dir.path, stderr: .file(dir.file("bus.log")))
        cleanup.add(child: bus.process.pid)
        let log = dir.file("pestod.log")
        let arguments =
            ["--address", bus.address, "--authorize", "none"]
            + pestodArguments.map { $0 == controlPlaceholder ? dir.file("control.sock") : $0 }
        let pestodProcess = try ChildProcess.startReady(
            pestod, arguments, notifyPath: dir.file("notify.sock"), stdout: .file(dir.file("pestod.out")),
            stderr: .file(log), logPath: log, timeoutMilliseconds: startTimeoutMilliseconds,
            started: { cleanup.add(child: $0) })
        return Fixture(directory: dir, bus: bus, pestod: pestodProcess)
    }

    /// Peak and current RSS of pestod and of the bus daemon, in KiB, read before they stop.
    func memory() -> (pestodPeak: Int?, pestodNow: Int?, busPeak: Int?) {
        (procStatusKiB(pestodPID, "VmHWM"), procStatusKiB(pestodPID, "VmRSS"), procStatusKiB(bus.process.pid, "VmHWM"))
    }

    /// CPU seconds (user + system) pestod and the bus daemon have used so far, from
    /// /proc/PID/stat (clock-tick resolution: meaningful over seconds of work).
    func cpuSeconds() -> (pestod: Double, bus: Double) {
        (processCPUSeconds(pestodPID) ?? .nan, processCPUSeconds(bus.process.pid) ?? .nan)
    }

    /// Lines pestod has logged so far.
    func logLineCount() -> Int {
        (readTextFile(logPath) ?? "").utf8.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
    }

    /// The last line of pestod's log containing `text`, without its timestamp prefix ("" if none).
    func lastLogLine(containing text: String) -> String {
        let line = (readTextFile(logPath) ?? "").split(separator: "\n").last { $0.contains(text) } ?? ""
        guard let at = line.indices.first(where: { line[$0...].hasPrefix(text) }) else { return String(line) }
        return String(line[at...])
    }

    /// SIGKILLs pestod and dbus-daemon and removes the temp dir.
    func stop() { cleanup.run() }
}

extension String {
    /// The string without leading and trailing spaces, tabs and newlines.
    var trimmingSpaces: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}
