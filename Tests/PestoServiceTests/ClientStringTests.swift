// SPDX-License-Identifier: GPL-2.0-or-later

// A client's strings are quoted short in error replies and in pestod's log: a megabyte
// interface name, rule key, address or object path comes back as 64 characters and its
// length, never whole. In process (InProcessPestod.swift): the server's replies and log.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod quoting of client strings (in process)", .timeLimit(.minutes(10)))
struct ClientStringTests {
    static let huge = String(repeating: "i", count: 1 << 20)

    /// The error `body` fails with.
    func failure(_ body: () throws(DBusErrorReply) -> Void) -> DBusErrorReply? {
        do {
            try body()
            return nil
        } catch {
            return error
        }
    }

    @Test("megabyte strings in Insert and in the object path: short replies, short log lines, no state change")
    func megabyteStrings() throws {
        let f = try InProcessPestod()
        let p = TestSockets.freePorts(1).lowerBound
        let before = try f.snapshot()
        let cut = "\"\(String(repeating: "i", count: 64))\"…(1048576 bytes)"

        let interface = failure { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(1), PestodFixture.rule(p, [("interface", .string(Self.huge))])])
        }
        #expect(interface?.name == PestoBusNames.errorPrefix + "InvalidRule")
        #expect(interface?.message == "interface \(cut) is 1048576 bytes long; at most 15 are allowed.")

        let key = failure { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(1), PestodFixture.rule(p, [(Self.huge, .string("x"))])])
        }
        #expect(key?.name == DBusErrorReply.invalidArgs)
        #expect(key?.message.hasPrefix("Unknown rule key \(cut);") == true, "\(key?.message.prefix(200) ?? "")")

        let address = failure { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(1), PestodFixture.rule(p, [("target-address", .string(Self.huge))])])
        }
        #expect(address?.name == PestoBusNames.errorPrefix + "InvalidRule")
        #expect(address?.message == "target-address \(cut) is not an IPv4 or IPv6 address.")

        let path = "/" + String(repeating: "p", count: 100_000)
        let object = failure { () throws(DBusErrorReply) in
            _ = try f.call(path: path, interface: PestodFixture.tableInterface, member: "List")
        }
        #expect(object?.name == DBusErrorReply.unknownObject)
        #expect((object?.message.utf8.count ?? .max) < 200, "\(object?.message.prefix(200) ?? "")")

        #expect(try f.snapshot() == before)
        let log = f.log
        #expect(log.contains("refused: interface \(cut)"), "the refused Insert is logged, quoted short")
        let longest = log.split(separator: "\n").map(\.utf8.count).max() ?? 0
        #expect(longest < 400, "a log line of \(longest) bytes")
    }
}
