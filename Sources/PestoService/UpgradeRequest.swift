// SPDX-License-Identifier: GPL-2.0-or-later

// UpgradeRequest: `systemctl reload pestod` upgrades pestod in place, nginx-style.
//
// Theory of operation
// -------------------
// The unit's `ExecReload=pestod --reload-request $MAINPID` sends SIGUSR2 to the running
// pestod and waits for it to exit (`ReloadRequest`); it signals only the process that listens
// on the runtime directory's takeover socket (`ReloadRequest.listens`), never any other. On SIGUSR2 (an eventfd written by the
// signal handler and watched by the loop, so nothing runs in the handler), the running
// pestod starts the executable at the path it was started from — the installed binary,
// which an upgrade has replaced — with its own arguments plus `--replace`, its environment
// (NOTIFY_SOCKET, RUNTIME_DIRECTORY) and its standard descriptors (the journal), and goes on
// serving. The new pestod takes everything over through the takeover socket (Takeover.swift,
// doc/takeover.md), tells systemd `MAINPID=` (NotifyAccess=all) and `READY=1`, and this one
// exits once all is handed over; `--reload-request` sees it go and reports success.
//
// If the new pestod fails (it cannot start, the lock is held past its timeout, a format it
// does not speak), this one stays in charge as for any failed takeover: it reaps the child
// (looking every 100 ms while one runs), logs its exit status, and the reload request times
// out with an error. A second SIGUSR2 while an upgrade runs is logged and ignored.

import Logging
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Starts the installed pestod with `--replace` on SIGUSR2.
public final class UpgradeOnSignal: EventHandler {
    private let eventFD: Int32
    private unowned let loop: EventLoop
    private let logger: Logger
    /// The executable and the arguments of the pestod to start.
    private let executable: String
    private let arguments: [String]
    /// The new pestod while it runs, and the timer that reaps it.
    private var child: (pid: pid_t, timer: EventLoop.TimerID)?

    /// Installs the SIGUSR2 handler; `executable` is this process's (read at start) and
    /// `arguments` its own, to which `--replace` is added.
    public init(loop: EventLoop, logger: Logger, executable: String, arguments: [String]) throws(PestoError) {
        self.loop = loop
        self.logger = logger
        self.executable = executable
        self.arguments = arguments.contains("--replace") ? arguments : arguments + ["--replace"]
        switch Sys.eventFD() {
        case .success(let fd): eventFD = fd
        case .failure(let e): throw PestoError(.system, "Cannot create the upgrade request's eventfd.", underlyingError: e)
        }
        loop.setHandler(self, for: EngineEventKind.upgradeRequest)
        do throws(PestoError) {
            try loop.add(fd: eventFD, events: EventLoop.Events.readable, kind: EngineEventKind.upgradeRequest)
        } catch {
            Sys.close(eventFD)
            throw error
        }
        if case .failure(let e) = Sys.upgradeOnSignal(writingTo: eventFD) {
            loop.remove(fd: eventFD)
            Sys.close(eventFD)
            throw PestoError(.system, "Cannot install the SIGUSR2 handler.", underlyingError: e)
        }
    }

    deinit {
        loop.remove(fd: eventFD)
        Sys.close(eventFD)
    }

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        var value: UInt64 = 0
        _ = Sys.read(eventFD, &value, 8)
        if let child {
            logger.notice("upgrade requested (SIGUSR2) while the new pestod \(child.pid) is still starting: ignored")
            return
        }
        switch Sys.spawn(executable, arguments) {
        case .failure(let e):
            logger.error("upgrade requested (SIGUSR2): cannot start \(executable): \(e); this pestod stays in charge")
        case .success(let pid):
            logger.notice("upgrade requested (SIGUSR2): started \(executable) --replace as process \(pid)")
            let timer = loop.every(milliseconds: 100) { [unowned self] in self.reap() }
            child = (pid, timer)
        }
    }

    /// Looks whether the new pestod has ended (it only ends while this one runs if it failed).
    private func reap() {
        guard let child else { return }
        switch Sys.reap(child.pid) {
        case .success(nil): return
        case .success(let status?):
            logger.error("upgrade failed: the new pestod \(child.pid) exited with status \(status); this pestod stays in charge")
        case .failure(let e):
            logger.warning("upgrade: cannot wait for the new pestod \(child.pid): \(e)")
        }
        loop.cancelTimer(child.timer)
        self.child = nil
    }
}

/// `pestod --reload-request PID`: what the unit's ExecReload= runs.
///
/// It claims success only when it saw it happen: the running pestod must have a takeover
/// socket (found from its command line and environment as pestod finds it, RuntimeDirectory)
/// and be the process listening on it, else nothing is sent and it fails at once; after the
/// running pestod has exited, a successor must have opened its own takeover socket there (the same path, a
/// new file: `isAnotherFile`), else the request fails: the old pestod died rather than handed over.
public enum ReloadRequest {
    /// How long after the old pestod's exit the successor may take to open its takeover
    /// socket, at least: it may also use what is left of the request's whole timeout. (A
    /// loaded machine was seen to keep a successor from it for more than 5 s after a
    /// successful handover; a fixed 5 s then reported a failure that had not happened.)
    static let successorMilliseconds = 5_000

    /// Sends SIGUSR2 to `pid` and waits up to `timeoutMilliseconds` for it to exit and a
    /// successor to take its place. Throws, saying what it saw, otherwise.
    public static func run(pid: pid_t, timeoutMilliseconds: Int) throws(PestoError) {
        if case .failure(let e) = Sys.kill(pid, 0) {
            throw PestoError(.system, "Cannot send SIGUSR2 to pestod \(pid).", underlyingError: e)
        }
        guard let directory = takeoverDirectory(of: pid) else {
            throw PestoError(
                .system,
                "pestod \(pid) has no takeover socket (started without --runtime-dir or $RUNTIME_DIRECTORY on a bus with no default runtime directory: --address, or --session without $XDG_RUNTIME_DIR), so it cannot be upgraded in place; nothing was sent to it."
            )
        }
        let socketPath = directory + "/takeover.sock"
        guard case .success(let before) = Sys.lstat(socketPath), before.st_mode & S_IFMT == S_IFSOCK else {
            throw PestoError(
                .system, "pestod \(pid) has no takeover socket at \(socketPath), so it cannot be upgraded in place; nothing was sent to it."
            )
        }
        // Only a pestod may get the signal: SIGUSR2's default action ends any other process.
        // A command line naming the directory proves nothing (any process may have one); the
        // process that listens on the directory's takeover socket is the pestod serving it.
        guard listens(pid: pid, on: socketPath) else {
            throw PestoError(
                .system,
                "Process \(pid) is not the pestod serving \(directory): it does not listen on \(socketPath); nothing was sent to it."
            )
        }
        if case .failure(let e) = Sys.kill(pid, SIGUSR2) {
            throw PestoError(.system, "Cannot send SIGUSR2 to pestod \(pid).", underlyingError: e)
        }
        let deadline = MonotonicInstant.now.adding(milliseconds: timeoutMilliseconds)
        while !hasExited(pid) {
            guard MonotonicInstant.now < deadline else {
                throw PestoError(
                    .system,
                    "pestod \(pid) is still running after \(timeoutMilliseconds) ms: the upgrade did not complete and it stays in charge (see its log)."
                )
            }
            usleep(10_000)  // another process's exit has no readiness signal we can wait on
        }
        let successorDeadline = max(deadline, MonotonicInstant.now.adding(milliseconds: successorMilliseconds))
        while MonotonicInstant.now < successorDeadline {
            if case .success(let now) = Sys.lstat(socketPath), now.st_mode & S_IFMT == S_IFSOCK, isAnotherFile(now, than: before) {
                return
            }
            usleep(10_000)
        }
        throw PestoError(
            .system,
            "pestod \(pid) exited, but no successor opened \(socketPath) within \(timeoutMilliseconds) ms of the request (or \(successorMilliseconds) ms of its exit): it did not hand over (see its log)."
        )
    }

    /// Whether `now` is another file than `before` at the same path. The inode number alone
    /// does not tell: ext4 gives a file created right after an unlink the inode number just
    /// freed (seen every time on the test machine), so a successor's new takeover socket can
    /// carry the old one's number. Its change time cannot be the old file's: it is set when
    /// the successor creates it, after the old file was made (nanoseconds).
    static func isAnotherFile(_ now: stat, than before: stat) -> Bool {
        now.st_dev != before.st_dev || now.st_ino != before.st_ino || now.st_ctim.tv_sec != before.st_ctim.tv_sec
            || now.st_ctim.tv_nsec != before.st_ctim.tv_nsec
    }

    /// The takeover socket's directory of process `pid`, as pestod itself finds it
    /// (RuntimeDirectory) from its command line and environment: `--runtime-dir`, else its
    /// `$RUNTIME_DIRECTORY`, else the default of its bus; nil when it has none or its /proc
    /// files cannot be read.
    static func takeoverDirectory(of pid: pid_t) -> String? {
        func fields(_ name: String) -> [String]? {
            readFile("/proc/\(pid)/\(name)", limit: 1 << 20).map { bytes in
                bytes.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            }
        }
        var option: String?
        var address = false
        var session = false
        guard let arguments = fields("cmdline") else { return nil }
        for (i, argument) in arguments.enumerated() {
            if argument == "--runtime-dir", i + 1 < arguments.count {
                option = arguments[i + 1]
            } else if argument.hasPrefix("--runtime-dir=") {
                option = String(argument.dropFirst("--runtime-dir=".count))
            }
            address = address || argument == "--address" || argument.hasPrefix("--address=")
            session = session || argument == "--session"
        }
        let environment = fields("environ") ?? []
        func variable(_ name: String) -> String? {
            environment.first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
        }
        // The same rule pestod follows for itself, defaults included.
        let found = RuntimeDirectory.resolve(
            option: option, systemd: variable("RUNTIME_DIRECTORY"), address: address, session: session,
            xdgRuntimeDir: variable("XDG_RUNTIME_DIR"))
        guard let directory = found, !directory.isEmpty else { return nil }
        if directory.hasPrefix("/") { return directory }
        // Relative to that process's working directory.
        guard case .success(let cwd) = Sys.readLink("/proc/\(pid)/cwd") else { return nil }
        return cwd + "/" + directory
    }

    /// Whether process `pid` holds the listening UNIX socket bound at `socketPath`: the
    /// socket inodes /proc/net/unix lists as listening at that path (a relative path as bound,
    /// resolved against the process's working directory) against the `socket:[inode]` links
    /// of /proc/PID/fd. False when any of them cannot be read: then nothing is known.
    static func listens(pid: pid_t, on socketPath: String) -> Bool {
        guard let table = readFile("/proc/net/unix", limit: 64 << 20) else { return false }
        let cwd = (try? Sys.readLink("/proc/\(pid)/cwd").get()) ?? ""
        var inodes = Set<String>()
        // "Num RefCount Protocol Flags Type St Inode Path"; __SO_ACCEPTCON (0x10000) in Flags
        // marks a listening socket. The path is the rest of the line (it may hold spaces).
        for line in table.split(separator: UInt8(ascii: "\n")).dropFirst() {
            let fields = line.split(separator: UInt8(ascii: " "), maxSplits: 7, omittingEmptySubsequences: true)
            guard fields.count == 8, let flags = UInt32(String(decoding: fields[3], as: UTF8.self), radix: 16),
                flags & 0x10000 != 0
            else { continue }
            let bound = String(decoding: fields[7], as: UTF8.self)
            if bound == socketPath || (!bound.hasPrefix("/") && !bound.hasPrefix("@") && cwd + "/" + bound == socketPath) {
                inodes.insert(String(decoding: fields[6], as: UTF8.self))
            }
        }
        guard !inodes.isEmpty, case .success(let descriptors) = Sys.directoryEntries("/proc/\(pid)/fd") else { return false }
        for fd in descriptors {
            guard case .success(let target) = Sys.readLink("/proc/\(pid)/fd/\(fd)"), target.hasPrefix("socket:[") else { continue }
            if inodes.contains(String(target.dropFirst("socket:[".count).dropLast())) { return true }
        }
        return false
    }

    /// Whether `pid` is gone or a zombie (exited, not yet reaped by its parent).
    static func hasExited(_ pid: pid_t) -> Bool {
        if case .failure(let e) = Sys.kill(pid, 0), e == Errno(rawValue: ESRCH) { return true }
        guard let stat = readFile("/proc/\(pid)/stat", limit: 4096) else { return true }
        // "PID (comm) S ...": the state follows the last ')'.
        guard let close = stat.lastIndex(of: UInt8(ascii: ")")), close + 2 < stat.count else { return false }
        return stat[close + 2] == UInt8(ascii: "Z") || stat[close + 2] == UInt8(ascii: "X")
    }
}
