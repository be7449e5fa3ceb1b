// SPDX-License-Identifier: GPL-2.0-or-later

// Takeover of relayed TCP connections and UDP flows (doc/takeover.md, RelayHandover.swift):
// connections exchanging data both ways, half-closed ones and ones with bytes held in
// pestod's pipes by a slow reader keep going across takeovers without losing, repeating or
// reordering a byte; a UDP flow keeps its socket (the target sees the same source port) and
// its connected client keeps getting replies; a new pestod dying in the middle of the
// connections' handover leaves the old one relaying them.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

/// A byte stream in which every byte says where it is: byte i is byte i % 8 of the 64-bit
/// counter i / 8 (least significant first), so a lost, repeated or reordered byte shows.
enum CountingStream {
    /// The byte at offset `i`.
    static func byte(at i: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: (i >> 3) >> ((i & 7) << 3)) }

    /// Fills the first `count` bytes of `buffer` (a multiple of 8) with the stream from
    /// `offset` (a multiple of 8), a word at a time.
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, count: Int, from offset: UInt64) {
        let words = buffer.bindMemory(to: UInt64.self)
        for w in 0..<count / 8 { words[w] = (offset / 8 + UInt64(w)).littleEndian }
    }

    /// The offset of the first of `count` bytes of `buffer` that is not the stream's from
    /// `offset`, or nil; whole words are compared at once.
    static func mismatch(_ buffer: UnsafeRawBufferPointer, count: Int, from offset: UInt64) -> UInt64? {
        var k = 0
        while k < count && (offset + UInt64(k)) % 8 != 0 {
            if buffer[k] != byte(at: offset + UInt64(k)) { return offset + UInt64(k) }
            k += 1
        }
        while k + 8 <= count {
            let word = UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: k, as: UInt64.self))
            if word != (offset + UInt64(k)) / 8 { return offset + UInt64(k) }
            k += 8
        }
        while k < count {
            if buffer[k] != byte(at: offset + UInt64(k)) { return offset + UInt64(k) }
            k += 1
        }
        return nil
    }
}

/// One direction of a connection under test: a thread writes the counting stream to `from`
/// (`limit` bytes, or until told to stop) and then shuts its write side down; another reads
/// `to` until end of file, checking every byte. The reader may start paused (a slow reader).
final class StreamDirection: Sendable {
    let name: String
    private let writtenCount = Atomic<UInt64>(0)
    private let readCount = Atomic<UInt64>(0)
    private let stopping = Atomic<Bool>(false)
    private let sawEnd = Atomic<Bool>(false)
    private let problemList = Mutex<[String]>([])
    private let resumeReader = DispatchSemaphore(value: 0)
    private let writerDone = DispatchSemaphore(value: 0)
    private let readerDone = DispatchSemaphore(value: 0)
    /// Signalled by the reader after every read.
    private let progressed = DispatchSemaphore(value: 0)

    /// Bytes written so far.
    var written: UInt64 { writtenCount.load(ordering: .acquiring) }
    /// Bytes read (and checked) so far.
    var read: UInt64 { readCount.load(ordering: .acquiring) }
    /// What went wrong, if anything.
    var problems: [String] { problemList.withLock { $0 } }

    /// Starts both threads; `from` and `to` stay open (the test closes them).
    init(_ name: String, from: Int32, to: Int32, limit: UInt64 = .max - 7, readerPaused: Bool = false) {
        precondition(limit % 8 == 0, "the writer writes whole words")
        self.name = name
        TestSockets.setTimeouts(from, milliseconds: 60_000)
        TestSockets.setTimeouts(to, milliseconds: 60_000)
        if !readerPaused { resumeReader.signal() }
        detachThread { [self] in
            var buffer = [UInt8](repeating: 0, count: 256 * 1024)
            var offset: UInt64 = 0
            defer {
                if shutdown(from, Int32(SHUT_WR)) != 0 { problem("shutdown: \(Errno.current)") }
                writerDone.signal()
            }
            while offset < limit && !stopping.load(ordering: .relaxed) {
                let n = Int(min(UInt64(buffer.count), limit - offset))
                buffer.withUnsafeMutableBytes { CountingStream.fill($0, count: n, from: offset) }
                var sent = 0
                while sent < n {
                    let r = buffer.withUnsafeBytes { Glibc.send(from, $0.baseAddress! + sent, n - sent, Int32(MSG_NOSIGNAL)) }
                    if r <= 0 {
                        problem("write after \(offset + UInt64(sent)) bytes: \(Errno.current)")
                        return
                    }
                    sent += r
                    writtenCount.store(offset + UInt64(sent), ordering: .releasing)
                }
                offset += UInt64(n)
            }
        }
        detachThread { [self] in
            defer { readerDone.signal() }
            resumeReader.wait()
            var buffer = [UInt8](repeating: 0, count: 256 * 1024)
            var offset: UInt64 = 0
            while true {
                let r = buffer.withUnsafeMutableBytes { Glibc.recv(to, $0.baseAddress!, $0.count, 0) }
                if r == 0 {
                    sawEnd.store(true, ordering: .releasing)
                    progressed.signal()
                    return
                }
                if r < 0 {
                    problem("read after \(offset) bytes: \(Errno.current)")
                    return
                }
                if let bad = buffer.withUnsafeBytes({ CountingStream.mismatch($0, count: r, from: offset) }) {
                    problem("byte \(bad) is \(buffer[Int(bad - offset)]), expected \(CountingStream.byte(at: bad))")
                    return
                }
                offset += UInt64(r)
                readCount.store(offset, ordering: .releasing)
                progressed.signal()
            }
        }
    }

    private func problem(_ text: String) { problemList.withLock { $0.append("\(name): \(text)") } }

    /// Waits until more than `count` bytes were read (true), or the reader stopped or 20 s
    /// passed without a read (false).
    func waitForRead(beyond count: UInt64) -> Bool {
        while read <= count {
            guard progressed.wait(timeout: .now() + 20) == .success, problems.isEmpty, !sawEnd.load(ordering: .acquiring) else {
                return read > count
            }
        }
        return true
    }

    /// Lets a paused reader read.
    func resume() { resumeReader.signal() }

    /// Tells the writer to stop (it then shuts its side down).
    func stop() { stopping.store(true, ordering: .relaxed) }

    /// Waits for the writer to finish and the reader to reach end of file; true when every
    /// byte written was read in order and the end arrived.
    func finish() -> Bool {
        writerDone.wait()
        readerDone.wait()
        return problems.isEmpty && sawEnd.load(ordering: .acquiring) && read == written
    }
}

@Suite("pestod takeover of relayed connections and flows", .serialized, .timeLimit(.minutes(10)))
struct TakeoverRelayTests {
    /// A relayed connection: the client's socket (connected to pestod's `port`) and the
    /// target's (accepted on `target`, the test's listener).
    static func relayed(port: UInt16, target: Int32) throws -> (client: Int32, target: Int32) {
        guard case .success(let client) = TestSockets.connect(port: port) else { throw HarnessError("cannot connect to \(port)") }
        let accepted = accept(target, nil, nil)
        guard accepted >= 0 else { throw HarnessError("the target accepted nothing: \(Errno.current)") }
        return (client, accepted)
    }

    /// The target's listener: a small receive buffer (no autotuning), so that a target that
    /// does not read makes pestod hold bytes in its pipe soon.
    static func targetListener(port: UInt16) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        TestSockets.setOption(fd, level: SOL_SOCKET, name: SO_RCVBUF, 16 * 1024)
        guard TestSockets.withSocketAddress(.loopbackIPv4, port, { bind(fd, $0, $1) == 0 }), listen(fd, 16) == 0 else {
            close(fd)
            throw HarnessError("cannot listen on \(port): \(Errno.current)")
        }
        return fd
    }

    /// The log of the pestod of `generation` (0 the first).
    static func log(_ f: PestodFixture, generation: Int) -> String {
        readTextFile(f.directory.url.appendingPathComponent(generation == 0 ? "pestod.log" : "pestod-\(generation).log").path) ?? ""
    }

    /// The bytes in flight in pipes that the pestod of `generation` reported handing over.
    static func bytesInFlight(_ f: PestodFixture, generation: Int) -> Int? {
        let log = Self.log(f, generation: generation)
        guard let range = log.range(of: #"\(([0-9]+) bytes in flight"#, options: .regularExpression) else { return nil }
        return Int(log[range].dropFirst().prefix { $0.isNumber })
    }

    @Test(
        "relayed connections exchanging data both ways, half-closed, or with bytes held in pestod's pipes by a slow reader survive three takeovers without losing, repeating or reordering a byte"
    )
    func connectionsSurviveTakeovers() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        let listener = try Self.targetListener(port: targetPort)
        defer { close(listener) }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(port, [("target-port", .uint16(targetPort))])])
        try f.table("Activate", [.uint32(1)])

        // A: both ways, all the time.
        let a = try Self.relayed(port: port, target: listener)
        let aUp = StreamDirection("A up", from: a.client, to: a.target)
        let aDown = StreamDirection("A down", from: a.target, to: a.client)
        // B: the client has sent its request and half-closed before the takeovers; the target
        // goes on answering through them.
        let b = try Self.relayed(port: port, target: listener)
        let bUp = StreamDirection("B up", from: b.client, to: b.target, limit: 100_000)
        #expect(bUp.finish(), "\(bUp.problems)")
        let bDown = StreamDirection("B down", from: b.target, to: b.client)
        // C: 64 MiB up to a target that reads nothing until after the last takeover, so
        // pestod's pipe holds bytes when it is handed over; its down direction has ended.
        let c = try Self.relayed(port: port, target: listener)
        let cUp = StreamDirection("C up", from: c.client, to: c.target, limit: 64 << 20, readerPaused: true)
        let cDown = StreamDirection("C down", from: c.target, to: c.client, limit: 0)
        #expect(cDown.finish(), "\(cDown.problems)")
        defer { for fd in [a.client, a.target, b.client, b.target, c.client, c.target] { close(fd) } }

        var inFlight: [Int] = []
        for round in 1...3 {
            #expect(try f.takeOver(TakeoverTests.arguments) == 0, "round \(round)")
            inFlight.append(Self.bytesInFlight(f, generation: round - 1) ?? -1)
            #expect(f.log.contains("3 relayed connections and 0 UDP flows (0 refused)"), "round \(round): \(f.log)")
            if round == 3 { cUp.resume() }
            // The new pestod relays: bytes keep arriving both ways.
            #expect(aUp.waitForRead(beyond: aUp.read + 65_536) && aDown.waitForRead(beyond: aDown.read + 65_536), "round \(round)")
        }
        #expect(!inFlight.contains(-1), "every old pestod reported what it handed over: \(inFlight)")
        #expect(inFlight.contains { $0 > 0 }, "pipes held bytes at some takeover: \(inFlight)")
        for d in [aUp, aDown, bDown] { d.stop() }
        for d in [aUp, aDown, bDown, cUp] {
            #expect(d.finish(), "\(d.name): \(d.read) of \(d.written) bytes read, \(d.problems)")
        }
        #expect(aUp.read > 0 && aDown.read > 0 && bDown.read > 0 && cUp.read == 64 << 20)
    }

    @Test(
        "a real new pestod SIGKILLed after the old one has shared its tables and listeners leaves the old one relaying (the new one stopped while waiting for the lock, so it reads nothing of the handover)"
    )
    func newInstanceKilledDuringHandover() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        let listener = try Self.targetListener(port: targetPort)
        defer { close(listener) }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(port, [("target-port", .uint16(targetPort))])])
        try f.table("Activate", [.uint32(1)])
        let pair = try Self.relayed(port: port, target: listener)
        defer {
            close(pair.client)
            close(pair.target)
        }
        let up = StreamDirection("up", from: pair.client, to: pair.target)
        let down = StreamDirection("down", from: pair.target, to: pair.client)
        let oldOwner = try #require(TakeoverTests.owner(f))
        // A lock holder makes the takeover wait; the new pestod is then stopped, so the
        // handover sent on unlock stays unread in its socket when it is killed.
        let holder = try DBusConnection(.address(f.address))
        try f.manager("Lock", on: holder)
        let logPipe = try makePipe()
        let new = try ChildProcess(
            Products.path("pestod"),
            ["--address", f.address, "--authorize", "none", "--runtime-dir", f.runtimePath, "--state", f.statePath]
                + ["--control", f.controlPath, "--replace"],
            stdin: .devNull, stdout: .devNull, stderr: .descriptor(logPipe.write))
        defer { new.kill() }
        close(logPipe.write)
        defer { close(logPipe.read) }
        let log = LineReader(fd: logPipe.read)
        var waiting = false
        while !waiting, let line = log.line(timeoutMilliseconds: 20_000) { waiting = line.contains("takeover waits") }
        #expect(waiting, "the new pestod never said it waits for the lock")
        #expect(kill(new.pid, SIGSTOP) == 0)
        try f.manager("Unlock", on: holder)
        // The old pestod shares its tables and listeners and, serving on, waits for ready
        // (the connection would go only after it).
        var sent = false
        let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
        while !sent && MonotonicInstant.now < deadline {
            sent = f.log.contains("takeover: sharing")
            if !sent { usleep(10_000) }  // a log file has no readiness signal
        }
        #expect(sent, "the old pestod never shared its tables: \(f.log)")
        #expect(!f.log.contains("relayed connections ("), "the connection went before ready: \(f.log)")
        #expect(kill(new.pid, SIGKILL) == 0)
        #expect(new.waitUntilExit() == 128 + SIGKILL)
        // The old one goes on: same bus name, the connection relaying both ways.
        #expect(up.waitForRead(beyond: up.read + 65_536) && down.waitForRead(beyond: down.read + 65_536))
        #expect(TakeoverTests.owner(f) == oldOwner)
        #expect(f.pestod.isRunning)
        // And a real takeover afterwards takes the connection over.
        #expect(try f.takeOver(TakeoverTests.arguments) == 0)
        #expect(f.log.contains("1 relayed connections and 0 UDP flows (0 refused)"), "\(f.log)")
        up.stop()
        down.stop()
        #expect(up.finish(), "\(up.problems)")
        #expect(down.finish(), "\(down.problems)")
    }

    @Test(
        "takeovers back to back: a pestod --replace started the moment the previous old one exits, before its successor has opened its takeover socket, waits for that socket and takes over"
    )
    func backToBackTakeovers() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()
        let command =
            [Products.path("pestod"), "--address", f.address, "--authorize", "none"]
            + ["--runtime-dir", f.runtimePath, "--state", f.statePath, "--control", f.controlPath, "--replace"]
        let log = f.directory.url.appendingPathComponent("back-to-back.log").path
        let first = try ChildProcess(command[0], Array(command.dropFirst()), stdin: .devNull, stdout: .devNull, stderr: .file(log))
        defer { first.kill() }
        #expect(f.pestod.waitUntilExit() == 0)
        // At once: the first new pestod may not listen on the takeover socket yet.
        let notifyPath = f.directory.url.appendingPathComponent("notify-second").path
        let notify = try NotifySocket(path: notifyPath)
        let second = try ChildProcess(
            command[0], Array(command.dropFirst()), environment: ["NOTIFY_SOCKET": notifyPath], stdin: .devNull, stdout: .devNull,
            stderr: .file(log, append: true))
        defer { second.kill() }
        #expect(notify.waitForReady(timeoutMilliseconds: 20_000, process: second), "\(readTextFile(log) ?? "")")
        #expect(first.waitUntilExit() == 0, "\(readTextFile(log) ?? "")")
        #expect(listeningSocketsOf(pid: second.pid) == before.sockets)
        #expect(try f.table("List") == before.rules)
    }

    @Test(
        "a takeover socket that refuses (left by a pestod that has just exited, its successor not listening yet) is tried again until the successor listens"
    )
    func refusedTakeoverSocketIsTriedAgain() throws {
        let f = try PestodFixture()
        let fake = try TemporaryDirectory()
        let path = fake.url.path + "/takeover.sock"
        let address = try #require(SocketAddress(unixPath: path))
        // A stale socket file: bound, never listening, closed (connect gets ECONNREFUSED).
        let stale = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #expect(address.withSockaddr { bind(stale, $0, $1) } == 0)
        close(stale)
        let logPipe = try makePipe()
        let new = try ChildProcess(
            Products.path("pestod"),
            ["--address", f.address, "--authorize", "none", "--runtime-dir", fake.url.path, "--replace", "--state", f.statePath + ".new"],
            stdin: .devNull, stdout: .devNull, stderr: .descriptor(logPipe.write))
        defer { new.kill() }
        close(logPipe.write)
        defer { close(logPipe.read) }
        let log = LineReader(fd: logPipe.read)
        var lines: [String] = []
        while !lines.contains(where: { $0.contains("trying again") }), let line = log.line(timeoutMilliseconds: 20_000) {
            lines.append(line)
        }
        #expect(lines.contains { $0.contains("ECONNREFUSED") && $0.contains("trying again") }, "\(lines)")
        // The successor listens now (a stand-in that refuses the takeover).
        unlink(path)
        let listener = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listener) }
        #expect(address.withSockaddr { bind(listener, $0, $1) } == 0 && listen(listener, 1) == 0)
        detachThread {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            let old = TakeoverChannel(fd: fd)
            _ = try? old.receive()
            try? old.send(.refused("stand-in"))
            _ = try? old.receive()  // until the new pestod goes
        }
        #expect(new.waitUntilExit() == 1)
        while let line = log.line(timeoutMilliseconds: 5000) { lines.append(line) }
        #expect(lines.contains { $0.contains("refused the takeover: stand-in") }, "\(lines)")
    }

    @Test(
        "a scan rule's listener is handed over (same inode), not reopened by the new pestod's first scan",
        .enabled(if: RelayTests.isRoot, "needs root for ip netns"))
    func scanListenerHandedOver() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path] + TakeoverTests.arguments)
        let signals = try SignalCollector(address: f.address)
        let p = TestSockets.freePorts(10).lowerBound
        let rule = DBusValue.vardict([
            ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(p)),
            ("last-port", .uint16(p + 9)), ("scan", .bool(true)),
        ])
        try f.table("Insert", [.uint32(1), rule])
        try f.table("Activate", [.uint32(1)])
        let server = try #require(ns.echoServer(port: p + 3))
        defer { server.stop() }
        signals.wait(
            for: "scan opened the port",
            SignalCollector.signal("RuleStateChanged", path: PestodFixture.hostPath, [.uint32(1), .bool(true), .uint32(1), .uint32(0)]))
        let before = f.listeningSockets()
        #expect(before.count == 1)
        #expect(try f.takeOver(["--netns", ns.path] + TakeoverTests.arguments) == 0)
        #expect(f.log.contains("installed 1 handed-over listeners (0 refused)"), "\(f.log)")
        #expect(f.listeningSockets() == before)
        #expect(TestTraffic.ping(port: p + 3) == nil)
    }

    @Test("a UDP flow keeps its socket across two takeovers: the connected client keeps getting replies, the target sees one source port")
    func udpFlowSurvivesTakeovers() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        let echo = try #require(UDPEchoServer(port: targetPort))
        defer { echo.stop() }
        let rule = DBusValue.vardict([
            ("protocol", .string("udp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(port)),
            ("target-port", .uint16(targetPort)),
        ])
        try f.table("Insert", [.uint32(1), rule])
        try f.table("Activate", [.uint32(1)])
        // A connected client: the kernel drops any reply that does not come from pestod's port.
        let client = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(client) }
        TestSockets.setTimeouts(client, milliseconds: 10_000)
        #expect(TestSockets.withSocketAddress(.loopbackIPv4, port) { connect(client, $0, $1) == 0 })
        /// Sends `text` and returns the reply.
        func exchange(_ text: String) -> String? {
            guard send(client, text, text.utf8.count, 0) == text.utf8.count else { return nil }
            var buffer = [UInt8](repeating: 0, count: 256)
            let n = recv(client, &buffer, buffer.count, 0)
            return n > 0 ? String(decoding: buffer[..<n], as: UTF8.self) : nil
        }
        #expect(exchange("before") == "before")
        let sources = echo.sourcePorts
        #expect(sources.count == 1)
        for round in 1...2 {
            #expect(try f.takeOver(TakeoverTests.arguments) == 0, "round \(round)")
            #expect(f.log.contains("0 relayed connections and 1 UDP flows (0 refused)"), "round \(round): \(f.log)")
            #expect(exchange("round \(round)") == "round \(round)")
            #expect(echo.sourcePorts == sources, "round \(round): the flow kept its socket")
        }
    }

    @Test(
        "a new pestod that dies in the middle of the connections' handover, after it, or after taking the bus name leaves the old one relaying them"
    )
    func newInstanceDyingDuringConnectionHandover() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        let listener = try Self.targetListener(port: targetPort)
        defer { close(listener) }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(port, [("target-port", .uint16(targetPort))])])
        try f.table("Activate", [.uint32(1)])
        // Enough connections for two connection messages (240 descriptors at most in each).
        var pairs: [(client: Int32, target: Int32)] = []
        defer {
            for p in pairs {
                close(p.client)
                close(p.target)
            }
        }
        for _ in 0..<130 { pairs.append(try Self.relayed(port: port, target: listener)) }
        let up = StreamDirection("up", from: pairs[0].client, to: pairs[0].target)
        let down = StreamDirection("down", from: pairs[0].target, to: pairs[0].client)
        let oldOwner = try #require(TakeoverTests.owner(f))

        for step in ["received the first connections", "received everything", "took the bus name"] {
            let channel = try TakeoverTests.connect(f)
            try channel.send(.hello)
            #expect(try channel.receive().0 == .welcome)
            var held: [Int32] = []
            var connectionMessages = 0
            receiving: while true {
                let (message, fds) = try channel.receive()
                held += fds
                switch message {
                case .connections(let records):
                    connectionMessages += 1
                    #expect(!records.isEmpty)
                    if step == "received the first connections" { break receiving }
                case .shared:
                    try channel.send(.ready)
                case .end(_, _, let connections, _):
                    #expect(connections == 130, "\(step)")
                    #expect(connectionMessages == 2, "\(step)")
                    break receiving
                default: break
                }
            }
            var thief: DBusConnection?
            if step == "took the bus name" {
                let c = try DBusConnection(.address(f.address))
                try c.requestName(PestodFixture.dest, allowingReplacement: true, replacing: true)
                thief = c
            }
            let nameChanges = try SignalCollector(
                address: f.address,
                match: "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='\(PestodFixture.dest)'")
            // The new pestod dies: its descriptors, its bus connection and its channel close.
            for fd in held { close(fd) }
            thief = nil
            _ = thief
            channel.finish()
            if TakeoverTests.owner(f) != oldOwner {
                nameChanges.wait(for: "the name back with the old pestod (\(step))") { $0.arguments?[2] == .string(oldOwner) }
            }
            #expect(TakeoverTests.owner(f) == oldOwner, "\(step)")
            #expect(f.pestod.isRunning, "\(step)")
            // The old pestod relays again: more bytes arrive both ways than had been read.
            #expect(up.waitForRead(beyond: up.read + 65_536) && down.waitForRead(beyond: down.read + 65_536), "\(step)")
        }
        // And a real takeover afterwards hands all 130 over.
        #expect(try f.takeOver(TakeoverTests.arguments) == 0)
        #expect(f.log.contains("130 relayed connections and 0 UDP flows (0 refused)"), "\(f.log)")
        up.stop()
        down.stop()
        #expect(up.finish(), "\(up.read) of \(up.written), \(up.problems)")
        #expect(down.finish(), "\(down.read) of \(down.written), \(down.problems)")
    }
}
