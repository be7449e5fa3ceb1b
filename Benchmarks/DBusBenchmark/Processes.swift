// SPDX-License-Identifier: GPL-2.0-or-later

// Clean-up and process figures for pesto-dbus-bench. Starting children, bounded waits and files
// are PestoTestSupport's (ChildProcess, LineReader, TemporaryDirectory); what is here is the one
// clean-up list that both the normal exit path and a signal-watching thread drain, so children
// are SIGKILLed and the temp dir removed whichever way we leave, and /proc figures.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Writes `text` and a newline to stderr (no Foundation, no C `stderr` global).
func printError(_ text: String) {
    fflush(nil)  // what we printed to stdout so far comes first
    writeAll(2, Array((text + "\n").utf8))
}

/// Every resource that must not outlive the benchmark; safe to use from any thread.
final class CleanupList: Sendable {
    private struct State {
        var children: [pid_t] = []
        var directories: [String] = []
        var done = false
    }
    private let state = Mutex(State())

    /// Remembers a child to SIGKILL at the end (or kills it at once if the end has come).
    func add(child: pid_t) {
        let late = state.withLock { s -> Bool in
            if !s.done { s.children.append(child) }
            return s.done
        }
        if late { kill(child, SIGKILL) }
    }

    /// Forgets a child that has been reaped already.
    func remove(child: pid_t) { state.withLock { $0.children.removeAll { $0 == child } } }

    /// Remembers a temp dir to remove at the end (one per fixture).
    func add(directory: String) { state.withLock { $0.directories.append(directory) } }

    /// SIGKILLs and reaps every remembered child, then removes the temp dirs. Runs once; the
    /// lock is held throughout, so a second caller (the main thread racing the signal thread)
    /// returns only when the first has finished, and never exits under its feet.
    func run() {
        state.withLock { s in
            if s.done { return }
            s.done = true
            for pid in s.children {
                kill(pid, SIGKILL)  // SIGTERM may be blocked in the child; SIGKILL cannot be.
                _ = ChildProcess.waitExit(pid)  // -1 (ECHILD): reaped elsewhere
            }
            s.children.removeAll()
            for directory in s.directories { TemporaryDirectory.remove(directory) }
            s.directories.removeAll()
        }
    }
}

/// The process-wide clean-up list (a `let` of a Sendable type: fine in Swift 6).
let cleanup = CleanupList()

/// Blocks SIGINT, SIGTERM and SIGHUP in this (the main) thread and starts a thread that waits
/// for them with sigwait(3), runs the clean-up list and exits 128+signal. Call before any other
/// thread exists so every thread inherits the mask. Children get an empty mask (ChildProcess).
func installSignalCleanup() {
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
    pthread_sigmask(SIG_BLOCK, &set, nil)
    var tid = pthread_t()
    let rc = pthread_create(
        &tid, nil,
        { _ in
            var set = sigset_t()
            sigemptyset(&set)
            for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
            var sig: Int32 = 0
            if sigwait(&set, &sig) == 0 {
                printError("pesto-dbus-bench: signal \(sig), stopping children and removing the temp dir")
                cleanup.run()
                _exit(128 + sig)
            }
            return nil
        }, nil)
    if rc == 0 { pthread_detach(tid) }
}

/// A `kB` field of /proc/PID/status (e.g. "VmHWM", the peak RSS) in KiB; nil when absent.
func procStatusKiB(_ pid: pid_t, _ field: String) -> Int? {
    for line in (readTextFile("/proc/\(pid)/status") ?? "").split(separator: "\n") where line.hasPrefix(field + ":") {
        return line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { Int($0) }
    }
    return nil
}

/// User plus system CPU seconds of process `pid` so far (/proc/PID/stat fields 14 and 15,
/// in clock ticks); nil when unreadable.
func processCPUSeconds(_ pid: pid_t) -> Double? {
    guard let text = readTextFile("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
    // After the command name: field 3 (state) is index 0, so utime (14) is 11 and stime (15) 12.
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// CPU seconds this process (every thread) has used so far.
func ownCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// The lowest CPU this process may run on, nil when unknown (sched_getaffinity, in CPestoSys).
func firstAllowedCPU() -> Int? {
    let cpu = pesto_first_allowed_cpu()
    return cpu >= 0 ? Int(cpu) : nil
}

/// Pins this process (and so every child it spawns later, which inherits the mask) to `cpu`.
func pin(toCPU cpu: Int) throws {
    guard let c = Int32(exactly: cpu), pesto_pin_to_cpu(c) == 0 else {
        throw HarnessError("cannot pin to CPU \(cpu): \(Errno.current)")
    }
}
