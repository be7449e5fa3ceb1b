// SPDX-License-Identifier: GPL-2.0-or-later

// Large requests: what runs before authorisation is linear and refuses what cannot succeed
// (over-long arrays, invalid rules) without asking anyone; big Applies and uploads work.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod large requests and check order", .serialized, .timeLimit(.minutes(10)))
struct ScaleTests {
    static func name(_ n: String) -> String { PestoBusNames.errorPrefix + n }
    static let caps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .ifname]

    /// Apply's arguments: `inserts` as (id, rule description), `removes`, no options.
    static func applyArgs(_ inserts: [(UInt32, DBusValue)], _ removes: [UInt32] = []) -> [DBusValue] {
        [
            .array(element: "(ua{sv})", inserts.map { .structure([.uint32($0.0), $0.1]) }),
            .array(element: "u", removes.map { .uint32($0) }),
            .vardict([]),
        ]
    }

    /// A valid single-port rule on a distinct loopback address per `k`.
    static func rule(_ k: Int, port: UInt16 = 8080) -> DBusValue {
        .vardict([
            ("protocol", .string("tcp")), ("address", .string("127.1.\(k >> 8 & 0xFF).\(k & 0xFF)")), ("first-port", .uint16(port)),
        ])
    }

    @Test("decoding an Apply of 65,535 rules with a duplicate ID at the end finds it (sets, not pairwise search)")
    func duplicateAtTheEnd() throws {
        let n = 65_535
        // One rule description for all: only the IDs matter to the duplicate check.
        let rule = Self.rule(1)
        var inserts = (0..<n - 1).map { (UInt32($0 + 1), rule) }
        inserts.append((UInt32(n / 2), rule))
        do {
            _ = try ApplyRequest(Self.applyArgs(inserts), table: .host, limits: .default)
            Issue.record("expected RuleExists")
        } catch {
            #expect(error.name == Self.name("RuleExists") && error.message == "Apply inserts rule \(n / 2) twice.", "\(error)")
        }
        // The same rules with the last ID fixed decode; removes of 65,535 IDs with repeats are
        // kept once each, in order, and one inserted ID among them is InvalidArgs.
        inserts[n - 1].0 = UInt32(n)
        let removes = (0..<n).map { UInt32(100_000 + $0 % 1000) }
        let request = try ApplyRequest(Self.applyArgs(inserts, removes), table: .host, limits: .default)
        #expect(request.inserts.count == n && request.removes == (0..<1000).map { UInt32(100_000 + $0) })
        do {
            _ = try ApplyRequest(Self.applyArgs(inserts, Array(removes.prefix(10)) + [UInt32(n)]), table: .host, limits: .default)
            Issue.record("expected InvalidArgs")
        } catch {
            #expect(error.name == DBusErrorReply.invalidArgs && error.message.contains("both inserts and removes rule \(n)"), "\(error)")
        }
    }

    @Test("every rule of a decoded Apply is validated against the table's capabilities (step 4), after decoding")
    func decodingValidates() throws {
        let limits = TableLimits(maxRules: 10, maxSockets: 100)
        let editor = TablesEditor(
            tables: [ForwardingTable(kind: .host, capabilities: [.ipv4, .tcp, .udp], limits: limits, factory: ScriptedListenerFactory())])
        let good = Self.rule(1)
        let cases: [(DBusValue, String)] = [
            (.vardict([("protocol", .string("tcp")), ("first-port", .uint16(0))]), "first-port"),
            (.vardict([("protocol", .string("tcp")), ("first-port", .uint16(80)), ("interface", .string("eth0"))]), "ifname"),
            (.vardict([("protocol", .string("udp")), ("first-port", .uint16(80)), ("address", .string("224.0.0.1"))]), "multicast"),
        ]
        for (bad, fragment) in cases {
            let request = try ApplyRequest(Self.applyArgs([(1, good), (2, bad)]), table: .host, limits: limits)
            do {
                try editor.validate(TableChange.apply(.host, request))
                Issue.record("expected InvalidRule for \(fragment)")
            } catch {
                #expect(error.code == .invalidRule && error.message.contains(fragment), "\(error)")
            }
        }
        // Arrays longer than MaxRules are refused before any element is looked at: these
        // elements are not even rules.
        let junk = DBusValue.structure([.string("not a rule")])
        for args in [
            [.array(element: "(ua{sv})", [DBusValue](repeating: junk, count: 11)), .array(element: "u", []), .vardict([])],
            [.array(element: "(ua{sv})", []), .array(element: "u", [DBusValue](repeating: .string("x"), count: 11)), .vardict([])],
        ] as [[DBusValue]] {
            do {
                _ = try ApplyRequest(args, table: .host, limits: limits)
                Issue.record("expected InvalidArgs")
            } catch {
                #expect(error.name == DBusErrorReply.invalidArgs && error.message.contains("at most 10 (MaxRules)"), "\(error)")
            }
        }
    }

    @Test("an Apply array longer than MaxRules is InvalidArgs and changes nothing")
    func overLongApply() throws {
        // In process (InProcessPestod.swift): the checks are the server's, before any element is read.
        var configuration = EngineConfiguration()
        configuration.limits = TableLimits(maxRules: 3, maxSockets: TableLimits.default.maxSockets)
        let f = try InProcessPestod(configuration: configuration)
        let p = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        let before = try f.snapshot()
        let four = (0..<4).map { (UInt32(10 + $0), Self.rule($0, port: p)) }
        for args in [Self.applyArgs(four), Self.applyArgs([], [1, 2, 3, 4])] {
            do {
                try f.table("Apply", args)
                Issue.record("expected InvalidArgs")
            } catch {
                #expect(error.name == DBusErrorReply.invalidArgs, "\(error)")
                #expect(error.message.contains("the HOST table holds at most 3 (MaxRules)"), "\(error.message)")
            }
        }
        #expect(try f.snapshot() == before)
        // Three is fine.
        try f.table("Apply", Self.applyArgs(Array(four.prefix(2)), [1]))
        #expect(try f.table("List").first?.arrayValue?.count == 2)
    }

    /// Calls a HOST table method with gdbus as nobody (uid 65534); returns gdbus's stderr.
    func callAsNobody(_ f: PestodFixture, _ method: String, _ args: [String]) throws -> String {
        let r = try run(
            "/usr/bin/setpriv",
            [
                "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/gdbus", "call",
                "--address", f.address, "--dest", PestodFixture.dest, "--object-path", PestodFixture.hostPath,
                "--method", "\(PestodFixture.tableInterface).\(method)",
            ] + args)
        #expect(r.status != 0, "\(method) by nobody must fail: \(r.out)")
        return r.err
    }

    @Test(
        "an invalid rule is InvalidRule before authorisation: a caller who would be refused is not asked",
        .enabled(if: getuid() == 0, "needs root to run a client as another user"))
    func validationBeforeAuthorisation() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "root", "--max-rules", "100"])
        let p = TestSockets.freePorts(1).lowerBound
        let invalid = "{'protocol': <'tcp'>, 'first-port': <uint16 0>}"
        let valid = "{'protocol': <'tcp'>, 'address': <'127.0.0.1'>, 'first-port': <uint16 \(p)>}"
        let insert = try callAsNobody(f, "Insert", ["7", invalid])
        #expect(insert.contains(Self.name("InvalidRule")) && insert.contains("first-port"), "\(insert)")
        let apply = try callAsNobody(f, "Apply", ["[(7, \(valid)), (8, \(invalid))]", "@au []", "@a{sv} {}"])
        #expect(apply.contains(Self.name("InvalidRule")), "\(apply)")
        let tooMany = try callAsNobody(
            f, "Apply", ["@a(ua{sv}) []", "[\((0..<101).map { _ in "1" }.joined(separator: ","))]", "@a{sv} {}"])
        #expect(tooMany.contains(DBusErrorReply.invalidArgs) && tooMany.contains("MaxRules"), "\(tooMany)")
        // A valid request by the same caller reaches the authorizer and is refused there.
        let refused = try callAsNobody(f, "Apply", ["[(7, \(valid))]", "@au []", "@a{sv} {}"])
        #expect(refused.contains(DBusErrorReply.accessDenied), "\(refused)")
        #expect(try f.table("List").first?.arrayValue?.count == 0)
    }

    @Test("an upload of 5,000 rules on the control socket is applied, and uploading it again keeps every rule")
    func largeUpload() throws {
        // Generous timeouts: a debug build takes seconds for this; nothing here is timed.
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL", "--control-timeout", "600000"])
        let p = TestSockets.freePorts(1).lowerBound
        let n = 5_000
        // Rules bound to a missing interface: each bind fails at once with ENODEV (no
        // descriptor kept), which an upload tolerates (counted, retried); distinct addresses
        // keep them apart.
        let ifname = Array("pesto-none0".utf8) + [UInt8](repeating: 0, count: 5)
        let rules = (0..<n).map { k in
            WireClient.rule(address: [127, 2, UInt8(k >> 8), UInt8(k & 0xFF)], first: p, flags: 0x02, ifname: ifname)
        }
        for (round, expected) in [
            (1, "0 kept, \(n) added, 0 removed; \(n) sockets did not bind yet"), (2, "\(n) kept, 0 added, 0 removed)"),
        ] {
            let client = try #require(WireClient(path: f.controlPath))
            defer { close(client.fd) }
            var tv = timeval(tv_sec: 600, tv_usec: 0)
            setsockopt(client.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            let dump = try #require(client.readHelloAndDump())
            #expect(dump.tables[1]?.rules.count == (round == 1 ? 0 : n))
            client.send([1] + WireClient.be32(UInt32(n)) + rules.joined() + [0])
            shutdown(client.fd, Int32(SHUT_WR))
            var byte: UInt8 = 0
            #expect(recv(client.fd, &byte, 1, 0) == 0, "pestod closes the session after applying")
            #expect(f.log.contains("update applied (\(expected)"), "round \(round)")
        }
        let list = try #require(try f.table("List").first?.arrayValue)
        #expect(list.count == n)
    }
}
