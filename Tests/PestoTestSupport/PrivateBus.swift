// SPDX-License-Identifier: GPL-2.0-or-later

// A private dbus-daemon and services started on it, as the tests and benchmarks run them.
//
// Readiness is never guessed with sleeps: dbus-daemon prints its address when it listens (on
// a pipe we read), and a service such as pestod sends READY=1 to a NOTIFY_SOCKET datagram
// socket we bind. Both waits are bounded, and a service that dies first is reported at once.

import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A private bus: dbus-daemon with a session-type configuration, a permissive policy and a
/// unix path socket, or a configuration file of the caller's. SIGKILLed when the value goes away.
public final class PrivateBus {
    /// The dbus-daemon process.
    public let process: ChildProcess
    /// The bus address (`unix:path=…,guid=…`) dbus-daemon printed.
    public let address: String

    /// The session-type configuration with a permissive policy (doc/platform-notes.md),
    /// listening on `socketPath` only.
    public static func permissiveConfiguration(socketPath: String) -> String {
        """
        <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
         "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
        <busconfig>
          <type>session</type>
          <listen>unix:path=\(socketPath)</listen>
          <auth>EXTERNAL</auth>
          <policy context="default">
            <allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
          </policy>
        </busconfig>

        """
    }

    /// Writes the permissive configuration to `directory`/bus.conf (socket `directory`/bus.sock)
    /// and starts dbus-daemon on it.
    public convenience init(directory: String, stderr: ChildProcess.Stream = .devNull) throws {
        let config = directory + "/bus.conf"
        try writeFile(config, Self.permissiveConfiguration(socketPath: directory + "/bus.sock"))
        try self.init(configFile: config, stderr: stderr)
    }

    /// Starts dbus-daemon with `configFile` and waits (10 s at most) for its address.
    public init(configFile: String, stderr: ChildProcess.Stream = .devNull) throws {
        process = try ChildProcess(
            "/usr/bin/dbus-daemon", ["--config-file=\(configFile)", "--nofork", "--print-address=1"],
            stdin: .devNull, stdout: .pipe, stderr: stderr)
        guard let line = process.readLine(timeoutMilliseconds: 10_000), line.hasPrefix("unix:") else {
            throw HarnessError("dbus-daemon printed no address")
        }
        address = line
    }

    /// SIGKILLs the daemon.
    public func stop() { process.kill() }
}

/// A datagram socket that receives sd_notify messages (NOTIFY_SOCKET).
public final class NotifySocket {
    public let fd: Int32
    public let path: String

    /// Binds a unix datagram socket at `path` (close-on-exec: children must not inherit it).
    public init(path: String) throws {
        self.path = path
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket failed: \(Errno.current)") }
        guard SocketAddress(unixPath: path)?.withSockaddr({ bind(fd, $0, $1) }) == 0 else {
            let e = Errno.current
            close(fd)
            throw HarnessError("cannot bind \(path): \(e)")
        }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// Waits for a datagram with a READY=1 line; false after `timeoutMilliseconds`, or as soon
    /// as `process` (the service expected to send it) has ended.
    public func waitForReady(timeoutMilliseconds: Int, process: ChildProcess? = nil) -> Bool {
        let deadline = MonotonicInstant.now.adding(milliseconds: timeoutMilliseconds)
        var buffer = [UInt8](repeating: 0, count: 512)
        while true {
            if let process, !process.isRunning { return false }
            let left = millisecondsLeft(deadline)
            if left == 0 { return false }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, min(left, 100)) == 1 else { continue }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n > 0, String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").contains("READY=1") { return true }
        }
    }
}

extension ChildProcess {
    /// Starts a service (pestod) with NOTIFY_SOCKET set to a socket bound at `notifyPath` and
    /// waits for its READY=1; throws, with the end of `logPath`, when it exits first or
    /// `timeoutMilliseconds` pass. `started` learns the PID before the wait (a clean-up list).
    public static func startReady(
        _ program: String, _ arguments: [String], environment: [String: String] = [:], notifyPath: String,
        stdout: Stream = .devNull, stderr: Stream, logPath: String? = nil, timeoutMilliseconds: Int = 20_000,
        started: (pid_t) -> Void = { _ in }
    ) throws -> ChildProcess {
        let notify = try NotifySocket(path: notifyPath)
        var env = environment
        env["NOTIFY_SOCKET"] = notifyPath
        let child = try ChildProcess(program, arguments, environment: env, stdin: .devNull, stdout: stdout, stderr: stderr)
        started(child.pid)
        guard notify.waitForReady(timeoutMilliseconds: timeoutMilliseconds, process: child) else {
            let log = logPath.flatMap(readTextFile).map { ":\n" + String($0.suffix(4000)) } ?? ""
            let name = program.split(separator: "/").last.map(String.init) ?? program
            if let code = child.terminationStatus { throw HarnessError("\(name) exited with status \(code) before READY=1\(log)") }
            throw HarnessError("\(name) sent no READY=1 within \(timeoutMilliseconds) ms\(log)")
        }
        return child
    }
}
