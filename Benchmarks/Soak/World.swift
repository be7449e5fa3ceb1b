// SPDX-License-Identifier: GPL-2.0-or-later

// The soak's world: a private dbus-daemon (session configuration, a unix path socket in a temp
// dir) and a release pestod on it with `--state` and `--control` in the same dir, which the
// chaos loop SIGKILLs and starts again with the same state file. pestod reports READY=1 to a
// NOTIFY_SOCKET datagram socket we bind, so every start is waited for without guessing.

import Foundation
import PestoEngine
import PestoSystem
import PestoModel

/// A soak failure with one sentence for the user.
struct SoakError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The bus, pestod and their files. Only the main (chaos) thread starts or kills pestod;
/// workers use only the `let` paths.
final class World {
    let directory: String
    let busAddress: String
    let statePath: String
    let controlPath: String
    let logPath: String
    let pestodPath: String
    let peerPath: String
    private let bus: Process
    private var pestod: Process?
    private let notifyFD: Int32
    private let extraArguments: [String]
    private var stopped = false

    /// Starts dbus-daemon in a fresh temp dir and binds the notify socket; pestod is started by `startPestod`.
    init(productDirectory: String, pestodArguments: [String]) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("pesto-soak-\(getpid())").path
        try? FileManager.default.removeItem(atPath: directory)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        statePath = directory + "/state"
        controlPath = directory + "/control"
        logPath = directory + "/pestod.log"
        pestodPath = productDirectory + "/pestod"
        peerPath = productDirectory + "/pesto-test-peer"
        extraArguments = pestodArguments
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)

        bus = Process()
        bus.executableURL = URL(fileURLWithPath: "/usr/bin/dbus-daemon")
        bus.arguments = ["--session", "--nofork", "--print-address=1", "--address=unix:path=\(directory)/bus.sock"]
        let out = Pipe()
        bus.standardOutput = out
        bus.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try bus.run()
        guard let line = LineReader(fd: out.fileHandleForReading.fileDescriptor).line(timeoutMilliseconds: 10_000),
              line.hasPrefix("unix:")
        else { throw SoakError("dbus-daemon printed no address") }
        busAddress = line

        let path = directory + "/notify.sock"
        notifyFD = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard notifyFD >= 0, SocketAddress(unixPath: path)?.withSockaddr({ bind(notifyFD, $0, $1) }) == 0 else {
            throw SoakError("cannot bind the notify socket \(path): errno \(errno)")
        }
    }

    /// Starts pestod with the state file and control socket and waits (bounded) for READY=1.
    func startPestod() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: pestodPath)
        p.arguments = ["--address", busAddress, "--state", statePath, "--control", controlPath] + extraArguments
        var env = ProcessInfo.processInfo.environment
        env["NOTIFY_SOCKET"] = directory + "/notify.sock"
        p.environment = env
        let log = FileHandle(forWritingAtPath: logPath)
        log?.seekToEndOfFile()
        p.standardError = log
        p.standardOutput = log
        try p.run()
        pestod = p
        let deadline = Date().addingTimeInterval(30)
        var buffer = [UInt8](repeating: 0, count: 512)
        while Date() < deadline {
            guard p.isRunning else { throw SoakError("pestod exited with status \(p.terminationStatus) at start; see \(logPath)") }
            var pfd = pollfd(fd: notifyFD, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 100) == 1 else { continue }
            let n = recv(notifyFD, &buffer, buffer.count, 0)
            if n > 0, String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").contains("READY=1") { return }
        }
        throw SoakError("pestod sent no READY=1 within 30 s; see \(logPath)")
    }

    /// SIGKILLs pestod and reaps it.
    func killPestod() {
        guard let p = pestod else { return }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        pestod = nil
    }

    /// True while the pestod we started runs.
    var pestodRunning: Bool { pestod?.isRunning ?? false }

    /// Kills pestod and the bus and removes the temp dir (unless `keep`).
    func stop(keep: Bool) {
        guard !stopped else { return }
        stopped = true
        killPestod()
        if bus.isRunning { kill(bus.processIdentifier, SIGKILL) }
        bus.waitUntilExit()
        close(notifyFD)
        if !keep { try? FileManager.default.removeItem(atPath: directory) }
    }
}

/// Reads lines from a descriptor with a timeout per line (poll, never an endless wait).
final class LineReader {
    let fd: Int32
    private var buffered: [UInt8] = []

    init(fd: Int32) { self.fd = fd }

    /// The next line without its newline; nil at end of file or after the timeout.
    func line(timeoutMilliseconds: Int32) -> String? {
        let deadline = Date().addingTimeInterval(Double(timeoutMilliseconds) / 1000)
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let nl = buffered.firstIndex(of: 0x0A) {
                let text = String(decoding: buffered[..<nl], as: UTF8.self)
                buffered.removeSubrange(...nl)
                return text
            }
            let left = Int32(max(0, deadline.timeIntervalSinceNow * 1000))
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, left)
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { return nil }
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            buffered += chunk[0..<n]
        }
    }
}
