// SPDX-License-Identifier: GPL-2.0-or-later

// The fuzz run's steps: each makes one kind of call (insert, change, read, manager, Apply,
// conflict probe, hostile message, a peer killed while holding the lock, a port held by the
// test), checks the answer against the model's prediction and updates the model.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

extension FuzzRun {
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
}
