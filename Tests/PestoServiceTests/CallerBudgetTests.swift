// SPDX-License-Identifier: GPL-2.0-or-later

// The caller work budget and sliced decoding (CallerWorkBudget.swift, SlicedApplyDecoder.swift):
// a user flooding refused changes waits for its budget while other callers are answered; a
// caller's later calls wait behind its Apply being decoded, in order; root is never held.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod caller work budget and sliced decoding", .serialized, .timeLimit(.minutes(10)))
struct CallerBudgetTests {
    static let isRoot = getuid() == 0

    /// pesto-test-peer as nobody (uid 65534).
    static func peerAsNobody(_ f: PestodFixture) throws -> ChildProcess {
        let peer = try ChildProcess(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Products.path("pesto-test-peer"), f.address])
        let ready = peer.readLine() ?? ""
        #expect(ready.hasPrefix("ready"), "\(ready)")
        return peer
    }

    /// The serial of a "sent SERIAL" line.
    static func serial(_ line: String) -> String {
        line.hasPrefix("sent ") ? String(line.dropFirst(5)) : "?"
    }

    @Test(
        "a user flooding refused Applies is slowed: its next Apply and its later Status wait for its budget, in order, while another caller's Status is answered; they are dropped when it leaves",
        .enabled(if: isRoot, "needs root to run a client as another user"), .timeLimit(.minutes(3)))
    func flooderWaitsOthersAnswered() throws {
        // A budget of 64 KiB that never refills: the first 1,000-rule Apply (about 70 KB)
        // spends it, so the next change of that user waits for good.
        let f = try PestodFixture(pestodArguments: ["--authorize", "root", "--caller-budget", "65536:0", "--slice-operations", "64"])
        try f.table("Insert", [.uint32(1), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        let before = try f.snapshot()
        let peer = try Self.peerAsNobody(f)
        defer { peer.kill() }
        let first = Self.serial(peer.ask("Send Apply 1000 100"))
        let second = Self.serial(peer.ask("Send Apply 1000 5000"))
        let status = Self.serial(peer.ask("Send Status 1"))
        // Another caller is answered meanwhile.
        #expect(try f.table("Status", [.uint32(1)]).first?.boolValue == false)
        // What the flooder got by then, and for a while after: the first Apply's refusal only.
        peer.send("Replies 2000")
        var replies: [String] = []
        while let line = peer.readLine(), line != "done" { replies.append(line) }
        #expect(replies == ["reply \(first) error \(DBusErrorReply.accessDenied)"], "\(replies)")
        #expect(!replies.contains { $0.hasPrefix("reply \(second) ") || $0.hasPrefix("reply \(status) ") }, "\(replies)")
        #expect(f.log.contains("wait for their caller's work budget"), "\(f.log)")
        #expect(try f.snapshot() == before)
        // Leaving drops what waits.
        peer.kill()
        let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
        while !f.log.contains("calls waiting behind its work in progress or its work budget; they are dropped"),
            MonotonicInstant.now < deadline
        {
            usleep(10_000)  // a log file has no readiness signal
        }
        #expect(f.log.contains("left the bus with 2 calls waiting"), "\(f.log)")
        #expect(try f.table("Status", [.uint32(1)]).first?.boolValue == false)
    }

    @Test(
        "root keeps its throughput under a budget that never refills: every change is answered",
        .enabled(if: isRoot, "uid 0 is the exempt caller"), .timeLimit(.minutes(2)))
    func rootNeverWaits() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "root", "--caller-budget", "1:0"])
        let ports = TestSockets.freePorts(20)
        for (k, port) in ports.enumerated() {
            try f.table("Insert", [.uint32(UInt32(k + 1)), PestodFixture.rule(port)])
        }
        for k in 1...20 { try f.table("Delete", [.uint32(UInt32(k))]) }
        #expect(try f.table("List").first?.arrayValue?.count == 0)
        #expect(!f.log.contains("wait for their caller's work budget"), "\(f.log)")
    }

    @Test(
        "a large Apply is decoded over several loop turns and applied; one refused in a later slice (an ID inserted twice) changes nothing, and the caller's Status sent right after it is answered after it, in order",
        .timeLimit(.minutes(2)))
    func slicedDecodingInOrder() throws {
        let f = try PestodFixture(pestodArguments: ["--slice-operations", "8"])
        let ports = TestSockets.freePorts(40)
        let inserts: [DBusValue] = ports.enumerated().map { k, port in
            .structure([.uint32(UInt32(100 + k)), PestodFixture.rule(port)])
        }
        let applied = try f.table("Apply", [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([])])
        #expect(applied.first?.arrayValue?.count == 40)
        // 40 elements, 8 a turn, the options, then 40 rules validated, 8 a turn: 11 turns.
        #expect(f.log.contains("Apply of 40 rules decoded and validated in"), "\(f.log)")
        #expect(f.log.contains("over 11 loop turns"), "\(f.log)")

        // An ID inserted twice, found in a later slice: RuleExists, nothing changed; the
        // Status the caller sent right behind it waits for it.
        let before = try f.snapshot()
        var twice = (0..<30).map { k in DBusValue.structure([.uint32(UInt32(500 + k)), PestodFixture.rule(ports.lowerBound)]) }
        twice.append(.structure([.uint32(500), PestodFixture.rule(ports.lowerBound)]))
        let connection = try DBusConnection(.address(f.address))
        let apply = PendingAuthorizationTests.call("Apply", [.array(element: "(ua{sv})", twice), .array(element: "u", []), .vardict([])])
        let status = PendingAuthorizationTests.call("Status", [.uint32(100)])
        connection.send(apply)
        connection.send(status)
        connection.flush()
        var order: [UInt32] = []
        var got: [UInt32: DBusMessage] = [:]
        let deadline = MonotonicInstant.now.adding(milliseconds: 60_000)
        while order.count < 2, MonotonicInstant.now < deadline {
            guard let m = connection.nextMessage(timeoutMilliseconds: 500), m.replySerial != 0 else { continue }
            order.append(m.replySerial)
            got[m.replySerial] = m
        }
        #expect(order == [apply.serial, status.serial])
        #expect(got[apply.serial]?.errorName == PestoBusNames.errorName(.ruleExists))
        #expect(got[status.serial]?.arguments?.first?.boolValue == true)
        #expect(try f.snapshot() == before)
    }
}
