// SPDX-License-Identifier: GPL-2.0-or-later

// Conditions that recur per connection or datagram are logged once, not once each: a
// forwarding loop, a full UDP flow table, a deleted target namespace. A peer that can reach
// a relayed port must not be able to flood pestod's log. In process (InProcessPestod.swift):
// the clients run on helper threads while the test's thread turns the loop that serves them.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod data path notices (in process)", .serialized, .timeLimit(.minutes(10)))
struct DataPathNoticeTests {
    /// The lines of pestod's log that contain `fragment`.
    func lines(_ f: InProcessPestod, containing fragment: String) -> [Substring] {
        f.log.split(separator: "\n").filter { $0.contains(fragment) }
    }

    @Test("a rule that forwards to its own listener: every connection is reset, one log line, one when the listener closes")
    func loopLoggedOnce() throws {
        let f = try InProcessPestod()
        let p = TestSockets.freePorts(1).lowerBound
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(p)),
                    ("target-address", .string("127.0.0.1")), ("target-port", .uint16(p)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        for _ in 0..<5 {
            let end = f.serving { TestSockets.firstRead(port: p) }
            #expect(end == .failure(Errno(rawValue: ECONNRESET)), "\(String(describing: end))")
        }
        // Each reset was sent after the occurrence was recorded, so all five are counted.
        #expect(lines(f, containing: "one of pestod's own listeners").count == 1, "\(f.log)")
        try f.table("Deactivate", [.uint32(1)])
        let cleared = lines(f, containing: "forwarding loop cleared")
        #expect(cleared.count == 1 && cleared.first?.contains("; 4 further occurrences") == true, "\(f.log)")
    }

    @Test("datagrams from new clients while the UDP flow table is full: one log line")
    func fullFlowTableLoggedOnce() throws {
        var configuration = EngineConfiguration()
        configuration.udp.maxFlows = 1  // --max-udp-flows 1
        let f = try InProcessPestod(configuration: configuration)
        let ports = TestSockets.freePorts(2)
        let server = try #require(UDPEchoServer(port: ports.upperBound))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("udp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        let first = try #require(TestTraffic.udpClient())
        defer { close(first) }
        #expect(f.serving { TestTraffic.udpExchange(fd: first, port: ports.lowerBound, payload: [1])?.reply } == [1])
        var others: [Int32] = []
        defer { for fd in others { close(fd) } }
        for i in 0..<5 {
            let fd = try #require(TestTraffic.udpClient())
            others.append(fd)
            let to = SocketAddress(.loopbackIPv4, port: ports.lowerBound)
            #expect(to.withSockaddr { sendto(fd, [UInt8(i)], 1, 0, $0, $1) } == 1)
        }
        // The listener reads its queue in order: once the first client's next datagram is
        // answered, the five before it have been handled (dropped).
        #expect(f.serving { TestTraffic.udpExchange(fd: first, port: ports.lowerBound, payload: [2])?.reply } == [2])
        #expect(lines(f, containing: "the UDP flow table is full (1 flows").count == 1, "\(f.log)")
        #expect(server.sourcePorts.count == 1)
    }

    @Test(
        "connections into a deleted target namespace: one log line", .enabled(if: getuid() == 0, "needs root for ip netns"),
        .timeLimit(.minutes(2)))
    func deletedNamespaceLoggedOnce() throws {
        let ns = try TestNamespace()
        var configuration = EngineConfiguration()
        configuration.namespacePath = ns.path  // --netns
        let f = try InProcessPestod(configuration: configuration)
        let ports = TestSockets.freePorts(2)
        let inside = try #require(ns.echoServer(port: ports.upperBound))
        defer { inside.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        #expect(f.ping(port: ports.lowerBound) == nil)
        #expect(lines(f, containing: "is gone").isEmpty)
        let del = try run("/usr/sbin/ip", ["netns", "del", ns.name])
        #expect(del.status == 0, "\(del.err)")
        // pestod still holds the namespace, so connections keep working; each is noticed.
        for _ in 0..<3 { #expect(f.ping(port: ports.lowerBound) == nil) }
        #expect(lines(f, containing: "the target network namespace \(ns.path) is gone").count == 1, "\(f.log)")
    }
}
