// A seeded property test: random, malformed and hostile calls against a running pestod, with a
// model of the HOST table that predicts every answer, and invariants checked as it goes:
// pestod alive, `List` equals the model, listening sockets match the active rules exactly,
// the lock owner is the one the model expects, and no descriptor leaks.
//
// Reproduce a run with PESTO_FUZZ_SEED=<seed printed> (and PESTO_FUZZ_STEPS=<n>).

import Foundation
import PestoEngine
import PestoTestSupport
import Testing

@testable import PestoService

/// The fuzz run's generator (shared with the other fuzz tests).
typealias FuzzRandom = SeededRandom

@Suite("pestod fuzz", .serialized)
struct FuzzTests {
    @Test("random and malformed calls, lock sequences and killed lock holders keep every invariant")
    func fuzz() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["PESTO_FUZZ_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        let steps = env["PESTO_FUZZ_STEPS"].flatMap { Int($0) } ?? 20_000
        print("FuzzTests: seed \(seed), \(steps) steps (PESTO_FUZZ_SEED=\(seed) to reproduce)")
        let run = try FuzzRun(seed: seed)
        try run.run(steps: steps)
        #expect(run.violations == 0, "seed \(seed)")
    }
}

/// Who makes a call.
enum FuzzClient: String {
    case main, second, peer
}

/// One rule of the model.
struct ModelEntry: Equatable {
    var rule: Rule
    var active: Bool
}

final class FuzzRun {
    static let maxRules = 24
    static let maxSockets = 140_000
    static let prefix = PestoBusNames.errorPrefix

    let seed: UInt64
    var rng: FuzzRandom
    let f: PestodFixture
    let second: DBusConnection
    let ports: ClosedRange<UInt16>
    let capabilities: Capabilities

    var model: [UInt32: ModelEntry] = [:]
    var lockOwner: FuzzClient?
    var lockSnapshot: [UInt32: ModelEntry] = [:]
    var peerName = ""

    var calls: [String: Int] = [:]
    var errors: [String: Int] = [:]
    var violations = 0
    var recent: [String] = []
    var step = 0
    var fdBaseline = 0
    var maxFDs = 0
    var checks = 0
    /// A socket of the test's own on a private port, so that some binds fail and are retried.
    var holder: Int32?
    /// Sockets bound by successful Activate calls, in all.
    var boundByActivate = 0

    init(seed: UInt64) throws {
        self.seed = seed
        rng = FuzzRandom(seed: seed)
        f = try PestodFixture(pestodArguments: ["--max-rules", "\(Self.maxRules)", "--max-sockets", "\(Self.maxSockets)"])
        second = try DBusConnection(.address(f.address))
        ports = TestSockets.freePorts(64)
        let names = (try f.client.call(PestodFixture.dest, PestodFixture.hostPath, "org.freedesktop.DBus.Properties", "Get",
                                       [.string(PestodFixture.tableInterface), .string("Capabilities")]).first?.variantValue?.arrayValue ?? [])
            .compactMap(\.stringValue)
        capabilities = Capabilities.named.filter { names.contains($0.1) }.reduce(into: Capabilities()) { $0.insert($1.0) }
    }

    var pid: Int32 { f.pestod.pid }

    func connection(_ c: FuzzClient) -> DBusConnection { c == .second ? second : f.client }

    func uniqueName(_ c: FuzzClient) -> String {
        switch c {
        case .main: return f.client.uniqueName
        case .second: return second.uniqueName
        case .peer: return peerName
        }
    }

    func note(_ s: String) {
        recent.append("#\(step) \(s)")
        if recent.count > 40 { recent.removeFirst() }
    }

    func violation(_ what: String) {
        violations += 1
        let text = "FUZZ VIOLATION (seed \(seed), step \(step)): \(what)\nlast steps:\n" + recent.joined(separator: "\n")
        print(text)
        Issue.record(Comment(rawValue: text))
    }

    // MARK: Calls

    /// Makes a call; returns "success" or the error name, and the reply.
    func call(_ c: FuzzClient, path: String, interface: String?, _ member: String, _ args: [DBusValue]) -> (String, [DBusValue]) {
        calls[member, default: 0] += 1
        let m = DBusMessage.methodCall(destination: PestodFixture.dest, path: path, interface: interface, member: member, arguments: args)
        do {
            let reply = try connection(c).call(m, timeoutMilliseconds: 20_000)
            return ("success", reply.arguments ?? [])
        } catch {
            errors[error.name, default: 0] += 1
            return (error.name, [])
        }
    }

    func tableCall(_ c: FuzzClient, _ member: String, _ args: [DBusValue]) -> (String, [DBusValue]) {
        call(c, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member, args)
    }

    func expect(_ what: String, _ got: String, _ wanted: String) {
        note("\(what) -> \(got)")
        if got != wanted { violation("\(what): got \(got), model predicted \(wanted)") }
    }

    // MARK: Generators

    func randomID() -> UInt32 {
        rng.oneIn(40) ? rng.pick([UInt32.max, UInt32.max - 1, 1000, 0]) : UInt32(rng.below(21))
    }

    /// A rule description, mostly valid; `local` keeps every port inside the private range.
    func randomRuleFields(local: Bool = false) -> [(String, DBusValue)] {
        var fields: [(String, DBusValue)] = []
        if !rng.oneIn(40) {
            fields.append(("protocol", .string(rng.oneIn(30) ? rng.pick(["sctp", "TCP", "", "udp ", "tcp\u{1}"]) : rng.pick(["tcp", "udp"]))))
        }
        if !rng.oneIn(3) {
            fields.append(("address", .string(rng.pick([
                "127.0.0.1", "127.0.0.1", "::1", "::1", "", "0.0.0.0", "::", "127.0.0.2", "::ffff:127.0.0.1",
                "garbage", "1.2.3", "224.0.0.1", "ff02::1", "1.2.3.4", "300.1.1.1", "::1::", "fe80::1",
            ]))))
        }
        if rng.oneIn(5) {
            fields.append(("interface", .string(rng.pick(["", "lo", "lo", "eth0", "nosuchif0", "0123456789abcdef", "012345678901234", ".", "..", "a/b", "a:b", "a b"]))))
        }
        let span = ports.upperBound - ports.lowerBound
        var first = ports.lowerBound + UInt16(rng.below(Int(span) + 1))
        var last: UInt16? = nil
        if !local && rng.oneIn(30) { first = rng.pick([0, 1, 65535, 65534]) }
        if rng.oneIn(2) {
            last = first &+ UInt16(rng.below(4))
            if local && last! > ports.upperBound { last = ports.upperBound }
            if last! < first { last = first }
        }
        if rng.oneIn(40) { last = first &- 1 }
        if !local && rng.oneIn(500) {
            first = 1
            last = 65535
        }
        if local && first == 0 { first = ports.lowerBound }
        if !rng.oneIn(50) { fields.append(("first-port", .uint16(first))) }
        if let last { fields.append(("last-port", .uint16(last))) }
        if rng.oneIn(6) { fields.append(("target-port", .uint16(rng.pick([1, 65535, 65000, 8080, first, 0])))) }
        if rng.oneIn(10) { fields.append(("target-address", .string(rng.pick(["127.0.0.1", "::1", "0.0.0.0", "224.0.0.1", "junk", "", "10.0.0.1"])))) }
        if rng.oneIn(50) { fields.append(("scan", .bool(rng.oneIn(2)))) }
        if rng.oneIn(10) { fields.append(("owner", .string(rng.oneIn(5) ? String(repeating: "x", count: 256) : "fuzz-\(rng.below(100))"))) }
        // Malformed: unknown key, wrong type, duplicate key.
        if rng.oneIn(40) { fields.append(("colour", .string("red"))) }
        if rng.oneIn(40) { fields.append(("first-port", .uint32(UInt32(first)))) }
        if rng.oneIn(40), let dup = fields.first { fields.append(dup) }
        if rng.oneIn(60) { fields.append(("protocol", .int32(6))) }
        // Shuffle a little: the order of keys must not matter.
        if fields.count > 1 && rng.oneIn(4) { fields.swapAt(0, rng.below(fields.count)) }
        return fields
    }

    /// A random value of any shape.
    func randomValue(depth: Int = 0) -> DBusValue {
        switch rng.below(depth > 1 ? 10 : 14) {
        case 0: return .byte(UInt8(rng.below(256)))
        case 1: return .bool(rng.oneIn(2))
        case 2: return .int16(Int16(truncatingIfNeeded: rng.next()))
        case 3: return .uint16(UInt16(truncatingIfNeeded: rng.next()))
        case 4: return .int32(Int32(truncatingIfNeeded: rng.next()))
        case 5: return .uint32(rng.oneIn(2) ? UInt32(rng.below(21)) : UInt32(truncatingIfNeeded: rng.next()))
        case 6: return .uint64(rng.next())
        case 7: return .double(Double(rng.below(1000)) / 7)
        case 8: return .string(rng.pick(["", "tcp", "127.0.0.1", "x\u{7f}y", String(repeating: "é", count: 300)]))
        case 9: return .objectPath(rng.pick(["/", "/top/passt/Pesto1"]))
        case 10: return .array(element: "u", (0..<rng.below(4)).map { _ in .uint32(UInt32(rng.below(30))) })
        case 11: return .vardict(randomRuleFields())
        case 12: return .structure((0...rng.below(3)).map { _ in randomValue(depth: depth + 1) })
        default: return .variant(randomValue(depth: depth + 1))
        }
    }

    // MARK: Model predictions

    func activatable(_ rule: Rule) -> Bool {
        rule.firstPort >= ports.lowerBound && rule.lastPort <= ports.upperBound && rule.lastPort >= rule.firstPort
    }

    var reservedSockets: Int { model.values.reduce(0) { $0 + $1.rule.portCount } }

    /// The answer the model expects to a single-rule change by `c`, applied to the model on success.
    /// `rule` is the decoded rule for Insert.
    func predictChange(_ c: FuzzClient, _ member: String, _ id: UInt32, rule: Rule? = nil) -> String {
        // Rules are validated while decoding, before authorisation and the lock.
        if member == "Insert" {
            do { try rule!.validate(capabilities: capabilities) } catch { return Self.prefix + "InvalidRule" }
        }
        if let owner = lockOwner, owner != c { return Self.prefix + "Locked" }
        switch member {
        case "Insert":
            let rule = rule!
            if model[id] != nil { return Self.prefix + "RuleExists" }
            do { try rule.validate(capabilities: capabilities) } catch { return Self.prefix + "InvalidRule" }
            if model.count >= Self.maxRules { return Self.prefix + "NoSpace" }
            if reservedSockets + rule.portCount > Self.maxSockets { return Self.prefix + "NoSpace" }
            model[id] = ModelEntry(rule: rule, active: false)
        case "Delete":
            guard let e = model[id] else { return Self.prefix + "NoSuchRule" }
            if e.active { return Self.prefix + "RuleActive" }
            model[id] = nil
        case "Activate":
            guard let e = model[id] else { return Self.prefix + "NoSuchRule" }
            if e.active { return Self.prefix + "RuleActive" }
            if model.contains(where: { $0.key != id && $0.value.active && $0.value.rule.conflicts(with: e.rule) }) {
                return Self.prefix + "Conflict"
            }
            model[id]!.active = true
        case "Deactivate":
            guard let e = model[id] else { return Self.prefix + "NoSuchRule" }
            if !e.active { return Self.prefix + "RuleInactive" }
            model[id]!.active = false
        default:
            fatalError("not a change: \(member)")
        }
        return "success"
    }

    func predictManager(_ c: FuzzClient, _ member: String) -> String {
        switch member {
        case "Lock":
            if lockOwner == c { return "success" }
            if lockOwner != nil { return Self.prefix + "Locked" }
            lockOwner = c
            lockSnapshot = model
        case "Unlock":
            guard lockOwner == c else { return Self.prefix + "NotLocked" }
            model = lockSnapshot
            lockOwner = nil
        case "Commit":
            guard lockOwner == c else { return Self.prefix + "NotLocked" }
            lockSnapshot = model
        case "Rollback":
            guard lockOwner == c else { return Self.prefix + "NotLocked" }
            model = lockSnapshot
        default:
            fatalError("not a manager method: \(member)")
        }
        return "success"
    }

    // MARK: Steps

    func randomClient() -> FuzzClient {
        if let owner = lockOwner, owner != .peer, rng.oneIn(3) { return owner }
        return rng.oneIn(5) ? .second : .main
    }

    func stepInsert() {
        let c = randomClient()
        let id = randomID()
        let fields = randomRuleFields()
        let desc = DBusValue.vardict(fields)
        let wanted: String
        do {
            let rule = try RuleCodec.decode(desc)
            wanted = predictChange(c, "Insert", id, rule: rule)
        } catch {
            wanted = error.name
        }
        let (got, _) = tableCall(c, "Insert", [.uint32(id), desc])
        expect("\(c) Insert \(id) \(fields.map { "\($0.0)=\($0.1)" }.joined(separator: ","))", got, wanted)
    }

    func stepSimple(_ member: String) {
        let c = randomClient()
        var id = randomID()
        if member == "Activate", let rule = model[id]?.rule, !activatable(rule) {
            // Never bind outside the private range (other tests use those ports); ask something harmless.
            id = UInt32.max - 2
        }
        let before = model
        let wanted = predictChange(c, member, id)
        let (got, reply) = tableCall(c, member, [.uint32(id)])
        expect("\(c) \(member) \(id)", got, wanted)
        if member == "Activate" && got == "success" {
            boundByActivate += Int(reply.first?.uint32Value ?? 0)
            let rule = model[id]?.rule ?? before[id]?.rule
            if reply.count != 2 || rule.map({ Int(reply[0].uint32Value ?? 0) + Int(reply[1].uint32Value ?? 0) != $0.portCount }) ?? true {
                violation("Activate \(id) replied \(reply), rule \(String(describing: rule))")
            }
        }
    }

    func stepRead() {
        let id = randomID()
        let c: FuzzClient = rng.oneIn(3) ? .second : .main
        switch rng.below(3) {
        case 0:
            let (got, reply) = tableCall(c, "Status", [.uint32(id)])
            let e = model[id]
            expect("Status \(id)", got, e == nil ? Self.prefix + "NoSuchRule" : "success")
            if let e, got == "success", reply.first != .bool(e.active) { violation("Status \(id) = \(reply), model active \(e.active)") }
        case 1:
            let (got, reply) = tableCall(c, "Read", [.uint32(id)])
            let e = model[id]
            expect("Read \(id)", got, e == nil ? Self.prefix + "NoSuchRule" : "success")
            if let e, got == "success", reply != [RuleCodec.encode(e.rule)] { violation("Read \(id) = \(reply), model \(e.rule)") }
        default:
            let index = rng.oneIn(20) ? UInt32.max : UInt32(rng.below(model.count + 2))
            let (got, reply) = tableCall(c, "ReadIndex", [.uint32(index)])
            let ids = model.keys.sorted()
            let wanted = Int(index) < ids.count ? "success" : Self.prefix + "NoSuchRule"
            expect("ReadIndex \(index)", got, wanted)
            if got == "success", Int(index) < ids.count {
                let id = ids[Int(index)]
                if reply != [.uint32(id), RuleCodec.encode(model[id]!.rule)] { violation("ReadIndex \(index) = \(reply), model id \(id)") }
            }
        }
    }

    func stepManager() {
        var c: FuzzClient = rng.oneIn(2) ? .second : .main
        var member = rng.pick(["Lock", "Lock", "Unlock", "Commit", "Rollback"])
        if let owner = lockOwner, owner != .peer, rng.oneIn(2) {
            c = owner  // the holder ends most transactions soon
            member = rng.pick(["Unlock", "Commit", "Rollback", "Unlock"])
        }
        let wanted = predictManager(c, member)
        let (got, _) = call(c, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, member, [])
        expect("\(c) \(member)", got, wanted)
    }

    /// The model's answer to an Apply, and whether activations were reached (after which a
    /// BindFailed, which the model does not predict, may replace the predicted answer).
    /// Applies the predicted change to the model on success.
    func predictApply(_ c: FuzzClient, _ inserts: [(UInt32, DBusValue)], _ removesIn: [UInt32], _ options: [(String, DBusValue)]) -> (String, Bool) {
        // Decoding, in pestod's order: inserts (a repeated ID is RuleExists), then options.
        var rules: [(UInt32, Rule)] = []
        for (id, desc) in inserts {
            if rules.contains(where: { $0.0 == id }) { return (Self.prefix + "RuleExists", false) }
            do { rules.append((id, try RuleCodec.decode(desc))) } catch { return (error.name, false) }
        }
        if removesIn.contains(where: { id in rules.contains { $0.0 == id } }) { return (DBusErrorReply.invalidArgs, false) }
        for (key, v) in options {
            switch (key, v) {
            case ("max-failures", .uint32), ("best-effort", .bool): break
            default: return (DBusErrorReply.invalidArgs, false)
            }
        }
        // Then every rule is validated, still before authorisation and the lock.
        for (_, rule) in rules {
            do { try rule.validate(capabilities: capabilities) } catch { return (Self.prefix + "InvalidRule", false) }
        }
        if let owner = lockOwner, owner != c { return (Self.prefix + "Locked", false) }
        var removes: [UInt32] = []
        for id in removesIn where !removes.contains(id) { removes.append(id) }
        var m = model
        var reserved = reservedSockets
        for (id, rule) in rules {
            if m[id] != nil { return (Self.prefix + "RuleExists", false) }
            do { try rule.validate(capabilities: capabilities) } catch { return (Self.prefix + "InvalidRule", false) }
            if m.count >= Self.maxRules || reserved + rule.portCount > Self.maxSockets { return (Self.prefix + "NoSpace", false) }
            m[id] = ModelEntry(rule: rule, active: false)
            reserved += rule.portCount
        }
        for id in removes {
            guard let e = m[id] else { return (Self.prefix + "NoSuchRule", false) }
            if e.active && rules.contains(where: { $0.1.conflicts(with: e.rule) }) { m[id]!.active = false }
        }
        for (id, rule) in rules {
            if m.contains(where: { $0.key != id && $0.value.active && $0.value.rule.conflicts(with: rule) }) {
                return (Self.prefix + "Conflict", true)
            }
            m[id]!.active = true
        }
        for id in removes { m[id] = nil }
        model = m
        return ("success", true)
    }

    func stepApply() {
        let c = randomClient()
        var inserts: [(UInt32, DBusValue)] = []
        for _ in 0..<rng.below(4) { inserts.append((randomID(), .vardict(randomRuleFields(local: true)))) }
        let removes = (0..<rng.below(3)).map { _ in randomID() }
        let options: [(String, DBusValue)] = rng.pick([
            [], [], [("best-effort", .bool(true))], [("max-failures", .uint32(2))], [("max-failures", .string("x"))], [("speed", .uint32(1))],
            [("best-effort", .bool(false)), ("max-failures", .uint32(0))],
        ])
        let before = model
        let (wanted, reachedActivation) = predictApply(c, inserts, removes, options)
        let (got, reply) = tableCall(c, "Apply", [
            .array(element: "(ua{sv})", inserts.map { .structure([.uint32($0.0), $0.1]) }),
            .array(element: "u", removes.map { .uint32($0) }), .vardict(options),
        ])
        let what = "\(c) Apply inserts \(inserts.map { "\($0.0): \($0.1)" }) removes \(removes) options \(options)"
        if got == Self.prefix + "BindFailed" && reachedActivation {
            // Some socket could not bind (an absent interface or address, a port taken outside):
            // nothing may have changed.
            model = before
            note("\(what) -> \(got)")
        } else {
            expect(what, got, wanted)
            if got != wanted { resync() }
        }
        if got == "success" {
            let results = reply.first?.arrayValue ?? []
            if results.count != inserts.count { violation("Apply returned \(results.count) results for \(inserts.count) inserts") }
            for (r, (id, _)) in zip(results, inserts) {
                guard let fields = r.structValue, fields.count == 3, fields[0] == .uint32(id),
                      let rule = model[id]?.rule ?? (try? RuleCodec.decode(inserts.first { $0.0 == id }!.1)),
                      let bound = fields[1].uint32Value, let failed = fields[2].uint32Value, Int(bound) + Int(failed) == rule.portCount
                else {
                    violation("Apply result \(r) does not match insert \(id)")
                    continue
                }
            }
        }
    }

    /// Wrong signatures, unknown members, interfaces and objects, properties.
    func stepHostile() {
        let c: FuzzClient = rng.oneIn(3) ? .second : .main
        switch rng.below(8) {
        case 6:
            // No interface in the message: pestod finds the method by name.
            let id = randomID()
            let (got, reply) = call(c, path: PestodFixture.hostPath, interface: nil, "Status", [.uint32(id)])
            expect("Status \(id) without interface", got, model[id] == nil ? Self.prefix + "NoSuchRule" : "success")
            if let e = model[id], got == "success", reply.first != .bool(e.active) { violation("Status \(id) = \(reply), model active \(e.active)") }
        case 7:
            // Introspection and GetAll of rule objects, present or not.
            let id = randomID()
            let path = PestodFixture.hostPath + "/rules/\(id)"
            let wanted = model[id] == nil ? DBusErrorReply.unknownObject : "success"
            if rng.oneIn(2) {
                let (got, reply) = call(c, path: path, interface: "org.freedesktop.DBus.Introspectable", "Introspect", [])
                expect("Introspect \(path)", got, wanted)
                if got == "success", reply.first?.stringValue?.contains("top.passt.Pesto1.Rule") != true { violation("Introspect \(path) = \(reply)") }
            } else {
                let (got, reply) = call(c, path: path, interface: "org.freedesktop.DBus.Properties", "GetAll", [.string("top.passt.Pesto1.Rule")])
                expect("GetAll \(path)", got, wanted)
                if got == "success", let e = model[id] {
                    let props = Dictionary(reply.first?.vardictValue ?? [], uniquingKeysWith: { a, _ in a })
                    for (_, property, value) in RuleCodec.fields(e.rule) where props[property] != value {
                        violation("GetAll \(path): \(property) = \(String(describing: props[property])), model \(value)")
                    }
                    if props["Active"] != .bool(e.active) || props["Id"] != .uint32(id) { violation("GetAll \(path) = \(props)") }
                }
            }
        case 0:
            let table = ["Insert": "ua{sv}", "Delete": "u", "Activate": "u", "Deactivate": "u", "Status": "u", "Read": "u",
                         "ReadIndex": "u", "List": "", "Apply": "a(ua{sv})aua{sv}"]
            let member = rng.pick(Array(table.keys).sorted())
            var args = (0..<rng.below(4)).map { _ in randomValue() }
            if args.map(\.signature).joined() == table[member]! { args.append(.byte(1)) }
            let (got, _) = tableCall(c, member, args)
            expect("\(member) with \(args.map(\.signature).joined())", got, DBusErrorReply.invalidArgs)
        case 1:
            let member = rng.pick(["Lock", "Unlock", "Commit", "Rollback"])
            let args = (0...rng.below(2)).map { _ in randomValue() }
            let (got, _) = call(c, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, member, args)
            expect("\(member) with \(args.map(\.signature).joined())", got, DBusErrorReply.invalidArgs)
        case 2:
            let (got, _) = tableCall(c, rng.pick(["Explode", "insert", "Lock", "Get"]), [.uint32(1)])
            expect("unknown member", got, DBusErrorReply.unknownMethod)
        case 3:
            let (got, _) = call(c, path: PestodFixture.hostPath, interface: rng.pick(["top.passt.Pesto1.Nope", "top.passt.Pesto1.Manager", "a.b"]), "Status", [.uint32(1)])
            expect("unknown interface", got, DBusErrorReply.unknownInterface)
        case 4:
            let id = randomID()
            let path = rng.oneIn(3) ? rng.pick(["/top/passt/Pesto1/tables/nope", "/top/passt/Pesto1/tables/host/rules/0x1", "/nope"])
                : PestodFixture.hostPath + "/rules/\(id)"
            let (got, reply) = call(c, path: path, interface: "org.freedesktop.DBus.Properties", "Get", [.string("top.passt.Pesto1.Rule"), .string("Active")])
            let wanted = path.hasSuffix("/rules/\(id)") && model[id] != nil ? "success" : DBusErrorReply.unknownObject
            expect("Get \(path) Active", got, wanted)
            if got == "success", reply.first?.variantValue != .bool(model[id]!.active) { violation("Active of \(id) = \(reply)") }
        default:
            let (name, value): (String, DBusValue) = rng.pick([
                ("RuleCount", .uint32(UInt32(model.count))), ("ActiveCount", .uint32(UInt32(model.values.filter(\.active).count))),
                ("MaxRules", .uint32(UInt32(Self.maxRules))), ("Nonsense", .uint32(0)),
            ])
            if rng.oneIn(2) {
                let (got, reply) = call(c, path: PestodFixture.hostPath, interface: "org.freedesktop.DBus.Properties", "Get",
                                        [.string(PestodFixture.tableInterface), .string(name)])
                expect("Get \(name)", got, name == "Nonsense" ? DBusErrorReply.unknownProperty : "success")
                if got == "success", reply.first?.variantValue != value { violation("\(name) = \(reply), model \(value)") }
            } else {
                let (got, _) = call(c, path: PestodFixture.hostPath, interface: "org.freedesktop.DBus.Properties", "Set",
                                    [.string(PestodFixture.tableInterface), .string(name), .variant(.uint32(0))])
                expect("Set \(name)", got, name == "Nonsense" ? DBusErrorReply.unknownProperty : DBusErrorReply.propertyReadOnly)
            }
        }
    }

    /// A pesto-test-peer that takes the lock, changes things and is killed with SIGKILL.
    func stepPeer() throws {
        guard lockOwner == nil else { return }
        let peer = try Child(Products.path("pesto-test-peer"), [f.address])
        guard let ready = peer.readLine(), ready.hasPrefix("ready ") else {
            violation("peer did not start")
            return
        }
        peerName = String(ready.dropFirst("ready ".count))
        calls["peer", default: 0] += 1
        func ask(_ line: String, _ wanted: String) {
            let answer = peer.ask(line)
            let got = answer.hasPrefix("ok") ? "success" : String(answer.dropFirst("error ".count).prefix { $0 != ":" })
            if got != "success" { errors[got, default: 0] += 1 }
            expect("peer \(line)", got, wanted)
        }
        ask("Lock", predictManager(.peer, "Lock"))
        for _ in 0...rng.below(6) {
            let id = UInt32(rng.below(21))
            switch rng.below(6) {
            case 0, 1:
                let port = ports.lowerBound + UInt16(rng.below(Int(ports.upperBound - ports.lowerBound) + 1))
                let address = rng.pick(["127.0.0.1", "::1", "0.0.0.0"])
                let rule = Rule(proto: .tcp, address: IPAddress(address), firstPort: port)
                ask("Insert \(id) \(port) \(address)", predictChange(.peer, "Insert", id, rule: rule))
            case 2:
                if let rule = model[id]?.rule, !activatable(rule) { continue }
                ask("Activate \(id)", predictChange(.peer, "Activate", id))
            case 3: ask("Deactivate \(id)", predictChange(.peer, "Deactivate", id))
            case 4: ask("Delete \(id)", predictChange(.peer, "Delete", id))
            default:
                if rng.oneIn(3) { ask("Commit", predictManager(.peer, "Commit")) }
            }
        }
        peer.kill()
        note("peer killed")
        // The lock is released (and the transaction rolled back) when the bus reports the peer gone.
        let deadline = Date().addingTimeInterval(5)
        while lockOwnerOnBus() != "" && Date() < deadline { usleep(2000) }
        if lockOwner == .peer {
            model = lockSnapshot
            lockOwner = nil
        }
        peerName = ""
        check()
    }

    /// Takes a private port away from pestod with a socket of our own, or gives it back.
    func stepHolder() {
        if let fd = holder {
            close(fd)
            holder = nil
            note("holder closed")
            return
        }
        let port = ports.lowerBound + UInt16(rng.below(Int(ports.upperBound - ports.lowerBound) + 1))
        let udp = rng.oneIn(2)
        let address: IPAddress = rng.pick([.loopbackIPv4, .anyIPv4, .anyIPv6])
        holder = TestSockets.bound(udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue), address: address, port: port, listen: !udp)
        calls["holder", default: 0] += 1
        note("holder \(udp ? "udp" : "tcp") \(address) \(port): \(holder.map { "fd \($0)" } ?? "port busy")")
    }

    // MARK: Invariants

    func tableList() -> [DBusValue] {
        (try? f.client.call(PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "List").first?.arrayValue) ?? [DBusValue.string("List failed")]
    }

    func lockOwnerOnBus() -> String {
        (try? f.client.call(PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
                            [.string(PestodFixture.managerInterface), .string("LockOwner")]).first?.variantValue?.stringValue) ?? "?"
    }

    /// Makes the model what `List` says (after calls whose outcome is not predicted).
    func resync() {
        var fresh: [UInt32: ModelEntry] = [:]
        for item in tableList() {
            guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let rule = try? RuleCodec.decode(s[1]),
                  let active = s[2].structValue?.first?.boolValue
            else {
                violation("List entry \(item) does not decode")
                continue
            }
            fresh[id] = ModelEntry(rule: rule, active: active)
        }
        model = fresh
    }

    /// The listening sockets' (proto, family is IPv6, port).
    func sockets() -> [(proto: TransportProtocol, v6: Bool, port: UInt16)] {
        listeningSocketsOf(pid: pid).compactMap { line in
            let f = line.split(separator: " ")
            guard f.count == 3, let portHex = f[1].split(separator: ":").last, let port = UInt16(portHex, radix: 16) else { return nil }
            return (f[0].hasPrefix("tcp") ? .tcp : .udp, f[0].hasSuffix("6"), port)
        }
    }

    /// Every descriptor of pestod and what it is, for diagnostics.
    func fdTargets() -> String {
        let dir = "/proc/\(pid)/fd"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }.map { fd in
            "\(fd)=\((try? FileManager.default.destinationOfSymbolicLink(atPath: "\(dir)/\(fd)")) ?? "?")"
        }.joined(separator: " ")
    }

    func fdCount() -> Int { ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count }

    /// Checks every invariant; a socket mismatch is re-read a few times (bind retries run every second).
    func check() {
        checks += 1
        guard f.pestod.process.isRunning else {
            violation("pestod is not running; log tail:\n\(f.log.suffix(3000))")
            return
        }
        let owner = lockOwnerOnBus()
        let wantedOwner = lockOwner.map { uniqueName($0) } ?? ""
        if owner != wantedOwner { violation("LockOwner is \"\(owner)\", model \"\(wantedOwner)\"") }

        var problems: [String] = []
        for attempt in 0..<14 {
            problems = []
            let list = tableList()
            let socks = sockets()
            var expected: [DBusValue] = []
            var boundSum = 0
            for id in model.keys.sorted() {
                expected.append(.structure([.uint32(id), RuleCodec.encode(model[id]!.rule)]))
            }
            let actual = list.map { item -> DBusValue in .structure(Array((item.structValue ?? []).prefix(2))) }
            if actual != expected { problems.append("List rules differ from the model:\n  pestod \(actual)\n  model  \(expected)") }
            var activeRules: [Rule] = []
            for item in list {
                guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let st = s[2].structValue, st.count == 4,
                      let active = st[0].boolValue, let bound = st[1].uint32Value, let failed = st[2].uint32Value
                else { problems.append("bad List entry \(item)"); continue }
                if model[id]?.active != active { problems.append("rule \(id) active \(active), model \(String(describing: model[id]?.active))") }
                guard let rule = try? RuleCodec.decode(s[1]) else { continue }
                if active {
                    activeRules.append(rule)
                    boundSum += Int(bound)
                    if Int(bound) + Int(failed) != rule.portCount { problems.append("rule \(id): bound \(bound) + failed \(failed) != \(rule.portCount) ports") }
                    if failed == 0 {
                        for port in rule.firstPort...rule.lastPort where !socks.contains(where: { Self.matches(rule, $0) && $0.port == port }) {
                            problems.append("active rule \(id) has no failures but no socket on port \(port)")
                        }
                    }
                } else if bound != 0 || failed != 0 || st[3] != .string("") {
                    problems.append("inactive rule \(id) has status \(st)")
                }
            }
            if socks.count != boundSum { problems.append("\(socks.count) listening sockets, active rules report \(boundSum) bound") }
            for s in socks where !activeRules.contains(where: { Self.matches($0, s) && $0.firstPort <= s.port && s.port <= $0.lastPort }) {
                problems.append("socket \(s) belongs to no active rule")
            }
            // The object tree: one Rule object per rule, with its Active bit; the table's counters.
            let objects = (try? f.client.call(PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"))
            if case .dictionary(_, _, let entries)? = objects?.first {
                var rulePaths: [String: Bool] = [:]
                for e in entries {
                    guard case .objectPath(let path) = e.key, case .dictionary(_, _, let ifaces) = e.value else { continue }
                    for i in ifaces {
                        let props = Dictionary(i.value.vardictValue ?? [], uniquingKeysWith: { a, _ in a })
                        if i.key == .string("top.passt.Pesto1.Rule") { rulePaths[path] = props["Active"]?.boolValue }
                        if i.key == .string(PestodFixture.tableInterface) && path == PestodFixture.hostPath {
                            let counts = [props["RuleCount"], props["ActiveCount"], props["SocketCount"]]
                            let wanted: [DBusValue?] = [.uint32(UInt32(model.count)), .uint32(UInt32(model.values.filter(\.active).count)), .uint32(UInt32(boundSum))]
                            if counts != wanted { problems.append("table counters \(counts), expected \(wanted)") }
                        }
                    }
                }
                var wantedPaths: [String: Bool] = [:]
                for (id, e) in model { wantedPaths[PestodFixture.hostPath + "/rules/\(id)"] = e.active }
                if rulePaths != wantedPaths { problems.append("rule objects \(rulePaths.sorted { $0.key < $1.key }), model \(wantedPaths.sorted { $0.key < $1.key })") }
            } else {
                problems.append("GetManagedObjects failed: \(String(describing: objects))")
            }
            // ss agrees with /proc about how many sockets pestod listens on (every 40th check).
            if checks % 40 == 0, let ss = try? PestoServiceTests.run("/usr/bin/ss", ["-H", "-tulnp"]) {
                let mine = ss.out.split(separator: "\n").filter { $0.contains("pid=\(pid),") }.count
                if mine != socks.count { problems.append("ss shows \(mine) listening sockets of pestod, /proc \(socks.count)") }
            }
            let fds = fdCount()
            if fds - socks.count > maxFDs {
                maxFDs = fds - socks.count
                if maxFDs > fdBaseline + 2 { note("fds beyond sockets: \(maxFDs): \(fdTargets())") }
            }
            if fds > fdBaseline + socks.count + 12 { problems.append("descriptor leak: \(fds) open, baseline \(fdBaseline) + \(socks.count) sockets") }
            if problems.isEmpty { return }
            if attempt < 13 { usleep(150_000) }
        }
        violation(problems.joined(separator: "\n"))
        resync()
    }

    static func matches(_ rule: Rule, _ s: (proto: TransportProtocol, v6: Bool, port: UInt16)) -> Bool {
        guard rule.proto == s.proto else { return false }
        // A dual-stack rule has one IPv6 socket, or an IPv4 one where IPv6 is disabled.
        guard let a = rule.address else { return true }
        return (a.family == .ipv6) == s.v6
    }

    // MARK: Driver

    func run(steps: Int) throws {
        let start = Date()
        _ = tableList()
        fdBaseline = fdCount()
        check()
        for i in 1...max(steps, 1) {
            step = i
            let k = rng.below(1000)
            switch k {
            case ..<2: try stepPeer()  // 1 in 500
            case ..<5: stepHolder()
            case ..<200: stepInsert()
            case ..<300: stepSimple("Delete")
            case ..<480: stepSimple("Activate")
            case ..<600: stepSimple("Deactivate")
            case ..<700: stepRead()
            case ..<720:
                let c: FuzzClient = rng.oneIn(2) ? .second : .main
                let (got, _) = tableCall(c, "List", [])
                expect("List", got, "success")
            case ..<780: stepApply()
            case ..<880: stepHostile()
            default: stepManager()
            }
            if i % 25 == 0 { check() }
            if violations > 20 { break }
        }
        // Release any lock and check once more.
        if let owner = lockOwner, owner != .peer {
            let wanted = predictManager(owner, "Unlock")
            let (got, _) = call(owner, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, "Unlock", [])
            expect("final Unlock", got, wanted)
        }
        if let fd = holder { close(fd) }
        holder = nil
        check()
        // Empty the table: every descriptor beyond the baseline must be gone.
        for id in model.keys.sorted() {
            if model[id]!.active { expect("final Deactivate \(id)", tableCall(.main, "Deactivate", [.uint32(id)]).0, predictChange(.main, "Deactivate", id)) }
            expect("final Delete \(id)", tableCall(.main, "Delete", [.uint32(id)]).0, predictChange(.main, "Delete", id))
        }
        check()
        let deadline = Date().addingTimeInterval(3)
        while fdCount() != fdBaseline && Date() < deadline { usleep(20_000) }
        if fdCount() != fdBaseline { violation("descriptor leak: \(fdCount()) open with an empty table, \(fdBaseline) at the start: \(fdTargets())") }
        let seconds = Date().timeIntervalSince(start)
        let callText = calls.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let errorText = errors.sorted { $0.key < $1.key }.map { "\($0.key.split(separator: ".").last!) \($0.value)" }.joined(separator: ", ")
        print("""
            FuzzTests summary: seed \(seed), \(step) steps, \(checks) invariant checks, \(violations) violations, \
            \(String(format: "%.1f", seconds)) s, \(model.count) rules (\(model.values.filter(\.active).count) active) at the end, \
            fds beyond sockets max \(maxFDs) (baseline \(fdBaseline)), \(boundByActivate) sockets bound by Activate
              calls: \(callText)
              errors: \(errorText)
            """)
    }
}
