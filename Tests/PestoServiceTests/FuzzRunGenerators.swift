// SPDX-License-Identifier: GPL-2.0-or-later

// The fuzz run's generators (IDs, rule descriptions, random D-Bus values) and the model's
// predictions of each call's answer, from doc/dbus-api.md (FuzzTests.swift has the run).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

extension FuzzRun {
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
}
