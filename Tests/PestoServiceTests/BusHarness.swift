// SPDX-License-Identifier: GPL-2.0-or-later

// Test harness: a private dbus-daemon, a real pestod on it, command-line D-Bus tools, and
// an in-process client, all started by the test and killed (SIGKILL) when it ends.
//
// Readiness is never guessed with sleeps: dbus-daemon prints its address when it listens,
// pestod sends READY=1 to a NOTIFY_SOCKET datagram socket the harness binds, and the peer
// process prints "ready". Children of a Swift Testing process inherit a blocked SIGTERM,
// so they are always stopped with SIGKILL (doc/platform-notes.md).

import Foundation
import PestoEngine
import PestoSystem
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// Where the built products are: next to the test bundle.
enum Products {
    static var directory: URL {
        URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "")
            .deletingLastPathComponent()
    }
    static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    /// The repository root (for the shipped files under dbus/).
    static var repository: URL {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url
    }
}

/// A temporary directory removed when the value goes away.
final class TemporaryDirectory {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("pesto-test-\(UUID().uuidString.prefix(8))")
        // Readable by all: tests run clients as an unprivileged user against a bus socket here.
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
    }
    deinit { try? FileManager.default.removeItem(at: url) }
}

/// A child process, killed with SIGKILL when the value goes away.
final class Child {
    let process = Process()
    let stdout = Pipe()
    let stderr = Pipe()
    let stdin = Pipe()
    private var buffered = Data()

    /// Starts `executable`; its stderr goes to `stderrFile` when given (a file never fills up
    /// and blocks the child the way an unread pipe does), else to a pipe.
    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:], stderrFile: URL? = nil) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardOutput = stdout
        if let stderrFile {
            _ = FileManager.default.createFile(atPath: stderrFile.path, contents: nil)
            process.standardError = try FileHandle(forWritingTo: stderrFile)
        } else {
            process.standardError = stderr
        }
        process.standardInput = stdin
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// Reads stdout up to the next newline; nil at end of file or after `timeoutMilliseconds`
    /// (30 s by default: a test never hangs on a child that stopped answering).
    func readLine(timeoutMilliseconds: Int32 = 30_000) -> String? {
        while true {
            if let nl = buffered.firstIndex(of: 0x0A) {
                let line = String(decoding: buffered[buffered.startIndex..<nl], as: UTF8.self)
                buffered.removeSubrange(buffered.startIndex...nl)
                return line
            }
            var pfd = pollfd(fd: stdout.fileHandleForReading.fileDescriptor, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, timeoutMilliseconds) != 1 { return nil }
            let chunk = stdout.fileHandleForReading.availableData
            if chunk.isEmpty { return nil }
            buffered.append(chunk)
        }
    }

    /// Sends one line on stdin and returns the answer line.
    func ask(_ line: String) -> String {
        stdin.fileHandleForWriting.write(Data((line + "\n").utf8))
        return readLine() ?? "<eof>"
    }

    /// SIGKILL and reap.
    func kill() {
        if process.isRunning {
            Foundation.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit { kill() }
}

/// Runs a command to completion; returns (exit status, stdout, stderr).
@discardableResult
func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

/// A private bus with pestod on it.
final class PestodFixture {
    let directory: TemporaryDirectory
    let bus: Child
    let address: String
    private(set) var pestod: Child!
    /// An in-process client connection.
    let client: DBusConnection
    /// RLIMIT_NOFILE for pestod, if limited.
    let openFileLimit: Int?
    /// Whether pestod gets `--authorize none` when its arguments choose no mode (on
    /// `--address` pestod's own default is polkit, which costs a bus round trip per change).
    let authorizeNone: Bool
    /// Where pestod keeps its state, when started with `--state STATE`.
    var statePath: String { directory.url.appendingPathComponent("state").path }
    /// Where pestod's upstream control socket is, when started with `--control CONTROL`.
    var controlPath: String { directory.url.appendingPathComponent("control.sock").path }
    /// How many takeovers (`takeOver`) this fixture has made: each pestod logs to its own file.
    private(set) var generation = 0
    /// The current pestod's log file.
    var logFile: URL { directory.url.appendingPathComponent(generation == 0 ? "pestod.log" : "pestod-\(generation).log") }
    /// The takeover socket's directory, for `--runtime-dir RUNTIME`.
    var runtimePath: String { directory.url.path }
    /// What pestod has logged so far.
    var log: String { (try? String(contentsOf: logFile, encoding: .utf8)) ?? "" }

    static let dest = PestoBusNames.busName
    static let hostPath = PestoBusNames.tablePath(.host)
    static let tableInterface = PestoInterfaces.table.name
    static let managerPath = PestoBusNames.managerPath
    static let managerInterface = PestoInterfaces.manager.name

    /// Starts dbus-daemon and pestod (extra flags go to pestod).
    /// `openFileLimit` runs pestod under `prlimit --nofile` (descriptor exhaustion tests).
    /// pestod runs with `--authorize none` unless the arguments give `--authorize` or
    /// `authorizeNone` is false (then it uses its default for `--address`).
    init(pestodArguments: [String] = [], openFileLimit: Int? = nil, authorizeNone: Bool = true) throws {
        self.openFileLimit = openFileLimit
        self.authorizeNone = authorizeNone
        directory = try TemporaryDirectory()
        let socket = directory.url.appendingPathComponent("bus.sock").path
        let config = directory.url.appendingPathComponent("bus.conf")
        try """
            <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
             "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
            <busconfig>
              <type>session</type>
              <listen>unix:path=\(socket)</listen>
              <auth>EXTERNAL</auth>
              <policy context="default">
                <allow user="*"/><allow own="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
              </policy>
            </busconfig>
            """.write(to: config, atomically: true, encoding: .utf8)
        bus = try Child("/usr/bin/dbus-daemon", ["--config-file=\(config.path)", "--nofork", "--print-address=1"])
        guard let line = bus.readLine(), line.hasPrefix("unix:") else { throw FixtureError("dbus-daemon did not start") }
        address = line
        client = try DBusConnection(.address(address))
        try startPestod(pestodArguments)
    }

    /// (Re)starts pestod and waits for its READY=1.
    func startPestod(_ arguments: [String] = []) throws {
        let notifyPath = directory.url.appendingPathComponent("notify-\(UUID().uuidString.prefix(6))").path
        let notify = try NotifySocket(path: notifyPath)
        // "CONTROL" and "STATE" stand for this fixture's control socket and state file paths.
        let command = [Products.path("pestod"), "--address", address, "--log-level", "debug"]
            + arguments.map { $0 == "CONTROL" ? controlPath : $0 == "STATE" ? statePath : $0 == "RUNTIME" ? runtimePath : $0 }
            + (authorizeNone && !arguments.contains("--authorize") ? ["--authorize", "none"] : [])
        let limit = openFileLimit.map { ["/usr/bin/prlimit", "--nofile=\($0):\($0)", "--"] } ?? []
        let argv = limit + command
        pestod = try Child(argv[0], Array(argv.dropFirst()), environment: ["NOTIFY_SOCKET": notifyPath], stderrFile: logFile)
        guard notify.waitForReady(timeoutMilliseconds: 20_000) else {
            throw FixtureError("pestod did not become ready: \(log)")
        }
    }

    deinit {
        pestod?.kill()
        bus.kill()
    }

    /// Starts `pestod --replace` with `arguments` and waits for its READY=1 and for the
    /// previous pestod to exit; the fixture then follows the new one. Returns the old one's
    /// exit status.
    @discardableResult
    func takeOver(_ arguments: [String]) throws -> Int32 {
        let old = pestod!
        generation += 1
        do {
            try startPestod(arguments + ["--replace"])
        } catch {
            pestod = old
            throw error
        }
        old.process.waitUntilExit()
        return old.process.terminationStatus
    }

    // MARK: Calls

    /// Calls a Table method on the HOST table with the in-process client.
    @discardableResult
    func table(_ member: String, _ args: [DBusValue] = [], on connection: DBusConnection? = nil) throws(DBusErrorReply) -> [DBusValue] {
        try (connection ?? client).call(Self.dest, Self.hostPath, Self.tableInterface, member, args)
    }

    /// Calls a Manager method.
    @discardableResult
    func manager(_ member: String, on connection: DBusConnection? = nil) throws(DBusErrorReply) -> [DBusValue] {
        try (connection ?? client).call(Self.dest, Self.managerPath, Self.managerInterface, member)
    }

    /// The error name a call fails with, or "success".
    func errorName(_ body: () throws(DBusErrorReply) -> Void) -> String {
        do {
            try body()
            return "success"
        } catch {
            return error.name
        }
    }

    /// A rule description.
    static func rule(_ port: UInt16, _ extra: [(String, DBusValue)] = [], address: String = "127.0.0.1") -> DBusValue {
        .vardict([("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(port))] + extra)
    }

    /// Everything a client can observe about the HOST table, and pestod's listening sockets.
    struct Snapshot: Equatable {
        /// `List`: every rule with its status, in ID order.
        var rules: [DBusValue]
        /// `GetManagedObjects`: every object with every property.
        var objects: [DBusValue]
        /// "proto address inode" of each listening socket.
        var sockets: [String]

        /// The listening sockets on `port` (hex in /proc/net notation).
        func sockets(onPort port: UInt16) -> [String] {
            sockets.filter { $0.split(separator: " ")[1].hasSuffix(":\(port)") }
        }
    }

    /// Takes a `Snapshot`.
    func snapshot() throws -> Snapshot {
        Snapshot(
            rules: try table("List"),
            objects: try client.call(Self.dest, Self.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
            sockets: listeningSockets())
    }

    /// Waits until the lock is announced free (PropertiesChanged LockOwner "").
    func waitForLockRelease(_ signals: SignalCollector) {
        signals.wait(for: "lock released") { m in
            m.member == "PropertiesChanged" && m.path == Self.managerPath
                && m.arguments?[1].vardictValue?.first?.1 == .string("")
        }
    }

    /// pestod's listening TCP sockets and bound UDP sockets: "proto address:port #inode", sorted.
    func listeningSockets() -> [String] {
        listeningSocketsOf(pid: pestod.pid)
    }

    /// busctl against this bus.
    func busctl(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run("/usr/bin/busctl", ["--address=\(address)"] + args)
    }

    /// gdbus against this bus.
    func gdbus(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        let verb = args[0]
        return try run("/usr/bin/gdbus", [verb, "--address", address] + args.dropFirst())
    }
}

/// A failure of the harness itself.
struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// The listening sockets of process `pid` (`ProcessSockets`), one description each, sorted.
func listeningSocketsOf(pid: Int32) -> [String] {
    // Asked of the sockets themselves: /proc/PID/net/* can skip entries on a busy host.
    (ProcessSockets.listening(pid: pid) ?? []).map(\.description)
}

/// A datagram socket that receives sd_notify messages.
final class NotifySocket {
    let fd: Int32
    let path: String

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let r = SocketAddress(unixPath: path)?.withSockaddr { bind(fd, $0, $1) } ?? -1
        if r != 0 { throw FixtureError("cannot bind \(path)") }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// Waits for a datagram containing READY=1.
    func waitForReady(timeoutMilliseconds: Int32) -> Bool {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, timeoutMilliseconds) == 1 {
            var buffer = [UInt8](repeating: 0, count: 512)
            let n = recv(fd, &buffer, buffer.count, 0)
            if n > 0, String(decoding: buffer[..<n], as: UTF8.self).contains("READY=1") { return true }
        }
        return false
    }
}

/// Signals collected by a match-rule subscriber.
final class SignalCollector {
    let connection: DBusConnection
    private(set) var seen: [DBusMessage] = []

    /// Subscribes to every signal pestod's objects emit.
    init(address: String) throws {
        connection = try DBusConnection(.address(address))
        try connection.addMatch("type='signal',sender='\(PestoBusNames.busName)'")
    }

    /// Waits until a signal satisfying `predicate` arrives (5 s at most); returns it.
    @discardableResult
    func wait(for description: String, _ predicate: (DBusMessage) -> Bool) -> DBusMessage? {
        if let m = seen.first(where: predicate) { return m }
        let deadline = MonotonicInstant.now.adding(milliseconds: 5000)
        while MonotonicInstant.now < deadline {
            guard let m = connection.nextMessage(timeoutMilliseconds: 200) else { continue }
            guard m.isSignal else { continue }
            seen.append(m)
            if predicate(m) { return m }
        }
        Issue.record("signal never arrived: \(description)")
        return nil
    }

    /// Forgets the signals seen so far: later waits only match signals that arrive after now
    /// (or that are queued but not yet read, which all came after those seen).
    func forget() { seen.removeAll() }

    /// A predicate for `member` on `path` with these leading arguments.
    static func signal(_ member: String, path: String? = nil, _ args: [DBusValue]) -> (DBusMessage) -> Bool {
        { m in
            m.member == member && (path == nil || m.path == path)
                && Array((m.arguments ?? []).prefix(args.count)) == args
        }
    }
}
