// SPDX-License-Identifier: GPL-2.0-or-later

// What runs beside the commits of pesto-large-bench: a Status prober (pesto-dbus-bench run as
// `--status-prober ADDRESS ID TIMEOUT`, a process with its own bus connection calling Status
// back to back) and a relayed echo prober (a thread sending one byte at a time through a rule of
// pestod's to an echo server and waiting for it to come back). Each reports its longest wait.

import PestoDBus
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

let busName = PestoBusNames.busName
let tablePath = PestoBusNames.tablePath(.host)
let tableInterface = PestoInterfaces.table.name

/// A running Status prober process: pesto-dbus-bench's (`--status-prober ADDRESS ID
/// TIMEOUT`, built beside this binary by run-large.sh), one process with its own bus
/// connection calling Status back to back, each call given up to a minute.
struct StatusProber {
    let child: ChildProcess

    static func start(address: String, id: UInt32) throws -> StatusProber {
        let prober = executableDirectory() + "/pesto-dbus-bench"
        return StatusProber(child: try ChildProcess(prober, ["--status-prober", address, String(id), "60"], stderr: .inherit))
    }

    /// Ends the probing; returns (calls, longest wait in ms).
    func finish() -> (calls: Int, maxMilliseconds: Double) {
        child.closeStdin()
        let line = child.readLine(timeoutMilliseconds: 120_000) ?? ""
        child.waitUntilExit()
        let words = line.split(separator: " ").map(String.init)
        func field(_ key: String) -> String? { words.firstIndex(of: key).flatMap { $0 + 1 < words.count ? words[$0 + 1] : nil } }
        return (Int(field("calls") ?? "") ?? 0, Double(field("max_ms") ?? "") ?? .nan)
    }
}

/// One byte at a time through a relayed TCP connection, back to back, on a thread.
final class EchoProber: Sendable {
    private let stopFlag = Atomic<Bool>(false)
    private let result = Mutex<(count: Int, maxSeconds: Double, errors: Int)>((0, 0, 0))
    private let done = Mutex<Bool>(false)

    /// Connects to 127.0.0.1:`port` (a rule relaying to an echo server) and starts.
    init?(port: UInt16) {
        guard case .success(let fd) = TestSockets.connect(port: port) else { return nil }
        TestSockets.setTimeouts(fd, milliseconds: 60_000)
        detachThread { [self] in
            var byte: UInt8 = 1
            while !self.stopFlag.load(ordering: .relaxed) {
                let start = monotonicSeconds()
                guard send(fd, &byte, 1, Int32(MSG_NOSIGNAL)) == 1, recv(fd, &byte, 1, 0) == 1 else {
                    self.result.withLock { $0.errors += 1 }
                    break
                }
                let took = monotonicSeconds() - start
                self.result.withLock {
                    $0.count += 1
                    $0.maxSeconds = max($0.maxSeconds, took)
                }
            }
            close(fd)
            self.done.withLock { $0 = true }
        }
    }

    /// Stops the prober; returns (round trips, longest in ms, errors).
    func finish() -> (count: Int, maxMilliseconds: Double, errors: Int) {
        stopFlag.store(true, ordering: .relaxed)
        while !done.withLock({ $0 }) { usleep(1000) }
        return result.withLock { ($0.count, $0.maxSeconds * 1000, $0.errors) }
    }
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM) in KiB; nil when absent.
func procStatusKiB(_ pid: pid_t, _ field: String) -> Int? {
    for line in (readTextFile("/proc/\(pid)/status") ?? "").split(separator: "\n") where line.hasPrefix(field + ":") {
        return line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { Int($0) }
    }
    return nil
}
