// SPDX-License-Identifier: GPL-2.0-or-later

// Takeover: `pestod --replace` takes the tables, listeners, bus name and control socket
// over from the running pestod (doc/takeover.md). End to end with a private bus; the test
// plays one side of the handover by hand where a failure must hit a precise step.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod takeover", .serialized, .timeLimit(.minutes(10)))
struct TakeoverTests {
    /// pestod's arguments: a takeover socket in the fixture's directory, a state file, a control socket.
    static let arguments = ["--runtime-dir", "RUNTIME", "--state", "STATE", "--control", "CONTROL"]

    /// Makes rule 1 (one port forwarded to `target`) and rule 2 (`count` more ports, listeners only), active.
    static func populate(_ f: PestodFixture, ports: ClosedRange<UInt16>, target: UInt16) throws {
        let p = ports.lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p, [("target-port", .uint16(target))])])
        try f.table("Activate", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1, [("last-port", .uint16(ports.upperBound))])])
        try f.table("Activate", [.uint32(2)])
    }

    @Test(
        "three takeovers in a row: every listener keeps its inode, the objects and properties are the same, no connect is refused, the control socket still answers"
    )
    func takeoversKeepEverything() throws {
        let f = try PestodFixture(pestodArguments: Self.arguments)
        let ports = TestSockets.freePorts(201)
        let target = TestSockets.freePorts(1).lowerBound
        let echo = try #require(EchoServer(port: target))
        defer { echo.stop() }
        try Self.populate(f, ports: ports, target: target)
        let before = try f.snapshot()
        #expect(before.sockets.count == 201)

        // A client connecting in a loop to the forwarded port for the whole test.
        let stop = Atomic<Bool>(false)
        let attempts = Atomic<Int>(0)
        let refused = Mutex<[String]>([])
        let finished = DispatchSemaphore(value: 0)  // signalled by each of the two loops below
        detachThread {
            while !stop.load(ordering: .relaxed) {
                switch TestSockets.connect(port: ports.lowerBound) {
                case .success(let fd): close(fd)
                case .failure(let e): refused.withLock { $0.append("\(e)") }
                }
                attempts.add(1, ordering: .relaxed)
            }
            finished.signal()
        }
        // And a D-Bus client reading in a loop: every call gets an answer.
        let address = f.address
        let calls = Atomic<Int>(0)
        let callFailures = Mutex<[String]>([])
        detachThread {
            defer { finished.signal() }
            guard let c = try? DBusConnection(.address(address)) else {
                callFailures.withLock { $0.append("cannot connect") }
                return
            }
            while !stop.load(ordering: .relaxed) {
                do {
                    _ = try c.call(PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "List")
                } catch {
                    callFailures.withLock { $0.append("\(error)") }
                }
                calls.add(1, ordering: .relaxed)
            }
        }
        for round in 1...3 {
            let status = try f.takeOver(Self.arguments)
            #expect(status == 0, "round \(round): the old pestod exited with \(status)")
            let after = try f.snapshot()
            #expect(after == before, "round \(round)")
            #expect(f.log.contains("installed 201 handed-over listeners (0 refused)"), "\(f.log)")
        }
        stop.store(true, ordering: .relaxed)
        finished.wait()
        finished.wait()
        #expect(refused.withLock { $0 } == [])
        #expect(callFailures.withLock { $0 } == [])
        #expect(calls.load(ordering: .relaxed) > 0)
        #expect(attempts.load(ordering: .relaxed) > 0)
        // The forwarding works through the last instance, and the control socket answers.
        #expect(TestTraffic.ping(port: ports.lowerBound) == nil)
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        let dump = try #require(client.readHelloAndDump())
        #expect(dump.tables.values.map(\.rules.count).reduce(0, +) == 2)
    }

    @Test(
        "a takeover waits for an upstream client's control socket session: an upload under way when it starts is read to the end and applied, then handed over"
    )
    func takeoverWaitsForControlSession() throws {
        let f = try PestodFixture(pestodArguments: Self.arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        try #require(client.readHelloAndDump() != nil)
        let upload = PestoV2Wire.upload([(.host, [PestoV2Wire.WireRule(rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port))])])
        client.send(Array(upload.prefix(upload.count / 2)))  // the upload is under way
        let oldLog = f.logFile.path
        let fd = client.fd
        detachThread {
            // Once the takeover waits for this session, the rest of the upload comes.
            let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
            while !(readTextFile(oldLog) ?? "").contains("takeover waits: \(TakeoverSource.controlClient)"),
                MonotonicInstant.now < deadline
            {
                usleep(5_000)  // a log file has no readiness signal
            }
            _ = Array(upload.dropFirst(upload.count / 2)).withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
            shutdown(fd, Int32(SHUT_WR))
        }
        #expect(try f.takeOver(Self.arguments) == 0, "the old pestod exits with 0")
        let old = readTextFile(oldLog) ?? ""
        #expect(old.contains("takeover waits: \(TakeoverSource.controlClient)"), "\(old)")
        #expect(old.contains("control socket: update applied"), "\(old)")
        // The new pestod has the uploaded rule, active.
        let listed = try f.table("List").first?.arrayValue ?? []
        #expect(listed.count == 1, "\(listed)")
        if case .success(let c) = TestSockets.connect(port: port) {
            close(c)
        } else {
            Issue.record("the uploaded rule does not listen in the new pestod")
        }
    }

    /// The bus name's owner, or nil when nobody owns it.
    static func owner(_ f: PestodFixture) -> String? {
        try? f.client.call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", [.string(PestodFixture.dest)]
        ).first?.stringValue
    }

    /// Connects to the running pestod's takeover socket as a new pestod would.
    static func connect(_ f: PestodFixture) throws -> TakeoverChannel {
        let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let channel = TakeoverChannel(fd: fd)
        let r = SocketAddress(unixPath: f.runtimePath + "/takeover.sock")!.withSockaddr { Glibc.connect(fd, $0, $1) }
        if r != 0 { throw HarnessError("cannot connect to the takeover socket: \(Errno.current)") }
        _ = Sys.setTimeouts(fd, milliseconds: 20_000)
        return channel
    }

    /// Receives a whole handover (after hello and welcome): the shared tables and listeners,
    /// then, after saying ready, the relays; returns the descriptors received.
    static func receiveAll(_ channel: TakeoverChannel) throws -> [Int32] {
        var fds: [Int32] = []
        while true {
            let (message, received) = try channel.receive()
            fds += received
            if case .shared = message { try channel.send(.ready) }
            if case .end = message { return fds }
        }
    }

    @Test(
        "a new pestod that dies at any step before bye leaves the old one in charge: same listeners, objects and bus name, still forwarding"
    )
    func newInstanceDyingAtEachStep() throws {
        let f = try PestodFixture(pestodArguments: Self.arguments)
        let ports = TestSockets.freePorts(11)
        let target = TestSockets.freePorts(1).lowerBound
        let echo = try #require(EchoServer(port: target))
        defer { echo.stop() }
        try Self.populate(f, ports: ports, target: target)
        let before = try f.snapshot()
        let oldOwner = try #require(Self.owner(f))
        let steps = ["connected", "said hello", "received the handover", "took the bus name"]
        for step in steps {
            let channel = try Self.connect(f)
            var held: [Int32] = []
            var thief: DBusConnection?
            if step != "connected" {
                try channel.send(.hello)
                #expect(try channel.receive().0 == .welcome)
            }
            if step == "received the handover" || step == "took the bus name" {
                held = try Self.receiveAll(channel)
                #expect(held.count == 11 + 1, "11 listeners and the control socket")
            }
            if step == "took the bus name" {
                let c = try DBusConnection(.address(f.address))
                try c.requestName(PestodFixture.dest, allowingReplacement: true, replacing: true)
                #expect(Self.owner(f) == c.uniqueName)
                thief = c
            }
            // The new pestod dies: its descriptors and its bus connection close.
            let nameChanges = try SignalCollector(
                address: f.address,
                match: "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='\(PestodFixture.dest)'")
            for fd in held { close(fd) }
            thief = nil
            _ = thief
            channel.finish()
            // The name goes back to the old pestod once the bus has seen the connection go.
            if Self.owner(f) != oldOwner {
                nameChanges.wait(for: "the name back with the old pestod (\(step))") { $0.arguments?[2] == .string(oldOwner) }
            }
            #expect(Self.owner(f) == oldOwner, "\(step)")
            #expect(f.pestod.isRunning, "\(step)")
            #expect(try f.snapshot() == before, "\(step)")
            #expect(TestTraffic.ping(port: ports.lowerBound) == nil, "\(step)")
        }
        // And a real takeover still works afterwards.
        #expect(try f.takeOver(Self.arguments) == 0)
        #expect(try f.snapshot() == before)
    }

    @Test("a handover format version the other side does not speak is refused cleanly, either way")
    func versionMismatch() throws {
        let f = try PestodFixture(pestodArguments: Self.arguments)
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()

        // A newer pestod says hello in version 99: the running one refuses and keeps serving.
        let channel = try Self.connect(f)
        try channel.send(.hello, version: 99)
        let (answer, _) = try channel.receive()
        guard case .refused(let why) = answer else {
            Issue.record("expected refused, got \(answer)")
            return
        }
        #expect(why.contains("version 99") && why.contains("only version \(TakeoverWire.version)"), "\(why)")
        #expect(f.pestod.isRunning)
        #expect(try f.snapshot() == before)

        // A running pestod that answers in version 99: the new one refuses and exits, touching nothing.
        let fake = try TemporaryDirectory()
        let listener = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listener) }
        let bound = SocketAddress(unixPath: fake.url.path + "/takeover.sock")!.withSockaddr { bind(listener, $0, $1) }
        #expect(bound == 0 && listen(listener, 1) == 0)
        detachThread {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            let old = TakeoverChannel(fd: fd)
            _ = try? old.receive()
            try? old.send(.welcome, version: 99)
            _ = try? old.receive()  // until the new pestod goes
        }
        let result = try run(
            Products.path("pestod"),
            ["--address", f.address, "--authorize", "none", "--runtime-dir", fake.url.path, "--replace", "--state", f.statePath + ".new"])
        #expect(result.status == 1)
        #expect(result.err.contains("version 99"), "\(result.err)")
        #expect(Self.owner(f) != nil && f.pestod.isRunning)
        #expect(try f.snapshot() == before)
        #expect(!FileManager.default.fileExists(atPath: f.statePath + ".new"))
    }

    @Test(
        "a takeover waits while a D-Bus client holds the lock: it gives up after its timeout with the holder's name, or completes once the lock is released"
    )
    func lockWait() throws {
        let f = try PestodFixture(pestodArguments: Self.arguments)
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()
        let holder = try DBusConnection(.address(f.address))
        try f.manager("Lock", on: holder)

        let command =
            [Products.path("pestod"), "--address", f.address, "--authorize", "none"]
            + ["--runtime-dir", f.runtimePath, "--state", f.statePath, "--control", f.controlPath, "--replace"]
        let gaveUp = try run(command[0], Array(command.dropFirst()) + ["--takeover-timeout", "300"])
        #expect(gaveUp.status == 1)
        #expect(gaveUp.err.contains("\(holder.uniqueName) holds the running pestod's lock"), "\(gaveUp.err)")
        #expect(f.pestod.isRunning)
        #expect(try f.snapshot() == before)

        // With time to wait, the takeover completes once the lock is released.
        // The new pestod's log comes through a pipe, read line by line: the test goes on as
        // soon as it says it waits for the lock.
        let notifyPath = f.directory.url.appendingPathComponent("notify-wait").path
        let notify = try NotifySocket(path: notifyPath)
        let logPipe = try makePipe()
        let new = try ChildProcess(
            command[0], Array(command.dropFirst()), environment: ["NOTIFY_SOCKET": notifyPath],
            stdin: .devNull, stdout: .devNull, stderr: .descriptor(logPipe.write))
        close(logPipe.write)
        defer { close(logPipe.read) }
        let log = LineReader(fd: logPipe.read)
        var waiting = false
        while !waiting, let line = log.line(timeoutMilliseconds: 20_000) { waiting = line.contains("takeover waits") }
        #expect(waiting, "the new pestod never said it waits for the lock")
        #expect(f.pestod.isRunning, "the old pestod serves while the takeover waits")
        try f.manager("Unlock", on: holder)
        #expect(notify.waitForReady(timeoutMilliseconds: 20_000, process: new), "the new pestod never became ready")
        #expect(f.pestod.waitUntilExit() == 0, "the old pestod exits cleanly once it has handed over")
        #expect(listeningSocketsOf(pid: new.pid) == before.sockets)
        #expect(try f.table("List") == before.rules)
        new.kill()
    }

    @Test(
        "an old pestod that dies in the middle of the handover: the new one exits with an error, without the bus name, state file or listeners"
    )
    func oldInstanceDyingMidHandover() throws {
        let f = try PestodFixture()
        let owner = Self.owner(f)
        let p = TestSockets.freePorts(1).lowerBound
        let listenerFD = try #require(TestSockets.bound(port: p))
        defer { close(listenerFD) }
        let text = StateFile.render([
            StateFile.Entry(table: .host, id: 1, active: true, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: p))
        ])
        // A running pestod that sends the tables and one listener, then dies.
        let fake = try TemporaryDirectory()
        let listener = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listener) }
        let bound = SocketAddress(unixPath: fake.url.path + "/takeover.sock")!.withSockaddr { bind(listener, $0, $1) }
        #expect(bound == 0 && listen(listener, 1) == 0)
        detachThread {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            let old = TakeoverChannel(fd: fd)
            _ = try? old.receive()
            try? old.send(.welcome)
            try? old.send(.stateChunk(Array(text.utf8)))
            try? old.send(.listeners([ListenerRecord(table: .host, ruleID: 1, port: p)]), descriptors: [listenerFD])
            old.finish()
        }
        let result = try run(
            Products.path("pestod"),
            ["--address", f.address, "--authorize", "none", "--runtime-dir", fake.url.path, "--replace", "--state", f.statePath + ".new"])
        #expect(result.status == 1)
        #expect(result.err.contains("closed the handover connection"), "\(result.err)")
        #expect(Self.owner(f) == owner)
        #expect(!FileManager.default.fileExists(atPath: f.statePath + ".new"))
    }
}
