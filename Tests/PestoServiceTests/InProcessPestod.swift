// SPDX-License-Identifier: GPL-2.0-or-later

// Test harness: pestod's server in the test process, without a bus. The server's BusPort
// is a `RecordingPort`, which keeps every reply and signal it is given; calls are real
// libdbus method-call messages, stamped with a caller's unique name and a serial as the bus
// daemon would, and handed to `PestoServer.handle(_:)`; the engine is a real one on its own
// event loop, with real sockets on loopback. A call whose reply waits (a sliced change, the
// save at the end of the turn, an authoriser) runs the loop until the reply is sent.
//
// What this cannot show is what the bus itself does (policy, activation, introspection by
// other tools, name ownership, polkit over the bus, fd passing): those tests start a
// dbus-daemon (BusHarness.swift). A caller leaving the bus is the NameOwnerChanged signal
// the bus daemon would send (`leave`).
//
// Traffic, and why relayed connections once looked unreliable here
// ------------------------------------------------------------------
// pestod's loop runs only on the test's thread, and only while the harness turns it: inside
// a call whose reply waits, `settle`, a signal wait, `serving` and `ping`. A call answered at
// once turns nothing. So a client connecting to a rule from another thread is accepted and
// relayed only while the test's thread turns the loop; otherwise it waits in the listener's
// backlog, and a blocking client gives up at its own bound ("timed out: sent 4, received 0",
// the echo timeout). That is what made an earlier conversion of the overlap suite fail: it
// kept the bus-based test's end of run, `while !done { usleep(1000) }` (correct there, where
// pestod is another process), so the background client's last ping, in flight when the
// test's thread stopped turning the loop, could only time out. Whether a ping was in flight
// at that moment depended on scheduling, hence "passed alone, failed beside the bus-based
// suite" (seen again here, failing every run with the wait put back). Rules for traffic:
// - a client on the test's thread must never block on the engine: `ping`/`serving` run it on
//   a helper thread and turn the loop until it returns (`EventLoop.turn(forever:)`, no
//   deadline: the client bounds its own wait);
// - a helper's result is published outside any lock it holds while it waits: the loop's
//   poller takes that lock, and a lock held across the blocking wait stops the loop (a hang,
//   met while writing `serving`);
// - every wait for a helper thread turns the loop (`turn(forever:)`), never sleeps.
// Process-wide state was checked and is not shared between engines: each engine has its own
// loop, epoll set and DescriptorBudget (a plan read from this process's soft RLIMIT_NOFILE at
// init; the descriptors other tests hold are not counted, and no in-process test comes near
// the 20,000 limit); ports come from `TestSockets.freePorts`, one counter per process, so
// suites running in parallel never share one. One piece of process state was not: SIGPIPE.
// pestod ignores it at start (`Sys.stopOnSignals`); a test process did only once some test
// had written to a child's stdin (`ChildProcess.send`), so a splice by the in-process relay
// into a connection its peer had closed would get EPIPE beside some bus-based suites and end
// the whole test run (SIGPIPE's default) without them. No run was seen dying of it; it is
// closed anyway: `InProcessPestod.init` ignores SIGPIPE, as pestod does.

import Foundation
import Logging
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

/// A bus port that keeps what the server sends, in order.
final class RecordingPort: BusPort {
    /// Every message sent so far.
    private(set) var sent: [DBusMessage] = []
    /// Messages `nextMessage` hands out (a handover's last calls), oldest first.
    var incoming: [DBusMessage] = []

    func send(_ message: DBusMessage) { sent.append(message) }
    var outgoingBytes: Int { 0 }
    func nextMessage(timeoutMilliseconds: Int32) -> DBusMessage? { incoming.isEmpty ? nil : incoming.removeFirst() }
    func flush() {}

    /// The signals sent so far.
    var signals: [DBusMessage] { sent.filter(\.isSignal) }
    /// The reply (or error) to call `serial`, if it was sent.
    func reply(to serial: UInt32) -> DBusMessage? { sent.first { !$0.isSignal && $0.replySerial == serial } }
    /// Forgets every message sent so far.
    func clear() { sent.removeAll() }
}

/// Log lines kept in memory, for the tests that read what pestod logged.
final class LogLines: @unchecked Sendable {
    // One test's loop thread writes, the same thread reads: no lock is needed.
    private(set) var lines: [String] = []
    func append(_ line: String) { lines.append(line) }
}

/// A swift-log handler writing into `LogLines`, at every level.
struct LogLinesHandler: LogHandler {
    let sink: LogLines
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { sink.append("\(event.level): \(event.message)") }
}

/// A client of the in-process pestod: its unique bus name.
struct Caller: Hashable {
    let uniqueName: String
}

/// pestod's server, engine and loop in process (see the theory of operation above).
final class InProcessPestod {
    let loop: EventLoop
    let engine: ForwardingEngine
    let port = RecordingPort()
    let server: PestoServer
    /// Where the tables are kept, if anywhere (closed at the end, as pestod does at exit).
    private let persistence: (any TablesPersistence)?
    /// The default caller.
    let client: Caller
    private let logLines = LogLines()
    private var callers = 1
    private var serial: UInt32 = 0

    /// A server over a fresh engine (HOST table only unless `configuration` names a
    /// namespace), optionally keeping its tables with `persistence` and asking `authorizer`.
    init(
        configuration: EngineConfiguration = EngineConfiguration(), persistence: (any TablesPersistence)? = nil,
        authorizer: (any Authorizer)? = nil, sliceOperations: Int? = nil
    ) throws {
        Self.ignoreSIGPIPE
        loop = try EventLoop()
        engine = try ForwardingEngine(loop: loop, configuration: configuration)
        self.persistence = persistence
        let logger = Logger(label: "pestod") { [logLines] _ in LogLinesHandler(sink: logLines) }
        server = PestoServer(engine: engine, port: port, logger: logger)
        if let persistence {
            _ = try persistence.restore(into: engine, logger: logger)
            server.persist(in: try persistence.start(loop: loop))
        }
        server.authorizer = authorizer
        if let sliceOperations { server.sliceOperations = sliceOperations }
        client = Caller(uniqueName: ":1.1")
        engine.start()
    }

    /// SIGPIPE ignored in this process, once, as pestod ignores it: a splice or write into a
    /// connection its peer reset is an EPIPE for the relay, never the end of the test run.
    private static let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    deinit {
        server.abandonChanges()
        persistence?.close()
        engine.stop()
        loop.removeAllHandlers()
    }

    /// What the server has logged so far, one "level: message" line each.
    var log: String { logLines.lines.joined(separator: "\n") }

    /// Another caller, with a unique name of its own.
    func newCaller() -> Caller {
        callers += 1
        return Caller(uniqueName: ":1.\(callers)")
    }

    // MARK: Calls

    /// Hands a method call of `caller` to the server; returns its serial.
    @discardableResult
    func send(
        _ caller: Caller? = nil, path: String, interface: String?, member: String, _ arguments: [DBusValue] = [],
        interactive: Bool = false, noReply: Bool = false
    ) -> UInt32 {
        let m = DBusMessage.methodCall(
            destination: PestoBusNames.busName, path: path, interface: interface, member: member, arguments: arguments)
        m.allowsInteractiveAuthorization = interactive
        if noReply { m.noReply = true }
        serial += 1
        m.stamp(sender: (caller ?? client).uniqueName, serial: serial)
        _ = server.handle(m)
        return serial
    }

    /// Calls a method and waits (running the loop) for its reply; an error reply is thrown.
    func call(
        _ caller: Caller? = nil, path: String, interface: String?, member: String, _ arguments: [DBusValue] = [],
        interactive: Bool = false
    ) throws(DBusErrorReply) -> [DBusValue] {
        let serial = send(caller, path: path, interface: interface, member: member, arguments, interactive: interactive)
        let reply = waitForReply(serial)
        guard let reply else { throw DBusErrorReply(DBusErrorReply.failed, "no reply") }
        if let error = reply.asError { throw error }
        return reply.arguments ?? []
    }

    /// The reply to call `serial`, running the loop until it is sent (5 s at most).
    func waitForReply(_ serial: UInt32) -> DBusMessage? {
        if port.reply(to: serial) == nil {
            loop.turn(until: { [port] in port.reply(to: serial) != nil }, "the reply to call \(serial)")
        }
        return port.reply(to: serial)
    }

    /// Calls a Table method on the HOST table.
    @discardableResult
    func table(_ member: String, _ args: [DBusValue] = [], on caller: Caller? = nil) throws(DBusErrorReply) -> [DBusValue] {
        try call(caller, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: member, args)
    }

    /// Calls a Manager method.
    @discardableResult
    func manager(_ member: String, on caller: Caller? = nil) throws(DBusErrorReply) -> [DBusValue] {
        try call(caller, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, member: member)
    }

    /// Inserts the TCP rule `PestodFixture.rule(port, extra)` as `id` and activates it (the
    /// usual first step of a test); returns Activate's reply (bound, failed).
    @discardableResult
    func insertActive(_ id: UInt32, port: UInt16, _ extra: [(String, DBusValue)] = [], on caller: Caller? = nil)
        throws(DBusErrorReply) -> [DBusValue]
    {
        try table("Insert", [.uint32(id), PestodFixture.rule(port, extra)], on: caller)
        return try table("Activate", [.uint32(id)], on: caller)
    }

    /// `caller` leaves the bus: the NameOwnerChanged the bus daemon sends then.
    func leave(_ caller: Caller) {
        let m = DBusMessage.signal(
            path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus", member: "NameOwnerChanged",
            arguments: [.string(caller.uniqueName), .string(caller.uniqueName), .string("")])
        serial += 1
        m.stamp(sender: "org.freedesktop.DBus", serial: serial)
        _ = server.handle(m)
    }

    /// Runs one loop turn: what waits for the end of the turn (the save, the counters) happens.
    func settle() {
        loop.nextTurn { [loop] in loop.stop() }
        loop.run()
    }

    /// A property of an object of pestod's (`org.freedesktop.DBus.Properties.Get`).
    func property(_ path: String, _ interface: String, _ name: String) throws(DBusErrorReply) -> DBusValue? {
        try call(path: path, interface: "org.freedesktop.DBus.Properties", member: "Get", [.string(interface), .string(name)])
            .first?.variantValue
    }

    // MARK: Traffic

    /// Runs `body` (blocking socket work: a ping, a transfer) on a helper thread while this
    /// thread turns the loop that serves it; returns its result. The loop runs until `body`
    /// returns, however long that takes: `body` must bound its own waits (the pings do).
    func serving<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let result = Mutex<T?>(nil)
        detachThread {
            let value = body()
            result.withLock { $0 = value }
        }
        loop.turn(forever: { result.withLock { $0 != nil } })
        return result.withLock { $0! }
    }

    /// `TestTraffic.ping` of `address:port`, served by this pestod's loop; nil on success.
    func ping(_ address: IPAddress = .loopbackIPv4, port: UInt16) -> String? {
        serving { TestTraffic.ping(address, port: port) }
    }

    // MARK: Observing

    /// Takes a `Snapshot`, as `PestodFixture.snapshot` does.
    func snapshot() throws -> PestodFixture.Snapshot {
        PestodFixture.Snapshot(
            rules: try table("List"),
            objects: try call(
                path: PestodFixture.managerPath, interface: "org.freedesktop.DBus.ObjectManager", member: "GetManagedObjects"),
            sockets: listeningSockets())
    }

    /// The engine's listening TCP sockets and bound UDP sockets, as the kernel describes them
    /// ("proto address:port #inode", sorted): this process's sockets whose inode is one the
    /// engine's tables hold (other tests run in the same process).
    func listeningSockets() -> [String] {
        var inodes: Set<UInt64> = []
        for table in engine.tables {
            for id in table.ids {
                for listener in (try? table.listeners(of: id)) ?? [] {
                    if let inode = TestSockets.inode(listener.fd) { inodes.insert(inode) }
                }
            }
        }
        return (ProcessSockets.listening(pid: getpid()) ?? []).filter { inodes.contains($0.inode) }.map(\.description)
    }

    /// A watch of the signals sent from now on.
    func watchSignals() -> SentSignals { SentSignals(self) }

    /// Whether the lock was announced free (PropertiesChanged LockOwner "") since the port
    /// was last cleared.
    func lockReleaseAnnounced() -> Bool {
        port.signals.contains { m in
            m.member == "PropertiesChanged" && m.path == PestodFixture.managerPath
                && m.arguments?[1].vardictValue?.first?.1 == .string("")
        }
    }

    /// The signals sent so far, emptied.
    func takeSignals() -> [DBusMessage] {
        let signals = port.signals
        port.clear()
        return signals
    }
}

/// Waits for the signals the in-process server sends, as `SignalCollector` waits for them on
/// a bus: a wait matches any signal sent since the watch began (or was last told to forget),
/// running the loop until one is sent (5 s at most).
final class SentSignals {
    private let pestod: InProcessPestod
    /// The first message of the port's record this watch looks at.
    private var start: Int

    /// Watches from now on.
    init(_ pestod: InProcessPestod) {
        self.pestod = pestod
        start = pestod.port.sent.count
    }

    /// The signals sent since the watch began, in order.
    var seen: [DBusMessage] { pestod.port.sent.dropFirst(start).filter(\.isSignal) }

    /// Waits until a signal satisfying `predicate` is sent; returns it.
    @discardableResult
    func wait(for description: String, _ predicate: @escaping (DBusMessage) -> Bool) -> DBusMessage? {
        if let m = seen.first(where: predicate) { return m }
        pestod.loop.turn(until: { [self] in seen.contains(where: predicate) }, "signal: \(description)")
        return seen.first(where: predicate)
    }

    /// Forgets the signals sent so far.
    func forget() { start = pestod.port.sent.count }
}

/// What both pestod harnesses (`PestodFixture` on a bus, `InProcessPestod` in process) offer
/// alike, so a test reads the same on either.
protocol PestodHarness {}

extension PestodHarness {
    /// The error name a call fails with, or "success".
    func errorName(_ body: () throws(DBusErrorReply) -> Void) -> String {
        do {
            try body()
            return "success"
        } catch {
            return error.name
        }
    }
}

extension PestodFixture: PestodHarness {}
extension InProcessPestod: PestodHarness {}
