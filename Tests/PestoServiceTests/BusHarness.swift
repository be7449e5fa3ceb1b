// SPDX-License-Identifier: GPL-2.0-or-later

// Test harness: a private dbus-daemon, a real pestod on it, command-line D-Bus tools, and
// an in-process client, all started by the test and killed (SIGKILL) when it ends.
//
// Readiness is never guessed with sleeps: dbus-daemon prints its address when it listens,
// pestod sends READY=1 to a NOTIFY_SOCKET datagram socket the harness binds, and the peer
// process prints "ready". The processes, the bus and the readiness waits are PestoTestSupport's
// (ChildProcess, PrivateBus), shared with the benchmarks; children are stopped with SIGKILL.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// Where the built products are: next to the test bundle.
enum Products {
    static var directory: URL { URL(fileURLWithPath: executableDirectory()) }
    static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    /// The repository root (for the shipped files under dbus/).
    static var repository: URL {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url
    }
}

extension TemporaryDirectory {
    /// The directory as a URL, for Foundation's file APIs.
    var url: URL { URL(fileURLWithPath: path) }
}

/// A private bus with pestod on it.
final class PestodFixture {
    /// Runs pestoctl against this fixture's bus.
    @discardableResult
    func pestoctl(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run(Products.path("pestoctl"), ["--address", address] + args)
    }

    let directory: TemporaryDirectory
    let bus: PrivateBus
    let address: String
    private(set) var pestod: ChildProcess!
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
    var log: String { readTextFile(logFile.path) ?? "" }

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
        bus = try PrivateBus(directory: directory.path)
        address = bus.address
        client = try DBusConnection(.address(address))
        try startPestod(pestodArguments)
    }

    /// (Re)starts pestod and waits for its READY=1.
    func startPestod(_ arguments: [String] = []) throws {
        // "CONTROL" and "STATE" stand for this fixture's control socket and state file paths.
        let command =
            [Products.path("pestod"), "--address", address, "--log-level", "debug"]
            + arguments.map { $0 == "CONTROL" ? controlPath : $0 == "STATE" ? statePath : $0 == "RUNTIME" ? runtimePath : $0 }
            + (authorizeNone && !arguments.contains("--authorize") ? ["--authorize", "none"] : [])
        let limit = openFileLimit.map { ["/usr/bin/prlimit", "--nofile=\($0):\($0)", "--"] } ?? []
        let argv = limit + command
        pestod = try ChildProcess.startReady(
            argv[0], Array(argv.dropFirst()), notifyPath: directory.file("notify"), stderr: .file(logFile.path), logPath: logFile.path)
    }

    deinit {
        pestod?.kill()
        bus.stop()
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
        return old.waitUntilExit()
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

    /// Inserts the TCP rule `rule(port, extra)` as `id` and activates it (the usual first
    /// step of a test); returns Activate's reply (bound, failed).
    @discardableResult
    func insertActive(_ id: UInt32, port: UInt16, _ extra: [(String, DBusValue)] = [], on connection: DBusConnection? = nil)
        throws(DBusErrorReply) -> [DBusValue]
    {
        try table("Insert", [.uint32(id), Self.rule(port, extra)], on: connection)
        return try table("Activate", [.uint32(id)], on: connection)
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
        /// pestod's listening sockets, as `ListeningSocket` describes them ("tcp6 [::]:20000 #12345").
        var sockets: [String]

        /// The listening sockets on `port`.
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

/// The listening sockets of process `pid` (`ProcessSockets`), one description each, sorted.
func listeningSocketsOf(pid: Int32) -> [String] {
    // Asked of the sockets themselves: /proc/PID/net/* can skip entries on a busy host.
    (ProcessSockets.listening(pid: pid) ?? []).map(\.description)
}

/// Signals collected by a match-rule subscriber.
final class SignalCollector {
    let connection: DBusConnection
    private(set) var seen: [DBusMessage] = []

    /// Subscribes to every signal pestod's objects emit, or to what `match` selects.
    init(address: String, match: String = "type='signal',sender='\(PestoBusNames.busName)'") throws {
        connection = try DBusConnection(.address(address))
        try connection.addMatch(match)
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
