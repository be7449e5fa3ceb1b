// SPDX-License-Identifier: GPL-2.0-or-later

// Every error name of the contract, provoked and checked by name; nothing changes on any error.
// In process (InProcessPestod.swift); busctl's view of the same names needs the bus.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod errors (in process)", .timeLimit(.minutes(10)))
struct ErrorTests {
    static func name(_ n: String) -> String { PestoBusNames.errorPrefix + n }

    /// Expects `body` to fail with `errorName` and the observable state to be unchanged.
    func expectError(
        _ f: InProcessPestod, _ errorName: String, sourceLocation: SourceLocation = #_sourceLocation,
        _ body: () throws(DBusErrorReply) -> Void
    ) throws {
        let before = try f.snapshot()
        #expect(f.errorName(body) == errorName, sourceLocation: sourceLocation)
        #expect(try f.snapshot() == before, "state changed on error", sourceLocation: sourceLocation)
    }

    @Test("each Table error, and InvalidArgs for wrong types and unknown keys")
    func tableErrors() throws {
        var configuration = EngineConfiguration()
        configuration.limits = TableLimits(maxRules: 3, maxSockets: TableLimits.default.maxSockets)
        let f = try InProcessPestod(configuration: configuration)
        let ports = TestSockets.freePorts(3)
        let p = ports.lowerBound
        try f.insertActive(1, port: p)
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p, address: "")])  // dual stack, overlaps rule 1
        try f.table("Insert", [.uint32(3), PestodFixture.rule(p + 1)])

        try expectError(f, Self.name("RuleExists")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(1), PestodFixture.rule(p + 2)])
        }
        try expectError(f, Self.name("NoSpace")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(4), PestodFixture.rule(p + 2)])
        }
        try expectError(f, Self.name("InvalidRule")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), PestodFixture.rule(0)])
        }
        try expectError(f, Self.name("InvalidRule")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), .vardict([("protocol", .string("sctp")), ("first-port", .uint16(p))])])
        }
        try expectError(f, Self.name("InvalidRule")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), PestodFixture.rule(p, address: "not-an-address")])
        }
        try expectError(f, Self.name("InvalidRule")) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), .vardict([("protocol", .string("tcp"))])])
        }
        try expectError(f, Self.name("NoSuchRule")) { () throws(DBusErrorReply) in try f.table("Activate", [.uint32(42)]) }
        try expectError(f, Self.name("NoSuchRule")) { () throws(DBusErrorReply) in try f.table("Delete", [.uint32(42)]) }
        try expectError(f, Self.name("NoSuchRule")) { () throws(DBusErrorReply) in try f.table("Status", [.uint32(42)]) }
        try expectError(f, Self.name("NoSuchRule")) { () throws(DBusErrorReply) in try f.table("Read", [.uint32(42)]) }
        try expectError(f, Self.name("NoSuchRule")) { () throws(DBusErrorReply) in try f.table("ReadIndex", [.uint32(3)]) }
        try expectError(f, Self.name("RuleActive")) { () throws(DBusErrorReply) in try f.table("Activate", [.uint32(1)]) }
        try expectError(f, Self.name("RuleActive")) { () throws(DBusErrorReply) in try f.table("Delete", [.uint32(1)]) }
        try expectError(f, Self.name("RuleInactive")) { () throws(DBusErrorReply) in try f.table("Deactivate", [.uint32(3)]) }
        try expectError(f, Self.name("Conflict")) { () throws(DBusErrorReply) in try f.table("Activate", [.uint32(2)]) }

        let invalidArgs = DBusErrorReply.invalidArgs
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in try f.table("Activate", [.string("1")]) }
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in try f.table("Activate", []) }
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in try f.table("Insert", [.uint32(9)]) }
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), PestodFixture.rule(p + 2, [("colour", .string("red"))])])
        }
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in
            try f.table("Insert", [.uint32(9), .vardict([("protocol", .string("tcp")), ("first-port", .uint32(80))])])
        }
        try expectError(f, invalidArgs) { () throws(DBusErrorReply) in
            try f.table("Apply", [.array(element: "(ua{sv})", []), .array(element: "u", []), .vardict([("max-failures", .string("x"))])])
        }
        try expectError(f, DBusErrorReply.unknownMethod) { () throws(DBusErrorReply) in try f.table("Explode") }

        // A Conflict message names the other rule.
        do {
            try f.table("Activate", [.uint32(2)])
        } catch {
            #expect(error.message.contains("active rule 1"))
        }
    }

    @Test("Apply: success, BindFailed and Conflict roll back everything; best-effort tolerates")
    func apply() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(6)
        let p = ports.lowerBound
        try f.insertActive(10, port: p)
        func apply(_ inserts: [(UInt32, DBusValue)], remove: [UInt32], _ options: [(String, DBusValue)] = []) throws(DBusErrorReply)
            -> [DBusValue]
        {
            try f.table(
                "Apply",
                [
                    .array(element: "(ua{sv})", inserts.map { .structure([.uint32($0.0), $0.1]) }),
                    .array(element: "u", remove.map { .uint32($0) }),
                    .vardict(options),
                ])
        }

        // Replace rule 10 (port p) by rule 11 on the same port and add rule 12: no conflict,
        // because removed rules are deactivated before new ones are activated.
        let result = try apply([(11, PestodFixture.rule(p)), (12, PestodFixture.rule(p + 1))], remove: [10])
        #expect(
            result == [
                .array(
                    element: "(uuu)",
                    [.structure([.uint32(11), .uint32(1), .uint32(0)]), .structure([.uint32(12), .uint32(1), .uint32(0)])])
            ])
        #expect(try f.table("List").first?.arrayValue?.count == 2)

        // A port held elsewhere: BindFailed, nothing changed.
        let holder = try #require(TestSockets.bound(port: p + 2))
        try expectError(f, ErrorTests.name("BindFailed")) { () throws(DBusErrorReply) in
            _ = try apply([(13, PestodFixture.rule(p + 2, [("last-port", .uint16(p + 3))]))], remove: [12])
        }
        // ... tolerated with max-failures 1, or best-effort with one socket bound.
        let tolerated = try apply(
            [(13, PestodFixture.rule(p + 2, [("last-port", .uint16(p + 3))]))], remove: [], [("best-effort", .bool(true))])
        #expect(tolerated == [.array(element: "(uuu)", [.structure([.uint32(13), .uint32(1), .uint32(1)])])])
        close(holder)

        // A conflict with an active rule: Conflict, rolled back.
        try expectError(f, ErrorTests.name("Conflict")) { () throws(DBusErrorReply) in
            _ = try apply([(14, PestodFixture.rule(p + 4)), (15, PestodFixture.rule(p, address: ""))], remove: [])
        }
        // Removing a rule that does not exist: NoSuchRule, rolled back.
        try expectError(f, ErrorTests.name("NoSuchRule")) { () throws(DBusErrorReply) in
            _ = try apply([(14, PestodFixture.rule(p + 4))], remove: [99])
        }
        try expectError(f, ErrorTests.name("RuleExists")) { () throws(DBusErrorReply) in
            _ = try apply([(14, PestodFixture.rule(p + 4)), (14, PestodFixture.rule(p + 5))], remove: [])
        }
        // An ID both inserted and removed is refused before anything happens.
        try expectError(f, DBusErrorReply.invalidArgs) { () throws(DBusErrorReply) in
            _ = try apply([(14, PestodFixture.rule(p + 4))], remove: [14])
        }
    }
}

/// Error replies as a bus client's tools see them.
@Suite("pestod errors over the bus", .serialized, .timeLimit(.minutes(10)))
struct ErrorOverBusTests {
    @Test("busctl reports the contract's error names and messages")
    func busctlSeesErrors() throws {
        let f = try PestodFixture()
        let r = try f.busctl(["call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Delete", "u", "42"])
        #expect(r.status != 0 && r.err.contains("no rule 42"))
    }
}
