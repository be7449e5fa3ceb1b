// SPDX-License-Identifier: GPL-2.0-or-later

// The name-owner lock: exclusivity, explicit rollback, and rollback when the holder dies.
// In process (InProcessPestod.swift): real sockets, no bus; a holder dying is the
// NameOwnerChanged the bus daemon sends when its connection closes.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod lock (in process)", .timeLimit(.minutes(10)))
struct LockTests {
    static let locked = PestoBusNames.errorPrefix + "Locked"
    static let notLocked = PestoBusNames.errorPrefix + "NotLocked"

    /// A baseline table: rules 10 (active), 20 (inactive), 30 (active).
    func baseline(_ f: InProcessPestod, _ ports: ClosedRange<UInt16>) throws {
        let p = ports.lowerBound
        try f.insertActive(10, port: p)
        try f.table("Insert", [.uint32(20), PestodFixture.rule(p + 1)])
        try f.insertActive(30, port: p + 2)
    }

    @Test("a second connection's changes fail with Locked; reads still work; NotLocked without the lock")
    func exclusivity() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(4)
        try baseline(f, ports)
        let other = f.newCaller()
        try f.manager("Lock")
        try f.manager("Lock")  // taking it again is a no-op
        let before = try f.snapshot()
        for (member, args) in [
            ("Insert", [DBusValue.uint32(40), PestodFixture.rule(ports.upperBound)]), ("Delete", [.uint32(20)]),
            ("Activate", [.uint32(20)]), ("Deactivate", [.uint32(10)]),
        ] {
            #expect(f.errorName { () throws(DBusErrorReply) in try f.table(member, args, on: other) } == Self.locked, "\(member)")
        }
        do {
            try f.table("Activate", [.uint32(20)], on: other)
        } catch {
            #expect(error.message.contains(f.client.uniqueName), "the message names the holder")
        }
        #expect(f.errorName { () throws(DBusErrorReply) in try f.manager("Lock", on: other) } == Self.locked)
        for m in ["Unlock", "Commit", "Rollback"] {
            #expect(f.errorName { () throws(DBusErrorReply) in try f.manager(m, on: other) } == Self.notLocked, "\(m)")
        }
        #expect(try f.table("Status", [.uint32(10)], on: other).first == .bool(true))
        #expect(try f.snapshot() == before)
        try f.manager("Unlock")
        #expect(f.errorName { () throws(DBusErrorReply) in try f.manager("Unlock") } == Self.notLocked)
        #expect(f.errorName { () throws(DBusErrorReply) in try f.manager("Commit") } == Self.notLocked)
        try f.table("Activate", [.uint32(20)], on: other)  // free again
    }

    @Test("Rollback and Unlock restore rules, IDs, order and active bits exactly; Commit keeps changes")
    func rollback() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(6)
        try baseline(f, ports)
        let before = try f.table("List")
        let sockets10 = try f.snapshot().sockets(onPort: ports.lowerBound)

        func mess() throws {
            try f.table("Deactivate", [.uint32(30)])
            try f.table("Delete", [.uint32(30)])
            try f.table("Insert", [.uint32(25), PestodFixture.rule(ports.lowerBound + 3)])
            try f.table("Activate", [.uint32(25)])
            try f.table("Activate", [.uint32(20)])
            try f.table("Insert", [.uint32(30), PestodFixture.rule(ports.lowerBound + 4)])
        }
        try f.manager("Lock")
        try mess()
        #expect(try f.table("List") != before)
        try f.manager("Rollback")
        #expect(try f.table("List") == before)
        #expect(
            try f.snapshot().sockets(onPort: ports.lowerBound) == sockets10,
            "rule 10 was never touched: same socket")

        try mess()
        try f.manager("Unlock")
        #expect(try f.table("List") == before)
        #expect(f.log.contains("lock released by \(f.client.uniqueName); rolled back its 6 uncommitted changes"), "\(f.log)")

        try f.manager("Lock")
        try mess()
        let after = try f.table("List")
        try f.manager("Commit")
        try f.manager("Rollback")  // nothing left to undo
        #expect(try f.table("List") == after)
        try f.manager("Unlock")
        #expect(try f.table("List") == after)
    }

    @Test("a lock holder leaving the bus mid-transaction leaves the table exactly as before its Lock")
    func holderKilled() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(6)
        try baseline(f, ports)
        let before = try f.snapshot()

        let peer = f.newCaller()
        let p = ports.lowerBound
        try f.manager("Lock", on: peer)
        try f.insertActive(15, port: p + 3, on: peer)
        try f.table("Deactivate", [.uint32(30)], on: peer)
        try f.table("Delete", [.uint32(30)], on: peer)
        try f.table("Activate", [.uint32(20)], on: peer)
        try f.table("Insert", [.uint32(30), PestodFixture.rule(p + 4)], on: peer)
        #expect(f.errorName { () throws(DBusErrorReply) in try f.table("Delete", [.uint32(15)]) } == Self.locked)
        #expect(try f.snapshot() != before)

        f.port.clear()
        f.leave(peer)
        f.settle()
        #expect(f.lockReleaseAnnounced(), "the lock is announced free")
        // Field by field: rules, IDs, order, active bits, counts, every property.
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        #expect(after.objects == before.objects)
        // The same ports listen; rule 10, which the transaction never touched, keeps its very
        // socket; rule 30 was closed and reopened by the rollback, so its socket is a new one.
        #expect(after.sockets.count == before.sockets.count)
        #expect(after.sockets(onPort: p) == before.sockets(onPort: p))
        #expect(after.sockets(onPort: p + 2).count == 1)
        // The lock is free for others now.
        try f.manager("Lock")
        try f.manager("Unlock")
    }

    @Test("a lock holder that committed keeps its committed changes when it dies")
    func committedSurvives() throws {
        let f = try InProcessPestod()
        let p = TestSockets.freePorts(2).lowerBound
        let peer = f.newCaller()
        try f.manager("Lock", on: peer)
        try f.insertActive(1, port: p, on: peer)
        try f.manager("Commit", on: peer)
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)], on: peer)
        f.port.clear()
        f.leave(peer)
        f.settle()
        #expect(f.lockReleaseAnnounced(), "the lock is announced free")
        #expect(try f.table("List").first?.arrayValue?.count == 1)
        #expect(try f.table("Status", [.uint32(1)]) == [.bool(true), .uint32(1), .uint32(0), .string(""), .uint32(1)])
    }
}

/// The one lock test that needs the bus: a holder's process killed with SIGKILL is seen by
/// pestod only through the bus daemon's NameOwnerChanged (name ownership).
@Suite("pestod lock over the bus", .serialized, .timeLimit(.minutes(10)))
struct LockOverBusTests {
    /// A baseline table: rules 10 (active), 20 (inactive), 30 (active).
    static func baseline(_ f: PestodFixture, _ ports: ClosedRange<UInt16>) throws {
        let p = ports.lowerBound
        try f.insertActive(10, port: p)
        try f.table("Insert", [.uint32(20), PestodFixture.rule(p + 1)])
        try f.insertActive(30, port: p + 2)
    }

    @Test("a lock holder killed with SIGKILL mid-transaction leaves the table exactly as before its Lock")
    func holderKilled() throws {
        let f = try PestodFixture()
        let ports = TestSockets.freePorts(6)
        try LockOverBusTests.baseline(f, ports)
        let signals = try SignalCollector(address: f.address)
        let before = try f.snapshot()

        let peer = try ChildProcess(Products.path("pesto-test-peer"), [f.address])
        let ready = try #require(peer.readLine())
        #expect(ready.hasPrefix("ready :"))
        let peerName = String(ready.dropFirst("ready ".count))
        let p = ports.lowerBound
        for line in ["Lock", "Insert 15 \(p + 3)", "Activate 15", "Deactivate 30", "Delete 30", "Activate 20", "Insert 30 \(p + 4)"] {
            #expect(peer.ask(line).hasPrefix("ok"), "\(line)")
        }
        #expect(f.errorName { () throws(DBusErrorReply) in try f.table("Delete", [.uint32(15)]) } == LockTests.locked)
        #expect(try f.snapshot() != before)

        peer.kill()
        f.waitForLockRelease(signals)
        // Field by field: rules, IDs, order, active bits, counts, every property.
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        #expect(after.objects == before.objects)
        // The same ports listen; rule 10, which the transaction never touched, keeps its very
        // socket; rule 30 was closed and reopened by the rollback, so its socket is a new one.
        #expect(after.sockets.count == before.sockets.count)
        #expect(after.sockets(onPort: p) == before.sockets(onPort: p))
        #expect(after.sockets(onPort: p + 2).count == 1)
        #expect(!peerName.isEmpty)
        // The lock is free for others now.
        try f.manager("Lock")
        try f.manager("Unlock")
    }
}
