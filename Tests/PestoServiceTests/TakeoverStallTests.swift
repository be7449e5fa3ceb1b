// SPDX-License-Identifier: GPL-2.0-or-later

// A successor that stalls in the middle of a takeover (doc/takeover.md, "Failures"): the
// running pestod serves on while it waits, and once the takeover timeout has passed it
// abandons the takeover and is fully in charge. The test plays the successor by hand: it
// receives what the old pestod sends before it waits for an answer, then says nothing.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod takeover: a stalled successor", .serialized, .timeLimit(.minutes(10)))
struct TakeoverStallTests {
    /// The takeover timeout of these tests: long enough to do everything below while the
    /// successor stalls, short enough for the test to wait it out.
    static let timeoutMilliseconds = 8_000

    /// Receives messages until the old pestod waits for an answer (the end of what it shares
    /// while serving on); returns the descriptors received.
    static func receiveUntilAnswerAwaited(_ channel: TakeoverChannel) throws -> [Int32] {
        var fds: [Int32] = []
        while true {
            let (message, received) = try channel.receive()
            fds += received
            if case .shared = message { return fds }
        }
    }

    @Test(
        "a successor that stalls leaves the old pestod serving throughout (reads, relayed bytes, a UDP flow, new connections), then fully in charge after the timeout",
        .timeLimit(.minutes(3))
    )
    func stalledSuccessor() throws {
        let arguments = TakeoverTests.arguments + ["--takeover-timeout", "\(Self.timeoutMilliseconds)"]
        let f = try PestodFixture(pestodArguments: arguments)
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        let udpPort = TestSockets.freePorts(1).lowerBound
        let udpTarget = TestSockets.freePorts(1).lowerBound
        let listener = try TakeoverRelayTests.targetListener(port: targetPort)
        defer { close(listener) }
        let echo = try #require(UDPEchoServer(port: udpTarget))
        defer { echo.stop() }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(port, [("target-port", .uint16(targetPort))])])
        try f.table("Activate", [.uint32(1)])
        let udpRule = DBusValue.vardict([
            ("protocol", .string("udp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(udpPort)),
            ("target-port", .uint16(udpTarget)),
        ])
        try f.table("Insert", [.uint32(2), udpRule])
        try f.table("Activate", [.uint32(2)])

        // A relayed connection exchanging data both ways for the whole test.
        let pair = try TakeoverRelayTests.relayed(port: port, target: listener)
        defer {
            close(pair.client)
            close(pair.target)
        }
        let up = StreamDirection("up", from: pair.client, to: pair.target)
        let down = StreamDirection("down", from: pair.target, to: pair.client)
        // And a UDP flow: a connected client, so only replies from pestod's port arrive.
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(udp) }
        TestSockets.setTimeouts(udp, milliseconds: 10_000)
        #expect(TestSockets.withSocketAddress(.loopbackIPv4, udpPort) { connect(udp, $0, $1) == 0 })
        func exchange(_ text: String) -> String? {
            guard send(udp, text, text.utf8.count, 0) == text.utf8.count else { return nil }
            var buffer = [UInt8](repeating: 0, count: 256)
            let n = recv(udp, &buffer, buffer.count, 0)
            return n > 0 ? String(decoding: buffer[..<n], as: UTF8.self) : nil
        }
        #expect(exchange("before") == "before")
        let before = try f.snapshot()
        let oldOwner = try #require(TakeoverTests.owner(f))

        // The successor says hello, receives what the old pestod shares, and stalls.
        let channel = try TakeoverTests.connect(f)
        try channel.send(.hello)
        #expect(try channel.receive().0 == .welcome)
        let held = try Self.receiveUntilAnswerAwaited(channel)
        defer { for fd in held { close(fd) } }

        // While it stalls, the old pestod answers reads, relays bytes both ways, keeps its UDP
        // flow, and accepts and relays a new connection...
        let listed = try f.table("List")
        #expect(!listed.isEmpty)
        #expect(up.waitForRead(beyond: up.read + 65_536) && down.waitForRead(beyond: down.read + 65_536))
        #expect(exchange("while stalled") == "while stalled")
        let fresh = try TakeoverRelayTests.relayed(port: port, target: listener)
        #expect(write(fresh.client, "x", 1) == 1)
        var byte: UInt8 = 0
        #expect(read(fresh.target, &byte, 1) == 1 && byte == UInt8(ascii: "x"))
        close(fresh.client)
        close(fresh.target)
        // ...all of it while the takeover was still under way, not after the old pestod gave up.
        #expect(!channel.peerHasLeft, "the old pestod served only once it had abandoned the takeover")
        #expect(!f.log.contains("takeover abandoned"), "\(f.log)")

        // After the timeout the old pestod abandons the takeover: the successor is told, or its
        // connection ends.
        let ended: String
        do {
            let (message, fds) = try channel.receive()
            for fd in fds { close(fd) }
            ended = "\(message)"
        } catch {
            ended = error.message
        }
        #expect(ended.contains("refused"), "\(ended)")
        #expect(f.log.contains("takeover abandoned: the new pestod did not answer within \(Self.timeoutMilliseconds) ms"), "\(f.log)")

        // And it is fully in charge: the bus name, every listener, the relayed connection and
        // the flow, the control socket; and a real takeover works afterwards.
        #expect(TakeoverTests.owner(f) == oldOwner)
        #expect(f.pestod.isRunning)
        #expect(try f.snapshot() == before)
        #expect(up.waitForRead(beyond: up.read + 65_536) && down.waitForRead(beyond: down.read + 65_536))
        #expect(exchange("after") == "after")
        let later = try TakeoverRelayTests.relayed(port: port, target: listener)
        #expect(write(later.client, "y", 1) == 1)
        #expect(read(later.target, &byte, 1) == 1 && byte == UInt8(ascii: "y"))
        close(later.client)
        close(later.target)
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        let dump = try #require(client.readHelloAndDump())
        #expect(dump.tables.values.map(\.rules.count).reduce(0, +) == 2)
        #expect(try f.takeOver(arguments) == 0)
        #expect(f.log.contains("1 relayed connections and 1 UDP flows (0 refused)"), "\(f.log)")
        #expect(exchange("taken over") == "taken over")
        up.stop()
        down.stop()
        #expect(up.finish(), "\(up.read) of \(up.written), \(up.problems)")
        #expect(down.finish(), "\(down.read) of \(down.written), \(down.problems)")
    }

    @Test(
        "a change made while the successor installs the tables is not lost: at ready the old pestod refuses the takeover and stays in charge; a takeover then carries the change",
        .timeLimit(.minutes(2))
    )
    func changeWhileSharing() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let ports = TestSockets.freePorts(2)
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.lowerBound)])
        try f.table("Activate", [.uint32(1)])
        let oldOwner = try #require(TakeoverTests.owner(f))
        let channel = try TakeoverTests.connect(f)
        try channel.send(.hello)
        #expect(try channel.receive().0 == .welcome)
        let held = try Self.receiveUntilAnswerAwaited(channel)
        defer { for fd in held { close(fd) } }
        #expect(held.count == 1 + 1, "one listener and the control socket")
        // The old pestod serves on: a change is made and answered.
        try f.table("Insert", [.uint32(2), PestodFixture.rule(ports.upperBound)])
        try f.table("Activate", [.uint32(2)])
        let changed = try f.snapshot()
        try channel.send(.ready)
        let (answer, fds) = try channel.receive()
        for fd in fds { close(fd) }
        guard case .refused(let why) = answer else {
            Issue.record("expected refused, got \(answer)")
            return
        }
        #expect(why.contains("changed"), "\(why)")
        #expect(f.log.contains("takeover abandoned: the tables or their listeners changed"), "\(f.log)")
        #expect(TakeoverTests.owner(f) == oldOwner)
        #expect(try f.snapshot() == changed)
        #expect(try f.takeOver(TakeoverTests.arguments) == 0)
        #expect(try f.snapshot() == changed)
    }

    @Test(
        "a second successor while a takeover is under way is refused at once, and the first one completes its takeover",
        .timeLimit(.minutes(2))
    )
    func secondSuccessorRefused() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let first = try TakeoverTests.connect(f)
        try first.send(.hello)
        #expect(try first.receive().0 == .welcome)
        let held = try Self.receiveUntilAnswerAwaited(first)
        defer { for fd in held { close(fd) } }
        let second = try TakeoverTests.connect(f)
        try second.send(.hello)
        let (answer, fds) = try second.receive()
        for fd in fds { close(fd) }
        #expect(answer == .refused("Another takeover is under way."))
        // The first goes on: ready brings the relays' end, taken brings bye.
        try first.send(.ready)
        var last: TakeoverMessage?
        repeat {
            let (message, more) = try first.receive()
            for fd in more { close(fd) }
            last = message
        } while last.map({ if case .end = $0 { false } else { true } }) ?? true
        // As a real successor, it owns the bus name before it says taken.
        let successor = try DBusConnection(.address(f.address))
        try successor.requestName(PestodFixture.dest, allowingReplacement: true, replacing: true)
        try first.send(.taken)
        #expect(try first.receive().0 == .bye)
        first.finish()
        #expect(f.pestod.waitUntilExit() == 0)
        #expect(TakeoverTests.owner(f) == successor.uniqueName)
        #expect(f.log.contains("takeover refused: another takeover is under way"), "\(f.log)")
    }
}
