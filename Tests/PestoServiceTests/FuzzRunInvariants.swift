// SPDX-License-Identifier: GPL-2.0-or-later

// The fuzz run's invariants, checked as it goes: pestod alive, `List` equal to the model,
// listening sockets matching the active rules exactly (and each rule's PortsWon as predicted
// under first-match), the lock owner the model expects, no descriptor leaked.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

extension FuzzRun {
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
}
