// SPDX-License-Identifier: GPL-2.0-or-later

// pestod --overlap first-match where only pestod as a process shows it (doc/overlap.md): an
// upstream upload through the control socket, pestoctl replacing a range, --state across a
// restart, and a takeover. The carve-out and rollback behaviour runs in process
// (OverlapInProcessTests.swift).

import Foundation
import PestoDBus
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("pestod --overlap first-match: control socket and --state", .serialized, .timeLimit(.minutes(10)))
struct OverlapOtherPathsTests {
    @Test("an upstream upload of a range and a port inside it: refused under refuse, applied under first-match")
    func uploadOverlap() throws {
        for firstMatch in [false, true] {
            let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"] + (firstMatch ? ["--overlap", "first-match"] : []))
            let ports = TestSockets.freePorts(4)
            let p = ports.lowerBound
            let client = try #require(WireClient(path: f.controlPath))
            defer { close(client.fd) }
            #expect(client.readHelloAndDump() != nil)
            // The single port first (upstream's first rule wins), then the range around it.
            client.send(
                [1] + WireClient.be32(2) + WireClient.rule(first: p + 1, target: p + 3)
                    + WireClient.rule(first: p, last: p + 2, target: p) + [0])
            shutdown(client.fd, Int32(SHUT_WR))
            var byte: UInt8 = 0
            #expect(recv(client.fd, &byte, 1, 0) == 0)
            let list = try f.table("List").first?.arrayValue ?? []
            if firstMatch {
                #expect(list.count == 2, "\(list)")
                #expect(f.listeningSockets().count == 3, "one socket per port, the carved one shared")
                let won = list.compactMap { $0.structValue?[2].structValue?[4].uint32Value }
                #expect(won == [1, 2], "the single port (lower ID) wins its port; the range the other two")
                let server = try #require(EchoServer(port: p + 3))
                defer { server.stop() }
                #expect(TestTraffic.ping(port: p + 1) == nil && server.accepted == 1)
            } else {
                #expect(list.isEmpty && f.listeningSockets().isEmpty, "an overlapping upload changes nothing")
            }
        }
    }

    @Test("pestoctl replacing a range's target under first-match: the new rule takes the range's sockets over unclosed")
    func pestoctlReplaceKeepsSockets() throws {
        for firstMatch in [false, true] {
            let f = try PestodFixture(pestodArguments: firstMatch ? ["--overlap", "first-match"] : [])
            let p = TestSockets.freePorts(8)
            let (a, b) = (p.lowerBound, p.lowerBound + 3)
            var r = try f.pestoctl(["-t", "127.0.0.1/\(a)-\(b)"])
            #expect(r.status == 0, "\(r.err)")
            let before = f.listeningSockets()
            r = try f.pestoctl(["-t", "127.0.0.1/\(a)-\(b):\(b + 1)-\(b + 4)"])
            #expect(r.status == 0, "\(r.err)")
            let after = f.listeningSockets()
            #expect(before.count == 4 && after.count == 4)
            if firstMatch {
                #expect(after == before, "same inodes: the sockets were handed over, never closed")
            } else {
                #expect(Set(after).isDisjoint(with: before), "refuse: the old rule's sockets close before the new one binds")
            }
        }
    }

    @Test("--state restores overlapping active rules under first-match, each winning what it won before")
    func stateRestore() throws {
        let f = try PestodFixture(pestodArguments: ["--state", "STATE", "--overlap", "first-match"])
        let ports = TestSockets.freePorts(4)
        try f.table("Insert", [.uint32(10), OverlapInProcessTests.rule(ports.lowerBound, ports.lowerBound + 3, to: 9)])
        try f.table("Insert", [.uint32(5), OverlapInProcessTests.rule(ports.lowerBound + 1, to: 9, address: "127.0.0.1")])
        try f.table("Activate", [.uint32(10)])
        try f.table("Activate", [.uint32(5)])
        let listed = try f.table("List")
        #expect(f.listeningSockets().count == 4)
        f.pestod.kill()
        try f.startPestod(["--state", "STATE", "--overlap", "first-match"])
        #expect(try f.table("List") == listed, "both active again, with the same counts and ports won")
        #expect(f.listeningSockets().count == 4, "the carve-out (activated first, by ID) was widened into the range's socket")
        #expect(f.log.contains("restored 2 of 2 rules"))
    }
}

@Suite("pestod --overlap first-match: takeover", .serialized, .timeLimit(.minutes(10)))
struct OverlapTakeoverTests {
    @Test("pestod --replace hands shared sockets over: a range and a carve-out on its binding keep every inode and their winners")
    func takeoverKeepsSharedSockets() throws {
        let arguments = ["--runtime-dir", "RUNTIME", "--state", "STATE", "--overlap", "first-match"]
        let f = try PestodFixture(pestodArguments: arguments)
        let ports = TestSockets.freePorts(5)
        let range = ports.lowerBound...(ports.lowerBound + 3)
        let carveOut = try #require(EchoServer(port: ports.upperBound))
        defer { carveOut.stop() }
        try f.table("Insert", [.uint32(100), OverlapInProcessTests.rule(range.lowerBound, range.upperBound, to: 9)])
        try f.table("Insert", [.uint32(50), OverlapInProcessTests.rule(range.lowerBound + 1, to: carveOut.port)])
        try f.table("Activate", [.uint32(100)])
        try f.table("Activate", [.uint32(50)])
        let sockets = f.listeningSockets()
        let listed = try f.table("List")
        #expect(sockets.count == 4)
        #expect(try f.takeOver(arguments) == 0)
        #expect(f.listeningSockets() == sockets, "every listener, the shared one included, kept its inode")
        #expect(try f.table("List") == listed)
        #expect(TestTraffic.ping(port: range.lowerBound + 1) == nil && carveOut.accepted == 1, "the carve-out still wins its port")
    }
}
