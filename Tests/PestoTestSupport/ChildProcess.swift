// SPDX-License-Identifier: GPL-2.0-or-later

// ChildProcess: the processes the tests and benchmarks start (dbus-daemon, pestod, the tools,
// pesto-test-peer), with Glibc alone (this target must not import Foundation).
//
// A child is started with posix_spawn: an empty signal mask and default dispositions for the
// signals a parent may block or ignore (children of a Swift Testing process would otherwise
// inherit a blocked SIGTERM, doc/platform-notes.md), only the descriptors the file actions put
// in place (every other one is closed in the child), and our environment plus the overrides.
// Every wait is a poll with a deadline; a child is stopped with SIGKILL and reaped.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A failure of a test or benchmark helper, with one sentence for the reader.
public struct HarnessError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A started child process, SIGKILLed and reaped when the value goes away.
public final class ChildProcess {
    /// Where one of the child's standard descriptors goes (or comes from, for stdin).
    public enum Stream {
        /// Our own descriptor, unchanged.
        case inherit
        /// /dev/null.
        case devNull
        /// A new pipe whose other end this object keeps (`send` for stdin, `readLine` for stdout).
        case pipe
        /// A descriptor of ours (e.g. a pipe's end), dup2'ed into place.
        case descriptor(Int32)
        /// A file, created or truncated (or appended to).
        case file(String, append: Bool = false)
    }

    public let pid: pid_t
    /// Our end of the child's stdin, when it is a `.pipe` (closed by `closeStdin` or at the end).
    public private(set) var stdinFD: Int32?
    /// Our end of the child's stdout, when it is a `.pipe`.
    public let stdoutFD: Int32?
    private let stdoutLines: LineReader?
    /// The exit code (or 128+signal) once the child has been reaped.
    public private(set) var terminationStatus: Int32?

    /// Starts `program` (searched in PATH when it has no slash) with `arguments`.
    public init(
        _ program: String, _ arguments: [String], environment: [String: String] = [:],
        stdin: Stream = .pipe, stdout: Stream = .pipe, stderr: Stream = .devNull
    ) throws {
        var ours: [Int32] = []  // our ends of the pipes
        var theirs: [Int32] = []  // the child's ends, closed here once it has them
        var stdinWrite: Int32?
        var stdoutRead: Int32?
        func resolve(_ stream: Stream, input: Bool) throws -> Stream {
            guard case .pipe = stream else { return stream }
            let p = try makePipe()
            if input {
                stdinWrite = p.write
                ours.append(p.write)
                theirs.append(p.read)
                return .descriptor(p.read)
            }
            stdoutRead = p.read
            ours.append(p.read)
            theirs.append(p.write)
            return .descriptor(p.write)
        }
        do {
            let inStream = try resolve(stdin, input: true)
            let outStream = try resolve(stdout, input: false)
            pid = try Self.spawn(program, arguments, environment: environment, stdin: inStream, stdout: outStream, stderr: stderr)
        } catch {
            for fd in ours + theirs { close(fd) }
            throw error
        }
        for fd in theirs { close(fd) }
        stdinFD = stdinWrite
        stdoutFD = stdoutRead
        stdoutLines = stdoutRead.map { LineReader(fd: $0) }
    }

    deinit {
        kill()
        if let stdinFD { close(stdinFD) }
        if let stdoutFD { close(stdoutFD) }
    }

    /// Reads stdout up to the next newline; nil at end of file or after `timeoutMilliseconds`
    /// (30 s by default: nothing waits for ever on a child that stopped answering).
    public func readLine(timeoutMilliseconds: Int32 = 30_000) -> String? {
        stdoutLines?.line(timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Writes `line` and a newline to stdin (a child that is gone makes it a no-op: EPIPE).
    public func send(_ line: String) {
        guard let stdinFD else { return }
        Self.ignoreSIGPIPE
        writeAll(stdinFD, Array((line + "\n").utf8))
    }

    /// SIGPIPE ignored in this process, once: a write to a child that has gone is an EPIPE
    /// error, never the end of the test run (a pipe has no MSG_NOSIGNAL).
    private static let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    /// Sends one line on stdin and returns the answer line ("<eof>" when none came).
    public func ask(_ line: String, timeoutMilliseconds: Int32 = 30_000) -> String {
        send(line)
        return readLine(timeoutMilliseconds: timeoutMilliseconds) ?? "<eof>"
    }

    /// Closes our end of stdin: the child reads end of file.
    public func closeStdin() {
        if let stdinFD { close(stdinFD) }
        stdinFD = nil
    }

    /// True until the child has ended (reaping it when it has).
    public var isRunning: Bool {
        if terminationStatus != nil { return false }
        var status: Int32 = 0
        switch waitpid(pid, &status, WNOHANG) {
        case 0: return true
        case pid: terminationStatus = Self.exitCode(status)
        default: terminationStatus = -1  // ECHILD: reaped elsewhere (a benchmark's clean-up list)
        }
        return false
    }

    /// Waits for the child to end; its exit code, or 128+signal.
    @discardableResult
    public func waitUntilExit() -> Int32 {
        if let terminationStatus { return terminationStatus }
        let code = Self.waitExit(pid)
        terminationStatus = code
        return code
    }

    /// SIGKILL and reap (SIGTERM may be blocked in the child; SIGKILL cannot be).
    public func kill() {
        guard isRunning else { return }
        Glibc.kill(pid, SIGKILL)
        waitUntilExit()
    }

    // MARK: Spawning

    /// Starts `program` with posix_spawn (posix_spawnp when it has no slash) and returns its PID.
    /// The child gets an empty signal mask and default dispositions for SIGINT, SIGTERM, SIGHUP
    /// and SIGPIPE, our environment with `environment` overriding, `stdin`/`stdout`/`stderr` as
    /// given (a `.pipe` here is /dev/null: the class makes pipes), and no other descriptor.
    public static func spawn(
        _ program: String, _ arguments: [String], environment: [String: String] = [:],
        stdin: Stream = .devNull, stdout: Stream = .inherit, stderr: Stream = .inherit
    ) throws -> pid_t {
        var argv: [UnsafeMutablePointer<CChar>?] = ([program] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var envStrings = environment.map { "\($0.key)=\($0.value)" }
        var e: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = environ
        while let entry = e?.pointee {
            let text = String(cString: entry)
            let key = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? text
            if environment[key] == nil { envStrings.append(text) }
            e = e?.advanced(by: 1)
        }
        var envp: [UnsafeMutablePointer<CChar>?] = envStrings.map { strdup($0) } + [nil]
        defer { for p in envp { free(p) } }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (fd, stream) in [(Int32(0), stdin), (Int32(1), stdout), (Int32(2), stderr)] {
            switch stream {
            case .inherit: break
            case .devNull, .pipe: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
            case .descriptor(let from): posix_spawn_file_actions_adddup2(&actions, from, fd)
            case .file(let path, let append):
                posix_spawn_file_actions_addopen(&actions, fd, path, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0o644)
            }
        }
        pesto_spawn_closefrom(&actions, 3)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var pid: pid_t = 0
        let rc =
            program.contains("/")
            ? posix_spawn(&pid, program, &actions, &attr, &argv, &envp)
            : posix_spawnp(&pid, program, &actions, &attr, &argv, &envp)
        guard rc == 0 else { throw HarnessError("cannot start \(program): \(Errno(rawValue: rc))") }
        return pid
    }

    /// Waits for `pid` to end and returns its exit code, or 128+signal (-1 when it is not our child).
    public static func waitExit(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return -1 }
        }
        return exitCode(status)
    }

    /// The exit code of `pid` if it has already ended (reaping it), nil while it runs.
    public static func exitedYet(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == pid ? exitCode(status) : nil
    }

    /// Decodes a waitpid status (the W* macros do not import into Swift).
    public static func exitCode(_ status: Int32) -> Int32 {
        let signal = status & 0x7f
        return signal == 0 ? (status >> 8) & 0xff : 128 + signal
    }
}

/// Runs a command to completion (SIGKILLed if it outlives `timeoutMilliseconds`); returns its
/// exit status and what it wrote on stdout and stderr.
@discardableResult
public func run(
    _ program: String, _ arguments: [String], environment: [String: String] = [:],
    timeoutMilliseconds: Int = 120_000
) throws -> (status: Int32, out: String, err: String) {
    let out = try makePipe()
    let err: (read: Int32, write: Int32)
    do { err = try makePipe() } catch {
        close(out.read)
        close(out.write)
        throw error
    }
    let pid: pid_t
    do {
        pid = try ChildProcess.spawn(
            program, arguments, environment: environment, stdout: .descriptor(out.write), stderr: .descriptor(err.write))
    } catch {
        for fd in [out.read, out.write, err.read, err.write] { close(fd) }
        throw error
    }
    close(out.write)
    close(err.write)
    defer {
        close(out.read)
        close(err.read)
    }
    // Both pipes at once: a child that fills the one we are not reading would block for ever.
    let deadline = MonotonicInstant.now.adding(milliseconds: timeoutMilliseconds)
    var texts: [[UInt8]] = [[], []]
    var open = [true, true]
    var buffer = [UInt8](repeating: 0, count: 65_536)
    while open[0] || open[1] {
        var pfds = [
            pollfd(fd: open[0] ? out.read : -1, events: Int16(POLLIN), revents: 0),
            pollfd(fd: open[1] ? err.read : -1, events: Int16(POLLIN), revents: 0),
        ]
        let ready = poll(&pfds, 2, millisecondsLeft(deadline))
        if ready < 0 && errno == EINTR { continue }
        // poll waits a minute at most (millisecondsLeft): a quiet minute is not the deadline.
        if ready == 0 && millisecondsLeft(deadline) > 0 { continue }
        if ready <= 0 { break }
        for k in 0..<2 where pfds[k].revents != 0 {
            let n = read(pfds[k].fd, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { open[k] = false } else { texts[k] += buffer[0..<n] }
        }
    }
    let status: Int32
    if let done = ChildProcess.exitedYet(pid), !open[0] && !open[1] {
        status = done
    } else {
        if open[0] || open[1] { kill(pid, SIGKILL) }  // still writing at the deadline
        status = ChildProcess.waitExit(pid)
    }
    return (status, String(decoding: texts[0], as: UTF8.self), String(decoding: texts[1], as: UTF8.self))
}

/// Milliseconds left until `deadline` (0 when past, at most a minute), for poll(2).
public func millisecondsLeft(_ deadline: MonotonicInstant) -> Int32 {
    let now = MonotonicInstant.now
    guard now < deadline else { return 0 }
    return Int32(min((deadline.nanoseconds - now.nanoseconds) / 1_000_000 + 1, 60_000))
}

/// A pipe whose two ends are close-on-exec (a child gets only what a spawn dup2's for it).
public func makePipe() throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    guard pesto_pipe2(&fds, Int32(PESTO_O_CLOEXEC)) == 0 else { throw HarnessError("pipe failed: \(Errno.current)") }
    return (fds[0], fds[1])
}

/// Writes all of `bytes` to `fd`; gives up on an error.
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        off += n
    }
}

/// Reads lines from a descriptor with a deadline per line (poll, never an endless wait).
public final class LineReader {
    public let fd: Int32
    private var buffered: [UInt8] = []

    public init(fd: Int32) { self.fd = fd }

    /// The next line without its newline; nil at end of file or after the timeout.
    public func line(timeoutMilliseconds: Int32) -> String? {
        line(until: MonotonicInstant.now.adding(milliseconds: Int(timeoutMilliseconds)))
    }

    /// The next line without its newline; nil at end of file or once `deadline` has passed.
    public func line(until deadline: MonotonicInstant) -> String? {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let nl = buffered.firstIndex(of: 0x0A) {
                let text = String(decoding: buffered[..<nl], as: UTF8.self)
                buffered.removeSubrange(...nl)
                return text
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, millisecondsLeft(deadline))
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { return nil }
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            buffered += chunk[0..<n]
        }
    }
}
