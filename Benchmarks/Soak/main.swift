// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-soak: a long-running soak of a release pestod, checking that no acknowledged change is
// ever lost. Not a test and not a speed benchmark: it runs for a set time and reports counts.
//
// Theory of operation
// -------------------
// A private dbus-daemon and a release pestod with `--state FILE` and `--control PATH` (World).
// For `--seconds`, concurrently:
//   - D-Bus clients (threads, in process) change rules without the lock: Insert, Activate,
//     Deactivate, Delete, Apply;
//   - lock holders (pesto-test-peer processes) run Lock … Commit and Lock … Rollback
//     transactions and are SIGKILLed now and then, often holding the lock mid-transaction;
//   - an uploader speaks pesto protocol v2 on the control socket (dump, edit, upload);
//   - traffic threads relay TCP connections and UDP datagrams through stable rules to local
//     echo servers;
//   - the main thread SIGKILLs pestod every `--kill-every` seconds (±30 %) and starts it again
//     with the same state file; with `--memory` (or `--kill-every 0`) it never does, and samples
//     pestod's RSS instead (Memory.swift): a soak for memory growth under the same steady load.
// Every client owns its rule IDs and ports (so the order between clients does not matter) and
// keeps a ledger of its acknowledged changes (Ledger.swift). At each restart the clients park
// (Control.checkpoint), pestod is killed while calls are in flight, started again, and the rules
// it restored are compared with every ledger: an acknowledged change missing from them is
// lost. Replies that refuse a change (any top.passt.Pesto1.Error — SaveFailed included —,
// InvalidArgs, LimitsExceeded) are not acknowledgements. Uploads are never acknowledged (the
// protocol has no reply) and touch only the uploader's ports, but they resend the active rules
// they were dumped, so uploads and D-Bus changes take turns (Gate). The upload's rules get
// fresh IDs above a sentinel rule's; any restored rule no ledger or upload explains is reported.
//
// Ports: only below 32768 (TestSockets.freePorts), loopback only. Every loop ends with the stop
// flag; every wait is bounded. Children are SIGKILLed at the end.

import PestoDBus
import PestoModel
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Command-line settings.
struct Settings {
    var seconds = 120.0
    var killEvery = 10.0
    var seed: UInt64 = 1
    var clients = 3
    var lockHolders = 2
    var keep = false
    /// Sample pestod's RSS every this many seconds (0: not at all); `--memory` sets 1.
    var sampleEvery = 0.0
    /// Samples before this many seconds are not judged (default: a fifth of the run, 5 to 60 s).
    var warmUp: Double? = nil

    static let usage = """
        usage: pesto-soak [--seconds N] [--kill-every S] [--memory] [--sample-every S] [--warm-up S]
                          [--clients N] [--lock-holders N] [--seed N] [--keep]
          --seconds N       how long to run (default 120)
          --kill-every S    SIGKILL pestod about every S seconds (default 10; 0: never)
          --memory          never kill pestod; sample its RSS each second and report its growth
                            (the same as --kill-every 0 --sample-every 1)
          --sample-every S  sample pestod's RSS every S seconds (default 0: not at all)
          --warm-up S       RSS samples before S seconds are not judged (default: a fifth
                            of --seconds, at least 5 and at most 60)
          --clients N       D-Bus clients changing rules without the lock (default 3)
          --lock-holders N  pesto-test-peer processes running transactions (default 2)
          --seed N          the random sequence (default 1)
          --keep            keep the temp dir (pestod's log, state file)
        """

    init(_ args: [String]) throws {
        var i = 0
        func value() throws -> String {
            i += 1
            guard i < args.count else { throw SoakError("\(args[i - 1]) needs a value\n\(Self.usage)") }
            return args[i]
        }
        while i < args.count {
            switch args[i] {
            case "--seconds": seconds = Double(try value()) ?? -1
            case "--kill-every": killEvery = Double(try value()) ?? -1
            case "--memory":
                killEvery = 0
                if sampleEvery == 0 { sampleEvery = 1 }
            case "--sample-every": sampleEvery = Double(try value()) ?? -1
            case "--warm-up": warmUp = Double(try value()) ?? -1
            case "--clients": clients = Int(try value()) ?? -1
            case "--lock-holders": lockHolders = Int(try value()) ?? -1
            case "--seed": seed = UInt64(try value()) ?? 0
            case "--keep": keep = true
            case "-h", "--help":
                print(Self.usage)
                exit(0)
            default: throw SoakError("unknown argument \(args[i])\n\(Self.usage)")
            }
            i += 1
        }
        guard seconds > 0, killEvery == 0 || killEvery >= 1, sampleEvery == 0 || sampleEvery >= 0.1, (warmUp ?? 0) >= 0,
            (1...16).contains(clients), (0...8).contains(lockHolders), seed != 0
        else {
            throw SoakError("a value is out of range\n\(Self.usage)")
        }
    }
}

/// Reads pestod's whole table.
func listRules(_ bus: DBusConnection) -> [(UInt32, RuleState)]? {
    guard let list = try? bus.call(PestoBusNames.busName, hostPath, tableInterface, "List").first?.arrayValue else { return nil }
    return list.compactMap(RuleState.fromList)
}

/// Inserts and activates the stable rules traffic goes through, and the sentinel; all acknowledged.
func setUp(
    _ bus: DBusConnection, setup: Ledger, sentinel: Ledger, tcpPorts: [UInt16], udpPorts: [UInt16], echoPort: UInt16, sentinelPort: UInt16
) throws {
    var state: [UInt32: RuleState] = [:]
    for (k, (proto, port)) in (tcpPorts.map { ("tcp", $0) } + udpPorts.map { ("udp", $0) }).enumerated() {
        let id = setup.ids.lowerBound + UInt32(k)
        let rule = RuleState(proto: proto, address: "127.0.0.1", first: port, last: port, targetPort: echoPort, active: true)
        do {
            _ = try bus.call(PestoBusNames.busName, hostPath, tableInterface, "Insert", [.uint32(id), rule.dbusRule])
            _ = try bus.call(PestoBusNames.busName, hostPath, tableInterface, "Activate", [.uint32(id)])
        } catch {
            throw SoakError("setting up rule \(id): \(error)")
        }
        state[id] = rule
    }
    setup.acknowledge(state)
    let s = RuleState(proto: "tcp", address: "127.0.0.1", first: sentinelPort, last: sentinelPort, targetPort: echoPort, active: false)
    do {
        _ = try bus.call(PestoBusNames.busName, hostPath, tableInterface, "Insert", [.uint32(sentinel.ids.lowerBound), s.dbusRule])
    } catch {
        throw SoakError("setting up the sentinel: \(error)")
    }
    sentinel.acknowledge([sentinel.ids.lowerBound: s])
}

func main() throws {
    let settings = try Settings(Array(CommandLine.arguments.dropFirst()))
    signal(SIGPIPE, SIG_IGN)

    let ports = TestSockets.freePorts(48)
    func run(_ offset: Int, _ count: Int) -> ClosedRange<UInt16> {
        ports.lowerBound + UInt16(offset)...ports.lowerBound + UInt16(offset + count - 1)
    }
    let echoPort = ports.lowerBound
    let stablePorts = Array(run(1, 3))
    let sentinelPort = ports.lowerBound + 4
    let uploadPorts = run(5, 7)
    guard let echo = EchoServer(port: echoPort), let udpEcho = UDPEchoServer(port: echoPort) else {
        throw SoakError("cannot start the echo servers on port \(echoPort)")
    }
    defer {
        echo.stop()
        udpEcho.stop()
    }

    let world = try World(productDirectory: executableDirectory(), pestodArguments: ["--max-rules", "1024", "--log-level", "warning"])
    defer { world.stop(keep: settings.keep) }
    try world.startPestod()
    let checker = try DBusConnection(.address(world.busAddress))

    let setup = Ledger(name: "setup", ids: 1...99)
    let sentinel = Ledger(name: "sentinel", ids: 4_000_000_000...4_000_000_000)
    try setUp(
        checker, setup: setup, sentinel: sentinel, tcpPorts: stablePorts, udpPorts: stablePorts, echoPort: echoPort,
        sentinelPort: sentinelPort)

    let control = Control()
    let stats = Stats()
    let shared = Shared(
        busAddress: world.busAddress, controlPath: world.controlPath, peerPath: world.peerPath, control: control,
        gate: Gate(), stats: stats, echoPort: echoPort)
    var ledgers = [setup, sentinel]
    var mutators = 0
    var threads = 0
    var portOffset = 12
    for k in 0..<settings.clients {
        let ledger = Ledger(name: "client \(k)", ids: UInt32(1000 + 100 * k)...UInt32(1000 + 100 * k + 11))
        let own = run(portOffset, 6)
        portOffset += 6
        ledgers.append(ledger)
        let seed = settings.seed &* 7919 &+ UInt64(k)
        detachThread { dbusClient(shared, ledger: ledger, ports: own, seed: seed) }
        mutators += 1
    }
    for k in 0..<settings.lockHolders {
        let ledger = Ledger(name: "lock holder \(k)", ids: UInt32(3000 + 100 * k)...UInt32(3000 + 100 * k + 7))
        let own = run(portOffset, 4)
        portOffset += 4
        ledgers.append(ledger)
        let seed = settings.seed &* 104_729 &+ UInt64(k)
        detachThread { lockHolder(shared, ledger: ledger, ports: own, seed: seed) }
        mutators += 1
    }
    guard portOffset <= ports.count else { throw SoakError("too many clients for the ports reserved") }
    let uploadSeed = settings.seed &+ 31
    detachThread { uploader(shared, ports: uploadPorts, seed: uploadSeed) }
    mutators += 1
    for k in 0..<2 {
        let seed = settings.seed &* 13 &+ UInt64(k)
        detachThread { traffic(shared, tcpPorts: stablePorts, udpPorts: stablePorts, seed: seed) }
    }
    threads = mutators + 2

    var lost: [String] = []
    var unexplained: [String] = []
    var crashes = 0
    var rng = SeededRandom(seed: settings.seed)

    /// Kills pestod with calls in flight, waits for the clients to park, starts it again and
    /// compares what it restored with every ledger.
    func restartAndCheck(clientsRunning: Bool) throws {
        control.restarting.store(true, ordering: .releasing)
        world.killPestod()
        if clientsRunning {
            let deadline = monotonicSeconds() + 60
            while control.parked.load(ordering: .acquiring) < mutators && monotonicSeconds() < deadline { usleep(2000) }
            if control.parked.load(ordering: .acquiring) < mutators { throw SoakError("clients did not stop within 60 s") }
        }
        try world.startPestod()
        control.restarts.add(1, ordering: .relaxed)
        guard let restored = listRules(checker) else { throw SoakError("List failed after a restart") }
        for ledger in ledgers {
            lost += ledger.check(restored: Dictionary(restored.filter { ledger.ids.contains($0.0) }, uniquingKeysWith: { a, _ in a }))
        }
        for (id, rule) in restored where !ledgers.contains(where: { $0.ids.contains(id) }) {
            if !(id > sentinel.ids.lowerBound && uploadPorts.contains(rule.first)) { unexplained.append("rule \(id): \(rule)") }
        }
        control.restarting.store(false, ordering: .releasing)
    }

    let start = monotonicSeconds()
    let end = start + settings.seconds
    let kills = settings.killEvery > 0
    print(
        "pesto-soak: \(Int(settings.seconds)) s, seed \(settings.seed), \(settings.clients) D-Bus clients, \(settings.lockHolders) lock holders, "
            + "1 uploader, 2 traffic threads, "
            + (kills ? "pestod killed about every \(Int(settings.killEvery)) s" : "pestod never killed")
            + (settings.sampleEvery > 0 ? ", its RSS sampled every \(fixed(settings.sampleEvery, 1)) s" : "") + "; ports \(ports)")
    func nextKill() -> Double {
        kills ? monotonicSeconds() + (settings.killEvery * (0.7 + 0.6 * Double(rng.below(1000)) / 1000)) : .infinity
    }
    var killAt = nextKill()
    var rss = RSSSamples(warmUp: settings.warmUp ?? min(60, max(5, settings.seconds / 5)))
    var sampleAt = settings.sampleEvery > 0 ? start : .infinity
    while monotonicSeconds() < end {
        usleep(100_000)
        if monotonicSeconds() >= sampleAt, let pid = world.pestodPID, let kib = procStatusKiB(pid, "VmRSS") {
            rss.samples.append((monotonicSeconds() - start, kib))
            sampleAt += settings.sampleEvery
            if sampleAt < monotonicSeconds() { sampleAt = monotonicSeconds() + settings.sampleEvery }  // fell behind: no burst
        }
        if !world.pestodRunning {
            crashes += 1
            print("pesto-soak: pestod exited by itself; see \(world.logPath)")
            try restartAndCheck(clientsRunning: true)
        }
        if monotonicSeconds() >= killAt && monotonicSeconds() + 1 < end {
            try restartAndCheck(clientsRunning: true)
            killAt = nextKill()
        }
    }
    // pestod's memory is judged under load, before the clients stop and the last restart.
    let peakKiB = world.pestodPID.flatMap { procStatusKiB($0, "VmHWM") }
    let restartsUnderLoad = control.restarts.load(ordering: .relaxed)
    // Stop the clients, then one last kill and check: everything acknowledged must be there.
    control.stop.store(true, ordering: .releasing)
    let deadline = monotonicSeconds() + 60
    while control.finished.load(ordering: .acquiring) < threads && monotonicSeconds() < deadline { usleep(10_000) }
    try restartAndCheck(clientsRunning: false)
    let seconds = monotonicSeconds() - start
    // The protocol has no reply: pestod's log says which uploads it refused (a conflict, or the lock held past --control-timeout).
    let uploadsRefused = (readTextFile(world.logPath) ?? "").split(separator: "\n").filter { $0.contains("update refused") }.count

    let refusals = stats.refusals.withLock { $0 }.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
    func n(_ a: borrowing Atomic<Int>) -> Int { a.load(ordering: .relaxed) }
    print(
        """
        pesto-soak: ran \(fixed(seconds, 0)) s
          calls made (D-Bus, in process and by peer processes): \(n(stats.calls))
          changes acknowledged: \(n(stats.acknowledged)) (transactions committed \(n(stats.transactionsCommitted)), rolled back \(n(stats.transactionsRolledBack)))
          changes refused: \(n(stats.refused)) (\(refusals.isEmpty ? "none" : refusals))
          calls without a reply (pestod killed): \(n(stats.unanswered))
          uploads on the control socket: \(n(stats.uploads)) sessions completed (\(uploadsRefused) refused by pestod), \(n(stats.uploadsFailed)) failed
          TCP connections relayed: \(n(stats.connections)), failed: \(n(stats.connectionsFailed)) (+ \(n(stats.connectionsFailedInRestart)) across a pestod restart)
          UDP datagrams relayed: \(n(stats.datagrams)), failed: \(n(stats.datagramsFailed)) (+ \(n(stats.datagramsFailedInRestart)) across a pestod restart)
          pestod restarts: \(n(control.restarts)) (SIGKILL, same --state), exits by itself: \(crashes)
          lock holders killed: \(n(stats.lockHoldersKilled)), other clients killed: \(n(stats.clientsKilled))
          restored rules nothing explains: \(unexplained.count)
          lost acknowledged changes: \(lost.count)
        """)
    for line in (lost + unexplained).prefix(20) { print("    " + line) }
    if settings.sampleEvery > 0 {
        for line in rss.report(peakKiB: peakKiB) { print(line) }
        if restartsUnderLoad > 0 || crashes > 0 { print("  (pestod was restarted during the run: the samples span several processes)") }
    }
    summarize(
        rss: settings.sampleEvery > 0 ? rss : nil, seconds: seconds, lost: lost.count + unexplained.count,
        connectionsFailed: n(stats.connectionsFailed), connections: n(stats.connections), killed: kills)
    if !lost.isEmpty || !unexplained.isEmpty {
        print("pesto-soak: pestod's log and state file are in \(world.directory)")
        world.stop(keep: true)
        exit(1)
    }
}

do {
    try main()
} catch {
    print("pesto-soak: \(error)")
    exit(2)
}
