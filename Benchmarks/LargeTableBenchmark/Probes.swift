// SPDX-License-Identifier: GPL-2.0-or-later

// What runs beside the commits of pesto-large-bench: a Status prober (this binary run as
// `--status-prober ADDRESS ID`, a process with its own bus connection calling Status back to
// back) and a relayed echo prober (a thread sending one byte at a time through a rule of
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

/// Runs as the prober: `Status(id)` back to back until stdin reports EOF, then one line
/// `calls N median_ms X max_ms Y errors E` on stdout.
func runStatusProber(address: String, id: UInt32) -> Never {
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
            _ = try connection.call(busName, tablePath, tableInterface, "Status", [.uint32(id)], timeoutMilliseconds: 60_000)
        } catch {
            errors += 1
        }
        latencies.append(monotonicSeconds() - start)
    }
    let sorted = latencies.sorted()
    let med = sorted.isEmpty ? 0 : sorted[sorted.count / 2]
    print("calls \(latencies.count) median_ms \(fixed(med * 1000, 2)) max_ms \(fixed((sorted.last ?? 0) * 1000, 2)) errors \(errors)")
    exit(0)
}

/// A running Status prober process.
struct StatusProber {
    let child: ChildProcess

    static func start(address: String, id: UInt32) throws -> StatusProber {
        let me = executableDirectory() + "/pesto-large-bench"
        return StatusProber(child: try ChildProcess(me, ["--status-prober", address, String(id)], stderr: .inherit))
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
