// SPDX-License-Identifier: GPL-2.0-or-later

// A property test with a fixed, replayable random sequence: random, malformed and hostile calls
// against a running pestod, with a model of the HOST table that predicts every answer, and
// invariants checked as it goes: pestod alive, `List` equals the model, listening sockets match
// the active rules exactly, the lock owner is the one the model expects, and no descriptor leaks.
//
// The model is an oracle of its own: it is written from doc/dbus-api.md (and the contract that
// document refines), not from pestod's code. It never calls pestod's rule decoding, validation,
// conflict check, codec or error names; pestod's D-Bus types are used only to make the calls
// (see "The contract model" at the end of the file).
//
// PESTO_FUZZ_SEED=<n> picks another random sequence (the default is fixed), PESTO_FUZZ_STEPS=<n>
// another length. The model covers both overlap policies (doc/overlap.md): one run against the
// default pestod (refuse: overlaps are Conflict), one against `pestod --overlap first-match`
// (overlaps allowed, sockets shared, each rule's PortsWon predicted from the rules alone).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// The fuzz run's generator (shared with the other fuzz tests).
typealias FuzzRandom = SeededRandom

@Suite("pestod fuzz", .serialized)
struct FuzzTests {
    /// The random sequence a plain `swift test` runs, so that every run checks the same calls.
    static let defaultSeed: UInt64 = 20_240_601

    @Test("random and malformed calls, lock sequences and killed lock holders keep every invariant")
    func fuzz() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["PESTO_FUZZ_SEED"].flatMap { UInt64($0) } ?? Self.defaultSeed
        let steps = env["PESTO_FUZZ_STEPS"].flatMap { Int($0) } ?? 6_000
        print("FuzzTests: seed \(seed), \(steps) steps (PESTO_FUZZ_SEED=\(seed) PESTO_FUZZ_STEPS=\(steps) to reproduce)")
        let run = try FuzzRun(seed: seed)
        try run.run(steps: steps)
        #expect(run.violations == 0, "seed \(seed)")
    }

    @Test("the same under --overlap first-match: overlaps allowed, shared sockets, PortsWon as predicted")
    func fuzzFirstMatch() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["PESTO_FUZZ_SEED"].flatMap { UInt64($0) } ?? Self.defaultSeed
        let steps = env["PESTO_FUZZ_STEPS"].flatMap { Int($0) } ?? 6_000
        print("FuzzTests first-match: seed \(seed), \(steps) steps (PESTO_FUZZ_SEED=\(seed) PESTO_FUZZ_STEPS=\(steps) to reproduce)")
        let run = try FuzzRun(seed: seed, firstMatch: true)
        try run.run(steps: steps)
        #expect(run.violations == 0, "seed \(seed), first-match")
        #expect(run.overlapsAllowed > 0, "the run activated overlapping rules")
    }
}

/// Who makes a call.
enum FuzzClient: String {
    case main, second, peer
}

/// One rule of the model.
struct ModelEntry: Equatable {
    var rule: ModelRule
    var active: Bool
}

/// One fuzz run: the pestod under test, the model, the generators, the steps and the invariants.
final class FuzzRun {
    static let maxRules = 24
    static let maxSockets = 140_000

    let seed: UInt64
    var rng: FuzzRandom
    let f: PestodFixture
    let second: DBusConnection
    let ports: ClosedRange<UInt16>
    /// The table's `Capabilities` property, as names.
    let capabilities: Set<String>

    var model: [UInt32: ModelEntry] = [:]
    var lockOwner: FuzzClient?
    var lockSnapshot: [UInt32: ModelEntry] = [:]
    var peerName = ""

    var calls: [String: Int] = [:]
    var errors: [String: Int] = [:]
    /// Conflicts the model predicted, by the kind of address match (see `ModelRule.conflictKind`).
    var conflictKinds: [String: Int] = [:]
    /// Answers to cases the documents leave open, by case and answer.
    var openCases: [String: Int] = [:]
    var violations = 0
    var recent: [String] = []
    var step = 0
    var fdBaseline = 0
    var maxFDs = 0
    var checks = 0
    /// A socket of the test's own on a private port, so that some binds fail and are retried.
    var holder: Int32?
    /// True for a pestod started with `--overlap first-match`.
    let firstMatch: Bool
    /// Activations of a rule overlapping an active one that the model let succeed (first match).
    var overlapsAllowed = 0
    /// Rules whose PortsWon the model predicted and checked.
    var portsWonChecked = 0
    /// How `sockets()` found pestod's listeners (for the summary).
    /// Sockets bound by successful Activate calls, in all.
    var boundByActivate = 0

    init(seed: UInt64, firstMatch: Bool = false) throws {
        self.seed = seed
        self.firstMatch = firstMatch
        rng = FuzzRandom(seed: seed)
        f = try PestodFixture(
            pestodArguments: ["--max-rules", "\(Self.maxRules)", "--max-sockets", "\(Self.maxSockets)"]
                + (firstMatch ? ["--overlap", "first-match"] : []))
        second = try DBusConnection(.address(f.address))
        ports = TestSockets.freePorts(64)
        let names =
            (try f.client.call(
                PestodFixture.dest, PestodFixture.hostPath, "org.freedesktop.DBus.Properties", "Get",
                [.string(PestodFixture.tableInterface), .string("Capabilities")]
            ).first?.variantValue?.arrayValue ?? [])
            .compactMap(\.stringValue)
        capabilities = Set(names)
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
            return (ContractError.success, reply.arguments ?? [])
        } catch {
            errors[error.name, default: 0] += 1
            return (error.name, [])
        }
    }

    func tableCall(_ c: FuzzClient, _ member: String, _ args: [DBusValue]) -> (String, [DBusValue]) {
        call(c, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member, args)
    }

    /// Records the answer; a violation unless the model allows it.
    @discardableResult
    func expect(_ what: String, _ got: String, _ allowed: Answers) -> Bool {
        note("\(what) -> \(got)")
        if allowed.contains(got) { return true }
        violation("\(what): got \(got), model allows \(allowed.sorted())")
        return false
    }

    func expect(_ what: String, _ got: String, _ wanted: String) { expect(what, got, [wanted]) }

    /// Counts an answer to a case the documents leave open.
    func noteOpen(_ verdict: RequestVerdict, _ got: String) {
        guard verdict.decodeErrors.isEmpty, got == ContractError.success || got == ContractError.invalidRule else { return }
        for reason in verdict.reasons where reason.hasPrefix("open: ") {
            openCases["\(reason.dropFirst(6)) -> \(got.split(separator: ".").last ?? "")", default: 0] += 1
        }
    }

    // MARK: Generators

    func randomID() -> UInt32 {
        rng.oneIn(40) ? rng.pick([UInt32.max, UInt32.max - 1, 1000, 0]) : UInt32(rng.below(21))
    }

    /// A rule description, mostly valid; `local` keeps every port inside the private range.
    func randomRuleFields(local: Bool = false) -> [(String, DBusValue)] {
        var fields: [(String, DBusValue)] = []
        if !rng.oneIn(40) {
            fields.append(
                ("protocol", .string(rng.oneIn(30) ? rng.pick(["sctp", "TCP", "", "udp ", "tcp\u{1}"]) : rng.pick(["tcp", "udp"]))))
        }
        if !rng.oneIn(3) {
            fields.append(
                (
                    "address",
                    .string(
                        rng.pick([
                            "127.0.0.1", "127.0.0.1", "::1", "::1", "", "0.0.0.0", "::", "127.0.0.2", "::ffff:127.0.0.1",
                            "garbage", "1.2.3", "224.0.0.1", "ff02::1", "1.2.3.4", "300.1.1.1", "::1::", "fe80::1",
                        ]))
                ))
        }
        if rng.oneIn(8) {
            fields.append(("proxy-protocol", .string(rng.pick(["", "v1", "v2", "v2", "v3", "V1"]))))
        }
        if rng.oneIn(10) {
            fields.append(("source", .string(rng.pick(["", "pestod", "pestod", "client", "Client", "peer"]))))
        }
        if rng.oneIn(5) {
            fields.append(
                (
                    "interface",
                    .string(
                        rng.pick([
                            "", "lo", "lo", "eth0", "nosuchif0", "0123456789abcdef", "012345678901234", ".", "..", "a/b", "a:b", "a b",
                        ]))
                ))
        }
        let span = ports.upperBound - ports.lowerBound
        // Half the rules start in the first eight ports, so that overlaps (conflicts) are common.
        var first = ports.lowerBound + UInt16(rng.oneIn(2) ? rng.below(8) : rng.below(Int(span) + 1))
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
        if rng.oneIn(10) {
            fields.append(
                (
                    "target-address",
                    .string(rng.pick(["127.0.0.1", "::1", "0.0.0.0", "224.0.0.1", "junk", "", "10.0.0.1", "::ffff:127.0.0.1"]))
                ))
        }
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

    func activatable(_ rule: ModelRule) -> Bool {
        rule.first >= ports.lowerBound && rule.last <= ports.upperBound && rule.last >= rule.first
    }

    var reservedSockets: Int { model.values.reduce(0) { $0 + $1.rule.portCount } }

    /// True when another client than `c` holds the lock.
    func lockedAgainst(_ c: FuzzClient) -> Bool { lockOwner.map { $0 != c } ?? false }

    /// The answers the doc allows to Insert by `c`, in its check order: decoding errors first,
    /// then the rule's validity (InvalidRule, before authorisation and the lock), then the lock,
    /// then the change (RuleExists, NoSpace). Where the model leaves a rule's validity open,
    /// InvalidRule is allowed beside the later answers.
    func predictInsert(_ c: FuzzClient, _ id: UInt32, _ verdict: RequestVerdict) -> Answers {
        if !verdict.decodeErrors.isEmpty { return verdict.decodeErrors }
        if verdict.validity == .invalid { return [ContractError.invalidRule] }
        let floating: Answers = verdict.validity == .valid ? [] : [ContractError.invalidRule]
        if lockedAgainst(c) { return floating.union([ContractError.locked]) }
        var change: Answers = []
        if model[id] != nil { change.insert(ContractError.ruleExists) }
        if let rule = verdict.rule, model.count >= Self.maxRules || reservedSockets + rule.portCount > Self.maxSockets {
            change.insert(ContractError.noSpace)
        }
        var answers = floating.union(change)
        if change.isEmpty && verdict.validity != .invalid { answers.insert(ContractError.success) }
        return answers
    }

    /// The answer to Delete, Activate or Deactivate of `id` by `c`.
    func predictChange(_ c: FuzzClient, _ member: String, _ id: UInt32) -> String {
        if lockedAgainst(c) { return ContractError.locked }
        guard let e = model[id] else { return ContractError.noSuchRule }
        switch member {
        case "Delete": return e.active ? ContractError.ruleActive : ContractError.success
        case "Deactivate": return e.active ? ContractError.success : ContractError.ruleInactive
        case "Activate":
            if e.active { return ContractError.ruleActive }
            guard let other = model.first(where: { $0.key != id && $0.value.active && $0.value.rule.conflicts(with: e.rule) }) else {
                return ContractError.success
            }
            if firstMatch {
                overlapsAllowed += 1
                return ContractError.success
            }
            conflictKinds[other.value.rule.conflictKind(with: e.rule), default: 0] += 1
            return ContractError.conflict
        default: fatalError("not a change: \(member)")
        }
    }

    /// Applies a successful Insert, Delete, Activate or Deactivate to the model.
    func applyChange(_ member: String, _ id: UInt32, rule: ModelRule? = nil) {
        switch member {
        case "Insert": model[id] = ModelEntry(rule: rule!, active: false)
        case "Delete": model[id] = nil
        case "Activate": model[id]?.active = true
        case "Deactivate": model[id]?.active = false
        default: fatalError("not a change: \(member)")
        }
    }

    /// The answer to a Manager method; applied to the model when it is a success.
    func predictManager(_ c: FuzzClient, _ member: String) -> String {
        switch member {
        case "Lock":
            if lockOwner == c { return ContractError.success }
            if lockOwner != nil { return ContractError.locked }
            lockOwner = c
            lockSnapshot = model
        case "Unlock":
            guard lockOwner == c else { return ContractError.notLocked }
            model = lockSnapshot
            lockOwner = nil
        case "Commit":
            guard lockOwner == c else { return ContractError.notLocked }
            lockSnapshot = model
        case "Rollback":
            guard lockOwner == c else { return ContractError.notLocked }
            model = lockSnapshot
        default:
            fatalError("not a manager method: \(member)")
        }
        return ContractError.success
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
        let verdict = judgeRequest(fields, capabilities: capabilities)
        let allowed = predictInsert(c, id, verdict)
        let (got, _) = tableCall(c, "Insert", [.uint32(id), .vardict(fields)])
        noteOpen(verdict, got)
        let what = "\(c) Insert \(id) \(fields.map { "\($0.0)=\($0.1)" }.joined(separator: ",")) \(verdict.reasons)"
        if expect(what, got, allowed) {
            if got == ContractError.success { applyChange("Insert", id, rule: verdict.rule) }
        } else {
            resync()
        }
    }

    func stepSimple(_ member: String) {
        let c = randomClient()
        var id = randomID()
        if member == "Activate", let rule = model[id]?.rule, !activatable(rule) {
            // Never bind outside the private range (other tests use those ports); ask something harmless.
            id = UInt32.max - 2
        }
        let rule = model[id]?.rule
        let wanted = predictChange(c, member, id)
        let (got, reply) = tableCall(c, member, [.uint32(id)])
        expect("\(c) \(member) \(id)", got, wanted)
        if got == ContractError.success && wanted == ContractError.success { applyChange(member, id) }
        if got != wanted { resync() }
        if member == "Activate" && got == ContractError.success {
            boundByActivate += Int(reply.first?.uint32Value ?? 0)
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
            expect("Status \(id)", got, e == nil ? ContractError.noSuchRule : ContractError.success)
            if let e, got == ContractError.success, reply.first != .bool(e.active) {
                violation("Status \(id) = \(reply), model active \(e.active)")
            }
        case 1:
            let (got, reply) = tableCall(c, "Read", [.uint32(id)])
            let e = model[id]
            expect("Read \(id)", got, e == nil ? ContractError.noSuchRule : ContractError.success)
            if let e, got == ContractError.success, reply.count != 1 || readReturnedRule(reply[0]) != e.rule {
                violation("Read \(id) = \(reply), model \(e.rule)")
            }
        default:
            let index = rng.oneIn(20) ? UInt32.max : UInt32(rng.below(model.count + 2))
            let (got, reply) = tableCall(c, "ReadIndex", [.uint32(index)])
            let ids = model.keys.sorted()
            let wanted = Int(index) < ids.count ? ContractError.success : ContractError.noSuchRule
            expect("ReadIndex \(index)", got, wanted)
            if got == ContractError.success, Int(index) < ids.count {
                let id = ids[Int(index)]
                if reply.count != 2 || reply[0] != .uint32(id) || readReturnedRule(reply[1]) != model[id]!.rule {
                    violation("ReadIndex \(index) = \(reply), model id \(id) \(model[id]!.rule)")
                }
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

    /// The doc's answers to an Apply; whether activations are reached (after which a BindFailed,
    /// which the model cannot predict, may come instead); the table after a success.
    ///
    /// Phases, after doc/dbus-api.md: decoding (InvalidArgs/InvalidRule; an ID both inserted and
    /// removed, an unknown or mistyped option are InvalidArgs), the rules' validity
    /// (InvalidRule), the lock, then the change: an
    /// existing ID (RuleExists), a missing removed ID (NoSuchRule), the limits (NoSpace, counted
    /// before the removed rules go, as the contract inserts first); then removed rules that
    /// overlap a new one are deactivated and the new ones activated in order (Conflict with any
    /// active rule, new ones included). Where the doc leaves the phase of an error open (an ID
    /// inserted twice, a rule whose validity the model leaves open), that error is allowed in
    /// every phase.
    func predictApply(
        _ c: FuzzClient, _ inserts: [(UInt32, [(String, DBusValue)])], _ removesIn: [UInt32], _ options: [(String, DBusValue)]
    )
        -> (allowed: Answers, reachedActivation: Bool, after: [UInt32: ModelEntry]?, verdicts: [RequestVerdict])
    {
        var decode: Answers = []
        var floating: Answers = []
        var open = false
        var rules: [(UInt32, ModelRule)] = []
        var insertIDs = Set<UInt32>()
        var verdicts: [RequestVerdict] = []
        for (id, fields) in inserts {
            let v = judgeRequest(fields, capabilities: capabilities)
            verdicts.append(v)
            decode.formUnion(v.decodeErrors)
            if insertIDs.contains(id) { floating.insert(ContractError.ruleExists) }
            insertIDs.insert(id)
            switch v.validity {
            case .invalid: floating.insert(ContractError.invalidRule)
            case .open: open = true
            case .valid: break
            }
            if let r = v.rule { rules.append((id, r)) }
        }
        if removesIn.contains(where: insertIDs.contains) { decode.insert(ContractError.invalidArgs) }
        for (key, value) in options {
            switch (key, value) {
            case ("max-failures", .uint32), ("best-effort", .bool): break
            default: decode.insert(ContractError.invalidArgs)
            }
        }
        let openAnswers: Answers = open ? [ContractError.invalidRule] : []
        if !decode.isEmpty { return (decode.union(floating), false, nil, verdicts) }
        // Rules are validated while decoding, before authorisation and the lock.
        if floating.contains(ContractError.invalidRule) { return (floating.union(openAnswers), false, nil, verdicts) }
        if lockedAgainst(c) { return (floating.union([ContractError.locked]).union(openAnswers), false, nil, verdicts) }
        var removes: [UInt32] = []
        for id in removesIn where !removes.contains(id) { removes.append(id) }
        var change: Answers = []
        if rules.contains(where: { model[$0.0] != nil }) { change.insert(ContractError.ruleExists) }
        if removes.contains(where: { model[$0] == nil }) { change.insert(ContractError.noSuchRule) }
        if model.count + insertIDs.count > Self.maxRules || reservedSockets + rules.reduce(0, { $0 + $1.1.portCount }) > Self.maxSockets {
            change.insert(ContractError.noSpace)
        }
        if !floating.isEmpty || !change.isEmpty { return (floating.union(change).union(openAnswers), false, nil, verdicts) }
        var m = model
        for (id, r) in rules { m[id] = ModelEntry(rule: r, active: false) }
        // Under first match nothing conflicts, and removed rules stay active until the end.
        for id in removes where !firstMatch && m[id]!.active && rules.contains(where: { $0.1.conflicts(with: m[id]!.rule) }) {
            m[id]!.active = false
        }
        for (id, r) in rules {
            if !firstMatch, let other = m.first(where: { $0.key != id && $0.value.active && $0.value.rule.conflicts(with: r) }) {
                conflictKinds[other.value.rule.conflictKind(with: r), default: 0] += 1
                return (Answers([ContractError.conflict]).union(openAnswers), true, nil, verdicts)
            }
            m[id]!.active = true
        }
        for id in removes { m[id] = nil }
        return (Answers([ContractError.success]).union(openAnswers), true, m, verdicts)
    }

    func stepApply() {
        let c = randomClient()
        var inserts: [(UInt32, [(String, DBusValue)])] = []
        for _ in 0..<rng.below(4) { inserts.append((randomID(), randomRuleFields(local: true))) }
        let removes = (0..<rng.below(3)).map { _ in randomID() }
        let options: [(String, DBusValue)] = rng.pick([
            [], [], [("best-effort", .bool(true))], [("max-failures", .uint32(2))], [("max-failures", .string("x"))],
            [("speed", .uint32(1))],
            [("best-effort", .bool(false)), ("max-failures", .uint32(0))],
        ])
        let (allowed, reachedActivation, after, verdicts) = predictApply(c, inserts, removes, options)
        let (got, reply) = tableCall(
            c, "Apply",
            [
                .array(element: "(ua{sv})", inserts.map { .structure([.uint32($0.0), .vardict($0.1)]) }),
                .array(element: "u", removes.map { .uint32($0) }), .vardict(options),
            ])
        for v in verdicts { noteOpen(v, got) }
        let what =
            "\(c) Apply inserts \(inserts.map { "\($0.0): \($0.1)" }) removes \(removes) options \(options) \(verdicts.map(\.reasons))"
        if got == ContractError.bindFailed && reachedActivation {
            // Some socket could not bind (an absent interface or address, a port taken outside):
            // nothing may have changed.
            note("\(what) -> \(got)")
        } else if expect(what, got, allowed) {
            if got == ContractError.success, let after { model = after }
        } else {
            resync()
        }
        if got == ContractError.success {
            let results = reply.first?.arrayValue ?? []
            if results.count != inserts.count { violation("Apply returned \(results.count) results for \(inserts.count) inserts") }
            for (r, (id, _)) in zip(results, inserts) {
                guard let fields = r.structValue, fields.count == 3, fields[0] == .uint32(id), let rule = model[id]?.rule,
                    let bound = fields[1].uint32Value, let failed = fields[2].uint32Value, Int(bound) + Int(failed) == rule.portCount
                else {
                    violation("Apply result \(r) does not match insert \(id)")
                    continue
                }
            }
        }
    }

    /// Inserts a rule next to an active one, varied in exactly the things the conflict rule
    /// looks at (protocol, ports, address family and wildcards, dual stack, IPv4-mapped text,
    /// interfaces), and activates it: random rules alone rarely meet these cases.
    func stepConflictProbe() {
        let actives = model.keys.sorted().filter { model[$0]!.active && activatable(model[$0]!.rule) }
        guard !actives.isEmpty, let id = (UInt32(0)...20).first(where: { model[$0] == nil }) else { return }
        let a = model[rng.pick(actives)]!.rule
        let c: FuzzClient = lockOwner == .second ? .second : .main
        var fields: [(String, DBusValue)] = [("protocol", .string(rng.oneIn(6) ? (a.proto == "tcp" ? "udp" : "tcp") : a.proto))]
        let address = rng.pick(["", "0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "::ffff:127.0.0.2"])
        if !address.isEmpty || rng.oneIn(2) { fields.append(("address", .string(address))) }
        if rng.oneIn(3) { fields.append(("interface", .string(rng.pick(["lo", "nosuchif0"])))) }
        var first = a.first + UInt16(rng.below(a.portCount))
        if rng.oneIn(5) { first = a.last < ports.upperBound ? a.last + 1 : a.first - 1 }  // just past the range
        if first < ports.lowerBound || first > ports.upperBound { return }
        fields.append(("first-port", .uint16(first)))
        let verdict = judgeRequest(fields, capabilities: capabilities)
        let allowed = predictInsert(c, id, verdict)
        let (got, _) = tableCall(c, "Insert", [.uint32(id), .vardict(fields)])
        guard expect("\(c) probe Insert \(id) \(fields.map { "\($0.0)=\($0.1)" }.joined(separator: ",")) next to \(a)", got, allowed) else {
            resync()
            return
        }
        guard got == ContractError.success else { return }
        applyChange("Insert", id, rule: verdict.rule)
        stepSimpleCall(c, "Activate", id)
        if rng.oneIn(2) {
            stepSimpleCall(c, "Deactivate", id)
            stepSimpleCall(c, "Delete", id)
        }
    }

    /// One Delete, Activate or Deactivate of `id` by `c`, checked against the model.
    func stepSimpleCall(_ c: FuzzClient, _ member: String, _ id: UInt32) {
        let wanted = predictChange(c, member, id)
        let (got, _) = tableCall(c, member, [.uint32(id)])
        expect("\(c) \(member) \(id)", got, wanted)
        if got == ContractError.success && wanted == ContractError.success { applyChange(member, id) }
        if got != wanted { resync() }
    }

    /// Wrong signatures, unknown members, interfaces and objects, properties.
    func stepHostile() {
        let c: FuzzClient = rng.oneIn(3) ? .second : .main
        switch rng.below(8) {
        case 6:
            // No interface in the message: pestod finds the method by name.
            let id = randomID()
            let (got, reply) = call(c, path: PestodFixture.hostPath, interface: nil, "Status", [.uint32(id)])
            expect("Status \(id) without interface", got, model[id] == nil ? ContractError.noSuchRule : ContractError.success)
            if let e = model[id], got == ContractError.success, reply.first != .bool(e.active) {
                violation("Status \(id) = \(reply), model active \(e.active)")
            }
        case 7:
            // Introspection and GetAll of rule objects, present or not.
            let id = randomID()
            let path = PestodFixture.hostPath + "/rules/\(id)"
            let wanted = model[id] == nil ? ContractError.unknownObject : ContractError.success
            if rng.oneIn(2) {
                let (got, reply) = call(c, path: path, interface: "org.freedesktop.DBus.Introspectable", "Introspect", [])
                expect("Introspect \(path)", got, wanted)
                if got == ContractError.success, reply.first?.stringValue?.contains("top.passt.Pesto1.Rule") != true {
                    violation("Introspect \(path) = \(reply)")
                }
            } else {
                let (got, reply) = call(
                    c, path: path, interface: "org.freedesktop.DBus.Properties", "GetAll", [.string("top.passt.Pesto1.Rule")])
                expect("GetAll \(path)", got, wanted)
                if got == ContractError.success, let e = model[id] {
                    let props = Dictionary(reply.first?.vardictValue ?? [], uniquingKeysWith: { a, _ in a })
                    if ruleFromProperties(props) != e.rule { violation("GetAll \(path): \(props), model \(e.rule)") }
                    if props["Active"] != .bool(e.active) || props["Id"] != .uint32(id) { violation("GetAll \(path) = \(props)") }
                }
            }
        case 0:
            let table = [
                "Insert": "ua{sv}", "Delete": "u", "Activate": "u", "Deactivate": "u", "Status": "u", "Read": "u",
                "ReadIndex": "u", "List": "", "Apply": "a(ua{sv})aua{sv}",
            ]
            let member = rng.pick(Array(table.keys).sorted())
            var args = (0..<rng.below(4)).map { _ in randomValue() }
            if args.map(\.signature).joined() == table[member]! { args.append(.byte(1)) }
            let (got, _) = tableCall(c, member, args)
            expect("\(member) with \(args.map(\.signature).joined())", got, ContractError.invalidArgs)
        case 1:
            let member = rng.pick(["Lock", "Unlock", "Commit", "Rollback"])
            let args = (0...rng.below(2)).map { _ in randomValue() }
            let (got, _) = call(c, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, member, args)
            expect("\(member) with \(args.map(\.signature).joined())", got, ContractError.invalidArgs)
        case 2:
            let (got, _) = tableCall(c, rng.pick(["Explode", "insert", "Lock", "Get"]), [.uint32(1)])
            expect("unknown member", got, ContractError.unknownMethod)
        case 3:
            let (got, _) = call(
                c, path: PestodFixture.hostPath, interface: rng.pick(["top.passt.Pesto1.Nope", "top.passt.Pesto1.Manager", "a.b"]),
                "Status", [.uint32(1)])
            expect("unknown interface", got, ContractError.unknownInterface)
        case 4:
            let id = randomID()
            let path =
                rng.oneIn(3)
                ? rng.pick(["/top/passt/Pesto1/tables/nope", "/top/passt/Pesto1/tables/host/rules/0x1", "/nope"])
                : PestodFixture.hostPath + "/rules/\(id)"
            let (got, reply) = call(
                c, path: path, interface: "org.freedesktop.DBus.Properties", "Get", [.string("top.passt.Pesto1.Rule"), .string("Active")])
            let wanted = path.hasSuffix("/rules/\(id)") && model[id] != nil ? ContractError.success : ContractError.unknownObject
            expect("Get \(path) Active", got, wanted)
            if got == ContractError.success, reply.first?.variantValue != .bool(model[id]!.active) {
                violation("Active of \(id) = \(reply)")
            }
        default:
            let (name, value): (String, DBusValue) = rng.pick([
                ("RuleCount", .uint32(UInt32(model.count))), ("ActiveCount", .uint32(UInt32(model.values.filter(\.active).count))),
                ("MaxRules", .uint32(UInt32(Self.maxRules))), ("Nonsense", .uint32(0)),
            ])
            if rng.oneIn(2) {
                let (got, reply) = call(
                    c, path: PestodFixture.hostPath, interface: "org.freedesktop.DBus.Properties", "Get",
                    [.string(PestodFixture.tableInterface), .string(name)])
                expect("Get \(name)", got, name == "Nonsense" ? ContractError.unknownProperty : ContractError.success)
                if got == ContractError.success, reply.first?.variantValue != value { violation("\(name) = \(reply), model \(value)") }
            } else {
                let (got, _) = call(
                    c, path: PestodFixture.hostPath, interface: "org.freedesktop.DBus.Properties", "Set",
                    [.string(PestodFixture.tableInterface), .string(name), .variant(.uint32(0))])
                expect("Set \(name)", got, name == "Nonsense" ? ContractError.unknownProperty : ContractError.propertyReadOnly)
            }
        }
    }

    /// A pesto-test-peer that takes the lock, changes things and is killed with SIGKILL.
    func stepPeer() throws {
        guard lockOwner == nil else { return }
        let peer = try ChildProcess(Products.path("pesto-test-peer"), [f.address])
        guard let ready = peer.readLine(), ready.hasPrefix("ready ") else {
            violation("peer did not start")
            return
        }
        peerName = String(ready.dropFirst("ready ".count))
        calls["peer", default: 0] += 1
        @discardableResult
        func ask(_ line: String, _ allowed: Answers) -> String {
            let answer = peer.ask(line)
            let got = answer.hasPrefix("ok") ? ContractError.success : String(answer.dropFirst("error ".count).prefix { $0 != ":" })
            if got != ContractError.success { errors[got, default: 0] += 1 }
            if !expect("peer \(line)", got, allowed) { resync() }
            return got
        }
        /// Asks for a change the model answers with one name, and applies it on success.
        func change(_ member: String, _ id: UInt32) {
            let wanted = predictChange(.peer, member, id)
            if ask("\(member) \(id)", [wanted]) == ContractError.success && wanted == ContractError.success { applyChange(member, id) }
        }
        ask("Lock", [predictManager(.peer, "Lock")])
        for _ in 0...rng.below(6) {
            let id = UInt32(rng.below(21))
            switch rng.below(6) {
            case 0, 1:
                let port = ports.lowerBound + UInt16(rng.below(Int(ports.upperBound - ports.lowerBound) + 1))
                let address = rng.pick(["127.0.0.1", "::1", "0.0.0.0"])
                // pesto-test-peer sends exactly these three keys.
                let verdict = judgeRequest(
                    [("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(port))],
                    capabilities: capabilities)
                if ask("Insert \(id) \(port) \(address)", predictInsert(.peer, id, verdict)) == ContractError.success {
                    applyChange("Insert", id, rule: verdict.rule)
                }
            case 2:
                if let rule = model[id]?.rule, !activatable(rule) { continue }
                change("Activate", id)
            case 3: change("Deactivate", id)
            case 4: change("Delete", id)
            default:
                if rng.oneIn(3) { ask("Commit", [predictManager(.peer, "Commit")]) }
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
        holder = TestSockets.bound(
            udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue), address: address, port: port, listen: !udp)
        calls["holder", default: 0] += 1
        note("holder \(udp ? "udp" : "tcp") \(address) \(port): \(holder.map { "fd \($0)" } ?? "port busy")")
    }

    // MARK: Invariants

    func tableList() -> [DBusValue] {
        (try? f.client.call(PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "List").first?.arrayValue) ?? [
            DBusValue.string("List failed")
        ]
    }

    func lockOwnerOnBus() -> String {
        (try? f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestodFixture.managerInterface), .string("LockOwner")]
        ).first?.variantValue?.stringValue) ?? "?"
    }

    /// Makes the model what `List` says (after calls whose outcome is not predicted).
    func resync() {
        var fresh: [UInt32: ModelEntry] = [:]
        for item in tableList() {
            guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let rule = readReturnedRule(s[1]),
                let active = s[2].structValue?.first?.boolValue
            else {
                violation("List entry \(item) does not decode")
                continue
            }
            fresh[id] = ModelEntry(rule: rule, active: active)
        }
        model = fresh
    }

    /// The listening sockets' (proto, family is IPv6, port): pestod's TCP sockets in the listening
    /// state and its unconnected UDP sockets, asked of the sockets themselves (`ProcessSockets`).
    func sockets() -> [(proto: String, v6: Bool, port: UInt16)] {
        (ProcessSockets.listening(pid: pid) ?? []).map { ($0.proto, $0.ipv6, $0.port) }
    }

    /// Every descriptor of pestod and what it is, for diagnostics.
    func fdTargets() -> String {
        ProcessDescriptors.list(pid: pid).map { "\($0.number)=\($0.target)" }.joined(separator: " ")
    }

    /// How many descriptors pestod has open.
    func fdCount() -> Int { ProcessDescriptors.count(pid: pid) }

    /// Checks every invariant; a socket mismatch is re-read a few times (bind retries run every second).
    func check() {
        checks += 1
        guard f.pestod.isRunning else {
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
            var boundSum = 0
            let expected = model.keys.sorted().map { "\($0) \(model[$0]!.rule)" }
            let actual = list.map { item -> String in
                guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let rule = readReturnedRule(s[1]) else {
                    return "unreadable \(item)"
                }
                return "\(id) \(rule)"
            }
            if actual != expected { problems.append("List rules differ from the model:\n  pestod \(actual)\n  model  \(expected)") }
            var activeRules: [ModelRule] = []
            var failures: [UInt32: UInt32] = [:]
            var portsWon: [UInt32: UInt32] = [:]
            for item in list {
                guard let s = item.structValue, s.count == 3, let id = s[0].uint32Value, let st = s[2].structValue, st.count == 5,
                    let active = st[0].boolValue, let bound = st[1].uint32Value, let failed = st[2].uint32Value,
                    let won = st[4].uint32Value
                else {
                    problems.append("bad List entry \(item)")
                    continue
                }
                if model[id]?.active != active {
                    problems.append("rule \(id) active \(active), model \(String(describing: model[id]?.active))")
                }
                guard let rule = readReturnedRule(s[1]) else { continue }
                failures[id] = failed
                portsWon[id] = won
                if active {
                    activeRules.append(rule)
                    boundSum += Int(bound)
                    if Int(bound) + Int(failed) != rule.portCount {
                        problems.append("rule \(id): bound \(bound) + failed \(failed) != \(rule.portCount) ports")
                    }
                    if failed == 0 {
                        for port in rule.first...rule.last where !socks.contains(where: { serves($0, rule) && $0.port == port }) {
                            let owners = (try? PestoTestSupport.run("/usr/bin/ss", ["-H", "-tuanp", "sport = :\(port)"]).out) ?? "?"
                            problems.append("active rule \(id) (\(rule)) has no failures but no socket on port \(port); ss: \(owners)")
                        }
                    }
                } else if bound != 0 || failed != 0 || st[3] != .string("") || won != 0 {
                    problems.append("inactive rule \(id) has status \(st)")
                }
            }
            if firstMatch {
                // Shared sockets: no more sockets than bound ports, and every rule's PortsWon as
                // the model predicts it wherever no overlapping rule has a failed port.
                if socks.count > boundSum { problems.append("\(socks.count) listening sockets, active rules report \(boundSum) bound") }
                for (id, won) in portsWon {
                    guard let predicted = predictedPortsWon(id, failures: failures) else { continue }
                    portsWonChecked += 1
                    if predicted != won { problems.append("rule \(id) (\(model[id]!.rule)) wins \(won) ports, model \(predicted)") }
                }
            } else {
                if socks.count != boundSum { problems.append("\(socks.count) listening sockets, active rules report \(boundSum) bound") }
                for (id, won) in portsWon where model[id]?.active == true {
                    // Under refuse every bound port of an active rule is its own.
                    let bound = list.first { $0.structValue?.first == .uint32(id) }?.structValue?[2].structValue?[1]
                    if bound != .uint32(won) { problems.append("rule \(id) wins \(won) ports, bound \(String(describing: bound))") }
                }
            }
            for s in socks where !activeRules.contains(where: { serves(s, $0) && $0.first <= s.port && s.port <= $0.last }) {
                problems.append("socket \(s) belongs to no active rule")
            }
            // The object tree: one Rule object per rule, with its Active bit; the table's counters.
            let objects =
                (try? f.client.call(
                    PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"))
            if case .dictionary(_, _, let entries)? = objects?.first {
                var rulePaths: [String: Bool] = [:]
                for e in entries {
                    guard case .objectPath(let path) = e.key, case .dictionary(_, _, let ifaces) = e.value else { continue }
                    for i in ifaces {
                        let props = Dictionary(i.value.vardictValue ?? [], uniquingKeysWith: { a, _ in a })
                        if i.key == .string("top.passt.Pesto1.Rule") { rulePaths[path] = props["Active"]?.boolValue }
                        if i.key == .string(PestodFixture.tableInterface) && path == PestodFixture.hostPath {
                            let counts = [props["RuleCount"], props["ActiveCount"], props["SocketCount"]]
                            let wanted: [DBusValue?] = [
                                .uint32(UInt32(model.count)), .uint32(UInt32(model.values.filter(\.active).count)),
                                .uint32(UInt32(firstMatch ? socks.count : boundSum)),
                            ]
                            if counts != wanted { problems.append("table counters \(counts), expected \(wanted)") }
                        }
                    }
                }
                var wantedPaths: [String: Bool] = [:]
                for (id, e) in model { wantedPaths[PestodFixture.hostPath + "/rules/\(id)"] = e.active }
                if rulePaths != wantedPaths {
                    problems.append("rule objects \(rulePaths.sorted { $0.key < $1.key }), model \(wantedPaths.sorted { $0.key < $1.key })")
                }
            } else {
                problems.append("GetManagedObjects failed: \(String(describing: objects))")
            }
            // ss agrees with /proc about how many sockets pestod listens on (every 40th check).
            if checks % 40 == 0, let ss = try? PestoTestSupport.run("/usr/bin/ss", ["-H", "-tulnp"]) {
                let mine = ss.out.split(separator: "\n").filter { $0.contains("pid=\(pid),") }.count
                if mine != socks.count { problems.append("ss shows \(mine) listening sockets of pestod, /proc \(socks.count)") }
            }
            let fds = fdCount()
            if fds - socks.count > maxFDs {
                maxFDs = fds - socks.count
                if maxFDs > fdBaseline + 2 { note("fds beyond sockets: \(maxFDs): \(fdTargets())") }
            }
            if fds > fdBaseline + socks.count + 12 {
                problems.append("descriptor leak: \(fds) open, baseline \(fdBaseline) + \(socks.count) sockets")
            }
            if problems.isEmpty { return }
            if attempt < 13 { usleep(150_000) }
        }
        violation(problems.joined(separator: "\n"))
        resync()
    }

    /// Whether socket `s` can serve `rule`: its own kind of socket, or, under first match, an
    /// IPv6 socket serving an IPv4 rule (a dual-stack rule's socket, shared).
    func serves(_ s: (proto: String, v6: Bool, port: UInt16), _ rule: ModelRule) -> Bool {
        Self.matches(rule, s) || (firstMatch && rule.proto == s.proto && s.v6)
    }

    /// How many ports active rule `id` wins under first match, from the rules alone
    /// (doc/overlap.md): a port is won unless, for every address family the rule listens on,
    /// a lower active rule on the same interface covers its address there (no address covers
    /// all, a wildcard its family, an address itself). Nil when an active rule overlapping it
    /// (or the rule itself) has failed ports: which sockets exist then depends on the kernel.
    func predictedPortsWon(_ id: UInt32, failures: [UInt32: UInt32]) -> UInt32? {
        guard let e = model[id] else { return nil }
        guard e.active else { return 0 }
        let r = e.rule
        let overlapping = model.filter { $0.value.active && ($0.key == id || $0.value.rule.conflicts(with: r)) }
        guard overlapping.allSatisfy({ failures[$0.key] == 0 }) else { return nil }
        let families: [Bool] = r.address.map { [$0.v6] } ?? (capabilities.contains("ipv6") ? [false, true] : [false])
        var won: UInt32 = 0
        for port in r.first...r.last {
            let lower = overlapping.filter {
                $0.key < id && $0.value.rule.interface == r.interface && $0.value.rule.first <= port && port <= $0.value.rule.last
            }.map(\.value.rule)
            let covered = families.allSatisfy { v6 in
                lower.contains { l in
                    guard let a = l.address else { return true }
                    return a.isWildcard ? a.v6 == v6 : a == r.address
                }
            }
            if !covered { won += 1 }
        }
        return won
    }

    static func matches(_ rule: ModelRule, _ s: (proto: String, v6: Bool, port: UInt16)) -> Bool {
        guard rule.proto == s.proto else { return false }
        // A dual-stack rule has one IPv6 socket, or an IPv4 one where IPv6 is disabled.
        guard let a = rule.address else { return true }
        return a.v6 == s.v6
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
                expect("List", got, ContractError.success)
            case ..<780: stepApply()
            case ..<830: stepHostile()
            case ..<880: stepConflictProbe()
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
            if model[id]!.active {
                expect("final Deactivate \(id)", tableCall(.main, "Deactivate", [.uint32(id)]).0, predictChange(.main, "Deactivate", id))
                applyChange("Deactivate", id)
            }
            expect("final Delete \(id)", tableCall(.main, "Delete", [.uint32(id)]).0, predictChange(.main, "Delete", id))
            applyChange("Delete", id)
        }
        check()
        let deadline = Date().addingTimeInterval(3)
        while fdCount() != fdBaseline && Date() < deadline { usleep(20_000) }
        if fdCount() != fdBaseline {
            violation("descriptor leak: \(fdCount()) open with an empty table, \(fdBaseline) at the start: \(fdTargets())")
        }
        let seconds = Date().timeIntervalSince(start)
        let callText = calls.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let openText = openCases.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let errorText = errors.sorted { $0.key < $1.key }.map { "\($0.key.split(separator: ".").last!) \($0.value)" }.joined(
            separator: ", ")
        print(
            """
            FuzzTests summary: seed \(seed), \(step) steps, \(checks) invariant checks, \(violations) violations, \
            \(String(format: "%.1f", seconds)) s, \(model.count) rules (\(model.values.filter(\.active).count) active) at the end, \
            fds beyond sockets max \(maxFDs) (baseline \(fdBaseline)), \(boundByActivate) sockets bound by Activate
              calls: \(callText)
              errors: \(errorText)
              overlap policy \(firstMatch ? "first-match" : "refuse"): \(overlapsAllowed) overlapping activations allowed, \(portsWonChecked) PortsWon predictions checked
              conflicts predicted: \(conflictKinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
              cases the documents leave open: \(openText.isEmpty ? "none met" : openText)
            """)
    }
}

// MARK: - The contract model (independent of pestod's code)
//
// Everything below is written from doc/dbus-api.md (the rule description: first ≤ last;
// target-address of the listening address's family, not multicast, not with a dual-stack
// rule; target ports not past 65535). Addresses are read
// with the C library's inet_pton, never with pestod's parser. Where the documents leave an
// answer open (the order of two checks, a case they do not mention), the model accepts every
// answer the documents allow and follows the one pestod gives; such cases are counted and
// printed as "open" in the summary.

/// Error names, spelled as doc/dbus-api.md spells them.
enum ContractError {
    static let prefix = "top.passt.Pesto1.Error."
    static let invalidRule = prefix + "InvalidRule"
    static let noSuchRule = prefix + "NoSuchRule"
    static let ruleExists = prefix + "RuleExists"
    static let ruleActive = prefix + "RuleActive"
    static let ruleInactive = prefix + "RuleInactive"
    static let conflict = prefix + "Conflict"
    static let noSpace = prefix + "NoSpace"
    static let locked = prefix + "Locked"
    static let notLocked = prefix + "NotLocked"
    static let bindFailed = prefix + "BindFailed"
    static let invalidArgs = "org.freedesktop.DBus.Error.InvalidArgs"
    static let unknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"
    static let unknownObject = "org.freedesktop.DBus.Error.UnknownObject"
    static let unknownInterface = "org.freedesktop.DBus.Error.UnknownInterface"
    static let unknownProperty = "org.freedesktop.DBus.Error.UnknownProperty"
    static let propertyReadOnly = "org.freedesktop.DBus.Error.PropertyReadOnly"
    static let success = "success"
}

/// The answers the model allows for one call ("success" or error names).
typealias Answers = Set<String>

/// An address as the contract means it: IPv4 or IPv6 bytes, IPv4-mapped IPv6 text read as IPv4.
struct ModelAddress: Hashable, CustomStringConvertible {
    let v6: Bool
    let bytes: [UInt8]

    /// Parses address text with inet_pton; nil when neither family accepts it.
    static func parse(_ text: String) -> ModelAddress? {
        var a4 = in_addr()
        if inet_pton(AF_INET, text, &a4) == 1 {
            return ModelAddress(v6: false, bytes: withUnsafeBytes(of: &a4) { Array($0) })
        }
        var a6 = in6_addr()
        if inet_pton(AF_INET6, text, &a6) == 1 {
            let b = withUnsafeBytes(of: &a6) { Array($0) }
            if b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xFF && b[11] == 0xFF {
                return ModelAddress(v6: false, bytes: Array(b[12..<16]))
            }
            return ModelAddress(v6: true, bytes: b)
        }
        return nil
    }

    var isWildcard: Bool { bytes.allSatisfy { $0 == 0 } }
    var isMulticast: Bool { v6 ? bytes[0] == 0xFF : bytes[0] & 0xF0 == 0xE0 }
    var description: String {
        v6 ? "v6:" + bytes.map { String($0, radix: 16) }.joined(separator: ".") : bytes.map(String.init).joined(separator: ".")
    }
}

/// A rule as the contract describes it, defaults filled in.
struct ModelRule: Equatable, CustomStringConvertible {
    var proto: String
    /// nil: any address, dual stack.
    var address: ModelAddress?
    var interface: String
    var first: UInt16
    var last: UInt16
    /// nil: the table's default target.
    var target: ModelAddress?
    var targetPort: UInt16
    var scan: Bool
    var owner: String
    /// "", "v1" or "v2".
    var proxyProtocol = ""
    /// "pestod" or "client" ("" in a request means "pestod").
    var source = "pestod"

    var portCount: Int { max(0, Int(last) - Int(first) + 1) }

    /// The doc's conflict rule: same protocol, overlapping ports, interfaces the kernel would
    /// let collide (not two different named ones), matching addresses (dual stack matches
    /// everything; within one family a wildcard matches every address; else equal).
    func conflicts(with o: ModelRule) -> Bool {
        guard proto == o.proto, first <= o.last, o.first <= last else { return false }
        if !interface.isEmpty && !o.interface.isEmpty && interface != o.interface { return false }
        guard let a = address, let b = o.address else { return true }
        return a.v6 == b.v6 && (a.isWildcard || b.isWildcard || a == b)
    }

    /// How two conflicting rules' addresses match, for the summary: a dual-stack rule, a
    /// wildcard of one family, or equal addresses; and whether an interface was named.
    func conflictKind(with o: ModelRule) -> String {
        let how: String
        if address == nil || o.address == nil {
            how = "dual-stack"
        } else if address!.isWildcard || o.address!.isWildcard {
            how = address == o.address ? "equal wildcards" : "wildcard vs specific"
        } else {
            how = "equal addresses"
        }
        return interface.isEmpty && o.interface.isEmpty ? how : how + " (interface)"
    }

    var description: String {
        "\(proto) \(address?.description ?? "any")%\(interface) \(first)-\(last) -> \(target?.description ?? "default"):\(targetPort)\(scan ? " scan" : "")\(proxyProtocol.isEmpty ? "" : " proxy " + proxyProtocol)\(source == "pestod" ? "" : " source " + source) owner \(owner.count)"
    }
}

/// What the contract says about one rule description sent by a client.
struct RequestVerdict {
    enum Validity { case valid, invalid, open }
    /// Errors of the decoding step (InvalidArgs: shape; InvalidRule: missing key, bad protocol, unparsable address).
    var decodeErrors: Answers = []
    var rule: ModelRule?
    /// Whether the rule validator must reject it, must accept it, or the documents do not say.
    var validity = Validity.valid
    var reasons: [String] = []
}

/// The rule description's keys and their D-Bus types (doc/dbus-api.md, "Rule description").
let contractRuleKeys: [String: String] = [
    "protocol": "s", "address": "s", "interface": "s", "first-port": "q", "last-port": "q",
    "target-address": "s", "target-port": "q", "scan": "b", "owner": "s", "proxy-protocol": "s",
    "source": "s",
]

/// Decodes and judges a rule description the way the contract says pestod must.
func judgeRequest(_ fields: [(String, DBusValue)], capabilities: Set<String>) -> RequestVerdict {
    var v = RequestVerdict()
    var present = Set<String>()
    var values: [String: DBusValue] = [:]
    for (key, value) in fields {
        guard let type = contractRuleKeys[key] else {
            v.decodeErrors.insert(ContractError.invalidArgs)
            continue
        }
        if present.contains(key) { v.decodeErrors.insert(ContractError.invalidArgs) }
        present.insert(key)
        if value.signature != type { v.decodeErrors.insert(ContractError.invalidArgs) } else if values[key] == nil { values[key] = value }
    }
    func string(_ k: String) -> String? { values[k]?.stringValue }
    func port(_ k: String) -> UInt16? {
        if case .uint16(let p)? = values[k] { return p }
        return nil
    }
    let proto = string("protocol")
    if !present.contains("protocol") || !present.contains("first-port") { v.decodeErrors.insert(ContractError.invalidRule) }
    if let proto, proto != "tcp" && proto != "udp" { v.decodeErrors.insert(ContractError.invalidRule) }
    if let pp = string("proxy-protocol"), !["", "v1", "v2"].contains(pp) { v.decodeErrors.insert(ContractError.invalidRule) }
    if let source = string("source"), !["", "pestod", "client"].contains(source) { v.decodeErrors.insert(ContractError.invalidRule) }
    var address: ModelAddress? = nil
    if let text = string("address"), !text.isEmpty {
        address = ModelAddress.parse(text)
        if address == nil { v.decodeErrors.insert(ContractError.invalidRule) }
    }
    var target: ModelAddress? = nil
    if let text = string("target-address"), !text.isEmpty {
        target = ModelAddress.parse(text)
        if target == nil { v.decodeErrors.insert(ContractError.invalidRule) }
    }
    guard v.decodeErrors.isEmpty, let proto, let first = port("first-port") else { return v }
    let last = port("last-port") ?? first
    let rule = ModelRule(
        proto: proto, address: address, interface: string("interface") ?? "", first: first, last: last, target: target,
        targetPort: port("target-port") ?? first, scan: values["scan"]?.boolValue ?? false, owner: string("owner") ?? "",
        proxyProtocol: string("proxy-protocol") ?? "", source: (string("source") ?? "").isEmpty ? "pestod" : string("source")!)
    v.rule = rule
    func invalid(_ why: String) {
        v.validity = .invalid
        v.reasons.append(why)
    }
    func open(_ why: String) {
        if v.validity == .valid { v.validity = .open }
        v.reasons.append("open: " + why)
    }
    if first == 0 { invalid("first-port 0") }
    if last < first { invalid("last-port below first-port") }
    if Int(rule.targetPort) + Int(last) - Int(first) > 65535 { invalid("target ports pass 65535") }
    if rule.targetPort == 0 { open("target-port 0") }
    if let address, address.isMulticast { open("multicast listening address") }
    if let target {
        if address == nil { invalid("target-address with a dual-stack rule") }
        if let address, address.v6 != target.v6 { invalid("target-address of another family") }
        if target.isMulticast { invalid("multicast target-address") }
        if target.isWildcard { open("wildcard target-address") }
    }
    let name = Array(rule.interface.utf8)
    if name.count > 15 { invalid("interface longer than 15 bytes") }
    if rule.interface == "." || rule.interface == ".." { invalid("interface . or ..") }
    if name.contains(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 == 0x20 || (0x09...0x0D).contains($0) }) {
        invalid("interface with / : or whitespace")
    }
    if rule.owner.utf8.count > 255 { invalid("owner longer than 255 bytes") }
    if proto == "udp" && !rule.proxyProtocol.isEmpty { invalid("proxy-protocol on a udp rule") }
    // The fuzzed pestod has no --netns: no table can connect from the client's address.
    if rule.source == "client" { invalid("source client without a target namespace") }
    if !capabilities.contains(proto) { invalid("no \(proto) capability") }
    if let address, !capabilities.contains(address.v6 ? "ipv6" : "ipv4") { invalid("no capability for the address family") }
    if !rule.interface.isEmpty && !capabilities.contains("ifname") { invalid("no ifname capability") }
    if rule.scan && !capabilities.contains("scan") { invalid("scan without the scan capability") }
    return v
}

/// Reads a rule description as pestod returns it (Read, ReadIndex, List): every key, with its
/// type; nil (a violation) when something is missing or mistyped.
func readReturnedRule(_ value: DBusValue) -> ModelRule? {
    guard let pairs = value.vardictValue else { return nil }
    let d = Dictionary(pairs, uniquingKeysWith: { a, _ in a })
    guard d.count == pairs.count, Set(d.keys) == Set(contractRuleKeys.keys) else { return nil }
    for (k, t) in contractRuleKeys where d[k]?.signature != t { return nil }
    func port(_ k: String) -> UInt16 {
        if case .uint16(let p)? = d[k] { return p }
        return 0
    }
    func address(_ k: String) -> ModelAddress?? {
        let text = d[k]?.stringValue ?? ""
        if text.isEmpty { return .some(nil) }
        return ModelAddress.parse(text).map { .some($0) }
    }
    guard let a = address("address"), let t = address("target-address") else { return nil }
    return ModelRule(
        proto: d["protocol"]?.stringValue ?? "", address: a, interface: d["interface"]?.stringValue ?? "", first: port("first-port"),
        last: port("last-port"), target: t, targetPort: port("target-port"), scan: d["scan"]?.boolValue ?? false,
        owner: d["owner"]?.stringValue ?? "", proxyProtocol: d["proxy-protocol"]?.stringValue ?? "",
        source: d["source"]?.stringValue ?? "")
}

/// Reads a rule object's properties (top.passt.Pesto1.Rule) into a rule.
func ruleFromProperties(_ p: [String: DBusValue]) -> ModelRule? {
    func port(_ k: String) -> UInt16? {
        if case .uint16(let x)? = p[k] { return x }
        return nil
    }
    func address(_ k: String) -> ModelAddress?? {
        guard let text = p[k]?.stringValue else { return nil }
        if text.isEmpty { return .some(nil) }
        return ModelAddress.parse(text).map { .some($0) }
    }
    guard let proto = p["Protocol"]?.stringValue, let a = address("Address"), let interface = p["Interface"]?.stringValue,
        let first = port("FirstPort"), let last = port("LastPort"), let t = address("TargetAddress"), let tp = port("TargetPort"),
        let scan = p["Scan"]?.boolValue, let owner = p["Owner"]?.stringValue, let proxyProtocol = p["ProxyProtocol"]?.stringValue,
        let source = p["Source"]?.stringValue
    else { return nil }
    return ModelRule(
        proto: proto, address: a, interface: interface, first: first, last: last, target: t, targetPort: tp, scan: scan, owner: owner,
        proxyProtocol: proxyProtocol, source: source)
}
