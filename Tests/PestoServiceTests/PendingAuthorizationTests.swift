// SPDX-License-Identifier: GPL-2.0-or-later

// pestod --authorize polkit against a scripted polkit (FakePolkit) on the private bus:
// a Lock whose caller leaves before polkit answers is never granted, one slow check does
// not hold up other clients, and a flood of changes is capped per sender with bounded logs.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod authorisation queue", .serialized, .timeLimit(.minutes(10)))
struct PendingAuthorizationTests {
    static let limitsExceeded = "org.freedesktop.DBus.Error.LimitsExceeded"

    /// A method call on pestod's HOST table or Manager.
    static func call(_ member: String, _ args: [DBusValue] = [], noReply: Bool = false) -> DBusMessage {
        let manager = ["Lock", "Unlock", "Commit", "Rollback"].contains(member)
        let m = DBusMessage.methodCall(
            destination: PestodFixture.dest, path: manager ? PestodFixture.managerPath : PestodFixture.hostPath,
            interface: manager ? PestodFixture.managerInterface : PestodFixture.tableInterface, member: member, arguments: args)
        m.noReply = noReply
        return m
    }

    /// Waits for the reply to the call `serial` on `connection` (other messages are skipped).
    static func reply(to serial: UInt32, on connection: DBusConnection) -> DBusMessage? {
        let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
        while MonotonicInstant.now < deadline {
            if let m = connection.nextMessage(timeoutMilliseconds: 500), m.replySerial == serial { return m }
        }
        Issue.record("no reply to call \(serial)")
        return nil
    }

    /// The lock holder as the Manager's LockOwner property says.
    static func lockOwner(_ f: PestodFixture) throws -> String? {
        try f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestodFixture.managerInterface), .string("LockOwner")]
        ).first?.variantValue?.stringValue
    }

    @Test(
        "200 clients send Lock and leave at once, polkit answering before, racing with, or after the departure: the lock ends free and other clients can change the tables"
    )
    func lockRacingDisconnect() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "polkit"])
        let polkit = try FakePolkit(address: f.address)
        let rounds = 200
        for i in 0..<rounds {
            var name = ""
            do {
                let c = try DBusConnection(.address(f.address))
                name = c.uniqueName
                switch i % 3 {
                case 0: polkit.set(name, .allowAfterLeaving)  // the answer comes after pestod saw it leave
                case 1: polkit.set(name, .allow)  // the answer races the departure
                default: polkit.set(name, .allow)  // the answer comes before the departure
                }
                let lock = Self.call("Lock", noReply: i % 2 == 0)
                c.send(lock)
                c.flush()
                if i % 3 == 2 { polkit.wait("the check of \(name)") { $0.checks(of: name) == 1 && $0.answered >= $0.checks.count } }
                // `c` is closed here: the client leaves the bus.
            }
            // The lock is checked before polkit is asked (doc/dbus-api.md, check order), so the
            // next client's Lock reaches polkit only once this one's answer and departure are
            // both handled and the lock is free again. polkit's answer was sent before the Get
            // below, so pestod handles it first; the departure may come later, hence the loop.
            polkit.wait("the answer to \(name)") { $0.checks(of: name) == 1 && $0.answered >= $0.checks.count }
            var owner = try Self.lockOwner(f)
            for _ in 0..<10_000 where owner != "" { owner = try Self.lockOwner(f) }
            #expect(owner == "", "the lock stayed with \(owner ?? "?") after it left")
        }
        polkit.wait("every check answered") { $0.checks.count == rounds && $0.answered == rounds }

        // polkit answers in order, so once this change is authorised every earlier answer
        // has been handled too.
        let p = TestSockets.freePorts(2).lowerBound
        let other = try DBusConnection(.address(f.address))
        #expect(
            f.errorName { () throws(DBusErrorReply) in try f.table("Insert", [.uint32(1), PestodFixture.rule(p)], on: other) } == "success")
        #expect(try Self.lockOwner(f) == "")
        try f.manager("Lock")
        #expect(try Self.lockOwner(f) == f.client.uniqueName)
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)])
        try f.manager("Commit")
        try f.manager("Unlock")
        #expect(try f.table("List").first?.arrayValue?.count == 2)
    }

    @Test("a check polkit holds for one client does not hold up another client's change; the held change runs once released")
    func slowCheckIsolated() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "polkit"])
        let polkit = try FakePolkit(address: f.address)
        let p = TestSockets.freePorts(2).lowerBound
        let slow = try DBusConnection(.address(f.address))
        polkit.set(slow.uniqueName, .hold)
        let insert = Self.call("Insert", [.uint32(1), PestodFixture.rule(p)])
        slow.send(insert)
        slow.flush()
        polkit.wait("the slow client's check") { $0.checks(of: slow.uniqueName) == 1 }

        // Another client's change is authorised and done while the first check is pending.
        let fast = try f.client.call(
            PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Insert",
            [.uint32(2), PestodFixture.rule(p + 1)], timeoutMilliseconds: 10_000)
        #expect(fast.isEmpty)
        #expect(try f.table("List").first?.arrayValue?.count == 1)

        polkit.release(slow.uniqueName, allow: true)
        let answer = try #require(Self.reply(to: insert.serial, on: slow))
        #expect(!answer.isError, "\(answer.asError?.description ?? "")")
        #expect(try f.table("List").first?.arrayValue?.count == 2)
    }

    @Test("a takeover refuses the changes still waiting for polkit with Locked, instead of leaving them unanswered")
    func heldChangeRefusedAtTakeover() throws {
        let arguments = ["--authorize", "polkit", "--runtime-dir", "RUNTIME"]
        let f = try PestodFixture(pestodArguments: arguments)
        let polkit = try FakePolkit(address: f.address)
        let p = TestSockets.freePorts(1).lowerBound
        let slow = try DBusConnection(.address(f.address))
        polkit.set(slow.uniqueName, .hold)
        let insert = Self.call("Insert", [.uint32(1), PestodFixture.rule(p)])
        slow.send(insert)
        slow.flush()
        polkit.wait("the held check") { $0.checks(of: slow.uniqueName) == 1 }

        #expect(try f.takeOver(arguments) == 0, "the old pestod exits with 0")
        let answer = try #require(Self.reply(to: insert.serial, on: slow))
        #expect(answer.asError?.name == PestoBusNames.errorName(.locked), "\(answer.asError?.description ?? "no error")")
        #expect(answer.asError?.message.contains("being replaced") == true)
        #expect(try f.table("List").first?.arrayValue?.count == 0, "the refused change did not happen")
    }

    @Test("a check in progress whose caller leaves is withdrawn from polkit (CancelCheckAuthorization); the lock stays free")
    func leaverWithdrawn() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "polkit"])
        let polkit = try FakePolkit(address: f.address)
        var leaver: DBusConnection? = try DBusConnection(.address(f.address))
        let name = leaver!.uniqueName
        polkit.set(name, .hold)
        for member in ["Lock", "Insert"] {
            leaver!.send(Self.call(member, member == "Lock" ? [] : [.uint32(1), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)]))
        }
        leaver!.flush()
        polkit.wait("the check of the Lock") { $0.checks(of: name) == 1 }
        leaver = nil  // leaves the bus
        polkit.wait("the check withdrawn") { $0.withdrawn == [name] }
        #expect(polkit.snapshot.checks(of: name) == 1, "the Insert behind it was never asked about")
        #expect(try Self.lockOwner(f) == "")
        try f.manager("Lock")
        try f.manager("Unlock")
        #expect(f.log.contains("\(name) left the bus with 2 changes waiting for authorization"))
    }

    @Test(
        "a flood of NO_REPLY changes: 64 wait, the rest are refused with LimitsExceeded at once, the log stays short, and root's change goes through meanwhile"
    )
    func floodCapped() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "polkit"])
        let polkit = try FakePolkit(address: f.address)
        let p = TestSockets.freePorts(2).lowerBound
        let flooder = try DBusConnection(.address(f.address))
        let name = flooder.uniqueName
        polkit.set(name, .hold)
        let flood = 5_000
        for i in 0..<flood {
            flooder.send(Self.call("Insert", [.uint32(UInt32(1_000 + i)), PestodFixture.rule(p)], noReply: true))
        }
        let asking = Self.call("Activate", [.uint32(1_000)])
        flooder.send(asking)
        flooder.flush()
        let refusal = try #require(Self.reply(to: asking.serial, on: flooder))
        #expect(refusal.asError?.name == Self.limitsExceeded, "\(refusal.asError?.description ?? "not an error")")
        #expect(refusal.asError?.message.contains("64 changes waiting") == true)

        // Root (the test's own client) is answered while the flood waits.
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p + 1)])
        #expect(polkit.snapshot.checks(of: name) == 1, "the flooder's changes are asked about one at a time")
        #expect(try f.table("List").first?.arrayValue?.count == 1, "nothing of the flood has run")

        // polkit refuses the 64 that waited, one after the other; the rest never got that far.
        polkit.release(name, allow: false)
        polkit.wait("the 64 waiting changes refused") { $0.checks(of: name) == 64 && $0.answered == $0.checks.count }
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)])  // a round trip through polkit after the flooder's last check
        #expect(polkit.snapshot.checks(of: name) == 64)
        #expect(try f.table("List").first?.arrayValue?.count == 2)

        // The log: a handful of lines about the flooder, not one per refusal.
        let floodLines = f.log.split(separator: "\n").filter { $0.contains(name) }
        #expect(floodLines.count <= 3, "\(floodLines.count) lines:\n\(floodLines.prefix(10).joined(separator: "\n"))")
        #expect(floodLines.first?.contains("refused") == true)
        #expect(floodLines.contains { $0.contains("more refusals") } || floodLines.count == 1)
    }

    /// pestod's resident memory in bytes (VmRSS of /proc/PID/status).
    static func residentBytes(of pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") })
        let kib = try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
        return kib * 1024
    }

    /// Waits until `got` holds the replies to every call in `serials` on `connection`,
    /// keeping every other reply that comes meanwhile in `got` too (by reply serial).
    static func collectReplies(to serials: [UInt32], on connection: DBusConnection, into got: inout [UInt32: DBusMessage]) {
        let deadline = MonotonicInstant.now.adding(milliseconds: 120_000)
        while serials.contains(where: { got[$0] == nil }), MonotonicInstant.now < deadline {
            guard let m = connection.nextMessage(timeoutMilliseconds: 500), m.replySerial != 0 else { continue }
            got[m.replySerial] = m
        }
        let missing = serials.filter { got[$0] == nil }.count
        if missing > 0 { Issue.record("no reply to \(missing) calls") }
    }

    @Test(
        "64 large Applies held by polkit: pestod keeps their decoded rules and reply addresses, not their messages, and at most 16 MiB of them (LimitsExceeded beyond); its memory stays bounded and every reply reaches its caller"
    )
    func largeChangesBounded() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "polkit"])
        let polkit = try FakePolkit(address: f.address)
        let p = TestSockets.freePorts(2).lowerBound
        let flooder = try DBusConnection(.address(f.address))
        let other = try DBusConnection(.address(f.address))
        polkit.set(flooder.uniqueName, .hold)
        polkit.set(other.uniqueName, .hold)
        // A legal Apply of about 0.85 MiB: 2,500 valid rules, each with a 255-byte owner tag
        // (the longest allowed). 64 of them are about 55 MiB of messages, under libdbus's
        // 63 MiB limit on a connection's live incoming messages, so a pestod that held them
        // would still read on (and hold them all).
        let owner = String(repeating: "o", count: Rule.maxOwnerLength)
        let rules = (0..<2_500).map { i in
            DBusValue.structure([.uint32(UInt32(10_000 + i)), PestodFixture.rule(p, [("owner", .string(owner))])])
        }
        let applyArgs: [DBusValue] = [.array(element: "(ua{sv})", rules), .array(element: "u", []), .vardict([])]
        let baseline = try Self.residentBytes(of: f.pestod.pid)

        let otherInsert = Self.call("Insert", [.uint32(1), PestodFixture.rule(p)])
        otherInsert.allowsInteractiveAuthorization = true
        other.send(otherInsert)
        other.flush()
        var serials: [UInt32] = []
        var bytes = 0
        for _ in 0..<64 {
            let apply = Self.call("Apply", applyArgs)
            // Interactive, like a caller at a password prompt: pestod waits for polkit's
            // answer up to 300 s, not 25 s, so a slow (debug, loaded) pestod decoding the
            // flood does not fall back to the uid-0 rule before the test releases it.
            apply.allowsInteractiveAuthorization = true
            bytes = apply.argumentBytes
            flooder.send(apply)
            serials.append(apply.serial)
        }
        // pestod handles a connection's calls in order: once this read is answered, every
        // Apply before it has been queued or refused.
        let read = Self.call("Status", [.uint32(1)])
        flooder.send(read)
        flooder.flush()
        var answers: [UInt32: DBusMessage] = [:]
        Self.collectReplies(to: [read.serial], on: flooder, into: &answers)
        polkit.wait("the other client's check") { $0.checks(of: other.uniqueName) == 1 }

        let held = try Self.residentBytes(of: f.pestod.pid)
        let grown = held - baseline
        // Holding the 64 messages alone would be over 50 MiB, their decoded rules as much
        // again; 16 MiB of waiting arguments, decoded, are well under 48 MiB.
        #expect(
            grown < 48 << 20,
            "pestod grew by \(grown >> 20) MiB holding the flood (baseline \(baseline >> 20) MiB, each Apply \(bytes) bytes)")

        // Deny the flood, allow the other client: each gets its own replies.
        polkit.release(flooder.uniqueName, allow: false)
        polkit.release(other.uniqueName, allow: true)
        Self.collectReplies(to: serials, on: flooder, into: &answers)
        let names = serials.map { answers[$0]?.asError?.name ?? "none" }
        let queued = names.prefix { $0 == DBusErrorReply.accessDenied }.count
        let expectedQueued = 1 + ((16 << 20) - bytes) / bytes
        #expect(queued == expectedQueued, "the first \(expectedQueued) Applies (16 MiB) waited for polkit: \(names)")
        #expect(names.dropFirst(queued).allSatisfy { $0 == Self.limitsExceeded }, "the rest were refused at once: \(names)")
        let refusal = answers[serials.last!]?.asError?.message ?? ""
        #expect(refusal.contains("bytes of arguments"), "\(refusal)")
        let otherReply = try #require(Self.reply(to: otherInsert.serial, on: other))
        #expect(!otherReply.isError, "\(otherReply.asError?.description ?? "")")
        #expect(try f.table("List").first?.arrayValue?.count == 1)
    }
}
