// SPDX-License-Identifier: GPL-2.0-or-later

// pestod: the pesto forwarding service. Publishes the forwarding tables on D-Bus
// (doc/dbus-api.md) and runs the forwarding engine on one event loop thread.

import ArgumentParser
import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoService
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif
#if canImport(Glibc)
    import Glibc
#endif

/// The command line of pestod.
struct Pestod: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pestod",
        abstract: "Keep a live port-forwarding table and change it without disturbing peers.",
        discussion: """
            pestod owns the bus name top.passt.Pesto1 and publishes its forwarding tables at /top/passt/Pesto1 \
            (see doc/dbus-api.md). Rules are inserted inactive, activated (bind + listen) and deactivated \
            (close) one at a time, so changing one rule never touches the sockets of another. Failed binds \
            are retried every second.

            pestod stops cleanly on SIGTERM, SIGINT or SIGHUP, closing every listening socket. It reports \
            readiness with sd_notify READY=1 when $NOTIFY_SOCKET is set, and logs to stderr.

            Descriptors: at start pestod raises its soft RLIMIT_NOFILE to the hard limit (L). It keeps 64 \
            for itself (D-Bus, the control socket, the state file); listeners and relays share E = L - 64, \
            and new TCP connections (2 descriptors each, plus 2 per pipe) and UDP flows (1 each) stop at \
            R = E - min(E/8, 1024), so rules can still be activated while relays hold all theirs. A \
            connection beyond R is reset, a datagram from a new UDP client beyond R dropped (logged once), \
            a listener beyond E a bind failure (EMFILE). The defaults give each protocol half of R: \
            --max-connections R/4, --max-udp-flows R/2.
            """,
        version: PestoBusNames.version)

    @Flag(name: .long, help: "Connect to the system bus (the default).")
    var system = false

    @Flag(name: .long, help: "Connect to the session bus of the calling user.")
    var session = false

    @Option(
        name: .long, help: ArgumentHelp("Connect to the bus at this D-Bus address (e.g. unix:path=/run/pesto/bus).", valueName: "address"))
    var address: String?

    @Option(name: .long, help: ArgumentHelp("Retry failed binds every this many milliseconds.", valueName: "ms"))
    var retryInterval = 1000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Target network namespace (/run/netns/NAME or /proc/PID/ns/net): the HOST table connects inside it, and a SPLICE table listens inside it and connects out here.",
            valueName: "path"))
    var netns: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Also serve upstream's pesto clients (podman, rootlesskit) on this UNIX socket, speaking pesto protocol version 2 (like pasta -c PATH); uploads are applied as a difference.",
            valueName: "path"))
    var control: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Give a control socket client this long to finish its upload, and a complete upload this long to wait while a D-Bus client holds the lock; then it is refused with a warning.",
            valueName: "ms"))
    var controlTimeout = 5000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep the committed tables in this file: saved atomically before a commit is acknowledged (a commit that cannot be saved is undone and fails with SaveFailed), restored at start; saved rules that cannot be restored stay in the file, and a file that cannot be used is moved aside and pestod starts empty. Default with --session: $XDG_STATE_HOME/pesto/state (~/.local/state/pesto/state), so a bus-activated pestod keeps its rules; otherwise none (the system unit gives /var/lib/pesto/state).",
            valueName: "file"))
    var state: String?

    @Flag(name: .long, help: "Keep no state file, not even the --session default.")
    var noState = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "What to do with rules that overlap active ones (same protocol, a shared port, matching addresses): refuse (activating one fails with Conflict) or first-match (they may be active together; a new connection or flow goes to the active rule with the lowest ID that matches it, and rules share listening sockets, so carving ports out of a range and changing the carve-outs never closes the range's sockets). Shown as each table's OverlapPolicy property; see doc/overlap.md.",
            valueName: "refuse|first-match"))
    var overlap: OverlapPolicy = .refuse

    /// The state file: --state, else with --session $XDG_STATE_HOME/pesto/state, else none.
    /// A missing directory of an absolute path is made (mode 0700), so an activated pestod
    /// (dbus/session/, dbus/top.passt.Pesto1.service) can save on a fresh system. Relative
    /// XDG_STATE_HOME values are ignored, as the XDG base directory specification says.
    func stateFile() -> String? {
        if noState { return nil }
        var file: String
        if let state {
            file = state
        } else if session {
            if let xdg = getenv("XDG_STATE_HOME").map({ String(cString: $0) }), xdg.hasPrefix("/") {
                file = xdg + "/pesto/state"
            } else if let home = getenv("HOME").map({ String(cString: $0) }), home.hasPrefix("/") {
                file = home + "/.local/state/pesto/state"
            } else {
                return nil
            }
        } else {
            return nil
        }
        if file.hasPrefix("/") {
            var path = ""
            for part in file.split(separator: "/").dropLast() {
                path += "/" + part
                _ = mkdir(path, 0o700)  // EEXIST is fine; a real failure shows when the state is saved
            }
        }
        return file
    }

    @Option(name: .long, help: "Most TCP connections relayed at once (default: R/4, see above).")
    var maxConnections: Int?

    @Option(name: .long, help: "Most UDP flows (client address and port pairs) relayed at once (default: R/2, see above).")
    var maxUdpFlows: Int?

    @Option(name: .long, help: ArgumentHelp("Close a UDP flow after this many seconds without a datagram.", valueName: "seconds"))
    var udpIdleTimeout = UDPRelayLimits().idleTimeoutMilliseconds / 1000

    @Option(name: .long, help: "Most rules per table.")
    var maxRules = TableLimits.default.maxRules

    @Option(name: .long, help: "Most listening sockets the rules of one table may need together.")
    var maxSockets = TableLimits.default.maxSockets

    @Option(name: .long, help: ArgumentHelp("Log level: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    var logLevel = "info"

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Who may change the tables: polkit (action top.passt.Pesto1.modify, only uid 0 when polkit does not answer; the default on the system bus and with --address), root (only uid 0), or none (everyone who can reach the bus; the default only on the session bus, and a warning elsewhere).",
            valueName: "mode"))
    var authorize: String?

    @Flag(
        name: .long,
        help: ArgumentHelp(
            "Take over from the pestod running with the same runtime directory: receive its tables, listening sockets, relayed TCP connections, UDP flows and control socket over the takeover socket, take the bus name, and let it exit; nothing is closed and reopened (see doc/takeover.md). Fails, leaving the running one in charge, if it cannot complete."
        ))
    var replace = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Directory of the root-only takeover socket (takeover.sock) a later pestod --replace connects to (default: $RUNTIME_DIRECTORY, which systemd sets from RuntimeDirectory=; without either, no takeover socket).",
            valueName: "dir"))
    var runtimeDir: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "How long a takeover may take, waiting for a D-Bus client's lock included, before it is given up and the running pestod stays in charge.",
            valueName: "ms"))
    var takeoverTimeout = 10_000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Ask the pestod running as process PID to upgrade itself (what the unit's ExecReload= runs): send it SIGUSR2, on which it starts the installed pestod with its own arguments plus --replace, and wait for it to exit once the new one has taken over (at most --takeover-timeout plus 5 s). Exits 0 when it did, 1 when it is still running (the upgrade failed; it stays in charge).",
            valueName: "pid"))
    var reloadRequest: Int32?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The most operations (and signals) one event loop turn spends on a large Apply or upload, which is carried out over several turns (default 4096, and at most 4 ms a turn); for tests.",
            valueName: "n", visibility: .hidden))
    var sliceOperations: Int?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Each user's budget of work before authorisation, in argument bytes: how much at once and how much it regains per second (default 16777216:2097152); for tests.",
            valueName: "bytes:per-second", visibility: .hidden))
    var callerBudget: String?

    /// `--caller-budget` as numbers, nil when not given.
    var callerBudgetNumbers: (capacity: Int, refillPerSecond: Int)? {
        guard let parts = callerBudget?.split(separator: ":", omittingEmptySubsequences: false), parts.count == 2,
            let capacity = Int(parts[0]), let rate = Int(parts[1]), capacity >= 1, rate >= 0
        else { return nil }
        return (capacity, rate)
    }

    @Flag(name: .long, help: "Print the D-Bus interface XML of the contract (dbus/top.passt.Pesto1.xml) and exit.")
    var printIntrospection = false

    func validate() throws {
        if [system, session, address != nil].filter({ $0 }).count > 1 {
            throw ValidationError("Give at most one of --system, --session and --address.")
        }
        if retryInterval < 10 || retryInterval > 3_600_000 {
            throw ValidationError("--retry-interval must be between 10 and 3600000 milliseconds.")
        }
        if let maxConnections, maxConnections < 1 || maxConnections > 1 << 24 {
            throw ValidationError("--max-connections must be between 1 and \(1 << 24).")
        }
        if let maxUdpFlows, maxUdpFlows < 1 || maxUdpFlows > 1 << 24 {
            throw ValidationError("--max-udp-flows must be between 1 and \(1 << 24).")
        }
        if udpIdleTimeout < 1 || udpIdleTimeout > 86_400 {
            throw ValidationError("--udp-idle-timeout must be between 1 and 86400 seconds.")
        }
        if callerBudget != nil && callerBudgetNumbers == nil {
            throw ValidationError("--caller-budget must be BYTES:PER_SECOND (BYTES at least 1).")
        }
        if let sliceOperations, sliceOperations < 1 || sliceOperations > 1 << 24 {
            throw ValidationError("--slice-operations must be between 1 and \(1 << 24).")
        }
        if controlTimeout < 10 || controlTimeout > 600_000 {
            throw ValidationError("--control-timeout must be between 10 and 600000 milliseconds.")
        }
        if maxRules < 1 || maxRules > Int(UInt32.max) { throw ValidationError("--max-rules must be between 1 and \(UInt32.max).") }
        if maxSockets < 1 || maxSockets > Int(UInt32.max) { throw ValidationError("--max-sockets must be between 1 and \(UInt32.max).") }
        if let reloadRequest, reloadRequest < 2 { throw ValidationError("--reload-request needs the PID of a running pestod.") }
        if takeoverTimeout < 10 || takeoverTimeout > 600_000 {
            throw ValidationError("--takeover-timeout must be between 10 and 600000 milliseconds.")
        }
        if replace && takeoverDirectory == nil {
            throw ValidationError("--replace needs the running pestod's runtime directory: --runtime-dir or $RUNTIME_DIRECTORY.")
        }
        if Logger.Level(rawValue: logLevel) == nil { throw ValidationError("Unknown --log-level \(logLevel).") }
        if noState && state != nil { throw ValidationError("Give --state or --no-state, not both.") }
        if let authorize, AuthorizationMode(rawValue: authorize) == nil {
            throw ValidationError("--authorize must be one of: \(AuthorizationMode.allCases.map(\.rawValue).joined(separator: ", ")).")
        }
    }

    /// Where the takeover socket lives: --runtime-dir, else the first of systemd's
    /// $RUNTIME_DIRECTORY (a colon-separated list), else none.
    var takeoverDirectory: String? {
        if let runtimeDir { return runtimeDir }
        guard let env = getenv("RUNTIME_DIRECTORY") else { return nil }
        return String(cString: env).split(separator: ":").first.map(String.init)
    }

    /// Restores the tables from `file`; returns the saved rules that could not be restored,
    /// which every save writes back (so they are never lost, see StateFile.swift).
    func restoreState(from file: StateFile, into engine: ForwardingEngine, logger: Logger) -> [StateFile.Entry] {
        let state = file.path
        switch file.load() {
        case .missing:
            logger.info("no state file at \(state) yet: starting with empty tables")
            return []
        case .loaded(let entries):
            let result = StateFile.restore(entries, into: engine)
            for (entry, reason) in result.carried {
                logger.warning("state file \(state): \(entry.table.name) rule \(entry.id) not restored, kept in the file: \(reason)")
            }
            logger.info("restored \(result.restored) of \(ClientText.counted(entries.count, "rule")) from \(state)")
            if !result.carried.isEmpty {
                logger.warning(
                    "state file \(state): \(ClientText.counted(result.carried.count, "rule")) could not be restored; they stay in the file and are tried again at the next start"
                )
            }
            return result.carried.map(\.entry)
        case .invalid(let reason, let movedTo):
            logger.critical(
                "state file \(state) is unusable (\(reason)); starting with empty tables; the file was \(movedTo.map { "moved to \($0)" } ?? "left in place (it could not be moved aside, and the first save replaces it)")"
            )
            return []
        }
    }

    func run() throws {
        if printIntrospection {
            print(PestoInterfaces.contractXML, terminator: "")
            return
        }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StderrLogHandler(label: label)  // StreamLogHandler's format, cheaper per line
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "pestod")
        if let reloadRequest {
            do throws(PestoError) {
                try ReloadRequest.run(pid: reloadRequest, timeoutMilliseconds: takeoverTimeout + 5000)
                logger.notice("pestod \(reloadRequest) has handed over to its successor")
                return
            } catch {
                logger.critical("\(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
                throw ExitCode(1)
            }
        }
        // The installed binary, read now: an upgrade replaces the file, and SIGUSR2 starts
        // whatever is at this path then (UpgradeRequest.swift).
        let executable = try? Sys.executablePath().get()
        let bus: BusAddress = address.map { .address($0) } ?? (session ? .session : .system)
        let state = stateFile()

        switch DescriptorPlan.raiseOpenFileLimit() {
        case .success(let (before, after)) where before != after:
            logger.info("raised the open-file limit (RLIMIT_NOFILE) from \(before) to the hard limit, \(after)")
        case .success(let (_, after)):
            logger.info("open-file limit (RLIMIT_NOFILE): \(after), already the hard limit")
        case .failure(let e):
            logger.warning("cannot raise the open-file limit (RLIMIT_NOFILE) to the hard limit: \(e)")
        }
        let plan = DescriptorPlan.current
        logger.info(
            "descriptors: \(plan.openFileLimit), \(DescriptorPlan.coreReserve) kept for pestod, \(plan.engineLimit) for listeners and relays, relays up to \(plan.relayLimit)"
        )

        do {
            let loop = try EventLoop()
            try loop.stopOnSignals()
            var config = EngineConfiguration()
            config.retryIntervalMilliseconds = retryInterval
            config.limits = TableLimits(maxRules: maxRules, maxSockets: maxSockets)
            config.namespacePath = netns
            config.descriptors = plan
            config.overlap = overlap
            config.tcp.maxConnections = maxConnections ?? plan.defaultMaxConnections
            config.udp.maxFlows = maxUdpFlows ?? plan.defaultMaxFlows
            config.udp.idleTimeoutMilliseconds = udpIdleTimeout * 1000
            let takeoverPath = takeoverDirectory.map { $0 + "/takeover.sock" }
            // A takeover receives everything before this instance touches the bus or the state
            // file; any failure here exits and leaves the running pestod as it was.
            let received =
                try replace ? TakeoverClient.receive(path: takeoverPath!, timeoutMilliseconds: takeoverTimeout, logger: logger) : nil
            let engine = try ForwardingEngine(loop: loop, configuration: config, adoption: received?.adoption)
            logger.info("relay limits: \(config.tcp.maxConnections) TCP connections, \(config.udp.maxFlows) UDP flows")
            engine.budget.onExhausted = { proto in
                switch proto {
                case .tcp:
                    logger.warning(
                        "descriptor budget spent (\(plan.relayLimit) for relays): new TCP connections are reset until descriptors are free")
                case .udp:
                    logger.warning(
                        "descriptor budget spent (\(plan.relayLimit) for relays): datagrams from new UDP clients are dropped until descriptors are free"
                    )
                }
            }
            logger.info(
                "tables: \(engine.tables.map { "\($0.kind.name) [\($0.capabilities)]" }.joined(separator: ", ")), overlapping rules: \(overlap)"
            )
            let connection = try DBusConnection(bus)
            // The bus name first: a second pestod that cannot own it must leave the state
            // file alone (no restore, no move aside, no save). Calls queue in libdbus until
            // the loop runs, so no client sees the tables before they are restored.
            let carried: [StateFile.Entry]
            if var received {
                let result = StateFile.restore(received.entries, into: engine)
                for (entry, reason) in result.carried {
                    logger.warning("handed-over \(entry.table.name) rule \(entry.id) not restored, kept in the state file: \(reason)")
                }
                carried = result.carried.map(\.entry)
                engine.adoptScanListeners(received.adoption)
                let adopted = received.adoption.adopted
                received.adoption.closeUnclaimed()
                let relays = received.adoptRelays(into: engine)
                logger.notice(
                    "takeover: restored \(result.restored) of \(received.entries.count) rules, installed \(adopted) handed-over listeners (\(received.adoption.refused) refused), \(relays.connections) relayed connections and \(relays.flows) UDP flows (\(relays.refused) refused)"
                )
                // The running pestod allowed replacement: the name moves here at once, and goes
                // back to it should this process die before the handover completes.
                try connection.requestName(PestoBusNames.busName, allowingReplacement: true, replacing: true)
                try TakeoverClient.confirm(received.channel)
                // Under systemd (NotifyAccess=all) this process becomes the service's main
                // process before the old one exits, which it does once the channel closes.
                SystemdNotify.send("MAINPID=\(getpid())")
                received.channel.finish()
                // The old pestod has let go of the relayed connections: they move bytes here now.
                engine.tcp.startAdopted()
            } else {
                try connection.requestName(PestoBusNames.busName, allowingReplacement: takeoverPath != nil)
                carried = state.map { restoreState(from: StateFile(path: $0), into: engine, logger: logger) } ?? []
            }
            let server = PestoServer(engine: engine, connection: connection, logger: logger)
            if let state {
                let file = StateFile(path: state)
                server.persist { [unowned engine] () throws(PestoError) in
                    try file.save(StateFile.entries(of: engine) + carried)
                }
            }
            // `none` is the default only on the session bus, which is the user's own: any other
            // bus, a private one given with --address included, may have other users on it.
            let mode = authorize.flatMap(AuthorizationMode.init(rawValue:)) ?? (session ? .none : .polkit)
            if mode == .none && !session {
                logger.warning(
                    "--authorize none: every client that can connect to \(address ?? "the system bus") may change the tables, take the lock and activate listeners"
                )
            }
            switch mode {
            case .none: break
            case .root: server.authorizer = RootOnlyAuthorizer(connection: connection)
            case .polkit: server.authorizer = PolkitAuthorizer(connection: connection)
            }
            logger.info("authorisation of changes: \(mode.rawValue)")
            server.allowsReplacement = takeoverPath != nil
            if let sliceOperations { server.sliceOperations = sliceOperations }
            if let callerBudgetNumbers { server.callerBudget = callerBudgetNumbers }
            try server.start()
            var controlSocket: ControlSocket?
            if let handed = received?.control {
                if handed.path != control {
                    logger.warning("took over the control socket at \(handed.path) (--control says \(control ?? "none"))")
                }
                controlSocket = try ControlSocket(
                    adopting: handed.fd, path: handed.path, server: server, loop: loop, logger: logger, timeoutMilliseconds: controlTimeout)
            } else {
                controlSocket = try control.map {
                    try ControlSocket(path: $0, server: server, loop: loop, logger: logger, timeoutMilliseconds: controlTimeout)
                }
            }
            var takeoverSource: TakeoverSource?
            if let takeoverPath {
                do throws(PestoError) {
                    let source = try TakeoverSource(
                        path: takeoverPath, server: server, loop: loop, logger: logger, timeoutMilliseconds: takeoverTimeout)
                    source.control = controlSocket
                    source.carried = carried
                    // Exits at once: the new pestod holds every socket, the bus name and the
                    // state file now; nothing here may be closed, unlinked or saved.
                    source.onHandedOver = { Glibc.exit(0) }
                    takeoverSource = source
                } catch {
                    logger.warning("no takeover socket: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
                }
            }
            // SIGUSR2 (systemctl reload): start the installed pestod with --replace.
            var upgrade: UpgradeOnSignal?
            if takeoverSource != nil, let executable {
                do throws(PestoError) {
                    upgrade = try UpgradeOnSignal(
                        loop: loop, logger: logger, executable: executable, arguments: Array(CommandLine.arguments.dropFirst()))
                } catch {
                    logger.warning("no upgrade on SIGUSR2: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
                }
            }
            if upgrade == nil {
                // No takeover socket, so no upgrade in place: SIGUSR2 must not end pestod (its
                // default action). `pestod --reload-request` refuses such a pestod up front.
                _ = Sys.upgradeOnSignal(writingTo: -1)
                logger.info("no takeover socket (--runtime-dir): SIGUSR2 (systemctl reload) is ignored")
            }
            engine.start()
            // Under systemd (NotifyAccess=all), a pestod that took over becomes the main process.
            SystemdNotify.send("READY=1")
            loop.run()
            SystemdNotify.send("STOPPING=1")
            server.abandonChanges()  // a change in progress is rolled back, its caller told
            engine.stop()
            // Torn down in this order, explicitly: an optimised build may end a value's
            // lifetime at its last use, and these hold the loop unowned. The control socket
            // is kept open until here; its deinit removes the socket file.
            _ = upgrade.take()
            _ = takeoverSource.take()
            _ = controlSocket.take()
            // Signals already queued go out, then the bus leaves the loop while both exist.
            connection.flush()
            connection.detach()
            loop.removeAllHandlers()  // break the loop ↔ handler cycles so everything is released
            logger.info("stopping: closing \(engine.tables.reduce(0) { $0 + $1.openSockets }) listening sockets")
            if server.disconnected { throw ExitCode(1) }
        } catch let e as DBusErrorReply {
            logger.critical("\(e.message)")
            throw ExitCode(1)
        } catch let e as PestoError {
            logger.critical("\(e.message)\(e.underlyingError.map { ": \($0)" } ?? "")")
            throw ExitCode(1)
        }
    }
}

Pestod.main()

extension OverlapPolicy: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
}
