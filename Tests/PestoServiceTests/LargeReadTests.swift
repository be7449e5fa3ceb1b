// SPDX-License-Identifier: GPL-2.0-or-later

// Large reads: a reply larger than the bus takes in one message is never sent (the bus would
// drop pestod's connection, and pestod stop); the caller gets LimitsExceeded, naming the
// size, the limit and what to call instead, and nothing changes (ReplySizeLimit.swift).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod large reads", .serialized, .timeLimit(.minutes(20)))
struct LargeReadTests {
    static let limitsExceeded = DBusErrorReply.limitsExceeded
    static let introspectable = PestoInterfaces.introspectable.name
    static let objectManager = PestoInterfaces.objectManager.name
    static let rulesPath = PestodFixture.hostPath + "/rules"

    @Test("replies over the message size bound are LimitsExceeded naming size, limit and the calls to make instead")
    func boundedReplies() throws {
        let pestod = try InProcessPestod()
        for k in 0..<200 {
            try pestod.table("Insert", [.uint32(UInt32(100 + k)), PestodFixture.rule(UInt16(20_000 + k))])
        }
        let fullList = try pestod.table("List")
        #expect(fullList.first?.arrayValue?.count == 200)
        let before = try pestod.snapshot()

        pestod.server.maxMessageBytes = 2048
        func refusal(path: String, interface: String, member: String) -> DBusErrorReply? {
            do {
                _ = try pestod.call(path: path, interface: interface, member: member)
                return nil
            } catch {
                return error
            }
        }
        let list = refusal(path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "List")
        #expect(list?.name == Self.limitsExceeded)
        #expect(list?.message.contains("2048 bytes") == true)
        #expect(list?.message.contains("ReadIndex") == true)
        #expect(list?.message.contains("nothing was changed") == true)
        let objects = refusal(path: PestodFixture.managerPath, interface: Self.objectManager, member: "GetManagedObjects")
        #expect(objects?.name == Self.limitsExceeded)
        #expect(objects?.message.contains("call List on each table") == true)
        let tree = refusal(path: Self.rulesPath, interface: Self.introspectable, member: "Introspect")
        #expect(tree?.name == Self.limitsExceeded)
        #expect(pestod.log.contains("answered LimitsExceeded"))

        // Small replies still go, and nothing changed.
        #expect(try pestod.table("Status", [.uint32(100)]).first?.boolValue == false)
        #expect(try pestod.table("ReadIndex", [.uint32(199)]).first?.uint32Value == 299)
        pestod.server.maxMessageBytes = ReplySizeLimit.standard
        #expect(try pestod.snapshot() == before)
    }

    /// The position of the reply to `serial` among everything the in-process pestod sent.
    static func position(_ pestod: InProcessPestod, _ serial: UInt32) -> Int? {
        pestod.port.sent.firstIndex { !$0.isSignal && $0.replySerial == serial }
    }

    @Test("a large List is answered over several loop turns: another caller's Status first, the caller's own later calls after")
    func slicedList() throws {
        let pestod = try InProcessPestod()
        for k in 0..<50 {
            try pestod.table("Insert", [.uint32(UInt32(100 + k)), PestodFixture.rule(UInt16(20_000 + k))])
        }
        let whole = try pestod.table("List")
        let objects = try pestod.call(path: PestodFixture.managerPath, interface: Self.objectManager, member: "GetManagedObjects")
        pestod.server.reads.elementsPerSlice = 10

        let a = pestod.newCaller()
        let b = pestod.newCaller()
        let table = PestodFixture.tableInterface
        let list = pestod.send(a, path: PestodFixture.hostPath, interface: table, member: "List")
        let ownStatus = pestod.send(a, path: PestodFixture.hostPath, interface: table, member: "Status", [.uint32(100)])
        let otherStatus = pestod.send(b, path: PestodFixture.hostPath, interface: table, member: "Status", [.uint32(100)])
        // Another caller's change between slices: the List shows the table as it was.
        let delete = pestod.send(b, path: PestodFixture.hostPath, interface: table, member: "Delete", [.uint32(149)])
        #expect(Self.position(pestod, otherStatus) != nil, "another caller's Status is answered at once")
        #expect(Self.position(pestod, list) == nil)
        #expect(Self.position(pestod, ownStatus) == nil, "the caller's own later call waits behind its List")
        let reply = try #require(pestod.waitForReply(list))
        #expect(reply.arguments == whole)
        _ = pestod.waitForReply(ownStatus)
        _ = pestod.waitForReply(delete)
        let order = [otherStatus, delete, list, ownStatus].map { Self.position(pestod, $0) ?? -1 }
        #expect(order == order.sorted() && !order.contains(-1), "replies in order: \(order)")
        #expect(pestod.log.contains("answered over several loop turns"))

        // GetManagedObjects sliced gives what it gave at once (rule 149 is back).
        try pestod.table("Insert", [.uint32(149), PestodFixture.rule(UInt16(20_049))])
        #expect(try pestod.call(path: PestodFixture.managerPath, interface: Self.objectManager, member: "GetManagedObjects") == objects)

        // A caller leaving mid-way: its List and the calls held behind it are dropped.
        let c = pestod.newCaller()
        let gone = pestod.send(c, path: PestodFixture.hostPath, interface: table, member: "List")
        let goneStatus = pestod.send(c, path: PestodFixture.hostPath, interface: table, member: "Status", [.uint32(100)])
        pestod.leave(c)
        #expect(try pestod.table("Status", [.uint32(100)]).first?.boolValue == false)
        pestod.settle()
        #expect(Self.position(pestod, gone) == nil && Self.position(pestod, goneStatus) == nil)
        #expect(pestod.log.contains("left the bus during a large read"))
    }

    @Test("a large List over the size bound stops writing once past it and is LimitsExceeded")
    func slicedListOverTheBound() throws {
        let pestod = try InProcessPestod()
        for k in 0..<50 {
            try pestod.table("Insert", [.uint32(UInt32(100 + k)), PestodFixture.rule(UInt16(20_000 + k))])
        }
        pestod.server.reads.elementsPerSlice = 10
        pestod.server.maxMessageBytes = 2048
        var refusal: DBusErrorReply?
        do { _ = try pestod.table("List") } catch { refusal = error }
        #expect(refusal?.name == Self.limitsExceeded)
        #expect(refusal?.message.contains("ReadIndex") == true)
    }

    /// Inserts `count` rules from ID 1000 with large Applies. Each is on an interface that
    /// does not exist: its bind fails at once (ENODEV, `max-failures` 1 lets it through) and
    /// it keeps no descriptor, so 65,535 of them fit in the open-file limit.
    static func fill(_ f: PestodFixture, count: Int) throws {
        var next = 0
        while next < count {
            let chunk = min(16_384, count - next)
            let rules = (next..<next + chunk).map { k in
                DBusValue.structure([
                    .uint32(UInt32(1000 + k)),
                    .vardict([
                        ("protocol", .string("tcp")), ("address", .string("127.1.\(k >> 8 & 0xFF).\(k & 0xFF)")),
                        ("first-port", .uint16(24_001)), ("interface", .string("pesto-none0")),
                    ]),
                ])
            }
            _ = try f.client.call(
                PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Apply",
                [.array(element: "(ua{sv})", rules), .array(element: "u", []), .vardict([("max-failures", .uint32(1))])],
                timeoutMilliseconds: 600_000)
            next += chunk
        }
    }

    @Test(
        "GetManagedObjects of 65,535 rules (over 32 MiB) is refused with LimitsExceeded and pestod stays on the bus",
        .timeLimit(.minutes(20)))
    func managedObjectsOfAFullTable() throws {
        let n = 65_535
        let f = try PestodFixture(pestodArguments: ["--max-rules", "65536", "--log-level", "info"])
        try Self.fill(f, count: n)
        let long: Int32 = 600_000

        var refusal: DBusErrorReply?
        do {
            _ = try f.client.call(
                PestodFixture.dest, PestodFixture.managerPath, Self.objectManager, "GetManagedObjects", timeoutMilliseconds: long)
        } catch {
            refusal = error
        }
        #expect(refusal?.name == Self.limitsExceeded, "pestod's log:\n\(f.log.suffix(2000))")
        #expect(refusal?.message.contains("call List on each table") == true)
        #expect(f.pestod.isRunning, "pestod stopped: \(f.log.suffix(2000))")

        // pestod is still on the bus, the table as it was; List of the whole table fits.
        let count = try f.client.call(
            PestodFixture.dest, PestodFixture.hostPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestodFixture.tableInterface), .string("RuleCount")])
        #expect(count.first == .variant(.uint32(UInt32(n))))
        let list = try f.client.call(
            PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "List", timeoutMilliseconds: long)
        #expect(list.first?.arrayValue?.count == n)
        let xml = try f.client.call(PestodFixture.dest, Self.rulesPath, Self.introspectable, "Introspect", timeoutMilliseconds: long)
        #expect(xml.first?.stringValue?.contains("<node name=\"66534\"/>") == true)
    }
}
