// SPDX-License-Identifier: GPL-2.0-or-later

// The soak's clients, one thread each, every loop bounded by the stop flag:
//   - D-Bus clients (in process): Insert/Activate/Deactivate/Delete and Apply without the lock;
//   - lock holders: a pesto-test-peer process each, driven line by line, running Lock … Commit
//     or Lock … Rollback transactions, and SIGKILLed now and then (often mid-transaction);
//   - an uploader on the control socket (pesto protocol v2): dump, edit its own rules, upload;
//   - traffic: TCP connections and UDP datagrams through the stable rules to echo servers.

import PestoDBus
import PestoModel
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Where every client talks to, and what they share.
struct Shared: Sendable {
    let busAddress: String
    let controlPath: String
    let peerPath: String
    let control: Control
    let gate: Gate
    let stats: Stats
    /// The TCP and UDP echo servers' port (one number, both protocols).
    let echoPort: UInt16
}

let hostPath = PestoBusNames.tablePath(.host)
let tableInterface = PestoInterfaces.table.name

/// One D-Bus client making changes without the lock on its own IDs and ports.
func dbusClient(_ s: Shared, ledger: Ledger, ports: ClosedRange<UInt16>, seed: UInt64) {
    defer { s.control.finished.add(1, ordering: .releasing) }
    guard let bus = try? DBusConnection(.address(s.busAddress)) else {
        print("pesto-soak: \(ledger.name) cannot connect to the bus")
        return
    }
    var rng = SeededRandom(seed: seed)
    while !s.control.stop.load(ordering: .relaxed) {
        s.control.checkpoint()
        if ledger.uncertain {
            s.control.waitForRestart()
            continue
        }
        var after = ledger.committed
        let id = ledger.ids.lowerBound + UInt32(rng.below(ledger.ids.count))
        let member: String
        var args: [DBusValue] = [.uint32(id)]
        switch rng.below(100) {
        case ..<30:
            member = "Insert"
            let first = ports.lowerBound + UInt16(rng.below(ports.count))
            let rule = RuleState(
                proto: rng.pick(["tcp", "udp"]), address: "127.0.0.1", first: first, last: first, targetPort: s.echoPort, active: false)
            args.append(rule.dbusRule)
            if after[id] == nil { after[id] = rule }
        case ..<55:
            member = "Activate"
            after[id]?.active = true
        case ..<70:
            member = "Deactivate"
            after[id]?.active = false
        case ..<85:
            member = "Delete"
            after[id] = nil
        default:
            member = "Apply"
            var inserts: [DBusValue] = []
            var newIDs: [UInt32] = []
            for _ in 0...rng.below(2) {
                let nid = ledger.ids.lowerBound + UInt32(rng.below(ledger.ids.count))
                guard !newIDs.contains(nid) else { continue }
                newIDs.append(nid)
                let first = ports.lowerBound + UInt16(rng.below(ports.count))
                let rule = RuleState(
                    proto: rng.pick(["tcp", "udp"]), address: "127.0.0.1", first: first, last: first, targetPort: s.echoPort, active: true)
                inserts.append(.structure([.uint32(nid), rule.dbusRule]))
                after[nid] = rule
            }
            var removes: [DBusValue] = []
            if rng.oneIn(2), let victim = ledger.committed.keys.filter({ !newIDs.contains($0) }).randomElement(using: &rng) {
                removes.append(.uint32(victim))
                after[victim] = nil
            }
            args = [.array(element: "(ua{sv})", inserts), .array(element: "u", removes), .vardict([("best-effort", .bool(rng.oneIn(2)))])]
        }
        s.stats.calls.add(1, ordering: .relaxed)
        let outcome: Outcome = s.gate.shared {
            do {
                _ = try bus.call(PestoBusNames.busName, hostPath, tableInterface, member, args)
                return .acknowledged
            } catch let error as DBusErrorReply {
                return Outcome.of(errorName: error.name)
            } catch {
                return .unknown("\(error)")
            }
        }
        switch outcome {
        case .acknowledged:
            s.stats.acknowledged.add(1, ordering: .relaxed)
            ledger.acknowledge(after)
        case .refused(let name):
            s.stats.refusal(name)
            if name.hasSuffix(".Locked") { s.control.pause(10) }  // a lock holder's transaction is short
        case .unknown:
            s.stats.unanswered.add(1, ordering: .relaxed)
            ledger.inFlight(after)
        }
    }
}

/// A pesto-test-peer child: one D-Bus client process, driven line by line.
final class Peer {
    private let child: ChildProcess

    init?(_ s: Shared) {
        guard let child = try? ChildProcess(s.peerPath, [s.busAddress]),
            child.readLine(timeoutMilliseconds: 10_000)?.hasPrefix("ready ") == true
        else { return nil }  // a child that started is SIGKILLed as it goes away
        self.child = child
    }

    /// Sends one line; the outcome of the call it makes.
    func ask(_ line: String) -> Outcome {
        child.send(line)
        guard let answer = child.readLine(timeoutMilliseconds: 30_000) else { return .unknown("no answer from the peer") }
        if answer.hasPrefix("ok") { return .acknowledged }
        return Outcome.of(errorName: String(answer.dropFirst("error ".count).prefix { $0 != ":" }))
    }

    /// SIGKILL and reap.
    func kill() { child.kill() }
}

/// A client process that takes the lock and runs short transactions on its own IDs and ports,
/// ending them with Commit, Rollback, or a SIGKILL.
func lockHolder(_ s: Shared, ledger: Ledger, ports: ClosedRange<UInt16>, seed: UInt64) {
    defer { s.control.finished.add(1, ordering: .releasing) }
    var rng = SeededRandom(seed: seed)
    var peer: Peer? = nil
    while !s.control.stop.load(ordering: .relaxed) {
        s.control.checkpoint()
        if ledger.uncertain {
            s.control.waitForRestart()
            continue
        }
        if peer == nil { peer = Peer(s) }
        guard let p = peer else {
            s.control.pause(100)
            continue
        }
        func ask(_ line: String) -> Outcome {
            s.stats.calls.add(1, ordering: .relaxed)
            let outcome = s.gate.shared { p.ask(line) }
            switch outcome {
            case .acknowledged: break
            case .refused(let name): s.stats.refusal(name)
            case .unknown: s.stats.unanswered.add(1, ordering: .relaxed)
            }
            return outcome
        }
        guard case .acknowledged = ask("Lock") else {
            s.control.pause(20 + rng.below(40))
            continue
        }
        var pending = ledger.committed
        var broken = false
        for _ in 0...rng.below(4) {
            let id = ledger.ids.lowerBound + UInt32(rng.below(ledger.ids.count))
            var after = pending
            let line: String
            switch rng.below(4) {
            case 0:
                let first = ports.lowerBound + UInt16(rng.below(ports.count))
                line = "Insert \(id) \(first) 127.0.0.1"
                if after[id] == nil {
                    after[id] = RuleState(proto: "tcp", address: "127.0.0.1", first: first, last: first, targetPort: first, active: false)
                }
            case 1:
                line = "Activate \(id)"
                after[id]?.active = true
            case 2:
                line = "Deactivate \(id)"
                after[id]?.active = false
            default:
                line = "Delete \(id)"
                after[id] = nil
            }
            switch ask(line) {
            case .acknowledged: pending = after
            case .refused: break
            case .unknown: broken = true
            }
            if broken { break }
        }
        if broken {
            // pestod went away: the lock and the transaction went with it.
            p.kill()
            peer = nil
            continue
        }
        switch rng.below(100) {
        case ..<55:
            switch ask("Commit") {
            case .acknowledged:
                ledger.acknowledge(pending)
                s.stats.acknowledged.add(1, ordering: .relaxed)
                s.stats.transactionsCommitted.add(1, ordering: .relaxed)
                _ = ask("Unlock")
            case .refused: _ = ask("Unlock")
            case .unknown: ledger.inFlight(pending)
            }
        case ..<75:
            if case .acknowledged = ask("Rollback") { s.stats.transactionsRolledBack.add(1, ordering: .relaxed) }
            _ = ask("Unlock")
        default:
            // Killed holding the lock, mid-transaction: pestod must roll it back.
            p.kill()
            peer = nil
            s.stats.lockHoldersKilled.add(1, ordering: .relaxed)
            continue
        }
        if rng.oneIn(8) {
            // Killed between transactions.
            p.kill()
            peer = nil
            s.stats.clientsKilled.add(1, ordering: .relaxed)
        }
        s.control.pause(50 + rng.below(200))  // leave the others (and the uploader) some time without the lock
    }
    peer?.kill()
}

/// An upstream-style client on the control socket: takes the dump, resends every rule as
/// received except its own, adds a few rules on its own ports, and uploads. Never acknowledged
/// (the protocol has no reply), so never in a ledger; the session's end (pestod closing the
/// socket after applying) is what it waits for.
func uploader(_ s: Shared, ports: ClosedRange<UInt16>, seed: UInt64) {
    defer { s.control.finished.add(1, ordering: .releasing) }
    var rng = SeededRandom(seed: seed)
    while !s.control.stop.load(ordering: .relaxed) {
        s.control.checkpoint()
        s.control.pause(200 + rng.below(300))
        if s.control.stop.load(ordering: .relaxed) || s.control.restarting.load(ordering: .relaxed) { continue }
        var mine: [PestoV2Wire.WireRule] = []
        for _ in 0..<rng.below(4) {
            let first = ports.lowerBound + UInt16(rng.below(ports.count))
            let rule = Rule(proto: rng.pick([.tcp, .udp]), address: .loopbackIPv4, firstPort: first, targetPort: s.echoPort)
            if !mine.contains(where: { $0.rule.firstPort == first && $0.rule.proto == rule.proto }) {
                mine.append(.init(rule: rule, bestEffort: rng.oneIn(3)))
            }
        }
        let ok = s.gate.exclusive { uploadSession(s.controlPath, keepingAllBut: ports, adding: mine) }
        if ok { s.stats.uploads.add(1, ordering: .relaxed) } else { s.stats.uploadsFailed.add(1, ordering: .relaxed) }
    }
}

/// One control-socket session; true when pestod took the whole upload and closed the session.
func uploadSession(_ path: String, keepingAllBut ports: ClosedRange<UInt16>, adding mine: [PestoV2Wire.WireRule]) -> Bool {
    guard let client = WireClient(path: path) else { return false }
    defer { close(client.fd) }
    guard let dump = client.readHelloAndDump() else { return false }
    var upload: [UInt8] = []
    for (pif, table) in dump.tables.sorted(by: { $0.key < $1.key }) {
        var rules = table.rules.filter { raw in !ports.contains(UInt16(raw[48]) << 8 | UInt16(raw[49])) }
        if pif == PestoV2Wire.Pif.host.rawValue { rules += mine.map(PestoV2Wire.encode) }
        upload += [pif] + WireClient.be32(UInt32(rules.count)) + rules.joined()
    }
    upload.append(0)
    client.send(upload)
    shutdown(client.fd, Int32(SHUT_WR))
    var byte: UInt8 = 0
    return recv(client.fd, &byte, 1, 0) == 0
}

/// Relays TCP connections and UDP datagrams through the stable rules' ports to the echo servers.
func traffic(_ s: Shared, tcpPorts: [UInt16], udpPorts: [UInt16], seed: UInt64) {
    defer { s.control.finished.add(1, ordering: .releasing) }
    var rng = SeededRandom(seed: seed)
    guard let udp = TestTraffic.udpClient() else { return }
    defer { close(udp) }
    while !s.control.stop.load(ordering: .relaxed) {
        let restartsBefore = s.control.restarts.load(ordering: .relaxed)
        let wasRestarting = s.control.restarting.load(ordering: .relaxed)
        let ok: Bool
        let isTCP = rng.oneIn(2)
        if isTCP {
            ok = TestTraffic.ping(port: rng.pick(tcpPorts)) == nil
        } else {
            // A reply that came after an earlier exchange gave up must not pass for this one's.
            var stale = [UInt8](repeating: 0, count: 2048)
            while recv(udp, &stale, stale.count, Int32(MSG_DONTWAIT)) >= 0 {}
            let payload = (0..<16).map { _ in UInt8(rng.below(256)) }
            ok = TestTraffic.udpExchange(fd: udp, port: rng.pick(udpPorts), payload: payload)?.reply == payload
        }
        let inRestart =
            wasRestarting || s.control.restarting.load(ordering: .relaxed) || s.control.restarts.load(ordering: .relaxed) != restartsBefore
        switch (isTCP, ok) {
        case (true, true): s.stats.connections.add(1, ordering: .relaxed)
        case (false, true): s.stats.datagrams.add(1, ordering: .relaxed)
        case (true, false) where inRestart: s.stats.connectionsFailedInRestart.add(1, ordering: .relaxed)
        case (true, false): s.stats.connectionsFailed.add(1, ordering: .relaxed)
        case (false, false) where inRestart: s.stats.datagramsFailedInRestart.add(1, ordering: .relaxed)
        case (false, false): s.stats.datagramsFailed.add(1, ordering: .relaxed)
        }
        if !ok { s.control.pause(50) }
    }
}
