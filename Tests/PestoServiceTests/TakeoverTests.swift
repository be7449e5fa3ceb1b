// SPDX-License-Identifier: GPL-2.0-or-later

// Takeover: `pestod --replace` takes the tables, listeners, bus name and control socket
// over from the running pestod (doc/takeover.md). End to end with a private bus; the test
// plays one side of the handover by hand where a failure must hit a precise step.

import Foundation
import PestoEngine
import PestoSystem
import PestoModel
import PestoTestSupport
import Synchronization
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod takeover", .serialized)
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

    @Test("three takeovers in a row: every listener keeps its inode, the objects and properties are the same, no connect is refused, the control socket still answers")
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
        let done = Atomic<Bool>(false)
        detachThread {
            while !stop.load(ordering: .relaxed) {
                switch TestSockets.connect(port: ports.lowerBound) {
                case .success(let fd): close(fd)
                case .failure(let e): refused.withLock { $0.append("\(e)") }
                }
                attempts.add(1, ordering: .relaxed)
            }
            done.store(true, ordering: .releasing)
        }
        for round in 1...3 {
            let status = try f.takeOver(Self.arguments)
            #expect(status == 0, "round \(round): the old pestod exited with \(status)")
            let after = try f.snapshot()
            #expect(after == before, "round \(round)")
            #expect(f.log.contains("installed 201 handed-over listeners (0 refused)"), "\(f.log)")
        }
        stop.store(true, ordering: .relaxed)
        while !done.load(ordering: .acquiring) { usleep(1000) }
        #expect(refused.withLock { $0 } == [])
        #expect(attempts.load(ordering: .relaxed) > 0)
        // The forwarding works through the last instance, and the control socket answers.
        #expect(TestTraffic.ping(port: ports.lowerBound) == nil)
        let client = try #require(WireClient(path: f.controlPath))
        defer { close(client.fd) }
        let dump = try #require(client.readHelloAndDump())
        #expect(dump.tables.values.map(\.rules.count).reduce(0, +) == 2)
    }
}
